"""The floor: a grpcio Authorization servicer that allows every call with a fixed response.

By default it runs the sidecar's server model (`grpc.aio` on uvloop, with
the same server options), so the cost it shows is what Python gRPC itself
costs per Check call, with no decision code. `--model` selects the other
models that were compared: grpcio's thread-pool server, and `grpc.aio` on
asyncio's own loop.

    python -m bench.floor_server --address 127.0.0.1:50051
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import threading
from concurrent import futures
from types import FrameType

import grpc

from ext_authz.api.envoy.service.auth.v3 import external_auth_pb2_grpc
from ext_authz.api.envoy.service.auth.v3.external_auth_pb2 import CheckRequest, CheckResponse


class FixedAllowServicer(external_auth_pb2_grpc.AuthorizationServicer):
    """Returns the same OK CheckResponse for every request, without reading it."""

    def __init__(self) -> None:
        self._response = CheckResponse()
        self._response.status.code = 0
        self._response.ok_response.SetInParent()

    def Check(self, request: CheckRequest, context: grpc.ServicerContext) -> CheckResponse:
        return self._response


class FixedAllowAioServicer(external_auth_pb2_grpc.AuthorizationServicer):
    """The same fixed response from an asyncio (grpc.aio) handler."""

    def __init__(self) -> None:
        self._response = FixedAllowServicer()._response

    async def Check(  # type: ignore[override]
        self, request: CheckRequest, context: grpc.aio.ServicerContext
    ) -> CheckResponse:
        return self._response


async def _serve_aio(address: str) -> None:
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    external_auth_pb2_grpc.add_AuthorizationServicer_to_server(FixedAllowAioServicer(), server)
    server.add_insecure_port(address)
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    print(f"floor servicer (grpc.aio) listening on {address}", flush=True)
    await stop.wait()
    await server.stop(None)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--address", required=True, help="HOST:PORT to listen on")
    parser.add_argument(
        "--threads",
        type=int,
        default=16,
        help="worker threads of the sync model (default %(default)s)",
    )
    parser.add_argument(
        "--model",
        choices=("sync", "aio", "aio-uvloop"),
        default="aio-uvloop",
        help="aio-uvloop: grpc.aio on uvloop (the sidecar's model); aio: grpc.aio on asyncio; "
        "sync: grpc.server with a thread pool (default %(default)s)",
    )
    arguments = parser.parse_args(argv)
    if arguments.model == "aio-uvloop":
        import uvloop

        uvloop.run(_serve_aio(arguments.address))
        return 0
    if arguments.model == "aio":
        asyncio.run(_serve_aio(arguments.address))
        return 0

    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=arguments.threads, thread_name_prefix="check"),
        options=[("grpc.so_reuseport", 0)],
    )
    external_auth_pb2_grpc.add_AuthorizationServicer_to_server(FixedAllowServicer(), server)
    server.add_insecure_port(arguments.address)
    server.start()

    stop = threading.Event()

    def request_stop(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    print(f"floor servicer listening on {arguments.address}", flush=True)
    stop.wait()
    server.stop(None).wait()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
