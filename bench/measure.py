"""Interleaved measurement: rows that are compared take turns, slice by slice.

Absolute speed drifts on a shared machine, from other processes and from
other virtual machines on the same host. Rows measured one after the other
would carry that drift into their ratios. So the targets of one group each
get a warm-up, then run in turns for SLICES slices of duration/SLICES
seconds each. Around every slice the server's CPU time and decision
counters are read, and the CPU time that other processes used is recorded.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from bench.load import LoadResult, combine
from bench.processes import cpu_seconds, other_cpu_seconds
from bench.report import Row
from bench.servers import Server

# wrk takes whole seconds, so the default 10 s per row gives slices of 2 s.
SLICES = 5
# Long enough for a server to complete the calls left in flight by a stopped
# load generator (at most 32, at tens of milliseconds each).
SETTLE_SECONDS = 0.5


@dataclass(frozen=True)
class Target:
    """One row to measure: how to drive it, and the server whose CPU time and decisions count.

    `run(seconds)` drives the load for that long. `server` is None where no
    authorization server is involved. `in_flight` is the maximum number of
    calls the load generator keeps open, and `rate` is set for fixed-rate rows.
    """

    key: str
    scenario: str
    load: str
    run: Callable[[float], LoadResult]
    server: Server | None = None
    in_flight: int = 0
    rate: float | None = None


@dataclass
class _Tally:
    results: list[LoadResult] = field(default_factory=list)
    server_cpu: float = 0.0
    allowed: int = 0
    not_allowed: int = 0
    miscounted_slices: int = 0
    other_cpu: float = 0.0
    elapsed: float = 0.0


def measure_interleaved(
    targets: list[Target],
    warmup: float,
    duration: float,
    between_rounds: Callable[[], None] | None = None,
    progress: Callable[[str], None] = print,
) -> list[Row]:
    """Measure `targets` in turns and return one row per target, in the same order.

    `between_rounds` runs after each round of slices, for a measurement in
    this process that should share the rows' conditions.
    """
    for target in targets:
        progress(f"warming up {target.scenario}")
        target.run(warmup)

    progress("measuring " + ", ".join(target.scenario for target in targets))
    tallies = [_Tally() for _ in targets]
    for _ in range(SLICES):
        for target, tally in zip(targets, tallies, strict=True):
            _measure_slice(target, tally, duration / SLICES)
        if between_rounds is not None:
            between_rounds()
    return [_row(target, tally) for target, tally in zip(targets, tallies, strict=True)]


def _measure_slice(target: Target, tally: _Tally, seconds: float) -> None:
    server = target.server
    counted = server is not None and server.http_port != 0
    time.sleep(SETTLE_SECONDS)
    decisions_before = server.decision_counts() if counted else (0.0, 0.0)
    cpu_before = cpu_seconds(server.pid) if server else 0.0
    other_before, started = other_cpu_seconds(), time.monotonic()

    result = target.run(seconds)

    tally.other_cpu += other_cpu_seconds() - other_before
    tally.elapsed += time.monotonic() - started
    time.sleep(SETTLE_SECONDS)
    if server is not None:
        tally.server_cpu += cpu_seconds(server.pid) - cpu_before
    tally.results.append(result)
    if counted:
        decisions_after = server.decision_counts()
        allowed = round(decisions_after[0] - decisions_before[0])
        tally.allowed += allowed
        tally.not_allowed += round(decisions_after[1] - decisions_before[1])
        # The server may have decided up to `in_flight` more calls than the
        # load generator counted, because a stopping load generator drops
        # the calls still in flight and the server completes them.
        if not result.requests <= allowed <= result.requests + target.in_flight:
            tally.miscounted_slices += 1


def _row(target: Target, tally: _Tally) -> Row:
    result = combine(tally.results)
    row = Row(target.scenario, target.load, result)
    row.other_cores = max(0.0, tally.other_cpu / tally.elapsed) if tally.elapsed else None

    problems = [f"{result.errors} failed or non-2xx"] if result.errors else []
    calls = result.requests
    if target.server is not None and target.server.http_port != 0:
        calls = tally.allowed
        if tally.not_allowed:
            problems.append(f"{tally.not_allowed} calls not allowed")
        if tally.miscounted_slices:
            problems.append(
                f"{tally.allowed} allow decisions for {result.requests} requests "
                f"({tally.miscounted_slices} slices off)"
            )
    if target.server is not None and calls > 0:
        row.cpu_us_per_call = tally.server_cpu / calls * 1e6
    if target.rate is not None and result.rps < 0.9 * target.rate:
        problems.append(f"reached {result.rps:,.0f} of {target.rate:,.0f} req/s")
    row.check = "; ".join(problems) or "ok"
    return row
