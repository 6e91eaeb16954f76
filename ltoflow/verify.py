"""Verify a backup set against its catalog: every tape's catalog, every container, every segment.

Each container is read once, front to back, and all of its segments are hashed in that single
pass; the hash of the whole container too, when some of its bytes lie outside every segment
(they tile it, as ltoflow writes containers, and then the segments check every byte) or when
asked. Reads run a few chunks ahead of hashing, and the hashes run in threads at their own pace:
the container's beside the segments', or the segments shared out between two, one per core. A
reader that can map its file (the simulator's) hands over chunks mapped, not copied: the hashers
read them where they lie, and no thread copies (a third less time on a container).

The segments are checked from columns (SegmentsByContainer: container, offset, length, raw
hash). A catalog in ltoflow's own layout is read lazily into them: no record is made until a
problem names one, which is most of the time a million-file verify used to take.
"""

from __future__ import annotations

import bisect
import contextlib
import hashlib
import itertools
import mmap
import operator
import queue
from array import array
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import attrs
import trio

from ltoflow import catalog as cat
from ltoflow import native, recovery
from ltoflow.buffers import BufferLease, PipelineBuffer
from ltoflow.catalog import Catalog, CatalogCodec, ContainerEntry, JsonCatalogCodec, SegmentEntry
from ltoflow.clock import Clock
from ltoflow.drives import LoadedTape, TapeDrive, TapeRequest
from ltoflow.errors import BackupError, CatalogReadError, UsageError, leaves
from ltoflow.operator import NoPromptOperator, Operator
from ltoflow.paths import shown_in_list
from ltoflow.progress import NullReporter, ReadMeter, Reporter, TapeVerified, reporting
from ltoflow.tapes import (
    TapeHolder,
    check_member,
    check_member_of,
    identify,
    load_requested_tape,
)
from ltoflow.units import MiB

READ_CHUNK_BYTES = 8 * MiB
#: Chunks read ahead of the hashers: enough to overlap, little memory.
READ_AHEAD = 4
#: Threads that hash one container's segments when no container hash is needed (2 cores).
HASH_THREADS = 2
#: ... when its segments average at least this size.
SHARED_SEGMENT_BYTES = 256 * 1024
#: A catalog bigger than this is refused rather than read into memory.
MAX_CATALOG_BYTES = 8 * 1024 * MiB


@attrs.frozen
class Problem:
    """One thing wrong with the set, and the files it damages."""

    what: str
    tape_id: str | None = None
    container_id: str | None = None
    segment_id: str | None = None
    files: tuple[str, ...] = ()

    def describe(self) -> str:
        where = " ".join(
            part for part in (
                f"tape {self.tape_id}" if self.tape_id else "",
                f"container {self.container_id}" if self.container_id else "",
                f"segment {self.segment_id}" if self.segment_id else "",
            ) if part
        )
        # One line: the names' control characters (a newline) escaped.
        damages = (f"; damages {', '.join(map(shown_in_list, self.files))}" if self.files
                   else "")
        what = self.what
        for lead in (f"tape {self.tape_id}: ", f"tape {self.tape_id} "):
            if self.tape_id and what.startswith(lead):  # said in `where` already
                what = what.removeprefix(lead)
                break
        return f"{where}: {what}{damages}" if where else f"{what}{damages}"


@attrs.frozen
class VerifyReport:
    catalog: Catalog
    catalog_sha256: str
    catalog_found_on: str
    tapes_checked: int
    containers_checked: int
    bytes_checked: int
    seconds: float
    problems: tuple[Problem, ...]

    @property
    def ok(self) -> bool:
        return not self.problems


_INT64_MAX = (1 << 63) - 1
EMPTY = bytes.fromhex(cat.EMPTY_SHA256)


@attrs.frozen
class ContainerSegments:
    """The segments of one container, in order of offset (then length), as columns.

    `offsets` and `lengths` are 64-bit (a number a catalog holds that does not fit is taken as
    the largest that does: such a segment lies beyond every container's end); `digests` holds
    each one's SHA-256 as 32 raw bytes, `known` a byte each, 1 where the catalog's hash is
    well-formed (64 lowercase hex digits; any other never matches). `record(k)` is segment k's
    catalog record.
    """

    offsets: Sequence[int]
    lengths: Sequence[int]
    digests: bytes | memoryview
    known: bytes | memoryview
    record: Callable[[int], SegmentEntry]
    #: Whether the segments cover the container's first `tile_end` bytes, each byte once
    #: (-1: they do not); then their hashes check those bytes.
    tile_end: int

    def __len__(self) -> int:
        return len(self.offsets)

    def records(self) -> list[SegmentEntry]:
        return [self.record(k) for k in range(len(self))]

    def tiles(self, size: int) -> bool:
        return self.tile_end == size


class SegmentsByContainer:
    """Every segment of a catalog, grouped by container: columns verify checks them with.

    From a catalog read lazily (RecordLines) the columns are the ones the C decoder took as
    it read the lines, from a backup's own catalog (RecordColumns) the plan's, and no segment
    record is made; otherwise they are made from the records. Segments of a container the
    catalog does not list are never checked.
    """

    def __init__(self, catalog: Catalog) -> None:
        segments = catalog.segments
        self._segments = segments
        number: dict[str, int] = {}  # a container listed twice is one group
        for c in catalog.containers:
            number.setdefault(c.container_id, len(number))
        count = len(number)
        columns = segments.columns if isinstance(segments, cat.RecordColumns) else None
        if columns is not None:
            groups: Sequence[int] = columns["container_id"]
            # The scan numbers the containers list's ids first, as listed, then others as it
            # meets them; anything else (an id listed twice, or written with escapes) is
            # numbered again here.
            renumber = [number.get(cid, -1) for cid in columns["ids"]]
            if renumber != [*range(count), *[-1] * (len(renumber) - count)]:
                groups = array("q", (renumber[g] if g >= 0 else -1 for g in groups))
            offsets: Sequence[int] = columns["container_offset"]
            lengths: Sequence[int] = columns["length_bytes"]
            digests, known = columns["sha256"]
        else:
            groups, offsets, lengths = array("q"), array("q"), array("q")
            raw, ok = bytearray(), bytearray()
            for s in segments:
                groups.append(number.get(s.container_id, -1))
                offsets.append(min(max(s.container_offset, -_INT64_MAX), _INT64_MAX))
                lengths.append(min(max(s.length_bytes, -_INT64_MAX), _INT64_MAX))
                digest = _raw_digest(s.sha256)
                raw += digest or bytes(32)
                ok.append(digest is not None)
            digests, known = bytes(raw), bytes(ok)
        self._number = number
        self._order, self._starts, self._tile_ends = _group(groups, offsets, lengths, count)
        if self._order is None:
            self._offsets, self._lengths = offsets, lengths
            self._digests, self._known = memoryview(digests), memoryview(known)
        else:
            order = self._order
            self._offsets = array("q", (offsets[i] for i in order))
            self._lengths = array("q", (lengths[i] for i in order))
            d = memoryview(digests)
            self._digests = memoryview(b"".join(d[32 * i:32 * i + 32] for i in order))
            self._known = memoryview(bytes(known[i] for i in order))

    def of(self, container_id: str) -> ContainerSegments:
        g = self._number.get(container_id)
        lo, hi = (0, 0) if g is None else (self._starts[g], self._starts[g + 1])
        order, segments = self._order, self._segments

        def record(k: int) -> SegmentEntry:
            i = lo + k
            return segments[i if order is None else order[i]]

        return ContainerSegments(self._offsets[lo:hi], self._lengths[lo:hi],
                                 self._digests[32 * lo:32 * hi], self._known[lo:hi], record,
                                 -1 if g is None else self._tile_ends[g])


def _raw_digest(text: str) -> bytes | None:
    """A SHA-256 of 64 lowercase hex digits as its 32 bytes; None for anything else."""
    if len(text) != cat.SHA256_HEX_LEN or text != text.lower():
        return None
    try:
        raw = bytes.fromhex(text)
    except ValueError:
        return None
    return raw if len(raw) == cat.SHA256_HEX_LEN // 2 else None  # fromhex skips spaces


def _group(groups: Sequence[int], offsets: Sequence[int], lengths: Sequence[int], count: int,
           ) -> tuple[Sequence[int] | None, Sequence[int], Sequence[int]]:
    """native.group_segments, or the same in Python: (order, starts, tile ends)."""
    module = native.MODULE
    if module is not None:
        got, starts, ends = module.group_segments(groups, offsets, lengths, count)
        return (None if got is None else memoryview(got).cast("q"),
                memoryview(starts).cast("q"), memoryview(ends).cast("q"))
    key = [(g, offsets[i], lengths[i], i) if 0 <= g < count else (count, 0, 0, i)
           for i, g in enumerate(groups)]  # segments of no group last, as they come
    ordered = sorted(range(len(key)), key=key.__getitem__)
    sizes = [0] * (count + 1)
    for g, *_ in key:
        sizes[g] += 1
    firsts = list(itertools.accumulate(sizes[:count], initial=0))
    tile_ends = []
    for g in range(count):
        at = 0
        for i in ordered[firsts[g]:firsts[g + 1]]:
            if lengths[i] == 0:
                continue
            if offsets[i] != at or lengths[i] < 0 or lengths[i] > _INT64_MAX - at:
                at = -1
                break
            at += lengths[i]
        tile_ends.append(at)
    return (None if ordered == list(range(len(key))) else ordered), firsts, tile_ends


class CatalogIndex:
    """Lookups over a catalog: segments by container, containers by tape, file names by id
    (made when a problem first names a file)."""

    def __init__(self, catalog: Catalog) -> None:
        self.catalog = catalog
        self.table = SegmentsByContainer(catalog)
        self._paths: dict[str, str] | None = None
        self.containers: dict[str, list[ContainerEntry]] = defaultdict(list)
        for c in catalog.containers:
            self.containers[c.tape_id].append(c)
        by_position = operator.attrgetter("tape_offset", "sequence_number")
        for cs in self.containers.values():
            cs.sort(key=by_position)

    @property
    def paths(self) -> dict[str, str]:
        if self._paths is None:
            catalog = self.catalog
            paths = {f.file_id: f.relative_path for f in catalog.source_files}
            for k in catalog.skipped:  # a file skipped during the backup still has segments
                if k.file_id is not None:
                    paths.setdefault(k.file_id, f"{k.relative_path} (skipped)")
            self._paths = paths
        return self._paths

    def segments_of(self, container_id: str) -> list[SegmentEntry]:
        """The records of a container's segments, in order of offset."""
        return self.table.of(container_id).records()

    def files_in(self, segments: Sequence[SegmentEntry]) -> tuple[str, ...]:
        seen: dict[str, None] = {}
        for s in segments:
            seen.setdefault(self.paths.get(s.file_id, f"<unknown file {s.file_id}>"))
        return tuple(seen)

    def files_on_tape(self, tape_id: str) -> tuple[str, ...]:
        segs = [s for c in self.containers.get(tape_id, ())
                for s in self.segments_of(c.container_id)]
        return self.files_in(segs)


def parse_sha256_file(data: bytes) -> str | None:
    """The hash in a catalog.sha256 file (64 hex digits; `sha256sum` output is accepted too)."""
    words = data.split()
    if not words:
        return None
    word = words[0].decode("ascii", errors="replace").lower()
    if len(word) != cat.SHA256_HEX_LEN or any(c not in "0123456789abcdef" for c in word):
        return None
    return word


def load_catalog_file(path: Path, codec: CatalogCodec) -> tuple[Catalog, str]:
    """A catalog.json from local disk and its SHA-256, checked against a catalog.sha256 beside it
    when there is one. Raises CatalogReadError."""
    try:
        data = path.read_bytes()
    except OSError as e:  # a path the user gave
        raise UsageError(f"cannot read the catalog file {path}: {e.strerror}; give the path "
                         "of a catalog.json") from e
    digest = hashlib.sha256(data).hexdigest()
    beside = path.with_name("catalog.sha256")
    if beside.is_file() and parse_sha256_file(beside.read_bytes()) != digest:
        raise CatalogReadError(f"{path} does not match {beside}: the catalog is damaged")
    return codec.decode(data, source=str(path)), digest


async def read_tape_catalog(tape: LoadedTape, tape_id: str) -> tuple[bytes, str]:
    """catalog.json of the loaded tape and its SHA-256, checked against catalog.sha256.

    Raises CatalogReadError when either file is missing or they disagree.
    """
    data = await _catalog_bytes(tape, tape_id)
    assert isinstance(data, bytes)
    digest = await trio.to_thread.run_sync(lambda: hashlib.sha256(data).hexdigest())
    await _check_catalog_sha(tape, tape_id, digest)
    return data, digest


async def _catalog_bytes(tape: LoadedTape, tape_id: str, *, mapped: bool = False,
                         ) -> bytes | mmap.mmap:
    """The tape's catalog.json (`mapped`: perhaps mapped into memory, as read_whole gives it)."""
    size = await tape.size_of(cat.CATALOG_JSON)
    if size is None:
        raise CatalogReadError(f"tape {tape_id} has no {cat.CATALOG_JSON}")
    if size > MAX_CATALOG_BYTES:
        raise CatalogReadError(f"tape {tape_id}: {cat.CATALOG_JSON} is implausibly large")
    # A drive may map a big file into memory instead of copying it (read_whole: optional).
    read = getattr(tape, "read_whole", tape.read_small) if mapped else tape.read_small
    data = await read(cat.CATALOG_JSON, limit=size + 1)
    if data is None:
        raise CatalogReadError(f"tape {tape_id} has no {cat.CATALOG_JSON}")
    return data


async def read_and_decode(tape: LoadedTape, tape_id: str, codec: CatalogCodec, source: str,
                          *, lazy: bool = False) -> tuple[Catalog, str]:
    """The loaded tape's catalog and its SHA-256, checked as read_tape_catalog checks it,
    decoded while the hash is taken: one core each. With `lazy` and ltoflow's own codec, it is
    decoded as JsonCatalogCodec.decode(lazy=True) does, from the file mapped into memory where
    the drive can; another codec gets the bytes, as before."""
    decode: Callable[[], Catalog]
    if isinstance(codec, JsonCatalogCodec):
        data = await _catalog_bytes(tape, tape_id, mapped=lazy)
        decode = partial(codec.decode, data, source=source, lazy=lazy)
    else:
        data = await _catalog_bytes(tape, tape_id)
        assert isinstance(data, bytes)  # read, not mapped
        decode = partial(codec.decode, data, source=source)
    digest = ""
    catalog: Catalog | None = None
    failed: CatalogReadError | None = None

    async def take_hash() -> None:
        nonlocal digest
        digest = await trio.to_thread.run_sync(lambda: hashlib.sha256(data).hexdigest())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(take_hash)
        try:
            catalog = await trio.to_thread.run_sync(decode)
        except CatalogReadError as e:  # a damaged copy says so first
            failed = e
    await _check_catalog_sha(tape, tape_id, digest)
    if failed is not None:
        raise failed
    assert catalog is not None
    return catalog, digest


async def tape_catalog_sha(tape: LoadedTape, tape_id: str, pool: PipelineBuffer,
                           known: str | None = None) -> str:
    """The SHA-256 of the loaded tape's catalog.json, checked against catalog.sha256 as
    read_tape_catalog does, read a chunk at a time: a million-file catalog is 700 MB.
    `known`: the set catalog's SHA-256, as _check_catalog_sha takes it."""
    h = hashlib.sha256()
    if await tape.size_of(cat.CATALOG_JSON) is None:
        raise CatalogReadError(f"tape {tape_id} has no {cat.CATALOG_JSON}")
    reader = await tape.open_read(cat.CATALOG_JSON)
    try:
        with BufferLease(pool) as lease:
            buf = await lease.take()
            while n := await reader.readinto(memoryview(buf)):
                await trio.to_thread.run_sync(h.update, memoryview(buf)[:n])
    finally:
        await reader.close()
    digest = h.hexdigest()
    await _check_catalog_sha(tape, tape_id, digest, known)
    return digest


class CatalogShaMismatch(CatalogReadError):
    """A tape's catalog.json does not hash to what its catalog.sha256 says; `digest` is what
    it hashes to, so that a copy identical to the set's catalog shows the .sha256 file as the
    damaged one."""

    def __init__(self, tape_id: str, digest: str, known: str | None = None) -> None:
        self.digest = digest
        super().__init__(sha_file_damaged(tape_id) if digest == known else (
            f"tape {tape_id}: {cat.CATALOG_JSON} does not match {cat.CATALOG_SHA256} "
            "(the catalog on this tape is damaged)"))


def sha_file_damaged(tape_id: str) -> str:
    return (f"tape {tape_id}: {cat.CATALOG_SHA256} is damaged: {cat.CATALOG_JSON} is the set's "
            f"catalog, byte for byte; copy {cat.CATALOG_SHA256} from a tape whose catalog "
            "checks out")


async def _check_catalog_sha(tape: LoadedTape, tape_id: str, digest: str,
                             known: str | None = None) -> None:
    """`known`: the SHA-256 of the set's catalog, where it was found already."""
    sha_file = await tape.read_small(cat.CATALOG_SHA256, limit=4096)
    if sha_file is None:
        raise CatalogReadError(f"tape {tape_id} has no {cat.CATALOG_SHA256}")
    if parse_sha256_file(sha_file) != digest:
        raise CatalogShaMismatch(tape_id, digest, known)


class _ContainerCheck:
    """Hash state for one container: the whole blob, and each segment's verdict in `status`
    (0: not hashed, as when it lies beyond the bytes read; 1: it matches the catalog; 2: not)."""

    def __init__(self, segments: ContainerSegments) -> None:
        self.segments = segments
        self.whole = hashlib.sha256()
        self.status = bytearray(len(segments))

    def segment_updater(self, part: int, parts: int) -> Callable[[memoryview, int], None]:
        """An update for this part of `parts`, fed every chunk in order: one for each of
        `parts` threads, which share `status` only (each sets its own segments'). Part k takes
        the segments that start in the k-th of `parts` equal stretches of each chunk (a
        stretch of memory each, not every other segment: a tenth faster on small ones). With
        the C extension, the segments that lie whole in a chunk are hashed and compared by one
        call (without the interpreter's lock); the others here, a piece at a time."""
        segs, status, module, decide = self.segments, self.status, native.MODULE, self._decide
        offsets, lengths, digests, known = segs.offsets, segs.lengths, segs.digests, segs.known
        n = len(offsets)
        begun: dict[int, Any] = {}  # segments that run on into the next chunk

        def update(data: memoryview, pos: int) -> None:
            end = pos + len(data)
            for j, h in list(begun.items()):
                j_end = offsets[j] + lengths[j]
                h.update(data[:min(j_end, end) - pos])
                if j_end <= end:
                    decide(j, begun.pop(j).digest())
            start = pos + len(data) * part // parts
            limit = pos + len(data) * (part + 1) // parts
            j = bisect.bisect_left(offsets, start)
            while j < n and offsets[j] < limit:
                if module is not None:
                    j = module.check_segments(data, pos, offsets, lengths, digests, known,
                                              status, j, limit)
                    if j >= n or offsets[j] >= limit:
                        break
                # Segment j does not lie whole in this chunk (or there is no C extension).
                if lengths[j] < 0:  # a damaged record: never checked
                    j += 1
                    continue
                j_end = offsets[j] + lengths[j]
                h = hashlib.sha256()
                h.update(data[offsets[j] - pos:min(j_end, end) - pos])
                if j_end <= end:
                    decide(j, h.digest())
                else:
                    begun[j] = h
                j += 1

        return update

    def finish(self, total: int) -> None:
        """After the last chunk (`total` bytes in all): an empty segment no chunk reached,
        at the very end of the container (or in an empty one), is checked here."""
        segs, status = self.segments, self.status
        if not status.count(0):
            return
        for k in (k for k, verdict in enumerate(status) if not verdict):
            if segs.lengths[k] == 0 and 0 <= segs.offsets[k] <= total:
                self._decide(k, EMPTY)

    def _decide(self, k: int, digest: bytes) -> None:
        """Segment k's verdict, from the SHA-256 of its bytes."""
        segs = self.segments
        self.status[k] = 1 if segs.known[k] and digest == segs.digests[32 * k:32 * k + 32] else 2


MISSING_CONTAINER = "container is missing from the tape"


def read_pool() -> PipelineBuffer:
    """Buffers for reading containers, allocated on first use and reused for a whole job."""
    return PipelineBuffer((READ_AHEAD + 2) * READ_CHUNK_BYTES)


async def verify_container(
    tape: LoadedTape, container: ContainerEntry, index: CatalogIndex,
    pool: PipelineBuffer | None = None, *, whole: bool = False, meter: ReadMeter | None = None,
) -> tuple[list[Problem], int]:
    """Read one container front to back; return its problems and the bytes read.

    With `whole`, the container's own SHA-256 is checked even when its segments tile it (they
    check every byte then; `backup --verify` also checks the record it has just written, which
    the recovery kit reads too)."""
    pool = pool or read_pool()
    segments = index.table.of(container.container_id)

    def files() -> tuple[str, ...]:
        return index.files_in(segments.records())

    where: dict[str, Any] = {
        "tape_id": container.tape_id, "container_id": container.container_id
    }
    path = f"data/{container.container_id}"
    size = await tape.size_of(path)
    if size is None:
        return [Problem(MISSING_CONTAINER, files=files(), **where)], 0
    problems: list[Problem] = []
    if size < container.size_bytes:
        problems.append(Problem(
            f"container holds {size} bytes, the catalog says {container.size_bytes}",
            files=files(), **where))
    elif size > container.size_bytes:  # the files' bytes are checked on their own, below
        problems.append(Problem(
            f"container holds {size} bytes, the catalog says {container.size_bytes}: the "
            "bytes past that belong to no file", **where))
    check = _ContainerCheck(segments)

    def update_whole(data: memoryview, pos: int) -> None:
        check.whole.update(data)

    # When the segments tile the container (every byte in exactly one of them, as ltoflow and
    # the seed write it), their hashes check every byte and the container's hash adds nothing
    # for the bytes on tape: it is computed only when some bytes lie outside every segment (or
    # with `whole`); otherwise the segments are shared out between two threads, one per core.
    # Each thread reads every chunk, from a queue of its own at its own pace; a buffer goes
    # back to the pool once every thread is done with it. (A thread call per chunk and hash,
    # or the hashes waiting for each other after every chunk, cost a fifth of the speed.)
    tiled = segments.tiles(container.size_bytes)
    whole_too = container.sha256 is not None and (whole or not tiled)
    # Small segments are mostly Python work per segment, unless the C extension hashes them:
    # a second thread would only wait for the interpreter's lock.
    threads = (HASH_THREADS if len(segments) > 1 and (
        native.MODULE is not None
        or container.size_bytes >= SHARED_SEGMENT_BYTES * len(segments))
        else 1)
    updates = ([check.segment_updater(0, 1), update_whole] if whole_too
               else [check.segment_updater(k, threads) for k in range(threads)])
    queues: tuple[queue.SimpleQueue[tuple[mmap.mmap, int, int] | None], ...] = tuple(
        queue.SimpleQueue() for _ in updates)
    users: dict[int, int] = {}
    mapped: dict[int, mmap.mmap] = {}  # chunks mapped from the tape's file, not yet done
    window_slots = trio.Semaphore(READ_AHEAD + 2)
    total = 0

    def done_with(buf: mmap.mmap) -> None:
        left = users[id(buf)] - 1
        if left:
            users[id(buf)] = left
            return
        del users[id(buf)]
        if mapped.pop(id(buf), None) is not None:
            buf.close()
            window_slots.release()
        else:
            lease.give_back(buf)

    token = trio.lowlevel.current_trio_token()

    def hash_all(chunks: queue.SimpleQueue[tuple[mmap.mmap, int, int] | None],
                 update: Callable[[memoryview, int], None]) -> None:
        while (item := chunks.get()) is not None:
            buf, n, pos = item
            update(memoryview(buf)[:n], pos)
            # Handed back without waiting for the loop to take it: a hasher that waited
            # stalled once a chunk (a third of the speed on a million small segments).
            # Callbacks run in order, so all of these run before the thread is seen done.
            token.run_sync_soon(done_with, buf)

    async def reader() -> None:
        nonlocal total
        try:
            reader_ = await tape.open_read(path)
            map_chunk = getattr(reader_, "map_chunk", None)
            try:
                while True:
                    if map_chunk is not None:
                        # The slots are this container's: after an error none is needed.
                        await window_slots.acquire()
                        window = await map_chunk(total, READ_CHUNK_BYTES)
                        if window is None:
                            window_slots.release()
                            break
                        buf, n = window, len(window)
                        mapped[id(buf)] = buf
                    else:
                        buf = await lease.take()
                        n = await reader_.readinto(memoryview(buf))
                        if not n:
                            lease.give_back(buf)
                            break
                    users[id(buf)] = len(queues)
                    for chunks in queues:
                        chunks.put((buf, n, total))
                    if meter is not None:  # bytes past the catalog's size are no file's
                        meter.done_bytes += max(0, min(n, container.size_bytes - total))
                    total += n
            finally:
                await reader_.close()
        finally:
            for chunks in queues:
                chunks.put(None)  # the hashers stop after what they have, even on an error

    try:
        with BufferLease(pool) as lease:
            async with trio.open_nursery() as nursery:
                for chunks, update in zip(queues, updates, strict=True):
                    nursery.start_soon(trio.to_thread.run_sync, hash_all, chunks, update)
                nursery.start_soon(reader)
    finally:  # after an error, the chunks mapped that no hasher finished
        for window in mapped.values():
            # One a failed hasher's traceback still holds cannot close yet: it is unmapped
            # when that goes, and the error itself must come through.
            with contextlib.suppress(BufferError):
                window.close()

    check.finish(total)
    status = check.status
    if status.count(1) != len(status):  # records are made only of the segments reported
        for k, verdict in enumerate(status):
            if verdict != 1:
                s = segments.record(k)
                problems.append(Problem(
                    "SHA-256 mismatch" if verdict else
                    "segment lies beyond the end of the container",
                    segment_id=s.segment_id, files=index.files_in([s]), **where))
    if total != container.size_bytes and size == container.size_bytes and not problems:
        problems.append(Problem(f"container gave {total} bytes when read, the catalog says "
                                f"{container.size_bytes}", files=files(), **where))
    if whole_too and check.whole.hexdigest() != container.sha256 and not problems:
        problems.append(Problem(
            "the catalog's SHA-256 of the container is wrong (every segment in it matches)"
            if tiled else "container SHA-256 mismatch outside every segment", **where))
    return problems, total


async def _check_tape_catalog(tape: LoadedTape, catalog: Catalog, tape_id: str,
                              catalog_sha: str | None, pool: PipelineBuffer) -> list[Problem]:
    """The problems of this tape's catalog copy: damaged, unreadable, or of another set."""
    try:
        data: bytes | None = None
        if any(t.volume_serial for t in catalog.tapes):
            # Tape k's copy knows the serials of tapes 1..k only, so it differs: read it whole.
            data, digest = await read_tape_catalog(tape, tape_id)
        else:  # hashed as it is read, held in memory only if it differs
            digest = await tape_catalog_sha(tape, tape_id, pool, catalog_sha)
        if catalog_sha is not None and digest != catalog_sha:
            # Later tapes know more volume serials; anything else differing is damage.
            if data is None:
                data, _ = await read_tape_catalog(tape, tape_id)
            mine = await trio.to_thread.run_sync(
                partial(JsonCatalogCodec().decode, data, source=f"{tape_id}/catalog"))
            if not mine.same_set_as(catalog):
                return [Problem(_differing_catalog(mine, catalog, tape_id), tape_id=tape_id)]
    except BackupError as e:  # damaged catalog, or the tape cannot be read at all
        return [Problem(str(e), tape_id=tape_id)]
    return []


def _differing_catalog(mine: Catalog, used: Catalog, tape_id: str) -> str:
    """Why a tape's catalog copy is not the set's. Copies of one set that list a different
    number of tapes are those of a backup not finished after a tape filled early: the tapes
    written after it know the new layout, tape 1's copy is replaced last (backup --resume)."""
    if mine.backup_set_id != used.backup_set_id or len(mine.tapes) == len(used.tapes):
        return "the catalog on this tape differs from the set's catalog"
    where = (f"{tape_id}'s catalog/catalog.json" if len(mine.tapes) > len(used.tapes)
             else "the catalog/catalog.json of the tape whose copy lists the most tapes")
    return (f"the catalog on this tape lists {len(mine.tapes)} tapes, the one verify read "
            f"first {len(used.tapes)}: this set's backup was not finished after a tape filled "
            "early (tape 1's copy is replaced last); finish it with `ltoflow backup --resume`, "
            f"or restore with --catalog {where}")


async def verify_loaded_tape(
    tape: LoadedTape,
    catalog: Catalog,
    tape_id: str,
    *,
    catalog_sha: str | None,
    index: CatalogIndex | None = None,
    counters: list[int] | None = None,
    whole: bool = False,
    catalog_checked: bool = False,
    meter: ReadMeter | None = None,
) -> list[Problem]:
    """Check this tape's catalog copy and every container the catalog puts on it (`whole`: as
    verify_container takes it; `catalog_checked`: this tape's copy is the one `catalog` was
    just read from, already checked against its catalog.sha256, and is not read again)."""
    index = index or CatalogIndex(catalog)
    pool = read_pool()
    problems = ([] if catalog_checked
                else await _check_tape_catalog(tape, catalog, tape_id, catalog_sha, pool))
    for container in index.containers.get(tape_id, []):
        found: list[Problem] = []
        nbytes = 0
        counted = meter.done_bytes if meter is not None else 0
        try:
            found, nbytes = await verify_container(tape, container, index, pool, whole=whole,
                                                   meter=meter)
        except* BackupError as group:
            segs = index.segments_of(container.container_id)
            found = [Problem(f"cannot be read: {e}", tape_id=tape_id,
                             container_id=container.container_id, files=index.files_in(segs))
                     for e in leaves(group)]
        problems.extend(found)
        if meter is not None:  # what could not be read (missing, short, an error) is not due
            meter.total_bytes -= container.size_bytes - (meter.done_bytes - counted)
        if counters is not None:
            # a container not there is not counted as checked (its files are named)
            counters[0] += not any(p.what == MISSING_CONTAINER for p in found)
            counters[1] += nbytes
    problems.extend(await _check_kit(tape, tape_id))
    return problems


async def _check_kit(tape: LoadedTape, tape_id: str) -> list[Problem]:
    """The recovery kit's files against its SHA256SUMS. A tape without one (written by the
    seed, or by an ltoflow before it wrote one) has nothing to check."""
    try:
        sums = await tape.read_small(recovery.SUMS, limit=1 << 16)
        if sums is None:
            return []
        problems = []
        for name, digest in recovery.parse_sums(sums).items():
            data = await tape.read_small(f"recovery/{name}", limit=1 << 24)
            if data is None or hashlib.sha256(data).hexdigest() != digest:
                what = "is missing" if data is None else (
                    f"does not match {recovery.SUMS} (one of them is damaged)")
                problems.append(Problem(
                    f"recovery/{name} {what}: copy recovery/ from another tape of the set",
                    tape_id=tape_id))
        return problems
    except BackupError as e:
        return [Problem(f"its recovery kit cannot be read: {e}", tape_id=tape_id)]


@attrs.frozen
class FoundCatalog:
    catalog: Catalog
    sha256: str
    found_on: str
    problems: list[Problem]
    #: On a single drive, the tape it was read from, still loaded (then `found_on` is its
    #: label); None when it was read from tape `found_on` of a drive that lists its tapes.
    held: LoadedTape | None = None

    def read_from(self, tape_id: str, loaded: LoadedTape) -> bool:
        """Whether this catalog was read from this very copy: tape `tape_id`, as `loaded`."""
        return loaded is self.held if self.held is not None else tape_id == self.found_on


async def find_catalog(
    drive: TapeDrive, codec: CatalogCodec, holder: TapeHolder | None = None, *,
    lazy: bool = False, newest: bool = False,
) -> FoundCatalog:
    """The set's catalog, from the first tape whose copy checks out (`lazy`: as
    codec.decode takes it).

    A drive that can list its tapes (the simulator) is searched tape by tape. With `newest`,
    the copy found gives way to the newest good copy (_newest_copy: a backup not finished
    after a tape filled early left older layouts on the tapes before it). A single drive reads the
    tape in it (the operator is asked for one if needed); that tape stays loaded in `holder`,
    so verify or restore can start with it instead of loading it again.
    """
    tapes = await drive.inventory()
    seen: list[Problem] = []
    if tapes is None:
        holder = holder or TapeHolder(drive, NoPromptOperator())
        request = TapeRequest("(any tape of the set)", 1, "", purpose="read")
        loaded = await load_requested_tape(drive, holder.operator, request, check_member)
        holder.hold(None, loaded)
        try:
            catalog, digest = await read_and_decode(
                loaded, loaded.label, codec, f"{loaded.label}: {cat.CATALOG_JSON}", lazy=lazy)
        except BackupError as e:
            await holder.release_after_error()
            raise CatalogReadError(
                f"{e}; insert another tape of the set, or give the catalog with --catalog"
            ) from e
        by_serial = {t.volume_serial: t.tape_id for t in catalog.tapes if t.volume_serial}
        of_container = {c.container_id: c.tape_id for c in catalog.containers}
        holder.tape_id = await identify(loaded, by_serial, of_container)
        return FoundCatalog(catalog, digest, loaded.label, seen, held=loaded)
    if not tapes:
        raise CatalogReadError(f"no tapes found in {drive.describe()}")
    sets = Counter(map(cat.set_of, tapes))
    if len(sets) > 1:
        held = ", ".join(f"set {s}: {n} tape(s)" for s, n in sets.items())
        raise UsageError(f"{drive.describe()} holds tapes of {len(sets)} backup sets ({held}); "
                         "give a directory that holds the tapes of one set")
    hashed: dict[int, tuple[str, str]] = {}  # copies passed over for their catalog.sha256
    found: FoundCatalog | None = None
    for tape_id in tapes:
        request = TapeRequest(tape_id, 0, "", purpose="read")
        try:
            loaded = await drive.load(request)
        except BackupError as e:
            seen.append(Problem(str(e), tape_id=tape_id))
            continue
        try:
            catalog, digest = await read_and_decode(
                loaded, tape_id, codec, f"{tape_id}/{cat.CATALOG_JSON}", lazy=lazy)
            for k, (other, other_digest) in hashed.items():  # the same bytes as this copy
                if other_digest == digest:
                    seen[k] = Problem(sha_file_damaged(other), tape_id=other)
            found = FoundCatalog(catalog, digest, tape_id, seen)
        except BackupError as e:
            if isinstance(e, CatalogShaMismatch):
                hashed[len(seen)] = (tape_id, e.digest)
            seen.append(Problem(str(e), tape_id=tape_id))
        finally:
            await drive.unload()
        if found is not None:
            return (await _newest_copy(drive, codec, tapes, found, lazy=lazy) if newest
                    else found)
    told = "; ".join(p.describe() for p in seen)
    raise CatalogReadError(
        f"no usable catalog on any tape in {drive.describe()}: {told}; give the set's other "
        "tapes (each holds the whole catalog), or restore with --catalog FILE (a copy kept "
        "elsewhere)")


async def _newest_copy(drive: TapeDrive, codec: CatalogCodec, tapes: Sequence[str],
                       found: FoundCatalog, *, lazy: bool) -> FoundCatalog:
    """The good copy on the highest-numbered tape of the set, when it is not the one `found`:
    a tape's copy is written as that tape is finished, and those of the tapes before a tape
    that filled early are replaced only at the end of the job, so the highest good copy is the
    newest. Copies passed over on the way, and `found`'s when a newer layout replaces it, are
    said as problems. Tapes are looked at from the last down, as far as `found`'s."""
    set_id = found.catalog.backup_set_id
    mine = _sequence_of(found.found_on, set_id)
    numbered = sorted(((n, t) for t in tapes if (n := _sequence_of(t, set_id)) is not None),
                      reverse=True)
    passed: list[Problem] = []
    for n, tape_id in numbered:
        if mine is None or n <= mine:
            break
        try:
            loaded = await drive.load(TapeRequest(tape_id, 0, "", purpose="read"))
            try:
                sha_file = await loaded.read_small(cat.CATALOG_SHA256, limit=4096)
                if sha_file is not None and parse_sha256_file(sha_file) == found.sha256:
                    break  # the very copy found: nothing newer above it
                catalog, digest = await read_and_decode(
                    loaded, tape_id, codec, f"{tape_id}/{cat.CATALOG_JSON}", lazy=lazy)
            finally:
                await drive.unload()
        except BackupError as e:
            if isinstance(e, CatalogShaMismatch) and e.digest == found.sha256:
                # The very copy found, and only this tape's catalog.sha256 is damaged.
                passed.append(Problem(sha_file_damaged(tape_id), tape_id=tape_id))
                break
            passed.append(Problem(f"{e}; its copy of the catalog was passed over",
                                  tape_id=tape_id))
            continue
        if catalog.backup_set_id != set_id or catalog.same_set_as(found.catalog):
            break  # another set's (verify says so), or the same layout: `found` will do
        stale = Problem(
            f"its catalog is older than the one on {tape_id} (they place containers "
            "differently): this set's backup was not finished after a tape filled early (the "
            "copies of the tapes before it are replaced last), and the copy on the last tape "
            "written says where the data is; finish it with `ltoflow backup --resume`",
            tape_id=found.found_on)
        return FoundCatalog(catalog, digest, tape_id, [*found.problems, *passed, stale])
    return FoundCatalog(found.catalog, found.sha256, found.found_on, [*found.problems, *passed])


def _sequence_of(tape_id: str, set_id: str) -> int | None:
    """The sequence number in a tape id of set `set_id` (None: not one, as a stray `.bak`)."""
    number = tape_id.removeprefix(f"TAPE-{set_id}-")
    return int(number) if number != tape_id and number.isascii() and number.isdigit() else None


async def verify_set(
    drive: TapeDrive,
    codec: CatalogCodec,
    *,
    clock: Clock,
    operator: Operator | None = None,
    reporter: Reporter | None = None,
) -> VerifyReport:
    """Verify every tape of the set found on `drive` against its catalog, in sequence order."""
    reporter = reporter or NullReporter()
    holder = TapeHolder(drive, operator or NoPromptOperator())
    started = clock.monotonic()
    try:
        found = await find_catalog(drive, codec, holder, lazy=True)
        catalog, digest, problems = found.catalog, found.sha256, found.problems
        # Tapes whose copy the search found wanting: said once, not read again.
        searched = Counter(p.tape_id for p in problems)
        index = CatalogIndex(catalog)
        inventory = await drive.inventory()
        check = check_member_of(catalog)
        counters = [0, 0]
        tapes_checked = 0
        on_tape = Counter[str]()
        for c in catalog.containers:
            on_tape[c.tape_id] += c.size_bytes
        meter = ReadMeter("verifying", on_tape.total(), sum(
            1 for t in catalog.tapes if inventory is None or t.tape_id in inventory))
        with reporting(meter, reporter):
            for t in sorted(catalog.tapes, key=lambda t: t.sequence_number):
                if inventory is not None and t.tape_id not in inventory:
                    problems.append(Problem("tape is missing", tape_id=t.tape_id,
                                            files=index.files_on_tape(t.tape_id)))
                    meter.total_bytes -= on_tape[t.tape_id]
                    continue
                request = TapeRequest(t.tape_id, t.sequence_number, catalog.backup_set_id,
                                      len(catalog.tapes), purpose="read",
                                      volume_serial=t.volume_serial)
                meter.begin_tape(t.tape_id, t.sequence_number)  # loading it counts too
                try:
                    loaded = await holder.get(request, check)
                except BackupError as e:
                    if searched[t.tape_id]:  # the search said so too: this says it with files
                        problems = [p for p in problems if p.tape_id != t.tape_id]
                    problems.append(Problem(f"cannot be loaded: {e}", tape_id=t.tape_id,
                                            files=index.files_on_tape(t.tape_id)))
                    meter.total_bytes -= on_tape[t.tape_id]
                    meter.tape_id = ""
                    continue
                try:
                    bad = await verify_loaded_tape(
                        loaded, catalog, t.tape_id, catalog_sha=digest, index=index,
                        counters=counters, meter=meter,
                        catalog_checked=found.read_from(t.tape_id, loaded)
                        or t.tape_id in searched)
                except BaseException:
                    await holder.release_after_error()
                    raise
                meter.tape_id = ""
                await holder.release_or_warn(reporter)
                tapes_checked += 1
                problems.extend(bad)
                reporter.event(TapeVerified(
                    t.tape_id, len(index.containers.get(t.tape_id, [])),
                    len(bad) + searched[t.tape_id]))
    except BaseException:
        await holder.release_after_error()
        raise
    await holder.release()
    return VerifyReport(
        catalog=catalog,
        catalog_sha256=digest,
        catalog_found_on=found.found_on,
        tapes_checked=tapes_checked,
        containers_checked=counters[0],
        bytes_checked=counters[1],
        seconds=clock.monotonic() - started,
        problems=tuple(problems),
    )
