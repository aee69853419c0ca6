"""Load generators: h2load for gRPC over h2c and for rate-limited HTTP/1.1, wrk for HTTP/1.1.

Each run returns a LoadResult with every request's latency, so that the
slices of one row can be combined into exact percentiles. wrk prints its
latency histogram through bench/wrk-latencies.lua. h2load prints only min,
max, mean and sd, so its times come from its `--log-file`.
"""

from __future__ import annotations

import math
import re
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

GRPC_HEADERS = ("content-type: application/grpc", "te: trailers")
WRK_SCRIPT = Path(__file__).resolve().parent / "wrk-latencies.lua"
# A run may overrun its duration by this much (connection set-up, stopping
# the clients) before it is treated as hung.
RUN_TIMEOUT_MARGIN_SECONDS = 30.0


class LoadError(Exception):
    """A load generator failed or printed output this module cannot read."""


@dataclass(frozen=True)
class LoadResult:
    """Counts, rate and latency percentiles of one measured run of a load generator."""

    tool: str
    requests: int  # completed with a 2xx status within the measured duration
    errors: int  # non-2xx statuses, failed or errored requests, socket errors
    rps: float
    p50_ms: float
    p99_ms: float
    seconds: float  # the measured duration, as the tool reports it
    # Every request's time in ms, ascending, so that runs can be combined.
    latencies_ms: tuple[float, ...] = field(default=(), repr=False)


def combine(results: Sequence[LoadResult]) -> LoadResult:
    """Return several runs against one target as one result, with its percentiles recomputed."""
    latencies = sorted(value for result in results for value in result.latencies_ms)
    if not latencies:
        raise ValueError("no request times to combine")
    requests = sum(result.requests for result in results)
    seconds = sum(result.seconds for result in results)
    return LoadResult(
        results[0].tool,
        requests=requests,
        errors=sum(result.errors for result in results),
        rps=requests / seconds,
        p50_ms=percentile(latencies, 0.50),
        p99_ms=percentile(latencies, 0.99),
        seconds=seconds,
        latencies_ms=tuple(latencies),
    )


def h2load(
    urls: Sequence[str],
    *,
    duration: float,
    connections: int,
    streams: int = 1,
    body: Path | None = None,
    headers: tuple[str, ...] = (),
    http1: bool = False,
    rps_per_client: float | None = None,
    log_file: Path,
) -> LoadResult:
    """Run one single-threaded h2load process per URL, all at once, for `duration` seconds.

    With `rps_per_client`, each connection sends at that rate for about
    `duration` seconds (see _fixed_rate_options).

    One h2load run sends to one host and port only, so a server with several
    ports gets one process per port, each with `connections` connections.
    The result adds up their counts and rates and takes the percentiles over
    all their requests.
    """
    commands = []
    log_files = []
    for index, url in enumerate(urls):
        log_files.append(log_file.with_suffix(f".{index}{log_file.suffix}"))
        # h2load appends to an existing log file, which would mix in older runs.
        log_files[-1].unlink(missing_ok=True)
        command = [
            "h2load",
            "--threads=1",
            f"--clients={connections}",
            f"--max-concurrent-streams={streams}",
            f"--log-file={log_files[-1]}",
        ]
        if rps_per_client is None:
            command.append(f"--duration={duration:g}")
        else:
            command += _fixed_rate_options(rps_per_client, connections, duration)
        if body is not None:
            command.append(f"--data={body}")
        if http1:
            command.append("--h1")
        command += [f"--header={header}" for header in headers]
        commands.append([*command, url])

    requests = errors = 0
    rps = seconds = 0.0
    for output in _run_all(commands, duration):
        counts = re.search(
            r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, "
            r"(\d+) errored, (\d+) timeout",
            output,
        )
        statuses = re.search(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", output)
        rate = re.search(r"finished in ([\d.]+)(us|ms|s), ([\d.]+) req/s", output)
        if counts is None or statuses is None or rate is None:
            raise LoadError(f"h2load printed no summary; its output:\n{output[-3000:]}")
        requests += int(statuses.group(1))
        errors += sum(int(statuses.group(index)) for index in (2, 3, 4))
        errors += int(counts.group(5)) + int(counts.group(6))
        rps += float(rate.group(3))
        # The runs went on at the same time, so the longest one is the duration.
        seconds = max(seconds, _milliseconds(rate.group(1), rate.group(2)) / 1000)

    latencies = _logged_latencies(log_files)
    return LoadResult(
        "h2load",
        requests=requests,
        errors=errors,
        rps=rps,
        p50_ms=percentile(latencies, 0.50),
        p99_ms=percentile(latencies, 0.99),
        seconds=seconds,
        latencies_ms=tuple(latencies),
    )


def _fixed_rate_options(rps_per_client: float, connections: int, duration: float) -> list[str]:
    """Return h2load options for `rps_per_client` on each connection, for about `duration` s.

    Clients that connect together fire their --rps timers together, in
    bursts of one request per connection, and a burst queues in the server.
    So the connections open a few per millisecond, spread over one interval
    between requests, and the run sends a fixed number of requests, because
    h2load does not allow --duration with --rate.
    """
    total_rate = rps_per_client * connections
    return [
        f"--rps={rps_per_client:g}",
        f"--requests={max(connections, round(total_rate * duration))}",
        f"--rate={math.ceil(total_rate / 1000)}",
        "--rate-period=1ms",
    ]


def wrk(
    url: str, *, duration: float, connections: int, headers: tuple[str, ...] = ()
) -> LoadResult:
    """Run wrk with one thread for `duration` seconds, rounded to whole seconds as wrk takes them.

    The script bench/wrk-latencies.lua prints wrk's latency histogram, from
    which the percentiles come.
    """
    command = [
        "wrk",
        "--threads=1",
        f"--connections={connections}",
        f"--duration={max(1, round(duration))}s",
        f"--script={WRK_SCRIPT}",
    ]
    for header in headers:
        command += ["--header", header]
    command.append(url)

    output = _run(command, duration)
    completed = re.search(r"(\d+) requests in ([\d.]+)(us|ms|s),", output)
    rate = re.search(r"Requests/sec:\s+([\d.]+)", output)
    _, marker, histogram = output.partition("latency histogram:\n")
    if completed is None or rate is None or not marker:
        raise LoadError(f"wrk printed no summary; its output:\n{output[-3000:]}")

    latencies: list[float] = []
    for line in histogram.splitlines():
        microseconds, count = line.split()
        latencies += [int(microseconds) / 1000.0] * int(count)
    if not latencies:
        raise LoadError(f"wrk recorded no latencies; its output:\n{output[-3000:]}")

    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    socket_errors = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output
    )
    bad = int(non_2xx.group(1)) if non_2xx else 0
    broken = sum(int(value) for value in socket_errors.groups()) if socket_errors else 0
    return LoadResult(
        tool="wrk",
        requests=int(completed.group(1)) - bad,
        errors=bad + broken,
        rps=float(rate.group(1)),
        p50_ms=percentile(latencies, 0.50),
        p99_ms=percentile(latencies, 0.99),
        seconds=_milliseconds(completed.group(2), completed.group(3)) / 1000,
        latencies_ms=tuple(latencies),
    )


def percentile(sorted_values: list[float], fraction: float) -> float:
    """Return the nearest-rank percentile of an ascending list (fraction 0.5 is the median)."""
    if not sorted_values:
        raise ValueError("no values")
    rank = max(1, math.ceil(fraction * len(sorted_values)))
    return sorted_values[rank - 1]


def _logged_latencies(log_files: list[Path]) -> list[float]:
    # Columns: start time (µs since the epoch), HTTP status, µs until the end
    # of the response. Only requests of the measured duration are logged.
    durations = sorted(
        int(line.split("\t")[2]) / 1000.0
        for log_file in log_files
        for line in log_file.read_text().splitlines()
        if line.count("\t") >= 2
    )
    if not durations:
        raise LoadError(f"h2load wrote no request times to {', '.join(map(str, log_files))}")
    return durations


def _milliseconds(value: str, unit: str) -> float:
    scale = {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]
    return float(value) * scale


def _run(command: list[str], duration: float) -> str:
    return _run_all([command], duration)[0]


def _run_all(commands: list[list[str]], duration: float) -> list[str]:
    """Run load generators at the same time and return their standard outputs.

    Raise LoadError when one fails or overruns. The others are killed then,
    and so are all of them when the benchmark is interrupted.
    """
    limit = duration + RUN_TIMEOUT_MARGIN_SECONDS
    processes = [
        subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for command in commands
    ]
    outputs = []
    try:
        for command, process in zip(commands, processes, strict=True):
            try:
                stdout, stderr = process.communicate(timeout=limit)
            except subprocess.TimeoutExpired:
                raise LoadError(f"{command[0]} timed out after {limit:g} s") from None
            if process.returncode != 0:
                raise LoadError(
                    f"{command[0]} exited with code {process.returncode}: "
                    f"{(stderr or stdout)[-3000:]}"
                )
            outputs.append(stdout)
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
    return outputs
