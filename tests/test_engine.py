"""End to end on the simulator, through the engine and its Protocols."""

from __future__ import annotations

import contextlib
import inspect
import os
from collections.abc import Generator
from datetime import UTC, datetime
from pathlib import Path

import pytest
import trio

from ltoflow import api
from ltoflow.catalog import JsonCatalogCodec
from ltoflow.clock import FixedClock
from ltoflow.drives import LoadedTape, TapeRequest
from ltoflow.drives.simulator import SimulatorDrive
from ltoflow.engine import BackupResult, EngineSettings, run_backup
from ltoflow.errors import SourceFileChangedError
from ltoflow.operator import NoPromptOperator
from ltoflow.plan import Plan
from ltoflow.progress import ContainerWritten, ListReporter, TapeStarted

from .conftest import Raises, load_catalog_json, rebuild_files, write_tree

KB = 1000
# 3+ tapes, a file split across three of them, empty files, many small files.
TREE = {
    "a/notes.txt": 1_200,
    "a/video.bin": 700 * KB,
    "b/empty.dat": 0,
    "b/ledger.csv": 5_000,
    **{f"c/scan-{i:03d}.tif": 9_000 + i * 37 for i in range(40)},
    "d/big.iso": 260 * KB,
    "e/zero-too": 0,
}


def config_for(src: Path, tapes: Path, *, capacity: int = 400 * KB, container: int = 64 * KB,
               buffer: int = 256 * KB, verify: bool = False) -> api.BackupConfig:
    return api.BackupConfig(source_root=src, tapes_root=tapes,
                            tape_nominal_capacity_bytes=capacity,
                            max_container_size_bytes=container, buffer_bytes=buffer,
                            verify_after_write=verify)


async def run(config: api.BackupConfig, **overrides: object) -> BackupResult:
    components = api.compose(config)
    if overrides:
        import attrs

        components = attrs.evolve(components, **overrides)  # type: ignore[arg-type]
    with trio.fail_after(120):
        return await api.backup_async(config, components)


async def test_multi_tape_backup_rebuilds_every_file_from_the_catalog_alone(tmp_path: Path) -> None:
    src, sim = tmp_path / "src", tmp_path / "tapes"
    contents = write_tree(src, TREE)
    result = await run(config_for(src, sim))
    tape_dirs = sorted(sim.iterdir())
    assert len(tape_dirs) >= 3
    docs = [load_catalog_json(t) for t in tape_dirs]  # checks each catalog.sha256 too
    catalogs = [(t / "catalog" / "catalog.json").read_bytes() for t in tape_dirs]
    assert all(c == catalogs[0] for c in catalogs), "every tape carries the same catalog"
    assert rebuild_files(sim, docs[-1]) == contents
    video_tapes = {
        c["tape_id"] for s in docs[0]["segments"]  # type: ignore[attr-defined]
        for c in docs[0]["containers"]  # type: ignore[attr-defined]
        if c["container_id"] == s["container_id"]
        and s["file_id"] == next(f["file_id"] for f in docs[0]["source_files"]  # type: ignore[attr-defined]
                                 if f["relative_path"] == "a/video.bin")
    }
    assert len(video_tapes) >= 2
    assert len(result.tapes) == len(tape_dirs)
    assert result.reads_per_byte <= 2.0


async def test_a_backups_own_catalog_is_checked_from_the_plans_columns_as_from_its_records(
    tmp_path: Path,
) -> None:
    """`backup --verify` groups the segments from the plan's columns, without making a record
    each; the groups must be those the records give, container by container."""
    import attrs

    from ltoflow import catalog as cat
    from ltoflow.verify import SegmentsByContainer

    src, sim = tmp_path / "src", tmp_path / "tapes"
    write_tree(src, TREE)
    catalog = (await run(config_for(src, sim))).catalog
    assert isinstance(catalog.segments, cat.RecordColumns)
    assert catalog.segments.columns is not None
    from_columns = SegmentsByContainer(catalog)
    from_records = SegmentsByContainer(attrs.evolve(catalog, segments=tuple(catalog.segments)))
    for c in catalog.containers:
        got, want = from_columns.of(c.container_id), from_records.of(c.container_id)
        assert len(got) == len(want) > 0
        assert list(got.offsets) == list(want.offsets)
        assert list(got.lengths) == list(want.lengths)
        assert bytes(got.digests) == bytes(want.digests)
        assert bytes(got.known) == bytes(want.known) == b"\x01" * len(want)
        assert got.tile_end == want.tile_end == c.size_bytes
        assert got.records() == want.records()


async def test_each_tape_is_loaded_exactly_once(tmp_path: Path) -> None:
    src, sim = tmp_path / "src", tmp_path / "tapes"
    write_tree(src, TREE)
    config = config_for(src, sim)
    drive = SimulatorDrive(sim, config.tape_nominal_capacity_bytes)
    result = await run(config, drive=drive)
    assert drive.loads == [t.tape_id for t in result.tapes]
    assert len(set(drive.loads)) == len(drive.loads)
    assert len(drive.loads) >= 3


async def test_pool_is_freed_before_every_catalog_and_tape_change(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A tape's catalog, its unload and the wait for the next tape hold none of the pool's
    buffers: at a million files that is what keeps a multi-tape job within its memory."""
    from ltoflow import buffers, engine

    src, sim = tmp_path / "src", tmp_path / "tapes"
    write_tree(src, TREE)
    pools: list[buffers.PipelineBuffer] = []
    held: list[int] = []
    made = buffers.PipelineBuffer.__init__
    write = engine.write_catalog

    def init(self: buffers.PipelineBuffer, total_bytes: int) -> None:
        made(self, total_bytes)
        pools.append(self)

    async def catalog(*args: object, **kwargs: object) -> tuple[int, str]:
        held.append(pools[0]._allocated)
        return await write(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(buffers.PipelineBuffer, "__init__", init)
    monkeypatch.setattr(engine, "write_catalog", catalog)
    result = await run(config_for(src, sim))
    assert len(result.tapes) >= 3
    assert held == [0] * len(result.tapes)


async def test_single_tape_backup_reads_each_byte_once(tmp_path: Path) -> None:
    src, sim = tmp_path / "src", tmp_path / "tapes"
    contents = write_tree(src, TREE)
    result = await run(config_for(src, sim, capacity=10_000 * KB))
    assert len(result.tapes) == 1
    assert result.source_bytes_read == result.source_bytes == sum(map(len, contents.values()))
    assert rebuild_files(sim, load_catalog_json(sim / result.tapes[0].tape_id)) == contents


async def test_multi_tape_backup_reads_each_byte_at_most_twice(tmp_path: Path) -> None:
    src, sim = tmp_path / "src", tmp_path / "tapes"
    write_tree(src, TREE)
    result = await run(config_for(src, sim))
    assert result.source_bytes < result.source_bytes_read <= 2 * result.source_bytes


async def test_catalog_on_tape_one_already_holds_every_hash(tmp_path: Path) -> None:
    src, sim = tmp_path / "src", tmp_path / "tapes"
    write_tree(src, TREE)
    result = await run(config_for(src, sim))
    doc = load_catalog_json(sim / result.tapes[0].tape_id)
    for key in ("containers", "source_files", "segments"):
        for record in doc[key]:  # type: ignore[attr-defined]
            assert len(record["sha256"]) == 64


async def test_tiny_buffer_still_completes_and_bounds_memory(tmp_path: Path) -> None:
    src, sim = tmp_path / "src", tmp_path / "tapes"
    contents = write_tree(src, TREE)
    await run(config_for(src, sim, buffer=1))  # rounds up to the smallest pool
    doc = load_catalog_json(next(sim.iterdir()))
    assert rebuild_files(sim, doc) == contents


async def test_verify_after_write_checks_every_tape_before_unloading(tmp_path: Path) -> None:
    src, sim = tmp_path / "src", tmp_path / "tapes"
    write_tree(src, TREE)
    reporter = ListReporter()
    result = await run(config_for(src, sim, verify=True), reporter=reporter)
    assert result.verified
    assert result.verify_problems == ()
    kinds = [type(e).__name__ for e in reporter.events]
    # Each tape: written, its catalog written, then verified before the next tape starts.
    per_tape = [k for k in kinds if k in ("TapeStarted", "CatalogWritten", "TapeVerified")]
    assert per_tape == ["TapeStarted", "CatalogWritten", "TapeVerified"] * len(result.tapes)


async def test_progress_events_name_every_tape_and_container(tmp_path: Path) -> None:
    src, sim = tmp_path / "src", tmp_path / "tapes"
    write_tree(src, TREE)
    reporter = ListReporter()
    result = await run(config_for(src, sim), reporter=reporter)
    started = [e.tape_id for e in reporter.events if isinstance(e, TapeStarted)]
    written = [e for e in reporter.events if isinstance(e, ContainerWritten)]
    assert started == [t.tape_id for t in result.tapes]
    assert [e.container_id for e in written] == [c.container_id for c in result.catalog.containers]
    assert [e.size_bytes for e in written] == [c.size_bytes for c in result.catalog.containers]


async def test_fixed_clock_sets_created_at(tmp_path: Path) -> None:
    src, sim = tmp_path / "src", tmp_path / "tapes"
    write_tree(src, {"x": 10})
    when = datetime(2031, 5, 6, 7, 8, 9, tzinfo=UTC)
    result = await run(config_for(src, sim), clock=FixedClock(when))
    assert result.catalog.created_at == "2031-05-06T07:08:09.000000+00:00"


class _TamperingDrive(SimulatorDrive):
    """Changes a source file when a given tape is loaded, to catch the engine's checks."""

    def __init__(self, root: Path, capacity: int, on_tape: int, tamper: object) -> None:
        super().__init__(root, capacity)
        self.on_tape = on_tape
        self.tamper = tamper

    async def load(self, request: TapeRequest) -> LoadedTape:  # type: ignore[override]
        if request.sequence_number == self.on_tape:
            self.tamper()  # type: ignore[operator]
        return await super().load(request)


def _rewrite_keeping_stat(path: Path) -> None:
    st = path.stat()
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


async def test_content_change_between_prehash_and_write_is_caught(tmp_path: Path) -> None:
    src, sim = tmp_path / "src", tmp_path / "tapes"
    write_tree(src, TREE)
    config = config_for(src, sim)
    drive = _TamperingDrive(sim, config.tape_nominal_capacity_bytes, 3,
                            lambda: _rewrite_keeping_stat(src / "d" / "big.iso"))
    with Raises(SourceFileChangedError, match="d/big.iso"):
        await run(config, drive=drive)


async def test_later_tapes_copy_tape_ones_records_from_the_journal_instead_of_encoding(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ltoflow import catalog as cat
    from ltoflow import engine

    src, sim = tmp_path / "src", tmp_path / "tapes"
    write_tree(src, TREE)
    encoded: list[type] = []  # the record lists encoded for a tape (not those the plan measures)
    writing = [False]
    records, write = cat._records, engine.write_catalog

    def counting(items: object, cls: type) -> object:
        if writing[0]:
            encoded.append(cls)
        return records(items, cls)  # type: ignore[arg-type]

    async def catalog(*args: object, **kwargs: object) -> tuple[int, str]:
        writing[0] = True
        try:
            return await write(*args, **kwargs)  # type: ignore[arg-type]
        finally:
            writing[0] = False

    monkeypatch.setattr(cat, "_records", counting)
    monkeypatch.setattr(engine, "write_catalog", catalog)
    result = await run(config_for(src, sim))
    tapes = len(result.tapes)
    assert tapes >= 3
    assert encoded.count(cat.SegmentEntry) == encoded.count(cat.SourceFileEntry) == 1
    assert encoded.count(cat.ContainerEntry) == tapes  # the small lists: on every tape
    catalogs = [(sim / t.tape_id / "catalog" / "catalog.json").read_bytes() for t in result.tapes]
    fresh = b"".join(JsonCatalogCodec().encode(result.catalog))
    assert all(c == fresh for c in catalogs)


def _flip_middle_byte(path: Path, *, keep_stat: bool) -> None:
    st = path.stat()
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01  # inside the file and segment records
    with open(path, "r+b") as fh:  # in place: the same inode
        fh.write(data)
    # Kept as it was (only the SHA-256 can tell), or moved on a second (the clock's tick may
    # be coarser than the time since tape 1's catalog).
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + (0 if keep_stat else 10**9)))


def _catalog_copies(state_dir: Path) -> list[str]:
    return sorted(p.name for p in state_dir.iterdir() if ".catalog.json" in p.name)


@pytest.mark.parametrize(
    ("keep_stat", "said"),
    [(False, "changed on disk since tape 1"), (True, "no longer holds what tape 1's")],
    ids=["seen-by-stat", "seen-by-sha256"],
)
async def test_a_journal_copy_changed_on_disk_never_reaches_a_later_tape(
    tmp_path: Path, state_dir: Path, keep_stat: bool, said: str
) -> None:
    from ltoflow.errors import CatalogWriteError

    src, sim = tmp_path / "src", tmp_path / "tapes"
    write_tree(src, TREE)
    config = config_for(src, sim)

    def damage() -> None:
        (copy,) = state_dir.glob("*.catalog.json")
        _flip_middle_byte(copy, keep_stat=keep_stat)

    drive = _TamperingDrive(sim, config.tape_nominal_capacity_bytes, 2, damage)
    with Raises(CatalogWriteError, match=f"{said}.*moved aside.*copy catalog/catalog.json from "
                                         "tape 1"):
        await run(config, drive=drive)
    tape2 = sorted(sim.iterdir())[1]
    assert not (tape2 / "catalog" / "catalog.json").exists()
    left = _catalog_copies(state_dir)
    assert len(left) == 1, "a resume must not take it for the set's catalog"
    assert left[0].endswith(".catalog.json.damaged")


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (lambda p: p.write_bytes(p.read_bytes()[:-100]), "shorter|size went"),
        (lambda p: p.write_bytes(p.read_bytes() + b"more"), "size went"),
        (lambda p: os.utime(p, (1, 1)), "modification time is not the one the scan saw"),
    ],
    ids=["shrunk", "grown", "touched"],
)
async def test_source_change_after_the_scan_names_the_file(
    tmp_path: Path, change: object, reason: str
) -> None:
    src, sim = tmp_path / "src", tmp_path / "tapes"
    write_tree(src, TREE)
    config = config_for(src, sim)
    drive = _TamperingDrive(sim, config.tape_nominal_capacity_bytes, 1,
                            lambda: change(src / "a" / "video.bin"))  # type: ignore[operator]
    with Raises(SourceFileChangedError, match=f"a/video.bin.*({reason})"):
        await run(config, drive=drive)


async def test_file_that_shrinks_mid_read_fails_fast_without_spinning(tmp_path: Path) -> None:
    src, sim = tmp_path / "src", tmp_path / "tapes"
    write_tree(src, {"huge.bin": 3_000 * KB})
    config = config_for(src, sim, capacity=100_000 * KB, container=1_000 * KB, buffer=64 * KB)
    plan = api.make_backup_plan(config)
    os.truncate(src / "huge.bin", 10)

    with trio.fail_after(30), Raises(SourceFileChangedError, match="shorter"):
        await _run_plan(plan, SimulatorDrive(sim, config.tape_nominal_capacity_bytes))


async def _run_plan(plan: Plan, drive: SimulatorDrive) -> BackupResult:
    return await run_backup(
        plan, drive=drive, operator=NoPromptOperator(), clock=FixedClock(datetime.now(UTC)),
        codec=JsonCatalogCodec(), reporter=ListReporter(),
        settings=EngineSettings(buffer_bytes=64 * KB),
    )


async def test_tape_written_before_is_refused(tmp_path: Path) -> None:
    src, sim = tmp_path / "src", tmp_path / "tapes"
    write_tree(src, {"x": 10})
    config = config_for(src, sim)
    plan = api.make_backup_plan(config)
    first = await _run_plan(plan, SimulatorDrive(sim, config.tape_nominal_capacity_bytes))
    from ltoflow.errors import TapeNotLoadedError

    # The simulator has nobody to change tapes: the wrong tape ends the job, named.
    with Raises(TapeNotLoadedError, match="a tape of this set, already written; insert a blank"):
        await run_backup(
            plan, drive=SimulatorDrive(sim, config.tape_nominal_capacity_bytes),
            operator=NoPromptOperator(), clock=FixedClock(datetime.now(UTC)),
            codec=JsonCatalogCodec(), reporter=ListReporter(),
            settings=EngineSettings(buffer_bytes=64 * KB),
            set_id=first.catalog.backup_set_id,
        )


class _FailingWriter:
    """A catalog.json writer that fails at its `fail_at`-th write, recording what it got."""

    def __init__(self, fail_at: int) -> None:
        self.fail_at, self.writes, self.aborted = fail_at, 0, False

    async def write(self, data: object) -> None:
        self.writes += 1
        if self.writes == self.fail_at:
            from ltoflow.errors import FileWriteError
            raise FileWriteError("the drive reported a write error")

    async def close(self) -> None:
        raise AssertionError("closed after an error")

    async def abort(self) -> None:
        self.aborted = True


class _TapeWithFailingWriter:
    label = "TAPE-X"

    def __init__(self, writer: _FailingWriter) -> None:
        self.writer = writer

    async def free_bytes(self) -> int | None:
        return None

    async def open_write(self, path: str, *, replace: bool = False) -> _FailingWriter:
        return self.writer


@pytest.mark.parametrize("fail_at", [1, 6, 7, 12])  # chunk 7 is the first of the given list
async def test_a_catalog_write_error_stops_the_encoding_ahead_and_closes_its_sources(
        fail_at: int) -> None:
    """The catalog's chunks are made in a thread one ahead of the writes: after a write
    error that thread is done before the given record lists are closed, and the error comes
    out as one CatalogWriteError, not an exception group."""
    from ltoflow import catalog as cat
    from ltoflow import engine
    from ltoflow.errors import CatalogWriteError

    catalog = cat.Catalog(
        backup_set_id="s", created_at="t", source_root="/src", tapes=(), containers=(),
        source_files=(), segments=())
    made: list[int] = []
    closed: list[bool] = []

    def listed() -> Generator[bytes]:
        try:
            for k in range(10):
                made.append(k)
                yield b"\n{}" if k == 0 else b",\n{}"
        finally:
            closed.append(True)

    copied: list[bytes] = []
    given = listed()
    writer = _FailingWriter(fail_at)
    with pytest.raises(CatalogWriteError, match="TAPE-X: the drive reported a write error"):
        await engine.write_catalog(
            _TapeWithFailingWriter(writer), catalog,  # type: ignore[arg-type]
            codec=JsonCatalogCodec(), limit=1 << 20, extra_files=(), copy=copied.append,
            lists={"source_files": given})
    assert writer.aborted
    assert writer.writes == fail_at
    assert inspect.getgeneratorstate(given) == inspect.GEN_CLOSED  # not running, closed
    assert closed == ([True] if made else [])
    # every chunk made was copied: those written, and at most one made ahead of the failure
    assert fail_at <= len(copied) <= fail_at + 1


def test_big_blocks_are_mapped_with_a_trim_threshold_to_go_back_to(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """map_big_blocks sets the trim threshold as well as the mapping one: setting the one
    freezes the other wherever glibc had moved it, and catalog_blocks_kept must put both
    back as they were."""
    from ltoflow import engine

    settings: dict[int, int] = {}

    def mallopt(param: int, value: int) -> int:
        settings[param] = value
        return 1

    monkeypatch.setattr(engine, "_libc", lambda name, *types: mallopt)
    monkeypatch.setattr(engine._MALLOC, "mallopt", None)
    engine.map_big_blocks()
    set_by_map = dict(settings)
    assert set_by_map == {engine._M_MMAP_THRESHOLD: engine.BIG_BLOCK,
                          engine._M_TRIM_THRESHOLD: engine.BIG_BLOCK_TRIM}
    with engine.catalog_blocks_kept():
        assert settings[engine._M_MMAP_THRESHOLD] == engine.CATALOG_BLOCK
    assert settings == set_by_map


@pytest.mark.parametrize("fail_at", [None, 9])  # chunk 7 is the first of the list
async def test_the_catalog_is_encoded_with_its_chunks_kept_on_the_heap(
        monkeypatch: pytest.MonkeyPatch, fail_at: int | None, tmp_path: Path) -> None:
    """Where the backup maps big blocks on their own (map_big_blocks), write_catalog lifts
    that while the catalog's chunks are made, and sets it again after, also after an error.
    Where it does not, malloc is left alone."""
    from ltoflow import catalog as cat
    from ltoflow import engine
    from ltoflow.errors import CatalogWriteError

    settings: dict[int, int] = {}
    seen: list[dict[int, int]] = []

    def mallopt(param: int, value: int) -> int:
        settings[param] = value
        return 1

    def listed() -> Generator[bytes]:
        for k in range(5):
            seen.append(dict(settings))
            yield b"\n{}" if k == 0 else b",\n{}"

    catalog = cat.Catalog(
        backup_set_id="s", created_at="t", source_root="/src", tapes=(), containers=(),
        source_files=(), segments=())

    async def write(mapped: bool) -> None:
        monkeypatch.setattr(engine._MALLOC, "mallopt", mallopt if mapped else None)
        if fail_at is None:
            drive = SimulatorDrive(tmp_path / f"tapes-{mapped}", 1 << 30)
            tape = await drive.load(TapeRequest(f"T{mapped}", 1, "s"))
        else:
            tape = _TapeWithFailingWriter(_FailingWriter(fail_at))  # type: ignore[assignment]
        with pytest.raises(CatalogWriteError) if fail_at else contextlib.nullcontext():
            await engine.write_catalog(
                tape, catalog, codec=JsonCatalogCodec(), limit=1 << 20, extra_files=(),
                lists={"source_files": listed()})

    await write(mapped=False)
    assert settings == {}
    assert seen
    assert all(s == {} for s in seen)
    seen.clear()
    await write(mapped=True)
    kept = {engine._M_MMAP_THRESHOLD: engine.CATALOG_BLOCK,
            engine._M_TRIM_THRESHOLD: 4 * engine.CATALOG_BLOCK}
    assert seen
    assert all(s == kept for s in seen)
    assert settings == {engine._M_MMAP_THRESHOLD: engine.BIG_BLOCK,
                        engine._M_TRIM_THRESHOLD: engine.BIG_BLOCK_TRIM}


async def test_an_interrupt_while_settling_waits_for_the_chunk_being_made(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C (which a shield does not hold off) during settle(): the thread making the next
    chunk is still waited for, then the interrupt goes on."""
    import threading

    from ltoflow import engine

    entered, release = threading.Event(), threading.Event()

    def slow() -> Generator[bytes]:
        yield b"first"
        entered.set()
        release.wait(10)  # the second chunk is being made when the error comes
        yield b"second"

    made = slow()
    ahead = engine._ChunkAhead(made, None)
    assert await ahead.next() == b"first"
    real_wait = trio.Event.wait
    calls: list[str] = []

    async def interrupted_once(event: trio.Event) -> None:
        if not calls:
            assert entered.wait(10)
        calls.append(inspect.getgeneratorstate(made))
        if len(calls) == 1:
            release.set()
            raise KeyboardInterrupt
        await real_wait(event)

    monkeypatch.setattr(trio.Event, "wait", interrupted_once)
    with pytest.raises(KeyboardInterrupt):
        await ahead.settle()
    assert calls[0] == inspect.GEN_RUNNING
    assert len(calls) == 2  # waited again after the interrupt
    assert inspect.getgeneratorstate(made) == inspect.GEN_SUSPENDED  # the thread is done
