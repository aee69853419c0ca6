"""The benchmark's result table: rows, ratios, the machine and tool versions, as markdown."""

from __future__ import annotations

import os
import platform
import re
import subprocess
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import cryptography
import grpc
from google import protobuf

from bench.load import LoadResult


@dataclass
class Row:
    """One measured (or not built) scenario of the table."""

    scenario: str
    load: str
    result: LoadResult | None = None
    cpu_us_per_call: float | None = None
    # Cores that processes the benchmark did not start kept busy, on average,
    # during the measured duration: the noise of a shared machine.
    other_cores: float | None = None
    # "ok", what the run's checks found wrong, or why the row was not measured.
    check: str = "ok"


@dataclass(frozen=True)
class Ratio:
    """A ratio of two rows of the same run, and its goal. `met` is None when not measured."""

    name: str
    value: float | None
    goal: str
    met: bool | None
    unit: str = ""


@dataclass
class Report:
    """Everything `make bench` prints, in table order."""

    started: datetime = field(default_factory=lambda: datetime.now(UTC))
    load_average_before: str = ""
    load_average_after: str = ""
    settings: str = ""
    rows: list[Row] = field(default_factory=list)
    ratios: list[Ratio] = field(default_factory=list)
    environment: dict[str, str] = field(default_factory=dict)

    def markdown(self) -> str:
        lines = [
            f"Run started {self.started:%Y-%m-%d %H:%M} UTC. "
            f"Load average (1, 5, 15 min) before: {self.load_average_before}; "
            f"after: {self.load_average_after}.",
            "",
            self.settings,
            "",
            "| scenario | load | req/s | p50 ms | p99 ms | CPU µs/call | other cores | check |",
            "|---|---|--:|--:|--:|--:|--:|---|",
        ]
        for row in self.rows:
            result = row.result
            lines.append(
                "| "
                + " | ".join(
                    [
                        row.scenario,
                        row.load,
                        f"{result.rps:,.0f}" if result else "—",
                        f"{result.p50_ms:.2f}" if result else "—",
                        f"{result.p99_ms:.2f}" if result else "—",
                        f"{row.cpu_us_per_call:.0f}" if row.cpu_us_per_call is not None else "—",
                        f"{row.other_cores:.2f}" if row.other_cores is not None else "—",
                        row.check,
                    ]
                )
                + " |"
            )
        lines += ["", "| ratio | measured | goal | met |", "|---|--:|---|---|"]
        for ratio in self.ratios:
            measured = "not measured" if ratio.value is None else f"{ratio.value:.2f}{ratio.unit}"
            met = {None: "—", True: "yes", False: "**no**"}[ratio.met]
            lines.append(f"| {ratio.name} | {measured} | {ratio.goal} | {met} |")
        lines += ["", "| machine and tools | |", "|---|---|"]
        lines += [f"| {name} | {value} |" for name, value in self.environment.items()]
        return "\n".join(lines) + "\n"


def load_average() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def describe_environment(envoy: str) -> dict[str, str]:
    """Return the machine (cores, CPU model, memory) and the versions of the tools used."""
    cpu_model = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu_model = line.split(":", 1)[1].strip()
            break
    memory_kib = 0
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            memory_kib = int(line.split()[1])
    envoy_version = re.search(r"version: \S+?/([\d.]+)/", _output([envoy, "--version"]))
    return {
        "cores (nproc)": str(len(os.sched_getaffinity(0))),
        "CPU model": cpu_model,
        "memory": f"{memory_kib / 1024 / 1024:.1f} GiB",
        "kernel": platform.release(),
        "Envoy": envoy_version.group(1) if envoy_version else "unknown",
        "h2load": _output(["h2load", "--version"]).strip(),
        "wrk": _output(["wrk", "--version"]).splitlines()[0].split(" [")[0].strip(),
        "Python": platform.python_version(),
        "grpcio": grpc.__version__,
        "protobuf": protobuf.__version__,
        "cryptography": cryptography.__version__,
    }


def _output(command: list[str]) -> str:
    # `wrk --version` prints its usage and exits with status 1, so the status is ignored.
    finished = subprocess.run(command, capture_output=True, text=True, check=False, timeout=30)
    return finished.stdout + finished.stderr
