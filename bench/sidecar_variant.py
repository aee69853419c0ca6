"""The sidecar with part of its Check handler left out, for the profile by subtraction.

    python -m bench.sidecar_variant fixed-response --config FILE
    python -m bench.sidecar_variant decide-only --config FILE
    python -m bench.sidecar_variant decide-twice --config FILE

Everything else is the real `ext-authz serve`: the same event loop, gRPC
server, health service, metrics and key stores. Only the gRPC Check handler
changes:

- fixed-response: it returns a fixed OK CheckResponse without reading the
  request, like the floor servicer, so it shows what the sidecar's process
  costs beyond the floor before any decision code;
- decide-only: it builds the request view and decides (with the cache, the
  policy checks, the decision counter and the deny log), then returns the
  fixed response instead of the rendered one;
- decide-twice: as decide-only, but it decides twice per call, so the
  second decision shows what one more decision costs once the first has run.

Both allow every call, so they are for measuring only.
"""

from __future__ import annotations

import sys

import grpc

from ext_authz import cli, grpc_authz
from ext_authz.api.envoy.service.auth.v3.external_auth_pb2 import CheckRequest, CheckResponse
from ext_authz.request_view import view_request

_FIXED = CheckResponse()
_FIXED.status.code = 0
_FIXED.ok_response.SetInParent()


async def _fixed_response(
    self: grpc_authz._AsyncAuthorization, request: CheckRequest, context: grpc.aio.ServicerContext
) -> CheckResponse:
    return _FIXED


async def _decide_only(
    self: grpc_authz._AsyncAuthorization, request: CheckRequest, context: grpc.aio.ServicerContext
) -> CheckResponse:
    self._service.evaluate(view_request(request), True)
    return _FIXED


async def _decide_twice(
    self: grpc_authz._AsyncAuthorization, request: CheckRequest, context: grpc.aio.ServicerContext
) -> CheckResponse:
    view = view_request(request)
    self._service.evaluate(view, True)
    self._service.evaluate(view, True)
    return _FIXED


VARIANTS = {
    "fixed-response": _fixed_response,
    "decide-only": _decide_only,
    "decide-twice": _decide_twice,
}


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in VARIANTS:
        print(f"usage: python -m bench.sidecar_variant {{{','.join(VARIANTS)}}} --config FILE")
        return 2
    grpc_authz._AsyncAuthorization.Check = VARIANTS[argv[0]]  # type: ignore[method-assign]
    return cli.main(["serve", *argv[1:]])


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
