"""Envoy's gRPC ext_authz protocol, served by `grpc.aio` on the shared event loop.

grpcio's asyncio server costs less CPU per call than its thread-pool server,
and more so on uvloop (docs/benchmarks.md has the measurements). The
decision code is synchronous: a call is decided on the loop, unless it has to
wait on the network, in which case it is decided again on the wait pool.
"""

from __future__ import annotations

import time

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from .api.envoy.service.auth.v3 import external_auth_pb2_grpc
from .api.envoy.service.auth.v3.external_auth_pb2 import CheckRequest, CheckResponse
from .event_loop import LoopThread
from .service import AuthorizationService
from .verify import WaitNeeded

AUTHORIZATION_SERVICE = "envoy.service.auth.v3.Authorization"


class _AsyncAuthorization(external_auth_pb2_grpc.AuthorizationServicer):
    """The Check handler of the asyncio server. Every input gets a CheckResponse."""

    def __init__(self, service: AuthorizationService, loop_thread: LoopThread) -> None:
        self._service = service
        self._loop_thread = loop_thread

    async def Check(  # type: ignore[override]
        self, request: CheckRequest, context: grpc.aio.ServicerContext
    ) -> CheckResponse:
        started = time.perf_counter()
        service = self._service
        started_ns = service.trace_start()
        try:
            response = service.respond(request, False, started_ns)
        except WaitNeeded as waiting:
            try:
                response = await self._loop_thread.loop.run_in_executor(
                    self._loop_thread.wait_pools[waiting.pool],
                    service.respond,
                    request,
                    True,
                    started_ns,
                )
            except Exception:
                # For example a wait pool that is already shut down.
                response = service.internal_error_response()
        service.observe_duration(time.perf_counter() - started)
        return response


class GrpcAuthzServer:
    """The gRPC front end and the gRPC health service, on the shared event loop."""

    def __init__(
        self, service: AuthorizationService, loop_thread: LoopThread, address: str
    ) -> None:
        self._service = service
        self._loop_thread = loop_thread
        self._address = address
        self._server: grpc.aio.Server | None = None
        self._health: health.aio.HealthServicer | None = None
        self.port = 0

    def start(self) -> None:
        """Bind and start serving; raise RuntimeError when the address cannot be used."""
        self.port = self._loop_thread.run(self._start())

    def set_health(self, serving: bool) -> None:
        """Report SERVING or NOT_SERVING for the whole server and the Authorization service."""
        if self._health is not None and self._loop_thread.running:
            self._loop_thread.run(self._set_health(serving), timeout=5)

    async def stop(self, grace: float) -> None:
        """Refuse new calls and give calls in flight `grace` seconds to finish; run on the loop."""
        if self._server is not None:
            await self._server.stop(grace)

    async def _start(self) -> int:
        # gRPC sets SO_REUSEPORT by default, so a second sidecar on a taken
        # port would silently share Envoy's connections instead of failing.
        # NOTE: gRPC's default 4 MiB limit on a received message stays. A
        # larger CheckRequest gets RESOURCE_EXHAUSTED from gRPC, not a deny.
        # docs/security.md explains how Envoy's failure mode then decides.
        server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
        external_auth_pb2_grpc.add_AuthorizationServicer_to_server(
            _AsyncAuthorization(self._service, self._loop_thread), server
        )
        self._health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        port = server.add_insecure_port(self._address)
        await server.start()
        self._server = server
        return port

    async def _set_health(self, serving: bool) -> None:
        assert self._health is not None
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for service in ("", AUTHORIZATION_SERVICE):
            await self._health.set(service, status)
