"""The fake cartridge: a directory standing for the tape in the drive, and helpers to read it.

A cartridge directory DEV (what tests pass as `ltfs -o devname=DEV` and `mt -f DEV`) holds:

- ``cartridge.json``: the medium's properties and failure knobs (see `Knobs`).
- ``root/``: what the tape's filesystem shows when mounted (the fake ltfs serves it).
- ``index.json``: the last LTFS index written (generation, time, files and sizes): what a crash
  keeps. ``index-files/`` holds a hard link to every file it covers, so a crash can be rolled
  back even over later renames and deletions.
- ``index-syncs.log``: one JSON line per index written (time, generation, reason, files).
- ``used-bytes``: bytes written to the medium so far (append-only: it never goes down).
- ``ltfs.pid``: pid of the ltfs daemon serving this cartridge (removed when it exits cleanly).
- ``ltfs.session``: present while a mount is open; left behind by a crash, so the next mount
  rolls the tape back to ``index.json``.
- ``ltfs.log``: what the daemon printed after going to the background.
- ``invocations.log``: one JSON line per `ltfs` run (argv), so tests can check the options used.
- ``ejected`` (no medium in the drive), ``ejects.log`` (one line per eject), and ``CORRUPTED``
  (written by `mt offline` when it ejected while ltfs was still running).

Standard library only: the fake programs import this module too.
"""

# ruff: noqa: PTH100, PTH105, PTH108, PTH110, PTH114, PTH115, PTH119, PTH211
# os.walk and str paths mirror what the fake ltfs daemon does; os.path.abspath (not resolve) on
# purpose: resolving a lost mount point would fail with ENOTCONN.

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import time
import uuid
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

#: LTFS block size: statvfs f_bsize and f_frsize on a real LTFS mount.
BLOCK_SIZE = 524288
#: Capacity xattrs are whole MiB (LTFS multiplies blocks by blocksize / 1048576.0).
MIB = 1048576
#: Nominal LTO-9 data partition, when a test does not say.
DEFAULT_CAPACITY = 18_000_000_000_000

CARTRIDGE_JSON = "cartridge.json"
ROOT = "root"
INDEX_JSON = "index.json"
INDEX_FILES = "index-files"
SYNC_LOG = "index-syncs.log"
USED_BYTES = "used-bytes"
PID_FILE = "ltfs.pid"
SESSION = "ltfs.session"
DAEMON_LOG = "ltfs.log"
INVOCATIONS = "invocations.log"
EJECTED = "ejected"
EJECTS_LOG = "ejects.log"
CORRUPTED = "CORRUPTED"

EnospcMode = Literal["write", "close"]


@dataclass
class Knobs:
    """Properties of the medium and failure knobs, stored in DEV/cartridge.json.

    Read by the fake ltfs at mount time: change them between mounts with `set_knobs`.
    """

    serial: str = "ABC123L9"  # volume serial (barcode): user.ltfs.volumeSerial
    volume_uuid: str = ""  # user.ltfs.volumeUUID; make_cartridge draws one
    capacity_bytes: int = DEFAULT_CAPACITY
    #: Space LTFS keeps near the end of the medium; writes fail once used > capacity - reserve.
    #: None: 1% of the capacity.
    reserve_bytes: int | None = None
    formatted: bool = True  # False: mount fails with LTFS17168E (medium is not partitioned)
    write_protected: bool = False  # mounts read-only (LTFS14019I)
    #: "write": a write() that crosses the limit is short, the next one fails with ENOSPC.
    #: "close": writes past the limit seem to succeed but the data is dropped, and
    #: close()/fsync() fail with ENOSPC.
    enospc_mode: EnospcMode = "write"
    #: Force "tape full" once this many bytes in all have been written to the medium.
    enospc_after_bytes: int | None = None
    #: Refuse every mount with this message (e.g. "LTFS12345E ...") on stderr, exit 1.
    mount_error: str | None = None
    #: False: the mount root answers no user.ltfs.* attribute (not an LTFS mount).
    ltfs_xattrs: bool = True
    #: After umount/fusermount -u: how long the daemon goes on writing its index before it
    #: exits (real LTFS: about 2 s on a small volume).
    unmount_delay_s: float = 0.5
    #: How long an index write (user.ltfs.sync, periodic) blocks the filesystem.
    sync_delay_s: float = 0.0
    #: How long `ltfs` takes to load the tape and read its index before mounting.
    mount_delay_s: float = 0.0
    #: Override the period of `sync_type=time@N` (default time@5, i.e. 300 s) for tests.
    sync_period_s: float | None = None

    def limit_bytes(self) -> int:
        """Total bytes the medium takes before writes fail with ENOSPC."""
        reserve = self.reserve_bytes
        if reserve is None:
            reserve = self.capacity_bytes // 100
        limit = self.capacity_bytes - reserve
        if self.enospc_after_bytes is not None:
            limit = min(limit, self.enospc_after_bytes)
        return max(limit, 0)


def make_cartridge(
    path: Path,
    *,
    files: Mapping[str, bytes] | None = None,
    **knobs: Any,
) -> Path:
    """Create a cartridge directory at `path` (which must not exist or be empty).

    `files` (relative path -> content) are already on the tape and covered by its index.
    `knobs` are `Knobs` fields: serial, volume_uuid, capacity_bytes, reserve_bytes, formatted,
    write_protected, enospc_mode, enospc_after_bytes, mount_error, ltfs_xattrs,
    unmount_delay_s, sync_delay_s, mount_delay_s, sync_period_s.
    """
    names = {f.name for f in fields(Knobs)}
    unknown = sorted(set(knobs) - names)
    if unknown:
        raise TypeError(f"unknown cartridge knobs: {', '.join(unknown)}")
    k = Knobs(**knobs)
    if not k.volume_uuid:
        k.volume_uuid = str(uuid.uuid4())
    if k.enospc_mode not in ("write", "close"):
        raise ValueError(f"enospc_mode must be 'write' or 'close', not {k.enospc_mode!r}")
    path.mkdir(parents=True, exist_ok=True)
    if any(path.iterdir()):
        raise FileExistsError(f"{path} is not empty")
    write_knobs(path, k)
    root = path / ROOT
    root.mkdir()
    (path / INDEX_FILES).mkdir()
    used = 0
    if files and not k.formatted:
        raise ValueError("an unformatted cartridge cannot hold files")
    for rel, data in (files or {}).items():
        target = root / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
        used += len(data)
    write_used_bytes(path, used)
    if k.formatted:
        # mkltfs writes the first index (generation 1); it is not an index sync of a mount.
        write_index(path, reason="Format", generation=1, log=False)
    return path


def read_knobs(dev: Path) -> Knobs:
    raw = json.loads((dev / CARTRIDGE_JSON).read_text())
    names = {f.name for f in fields(Knobs)}
    return Knobs(**{k: v for k, v in raw.items() if k in names})


def write_knobs(dev: Path, knobs: Knobs) -> None:
    _atomic_write(dev / CARTRIDGE_JSON, json.dumps(asdict(knobs), indent=2).encode() + b"\n")


def set_knobs(dev: Path, **changes: Any) -> Knobs:
    """Change knobs of an existing cartridge (takes effect at the next mount)."""
    k = read_knobs(dev)
    for name, value in changes.items():
        if not hasattr(k, name):
            raise TypeError(f"unknown cartridge knob: {name}")
        setattr(k, name, value)
    write_knobs(dev, k)
    return k


# --- space --------------------------------------------------------------------------------


def read_used_bytes(dev: Path) -> int:
    try:
        return int((dev / USED_BYTES).read_text().strip() or 0)
    except FileNotFoundError:
        return 0


def write_used_bytes(dev: Path, used: int) -> None:
    (dev / USED_BYTES).write_text(f"{used:020d}\n")


# --- the index ----------------------------------------------------------------------------


@dataclass
class IndexEntry:
    size: int
    ino: int


@dataclass
class Index:
    generation: int = 0
    time: str = ""
    reason: str = ""
    files: dict[str, IndexEntry] = field(default_factory=dict)
    dirs: list[str] = field(default_factory=list)
    symlinks: dict[str, str] = field(default_factory=dict)


def read_index(dev: Path) -> Index | None:
    """The last index written to the cartridge, or None (never formatted)."""
    try:
        raw = json.loads((dev / INDEX_JSON).read_text())
    except FileNotFoundError:
        return None
    return Index(
        generation=int(raw["generation"]),
        time=str(raw["time"]),
        reason=str(raw["reason"]),
        files={k: IndexEntry(size=int(v["size"]), ino=int(v["ino"]))
               for k, v in raw["files"].items()},
        dirs=[str(d) for d in raw["dirs"]],
        symlinks={str(k): str(v) for k, v in raw["symlinks"].items()},
    )


def indexed_files(dev: Path) -> dict[str, int]:
    """Relative path -> size of every file the last index covers (what a crash keeps)."""
    idx = read_index(dev)
    return {} if idx is None else {k: v.size for k, v in idx.files.items()}


def _utc_now() -> str:
    t = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1e6):06d}Z"


def write_index(dev: Path, *, reason: str, generation: int | None = None,
                log: bool = True) -> Index:
    """Write an index covering everything now under DEV/root (what the daemon does on a sync).

    Keeps a hard link to each covered file in DEV/index-files so that `rollback_to_index`
    can bring it back after a crash. Appends a line to DEV/index-syncs.log when `log`.
    """
    root = dev / ROOT
    previous = read_index(dev)
    gen = generation if generation is not None else (previous.generation if previous else 0) + 1
    idx = Index(generation=gen, time=_utc_now(), reason=reason)
    links = dev / INDEX_FILES
    links.mkdir(exist_ok=True)
    keep: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = os.path.relpath(dirpath, root)
        for d in list(dirnames):
            rel = d if rel_dir == "." else f"{rel_dir}/{d}"
            full = os.path.join(dirpath, d)
            if os.path.islink(full):
                idx.symlinks[rel] = os.readlink(full)
                dirnames.remove(d)
            else:
                idx.dirs.append(rel)
        for name in filenames:
            rel = name if rel_dir == "." else f"{rel_dir}/{name}"
            full = os.path.join(dirpath, name)
            st = os.lstat(full)
            if os.path.islink(full):
                idx.symlinks[rel] = os.readlink(full)
                continue
            idx.files[rel] = IndexEntry(size=st.st_size, ino=st.st_ino)
            key = str(st.st_ino)
            keep.add(key)
            if not os.path.exists(os.path.join(links, key)):
                os.link(full, os.path.join(links, key))
    for key in os.listdir(links):
        if key not in keep:
            os.unlink(os.path.join(links, key))
    doc = {
        "generation": idx.generation,
        "time": idx.time,
        "reason": idx.reason,
        "files": {k: {"size": v.size, "ino": v.ino} for k, v in sorted(idx.files.items())},
        "dirs": sorted(idx.dirs),
        "symlinks": dict(sorted(idx.symlinks.items())),
    }
    _atomic_write(dev / INDEX_JSON, json.dumps(doc, indent=1).encode() + b"\n")
    if log:
        line = json.dumps({"time": idx.time, "generation": idx.generation, "reason": reason,
                           "files": len(idx.files)})
        with open(dev / SYNC_LOG, "a") as fh:
            fh.write(line + "\n")
    return idx


def rollback_to_index(dev: Path) -> None:
    """Make DEV/root show exactly what the last index covered (after a crash).

    Files written, renamed or deleted since that index go back to how the index saw them;
    files it covered that grew since are cut back to their indexed size.
    """
    idx = read_index(dev)
    root = dev / ROOT
    fresh = dev / "root.recovering"
    if fresh.exists():
        shutil.rmtree(fresh)
    fresh.mkdir()
    if idx is not None:
        for d in sorted(idx.dirs):
            (fresh / d).mkdir(parents=True, exist_ok=True)
        for rel, entry in idx.files.items():
            target = fresh / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            os.link(dev / INDEX_FILES / str(entry.ino), target)
            if target.stat().st_size > entry.size:
                os.truncate(target, entry.size)
        for rel, dest in idx.symlinks.items():
            (fresh / rel).parent.mkdir(parents=True, exist_ok=True)
            os.symlink(dest, fresh / rel)
    old = dev / "root.crashed"
    if old.exists():
        shutil.rmtree(old)
    root.rename(old)
    fresh.rename(root)
    shutil.rmtree(old)


# --- logs ---------------------------------------------------------------------------------


@dataclass
class SyncRecord:
    time: str
    generation: int
    reason: str  # "Sync by EA", "Periodic Sync", "Sync on close", "Unmount", "Recovery"
    files: int


def sync_log(dev: Path) -> list[SyncRecord]:
    """Every index written by a mount of this cartridge, oldest first."""
    try:
        lines = (dev / SYNC_LOG).read_text().splitlines()
    except FileNotFoundError:
        return []
    out = []
    for line in lines:
        raw = json.loads(line)
        out.append(SyncRecord(time=str(raw["time"]), generation=int(raw["generation"]),
                              reason=str(raw["reason"]), files=int(raw["files"])))
    return out


def syncs(dev: Path, reason: str | None = None) -> int:
    """How many indexes mounts of this cartridge wrote (all, or those for `reason`)."""
    return sum(1 for r in sync_log(dev) if reason is None or r.reason == reason)


def invocations(dev: Path) -> list[list[str]]:
    """argv of every `ltfs` run that named this cartridge, oldest first."""
    try:
        lines = (dev / INVOCATIONS).read_text().splitlines()
    except FileNotFoundError:
        return []
    return [[str(a) for a in json.loads(line)] for line in lines]


def is_corrupted(dev: Path) -> bool:
    """True when `mt offline` ejected this cartridge while its ltfs process was still running."""
    return (dev / CORRUPTED).exists()


def corruption_report(dev: Path) -> str | None:
    try:
        return (dev / CORRUPTED).read_text()
    except FileNotFoundError:
        return None


def is_ejected(dev: Path) -> bool:
    return (dev / EJECTED).exists()


def eject_count(dev: Path) -> int:
    try:
        return len((dev / EJECTS_LOG).read_text().splitlines())
    except FileNotFoundError:
        return 0


def load(dev: Path) -> None:
    """Put the cartridge back in the drive after an eject (like `mt -f DEV load`)."""
    with contextlib.suppress(FileNotFoundError):
        (dev / EJECTED).unlink()


# --- processes ----------------------------------------------------------------------------


def _task_state(stat_path: str) -> str:
    try:
        with open(stat_path) as fh:
            return fh.read().rsplit(") ", 1)[1][:1]
    except (OSError, IndexError):
        return "X"


def pid_alive(pid: int) -> bool:
    """True while any thread of process `pid` runs.

    A zombie has exited and only waits to be reaped, but the main thread of a multi-threaded
    process turns zombie as soon as it exits while its other threads may still be running (and
    holding /dev/fuse open): the process is gone only when every thread is.
    """
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        tasks = [str(pid)]
    return any(_task_state(f"/proc/{pid}/task/{t}/stat") not in ("Z", "X") for t in tasks)


def _pid_cmdline(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return [a.decode(errors="replace") for a in fh.read().split(b"\0") if a]
    except OSError:
        return []


def ltfs_pid(dev: Path) -> int | None:
    """The pid of the ltfs daemon serving this cartridge, if one is running."""
    try:
        pid = int((dev / PID_FILE).read_text().strip())
    except (FileNotFoundError, ValueError):
        return None
    if not pid_alive(pid):
        return None
    # Guard against pid reuse: the daemon's argv names ltfs and this cartridge.
    argv = _pid_cmdline(pid)
    if not any(os.path.basename(a) == "ltfs" for a in argv[:2]):
        return None
    return pid


def wait_pid_exit(pid: int, timeout: float = 10.0) -> bool:
    """Poll until `pid` has exited; False on timeout."""
    deadline = time.monotonic() + timeout
    delay = 0.002
    while pid_alive(pid):
        if time.monotonic() >= deadline:
            return False
        time.sleep(delay)
        delay = min(delay * 2, 0.05)
    return True


def wait_ltfs_exit(dev: Path, timeout: float = 10.0) -> bool:
    """Wait until no ltfs daemon serves this cartridge; False on timeout."""
    pid = ltfs_pid(dev)
    return True if pid is None else wait_pid_exit(pid, timeout)


def crash(dev: Path, timeout: float = 5.0) -> int | None:
    """kill -9 the ltfs daemon of this cartridge (power cut, OOM kill) and wait until it is gone.

    The mount stays in the mount table and every access to it fails with ENOTCONN until it is
    cleared with `fusermount -u` or `umount`. The next mount shows only what the last index
    covered. Returns the pid killed, or None if no daemon was running.
    """
    pid = ltfs_pid(dev)
    if pid is None:
        return None
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    if not wait_pid_exit(pid, timeout):
        raise TimeoutError(f"ltfs daemon {pid} survived SIGKILL for {timeout} s")
    return pid


# --- the mount table ----------------------------------------------------------------------


@dataclass
class MountEntry:
    source: str
    target: str
    fstype: str
    options: str


def _unescape(field_: str) -> str:
    """/proc/self/mounts escapes space, tab, newline and backslash as \\ooo."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field_)


def mount_table(mounts_file: str = "/proc/self/mounts") -> list[MountEntry]:
    out = []
    with open(mounts_file) as fh:
        for line in fh:
            parts = line.split()
            if len(parts) >= 4:
                out.append(MountEntry(*(_unescape(p) for p in parts[:4])))
    return out


def mounts_at(path: Path | str) -> list[MountEntry]:
    """Mount table entries whose target is `path` (several when mounts are stacked)."""
    target = os.path.abspath(path)
    return [m for m in mount_table() if m.target == target]


def is_mounted(path: Path | str) -> bool:
    """True when something is mounted at `path` (never stats it: a lost mount is mounted)."""
    return bool(mounts_at(path))


def ltfs_mounts() -> list[MountEntry]:
    """Every mount made by an ltfs (source 'ltfs:DEV', fuse type)."""
    return [m for m in mount_table()
            if m.source.startswith("ltfs:") and m.fstype.split(".")[0] in ("fuse", "fuseblk")]


# --- misc ---------------------------------------------------------------------------------


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
    os.replace(tmp, path)
