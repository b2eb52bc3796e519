"""The device identity: a key made once, kept secret, surviving damage and power cuts."""

from __future__ import annotations

import hashlib
import stat
import threading
from pathlib import Path

import pytest

from fleet_core import durable
from signing.keys import load_private_key, load_public_key
from updater.identity import (
    ENROLLED_NAME,
    IdentityError,
    enrollment_token,
    forget_enrollment,
    identity_dir,
    load_enrollment,
    load_or_create_identity,
    save_enrollment,
)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_first_start_makes_a_secret_key_and_later_starts_keep_it(tmp_path: Path) -> None:
    identity, problem = load_or_create_identity(tmp_path)
    directory = identity_dir(tmp_path)
    assert problem is None
    assert mode(directory) == 0o700
    assert mode(directory / "device.pem") == 0o600
    raw = bytes.fromhex(identity.public_key_hex)
    assert len(raw) == 32 and identity.device_id == hashlib.sha256(raw).hexdigest()
    assert load_private_key(directory / "device.pem").key_id == identity.device_id
    public = load_public_key(directory / "device.pub")
    assert load_private_key(directory / "device.pem").public_key == public
    again, _ = load_or_create_identity(tmp_path)
    assert again.device_id == identity.device_id


def test_a_key_file_readable_by_others_is_made_secret_again(tmp_path: Path) -> None:
    identity, _ = load_or_create_identity(tmp_path)
    key = identity_dir(tmp_path) / "device.pem"
    key.chmod(0o644)
    again, _ = load_or_create_identity(tmp_path)
    assert again.device_id == identity.device_id and mode(key) == 0o600


def test_a_damaged_key_is_set_aside_and_replaced(tmp_path: Path) -> None:
    identity, _ = load_or_create_identity(tmp_path)
    key = identity_dir(tmp_path) / "device.pem"
    key.write_bytes(b"-----BEGIN PRIVATE KEY-----\ngarbage\n")
    fresh, problem = load_or_create_identity(tmp_path)
    assert fresh.device_id != identity.device_id
    assert problem is not None and "device.pem.damaged" in problem
    assert (key.parent / "device.pem.damaged").read_bytes().endswith(b"garbage\n")
    assert load_public_key(key.parent / "device.pub") == fresh.key.public_key


def test_an_unreadable_key_is_an_error_not_a_new_identity(tmp_path: Path) -> None:
    (identity_dir(tmp_path) / "device.pem").mkdir(parents=True)
    with pytest.raises(IdentityError, match="device identity"):
        load_or_create_identity(tmp_path)


def test_a_power_cut_while_making_the_key_leaves_no_key_and_the_next_start_makes_one(
    tmp_path: Path,
) -> None:
    class Cut(BaseException):
        pass

    def cut(point: str, path: Path) -> None:
        if point == "atomic:before-rename" and path.name == "device.pem":
            raise Cut

    previous = durable.set_boundary_hook(cut)
    try:
        with pytest.raises(Cut):
            load_or_create_identity(tmp_path)
    finally:
        durable.set_boundary_hook(previous)
    assert not (identity_dir(tmp_path) / "device.pem").exists()
    identity, problem = load_or_create_identity(tmp_path)
    assert problem is None and len(identity.device_id) == 64


def test_concurrent_first_starts_agree_on_one_key(tmp_path: Path) -> None:
    ids: list[str] = []
    threads = [
        threading.Thread(target=lambda: ids.append(load_or_create_identity(tmp_path)[0].device_id))
        for _ in range(4)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(set(ids)) == 1
    assert load_or_create_identity(tmp_path)[0].device_id == ids[0]


def test_enrollment_token_from_configuration_then_file(tmp_path: Path) -> None:
    assert enrollment_token(tmp_path, None) is None
    path = identity_dir(tmp_path) / "enrollment-token"
    path.parent.mkdir(parents=True)
    path.write_text("  from-file\n")
    assert enrollment_token(tmp_path, None) == "from-file"
    assert enrollment_token(tmp_path, "configured") == "configured"
    path.write_text("\n")
    assert enrollment_token(tmp_path, None) is None


def test_enrollment_record_round_trip(tmp_path: Path) -> None:
    identity, _ = load_or_create_identity(tmp_path)
    assert load_enrollment(tmp_path, identity.device_id) is None
    saved = save_enrollment(tmp_path, identity.device_id, "https://fleet", ("ab" * 32,))
    loaded = load_enrollment(tmp_path, identity.device_id)
    assert loaded == saved and loaded.server == "https://fleet"
    # a record of another key (the key was replaced) does not count: enroll again
    assert load_enrollment(tmp_path, "0" * 64) is None
    forget_enrollment(tmp_path)
    forget_enrollment(tmp_path)
    assert load_enrollment(tmp_path, identity.device_id) is None


@pytest.mark.parametrize(
    "content",
    [b"", b"not json", b"[]", b'{"format": 2}', b'{"format": 1, "device_id": "x", "server": "s"}'],
)
def test_a_damaged_enrollment_record_means_enroll_again(tmp_path: Path, content: bytes) -> None:
    identity, _ = load_or_create_identity(tmp_path)
    (identity_dir(tmp_path) / ENROLLED_NAME).write_bytes(content)
    assert load_enrollment(tmp_path, identity.device_id) is None
