"""The public keys a device trusts, published without credentials: the server's answer-signing
key, and the release keyring as the server reads it (revocations and threshold applied)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from signing.keyring import revoke_key, set_threshold, trust_key
from signing.keys import SigningKey, generate_key, key_id, load_public_key
from tests.server.conftest import Harness


def _pem_id(text: str, tmp_path: Path) -> str:
    path = tmp_path / "fetched.pub"
    path.write_text(text)
    return key_id(load_public_key(path))


def test_the_server_key_is_the_one_answers_are_signed_with(
    harness: Harness, tmp_path: Path
) -> None:
    answer = harness.client.get("/api/v1/keys/server")
    assert answer.status_code == 200, answer.text
    (published,) = answer.json()["keys"]
    server_key = harness.app.state.fleet.server_key
    assert published["key_id"] == server_key.key_id
    assert _pem_id(published["public_key"], tmp_path) == server_key.key_id


def test_the_release_keyring_as_the_server_reads_it(
    harness: Harness, key: SigningKey, tmp_path: Path
) -> None:
    keyring = harness.settings.keyring_dir
    second, third = generate_key(tmp_path / "second"), generate_key(tmp_path / "third")
    trust_key(keyring, tmp_path / "second.pub")
    trust_key(keyring, tmp_path / "third.pub")
    revoke_key(keyring, third.key_id)
    set_threshold(keyring, 2)
    answer = harness.client.get("/api/v1/keys/release")
    assert answer.status_code == 200, answer.text
    document = answer.json()
    assert document["threshold"] == 2
    published = {k["key_id"]: _pem_id(k["public_key"], tmp_path) for k in document["keys"]}
    assert published == {key.key_id: key.key_id, second.key_id: second.key_id}


def test_an_unusable_release_keyring_is_a_503_that_tells_nobody_where_it_is(
    harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    """Served without credentials: the fix (with the keyring's path) goes to the log only."""
    shutil.rmtree(harness.settings.keyring_dir)
    harness.settings.keyring_dir.mkdir()
    with caplog.at_level("WARNING", logger="server"):
        answer = harness.client.get("/api/v1/keys/release")
    assert answer.status_code == 503
    assert answer.json()["error"] == "keyring_unusable"
    assert "operator must trust a release key" in answer.json()["detail"]
    assert str(harness.settings.data_dir) not in answer.text
    assert f"fleet keys trust --keyring {harness.settings.keyring_dir}" in caplog.text
