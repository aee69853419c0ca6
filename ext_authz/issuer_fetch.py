"""Outbound fetches of issuer metadata and JWKS documents, with their limits.

Every fetch has a deadline for the whole exchange, a maximum body size, and
follows redirects only within the same scheme, host and port. URLs come only
from configuration and from the issuer's own metadata document, never from a
token.
"""

from __future__ import annotations

import enum
import json
import re
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urljoin, urlsplit, urlunsplit

import requests

from .config import OAUTH_METADATA_PATH, IssuerConfig

MAX_REDIRECTS = 3
_REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
_CHUNK_BYTES = 64 * 1024


class FetchResult(enum.Enum):
    """Outcome of one fetch, as counted in ext_authz_jwks_fetches_total{result}."""

    OK = "ok"
    TIMEOUT = "timeout"
    HTTP_ERROR = "http_error"  # connection failure or a status other than 200
    INVALID = "invalid"  # not JSON, wrong shape, too large, or a refused redirect
    RATE_LIMITED = "rate_limited"  # a refetch skipped because of jwks_min_refetch_seconds


class FetchError(Exception):
    """A fetch failed. The message names the URL and the cause, never a token."""

    def __init__(self, result: FetchResult, message: str) -> None:
        super().__init__(message)
        self.result = result


@dataclass(frozen=True)
class JsonDocument:
    body: dict[str, Any]
    max_age_seconds: int | None  # from Cache-Control, when the server sent one


def metadata_urls(config: IssuerConfig) -> list[str]:
    """Return the metadata URLs to try, in order.

    `metadata_url` overrides everything. OpenID Connect Discovery §4 appends
    the well-known path to the issuer after removing a trailing '/'. RFC 8414
    §3 inserts it between the host and the issuer's path. Some servers only
    serve the appended form, so it is the fallback when the inserted one
    returns 404.
    """
    if config.metadata_url is not None:
        return [config.metadata_url]
    appended = config.issuer.rstrip("/") + config.metadata_path
    if config.metadata_path != OAUTH_METADATA_PATH:
        return [appended]
    parts = urlsplit(config.issuer)
    inserted = urlunsplit(
        (parts.scheme, parts.netloc, config.metadata_path + parts.path.rstrip("/"), "", "")
    )
    return [inserted] if inserted == appended else [inserted, appended]


class Fetcher:
    """Fetches JSON documents for one issuer within its configured limits."""

    def __init__(self, config: IssuerConfig) -> None:
        self.config = config
        self._session = requests.Session()
        self._session.headers["Accept"] = "application/json"

    def discover_jwks_uri(self) -> str:
        """Fetch the metadata document and return its validated `jwks_uri`."""
        return self._metadata_url_field("jwks_uri")

    def discover_introspection_endpoint(self) -> str:
        """Fetch the metadata document and return its `introspection_endpoint` (RFC 8414 §2)."""
        return self._metadata_url_field("introspection_endpoint")

    def _metadata_url_field(self, name: str) -> str:
        document, url = self._fetch_metadata()
        value = document.get(name)
        if not isinstance(value, str):
            raise FetchError(FetchResult.INVALID, f"the metadata at {url} has no {name} string")
        self._check_scheme(value, f"the metadata's {name}")
        return value

    def _fetch_metadata(self) -> tuple[dict[str, Any], str]:
        config = self.config
        urls = metadata_urls(config)
        for index, url in enumerate(urls):
            try:
                document = self.get_json(url).body
                break
            except _NotFoundError:
                if index == len(urls) - 1:
                    raise FetchError(
                        FetchResult.HTTP_ERROR, f"metadata document not found (404) at {url}"
                    ) from None

        if document.get("issuer") != config.issuer:
            raise FetchError(
                FetchResult.INVALID,
                f"the metadata document's issuer {document.get('issuer')!r} differs from the "
                f"configured issuer {config.issuer!r}; configure the exact string the server "
                "publishes, trailing slash included",
            )
        return document, url

    def post_form(self, url: str, form: dict[str, str], auth: tuple[str, str]) -> dict[str, Any]:
        """POST a form with HTTP Basic client authentication and return the JSON object reply.

        Redirects are not followed, so the credentials go only to `url`.
        """
        self._check_scheme(url, "the URL")
        deadline = time.monotonic() + self.config.fetch_timeout_seconds
        response = self._open("POST", url, deadline, data=form, auth=auth)
        with response:
            if response.status_code != 200:
                raise FetchError(
                    FetchResult.HTTP_ERROR, f"POST {url} returned HTTP {response.status_code}"
                )
            body = self._read_body(response, url, deadline)
        # The reply may echo the request, which contains the token, so no
        # part of it goes into the error message.
        return _parse_object(body, url, quote_body=False)

    def get_json(self, url: str) -> JsonDocument:
        """GET `url` and return its JSON object, following same-origin redirects only."""
        deadline = time.monotonic() + self.config.fetch_timeout_seconds
        current = url
        for _ in range(MAX_REDIRECTS + 1):
            self._check_scheme(current, "the URL")
            response = self._open("GET", current, deadline)
            with response:
                if response.status_code in _REDIRECT_STATUSES:
                    current = self._redirect_target(current, response.headers.get("Location"))
                    continue
                if response.status_code == 404:
                    raise _NotFoundError(FetchResult.HTTP_ERROR, f"GET {current} returned 404")
                if response.status_code != 200:
                    raise FetchError(
                        FetchResult.HTTP_ERROR,
                        f"GET {current} returned HTTP {response.status_code}",
                    )
                body = self._read_body(response, current, deadline)
                max_age = _max_age(response.headers.get("Cache-Control", ""))
            return JsonDocument(_parse_object(body, current), max_age)
        raise FetchError(
            FetchResult.INVALID, f"GET {url} redirected more than {MAX_REDIRECTS} times"
        )

    def _open(self, method: str, url: str, deadline: float, **options: Any) -> requests.Response:
        remaining = max(deadline - time.monotonic(), 0.001)
        try:
            return self._session.request(
                method, url, timeout=remaining, stream=True, allow_redirects=False, **options
            )
        except requests.Timeout:
            raise FetchError(
                FetchResult.TIMEOUT,
                f"{method} {url} timed out after {self.config.fetch_timeout_seconds:g} s",
            ) from None
        except requests.RequestException as error:
            raise FetchError(
                FetchResult.HTTP_ERROR, f"{method} {url} failed: {_describe(error)}"
            ) from None

    def _read_body(self, response: requests.Response, url: str, deadline: float) -> bytes:
        limit = self.config.fetch_max_bytes
        chunks: list[bytes] = []
        size = 0
        try:
            for chunk in response.iter_content(_CHUNK_BYTES):
                size += len(chunk)
                if size > limit:
                    raise FetchError(
                        FetchResult.INVALID, f"the reply from {url} is larger than {limit} bytes"
                    )
                if time.monotonic() > deadline:
                    raise FetchError(
                        FetchResult.TIMEOUT,
                        f"reading {url} timed out after {self.config.fetch_timeout_seconds:g} s",
                    )
                chunks.append(chunk)
        except requests.RequestException as error:
            result = FetchResult.TIMEOUT if "timed out" in str(error) else FetchResult.HTTP_ERROR
            raise FetchError(result, f"reading {url} failed: {type(error).__name__}") from None
        return b"".join(chunks)

    def _redirect_target(self, current: str, location: str | None) -> str:
        if not location:
            raise FetchError(FetchResult.INVALID, f"GET {current} redirected without a Location")
        target = urljoin(current, location)
        before, after = urlsplit(current), urlsplit(target)
        if (before.scheme, before.netloc) != (after.scheme, after.netloc):
            raise FetchError(
                FetchResult.INVALID,
                f"GET {current} redirected to {target}, another scheme or host; "
                "configure the final URL instead",
            )
        return target

    def _check_scheme(self, url: str, what: str) -> None:
        scheme = urlsplit(url).scheme
        if scheme == "https" or (scheme == "http" and self.config.allow_insecure_http):
            return
        if scheme == "http":
            raise FetchError(
                FetchResult.INVALID,
                f"{what} {url!r} is plain http; set allow_insecure_http: true for local "
                "development only",
            )
        raise FetchError(FetchResult.INVALID, f"{what} {url!r} is not an http(s) URL")


class _NotFoundError(FetchError):
    pass


def _describe(error: requests.RequestException) -> str:
    """Return the cause of a connection failure, such as 'Connection refused'."""
    # urllib3 buries the OS error in the message: "...[Errno 111] Connection refused')".
    match = re.search(r"\[Errno -?\d+\] ([^'\")\]]+)", str(error))
    if match:
        return f"{type(error).__name__} ({match.group(1).strip()})"
    return type(error).__name__


def _parse_object(body: bytes, url: str, quote_body: bool = True) -> dict[str, Any]:
    try:
        document = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):
        start = body[:40].decode("utf-8", "replace").strip()
        shown = f" (body starts with {start!r})" if quote_body else ""
        raise FetchError(FetchResult.INVALID, f"{url} did not return JSON{shown}") from None
    if not isinstance(document, dict):
        raise FetchError(FetchResult.INVALID, f"{url} returned JSON that is not an object")
    return document


def _max_age(cache_control: str) -> int | None:
    """Return the max-age directive of a Cache-Control header (RFC 9111 §5.2.2.1)."""
    for directive in cache_control.split(","):
        name, _, value = directive.strip().partition("=")
        if name.lower() == "max-age" and value.strip('"').isdigit():
            return int(value.strip('"'))
    return None
