"""A tape drive simulated on disk: every tape is a directory `ROOT/<tape_id>/`.

The layout is the seed's (`data/`, `catalog/`, `tape.json` with capacity tracking), so sets it
writes can be read by the seed's tools and the other way round. Failure injection uses the
seed's `SimulatorFailureConfig` fields with their documented meaning. This is also the test
double for the engine, shipped in the package the way trio ships its in-memory streams.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import json
import mmap
import os
import signal
import stat
from collections.abc import Buffer, Callable
from pathlib import Path
from typing import BinaryIO, TypeVar

import attrs
import trio

from ltoflow.drives import TapeRequest
from ltoflow.drives.model import (
    DEFAULT_BUFFER_BYTES,
    DEFAULT_REPOSITION_SECONDS,
    DriveModel,
    DriveProfile,
    DriveStatistics,
    TimelineSample,
)
from ltoflow.errors import (
    FileWriteError,
    TapeFullError,
    TapeNotLoadedError,
    TapeReadError,
    UsageError,
)
from ltoflow.units import MiB, human_bytes

TAPE_JSON = "tape.json"
TAPE_DIR_PREFIX = "TAPE-"
#: read_whole maps files of this size or more into memory instead of copying them.
MAP_BYTES = MiB
_T = TypeVar("_T")


@attrs.frozen
class SimulatorFailureConfig:
    """Faults the simulator injects, as the seed defines them.

    fail_on_write: FileWriteError on every write. fail_on_read: FileWriteError (TapeReadError)
    on every read. fail_on_load: TapeNotLoadedError on every load. fail_after_bytes_written:
    TapeFullError once a tape would hold more than N bytes. failed_tape_ids: only these tapes
    (empty: all). error_message: the text of injected errors.
    """

    fail_on_write: bool = False
    fail_on_read: bool = False
    fail_on_load: bool = False
    fail_after_bytes_written: int | None = None
    failed_tape_ids: frozenset[str] = frozenset()
    error_message: str = "injected simulator failure"
    #: ltoflow, for tests of interruption: the process kills itself with SIGKILL (a crash, a
    #: power loss) or sends itself SIGINT (Ctrl-C) once a tape would hold more than N bytes.
    crash_after_bytes_written: int | None = None
    #: ltoflow: FileWriteError from every unload (the tape still leaves the drive).
    fail_on_unload: bool = False
    #: ltoflow: FileWriteError (an I/O error, not a full tape) once a tape would hold more
    #: than N bytes: a write that fails in the middle of a container.
    fail_write_after_bytes: int | None = None
    interrupt_after_bytes_written: int | None = None

    def applies_to(self, tape_id: str) -> bool:
        """Whether faults hit `tape_id`: every tape when `failed_tape_ids` is empty; an entry
        is a tape id, or a sequence number ("2") for tests that cannot know the set id."""
        ids = self.failed_tape_ids
        return not ids or tape_id in ids or tape_id.rsplit("-", 1)[-1].lstrip("0") in ids


@attrs.define
class _TapeState:
    tape_id: str
    root: Path
    capacity_bytes: int | None
    bytes_written: int

    def give_back(self, nbytes: int) -> None:
        """Bytes of a file removed or replaced: the simulator's directory frees them (a real
        LTFS tape does not, which the LTFS drive's reserve covers)."""
        self.bytes_written -= min(self.bytes_written, nbytes)

    def save(self) -> None:
        """Persist capacity tracking the way the seed does, atomically."""
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / (TAPE_JSON + ".tmp")
        doc = {
            "tape_id": self.tape_id,
            "capacity_bytes": self.capacity_bytes,
            "bytes_written": self.bytes_written,
        }
        tmp.write_text(json.dumps(doc, indent=2))
        tmp.replace(self.root / TAPE_JSON)


@attrs.frozen
class Throttle:
    """Run the simulator at a real drive's speed (see ltoflow.drives.model)."""

    profile: DriveProfile
    buffer_bytes: int = DEFAULT_BUFFER_BYTES
    reposition_seconds: float = DEFAULT_REPOSITION_SECONDS
    #: Model the drive without keeping the containers' bytes: measures how fast the pipeline can
    #: feed a drive, not how fast this disk is. Such a set cannot be verified or restored.
    discard: bool = False

    def model(self) -> DriveModel:
        return DriveModel(self.profile, buffer_bytes=self.buffer_bytes,
                          reposition_seconds=self.reposition_seconds)


@attrs.frozen
class TapeDriveStats:
    """What the drive model saw while one tape was in the drive."""

    tape_id: str
    statistics: DriveStatistics
    timeline: tuple[TimelineSample, ...]


class SimulatorDrive:
    """Drive over `root`; new tapes get `capacity_bytes` (None: read-only use, capacity unknown)."""

    def __init__(
        self,
        root: Path,
        capacity_bytes: int | None = None,
        failures: SimulatorFailureConfig | None = None,
        *,
        throttle: Throttle | None = None,
    ) -> None:
        self.root = root
        self.capacity_bytes = capacity_bytes
        self.failures = failures or SimulatorFailureConfig()
        self.throttle = throttle
        self._loaded: SimulatorTape | None = None
        self.loads: list[str] = []  # every load, in order: tests check "each tape once"
        self.drive_stats: list[TapeDriveStats] = []  # one per tape written, with a throttle

    def describe(self) -> str:
        # Resolved: it names the job (journal.job_key), however the directory was spelled
        # (relative, through a symlink); `described_before` is what ltoflow 0.1.0 said.
        return f"simulator at {os.path.realpath(self.root)}"

    def described_before(self) -> str:
        return f"simulator at {self.root}"

    async def load(self, request: TapeRequest) -> SimulatorTape:
        f = self.failures
        if f.fail_on_load and f.applies_to(request.tape_id):
            raise TapeNotLoadedError(f"{f.error_message}: tape {request.tape_id} did not load")
        if self._loaded is not None:
            raise TapeNotLoadedError(
                f"tape {self._loaded.tape_id} is still in the drive; unload it first"
            )
        tape_root = self.root / request.tape_id
        if request.purpose == "read":
            try:  # listed, as a drive's load reads the tape's index: it can be read at all
                await trio.to_thread.run_sync(os.listdir, tape_root)
            except (FileNotFoundError, NotADirectoryError):
                raise TapeNotLoadedError(f"tape {request.describe()} is not in the simulator "
                                         f"directory {self.root}") from None
            except OSError as e:
                raise TapeNotLoadedError(f"tape {request.describe()} cannot be read in the "
                                         f"simulator directory {self.root}: {_why(e)}") from e
        state = await trio.to_thread.run_sync(self._read_state, request.tape_id, tape_root,
                                              request.purpose == "read")
        self.loads.append(request.tape_id)
        model = self.throttle.model() if self.throttle and request.purpose == "write" else None
        discard = bool(self.throttle and self.throttle.discard)
        self._loaded = SimulatorTape(state, self.failures, model=model, discard=discard)
        return self._loaded

    def _read_state(self, tape_id: str, tape_root: Path, reading: bool) -> _TapeState:
        """The tape's accounting, from its tape.json. Only writing needs it: a tape loaded to
        be read whose tape.json is damaged is read all the same."""
        try:
            doc = json.loads((tape_root / TAPE_JSON).read_text())
            if not isinstance(doc, dict):
                raise TypeError("not a JSON object")
        except FileNotFoundError:
            return _TapeState(tape_id, tape_root, self.capacity_bytes, 0)
        except (OSError, ValueError, TypeError) as e:
            if reading:
                return _TapeState(tape_id, tape_root, None, 0)
            raise TapeNotLoadedError(f"tape {tape_id}: cannot read its {TAPE_JSON}: {e}") from e
        named = doc.get("tape_id", tape_id)
        if named != tape_id and reading and named not in list_simulated_tapes(self.root):
            # Not another tape's directory: its tape.json is damaged, and a tape being read
            # does without it (as the recovery kit does); its containers say which tape it is.
            return _TapeState(tape_id, tape_root, None, 0)
        if named != tape_id:
            raise TapeNotLoadedError(
                f"the simulator's directory {tape_id} holds tape {doc['tape_id']} (its "
                f"{TAPE_JSON} says so): tape directories were renamed or swapped; give each "
                "its tape's name back")
        capacity = doc.get("capacity_bytes", self.capacity_bytes)
        # A crash can leave bytes on the tape that its tape.json has not counted yet.
        try:
            on_disk = sum(
                e.stat().st_size
                for sub in ("data", "catalog", "recovery") if (tape_root / sub).is_dir()
                for e in os.scandir(tape_root / sub) if e.is_file()
            )
        except OSError as e:
            if not reading:  # its reads say what they cannot get to
                raise TapeNotLoadedError(f"tape {tape_id}: cannot count the bytes on it: "
                                         f"{_why(e)}") from e
            on_disk = 0
        written = max(int(doc.get("bytes_written", 0)), on_disk)
        return _TapeState(tape_id, tape_root, capacity, written)

    async def unload(self) -> None:
        tape, self._loaded = self._loaded, None
        if tape is not None and tape.model is not None:
            with trio.CancelScope(shield=True):
                await tape.model.flush()
            self.drive_stats.append(TapeDriveStats(
                tape.tape_id, tape.model.statistics(), tuple(tape.model.timeline())))
        f = self.failures
        if tape is not None and f.fail_on_unload and f.applies_to(tape.tape_id):
            raise FileWriteError(f"{f.error_message}: tape {tape.tape_id} did not unload "
                                 "cleanly")

    async def inventory(self) -> list[str]:
        return await trio.to_thread.run_sync(list_simulated_tapes, self.root)


def list_simulated_tapes(root: Path) -> list[str]:
    """Names of the tape directories under `root`, sorted."""
    try:
        with os.scandir(root) as entries:  # a tape is told a directory without a stat
            return sorted(e.name for e in entries
                          if e.name.startswith(TAPE_DIR_PREFIX) and e.is_dir())
    except FileNotFoundError:
        return []
    except NotADirectoryError:
        raise UsageError(f"simulator path {root} is not a directory") from None
    except OSError as e:
        raise UsageError(f"cannot list the simulator directory {root}: {_why(e)}") from e


def _why(e: OSError) -> str:
    """An OSError's reason, and what to do when it is a permission."""
    if e.errno in (errno.EACCES, errno.EPERM):
        return f"{e.strerror} (run as a user who may read the simulator's tapes)"
    return e.strerror or str(e)


class SimulatorTape:
    def __init__(self, state: _TapeState, failures: SimulatorFailureConfig, *,
                 model: DriveModel | None = None, discard: bool = False) -> None:
        self._state = state
        self._failures = failures
        self._fail = failures.applies_to(state.tape_id)
        self._interrupted = False
        self.model = model
        self.discard = discard

    @property
    def tape_id(self) -> str:
        return self._state.tape_id

    @property
    def label(self) -> str:
        return self._state.tape_id

    @property
    def volume_serial(self) -> str | None:
        return None  # simulated cartridges have no barcode

    @property
    def bytes_written(self) -> int:
        return self._state.bytes_written

    async def free_bytes(self) -> int | None:
        cap = self._state.capacity_bytes
        return None if cap is None else cap - self._state.bytes_written

    def _path(self, path: str) -> Path:
        return self._state.root / path

    async def open_write(self, path: str, *, replace: bool = False) -> SimulatorWriter:
        if self._fail and self._failures.fail_on_write:
            raise FileWriteError(
                f"{self._failures.error_message}: cannot write {path} on tape {self.tape_id}"
            )
        target = self._path(path)

        def _open() -> BinaryIO:
            target.parent.mkdir(parents=True, exist_ok=True)
            if not (self._state.root / TAPE_JSON).exists():
                self._state.save()
            if replace and target.exists():
                self._state.give_back(target.stat().st_size)
                target.unlink()
            if DIRECT_WRITES and path.startswith(DIRECT_PATHS):
                return _open_direct(target)
            return open(target, "xb", buffering=0)  # append-only medium: never overwrite

        try:
            fh = await trio.to_thread.run_sync(_open)
        except FileExistsError:
            raise FileWriteError(
                f"tape {self.tape_id} already holds {path}; tapes are append-only, "
                "so this tape cannot take this set's data again"
            ) from None
        except OSError as e:
            raise FileWriteError(f"cannot create {path} on tape {self.tape_id}: {e}") from e
        return SimulatorWriter(self, path, fh)

    async def open_read(self, path: str) -> SimulatorReader:
        self._check_read(path)
        try:
            fh = await trio.to_thread.run_sync(self._open_file, path)
        except FileNotFoundError:
            raise TapeReadError(f"tape {self.tape_id} has no {path}") from None
        except OSError as e:
            raise TapeReadError(f"cannot read {path} on tape {self.tape_id}: {_why(e)}") from e
        return SimulatorReader(self, path, fh)

    def _open_file(self, path: str) -> BinaryIO:
        """The tape's file at `path`, opened to read. Raises OSError, ENOTSUP when it is not a
        regular file: a FIFO put in a container's place would block the open and every read."""
        fd = os.open(self._path(path), os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise OSError(errno.ENOTSUP, "not a regular file")
            fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
            return open(fd, "rb", buffering=0)
        except BaseException:
            os.close(fd)
            raise

    def _check_read(self, path: str) -> None:
        if self._fail and self._failures.fail_on_read:
            raise TapeReadError(
                f"{self._failures.error_message}: cannot read {path} on tape {self.tape_id}"
            )

    async def read_small(self, path: str, *, limit: int) -> bytes | None:
        return await self._read_whole_file(path, lambda fh: fh.read(limit))

    async def read_whole(self, path: str, *, limit: int) -> bytes | mmap.mmap | None:
        """A file of MAP_BYTES or more is mapped, not copied: a million-file catalog is 700 MB,
        and copying it into fresh memory took longer than decoding it."""

        def mapped(fh: BinaryIO) -> bytes | mmap.mmap:
            if not MAP_BYTES <= os.fstat(fh.fileno()).st_size <= limit:
                return fh.read(limit)
            return mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)

        return await self._read_whole_file(path, mapped)

    async def _read_whole_file(self, path: str, read: Callable[[BinaryIO], _T]) -> _T | None:
        """read(the open file), in a thread; None when there is no such file."""
        self._check_read(path)

        def _read() -> _T | None:
            try:
                with self._open_file(path) as fh:
                    return read(fh)
            except FileNotFoundError:
                return None

        try:
            return await trio.to_thread.run_sync(_read)
        except OSError as e:
            raise TapeReadError(f"cannot read {path} on tape {self.tape_id}: {_why(e)}") from e

    async def size_of(self, path: str) -> int | None:
        try:
            return (await trio.to_thread.run_sync(os.stat, self._path(path))).st_size
        except FileNotFoundError:
            return None
        except OSError as e:
            raise TapeReadError(f"cannot read {path} on tape {self.tape_id}: {_why(e)}") from e

    async def list_dir(self, path: str) -> list[str]:
        try:
            return sorted(await trio.to_thread.run_sync(os.listdir, self._path(path)))
        except FileNotFoundError:
            return []
        except OSError as e:
            raise TapeReadError(f"cannot list {path} on tape {self.tape_id}: {_why(e)}") from e

    async def replace(self, src: str, dst: str) -> None:
        """Rename over `dst`; its bytes are given back, as the simulator's directory does."""
        def _replace() -> None:
            target = self._path(dst)
            if target.exists():
                self._state.give_back(target.stat().st_size)
            self._path(src).replace(target)
            self._state.save()

        try:
            await trio.to_thread.run_sync(_replace)
        except OSError as e:
            raise FileWriteError(f"cannot rename {src} to {dst} on tape {self.tape_id}: {e}"
                                 ) from e

    async def sync(self) -> None:
        """Persist the tape's accounting; a throttled drive writes out its buffer and stops,
        as a real drive does when LTFS writes its index."""
        await trio.to_thread.run_sync(self._state.save)
        if self.model is not None:
            await self.model.flush()

    def _account(self, n: int, path: str) -> None:
        """Charge `n` more bytes to this tape, or raise TapeFullError if they do not fit."""
        st = self._state
        after = st.bytes_written + n
        f = self._failures
        if self._fail and f.crash_after_bytes_written is not None and (
                after > f.crash_after_bytes_written):
            os.kill(os.getpid(), signal.SIGKILL)
        if self._fail and f.interrupt_after_bytes_written is not None and (
                after > f.interrupt_after_bytes_written) and not self._interrupted:
            self._interrupted = True
            os.kill(os.getpid(), signal.SIGINT)
        if self._fail and f.fail_write_after_bytes is not None and (
                after > f.fail_write_after_bytes):
            raise FileWriteError(f"{f.error_message}: write to {path} on tape {st.tape_id} "
                                 f"failed after {human_bytes(st.bytes_written)}")
        limit = self._failures.fail_after_bytes_written
        if self._fail and limit is not None and after > limit:
            raise TapeFullError(
                f"{self._failures.error_message}: tape {st.tape_id} is full after "
                f"{human_bytes(st.bytes_written)} (writing {path})",
                bytes_written=st.bytes_written,
            )
        if st.capacity_bytes is not None and after > st.capacity_bytes:
            raise TapeFullError(
                f"tape {st.tape_id} is full: {human_bytes(st.bytes_written)} of "
                f"{human_bytes(st.capacity_bytes)} written, {path} needs {n} more bytes",
                bytes_written=st.bytes_written,
            )
        st.bytes_written = after


class SimulatorWriter:
    def __init__(self, tape: SimulatorTape, path: str, fh: BinaryIO) -> None:
        self._tape = tape
        self._path = path
        self._fh = fh
        self._out = _BlockWriter(fh)
        self._written = 0

    async def write(self, data: Buffer) -> None:
        tape = self._tape
        if tape._fail and tape._failures.fail_on_write:
            raise FileWriteError(
                f"{tape._failures.error_message}: write to {self._path} on tape "
                f"{tape.tape_id} failed"
            )
        view = memoryview(data)
        tape._account(view.nbytes, self._path)
        self._written += view.nbytes
        if tape.model is not None:
            await tape.model.accept(view.nbytes)
        if tape.discard and self._path.startswith("data/"):
            return
        try:
            await trio.to_thread.run_sync(self._out.write, view)
        except OSError as e:
            raise self._error(e) from e

    def _error(self, e: OSError) -> TapeFullError | FileWriteError:
        tape = self._tape
        if e.errno == errno.ENOSPC:
            return TapeFullError(
                f"the simulator's disk is full while writing {self._path} to tape "
                f"{tape.tape_id}; free space under {tape._state.root.parent}",
                bytes_written=tape.bytes_written,
            )
        return FileWriteError(f"write to {self._path} on tape {tape.tape_id} failed: {e}")

    async def close(self) -> None:
        try:
            await trio.to_thread.run_sync(self._out.finish)
            await trio.to_thread.run_sync(self._fh.close)
        except OSError as e:
            raise self._error(e) from e
        finally:
            self._fh.close()  # a no-op once closed; closes it if we were cancelled first
        await trio.to_thread.run_sync(self._tape._state.save)

    async def abort(self) -> None:
        """Drop a partial file, and give its bytes back as the simulator's directory does (on
        a real LTFS tape they stay used: the LTFS drive keeps a reserve for that)."""
        self._fh.close()
        target = self._tape._path(self._path)
        self._tape._state.give_back(self._written)
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(lambda: target.unlink(missing_ok=True))
            await trio.to_thread.run_sync(self._tape._state.save)


#: Containers and the catalog are written past the page cache (O_DIRECT) where the filesystem
#: allows it, as a tape drive takes them: on a VM, copying into fresh page-cache pages can cost
#: more than the disk (here 0.4-0.6 GB/s buffered against 2.2 GB/s direct).
#: LTOFLOW_SIM_DIRECT=0: never.
DIRECT_WRITES = os.environ.get("LTOFLOW_SIM_DIRECT", "1") != "0" and hasattr(os, "O_DIRECT")
#: The files written that way (a catalog written beside the old one is catalog.json.new).
DIRECT_PATHS = ("data/", "catalog/catalog.json")
#: The alignment direct writes need (memory address, file offset and length); 4 KiB covers
#: the logical block size of common disks.
DIRECT_ALIGN = 4096


def _open_direct(target: Path) -> BinaryIO:
    """`target` created for writing (never an existing file), O_DIRECT where the filesystem
    takes it (tmpfs does not: a plain file then)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
    try:
        fd = os.open(target, flags | os.O_DIRECT, 0o666)
    except OSError as e:
        if e.errno != errno.EINVAL:
            raise
        fd = os.open(target, flags, 0o666)
    return open(fd, "wb", buffering=0)


def _direct(fh: BinaryIO) -> bool:
    return hasattr(os, "O_DIRECT") and bool(fcntl.fcntl(fh.fileno(), fcntl.F_GETFL) & os.O_DIRECT)


def _aligned(view: memoryview) -> bool:
    """Whether view's memory starts on a DIRECT_ALIGN boundary (False for read-only memory,
    whose address ctypes will not give)."""
    try:
        address = ctypes.addressof(ctypes.c_char.from_buffer(view))
    except (TypeError, ValueError):
        return False
    return address % DIRECT_ALIGN == 0


class _BlockWriter:
    """Writes to a file, in whole aligned blocks when it is open with O_DIRECT: aligned memory
    straight from the caller's buffer, anything else gathered in a bounce buffer of its own
    first (a copy into memory used again and again, which costs far less than the page
    cache's fresh pages); `finish` writes the last partial block through the page cache. A
    file without O_DIRECT is written as it comes."""

    BOUNCE = 1 << 20

    def __init__(self, fh: BinaryIO) -> None:
        self._fh = fh
        self._direct = _direct(fh)
        self._bounce: mmap.mmap | None = None
        self._fill = 0

    def write(self, view: memoryview) -> None:
        if not self._direct:
            _write_plain(self._fh, view)
            return
        while view:
            if not self._fill and view.nbytes >= DIRECT_ALIGN and _aligned(view):
                whole = view.nbytes - view.nbytes % DIRECT_ALIGN
                _write_plain(self._fh, view[:whole])
                view = view[whole:]
                continue
            if self._bounce is None:
                self._bounce = mmap.mmap(-1, self.BOUNCE)
            n = min(view.nbytes, self.BOUNCE - self._fill)
            self._bounce[self._fill:self._fill + n] = view[:n]
            self._fill += n
            view = view[n:]
            if self._fill == self.BOUNCE:
                _write_plain(self._fh, memoryview(self._bounce))
                self._fill = 0

    def finish(self) -> None:
        """Write what is gathered: its whole blocks directly, the rest through the page cache."""
        if self._bounce is not None and self._fill:
            gathered = memoryview(self._bounce)[:self._fill]
            whole = self._fill - self._fill % DIRECT_ALIGN
            _write_plain(self._fh, gathered[:whole])
            if whole < self._fill:
                fd = self._fh.fileno()
                fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_DIRECT)
                _write_plain(self._fh, gathered[whole:])
            del gathered
            self._fill = 0
        if self._bounce is not None:
            self._bounce.close()
            self._bounce = None


def _write_plain(fh: BinaryIO, view: memoryview) -> None:
    while view:
        n = fh.write(view)
        if n is None:  # pragma: no cover - only non-blocking files return None
            continue
        view = view[n:]


def _read_chunk(fd: int, n: int, offset: int) -> mmap.mmap | None:
    """Up to `n` bytes of the file at `offset`, read into fresh memory (None at its end)."""
    chunk = mmap.mmap(-1, n)
    got = os.preadv(fd, [chunk], offset)
    if got < n:  # the file is shorter than it was: keep exactly what was read
        short = mmap.mmap(-1, got) if got else None
        if short is not None:
            short[:] = chunk[:got]
        chunk.close()
        return short
    return chunk


class SimulatorReader:
    def __init__(self, tape: SimulatorTape, path: str, fh: BinaryIO) -> None:
        self._tape = tape
        self._path = path
        self._fh = fh
        self._mappable = True

    async def readinto(self, buf: memoryview) -> int:
        self._tape._check_read(self._path)
        try:
            n: int | None = await trio.to_thread.run_sync(self._fh.readinto, buf)  # type: ignore[attr-defined]  # FileIO has readinto
            return n or 0
        except OSError as e:
            raise self._read_failed(e) from e

    async def map_chunk(self, offset: int, length: int) -> mmap.mmap | None:
        """Up to `length` bytes of the file from `offset`, mapped read-only instead of copied
        (None at the end of the file). Optional for a reader: verify uses it when offered,
        and hashes a container straight from the page cache, with no thread to copy it.

        A file that shrinks while a chunk of it is mapped ends the process with SIGBUS when
        the chunk is read (the tape's files are the simulator's own: nothing else should
        touch them). Where the filesystem will not map the file (some FUSE mounts), or
        `offset` is not a multiple of mmap.ALLOCATIONGRANULARITY, the chunk is read into
        memory instead, in a worker thread."""
        self._tape._check_read(self._path)
        try:
            fd = self._fh.fileno()
            size = os.fstat(fd).st_size
            if offset >= size:
                return None
            n = min(length, size - offset)
            if self._mappable and offset % mmap.ALLOCATIONGRANULARITY == 0:
                try:
                    return mmap.mmap(fd, n, offset=offset, access=mmap.ACCESS_READ)
                except ValueError:  # the file shrank since fstat: read what is there
                    pass
                except OSError as e:
                    if e.errno not in (errno.ENODEV, errno.EINVAL, errno.EACCES):
                        raise
                    self._mappable = False
            return await trio.to_thread.run_sync(_read_chunk, fd, n, offset)
        except OSError as e:
            raise self._read_failed(e) from e

    def _read_failed(self, e: OSError) -> TapeReadError:
        return TapeReadError(f"read of {self._path} on tape {self._tape.tape_id} failed: {_why(e)}")

    async def seek(self, offset: int) -> None:
        self._fh.seek(offset)

    async def close(self) -> None:
        self._fh.close()
