"""The simulator drive: the seed's layout and each SimulatorFailureConfig field."""

from __future__ import annotations

import errno
import json
import mmap
import os
from pathlib import Path
from typing import Any

import attrs
import pytest

from ltoflow import api
from ltoflow.drives import TapeRequest
from ltoflow.drives.simulator import SimulatorDrive, SimulatorFailureConfig, SimulatorTape
from ltoflow.errors import (
    FileWriteError,
    TapeFullError,
    TapeNotLoadedError,
    TapeReadError,
)

from .conftest import Raises, write_tree

T1 = TapeRequest("TAPE-x-001", 1, "x")
T2 = TapeRequest("TAPE-x-002", 2, "x")


async def test_tape_json_keeps_the_seed_keys(tmp_path: Path) -> None:
    drive = SimulatorDrive(tmp_path, 1_000)
    tape = await drive.load(T1)
    w = await tape.open_write("data/CNT-1")
    await w.write(b"x" * 300)
    await w.close()
    await tape.sync()
    await drive.unload()
    doc = json.loads((tmp_path / "TAPE-x-001" / "tape.json").read_text())
    assert doc == {"tape_id": "TAPE-x-001", "capacity_bytes": 1_000, "bytes_written": 300}
    again = await drive.load(T1)
    assert await again.free_bytes() == 700


async def test_writing_past_capacity_raises_tape_full_with_bytes_written(tmp_path: Path) -> None:
    tape = await SimulatorDrive(tmp_path, 1_000).load(T1)
    w = await tape.open_write("data/a")
    await w.write(b"x" * 900)
    with pytest.raises(TapeFullError, match="TAPE-x-001 is full") as info:
        await w.write(b"x" * 200)
    assert info.value.bytes_written == 900
    await w.abort()


async def test_a_file_on_tape_is_never_overwritten(tmp_path: Path) -> None:
    tape = await SimulatorDrive(tmp_path, 1_000).load(T1)
    await (await tape.open_write("data/a")).close()
    with pytest.raises(FileWriteError, match="append-only"):
        await tape.open_write("data/a")


async def test_fail_on_write(tmp_path: Path) -> None:
    drive = SimulatorDrive(tmp_path, 1_000, SimulatorFailureConfig(fail_on_write=True,
                                                                  error_message="boom"))
    tape = await drive.load(T1)
    with pytest.raises(FileWriteError, match="boom: cannot write data/a on tape TAPE-x-001"):
        await tape.open_write("data/a")


async def test_fail_on_read_raises_a_file_write_error(tmp_path: Path) -> None:
    drive = SimulatorDrive(tmp_path, 1_000)
    tape = await drive.load(T1)
    await (await tape.open_write("data/a")).close()
    await drive.unload()
    failing = SimulatorDrive(tmp_path, 1_000, SimulatorFailureConfig(fail_on_read=True))
    tape = await failing.load(TapeRequest("TAPE-x-001", 1, "x", purpose="read"))
    with pytest.raises(FileWriteError) as info:  # the seed's documented type
        await tape.open_read("data/a")
    assert isinstance(info.value, TapeReadError)
    with pytest.raises(TapeReadError):
        await tape.read_small("data/a", limit=10)


async def _tape_holding(tmp_path: Path, data: bytes) -> tuple[SimulatorDrive, SimulatorTape]:
    """A simulated tape in the drive with `data` written to its file data/a."""
    drive = SimulatorDrive(tmp_path, 100_000)
    tape = await drive.load(T1)
    w = await tape.open_write("data/a")
    await w.write(data)
    await w.close()
    return drive, tape


async def test_a_fifo_in_place_of_a_file_is_refused_not_waited_on(tmp_path: Path) -> None:
    """A FIFO (or a directory) where a container or the catalog should be: reading it fails at
    once, saying why, instead of blocking on a writer that never comes."""
    _, tape = await _tape_holding(tmp_path, b"x")
    os.mkfifo(tmp_path / T1.tape_id / "data" / "fifo")
    (tmp_path / T1.tape_id / "data" / "dir").mkdir()
    for path in ("data/fifo", "data/dir"):
        with pytest.raises(TapeReadError, match=f"cannot read {path} on tape {T1.tape_id}: "
                                                ".*not a regular file"):
            await tape.open_read(path)
        with pytest.raises(TapeReadError, match="not a regular file"):
            await tape.read_small(path, limit=10)
    reader = await tape.open_read("data/a")  # a regular file still reads
    buf = bytearray(10)
    assert await reader.readinto(memoryview(buf)) == 1
    assert buf[:1] == b"x"
    await reader.close()


async def test_a_damaged_tape_json_keeps_a_tape_readable_but_not_writable(
        tmp_path: Path) -> None:
    """tape.json is the simulator's own accounting, not part of what a tape holds: reading
    does without it; writing, which needs it, is refused."""
    drive, _ = await _tape_holding(tmp_path, b"kept")
    await drive.unload()
    (tmp_path / T1.tape_id / "tape.json").write_text("garbage\n")
    reading = await drive.load(attrs.evolve(T1, purpose="read"))
    assert await reading.read_small("data/a", limit=10) == b"kept"
    await drive.unload()
    with pytest.raises(TapeNotLoadedError, match=r"cannot read its tape\.json"):
        await drive.load(T1)


async def test_swapped_tape_directories_are_named_not_read_as_the_wrong_tape(
        tmp_path: Path) -> None:
    drive = SimulatorDrive(tmp_path, 100_000)
    for request in (T1, T2):
        tape = await drive.load(request)
        await (await tape.open_write("data/x")).close()
        await drive.unload()
    (tmp_path / T1.tape_id).rename(tmp_path / "swap")
    (tmp_path / T2.tape_id).rename(tmp_path / T1.tape_id)
    (tmp_path / "swap").rename(tmp_path / T2.tape_id)
    for purpose in ("read", "write"):
        with pytest.raises(TapeNotLoadedError,
                           match=rf"directory {T1.tape_id} holds tape {T2.tape_id} \(its "
                                 r"tape\.json says so\): tape directories were renamed"):
            await drive.load(attrs.evolve(T1, purpose=purpose))


async def test_a_reader_maps_chunks_of_the_file_until_its_end(tmp_path: Path) -> None:
    data = bytes(range(256)) * 50  # 12,800 bytes: three pages and a part
    drive, tape = await _tape_holding(tmp_path, data)
    await (await tape.open_write("data/empty")).close()
    reader = await tape.open_read("data/a")
    page = mmap.ALLOCATIONGRANULARITY
    chunks = [await reader.map_chunk(at, 2 * page)
              for at in range(0, len(data) + 2 * page, 2 * page)]
    assert [bytes(c) if c is not None else None for c in chunks] == [
        data[:2 * page], data[2 * page:], None]
    for c in chunks:
        if c is not None:
            with pytest.raises(TypeError):
                c[0] = 0  # read-only
            c.close()
    await reader.close()
    empty = await tape.open_read("data/empty")
    assert await empty.map_chunk(0, page) is None
    await empty.close()
    await drive.unload()


async def test_a_reader_copies_the_chunks_a_filesystem_cannot_map(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = bytes(range(256)) * 40
    _, tape = await _tape_holding(tmp_path, data)
    real = mmap.mmap

    def no_file_maps(fileno: int, length: int, *args: Any, **kwargs: Any) -> mmap.mmap:
        if fileno != -1:
            raise OSError(errno.ENODEV, "No such device")
        return real(fileno, length, *args, **kwargs)

    monkeypatch.setattr(mmap, "mmap", no_file_maps)
    reader = await tape.open_read("data/a")
    page = mmap.ALLOCATIONGRANULARITY
    chunks = [await reader.map_chunk(at, page) for at in range(0, len(data) + page, page)]
    assert b"".join(bytes(c) for c in chunks if c is not None) == data
    assert chunks[-1] is None
    await reader.close()


async def test_a_reader_reads_a_chunk_it_cannot_map_and_one_past_a_shrunk_end(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An offset that is not on a page boundary is read, not mapped; a file that shrank after
    its size was taken gives what is left."""
    data = bytes(range(256)) * 40
    _, tape = await _tape_holding(tmp_path, data)
    reader = await tape.open_read("data/a")
    chunk = await reader.map_chunk(100, 1_000)
    assert chunk is not None
    assert bytes(chunk) == data[100:1_100]
    real_fstat = os.fstat

    def stale(fd: int) -> os.stat_result:  # the size from before the file was cut
        st = real_fstat(fd)
        return os.stat_result((*st[:6], len(data), *st[7:]))

    os.truncate(tmp_path / "TAPE-x-001" / "data" / "a", 5_000)
    monkeypatch.setattr(os, "fstat", stale)
    page = mmap.ALLOCATIONGRANULARITY
    cut = await reader.map_chunk(page, 8 * page)
    assert cut is not None
    assert bytes(cut) == data[page:5_000]
    assert await reader.map_chunk(2 * page, page) is None
    await reader.close()


async def test_fail_on_load(tmp_path: Path) -> None:
    drive = SimulatorDrive(tmp_path, 1_000, SimulatorFailureConfig(fail_on_load=True))
    with pytest.raises(TapeNotLoadedError, match="TAPE-x-001 did not load"):
        await drive.load(T1)


async def test_fail_after_bytes_written(tmp_path: Path) -> None:
    drive = SimulatorDrive(tmp_path, 10_000,
                           SimulatorFailureConfig(fail_after_bytes_written=500))
    tape = await drive.load(T1)
    w = await tape.open_write("data/a")
    await w.write(b"x" * 500)
    with pytest.raises(TapeFullError) as info:
        await w.write(b"x")
    assert info.value.bytes_written == 500
    await w.abort()


async def test_failed_tape_ids_limits_injection_to_those_tapes(tmp_path: Path) -> None:
    faults = SimulatorFailureConfig(fail_on_write=True, fail_on_load=True,
                                    failed_tape_ids=frozenset({"TAPE-x-002"}))
    drive = SimulatorDrive(tmp_path, 1_000, faults)
    tape = await drive.load(T1)
    await (await tape.open_write("data/a")).close()
    await drive.unload()
    with pytest.raises(TapeNotLoadedError):
        await drive.load(T2)


async def test_read_of_a_missing_tape_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(TapeNotLoadedError, match="not in the simulator directory"):
        await SimulatorDrive(tmp_path).load(TapeRequest("TAPE-y-001", 1, "y", purpose="read"))


async def test_backup_verify_reports_injected_read_faults(tmp_path: Path) -> None:
    """fail_on_read during `backup --verify`: the damaged tape is named, the backup finishes."""
    src = tmp_path / "src"
    write_tree(src, {f"f{i}": 60_000 for i in range(8)})
    config = api.BackupConfig(source_root=src, tapes_root=tmp_path / "t",
                              tape_nominal_capacity_bytes=300_000,
                              max_container_size_bytes=50_000, verify_after_write=True)
    plan = api.make_backup_plan(config)
    assert len(plan.tapes) >= 3
    # Tape ids carry the set id, unknown before the backup: fail every read instead.
    faults = SimulatorFailureConfig(fail_on_read=True)
    components = api.compose(config, failures=faults)
    result = await api.backup_async(config, components)
    assert result.verify_problems
    assert all("cannot" in p for p in result.verify_problems)
    tapes_named = {t.tape_id for t in result.tapes if any(t.tape_id in p
                                                          for p in result.verify_problems)}
    assert tapes_named == {t.tape_id for t in result.tapes}


async def test_injected_write_failure_stops_the_backup_naming_the_tape(tmp_path: Path) -> None:
    src = tmp_path / "src"
    write_tree(src, {"a": 1_000})
    config = api.BackupConfig(source_root=src, tapes_root=tmp_path / "t",
                              tape_nominal_capacity_bytes=300_000,
                              max_container_size_bytes=50_000)
    components = api.compose(config, failures=SimulatorFailureConfig(fail_on_write=True))
    with Raises(FileWriteError, match="TAPE-.*-001"):
        await api.backup_async(config, components)


async def test_throttled_simulator_models_the_drive_per_tape(
    tmp_path: Path, autojump_clock: object
) -> None:
    """On the virtual clock, a throttled LTO-5 takes data no faster than 140 MB/s."""
    from ltoflow.drives.model import PROFILES
    from ltoflow.drives.simulator import Throttle

    src = tmp_path / "src"
    write_tree(src, {f"f{i}": 200_000 for i in range(20)})
    config = api.BackupConfig(source_root=src, tapes_root=tmp_path / "t",
                              tape_nominal_capacity_bytes=2_500_000,
                              max_container_size_bytes=1_000_000)
    drive = SimulatorDrive(tmp_path / "t", config.tape_nominal_capacity_bytes,
                           throttle=Throttle(PROFILES["lto5"], buffer_bytes=500_000))
    import attrs

    result = await api.backup_async(config, attrs.evolve(api.compose(config), drive=drive))
    assert [s.tape_id for s in drive.drive_stats] == [t.tape_id for t in result.tapes]
    for stats, tape in zip(drive.drive_stats, result.tapes, strict=True):
        st = stats.statistics
        # Every byte of the tape went through the drive: data, catalog, recovery kit.
        on_tape = sum(f.stat().st_size for f in (tmp_path / "t" / tape.tape_id).rglob("*")
                      if f.is_file() and f.name != "tape.json")
        assert st.bytes_written == st.bytes_accepted == on_tape
        assert st.mean_streaming_rate <= PROFILES["lto5"].native_rate * 1.0001
        assert st.seconds_streaming >= st.bytes_written / PROFILES["lto5"].native_rate * 0.999
        assert stats.timeline


async def test_discarding_simulator_keeps_no_container_bytes(
    tmp_path: Path, autojump_clock: object
) -> None:
    from ltoflow.drives.model import PROFILES
    from ltoflow.drives.simulator import Throttle

    src = tmp_path / "src"
    write_tree(src, {"a": 300_000})
    config = api.BackupConfig(source_root=src, tapes_root=tmp_path / "t",
                              tape_nominal_capacity_bytes=10_000_000,
                              max_container_size_bytes=1_000_000)
    drive = SimulatorDrive(tmp_path / "t", config.tape_nominal_capacity_bytes,
                           throttle=Throttle(PROFILES["lto9"], discard=True))
    import attrs

    result = await api.backup_async(config, attrs.evolve(api.compose(config), drive=drive))
    (container,) = (tmp_path / "t" / result.tapes[0].tape_id / "data").iterdir()
    assert container.stat().st_size == 0
    assert drive.drive_stats[0].statistics.bytes_accepted > 300_000


def _pattern(n: int, seed: int) -> bytes:
    return bytes((i * 31 + seed) % 251 for i in range(n))


@pytest.mark.parametrize("sizes", [
    [65536, 65536, 1000],  # whole blocks, then the container's tail
    [8192, 100, 8192],  # a short chunk in the middle: the rest goes through the page cache
    [4096 * 3 + 5],  # one chunk, not a whole number of blocks
    [100, 4096, 4096 * 300 + 7],  # gathered until the end: a bounce buffer's worth and more
    [0, 4096, 0],
    [1, 4096],  # the first chunk leaves the file offset off the boundary
])
def test_direct_container_writes_keep_every_byte(tmp_path: Path, sizes: list[int]) -> None:
    import mmap

    from ltoflow.drives import simulator

    target = tmp_path / "container"
    fh = simulator._open_direct(target)
    out = simulator._BlockWriter(fh)
    expected = b""
    try:
        for k, n in enumerate(sizes):
            buf = mmap.mmap(-1, max(n, 1))  # page-aligned, as the pool's buffers are
            buf[:n] = data = _pattern(n, k)
            out.write(memoryview(buf)[:n])
            expected += data
        out.finish()
    finally:
        fh.close()
    assert target.read_bytes() == expected


def test_direct_writes_gather_read_only_and_unaligned_memory_into_whole_blocks(
        tmp_path: Path) -> None:
    import fcntl
    import mmap
    import os

    from ltoflow.drives import simulator

    target = tmp_path / "container"
    fh = simulator._open_direct(target)
    out = simulator._BlockWriter(fh)
    buf = mmap.mmap(-1, 3 * 4096)
    buf[:] = _pattern(3 * 4096, 7)
    big = _pattern(3 * simulator._BlockWriter.BOUNCE + 100, 3)  # fills the bounce buffer
    try:
        out.write(memoryview(bytes(8192)))  # read-only: no address to check, gathered
        out.write(memoryview(buf)[5:5 + 8192])  # off the boundary
        out.write(memoryview(buf)[:8192])  # aligned, but after gathered bytes: gathered
        out.write(memoryview(big))
        out.finish()
        direct_still = bool(fcntl.fcntl(fh.fileno(), fcntl.F_GETFL) & os.O_DIRECT)
    finally:
        fh.close()
    assert target.read_bytes() == bytes(8192) + buf[5:5 + 8192] + buf[:8192] + big
    assert not direct_still  # the last partial block went through the page cache


def test_containers_are_plain_files_where_the_filesystem_refuses_o_direct(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import errno
    import fcntl
    import os

    from ltoflow.drives import simulator

    real_open = os.open

    def refusing(path: object, flags: int, mode: int = 0o777) -> int:
        if flags & os.O_DIRECT:  # as filesystems without direct I/O answer
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, mode)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "open", refusing)
    fh = simulator._open_direct(tmp_path / "c")
    try:
        assert not fcntl.fcntl(fh.fileno(), fcntl.F_GETFL) & os.O_DIRECT
        out = simulator._BlockWriter(fh)
        out.write(memoryview(_pattern(10_000, 1)))
        out.finish()
    finally:
        fh.close()
    assert (tmp_path / "c").read_bytes() == _pattern(10_000, 1)
    with pytest.raises(FileExistsError):  # never over an existing file, as for every file
        simulator._open_direct(tmp_path / "c")
