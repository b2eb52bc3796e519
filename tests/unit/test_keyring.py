"""The keyring decides what is authentic: trust, revocation, threshold, rotation."""

from __future__ import annotations

import locale
from collections.abc import Iterator
from pathlib import Path

import pytest

from signing.errors import (
    BadSignatureError,
    KeyringError,
    RevokedKeyError,
    ThresholdError,
    UnknownKeyError,
)
from signing.keyring import Keyring, KeyringFiles, revoke_key, set_threshold, trust_key
from signing.keys import SigningKey, generate_key
from signing.signature import Signature, SignatureEnvelope, sign

PURPOSE = "bundle-manifest"
PAYLOAD = b'{"version":"1.0.0"}\n'


def new_key(tmp_path: Path, name: str) -> SigningKey:
    return generate_key(tmp_path / "keys" / name)


def ring(tmp_path: Path, name: str, *keys: str) -> Path:
    directory = tmp_path / name
    directory.mkdir(exist_ok=True)
    for key_name in keys:
        trust_key(directory, tmp_path / "keys" / f"{key_name}.pub")
    return directory


def test_valid_signature_by_trusted_key(tmp_path: Path) -> None:
    key = new_key(tmp_path, "a")
    keyring = Keyring.load(ring(tmp_path, "ring", "a"))
    verified = keyring.verify(PAYLOAD, sign(PAYLOAD, [key], PURPOSE), PURPOSE)
    assert verified.key_ids == (key.key_id,)


def test_wrong_key_names_the_key_id(tmp_path: Path) -> None:
    new_key(tmp_path, "trusted")
    stranger = new_key(tmp_path, "stranger")
    keyring = Keyring.load(ring(tmp_path, "ring", "trusted"))
    with pytest.raises(UnknownKeyError, match=stranger.key_id):
        keyring.verify(PAYLOAD, sign(PAYLOAD, [stranger], PURPOSE), PURPOSE)


def test_altered_payload_is_a_bad_signature(tmp_path: Path) -> None:
    key = new_key(tmp_path, "a")
    keyring = Keyring.load(ring(tmp_path, "ring", "a"))
    with pytest.raises(BadSignatureError, match=key.key_id):
        keyring.verify(PAYLOAD + b" ", sign(PAYLOAD, [key], PURPOSE), PURPOSE)


def test_signature_for_another_purpose_does_not_verify(tmp_path: Path) -> None:
    key = new_key(tmp_path, "a")
    keyring = Keyring.load(ring(tmp_path, "ring", "a"))
    with pytest.raises(BadSignatureError):
        keyring.verify(PAYLOAD, sign(PAYLOAD, [key], "assignment"), PURPOSE)


def test_bad_signature_by_trusted_key_fails_even_if_threshold_met(tmp_path: Path) -> None:
    a, b = new_key(tmp_path, "a"), new_key(tmp_path, "b")
    keyring = Keyring.load(ring(tmp_path, "ring", "a", "b"))
    good = sign(PAYLOAD, [a, b], PURPOSE)
    tampered = SignatureEnvelope(
        tuple(
            Signature(s.key_id, bytes(64)) if s.key_id == b.key_id else s for s in good.signatures
        )
    )
    with pytest.raises(BadSignatureError, match=b.key_id):
        keyring.verify(PAYLOAD, tampered, PURPOSE)


def test_revoked_key_never_counts(tmp_path: Path) -> None:
    key = new_key(tmp_path, "a")
    new_key(tmp_path, "b")
    directory = ring(tmp_path, "ring", "a", "b")
    revoke_key(directory, key.key_id)
    revoke_key(directory, key.key_id)  # twice is harmless
    keyring = Keyring.load(directory)
    assert key.key_id in keyring.revoked
    with pytest.raises(RevokedKeyError, match=key.key_id):
        keyring.verify(PAYLOAD, sign(PAYLOAD, [key], PURPOSE), PURPOSE)
    with pytest.raises(KeyringError, match="revoked"):
        trust_key(directory, tmp_path / "keys" / "a.pub")


def test_threshold_two_of_three(tmp_path: Path) -> None:
    a, b, _ = (new_key(tmp_path, n) for n in "abc")
    directory = ring(tmp_path, "ring", "a", "b", "c")
    set_threshold(directory, 2)
    keyring = Keyring.load(directory)
    assert keyring.threshold == 2
    with pytest.raises(ThresholdError, match="1 valid signature"):
        keyring.verify(PAYLOAD, sign(PAYLOAD, [a], PURPOSE), PURPOSE)
    assert len(keyring.verify(PAYLOAD, sign(PAYLOAD, [a, b], PURPOSE), PURPOSE).key_ids) == 2


def test_threshold_not_met_when_a_signer_is_unknown(tmp_path: Path) -> None:
    a = new_key(tmp_path, "a")
    new_key(tmp_path, "b")
    stranger = new_key(tmp_path, "stranger")
    directory = ring(tmp_path, "ring", "a", "b")
    set_threshold(directory, 2)
    with pytest.raises(ThresholdError):
        Keyring.load(directory).verify(PAYLOAD, sign(PAYLOAD, [a, stranger], PURPOSE), PURPOSE)


def test_threshold_above_usable_keys_is_refused(tmp_path: Path) -> None:
    a = new_key(tmp_path, "a")
    new_key(tmp_path, "b")
    directory = ring(tmp_path, "ring", "a", "b")
    with pytest.raises(KeyringError, match="threshold 3 but only 2"):
        set_threshold(directory, 3)
    set_threshold(directory, 2)
    # a revocation that breaks the threshold is refused (see below); written by hand, the
    # keyring refuses to load
    (directory / "revoked.txt").write_text(f"{a.key_id}\n")
    with pytest.raises(KeyringError, match="threshold 2 but only 1"):
        Keyring.load(directory)


def test_key_rotation_through_a_transition(tmp_path: Path) -> None:
    """Old key → both keys → new key, with devices that know either or both."""
    old, new = new_key(tmp_path, "old"), new_key(tmp_path, "new")
    device_old = Keyring.load(ring(tmp_path, "device-old", "old"))
    device_both = ring(tmp_path, "device-both", "old", "new")
    device_new = Keyring.load(ring(tmp_path, "device-new", "new"))

    # during the transition releases are signed by both keys: every device accepts them
    dual = sign(PAYLOAD, [old, new], PURPOSE)
    assert device_old.verify(PAYLOAD, dual, PURPOSE).key_ids == (old.key_id,)
    assert device_new.verify(PAYLOAD, dual, PURPOSE).key_ids == (new.key_id,)
    assert set(Keyring.load(device_both).verify(PAYLOAD, dual, PURPOSE).key_ids) == {
        old.key_id,
        new.key_id,
    }

    # a device that has moved to the new keyring still accepts new-only releases...
    new_only = sign(PAYLOAD, [new], PURPOSE)
    assert Keyring.load(device_both).verify(PAYLOAD, new_only, PURPOSE).key_ids == (new.key_id,)

    # ...and once the old key is revoked it refuses anything signed by the old key alone
    revoke_key(device_both, old.key_id)
    with pytest.raises(RevokedKeyError):
        Keyring.load(device_both).verify(PAYLOAD, sign(PAYLOAD, [old], PURPOSE), PURPOSE)
    assert Keyring.load(device_both).verify(PAYLOAD, dual, PURPOSE).key_ids == (new.key_id,)


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        (lambda d: (d / "bad.pub").write_text("not a key"), "bad.pub: not a PEM"),
        (lambda d: (d / "revoked.txt").write_text("# ok\nnot-a-key-id\n"), "line 2"),
        (lambda d: (d / "keyring.toml").write_text("threshold = [\n"), "keyring.toml"),
        (lambda d: (d / "keyring.toml").write_text('threshold = "2"\n'), "integer"),
        (lambda d: (d / "keyring.toml").write_text("threshold = 0\n"), "at least 1"),
        (
            lambda d: (d / "keyring.toml").write_text("treshold = 1\n"),
            r"keyring.toml: unknown setting treshold \(did you mean threshold\?\)$",
        ),
        (lambda d: (d / "revoked.txt").write_bytes(b"\xff\xfe"), "revoked.txt"),
    ],
)
def test_malformed_keyring_is_a_clear_error(tmp_path: Path, setup, message: str) -> None:  # type: ignore[no-untyped-def]
    new_key(tmp_path, "a")
    directory = ring(tmp_path, "ring", "a")
    setup(directory)
    with pytest.raises(KeyringError, match=message) as info:
        Keyring.load(directory)
    assert str(directory) in str(info.value)


def test_missing_or_empty_keyring(tmp_path: Path) -> None:
    with pytest.raises(KeyringError, match="no such directory"):
        Keyring.load(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(KeyringError, match="only 0 trusted"):
        Keyring.load(tmp_path / "empty")


def test_revocation_list_keeps_comments_and_is_rewritten_whole(tmp_path: Path) -> None:
    a = new_key(tmp_path, "a")
    new_key(tmp_path, "b")
    directory = ring(tmp_path, "ring", "a", "b")
    (directory / "revoked.txt").write_text("# leaked laptop, 2026-11")
    revoke_key(directory, a.key_id)
    text = (directory / "revoked.txt").read_text()
    assert text == f"# leaked laptop, 2026-11\n{a.key_id}\n"
    with pytest.raises(KeyringError, match="not a key id"):
        revoke_key(directory, "ABC")


def test_revoked_key_is_skipped_and_a_later_trusted_signature_still_counts(
    tmp_path: Path,
) -> None:
    a, b = new_key(tmp_path, "a"), new_key(tmp_path, "b")
    # the envelope lists signatures by key id: revoke the one listed first
    first, second = sorted([a, b], key=lambda k: k.key_id)
    directory = ring(tmp_path, "ring", "a", "b")
    revoke_key(directory, first.key_id)
    keyring = Keyring.load(directory)
    verified = keyring.verify(PAYLOAD, sign(PAYLOAD, [a, b], PURPOSE), PURPOSE)
    assert verified.key_ids == (second.key_id,)


def test_revocation_comments_may_contain_hashes(tmp_path: Path) -> None:
    a = new_key(tmp_path, "a")
    new_key(tmp_path, "b")
    directory = ring(tmp_path, "ring", "a", "b")
    (directory / "revoked.txt").write_text(f"{a.key_id}  # ticket #42: leaked\n")
    assert Keyring.load(directory).revoked == frozenset({a.key_id})


def test_revoking_appends_exactly_one_line(tmp_path: Path) -> None:
    a, b = new_key(tmp_path, "a"), new_key(tmp_path, "b")
    new_key(tmp_path, "c")
    directory = ring(tmp_path, "ring", "a", "b", "c")
    revoke_key(directory, a.key_id)
    assert (directory / "revoked.txt").read_text() == f"{a.key_id}\n"
    revoke_key(directory, b.key_id)
    assert (directory / "revoked.txt").read_text() == f"{a.key_id}\n{b.key_id}\n"


def test_revoking_in_a_missing_keyring_names_it(tmp_path: Path) -> None:
    with pytest.raises(KeyringError, match=r"keyring .*nope: no such directory"):
        revoke_key(tmp_path / "nope", "a" * 64)


def test_settings_file_without_a_threshold_means_one(tmp_path: Path) -> None:
    key = new_key(tmp_path, "a")
    directory = ring(tmp_path, "ring", "a")
    (directory / "keyring.toml").write_text("# no settings yet\n")
    keyring = Keyring.load(directory)
    assert keyring.threshold == 1
    assert keyring.verify(PAYLOAD, sign(PAYLOAD, [key], PURPOSE), PURPOSE).key_ids == (key.key_id,)


def test_too_high_threshold_names_the_keyring(tmp_path: Path) -> None:
    new_key(tmp_path, "a")
    directory = ring(tmp_path, "ring", "a")
    with pytest.raises(KeyringError, match="threshold 2 but only 1") as info:
        set_threshold(directory, 2)
    assert str(info.value).startswith(f"keyring {directory}: ")


def test_trust_creates_missing_parent_directories(tmp_path: Path) -> None:
    key = new_key(tmp_path, "a")
    directory = tmp_path / "etc" / "fleet" / "keyring"
    assert trust_key(directory, tmp_path / "keys" / "a.pub") == key.key_id
    assert Keyring.load(directory).active_key_ids == (key.key_id,)


@pytest.fixture
def ascii_locale() -> Iterator[None]:
    """A process whose locale encoding is not UTF-8 (ASCII under the C locale)."""
    previous = locale.setlocale(locale.LC_CTYPE)
    locale.setlocale(locale.LC_CTYPE, "C")
    try:
        assert locale.getencoding() != "utf-8"
        yield
    finally:
        locale.setlocale(locale.LC_CTYPE, previous)


def test_keyring_files_are_utf8_whatever_the_locale(tmp_path: Path, ascii_locale: None) -> None:
    a, b = new_key(tmp_path, "a"), new_key(tmp_path, "b")
    new_key(tmp_path, "c")  # still trusted once a and b are revoked
    directory = ring(tmp_path, "ring", "a", "b", "c")
    (directory / "keyring.toml").write_bytes("# Schlüssel\nthreshold = 1\n".encode())
    (directory / "revoked.txt").write_bytes(f"# clé perdue\n{a.key_id}\n".encode())
    assert Keyring.load(directory).revoked == frozenset({a.key_id})
    revoke_key(directory, b.key_id)
    assert (directory / "revoked.txt").read_bytes().decode() == (
        f"# clé perdue\n{a.key_id}\n{b.key_id}\n"
    )


def files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def test_revocation_below_the_threshold_is_refused_and_writes_nothing(tmp_path: Path) -> None:
    a = new_key(tmp_path, "a")
    new_key(tmp_path, "b")
    directory = ring(tmp_path, "ring", "a", "b")
    set_threshold(directory, 2)
    before = files(directory)
    with pytest.raises(KeyringError) as info:
        revoke_key(directory, a.key_id)
    message = str(info.value)
    assert message.startswith(f"keyring {directory}: revoking {a.key_id} would leave 1 ")
    assert "below the threshold 2" in message
    assert "fleet keys threshold 1" in message and "trust another key" in message
    assert files(directory) == before
    assert Keyring.load(directory).revoked == frozenset()


@pytest.mark.parametrize("way_out", ["lower the threshold", "trust another key"])
def test_revocation_below_the_threshold_goes_through_after_the_way_out(
    tmp_path: Path, way_out: str
) -> None:
    a, b = new_key(tmp_path, "a"), new_key(tmp_path, "b")
    new_key(tmp_path, "c")
    directory = ring(tmp_path, "ring", "a", "b")
    set_threshold(directory, 2)
    if way_out == "lower the threshold":
        set_threshold(directory, 1)
    else:
        trust_key(directory, tmp_path / "keys" / "c.pub")
    revoke_key(directory, a.key_id)
    keyring = Keyring.load(directory)
    assert a.key_id in keyring.revoked and b.key_id in keyring.active_key_ids


def test_revoking_the_last_trusted_key_names_only_trusting_another(tmp_path: Path) -> None:
    a = new_key(tmp_path, "a")
    directory = ring(tmp_path, "ring", "a")
    with pytest.raises(KeyringError, match="would leave 0 trusted key") as info:
        revoke_key(directory, a.key_id)
    assert "trust another key" in str(info.value)
    assert "fleet keys threshold" not in str(info.value)  # no threshold below 1 exists
    assert not (directory / "revoked.txt").exists()


def test_a_key_not_trusted_here_can_be_revoked_ahead_at_the_threshold(tmp_path: Path) -> None:
    new_key(tmp_path, "a")
    new_key(tmp_path, "b")
    stranger = new_key(tmp_path, "stranger")
    directory = ring(tmp_path, "ring", "a", "b")
    set_threshold(directory, 2)
    revoke_key(directory, stranger.key_id)
    assert Keyring.load(directory).revoked == frozenset({stranger.key_id})
    with pytest.raises(KeyringError, match="revoked"):
        trust_key(directory, tmp_path / "keys" / "stranger.pub")


def test_a_keyring_being_prepared_can_revoke_before_it_trusts(tmp_path: Path) -> None:
    leaked = new_key(tmp_path, "leaked")
    new_key(tmp_path, "a")
    directory = tmp_path / "ring"
    directory.mkdir()  # no key trusted yet: below any threshold, and no worse for this
    revoke_key(directory, leaked.key_id)
    trust_key(directory, tmp_path / "keys" / "a.pub")
    assert Keyring.load(directory).revoked == frozenset({leaked.key_id})


def test_threshold_above_the_keys_left_after_revocation_is_refused(tmp_path: Path) -> None:
    a = new_key(tmp_path, "a")
    new_key(tmp_path, "b")
    new_key(tmp_path, "c")
    directory = ring(tmp_path, "ring", "a", "b", "c")
    set_threshold(directory, 2)
    revoke_key(directory, a.key_id)
    before = files(directory)
    with pytest.raises(KeyringError, match="threshold 3 but only 2 trusted key"):
        set_threshold(directory, 3)
    assert files(directory) == before
    assert Keyring.load(directory).threshold == 2


def below_its_threshold(tmp_path: Path) -> tuple[Path, list[SigningKey]]:
    """A keyring of three keys, threshold 2, two of them revoked by hand (as an older version
    racing two revocations could leave it): it verifies nothing."""
    keys = [new_key(tmp_path, name) for name in ("a", "b", "c")]
    directory = ring(tmp_path, "ring", "a", "b", "c")
    set_threshold(directory, 2)
    (directory / "revoked.txt").write_text(f"{keys[0].key_id}\n{keys[1].key_id}\n")
    return directory, keys


def test_a_keyring_below_its_threshold_fails_closed_and_lowering_it_repairs_it(
    tmp_path: Path,
) -> None:
    directory, keys = below_its_threshold(tmp_path)
    with pytest.raises(KeyringError, match="threshold 2 but only 1 trusted key"):
        Keyring.load(directory)
    files_read = KeyringFiles.read(directory)
    assert files_read.threshold == 2 and files_read.revoked == {keys[0].key_id, keys[1].key_id}
    problem = files_read.problem()
    assert problem is not None and "fleet keys threshold 1" in problem

    with pytest.raises(KeyringError, match="threshold 2 but only 1 trusted key"):
        set_threshold(directory, 2)  # the new value is checked: still too high
    set_threshold(directory, 1)
    keyring = Keyring.load(directory)
    assert keyring.threshold == 1 and keyring.active_key_ids == (keys[2].key_id,)
    assert KeyringFiles.read(directory).problem() is None
    signed = sign(PAYLOAD, [keys[2]], PURPOSE)
    assert keyring.verify(PAYLOAD, signed, PURPOSE).key_ids == (keys[2].key_id,)


def test_trusting_into_a_keyring_that_is_a_file_is_refused_and_leaves_it(tmp_path: Path) -> None:
    new_key(tmp_path, "a")
    not_a_ring = tmp_path / "release.pem"
    not_a_ring.write_bytes(b"precious")
    for change in (
        lambda: trust_key(not_a_ring, tmp_path / "keys" / "a.pub"),
        lambda: revoke_key(not_a_ring, "0" * 64),
        lambda: set_threshold(not_a_ring, 1),
    ):
        with pytest.raises(KeyringError, match="not a directory"):
            change()
    assert not_a_ring.read_bytes() == b"precious"
