"""Profile of a Check call: in-process costs per step, and py-spy samples under load.

    .venv/bin/pip install py-spy
    .venv/bin/python -m bench.profile

Part 1 times the steps of one Check call in this process, one thread, no
gRPC: parsing the CheckRequest, the servicer's Check method (our decision
code and response building) with the verified-token cache on and off, and
serializing the response. cProfile then lists the functions that cost most
inside Check.

Part 2 runs the floor servicer and the sidecar under the benchmark's gRPC
load (h2load, 2 connections x 8 streams). Meanwhile `py-spy record --gil`
samples the thread that holds the GIL. Each sample counts for the package of
its innermost known frame: signature verify, protobuf, metrics, our code or gRPC.
The report goes to stdout and to bench/results/profile.md.
"""

from __future__ import annotations

import argparse
import base64
import cProfile
import pstats
import shutil
import statistics
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.issuer import BenchIssuer, bare_verify_seconds, check_request, grpc_frame
from bench.load import GRPC_HEADERS, h2load
from bench.processes import ProcessGroup, cpu_seconds
from bench.servers import BENCH, REPOSITORY, Server, Servers, sidecar_config
from ext_authz.api.envoy.service.auth.v3.external_auth_pb2 import CheckRequest
from ext_authz.config import parse_config
from ext_authz.server import SidecarServer
from ext_authz.signatures import SIGNATURE_CHECKS
from ext_authz.token import parse_token

SAMPLING_RATE_HZ = 250
ROUNDS = 5
# CPU seconds of one timing of one step.
STEP_SECONDS = 0.2
# Categories in the order a stack is tested against them, innermost frame first.
CATEGORIES: tuple[tuple[str, tuple[str, ...]], ...] = (
    (
        "signature verify (ext_authz/signatures.py, cryptography)",
        ("signatures.py", "cryptography/"),
    ),
    ("protobuf parse/serialize (grpc/_common.py)", ("google/protobuf/", "grpc/_common.py")),
    ("metrics (prometheus_client)", ("prometheus_client/",)),
    ("our decision code (ext_authz)", ("ext_authz/",)),
    ("gRPC Python server (grpc/_server.py and the rest of grpc/)", ("grpc/",)),
)
THREAD_POOL = "thread pool and locks (concurrent.futures, threading), outside the above"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__)
    parser.add_argument(
        "--seconds", type=float, default=10.0, help="seconds of sampling per server (default 10)"
    )
    parser.add_argument(
        "--workdir",
        type=Path,
        default=REPOSITORY / ".cache" / "bench-profile",
        help="folder for configs, logs and raw profiles (default .cache/bench-profile)",
    )
    arguments = parser.parse_args(argv)
    py_spy = shutil.which("py-spy", path=str(Path(sys.executable).parent)) or shutil.which("py-spy")
    if py_spy is None:
        print("error: py-spy was not found; install it with .venv/bin/pip install py-spy")
        return 2
    arguments.workdir.mkdir(parents=True, exist_ok=True)

    issuer = BenchIssuer()
    issuer.start()
    processes = ProcessGroup(arguments.workdir)
    try:
        lines = ["## In-process cost per step (one thread, no gRPC)", ""]
        lines += _in_process(issuer)
        lines += ["", "## GIL-holding samples under load (py-spy record --gil)", ""]
        lines += _under_load(issuer, processes, py_spy, arguments.seconds)
    finally:
        processes.stop_all()
        issuer.stop()

    text = "\n".join(lines) + "\n"
    output = BENCH / "results" / "profile.md"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(text)
    print(text, end="")
    return 0


# Part 1


def _in_process(issuer: BenchIssuer) -> list[str]:
    tokens = {algorithm: issuer.token(algorithm) for algorithm in ("RS256", "ES256")}
    cached = _in_process_service(issuer, cache_size=10000)
    uncached = _in_process_service(issuer, cache_size=0)
    requests = {algorithm: check_request(token) for algorithm, token in tokens.items()}
    payload = requests["RS256"].SerializeToString()
    response = cached.service.Check(requests["RS256"], None)
    if response.status.code != 0:
        raise RuntimeError("the in-process servicer denied the benchmark token")

    steps: list[tuple[str, Callable[[], Any]]] = [
        ("parse CheckRequest (protobuf)", lambda: CheckRequest.FromString(payload)),
        ("Check, cached RS256", lambda: cached.service.Check(requests["RS256"], None)),
        ("Check, uncached RS256", lambda: uncached.service.Check(requests["RS256"], None)),
        ("Check, uncached ES256", lambda: uncached.service.Check(requests["ES256"], None)),
        ("serialize CheckResponse (protobuf)", response.SerializeToString),
    ]
    es256 = tokens["ES256"]
    key = issuer.keys["ES256"].public_key()
    parts: list[tuple[str, Callable[[], Any]]] = [
        ("parse_token, ES256 token (split, base64url, JSON)", lambda: parse_token(es256)),
        ("ES256 signature check (raw to DER, then cryptography)", lambda: _es256_check(es256, key)),
    ]
    bare = {
        algorithm: f"bare {algorithm} verify (cryptography)" for algorithm in ("RS256", "ES256")
    }

    # The steps take turns, ROUNDS times, and each reports its median, so a
    # change in the machine's speed affects every step alike.
    timings: dict[str, list[float]] = {name: [] for name, _ in steps + parts}
    timings.update({name: [] for name in bare.values()})
    for _ in range(ROUNDS):
        for name, step in steps + parts:
            timings[name].append(_cpu_per_call(step))
        for algorithm, name in bare.items():
            timings[name].append(bare_verify_seconds(issuer, algorithm, STEP_SECONDS))
    lines = [f"| step | CPU µs/call, median of {ROUNDS} |", "|---|--:|"]
    for name, values in timings.items():
        lines.append(f"| {name} | {statistics.median(values) * 1e6:.1f} |")

    for name, step in steps[1:4]:
        own, cumulative = _top_functions(step)
        lines += ["", f"Inside {name}: cProfile, which inflates every time", ""]
        lines += ["Own time of the costliest functions:", "", "```", *own, "```", ""]
        lines += ["Cumulative time of our functions:", "", "```", *cumulative, "```"]
    for server in (cached, uncached):
        server.stop(drain=False)
    return lines


def _es256_check(token: str, public_key: Any) -> None:
    """Check an ES256 token's signature the way ext_authz/verify.py does."""
    header, payload, signature = token.split(".")
    raw = base64.urlsafe_b64decode(signature + "=" * (-len(signature) % 4))
    if not SIGNATURE_CHECKS["ES256"](f"{header}.{payload}".encode(), public_key, raw):
        raise RuntimeError("the benchmark's ES256 token did not verify")


def _in_process_service(issuer: BenchIssuer, cache_size: int) -> SidecarServer:
    """Build the sidecar's servicer in this process, its keys loaded, without starting servers."""
    # The ports are never bound: only the servicer and the key stores are used.
    document = sidecar_config(issuer, grpc_port=1, http_port=2, cache_size=cache_size)
    server = SidecarServer(parse_config(document))
    for keys in server.issuer_keys.values():
        keys.start()
        if not keys.wait_loaded(10):
            raise RuntimeError("the in-process servicer did not load the benchmark keys")
    return server


def _cpu_per_call(step: Callable[[], Any], min_seconds: float = STEP_SECONDS) -> float:
    step()
    calls = 0
    started = time.process_time()
    while time.process_time() - started < min_seconds:
        for _ in range(50):
            step()
        calls += 50
    return (time.process_time() - started) / calls


def _top_functions(
    step: Callable[[], Any], calls: int = 2000, count: int = 12
) -> tuple[list[str], list[str]]:
    """Profile `step`, and return the top functions by own time and ours by cumulative time."""
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(calls):
        step()
    profiler.disable()
    entries = pstats.Stats(profiler).stats.items()  # type: ignore[attr-defined]

    def listing(rows: list[Any], column: int) -> list[str]:
        lines = [f"{'µs/call':>8}  function"]
        for (file_name, line, function), values in rows[:count]:
            where = f"{_short_path(file_name)}:{line}" if line else file_name
            lines.append(f"{values[column] / calls * 1e6:8.1f}  {function} ({where})")
        return lines

    by_own = sorted(entries, key=lambda entry: entry[1][2], reverse=True)
    ours = [entry for entry in entries if "ext_authz/" in entry[0][0]]
    by_cumulative = sorted(ours, key=lambda entry: entry[1][3], reverse=True)
    return listing(by_own, 2), listing(by_cumulative, 3)


def _short_path(path: str) -> str:
    for marker in ("site-packages/", "ext_authz/", "lib/python3"):
        if marker in path:
            return path[path.index(marker) :].removeprefix("site-packages/")
    return path


# Part 2


def _under_load(
    issuer: BenchIssuer, processes: ProcessGroup, py_spy: str, seconds: float
) -> list[str]:
    workdir = processes.workdir
    bodies = {}
    for algorithm in ("RS256", "ES256"):
        body = workdir / f"check-{algorithm.lower()}.bin"
        body.write_bytes(grpc_frame(check_request(issuer.token(algorithm)).SerializeToString()))
        bodies[algorithm] = body
    servers = Servers(processes, issuer, issuer.token("RS256"))
    runs = [
        ("floor", servers.start_floor(), bodies["RS256"]),
        ("ours, cached RS256", servers.start_sidecar("ours-cached", 10000), bodies["RS256"]),
        ("ours, uncached ES256", servers.start_sidecar("ours-uncached", 0), bodies["ES256"]),
    ]
    names = [name for name, _, _ in runs]
    shares: dict[str, dict[str, float]] = {}
    notes = []
    for name, server, body in runs:
        print(f"profile: sampling {name}", file=sys.stderr, flush=True)
        samples, gil_share, calls, cpu = _sample(py_spy, server, body, seconds, workdir)
        total = sum(samples.values()) or 1
        shares[name] = {category: count / total for category, count in samples.items()}
        notes.append(
            f"- {name}: {calls / seconds:,.0f} calls/s, {cpu / calls * 1e6:.0f} µs CPU per call, "
            f"a thread held the GIL in {gil_share:.0%} of the samples."
        )

    categories = [category for category, _ in CATEGORIES] + [THREAD_POOL, "other"]
    lines = ["| share of GIL-holding samples | " + " | ".join(names) + " |"]
    lines.append("|---|" + "--:|" * len(names))
    for category in categories:
        values = [shares[name].get(category, 0.0) for name in names]
        lines.append(f"| {category} | " + " | ".join(f"{value:.0%}" for value in values) + " |")
    return [*lines, "", *notes]


def _sample(
    py_spy: str, server: Server, body: Path, seconds: float, workdir: Path
) -> tuple[Counter[str], float, int, float]:
    """Profile `server` under load.

    Return the samples per category, the share of samples in which a thread
    held the GIL, the completed calls and the server's CPU seconds.
    """
    raw = workdir / f"{server.name}.pyspy.txt"
    h2load(
        server.check_urls,
        duration=2,
        connections=2,
        streams=8,
        body=body,
        headers=GRPC_HEADERS,
        log_file=workdir / "warmup.tsv",
    )
    spy = subprocess.Popen(
        [
            py_spy,
            "record",
            "--pid",
            str(server.pid),
            "--gil",
            "--nonblocking",
            f"--rate={SAMPLING_RATE_HZ}",
            f"--duration={round(seconds)}",
            "--format=raw",
            f"--output={raw}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    cpu_before = cpu_seconds(server.pid)
    result = h2load(
        server.check_urls,
        duration=seconds + 1,
        connections=2,
        streams=8,
        body=body,
        headers=GRPC_HEADERS,
        log_file=workdir / "profile.tsv",
    )
    cpu_after = cpu_seconds(server.pid)
    spy.wait(timeout=60)

    samples: Counter[str] = Counter()
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        samples[_categorize(stack.split(";"))] += int(count)
    gil_share = sum(samples.values()) / (SAMPLING_RATE_HZ * round(seconds))
    return samples, gil_share, result.requests, cpu_after - cpu_before


def _categorize(frames: list[str]) -> str:
    """Name the category of the innermost frame that belongs to a known package."""
    for frame in reversed(frames):
        for category, markers in CATEGORIES:
            if any(f"({marker}" in frame or f"/{marker}" in frame for marker in markers):
                return category
    if any("concurrent/futures" in frame or "threading.py" in frame for frame in frames):
        return THREAD_POOL
    return "other"


if __name__ == "__main__":
    raise SystemExit(main())
