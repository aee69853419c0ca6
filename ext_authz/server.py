"""The sidecar process: start-up, serving, and shut-down on SIGTERM."""

from __future__ import annotations

import logging
import signal
import threading
import time
from concurrent import futures
from types import FrameType

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from .api.envoy.service.auth.v3 import external_auth_pb2_grpc
from .config import Config
from .http_server import OperationsServer
from .issuer_keys import IssuerKeys
from .metrics import Metrics
from .service import AuthorizationService

log = logging.getLogger(__name__)

AUTHORIZATION_SERVICE = "envoy.service.auth.v3.Authorization"
# Start-up waits this long for the first key sets, only so the start-up log
# can report them; serving starts either way.
INITIAL_KEY_WAIT_SECONDS = 5.0


class StartupError(Exception):
    """The service cannot start, for example because a port is taken."""


class SidecarServer:
    """Owns the gRPC server, the operations HTTP server and the issuer key stores."""

    def __init__(self, config: Config, metrics: Metrics | None = None) -> None:
        self.config = config
        self.metrics = metrics or Metrics()
        self.issuer_keys = {
            issuer.name: IssuerKeys(issuer, self.metrics) for issuer in config.issuers
        }
        self._health = health.HealthServicer()
        self._grpc: grpc.Server | None = None
        self._http: OperationsServer | None = None
        self._serving = False
        self.grpc_port = 0
        self.http_port = 0

    def start(self) -> None:
        config = self.config

        # Keys load in the background; an issuer that is down never blocks start-up.
        for keys in self.issuer_keys.values():
            keys.start()

        self._grpc = grpc.server(
            futures.ThreadPoolExecutor(
                max_workers=config.server.grpc_threads, thread_name_prefix="check"
            )
        )
        external_auth_pb2_grpc.add_AuthorizationServicer_to_server(
            AuthorizationService(config, self.issuer_keys, self.metrics), self._grpc
        )
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self._grpc)
        try:
            self.grpc_port = self._grpc.add_insecure_port(config.server.grpc_address)
        except RuntimeError:
            self._stop_key_threads()
            raise StartupError(
                f"cannot listen on {config.server.grpc_address} (server.grpc_address): "
                "the address is in use or not local; choose another address"
            ) from None
        self._grpc.start()

        host, port = _split_address(config.server.http_address)
        try:
            self._http = OperationsServer(
                (host, port),
                self.metrics,
                is_ready=self.is_ready,
                key_states=lambda: [keys.state() for keys in self.issuer_keys.values()],
            )
        except OSError as error:
            self._grpc.stop(None)
            self._stop_key_threads()
            raise StartupError(
                f"cannot listen on {config.server.http_address} (server.http_address): "
                f"{error.strerror or error}; choose another address"
            ) from None
        self._http.start()
        self.http_port = self._http.port

        self._set_serving(True)
        if config.server.require_keys_for_ready:
            threading.Thread(target=self._wait_for_keys, name="readiness", daemon=True).start()
        log.info(
            "serving Check on %s and /metrics, /healthz, /readyz on %s (config %s)",
            _with_port(config.server.grpc_address, self.grpc_port),
            _with_port(config.server.http_address, self.http_port),
            config.source,
        )
        self._log_key_states()

    def stop(self) -> None:
        """Report NOT_SERVING, finish in-flight calls, then close everything."""
        grace = self.config.server.shutdown_grace_seconds
        log.info("shutting down: finishing in-flight Check calls (grace %.0f s)", grace)
        self._set_serving(False)
        if self._grpc is not None:
            self._grpc.stop(grace).wait()
        if self._http is not None:
            self._http.stop()
        self._stop_key_threads()
        log.info("stopped")

    def _stop_key_threads(self) -> None:
        for keys in self.issuer_keys.values():
            keys.stop()

    def serve_until_signal(self) -> None:
        """Run until SIGTERM or SIGINT, then shut down gracefully."""
        stop_requested = threading.Event()

        def request_stop(signum: int, frame: FrameType | None) -> None:
            log.info("received %s", signal.Signals(signum).name)
            stop_requested.set()

        signal.signal(signal.SIGTERM, request_stop)
        signal.signal(signal.SIGINT, request_stop)
        self.start()
        stop_requested.wait()
        self.stop()

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
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if self.is_ready()
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for service in ("", AUTHORIZATION_SERVICE):
            self._health.set(service, status)

    def _wait_for_keys(self) -> None:
        # Readiness waits only for the first load of each issuer. Later
        # outages keep the service ready, because stale keys still verify.
        while self._serving and not self.is_ready():
            time.sleep(0.1)
        if self._serving:
            self._update_health()
            log.info("ready: every issuer has loaded its keys (server.require_keys_for_ready)")

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


def _split_address(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


def _with_port(address: str, port: int) -> str:
    host, _, _ = address.rpartition(":")
    return f"{host}:{port}"
