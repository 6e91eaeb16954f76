"""Restore: whole sets, selections, damaged sets and hostile catalogs."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import importlib
import json
import os
import random
import re
import shutil
import stat
import subprocess
import tempfile
from functools import partial
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import attrs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ltoflow import BackupConfig, api, backup
from ltoflow.buffers import PipelineBuffer
from ltoflow.catalog import Catalog, JsonCatalogCodec, SegmentEntry
from ltoflow.cli import EXIT_DAMAGED, EXIT_OK, EXIT_USAGE, main
from ltoflow.drives.simulator import SimulatorDrive
from ltoflow.restore import TEMP_PREFIX, RestoreReport
from ltoflow.units import MiB

from .conftest import (
    SEED_FIXTURE,
    Raises,
    Unprivileged,
    tree_snapshot,
    write_odd_tree,
    write_tree,
)

KB = 1000
TREE = {
    "case-1/notes.txt": 1_500,
    "case-1/video.bin": 900 * KB,  # split across 3 tapes
    "case-2/empty.dat": 0,
    "case-2/ledger.csv": 7_000,
    **{f"case-3/scans/p{i:02d}.tif": 20 * KB + i for i in range(12)},
}


@pytest.fixture(scope="module")
def backed_up(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Catalog]:
    root = tmp_path_factory.mktemp("set")
    src = root / "src"
    write_tree(src, TREE)
    (src / "case-1" / "notes.txt").chmod(0o600)
    (src / "case-2" / "ledger.csv").chmod(0o640)
    for n, f in enumerate(sorted(src.rglob("*"))):
        if f.is_file():
            os.utime(f, ns=(1_600_000_000_000_000_000, 1_600_000_000_123_456_789 + n * 10**9))
    config = BackupConfig(source_root=src, tapes_root=root / "tapes",
                          tape_nominal_capacity_bytes=450 * KB,
                          max_container_size_bytes=100 * KB)
    result = backup(config)
    assert len(result.tapes) >= 3
    return src, root / "tapes", result.catalog


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def tree_state(root: Path) -> dict[str, tuple[bytes, int, int]]:
    return {
        str(p.relative_to(root)): (p.read_bytes(), p.stat().st_mode, p.stat().st_mtime_ns)
        for p in sorted(root.rglob("*")) if p.is_file()
    }


def restore(tapes: Path, target: Path, *patterns: str, catalog: Catalog | None = None,
            overwrite: bool = False) -> RestoreReport:
    import trio

    components = api.Components(drive=SimulatorDrive(tapes))
    return trio.run(lambda: api.restore_async(components, target, patterns, catalog=catalog,
                                              overwrite=overwrite))


def test_full_restore_equals_the_source(backed_up: tuple[Path, Path, Catalog],
                                        tmp_path: Path) -> None:
    src, tapes, _ = backed_up
    report = restore(tapes, tmp_path / "out")
    assert report.ok
    assert report.restored == report.requested == len(TREE)
    assert tree_state(tmp_path / "out") == tree_state(src)  # bytes, modes, mtimes (ns)
    assert not list((tmp_path / "out").rglob(TEMP_PREFIX + "*"))


def test_file_split_across_three_tapes_comes_back(backed_up: tuple[Path, Path, Catalog],
                                                  tmp_path: Path) -> None:
    src, tapes, _catalog = backed_up
    report = restore(tapes, tmp_path / "out", "case-1/video.bin")
    assert report.ok
    assert len(report.tapes) >= 3
    assert [p.name for p in (tmp_path / "out").rglob("*") if p.is_file()] == ["video.bin"]
    assert (tmp_path / "out/case-1/video.bin").read_bytes() == (
        src / "case-1/video.bin").read_bytes()


@pytest.mark.parametrize(
    ("patterns", "expected"),
    [
        (["case-2/ledger.csv"], {"case-2/ledger.csv"}),
        (["case-2"], {"case-2/ledger.csv", "case-2/empty.dat"}),
        (["case-3/scans/p0?.tif"], {f"case-3/scans/p0{i}.tif" for i in range(10)}),
        (["*.csv", "case-1/notes.txt"], {"case-2/ledger.csv", "case-1/notes.txt"}),
        # written as the shell completes them, relative to the target
        (["./case-2/", "./case-3/scans/p0?.tif"],
         {"case-2/ledger.csv", "case-2/empty.dat",
          *(f"case-3/scans/p0{i}.tif" for i in range(10))}),
        # a glob that matches a directory selects everything under it, as its name does
        (["case-[12]"], {"case-1/notes.txt", "case-1/video.bin", "case-2/ledger.csv",
                         "case-2/empty.dat"}),
        (["case-?/scans"], {f"case-3/scans/p{i:02d}.tif" for i in range(12)}),
    ],
)
def test_selections_restore_only_what_they_name(
    backed_up: tuple[Path, Path, Catalog], tmp_path: Path, patterns: list[str],
    expected: set[str],
) -> None:
    _, tapes, _ = backed_up
    report = restore(tapes, tmp_path / "out", *patterns)
    assert report.ok
    assert set(tree_state(tmp_path / "out")) == expected


def test_pieces_of_files_that_need_a_missing_tape_are_not_read(
    seed_tapes: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Tape 3 is not in the simulator directory: page-001.tif (on tapes 2 and 3) and
    page-002.tif (tape 3) cannot come back, so the 43,800 bytes of page-001.tif on tape 2 are
    not read for nothing; with a real drive, a tape holding only such pieces is not asked
    for. Everything else is restored."""
    from ltoflow.drives.simulator import SimulatorReader

    reads: dict[str, int] = {}
    readinto = SimulatorReader.readinto

    async def counted(self: SimulatorReader, buf: memoryview) -> int:
        n = await readinto(self, buf)
        reads[self._tape.tape_id] = reads.get(self._tape.tape_id, 0) + n
        return n

    monkeypatch.setattr(SimulatorReader, "readinto", counted)
    tapes = sorted(seed_tapes.iterdir())
    shutil.rmtree(tapes[2])
    report = restore(seed_tapes, tmp_path / "out")
    assert sorted(p.relative_path for p in report.problems) == [
        "case-002/scans/page-001.tif", "case-002/scans/page-002.tif"]
    assert report.restored == 4
    # tape 2: the rest of video.bin (151,200 bytes) and ledger.csv (5,000), not page-001's
    assert reads == {tapes[0].name: 200_000, tapes[1].name: 156_200}
    # video.bin alone, tape 1 gone: tape 2, which holds only the rest of it, is not loaded
    shutil.rmtree(tapes[0])
    reads.clear()
    report = restore(seed_tapes, tmp_path / "one", "case-001/video.bin")
    assert [p.relative_path for p in report.problems] == ["case-001/video.bin"]
    assert (report.tapes, report.tapes_read, reads) == ((tapes[0].name, tapes[1].name), (), {})


def test_existing_files_are_kept_unless_overwrite(backed_up: tuple[Path, Path, Catalog],
                                                  tmp_path: Path) -> None:
    src, tapes, _ = backed_up
    out = tmp_path / "out"
    (out / "case-2").mkdir(parents=True)
    (out / "case-2" / "ledger.csv").write_bytes(b"mine")
    report = restore(tapes, out, "case-2")
    assert not report.ok
    assert [p.relative_path for p in report.problems] == ["case-2/ledger.csv"]
    assert "--overwrite" in report.problems[0].what
    assert (out / "case-2" / "ledger.csv").read_bytes() == b"mine"
    assert (out / "case-2" / "empty.dat").exists()
    assert restore(tapes, out, "case-2", overwrite=True).ok
    assert (out / "case-2" / "ledger.csv").read_bytes() == (src / "case-2/ledger.csv").read_bytes()


def test_which_paths_exist_is_asked_once_a_directory_below_one_that_does_not(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The restore's plan asks the target about each file only in directories that exist:
    a new target costs one question a directory, whatever the number of files."""
    r = importlib.import_module("ltoflow.restore")  # `ltoflow.restore` is also a function

    out = tmp_path / "out"
    (out / "kept").mkdir(parents=True)
    (out / "kept" / "there").write_bytes(b"x")
    (out / "file").write_bytes(b"x")
    asked: list[tuple[bytes, ...]] = []
    real = r._exists

    def counting(target: Path, parts: tuple[bytes, ...]) -> bool:
        asked.append(parts)
        return bool(real(target, parts))

    monkeypatch.setattr(r, "_exists", counting)
    exists = r._Existing(out)
    paths = [(b"kept", b"there"), (b"kept", b"other"), (b"file",), (b"file", b"under"),
             *((b"new", b"d%d" % (i % 3), b"f%d" % i) for i in range(300))]
    answers = [exists(p) for p in paths]
    # the directory kept, the two files in it; the file, as a file and as a directory, and
    # what would be under it; the directory new, and nothing under it
    assert asked == [(b"kept",), (b"kept", b"there"), (b"kept", b"other"), (b"file",),
                     (b"file",), (b"file", b"under"), (b"new",)]
    assert answers[:4] == [True, False, True, False]
    assert answers == [real(out, p) for p in paths]
    assert r._Existing(tmp_path / "none")((b"a", b"b")) is False


class _ContainerReader:
    """A container's bytes, read back at most `rng`-chosen lengths at a time (none past the
    end, where a seek may go)."""

    def __init__(self, data: bytes, rng: random.Random) -> None:
        self.data, self.pos, self.rng = data, 0, rng

    async def seek(self, pos: int) -> None:
        self.pos = pos

    async def readinto(self, view: memoryview) -> int:
        n = max(0, min(len(view), len(self.data) - self.pos, self.rng.randint(1, len(view))))
        view[:n] = self.data[self.pos:self.pos + n]
        self.pos += n
        return n

    async def close(self) -> None:
        pass


class _RangeSink:
    """Stands in for the file writer: what each range (one a job here) got, and its hash."""

    def __init__(self) -> None:
        self.bytes: dict[int, bytearray] = {}
        self.written: dict[int, int] = {}
        self.digests: dict[int, list[str]] = {}

    def write(self, job: int, seg: SegmentEntry, piece: memoryview, at: int) -> None:
        assert at >= 0
        assert at + len(piece) <= seg.length_bytes
        self.bytes.setdefault(job, bytearray(seg.length_bytes))[at:at + len(piece)] = piece
        self.written[job] = self.written.get(job, 0) + len(piece)

    def segment_done(self, job: int, seg: SegmentEntry, digest: str) -> None:
        self.digests.setdefault(job, []).append(digest)


@pytest.mark.parametrize("seed", range(0, 200, 20))
async def test_every_range_of_a_container_gets_its_bytes_once_however_the_reads_fall(
        seed: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Reading a container for restore: whatever the chunk size, short reads, the gaps that
    split it into spans, and ranges that overlap (a damaged catalog), each range is written
    exactly its bytes once and finished once with their SHA-256. Twenty cases per seed."""
    r = importlib.import_module("ltoflow.restore")  # `ltoflow.restore` is also a function
    for case in range(seed, seed + 20):
        rng = random.Random(case)
        size = rng.randint(50, 400)
        data = rng.randbytes(size)
        monkeypatch.setattr(r, "SEEK_GAP_BYTES", rng.choice([0, 3, 20, 1 << 40]))
        ranges = []
        for job in range(rng.randint(1, 30)):
            start = rng.randrange(size - 1)
            end = rng.randint(start + 1, min(size, start + rng.choice([2, 10, 80])))
            seg = SegmentEntry(f"s{job}", "f", "c", start, 0, end - start, "0" * 64)
            ranges.append(r._Range(job, seg))
        ranges.sort(key=lambda x: (x.start, x.end))
        pool = PipelineBuffer(1 << 20)
        pool.chunk_bytes = rng.randint(1, 16)  # many chunks a range, and many ranges a chunk
        tape = SimpleNamespace(open_read=partial(_open_reader, data, rng))
        sink = _RangeSink()
        read = await r._restore_container(tape, SimpleNamespace(container_id="c"), ranges,
                                          sink, pool)
        wanted = set().union(*(range(x.start, x.end) for x in ranges))
        assert len(wanted) <= read <= size  # every wanted byte read, none twice
        for x in ranges:
            want = data[x.start:x.end]
            assert bytes(sink.bytes[x.job]) == want, case
            assert sink.written[x.job] == len(want), case
            assert sink.digests[x.job] == [hashlib.sha256(want).hexdigest()], case


@pytest.mark.parametrize("seed", range(0, 100, 20))
async def test_a_container_cut_short_writes_every_range_before_the_cut(
        seed: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """The chunks read before the end are all written, those still queued included: every
    range that ends by the cut is completed with its bytes, none past it is, and the container
    is reported short only when some range goes past the cut."""
    r = importlib.import_module("ltoflow.restore")
    monkeypatch.setattr(r, "READ_AHEAD", 8)  # room for many chunks in the queue at the end
    for case in range(seed, seed + 20):
        rng = random.Random(case)
        size = rng.randint(50, 400)
        data = rng.randbytes(size)
        cut = rng.randint(0, size)
        ranges = []
        for job in range(rng.randint(1, 30)):
            start = rng.randrange(size - 1)
            end = rng.randint(start + 1, min(size, start + rng.choice([2, 10, 80])))
            ranges.append(r._Range(job, SegmentEntry(f"s{job}", "f", "c", start, 0, end - start,
                                                     "0" * 64)))
        ranges.sort(key=lambda x: (x.start, x.end))
        pool = PipelineBuffer(1 << 20)
        pool.chunk_bytes = rng.randint(1, 16)
        tape = SimpleNamespace(open_read=partial(_open_reader, data[:cut], rng))
        sink = _RangeSink()
        completed: set[int] = set()
        short = any(x.end > cut for x in ranges)
        with Raises(r._ShortContainer, "ends at byte") if short else contextlib.nullcontext():
            await r._restore_container(tape, SimpleNamespace(container_id="c"), ranges, sink,
                                       pool, None, completed)
        assert {x.job for x in ranges if id(x) in completed} == {
            x.job for x in ranges if x.end <= cut}, case
        for x in ranges:
            if x.end <= cut:
                assert bytes(sink.bytes[x.job]) == data[x.start:x.end], case


async def _open_reader(data: bytes, rng: random.Random, path: str) -> _ContainerReader:
    assert path == "data/c"
    return _ContainerReader(data, rng)


def _copy_and_find(backed_up: tuple[Path, Path, Catalog], tmp_path: Path,
                   rel: str) -> tuple[Path, SegmentEntry, Path]:
    """A copy of the set's tapes to damage; the first segment of file `rel`, and the file of
    its container in the copy."""
    _, tapes, catalog = backed_up
    copy = tmp_path / "tapes"
    shutil.copytree(tapes, copy)
    entry = next(f for f in catalog.source_files if f.relative_path == rel)
    seg = next(s for s in catalog.segments if s.file_id == entry.file_id)
    cont = next(c for c in catalog.containers if c.container_id == seg.container_id)
    return copy, seg, copy / cont.tape_id / "data" / cont.container_id


def test_corrupted_container_restores_everything_else_and_names_the_damage(
    backed_up: tuple[Path, Path, Catalog], tmp_path: Path
) -> None:
    src = backed_up[0]
    copy, seg, blob = _copy_and_find(backed_up, tmp_path, "case-2/ledger.csv")
    data = bytearray(blob.read_bytes())
    data[seg.container_offset + 10] ^= 0xFF
    blob.write_bytes(bytes(data))
    report = restore(copy, tmp_path / "out")
    assert [p.relative_path for p in report.problems] == ["case-2/ledger.csv"]
    assert "damaged" in report.problems[0].what
    assert report.restored == len(TREE) - 1
    restored = tree_state(tmp_path / "out")
    assert "case-2/ledger.csv" not in restored
    assert {k: v for k, v in tree_state(src).items() if k != "case-2/ledger.csv"} == restored
    assert not list((tmp_path / "out").rglob(TEMP_PREFIX + "*"))


def test_a_container_cut_short_fails_only_the_files_it_holds_past_the_cut(
    backed_up: tuple[Path, Path, Catalog], tmp_path: Path
) -> None:
    src, _, catalog = backed_up
    copy, seg, blob = _copy_and_find(backed_up, tmp_path, "case-3/scans/p05.tif")
    by_id = {f.file_id: f.relative_path for f in catalog.source_files}
    cut = seg.container_offset + 100
    blob.write_bytes(blob.read_bytes()[:cut])
    in_it = [s for s in catalog.segments if s.container_id == seg.container_id]
    before = {by_id[s.file_id] for s in in_it if s.container_offset + s.length_bytes <= cut}
    past = {by_id[s.file_id] for s in in_it if s.container_offset + s.length_bytes > cut}
    assert before - past  # files wholly before the cut, in the same container
    report = restore(copy, tmp_path / "out")
    assert {p.relative_path for p in report.problems} == past
    assert all("ends at byte" in p.what for p in report.problems)
    assert report.restored == len(TREE) - len(past)
    restored = tree_state(tmp_path / "out")
    assert {k: v for k, v in tree_state(src).items() if k not in past} == restored


def test_missing_tape_fails_only_its_files(backed_up: tuple[Path, Path, Catalog],
                                           tmp_path: Path) -> None:
    _, tapes, catalog = backed_up
    copy = tmp_path / "tapes"
    shutil.copytree(tapes, copy)
    last = max(catalog.tapes, key=lambda t: t.sequence_number)
    shutil.rmtree(copy / last.tape_id)
    report = restore(copy, tmp_path / "out")
    failed = {p.relative_path for p in report.problems}
    assert "case-1/video.bin" in failed or any("case-3" in f for f in failed)
    assert all("tape not available" in p.what for p in report.problems)
    assert report.restored == len(TREE) - len(failed)


def hostile(catalog: Catalog, **changes: object) -> Catalog:
    """The catalog with the first file (notes.txt, one segment) changed."""
    f = catalog.source_files[0]
    assert f.relative_path == "case-1/notes.txt"
    files = (attrs.evolve(f, **changes), *catalog.source_files[1:])  # type: ignore[arg-type]
    return attrs.evolve(catalog, source_files=files)


@pytest.mark.parametrize("path", ["/etc/evil", "../escape", "case-1/../../escape", "a//b", ""])
def test_paths_that_leave_the_target_are_refused(
    backed_up: tuple[Path, Path, Catalog], tmp_path: Path, path: str
) -> None:
    _, tapes, catalog = backed_up
    out = tmp_path / "deep" / "out"
    report = restore(tapes, out, catalog=hostile(catalog, relative_path=path))
    (problem,) = report.problems
    assert problem.relative_path == path
    assert "refused" in problem.what
    assert report.restored == len(TREE) - 1
    assert {p.name for p in tmp_path.iterdir()} == {"deep"}
    assert {p.name for p in (tmp_path / "deep").iterdir()} == {"out"}


def test_a_symlink_inside_the_target_is_never_followed(
    backed_up: tuple[Path, Path, Catalog], tmp_path: Path
) -> None:
    _, tapes, _ = backed_up
    outside = tmp_path / "outside"
    outside.mkdir()
    out = tmp_path / "out"
    out.mkdir()
    (out / "case-1").symlink_to(outside)
    report = restore(tapes, out)
    assert {p.relative_path for p in report.problems} == {
        "case-1", "case-1/notes.txt", "case-1/video.bin"}  # the directory's mode is not set either
    assert all("symlink" in p.what for p in report.problems)
    assert list(outside.iterdir()) == []
    assert (outside.stat().st_mode & 0o777) == 0o755 & ~_umask()
    assert (out / "case-2" / "ledger.csv").exists()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ("overlap", "overlap"),
        ("gap", "leave a gap"),
        ("beyond", "beyond the end"),
        ("missing-container", "not in the catalog"),
        ("size", "add up to"),
    ],
)
def test_inconsistent_segments_are_reported_per_file(
    backed_up: tuple[Path, Path, Catalog], tmp_path: Path, change: str, message: str
) -> None:
    _, tapes, catalog = backed_up
    video = next(f for f in catalog.source_files if f.relative_path == "case-1/video.bin")
    segs = [s for s in catalog.segments if s.file_id == video.file_id]
    first, second = segs[0], segs[1]
    if change == "size":
        bad = attrs.evolve(catalog, source_files=tuple(
            attrs.evolve(f, size_bytes=f.size_bytes + 1) if f == video else f
            for f in catalog.source_files))
    else:
        new = {
            "overlap": attrs.evolve(second, source_offset=second.source_offset - 1),
            "gap": attrs.evolve(second, source_offset=second.source_offset + 1),
            "beyond": attrs.evolve(first, container_offset=10**9),
            "missing-container": attrs.evolve(first, container_id="CNT-nope"),
        }[change]
        old = second if change in ("overlap", "gap") else first
        bad = attrs.evolve(catalog, segments=tuple(new if s == old else s
                                                   for s in catalog.segments))
    report = restore(tapes, tmp_path / "out", catalog=bad)
    (problem,) = report.problems
    assert problem.relative_path == "case-1/video.bin"
    assert message in problem.what
    assert report.restored == len(TREE) - 1


def test_seed_format_set_restores_byte_for_byte(seed_tapes: Path, tmp_path: Path) -> None:
    report = restore(seed_tapes, tmp_path / "out")
    assert report.ok
    source = SEED_FIXTURE / "source"
    expected = {str(p.relative_to(source)): p.read_bytes()
                for p in source.rglob("*") if p.is_file()}
    got = {str(p.relative_to(tmp_path / "out")): p.read_bytes()
           for p in (tmp_path / "out").rglob("*") if p.is_file()}
    assert got == expected


def test_cli_dry_run_lists_tapes_in_order_and_writes_nothing(
    backed_up: tuple[Path, Path, Catalog], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _, tapes, catalog = backed_up
    code = main(["restore", "--simulator", str(tapes), "--target", str(tmp_path / "out"),
                 "--dry-run", "case-1/video.bin"])
    out = capsys.readouterr().out
    assert code == EXIT_OK
    ids = [t.tape_id for t in sorted(catalog.tapes, key=lambda t: t.sequence_number)]
    positions = [out.index(i) for i in ids if i in out]
    assert len(positions) >= 3
    assert positions == sorted(positions)
    assert "900.00 kB to read" in out
    assert not (tmp_path / "out").exists()


def test_cli_restore_from_a_catalog_file_reports_failures_with_exit_1(
    backed_up: tuple[Path, Path, Catalog], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _, tapes, catalog = backed_up
    cat_file = tmp_path / "catalog.json"
    cat_file.write_bytes(b"".join(JsonCatalogCodec().encode(
        hostile(catalog, relative_path="../x"))))
    code = main(["restore", "--simulator", str(tapes), "--target", str(tmp_path / "out"),
                 "--catalog", str(cat_file)])
    out = capsys.readouterr().out
    assert code == EXIT_DAMAGED
    assert "FAILED ../x: refused" in out
    assert f"Restored {len(TREE) - 1} of {len(TREE)} file(s)" in out


def test_cli_restore_refuses_a_catalog_of_another_set_and_a_missing_one(
    backed_up: tuple[Path, Path, Catalog], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _, tapes, _ = backed_up
    write_tree(tmp_path / "other", {"x.txt": 10})
    other = backup(BackupConfig(source_root=tmp_path / "other", tapes_root=tmp_path / "o",
                                tape_nominal_capacity_bytes=450 * KB,
                                max_container_size_bytes=100 * KB))
    cat_file = next((tmp_path / "o").iterdir()) / "catalog" / "catalog.json"
    target = tmp_path / "out"
    (tmp_path / "empty").mkdir()
    for catalog_given, sim, needle in (
            (cat_file, tapes, f"the catalog given is of backup set "
                              f"{other.catalog.backup_set_id}, but simulator"),
            (cat_file, tmp_path / "empty", "(it holds no tape at all)"),
            (tmp_path / "nope.json", tapes, "cannot read the catalog file")):
        code = main(["restore", "--simulator", str(sim), "--target", str(target),
                     "--catalog", str(catalog_given)])
        assert code == EXIT_USAGE
        err = capsys.readouterr().err
        assert needle in err
        assert len(err.strip().splitlines()) == 1
        assert not target.exists()


def test_cli_catalog_ls_and_show(backed_up: tuple[Path, Path, Catalog],
                                 capsys: pytest.CaptureFixture[str]) -> None:
    _, tapes, catalog = backed_up
    assert main(["catalog", "--simulator", str(tapes), "ls", "case-1", "--json"]) == EXIT_OK
    rows = json.loads(capsys.readouterr().out)
    assert [(r["kind"], r["relative_path"]) for r in rows] == [
        ("file", "case-1/notes.txt"), ("file", "case-1/video.bin"), ("directory", "case-1")]
    assert len(rows[1]["tapes"]) >= 3
    assert main(["catalog", "--simulator", str(tapes), "show", "--json"]) == EXIT_OK
    doc = json.loads(capsys.readouterr().out)
    assert doc["files"] == len(TREE)
    assert (doc["directories"], doc["symlinks"]) == (4, 0)
    assert doc["bytes"] == sum(TREE.values())
    assert doc["backup_set_id"] == catalog.backup_set_id
    assert main(["catalog", "--simulator", str(tapes), "ls"]) == EXIT_OK
    assert "case-3/scans/p11.tif" in capsys.readouterr().out


def test_a_hostile_file_id_cannot_reach_outside_the_target(
    backed_up: tuple[Path, Path, Catalog], tmp_path: Path
) -> None:
    _, tapes, catalog = backed_up
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    empty = next(f for f in catalog.source_files if f.size_bytes == 0)
    evil = attrs.evolve(empty, file_id="abc/../../victim", relative_path="z")
    bad = attrs.evolve(catalog, source_files=(*catalog.source_files, evil))
    restore(tapes, tmp_path / "out", catalog=bad)
    assert victim.read_bytes() == b"precious"
    assert (tmp_path / "out" / "z").read_bytes() == b""


def test_shared_file_ids_are_reported_not_guessed(
    backed_up: tuple[Path, Path, Catalog], tmp_path: Path
) -> None:
    _, tapes, catalog = backed_up
    notes = catalog.source_files[0]
    twin = attrs.evolve(notes, relative_path="twin.txt")
    report = restore(tapes, tmp_path / "out", catalog=attrs.evolve(
        catalog, source_files=(*catalog.source_files, twin)))
    assert {p.relative_path for p in report.problems} == {"case-1/notes.txt", "twin.txt"}
    assert all("shared" in p.what for p in report.problems)


async def test_read_errors_on_many_containers_never_hang_verify_or_restore(
    backed_up: tuple[Path, Path, Catalog], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each failed read used to keep its pool buffer; after a few, the next read waited forever."""
    import trio

    from ltoflow.drives.simulator import SimulatorReader
    from ltoflow.errors import TapeReadError

    _, tapes, catalog = backed_up
    assert len(catalog.containers) > 8  # more than the read pool has buffers

    async def failing(self: SimulatorReader, buf: memoryview) -> int:
        raise TapeReadError("medium error")

    async def failing_map(self: SimulatorReader, offset: int, length: int) -> None:
        raise TapeReadError("medium error")

    monkeypatch.setattr(SimulatorReader, "readinto", failing)
    monkeypatch.setattr(SimulatorReader, "map_chunk", failing_map)  # verify maps, restore reads
    components = api.Components(drive=SimulatorDrive(tapes))
    with trio.fail_after(60):
        report = await api.verify_async(components)
        restored = await api.restore_async(components, tmp_path / "out", catalog=catalog)
    assert len([p for p in report.problems if "medium error" in p.what and p.container_id]
               ) == len(catalog.containers)
    # The other tapes' catalog copies are read (and hashed) through the same reads: reported
    # too. (The copy the set's catalog was read from, whole, is not read again.)
    assert {p.tape_id for p in report.problems if p.container_id is None} == {
        t.tape_id for t in catalog.tapes} - {report.catalog_found_on}
    assert restored.restored == sum(1 for f in catalog.source_files if f.size_bytes == 0)
    assert all("medium error" in p.what for p in restored.problems)


async def test_an_unload_that_fails_after_a_clean_job_is_not_swallowed(
    backed_up: tuple[Path, Path, Catalog], tmp_path: Path
) -> None:
    """Releasing quietly is for error paths only: 'do not eject' must reach the operator."""
    from ltoflow.errors import TapeNotLoadedError

    class StuckDrive(SimulatorDrive):
        async def unload(self) -> None:
            await super().unload()
            raise TapeNotLoadedError("ltfs is still writing the index; do NOT eject")

    _, tapes, _ = backed_up
    components = api.Components(drive=StuckDrive(tapes))
    with Raises(TapeNotLoadedError, match="do NOT eject"):
        await api.verify_async(components)
    with Raises(TapeNotLoadedError, match="do NOT eject"):
        await api.restore_async(components, tmp_path / "out", ["case-2/ledger.csv"])


@pytest.fixture(scope="module")
def odd_set(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Catalog]:
    """The odd tree of conftest.write_odd_tree, backed up to the simulator."""
    root = tmp_path_factory.mktemp("odd")
    src = root / "src"
    write_odd_tree(src)
    config = BackupConfig(source_root=src, tapes_root=root / "tapes",
                          tape_nominal_capacity_bytes=2_000 * KB,  # the deep paths' catalog
                          max_container_size_bytes=100 * KB)
    result = backup(config)
    return src, root / "tapes", result.catalog


def test_odd_tree_comes_back_exactly(odd_set: tuple[Path, Path, Catalog], tmp_path: Path) -> None:
    src, tapes, catalog = odd_set
    assert [(s.relative_path, s.kind) for s in catalog.skipped] == [("pipe", "fifo")]
    report = restore(tapes, tmp_path / "out")
    assert report.ok, report.problems
    before = tree_snapshot(src)
    assert tree_snapshot(tmp_path / "out") == before  # names, bytes, targets, modes, mtimes
    assert report.symlinks_restored == sum(k == "symlink" for k, *_ in before.values())
    assert report.directories_restored == sum(k == "dir" for k, *_ in before.values())
    assert (tmp_path / "out" / "to-etc").readlink() == Path("/etc")
    assert not (Path("/etc") / "readme.txt").exists()


def test_odd_names_are_selected_by_their_exact_bytes_or_their_rendering(
    odd_set: tuple[Path, Path, Catalog], tmp_path: Path
) -> None:
    _, tapes, _ = odd_set
    exact = os.fsdecode(b"odd-\xff\xfe/caf\xe9.txt")  # what the shell hands over
    report = restore(tapes, tmp_path / "a", exact, "\\xe9\\xe9.bin")
    assert report.ok
    assert report.restored == 2
    assert sorted(tree_snapshot(tmp_path / "a")) == [
        b"odd-\xff\xfe", b"odd-\xff\xfe/caf\xe9.txt", b"\xe9\xe9.bin"]
    report = restore(tapes, tmp_path / "b", "odd-\\xff\\xfe")  # as `catalog ls` shows it
    assert report.ok
    assert {p.rsplit(b"/", 1)[-1] for p in tree_snapshot(tmp_path / "b")} == {
        b"odd-\xff\xfe", b"caf\xe9.txt", b"new\nline", b"back\\xffslash", b"link-\x80"}
    # a newline as `catalog ls` shows it, copied from there
    report = restore(tapes, tmp_path / "c", r"odd-\xff\xfe/new\nline")
    assert (report.ok, sorted(tree_snapshot(tmp_path / "c"))) == (
        True, [b"odd-\xff\xfe", b"odd-\xff\xfe/new\nline"])


def test_deep_path_over_path_max_round_trips(odd_set: tuple[Path, Path, Catalog],
                                             tmp_path: Path) -> None:
    _, tapes, catalog = odd_set
    (deep,) = [f for f in catalog.source_files if f.path_bytes.endswith(b"bottom-\xff.txt")]
    assert len(deep.path_bytes) > 4096
    report = restore(tapes, tmp_path / "out", os.fsdecode(deep.path_bytes))
    assert report.ok
    assert report.restored == 1
    snap = tree_snapshot(tmp_path / "out")
    assert snap[deep.path_bytes][1] == b"deep down\n"


@pytest.mark.parametrize("with_file", [True, False])
def test_restore_never_writes_through_a_symlink_it_just_made(
    odd_set: tuple[Path, Path, Catalog], tmp_path: Path, with_file: bool
) -> None:
    """A hostile catalog: a link `esc` to a directory outside, and a directory (and a file)
    below `esc`. Nothing may land outside."""
    _, tapes, catalog = odd_set
    outside = tmp_path / "outside"
    outside.mkdir()
    link = attrs.evolve(catalog.symlinks[0], relative_path="esc", target=str(outside),
                        relative_path_b64=None, target_b64=None)
    f = catalog.source_files[0]
    hostile_file = attrs.evolve(f, relative_path="esc/planted", relative_path_b64=None)
    hostile_dir = attrs.evolve(catalog.directories[0], relative_path="esc/sub",
                               relative_path_b64=None)
    hostile = attrs.evolve(
        catalog, symlinks=(link,), directories=(hostile_dir,),
        source_files=(hostile_file,) if with_file else (),
        segments=tuple(s for s in catalog.segments if s.file_id == f.file_id and with_file))
    out = tmp_path / "out"
    report = restore(tapes, out, catalog=hostile)
    assert list(outside.iterdir()) == []
    assert not report.ok
    if with_file:  # the file came first and made `esc` a directory: the link is refused
        assert (out / "esc" / "planted").is_file()
        assert not (out / "esc").is_symlink()
        assert [(p.relative_path, p.what) for p in report.problems] == [
            ("esc", "refused: already exists in the target; use --overwrite to replace it")]
    else:  # the link came first: the directory below it is refused, not made outside
        assert (out / "esc").readlink() == outside
        assert [(p.relative_path, p.what) for p in report.problems] == [
            ("esc/sub", "refused: esc in the target is a symlink or not a directory")]


def test_a_second_restore_replaces_links_only_with_overwrite(
    odd_set: tuple[Path, Path, Catalog], tmp_path: Path
) -> None:
    src, tapes, _ = odd_set
    out = tmp_path / "out"
    assert restore(tapes, out, "docs").ok
    (out / "docs" / "to-readme").unlink()
    (out / "docs" / "to-readme").write_bytes(b"not a link")
    again = restore(tapes, out, "docs/to-readme")
    assert [(p.relative_path, p.what) for p in again.problems] == [
        ("docs/to-readme", "already exists in the target and differs from the backup; use "
                           "--overwrite to replace it")]
    assert restore(tapes, out, "docs", overwrite=True).ok
    assert (out / "docs" / "to-readme").readlink() == Path("readme.txt")
    want = {k: v for k, v in tree_snapshot(src).items() if k.startswith(b"docs")}
    assert tree_snapshot(out) == want


def test_cli_lists_links_and_directories_of_odd_names(
    odd_set: tuple[Path, Path, Catalog], capsys: pytest.CaptureFixture[str]
) -> None:
    _, tapes, _ = odd_set
    assert main(["catalog", "--simulator", str(tapes), "ls", "odd-\\xff\\xfe"]) == EXIT_OK
    lines = capsys.readouterr().out.splitlines()
    ends = ["odd-\\xff\\xfe/back\\xffslash", "odd-\\xff\\xfe/caf\\xe9.txt",
            "odd-\\xff\\xfe/new\\nline", "odd-\\xff\\xfe/link-\\x80 -> target-\\x81\\n",
            "odd-\\xff\\xfe/"]
    assert len(lines) == len(ends)
    for line, end in zip(lines, ends, strict=True):
        assert line.endswith(" " + end)
    assert lines[3].lstrip().startswith("symlink")
    assert lines[4].lstrip().startswith("dir 0755")


def test_an_unprivileged_rerun_restores_into_the_directories_the_first_run_locked(
    unprivileged: Unprivileged,
) -> None:
    """The first restore gives directories the backup's modes (0555, 000) at its end; a second
    run by the same normal user (a file was removed, a tape was missing) opens them up to
    restore into them, compares a mode-000 file it owns, and puts every mode back."""
    base = unprivileged.base
    src, tapes, target = base / "src", base / "tapes", base / "target"
    contents = write_tree(src, {"locked/a.bin": 3000, "shut/inner/b.bin": 2000,
                                "shut/c.bin": 1000, "top/secret.bin": 500, "plain.bin": 700})
    modes = {"locked": 0o555, "shut/inner": 0o555, "shut": 0o000, "top/secret.bin": 0o000,
             "top": 0o755, "plain.bin": 0o644, "locked/a.bin": 0o444,
             "shut/inner/b.bin": 0o644, "shut/c.bin": 0o600}
    for rel, mode in sorted(modes.items(), key=lambda kv: -kv[0].count("/")):
        (src / rel).chmod(mode)
    backup(BackupConfig(source_root=src, tapes_root=tapes, tape_nominal_capacity_bytes=10**9,
                        max_container_size_bytes=10**6))

    def restore_as_nobody(*extra: str) -> dict[str, Any]:
        done = unprivileged.ltoflow("restore", "--simulator", tapes, "--target", target,
                                    "--json", *extra)
        assert done.returncode == EXIT_OK, done.stdout + done.stderr
        doc: dict[str, Any] = json.loads(done.stdout)
        return doc

    def modes_now() -> dict[str, int]:
        return {rel: stat.S_IMODE((target / rel).lstat().st_mode) for rel in modes
                if os.path.lexists(target / rel)}

    assert restore_as_nobody()["restored"] == 5
    assert modes_now() == modes
    (target / "shut/inner/b.bin").unlink()  # as root, who may
    (target / "locked/a.bin").unlink()

    dry = restore_as_nobody("--dry-run")
    assert (dry["already_present"], dry["problems"]) == (3, [])
    assert modes_now() == {rel: mode for rel, mode in modes.items()
                           if rel not in ("shut/inner/b.bin", "locked/a.bin")}

    doc = restore_as_nobody()
    assert (doc["restored"], doc["already_present"], doc["problems"]) == (2, 3, [])
    assert modes_now() == modes
    (target / "shut/inner/b.bin").unlink()  # a file alone: its directories are not restored,
    doc = restore_as_nobody("shut/inner/b.bin")  # only opened up and put back
    assert (doc["restored"], doc["directories_restored"], doc["problems"]) == (1, 0, [])
    assert modes_now() == modes
    (target / "plain.bin").chmod(0o000)  # its own, made unreadable: compared and retouched
    doc = restore_as_nobody()
    assert (doc["restored"], doc["retouched"], doc["problems"]) == (0, 1, [])
    assert modes_now() == modes
    for rel in modes:  # opened up again, by root, to read what came back
        (target / rel).chmod(modes[rel] | (0o700 if (target / rel).is_dir() else 0o600))
    assert {rel: (target / rel).read_bytes() for rel in contents} == contents


def test_a_symlink_already_there_gets_the_backups_time(tmp_path: Path) -> None:
    """As a file whose bytes are there gets its mode and time: a link copied into the target
    (same target, new time) is given the time the backup has, as the recovery kit does."""
    src, tapes, out = tmp_path / "src", tmp_path / "tapes", tmp_path / "out"
    write_tree(src, {"a": 10})
    (src / "ln").symlink_to("a")
    os.utime(src / "ln", ns=(978_307_200 * 10**9, 978_307_200 * 10**9), follow_symlinks=False)
    backup(BackupConfig(source_root=src, tapes_root=tapes, tape_nominal_capacity_bytes=10**9,
                        max_container_size_bytes=10**6))
    out.mkdir()
    (out / "ln").symlink_to("a")  # made now: this moment's time
    report = restore(tapes, out)
    assert report.ok
    assert (out / "ln").lstat().st_mtime_ns == 978_307_200 * 10**9
    assert (out / "ln").readlink() == Path("a")


def test_a_directory_whose_descriptor_is_the_oldest_kept_gets_its_mode(tmp_path: Path) -> None:
    """63 siblings fill the descriptor cache so that opening a/b's parent would close the
    descriptor of a/b that its mode and time are set through."""
    from ltoflow.paths import DIR_FD_LIMIT

    src, tapes, out = tmp_path / "src", tmp_path / "tapes", tmp_path / "out"
    write_tree(src, {"a/b/c/f": 1, **{f"a/d{i:02d}/f": 1 for i in range(DIR_FD_LIMIT - 1)}})
    (src / "a" / "b" / "c").chmod(0o700)
    os.utime(src / "a" / "b" / "c", ns=(10**18, 10**18))
    backup(BackupConfig(source_root=src, tapes_root=tapes, tape_nominal_capacity_bytes=10**9,
                        max_container_size_bytes=10**6))
    report = restore(tapes, out)
    assert (report.ok, report.problems) == (True, ())
    st = (out / "a" / "b" / "c").stat()
    assert (stat.S_IMODE(st.st_mode), st.st_mtime_ns) == (0o700, 10**18)


def _leftover(path: Path) -> None:
    """A temporary file as a restore killed outright leaves it: part written, mode 0600."""
    path.write_bytes(b"partial")
    path.chmod(0o600)


def test_files_named_as_temporary_ones_that_the_set_holds_or_others_may_read_are_kept(
    tmp_path: Path,
) -> None:
    """A restore target backed up (its leftovers with it), or a file anyone may read that only
    looks like a leftover: a second restore must find them there, not remove them."""
    src, tapes, out = tmp_path / "src", tmp_path / "tapes", tmp_path / "out"
    ended = subprocess.Popen(["true"])
    ended.wait()
    held = f"d/{TEMP_PREFIX}{ended.pid}-1"
    contents = write_tree(src, {held: 5, "d/a": 10})
    (src / held).chmod(0o600)  # as a real leftover's
    backup(BackupConfig(source_root=src, tapes_root=tapes, tape_nominal_capacity_bytes=10**9,
                        max_container_size_bytes=10**6))
    assert restore(tapes, out).ok
    readable = out / "d" / f"{TEMP_PREFIX}{ended.pid}-2"
    readable.write_bytes(b"precious")
    readable.chmod(0o644)
    again = restore(tapes, out)
    assert (again.ok, again.already_present, again.leftovers_removed) == (True, 2, 0)
    assert {rel: (out / rel).read_bytes() for rel in contents} == contents
    assert readable.read_bytes() == b"precious"


def test_a_rerun_removes_the_temporary_files_of_a_restore_killed_outright(
    backed_up: tuple[Path, Path, Catalog], tmp_path: Path,
) -> None:
    """kill -9 leaves a restore's temporary files; the next restore into that target removes
    those whose process is gone (ltoflow's names and the recovery kit's) from the directories
    it writes in, and keeps those of a restore still running. A dry run only counts them."""
    import trio

    _, tapes, _ = backed_up
    out = tmp_path / "out"
    assert restore(tapes, out).ok
    ended = subprocess.Popen(["true"])
    ended.wait()
    with subprocess.Popen(["sleep", "60"]) as running:
        try:
            dead = [f"case-2/{TEMP_PREFIX}{ended.pid}-7", f"case-2/{TEMP_PREFIX}{ended.pid}-8.tmp"]
            kept = [f"case-2/{TEMP_PREFIX}{running.pid}-1", f"case-2/{TEMP_PREFIX}x-1",
                    f"{TEMP_PREFIX}{ended.pid}-9",  # not where a restore of case-2 writes
                    f"case-2/{TEMP_PREFIX}{ended.pid}-10"]  # locked: a restore in another
            for rel in (*dead, *kept):                   # pid namespace is writing it
                _leftover(out / rel)
            writing = os.open(out / kept[-1], os.O_RDONLY)
            fcntl.flock(writing, fcntl.LOCK_EX)
            (out / "case-2" / "ledger.csv").unlink()

            dry = trio.run(lambda: api.restore_async(
                api.Components(drive=SimulatorDrive(tapes)), out, ["case-2"],
                before=lambda plan: False))
            assert (dry.dry_run, dry.leftovers_removed) == (True, 2)
            assert all((out / rel).exists() for rel in (*dead, *kept))

            report = restore(tapes, out, "case-2")
            assert (report.ok, report.restored, report.leftovers_removed) == (True, 1, 2)
            assert sorted(str(p.relative_to(out)) for p in out.rglob(TEMP_PREFIX + "*")) == sorted(
                kept)
        finally:
            running.kill()
            os.close(writing)


def test_cli_a_restore_needing_no_tape_says_so_and_a_dry_run_names_leftovers(
    backed_up: tuple[Path, Path, Catalog], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _, tapes, _ = backed_up
    out = tmp_path / "out"
    args = ["restore", "--simulator", str(tapes), "--target", str(out), "case-2/empty.dat"]
    assert main(args) == EXIT_OK
    assert "Restore of 1 file(s) needs no tape." in capsys.readouterr().out
    assert (out / "case-2" / "empty.dat").read_bytes() == b""
    ended = subprocess.Popen(["true"])
    ended.wait()
    _leftover(out / "case-2" / f"{TEMP_PREFIX}{ended.pid}-1")
    assert main([*args, "--dry-run"]) == EXIT_OK
    said = capsys.readouterr().out
    assert "Restore of 0 file(s) (1 more already there, identical) needs no tape." in said
    assert f"Will remove 1 temporary file(s) ({TEMP_PREFIX}*) that an earlier restore" in said
    assert (out / "case-2" / f"{TEMP_PREFIX}{ended.pid}-1").exists()


def test_cli_the_restore_header_counts_the_files_refused_before_any_read(
    backed_up: tuple[Path, Path, Catalog], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _, tapes, _ = backed_up
    out = tmp_path / "out"
    (out / "case-2").mkdir(parents=True)
    os.mkfifo(out / "case-2" / "empty.dat")  # in the way of a file: refused, not opened
    args = ["restore", "--simulator", str(tapes), "--target", str(out), "case-2"]
    assert main(args) == EXIT_DAMAGED
    said = capsys.readouterr().out
    assert re.search(r"^Restore of \d+ file\(s\) \(1 more that cannot be restored, named at "
                     r"the end\) needs ", said, re.MULTILINE), said
    assert "FAILED case-2/empty.dat" in said


def test_directories_already_as_the_backup_had_them_are_not_changed_again(
    backed_up: tuple[Path, Path, Catalog], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A tree restored by root, restored again by another user: its directories are right but
    not this user's, and changing their mode or time would fail (EPERM) though nothing needs
    it. Left be, they are no problem."""
    _, tapes, _ = backed_up
    out = tmp_path / "out"
    first = restore(tapes, out)
    assert first.ok
    assert first.directories_restored == len(backed_up[2].directories)

    def refused(*args: object, **kwargs: object) -> None:
        raise PermissionError(errno.EPERM, "Operation not permitted")

    for call in ("fchmod", "chmod", "utime"):
        monkeypatch.setattr(os, call, refused)
    report = restore(tapes, out)
    assert (report.ok, report.problems, report.restored) == (True, (), 0)
    assert report.directories_restored == 0  # as with files and symlinks already there


def test_a_target_this_user_may_write_in_but_not_list_takes_a_restore_and_a_rerun(
    unprivileged: Unprivileged,
) -> None:
    """A drop box (mode 0333): making, renaming and comparing files there takes write and
    search permission only. The restore opened its directories for reading, and refused it."""
    base = unprivileged.base
    src, tapes, box = base / "src", base / "tapes", base / "box"
    contents = write_tree(src, {"a.bin": 3000, "sub/b.bin": 2000})
    for p in (src, src / "sub"):
        p.chmod(0o755)
    backup(BackupConfig(source_root=src, tapes_root=tapes, tape_nominal_capacity_bytes=10**9,
                        max_container_size_bytes=10**6))
    box.mkdir()
    box.chmod(0o333)
    for run, expected in ((1, (2, 0)), (2, (0, 2))):
        done = unprivileged.ltoflow("restore", "--simulator", tapes, "--target", box, "--json")
        assert done.returncode == EXIT_OK, (run, done.stdout + done.stderr)
        doc = json.loads(done.stdout)
        assert (doc["restored"], doc["already_present"], doc["problems"]) == (*expected, [])
    assert {rel: (box / rel).read_bytes() for rel in contents} == contents


def test_a_leftover_of_this_pid_is_an_earlier_process_and_a_taken_name_is_passed_by(
    backed_up: tuple[Path, Path, Catalog], tmp_path: Path,
) -> None:
    """In a container every restore is pid 1: a leftover with this process's pid is an
    earlier one's, removed; a name taken by something that is no file is passed by."""
    _, tapes, _ = backed_up
    out = tmp_path / "out"
    assert restore(tapes, out, "case-2").ok
    (out / "case-2" / "ledger.csv").unlink()
    _leftover(out / "case-2" / f"{TEMP_PREFIX}{os.getpid()}-7")
    (out / "case-2" / f"{TEMP_PREFIX}{os.getpid()}-1").mkdir()  # not a file: left be
    report = restore(tapes, out, "case-2")
    assert (report.ok, report.restored, report.leftovers_removed) == (True, 1, 1)
    assert [p.name for p in (out / "case-2").iterdir() if p.name.startswith(TEMP_PREFIX)] == [
        f"{TEMP_PREFIX}{os.getpid()}-1"]


def _holes_kept() -> bool:
    with tempfile.NamedTemporaryFile() as f:
        f.truncate(1 << 20)
        f.flush()
        return os.fstat(f.fileno()).st_blocks * 512 < 1 << 20


HOLES_KEPT = _holes_kept()


@settings(max_examples=60, deadline=None)
@given(
    blocks=st.lists(st.sampled_from([b"\0", b"x", b"half"]), min_size=0, max_size=12),
    tail=st.integers(min_value=0, max_value=5000),
    lead=st.integers(min_value=0, max_value=5000),
    cuts=st.lists(st.integers(min_value=1, max_value=20_000), max_size=4),
    order=st.randoms(use_true_random=False),
)
def test_writing_leaves_holes_and_the_file_comes_back_exact(
    tmp_path_factory: pytest.TempPathFactory, blocks: list[bytes], tail: int, lead: int,
    cuts: list[int], order: random.Random,
) -> None:
    """Any file, written in any pieces in any order (segments may come from several tapes),
    reads back byte for byte at its size; its whole aligned blocks of zeros, but the last,
    take no room on disk."""
    r = importlib.import_module("ltoflow.restore")  # `ltoflow.restore` is also a function
    block: int = r.HOLE_BLOCK

    def one(kind: bytes) -> bytes:
        if kind == b"\0":
            return bytes(block)
        if kind == b"x":
            return b"x" * block
        return bytes(block // 2) + b"y" * (block // 2)

    content = b"z" * lead + b"".join(map(one, blocks)) + bytes(tail)
    path = tmp_path_factory.mktemp("holes") / "f"
    pieces, pos = [], 0
    for cut in [*cuts, len(content)]:  # the pieces, as the segments and chunks come
        pieces.append((pos, memoryview(content)[pos:pos + cut]))
        pos += cut
        if pos >= len(content):
            break
    order.shuffle(pieces)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL)
    try:
        for at, piece in pieces:
            r._write_leaving_holes(fd, piece, at, len(content))
        os.fsync(fd)
    finally:
        os.close(fd)
    assert path.read_bytes() == content
    # Blocks that hold data (or the file's last byte) are all that may take room, where the
    # filesystem keeps holes at all (plus an extent block or two).
    data_blocks = {k // block for k in range(0, len(content), block)
                   if content[k:k + block].strip(b"\0") or k + block >= len(content)}
    if HOLES_KEPT:
        assert path.stat().st_blocks * 512 <= (len(data_blocks) + 2) * block


def test_a_sparse_file_comes_back_sparse(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    image = src / "disk.img"
    with open(image, "wb") as fh:
        fh.truncate(64 * MiB)
        fh.seek(32 * MiB)
        fh.write(b"data in the middle")
    if image.stat().st_blocks * 512 > MiB:
        pytest.skip("this filesystem does not keep holes")
    config = BackupConfig(source_root=src, tapes_root=tmp_path / "tapes",
                          tape_nominal_capacity_bytes=200 * MiB,
                          max_container_size_bytes=100 * MiB)
    backup(config)
    report = restore(tmp_path / "tapes", tmp_path / "out")
    assert report.ok
    out = tmp_path / "out" / "disk.img"
    assert out.read_bytes() == image.read_bytes()
    assert out.stat().st_blocks * 512 < MiB  # 64 MiB long, a few blocks on disk


def test_a_pattern_that_is_a_name_means_that_name_not_what_it_matches_as_a_glob(
    tmp_path: Path,
) -> None:
    """`Photos [2019]` is a directory's name, and also a glob matching `Photos 1`; `x\\ny`
    (a backslash) is a file's name, and also how `catalog ls` shows `x`+newline+`y`. Each
    pattern means the entry it names: restoring one must not bring back, or with --overwrite
    replace, the other's files."""
    src = tmp_path / "src"
    write_tree(src, {"Photos [2019]/a.jpg": 10, "Photos 1/b.jpg": 20, "x\\y": 30, "x\ny": 40,
                     "glob-me/c.txt": 50})
    backup(BackupConfig(source_root=src, tapes_root=tmp_path / "tapes",
                        tape_nominal_capacity_bytes=10 * MiB, max_container_size_bytes=MiB))
    names = [b"Photos [2019]/a.jpg", b"x\\y"]
    for n, pattern in enumerate(["Photos [2019]", "x\\y"]):
        report = restore(tmp_path / "tapes", tmp_path / f"out{n}", pattern)
        assert report.ok
        assert [p for p, (kind, *_) in tree_snapshot(tmp_path / f"out{n}").items()
                if kind == "file"] == [names[n]]
    # still globs where no name is the pattern
    report = restore(tmp_path / "tapes", tmp_path / "globs", "Photos [0-9]", "glob-*")
    assert sorted(p for p, (kind, *_) in tree_snapshot(tmp_path / "globs").items()
                  if kind == "file") == [b"Photos 1/b.jpg", b"glob-me/c.txt"]
    shown = restore(tmp_path / "tapes", tmp_path / "shown", "x?y")  # both, as a glob
    assert shown.restored == 2


async def test_a_full_target_while_the_reader_waits_to_pass_a_chunk_on_is_the_one_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The writer fails (the target is full) while the tape reader waits for room to pass it
    the next chunk: the restore ends with that TargetFullError (exit 3), and no
    BrokenResourceError from the reader beside it (an internal error, exit 70, as a benchmark
    run on a full disk met)."""
    import threading

    import trio
    import trio.testing

    from ltoflow.errors import TargetFullError

    restore_module = importlib.import_module("ltoflow.restore")
    src, tapes = tmp_path / "src", tmp_path / "tapes"
    write_tree(src, {"big.bin": 3 * MiB})
    config = BackupConfig(source_root=src, tapes_root=tapes, tape_nominal_capacity_bytes=10**9,
                          max_container_size_bytes=10**7)
    await api.backup_async(config, api.compose(config))
    # Chunks of 64 KiB: the reader fills the channel long before the writer's first chunk.
    monkeypatch.setattr(restore_module, "read_pool", lambda: PipelineBuffer(8 * 64 * 1024))
    release = threading.Event()

    def full(*args: object) -> None:
        release.wait()
        raise TargetFullError("the restore target is full")

    monkeypatch.setattr(restore_module._FileWriter, "write", full)
    raised: list[BaseException] = []

    async def restoring() -> None:
        try:
            await api.restore_async(api.Components(drive=SimulatorDrive(tapes)),
                                    tmp_path / "out", [])
        except BaseException as e:  # what it raises is the test's subject
            raised.append(e)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(restoring)
        await trio.testing.wait_all_tasks_blocked(cushion=0.05)  # the reader waits in send
        release.set()
    (error,) = raised
    assert isinstance(error, TargetFullError), repr(error)
