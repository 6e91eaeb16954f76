"""verify_container on its own: which hashes it computes, in how many threads, what it reports."""

from __future__ import annotations

import gc
import hashlib
import mmap
import random
from collections.abc import Callable, Iterator
from typing import ClassVar, cast

import attrs
import pytest

from ltoflow import catalog as cat
from ltoflow.drives import LoadedTape
from ltoflow.errors import TapeReadError
from ltoflow.verify import (
    READ_CHUNK_BYTES,
    SHARED_SEGMENT_BYTES,
    CatalogIndex,
    _ContainerCheck,
    verify_container,
)

CID = "CNT-00000000-0000-0000-0000-000000000000-00001"


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    async def readinto(self, buf: memoryview) -> int:
        n = min(len(buf), len(self.data) - self.pos)
        buf[:n] = self.data[self.pos:self.pos + n]
        self.pos += n
        return n

    async def close(self) -> None:
        pass


class _MappingReader(_Reader):
    """A reader that also offers map_chunk, as the simulator's does; it keeps every chunk it
    gave out, to see that verify closed them all."""

    given: ClassVar[list[mmap.mmap]] = []
    fail_at: ClassVar[int | None] = None  # map_chunk raises for the chunk at this offset

    async def map_chunk(self, offset: int, length: int) -> mmap.mmap | None:
        if offset == self.fail_at:
            raise TapeReadError("read of the container failed: injected")
        n = min(length, len(self.data) - offset)
        if n <= 0:
            return None
        chunk = mmap.mmap(-1, n)
        chunk[:] = self.data[offset:offset + n]
        self.given.append(chunk)
        return chunk


class _OneContainerTape:
    reader: type[_Reader] = _Reader

    def __init__(self, data: bytes) -> None:
        self.data = data

    async def size_of(self, path: str) -> int | None:
        return len(self.data) if path == f"data/{CID}" else None

    async def open_read(self, path: str) -> _Reader:
        assert path == f"data/{CID}"
        return self.reader(self.data)


@pytest.fixture(autouse=True, params=["read", "mapped"])
def reading(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """Every test twice: with a reader that copies into verify's buffers, and with one that
    maps chunks (the simulator's); all mapped chunks are closed when verify is done."""
    given: list[mmap.mmap] = []
    if request.param == "mapped":
        monkeypatch.setattr(_OneContainerTape, "reader", _MappingReader)
        monkeypatch.setattr(_MappingReader, "given", given)
    yield request.param
    assert all(chunk.closed for chunk in given)


def _container(data: bytes, spans: list[tuple[int, int]]) -> tuple[cat.ContainerEntry,
                                                                    CatalogIndex]:
    """The catalog entries of one container holding `data`, with a segment per (start, end)."""
    segments = tuple(
        cat.SegmentEntry(f"SEG-f{k}-001", f"f{k}", CID, a, 0, b - a,
                         hashlib.sha256(data[a:b]).hexdigest())
        for k, (a, b) in enumerate(spans))
    container = cat.ContainerEntry(CID, "set", "TAPE-1", 1, 0, len(data),
                                   hashlib.sha256(data).hexdigest())
    files = tuple(cat.SourceFileEntry(s.file_id, f"file-{k}", f"/src/file-{k}", s.length_bytes,
                                      s.sha256, cat.iso_from_ns(0))
                  for k, s in enumerate(segments))
    catalog = cat.Catalog("set", cat.iso_from_ns(0), "/src", (), (container,), files, segments)
    return container, CatalogIndex(catalog)


@pytest.mark.parametrize("segment_bytes", [400_000, 5_000, 6_000_000],
                         ids=["two-threads", "one-thread", "across-read-chunks"])
async def test_segments_tiling_a_container_check_every_byte_and_name_the_damaged_one(
    segment_bytes: int,
) -> None:
    rnd = random.Random(segment_bytes)
    data = rnd.randbytes(7 * segment_bytes + 123)
    spans = [(k * segment_bytes, min(len(data), (k + 1) * segment_bytes)) for k in range(8)]
    spans.insert(3, (spans[3][0], spans[3][0]))  # an empty file's segment
    container, index = _container(data, spans)
    assert index.table.of(CID).tiles(len(data))
    shared = len(data) >= SHARED_SEGMENT_BYTES * len(spans)
    assert shared == (segment_bytes != 5_000)  # the test covers both ways

    clean, read = await verify_container(cast(LoadedTape, _OneContainerTape(data)), container,
                                         index)
    assert clean == []
    assert read == len(data)
    for at in (0, 5 * segment_bytes + 7, len(data) - 1):
        bad = bytearray(data)
        bad[at] ^= 0x40
        found, _ = await verify_container(cast(LoadedTape, _OneContainerTape(bytes(bad))),
                                          container, index)
        k = next(k for k, (a, b) in enumerate(spans) if a <= at < b)
        assert [(p.what, p.segment_id, p.files) for p in found] == [
            ("SHA-256 mismatch", f"SEG-f{k}-001", (f"file-{k}",))]


async def test_bytes_outside_every_segment_are_checked_by_the_container_hash() -> None:
    data = random.Random(7).randbytes(3_000)
    container, index = _container(data, [(0, 1_000), (2_000, 3_000)])  # a gap: 1,000-2,000
    assert not index.table.of(CID).tiles(len(data))
    assert (await verify_container(cast(LoadedTape, _OneContainerTape(data)), container,
                                   index))[0] == []
    bad = bytearray(data)
    bad[1_500] ^= 0x01
    found, _ = await verify_container(cast(LoadedTape, _OneContainerTape(bytes(bad))),
                                      container, index)
    assert [p.what for p in found] == ["container SHA-256 mismatch outside every segment"]


async def test_the_catalogs_own_container_hash_is_checked_when_asked() -> None:
    """Segments that tile the container check its bytes; a wrong container record in the
    catalog (which the recovery kit reads) is found only with `whole`, as backup --verify asks."""
    data = random.Random(8).randbytes(50_000)
    container, index = _container(data, [(0, 20_000), (20_000, 50_000)])
    wrong = attrs.evolve(container, sha256="0" * 64)
    tape = cast(LoadedTape, _OneContainerTape(data))
    assert (await verify_container(tape, wrong, index))[0] == []
    found, _ = await verify_container(tape, wrong, index, whole=True)
    assert [p.what for p in found] == [
        "the catalog's SHA-256 of the container is wrong (every segment in it matches)"]
    assert (await verify_container(tape, container, index, whole=True))[0] == []


async def test_a_container_that_reads_short_of_its_size_is_reported() -> None:
    data = random.Random(9).randbytes(10_000)
    container, index = _container(data, [(0, 10_000)])

    class _Short(_OneContainerTape):
        async def open_read(self, path: str) -> _Reader:
            return self.reader(self.data[:6_000])  # stat says 10,000; the reads end at 6,000

    found, read = await verify_container(cast(LoadedTape, _Short(data)), container, index)
    assert read == 6_000
    assert "segment lies beyond the end of the container" in [p.what for p in found]


async def test_a_container_that_reads_past_its_size_is_reported() -> None:
    data = random.Random(10).randbytes(10_000)
    container, index = _container(data, [(0, 10_000)])

    class _Long(_OneContainerTape):
        async def open_read(self, path: str) -> _Reader:
            return self.reader(self.data + b"\0" * 100)  # stat says 10,000: the reads disagree

    found, read = await verify_container(cast(LoadedTape, _Long(data)), container, index)
    assert read == 10_100
    assert [p.what for p in found] == [
        "container gave 10100 bytes when read, the catalog says 10000"]


async def test_an_empty_container_of_empty_files_is_clean_and_a_wrong_empty_hash_is_not() -> None:
    container, index = _container(b"", [(0, 0), (0, 0)])
    tape = cast(LoadedTape, _OneContainerTape(b""))
    assert await verify_container(tape, container, index) == ([], 0)
    segments = tuple(attrs.evolve(s, sha256="1" * 64) if k else s
                     for k, s in enumerate(index.catalog.segments))
    wrong = CatalogIndex(attrs.evolve(index.catalog, segments=segments))
    found, _ = await verify_container(tape, container, wrong)
    assert [(p.what, p.segment_id) for p in found] == [("SHA-256 mismatch", "SEG-f1-001")]


async def test_a_read_error_part_way_leaves_no_chunk_mapped(monkeypatch: pytest.MonkeyPatch,
                                                          reading: str) -> None:
    data = random.Random(11).randbytes(3 * READ_CHUNK_BYTES + 5)
    container, index = _container(data, [(0, len(data) // 2), (len(data) // 2, len(data))])
    if reading == "mapped":
        monkeypatch.setattr(_MappingReader, "fail_at", 2 * READ_CHUNK_BYTES)
    else:
        class _Failing(_Reader):
            async def readinto(self, buf: memoryview) -> int:
                if self.pos >= 2 * READ_CHUNK_BYTES:
                    raise TapeReadError("read of the container failed: injected")
                return await super().readinto(buf)

        monkeypatch.setattr(_OneContainerTape, "reader", _Failing)
    with pytest.RaisesGroup(pytest.RaisesExc(TapeReadError, match="injected"),
                            flatten_subgroups=True):
        await verify_container(cast(LoadedTape, _OneContainerTape(data)), container, index)
    if reading == "mapped":  # the fixture checks that they were closed
        assert len(_MappingReader.given) == 2


async def test_a_hasher_that_fails_raises_its_own_error(monkeypatch: pytest.MonkeyPatch,
                                                       reading: str) -> None:
    """Not a BufferError from closing a chunk its traceback still holds; the other chunks
    are closed (the one it holds is unmapped when the error is dropped)."""
    data = random.Random(12).randbytes(3 * READ_CHUNK_BYTES + 5)
    container, index = _container(data, [(0, len(data) // 2), (len(data) // 2, len(data))])
    made = _ContainerCheck.segment_updater

    def failing(self: _ContainerCheck, part: int, parts: int) -> Callable[[memoryview, int],
                                                                          None]:
        update = made(self, part, parts)

        def fail_on_the_second_chunk(chunk: memoryview, pos: int) -> None:
            if pos and part == 0:
                raise RuntimeError("OpenSSL could not compute a SHA-256")
            update(chunk, pos)

        return fail_on_the_second_chunk

    monkeypatch.setattr(_ContainerCheck, "segment_updater", failing)
    raises = pytest.RaisesGroup(pytest.RaisesExc(RuntimeError, match="OpenSSL"),
                                flatten_subgroups=True)
    with raises:
        await verify_container(cast(LoadedTape, _OneContainerTape(data)), container, index)
    if reading == "mapped":
        given = _MappingReader.given
        assert len(given) >= 2
        assert sum(not chunk.closed for chunk in given) <= 1
        del raises  # with the error gone, the chunk its traceback held can close
        gc.collect()
        for chunk in given:
            chunk.close()
