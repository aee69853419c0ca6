"""The operations HTTP server: /metrics, /healthz and /readyz."""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST

log = logging.getLogger(__name__)

# Returns whether the service is ready, and the JSON body of /readyz.
Readiness = Callable[[], tuple[bool, dict[str, Any]]]


class OperationsServer:
    """Serves metrics and health endpoints on a thread of its own."""

    def __init__(
        self,
        address: tuple[str, int],
        metrics_text: Callable[[], bytes],
        readiness: Readiness,
    ) -> None:
        handler = _make_handler(metrics_text, readiness)
        self._server = ThreadingHTTPServer(address, handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="operations-http", daemon=True
        )

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def _make_handler(
    metrics_text: Callable[[], bytes], readiness: Readiness
) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "ext-authz"
        sys_version = ""

        def version_string(self) -> str:
            return self.server_version

        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                self._send(200, CONTENT_TYPE_LATEST, metrics_text())
            elif path == "/healthz":
                self._send_json(200, {"status": "alive"})
            elif path == "/readyz":
                ready, body = readiness()
                self._send_json(200 if ready else 503, body)
            else:
                self._send_json(
                    404, {"error": "not found", "paths": ["/metrics", "/healthz", "/readyz"]}
                )

        def _send_json(self, status: int, body: dict[str, Any]) -> None:
            self._send(status, "application/json", json.dumps(body).encode())

        def _send(self, status: int, content_type: str, body: bytes) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            log.debug("operations http: " + format, *args)

    return Handler
