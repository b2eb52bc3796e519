"""An output option never destroys one of the command's inputs, and an output that is no file
to write (a directory, a missing directory, a FIFO) is one ``Error:`` line; sizes beyond what
an image can take are refused naming the limit. Everything here is refused before any tool
runs, so it runs in process."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from fleet_core.cli import fleet
from fleet_core.outputs import OutputPathError, refuse_output_over_inputs
from signing.keys import generate_key
from tests.conftest import assert_one_line_error


def invoke(*args: str | Path) -> Result:
    return CliRunner().invoke(fleet, [str(a) for a in args])


@pytest.fixture
def lab(tmp_path: Path) -> Path:
    generate_key(tmp_path / "release")
    (tmp_path / "root.ext4").write_bytes(b"\1" * 4096)
    (tmp_path / "tree").mkdir()
    (tmp_path / "tree" / "hello").write_text("hi\n")
    return tmp_path


def create(lab: Path, *, key: Path, image: Path, output: Path) -> Result:
    return invoke(
        "bundle", "create", "--compatible", "c", "--version", "1.0.0",
        "--security-version", "1", "--image", f"rootfs={image}", "--key", key, "-o", output,
    )  # fmt: skip


def test_bundle_create_refuses_the_key_as_output_and_keeps_it(lab: Path) -> None:
    key = lab / "release.pem"
    before = key.read_bytes()
    assert_one_line_error(
        create(lab, key=key, image=lab / "root.ext4", output=key), f"is the input {key}"
    )
    assert key.read_bytes() == before
    assert [p.name for p in lab.iterdir() if p.name.endswith(".tmp")] == []


def test_bundle_create_refuses_an_image_as_output_even_through_a_link(lab: Path) -> None:
    image = lab / "root.ext4"
    link = lab / "alias.bundle"
    link.symlink_to(image.name)
    for output in (image, link):
        result = create(lab, key=lab / "release.pem", image=image, output=output)
        assert_one_line_error(result, f"is the input {image}")
    assert image.read_bytes() == b"\1" * 4096


def test_bundle_create_refuses_to_replace_another_private_key(lab: Path) -> None:
    other = generate_key(lab / "other")
    del other
    before = (lab / "other.pem").read_bytes()
    result = create(lab, key=lab / "release.pem", image=lab / "root.ext4", output=lab / "other.pem")
    assert_one_line_error(result, "holds a private key")
    assert (lab / "other.pem").read_bytes() == before


@pytest.mark.parametrize("kind", ["directory", "missing parent", "fifo"])
def test_bundle_create_output_that_is_no_file_to_write_is_one_line(lab: Path, kind: str) -> None:
    if kind == "directory":
        output, fragment = lab / "out", "is a directory"
        output.mkdir()
    elif kind == "missing parent":
        output, fragment = lab / "nope" / "x.bundle", "does not exist"
    else:
        output, fragment = lab / "pipe", "not a regular file"
        os.mkfifo(output)
    result = create(lab, key=lab / "release.pem", image=lab / "root.ext4", output=output)
    assert_one_line_error(result, fragment)


def test_bundle_create_writes_a_new_output_beside_its_inputs(lab: Path) -> None:
    result = create(lab, key=lab / "release.pem", image=lab / "root.ext4", output=lab / "b.bundle")
    assert result.exit_code == 0, result.output
    assert (lab / "b.bundle").stat().st_size > 4096


def test_image_rootfs_refuses_an_output_inside_its_source_tree(lab: Path) -> None:
    result = invoke("image", "rootfs", lab / "tree", "--size", "8M", "-o", lab / "tree" / "hello")
    assert_one_line_error(result, "inside the input directory")
    assert (lab / "tree" / "hello").read_text() == "hi\n"


def test_image_disk_refuses_one_of_its_images_as_output(lab: Path) -> None:
    image = lab / "root.ext4"
    result = invoke(
        "image", "disk", "--layout", "grub", "--rootfs", image, "--safe", image, "-o", image
    )
    assert_one_line_error(result, f"is the input {image}")
    assert image.read_bytes() == b"\1" * 4096


def test_image_import_refuses_a_disk_that_is_one_of_its_outputs(lab: Path) -> None:
    disk = lab / "rootfs.ext4"
    disk.write_bytes(b"\0" * 4096)
    result = invoke("image", "import", disk, "--out-dir", lab)
    assert_one_line_error(result, f"is the input {disk}")
    assert disk.read_bytes() == b"\0" * 4096


@pytest.mark.parametrize(
    ("fs_type", "size", "limit"),
    [("ext4", "99999999999999T", "16 TiB"), ("vfat", "3T", "2 TiB"), ("ext4", "17T", "16 TiB")],
)
def test_image_rootfs_size_beyond_the_type_is_refused_naming_the_limit(
    lab: Path, fs_type: str, size: str, limit: str
) -> None:
    result = invoke(
        "image", "rootfs", lab / "tree", "--type", fs_type, "--size", size, "-o", lab / "x.img"
    )
    assert_one_line_error(result, limit)
    assert not (lab / "x.img").exists()


def test_image_disk_beyond_the_largest_disk_is_refused_naming_the_limit(lab: Path) -> None:
    image = lab / "root.ext4"
    result = invoke(
        "image", "disk", "--layout", "grub", "--rootfs", image, "--safe", image,
        "--root-size", "99999999999999T", "-o", lab / "d.img",
    )  # fmt: skip
    assert_one_line_error(result, "16 TiB")
    assert not (lab / "d.img").exists()


def test_helper_accepts_an_existing_output_that_is_no_input(tmp_path: Path) -> None:
    (tmp_path / "old.bundle").write_bytes(b"old")
    (tmp_path / "in").write_bytes(b"in")
    refuse_output_over_inputs(tmp_path / "old.bundle", [tmp_path / "in"])
    refuse_output_over_inputs(tmp_path / "new.bundle", [tmp_path / "in", tmp_path / "gone"])
    with pytest.raises(OutputPathError, match="is the input"):
        os.link(tmp_path / "in", tmp_path / "hard")
        refuse_output_over_inputs(tmp_path / "hard", [tmp_path / "in"])


def test_bundle_create_removes_what_killed_runs_of_the_same_output_left(lab: Path) -> None:
    """A kill -9 during bundle create leaves a hidden temporary as big as the bundle; the next
    create of the same output removes those older than an hour, and nothing else."""
    old = time.time() - 2 * 3600
    stale = lab / ".b.bundle.k1ll3d00.tmp"
    recent = lab / ".b.bundle.inflight.tmp"
    other = lab / ".c.bundle.k1ll3d00.tmp"
    for path in (stale, recent, other):
        path.write_bytes(b"partial")
    for path in (stale, other):
        os.utime(path, (old, old))
    result = create(lab, key=lab / "release.pem", image=lab / "root.ext4", output=lab / "b.bundle")
    assert result.exit_code == 0, result.output
    assert not stale.exists()
    assert recent.exists() and other.exists()
    assert (lab / "b.bundle").stat().st_size > 4096


def test_image_rootfs_refuses_a_fifo_or_a_private_key_as_output(lab: Path) -> None:
    fifo = lab / "pipe"
    os.mkfifo(fifo)
    key = lab / "release.pem"
    before = key.read_bytes()
    for output, fragment in ((fifo, "not a regular file"), (key, "holds a private key")):
        result = invoke("image", "rootfs", lab / "tree", "--size", "8M", "-o", output)
        assert_one_line_error(result, fragment)
    assert key.read_bytes() == before
    assert fifo.is_fifo()
