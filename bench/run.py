"""`make bench`: the sidecar's throughput and latency as ratios to baselines of the same run.

It starts, on 127.0.0.1 and free ports, a JWKS server (in this process), the
floor servicer, the sidecar (verified-token cache on, cache off, and 1 and 2
workers) and one Envoy with a listener per front end. Then it drives each
with h2load or wrk, in groups whose rows take turns (bench/measure.py),
prints one markdown report and writes it to bench/results/latest.md. Every
process it started is stopped at the end, also on an error or Ctrl-C.
"""

from __future__ import annotations

import argparse
import shutil
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from types import FrameType

import grpc

from bench.issuer import BenchIssuer, bare_verify_seconds, check_request, grpc_frame
from bench.load import GRPC_HEADERS, LoadError, LoadResult, h2load, wrk
from bench.measure import SLICES, Target, measure_interleaved
from bench.processes import LOOPBACK, ProcessGroup
from bench.report import Ratio, Report, Row, describe_environment, load_average
from bench.servers import BENCH, ENVOY_CONCURRENCY, REPOSITORY, Server, Servers, sidecar_has_setting
from ext_authz.config import ServerConfig

# Every row keeps 16 calls in flight, the sidecar's default number of gRPC
# threads. Envoy with 2 workers keeps one HTTP/2 connection per worker to an
# ext_authz cluster. So 16 client connections through Envoy reach the
# servicer as about 2 connections with 8 streams each, and direct gRPC rows
# use that shape.
GRPC_CONNECTIONS = 2
GRPC_STREAMS = 8
HTTP_CONNECTIONS = 16
# The algorithm of the token used by every row that repeats one token.
MAIN_ALGORITHM = "RS256"
DEFAULT_CACHE_SIZE = ServerConfig.verified_token_cache_size
# CPU seconds of each bare-verify timing, taken once per round of slices.
BARE_VERIFY_SECONDS = 0.25


class Interrupted(Exception):
    """SIGTERM or SIGINT arrived, so the benchmark stops its processes and exits."""


class Benchmark:
    """One run of every scenario. `report` collects the rows and ratios."""

    def __init__(self, workdir: Path, warmup: float, duration: float) -> None:
        self.workdir = workdir
        self.warmup = warmup
        self.duration = duration
        self.processes = ProcessGroup(workdir)
        self.issuer = BenchIssuer()
        self.report = Report()
        self.bodies: dict[str, Path] = {}
        self.tokens: dict[str, str] = {}
        self.rows: dict[str, Row] = {}

    def run(self) -> Report:
        self._prepare_tokens()
        servers = Servers(self.processes, self.issuer, self.tokens[MAIN_ALGORITHM])
        report = self.report
        report.load_average_before = load_average()
        report.environment = describe_environment(servers.envoy)
        report.settings = (
            f"Each group of rows warms up every row for {self.warmup:g} s, then measures its rows "
            f"in turns, {SLICES} slices each, {self.duration:g} s per row in all. gRPC rows: "
            f"h2load over h2c, {GRPC_CONNECTIONS} connections x {GRPC_STREAMS} streams per "
            f"server port. HTTP rows: through Envoy (--concurrency {ENVOY_CONCURRENCY}), "
            f"{HTTP_CONNECTIONS} HTTP/1.1 connections. Token: {MAIN_ALGORITHM}, unless "
            "the row names ES256. CPU µs/call: user+system CPU time of the authorization server "
            "process (and its workers) per completed call. Other cores: the average number of "
            "cores that processes this benchmark did not start kept busy during the row, out of "
            "the cores listed below."
        )

        floor = servers.start_floor()
        http_front_end = sidecar_has_setting("http_authz_address")
        cached = servers.start_sidecar(
            "ours-cached", DEFAULT_CACHE_SIZE, http_front_end=http_front_end
        )
        uncached = servers.start_sidecar("ours-uncached", cache_size=0)

        self._direct_grpc(floor, cached, uncached)
        self.processes.stop("ours-uncached")
        self._through_envoy(servers, floor, cached)
        self.processes.stop("envoy")
        self._scale_out(servers)

        report.load_average_after = load_average()
        report.ratios = self._ratios()
        return report

    def stop(self) -> None:
        self.processes.stop_all()
        self.issuer.stop()

    def _prepare_tokens(self) -> None:
        self.issuer.start()
        self.issuer.write_jwks(self.workdir / "jwks.json")
        for algorithm in ("RS256", "ES256"):
            token = self.issuer.token(algorithm)
            self.tokens[algorithm] = token
            body = self.workdir / f"check-{algorithm.lower()}.bin"
            body.write_bytes(grpc_frame(check_request(token).SerializeToString()))
            self.bodies[algorithm] = body

    # Scenarios

    def _direct_grpc(self, floor: Server, cached: Server, uncached: Server) -> None:
        """Rows 1 to 3, with the bare signature verify timed between their rounds."""
        targets = [
            self._grpc_target("floor", "1 floor: fixed-OK grpcio servicer", floor),
            self._grpc_target("cached", "2 ours, cached: one token repeated", cached),
        ]
        for algorithm in ("RS256", "ES256"):
            scenario = f"3 ours, uncached {algorithm}: cache size 0"
            targets.append(
                self._grpc_target(f"uncached-{algorithm}", scenario, uncached, algorithm)
            )

        verify_times: dict[str, list[float]] = {"RS256": [], "ES256": []}

        def time_bare_verify() -> None:
            for algorithm, times in verify_times.items():
                times.append(bare_verify_seconds(self.issuer, algorithm, BARE_VERIFY_SECONDS))

        self._measure(targets, between_rounds=time_bare_verify)
        for algorithm, times in verify_times.items():
            row = Row(f"bare {algorithm} verify (cryptography)", "loop in this process")
            row.cpu_us_per_call = sum(times) / len(times) * 1e6
            self._add(f"bare-{algorithm}", row)

    def _through_envoy(self, servers: Servers, floor: Server, cached: Server) -> None:
        """Rows 4a to 4d at full load, then the fixed-rate pair."""
        ports = servers.start_envoy(floor, cached)
        targets = [
            self._http_target("envoy-none", "4a Envoy, no auth", ports["no_auth"]),
            self._http_target("envoy-jwt", "4b Envoy jwt_authn, JWT cache on", ports["jwt_authn"]),
            self._http_target(
                "envoy-ours-grpc", "4c Envoy ext_authz gRPC → ours", ports["ours_grpc"], cached
            ),
        ]
        http_scenario = "4c Envoy ext_authz HTTP → ours"
        if "ours_http" in ports:
            targets.append(
                self._http_target("envoy-ours-http", http_scenario, ports["ours_http"], cached)
            )
        targets.append(
            self._http_target(
                "envoy-floor", "4d Envoy ext_authz gRPC → floor", ports["floor_grpc"], floor
            )
        )
        self._measure(targets)
        if "ours_http" not in ports:
            load = f"wrk, {HTTP_CONNECTIONS} conn"
            self._add("envoy-ours-http", Row(http_scenario, load, check="not built"))

        # Latency at a fixed rate: half of the best front end's full-load rate.
        front_end, best = self._best_front_end()
        if best is None:
            return
        rate = best.rps / 2
        listener = "ours_grpc" if front_end == "gRPC" else "ours_http"
        self._measure(
            [
                self._http_target(
                    "half-none", "4a Envoy, no auth, fixed rate", ports["no_auth"], rate=rate
                ),
                self._http_target(
                    "half-ours",
                    f"4c ext_authz {front_end} → ours, fixed rate",
                    ports[listener],
                    cached,
                    rate=rate,
                ),
            ]
        )

    def _scale_out(self, servers: Servers) -> None:
        """Row 5: the cached sidecar with 1 and with 2 worker processes, when it has workers."""
        scenarios = {1: "5 ours, cached, 1 worker", 2: "5 ours, cached, 2 workers"}
        if not sidecar_has_setting("workers"):
            for workers, scenario in scenarios.items():
                self._add(f"workers-{workers}", Row(scenario, _grpc_load(), check="not built"))
            return
        targets = []
        for workers, scenario in scenarios.items():
            server = servers.start_sidecar(f"ours-{workers}-workers", DEFAULT_CACHE_SIZE, workers)
            targets.append(self._grpc_target(f"workers-{workers}", scenario, server))
        self._measure(targets)
        for workers in scenarios:
            self.processes.stop(f"ours-{workers}-workers")

    def _best_front_end(self) -> tuple[str, LoadResult | None]:
        grpc_result = self.rows["envoy-ours-grpc"].result
        http_result = self.rows["envoy-ours-http"].result
        if http_result is not None and (grpc_result is None or http_result.rps > grpc_result.rps):
            return "HTTP", http_result
        return "gRPC", grpc_result

    # Targets and measurements

    def _grpc_target(
        self, key: str, scenario: str, server: Server, algorithm: str = MAIN_ALGORITHM
    ) -> Target:
        """Direct gRPC Check calls, one h2load per server port (one per worker)."""

        def run(seconds: float) -> LoadResult:
            return h2load(
                server.check_urls,
                duration=seconds,
                connections=GRPC_CONNECTIONS,
                streams=GRPC_STREAMS,
                body=self.bodies[algorithm],
                headers=GRPC_HEADERS,
                log_file=self.workdir / "h2load-requests.tsv",
            )

        ports = len(server.grpc_ports)
        in_flight = GRPC_CONNECTIONS * GRPC_STREAMS * ports
        return Target(key, scenario, _grpc_load(ports), run, server, in_flight)

    def _http_target(
        self,
        key: str,
        scenario: str,
        port: int,
        server: Server | None = None,
        rate: float | None = None,
    ) -> Target:
        """HTTP requests through an Envoy listener: wrk at full load, h2load at a fixed `rate`."""
        url = f"http://{LOOPBACK}:{port}/"
        authorization = f"Bearer {self.tokens[MAIN_ALGORITHM]}"

        def run(seconds: float) -> LoadResult:
            if rate is None:
                return wrk(
                    url,
                    duration=seconds,
                    connections=HTTP_CONNECTIONS,
                    headers=(f"Authorization: {authorization}",),
                )
            return h2load(
                [url],
                duration=seconds,
                connections=HTTP_CONNECTIONS,
                http1=True,
                rps_per_client=rate / HTTP_CONNECTIONS,
                headers=(f"authorization: {authorization}",),
                log_file=self.workdir / "h2load-requests.tsv",
            )

        load = f"wrk, {HTTP_CONNECTIONS} conn"
        if rate is not None:
            load = f"h2load HTTP/1.1, {HTTP_CONNECTIONS} conn, {rate:,.0f} req/s"
        return Target(key, scenario, load, run, server, HTTP_CONNECTIONS, rate)

    def _measure(
        self, targets: list[Target], between_rounds: Callable[[], None] | None = None
    ) -> None:
        rows = measure_interleaved(
            targets, self.warmup, self.duration, between_rounds, progress=_progress
        )
        for target, row in zip(targets, rows, strict=True):
            self._add(target.key, row)

    def _add(self, key: str, row: Row) -> None:
        self.rows[key] = row
        self.report.rows.append(row)

    # Ratios

    def _ratios(self) -> list[Ratio]:
        rows = self.rows

        def rps(key: str) -> float | None:
            result = rows[key].result if key in rows else None
            return result.rps if result else None

        def cpu(key: str) -> float | None:
            return rows[key].cpu_us_per_call if key in rows else None

        def divide(numerator: float | None, denominator: float | None) -> float | None:
            if numerator is None or not denominator:
                return None
            return numerator / denominator

        front_end, best = self._best_front_end()
        half_none, half_ours = rows.get("half-none"), rows.get("half-ours")
        added_p50 = None
        if half_none and half_ours and half_none.result and half_ours.result:
            added_p50 = half_ours.result.p50_ms - half_none.result.p50_ms
        floor_cpu, bare_es256 = cpu("floor"), cpu("bare-ES256")
        verify_budget = floor_cpu + bare_es256 if floor_cpu and bare_es256 else None

        return [
            _at_least("ours cached ÷ floor (req/s)", divide(rps("cached"), rps("floor")), 0.85),
            _at_least(
                f"ours through Envoy ÷ Envoy jwt_authn (req/s), best front end: {front_end}",
                divide(best.rps if best else None, rps("envoy-jwt")),
                0.5,
            ),
            _at_least(
                "ours through Envoy over gRPC ÷ floor servicer through Envoy (req/s)",
                divide(rps("envoy-ours-grpc"), rps("envoy-floor")),
                0.9,
            ),
            _at_most(
                f"added p50 through Envoy ({front_end}) vs no auth, at half of our max load",
                added_p50,
                0.5,
                unit=" ms",
            ),
            _at_most(
                "ours uncached ES256 CPU/call ÷ (floor CPU/call + bare ES256 verify)",
                divide(cpu("uncached-ES256"), verify_budget),
                1.3,
            ),
            _at_least(
                "2 workers ÷ 1 worker (req/s)", divide(rps("workers-2"), rps("workers-1")), 1.7
            ),
        ]


def _grpc_load(ports: int = 1) -> str:
    load = f"h2load h2c, {GRPC_CONNECTIONS} conn x {GRPC_STREAMS} streams"
    return f"{load}, per port x {ports}" if ports > 1 else load


def _at_least(name: str, value: float | None, goal: float, unit: str = "") -> Ratio:
    met = None if value is None else value >= goal
    return Ratio(name, value, f"≥ {goal:g}{unit}", met, unit)


def _at_most(name: str, value: float | None, goal: float, unit: str = "") -> Ratio:
    met = None if value is None else value <= goal
    return Ratio(name, value, f"≤ {goal:g}{unit}", met, unit)


def _progress(message: str) -> None:
    print(f"bench: {message}", file=sys.stderr, flush=True)


def _raise_interrupted(signum: int, frame: FrameType | None) -> None:
    raise Interrupted(signal.Signals(signum).name)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench", description="Benchmark the sidecar against its baselines."
    )
    parser.add_argument(
        "--warmup", type=float, default=3.0, help="warm-up seconds per row (default 3)"
    )
    parser.add_argument(
        "--duration", type=float, default=10.0, help="measured seconds per row (default 10)"
    )
    parser.add_argument(
        "--output",
        type=Path,
        default=BENCH / "results" / "latest.md",
        help="markdown file for the report (default bench/results/latest.md)",
    )
    parser.add_argument(
        "--workdir",
        type=Path,
        default=REPOSITORY / ".cache" / "bench",
        help="folder for generated configs, request bodies and logs (default .cache/bench)",
    )
    arguments = parser.parse_args(argv)
    for tool in ("h2load", "wrk"):
        if shutil.which(tool) is None:
            print(f"error: {tool} was not found; `make bench` installs it", file=sys.stderr)
            return 2

    signal.signal(signal.SIGTERM, _raise_interrupted)
    signal.signal(signal.SIGINT, _raise_interrupted)
    arguments.workdir.mkdir(parents=True, exist_ok=True)
    benchmark = Benchmark(arguments.workdir, arguments.warmup, arguments.duration)
    try:
        report = benchmark.run()
    except Interrupted as signal_name:
        print(f"bench: stopped by {signal_name}", file=sys.stderr)
        return 130
    except (RuntimeError, LoadError, OSError, grpc.RpcError) as error:
        print(f"error: {error}", file=sys.stderr)
        print(f"bench: the processes' logs are in {arguments.workdir}", file=sys.stderr)
        return 1
    finally:
        benchmark.stop()

    text = report.markdown()
    arguments.output.parent.mkdir(parents=True, exist_ok=True)
    arguments.output.write_text(text)
    print(text, end="")
    _progress(f"wrote {arguments.output}")
    failed = [row.scenario for row in report.rows if row.check not in ("ok", "not built")]
    if failed:
        print(f"error: the checks failed in: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0
