"""RFC 7662 token introspection for opaque access tokens, with a bounded result cache.

The cache is keyed by a SHA-256 hash of the token, never the token itself,
and stores the introspection claims, not a decision: the route's policy is
evaluated on every request.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from .config import IssuerConfig
from .issuer_fetch import Fetcher, FetchError, FetchResult
from .metrics import Metrics
from .reasons import Reason
from .verify import INTROSPECTION_POOL, VerificationError, VerifiedToken, WaitNeeded

log = logging.getLogger(__name__)

# After a failed metadata lookup for the endpoint, wait this long before the
# next one, so a flood of opaque tokens cannot flood the issuer.
ENDPOINT_RETRY_SECONDS = 10.0


class Introspector:
    """Introspects opaque tokens at one issuer and caches the results."""

    def __init__(
        self,
        config: IssuerConfig,
        metrics: Metrics,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if config.introspection is None:
            raise ValueError(f"issuer {config.name} has no introspection settings")
        self.config = config
        self._settings = config.introspection
        self._metrics = metrics
        self._clock = clock
        self._fetcher = Fetcher(config)
        self._endpoint = self._settings.endpoint
        self._endpoint_failed_at = float("-inf")
        self._lock = threading.Lock()
        # token hash -> (claims, or None for an inactive token; expiry time)
        self._cache: OrderedDict[bytes, tuple[dict[str, Any] | None, float]] = OrderedDict()

    def introspect(self, token: str, may_wait: bool = True) -> VerifiedToken:
        """Return the active token's claims, or raise VerificationError.

        With `may_wait=False`, a token that is not cached raises WaitNeeded
        instead of asking the issuer.
        """
        digest = hashlib.sha256(token.encode()).digest()
        now = self._clock()
        cached = self._cached(digest, now, may_wait)
        if cached is None:
            claims = self._ask_issuer(token)
            self._store(digest, claims, now)
        else:
            claims = cached[0]

        if claims is None:
            raise VerificationError(Reason.TOKEN_INACTIVE, "the issuer reports the token inactive")
        iss = claims.get("iss", self.config.issuer)
        if iss != self.config.issuer:
            raise VerificationError(
                Reason.ISSUER_UNTRUSTED, "the introspection result names another issuer"
            )
        return VerifiedToken(issuer=self.config, claims=claims)

    def _cached(
        self, digest: bytes, now: float, may_wait: bool
    ) -> tuple[dict[str, Any] | None, float] | None:
        with self._lock:
            entry = self._cache.get(digest)
            if entry is None or entry[1] <= now:
                if not may_wait:
                    # Counted as a miss when the call is repeated on a thread.
                    raise WaitNeeded(INTROSPECTION_POOL)
                self._metrics.introspection_cache.labels(self.config.name, "miss").inc()
                return None
            self._cache.move_to_end(digest)
        self._metrics.introspection_cache.labels(self.config.name, "hit").inc()
        return entry

    def _store(self, digest: bytes, claims: dict[str, Any] | None, now: float) -> None:
        lifetime = float(self._settings.cache_seconds)
        exp = claims.get("exp") if claims is not None else None
        if isinstance(exp, int | float) and not isinstance(exp, bool):
            # Never serve an active result past the token's own expiry.
            lifetime = min(lifetime, exp - now)
        if lifetime <= 0:
            return
        with self._lock:
            self._cache[digest] = (claims, now + lifetime)
            self._cache.move_to_end(digest)
            while len(self._cache) > self._settings.cache_size:
                self._cache.popitem(last=False)

    def _ask_issuer(self, token: str) -> dict[str, Any] | None:
        name = self.config.name
        try:
            endpoint = self._resolve_endpoint()
            reply = self._fetcher.post_form(
                endpoint,
                {"token": token, "token_type_hint": "access_token"},
                auth=(self._settings.client_id, self._settings.client_secret),
            )
        except FetchError as error:
            self._metrics.introspection_requests.labels(name, error.result.value).inc()
            log.warning("issuer %s: introspection failed: %s", name, error)
            raise VerificationError(Reason.INTROSPECTION_FAILED, str(error)) from None

        self._metrics.introspection_requests.labels(name, "ok").inc()
        # RFC 7662 §2.2: only a JSON boolean true means active.
        if reply.get("active") is not True:
            return None
        return reply

    def _resolve_endpoint(self) -> str:
        if self._endpoint is not None:
            return self._endpoint
        now = time.monotonic()
        if now - self._endpoint_failed_at < ENDPOINT_RETRY_SECONDS:
            raise FetchError(
                FetchResult.RATE_LIMITED,
                "the introspection endpoint is unknown because the last metadata fetch failed",
            )
        try:
            self._endpoint = self._fetcher.discover_introspection_endpoint()
        except FetchError:
            self._endpoint_failed_at = now
            raise
        log.info("issuer %s: introspection endpoint %s", self.config.name, self._endpoint)
        return self._endpoint
