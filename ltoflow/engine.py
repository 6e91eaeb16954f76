"""The backup engine: a trio supervisor and its actors.

```
supervisor ─┬─▶ reader ─▶ segment hasher ─▶ aggregate hasher ─▶ writer ─▶ tape
            └─▶ prehasher (tapes 2..N, while tape 1 streams)
```
Actors are module-level async functions joined by bounded memory channels. The bytes in flight
are bounded by a pool of equal buffers (`PipelineBuffer`): the reader takes a free buffer before
it reads and the writer gives it back once the bytes are on tape, so memory stays within
`buffer_bytes` however big the data. Each stage does its blocking work (file reads, hashing,
tape writes) in a worker thread, so the stages overlap on both cores.

The catalog written on tape 1 must already hold every segment's hash, so in a multi-tape set the
prehasher reads the later tapes' segments while tape 1 streams, yielding to the reader whenever
the pipeline runs low. Tape 1's bytes are hashed as they stream: a single-tape backup reads every
byte once, a multi-tape one at most twice. When both passes hash a segment, the hashes must agree
or the file changed (SourceFileChangedError).
"""

from __future__ import annotations

import contextlib
import hashlib
import mmap
import uuid
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import attrs
import outcome
import trio

from ltoflow import catalog as cat
from ltoflow.buffers import PipelineBuffer, pass_on
from ltoflow.catalog import Catalog, CatalogCodec, JsonCatalogCodec, ListSpan
from ltoflow.clock import Clock
from ltoflow.drives import LoadedTape, TapeDrive, TapeRequest
from ltoflow.errors import (
    BackupError,
    CatalogWriteError,
    JournalError,
    TapeFilledEarlyError,
    TapeFullError,
    leaves,
)
from ltoflow.hashing import (
    FIRST_TAPE,
    LATER_TAPES,
    AggregateHasher,
    FaultPolicy,
    HashRecorder,
    Piece,
    SegmentHasher,
    SourceCursor,
    SourceFaults,
    multi_segment_flags,
)
from ltoflow.journal import CatalogCopy, ContainerDone, Journal, ResumeState
from ltoflow.operator import Operator
from ltoflow.plan import Plan, Tape, build_catalog, digest_pairs, file_ids_of
from ltoflow.progress import (
    CatalogWritten,
    ContainerWritten,
    FileSkipped,
    Note,
    Progress,
    Reporter,
    TapeFinished,
    TapeStarted,
    TapeVerified,
)
from ltoflow.tapes import Check, check_blank, check_resumable, load_requested_tape
from ltoflow.units import MiB, human_bytes

PREHASH_CHUNK_BYTES = 4 * MiB
#: Reads of tape 1's catalog records from the journal's copy, for the later tapes' catalogs.
COPY_CHUNK_BYTES = 8 * MiB


@attrs.frozen
class Chunk:
    """Bytes of one container, in a pool buffer, on their way from the reader to the tape."""

    container: int
    buffer: mmap.mmap
    nbytes: int
    pieces: list[Piece]
    first: bool  # starts the container
    last: bool  # ends the container

    @property
    def data(self) -> memoryview:
        return memoryview(self.buffer)[: self.nbytes]


@attrs.define
class WriterStats:
    containers: int = 0
    bytes: int = 0
    stalls: int = 0
    stall_seconds: float = 0.0
    current: str = ""  # the container being written


async def read_actor(
    out: trio.MemorySendChannel[Chunk], *, cursor: SourceCursor, buffer: PipelineBuffer
) -> None:
    """Read the cursor's segments into pool buffers, one container at a time per chunk."""
    with out:
        try:
            while not cursor.finished:
                buf = await buffer.take()
                container = cursor.container
                first = cursor.done_in_segment == 0 and (
                    cursor.segment == cursor.plan.containers[container].segments[0]
                )
                try:
                    pieces, n = await trio.to_thread.run_sync(
                        partial(cursor.fill, memoryview(buf), one_container=True)
                    )
                except BaseException:
                    buffer.give_back(buf, 0)
                    raise
                last = cursor.finished or cursor.container != container
                buffer.fill(n)
                if not await pass_on(out, Chunk(container, buf, n, pieces, first, last)):
                    return  # the next actor failed: its error is the job's
        finally:
            cursor.close()
            buffer.finish()


async def segment_hash_actor(
    inp: trio.MemoryReceiveChannel[Chunk],
    out: trio.MemorySendChannel[Chunk],
    *,
    recorder: HashRecorder,
    reporter: Reporter,
) -> None:
    """Hash every segment; a hash that differs from another pass's means the file changed.
    Reports the files that became unusable (skipped) as they are met."""
    hasher = SegmentHasher()
    with inp, out:
        async for chunk in inp:
            done = await trio.to_thread.run_sync(hasher.update, chunk.data, chunk.pieces)
            recorder.segments_written(done)
            _report_skips(recorder.faults, reporter)
            if not await pass_on(out, chunk):
                return


def _report_skips(faults: SourceFaults, reporter: Reporter) -> None:
    for path, reason in faults.take_new():
        reporter.event(FileSkipped(path, reason))


async def aggregate_hash_actor(
    inp: trio.MemoryReceiveChannel[Chunk],
    out: trio.MemorySendChannel[Chunk],
    *,
    recorder: HashRecorder,
    hasher: AggregateHasher,
) -> None:
    """Hash whole containers and whole files that span several segments."""
    with inp, out:
        async for chunk in inp:
            containers, files = await trio.to_thread.run_sync(
                hasher.update, chunk.data, chunk.pieces
            )
            for c, digest in containers:
                recorder.container(c, digest)
            for f, digest in files:
                recorder.file(f, digest)
            if not await pass_on(out, chunk):
                return


async def write_actor(
    inp: trio.MemoryReceiveChannel[Chunk],
    *,
    tape: LoadedTape,
    tape_id: str,
    container_ids: Sequence[str],
    plan: Plan,
    buffer: PipelineBuffer,
    stats: WriterStats,
    reporter: Reporter,
    first_container: int = 0,
    on_container: Callable[[int], Awaitable[None]] | None = None,
    replace: bool = False,
    reserve: int = 0,
) -> None:
    """Write chunks to the tape, one file per container; give each buffer back once written.

    Waits for the buffer to reach its high-water mark before it starts and whenever it ran
    dry, and counts those waits as stalls. A container that fails part-way is aborted.
    Chunks of containers before `first_container` (already on tape: a resumed job re-reads
    them only to hash a file that continues past them) are dropped. `on_container(index)` runs
    once a container is durable on tape. With `replace`, a container file an interrupted job
    left behind is replaced. A container that the tape has no room for (with `reserve` bytes
    left for the catalog), by the space it reports, raises TapeFilledEarlyError; ENOSPC in the
    middle of one is a TapeFullError (that tape has no room left for its catalog).
    """
    writer = None
    started = 0.0
    with inp:
        try:
            await buffer.wait_primed()
            while True:
                try:
                    chunk = inp.receive_nowait()
                except trio.WouldBlock:
                    t0 = trio.current_time()
                    await buffer.wait_primed()
                    try:
                        chunk = await inp.receive()
                    except trio.EndOfChannel:
                        break
                    if stats.bytes:  # not the pipeline filling up behind the first chunk
                        stats.stalls += 1
                        stats.stall_seconds += trio.current_time() - t0
                except trio.EndOfChannel:
                    break
                if chunk.container < first_container:
                    buffer.give_back(chunk.buffer, chunk.nbytes)
                    continue
                cid = container_ids[chunk.container]
                if chunk.first:
                    size = plan.containers[chunk.container].size
                    if replace:  # what an interrupted job left of it goes first (the room
                        # it took comes back where the medium frees it, as the simulator's
                        # does); if this one does not fit after all, the abort removes it
                        writer = await tape.open_write(f"data/{cid}", replace=True)
                    await _require_room(tape, tape_id, size + reserve,
                                        f"container {cid} and the catalog",
                                        container=chunk.container)
                    if writer is None:
                        writer = await tape.open_write(f"data/{cid}")
                    stats.current = cid
                    started = trio.current_time()
                assert writer is not None, "a container's first chunk always comes first"
                await writer.write(chunk.data)
                stats.bytes += chunk.nbytes
                buffer.give_back(chunk.buffer, chunk.nbytes)
                if chunk.last:
                    await writer.close()  # stopped before it is closed: it is dropped
                    writer = None
                    # Closed, it is whole on tape: it is recorded before anything stops the
                    # job, or a stop here would leave a container the journal does not know
                    # (and nothing to resume, and a tape no new backup may use).
                    with trio.CancelScope(shield=True):
                        await tape.sync()
                        stats.containers += 1
                        size = plan.containers[chunk.container].size
                        elapsed = trio.current_time() - started
                        if on_container is not None:
                            await on_container(chunk.container)
                    reporter.event(ContainerWritten(tape_id, cid, size, elapsed))
        except BaseException:
            if writer is not None:
                with trio.CancelScope(shield=True):
                    await writer.abort()
            raise
        if writer is not None:
            # The input ended inside a container: an upstream actor failed, and its error is
            # on its way. Drop the partial container; the supervisor counts what got written.
            with trio.CancelScope(shield=True):
                await writer.abort()


async def _require_room(tape: LoadedTape, tape_id: str, needed: int, what: str, *,
                        container: int | None = None) -> None:
    """Refuse to start writing `what` when the tape, by its own count, has no room for it:
    TapeFilledEarlyError when `what` is `container`, TapeFullError otherwise."""
    free = await tape.free_bytes()
    if free is not None and free < needed:
        named = tape_id if tape.label == tape_id else f"{tape_id} ({tape.label})"
        message = (f"tape {named} has {human_bytes(free)} free, not enough "
                   f"for {what} ({human_bytes(needed)})")
        written = getattr(tape, "bytes_written", 0)
        if container is not None:
            raise TapeFilledEarlyError(message, bytes_written=written,
                                       container_index=container)
        raise TapeFullError(
            f"{message}: it holds less than its nominal capacity; insert another tape, or "
            "give a smaller --capacity-tb (what these cartridges really hold)",
            bytes_written=written,
        )


async def _unload_keeping_the_error(drive: TapeDrive, reporter: Reporter) -> None:
    """Unload on the way out of an error; a failing unload is reported, not raised over it."""
    with trio.CancelScope(shield=True):
        try:
            await drive.unload()
        except BackupError as e:
            reporter.event(Note(f"also, the tape could not be unloaded: {e}"))


async def prehash_actor(
    *,
    plan: Plan,
    start_segment: int,
    recorder: HashRecorder,
    hasher: AggregateHasher,
    pace: PipelineBuffer,
    done: trio.Event,
    counter: list[int],
    reporter: Reporter,
    end_segment: int | None = None,
    rehash: bool = False,
) -> None:
    """Hash segments [start_segment, end_segment) ahead of the writer, yielding to the reader.

    Computes the segment hashes, the hashes of containers on later tapes and the whole-file
    hashes of every file that reaches a later tape, so tape 1's catalog can be complete. With
    `rehash` the new hashes replace those known (see `_settle_later_tapes`).
    """
    end = len(plan.segments) if end_segment is None else end_segment
    cursor = SourceCursor(plan, start_segment, end, faults=recorder.faults, domain=LATER_TAPES)
    segments = SegmentHasher()
    buf = bytearray(PREHASH_CHUNK_BYTES)

    async def hash_both(data: memoryview, pieces: list[Piece]) -> tuple[
            list[tuple[int, str]], list[tuple[int, str]], list[tuple[int, str]]]:
        # The two hashes of the same bytes in two threads: hashlib lets go of the GIL, so
        # after tape 1 the prehash has both cores (it is what tape 1's catalog waits for).
        seg_done: list[tuple[int, str]] = []

        async def by_segment() -> None:
            seg_done.extend(await trio.to_thread.run_sync(segments.update, data, pieces))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(by_segment)
            containers, files = await trio.to_thread.run_sync(hasher.update, data, pieces)
        return seg_done, containers, files

    try:
        while not cursor.finished:
            await pace.wait_healthy()
            pieces, n = await trio.to_thread.run_sync(
                partial(cursor.fill, memoryview(buf), one_container=False))
            seg_done, cont_done, file_done = await hash_both(memoryview(buf)[:n], pieces)
            for s, digest in seg_done:
                recorder.segment(s, digest, written=False, replace=rehash)
            _report_skips(recorder.faults, reporter)
            for c, digest in cont_done:
                recorder.container(c, digest)
            for f, digest in file_done:
                recorder.file(f, digest)
    finally:
        counter[0] += cursor.bytes_read
        cursor.close()
    done.set()


async def _settle_later_tapes(plan: Plan, recorder: HashRecorder, pace: PipelineBuffer,
                              counter: list[int], reporter: Reporter) -> None:
    """Before tape 1's catalog: give every unusable file zeros on the later tapes.

    The prehasher may have hashed a file's later-tape bytes before tape 1's pass found it bad
    (the file that spans tapes 1 and 2). Those bytes would have to be read again, unchanged,
    when tape 2 is written; instead they become zeros and the containers that hold them are
    hashed again. A file found bad while doing so gets the same treatment, until nothing moves.
    """
    if len(plan.tapes) < 2:
        return
    first_later = plan.tapes[1].containers.start
    while containers := recorder.faults.zero_later_tapes(first_later):
        for run in _runs(containers):
            want_c, want_f = multi_segment_flags(plan, run, 0, 0)
            await prehash_actor(
                plan=plan, start_segment=plan.containers[run.start].segments.start,
                end_segment=plan.containers[run.stop - 1].segments.stop, recorder=recorder,
                hasher=AggregateHasher(plan, want_c, want_f), pace=pace, done=trio.Event(),
                counter=counter, reporter=reporter, rehash=True,
            )


def _runs(indices: list[int]) -> list[range]:
    """Sorted indices as runs of consecutive ones: [1, 2, 3, 7] -> [range(1, 4), range(7, 8)]."""
    runs: list[range] = []
    for i in indices:
        if runs and runs[-1].stop == i:
            runs[-1] = range(runs[-1].start, i + 1)
        else:
            runs.append(range(i, i + 1))
    return runs


@attrs.frozen
class TapeSummary:
    tape_id: str
    label: str
    sequence_number: int
    containers: int
    data_bytes: int
    catalog_bytes: int
    seconds: float
    stalls: int
    stall_seconds: float
    volume_serial: str | None = None
    #: Containers already on this tape when a resumed job loaded it (not in `containers`).
    earlier_containers: int = 0
    #: Finished before the interruption that a resumed job goes on from: not loaded again
    #: (`earlier_containers` are all of its containers; `label` is its tape id, as it was not
    #: read, and it has no catalog figure).
    finished_before: bool = False


#: How often the progress display hears from the engine.
TICK_SECONDS = 0.5


@attrs.define
class JobState:
    """What the supervisor is doing now, for the progress display; owned by the supervisor."""

    total_bytes: int
    total_tapes: int
    buffer: PipelineBuffer
    done_bytes: int = 0
    tape_id: str = ""
    sequence_number: int = 0
    tape_planned: int = 0
    phase: str = "starting"
    writer: WriterStats = attrs.field(factory=lambda: WriterStats())

    def begin(self, request: TapeRequest, planned: int, phase: str) -> None:
        self.tape_id, self.sequence_number = request.tape_id, request.sequence_number
        self.tape_planned, self.phase = planned, phase
        self.writer = WriterStats()

    def finish_tape(self, nbytes: int) -> None:
        self.done_bytes += nbytes
        self.writer = WriterStats()

    def snapshot(self, elapsed: float) -> Progress:
        w = self.writer
        return Progress(
            elapsed=elapsed, total_bytes=self.total_bytes,
            done_bytes=self.done_bytes + w.bytes, tape_id=self.tape_id,
            sequence_number=self.sequence_number, total_tapes=self.total_tapes,
            tape_bytes=w.bytes, tape_planned=self.tape_planned, container_id=w.current,
            buffer_filled=self.buffer.filled, buffer_capacity=self.buffer.capacity,
            stalls=w.stalls, stall_seconds=w.stall_seconds, phase=self.phase,
        )


async def _tick(state: JobState, reporter: Reporter, scope: trio.CancelScope) -> None:
    """Send a Progress snapshot every TICK_SECONDS until `scope` is cancelled."""
    started = trio.current_time()
    with scope:
        while True:
            reporter.event(state.snapshot(trio.current_time() - started))
            await trio.sleep(TICK_SECONDS)


def _serial(tape: LoadedTape) -> str | None:
    serial = tape.volume_serial
    return serial[: cat.MAX_VOLUME_SERIAL] if serial else None


@attrs.frozen
class BackupResult:
    catalog: Catalog
    catalog_sha256: str
    tapes: tuple[TapeSummary, ...]
    seconds: float
    source_bytes: int
    source_bytes_read: int
    verified: bool
    verify_problems: tuple[str, ...] = ()
    #: (files in more than one segment, files on more than one tape)
    split_files: tuple[int, int] = (0, 0)

    @property
    def reads_per_byte(self) -> float:
        return self.source_bytes_read / self.source_bytes if self.source_bytes else 0.0


@attrs.frozen
class EngineSettings:
    buffer_bytes: int
    verify_after_write: bool = False
    created_by: str = "ltoflow"
    #: Files written next to the catalog on every tape (the recovery kit): (path, bytes).
    extra_files: tuple[tuple[str, bytes], ...] = ()
    #: What a source file that cannot be backed up does: skip it, or end the job.
    faults: FaultPolicy = attrs.field(factory=FaultPolicy)


async def write_catalog(
    tape: LoadedTape,
    catalog: Catalog,
    *,
    codec: CatalogCodec,
    limit: int,
    extra_files: Sequence[tuple[str, bytes]],
    replace: bool = False,
    copy: Callable[[bytes], object] | None = None,
    lists: Mapping[str, Iterable[bytes]] | None = None,
    spans: dict[str, ListSpan] | None = None,
) -> tuple[int, str]:
    """Write catalog.json, catalog.sha256 and the extra files; return (size, sha256).

    With `replace` (a resumed job, or a catalog rewritten after a tape filled early), when the
    tape has room for both copies at once (the plan reserves room for one), the files are
    written under temporary names and then renamed over the old ones: the old catalog stays
    whole until the new one is complete (only a crash between the renames leaves a mismatched
    catalog.json and catalog.sha256, which verify reports and a resume rewrites); otherwise the
    old files are replaced in place.
    `copy` gets every chunk of catalog.json too, in the encoding thread. With ltoflow's own
    JSON codec, `lists` and `spans` go to JsonCatalogCodec.encode_reusing (another codec
    encodes everything, and leaves `spans` empty).

    Raises CatalogWriteError (wrapping the cause) if any of it cannot be written or the
    catalog is larger than the reserve, `limit` bytes.
    """
    h = hashlib.sha256()
    size = 0
    free = await tape.free_bytes() if replace else None
    # Room for all of it again: the catalog (at most `limit`), its checksum, the extra files.
    again = limit + cat.SHA256_HEX_LEN + sum(len(d) for _, d in extra_files)
    beside = replace and (free is None or free >= again)

    def name(path: str) -> str:
        return f"{path}.new" if beside else path

    with catalog_blocks_kept():  # its chunks come and go by the hundred
        try:
            writer = await tape.open_write(name(cat.CATALOG_JSON), replace=replace)
            ahead: _ChunkAhead | None = None
            try:
                chunks = (codec.encode_reusing(catalog, lists=lists, spans=spans)
                          if type(codec) is JsonCatalogCodec else codec.encode(catalog))
                ahead = _ChunkAhead(chunks, h.update, copy)
                while True:
                    chunk = await ahead.next()
                    if chunk is None:
                        break
                    size += len(chunk)
                    if size > limit:
                        raise CatalogWriteError(
                            f"the catalog is larger than the {limit} bytes reserved for it "
                            f"on tape {tape.label}; this is a bug, please report it"
                        )
                    await writer.write(chunk)
            except BaseException:
                try:
                    if ahead is not None:  # its thread lets go of the generators first
                        await ahead.settle()
                finally:
                    for given in (lists or {}).values():  # a copy's generator closes its file now
                        close = getattr(given, "close", None)
                        if close is not None:
                            close()
                    with trio.CancelScope(shield=True):
                        await writer.abort()
                raise
            await writer.close()
            digest = h.hexdigest()
            others = ((cat.CATALOG_SHA256, digest.encode()), *extra_files)
            for path, data in others:
                w = await tape.open_write(name(path), replace=replace)
                await w.write(data)
                await w.close()
            if beside:
                await tape.sync()  # the new files are durable before the old ones go
                for path in (cat.CATALOG_JSON, *(p for p, _ in others)):
                    await tape.replace(name(path), path)
            await tape.sync()
        except CatalogWriteError:
            raise
        except BackupError as e:
            raise CatalogWriteError(
                f"could not write the catalog to tape {tape.label}: {e}") from e
    return size, digest


#: glibc's mallopt parameters: the size from which a block is mapped on its own, and the free
#: space at the top of the heap above which the heap gives memory back.
_M_MMAP_THRESHOLD = -3
_M_TRIM_THRESHOLD = -1
#: Blocks this size and above (scan and layout columns, big reads) are mapped on their own and
#: given back when freed.
BIG_BLOCK = 1 << 20
#: Free space at the top of the heap kept for reuse beside that: twice the mapping threshold,
#: as glibc's own rule would set it.
BIG_BLOCK_TRIM = 2 * BIG_BLOCK
#: While a catalog is written, blocks up to this size (its chunks: 4096 records, a few MB) come
#: from the heap, and freed ones stay there for the next. glibc's upper limit on 64 bits.
CATALOG_BLOCK = 32 * MiB


@attrs.define
class _Malloc:
    """The process's malloc settings that map_big_blocks made, if it did."""

    mallopt: Callable[[int, int], int] | None = None


_MALLOC = _Malloc()


def _libc(name: str, *argtypes: Any) -> Callable[..., int] | None:
    """The C library's function `name`, taking `argtypes` and giving an int; None where the C
    library is not glibc (musl, for one, has no mallopt)."""
    try:
        import ctypes

        function = getattr(ctypes.CDLL(None), name)
    except (ImportError, OSError, AttributeError, TypeError):
        return None
    function.argtypes = list(argtypes)
    function.restype = ctypes.c_int
    return function  # type: ignore[no-any-return]


def map_big_blocks() -> None:
    """Have the C library map every block of BIG_BLOCK bytes or more on its own (glibc's
    mallopt M_MMAP_THRESHOLD), so that it goes back to the system as soon as it is freed.
    By default glibc raises that threshold each time a big block is freed, after which such
    blocks come from the heap and stay there: at a million files on 3 tapes that kept a
    backup's peak ~25 MB higher. The price: each big block is fresh pages, so big reads into
    new bytes cost more page faults (the later tapes' copy of tape 1's catalog lists, about
    0.4 s per GB); write_catalog lifts it while it runs (catalog_blocks_kept). Setting it
    freezes glibc's trim threshold too, at whatever the imports left it; it is set as well
    (BIG_BLOCK_TRIM), so that it has a value to go back to. Process-wide and for good: the
    CLI sets it for `backup` only."""
    import ctypes

    mallopt = _libc("mallopt", ctypes.c_int, ctypes.c_int)
    if mallopt is not None:
        mallopt(_M_MMAP_THRESHOLD, BIG_BLOCK)
        mallopt(_M_TRIM_THRESHOLD, BIG_BLOCK_TRIM)
        _MALLOC.mallopt = mallopt


@contextlib.contextmanager
def catalog_blocks_kept() -> Iterator[None]:
    """While a catalog is encoded and written: its chunks come from the heap, and a freed one
    is reused by the next, instead of each being mapped, faulted in page by page and unmapped
    again (a TLB shootdown on both cores each time). The catalog of 100,000 files took
    0.39-0.48 s to write with its chunks mapped, 0.23-0.28 s with them kept. Only where
    map_big_blocks is in effect, which this undoes and then sets again; with glibc's own
    settings the heap keeps such blocks already. What the catalog leaves on the heap goes back
    with trim_heap."""
    mallopt = _MALLOC.mallopt
    if mallopt is None:
        yield
        return
    mallopt(_M_MMAP_THRESHOLD, CATALOG_BLOCK)
    mallopt(_M_TRIM_THRESHOLD, 4 * CATALOG_BLOCK)
    try:
        yield
    finally:
        mallopt(_M_MMAP_THRESHOLD, BIG_BLOCK)
        mallopt(_M_TRIM_THRESHOLD, BIG_BLOCK_TRIM)


def trim_heap() -> None:
    """Give the memory freed on the heap back to the system where the C library can (glibc's
    malloc_trim): a catalog's few hundred MB of chunks, encoded or copied in a worker thread,
    otherwise stay in that thread's arena while the next tape's buffers are mapped beside it."""
    import ctypes

    trim = _libc("malloc_trim", ctypes.c_size_t)
    if trim is not None:
        trim(0)


@attrs.define
class TapeOneLists:
    """Where tape 1's big catalog lists lie in the job journal's copy of its catalog: later
    tapes copy them from there instead of encoding a million records again."""

    path: Path
    spans: dict[str, ListSpan]
    #: (size, mtime, inode) of the copy once complete: any change since means it is not tape 1's.
    signature: tuple[int, int, int]

    @classmethod
    def of(cls, path: Path, spans: Mapping[str, ListSpan]) -> TapeOneLists | None:
        """For the copy at `path` that tape 1's catalog was just written with (None unless
        `spans` has every big list). Blocks: call it in a thread."""
        if set(spans) != set(cat.BIG_LISTS):
            return None
        return cls(path, dict(spans), _signature(path))

    def lists(self, tape_id: str) -> dict[str, Iterator[bytes]]:
        """The `lists` argument of write_catalog for tape `tape_id`. Raises CatalogWriteError,
        before anything is written, if the copy changed on disk. Blocks: call it in a thread."""
        try:
            same = _signature(self.path) == self.signature
        except OSError:
            same = False
        if not same:
            raise self._damaged(tape_id, "changed on disk since tape 1 got its catalog")
        return {key: self._records(span, tape_id) for key, span in self.spans.items()}

    def _records(self, span: ListSpan, tape_id: str) -> Iterator[bytes]:
        # Checked against the span's SHA-256 before the last bytes are given: a later tape's
        # catalog gets tape 1's records or is never completed.
        h = hashlib.sha256()
        pending = b""
        try:
            with open(self.path, "rb") as fh:
                fh.seek(span.start)
                left = span.end - span.start
                while left:
                    chunk = fh.read(min(COPY_CHUNK_BYTES, left))
                    if not chunk:
                        break
                    h.update(chunk)
                    left -= len(chunk)
                    if pending:
                        yield pending
                    pending = chunk
        except OSError as e:
            raise self._damaged(tape_id, f"cannot be read ({e.strerror})") from e
        if left or h.hexdigest() != span.sha256:
            raise self._damaged(tape_id, "no longer holds what tape 1's catalog holds")
        if pending:
            yield pending

    def _damaged(self, tape_id: str, why: str) -> CatalogWriteError:
        # Moved aside, so that a resume cannot take it for the set's catalog.
        aside = self.path.with_name(self.path.name + ".damaged")
        with contextlib.suppress(OSError):
            self.path.replace(aside)
        return CatalogWriteError(
            f"the job journal's copy of the catalog {self.path} {why}; it is moved aside to "
            f"{aside.name} and tape {tape_id} did not get its catalog: check the state "
            f"directory's disk, copy catalog/catalog.json from tape 1 of the set to "
            f"{self.path}, then resume the backup with --resume")


def _signature(path: Path) -> tuple[int, int, int]:
    st = path.stat()
    return st.st_size, st.st_mtime_ns, st.st_ino


def _next_chunk(chunks: Iterator[bytes], sinks: Sequence[Callable[[bytes], object]]
                ) -> bytes | None:
    chunk = next(chunks, None)
    if chunk is not None:
        for sink in sinks:
            sink(chunk)
    return chunk


class _ChunkAhead:
    """The chunks of an encoding, each also given to every one of `sinks` in order (the
    catalog's hash, the journal's copy), made in a thread one chunk ahead of the caller:
    encoding and hashing the next chunk overlap with writing this one."""

    def __init__(self, chunks: Iterator[bytes], *sinks: Callable[[bytes], object] | None
                 ) -> None:
        self._make = partial(_next_chunk, chunks, [s for s in sinks if s is not None])
        self._token = trio.lowlevel.current_trio_token()
        self._result: outcome.Outcome[bytes | None] | None = None
        self._start()

    def _start(self) -> None:
        done = self._done = trio.Event()

        def deliver(result: outcome.Outcome[bytes | None]) -> None:
            self._result = result
            self._token.run_sync_soon(done.set)

        trio.lowlevel.start_thread_soon(self._make, deliver)

    async def next(self) -> bytes | None:
        """The next chunk (None after the last); the one after it is begun."""
        await self._done.wait()
        assert self._result is not None
        result, self._result = self._result, None
        chunk = result.unwrap()
        if chunk is not None:
            self._start()
        return chunk

    async def settle(self) -> None:
        """Wait, even when cancelled or interrupted, for the chunk being made (after an
        error): its thread may be inside the generators the caller closes next. A
        KeyboardInterrupt that comes meanwhile is raised once the thread is done."""
        interrupted: KeyboardInterrupt | None = None
        with trio.CancelScope(shield=True):
            while not self._done.is_set():
                try:
                    await self._done.wait()
                except KeyboardInterrupt as e:
                    interrupted = e
        if interrupted is not None:
            raise interrupted


async def run_backup(
    plan: Plan,
    *,
    drive: TapeDrive,
    operator: Operator,
    clock: Clock,
    codec: CatalogCodec,
    reporter: Reporter,
    settings: EngineSettings,
    set_id: str | None = None,
    created_at: str | None = None,
    journal: Journal | None = None,
    resume: ResumeState | None = None,
) -> BackupResult:
    """Write `plan` to tapes: each tape loaded once, filled, given the full catalog, unloaded.

    With a `journal`, every container and tape that is durable on tape is recorded there, so
    that a job stopped by anything (a fault, Ctrl-C, a crash) can be resumed: `resume` is what
    the journal says was done, and the job goes on from the first container not on tape.
    Raises BackupError subclasses (SourceFileChangedError, TapeFullError, FileWriteError,
    CatalogWriteError, ...) and leaves the tape in the drive unloaded on the way out.
    """
    # verify imports the engine's helpers
    from ltoflow.verify import CatalogIndex, verify_loaded_tape

    if resume is not None:
        set_id, created_at = resume.set_id, resume.created_at
    set_id = set_id or str(uuid.uuid4())
    created_at = created_at or cat.iso_utc(clock.now())
    started = clock.monotonic()
    recorder = HashRecorder(plan, SourceFaults(plan, settings.faults))
    tape_ids = [cat.tape_id_for(set_id, t.index + 1) for t in plan.tapes]
    container_ids = [cat.container_id_for(set_id, c.index + 1) for c in plan.containers]
    multi = len(plan.tapes) > 1
    # Files from here on reach tape 2 or later: the prehasher hashes them whole.
    prehash_file = (
        plan.segments[plan.containers[plan.tapes[1].containers[0]].segments[0]].file_index
        if multi else len(plan.files)
    )
    reads = [0]
    summaries: list[TapeSummary] = []
    base: Catalog | None = None
    catalog: Catalog | None = None
    serials: list[str | None] = []
    catalog_sha = ""
    problems: list[str] = []
    limit = plan.reserve_bytes - len(cat.PLACEHOLDER_SHA256) - sum(
        len(d) for _, d in settings.extra_files
    )
    buffer = PipelineBuffer(settings.buffer_bytes)
    state = JobState(plan.total_bytes, len(plan.tapes), buffer)
    layout = len(resume.breaks) if resume is not None else 0  # tapes that filled early
    done_ids = set() if resume is None else {container_ids[c] for c in resume.containers
                                             if c < len(container_ids)}

    def set_catalog() -> Catalog:
        """The set's catalog from the hashes recorded so far (every tape's is made this way)."""
        return build_catalog(plan, recorder.complete(), set_id=set_id, created_at=created_at,
                             created_by=settings.created_by, unusable=recorder.faults.reasons)

    if resume is not None:
        await trio.to_thread.run_sync(_seed_hashes, recorder, plan, resume, container_ids)
        if resume.catalog is not None:
            if _same_layout(resume.catalog, plan, tape_ids):
                base = resume.catalog
            else:  # a tape filled early since it was built: same hashes, new places
                base = set_catalog()
                if journal is not None:
                    await trio.to_thread.run_sync(journal.catalog_known, base, codec,
                                                  _faults_of(recorder))

    copy: CatalogCopy | None = None  # the journal's copy of the set's catalog, being written
    spans: dict[str, ListSpan] = {}  # filled as tape 1's catalog is encoded
    tape_one: TapeOneLists | None = None  # then later tapes copy its big lists
    verify_index: CatalogIndex | None = None

    async def journal_container(index: int) -> None:
        if journal is not None:
            done = _container_done(recorder, plan, index)
            await trio.to_thread.run_sync(journal.container_done, done)

    async with trio.open_nursery() as nursery:
        prehashed = trio.Event()
        if multi and base is None:
            start = plan.file_starts[prehash_file]
            want_c, want_f = multi_segment_flags(
                plan, range(plan.tapes[1].containers.start, len(plan.containers)),
                prehash_file, len(plan.files),
            )
            nursery.start_soon(
                lambda: prehash_actor(
                    plan=plan, start_segment=start, recorder=recorder,
                    hasher=AggregateHasher(plan, want_c, want_f), pace=buffer,
                    done=prehashed, counter=reads, reporter=reporter,
                )
            )
        else:
            prehashed.set()
        ticker = trio.CancelScope()
        nursery.start_soon(lambda: _tick(state, reporter, ticker))

        for tape in plan.tapes:
            request = TapeRequest(tape_ids[tape.index], tape.index + 1, set_id, len(plan.tapes))
            if resume is not None and tape.index in resume.tapes_done:
                serials.append(resume.tapes_done[tape.index])
                summaries.append(TapeSummary(
                    request.tape_id, label=request.tape_id,
                    sequence_number=request.sequence_number, containers=0, data_bytes=0,
                    catalog_bytes=0, seconds=0.0, stalls=0, stall_seconds=0.0,
                    volume_serial=serials[-1], earlier_containers=len(tape.containers),
                    finished_before=True))
                state.finish_tape(tape.data_bytes)
                reporter.event(Note(f"tape {request.tape_id} was completed before the "
                                    "interruption; not loaded again"))
                continue
            state.begin(request, tape.data_bytes, "waiting for the tape")
            check: Check = check_blank
            if resume is not None:
                ours = {container_ids[c] for c in tape.containers}
                check = partial(check_resumable, others=frozenset(done_ids - ours))
            loaded = await load_requested_tape(drive, operator, request, check)
            try:
                first = tape.containers.start
                if resume is not None:
                    first = await _first_missing(loaded, plan, tape, container_ids, resume)
                    if first > tape.containers.start:
                        reporter.event(Note(
                            f"tape {request.tape_id}: {first - tape.containers.start} "
                            "container(s) already on it; going on from "
                            + (container_ids[first] if first < tape.containers.stop
                               else "its catalog")))
                if first < tape.containers.stop:
                    # What is written again gets the hashes of what is written now (they must
                    # still match those known, or the file changed since).
                    last = plan.containers[tape.containers.stop - 1]
                    recorder.forget_written(range(plan.containers[first].segments.start,
                                                  last.segments.stop))
                todo = sum(plan.containers[c].size for c in range(first, tape.containers.stop))
                # What an interrupted job left half-written is replaced, not added to.
                leftovers = 0 if resume is None else await _sizes(loaded, [
                    *(f"data/{container_ids[c]}" for c in range(first, tape.containers.stop)),
                    cat.CATALOG_JSON, cat.CATALOG_SHA256,
                    *(path for path, _ in settings.extra_files),
                ])
                first_size = plan.containers[first].size if first < tape.containers.stop else 0
                resumed_inside = tape.containers.start < first < tape.containers.stop
                try:
                    await _require_room(
                        loaded, request.tape_id, first_size + plan.reserve_bytes - leftovers,
                        f"container {container_ids[first]} and the catalog" if resumed_inside
                        else "even one container and the catalog (nothing written)",
                        container=first if resumed_inside else None)
                except TapeFilledEarlyError as e:
                    # Some of its containers are on it: the tape ends there (it holds a bit
                    # less than planned), and the rest go to an extra tape, without the piece
                    # of the next one that the interrupted job left.
                    await _drop(loaded, [f"data/{container_ids[c]}"
                                         for c in range(first, tape.containers.stop)])
                    raise await _filled_early(e, tape, request.tape_id, journal) from None
                free = await loaded.free_bytes()
                if free is not None and free < todo + plan.reserve_bytes - leftovers:
                    reporter.event(Note(
                        f"tape {request.tape_id} reports {human_bytes(free)} free, less than "
                        f"the {human_bytes(todo + plan.reserve_bytes)} planned for it: it will "
                        "take what fits, and the rest goes to an extra tape"))
                serials.append(_serial(loaded))
                reporter.event(TapeStarted(request.tape_id, request.sequence_number,
                                           len(plan.tapes), todo, loaded.label))
                buffer.begin_tape()
                state.phase = "writing"
                state.done_bytes += tape.data_bytes - todo
                t0 = trio.current_time()
                try:
                    stats = await _stream_tape(
                        plan, tape, loaded, request.tape_id, container_ids, recorder, buffer,
                        reporter, reads, prehash_file, state.writer, first=first,
                        replay=base is None, on_container=journal_container,
                        replace=resume is not None,
                    )
                except* TapeFilledEarlyError as group:
                    full = [e for e in leaves(group) if isinstance(e, TapeFilledEarlyError)]
                    raise await _filled_early(full[0], tape, request.tape_id,
                                              journal) from None
                except* TapeFullError as group:
                    # ENOSPC in mid-container: the medium ran out before the drive said so,
                    # and nothing is left for this tape's catalog.
                    first_error = leaves(group)[0]
                    raise TapeFullError(
                        f"{first_error}; tape {request.tape_id} is full with no room left for "
                        "its catalog: put a blank tape in its place (a resume writes its "
                        "containers again)",
                        bytes_written=getattr(first_error, "bytes_written", 0),
                    ) from None
                seconds = trio.current_time() - t0
                reporter.event(TapeFinished(request.tape_id, request.sequence_number,
                                            stats.containers, stats.bytes, seconds,
                                            stats.stalls, stats.stall_seconds))
                # This tape's data is on it: the catalog, the unload and the wait for the next
                # tape need none of the pool's memory (the next tape maps it again).
                buffer.release()
                if base is None:
                    state.phase = "hashing the later tapes"
                    await prehashed.wait()
                    await _settle_later_tapes(plan, recorder, buffer, reads, reporter)
                    # Tape 1's catalog fixes every hash: from here on a file can no longer
                    # be skipped, and later tapes must get exactly the bytes hashed so far.
                    recorder.faults.freeze()
                    _report_skips(recorder.faults, reporter)
                    base = set_catalog()
                    # The journal keeps a copy of this first catalog, made as it is encoded
                    # for the tape (encoding a million records twice costs seconds), for the
                    # later tapes. A set of one tape needs none: a resume after this point
                    # builds the catalog again from the containers' records.
                    if journal is not None and len(plan.tapes) > 1:
                        copy = await trio.to_thread.run_sync(journal.open_catalog_copy)
                # Each tape's catalog also knows the volume serials of the tapes so far.
                catalog = base.with_serials(serials)
                state.phase = "writing the catalog"
                lists = (await trio.to_thread.run_sync(tape_one.lists, request.tape_id)
                         if tape_one is not None else None)
                try:
                    catalog_size, catalog_sha = await write_catalog(
                        loaded, catalog, codec=codec, limit=limit,
                        extra_files=settings.extra_files, replace=resume is not None,
                        copy=copy.write if copy is not None else None, lists=lists,
                        # Where the big lists lie (and their SHA-256s), for later tapes to
                        # copy them: none to record when there is no later tape.
                        spans=spans if copy is not None and len(plan.tapes) > 1 else None,
                    )
                except BaseException:
                    if copy is not None:  # dropped: a resume builds the catalog again
                        with trio.CancelScope(shield=True), contextlib.suppress(JournalError):
                            await trio.to_thread.run_sync(copy.close)
                        copy = None
                    raise
                if copy is not None and journal is not None:  # kept once tape 1 has it too
                    await trio.to_thread.run_sync(copy.close)
                    copy = None
                    await trio.to_thread.run_sync(journal.catalog_copied,
                                                  _faults_of(recorder))
                    tape_one = await trio.to_thread.run_sync(TapeOneLists.of,
                                                             journal.catalog_path, spans)
                elif journal is not None and len(plan.tapes) == 1:
                    # No copy, but a catalog on tape: an unload that fails now leaves a job
                    # to resume.
                    await trio.to_thread.run_sync(journal.catalog_written, _faults_of(recorder))
                reporter.event(CatalogWritten(request.tape_id, catalog_size, catalog_sha))
                await trio.to_thread.run_sync(trim_heap)  # before the next tape's pool
                if settings.verify_after_write:
                    state.phase = "verifying"
                    if verify_index is None:  # once per job: every tape has the same lists
                        verify_index = await trio.to_thread.run_sync(CatalogIndex, catalog)
                    # The container hashes too: the records just written, which the
                    # recovery kit also checks, not only the bytes on tape.
                    found = await verify_loaded_tape(loaded, catalog, request.tape_id,
                                                     catalog_sha=catalog_sha,
                                                     index=verify_index, whole=True)
                    problems.extend(p.describe() for p in found)
                    reporter.event(TapeVerified(request.tape_id, len(tape.containers),
                                                len(found)))
                summaries.append(TapeSummary(
                    request.tape_id, loaded.label, request.sequence_number, stats.containers,
                    stats.bytes, catalog_size, seconds, stats.stalls, stats.stall_seconds,
                    serials[-1], first - tape.containers.start,
                ))
                state.finish_tape(stats.bytes)
            except BaseException:
                state.phase = "unloading"
                await _unload_keeping_the_error(drive, reporter)
                raise
            state.phase = "unloading"
            await drive.unload()
            # Only now: an unload (an LTFS unmount writes the index) that fails leaves the
            # tape to be loaded again by a resume, which checks it and rewrites its catalog.
            if journal is not None:
                await trio.to_thread.run_sync(journal.tape_done, tape.index, serials[-1],
                                              layout)
        if base is None:  # a set of one tape, finished before the interruption: the journal
            # keeps no copy of its catalog, and the one on tape is made the same way.
            assert resume is not None
            base = set_catalog()
        if resume is not None:
            # Tapes written before a tape filled early carry a catalog that puts containers
            # where they are not: give them the catalog of the set as it really is.
            state.phase = "rewriting earlier catalogs"
            for t in plan.tapes:
                if resume.tape_layouts.get(t.index, layout) < layout:
                    holds = frozenset(container_ids[c] for c in t.containers)
                    await _rewrite_catalog(
                        TapeRequest(tape_ids[t.index], t.index + 1, set_id, len(plan.tapes)),
                        base.with_serials(serials), drive=drive, operator=operator,
                        codec=codec, limit=limit, settings=settings, reporter=reporter,
                        check=partial(check_resumable, others=frozenset(done_ids - holds),
                                      needs=holds))
                    if journal is not None:
                        await trio.to_thread.run_sync(journal.tape_done, t.index,
                                                      serials[t.index], layout)
        ticker.cancel()

    if catalog is None:  # every tape was done before: the job ended in the last unload
        catalog = base.with_serials(serials)
    if journal is not None:
        await trio.to_thread.run_sync(journal.finish)
    return BackupResult(
        catalog=catalog,
        catalog_sha256=catalog_sha,
        tapes=tuple(summaries),
        seconds=clock.monotonic() - started,
        source_bytes=plan.total_bytes,
        source_bytes_read=reads[0],
        verified=settings.verify_after_write,
        verify_problems=tuple(problems),
        split_files=plan.split_counts(),
    )


def _same_layout(catalog: Catalog, plan: Plan, tape_ids: Sequence[str]) -> bool:
    """Whether `catalog` puts every container of `plan` on the tape the plan does."""
    return len(catalog.tapes) == len(plan.tapes) and len(catalog.containers) == len(
        plan.containers) and all(
        entry.tape_id == tape_ids[c.tape_index]
        for entry, c in zip(catalog.containers, plan.containers, strict=True)
    )


async def _drop(loaded: LoadedTape, paths: Sequence[str]) -> None:
    """Remove those of `paths` that are on the tape (a file given up is replaced by nothing:
    opened to be replaced, then aborted)."""
    for path in paths:
        if await loaded.size_of(path) is not None:
            writer = await loaded.open_write(path, replace=True)
            await writer.abort()


async def _filled_early(e: TapeFilledEarlyError, tape: Tape, tape_id: str,
                        journal: Journal | None) -> TapeFullError:
    """The error that ends a job whose tape filled early; records where a new tape starts."""
    took = e.container_index - tape.containers.start
    if took <= 0:
        return TapeFullError(f"{e}; tape {tape_id} cannot take even its first container: "
                             "insert another (blank) tape for it", bytes_written=e.bytes_written)
    if journal is not None:
        await trio.to_thread.run_sync(journal.tape_break, e.container_index)
    return TapeFullError(
        f"{e}; tape {tape_id} filled before its planned share: it holds {took} of its "
        f"{len(tape.containers)} containers, the rest go to an extra tape (a resume asks for "
        "this tape again to write its catalog, then for a blank one)",
        bytes_written=e.bytes_written,
    )


async def _rewrite_catalog(request: TapeRequest, catalog: Catalog, *, drive: TapeDrive,
                           operator: Operator, codec: CatalogCodec, limit: int,
                           settings: EngineSettings, reporter: Reporter, check: Check) -> None:
    """Load a finished tape of this set (`check` makes sure it is that one) and replace its
    catalog."""
    loaded = await load_requested_tape(drive, operator, request, check)
    try:
        size, digest = await write_catalog(loaded, catalog, codec=codec, limit=limit,
                                           extra_files=settings.extra_files, replace=True)
    except BaseException:
        await _unload_keeping_the_error(drive, reporter)
        raise
    reporter.event(CatalogWritten(request.tape_id, size, digest))
    await drive.unload()


def _container_done(recorder: HashRecorder, plan: Plan, index: int) -> ContainerDone:
    """The hashes a journal keeps for container `index`: its own, its segments' (as runs), and
    that of a file of several segments that ends in it (a resume does not read these bytes
    again; a file of one segment has its segment's hash)."""
    h = recorder.hashes
    segments = plan.containers[index].segments
    files: list[tuple[int, str]] = []
    if segments:
        # Only the container's first segment can end a file that began in an earlier one.
        starts = plan.file_starts
        f = plan.segments.file_index[segments.start]
        if starts[f] < segments.start and starts[f + 1] <= segments.stop \
                and (d := h.files[f]) is not None:
            files.append((f, d))
    return ContainerDone(index, h.containers[index],
                         tuple(h.segments.known_runs(segments.start, segments.stop)),
                         tuple(files), _faults_of(recorder))


def _faults_of(recorder: HashRecorder) -> dict[str, Any] | None:
    return recorder.faults.snapshot() if recorder.faults.reasons else None


def _seed_hashes(recorder: HashRecorder, plan: Plan, resume: ResumeState,
                 container_ids: Sequence[str]) -> None:
    """Give the recorder every hash the interrupted job already knew: a segment read again
    must hash the same, or its file changed since."""
    h = recorder.hashes
    if resume.faults is not None:  # files found unusable keep their zeros where they had them
        recorder.faults.restore(resume.faults)
    if resume.catalog is not None:
        recorder.faults.freeze()  # as when that catalog was built
        by_container = {c.container_id: c.sha256 for c in resume.catalog.containers}
        for c in plan.containers:
            h.containers[c.index] = by_container.get(container_ids[c.index])
        file_ids = file_ids_of(plan.files)  # from the exact path bytes, as the catalog's
        files = {f.file_id: f.sha256 for f in resume.catalog.source_files}
        for i, fid in enumerate(file_ids):
            h.files[i] = files.get(fid)
        segments = {s.segment_id: s.sha256 for s in resume.catalog.segments}
        for n, s in enumerate(plan.segments):
            h.segments[n] = segments.get(cat.segment_id_for(file_ids[s.file_index], s.part))
    for done in resume.containers.values():
        if done.index >= len(h.containers):
            continue
        h.containers[done.index] = h.containers[done.index] or done.sha256
        for seg, digest in digest_pairs(done.segment_runs):
            recorder.seed_written(seg, digest)
        for f, digest in done.files:
            h.files[f] = digest


async def _sizes(loaded: LoadedTape, paths: Sequence[str]) -> int:
    """Bytes of those of `paths` that exist on the tape."""
    total = 0
    for path in paths:
        total += await loaded.size_of(path) or 0
    return total


async def _first_missing(loaded: LoadedTape, plan: Plan, tape: Tape,
                         container_ids: Sequence[str], resume: ResumeState) -> int:
    """The first container of `tape` that is not both journaled and whole on this tape."""
    for c in tape.containers:
        if c not in resume.containers:
            return c
        size = await loaded.size_of(f"data/{container_ids[c]}")
        if size != plan.containers[c].size:
            return c
    return tape.containers.stop


async def _stream_tape(
    plan: Plan,
    tape: Tape,
    loaded: LoadedTape,
    tape_id: str,
    container_ids: Sequence[str],
    recorder: HashRecorder,
    buffer: PipelineBuffer,
    reporter: Reporter,
    reads: list[int],
    prehash_file: int,
    stats: WriterStats,
    *,
    first: int,
    replay: bool,
    on_container: Callable[[int], Awaitable[None]],
    replace: bool,
) -> WriterStats:
    """Run reader → hashers → writer over this tape's containers from `first` on; return the
    writer's stats.

    With `replay`, a file that continues into container `first` from containers already on
    tape is read from its start, so that its whole-file hash can be computed; those earlier
    bytes are hashed (and checked against the journal) but not written again.
    """
    if first >= tape.containers.stop:
        buffer.finish()  # nothing to read: the prehasher must not wait for this reader
        return stats
    first_seg = plan.containers[first].segments.start
    end_seg = plan.containers[tape.containers.stop - 1].segments.stop
    last_file = plan.segments[end_seg - 1].file_index
    read_from = first_seg
    straddling = plan.segments[first_seg].file_index
    if replay and first > tape.containers.start and straddling not in recorder.faults.reasons:
        read_from = plan.file_starts[straddling]  # an unusable file needs no whole-file hash
    first_file = plan.segments[read_from].file_index
    # Whole-container and whole-file hashes this pass computes: only those the prehasher does
    # not, which leaves tape 1's containers and the files that lie wholly on tape 1.
    own_containers = range(first, tape.containers.stop) if tape.index == 0 else range(0)
    want_c, want_f = multi_segment_flags(
        plan, own_containers, first_file, min(prehash_file, last_file + 1)
    )
    if not replay:
        want_f = bytearray(len(plan.files))  # every file hash is known already
    cursor = SourceCursor(plan, read_from, end_seg, faults=recorder.faults,
                          domain=FIRST_TAPE if tape.index == 0 else LATER_TAPES)
    depth = buffer.count  # every chunk holds a pool buffer, so this never blocks the reader early
    to_seg, from_reader = trio.open_memory_channel[Chunk](depth)
    to_agg, from_seg = trio.open_memory_channel[Chunk](depth)
    to_writer, from_agg = trio.open_memory_channel[Chunk](depth)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(lambda: read_actor(to_seg, cursor=cursor, buffer=buffer))
            nursery.start_soon(
                lambda: segment_hash_actor(from_reader, to_agg, recorder=recorder,
                                           reporter=reporter)
            )
            nursery.start_soon(
                lambda: aggregate_hash_actor(
                    from_seg, to_writer, recorder=recorder,
                    hasher=AggregateHasher(plan, want_c, want_f),
                )
            )
            nursery.start_soon(
                lambda: write_actor(
                    from_agg, tape=loaded, tape_id=tape_id, container_ids=container_ids,
                    plan=plan, buffer=buffer, stats=stats, reporter=reporter,
                    first_container=first, on_container=on_container, replace=replace,
                    reserve=plan.reserve_bytes,
                )
            )
    finally:
        reads[0] += cursor.bytes_read
    if stats.containers != tape.containers.stop - first:  # pragma: no cover - a bug
        raise RuntimeError(
            f"tape {tape_id}: {stats.containers} of {tape.containers.stop - first} containers "
            "written"
        )
    return stats
