"""Several worker processes behind one operations endpoint (`server.workers`).

Python runs one thread of Python code at a time, so one process uses about
one core. With `server.workers: N`, worker i serves Check on the gRPC port
plus i, and Envoy's ext_authz cluster lists all N ports, so requests spread
across workers no matter how few HTTP/2 connections Envoy keeps. The
supervisor forks the workers before any gRPC object exists, because gRPC
does not support forking a process that has started gRPC threads. It serves
/metrics, /healthz and /readyz for all of them.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import json
import logging
import multiprocessing
import os
import signal
import threading
import time
import urllib.error
import urllib.request
from collections import defaultdict
from multiprocessing.connection import Connection
from pathlib import Path
from types import FrameType
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from .config import Config
from .http_server import OperationsServer
from .logs import add_log_field

log = logging.getLogger(__name__)

WORKER_START_TIMEOUT_SECONDS = 30.0
RESTART_DELAY_SECONDS = 1.0
PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>
# More restarts than this within RESTART_WINDOW_SECONDS stop the supervisor,
# so a worker that cannot start (a taken port) does not loop forever.
MAX_RESTARTS = 5
RESTART_WINDOW_SECONDS = 60.0
# Gauges are per process. Across workers the worst value is reported: the
# fewest keys and the oldest key set.
_GAUGE_MERGE = {"ext_authz_jwks_keys": min, "ext_authz_jwks_age_seconds": max}


def worker_config(config: Config, index: int) -> Config:
    """Return the config of worker `index`: Check ports plus index, operations port internal."""
    server = dataclasses.replace(
        config.server,
        grpc_address=_shift_port(config.server.grpc_address, index),
        http_address="127.0.0.1:0",
        http_authz_address=(
            _shift_port(config.server.http_authz_address, index)
            if config.server.http_authz_address
            else None
        ),
    )
    return dataclasses.replace(config, server=server)


def _shift_port(address: str, offset: int) -> str:
    host, _, port = address.rpartition(":")
    return f"{host}:{int(port) + offset}"


def _run_worker(config: Config, config_path: Path | None, index: int, pipe: Connection) -> None:
    # The worker's gRPC server and threads are created here, after the fork.
    from .server import SidecarServer, StartupError, exit_after_stop

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # The supervisor sends SIGTERM.
    _terminate_with_parent()
    add_log_field("worker", index)
    server = SidecarServer(
        config,
        config_path=config_path,
        adjust=lambda loaded: worker_config(loaded, index),
    )
    server.on_started = lambda: pipe.send(server.http_port)
    try:
        server.serve_until_signal()
    except StartupError as error:
        log.error("%s", error)
        raise SystemExit(1) from None
    exit_after_stop(0)


@dataclasses.dataclass
class _Worker:
    index: int
    process: multiprocessing.process.BaseProcess
    http_port: int = 0


class Supervisor:
    """Starts, watches and stops the worker processes, and serves their joint endpoints."""

    def __init__(self, config: Config, config_path: Path | None) -> None:
        self.config = config
        self.config_path = config_path
        self._context = multiprocessing.get_context("fork")
        self._workers: list[_Worker] = []
        self._stopping = threading.Event()
        self._http: OperationsServer | None = None

    def run(self) -> int:
        """Run until SIGTERM or SIGINT; return the exit status."""
        wake = threading.Event()

        def request_stop(signum: int, frame: FrameType | None) -> None:
            log.info(
                "received %s: stopping %d workers", signal.Signals(signum).name, len(self._workers)
            )
            self._stopping.set()
            wake.set()

        def forward_reload(signum: int, frame: FrameType | None) -> None:
            log.info("received SIGHUP: forwarding to the workers")
            for worker in self._workers:
                if worker.process.pid is not None:
                    _signal(worker.process.pid, signal.SIGHUP)

        signal.signal(signal.SIGTERM, request_stop)
        signal.signal(signal.SIGINT, request_stop)
        signal.signal(signal.SIGHUP, forward_reload)

        # Workers first, so they do not inherit the operations server's socket.
        for index in range(self.config.server.workers):
            self._workers.append(self._start_worker(index))
        try:
            self._start_operations_server()
        except OSError as error:
            log.error(
                "cannot listen on %s (server.http_address): %s; choose another address",
                self.config.server.http_address,
                error.strerror or error,
            )
            self._stopping.set()
            self._stop_workers()
            return 1
        log.info(
            "supervising %d workers on gRPC ports %s",
            len(self._workers),
            ", ".join(
                worker_config(self.config, w.index).server.grpc_address for w in self._workers
            ),
        )

        restarts: list[float] = []
        while not self._stopping.is_set():
            wake.wait(0.5)
            for position, worker in enumerate(self._workers):
                if self._stopping.is_set() or worker.process.is_alive():
                    continue
                now = time.monotonic()
                restarts = [moment for moment in restarts if now - moment < RESTART_WINDOW_SECONDS]
                if len(restarts) >= MAX_RESTARTS:
                    log.error(
                        "workers exited %d times within %.0f s; stopping, see the errors above",
                        len(restarts) + 1,
                        RESTART_WINDOW_SECONDS,
                    )
                    self._stopping.set()
                    self._stop_workers()
                    return 1
                restarts.append(now)
                log.error(
                    "worker %d exited with code %s; starting it again",
                    worker.index,
                    worker.process.exitcode,
                )
                time.sleep(RESTART_DELAY_SECONDS)
                self._workers[position] = self._start_worker(worker.index)
        return self._stop_workers()

    def _start_worker(self, index: int) -> _Worker:
        receiver, sender = self._context.Pipe(duplex=False)
        process = self._context.Process(
            target=_run_worker,
            args=(self.config, self.config_path, index, sender),
            name=f"ext-authz-worker-{index}",
        )
        process.start()
        sender.close()
        worker = _Worker(index, process)
        if receiver.poll(WORKER_START_TIMEOUT_SECONDS):
            try:
                worker.http_port = int(receiver.recv())
            except EOFError:
                log.error("worker %d exited during start-up", index)
        else:
            log.error("worker %d did not start within %.0f s", index, WORKER_START_TIMEOUT_SECONDS)
        receiver.close()
        return worker

    def _start_operations_server(self) -> None:
        host, _, port = self.config.server.http_address.rpartition(":")
        self._http = OperationsServer(
            (host.strip("[]"), int(port)),
            metrics_text=self._merged_metrics,
            readiness=self._readiness,
        )
        self._http.start()

    def _stop_workers(self) -> int:
        for worker in self._workers:
            if worker.process.pid is not None and worker.process.is_alive():
                _signal(worker.process.pid, signal.SIGTERM)
        settings = self.config.server
        deadline = time.monotonic() + settings.drain_seconds + settings.shutdown_grace_seconds + 5
        status = 0
        for worker in self._workers:
            worker.process.join(max(deadline - time.monotonic(), 0.1))
            if worker.process.is_alive():
                log.error("worker %d did not stop in time; killing it", worker.index)
                worker.process.kill()
                worker.process.join()
                status = 1
            elif worker.process.exitcode != 0:
                status = 1
        if self._http is not None:
            self._http.stop()
        log.info("stopped")
        return status

    # Joint endpoints

    def _fetch(self, worker: _Worker, path: str) -> tuple[int, bytes]:
        if not worker.http_port:
            return 503, b""
        url = f"http://127.0.0.1:{worker.http_port}{path}"
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as error:
            return error.code, error.read()
        except (urllib.error.URLError, OSError):
            return 503, b""

    def _readiness(self) -> tuple[bool, dict[str, Any]]:
        states = []
        for worker in self._workers:
            status, body = self._fetch(worker, "/readyz")
            try:
                details = json.loads(body) if body else {}
            except ValueError:
                details = {}
            states.append({"worker": worker.index, "ready": status == 200, **details})
        ready = (
            not self._stopping.is_set()
            and len(states) == self.config.server.workers
            and all(state["ready"] for state in states)
        )
        first = states[0] if states else {}
        return ready, {
            "status": "ready" if ready else "not ready",
            "issuers": first.get("issuers", []),
            "workers": states,
        }

    def _merged_metrics(self) -> bytes:
        texts = [self._fetch(worker, "/metrics")[1].decode() for worker in self._workers]
        return merge_metrics(texts).encode()


def merge_metrics(texts: list[str]) -> str:
    """Merge the Prometheus text of several workers into one exposition.

    Counters and histograms are summed per label set; gauges take the worst
    value per label set (see _GAUGE_MERGE).
    """
    families: dict[str, tuple[str, str]] = {}
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], list[float]] = defaultdict(list)
    order: list[tuple[str, tuple[tuple[str, str], ...]]] = []
    sample_family: dict[tuple[str, tuple[tuple[str, str], ...]], str] = {}
    for text in texts:
        for family in text_string_to_metric_families(text):
            families.setdefault(family.name, (family.type, family.documentation))
            for sample in family.samples:
                key = (sample.name, tuple(sorted(sample.labels.items())))
                if key not in samples:
                    order.append(key)
                    sample_family[key] = family.name
                samples[key].append(sample.value)

    lines: list[str] = []
    written: set[str] = set()
    for key in order:
        family_name = sample_family[key]
        kind, documentation = families[family_name]
        if family_name not in written:
            written.add(family_name)
            # The parser drops _total from counter family names; the
            # exposition format keeps it, as prometheus_client writes it.
            exposed = f"{family_name}_total" if kind == "counter" else family_name
            lines.append(f"# HELP {exposed} {_escape_help(documentation)}")
            lines.append(f"# TYPE {exposed} {kind}")
        name, labels = key
        values = samples[key]
        merge = _GAUGE_MERGE.get(family_name, max) if kind == "gauge" else sum
        label_text = ",".join(f'{label}="{_escape(value)}"' for label, value in labels)
        selector = f"{{{label_text}}}" if labels else ""
        lines.append(f"{name}{selector} {float(merge(values))!r}")
    return "\n".join(lines) + "\n"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _terminate_with_parent() -> None:
    """Ask Linux to send this process SIGTERM when the supervisor dies, even by SIGKILL."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        log.debug("prctl(PR_SET_PDEATHSIG) is not available; workers outlive a killed supervisor")
    if os.getppid() == 1:
        # The supervisor died before prctl took effect.
        raise SystemExit(1)


def _signal(pid: int, signum: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signum)
