"""Envoy's HTTP ext_authz protocol (`http_service`), served from the same decision code.

Envoy sends the original method and path with the headers its filter
allows. A 200 reply allows the request: Envoy copies the reply headers named
in `allowed_upstream_headers` onto the upstream request and removes the
headers listed in `x-envoy-auth-headers-to-remove`. Any other status is
returned to the client with the headers named in `allowed_client_headers`
and the body. The route's policy comes from the `x-ext-authz-policy` request
header, which Envoy adds with `authorization_request.headers_to_add`.

The server runs on the event loop it shares with the gRPC front end
(event_loop.py). A call is decided on the loop, unless it has to wait on the
network (a key refetch, an introspection request): then it is decided again
on the wait pool.
"""

from __future__ import annotations

import asyncio
import logging
import time

import httptools

from .config import DenyConfig
from .decision import Decision
from .event_loop import LoopThread
from .request_view import POLICY_EXTENSION, RequestView
from .response import deny_parts, rendered_allow, upstream_headers
from .service import AuthorizationService, Outcome
from .verify import WaitNeeded

log = logging.getLogger(__name__)

POLICY_HEADER = "x-ext-authz-policy"
HEADERS_TO_REMOVE = "x-envoy-auth-headers-to-remove"
MAX_HEADER_BYTES = 64 * 1024

_STATUS_TEXT = {
    200: "OK",
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    500: "Internal Server Error",
    503: "Service Unavailable",
}


def render(outcome: Outcome) -> bytes:
    """Return the full HTTP/1.1 reply for a decision."""
    if outcome.label == "allow":
        return rendered_allow(outcome.decision, "http", _render_allow)
    return _render(outcome.decision, outcome.label, outcome.deny)


def _render_allow(decision: Decision) -> bytes:
    return _render(decision, "allow", None)


def _render(decision: Decision, label: str, deny: DenyConfig | None) -> bytes:
    if label == "deny":
        assert deny is not None
        status, challenge, body = deny_parts(
            decision.reason, decision.policy_name, decision.policy, deny
        )
        # Envoy takes a 5xx reply for a failure of the authorization service,
        # which failure_mode_allow would let through. A deny must stay a deny,
        # so it never goes out as 5xx here; the body still names the error.
        if status >= 500:
            status = 403
        headers = [("www-authenticate", challenge), ("content-type", "application/json")]
        payload = body.encode()
    else:
        assert decision.policy is not None
        identity = decision.identity if label == "allow" else None
        headers, to_remove = upstream_headers(decision.policy, identity)
        if to_remove:
            headers = [*headers, (HEADERS_TO_REMOVE, ",".join(to_remove))]
        status, payload = 200, b""

    lines = [f"HTTP/1.1 {status} {_STATUS_TEXT.get(status, 'Error')}"]
    lines += [f"{name}: {value}" for name, value in headers]
    lines.append(f"content-length: {len(payload)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + payload


class _Connection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection from Envoy."""

    def __init__(self, server: HttpAuthzServer) -> None:
        self._server = server
        self._parser = httptools.HttpRequestParser(self)
        self._transport: asyncio.Transport | None = None
        self._url = b""
        self._headers: dict[str, str] = {}
        self._header_bytes = 0
        # Decisions moved to the wait pool, cancelled if the connection closes first.
        self._pending: set[asyncio.Future[bytes]] = set()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]
        self._server.connections.add(self)

    def connection_lost(self, error: Exception | None) -> None:
        self._server.connections.discard(self)
        self._transport = None
        # Envoy gave up on these calls. A call still queued for a pool thread
        # is dropped, so it sends no request that no one would read.
        for pending in list(self._pending):
            pending.cancel()

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()

    def data_received(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError:
            self._reply_and_close(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n")

    # httptools callbacks

    def on_message_begin(self) -> None:
        self._url = b""
        self._headers = {}
        self._header_bytes = 0

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_bytes += len(name) + len(value)
        if self._header_bytes > MAX_HEADER_BYTES:
            raise httptools.HttpParserError("headers too large")
        key = name.decode("latin-1").lower()
        text = value.decode("utf-8", "replace")
        # Repeated headers are joined with ',' as Envoy's gRPC variant does.
        self._headers[key] = f"{self._headers[key]},{text}" if key in self._headers else text

    def on_message_complete(self) -> None:
        # NOTE: replies are written when they are ready. Envoy sends one
        # request at a time per HTTP/1.1 connection, so they stay in order.
        # A client that pipelines requests could get replies out of order.
        view = RequestView(
            headers=self._headers,
            method=self._parser.get_method().decode("latin-1"),
            host=self._headers.get("host", ""),
            path=self._url.decode("latin-1"),
            context_extensions=(
                {POLICY_EXTENSION: self._headers[POLICY_HEADER]}
                if POLICY_HEADER in self._headers
                else {}
            ),
        )
        reply = self._server.answer(view)
        if isinstance(reply, bytes):
            self._write(reply)
        else:
            self._pending.add(reply)
            reply.add_done_callback(self._write_when_decided)

    def _write_when_decided(self, decided: asyncio.Future[bytes]) -> None:
        self._pending.discard(decided)
        if not decided.cancelled():
            self._write(decided.result())

    @property
    def busy(self) -> bool:
        """Whether a reply is still being decided on the wait pool."""
        return bool(self._pending)

    def _write(self, reply: bytes) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.write(reply)
            # During shut-down a connection closes once its last reply is out.
            if not self._parser.should_keep_alive() or (
                self._server.stopping and not self._pending
            ):
                self._transport.close()

    def _reply_and_close(self, reply: bytes) -> None:
        if self._transport is not None:
            self._transport.write(reply)
            self._transport.close()


class HttpAuthzServer:
    """The HTTP front end, on the shared event loop."""

    def __init__(
        self, service: AuthorizationService, loop_thread: LoopThread, host: str, port: int
    ) -> None:
        self._service = service
        self._loop_thread = loop_thread
        self._host, self._requested_port = host, port
        self._server: asyncio.base_events.Server | None = None
        self.connections: set[_Connection] = set()
        self.stopping = False
        self.port = 0

    def start(self) -> None:
        """Bind and start serving; raise OSError when the address cannot be used."""
        self._server = self._loop_thread.run(
            self._loop_thread.loop.create_server(
                lambda: _Connection(self), self._host, self._requested_port, reuse_address=True
            )
        )
        self.port = int(self._server.sockets[0].getsockname()[1])

    async def stop(self, grace: float) -> None:
        """Stop accepting connections and give replies in flight `grace` seconds; run on the loop.

        Idle keep-alive connections close at once, and each busy one closes
        after its reply. Connections still busy after `grace` are closed,
        which cancels their calls.
        """
        if self._server is None:
            return
        self.stopping = True
        self._server.close()
        for connection in list(self.connections):
            if not connection.busy:
                connection.close()
        deadline = time.monotonic() + grace
        while self.connections and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for connection in list(self.connections):
            connection.close()
        await self._server.wait_closed()

    def answer(self, view: RequestView) -> bytes | asyncio.Future[bytes]:
        """Decide on the loop, or on the wait pool when the call has to wait on the network."""
        started = time.perf_counter()
        started_ns = self._service.trace_start()
        try:
            return self._decide(view, False, started, started_ns)
        except WaitNeeded as waiting:
            try:
                return self._loop_thread.loop.run_in_executor(
                    self._loop_thread.wait_pools[waiting.pool],
                    self._decide,
                    view,
                    True,
                    started,
                    started_ns,
                )
            except Exception:
                # For example a wait pool that is already shut down.
                service = self._service
                return render(service.internal_error(view, service.engine.config.deny))

    def _decide(
        self, view: RequestView, may_wait: bool, started: float, started_ns: int | None
    ) -> bytes:
        service = self._service
        try:
            reply = render(service.evaluate(view, may_wait, started_ns))
        except WaitNeeded:
            raise
        except Exception:
            reply = render(service.internal_error(view, service.engine.config.deny))
        service.observe_duration(time.perf_counter() - started)
        return reply
