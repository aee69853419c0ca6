"""JWT verification: issuer, algorithm, key and signature.

The claims of a verified token are checked afterwards, in claims.py, with the
audiences of the route's policy. The signature is checked first, so an
expired token with a bad signature is reported as `signature_invalid`:
claims of an unverified token are not worth reporting on.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .config import IssuerConfig
from .issuer_keys import IssuerKeys
from .jwks import KeySet
from .reasons import Reason
from .signatures import SIGNATURE_CHECKS
from .token import MalformedTokenError, parse_token


@dataclass(slots=True)
class VerifiedToken:
    """A token whose issuer is trusted and whose signature, or introspection, vouches for it."""

    issuer: IssuerConfig
    claims: dict[str, Any]
    # Allow responses rendered for these claims, per policy and front end.
    # See response.rendered_allow.
    rendered: dict[tuple[int, str], tuple[Any, Any]] = field(default_factory=dict)


class VerificationError(Exception):
    """The token failed a check, named by `reason`."""

    def __init__(self, reason: Reason, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


class WaitNeeded(Exception):
    """A network wait that the decision needs and that a caller on an event loop must not make.

    Raised only when the caller passed `may_wait=False`, before anything was
    counted or started. The caller decides the request again, with
    `may_wait=True`, on a thread that may block. `pool` names the kind of
    wait: KEYS_POOL for a key refetch, INTROSPECTION_POOL for an
    introspection request.
    """

    def __init__(self, pool: str) -> None:
        super().__init__(pool)
        self.pool = pool


# Kinds of network wait, each with a thread pool of its own, so that a slow
# introspection endpoint cannot delay tokens signed with a new key.
KEYS_POOL = "keys"
INTROSPECTION_POOL = "introspection"


@dataclass(slots=True)
class _CachedVerification:
    verified: VerifiedToken
    key_set: KeySet  # the key set object the signature was verified with


class VerifiedTokenCache:
    """Bounded LRU of tokens whose signature verified, keyed by a SHA-256 hash of the token.

    It stores verifications, never decisions: time, audience and policy checks
    run on every request. An entry is used only while its issuer still has
    the same KeySet object, so a key rotation, a removed key or stale keys
    end it. Only verified tokens enter, so garbage tokens cannot evict them.
    """

    def __init__(self, max_entries: int) -> None:
        self.max_entries = max_entries
        self._entries: OrderedDict[bytes, _CachedVerification] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, digest: bytes) -> _CachedVerification | None:
        with self._lock:
            entry = self._entries.get(digest)
            if entry is not None:
                self._entries.move_to_end(digest)
            return entry

    def put(self, digest: bytes, entry: _CachedVerification) -> None:
        with self._lock:
            self._entries[digest] = entry
            self._entries.move_to_end(digest)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)

    def discard(self, digest: bytes) -> None:
        with self._lock:
            self._entries.pop(digest, None)

    def __len__(self) -> int:
        return len(self._entries)


class Verifier:
    """Verifies bearer JWTs against the issuers a policy trusts."""

    def __init__(self, issuer_keys: Mapping[str, IssuerKeys], cache_size: int = 0) -> None:
        self._by_url = {keys.config.issuer: keys for keys in issuer_keys.values()}
        self._by_name = dict(issuer_keys)
        self.cache = VerifiedTokenCache(cache_size) if cache_size > 0 else None

    def verify(
        self, token: str, trusted_issuers: Sequence[str], may_wait: bool = True
    ) -> VerifiedToken:
        """Return the token's issuer and claims once its signature verifies.

        With `may_wait=False`, raise WaitNeeded instead of waiting for a key refetch.
        """
        if self.cache is None:
            return self._verify(token, trusted_issuers, may_wait)[0]

        digest = hashlib.sha256(token.encode()).digest()
        entry = self.cache.get(digest)
        if entry is not None:
            issuer = entry.verified.issuer
            keys = self._by_name.get(issuer.name)
            if keys is not None and keys.config is issuer and keys.keys is entry.key_set:
                if issuer.name not in trusted_issuers:
                    raise VerificationError(Reason.ISSUER_UNTRUSTED, "iss is not a trusted issuer")
                return entry.verified
            self.cache.discard(digest)

        verified, key_set = self._verify(token, trusted_issuers, may_wait)
        self.cache.put(digest, _CachedVerification(verified, key_set))
        return verified

    def _verify(
        self, token: str, trusted_issuers: Sequence[str], may_wait: bool
    ) -> tuple[VerifiedToken, KeySet]:
        """Verify the token; return it with the key set that verified its signature."""

        try:
            parsed = parse_token(token)
        except MalformedTokenError as error:
            raise VerificationError(Reason.TOKEN_MALFORMED, str(error)) from None

        # Choose the issuer by exact `iss`, among the ones this policy trusts.
        iss = parsed.claims.get("iss")
        keys = self._by_url.get(iss) if isinstance(iss, str) else None
        if keys is None or keys.config.name not in trusted_issuers:
            raise VerificationError(Reason.ISSUER_UNTRUSTED, "iss is not a trusted issuer")
        issuer = keys.config

        algorithm = parsed.algorithm
        if not isinstance(algorithm, str) or algorithm not in issuer.algorithms:
            raise VerificationError(
                Reason.ALGORITHM_NOT_ALLOWED, f"alg is not allowed for issuer {issuer.name}"
            )
        kid = parsed.kid
        if kid is not None and not isinstance(kid, str):
            raise VerificationError(Reason.TOKEN_MALFORMED, "kid is not a string")

        key_set = self._check_signature(
            keys, kid, algorithm, parsed.signing_input, parsed.signature, may_wait
        )
        return VerifiedToken(issuer=issuer, claims=parsed.claims), key_set

    def _check_signature(
        self,
        keys: IssuerKeys,
        kid: str | None,
        algorithm: str,
        signing_input: bytes,
        signature: bytes,
        may_wait: bool,
    ) -> KeySet:
        key_set = keys.keys
        if key_set is None or (kid is not None and not key_set.has_kid(kid)):
            # Unknown kid: the issuer may have rotated its keys since the last fetch.
            if not keys.refetch_for_unknown_kid(may_wait):
                raise WaitNeeded(KEYS_POOL)
            key_set = keys.keys
        if key_set is None:
            raise VerificationError(Reason.KEYS_UNAVAILABLE, "no usable key set for the issuer")

        candidates = key_set.candidates(kid, algorithm)
        if not candidates:
            raise VerificationError(Reason.KEY_NOT_FOUND, "no key matches the kid and alg")

        check = SIGNATURE_CHECKS[algorithm]
        for candidate in candidates:
            if check(signing_input, candidate.key, signature):
                return key_set
        raise VerificationError(Reason.SIGNATURE_INVALID, "the signature does not verify")
