"""The pipeline buffer: a pool of equal buffers that bounds the bytes in flight.

Backup streams through one (reader, hashers, tape writer); verify and restore read through a
small one. Kept apart from the engine so the jobs that only read do not load the backup's
modules at start-up.
"""

from __future__ import annotations

import mmap

import trio

from ltoflow.units import MiB

#: Largest read: big enough that a thread hop (~0.1 ms) is noise, small enough to pipeline.
MAX_CHUNK_BYTES = 8 * MiB
MIN_CHUNK_BYTES = 64 * 1024
#: The writer starts (and restarts after running dry) once this share of the buffer is full,
#: the way mbuffer does, so the drive never waits on a cold pipeline.
HIGH_WATER = 0.75
#: Below this share the prehasher pauses, so it never starves the reader that feeds the drive.
LOW_WATER = 0.25


async def pass_on[T](out: trio.MemorySendChannel[T], item: T) -> bool:
    """Send `item` to the next step of a pipeline; False when that step is gone. It closed its
    end because it failed, and its nursery raises that error: the step sending must stop
    quietly, not add a BrokenResourceError beside it (which would be reported as a bug)."""
    try:
        await out.send(item)
    except trio.BrokenResourceError:
        return False
    return True


class PipelineBuffer:
    """A pool of equal buffers that bounds the bytes in flight, and the fill level around it.

    Buffers are allocated on first use and reused while a tape streams, so a small backup does
    not pay for a big pool; `release` frees them between tapes. One pool serves every tape;
    `begin_tape` resets the fill state.
    """

    def __init__(self, total_bytes: int) -> None:
        self.chunk_bytes = max(MIN_CHUNK_BYTES, min(MAX_CHUNK_BYTES, total_bytes // 8))
        self.count = max(2, total_bytes // self.chunk_bytes)
        self._free: list[mmap.mmap] = []
        self._allocated = 0
        self.filled = 0  # bytes read and not yet on tape
        self.producer_done = False
        self._changed = trio.Event()

    def begin_tape(self) -> None:
        self.producer_done = False

    @property
    def capacity(self) -> int:
        return self.count * self.chunk_bytes

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def take(self) -> mmap.mmap:
        """A free buffer; waits while all are in flight.

        Buffers are anonymous mappings: the kernel gives zeroed pages as they are first
        written (no 8 MiB memset on the event loop), and a dropped one goes back to the system
        at once, which malloc'ed memory often does not.
        """
        while not self._free:
            if self._allocated < self.count:
                self._allocated += 1
                return mmap.mmap(-1, self.chunk_bytes, flags=mmap.MAP_PRIVATE)
            await self._changed.wait()
        return self._free.pop()

    def fill(self, nbytes: int) -> None:
        self.filled += nbytes
        self._notify()

    def give_back(self, buf: mmap.mmap, nbytes: int) -> None:
        self._free.append(buf)
        self.filled -= nbytes
        self._notify()

    def finish(self) -> None:
        self.producer_done = True
        self._notify()

    def release(self) -> None:
        """Free the buffers given back: nothing streams until the next tape, and the catalog
        encoded meanwhile should not sit on top of them in memory. A later take() allocates
        again."""
        self._allocated -= len(self._free)
        self._free.clear()

    def is_primed(self) -> bool:
        return (
            self.producer_done
            or (not self._free and self._allocated == self.count)
            or self.filled >= HIGH_WATER * self.capacity
        )

    async def wait_primed(self) -> None:
        """Until the buffer is filled to the high-water mark (or nothing more is coming)."""
        while not self.is_primed():
            await self._changed.wait()

    async def wait_healthy(self) -> None:
        """Until the buffer is above the low-water mark (or nothing more is coming)."""
        while not (self.producer_done or self.filled >= LOW_WATER * self.capacity):
            await self._changed.wait()


class BufferLease:
    """Buffers one step takes from a shared pool; those still out come back when it ends.

    A step that fails part-way (a read error in verify or restore) would otherwise keep its
    buffers, and the next step would wait for them forever.
    """

    def __init__(self, pool: PipelineBuffer) -> None:
        self.pool = pool
        self._out: dict[int, mmap.mmap] = {}

    async def take(self) -> mmap.mmap:
        buf = await self.pool.take()
        self._out[id(buf)] = buf
        return buf

    def give_back(self, buf: mmap.mmap) -> None:
        if self._out.pop(id(buf), None) is not None:
            self.pool.give_back(buf, 0)

    def __enter__(self) -> BufferLease:
        return self

    def __exit__(self, *exc: object) -> None:
        for buf in list(self._out.values()):
            self.give_back(buf)
