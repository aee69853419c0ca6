"""Deciding on the event loop: a call that must wait on the network moves to the wait pool.

Both front ends decide on one event loop. A key refetch for an unknown `kid`
or an introspection request would stall every other call on that loop, so
such a call is decided again on a thread. The tests hold the issuer's reply
with an event, so they check the order of the replies, never a duration.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest

from ext_authz.api.envoy.service.auth.v3 import external_auth_pb2_grpc
from ext_authz.api.envoy.service.auth.v3.external_auth_pb2 import CheckRequest
from ext_authz.config import parse_config
from ext_authz.issuer_keys import IssuerKeys
from ext_authz.metrics import Metrics
from ext_authz.request_view import RequestView
from ext_authz.server import SidecarServer
from ext_authz.verify import INTROSPECTION_POOL, WaitNeeded

from .support import IssuerServer, SigningKey, claims_for, free_port
from .test_check import Harness, make_config
from .test_http_authz import exchange, request
from .test_issuer_keys import fetch_count, issuer_config
from .test_policies import active_reply

# Unit level: nothing is started, counted or cached when the caller may not wait.


def test_refetch_not_started_without_wait(issuer_server: IssuerServer):
    metrics = Metrics()
    keys = IssuerKeys(issuer_config(issuer_server.url, jwks_min_refetch_seconds=0), metrics)
    keys.refresh()

    assert keys.refetch_for_unknown_kid(may_wait=False) is False

    assert issuer_server.jwks_fetches() == 1
    refetches = metrics.registry.get_sample_value(
        "ext_authz_jwks_unknown_kid_refetches_total", {"issuer": "local"}
    )
    assert refetches is None


def test_rate_limited_refetch_returns_without_wait(issuer_server: IssuerServer):
    metrics = Metrics()
    keys = IssuerKeys(issuer_config(issuer_server.url, jwks_min_refetch_seconds=30), metrics)
    keys.refresh()

    assert keys.refetch_for_unknown_kid(may_wait=False) is True

    assert issuer_server.jwks_fetches() == 1
    assert fetch_count(metrics, "rate_limited") == 1


def test_refetch_in_flight_not_joined_without_wait(issuer_server: IssuerServer):
    keys = IssuerKeys(issuer_config(issuer_server.url, jwks_min_refetch_seconds=0), Metrics())
    keys.refresh()
    issuer_server.hold = threading.Event()
    waiting = threading.Thread(target=keys.refetch_for_unknown_kid)
    waiting.start()
    wait_for(lambda: issuer_server.jwks_fetches() == 2)

    try:
        assert keys.refetch_for_unknown_kid(may_wait=False) is False
    finally:
        issuer_server.hold.set()
        waiting.join()
    assert issuer_server.jwks_fetches() == 2


def test_unknown_kid_decided_again_with_wait(issuer_server: IssuerServer):
    harness = Harness(make_config(issuer_server.url))
    rotated = SigningKey.rsa("rotated")
    issuer_server.keys.append(rotated)
    view = bearer_view(rotated.sign(claims_for(issuer_server.url)))

    with pytest.raises(WaitNeeded):
        harness.service.evaluate(view, may_wait=False)
    assert harness.count("ok", decision="allow") == 0
    assert issuer_server.jwks_fetches() == 1

    outcome = harness.service.evaluate(view, may_wait=True)
    assert outcome.label == "allow"
    assert harness.count("ok", decision="allow") == 1
    assert issuer_server.jwks_fetches() == 2


def test_cached_token_decided_without_wait(issuer_server: IssuerServer, rsa_key: SigningKey):
    harness = Harness(make_config(issuer_server.url))
    view = bearer_view(rsa_key.sign(claims_for(issuer_server.url)))

    assert harness.service.evaluate(view, may_wait=False).label == "allow"
    assert harness.service.evaluate(view, may_wait=False).label == "allow"


def test_uncached_opaque_token_decided_again_with_wait(issuer_server: IssuerServer, tmp_path: Path):
    harness = Harness(introspecting_config(issuer_server.url, tmp_path))
    issuer_server.introspection_results["opaque-1"] = active_reply(
        issuer_server.url, aud="Amplify Central"
    )
    view = bearer_view("opaque-1")

    with pytest.raises(WaitNeeded):
        harness.service.evaluate(view, may_wait=False)
    assert issuer_server.introspections() == 0
    assert introspection_cache(harness, "miss") is None

    assert harness.service.evaluate(view, may_wait=True).label == "allow"
    assert harness.service.evaluate(view, may_wait=False).label == "allow"
    assert issuer_server.introspections() == 1
    assert introspection_cache(harness, "miss") == 1
    assert introspection_cache(harness, "hit") == 1


# Through the running server: the loop keeps deciding other calls while one call waits.


@pytest.fixture
def server(issuer_server: IssuerServer, tmp_path: Path) -> Iterator[SidecarServer]:
    started = start_server(issuer_server, tmp_path)
    assert started.issuer_keys["local"].wait_loaded(10)
    yield started
    if issuer_server.hold is not None:
        issuer_server.hold.set()
    started.stop(drain=False)


@pytest.mark.parametrize("front_end", ["grpc", "http"])
def test_refetch_wait_does_not_stall_other_calls(
    server: SidecarServer, issuer_server: IssuerServer, rsa_key: SigningKey, front_end: str
):
    rotated = SigningKey.rsa("rotated")
    issuer_server.keys.append(rotated)
    issuer_server.hold = threading.Event()
    ask = asker(server, front_end)

    with futures.ThreadPoolExecutor(max_workers=2) as pool:
        waiting = pool.submit(ask, rotated.sign(claims_for(issuer_server.url)))
        wait_for(lambda: issuer_server.jwks_fetches() == 2)

        assert ask(rsa_key.sign(claims_for(issuer_server.url))) == "allow"
        assert not waiting.done()

        issuer_server.hold.set()
        assert waiting.result(timeout=10) == "allow"


@pytest.mark.parametrize("front_end", ["grpc", "http"])
def test_introspection_does_not_stall_other_calls(
    server: SidecarServer, issuer_server: IssuerServer, rsa_key: SigningKey, front_end: str
):
    issuer_server.introspection_results["opaque-1"] = active_reply(
        issuer_server.url, aud="Amplify Central"
    )
    issuer_server.hold = threading.Event()
    ask = asker(server, front_end)

    with futures.ThreadPoolExecutor(max_workers=2) as pool:
        waiting = pool.submit(ask, "opaque-1")
        wait_for(lambda: issuer_server.introspections() == 1)

        assert ask(rsa_key.sign(claims_for(issuer_server.url))) == "allow"
        assert not waiting.done()

        issuer_server.hold.set()
        assert waiting.result(timeout=10) == "allow"


@pytest.mark.parametrize("front_end", ["grpc", "http"])
def test_introspection_does_not_delay_key_refetch(
    issuer_server: IssuerServer, tmp_path: Path, front_end: str
):
    issuer_server.introspection_results["opaque-1"] = active_reply(
        issuer_server.url, aud="Amplify Central"
    )
    issuer_server.hold_introspection = threading.Event()
    rotated = SigningKey.rsa("rotated")
    server = start_server(issuer_server, tmp_path, wait_threads=1)
    ask = asker(server, front_end)
    try:
        with futures.ThreadPoolExecutor(max_workers=1) as pool:
            # The only introspection thread waits on the held reply for opaque-1.
            waiting = pool.submit(ask, "opaque-1")
            wait_for(lambda: issuer_server.introspections() == 1)
            issuer_server.keys.append(rotated)

            assert ask(rotated.sign(claims_for(issuer_server.url))) == "allow"
            assert not waiting.done()

            issuer_server.hold_introspection.set()
            assert waiting.result(timeout=10) == "allow"
    finally:
        issuer_server.hold_introspection.set()
        server.stop(drain=False)


@pytest.mark.parametrize("front_end", ["grpc", "http"])
def test_shutdown_finishes_call_in_flight(
    issuer_server: IssuerServer, tmp_path: Path, front_end: str
):
    issuer_server.introspection_results["opaque-1"] = active_reply(
        issuer_server.url, aud="Amplify Central"
    )
    issuer_server.hold_introspection = threading.Event()
    server = start_server(issuer_server, tmp_path, shutdown_grace_seconds=10)
    http_front_end = server._http_authz
    assert http_front_end is not None
    try:
        with futures.ThreadPoolExecutor(max_workers=2) as pool:
            in_flight = pool.submit(asker(server, front_end), "opaque-1")
            wait_for(lambda: issuer_server.introspections() == 1)

            stopped = pool.submit(server.stop, False)
            wait_for(lambda: http_front_end.stopping)
            assert not in_flight.done()

            issuer_server.hold_introspection.set()
            assert in_flight.result(timeout=10) == "allow"
            stopped.result(timeout=15)
    finally:
        issuer_server.hold_introspection.set()


def test_http_call_dropped_when_envoy_disconnects(issuer_server: IssuerServer, tmp_path: Path):
    server = one_wait_thread_server(issuer_server, tmp_path)
    front_end = server._http_authz
    assert front_end is not None

    def send_and_disconnect() -> None:
        waiting = set(front_end.connections)
        with socket.create_connection(("127.0.0.1", server.http_authz_port)) as gone:
            gone.sendall(request("opaque-2"))
            wait_for(lambda: any(c._pending for c in set(front_end.connections) - waiting))
        wait_for(lambda: not set(front_end.connections) - waiting)

    assert_queued_call_dropped(server, issuer_server, "http", send_and_disconnect)


def test_grpc_call_dropped_when_envoy_cancels(issuer_server: IssuerServer, tmp_path: Path):
    server = one_wait_thread_server(issuer_server, tmp_path)

    def send_until_deadline() -> None:
        check = CheckRequest()
        check.attributes.request.http.headers["authorization"] = "Bearer opaque-2"
        with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
            stub = external_auth_pb2_grpc.AuthorizationStub(channel)
            with pytest.raises(grpc.RpcError) as error:
                stub.Check(check, timeout=1)
        assert error.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED

    assert_queued_call_dropped(server, issuer_server, "grpc", send_until_deadline)


def assert_queued_call_dropped(
    server: SidecarServer,
    issuer_server: IssuerServer,
    front_end: str,
    send_and_give_up: Callable[[], None],
) -> None:
    """Queue opaque-2 behind a held call, give up on it, and check it never reaches the issuer."""
    try:
        with futures.ThreadPoolExecutor(max_workers=1) as pool:
            # The only wait thread waits on the held introspection of opaque-1.
            first = pool.submit(asker(server, front_end), "opaque-1")
            wait_for(lambda: issuer_server.introspections() == 1)

            send_and_give_up()

            assert issuer_server.hold is not None
            issuer_server.hold.set()
            assert first.result(timeout=10) == "allow"
        # A job queued after opaque-2 runs only once the queue ahead of it is done.
        assert server._loop is not None
        server._loop.wait_pools[INTROSPECTION_POOL].submit(lambda: None).result(timeout=10)
        assert issuer_server.introspections() == 1
    finally:
        if issuer_server.hold is not None:
            issuer_server.hold.set()
        server.stop(drain=False)


def one_wait_thread_server(issuer_server: IssuerServer, tmp_path: Path) -> SidecarServer:
    """Start a sidecar with one wait thread; hold the issuer's replies to opaque-1 and opaque-2."""
    for token in ("opaque-1", "opaque-2"):
        issuer_server.introspection_results[token] = active_reply(
            issuer_server.url, aud="Amplify Central"
        )
    issuer_server.hold = threading.Event()
    return start_server(issuer_server, tmp_path, wait_threads=1)


def start_server(issuer_server: IssuerServer, tmp_path: Path, **settings: Any) -> SidecarServer:
    """Start a sidecar with both front ends on free ports, with extra `server` settings."""
    document = introspecting_config(issuer_server.url, tmp_path)
    document["server"] = {
        "grpc_address": f"127.0.0.1:{free_port()}",
        "http_address": f"127.0.0.1:{free_port()}",
        "http_authz_address": f"127.0.0.1:{free_port()}",
        "drain_seconds": 0,
        **settings,
    }
    server = SidecarServer(parse_config(document))
    server.start()
    return server


def asker(server: SidecarServer, front_end: str) -> Callable[[str], str]:
    """Return a function that sends one request with a token and returns allow or deny."""
    if front_end == "http":

        def ask_http(token: str) -> str:
            reply = exchange(server.http_authz_port, request(token))
            return "allow" if reply.startswith(b"HTTP/1.1 200 ") else "deny"

        return ask_http

    def ask_grpc(token: str) -> str:
        check = CheckRequest()
        check.attributes.request.http.headers["authorization"] = f"Bearer {token}"
        with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
            stub = external_auth_pb2_grpc.AuthorizationStub(channel)
            response = stub.Check(check, timeout=10)
        return "allow" if response.status.code == 0 else "deny"

    return ask_grpc


def introspecting_config(issuer_url: str, tmp_path: Path) -> dict[str, Any]:
    secret = tmp_path / "secret"
    secret.write_text("s3cret-value")
    return {
        "issuers": [
            {
                "name": "local",
                "issuer": issuer_url,
                "audiences": ["Amplify Central"],
                "allow_insecure_http": True,
                "jwks_min_refetch_seconds": 0,
                "refetch_wait_seconds": 10,
                "fetch_timeout_seconds": 10,
                "introspection": {"client_id": "ext-authz", "client_secret_file": str(secret)},
            }
        ],
        "policies": [{"name": "default", "issuers": ["local"]}],
    }


def bearer_view(token: str) -> RequestView:
    return RequestView(
        headers={"authorization": f"Bearer {token}"},
        method="GET",
        host="api.example",
        path="/",
        context_extensions={},
    )


def introspection_cache(harness: Harness, result: str) -> float | None:
    return harness.metrics.registry.get_sample_value(
        "ext_authz_introspection_cache_total", {"issuer": "local", "result": result}
    )


def wait_for(condition: Callable[[], bool], timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "the condition did not hold in time"
        time.sleep(0.01)
