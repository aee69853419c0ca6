"""Profile of a Check call: in-process costs per step, and CPU per call under load by parts.

    .venv/bin/python -m bench.profile

Part 1 times the steps of one Check call in this process, one thread, no
gRPC: parsing the CheckRequest, the servicer's Check method (our decision
code and response building) with the verified-token cache on and off, and
serializing the response. cProfile then lists the functions that cost most
inside Check.

Part 2 puts servers under the benchmark's gRPC load (h2load, 2 connections
x 8 streams) and measures their CPU time per call: the floor servicer, the
sidecar with its Check handler cut down (bench/sidecar_variant.py), and the
whole sidecar. Each row is compared with the row that lacks one part, so the
differences are what the sidecar's process, the decision and the response
cost under load. The rows take turns, so a change in the machine's speed
affects them alike.

A sampling profiler is no help under load here. py-spy 0.4.3 reports the
sidecar's event-loop thread as idle, because uvloop and grpc.aio run the
handlers from native code.

The report goes to stdout and to bench/results/profile.md.
"""

from __future__ import annotations

import argparse
import base64
import cProfile
import pstats
import statistics
import sys
import time
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

ROUNDS = 5
# CPU seconds of one timing of one step.
STEP_SECONDS = 0.2


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__)
    parser.add_argument(
        "--seconds",
        type=float,
        default=4.0,
        help="seconds of load per server and round (default %(default)s)",
    )
    parser.add_argument(
        "--workdir",
        type=Path,
        default=REPOSITORY / ".cache" / "bench-profile",
        help="folder for configs, logs and raw profiles (default .cache/bench-profile)",
    )
    arguments = parser.parse_args(argv)
    arguments.workdir.mkdir(parents=True, exist_ok=True)

    issuer = BenchIssuer()
    issuer.start()
    processes = ProcessGroup(arguments.workdir)
    try:
        lines = ["## In-process cost per step (one thread, no gRPC)", ""]
        lines += _in_process(issuer)
        lines += ["", "## CPU per call under load, by parts", ""]
        lines += _under_load(issuer, processes, arguments.seconds)
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


def _under_load(issuer: BenchIssuer, processes: ProcessGroup, seconds: float) -> list[str]:
    workdir = processes.workdir
    bodies = {}
    for algorithm in ("RS256", "ES256"):
        body = workdir / f"check-{algorithm.lower()}.bin"
        body.write_bytes(grpc_frame(check_request(issuer.token(algorithm)).SerializeToString()))
        bodies[algorithm] = body
    servers = Servers(processes, issuer, issuer.token("RS256"))
    rs256, es256 = bodies["RS256"], bodies["ES256"]
    # (row, server, request body, the row it is compared with)
    runs = [
        ("A floor servicer", servers.start_floor(), rs256, None),
        (
            "B sidecar, handler returns a fixed response",
            servers.start_sidecar("fixed-response", 10000, variant="fixed-response"),
            rs256,
            "A",
        ),
        (
            "C sidecar, handler decides (cached RS256), returns a fixed response",
            servers.start_sidecar("decide-only", 10000, variant="decide-only"),
            rs256,
            "B",
        ),
        (
            "D sidecar, handler decides twice (cached RS256), returns a fixed response",
            servers.start_sidecar("decide-twice", 10000, variant="decide-twice"),
            rs256,
            "C",
        ),
        ("E sidecar, cached RS256", servers.start_sidecar("cached", 10000), rs256, "C"),
        ("F sidecar, uncached ES256", servers.start_sidecar("uncached", 0), es256, "E"),
    ]
    per_call: dict[str, list[float]] = {name[0]: [] for name, *_ in runs}
    rates: dict[str, list[float]] = {name[0]: [] for name, *_ in runs}
    for round_number in range(1, ROUNDS + 1):
        print(f"profile: load round {round_number} of {ROUNDS}", file=sys.stderr, flush=True)
        for name, server, body, _ in runs:
            calls, cpu = _load(server, body, seconds, workdir)
            per_call[name[0]].append(cpu / calls)
            rates[name[0]].append(calls / seconds)

    lines = [
        f"| server | calls/s, median | CPU µs/call, median of {ROUNDS} | difference |",
        "|---|--:|--:|--:|",
    ]
    for name, _, _, baseline in runs:
        cost = statistics.median(per_call[name[0]]) * 1e6
        difference = "—"
        if baseline is not None:
            baseline_cost = statistics.median(per_call[baseline]) * 1e6
            difference = f"{cost - baseline_cost:+.0f} over {baseline}"
        rate = statistics.median(rates[name[0]])
        lines.append(f"| {name} | {rate:,.0f} | {cost:.0f} | {difference} |")
    return lines


def _load(server: Server, body: Path, seconds: float, workdir: Path) -> tuple[int, float]:
    """Put `server` under load; return the completed calls and the server's CPU seconds."""
    cpu_before = cpu_seconds(server.pid)
    result = h2load(
        server.check_urls,
        duration=seconds,
        connections=2,
        streams=8,
        body=body,
        headers=GRPC_HEADERS,
        log_file=workdir / "profile.tsv",
    )
    cpu_after = cpu_seconds(server.pid)
    return result.requests, cpu_after - cpu_before


if __name__ == "__main__":
    raise SystemExit(main())
