"""Property-based fuzzing of the Check servicer with hypothesis.

For any request and any token: the servicer returns a CheckResponse, never
raises and never reaches internal_error, and it allows only tokens whose
signature verifies with the issuer's key.
"""

from __future__ import annotations

import base64
from collections.abc import Iterator

import jwt
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ext_authz.api.envoy.service.auth.v3.external_auth_pb2 import CheckRequest, CheckResponse

from .support import IssuerServer, SigningKey, claims_for, running_issuer
from .test_check import Harness

AUDIENCE = "Amplify Central"
SEGMENT_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_=+/!. \t"


@pytest.fixture(scope="module")
def fuzz_key() -> SigningKey:
    return SigningKey.rsa("k1")


@pytest.fixture(scope="module")
def fuzz_issuer(fuzz_key: SigningKey) -> Iterator[IssuerServer]:
    with running_issuer(IssuerServer(keys=[fuzz_key])) as server:
        yield server


@pytest.fixture(scope="module")
def harness(fuzz_issuer: IssuerServer) -> Harness:
    return Harness(
        {
            "issuers": [
                {
                    "name": "local",
                    "issuer": fuzz_issuer.url,
                    "audiences": [AUDIENCE],
                    "allow_insecure_http": True,
                    # Random kids must not turn the fuzz run into a fetch storm.
                    "jwks_min_refetch_seconds": 3600,
                }
            ],
            "policies": [{"name": "default", "issuers": ["local"]}],
        }
    )


@pytest.fixture(scope="module")
def valid_token(fuzz_issuer: IssuerServer, fuzz_key: SigningKey) -> str:
    return fuzz_key.sign(claims_for(fuzz_issuer.url, exp=4_000_000_000))


def check_invariants(
    response: CheckResponse, token: str | None, issuer: IssuerServer, key: SigningKey
) -> None:
    assert isinstance(response, CheckResponse)
    assert response.status.message != "internal_error"
    if response.status.code == 0:
        # An allow is only right for a token whose signature verifies.
        assert token is not None
        jwt.decode(
            token.strip().split(" ")[-1],
            key.private_key.public_key(),
            algorithms=["RS256"],
            audience=AUDIENCE,
            issuer=issuer.url,
        )


segments = st.text(alphabet=SEGMENT_ALPHABET, max_size=60)
json_segments = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
).map(lambda value: base64.urlsafe_b64encode(repr(value).encode()).rstrip(b"=").decode())
tokens = st.one_of(
    st.text(max_size=200),
    st.lists(segments | json_segments, min_size=1, max_size=6).map(".".join),
)


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(token=tokens, scheme=st.sampled_from(["Bearer ", "bearer  ", "Basic ", "", "Bearer"]))
def test_arbitrary_tokens(
    harness: Harness, fuzz_issuer: IssuerServer, fuzz_key: SigningKey, token: str, scheme: str
):
    response = harness.check(f"{scheme}{token}")
    check_invariants(response, token, fuzz_issuer, fuzz_key)


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(position=st.integers(min_value=0), replacement=st.sampled_from(SEGMENT_ALPHABET))
def test_mutated_valid_tokens(
    harness: Harness,
    fuzz_issuer: IssuerServer,
    fuzz_key: SigningKey,
    valid_token: str,
    position: int,
    replacement: str,
):
    index = position % len(valid_token)
    mutated = valid_token[:index] + replacement + valid_token[index + 1 :]

    response = harness.check(f"Bearer {mutated}")

    check_invariants(response, mutated, fuzz_issuer, fuzz_key)
    if mutated != valid_token:
        assert response.status.code != 0


@settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    headers=st.dictionaries(st.text(max_size=30), st.text(max_size=60), max_size=20),
    extensions=st.dictionaries(st.text(max_size=20), st.text(max_size=20), max_size=5),
    path=st.text(max_size=100),
    method=st.text(max_size=10),
    with_valid_token=st.booleans(),
)
def test_arbitrary_requests(
    harness: Harness,
    fuzz_issuer: IssuerServer,
    fuzz_key: SigningKey,
    valid_token: str,
    headers: dict[str, str],
    extensions: dict[str, str],
    path: str,
    method: str,
    with_valid_token: bool,
):
    request = CheckRequest()
    http = request.attributes.request.http
    http.headers.update(headers)
    http.path = path
    http.method = method
    request.attributes.context_extensions.update(extensions)
    if with_valid_token:
        http.headers["authorization"] = f"Bearer {valid_token}"

    response = harness.service.Check(request, None)  # type: ignore[arg-type]

    sent = http.headers.get("authorization")
    check_invariants(response, sent, fuzz_issuer, fuzz_key)
