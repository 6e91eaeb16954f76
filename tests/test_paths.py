from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from ltoflow import paths
from ltoflow.paths import DIR_FD_LIMIT, DirFds


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_a_chain_deeper_than_the_fd_limit_keeps_few_descriptors(tmp_path: Path) -> None:
    root_fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    before = open_fds()
    dirs = DirFds(root_fd, create=True)
    parts = tuple(b"%04d" % i for i in range(3 * DIR_FD_LIMIT))
    for depth in range(1, len(parts) + 1):  # one level deeper at a time, as a walk goes
        dirs.open(parts[:depth])
    assert open_fds() - before == DIR_FD_LIMIT
    os.close(os.open(b"leaf", os.O_CREAT | os.O_WRONLY, dir_fd=dirs.open(parts)))
    dirs.close()
    assert open_fds() == before
    fresh = DirFds(root_fd)  # a cold walk from the root to the bottom
    assert os.listdir(fresh.open(parts)) == ["leaf"]
    fresh.close()
    os.close(root_fd)


def test_a_descriptor_just_returned_stays_open_while_the_next_is_opened(tmp_path: Path) -> None:
    """A directory and then its parent, with the cache full and the directory its oldest entry:
    the parent's opening must not close the directory's descriptor (a restore sets the mode
    of one through the other)."""
    root_fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    dirs = DirFds(root_fd, create=True)
    child = (b"a", b"b")
    dirs.open(child)  # cached first: the oldest
    for i in range(DIR_FD_LIMIT - 1):
        dirs.open((b"a", b"d%02d" % i))
    fd = dirs.open(child)
    parent = dirs.open((b"a",))
    assert os.fstat(fd).st_ino == (tmp_path / "a" / "b").stat().st_ino
    assert os.fstat(parent).st_ino == (tmp_path / "a").stat().st_ino
    dirs.close()
    os.close(root_fd)


def test_a_symlink_component_is_refused_and_named(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "link").symlink_to(tmp_path)
    root_fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    dirs = DirFds(root_fd, create=True)
    with pytest.raises(OSError, match="a/link") as info:
        dirs.open((b"a", b"link", b"below"))
    assert info.value.errno in (errno.ELOOP, errno.ENOTDIR)  # Linux says ENOTDIR
    assert not (tmp_path / "below").exists()
    dirs.close()
    os.close(root_fd)


@pytest.mark.parametrize("raw", [b"plain", "é".encode(), b"\xff\xfe", b"new\nline\x80"])
def test_names_round_trip_through_their_catalog_fields(raw: bytes) -> None:
    b64 = paths.b64_if_needed(raw)
    assert (b64 is None) == (raw.decode("utf-8", "replace").encode() == raw)
    assert paths.exact(paths.display(raw), b64) == raw
    assert paths.shown(paths.display(raw)).isprintable()


@pytest.mark.parametrize(("name", "alone", "in_list"), [
    ("a/b.txt", "a/b.txt", "a/b.txt"),
    ("new\nline", "new\\nline", "new\\nline"),
    ("  leading.txt", '"  leading.txt"', '"  leading.txt"'),
    ("trailing ", '"trailing "', '"trailing "'),
    ("Smith, J/notes.txt", "Smith, J/notes.txt", '"Smith, J/notes.txt"'),
])
def test_names_are_shown_so_that_a_reader_sees_where_they_begin_and_end(
        name: str, alone: str, in_list: str) -> None:
    """Spaces at either end of a name would not be seen; in a list joined with ", ", a name
    holding ", " would look like two."""
    assert (paths.shown(name), paths.shown_in_list(name)) == (alone, in_list)
