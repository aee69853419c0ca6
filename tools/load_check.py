"""Measure a rough Check throughput, CPU and memory figure for the sidecar on loopback.

Usage: python tools/load_check.py [--seconds 20] [--processes 2] [--threads 4]

The script starts the development issuer in this process and the sidecar as a
child process, both on free 127.0.0.1 ports. Client processes then send Check
calls that carry one valid RS256 token, so every call takes the allow path
with the issuer's key already cached, and with the default
--verified-token-cache-size the verified token too. At the end it prints requests per
second, the sidecar's CPU time per call (from /proc/PID/stat) and its resident
memory (VmRSS and VmHWM from /proc/PID/status).

Clients and sidecar share the machine's cores, so the requests-per-second
figure is a lower bound for a sidecar that has its cores to itself. CPU time
per call is the figure to size with. This is a rough check, not a benchmark.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
import yaml

REPOSITORY = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPOSITORY))

from ext_authz.api.envoy.service.auth.v3 import external_auth_pb2_grpc  # noqa: E402
from ext_authz.api.envoy.service.auth.v3.external_auth_pb2 import CheckRequest  # noqa: E402
from ext_authz.dev.issuer import DevIssuer, DevIssuerSettings  # noqa: E402

LOOPBACK = "127.0.0.1"
MAX_SECONDS = 60.0
WARM_UP_SECONDS = 2.0
START_TIMEOUT_SECONDS = 20.0
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
GRPC_OK = 0


def main() -> int:
    arguments = _parse_arguments()
    if not 1 <= arguments.seconds <= MAX_SECONDS:
        print(f"error: --seconds must be between 1 and {MAX_SECONDS:.0f}", file=sys.stderr)
        return 2

    issuer = DevIssuer(DevIssuerSettings(host=LOOPBACK, port=0))
    issuer.start()
    token = issuer.mint("load-check", lifetime_seconds=3600)
    try:
        with tempfile.TemporaryDirectory(prefix="ext-authz-load-") as workdir:
            sidecar = _start_sidecar(Path(workdir), issuer.issuer_url, arguments)
            try:
                result = _measure(sidecar, token, arguments)
            finally:
                sidecar.process.terminate()
                sidecar.process.wait(timeout=30)
    finally:
        issuer.stop()

    print(json.dumps(result, indent=2))
    return 0 if result["errors"] == 0 else 1


def _parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--seconds", type=float, default=20.0, help="measured load duration in seconds (1 to 60)"
    )
    parser.add_argument(
        "--processes", type=int, default=2, help="client processes (default %(default)s)"
    )
    parser.add_argument(
        "--threads", type=int, default=4, help="client threads per process (default %(default)s)"
    )
    parser.add_argument(
        "--verified-token-cache-size",
        type=int,
        default=10000,
        help="the sidecar's server.verified_token_cache_size; 0 verifies the signature on every "
        "call (default %(default)s)",
    )
    return parser.parse_args()


class Sidecar:
    def __init__(self, process: subprocess.Popen[bytes], grpc_port: int, http_port: int) -> None:
        self.process = process
        self.grpc_target = f"{LOOPBACK}:{grpc_port}"
        self.http_url = f"http://{LOOPBACK}:{http_port}"


def _start_sidecar(workdir: Path, issuer_url: str, arguments: argparse.Namespace) -> Sidecar:
    grpc_port, http_port = _free_port(), _free_port()
    config = {
        "server": {
            "grpc_address": f"{LOOPBACK}:{grpc_port}",
            "http_address": f"{LOOPBACK}:{http_port}",
            "verified_token_cache_size": arguments.verified_token_cache_size,
        },
        "logging": {"level": "warning", "format": "json"},
        "issuers": [
            {
                "name": "dev",
                "issuer": issuer_url,
                "audiences": ["Amplify Central"],
                "allow_insecure_http": True,
            }
        ],
        "policies": [{"name": "default", "issuers": ["dev"]}],
    }
    config_file = workdir / "config.yaml"
    config_file.write_text(yaml.safe_dump(config))
    process = subprocess.Popen(
        [sys.executable, "-m", "ext_authz.cli", "serve", "--config", str(config_file)],
        cwd=REPOSITORY,
        stdin=subprocess.DEVNULL,
    )
    sidecar = Sidecar(process, grpc_port, http_port)

    # Ready and with the issuer's key loaded, so every call takes the cached-key path.
    deadline = time.monotonic() + START_TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the sidecar exited with code {process.returncode} at start-up")
        try:
            with urllib.request.urlopen(f"{sidecar.http_url}/readyz", timeout=1) as response:
                if json.load(response)["issuers"][0]["keys"] > 0:
                    return sidecar
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.1)
    process.kill()
    raise RuntimeError(f"the sidecar was not ready after {START_TIMEOUT_SECONDS:.0f} s")


def _measure(sidecar: Sidecar, token: str, arguments: argparse.Namespace) -> dict[str, Any]:
    pid = sidecar.process.pid
    context = multiprocessing.get_context("spawn")
    start_at = time.time() + WARM_UP_SECONDS + 1.0
    stop_at = start_at + arguments.seconds
    with context.Pool(arguments.processes) as pool:
        pending = pool.starmap_async(
            _client_process,
            [(sidecar.grpc_target, token, arguments.threads, start_at, stop_at)]
            * arguments.processes,
        )
        time.sleep(max(0.0, start_at - time.time()))
        cpu_before = _cpu_seconds(pid)
        wall_before = time.monotonic()
        time.sleep(max(0.0, stop_at - time.time()))
        cpu_after = _cpu_seconds(pid)
        wall = time.monotonic() - wall_before
        memory = _memory_kib(pid)
        outcomes = pending.get(timeout=arguments.seconds + 60)

    calls = sum(outcome["calls"] for outcome in outcomes)
    errors = sum(outcome["errors"] for outcome in outcomes)
    latencies = sorted(value for outcome in outcomes for value in outcome["latencies"])
    cpu = cpu_after - cpu_before
    return {
        "date": datetime.now(UTC).strftime("%Y-%m-%d"),
        "machine": {
            "nproc": os.cpu_count(),
            "cpu_model": _cpu_model(),
            "python": platform.python_version(),
        },
        "load": {
            "seconds": round(wall, 1),
            "client_processes": arguments.processes,
            "client_threads_per_process": arguments.threads,
            "sidecar_verified_token_cache_size": arguments.verified_token_cache_size,
        },
        "calls": calls,
        "errors": errors,
        "requests_per_second": round(calls / wall, 1),
        "sidecar_cpu_cores_busy": round(cpu / wall, 2),
        "sidecar_cpu_ms_per_call": round(1000 * cpu / calls, 3) if calls else None,
        "sidecar_rss_mib": round(memory["VmRSS"] / 1024, 1),
        "sidecar_peak_rss_mib": round(memory["VmHWM"] / 1024, 1),
        "client_latency_ms": {
            "p50": round(1000 * statistics.median(latencies), 2) if latencies else None,
            "p99": round(1000 * latencies[int(0.99 * (len(latencies) - 1))], 2)
            if latencies
            else None,
        },
    }


def _client_process(
    target: str, token: str, threads: int, start_at: float, stop_at: float
) -> dict[str, Any]:
    """Send Check calls from `threads` threads until `stop_at`; count those after `start_at`."""
    import threading

    results: list[dict[str, Any]] = []
    lock = threading.Lock()

    def run() -> None:
        request = CheckRequest()
        request.attributes.request.http.headers["authorization"] = f"Bearer {token}"
        calls = errors = 0
        latencies: list[float] = []
        with grpc.insecure_channel(target) as channel:
            stub = external_auth_pb2_grpc.AuthorizationStub(channel)
            while True:
                sent = time.time()
                if sent >= stop_at:
                    break
                response = stub.Check(request, timeout=5)
                elapsed = time.time() - sent
                if sent < start_at:
                    continue
                calls += 1
                latencies.append(elapsed)
                if response.status.code != GRPC_OK:
                    errors += 1
        with lock:
            results.append({"calls": calls, "errors": errors, "latencies": latencies})

    workers = [threading.Thread(target=run) for _ in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return {
        "calls": sum(result["calls"] for result in results),
        "errors": sum(result["errors"] for result in results),
        "latencies": [value for result in results for value in result["latencies"]],
    }


def _cpu_seconds(pid: int) -> float:
    # Fields 14 and 15 of /proc/PID/stat are utime and stime, in clock ticks.
    # The command name in field 2 may contain spaces, so split after its ")".
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def _memory_kib(pid: int) -> dict[str, int]:
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, rest = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            values[name] = int(rest.split()[0])
    return values


def _cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.partition(":")[2].strip()
    return platform.processor() or "unknown"


def _free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind((LOOPBACK, 0))
        return int(probe.getsockname()[1])


if __name__ == "__main__":
    sys.exit(main())
