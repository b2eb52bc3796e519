"""Fixtures of the daemon's tests: the server simulator and the key it signs answers with."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from signing.keys import SigningKey, generate_key
from tests.server_simulator import ServerSimulator

ADMISSION = "lab-token"  # the enrollment token the lab's devices are provisioned with


@pytest.fixture(scope="module")
def server_key(tmp_path_factory: pytest.TempPathFactory) -> SigningKey:
    return generate_key(tmp_path_factory.mktemp("server-key") / "server")


@pytest.fixture
def server(server_key: SigningKey) -> Iterator[ServerSimulator]:
    with ServerSimulator(server_key) as simulator:
        simulator.add_token(ADMISSION, uses=10)
        yield simulator
