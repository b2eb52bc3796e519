"""Filesystem images built with the real tools, read back with the real tools.

The tools (mke2fs, debugfs, e2fsck, mksquashfs, unsquashfs, mkfs.vfat, mtools) are required:
without them these tests fail rather than skip.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from image_builder.errors import ImageBuildError
from image_builder.filesystem import (
    FILESYSTEM_TYPES,
    MIN_EPOCH,
    FilesystemImage,
    build_filesystem_image,
    parse_size,
)

EPOCH = 1_700_000_000
MIB = 1 << 20
MTOOLS_ENV = {**os.environ, "MTOOLS_SKIP_CHECK": "1", "LC_ALL": "C.UTF-8"}

# The tree every type must carry: nested directories, an empty file, a name with spaces, a
# file large enough to span several blocks.
CONTENT: dict[str, bytes] = {
    "config.txt": b"arm_64bit=1\n",
    "empty": b"",
    "with space.txt": b"spaces survive\n",
    "etc/hostname": b"camera-0042\n",
    "etc/sub/deeper/leaf.bin": bytes(range(256)) * 64,
    "lib/blob.bin": os.urandom(70_000),
}
SYMLINK = ("link", "etc/hostname")  # ext4 and squashfs only


def make_tree(
    root: Path, *, reverse: bool = False, mtime_ns: int = 0, symlink: bool = True
) -> Path:
    """Write CONTENT below ``root`` in the given order, all with the given mtime."""
    root.mkdir(parents=True)
    names = sorted(CONTENT, reverse=reverse)
    for name in names:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(CONTENT[name])
    if symlink:
        (root / SYMLINK[0]).symlink_to(SYMLINK[1])
    for path in sorted(root.rglob("*"), reverse=True):
        os.utime(path, ns=(mtime_ns, mtime_ns), follow_symlinks=False)
    os.utime(root, ns=(mtime_ns, mtime_ns))
    return root


def wait_for_next_second() -> None:
    """Sleep until the wall clock's second changes, so that new ctimes differ from old ones."""
    start = int(time.time())
    while int(time.time()) == start:
        time.sleep(0.02)


def run(*argv: str, env: dict[str, str] | None = None) -> bytes:
    return subprocess.run(argv, check=True, capture_output=True, env=env).stdout


def debugfs(image: Path, request: str) -> str:
    return run("debugfs", "-R", request, str(image)).decode()


def debugfs_cat(image: Path, name: str) -> bytes:
    return run("debugfs", "-R", f'cat "/{name}"', str(image))


def mtype(image: Path, name: str) -> bytes:
    return run("mtype", "-i", str(image), f"::/{name}", env=MTOOLS_ENV)


def build_kwargs(fs_type: str) -> dict[str, Any]:
    return {
        "ext4": {"size_bytes": 16 * MIB, "label": "rootfs"},
        "squashfs": {},
        "vfat": {"size_bytes": 4 * MIB, "label": "BOOTFS"},
    }[fs_type]


def no_leftovers(directory: Path) -> bool:
    return not [p for p in directory.iterdir() if p.name.endswith(".tmp")]


@pytest.fixture(scope="module")
def twin_trees(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    """Per symlink flavour, two trees with the same content, made apart in time and order."""
    base = tmp_path_factory.mktemp("twins")
    first = {
        flavour: make_tree(base / f"{flavour}-1", mtime_ns=1_111_111_111_123_456_789, symlink=link)
        for flavour, link in (("posix", True), ("fat", False))
    }
    # Distinct ctimes too, which no one can set and mke2fs copies.
    wait_for_next_second()
    second = {
        flavour: make_tree(
            base / f"{flavour}-2", reverse=True, mtime_ns=1_500_000_000_987_654_321, symlink=link
        )
        for flavour, link in (("posix", True), ("fat", False))
    }
    for flavour in ("posix", "fat"):
        # Owned by someone else in one tree only: the image must say root either way.
        os.chown(second[flavour] / "etc/hostname", 1234, 100_000)
    return {flavour: (first[flavour], second[flavour]) for flavour in first}


def trees_for(fs_type: str, twin_trees: dict[str, tuple[Path, Path]]) -> tuple[Path, Path]:
    return twin_trees["fat" if fs_type == "vfat" else "posix"]


@pytest.fixture
def tree(tmp_path: Path) -> Callable[..., Path]:
    def make(name: str = "src", **kwargs: bool) -> Path:
        return make_tree(tmp_path / name, **kwargs)

    return make


# --- parse_size -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("4096", 4096),
        ("64K", 64 * 1024),
        ("512M", 512 * MIB),
        ("1G", 1 << 30),
        ("2GiB", 2 << 30),
        ("8mib", 8 * MIB),
        ("1T", 1 << 40),
        (" 16 MiB ", 16 * MIB),
        ("100B", 100),
        # as written: decimal with B and no i, as disk makers write sizes
        (" 16 MB ", 16_000_000),
        ("4kb", 4000),
        ("2GB", 2_000_000_000),
        ("1TB", 10**12),
        ("3Gi", 3 << 30),  # as Kubernetes writes it
    ],
)
def test_parse_size_takes_units_as_written(text: str, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize(
    "text", ["", "abc", "1.5G", "12Q", "G", "1 2M", "0x10", "1GiBB", "1iB", "٣M"]
)
def test_parse_size_rejects_garbage(text: str) -> None:
    with pytest.raises(ValueError, match="not a size"):
        parse_size(text)


@pytest.mark.parametrize("text", ["0", "0M", "-1", "-64K"])
def test_parse_size_rejects_zero_and_negative(text: str) -> None:
    with pytest.raises(ValueError, match="must be positive"):
        parse_size(text)


# --- each type builds and reads back --------------------------------------------------------


def test_registry_lists_the_three_types() -> None:
    assert sorted(FILESYSTEM_TYPES) == ["ext4", "squashfs", "vfat"]


def test_ext4_content_reads_back(tree: Callable[..., Path], tmp_path: Path) -> None:
    source = tree()
    os.link(source / "config.txt", source / "hardlink.txt")
    os.chown(source / "lib/blob.bin", 4321, 4321)
    image = build_filesystem_image(
        source,
        tmp_path / "root.ext4",
        "ext4",
        size_bytes=16 * MIB,
        label="rootfs",
        source_date_epoch=EPOCH,
    )
    assert image == FilesystemImage(tmp_path / "root.ext4", "ext4", 16 * MIB, "rootfs")
    assert image.path.stat().st_size == 16 * MIB
    for name, data in CONTENT.items():
        assert debugfs_cat(image.path, name) == data, name
    assert debugfs_cat(image.path, "hardlink.txt") == CONTENT["config.txt"]
    assert "Links: 2" in debugfs(image.path, "stat /config.txt")
    assert 'Fast link dest: "etc/hostname"' in debugfs(image.path, "stat /link")
    blob = debugfs(image.path, "stat /lib/blob.bin")
    assert "User:     0   Group:     0" in blob
    assert f"mtime: {EPOCH:#010x}:00000000" in blob
    assert f"ctime: {EPOCH:#010x}:00000000" in blob
    assert "Filesystem volume name:   rootfs" in run("dumpe2fs", "-h", str(image.path)).decode()
    run("e2fsck", "-fn", str(image.path))


def test_squashfs_content_reads_back(tree: Callable[..., Path], tmp_path: Path) -> None:
    source = tree()
    os.chown(source / "lib/blob.bin", 4321, 4321)
    image = build_filesystem_image(
        source, tmp_path / "safe.squashfs", "squashfs", source_date_epoch=EPOCH
    )
    assert image.fs_type == "squashfs" and image.label is None
    assert image.size_bytes == image.path.stat().st_size
    assert image.size_bytes % 4096 == 0
    for name, data in CONTENT.items():
        assert run("unsquashfs", "-cat", str(image.path), name) == data, name
    listing = run("unsquashfs", "-lln", "-UTC", str(image.path)).decode()
    assert "squashfs-root/link -> etc/hostname" in listing
    assert "squashfs-root/with space.txt" in listing
    owners = {line.split()[1] for line in listing.splitlines() if line.startswith(("-", "d", "l"))}
    assert owners == {"0/0"}
    assert "2023-11-14 22:13" in listing  # EPOCH in UTC


def test_vfat_content_reads_back(tree: Callable[..., Path], tmp_path: Path) -> None:
    source = tree(symlink=False)
    image = build_filesystem_image(
        source,
        tmp_path / "boot.vfat",
        "vfat",
        size_bytes=4 * MIB,
        label="BOOTFS",
        source_date_epoch=EPOCH,
    )
    assert image == FilesystemImage(tmp_path / "boot.vfat", "vfat", 4 * MIB, "BOOTFS")
    for name, data in CONTENT.items():
        assert mtype(image.path, name) == data, name
    root = run("mdir", "-i", str(image.path), "::/", env=MTOOLS_ENV).decode()
    assert "BOOTFS" in root
    assert "with space.txt" in root
    assert "2023-11-14" in root  # EPOCH as the date of every entry
    run("fsck.vfat", "-n", str(image.path))


def test_vfat_date_is_never_before_1980(tree: Callable[..., Path], tmp_path: Path) -> None:
    image = build_filesystem_image(
        tree(symlink=False),
        tmp_path / "boot.vfat",
        "vfat",
        size_bytes=4 * MIB,
        source_date_epoch=0,
    )
    listing = run("mdir", "-i", str(image.path), "::/etc", env=MTOOLS_ENV).decode()
    assert "1980-01-01" in listing


# --- reproducibility ------------------------------------------------------------------------


@pytest.mark.parametrize("fs_type", sorted(FILESYSTEM_TYPES))
def test_same_content_gives_identical_bytes(
    fs_type: str, twin_trees: dict[str, tuple[Path, Path]], tmp_path: Path
) -> None:
    first, second = trees_for(fs_type, twin_trees)
    kwargs = build_kwargs(fs_type)
    a = build_filesystem_image(first, tmp_path / "a", fs_type, source_date_epoch=EPOCH, **kwargs)
    b = build_filesystem_image(second, tmp_path / "b", fs_type, source_date_epoch=EPOCH, **kwargs)
    assert a.path.read_bytes() == b.path.read_bytes()


@pytest.mark.parametrize("fs_type", sorted(FILESYSTEM_TYPES))
def test_default_epoch_is_reproducible_and_epoch_matters(
    fs_type: str,
    twin_trees: dict[str, tuple[Path, Path]],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    first, second = trees_for(fs_type, twin_trees)
    kwargs = build_kwargs(fs_type)
    monkeypatch.delenv("SOURCE_DATE_EPOCH", raising=False)
    a = build_filesystem_image(first, tmp_path / "a", fs_type, **kwargs)
    b = build_filesystem_image(second, tmp_path / "b", fs_type, **kwargs)
    explicit = build_filesystem_image(
        first, tmp_path / "c", fs_type, source_date_epoch=MIN_EPOCH, **kwargs
    )
    monkeypatch.setenv("SOURCE_DATE_EPOCH", str(EPOCH))
    from_env = build_filesystem_image(first, tmp_path / "d", fs_type, **kwargs)
    later = build_filesystem_image(
        first, tmp_path / "e", fs_type, source_date_epoch=EPOCH, **kwargs
    )
    assert a.path.read_bytes() == b.path.read_bytes() == explicit.path.read_bytes()
    assert from_env.path.read_bytes() == later.path.read_bytes()
    assert a.path.read_bytes() != later.path.read_bytes()


def test_bad_source_date_epoch_in_environment_is_rejected(
    tree: Callable[..., Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "yesterday")
    with pytest.raises(ImageBuildError, match="SOURCE_DATE_EPOCH is not a number"):
        build_filesystem_image(tree(), tmp_path / "x.sqfs", "squashfs")
    with pytest.raises(ImageBuildError, match="outside"):
        build_filesystem_image(tree("s2"), tmp_path / "x.sqfs", "squashfs", source_date_epoch=-1)


# --- too small, failures leave nothing behind -----------------------------------------------


@pytest.fixture
def big_tree(tmp_path: Path) -> Path:
    source = tmp_path / "big"
    source.mkdir()
    (source / "payload.bin").write_bytes(os.urandom(3 * MIB))
    return source


@pytest.mark.parametrize(
    ("fs_type", "size"),
    [("ext4", 2 * MIB), ("vfat", 2 * MIB), ("squashfs", 1 * MIB)],
)
def test_too_small_fails_and_leaves_no_output(
    fs_type: str, size: int, big_tree: Path, tmp_path: Path
) -> None:
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    output = out_dir / "image"
    with pytest.raises(ImageBuildError) as caught:
        build_filesystem_image(big_tree, output, fs_type, size_bytes=size)
    message = str(caught.value)
    assert str(size) in message and str(output) in message
    assert "3145728" in message or fs_type == "squashfs"
    assert list(out_dir.iterdir()) == []


def test_vfat_metadata_overflow_is_reported_as_too_small(tmp_path: Path) -> None:
    source = tmp_path / "many"
    source.mkdir()
    for index in range(40):
        (source / f"file-{index:02}.bin").write_bytes(os.urandom(20_000))  # 800 kB of data
    with pytest.raises(ImageBuildError, match="does not fit in 819200 bytes"):
        build_filesystem_image(source, tmp_path / "boot.vfat", "vfat", size_bytes=819_200)
    assert not (tmp_path / "boot.vfat").exists()
    assert no_leftovers(tmp_path)


@pytest.mark.parametrize("fs_type", sorted(FILESYSTEM_TYPES))
def test_failed_build_keeps_the_old_output(fs_type: str, big_tree: Path, tmp_path: Path) -> None:
    output = tmp_path / "image"
    output.write_bytes(b"the previous image")
    with pytest.raises(ImageBuildError):
        build_filesystem_image(big_tree, output, fs_type, size_bytes=1 * MIB)
    assert output.read_bytes() == b"the previous image"
    assert no_leftovers(tmp_path)


def test_successful_build_replaces_the_old_output(
    tree: Callable[..., Path], tmp_path: Path
) -> None:
    output = tmp_path / "image"
    output.write_bytes(b"the previous image")
    build_filesystem_image(tree(), output, "squashfs")
    assert run("unsquashfs", "-cat", str(output), "config.txt") == CONTENT["config.txt"]


# --- rejected input -------------------------------------------------------------------------


def test_missing_source_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ImageBuildError, match="does not exist"):
        build_filesystem_image(tmp_path / "nope", tmp_path / "x", "squashfs")


def test_source_that_is_a_file_is_rejected(tmp_path: Path) -> None:
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(ImageBuildError, match="is not a directory"):
        build_filesystem_image(tmp_path / "file", tmp_path / "x", "squashfs")


def test_output_inside_source_is_rejected(tree: Callable[..., Path]) -> None:
    source = tree()
    with pytest.raises(ImageBuildError, match="inside the source directory"):
        build_filesystem_image(source / "etc", source / "etc" / "sub" / "img", "squashfs")
    with pytest.raises(ImageBuildError, match="inside the source directory"):
        build_filesystem_image(source, source / "etc" / "rootfs.ext4", "ext4", size_bytes=MIB)
    assert not (source / "etc" / "rootfs.ext4").exists()


def test_unknown_type_is_rejected(tree: Callable[..., Path], tmp_path: Path) -> None:
    with pytest.raises(ImageBuildError, match=r"unknown filesystem type 'btrfs' \(known: ext4"):
        build_filesystem_image(tree(), tmp_path / "x", "btrfs")


@pytest.mark.parametrize("fs_type", ["ext4", "vfat"])
def test_size_is_required(fs_type: str, tree: Callable[..., Path], tmp_path: Path) -> None:
    with pytest.raises(ImageBuildError, match="a size is required"):
        build_filesystem_image(tree(symlink=False), tmp_path / "x", fs_type)
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize(("fs_type", "size"), [("ext4", 4 * MIB + 512), ("vfat", 4 * MIB + 1)])
def test_misaligned_size_is_rejected(
    fs_type: str, size: int, tree: Callable[..., Path], tmp_path: Path
) -> None:
    with pytest.raises(ImageBuildError, match="not a multiple of"):
        build_filesystem_image(tree(symlink=False), tmp_path / "x", fs_type, size_bytes=size)


def test_labels_are_checked(tree: Callable[..., Path], tmp_path: Path) -> None:
    source = tree(symlink=False)
    with pytest.raises(ImageBuildError, match="squashfs has no volume label"):
        build_filesystem_image(source, tmp_path / "x", "squashfs", label="safe")
    with pytest.raises(ImageBuildError, match="not a FAT label"):
        build_filesystem_image(source, tmp_path / "x", "vfat", size_bytes=4 * MIB, label="B" * 12)
    with pytest.raises(ImageBuildError, match="longer than 16 bytes"):
        build_filesystem_image(source, tmp_path / "x", "ext4", size_bytes=8 * MIB, label="r" * 17)
    assert not (tmp_path / "x").exists()


def test_vfat_rejects_a_symlink_naming_it(tree: Callable[..., Path], tmp_path: Path) -> None:
    source = tree(symlink=True)
    with pytest.raises(ImageBuildError, match=f"FAT cannot hold the symlink {source}/link$"):
        build_filesystem_image(source, tmp_path / "boot.vfat", "vfat", size_bytes=4 * MIB)
    assert not (tmp_path / "boot.vfat").exists()


def test_vfat_rejects_special_files(tree: Callable[..., Path], tmp_path: Path) -> None:
    source = tree(symlink=False)
    os.mkfifo(source / "etc" / "pipe")
    with pytest.raises(ImageBuildError, match=f"special file {source}/etc/pipe$"):
        build_filesystem_image(source, tmp_path / "boot.vfat", "vfat", size_bytes=4 * MIB)


def test_vfat_rejects_names_that_differ_only_in_case(
    tree: Callable[..., Path], tmp_path: Path
) -> None:
    source = tree(symlink=False)
    (source / "Config.TXT").write_bytes(b"")
    with pytest.raises(ImageBuildError, match="case-insensitive"):
        build_filesystem_image(source, tmp_path / "boot.vfat", "vfat", size_bytes=4 * MIB)


def test_vfat_rejects_names_fat_forbids(tree: Callable[..., Path], tmp_path: Path) -> None:
    source = tree(symlink=False)
    (source / "what?").write_bytes(b"")
    with pytest.raises(ImageBuildError, match="FAT cannot hold the file name"):
        build_filesystem_image(source, tmp_path / "boot.vfat", "vfat", size_bytes=4 * MIB)


def test_vfat_copies_many_files_in_one_directory(tmp_path: Path) -> None:
    # More files than fit in one mcopy call, to cross the argument chunking.
    source = tmp_path / "overlays"
    source.mkdir()
    for index in range(600):
        (source / f"overlay-{index:03}.dtbo").write_bytes(index.to_bytes(2, "big"))
    image = build_filesystem_image(source, tmp_path / "boot.vfat", "vfat", size_bytes=8 * MIB)
    assert mtype(image.path, "overlay-599.dtbo") == (599).to_bytes(2, "big")
    listing = run("mdir", "-b", "-i", str(image.path), "::/", env=MTOOLS_ENV).decode()
    assert len(listing.split()) == 600


@pytest.fixture(autouse=True)
def _no_source_date_epoch_leak(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    # The builds above must not depend on whatever SOURCE_DATE_EPOCH the CI sets.
    monkeypatch.delenv("SOURCE_DATE_EPOCH", raising=False)
    yield
