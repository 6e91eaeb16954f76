"""A real LTO drive through LTFS on Linux: `ltfs` mounts the cartridge, files go through the mount.

What this adapter relies on was measured on LTFS 2.4.8 (and its file-backed simulator):

- `ltfs -o devname=DEV [-o ...] MOUNTPOINT` forks into the background and returns; a refused
  mount exits non-zero with an `LTFSnnnnnE` message, which is shown to the operator.
- An unmounted mount point is an ordinary empty directory, and writes would land on the local
  disk, silently. So before anything is written the mount point must be a fuse mount in
  /proc/self/mounts whose root answers the `user.ltfs.volumeUUID` attribute.
- If the ltfs process dies, every access fails with ENOTCONN until the mount is cleared: that is
  reported as the drive being lost, not as a file error.
- statvfs gives the block size (524288) and the space left, but not all of it is writable: LTFS
  keeps a reserve near the end of the medium. ENOSPC comes from a write() after a short write, or
  only from close(); both become TapeFullError with the bytes written.
- fsync() and close() do not write the LTFS index; setting `user.ltfs.sync` on the root does.
  The engine syncs after every container and after the catalog, so a crash loses at most the
  container in flight.
- `umount` returns while LTFS is still writing its index; ejecting before the ltfs process has
  exited corrupts the tape. So unload waits for that process to exit before `mt -f DEV offline`.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Buffer, Callable, Sequence
from pathlib import Path
from typing import TypeVar

import trio

from ltoflow.drives import TapeRequest
from ltoflow.errors import (
    DriveLostError,
    FileWriteError,
    TapeFullError,
    TapeNotLoadedError,
    TapeReadError,
    UsageError,
)
from ltoflow.units import human_bytes

LTFS_BLOCK = 524288
#: Space LTFS keeps for itself near the end of the medium, as a share of the capacity statvfs
#: reports; a container that does not fit in the rest is not started.
RESERVE_FRACTION = 0.01
#: How long the ltfs process may take to write its index and exit after `umount`.
DEFAULT_UNMOUNT_TIMEOUT = 1800.0
#: What an unload may take besides waiting for ltfs: `umount`, and `mt offline` (a rewind and
#: an unload of the cartridge, a minute or two).
UNLOAD_COMMANDS_S = 600.0
_POLL = 0.1

T = TypeVar("T")


def mount_is_ltfs(mount_point: Path, mounts_file: str = "/proc/self/mounts") -> bool:
    """True when `mount_point` is a fuse mount whose root answers user.ltfs.volumeUUID."""
    target = os.path.realpath(mount_point)
    try:
        with open(mounts_file) as fh:
            entries = [line.split() for line in fh]
    except OSError:
        return False
    fuse = any(
        len(e) >= 3 and _unescape(e[1]) == target and e[2].startswith("fuse") for e in entries
    )
    if not fuse:
        return False
    try:
        os.getxattr(target, "user.ltfs.volumeUUID")
    except OSError:
        return False
    return True


def _unescape(field: str) -> str:
    """/proc/self/mounts escapes space, tab, newline and backslash as octal."""
    for code, char in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
        field = field.replace(code, char)
    return field


def _xattr(path: Path, name: str) -> str | None:
    try:
        return os.getxattr(path, name).decode(errors="replace").strip("\0 \n")
    except OSError as e:
        if e.errno in (errno.ENOTCONN, errno.ECONNABORTED):  # a dead mount, not a missing name
            raise
        return None


def _find_ltfs_pid(mount_point: Path) -> int | None:
    """The pid of the ltfs process serving `mount_point`, from /proc/*/cmdline."""
    target = os.path.realpath(mount_point)
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as fh:
                argv = [a.decode(errors="replace") for a in fh.read().split(b"\0") if a]
        except OSError:
            continue
        # argv[0] is ltfs itself, or an interpreter running a script named ltfs.
        if "ltfs" not in (Path(a).name for a in argv[:2]):
            continue
        if any(os.path.realpath(a) == target for a in argv[1:] if not a.startswith("-")):
            return int(entry)
    return None


def _alive(pid: int) -> bool:
    """True while any thread of `pid` still runs (a FUSE daemon's main thread can be a zombie
    while its worker threads still hold the device)."""
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return False
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as fh:
                if fh.read().rsplit(") ", 1)[1][:1] not in ("Z", "X"):
                    return True
        except (OSError, IndexError):
            continue
    return False


class LtfsDrive:
    """One LTO drive at `device`, mounted through LTFS at `mount_point`."""

    def __init__(
        self,
        device: str,
        mount_point: Path,
        *,
        options: Sequence[str] = (),
        eject: bool = True,
        unmount_timeout: float = DEFAULT_UNMOUNT_TIMEOUT,
    ) -> None:
        self.device = device
        self.mount_point = mount_point
        self.options = tuple(options)
        self.eject = eject
        self.unmount_timeout = unmount_timeout
        self._tape: LtfsTape | None = None
        self._pid: int | None = None

    def describe(self) -> str:
        # The mount point resolved: it names the job (journal.job_key), however it was spelled
        # (a device may be a name LTFS resolves, not a path: as given); `described_before` is
        # what ltoflow 0.1.0 said.
        return f"LTFS drive {self.device} at {os.path.realpath(self.mount_point)}"

    def described_before(self) -> str:
        return f"LTFS drive {self.device} at {self.mount_point}"

    async def inventory(self) -> None:
        return None  # a single drive cannot see the cartridges on the shelf

    async def load(self, request: TapeRequest) -> LtfsTape:
        """Mount the cartridge in the drive and check that the mount is really LTFS."""
        mp = self.mount_point
        try:
            is_dir = stat.S_ISDIR(mp.stat().st_mode)
        except OSError as e:
            if e.errno in (errno.ENOTCONN, errno.ECONNABORTED):
                raise DriveLostError(
                    f"{mp} is a dead LTFS mount (its ltfs process is gone); clear it with "
                    f"`fusermount -u {mp}` and run the job again"
                ) from e
            is_dir = False
        if not is_dir:
            raise UsageError(f"mount point {mp} does not exist; create it (mkdir -p {mp})")
        if await trio.to_thread.run_sync(mount_is_ltfs, mp):
            # Not a tape to ask for again: the operator (or a robot) cannot fix it by loading.
            raise UsageError(
                f"{mp} is already an LTFS mount (left by an earlier job, or an unmount that "
                f"failed); unmount it (umount {mp}), wait for its ltfs process to exit, and run "
                "the job again"
            )
        argv = ["ltfs", "-o", f"devname={self.device}"]
        for opt in self.options:
            argv += ["-o", opt]
        argv.append(str(mp))
        try:
            done = await trio.run_process(argv, capture_stdout=True, capture_stderr=True,
                                          check=False)
        except FileNotFoundError:
            raise UsageError(
                "the `ltfs` command was not found; install LTFS and put it on PATH"
            ) from None
        if done.returncode != 0:
            raise TapeNotLoadedError(
                f"ltfs could not mount the tape in {self.device}: {_ltfs_message(done)}"
            )
        if not await trio.to_thread.run_sync(mount_is_ltfs, mp):
            # Whatever got mounted there is not ours to write to; do not leave it behind.
            await trio.run_process(["umount", str(mp)], capture_stderr=True, check=False)
            raise TapeNotLoadedError(
                f"ltfs returned but {mp} is not an LTFS mount (not a fuse mount, or its root "
                "does not answer user.ltfs.volumeUUID); nothing was written"
            )
        self._pid = await trio.to_thread.run_sync(_find_ltfs_pid, mp)
        tape = self._tape = LtfsTape(mp, "", "")  # mounted: unload() must now clean up
        tape._serial = await tape._io(
            "reading the volume serial", lambda: _xattr(mp, "user.ltfs.volumeSerial") or "")
        tape.volume_uuid = await tape._io(
            "reading the volume UUID", lambda: _xattr(mp, "user.ltfs.volumeUUID") or "")
        if request.purpose == "write" and await tape._io(
                "reading the mount's flags", lambda: _read_only(mp)):
            await self.unload()
            raise TapeNotLoadedError(
                f"{tape.label} is write-protected or full (LTFS mounted it read-only); "
                f"write-enable it, or insert another writable tape for {request.describe()}")
        return tape

    async def unload(self) -> None:
        """Unmount, wait for ltfs to finish its index and exit, then eject (unless disabled).

        Once begun it is not cancelled (a Ctrl-C waits for it): a tape ejected, or left to be
        ejected, while ltfs still writes its index may be unreadable. It has a limit of its
        own, the unmount timeout plus UNLOAD_COMMANDS_S for the commands (a `umount` of a hung
        FUSE daemon can block for good). A second Ctrl-C still ends the command at once."""
        if self._tape is None:
            return
        limit = self.unmount_timeout + UNLOAD_COMMANDS_S
        with trio.CancelScope(shield=True, deadline=trio.current_time() + limit) as scope:
            await self._unload()
        if scope.cancelled_caught:
            raise TapeNotLoadedError(
                f"unloading the tape in {self.device} did not finish in {limit:.0f} s (umount, "
                f"the ltfs process, or mt hangs); do NOT eject it until no ltfs process is "
                f"left, then unmount {self.mount_point} by hand if it still is")

    async def _unload(self) -> None:
        mp = self.mount_point
        self._tape = None
        pid = self._pid
        done = await trio.run_process(["umount", str(mp)], capture_stderr=True, check=False)
        if done.returncode != 0:
            fallback = await trio.run_process(["fusermount", "-u", str(mp)],
                                              capture_stderr=True, check=False)
            if fallback.returncode != 0:
                raise TapeNotLoadedError(
                    f"cannot unmount {mp}: {_ltfs_message(done)}; do not eject the tape, "
                    f"unmount it by hand (umount {mp}) and wait for ltfs to exit"
                )
        if pid is None:
            if not self.eject:
                return
            # Without the process there is no telling when LTFS has written its index.
            raise TapeNotLoadedError(
                f"unmounted {mp}, but the ltfs process serving it was not found, so ltoflow "
                f"cannot tell when LTFS has finished writing the index: the tape in "
                f"{self.device} was NOT ejected; eject it (mt -f {self.device} offline) once "
                "no ltfs process is left"
            )
        with trio.move_on_after(self.unmount_timeout) as waited:
            # ltfs is not our child: polling /proc is the only way to see it exit.
            while _alive(pid):  # noqa: ASYNC110
                await trio.sleep(_POLL)
        if waited.cancelled_caught:
            raise TapeNotLoadedError(
                f"ltfs (pid {pid}) is still writing the index of the tape in "
                f"{self.device} after {self.unmount_timeout:.0f} s; do NOT eject it until "
                "that process has exited, or the tape may be unreadable"
            )
        if self.eject:
            done = await trio.run_process(["mt", "-f", self.device, "offline"],
                                          capture_stderr=True, check=False)
            if done.returncode != 0:
                raise TapeNotLoadedError(
                    f"mt could not eject the tape from {self.device}: {_ltfs_message(done)}"
                )


def _read_only(mp: Path) -> bool:
    return bool(os.statvfs(mp).f_flag & os.ST_RDONLY)


def _ltfs_message(done: object) -> str:
    """The LTFSnnnnnE lines of a failed command's stderr (or its last line)."""
    stderr = getattr(done, "stderr", b"") or b""
    text = stderr.decode(errors="replace").strip()
    errors = [line.strip() for line in text.splitlines() if "LTFS" in line and "E " in line]
    if errors:
        return " / ".join(errors[-3:])
    return text.splitlines()[-1] if text else f"exit status {getattr(done, 'returncode', '?')}"


class LtfsTape:
    """The mounted cartridge. Every OS error is translated once, here."""

    def __init__(self, root: Path, serial: str, uuid: str) -> None:
        self.root = root
        self._serial = serial
        self.volume_uuid = uuid
        self.bytes_written = 0

    @property
    def volume_serial(self) -> str | None:
        return self._serial or None

    @property
    def label(self) -> str:
        return f"volume {self._serial}" if self._serial else f"the tape at {self.root}"

    def translate(self, e: OSError, what: str) -> Exception:
        # ECONNABORTED: a request in flight when the ltfs process died.
        if e.errno in (errno.ENOTCONN, errno.ECONNABORTED):
            return DriveLostError(
                f"the LTFS mount at {self.root} was lost while {what} (ltfs exited); check the "
                f"drive, clear the mount if it is still there (`fusermount -u {self.root}`; "
                "ltoflow unmounts it when it can), and run the job again"
            )
        if e.errno == errno.ENOSPC:
            return TapeFullError(
                f"tape {self.label} is full after {human_bytes(self.bytes_written)} "
                f"written by this job ({what})",
                bytes_written=self.bytes_written,
            )
        return FileWriteError(f"{what} on tape {self.label} failed: {e.strerror}")

    async def _io(self, what: str, fn: Callable[[], T], *, read: bool = False) -> T:
        try:
            return await trio.to_thread.run_sync(fn)
        except OSError as e:
            err = self.translate(e, what)
            if read and isinstance(err, FileWriteError):
                err = TapeReadError(str(err))
            raise err from e

    async def free_bytes(self) -> int | None:
        def free() -> int:
            st = os.statvfs(self.root)
            total = st.f_blocks * st.f_frsize
            return max(0, st.f_bavail * st.f_frsize - int(total * RESERVE_FRACTION))

        return await self._io("reading the free space", free)

    async def open_write(self, path: str, *, replace: bool = False) -> LtfsWriter:
        target = self.root / path
        # LTFS never overwrites in place: a replaced file's old blocks stay on the medium.
        mode = os.O_TRUNC if replace else os.O_EXCL

        def _open() -> int:
            target.parent.mkdir(parents=True, exist_ok=True)
            return os.open(target, os.O_WRONLY | os.O_CREAT | mode | os.O_CLOEXEC, 0o644)

        return LtfsWriter(self, path, await self._io(f"creating {path}", _open))

    async def open_read(self, path: str) -> LtfsReader:
        fd = await self._io(f"opening {path}",
                            lambda: os.open(self.root / path, os.O_RDONLY | os.O_CLOEXEC),
                            read=True)
        return LtfsReader(self, path, fd)

    async def read_small(self, path: str, *, limit: int) -> bytes | None:
        def _read() -> bytes | None:
            try:
                with open(self.root / path, "rb") as fh:
                    return fh.read(limit)
            except FileNotFoundError:
                return None

        return await self._io(f"reading {path}", _read, read=True)

    async def size_of(self, path: str) -> int | None:
        def _size() -> int | None:
            try:
                return (self.root / path).stat().st_size
            except FileNotFoundError:
                return None

        return await self._io(f"looking up {path}", _size, read=True)

    async def list_dir(self, path: str) -> list[str]:
        def _list() -> list[str]:
            try:
                return sorted(os.listdir(self.root / path))
            except FileNotFoundError:
                return []

        return await self._io(f"listing {path}", _list, read=True)

    async def replace(self, src: str, dst: str) -> None:
        await self._io(f"renaming {src} to {dst}",
                       lambda: (self.root / src).replace(self.root / dst))

    async def sync(self) -> None:
        """Write the LTFS index now (fsync and close do not)."""
        await self._io("writing the LTFS index",
                       lambda: os.setxattr(self.root, "user.ltfs.sync", b"1"))


class LtfsWriter:
    def __init__(self, tape: LtfsTape, path: str, fd: int) -> None:
        self._tape = tape
        self._path = path
        self._fd = fd

    async def write(self, data: Buffer) -> None:
        view = memoryview(data).cast("B")

        def _write() -> None:
            nonlocal view
            while view:
                n = os.write(self._fd, view)
                self._tape.bytes_written += n
                view = view[n:]

        await self._tape._io(f"writing {self._path}", _write)

    async def close(self) -> None:
        fd, self._fd = self._fd, -1
        if fd >= 0:
            # ENOSPC may come only now, from close(): the data did not all reach the tape.
            await self._tape._io(f"closing {self._path}", lambda: os.close(fd))

    async def abort(self) -> None:
        fd, self._fd = self._fd, -1
        target = self._tape.root / self._path

        def _drop() -> None:
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
            # Frees nothing on tape (append-only), but keeps the tree honest. Cleanup never
            # raises: it runs while another error (a lost drive, say) is on its way out.
            with contextlib.suppress(OSError):
                target.unlink()

        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(_drop)


class LtfsReader:
    def __init__(self, tape: LtfsTape, path: str, fd: int) -> None:
        self._tape = tape
        self._path = path
        self._fd = fd
        self._pos = 0

    async def readinto(self, buf: memoryview) -> int:
        def _read() -> int:
            n = os.preadv(self._fd, [buf], self._pos)
            self._pos += n
            return n

        return await self._tape._io(f"reading {self._path}", _read, read=True)

    async def seek(self, offset: int) -> None:
        self._pos = offset

    async def close(self) -> None:
        """Closing a file only read tells nothing about its bytes, and the descriptor is gone
        whatever close() says; what it says (ENOTCONN from a dead ltfs) is not raised over the
        error that is already on its way (the drive lost, at the read)."""
        fd, self._fd = self._fd, -1
        if fd >= 0:
            with contextlib.suppress(OSError):
                os.close(fd)
