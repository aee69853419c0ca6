"""Child processes of the benchmark: start, wait until ready, read CPU time, stop."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

LOOPBACK = "127.0.0.1"
START_TIMEOUT_SECONDS = 30.0
STOP_TIMEOUT_SECONDS = 10.0
CLOCK_TICKS_PER_SECOND = os.sysconf("SC_CLK_TCK")

_handed_out_ports: set[int] = set()


def free_port() -> int:
    """Return a port on 127.0.0.1 that was free just now and not returned before in this run."""
    while True:
        with socket.socket() as probe:
            probe.bind((LOOPBACK, 0))
            port = int(probe.getsockname()[1])
        if port not in _handed_out_ports:
            _handed_out_ports.add(port)
            return port


def free_ports(count: int) -> int:
    """Return the first of `count` consecutive ports on 127.0.0.1 that were free just now."""
    while True:
        first = free_port()
        following = range(first + 1, first + count)
        if all(port not in _handed_out_ports and _bindable(port) for port in following):
            _handed_out_ports.update(following)
            return first


def _bindable(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind((LOOPBACK, port))
        except OSError:
            return False
    return True


def cpu_seconds(pid: int) -> float:
    """Return the user plus system CPU time of process `pid` and its descendants, in seconds.

    Descendants count only while they run: the sidecar's worker processes
    live as long as the sidecar does.
    """
    stats = _process_stats()
    family = {pid}
    grew = True
    while grew:
        children = {child for child, (parent, _) in stats.items() if parent in family}
        grew = not children <= family
        family |= children
    return sum(stats[member][1] for member in family if member in stats)


def other_cpu_seconds() -> float:
    """Return the machine's busy CPU time since boot, less this process tree's, in seconds.

    The difference of two readings is the CPU time that processes the
    benchmark did not start used in between: other work on a shared machine.
    Children that exited and were waited for count in this process's cutime
    and cstime (fields 16 and 17 of /proc/PID/stat).
    """
    # /proc/stat's first line: cpu user nice system idle iowait irq softirq steal ...
    ticks = [int(value) for value in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    busy = (sum(ticks[:8]) - ticks[3] - ticks[4]) / CLOCK_TICKS_PER_SECOND
    stat = Path(f"/proc/{os.getpid()}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    waited_children = (int(fields[13]) + int(fields[14])) / CLOCK_TICKS_PER_SECOND
    return busy - cpu_seconds(os.getpid()) - waited_children


def _process_stats() -> dict[int, tuple[int, float]]:
    """Return {pid: (parent pid, user+system CPU seconds)} of every process now running.

    Fields 4, 14 and 15 of /proc/PID/stat are ppid, utime and stime, the last
    two in clock ticks. The command name in field 2 may contain spaces, so
    fields are counted after its closing parenthesis.
    """
    stats: dict[int, tuple[int, float]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            text = (entry / "stat").read_text()
        except OSError:
            continue  # The process exited meanwhile.
        fields = text[text.rindex(")") + 2 :].split()
        ticks = int(fields[11]) + int(fields[12])
        stats[int(entry.name)] = (int(fields[1]), ticks / CLOCK_TICKS_PER_SECOND)
    return stats


def http_get(url: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    """GET `url` and return the status and body. An HTTP error status is returned, not raised."""
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


class ProcessGroup:
    """The processes that one benchmark run started, by name.

    `stop_all` ends every one that is still running.

    Each process writes its standard output and error to NAME.log in `workdir`.
    """

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        # Signals to send, in order, to stop a process. The sidecar needs two
        # SIGTERMs to skip its drain period.
        self._stop_signals: dict[str, tuple[signal.Signals, ...]] = {}

    def spawn(
        self,
        name: str,
        command: list[str],
        stop_signals: tuple[signal.Signals, ...] = (signal.SIGTERM,),
        cwd: Path | None = None,
    ) -> subprocess.Popen[bytes]:
        if name in self.processes:
            raise ValueError(f"a process named {name!r} is already running")
        log_file = open(self.workdir / f"{name}.log", "wb")  # noqa: SIM115 (owned by the child)
        try:
            process = subprocess.Popen(
                command,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
                cwd=cwd,
            )
        finally:
            log_file.close()
        self.processes[name] = process
        self._stop_signals[name] = stop_signals
        return process

    def log_text(self, name: str) -> str:
        path = self.workdir / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def wait_until(
        self,
        name: str,
        ready: Callable[[], bool],
        expected: str,
        timeout: float = START_TIMEOUT_SECONDS,
    ) -> None:
        """Poll `ready` until it returns True.

        Raise RuntimeError when the process exits first or `timeout` seconds
        pass. The message names the `expected` condition.
        """
        process = self.processes[name]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(
                    f"{name} exited with code {process.returncode} during start-up; "
                    f"the end of its log:\n{self.log_text(name)[-3000:]}"
                )
            try:
                if ready():
                    return
            except (OSError, urllib.error.URLError):
                pass
            time.sleep(0.1)
        raise RuntimeError(
            f"{name} timed out after {timeout:.0f} s: {expected}; see {self.workdir / name}.log"
        )

    def stop(self, name: str) -> None:
        process = self.processes.pop(name, None)
        signals = self._stop_signals.pop(name, (signal.SIGTERM,))
        if process is None or process.poll() is not None:
            return
        for index, signum in enumerate(signals):
            if index > 0:
                time.sleep(0.1)
            if process.poll() is None:
                process.send_signal(signum)
        try:
            process.wait(timeout=STOP_TIMEOUT_SECONDS)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def stop_all(self) -> None:
        """Stop the processes in reverse start order."""
        for name in reversed(list(self.processes)):
            self.stop(name)
