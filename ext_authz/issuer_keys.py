"""Issuer signing keys: discovery, JWKS fetches, the cached key set and its refresh.

Network I/O for keys lives here, behind the cache. A Check call reads the
cached KeySet and only waits on the network for one single-flight refetch when
a token names a `kid` the cache does not have, bounded by the fetch timeout.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import requests

from .config import OAUTH_METADATA_PATH, IssuerConfig
from .jwks import KeySet, parse_jwks
from .metrics import Metrics

log = logging.getLogger(__name__)

MAX_DOCUMENT_BYTES = 1024 * 1024
RETRY_INITIAL_SECONDS = 1.0
RETRY_MAX_SECONDS = 60.0


class FetchError(Exception):
    """A metadata or JWKS fetch failed; the message names the URL and the cause."""


@dataclass(frozen=True)
class KeyState:
    """Key state of one issuer, as reported by /readyz and the start-up log."""

    issuer: str
    keys: int
    jwks_uri: str | None
    last_success_age_seconds: float | None
    last_error: str | None


def metadata_urls(issuer: str, metadata_path: str) -> list[str]:
    """Return the metadata URLs to try, in order.

    OpenID Connect Discovery §4 appends the well-known path to the issuer
    after removing a trailing '/'. RFC 8414 §3 inserts it between the host
    and the issuer's path; some servers only serve the appended form, so it
    is the fallback.
    """
    appended = issuer.rstrip("/") + metadata_path
    if metadata_path != OAUTH_METADATA_PATH:
        return [appended]
    parts = urlsplit(issuer)
    issuer_path = parts.path.rstrip("/")
    inserted = urlunsplit((parts.scheme, parts.netloc, metadata_path + issuer_path, "", ""))
    return [inserted] if inserted == appended else [inserted, appended]


class IssuerKeys:
    """The cached key set of one issuer, kept fresh by a background thread."""

    def __init__(self, config: IssuerConfig, metrics: Metrics) -> None:
        self.config = config
        self._metrics = metrics
        self._session = requests.Session()
        self._session.max_redirects = 3
        self._session.headers["Accept"] = "application/json"

        self._keys: KeySet | None = None
        self._jwks_uri = config.jwks_uri
        self._last_success: float | None = None
        self._last_error: str | None = None

        # One fetch at a time. A waiting caller compares `_attempts` to learn
        # whether the fetch it waited for has finished.
        self._fetch_lock = threading.Lock()
        self._attempts = 0
        self._last_attempt = float("-inf")

        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

        metrics.jwks_keys.labels(config.name).set(0)
        metrics.jwks_age.labels(config.name).set_function(self._age_seconds)

    # Lifecycle

    def start(self) -> None:
        """Start the background thread that loads the keys and refreshes them."""
        self._thread = threading.Thread(
            target=self._run, name=f"keys-{self.config.name}", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.config.fetch_timeout_seconds + 1)

    def wait_loaded(self, timeout: float) -> bool:
        """Wait up to `timeout` seconds for the first key set; return whether it is there."""
        deadline = time.monotonic() + timeout
        while self._keys is None and time.monotonic() < deadline:
            if self._stop.wait(0.05):
                break
        return self._keys is not None

    def _run(self) -> None:
        delay = RETRY_INITIAL_SECONDS
        while not self._stop.is_set():
            if self.refresh():
                delay = RETRY_INITIAL_SECONDS
                wait = float(self.config.jwks_refresh_seconds)
            else:
                # Exponential backoff while the issuer is down, so the retries
                # neither hammer it nor wait long once it is back.
                wait = delay
                delay = min(delay * 2, RETRY_MAX_SECONDS)
            self._stop.wait(wait)

    # Reads on the Check path

    @property
    def keys(self) -> KeySet | None:
        """The current key set, or None while no fetch has succeeded yet."""
        return self._keys

    def refetch_for_unknown_kid(self) -> None:
        """Fetch the key set again because a token names a key the cache lacks.

        Concurrent callers wait for the same fetch, up to the fetch timeout.
        Refetches are rate-limited by `jwks_min_refetch_seconds`, so a flood of
        tokens with made-up `kid` values costs the issuer at most one request
        per interval.
        """
        # NOTE: the caller that performs the fetch waits up to the full
        # fetch_timeout_seconds, which can exceed Envoy's Check timeout. Envoy
        # then returns its status_on_error to the client.
        attempts_before = self._attempts
        if not self._fetch_lock.acquire(timeout=self.config.fetch_timeout_seconds):
            return
        try:
            if self._attempts != attempts_before:
                return  # Another caller fetched while this one waited.
            if time.monotonic() - self._last_attempt < self.config.jwks_min_refetch_seconds:
                return
            self._refresh_locked()
        finally:
            self._fetch_lock.release()

    def state(self) -> KeyState:
        return KeyState(
            issuer=self.config.name,
            keys=len(self._keys) if self._keys is not None else 0,
            jwks_uri=self._jwks_uri,
            last_success_age_seconds=self._age_seconds() if self._last_success else None,
            last_error=self._last_error,
        )

    # Fetching

    def refresh(self) -> bool:
        """Fetch metadata if needed and the JWKS; return whether it succeeded."""
        with self._fetch_lock:
            return self._refresh_locked()

    def _refresh_locked(self) -> bool:
        self._attempts += 1
        self._last_attempt = time.monotonic()
        name = self.config.name
        try:
            jwks_uri = self._jwks_uri or self._discover()
            self._jwks_uri = jwks_uri
            keys = parse_jwks(self._get_json(jwks_uri), name, self.config.algorithms)
        except FetchError as error:
            self._last_error = str(error)
            self._metrics.jwks_fetches.labels(name, "error").inc()
            kept = f"; keeping {len(self._keys)} cached keys" if self._keys is not None else ""
            log.warning("key fetch for issuer %s failed: %s%s", name, error, kept)
            return False

        first_load = self._keys is None
        self._keys = keys
        self._last_success = time.monotonic()
        self._last_error = None
        self._metrics.jwks_fetches.labels(name, "success").inc()
        self._metrics.jwks_keys.labels(name).set(len(keys))
        if first_load:
            log.info("issuer %s: loaded %d signing keys from %s", name, len(keys), jwks_uri)
        else:
            log.debug("issuer %s: refreshed %d signing keys", name, len(keys))
        if not len(keys):
            log.warning("issuer %s: the JWKS at %s has no usable signing key", name, jwks_uri)
        return True

    def _discover(self) -> str:
        config = self.config
        urls = metadata_urls(config.issuer, config.metadata_path)
        document: Any = None
        for index, url in enumerate(urls):
            try:
                document = self._get_json(url)
                break
            except _NotFoundError:
                if index == len(urls) - 1:
                    raise FetchError(f"metadata document not found (404) at {url}") from None

        if not isinstance(document, dict):
            raise FetchError("the metadata document is not a JSON object")
        if document.get("issuer") != config.issuer:
            raise FetchError(
                f"the metadata document's issuer {document.get('issuer')!r} differs from the "
                f"configured issuer {config.issuer!r}; configure the exact string the server "
                "publishes, trailing slash included"
            )
        jwks_uri = document.get("jwks_uri")
        if not isinstance(jwks_uri, str) or urlsplit(jwks_uri).scheme not in ("https", "http"):
            raise FetchError("the metadata document has no valid jwks_uri")
        if urlsplit(jwks_uri).scheme == "http" and not config.allow_insecure_http:
            raise FetchError(
                f"the metadata's jwks_uri {jwks_uri!r} is plain http; "
                "set allow_insecure_http: true for local development only"
            )
        return jwks_uri

    def _get_json(self, url: str) -> Any:
        try:
            with self._session.get(
                url, timeout=self.config.fetch_timeout_seconds, stream=True
            ) as response:
                if response.status_code == 404:
                    raise _NotFoundError(url)
                if response.status_code != 200:
                    raise FetchError(f"GET {url} returned HTTP {response.status_code}")
                body = response.raw.read(MAX_DOCUMENT_BYTES + 1, decode_content=True)
                if len(body) > MAX_DOCUMENT_BYTES:
                    raise FetchError(f"GET {url} returned more than {MAX_DOCUMENT_BYTES} bytes")
                return _json_loads(body, url)
        except requests.RequestException as error:
            raise FetchError(f"GET {url} failed: {type(error).__name__}") from None

    def _age_seconds(self) -> float:
        if self._last_success is None:
            return -1.0
        return time.monotonic() - self._last_success


class _NotFoundError(FetchError):
    pass


def _json_loads(body: bytes, url: str) -> Any:
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise FetchError(f"GET {url} did not return JSON") from None
