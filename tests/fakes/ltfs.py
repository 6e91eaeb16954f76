"""A fake `ltfs` (LTFS 2.4.8) over a fake cartridge directory: a real FUSE mount, via fusepy.

    ltfs -o devname=DEV [-o KEY[=VALUE][,...]]... MOUNTPOINT

DEV is a cartridge directory made by `tests.fakes.make_cartridge`. Like the real program this
prints LTFSnnnnnX messages on stderr, forks a daemon that serves the mount, and returns 0 once
the mount is in place; a refused mount exits 1 with an LTFSnnnnnE message. The daemon serves
DEV/root/ through FUSE and behaves at the OS level like LTFS: fsname `ltfs:DEV`, fuse type,
root xattrs user.ltfs.*, statvfs in 512 KiB blocks, ENOSPC at the end of the medium (the
reserve is not writable), index written only by `user.ltfs.sync`, the sync timer or unmount.
After the kernel unmount (umount/fusermount -u) it goes on "writing the index" for
`unmount_delay_s` before it exits. If it is killed, the kernel fails every access with ENOTCONN.
"""

# ruff: noqa: PTH101, PTH102, PTH104, PTH106, PTH108, PTH115, PTH119, PTH211
# The FUSE operations get str paths from the kernel and pass them straight to the backing store.

from __future__ import annotations

import contextlib
import errno
import json
import os
import select
import shlex
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.fakes import cartridge as cart

VERSION = "2.4.8.0 (fake)"

#: Options LTFS itself consumes; everything else goes to FUSE (which rejects what it does not
#: know, like the real program).
LTFS_OPTIONS = frozenset({
    "devname", "sync_type", "eject", "noeject", "work_directory", "config_file", "atime",
    "noatime", "tape_backend", "iosched_backend", "kmi_backend", "umask", "fmask", "dmask",
    "min_pool_size", "max_pool_size", "rules", "quiet", "trace", "syslogtrace", "fulltrace",
    "verbose", "uid", "gid", "symlink_type", "scsi_append_only_mode", "capture_index",
    "release_device", "rollback_mount", "force_mount_no_eod", "device_list", "autodump",
    "noautodump", "scsi_lbprotect", "noreadonly",
})


def _msg(code: str, text: str) -> None:
    """Print one LTFS message the way LTFS 2.4 does: '<thread id> LTFS<code> <text>'."""
    sys.stderr.write(f"{threading.get_native_id():x} LTFS{code} {text}\n")
    sys.stderr.flush()


class UsageError(Exception):
    pass


@dataclass
class Args:
    mountpoint: str | None = None
    ltfs: dict[str, str | None] = field(default_factory=dict)
    fuse: dict[str, str | bool] = field(default_factory=dict)
    foreground: bool = False
    debug: bool = False
    single_thread: bool = False
    help: bool = False
    version: bool = False


def parse_args(argv: list[str]) -> Args:
    a = Args()
    opts: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        i += 1
        if arg == "-o":
            if i >= len(argv):
                raise UsageError("fuse: missing argument after `-o'")
            opts.append(argv[i])
            i += 1
        elif arg.startswith("-o"):
            opts.append(arg[2:])
        elif arg == "-f":
            a.foreground = True
        elif arg == "-d":
            a.foreground = a.debug = True
        elif arg == "-s":
            a.single_thread = True
        elif arg in ("-h", "--help", "-a"):
            a.help = True
        elif arg in ("-V", "--version"):
            a.version = True
        elif arg.startswith("-"):
            raise UsageError(f"fuse: unknown option `{arg}'")
        elif a.mountpoint is None:
            a.mountpoint = arg
        else:
            raise UsageError(f"fuse: invalid argument `{arg}'")
    for group in opts:
        for item in group.split(","):
            if not item:
                continue
            key, eq, value = item.partition("=")
            if key in LTFS_OPTIONS:
                a.ltfs[key] = value if eq else None
            else:
                a.fuse[key] = value if eq else True
    return a


def parse_sync_type(value: str | None) -> tuple[str, float | None]:
    """('time', seconds) | ('close', None) | ('unmount', None), as LTFS reads -o sync_type."""
    if value is None:
        return "time", 300.0
    if value in ("close", "unmount"):
        return value, None
    kind, _, minutes = value.partition("@")
    if kind != "time":
        raise UsageError(f"Unknown type of sync ({value}).")
    try:
        n = int(minutes) if minutes else 5
    except ValueError:
        raise UsageError(f"Failed to convert the sync time ({minutes}).") from None
    if n < 0:
        raise UsageError("Sync time should be a positive value.")
    if n == 0:
        return "unmount", None
    return "time", n * 60.0


# --- the filesystem -----------------------------------------------------------------------


@dataclass
class Handle:
    fd: int
    path: str
    wrote: bool = False
    #: "close" mode: data past the end of the medium was dropped; flush/fsync report ENOSPC.
    enospc_pending: bool = False


def _oserror(code: int) -> OSError:
    return OSError(code, os.strerror(code))


class LtfsOps:
    """fusepy operations (fusepy calls `self(op, *args)`). Attribute names that are not FUSE
    operations start with an underscore: fusepy registers any attribute named like one."""

    use_ns = True

    def __init__(self, dev: Path, knobs: cart.Knobs, *, sync_kind: str,
                 sync_period: float | None, on_ready: Callable[[], None]) -> None:
        self._dev = dev
        self._root = str(dev / cart.ROOT)
        self._knobs = knobs
        self._sync_kind = sync_kind
        self._sync_period = knobs.sync_period_s if knobs.sync_period_s else sync_period
        self._on_ready = on_ready
        self._mutex = threading.RLock()
        self._handles: dict[int, Handle] = {}
        self._next_fh = 1
        self._limit = knobs.limit_bytes()
        self._used = cart.read_used_bytes(dev)
        self._used_fd = os.open(dev / cart.USED_BYTES, os.O_RDWR | os.O_CREAT, 0o644)
        self._dirty = False
        self._ready = False
        self._stop = threading.Event()
        self._timer: threading.Thread | None = None
        count = 0
        for _dirpath, dirnames, filenames in os.walk(self._root):
            count += len(dirnames) + len(filenames)
        self._file_count = count

    # fusepy entry point
    def __call__(self, op: str, *args: Any) -> Any:
        if op.startswith("_"):
            raise _oserror(errno.ENOSYS)
        method = getattr(self, op, None)
        if method is None:
            raise _oserror(errno.ENOSYS)
        return method(*args)

    # --- helpers

    def _real(self, path: str) -> str:
        return os.path.join(self._root, path.lstrip("/"))

    def _full(self) -> bool:
        return self._used >= self._limit

    def _add_used(self, n: int) -> None:
        self._used += n
        os.pwrite(self._used_fd, f"{self._used:020d}\n".encode(), 0)

    def _sync(self, reason: str) -> None:
        with self._mutex:
            if not self._dirty:
                return  # LTFS writes an index only when something changed
            if self._knobs.sync_delay_s:
                time.sleep(self._knobs.sync_delay_s)
            idx = cart.write_index(self._dev, reason=reason)
            self._dirty = False
            _msg("17235I", f"Writing index of {self._knobs.serial} to b (Reason: {reason}, "
                           f"{len(idx.files)} files) gen {idx.generation}.")

    def _timer_loop(self) -> None:
        assert self._sync_period is not None
        while not self._stop.wait(self._sync_period):
            try:
                self._sync("Periodic Sync")
            except OSError as e:
                _msg("11030I", f"Failed to sync volume ({e.errno}). Stop the periodic sync "
                               "thread.")
                return

    def _handle(self, fh: int) -> Handle:
        try:
            return self._handles[fh]
        except KeyError:
            raise _oserror(errno.EBADF) from None

    def _new_handle(self, fd: int, path: str) -> int:
        fh = self._next_fh
        self._next_fh += 1
        self._handles[fh] = Handle(fd=fd, path=path)
        return fh

    def _finish(self) -> bool:
        """After the kernel unmount: stop the sync timer. True when the mount had come up."""
        self._stop.set()
        if self._timer is not None:
            self._timer.join()
        return self._ready

    def _final_index(self) -> cart.Index | None:
        """Write the index at unmount if anything changed since the last one."""
        with self._mutex:
            if not self._dirty:
                return None
            self._dirty = False
            return cart.write_index(self._dev, reason="Unmount")

    # --- lifecycle

    def init(self, path: str) -> None:
        self._ready = True
        if self._sync_kind == "time" and self._sync_period:
            self._timer = threading.Thread(target=self._timer_loop, name="ltfs-sync",
                                           daemon=True)
            self._timer.start()
        self._on_ready()

    def destroy(self, path: str) -> None:
        self._stop.set()

    # --- metadata

    def getattr(self, path: str, fh: int | None = None) -> dict[str, int]:
        st = os.fstat(self._handle(fh).fd) if fh else os.lstat(self._real(path))
        return {
            "st_mode": st.st_mode, "st_ino": st.st_ino, "st_nlink": st.st_nlink,
            "st_uid": st.st_uid, "st_gid": st.st_gid, "st_size": st.st_size,
            "st_blocks": (st.st_size + 511) // 512,
            "st_atime": st.st_atime_ns, "st_mtime": st.st_mtime_ns, "st_ctime": st.st_ctime_ns,
        }

    def access(self, path: str, amode: int) -> int:
        if not os.path.lexists(self._real(path)):
            raise _oserror(errno.ENOENT)
        return 0

    def readlink(self, path: str) -> str:
        return os.readlink(self._real(path))

    def readdir(self, path: str, fh: int) -> list[str]:
        return [".", "..", *sorted(os.listdir(self._real(path)))]

    def statfs(self, path: str) -> dict[str, int]:
        with self._mutex:
            free = max(self._knobs.capacity_bytes - self._used, 0)
            files = self._file_count
        return {
            "f_bsize": cart.BLOCK_SIZE, "f_frsize": cart.BLOCK_SIZE,
            "f_blocks": self._knobs.capacity_bytes // cart.BLOCK_SIZE,
            "f_bfree": free // cart.BLOCK_SIZE, "f_bavail": free // cart.BLOCK_SIZE,
            "f_files": files, "f_ffree": 0xFFFFFFFF - files, "f_favail": 0xFFFFFFFF - files,
            "f_namemax": 255,
        }

    def chmod(self, path: str, mode: int) -> None:
        with self._mutex:
            os.chmod(self._real(path), mode)
            self._dirty = True

    def chown(self, path: str, uid: int, gid: int) -> None:
        return None  # LTFS keeps no owners; it accepts and ignores chown

    def utimens(self, path: str, times: tuple[int, int] | None = None) -> None:
        with self._mutex:
            if times is None:
                os.utime(self._real(path), follow_symlinks=False)
            else:
                os.utime(self._real(path), ns=times, follow_symlinks=False)
            self._dirty = True

    # --- namespace

    def mkdir(self, path: str, mode: int) -> None:
        with self._mutex:
            if self._full():
                raise _oserror(errno.ENOSPC)
            os.mkdir(self._real(path), mode)
            self._file_count += 1
            self._dirty = True

    def rmdir(self, path: str) -> None:
        with self._mutex:
            os.rmdir(self._real(path))
            self._file_count -= 1
            self._dirty = True

    def unlink(self, path: str) -> None:
        # Append-only medium: the file's data stays on tape, the space is not given back.
        with self._mutex:
            os.unlink(self._real(path))
            self._file_count -= 1
            self._dirty = True

    def rename(self, old: str, new: str) -> None:
        with self._mutex:
            replaced = os.path.lexists(self._real(new))
            os.rename(self._real(old), self._real(new))
            if replaced:
                self._file_count -= 1
            self._dirty = True

    def symlink(self, target: str, source: str) -> None:
        # fusepy: create a symlink at `target` whose content is `source`.
        with self._mutex:
            if self._full():
                raise _oserror(errno.ENOSPC)
            os.symlink(source, self._real(target))
            self._file_count += 1
            self._dirty = True

    # --- files

    def create(self, path: str, mode: int) -> int:
        with self._mutex:
            if self._full():
                raise _oserror(errno.ENOSPC)
            real = self._real(path)
            existed = os.path.lexists(real)
            fd = os.open(real, os.O_RDWR | os.O_CREAT, mode)
            if not existed:
                self._file_count += 1
            self._dirty = True
            return self._new_handle(fd, path)

    def open(self, path: str, flags: int) -> int:
        acc = flags & os.O_ACCMODE
        fd = os.open(self._real(path), os.O_RDONLY if acc == os.O_RDONLY else os.O_RDWR)
        with self._mutex:
            return self._new_handle(fd, path)

    def read(self, path: str, size: int, offset: int, fh: int) -> bytes:
        return os.pread(self._handle(fh).fd, size, offset)

    def write(self, path: str, data: bytes, offset: int, fh: int) -> int:
        with self._mutex:
            h = self._handle(fh)
            room = max(self._limit - self._used, 0)
            if len(data) <= room:
                n = os.pwrite(h.fd, data, offset)
                self._add_used(n)
                h.wrote = True
                self._dirty = True
                return n
            # The write reaches the end of the writable part of the medium.
            if self._knobs.enospc_mode == "close":
                if room:
                    self._add_used(os.pwrite(h.fd, data[:room], offset))
                h.wrote = True
                h.enospc_pending = True
                self._dirty = True
                return len(data)  # looks written; close() will say ENOSPC, the rest is lost
            if room == 0:
                raise _oserror(errno.ENOSPC)
            n = os.pwrite(h.fd, data[:room], offset)
            self._add_used(n)
            h.wrote = True
            self._dirty = True
            return n  # short write; the next one gets ENOSPC

    def truncate(self, path: str, length: int, fh: int | None = None) -> None:
        with self._mutex:
            if fh:
                os.ftruncate(self._handle(fh).fd, length)
            else:
                os.truncate(self._real(path), length)
            self._dirty = True

    def flush(self, path: str, fh: int) -> None:
        # LTFS flushes the file's cached data to tape here (not the index).
        if self._handle(fh).enospc_pending:
            raise _oserror(errno.ENOSPC)

    def fsync(self, path: str, datasync: int, fh: int) -> None:
        if self._handle(fh).enospc_pending:
            raise _oserror(errno.ENOSPC)

    def release(self, path: str, fh: int) -> None:
        with self._mutex:
            h = self._handles.pop(fh, None)
        if h is None:
            return
        os.close(h.fd)
        if h.wrote and self._sync_kind == "close":
            self._sync("Sync on close")

    # --- extended attributes

    def _virtual(self, name: str) -> bytes | None:
        k = self._knobs
        with self._mutex:
            free = max(k.capacity_bytes - self._used, 0)
        idx = cart.read_index(self._dev)
        values = {
            "volumeUUID": k.volume_uuid,
            "volumeSerial": k.serial,
            "mamBarcode": k.serial,
            "volumeBlocksize": str(cart.BLOCK_SIZE),
            "mediaDataPartitionTotalCapacity":
                str(k.capacity_bytes // cart.BLOCK_SIZE * cart.BLOCK_SIZE // cart.MIB),
            "mediaDataPartitionAvailableSpace":
                str(free // cart.BLOCK_SIZE * cart.BLOCK_SIZE // cart.MIB),
            "indexGeneration": str(idx.generation if idx else 0),
            "indexTime": idx.time if idx else "",
            "softwareProduct": "LTFS",
            "softwareVendor": "IBM",
            "softwareVersion": VERSION.split()[0],
            "volumeLockState": "unlocked",
        }
        value = values.get(name.removeprefix("user.ltfs."))
        return None if value is None else value.encode()

    def getxattr(self, path: str, name: str, position: int = 0) -> bytes:
        if self._knobs.ltfs_xattrs and name.startswith("user.ltfs."):
            value = self._virtual(name) if path == "/" else None
            if value is None:
                raise _oserror(errno.ENODATA)
            return value
        return os.getxattr(self._real(path), name, follow_symlinks=False)

    def listxattr(self, path: str) -> list[str]:
        # LTFS lists only the attributes stored in the index, never its virtual ones.
        return os.listxattr(self._real(path), follow_symlinks=False)

    def setxattr(self, path: str, name: str, value: bytes, options: int,
                 position: int = 0) -> None:
        if self._knobs.ltfs_xattrs and name.startswith("user.ltfs."):
            if path == "/" and name == "user.ltfs.sync":
                self._sync("Sync by EA")
                return
            raise _oserror(errno.EPERM)  # the ltfs.* names are LTFS's own, read-only
        with self._mutex:
            os.setxattr(self._real(path), name, value, options, follow_symlinks=False)
            self._dirty = True

    def removexattr(self, path: str, name: str) -> None:
        if self._knobs.ltfs_xattrs and name.startswith("user.ltfs."):
            raise _oserror(errno.EPERM)
        with self._mutex:
            os.removexattr(self._real(path), name, follow_symlinks=False)
            self._dirty = True


# --- the program --------------------------------------------------------------------------


def _refuse(*lines: tuple[str, str]) -> int:
    for code, text in lines:
        _msg(code, text)
    return 1


def _record_invocation(dev: Path, argv: list[str]) -> None:
    if (dev / cart.CARTRIDGE_JSON).is_file():
        with open(dev / cart.INVOCATIONS, "a") as fh:
            fh.write(json.dumps(argv) + "\n")


def main(argv: list[str]) -> int:
    try:
        args = parse_args(argv[1:])
    except UsageError as e:
        sys.stderr.write(f"{e}\n")
        return 1
    if args.version:
        print(f"LTFS version {VERSION}")
        print("LTFS Format Specification version 2.4.0")
        return 0
    if args.help or args.mountpoint is None:
        print(f"usage: {os.path.basename(argv[0])} mountpoint [options]")
        print("    -o devname=<dev>          Tape device")
        return 0 if args.help else 1

    devname = args.ltfs.get("devname")
    _msg("14000I", f"LTFS starting, LTFS version {VERSION}, log level 2.")
    _msg("14058I", "LTFS Format Specification version 2.4.0.")
    _msg("14104I", f'Launched by "{shlex.join(["ltfs", *argv[1:]])}".')
    _msg("14105I", "This binary is built for Linux (x86_64).")
    try:
        sync_kind, sync_period = parse_sync_type(args.ltfs.get("sync_type"))
    except UsageError as e:
        return _refuse(("14061E", str(e)))
    if sync_kind == "time":
        _msg("14063I", f'Sync type is "time", Sync time is {int(sync_period or 0)} sec.')
    else:
        _msg("14064I", f'Sync type is "{sync_kind}".')
    if not devname:
        return _refuse(("14009E", "The backend 'sg' does not have a default device. Specify "
                                  'one using the "-o devname=" option.'))
    _msg("17085I", 'Plugin: Loading "sg" tape backend.')
    _msg("17085I", 'Plugin: Loading "unified" iosched backend.')
    dev = Path(devname).absolute()
    if not (dev / cart.CARTRIDGE_JSON).is_file():
        return _refuse(("30210I", f"Cannot open device: failed to open {devname} (2)."),
                       ("12012E", "Cannot open device: failed backend open call."),
                       ("10004E", f"Cannot open device '{devname}'."))
    _record_invocation(dev, argv)
    _msg("30209I", f"Opening a device through sg-ibmtape driver ({devname}).")
    busy = cart.ltfs_pid(dev)
    if busy is not None:
        return _refuse(("30266W", f"The drive is already reserved: {devname} (pid {busy})."),
                       ("12012E", "Cannot open device: failed backend open call."),
                       ("10004E", f"Cannot open device '{devname}'."))
    knobs = cart.read_knobs(dev)
    if cart.is_ejected(dev):
        return _refuse(("12016E", "No medium present."),
                       ("14013E", f"Cannot mount the volume from device '{devname}'."))
    if knobs.mount_error:
        sys.stderr.write(f"{threading.get_native_id():x} {knobs.mount_error}\n")
        return _refuse(("14013E", f"Cannot mount the volume from device '{devname}'."))
    if knobs.mount_delay_s:
        time.sleep(knobs.mount_delay_s)
    _msg("11005I", "Mounting the volume from device.")
    if not knobs.formatted:
        return _refuse(("17168E", "Cannot read volume: medium is not partitioned."),
                       ("14013E", f"Cannot mount the volume from device '{devname}'."))
    if cart.is_corrupted(dev):
        return _refuse(("17146E", "EOD of DP(1) is missing. A deep recovery operation is "
                                  "required."),
                       ("17148E", "Use ltfsck with the --deep-recovery option."),
                       ("14013E", f"Cannot mount the volume from device '{devname}'."))
    if (dev / cart.SESSION).exists():
        # The last mount never wrote its final index (ltfs was killed): what it wrote after
        # its last index is not in any index, so the volume comes back as that index saw it.
        _msg("11022I", "Restoring volume consistency by writing an index to the index "
                       "partition.")
        cart.rollback_to_index(dev)
        cart.write_index(dev, reason="Recovery")
        (dev / cart.SESSION).unlink()
    read_only = False
    if knobs.write_protected:
        _msg("14019I", "Medium is write protected. Mounting read-only.")
        read_only = True
    elif cart.read_used_bytes(dev) >= knobs.limit_bytes():
        _msg("14071I", "Medium has no space to write data. Mounting as read-only.")
        read_only = True

    mountpoint = args.mountpoint
    fuse_opts: dict[str, str | bool] = {
        "fsname": f"ltfs:{devname}", "use_ino": True, "big_writes": True,
        # No attribute caching: what the daemon says (e.g. a file cut short by ENOSPC in
        # "close" mode) is what the next stat() sees.
        "attr_timeout": "0", "entry_timeout": "0", "negative_timeout": "0",
    }
    fuse_opts.update(args.fuse)
    if read_only:
        fuse_opts.pop("rw", None)
        fuse_opts["ro"] = True
    eject = "eject" in args.ltfs

    if args.foreground:
        return _serve(dev, knobs, mountpoint, fuse_opts, args, sync_kind, sync_period, eject,
                      ready_fd=None)

    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the daemon
        os.close(rfd)
        os.setsid()
        code = 1
        try:
            code = _serve(dev, knobs, mountpoint, fuse_opts, args, sync_kind, sync_period,
                          eject, ready_fd=wfd)
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    os.close(wfd)
    got = b""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        ready, _, _ = select.select([rfd], [], [], max(deadline - time.monotonic(), 0))
        if not ready:
            break
        chunk = os.read(rfd, 64)
        if not chunk:
            break
        got += chunk
    os.close(rfd)
    if got.startswith(b"ok"):
        _msg("14111I", "Initial setup completed successfully.")
        _msg("14112I", "Invoke 'mount' command to check the result of final setup.")
        _msg("14113I", "Specified mount point is listed if succeeded.")
        return 0
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)
    return _refuse(("14013E", f"Cannot mount the volume from device '{devname}'."))


def _serve(dev: Path, knobs: cart.Knobs, mountpoint: str, fuse_opts: dict[str, str | bool],
           args: Args, sync_kind: str, sync_period: float | None, eject: bool,
           ready_fd: int | None) -> int:
    """Run the filesystem until it is unmounted, then write the final index and exit."""
    from fuse import FUSE  # type: ignore[import-untyped]  # fusepy ships no type hints

    (dev / cart.PID_FILE).write_text(f"{os.getpid()}\n")
    (dev / cart.SESSION).write_text(f"{os.getpid()}\n")

    def on_ready() -> None:
        if ready_fd is None:
            _msg("14029I", "Ready to receive file system requests.")
            return
        # From here on the caller of `ltfs` has returned: nothing may keep its pipes open.
        log = os.open(dev / cart.DAEMON_LOG, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(log, 1)
        os.dup2(log, 2)
        os.close(null)
        os.close(log)
        _msg("14029I", "Ready to receive file system requests.")
        os.write(ready_fd, b"ok")
        os.close(ready_fd)

    ops = LtfsOps(dev, knobs, sync_kind=sync_kind, sync_period=sync_period, on_ready=on_ready)
    # On failure libfuse prints why (bad mount point, unknown option, ...) and FUSE raises.
    with contextlib.suppress(RuntimeError):
        FUSE(ops, mountpoint, foreground=True, nothreads=args.single_thread, debug=args.debug,
             **fuse_opts)
    if not ops._finish():
        for name in (cart.PID_FILE, cart.SESSION):
            with contextlib.suppress(FileNotFoundError):
                (dev / name).unlink()
        return 1
    # The kernel mount is gone; `umount` has returned. LTFS now writes its index to tape,
    # rewinds, and only then exits: ejecting before that corrupts the tape.
    _msg("11032D", "Unmounting the volume.")
    if knobs.unmount_delay_s:
        time.sleep(knobs.unmount_delay_s)
    idx = ops._final_index()
    if idx is not None:
        _msg("17235I", f"Writing index of {knobs.serial} to a (Reason: Unmount, "
                       f"{len(idx.files)} files) gen {idx.generation}.")
    (dev / cart.SESSION).unlink()
    if eject:
        _msg("12022I", "Unloading medium.")
        (dev / cart.EJECTED).write_text(f"{time.time()}\n")
        with open(dev / cart.EJECTS_LOG, "a") as fh:
            fh.write(json.dumps({"time": time.time(), "by": "ltfs -o eject"}) + "\n")
    _msg("11034I", "Volume unmounted successfully.")
    (dev / cart.PID_FILE).unlink()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
