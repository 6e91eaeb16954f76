from __future__ import annotations

import os
import socket
import threading
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ltoflow import native, scan
from ltoflow.errors import UsageError
from ltoflow.paths import DirFds
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


def test_symlinks_are_recorded_with_their_target_never_followed(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "f").write_bytes(b"x")
    (tmp_path / "loop").symlink_to(tmp_path)  # following it would never end
    (tmp_path / "dirlink").symlink_to("real")
    (tmp_path / "dangling").symlink_to("nowhere/at/all")
    os.utime(tmp_path / "dirlink", ns=(1, 1_500_000_000_000_000_007), follow_symlinks=False)
    scan = scan_tree(tmp_path)
    assert [f.relative_path for f in scan.files] == ["real/f"]
    assert [(s.relative_path, s.target) for s in scan.symlinks] == [
        ("dangling", b"nowhere/at/all"), ("dirlink", b"real"), ("loop", os.fsencode(tmp_path))]
    assert scan.symlinks[1].mtime_ns == 1_500_000_000_000_000_007
    assert scan.skipped == ()


def test_fifos_and_sockets_are_skipped_with_their_kind_never_opened(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "pipe")  # opening it for reading would block forever
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(tmp_path / "sock"))
        scan = scan_tree(tmp_path)
    assert [(s.relative_path, s.kind, s.reason) for s in scan.skipped] == [
        ("pipe", "fifo", "not a regular file"), ("sock", "socket", "not a regular file")]
    assert len(scan.files) == 0
    assert scan.symlinks == ()


def test_every_directory_is_recorded_with_mode_and_mtime(tmp_path: Path) -> None:
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "b" / "f").write_bytes(b"x")
    (tmp_path / "empty").mkdir(mode=0o700)
    os.utime(tmp_path / "a", ns=(1, 1_400_000_000_000_000_001))
    scan = scan_tree(tmp_path)
    assert [(d.relative_path, d.mode & 0o7777) for d in scan.directories] == [
        ("a", 0o755 & ~_umask()), ("a/b", 0o755 & ~_umask()), ("empty", 0o700)]
    assert scan.directories[0].mtime_ns == 1_400_000_000_000_000_001


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_names_that_are_not_utf8_keep_their_exact_bytes(tmp_path: Path) -> None:
    root = os.fsencode(tmp_path)
    os.mkdir(os.path.join(root, b"d\xfe\n"))  # noqa: PTH102 - bytes names, exactly
    os.close(os.open(os.path.join(root, b"d\xfe\n", b"bad\xff"), os.O_CREAT | os.O_WRONLY))
    os.symlink(b"t\x80", os.path.join(root, b"l\x80"))  # noqa: PTH211 - bytes names
    scan = scan_tree(tmp_path)
    (f,) = scan.files
    assert (f.relative_path, f.path_bytes) == ("d\\xfe\n/bad\\xff", b"d\xfe\n/bad\xff")
    assert [d.path_bytes for d in scan.directories] == [b"d\xfe\n"]
    assert [(s.path_bytes, s.target) for s in scan.symlinks] == [(b"l\x80", b"t\x80")]
    assert scan.skipped == ()


def test_utf8_names_carry_no_raw_bytes(tmp_path: Path) -> None:
    (tmp_path / "é").write_bytes(b"x")
    (f,) = scan_tree(tmp_path).files
    assert (f.relative_path, f.raw_path, f.path_bytes) == ("é", None, "é".encode())


def test_a_tree_deeper_than_path_max_is_scanned(tmp_path: Path) -> None:
    parts = [b"d" * 200 + b"%03d" % i for i in range(25)]  # > 5,000 bytes of path
    fd = os.open(tmp_path, os.O_RDONLY)
    for p in parts:
        os.mkdir(p, dir_fd=fd)
        new = os.open(p, os.O_RDONLY, dir_fd=fd)
        os.close(fd)
        fd = new
    os.close(os.open(b"leaf", os.O_CREAT | os.O_WRONLY, dir_fd=fd))
    os.close(fd)
    scan = scan_tree(tmp_path)
    (f,) = scan.files
    assert f.path_bytes == b"/".join([*parts, b"leaf"])
    assert len(scan.directories) == len(parts)


@pytest.mark.parametrize("make", ["missing", "file"])
def test_source_must_be_an_existing_directory(tmp_path: Path, make: str) -> None:
    target = tmp_path / "src"
    if make == "file":
        target.write_bytes(b"")
    with pytest.raises(UsageError, match=r"does not exist|not a directory"):
        scan_tree(target)


def test_files_come_out_sorted_by_the_bytes_of_their_paths(tmp_path: Path) -> None:
    """The walk emits files in order without sorting them all: siblings sort by name, a
    directory by its name and '/'. Names that sort just around '/' ('!' is below it, '0'
    above), a file that is a prefix of a directory's name, and bytes that are not UTF-8."""
    names = [b"x/f", b"x!", b"x!d/f", b"x0", b"x/y/z", b"x.txt", b"xx/f", b"a", b"a\xff/b",
             b"a\xfe", b"ab/c", b"a-b", b"\xfe", b"x/y!", b"x/y/!"]
    for name in names:
        path = tmp_path / os.fsdecode(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(name)
    files = scan_tree(tmp_path).files
    got = [files.path_bytes(i) for i in range(len(files))]
    assert got == sorted(names)
    assert [f.path_bytes for f in files] == got
    assert [f.size for f in files] == [len(n) for n in got] == list(files.size)


def test_file_table_keeps_any_mtime_and_reads_back_its_records() -> None:
    from ltoflow.scan import FileTable, ScannedFile

    records = [ScannedFile("a", 1, 5, 0o100644), ScannedFile("b\\xff", 2, -(2**63), 0o100600,
                                                              b"b\xff"),
               ScannedFile("c", 3, 2**64 + 7, 0o100755)]  # past 2262: the column becomes a list
    table = FileTable(records)
    assert list(table) == records == table[:]
    assert [table[i] for i in range(-3, 0)] == records
    assert table.path_bytes(1) == b"b\xff"
    assert table.mtime_ns[2] == 2**64 + 7
    assert table == FileTable(records)
    with pytest.raises(IndexError):
        table[-4]
    assert table != FileTable(records[:2])


@settings(max_examples=200, deadline=None)
@given(st.lists(st.text(max_size=12), max_size=20), st.integers(-25, 25),
       st.slices(25))
def test_string_column_reads_as_the_list_of_its_strings(
    values: list[str], index: int, part: slice
) -> None:
    from ltoflow.scan import StringColumn

    values = [*values, "odd-\udcff"] if index % 5 == 0 else values  # a lone surrogate too
    column = StringColumn(values)
    assert len(column) == len(values)
    assert list(column) == values == column[:]
    assert column == values
    assert column[part] == values[part]
    assert column == StringColumn(values)
    assert column != StringColumn([*values, "x"])
    if -len(values) <= index < len(values):
        assert column[index] == values[index]
        assert column.encoded(index) == values[index].encode("utf-8", "surrogatepass")
    else:
        with pytest.raises(IndexError):
            column[index]


def test_file_ids_of_a_batch_are_those_of_the_whole_table() -> None:
    from ltoflow.catalog import file_id_for
    from ltoflow.plan import file_ids_of
    from ltoflow.scan import FileTable, ScannedFile

    records = [ScannedFile("a", 1, 5, 0o100644), ScannedFile("b\\xff", 2, 5, 0o100600, b"b\xff"),
               ScannedFile("c/d", 3, 5, 0o100755)]
    plain, odd = FileTable([records[0], records[2]]), FileTable(records)
    assert file_ids_of(odd) == [file_id_for(r.path_bytes) for r in records]
    assert file_ids_of(odd, [2, 1]) == [file_id_for("c/d"), file_id_for(b"b\xff")]
    assert file_ids_of(plain, range(1, 2)) == [file_id_for("c/d")] == file_ids_of(plain)[1:]


def _wide_tree(root: Path) -> None:
    for a in range(4):
        for b in range(3):
            d = root / f"d{a}" / f"e{b}"
            d.mkdir(parents=True)
            for c in range(3):
                (d / f"f{c}").write_bytes(b"x" * c)
            (d / "link").symlink_to("f0")
        (root / f"d{a}" / "top").write_bytes(b"t")
    os.mkfifo(root / "d2" / "pipe")


def _settled(lister: scan._Lister) -> bool:
    """The helpers have nothing left to list (or may list no more ahead): call with the lock."""
    busy = any(isinstance(v, threading.Event) for v in lister._listings.values())
    return not busy and (not lister._found or lister._ahead >= scan.LISTED_AHEAD)


def _lister(root: Path) -> tuple[scan._Lister, scan._Walk, int]:
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    walk = scan._Walk(root, DirFds(fd))
    return scan._Lister(walk, native.MODULE), walk, fd


@pytest.mark.skipif(native.MODULE is None, reason="helpers list only with the C extension")
@pytest.mark.parametrize("ahead", [1, scan.LISTED_AHEAD])
def test_directories_listed_ahead_by_helper_threads_scan_as_the_walk_alone(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, ahead: int) -> None:
    _wide_tree(tmp_path)
    monkeypatch.setattr(scan, "SCAN_THREADS", 0)
    alone = scan_tree(tmp_path)
    monkeypatch.setattr(scan, "SCAN_THREADS", 2)
    monkeypatch.setattr(scan, "LISTED_AHEAD", ahead)
    assert scan_tree(tmp_path) == alone
    assert [f.relative_path for f in alone.files][:5] == [
        "d0/e0/f0", "d0/e0/f1", "d0/e0/f2", "d0/e1/f0", "d0/e1/f1"]
    assert (len(alone.directories), len(alone.symlinks)) == (16, 12)
    assert [(k.relative_path, k.kind) for k in alone.skipped] == [("d2/pipe", "fifo")]

    # The helpers list what the walk has found and not reached, up to `ahead` of them, and
    # the walk takes their listings as they are.
    lister, walk, fd = _lister(tmp_path)
    try:
        with lister:
            top = lister.take(b"")
            # 16 directories below the root; d0 is the walk's own next one, so its 3 are not
            # found yet: the other 12, or `ahead` of them
            with lister._changed:
                assert lister._changed.wait_for(lambda: _settled(lister), 30)
                assert lister._ahead == min(ahead, 12)
                assert b"d0" not in lister._listings
            mine = scan._list_dir(b"d1", scan._Walk(tmp_path, walk.fds), native.MODULE,
                                  walk.fds)
            assert lister.take(b"d1") == mine
            assert top[:4] == [b"d0", b"d1", b"d2", b"d3"]
    finally:
        walk.fds.close()
        os.close(fd)


@pytest.mark.skipif(native.MODULE is None, reason="helpers list only with the C extension")
def test_what_goes_wrong_in_a_helper_is_raised_where_the_walk_takes_that_directory(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _wide_tree(tmp_path)
    real = scan._list_dir

    def failing(rel_dir: bytes, *args: object) -> object:
        if rel_dir == b"d1":
            raise MemoryError("listing d1")
        return real(rel_dir, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(scan, "_list_dir", failing)
    lister, walk, fd = _lister(tmp_path)
    try:
        with lister:
            lister.take(b"")
            with lister._changed:  # every directory found listed (or failed) by a helper
                assert lister._changed.wait_for(lambda: _settled(lister), 30)
                assert lister._ahead == 9  # d1, d2, d3 and the 6 below d2 and d3
            assert lister.take(b"d0")[0] == b"d0/e0"
            with pytest.raises(MemoryError, match="listing d1"):
                lister.take(b"d1")
    finally:
        walk.fds.close()
        os.close(fd)
    with pytest.raises(MemoryError, match="listing d1"):
        scan_tree(tmp_path)


def _held_in_d1(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                ) -> tuple[threading.Event, threading.Event]:
    """A wide tree whose directory d1 is listed only once `release` is set (`started` says a
    thread is inside it)."""
    _wide_tree(tmp_path)
    real = scan._list_dir
    started, release = threading.Event(), threading.Event()

    def slow(rel_dir: bytes, *args: object) -> object:
        if rel_dir == b"d1":
            started.set()
            assert release.wait(30)
        return real(rel_dir, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(scan, "_list_dir", slow)
    return started, release


@pytest.mark.skipif(native.MODULE is None, reason="helpers list only with the C extension")
def test_the_walk_waits_for_a_listing_a_helper_is_making(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = scan._list_dir
    started, release = _held_in_d1(tmp_path, monkeypatch)
    lister, walk, fd = _lister(tmp_path)
    got: list[object] = []
    try:
        with lister:
            lister.take(b"")  # d1 goes to a helper, which is held inside it
            assert started.wait(30)
            taker = threading.Thread(target=lambda: got.append(lister.take(b"d1")))
            taker.start()
            taker.join(0.2)
            assert taker.is_alive()  # waiting: it does not list d1 a second time
            release.set()
            taker.join(30)
    finally:
        walk.fds.close()
        os.close(fd)
    fd2 = os.open(tmp_path, os.O_RDONLY)
    try:
        fds2 = DirFds(fd2)
        assert got == [real(b"d1", scan._Walk(tmp_path, fds2), native.MODULE, fds2)]
        fds2.close()
    finally:
        os.close(fd2)
    assert [d.relative_path for _, d in walk.dirs].count("d1/e0") == 1  # listed once


@pytest.mark.skipif(native.MODULE is None, reason="helpers list only with the C extension")
def test_an_interrupt_in_the_walk_stops_the_helpers(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _wide_tree(tmp_path)

    def interrupted(self: object, run: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(scan.FileTable, "extend_run", interrupted)
    monkeypatch.setattr(scan.FileTable, "append", interrupted)
    before = len(os.listdir("/proc/self/fd"))
    with pytest.raises(KeyboardInterrupt):
        scan_tree(tmp_path)
    assert not [t for t in threading.enumerate() if t.name.startswith("ltoflow-scan")]
    assert len(os.listdir("/proc/self/fd")) == before


@pytest.mark.skipif(native.MODULE is None, reason="helpers list only with the C extension")
def test_helpers_without_a_descriptor_to_spare_leave_the_listing_to_the_walk(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import errno

    _wide_tree(tmp_path)
    alone = scan_tree(tmp_path)

    def no_more(fd: int) -> int:
        raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))

    monkeypatch.setattr(os, "dup", no_more)
    assert scan_tree(tmp_path) == alone


@pytest.mark.skipif(native.MODULE is None, reason="helpers list only with the C extension")
def test_an_interrupt_while_the_walk_waits_for_a_helper_leaves_the_lister_sound(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C while the walk waits for a listing a helper is making: the walk holds no lock
    then, so the helper finishes and hands its listing in, and the lock still works."""
    started, release = _held_in_d1(tmp_path, monkeypatch)
    real_wait = threading.Event.wait

    def interrupted(event: threading.Event, timeout: float | None = None) -> bool:
        if threading.current_thread() is threading.main_thread() and not release.is_set():
            release.set()  # the helper goes on while the walk is interrupted
            raise KeyboardInterrupt
        return real_wait(event, timeout)

    lister, walk, fd = _lister(tmp_path)
    try:
        with lister:
            lister.take(b"")
            assert started.wait(30)
            monkeypatch.setattr(threading.Event, "wait", interrupted)
            with pytest.raises(KeyboardInterrupt):
                lister.take(b"d1")
            monkeypatch.setattr(threading.Event, "wait", real_wait)
            listing = lister.take(b"d1")  # the helper's, handed in under a sound lock
            assert listing[0] == b"d1/e0"
            assert lister._mutex.acquire(timeout=30)
            lister._mutex.release()
    finally:
        walk.fds.close()
        os.close(fd)
