"""Issuer signing keys: the cached key set, its background refresh and refetches.

A Check call reads the cached KeySet. It waits on the network only when a
token names a `kid` the cache lacks: then one refetch runs for all callers,
and each caller waits at most `refetch_wait_seconds` for it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from .config import IssuerConfig
from .issuer_fetch import Fetcher, FetchError, FetchResult
from .jwks import KeySet, parse_jwks
from .metrics import Metrics

log = logging.getLogger(__name__)

RETRY_INITIAL_SECONDS = 1.0
RETRY_MAX_SECONDS = 60.0
# A Cache-Control max-age below this is raised to it, so a misconfigured
# issuer cannot make every replica poll it continuously.
MIN_CACHE_MAX_AGE_SECONDS = 30


@dataclass(frozen=True)
class KeyState:
    """Key state of one issuer, as reported by /readyz and the start-up log."""

    issuer: str
    keys: int
    kids: list[str]
    jwks_uri: str | None
    loaded: bool
    stale: bool
    age_seconds: float | None
    last_error: str | None


class IssuerKeys:
    """The cached key set of one issuer, kept fresh by a background thread."""

    def __init__(
        self,
        config: IssuerConfig,
        metrics: Metrics,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self._metrics = metrics
        self._clock = clock
        self._fetcher = Fetcher(config)

        self._key_set: KeySet | None = None
        self._jwks_uri = config.jwks_uri
        self._last_success: float | None = None
        self._last_error: str | None = None
        self._next_refresh_seconds = float(config.jwks_refresh_seconds)

        # `_fetch_lock` serializes fetches. `_state_lock` guards the in-flight
        # refetch and the rate-limit bookkeeping and is never held during I/O.
        self._fetch_lock = threading.Lock()
        self._state_lock = threading.Lock()
        self._refetch_done: threading.Event | None = None
        self._last_attempt = float("-inf")
        self._last_rate_limit_log = float("-inf")
        self._stale_logged = False

        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

        metrics.jwks_keys.labels(config.name).set(0)
        metrics.jwks_age.labels(config.name).set_function(self._age_for_metric)

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
        while self._key_set is None and time.monotonic() < deadline:
            if self._stop.wait(0.05):
                break
        return self._key_set is not None

    def _run(self) -> None:
        delay = RETRY_INITIAL_SECONDS
        while not self._stop.is_set():
            if self.refresh():
                delay = RETRY_INITIAL_SECONDS
                wait = self._next_refresh_seconds
            else:
                # Exponential backoff while the issuer is down, so the retries
                # neither hammer it nor wait long once it is back.
                wait = delay
                delay = min(delay * 2, RETRY_MAX_SECONDS)
            self._stop.wait(wait)

    # Reads on the Check path

    @property
    def keys(self) -> KeySet | None:
        """The usable key set, or None before the first load and after max-stale."""
        if self._key_set is None or self._is_stale():
            return None
        return self._key_set

    @property
    def loaded(self) -> bool:
        return self._key_set is not None

    def refetch_for_unknown_kid(self, may_wait: bool = True) -> bool:
        """Fetch the key set again because a token names a key the cache lacks.

        Concurrent callers share one fetch, and each waits for it at most
        `refetch_wait_seconds`; a fetch that takes longer still completes in
        the background. While `jwks_min_refetch_seconds` has not passed since
        the last fetch, nothing is fetched, so a flood of tokens with made-up
        `kid` values costs the issuer at most one request per interval.

        With `may_wait=False` (a caller on an event loop) nothing is started
        and False is returned when the call would have to wait; the caller
        then repeats the call on a thread that may block. Otherwise it
        returns True.
        """
        name = self.config.name
        if self._key_set is None and self._fetch_lock.locked():
            # The first load is still running: wait for it instead of
            # starting another fetch, within the same bound.
            if not may_wait:
                return False
            if self._fetch_lock.acquire(timeout=self.config.refetch_wait_seconds):
                self._fetch_lock.release()
            return True
        with self._state_lock:
            done = self._refetch_done
            if done is None:
                now = self._clock()
                if now - self._last_attempt < self.config.jwks_min_refetch_seconds:
                    self._metrics.jwks_fetches.labels(name, FetchResult.RATE_LIMITED.value).inc()
                    self._log_rate_limited(now)
                    return True
                if not may_wait:
                    return False
                # Claim the attempt now, so callers arriving before the
                # fetch thread starts are rate-limited or join this fetch.
                self._last_attempt = now
                done = self._refetch_done = threading.Event()
                self._metrics.unknown_kid_refetches.labels(name).inc()
                threading.Thread(
                    target=self._refetch, args=(done,), name=f"refetch-{name}", daemon=True
                ).start()
            elif not may_wait:
                return False
        done.wait(self.config.refetch_wait_seconds)
        return True

    def _refetch(self, done: threading.Event) -> None:
        try:
            self.refresh()
        finally:
            with self._state_lock:
                self._refetch_done = None
            done.set()

    def state(self) -> KeyState:
        key_set = self._key_set
        return KeyState(
            issuer=self.config.name,
            keys=len(key_set) if key_set is not None else 0,
            kids=sorted({key.kid or "" for key in key_set.keys}) if key_set is not None else [],
            jwks_uri=self._jwks_uri,
            loaded=key_set is not None,
            stale=self._is_stale(),
            age_seconds=self._age(),
            last_error=self._last_error,
        )

    # Fetching

    def refresh(self) -> bool:
        """Fetch the metadata if needed, then the JWKS; return whether it succeeded."""
        with self._fetch_lock:
            with self._state_lock:
                self._last_attempt = max(self._last_attempt, self._clock())
            try:
                self._fetch()
            except FetchError as error:
                self._record_failure(error)
                return False
            return True

    def _fetch(self) -> None:
        config = self.config
        jwks_uri = self._jwks_uri or self._fetcher.discover_jwks_uri()
        self._jwks_uri = jwks_uri
        document = self._fetcher.get_json(jwks_uri)
        try:
            key_set = parse_jwks(document.body, config.name, config.algorithms)
        except ValueError as error:
            raise FetchError(FetchResult.INVALID, f"GET {jwks_uri}: {error}") from None

        previous = self._key_set
        if previous is not None and previous == key_set:
            # Keep the same object when nothing changed: cached verifications
            # are tied to the KeySet object they were made with.
            key_set = previous
        self._key_set = key_set
        self._last_success = self._clock()
        self._last_error = None
        self._stale_logged = False
        self._next_refresh_seconds = _refresh_interval(config, document.max_age_seconds)
        self._metrics.jwks_fetches.labels(config.name, FetchResult.OK.value).inc()
        self._metrics.jwks_keys.labels(config.name).set(len(key_set))
        self._log_key_change(previous, key_set, jwks_uri)

    def _record_failure(self, error: FetchError) -> None:
        name = self.config.name
        self._last_error = str(error)
        self._metrics.jwks_fetches.labels(name, error.result.value).inc()
        if self._key_set is None:
            log.warning("issuer %s: key fetch failed: %s; no keys loaded yet", name, error)
        else:
            log.warning(
                "issuer %s: key fetch failed: %s; keeping the key set of %d key(s) fetched "
                "%.0f s ago (usable up to jwks_max_stale_seconds=%d)",
                name,
                error,
                len(self._key_set),
                self._age() or 0.0,
                self.config.jwks_max_stale_seconds,
            )
        if self._is_stale() and not self._stale_logged:
            self._stale_logged = True
            log.error(
                "issuer %s: cached keys are older than jwks_max_stale_seconds=%d; its tokens "
                "are denied with keys_unavailable until a fetch succeeds",
                name,
                self.config.jwks_max_stale_seconds,
            )

    def _log_key_change(self, previous: KeySet | None, current: KeySet, jwks_uri: str) -> None:
        name = self.config.name
        kids = sorted({key.kid or "(no kid)" for key in current.keys})
        if previous is None:
            log.info(
                "issuer %s: loaded %d signing %s from %s (kids: %s)",
                name,
                len(current),
                "key" if len(current) == 1 else "keys",
                jwks_uri,
                ", ".join(kids) or "none",
            )
        else:
            before = {key.kid or "(no kid)" for key in previous.keys}
            added, removed = sorted(set(kids) - before), sorted(before - set(kids))
            if added or removed:
                log.info(
                    "issuer %s: key set changed: added %s, removed %s",
                    name,
                    added or "none",
                    removed or "none",
                )
        if not len(current):
            log.warning("issuer %s: the JWKS at %s has no usable signing key", name, jwks_uri)

    def _log_rate_limited(self, now: float) -> None:
        # At most one line per rate-limit interval, so a flood of tokens with
        # unknown kids cannot flood the log.
        interval = max(self.config.jwks_min_refetch_seconds, 1)
        if now - self._last_rate_limit_log >= interval:
            self._last_rate_limit_log = now
            log.info(
                "issuer %s: tokens name unknown kids; no refetch until %d s after the last "
                "fetch (jwks_min_refetch_seconds), they are denied with key_not_found",
                self.config.name,
                self.config.jwks_min_refetch_seconds,
            )

    def _age(self) -> float | None:
        if self._last_success is None:
            return None
        return self._clock() - self._last_success

    def _age_for_metric(self) -> float:
        age = self._age()
        return -1.0 if age is None else age

    def _is_stale(self) -> bool:
        age = self._age()
        return age is not None and age > self.config.jwks_max_stale_seconds


def _refresh_interval(config: IssuerConfig, max_age: int | None) -> float:
    """Return seconds until the next refresh: the configured interval, or a shorter max-age."""
    if max_age is None:
        return float(config.jwks_refresh_seconds)
    bounded = max(max_age, MIN_CACHE_MAX_AGE_SECONDS)
    return float(min(bounded, config.jwks_refresh_seconds))
