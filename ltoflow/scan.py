"""Scan a source tree: stat only (plus an access() probe where the stat cannot tell), never
read contents, sorted by the path's bytes.

The plan depends only on what the scan returns (names, sizes), so the same tree gives the same
plan. Regular files, directories and symlinks (never followed) are backed up; anything else
(FIFOs, sockets, devices) is recorded as skipped with its kind, never opened, so nothing goes
missing silently. Regular files this user may not read are skipped as well ("permission
denied"); I/O errors only show when reading. Names are any bytes: one that is not valid UTF-8
keeps its exact bytes in `raw_path` beside a readable rendering. Directories are opened one
component at a time through descriptors, so neither depth nor path length (beyond PATH_MAX) is
limited.
"""

from __future__ import annotations

import heapq
import operator
import os
import stat
import threading
from array import array
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from types import ModuleType
from typing import NamedTuple, cast, overload

import attrs

from ltoflow import native, paths
from ltoflow.errors import UsageError
from ltoflow.paths import DirFds

UNREADABLE = "permission denied: this user cannot read it"


def _path_bytes(entry: ScannedFile | ScannedDirectory | ScannedSymlink) -> bytes:
    """The exact bytes of an entry's path (its `relative_path` is only a rendering when the
    name is not UTF-8)."""
    return entry.raw_path if entry.raw_path is not None else entry.relative_path.encode()


@attrs.frozen
class ScannedFile:
    """A regular file as the scan saw it; `relative_path` uses '/' and is valid UTF-8.

    `raw_path` holds the exact bytes only when they are not valid UTF-8 (`relative_path` is then
    a readable rendering); `path_bytes` is the exact path either way.
    """

    relative_path: str
    size: int
    mtime_ns: int
    mode: int
    raw_path: bytes | None = None

    path_bytes = property(_path_bytes)


class StringColumn(Sequence[str]):
    """Strings kept end to end as UTF-8 in one buffer, read back as str.

    A million paths of 19 characters take 27 MB here and 68 MB as a list of str objects.
    Reading one decodes it; `encoded(i)` gives its bytes as kept. Any str round-trips (lone
    surrogates too).
    """

    __slots__ = ("_data", "_ends")

    def __init__(self, values: Iterable[str] = ()) -> None:
        self._data = bytearray()
        self._ends = array("Q")
        for value in values:
            self.append(value)

    def append(self, value: str) -> None:
        self._data += value.encode("utf-8", "surrogatepass")
        self._ends.append(len(self._data))

    def encoded(self, i: int) -> bytes:
        """The UTF-8 bytes of item i."""
        ends = self._ends
        if i < 0:
            i += len(ends)
        if not 0 <= i < len(ends):
            raise IndexError("string index out of range")
        return bytes(self._data[ends[i - 1] if i else 0:ends[i]])

    def extend_encoded(self, data: bytes, ends: bytes) -> None:
        """Append items given as their UTF-8 end to end (`data`, trusted to be valid) and where
        each ends in it (native u64s, as array("Q").tobytes() gives them)."""
        base = len(self._data)
        self._data += data
        relative = array("Q")
        relative.frombytes(ends)
        if base:
            relative = array("Q", [end + base for end in relative])
        self._ends.extend(relative)

    def buffers(self) -> tuple[bytearray, array[int]]:
        """The column itself, for native code: the UTF-8 of every item end to end, and where
        each ends (item i is data[ends[i - 1]:ends[i]]). Not copies: do not change them."""
        return self._data, self._ends

    def encoded_at(self, indices: Iterable[int]) -> list[bytes]:
        """encoded(i) for each of `indices` (none negative), in one pass."""
        data, ends = self._data, self._ends
        return [bytes(data[ends[k - 1] if k else 0:ends[k]]) for k in indices]

    def __len__(self) -> int:
        return len(self._ends)

    @overload
    def __getitem__(self, i: int) -> str: ...

    @overload
    def __getitem__(self, i: slice) -> list[str]: ...

    def __getitem__(self, i: int | slice) -> str | list[str]:
        if isinstance(i, slice):
            data, ends = self._data, self._ends
            picked = range(*i.indices(len(ends)))
            return [data[ends[k - 1] if k else 0:ends[k]].decode("utf-8", "surrogatepass")
                    for k in picked]
        return self.encoded(i).decode("utf-8", "surrogatepass")

    def __iter__(self) -> Iterator[str]:
        data, start = self._data, 0
        for end in self._ends:
            yield data[start:end].decode("utf-8", "surrogatepass")
            start = end

    def __eq__(self, other: object) -> bool:
        if isinstance(other, StringColumn):
            return self._ends == other._ends and self._data == other._data
        if not isinstance(other, Sequence) or isinstance(other, str | bytes):
            return NotImplemented
        return len(self) == len(other) and all(map(operator.eq, self, other))

    __hash__ = None  # type: ignore[assignment]  # grows while the scan runs

    def __repr__(self) -> str:
        return f"StringColumn({len(self)} strings)"


class FileTable(Sequence[ScannedFile]):
    """The scanned files as columns, read as ScannedFile records.

    A million records with their ints take about 400 MB; these columns (the paths as one
    StringColumn, arrays of sizes, mtimes and modes) about 50 MB. An mtime beyond what
    64 bits of nanoseconds hold (before 1678 or after 2262) turns its column into a list.
    `raw_path` maps the index of a file whose name is not UTF-8 to its exact bytes. Hot
    loops read the columns; everything else reads records.
    """

    __slots__ = ("mode", "mtime_ns", "raw_path", "relative_path", "size")

    def __init__(self, records: Iterable[ScannedFile] = ()) -> None:
        self.relative_path = StringColumn()
        self.size = array("q")
        self.mtime_ns: array[int] | list[int] = array("q")
        self.mode = array("I")  # st_mode fits 32 bits
        self.raw_path: dict[int, bytes] = {}
        for f in records:
            self.append(f.relative_path, f.size, f.mtime_ns, f.mode, f.raw_path)

    def append(self, relative_path: str, size: int, mtime_ns: int, mode: int,
               raw_path: bytes | None) -> None:
        if raw_path is not None:
            self.raw_path[len(self.relative_path)] = raw_path
        self.relative_path.append(relative_path)
        self.size.append(size)
        try:
            self.mtime_ns.append(mtime_ns)
        except OverflowError:
            self.mtime_ns = [*self.mtime_ns, mtime_ns]
        self.mode.append(mode)

    def extend_run(self, run: FileRun) -> None:
        """Append a run of files the C scan listed (UTF-8 paths, 64-bit mtimes)."""
        self.relative_path.extend_encoded(run.paths, run.ends)
        self.size.frombytes(run.sizes)
        if isinstance(self.mtime_ns, array):
            self.mtime_ns.frombytes(run.mtimes)
        else:
            self.mtime_ns.extend(array("q", run.mtimes))
        self.mode.frombytes(run.modes)

    def path_bytes(self, i: int) -> bytes:
        """The exact path of file i."""
        raw = self.raw_path.get(i)
        return raw if raw is not None else self.relative_path.encoded(i)

    def path_bytes_at(self, indices: Iterable[int]) -> list[bytes]:
        """path_bytes(i) for each of `indices` (none negative), in one pass."""
        if not self.raw_path:
            return self.relative_path.encoded_at(indices)
        return list(map(self.path_bytes, indices))

    def __len__(self) -> int:
        return len(self.relative_path)

    @overload
    def __getitem__(self, i: int) -> ScannedFile: ...

    @overload
    def __getitem__(self, i: slice) -> list[ScannedFile]: ...

    def __getitem__(self, i: int | slice) -> ScannedFile | list[ScannedFile]:
        if isinstance(i, slice):
            return [self[k] for k in range(*i.indices(len(self)))]
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError("file index out of range")
        return ScannedFile(self.relative_path[i], self.size[i], self.mtime_ns[i], self.mode[i],
                           self.raw_path.get(i))

    def __iter__(self) -> Iterator[ScannedFile]:
        raw = self.raw_path
        for i, (rel, size, mtime_ns, mode) in enumerate(
                zip(self.relative_path, self.size, self.mtime_ns, self.mode, strict=True)):
            yield ScannedFile(rel, size, mtime_ns, mode, raw.get(i))

    def __eq__(self, other: object) -> bool:
        if isinstance(other, FileTable):
            return (self.relative_path, self.size, list(self.mtime_ns), self.mode,
                    self.raw_path) == (other.relative_path, other.size, list(other.mtime_ns),
                                       other.mode, other.raw_path)
        if not isinstance(other, Sequence) or isinstance(other, str | bytes):
            return NotImplemented
        return len(self) == len(other) and all(map(operator.eq, self, other))

    __hash__ = None  # type: ignore[assignment]  # filled while the scan runs

    def __repr__(self) -> str:
        return f"FileTable({len(self)} files)"


def _file_table(files: Iterable[ScannedFile]) -> FileTable:
    return files if isinstance(files, FileTable) else FileTable(files)


@attrs.frozen
class ScannedDirectory:
    """A directory under the source (not the source itself)."""

    relative_path: str
    mode: int
    mtime_ns: int
    raw_path: bytes | None = None

    path_bytes = property(_path_bytes)


@attrs.frozen
class ScannedSymlink:
    """A symbolic link, not followed: `target` is exactly what readlink returned."""

    relative_path: str
    target: bytes
    mtime_ns: int
    raw_path: bytes | None = None

    path_bytes = property(_path_bytes)


@attrs.frozen
class SkippedEntry:
    """Something under the source that is not backed up, and why."""

    relative_path: str
    kind: str
    reason: str


@attrs.frozen
class ScanResult:
    root: Path
    files: FileTable = attrs.field(converter=_file_table)
    skipped: tuple[SkippedEntry, ...]
    directories: tuple[ScannedDirectory, ...] = ()
    symlinks: tuple[ScannedSymlink, ...] = ()

    @property
    def total_bytes(self) -> int:
        return sum(self.files.size)


def _kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISFIFO, "fifo"),
        (stat.S_ISSOCK, "socket"),
        (stat.S_ISCHR, "character device"),
        (stat.S_ISBLK, "block device"),
    ):
        if test(mode):
            return name
    return "unknown"


def scan_tree(root: Path) -> ScanResult:
    """Walk `root` without following symlinks and stat every entry.

    Raises UsageError when `root` is missing or not a directory. Unreadable directories and
    entries of other kinds end up in `skipped`, never silently dropped. Each directory is
    listed and stat'ed by the C extension where it is built (`native.MODULE`), by os.scandir
    otherwise; the result is the same.
    """
    root = root.absolute()
    if not root.exists():
        raise UsageError(f"source directory {root} does not exist; check --source")
    if not root.is_dir():
        raise UsageError(f"source {root} is not a directory; --source takes a directory")
    try:
        root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as e:  # the source itself: an empty backup would look like success
        raise UsageError(f"cannot list the source directory {root}: {e.strerror}") from e
    fds = DirFds(root_fd)
    try:
        return _walk(root, fds, native.MODULE)
    finally:
        fds.close()
        os.close(root_fd)


#: One file of a directory listing: (relative_path, size, mtime_ns, mode, raw_path).
_FileRow = tuple[str, int, int, int, bytes | None]


class FileRun(NamedTuple):
    """Plain files of one directory, in walk order, as the C scan gives them: their paths
    (UTF-8) end to end and where each ends in `paths` (u64), sizes and mtimes (i64) and modes
    (u32), all native-endian bytes."""

    paths: bytes
    ends: bytes
    sizes: bytes
    mtimes: bytes
    modes: bytes


class _Stat(NamedTuple):
    """What the C scan's lstat gave, named as os.stat_result names it."""

    st_mode: int
    st_size: int
    st_mtime_ns: int


_Item = bytes | _FileRow | FileRun


class _Walk:
    """Where the walk puts what it finds besides files."""

    def __init__(self, root: Path, fds: DirFds) -> None:
        self.root = root
        self.fds = fds
        self.dirs: list[tuple[bytes, ScannedDirectory]] = []
        self.links: list[tuple[bytes, ScannedSymlink]] = []
        self.skipped: list[tuple[bytes, SkippedEntry]] = []  # with the exact path


def _walk(root: Path, fds: DirFds, module: ModuleType | None) -> ScanResult:
    """The walk itself: depth first, each directory's entries in an order that makes the files
    come out sorted by the bytes of their path, straight into the file table (no list of a
    million records to sort at the end). Directories and symlinks are sorted at the end. With
    the C extension, directories are listed ahead of the walk on SCAN_THREADS threads."""
    files = FileTable()
    walk = _Walk(root, fds)
    with _Lister(walk, module) as lister:
        stack: list[Iterator[_Item]] = [iter(lister.take(b""))]
        while stack:
            item = next(stack[-1], None)
            if item is None:
                stack.pop()
            elif isinstance(item, bytes):  # a subdirectory: all of it comes before what follows
                stack.append(iter(lister.take(item)))
            elif isinstance(item, FileRun):
                files.extend_run(item)
            else:
                files.append(*item)
    # By the rendering they keep (as the catalog lists them), then by their exact bytes:
    # two names may render alike (b"\xff" and a backslash followed by "xff").
    walk.skipped.sort(key=lambda pair: (pair[1].relative_path.encode(), pair[0]))
    skipped = tuple(entry for _, entry in walk.skipped)
    return ScanResult(root, files, skipped, _by_path(walk.dirs), _by_path(walk.links))


#: Threads that list directories ahead of the walk, besides the walk's own (the C extension's
#: listing lets go of the interpreter's lock: the lstat and access calls run on both cores).
SCAN_THREADS = 2
#: Directories listed ahead of the walk at most, waiting for it.
LISTED_AHEAD = 256
_TAKEN = object()  # a directory the walk lists or has (never listed again)


class _Lister:
    """Directory listings for the walk, made ahead of it by helper threads (with the C
    extension; without it, each when the walk asks).

    The directories found and not yet listed wait in a heap by their place in the walk (a
    directory's path and '/' sort as the walk meets them): the helpers always take the one the
    walk will want first. The walk takes each listing when it gets to that directory: made
    already, being made (it waits), or not begun (it lists the directory itself). A directory
    the walk lists itself keeps its first subdirectory for the walk, which goes there next:
    down a deep, narrow tree the walk does not wait on a helper at every level. Each helper
    opens directories through its own DirFds, from its own duplicate of the root's descriptor.
    What goes wrong in a helper other than the directory's own OSError (which _list_dir records
    as a skipped entry) is raised to the walk when it takes that directory.

    The lock is a plain one, entered in C, and the walk never waits while holding it (it waits
    on the directory's own event): a Ctrl-C in the walk can neither leave it held nor have
    Condition.wait give it back unheld."""

    def __init__(self, walk: _Walk, module: ModuleType | None) -> None:
        self._walk, self._module = walk, module
        self._mutex = threading.Lock()
        self._changed = threading.Condition(self._mutex)
        self._found: list[bytes] = []  # heap of path + b"/", not listed yet (or taken since)
        #: Every directory begun: a helper's listing, what went wrong, an Event (a helper is
        #: listing it) or _TAKEN (the walk's: listed by the walk, or taken from a helper).
        self._listings: dict[bytes, object] = {}
        self._ahead = 0  # listings made by helpers and not taken, or being made
        self._stop = False
        self._threads = [threading.Thread(target=self._help, name=f"ltoflow-scan-{k}",
                                          daemon=True)
                         for k in range(SCAN_THREADS if module is not None else 0)]
        self._helping = len(self._threads)  # helpers that have not given up

    def __enter__(self) -> _Lister:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        with self._mutex:
            self._stop = True
            self._changed.notify_all()
        for thread in self._threads:
            thread.join()

    def take(self, rel_dir: bytes) -> list[_Item]:
        """The listing of `rel_dir`, for the walk."""
        with self._mutex:
            got = self._listings.get(rel_dir)
            if got is None:
                self._listings[rel_dir] = _TAKEN
        if got is None:
            listing = _list_dir(rel_dir, self._walk, self._module, self._walk.fds)
            with self._mutex:
                self._found_in(listing, keep_first=True)
            return listing
        if isinstance(got, threading.Event):  # a helper is listing it: wait, holding no lock
            got.wait()
        with self._mutex:
            got = self._listings[rel_dir]
            self._listings[rel_dir] = _TAKEN
            self._ahead -= 1
            self._changed.notify_all()
        if isinstance(got, BaseException):
            raise got
        return cast(list[_Item], got)

    def _found_in(self, listing: list[_Item], *, keep_first: bool = False) -> None:
        """Give the subdirectories of `listing` to the helpers (the lock is held); with
        `keep_first`, all but the first, which the walk lists itself next."""
        if not self._helping:
            return
        subdirs = [item for item in listing if isinstance(item, bytes)]
        for rel_dir in subdirs[1:] if keep_first else subdirs:
            heapq.heappush(self._found, rel_dir + b"/")
        if subdirs:
            self._changed.notify_all()

    def _next(self) -> tuple[bytes, threading.Event] | None:
        """A directory for a helper to list, marked as being listed by the event the helper
        sets when its listing is in; None when the walk is over (the lock is held)."""
        while True:
            if self._stop:
                return None
            if self._ahead < LISTED_AHEAD:
                while self._found:
                    rel_dir = heapq.heappop(self._found)[:-1]
                    if rel_dir not in self._listings:  # else the walk took it first
                        done = self._listings[rel_dir] = threading.Event()
                        self._ahead += 1
                        return rel_dir, done
            self._changed.wait()

    def _help(self) -> None:
        # Its own descriptor of the root: the walk's may be closed (after a second Ctrl-C,
        # say) while this thread still finishes a directory.
        try:
            fds = DirFds(os.dup(self._walk.fds.root_fd))
        except OSError:  # no descriptor to spare: the walk lists what this thread would have
            with self._mutex:
                self._helping -= 1
            return
        try:
            while True:
                with self._mutex:
                    job = self._next()
                if job is None:
                    return
                rel_dir, done = job
                got: object
                try:
                    got = _list_dir(rel_dir, self._walk, self._module, fds)
                except BaseException as e:  # for the walk to raise, where it takes this one
                    got = e
                with self._mutex:
                    self._listings[rel_dir] = got
                    if not isinstance(got, BaseException):
                        self._found_in(got)
                    self._changed.notify_all()  # for whoever watches the listings (tests)
                done.set()
        finally:
            fds.close()
            os.close(fds.root_fd)


def _list_dir(rel_dir: bytes, walk: _Walk, module: ModuleType | None,
              fds: DirFds) -> list[_Item]:
    """Stat the entries of one directory: its files (rows, or runs from the C scan) and
    subdirectories (their paths), in walk order. Everything is looked at before the walk goes
    deeper, while this directory's descriptor (from `fds`, the calling thread's) is surely
    open.

    The order: a file sorts by its name, a subdirectory by its name and '/', which is where
    all of its paths sort among its siblings (a name has no '/'); so the files of the whole
    walk come out sorted by the bytes of their path.
    """
    try:
        dir_fd = fds.open(paths.split(rel_dir))
        if module is not None:
            listing = module.list_dir(dir_fd, rel_dir + b"/" if rel_dir else b"",
                                      path_fields(rel_dir)[1] is None)
        else:
            with os.scandir(dir_fd) as it:
                entries = list(it)
    except OSError as e:
        if not rel_dir:  # the source itself: an empty backup would look like success
            raise UsageError(
                f"cannot list the source directory {walk.root}: {e.strerror}") from e
        walk.skipped.append(
            (rel_dir, SkippedEntry(paths.display(rel_dir), "directory",
                                   f"cannot list: {e.strerror}"))
        )
        return []
    if module is not None:  # sorted already, stat'ed, plain files in runs
        out: list[_Item] = []
        for item in listing:
            if item[0] == 0:
                out.append(FileRun(*item[1:]))
            elif item[0] == 1:
                _, name, mode, mtime_ns = item
                got = _entry(rel_dir, name, dir_fd, _Stat(mode, 0, mtime_ns), walk)
                if got is not None:
                    out.append(got[1])
            else:
                _, name, err, mode, size, seconds, ns, readable = item
                st = None if err else _Stat(mode, size, seconds * 1_000_000_000 + ns)
                got = _entry(rel_dir, name, dir_fd, st, walk, stat_error=os.strerror(err),
                             readable=bool(readable))
                if got is not None:
                    out.append(got[1])
        return out
    order: list[tuple[bytes, bytes | _FileRow]] = []
    for entry in entries:  # dir_fd stays open for the whole loop: nothing else opens
        name = os.fsencode(entry.name)
        try:
            st_: os.stat_result | None = entry.stat(follow_symlinks=False)
            why = None
        except OSError as e:
            st_, why = None, e.strerror
        got = _entry(rel_dir, name, dir_fd, st_, walk, stat_error=why)
        if got is not None:
            order.append(got)
    order.sort(key=lambda pair: pair[0])
    return [item for _, item in order]


def _entry(rel_dir: bytes, name: bytes, dir_fd: int, st: os.stat_result | _Stat | None,
           walk: _Walk, *, stat_error: str | None = None, readable: bool | None = None
           ) -> tuple[bytes, bytes | _FileRow] | None:
    """One entry of a directory: (its sort key, what the walk makes of it), or None when it
    is recorded elsewhere (a symlink, something skipped). `st` is its lstat, None when that
    failed (`stat_error` says why); `readable` is what access(R_OK) said of a regular file
    (None: not asked yet)."""
    rel = rel_dir + b"/" + name if rel_dir else name
    text, raw = path_fields(rel)
    if st is None:
        walk.skipped.append((rel, SkippedEntry(text, "unknown", f"cannot stat: {stat_error}")))
        return None
    mode = st.st_mode
    if stat.S_ISDIR(mode):
        walk.dirs.append((rel, ScannedDirectory(text, mode, st.st_mtime_ns, raw)))
        return name + b"/", rel
    if stat.S_ISLNK(mode):
        try:
            target = os.readlink(name, dir_fd=dir_fd)
        except OSError as e:
            walk.skipped.append(
                (rel, SkippedEntry(text, "symlink", f"cannot read the link: {e.strerror}"))
            )
            return None
        walk.links.append((rel, ScannedSymlink(text, target, st.st_mtime_ns, raw)))
        return None
    if stat.S_ISREG(mode):
        # One access() per file (a few µs, no open): a file this user may not read is
        # skipped now, with its reason, instead of failing the job halfway. Relative to
        # the directory's descriptor, so a path beyond PATH_MAX is probed too.
        if readable is None:
            readable = os.access(name, os.R_OK, dir_fd=dir_fd)
        if not readable:
            walk.skipped.append((rel, SkippedEntry(text, "file", UNREADABLE)))
            return None
        return name, (text, st.st_size, st.st_mtime_ns, mode, raw)
    walk.skipped.append((rel, SkippedEntry(text, _kind(mode), "not a regular file")))
    return None


def path_fields(rel: bytes) -> tuple[str, bytes | None]:
    """(`relative_path`, `raw_path`) of a record for the exact path `rel`."""
    try:
        return rel.decode("utf-8"), None
    except UnicodeDecodeError:
        return paths.display(rel), rel


def _by_path[T](pairs: list[tuple[bytes, T]]) -> tuple[T, ...]:
    """The records sorted by the bytes of their path."""
    pairs.sort(key=lambda pair: pair[0])
    return tuple(record for _, record in pairs)
