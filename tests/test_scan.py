from __future__ import annotations

import os
from pathlib import Path

import pytest

from ltoflow.errors import UsageError
from ltoflow.scan import scan_tree


def test_files_are_sorted_by_the_bytes_of_their_path(tmp_path: Path) -> None:
    for rel in ["b/x", "a-b", "a/c", "B", "é", "a/b/z"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"1")
    paths = [f.relative_path for f in scan_tree(tmp_path).files]
    assert paths == sorted(paths, key=lambda p: p.encode())
    assert paths == ["B", "a-b", "a/b/z", "a/c", "b/x", "é"]


def test_scan_records_size_mtime_and_mode_without_reading(tmp_path: Path) -> None:
    f = tmp_path / "doc"
    f.write_bytes(b"12345")
    f.chmod(0o640)
    os.utime(f, ns=(1, 1_600_000_000_123_456_789))
    (only,) = scan_tree(tmp_path).files
    assert (only.size, only.mtime_ns, only.mode) == (5, 1_600_000_000_123_456_789, 0o100640)


def test_symlinks_and_fifos_are_skipped_with_their_kind_never_followed(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "f").write_bytes(b"x")
    (tmp_path / "loop").symlink_to(tmp_path)  # following it would never end
    (tmp_path / "dirlink").symlink_to(tmp_path / "real")
    os.mkfifo(tmp_path / "pipe")
    scan = scan_tree(tmp_path)
    assert [f.relative_path for f in scan.files] == ["real/f"]
    assert {(s.relative_path, s.kind) for s in scan.skipped} == {
        ("dirlink", "symlink"), ("loop", "symlink"), ("pipe", "fifo")}


def test_names_that_are_not_utf8_are_skipped_not_lost(tmp_path: Path) -> None:
    os.close(os.open(os.path.join(os.fsencode(tmp_path), b"bad\xff"), os.O_CREAT | os.O_WRONLY))
    scan = scan_tree(tmp_path)
    assert scan.files == ()
    (skipped,) = scan.skipped
    assert skipped.reason == "name is not valid UTF-8"
    assert skipped.relative_path == "bad\\xff"


@pytest.mark.parametrize("make", ["missing", "file"])
def test_source_must_be_an_existing_directory(tmp_path: Path, make: str) -> None:
    target = tmp_path / "src"
    if make == "file":
        target.write_bytes(b"")
    with pytest.raises(UsageError, match=r"does not exist|not a directory"):
        scan_tree(target)
