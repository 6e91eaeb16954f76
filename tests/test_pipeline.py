"""The actors' coordination, on trio's virtual clock: buffer bounds, priming, stalls, priority."""

from __future__ import annotations

import hashlib
import itertools
import mmap
from collections.abc import Buffer
from pathlib import Path

import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

from ltoflow.buffers import HIGH_WATER, PipelineBuffer
from ltoflow.engine import Chunk, WriterStats, prehash_actor, write_actor
from ltoflow.hashing import AggregateHasher, HashRecorder, Piece, multi_segment_flags
from ltoflow.plan import Plan
from ltoflow.progress import ListReporter

from .conftest import write_tree
from .test_plan import plan_of


class MemoryWriter:
    def __init__(self, tape: MemoryTape, path: str) -> None:
        self.tape, self.path = tape, path

    async def write(self, data: Buffer) -> None:
        self.tape.files[self.path] += bytes(data)
        self.tape.log.append(("write", self.path, trio.current_time()))

    async def close(self) -> None:
        self.tape.log.append(("close", self.path, trio.current_time()))

    async def abort(self) -> None:
        self.tape.log.append(("abort", self.path, trio.current_time()))


class MemoryReader:
    def __init__(self, data: bytes) -> None:
        self.data = data

    async def readinto(self, buf: memoryview) -> int:
        n = min(len(buf), len(self.data))
        buf[:n] = self.data[:n]
        self.data = self.data[n:]
        return n

    async def seek(self, offset: int) -> None:
        raise NotImplementedError

    async def close(self) -> None:
        pass


class MemoryTape:
    """A LoadedTape in memory that logs every operation with its (virtual) time."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.log: list[tuple[str, str, float]] = []

    @property
    def label(self) -> str:
        return "MEM-1"

    @property
    def volume_serial(self) -> str | None:
        return "MEM001L9"

    async def free_bytes(self) -> int | None:
        return None

    async def open_read(self, path: str) -> MemoryReader:
        return MemoryReader(self.files[path])

    async def read_small(self, path: str, *, limit: int) -> bytes | None:
        data = self.files.get(path)
        return None if data is None else data[:limit]

    async def size_of(self, path: str) -> int | None:
        data = self.files.get(path)
        return None if data is None else len(data)

    async def list_dir(self, path: str) -> list[str]:
        prefix = path.rstrip("/") + "/"
        return sorted(p[len(prefix):] for p in self.files if p.startswith(prefix))

    async def open_write(self, path: str, *, replace: bool = False) -> MemoryWriter:
        self.files[path] = b""
        return MemoryWriter(self, path)

    async def sync(self) -> None:
        self.log.append(("sync", "", trio.current_time()))

    async def replace(self, src: str, dst: str) -> None:
        self.files[dst] = self.files.pop(src)

    def writes(self) -> int:
        return sum(1 for op, _, _ in self.log if op == "write")


def one_container_plan() -> Plan:
    return plan_of([1_000] * 8, 1_000_000, 100_000)  # 8 segments in one container


def chunk_for(plan: Plan, buffer: mmap.mmap, segment: int, *, last: bool) -> Chunk:
    seg = plan.segments[segment]
    return Chunk(0, buffer, seg.length, [Piece(segment, 0, seg.length, True, True)],
                 first=segment == 0, last=last)


async def test_reader_waits_for_a_free_buffer_when_all_are_in_flight() -> None:
    buffer = PipelineBuffer(128 * 1024)  # two buffers of 64 KiB
    assert buffer.count == 2
    first = await buffer.take()
    await buffer.take()
    got: list[mmap.mmap] = []

    async def third() -> None:
        got.append(await buffer.take())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(third)
        await trio.testing.wait_all_tasks_blocked()
        assert got == [], "no third buffer while two are in flight"
        buffer.give_back(first, 0)
    assert got == [first], "the buffer given back is reused, not a new one allocated"


async def test_released_pool_drops_its_buffers_and_allocates_again_on_demand() -> None:
    buffer = PipelineBuffer(128 * 1024)
    first = await buffer.take()
    buffer.give_back(first, 0)
    buffer.release()  # what the engine does once a tape's data is on it
    again = await buffer.take()
    assert again is not first
    assert len(again) == buffer.chunk_bytes
    await buffer.take()  # the pool still holds two at a time


async def test_writer_starts_only_once_the_buffer_reaches_high_water() -> None:
    plan = one_container_plan()
    tape = MemoryTape()
    buffer = PipelineBuffer(8 * 1024 * 1024)
    buffer.chunk_bytes, buffer.count = 1_000, 8  # a tiny pool: 8 chunks of 1 kB
    send, receive = trio.open_memory_channel[Chunk](8)
    needed = int(HIGH_WATER * buffer.capacity)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(lambda: write_actor(
            receive, tape=tape, tape_id="T", container_ids=["C1"], plan=plan, buffer=buffer,
            stats=WriterStats(), reporter=ListReporter()))
        sent = 0
        for i in range(8):
            buf = await buffer.take()
            buffer.fill(1_000)
            await send.send(chunk_for(plan, buf, i, last=i == 7))
            sent += 1_000
            await trio.testing.wait_all_tasks_blocked()
            if sent < needed:
                assert tape.writes() == 0, f"writer started with only {sent} bytes buffered"
        # The writer drained the buffer and waits for it to refill before it restarts.
        await trio.testing.wait_all_tasks_blocked()
        assert tape.writes() == 6
        buffer.finish()  # nothing more is coming: write what is there
        send.close()
    assert tape.writes() == 8
    assert tape.files["data/C1"] == b"\0" * 8_000


async def test_writer_counts_a_stall_and_its_virtual_duration(
    autojump_clock: trio.testing.MockClock,
) -> None:
    plan = one_container_plan()
    tape = MemoryTape()
    buffer = PipelineBuffer(8 * 1024 * 1024)
    buffer.chunk_bytes = 1_000
    stats = WriterStats()
    send, receive = trio.open_memory_channel[Chunk](8)
    buffer.count = 6  # room for every chunk after the pause, so the feed never waits on it

    async def feed() -> None:
        async with send:
            for i in range(8):
                if i == 5:
                    await trio.sleep(7)  # the reader falls behind for 7 virtual seconds
                buf = await buffer.take()
                buffer.fill(1_000)
                if i < 5:
                    await send.send(chunk_for(plan, buf, i, last=False))
                else:  # then catches up in one go, without yielding in between
                    send.send_nowait(chunk_for(plan, buf, i, last=i == 7))
            buffer.finish()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(feed)
        nursery.start_soon(lambda: write_actor(
            receive, tape=tape, tape_id="T", container_ids=["C1"], plan=plan, buffer=buffer,
            stats=stats, reporter=ListReporter()))
    assert stats.stalls == 1
    assert stats.stall_seconds == 7.0
    assert stats.bytes == 8_000
    assert stats.containers == 1
    assert [op for op, _, _ in tape.log][-2:] == ["close", "sync"]


async def test_writer_aborts_a_container_cut_short_by_an_error() -> None:
    plan = one_container_plan()
    tape = MemoryTape()
    buffer = PipelineBuffer(1024 * 1024)
    send, receive = trio.open_memory_channel[Chunk](8)

    class ReaderFailed(Exception):
        pass

    async def feed() -> None:
        async with send:
            buf = await buffer.take()
            buffer.fill(1_000)
            buffer.finish()
            await send.send(chunk_for(plan, buf, 0, last=False))
            await trio.testing.wait_all_tasks_blocked()
            raise ReaderFailed

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(feed)
            nursery.start_soon(lambda: write_actor(
                receive, tape=tape, tape_id="T", container_ids=["C1"], plan=plan,
                buffer=buffer, stats=WriterStats(), reporter=ListReporter()))
    except* ReaderFailed:
        pass
    assert [op for op, _, _ in tape.log] == ["write", "abort"]


async def test_prehasher_waits_while_the_pipeline_runs_low(tmp_path: Path) -> None:
    write_tree(tmp_path, {f"f{i}": 5_000 for i in range(6)})
    from ltoflow.catalog import JsonCatalogCodec
    from ltoflow.plan import catalog_measurer, make_plan
    from ltoflow.scan import scan_tree

    plan = make_plan(scan_tree(tmp_path), capacity_bytes=200_000, container_size_bytes=10_000,
                     measure_catalog=catalog_measurer(JsonCatalogCodec(), "t"))
    recorder = HashRecorder(plan)
    pace = PipelineBuffer(1024 * 1024)
    done = trio.Event()
    reads = [0]
    want_c, want_f = multi_segment_flags(plan, range(len(plan.containers)), 0, len(plan.files))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(lambda: prehash_actor(
            plan=plan, start_segment=0, recorder=recorder,
            hasher=AggregateHasher(plan, want_c, want_f), pace=pace, done=done, counter=reads,
            reporter=ListReporter()))
        await trio.testing.wait_all_tasks_blocked()
        assert recorder.hashes.segments == [None] * len(plan.segments), "paused while low"
        assert reads == [0]
        pace.fill(pace.capacity // 2)  # the reader is comfortably ahead: prehash may run
        await done.wait()
    assert None not in recorder.hashes.segments
    assert reads == [plan.total_bytes]
    assert all(h is not None for h in recorder.complete().containers)


@settings(max_examples=120, deadline=None)
@given(sizes=st.lists(st.integers(0, 3_000), min_size=1, max_size=20),
       container=st.integers(500, 6_000),
       cuts=st.lists(st.integers(1, 5_000), max_size=12))
def test_aggregate_hasher_hashes_whole_containers_and_split_files_whatever_the_chunks(
        sizes: list[int], container: int, cuts: list[int]) -> None:
    """Chunks cut anywhere (several containers in one, a segment across two): every container
    and every file of several segments gets the hash of its bytes, and nothing else."""
    plan = plan_of(sizes, 1 << 40, container)
    files = [bytes([i % 251]) * n for i, n in enumerate(sizes)]
    segs = plan.segments
    stream = b"".join(
        files[segs.file_index[k]][segs.source_offset[k]:segs.source_offset[k] + segs.length[k]]
        for k in range(len(segs)))
    want_c, want_f = multi_segment_flags(plan, range(len(plan.containers)), 0, len(plan.files))
    hasher = AggregateHasher(plan, want_c, want_f)
    bounds = sorted({0, len(stream), *(c for c in cuts if c < len(stream))})
    starts = list(itertools.accumulate(segs.length, initial=0))
    got_c: dict[int, str] = {}
    got_f: dict[int, str] = {}
    for a, b in itertools.pairwise(bounds):
        pieces = [Piece(k, max(starts[k], a) - a, min(starts[k + 1], b) - max(starts[k], a),
                        starts[k] >= a, starts[k + 1] <= b)
                  for k in range(len(segs)) if starts[k] < b and starts[k + 1] > a]
        containers, done_files = hasher.update(memoryview(stream[a:b]), pieces)
        got_c.update(containers)
        got_f.update(done_files)
    assert got_c == {c: hashlib.sha256(stream[starts[cont.segments.start]:
                                              starts[cont.segments.stop]]).hexdigest()
                     for c, cont in enumerate(plan.containers) if want_c[c]}
    assert got_f == {f: hashlib.sha256(files[f]).hexdigest()
                     for f in range(len(files)) if want_f[f]}
    assert any(want_f) or not any(plan.file_starts[f + 1] - plan.file_starts[f] > 1
                                  for f in range(len(files)))
