"""The sidecar process: start-up, serving, reload on SIGHUP or file change, and shut-down."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any, NoReturn

from prometheus_client import generate_latest

from .config import Config, ConfigError, load_config
from .event_loop import LoopThread
from .grpc_authz import GrpcAuthzServer
from .http_server import OperationsServer

if TYPE_CHECKING:
    from .http_authz import HttpAuthzServer
from .issuer_keys import IssuerKeys
from .metrics import Metrics
from .service import AuthorizationService
from .tracing import build_tracer

log = logging.getLogger(__name__)

# Start-up waits this long for the first key sets, only so the start-up log
# can report them; serving starts either way.
INITIAL_KEY_WAIT_SECONDS = 5.0
# Maximum time the main thread waits before it checks for signals again.
SIGNAL_CHECK_SECONDS = 0.25


class StartupError(Exception):
    """The service cannot start, for example because a port is taken."""


class SidecarServer:
    """Owns the gRPC server, the operations HTTP server and the issuer key stores."""

    def __init__(
        self,
        config: Config,
        metrics: Metrics | None = None,
        config_path: Path | None = None,
        adjust: Callable[[Config], Config] | None = None,
    ) -> None:
        # `adjust` rewrites each loaded config before use; a worker process
        # uses it to move its gRPC port, on reloads too.
        self._adjust = adjust or (lambda loaded: loaded)
        config = self._adjust(config)
        self.config = config
        self.config_path = config_path
        self.metrics = metrics or Metrics()
        self.issuer_keys = {
            issuer.name: IssuerKeys(issuer, self.metrics) for issuer in config.issuers
        }
        self.tracer = build_tracer(config.tracing)
        self.service = AuthorizationService(config, self.issuer_keys, self.metrics, self.tracer)
        self._config_digest = _file_digest(config_path) if config_path else None
        self._reload_lock = threading.Lock()
        # Called once serving has started; a worker process reports its port with it.
        self.on_started: Callable[[], None] | None = None
        self._loop: LoopThread | None = None
        self._grpc: GrpcAuthzServer | None = None
        self._http: OperationsServer | None = None
        self._http_authz: HttpAuthzServer | None = None
        self.http_authz_port = 0
        self._serving = False
        self._key_wait_lock = threading.Lock()
        self.grpc_port = 0
        self.http_port = 0

    def start(self) -> None:
        config = self.config

        # Keys load in the background; an issuer that is down never blocks start-up.
        for keys in self.issuer_keys.values():
            keys.start()

        # Both front ends decide on one event loop thread; see event_loop.py.
        self._loop = LoopThread(config.server.wait_threads)
        self._loop.start()
        self._grpc = GrpcAuthzServer(self.service, self._loop, config.server.grpc_address)
        try:
            self._grpc.start()
        except RuntimeError:
            self._loop.stop()
            self._stop_key_threads()
            raise StartupError(
                f"cannot listen on {config.server.grpc_address} (server.grpc_address): "
                "the address is in use or not local; choose another address"
            ) from None
        self.grpc_port = self._grpc.port
        if config.server.http_authz_address is not None:
            self._start_http_authz(config.server.http_authz_address)

        host, port = _split_address(config.server.http_address)
        try:
            self._http = OperationsServer(
                (host, port),
                metrics_text=lambda: generate_latest(self.metrics.registry),
                readiness=self.readiness,
            )
        except OSError as error:
            self._stop_front_ends(0)
            self._stop_key_threads()
            raise StartupError(
                f"cannot listen on {config.server.http_address} (server.http_address): "
                f"{error.strerror or error}; choose another address"
            ) from None
        self._http.start()
        self.http_port = self._http.port

        self._set_serving(True)
        self._watch_readiness()
        log.info(
            "serving Check on %s and /metrics, /healthz, /readyz on %s (config %s)",
            _with_port(config.server.grpc_address, self.grpc_port),
            _with_port(config.server.http_address, self.http_port),
            config.source,
        )
        # Report issuers whose keys are late from a thread, so start-up never waits.
        threading.Thread(target=self._log_key_states, name="key-report", daemon=True).start()
        if self.on_started is not None:
            self.on_started()

    def _start_http_authz(self, address: str) -> None:
        from .http_authz import HttpAuthzServer

        host, port = _split_address(address)
        assert self._loop is not None
        http_authz = HttpAuthzServer(self.service, self._loop, host, port)
        try:
            http_authz.start()
        except OSError as error:
            self._stop_front_ends(0)
            self._stop_key_threads()
            raise StartupError(
                f"cannot listen on {address} (server.http_authz_address): "
                f"{error.strerror or error}; choose another address"
            ) from None
        self._http_authz = http_authz
        self.http_authz_port = http_authz.port
        log.info("serving HTTP ext_authz on %s", _with_port(address, self.http_authz_port))

    def stop(self, drain: bool = True, wake: threading.Event | None = None) -> None:
        """Report NOT_SERVING, keep serving Check while Envoy drains, then close everything.

        Envoy and Kubernetes take a moment to notice NOT_SERVING, and calls
        they send meanwhile are still served for `server.drain_seconds`.
        Then new calls are refused and calls in flight get up to
        `server.shutdown_grace_seconds` to finish. Setting `wake` cuts the
        drain short, for example on a second SIGTERM.
        """
        settings = self.config.server
        self._set_serving(False)
        if drain and settings.drain_seconds > 0:
            log.info(
                "draining: serving Check calls for %g s more (server.drain_seconds)",
                settings.drain_seconds,
            )
            (wake or threading.Event()).wait(settings.drain_seconds)
        grace = settings.shutdown_grace_seconds
        log.info("shutting down: finishing in-flight Check calls (grace %g s)", grace)
        self._stop_front_ends(grace)
        if self._http is not None:
            self._http.stop()
        self._stop_key_threads()
        self.tracer.shutdown()
        log.info("stopped")

    def _stop_front_ends(self, grace: float) -> None:
        if self._loop is None:
            return
        # Both front ends finish their calls in flight at the same time, so
        # shut-down takes at most `grace`, not twice that.
        stopping = [
            front_end.stop(grace)
            for front_end in (self._http_authz, self._grpc)
            if front_end is not None
        ]
        if stopping:
            self._loop.run(_all(stopping), timeout=grace + 5)
        self._loop.stop()

    def _stop_key_threads(self) -> None:
        for keys in self.issuer_keys.values():
            keys.stop()

    def serve_until_signal(self) -> None:
        """Run until SIGTERM or SIGINT; reload on SIGHUP or when the config file changes."""
        wake = threading.Event()
        stop_requested = threading.Event()
        cut_drain = threading.Event()
        reload_requested = threading.Event()

        def request_stop(signum: int, frame: FrameType | None) -> None:
            log.info("received %s", signal.Signals(signum).name)
            if stop_requested.is_set():
                cut_drain.set()  # A second signal ends the drain at once.
            stop_requested.set()
            wake.set()

        def request_reload(signum: int, frame: FrameType | None) -> None:
            log.info("received SIGHUP: reloading the configuration")
            reload_requested.set()
            wake.set()

        signal.signal(signal.SIGTERM, request_stop)
        signal.signal(signal.SIGINT, request_stop)
        signal.signal(signal.SIGHUP, request_reload)
        self.start()

        next_watch = time.monotonic()
        while not stop_requested.is_set():
            # The flags are the truth; `wake` only shortens the wait. The wait
            # stays short because CPython runs signal handlers on the main
            # thread only, and a signal that arrives as the thread starts a
            # long wait can go unhandled until the wait ends.
            wake.wait(SIGNAL_CHECK_SECONDS)
            wake.clear()
            if stop_requested.is_set():
                break
            if reload_requested.is_set():
                reload_requested.clear()
                self.reload()
                continue
            watch = self.config.server.config_watch_seconds
            if watch > 0 and self.config_path and time.monotonic() >= next_watch:
                next_watch = time.monotonic() + watch
                if self._config_file_changed():
                    log.info("the configuration file changed: reloading")
                    self.reload()
        self.stop(wake=cut_drain)

    def reload(self) -> bool:
        """Load the config file again and switch to it; keep the old config when it is invalid."""
        if self.config_path is None:
            log.warning("reload requested, but the service was not started from a file")
            return False
        with self._reload_lock:
            self._config_digest = _file_digest(self.config_path)
            try:
                new_config = self._adjust(load_config(self.config_path))
            except ConfigError as error:
                self.metrics.config_reloads.labels("invalid").inc()
                log.error("reload rejected: %s; the previous configuration keeps serving", error)
                return False
            self._apply(new_config)
            self.metrics.config_reloads.labels("ok").inc()
            log.info("configuration reloaded from %s", self.config_path)
            return True

    def _apply(self, new_config: Config) -> None:
        old = self.config
        if new_config.server != old.server or new_config.tracing != old.tracing:
            log.warning(
                "server or tracing settings changed in the new configuration; they take "
                "effect after a restart, the other changes apply now"
            )
            new_config = dataclasses.replace(new_config, server=old.server, tracing=old.tracing)

        # Issuers with unchanged settings keep their cached keys.
        kept: dict[str, IssuerKeys] = {}
        for issuer in new_config.issuers:
            current = self.issuer_keys.get(issuer.name)
            if current is not None and current.config == issuer:
                kept[issuer.name] = current
            else:
                fresh = IssuerKeys(issuer, self.metrics)
                fresh.start()
                kept[issuer.name] = fresh
        retired = [keys for name, keys in self.issuer_keys.items() if kept.get(name) is not keys]

        self.service.replace_config(new_config, kept)
        self.issuer_keys = kept
        self.config = new_config
        logging.getLogger().setLevel(new_config.logging.level.upper())
        for keys in retired:
            keys.stop()
        self._update_health()
        # An issuer added by the reload makes the service unready until its
        # first key fetch succeeds, as at start-up.
        self._watch_readiness()

    def _config_file_changed(self) -> bool:
        if self.config_path is None:
            return False
        return _file_digest(self.config_path) != self._config_digest

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        """Return readiness and the /readyz body: status and each issuer's key state.

        Ready means the gRPC server is serving. By default key state is only
        reported: one broken issuer must not take every API of the pod out of
        service. server.require_keys_for_ready makes readiness wait for each
        issuer's first successful load.
        """
        ready = self.is_ready()
        body = {
            "status": "ready" if ready else "not ready",
            "issuers": [dataclasses.asdict(keys.state()) for keys in self.issuer_keys.values()],
        }
        return ready, body

    def is_ready(self) -> bool:
        """Return whether the service is serving and, when required, every issuer has keys."""
        if not self._serving:
            return False
        if not self.config.server.require_keys_for_ready:
            return True
        return all(keys.loaded for keys in self.issuer_keys.values())

    def _set_serving(self, serving: bool) -> None:
        self._serving = serving
        self._update_health()

    def _update_health(self) -> None:
        if self._grpc is not None:
            self._grpc.set_health(self.is_ready())

    def _watch_readiness(self) -> None:
        """Start the thread that reports SERVING once every issuer has keys, unless one runs."""
        if not self.config.server.require_keys_for_ready:
            return
        # The thread starts even when every issuer has keys already: they may
        # have arrived after the caller last set the health status.
        if self._key_wait_lock.acquire(blocking=False):
            threading.Thread(target=self._wait_for_keys, name="readiness", daemon=True).start()

    def _wait_for_keys(self) -> None:
        # Readiness waits only for the first load of each issuer. Later
        # outages keep the service ready, because stale keys still verify.
        try:
            waited = False
            while self._serving and not self.is_ready():
                waited = True
                time.sleep(0.1)
            if self._serving:
                self._update_health()
                if waited:
                    log.info(
                        "ready: every issuer has loaded its keys (server.require_keys_for_ready)"
                    )
        finally:
            self._key_wait_lock.release()
        # A reload may have added an issuer after the last check above.
        if self._serving and not self.is_ready():
            self._watch_readiness()

    def _log_key_states(self) -> None:
        for keys in self.issuer_keys.values():
            if keys.wait_loaded(INITIAL_KEY_WAIT_SECONDS):
                continue
            state = keys.state()
            log.warning(
                "issuer %s: no signing keys loaded yet (%s); its tokens are denied with "
                "keys_unavailable until a fetch succeeds, retrying in the background",
                state.issuer,
                state.last_error or "first fetch still running",
            )


async def _all(coroutines: list[Coroutine[Any, Any, None]]) -> None:
    await asyncio.gather(*coroutines)


def exit_after_stop(code: int) -> NoReturn:
    """End the process at once, after SidecarServer.stop() has returned.

    A wait-pool thread can still be inside a network call whose caller is
    gone, for up to twice the fetch timeout (metadata, then the request).
    Python joins those threads at exit, which would outlast the shutdown
    grace period, so the process ends without joining them.
    """
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _file_digest(path: Path) -> bytes | None:
    """Return a hash of the file's content, following symlinks, or None when unreadable.

    The content is compared, not the modification time, because Kubernetes
    updates a ConfigMap volume by swapping a symlink to a new directory.
    """
    try:
        return hashlib.sha256(path.read_bytes()).digest()
    except OSError:
        return None


def _split_address(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


def _with_port(address: str, port: int) -> str:
    host, _, _ = address.rpartition(":")
    return f"{host}:{port}"
