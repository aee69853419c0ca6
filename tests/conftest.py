from __future__ import annotations

from collections.abc import Iterator

import pytest

from .support import IssuerServer, SigningKey, running_issuer


@pytest.fixture(scope="session")
def rsa_key() -> SigningKey:
    return SigningKey.rsa("k1")


@pytest.fixture(scope="session")
def ec_key() -> SigningKey:
    return SigningKey.ec("e1")


@pytest.fixture
def issuer_server(rsa_key: SigningKey, ec_key: SigningKey) -> Iterator[IssuerServer]:
    with running_issuer(IssuerServer(keys=[rsa_key, ec_key])) as server:
        yield server
