"""The C loops (ltoflow._native) against the Python loops they stand in for.

The C loop must give exactly what the Python loop gives (the same pieces, bytes and
SHA-256s), and leave every file it cannot take plainly to the Python loop, so that faults are
found and reported the same way with or without it.
"""

from __future__ import annotations

import hashlib
import itertools
import mmap
import os
import tempfile
from array import array
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import attrs
import orjson
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from ltoflow import catalog as cat
from ltoflow import hashing
from ltoflow import native as extension
from ltoflow import plan as plan_module
from ltoflow.errors import BackupPlanError, CatalogReadError, SourceReadError
from ltoflow.hashing import FaultPolicy, Piece, SourceCursor, SourceFaults
from ltoflow.plan import Hashes, Plan, build_catalog, file_ids_of, make_plan
from ltoflow.scan import FileTable, ScanResult, StringColumn, scan_tree
from ltoflow.verify import SegmentsByContainer
from ltoflow.verify import _ContainerCheck as ContainerCheck

from .conftest import write_tree
from .test_catalog import catalogs

BUILT = extension.load()


@pytest.fixture
def native() -> ModuleType:
    """The C loop; CI builds it and sets LTOFLOW_REQUIRE_NATIVE=1 so that it cannot go
    missing unnoticed. Elsewhere these tests skip without it."""
    if BUILT is None:
        if os.environ.get("LTOFLOW_REQUIRE_NATIVE") == "1":
            pytest.fail("ltoflow._native was not built: check the C compiler, Python's "
                        "headers and OpenSSL's (libssl-dev), then pip install -e . again")
        pytest.skip("ltoflow._native is not built here")
    return BUILT


def plan_of(src: Path, container: int) -> Plan:
    return make_plan(scan_tree(src), capacity_bytes=1 << 40, container_size_bytes=container,
                     measure_catalog=lambda _: 0)


Read = tuple[list[Piece], bytes, dict[int, str]]


def read_all(plan: Plan, module: ModuleType | None, *, chunk: int, one_container: bool,
             policy: FaultPolicy | None = None) -> Read:
    """Every segment of `plan` through one cursor, with the C loop (`module`) or without."""
    saved = hashing.NATIVE
    hashing.NATIVE = module
    try:
        faults = SourceFaults(plan, policy or FaultPolicy(skip_changed=True))
        cursor = SourceCursor(plan, 0, len(plan.segments), faults=faults)
    finally:
        hashing.NATIVE = saved
    pieces: list[Piece] = []
    data = bytearray()
    buf = memoryview(bytearray(chunk))
    try:
        while not cursor.finished:
            got, n = cursor.fill(buf, one_container=one_container)
            assert n > 0
            base = len(data)
            pieces.extend(p._replace(start=p.start + base) for p in got)
            data += buf[:n]
    finally:
        cursor.close()
    return pieces, bytes(data), dict(faults.reasons)


def fill_once(cursor: SourceCursor) -> tuple[list[Piece], int, memoryview]:
    """One fill of a 1 MiB buffer, the cursor closed after it."""
    buf = memoryview(bytearray(1 << 20))
    try:
        pieces, n = cursor.fill(buf, one_container=False)
    finally:
        cursor.close()
    return pieces, n, buf


def both(plan: Plan, module: ModuleType, **kw: object) -> tuple[Read, Read]:
    return (read_all(plan, module, **kw),  # type: ignore[arg-type]
            read_all(plan, None, **kw))  # type: ignore[arg-type]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    # Few files, or many small ones: runs of 64 and more are shared between two threads in
    # blocks of 16, and containers and chunks are large enough for such runs to happen.
    files=st.integers(1, 150).flatmap(lambda n: st.lists(
        st.tuples(st.one_of(st.integers(0, 300), st.integers(0, 3000)),
                  st.sampled_from(["", "a/", "a/b/", "c/"])),
        min_size=n, max_size=n)),
    container=st.one_of(st.integers(1000, 9000), st.integers(9000, 1 << 20)),
    chunk=st.one_of(st.integers(3000, 20000), st.integers(20000, 1 << 20)),
    one_container=st.booleans(),
)
def test_c_loop_reads_what_the_python_loop_reads(
        files: list[tuple[int, str]], container: int, chunk: int, one_container: bool
) -> None:
    if BUILT is None:
        pytest.skip("ltoflow._native is not built here")
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp)
        contents = write_tree(src, {f"{d}f{i:03d}": n for i, (n, d) in enumerate(files)})
        plan = plan_of(src, container)
        fast, slow = both(plan, BUILT, chunk=chunk, one_container=one_container)
    assert fast == slow
    pieces, data, faults = fast
    assert not faults
    assert data == b"".join(contents[f.relative_path] for f in plan.files)
    runs = _runs_of_whole_files(pieces)
    event(f"longest run of whole files: {'64 or more' if max(runs, default=0) >= 64 else 'less'}")
    for p in pieces:  # whole files come with their hash, and it is right
        if p.digest is not None:
            assert (p.first, p.last) == (True, True)
            assert p.digest == hashlib.sha256(data[p.start:p.start + p.length]).hexdigest()


def _runs_of_whole_files(pieces: list[Piece]) -> list[int]:
    runs, n = [], 0
    for p in pieces:
        if p.digest is not None:
            n += 1
        elif n:
            runs.append(n)
            n = 0
    return [*runs, n]


Change = Callable[[Path], None]


def _grow(p: Path) -> None:
    with p.open("ab") as f:
        f.write(b"more")


def _touch(p: Path) -> None:
    st_ = p.stat()
    os.utime(p, ns=(st_.st_atime_ns, st_.st_mtime_ns + 1_000_000_000))


def _delete(p: Path) -> None:
    p.unlink()


def _symlink(p: Path) -> None:
    p.unlink()
    p.symlink_to(p.with_name("f03"))


def _fifo(p: Path) -> None:
    p.unlink()
    os.mkfifo(p)


def _dir_symlink(p: Path) -> None:
    d = p.parent
    d.rename(d.with_name("moved"))
    d.symlink_to("moved")


@pytest.mark.parametrize("victim", ["b/f05", "c/f30"], ids=["first-half", "second-half"])
@pytest.mark.parametrize("change", [_grow, _touch, _delete, _symlink, _fifo, _dir_symlink],
                         ids=["grown", "touched", "deleted", "symlink", "fifo", "dir-symlink"])
def test_a_file_changed_after_the_scan_is_found_as_the_python_loop_finds_it(
        tmp_path: Path, native: ModuleType, change: Change, victim: str) -> None:
    # 120 files: one run, which the C loop shares between two threads (halves of 60 files).
    contents = write_tree(tmp_path, {f"{d}/f{i:02d}": 500 + i for d in "abc" for i in range(40)})
    plan = plan_of(tmp_path, 1 << 20)
    change(tmp_path / victim)
    fast, slow = both(plan, native, chunk=1 << 20, one_container=False)
    assert fast == slow
    _, data, faults = fast
    unusable = {plan.files.relative_path[i] for i in faults}
    # The file, or all of its directory when that became a symlink (it is not followed).
    folder = victim.split("/")[0]
    assert unusable == ({f"{folder}/f{i:02d}" for i in range(40)} if change is _dir_symlink
                        else {victim})
    # Every other file was read whole, those after it too (by the C loop again).
    for f in range(len(plan.files)):
        rel = plan.files.relative_path[f]
        if rel not in unusable:
            start = plan.segments.container_offset[plan.file_starts[f]]
            assert data[start:start + len(contents[rel])] == contents[rel]


def test_names_that_are_not_utf8_are_left_to_the_python_loop(
        tmp_path: Path, native: ModuleType) -> None:
    root = os.fsencode(tmp_path)
    names = [b"a1", b"a2-\xff", b"a3", b"b-\xfe\xfd", b"b2"]
    for i, name in enumerate(names):
        with open(os.path.join(root, name), "wb") as f:
            f.write(bytes([i]) * (300 + i))
    plan = plan_of(tmp_path, 1 << 20)
    assert len(plan.files.raw_path) == 2
    fast, slow = both(plan, native, chunk=1 << 20, one_container=False)
    assert fast == slow
    assert not fast[2]
    assert fast[1] == b"".join(bytes([names.index(plan.files.path_bytes(i))])
                               * plan.files.size[i] for i in range(len(plan.files)))


def test_a_file_already_unusable_is_not_read_again_by_the_c_loop(
        tmp_path: Path, native: ModuleType) -> None:
    write_tree(tmp_path, {f"f{i}": 400 for i in range(6)})
    plan = plan_of(tmp_path, 1 << 20)
    saved = hashing.NATIVE
    hashing.NATIVE = native
    try:
        faults = SourceFaults(plan, FaultPolicy(skip_changed=True))
        cursor = SourceCursor(plan, 0, len(plan.segments), faults=faults)
    finally:
        hashing.NATIVE = saved
    # Another pass found file 2 unusable before this one read it: its bytes are zeros here.
    faults.fault(2, SourceReadError("gone", relative_path="f2", what="gone"),
                 domain=hashing.LATER_TAPES, offset=0)
    pieces, n, buf = fill_once(cursor)
    assert n == 6 * 400
    assert bytes(buf[800:1200]) == bytes(400)
    assert pieces[2].digest is None  # hashed by the segment hasher, as any partial piece
    assert bytes(buf[1200:1600]) == (tmp_path / "f3").read_bytes()
    assert pieces[3].digest == hashlib.sha256(buf[1200:1600]).hexdigest()


def test_whole_small_files_are_read_by_the_c_loop_alone(
        tmp_path: Path, native: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    contents = write_tree(tmp_path, {f"{d}/f{i}": 1000 + i for d in "xyz" for i in range(50)})
    plan = plan_of(tmp_path, 1 << 20)
    calls: list[int] = []
    real = os.preadv

    def counted(fd: int, buffers: list[memoryview], offset: int) -> int:
        calls.append(fd)
        return real(fd, buffers, offset)

    monkeypatch.setattr(os, "preadv", counted)
    pieces, data, faults = read_all(plan, native, chunk=1 << 20, one_container=True)
    assert calls == []
    assert not faults
    assert data == b"".join(contents[f.relative_path] for f in plan.files)
    assert all(p.digest is not None for p in pieces)


@settings(max_examples=200, deadline=None)
@given(names=st.lists(st.one_of(st.text(max_size=40), st.binary(max_size=40)), max_size=30),
       pick=st.lists(st.integers(0, 29), max_size=40))
def test_c_file_ids_are_the_catalogs_file_ids(names: list[str | bytes], pick: list[int]) -> None:
    if BUILT is None:
        pytest.skip("ltoflow._native is not built here")
    files = FileTable()
    for name in names:  # bytes stand for names that are not UTF-8: kept as raw_path
        if isinstance(name, bytes):
            files.append(name.decode("utf-8", "replace"), 1, 0, 0o100644, name)
        else:
            files.append(name, 1, 0, 0o100644, None)
    indices = [i for i in pick if i < len(files)]
    expected = [cat.file_id_for(files.path_bytes(i)) for i in indices]
    saved = extension.MODULE
    try:
        extension.MODULE = BUILT
        assert file_ids_of(files, indices) == expected
        assert file_ids_of(files) == [cat.file_id_for(files.path_bytes(i))
                                      for i in range(len(files))]
    finally:
        extension.MODULE = saved


@settings(max_examples=300, deadline=None)
@given(mtimes=st.lists(st.one_of(st.integers(-(2**63), 2**63 - 1),
                                 st.integers(-(10**17), 10**17),
                                 st.integers(-(10**12), 10**12)), min_size=1, max_size=20))
def test_c_iso_times_are_the_catalogs_modified_at(mtimes: list[int]) -> None:
    if BUILT is None:
        pytest.skip("ltoflow._native is not built here")
    column = array("q", mtimes)
    saved = extension.MODULE
    try:
        extension.MODULE = BUILT
        got = cat.iso_from_ns_at(column, range(len(column)))
    finally:
        extension.MODULE = saved
    assert got == [cat.iso_from_ns(m) for m in mtimes]


@pytest.mark.parametrize("victim", [0, 70])
def test_a_file_made_unusable_by_another_pass_during_a_c_call_is_left_to_python(
        tmp_path: Path, native: ModuleType, victim: int) -> None:
    write_tree(tmp_path, {f"f{i:03d}": 300 for i in range(100)})
    plan = plan_of(tmp_path, 1 << 20)
    faults = SourceFaults(plan, FaultPolicy(skip_changed=True))

    class Meanwhile:
        """The C loop, while which the prehasher finds the victim unusable."""

        @staticmethod
        def read_whole_files(*args: object) -> list[str]:
            digests: list[str] = native.read_whole_files(*args)
            if not faults.reasons:
                faults.fault(victim, SourceReadError("gone", relative_path="x", what="gone"),
                             domain=hashing.LATER_TAPES, offset=0)
            return digests

    saved = hashing.NATIVE
    hashing.NATIVE = Meanwhile  # type: ignore[assignment]
    try:
        cursor = SourceCursor(plan, 0, len(plan.segments), faults=faults)
    finally:
        hashing.NATIVE = saved
    pieces, n, buf = fill_once(cursor)
    assert n == 100 * 300
    v = victim * 300
    assert bytes(buf[v:v + 300]) == bytes(300)  # zeros, as for any unusable file
    assert pieces[victim].digest is None
    assert bytes(buf[v + 300:v + 600]) == (tmp_path / f"f{victim + 1:03d}").read_bytes()
    assert [p.digest is not None for p in pieces] == [i != victim for i in range(100)]


def scan_both(src: Path) -> tuple[ScanResult, ScanResult]:
    """scan_tree of `src` with the C listing and with os.scandir."""
    saved = extension.MODULE
    try:
        extension.MODULE = BUILT
        fast = scan_tree(src)
        extension.MODULE = None
        slow = scan_tree(src)
    finally:
        extension.MODULE = saved
    return fast, slow


# Names around the walk's order ('.' 0x2E and '-' 0x2D sort before '/' 0x2F, '0' after),
# names that are not UTF-8, and one that decodes only with surrogates (not UTF-8 either).
_NAMES = [b"a", b"a.b", b"a-b", b"a0", b"b", b"\xc3\xa9", b"\xff", b"\\xff", b"x\xed\xa0\x80",
          b"z" * 40]  # b"\xff" and b"\\xff" render alike


@st.composite
def trees(draw: st.DrawFn) -> list[tuple[bytes, str]]:
    """(path, kind) pairs: kind is file, dir, link or fifo; parents come first."""
    out: list[tuple[bytes, str]] = []
    dirs = [b""]
    for _ in range(draw(st.integers(0, 30))):
        parent = draw(st.sampled_from(dirs))
        name = draw(st.sampled_from(_NAMES))
        path = parent + b"/" + name if parent else name
        if any(p == path for p, _ in out):
            continue
        kind = draw(st.sampled_from(["file", "file", "file", "dir", "dir", "link", "fifo"]))
        out.append((path, kind))
        if kind == "dir":
            dirs.append(path)
    return out


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tree=trees(), mtime=st.sampled_from([0, -1_500_000_000_123_456_789, 1_700_000_000_5]))
def test_c_scan_lists_what_scandir_lists(tree: list[tuple[bytes, str]], mtime: int) -> None:
    if BUILT is None:
        pytest.skip("ltoflow._native is not built here")
    with tempfile.TemporaryDirectory() as tmp:
        root = os.fsencode(tmp)
        for i, (rel, kind) in enumerate(tree):
            path = os.path.join(root, rel)
            if kind == "dir":
                os.mkdir(path)  # noqa: PTH102 (bytes paths: names that are not UTF-8)
            elif kind == "file":
                with open(path, "wb") as f:
                    f.write(b"x" * i)
                os.utime(path, ns=(mtime, mtime + i))
            elif kind == "link":
                os.symlink(b"target-" + rel.replace(b"/", b"_"), path)  # noqa: PTH211
            else:
                os.mkfifo(path)
        fast, slow = scan_both(Path(tmp))
    assert fast == slow
    assert fast.files.mtime_ns == slow.files.mtime_ns


def test_c_scan_of_a_file_beyond_year_2262_and_a_fifo(tmp_path: Path, native: ModuleType) -> None:
    write_tree(tmp_path, {"a/old": 3, "a/new": 4, "a/plain": 5})
    os.mkfifo(tmp_path / "a" / "pipe")
    try:  # past 64-bit nanoseconds: the record takes it from Python's stat
        os.utime(tmp_path / "a" / "new", ns=(0, 2**63 + 10**9))
    except OSError:
        pytest.skip("this filesystem keeps no mtime past 2262")
    os.utime(tmp_path / "a" / "old", ns=(0, -(10**18)))
    fast, slow = scan_both(tmp_path)
    assert fast == slow
    assert [f.relative_path for f in fast.files] == ["a/new", "a/old", "a/plain"]
    assert fast.files[0].mtime_ns == (tmp_path / "a" / "new").stat().st_mtime_ns
    assert [(s.relative_path, s.kind) for s in fast.skipped] == [("a/pipe", "fifo")]


_TEXT = st.text(st.characters(codec="utf-8", exclude_characters="/"), min_size=1, max_size=12)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    files=st.lists(st.tuples(
        st.lists(_TEXT, min_size=1, max_size=3).map("/".join),
        st.integers(0, 5000), st.integers(-(2**63), 2**63 - 1), st.integers(0, 0o177777),
        # a name that is not UTF-8 in one file of four: it sends its batch to Python
        st.one_of(st.none(), st.none(), st.none(),
                  st.binary(min_size=1, max_size=8).map(lambda b: b"\xff" + b)),
    ), max_size=40, unique_by=lambda f: f[0]),
    container=st.integers(500, 20000),
    unusable=st.sets(st.integers(0, 39), max_size=4),
    root=st.sampled_from(["/srv/records", '/d "quoted"\\back', "/r\u00e9\x01"]),
    # small batches: many of them, encoded by the C extension in threads, a few ahead
    batch=st.sampled_from([cat._BATCH, 1, 3]),
)
def test_c_catalog_records_are_the_encoders_bytes(
        files: list[tuple[str, int, int, int, bytes | None]], container: int,
        unusable: set[int], root: str, batch: int) -> None:
    if BUILT is None:
        pytest.skip("ltoflow._native is not built here")
    table = FileTable()
    for rel, size, mtime, mode, raw in sorted(files, key=lambda f: f[0].encode()):
        table.append(rel, size, mtime, 0o100000 | mode, raw)
    plan = make_plan(ScanResult(Path(root), table, ()), capacity_bytes=1 << 40,
                     container_size_bytes=container, measure_catalog=lambda _: 0)
    hashes = Hashes.for_plan(plan)
    for digests in (hashes.segments, hashes.containers, hashes.files):
        for i in range(len(digests)):
            digests[i] = hashlib.sha256(i.to_bytes(8) + bytes([len(digests) % 251])).hexdigest()
    reasons = {i: "vanished: gone" for i in unusable if i < len(table)}

    def encoded(module: ModuleType | None) -> bytes:
        saved, saved_batch = extension.MODULE, cat._BATCH
        try:
            extension.MODULE, cat._BATCH = module, batch
            catalog = build_catalog(plan, hashes, set_id="s" * 36, created_at="t",
                                    created_by="ltoflow test", unusable=reasons)
            return b"".join(cat.JsonCatalogCodec().encode(catalog))
        finally:
            extension.MODULE, cat._BATCH = saved, saved_batch

    used: list[str] = []

    class Counted:
        """The extension, counting the batches it encoded itself."""

        def __getattr__(self, name: str) -> object:
            real = getattr(BUILT, name)

            def call(*args: object) -> object:
                out = real(*args)
                if name.startswith("encode_") and out is not None:
                    used.append(name)
                return out

            return call

    assert encoded(Counted()) == encoded(None)  # type: ignore[arg-type]
    if len(table) > len(reasons) and not table.raw_path:
        assert "encode_files" in used
        assert "encode_segments" in used or not len(plan.segments)


@settings(max_examples=150, deadline=None)
@given(sizes=st.lists(st.one_of(st.just(0), st.integers(1, 300), st.integers(1, 60_000)),
                      max_size=60),
       capacity=st.integers(20_000, 400_000), share=st.floats(0.01, 0.9))
def test_c_layout_and_sizer_make_the_python_plan(sizes: list[int], capacity: int,
                                                 share: float) -> None:
    if BUILT is None:
        pytest.skip("ltoflow._native is not built here")
    table = FileTable()
    for i, size in enumerate(sizes):
        table.append(f'd{i % 4}/f"{i:03d}\n', size, -5 + i, 0o100644, None)
    scan = ScanResult(Path("/srv/r"), table, ())
    measure = plan_module.catalog_measurer(cat.JsonCatalogCodec(), "ltoflow test")

    def planned(module: ModuleType | None) -> tuple[object, ...] | str:
        saved = extension.MODULE
        try:
            extension.MODULE = module
            plan = make_plan(scan, capacity_bytes=capacity,
                             container_size_bytes=max(1, int(capacity * share)),
                             measure_catalog=plan_module.JsonPlanSizer(
                                 cat.JsonCatalogCodec(), "ltoflow test"))
            sized = plan_module.JsonPlanSizer(cat.JsonCatalogCodec(), "ltoflow test")(plan)
        except BackupPlanError as e:
            return str(e)
        finally:
            extension.MODULE = saved
        s = plan.segments
        return (tuple(map(tuple, s._columns())), tuple(plan.file_starts), plan.containers,
                plan.tapes, plan.reserve_bytes, sized, measure(plan))

    fast, slow = planned(BUILT), planned(None)
    assert fast == slow
    if not isinstance(fast, str):
        assert fast[-2] == fast[-1]  # the C sizer's sums are the encoded catalog's size


@given(st.lists(st.integers(-(2**63), 2**63 - 1), max_size=30),
       st.lists(st.text(max_size=10), max_size=20))
def test_c_sums_are_the_python_sums(numbers: list[int], texts: list[str]) -> None:
    if BUILT is None:
        pytest.skip("ltoflow._native is not built here")
    assert BUILT.digit_total(array("q", numbers)) == sum(len(str(n)) for n in numbers)
    column = StringColumn(texts)
    expected = (None if any(0xD800 <= ord(c) <= 0xDFFF for t in texts for c in t)
                else sum(len(orjson.dumps(t)) - 2 for t in texts))
    assert BUILT.json_strings_size(*column.buffers()) == expected


@settings(max_examples=60, deadline=None)
@given(sizes=st.lists(st.one_of(st.just(0), st.integers(1, 4000)), max_size=40),
       container=st.integers(500, 9000), unusable=st.sets(st.integers(0, 39), max_size=3))
def test_c_single_segment_file_hashes_complete_as_python_does(
        sizes: list[int], container: int, unusable: set[int]) -> None:
    if BUILT is None:
        pytest.skip("ltoflow._native is not built here")
    table = FileTable()
    for i, size in enumerate(sizes):
        table.append(f"f{i:03d}", size, 0, 0o100644, None)
    plan = make_plan(ScanResult(Path("/r"), table, ()), capacity_bytes=1 << 40,
                     container_size_bytes=container, measure_catalog=lambda _: 0)

    def completed(module: ModuleType | None) -> list[list[str | None]]:
        saved = extension.MODULE
        try:
            extension.MODULE = module
            recorder = hashing.HashRecorder(plan)
            for f in unusable & set(range(len(table))):
                recorder.faults.fault(f, SourceReadError("x", relative_path="x", what="x"),
                                      domain=None)
            for s in range(len(plan.segments)):
                recorder.segment(s, hashlib.sha256(b"s%d" % s).hexdigest())
            for c in range(len(plan.containers)):
                recorder.container(c, hashlib.sha256(b"c%d" % c).hexdigest())
            for f in range(len(table)):
                if plan.file_starts[f + 1] - plan.file_starts[f] > 1 and f not in unusable:
                    recorder.file(f, hashlib.sha256(b"f%d" % f).hexdigest())
            h = recorder.complete()
            return [list(h.segments), list(h.containers), list(h.files)]
        finally:
            extension.MODULE = saved

    assert completed(BUILT) == completed(None)


def test_c_and_python_batches_of_one_catalog_join_into_the_encoders_bytes(
        native: ModuleType) -> None:
    table = FileTable()
    for i in range(5000):  # two batches of records; the second has a name that is not UTF-8
        raw = b"f-\xff" if i == 4500 else None
        table.append(f"d/f{i:05d}" if raw is None else "f-\\xff", 10 + i % 7, i, 0o100644, raw)
    plan = make_plan(ScanResult(Path("/r"), table, ()), capacity_bytes=1 << 40,
                     container_size_bytes=1 << 20, measure_catalog=lambda _: 0)
    hashes = Hashes.placeholders(plan)

    def encoded(module: ModuleType | None) -> bytes:
        saved = extension.MODULE
        try:
            extension.MODULE = module
            catalog = build_catalog(plan, hashes, set_id="s" * 36, created_at="t",
                                    created_by="ltoflow test")
            return b"".join(cat.JsonCatalogCodec().encode(catalog))
        finally:
            extension.MODULE = saved

    assert encoded(native) == encoded(None)


def test_a_run_of_hashes_already_known_is_compared_one_by_one(tmp_path: Path) -> None:
    write_tree(tmp_path, {f"f{i}": 10 for i in range(5)})
    plan = plan_of(tmp_path, 1 << 20)
    digest = [hashlib.sha256(bytes([i])).hexdigest() for i in range(5)]
    recorder = hashing.HashRecorder(plan, SourceFaults(plan, FaultPolicy(skip_changed=True)))
    recorder.segment(3, digest[3], written=False)  # the prehasher saw other bytes of f3
    recorder.segments_written([(i, digest[i] if i != 3 else digest[0]) for i in range(5)])
    assert list(recorder.hashes.segments) == [*digest[:3], digest[0], digest[4]]
    assert set(recorder.faults.reasons) == {3}
    assert bytes(recorder._written) == b"\x01" * 5


def test_c_digit_total_of_an_unsigned_column(native: ModuleType) -> None:
    values = [0, 9, 10, 2**63, 2**64 - 1]
    assert native.digit_total(array("Q", values)) == sum(len(str(v)) for v in values)


def lazily(data: bytes, module: object) -> object:
    """_decode_lines(lazy=True) with the C loop (`module`) or without, every record made."""
    saved = extension.MODULE
    try:
        extension.MODULE = module  # type: ignore[assignment]
        c = cat._decode_lines(data, lazy=True)
        return attrs.evolve(c, source_files=tuple(c.source_files), segments=tuple(c.segments))
    except cat._NotLineFormat:
        return "not line format"
    finally:
        extension.MODULE = saved


def decoded(data: bytes, module: object) -> object:
    """_decode_lines with the C loop (`module`) or without; 'not line format' when it gives up."""
    saved = extension.MODULE
    try:
        extension.MODULE = module  # type: ignore[assignment]
        return cat._decode_lines(data)
    except cat._NotLineFormat:
        return "not line format"
    finally:
        extension.MODULE = saved


class CountedDecoder:
    """The extension, counting the records decode_records made itself."""

    def __init__(self, module: ModuleType) -> None:
        self.module, self.made = module, 0

    def decode_records(self, *args: object) -> tuple[list[object], int, int]:
        made, pos, status = self.module.decode_records(*args)
        self.made += len(made)
        return made, pos, status


@settings(max_examples=150, deadline=None)
@given(c=catalogs)
def test_c_decoder_gives_what_the_python_decoder_gives(c: cat.Catalog) -> None:
    if BUILT is None:
        pytest.skip("ltoflow._native is not built here")
    data = b"".join(cat.JsonCatalogCodec().encode(c))
    counted = CountedDecoder(BUILT)
    fast = decoded(data, counted)
    assert fast == decoded(data, None) == c
    assert isinstance(fast, cat.Catalog)
    records = sum(len(getattr(c, name)) for name in cat._LIST_TYPES)
    event(f"C decoded {'all' if counted.made == records else 'some'} records")
    ids = {id(s.file_id) for s in fast.segments} | {id(s.container_id) for s in fast.segments}
    # one string per id, as the Python loop keeps them
    assert len(ids) == len({s.file_id for s in fast.segments} | {s.container_id
                                                                 for s in fast.segments})


SAMPLE = b"".join(cat.JsonCatalogCodec().encode(cat.Catalog(
    backup_set_id="s", created_at="t", source_root="/src",
    tapes=(cat.TapeEntry("T1", "s", 1, 10**12, 10**6),),
    containers=(cat.ContainerEntry("C1", "s", "T1", 1, 0, 5, "a" * 64),),
    source_files=(cat.SourceFileEntry("F1", "a/b.txt", "/src/a/b.txt", 5, "b" * 64, "m",
                                      0o100644, 0),),
    segments=(cat.SegmentEntry("S1", "F1", "C1", 0, 0, 5, "b" * 64),
              cat.SegmentEntry("S2", "F1", "C1", 5, 5, 0, "c" * 64)),
)))


@pytest.mark.parametrize(("old", "new"), [
    (b'"length_bytes":5,', b'"length_bytes": 5,'),
    (b'"length_bytes":5,', b'"length_bytes":5.0,'),
    (b'"length_bytes":5,', b'"length_bytes":5e0,'),
    (b'"length_bytes":5,', b'"length_bytes":-0,'),
    (b'"length_bytes":5,', b'"length_bytes":05,'),
    (b'"length_bytes":5,', b'"length_bytes":-5,'),
    (b'"length_bytes":5,', b'"length_bytes":true,'),
    (b'"length_bytes":5,', b'"length_bytes":null,'),
    (b'"length_bytes":5,', b'"length_bytes":"5",'),
    (b'"length_bytes":5,', b'"length_bytes":[],'),
    (b'"length_bytes":5,', b'"length_bytes":9223372036854775807,'),
    (b'"length_bytes":5,', b'"length_bytes":-9223372036854775807,'),
    (b'"length_bytes":5,', b'"length_bytes":9223372036854775808,'),
    (b'"length_bytes":5,', b'"length_bytes":18446744073709551615,'),
    (b'"length_bytes":5,', b'"length_bytes":99999999999999999999,'),
    (b'"length_bytes":5,', b'"length_bytes":5,"length_bytes":6,'),
    (b'"length_bytes":5,', b'"length_bytes":5,"compressed":false,'),
    (b'"length_bytes":5,', b''),
    (b'"segment_id":"S1"', b'"segment_id":"S\\u0031"'),
    (b'"segment_id":"S1"', b'"segment_id":"S\\ud800"'),
    (b'"segment_id":"S1"', b'"segment_id":"S\\/\\"\\\\\\b\\f\\n\\r\\t"'),
    (b'"segment_id":"S1"', b'"segment_id":"S\\x"'),
    (b'"segment_id":"S1"', b'"segment_id":"S\x01"'),
    (b'"segment_id":"S1"', b'"segment_id":"S\xff"'),
    (b'"segment_id":"S1"', b'"segment_id":"S\xc3\xa9\xe2\x82\xac"'),
    (b'"segment_id":"S1"', b'"segment_\\u0069d":"S1"'),
    (b'"segment_id":"S1"', b'"segment_id":"S1\\'),
    (b'"volume_serial":null', b'"volume_serial":"L90001"'),
    (b',"volume_serial":null', b''),
    (b'"volume_serial":null', b'"volume_serial":7'),
    (b'c"}],', b'c"} ],'),
    (b'c"}],', b'c"},],'),
    (b'c"}],', b'c"}]],'),
    (b'c"}],\n"skipped":[],\n"directories":[],\n"symlinks":[]}', b'c"}]}'),  # the last list
    (b'c"}],\n"skipped":[],\n"directories":[],\n"symlinks":[]}', b'c"}]} '),
    (b'b"},\n{"segment_id":"S2"', b'b"}, \n{"segment_id":"S2"'),
    (b'b"},\n{"segment_id":"S2"', b'b"}\n{"segment_id":"S2"'),
    (b'\n{"segment_id":"S1"', b'\n{}, {"segment_id":"S1"'),
    (b'\n{"segment_id":"S1"', b'\n{},\n{"segment_id":"S1"'),
    (b'\n{"segment_id":"S1"', b'\n[1],\n{"segment_id":"S1"'),
    (b'\n{"segment_id":"S1"', b'\n{"segment_id":{"a":1},"x":1},\n{"segment_id":"S1"'),
])
def test_c_decoder_leaves_every_odd_line_to_python_and_agrees_with_it(
        native: ModuleType, old: bytes, new: bytes) -> None:
    assert SAMPLE.count(old) == 1
    data = SAMPLE.replace(old, new)
    assert decoded(data, native) == decoded(data, None) == lazily(data, native)


@settings(max_examples=150, deadline=None)
@given(c=catalogs)
def test_lazy_decoding_gives_the_same_catalog_and_columns_that_match_its_records(
        c: cat.Catalog) -> None:
    if BUILT is None:
        pytest.skip("ltoflow._native is not built here")
    data = b"".join(cat.JsonCatalogCodec().encode(c))
    assert lazily(data, BUILT) == c
    saved = extension.MODULE
    try:
        extension.MODULE = BUILT
        lazy = cat._decode_lines(data, lazy=True)
    finally:
        extension.MODULE = saved
    kept = lazy.segments
    event(f"segments kept as lines: {isinstance(kept, cat.RecordLines)}")
    if isinstance(kept, cat.RecordLines):
        cols = kept.columns
        digests, known = cols["sha256"]
        for k, s in enumerate(c.segments):
            assert cols["container_offset"][k] == s.container_offset
            assert cols["length_bytes"][k] == s.length_bytes
            assert cols["ids"][cols["container_id"][k]] == s.container_id
            assert (digests[32 * k:32 * k + 32], known[k]) == (bytes.fromhex(s.sha256), 1)
        # the containers' ids come first, numbered by their place; the others after them
        ids = cols["ids"]
        assert ids[:len(c.containers)] == [x.container_id for x in c.containers]
        assert set(ids[len(c.containers):]) == (
            {s.container_id for s in c.segments} - {x.container_id for x in c.containers})


def test_lines_kept_by_a_lazy_decode_read_as_a_sequence_and_encode_the_same(
        native: ModuleType, tmp_path: Path) -> None:
    segments = tuple(cat.SegmentEntry(f"S{i}", f"F{i % 7}", "C1", i, 0, 2**40 + i, "d" * 64)
                     for i in range(10_000))
    c = attrs.evolve(cat.JsonCatalogCodec().decode(SAMPLE, source="t"), segments=segments)
    data = b"".join(cat.JsonCatalogCodec().encode(c))
    lazy = cat.JsonCatalogCodec().decode(data, source="t", lazy=True)
    kept = lazy.segments
    assert isinstance(kept, cat.RecordLines)
    assert isinstance(lazy.source_files, cat.RecordLines)
    assert len(kept) == 10_000
    assert (kept[0], kept[-1], kept[4097]) == (segments[0], segments[-1], segments[4097])
    assert kept[4094:4099] == segments[4094:4099]  # across two of the decoder's batches
    with pytest.raises(IndexError):
        kept[10_000]
    assert list(kept) == list(segments)
    assert lazy == c
    assert b"".join(cat.JsonCatalogCodec().encode(lazy)) == data
    # from a file mapped into memory, as the simulator gives a catalog to verify
    path = tmp_path / "catalog.json"
    path.write_bytes(data)
    def mapped(path: Path) -> mmap.mmap:  # left open: lazy records keep views of it
        with path.open("rb") as fh:
            return mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)

    assert cat.JsonCatalogCodec().decode(mapped(path), source="t", lazy=True) == c
    assert cat.JsonCatalogCodec().decode(mapped(path), source="t") == c
    damaged = tmp_path / "damaged.json"
    damaged.write_bytes(data.replace(b'"size_bytes":5,', b'"size_bytes":[],'))
    with pytest.raises(CatalogReadError, match="not a valid catalog"):
        cat.JsonCatalogCodec().decode(mapped(damaged), source="t", lazy=True)


def test_c_decoder_reads_a_big_list_to_its_end(native: ModuleType) -> None:
    segments = tuple(cat.SegmentEntry(f"S{i}", f"F{i % 7}", "C1", i, 0, 2**40 + i, "d" * 64)
                     for i in range(10_000))
    c = attrs.evolve(cat.JsonCatalogCodec().decode(SAMPLE, source="t"), segments=segments)
    counted = CountedDecoder(native)
    assert decoded(b"".join(cat.JsonCatalogCodec().encode(c)), counted) == c
    assert counted.made == 10_000 + 1 + 1 + 1  # segments, tapes, containers, files


def _one_container(segments: list[cat.SegmentEntry], size: int) -> cat.Catalog:
    return cat.Catalog("set", "t", "/src", (), (cat.ContainerEntry("C", "set", "T", 1, 0, size),),
                       (), tuple(segments))


def _verdicts(catalog: cat.Catalog, data: bytes, chunk: int, parts: int,
              module: object) -> bytes:
    """verify's verdict on each segment of container C (in order of offset) as `data` is
    read `chunk` bytes at a time by `parts` hashers, with the C loop (`module`) or without."""
    saved = extension.MODULE
    try:
        extension.MODULE = module  # type: ignore[assignment]
        check = ContainerCheck(SegmentsByContainer(catalog).of("C"))
        updates = [check.segment_updater(p, parts) for p in range(parts)]
        for pos in range(0, len(data), chunk):
            for update in updates:
                update(memoryview(data)[pos:pos + chunk], pos)
        check.finish(len(data))
    finally:
        extension.MODULE = saved
    return bytes(check.status)


@settings(max_examples=200, deadline=None)
@given(
    data=st.tuples(st.integers(0, 4000), st.integers(0, 250)).map(
        lambda n_seed: bytes((i * 7 + n_seed[1]) % 251 for i in range(n_seed[0]))),
    # (gap before it, length, hash right): mostly tiled, with gaps, overlaps, segments past
    # the end and wrong hashes
    layout=st.lists(st.tuples(st.one_of(st.just(0), st.just(0), st.integers(-300, 500)),
                              st.one_of(st.integers(0, 60), st.integers(0, 900)),
                              st.booleans()), max_size=40),
    chunk=st.integers(1, 1500),
    parts=st.integers(1, 3),
)
def test_c_verify_gives_every_segment_the_verdict_python_gives(
        data: bytes, layout: list[tuple[int, int, bool]], chunk: int, parts: int) -> None:
    if BUILT is None:
        pytest.skip("ltoflow._native is not built here")
    ends = itertools.accumulate((gap + length for gap, length, _ in layout), initial=0)
    offsets = [max(0, end + gap) for end, (gap, _, _) in zip(ends, layout)]  # noqa: B905
    segments = [
        cat.SegmentEntry(f"S{k}", "F", "C", off, 0, length,
                         hashlib.sha256(data[off:off + length] + (b"" if right else b"x"))
                         .hexdigest())
        for k, (off, (_, length, right)) in enumerate(zip(offsets, layout, strict=True))]
    catalog = _one_container(segments, len(data))
    hashed: list[int] = []

    class Counted:
        """The extension, noting each segment check_segments hashed."""

        def check_segments(self, *args: Any) -> int:
            stop: int = BUILT.check_segments(*args)  # type: ignore[union-attr]
            hashed.extend(range(args[7], stop))
            return stop

        def group_segments(self, *args: Any) -> Any:
            return BUILT.group_segments(*args)  # type: ignore[union-attr]

    got = _verdicts(catalog, data, chunk, parts, Counted())
    assert len(hashed) == len(set(hashed))  # no segment hashed by two parts, or twice
    assert got == _verdicts(catalog, data, chunk, parts, None)
    in_order = sorted(segments, key=lambda s: (s.container_offset, s.length_bytes))
    assert list(got) == [
        0 if s.container_offset + s.length_bytes > len(data)
        else 1 if right else 2
        for s in in_order
        for right in [s.sha256 == hashlib.sha256(
            data[s.container_offset:s.container_offset + s.length_bytes]).hexdigest()]]
    event(f"verdicts {sorted(set(got))}")


def test_verify_takes_numbers_past_64_bits_and_malformed_hashes_as_never_matching(
        native: ModuleType) -> None:
    """A catalog may hold numbers no 64-bit column takes, or a hash that is not 64 lowercase
    hex digits: such a segment lies beyond the container's end, or does not match."""
    data = b"0123456789"
    good = hashlib.sha256(b"01234").hexdigest()
    empty = hashlib.sha256(b"").hexdigest()
    segments = [cat.SegmentEntry("S0", "F", "C", 0, 0, 5, good),
                cat.SegmentEntry("S1", "F", "C", 2**63, 0, 5, "0" * 64),
                cat.SegmentEntry("S2", "F", "C", 5, 0, 2**70, "0" * 64),
                cat.SegmentEntry("S3", "F", "C", 0, 0, 5, good.upper()),
                cat.SegmentEntry("S4", "F", "C", 0, 0, 5, good[:-1]),
                cat.SegmentEntry("S5", "F", "C", 0, 0, 5, good[:60] + "  " + good[62:]),
                cat.SegmentEntry("S6", "F", "C", -15, 0, 2, empty),  # ends before 0
                cat.SegmentEntry("S7", "F", "C", -1, 0, 0, empty),
                cat.SegmentEntry("S8", "F", "C", 3, 0, -2, empty)]
    catalog = _one_container(segments, len(data))
    for module in (native, None):
        table = SegmentsByContainer(catalog)
        # in order of offset, then length
        assert [table.of("C").record(k).segment_id for k in range(9)] == [
            "S6", "S7", "S0", "S3", "S4", "S5", "S8", "S2", "S1"]
        # only S0 matches: a hash with spaces (which bytes.fromhex skips) does not, and
        # neither does a record with a negative offset or length
        for chunk, parts in ((4, 2), (10, 1), (3, 3)):
            assert _verdicts(catalog, data, chunk, parts, module) == bytes(
                [0, 0, 1, 2, 2, 2, 0, 0, 0])


def test_verify_groups_a_container_listed_twice_once(native: ModuleType) -> None:
    data = bytes(range(200))
    segments = tuple(cat.SegmentEntry(f"S{k}", "F", cid, off, 0, 100,
                                      hashlib.sha256(data[off:off + 100]).hexdigest())
                     for k, (cid, off) in enumerate([("A", 0), ("B", 0), ("A", 100),
                                                     ("Z", 0), ("B", 100)]))
    base = cat.JsonCatalogCodec().decode(SAMPLE, source="t")
    c = attrs.evolve(base, containers=tuple(cat.ContainerEntry(cid, "s", "T1", k, 0, 200)
                                            for k, cid in enumerate("ABA")), segments=segments)
    encoded = b"".join(cat.JsonCatalogCodec().encode(c))
    for catalog in (c, cat.JsonCatalogCodec().decode(encoded, source="t", lazy=True)):
        for module in (native, None):
            saved = extension.MODULE
            try:
                extension.MODULE = module
                table = SegmentsByContainer(catalog)
            finally:
                extension.MODULE = saved
            assert [[table.of(cid).record(k).segment_id for k in range(len(table.of(cid)))]
                    for cid in "ABZ"] == [["S0", "S2"], ["S1", "S4"], []]
            assert table.of("A").tiles(200)
            assert table.of("B").tiles(200)
            check = ContainerCheck(table.of("A"))
            check.segment_updater(0, 1)(memoryview(data), 0)
            assert bytes(check.status) == b"\x01\x01"


def test_lazy_records_hold_no_cycle_and_notice_changed_bytes(
        native: ModuleType, tmp_path: Path) -> None:
    """A lazily read catalog frees its bytes or mapping when the last reference goes (no
    garbage collection needed); lines whose bytes changed since are an error, not records."""
    import gc

    path = tmp_path / "catalog.json"
    path.write_bytes(SAMPLE)
    with path.open("rb") as fh:
        mapped = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
    enabled = gc.isenabled()
    gc.disable()
    try:
        lazy = cat.JsonCatalogCodec().decode(mapped, source="t", lazy=True)
        assert isinstance(lazy.segments, cat.RecordLines)
        del lazy
        mapped.close()  # BufferError if the records still held a view of it
    finally:
        if enabled:
            gc.enable()
    changing = bytearray(SAMPLE)
    lazy = cat.JsonCatalogCodec().decode(changing, source="t",  # type: ignore[arg-type]
                                         lazy=True)
    assert lazy.segments[1].segment_id == "S2"
    at = SAMPLE.index(b'{"segment_id":"S2"')
    changing[at:at + 1] = b"["
    with pytest.raises(CatalogReadError, match="no longer decode"):
        lazy.segments[1]


def test_verify_finds_a_containers_segments_however_the_lines_write_its_id(
        native: ModuleType) -> None:
    """The scan numbers container ids by their raw text: an id written with an escape, or a
    containers list that comes after the segments, still groups every segment with its
    container."""
    data = bytes(range(256)) * 4
    segments = tuple(cat.SegmentEntry(f"S{k}", "F", cid, off, 0, 256,
                                      hashlib.sha256(data[off:off + 256]).hexdigest())
                     for k, (cid, off) in enumerate([("C/1", 0), ("C/1", 256), ("C2", 0),
                                                     ("C/1", 512), ("C/1", 768), ("C2", 256)]))
    c = attrs.evolve(cat.JsonCatalogCodec().decode(SAMPLE, source="t"), containers=(
        cat.ContainerEntry("C/1", "s", "T1", 1, 0, 1024), cat.ContainerEntry("C2", "s", "T1", 2,
                                                                              1024, 512)),
        segments=segments)
    plain = b"".join(cat.JsonCatalogCodec().encode(c))
    escaped = plain.replace(b'"container_id":"C/1","container_offset":256',
                            b'"container_id":"C\\/1","container_offset":256')
    assert escaped.count(b"C\\/1") == 1
    head, _, rest = plain.partition(b'\n"containers":[')
    containers, _, tail = rest.partition(b'],\n"source_files"')
    moved = head + b'\n"source_files"' + tail.replace(
        b'],\n"skipped":[', b'],\n"containers":[' + containers + b'],\n"skipped":[')
    for variant in (plain, escaped, moved):
        lazy = cat.JsonCatalogCodec().decode(variant, source="t", lazy=True)
        assert isinstance(lazy.segments, cat.RecordLines)
        assert lazy == c
        table = SegmentsByContainer(lazy)
        assert [table.of("C/1").record(k).segment_id for k in range(4)] == ["S0", "S1", "S3",
                                                                             "S4"]
        assert [table.of("C2").record(k).segment_id for k in range(2)] == ["S2", "S5"]
        assert table.of("C/1").tiles(1024)
        assert table.of("C2").tiles(512)
        check = ContainerCheck(table.of("C/1"))
        check.segment_updater(0, 1)(memoryview(data), 0)
        assert bytes(check.status) == b"\x01" * 4


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(-1, 4), st.integers(-5, 50), st.integers(-2, 50)),
                max_size=60), st.integers(0, 4))
def test_c_groups_segments_as_python_does(
        rows: list[tuple[int, int, int]], count: int) -> None:
    from ltoflow.verify import _group

    if BUILT is None:
        pytest.skip("ltoflow._native is not built here")
    groups, offsets, lengths = (array("q", [row[k] for row in rows]) for k in range(3))

    def grouped(module: object) -> tuple[list[int], list[int], list[int]]:
        saved = extension.MODULE
        try:
            extension.MODULE = module  # type: ignore[assignment]
            order, starts, ends = _group(groups, offsets, lengths, count)
        finally:
            extension.MODULE = saved
        return (list(range(len(rows))) if order is None else list(order), list(starts),
                list(ends))

    got = grouped(BUILT)
    assert got == grouped(None)
    order, starts, ends = got
    key = [(g, off, length, i) if 0 <= g < count else (count, 0, 0, i)
           for i, (g, off, length) in enumerate(rows)]
    assert order == sorted(range(len(rows)), key=key.__getitem__)
    assert starts == [sum(1 for g, *_ in key if g < k) for k in range(count + 1)]
    for g in range(count):
        mine = [rows[i] for i in order[starts[g]:starts[g + 1]] if rows[i][2] != 0]
        tiled = all(m[1] == sum(r[2] for r in mine[:j]) and m[2] > 0
                    for j, m in enumerate(mine))
        assert ends[g] == (sum(r[2] for r in mine) if tiled else -1)


def test_an_extension_built_from_older_sources_is_not_used(
        native: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    stub = (Path(extension.__file__).parent / "_native.pyi").read_text()
    assert sorted(extension.FUNCTIONS) == sorted(
        line.split("(")[0][4:] for line in stub.splitlines() if line.startswith("def "))
    assert extension.load() is native
    monkeypatch.delattr(native, "check_segments")
    assert extension.load() is None  # the Python loops then, not an AttributeError later
