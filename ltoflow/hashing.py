"""Reading planned segments from the source tree, and the SHA-256s they produce.

`SourceCursor` is the one place that opens source files: the engine's reader and the prehasher
both use it, so change detection (size, mtime, short reads) is the same for both. It runs in
worker threads; one cursor is only ever used by one thread at a time.

A file that cannot be backed up after all (unreadable, vanished, or changed with
`--on-change=skip`) becomes *unusable* (`SourceFaults`): the plan's layout is fixed, so its bytes
are still written, but as zeros from where the pass that found it stood, and from then on every
pass gives zeros for its segments not yet written. The catalog then lists it as skipped, and its
segments keep the hashes of the bytes really on tape.
"""

from __future__ import annotations

import bisect
import errno
import hashlib
import itertools
import os
import stat
import threading
from array import array
from hashlib import sha256
from typing import Any, NamedTuple

import attrs

from ltoflow import catalog as cat
from ltoflow import native, paths
from ltoflow.errors import SourceFileChangedError, SourceFileVanishedError, SourceReadError
from ltoflow.paths import DirFds
from ltoflow.plan import Hashes, Plan
from ltoflow.scan import FileTable

#: Which pass a cursor belongs to, for where an unusable file's zeros begin. Tape 1's bytes are
#: hashed as they are written; the later tapes' bytes are hashed by the prehasher first, and
#: their write passes must give the very same bytes.
FIRST_TAPE = 0
LATER_TAPES = 1
#: A skip reason never exceeds this many bytes of JSON, so that moving a file from
#: `source_files` to `skipped` always shrinks the catalog (its reserve is fixed before writing).
MAX_REASON_BYTES = 96
_OPEN_FLAGS = os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK
_ZEROS = bytes(1 << 20)
_SourceError = SourceFileChangedError | SourceReadError
_SOURCE_ERRORS = (SourceFileChangedError, SourceReadError)
#: The C loop for runs of whole small files, read by each new SourceCursor (tests set it to
#: None to run the Python loop).
NATIVE = native.MODULE


def short_reason(text: str) -> str:
    """`text` cut to MAX_REASON_BYTES of JSON (no escapes: control characters become '?')."""
    text = "".join(c if c.isprintable() and c not in '"\\' else "?" for c in text)
    data = text.encode("utf-8")
    if len(data) <= MAX_REASON_BYTES:
        return text
    return data[: MAX_REASON_BYTES - 3].decode("utf-8", errors="ignore") + "..."


@attrs.frozen
class FaultPolicy:
    """What a source file that cannot be backed up does to the job.

    Unreadable and vanished files are skipped unless `strict`; changed ones only with
    `skip_changed` (`--on-change=skip`).
    """

    strict: bool = False
    skip_changed: bool = False

    def skips(self, error: _SourceError) -> bool:
        if self.strict:
            return False
        if isinstance(error, SourceFileVanishedError | SourceReadError):
            return True
        return self.skip_changed


def skip_reason(error: _SourceError) -> str:
    if isinstance(error, SourceFileVanishedError):
        return short_reason(f"vanished: {error.what}")
    if isinstance(error, SourceReadError):
        return short_reason(f"unreadable: {error.what}")
    return short_reason(f"changed during the backup: {error.what}")


class SourceFaults:
    """The files that became unusable during the job, shared by every pass (thread-safe).

    `fault` either raises the error (the policy says fail, or tape 1's catalog already holds
    the file's hashes) or records the file as unusable. Each pass kind (FIRST_TAPE,
    LATER_TAPES) remembers where its zeros begin for each unusable file.
    """

    def __init__(self, plan: Plan, policy: FaultPolicy | None = None) -> None:
        self.plan = plan
        self.policy = policy or FaultPolicy()
        #: file index -> skip reason; read without the lock (a dict lookup is atomic).
        self.reasons: dict[int, str] = {}
        self._sorted: list[int] = []  # the keys of `reasons`, in order (under the lock)
        self._cuts: tuple[dict[int, int], dict[int, int]] = ({}, {})
        self._new: list[int] = []
        self._lock = threading.Lock()
        self.frozen = False

    def fault(self, file_index: int, error: _SourceError, *, domain: int | None,
              offset: int = 0) -> None:
        """Record `file_index` as unusable, its zeros starting at `offset` for `domain`'s
        passes, or raise `error` (translated once the catalog is frozen)."""
        if self.frozen:
            raise _too_late(error)
        if not self.policy.skips(error):
            raise error
        with self._lock:
            if file_index not in self.reasons:
                self.reasons[file_index] = skip_reason(error)
                bisect.insort(self._sorted, file_index)
                self._new.append(file_index)
            if domain is not None:
                self._cuts[domain].setdefault(file_index, offset)

    def first_unusable(self, start: int, stop: int) -> int:
        """The first unusable file in [start, stop), or `stop` when there is none."""
        with self._lock:
            n = bisect.bisect_left(self._sorted, start)
            return self._sorted[n] if n < len(self._sorted) and self._sorted[n] < stop else stop

    def cut(self, domain: int, file_index: int, offset: int) -> int | None:
        """Where `domain`'s bytes of an unusable file turn to zeros (None: the file is usable).

        The first time a pass meets a file another pass made unusable, its zeros start here.
        """
        if file_index not in self.reasons:
            return None
        with self._lock:
            if self.frozen:
                return self._cuts[domain].get(file_index, self.plan.files.size[file_index])
            return self._cuts[domain].setdefault(file_index, offset)

    def zero_later_tapes(self, first_later_container: int) -> list[int]:
        """Make every unusable file's later-tape bytes zeros, for all its later-tape segments;
        return the containers whose bytes this changes (sorted), to be hashed again."""
        plan = self.plan
        changed: set[int] = set()
        with self._lock:
            cuts = self._cuts[LATER_TAPES]
            for f in self.reasons:
                later = [s for s in plan.segments_of(f)
                         if plan.segments[s].container_index >= first_later_container]
                if not later:
                    continue
                start = plan.segments[later[0]].source_offset
                if cuts.get(f, plan.files.size[f]) <= start:
                    continue
                cuts[f] = start
                changed.update(plan.segments[s].container_index for s in later)
        return sorted(changed)

    def freeze(self) -> None:
        """Tape 1's catalog is about to be built: from now on nothing can become unusable, and
        the later tapes' passes must give the bytes the prehasher hashed."""
        with self._lock:
            self.frozen = True

    def snapshot(self) -> dict[str, Any]:
        """Everything a resumed job needs to give unusable files the same bytes (JSON-able)."""
        with self._lock:
            return {"reasons": {str(f): r for f, r in self.reasons.items()},
                    "cuts": [{str(f): o for f, o in cuts.items()} for cuts in self._cuts],
                    "frozen": self.frozen}

    def restore(self, snapshot: dict[str, Any]) -> None:
        """Take over what an interrupted job knew (see `snapshot`)."""
        with self._lock:
            self.reasons = {int(f): r for f, r in snapshot["reasons"].items()}
            self._sorted = sorted(self.reasons)
            first, later = ({int(f): o for f, o in c.items()} for c in snapshot["cuts"])
            self._cuts = (first, later)
            self.frozen = bool(snapshot["frozen"])

    def take_new(self) -> list[tuple[str, str]]:
        """(path, reason) of the files made unusable since the last call, for the reporter."""
        with self._lock:
            new, self._new = self._new, []
        return [(self.plan.files.relative_path[f], self.reasons[f]) for f in new]


def _too_late(error: _SourceError) -> _SourceError:
    why = "tape 1's catalog already holds its hashes, so it cannot be skipped now"
    if isinstance(error, SourceReadError):
        return SourceReadError(f"{error}; {why}", relative_path=error.relative_path,
                               what=error.what)
    return SourceFileChangedError(error.relative_path, f"{error.what}; {why}")


def _zero(view: memoryview) -> None:
    for start in range(0, len(view), len(_ZEROS)):
        end = min(len(view), start + len(_ZEROS))
        view[start:end] = _ZEROS[: end - start]


class Piece(NamedTuple):
    """`length` bytes of segment `segment` at `start` in a chunk's buffer.

    A NamedTuple rather than an attrs class: a chunk of small files makes thousands of these,
    and a tuple is twice as fast to build.
    """

    segment: int
    start: int
    length: int
    first: bool  # the segment's first bytes
    last: bool  # completes the segment
    #: The segment's SHA-256 when the reader hashed it already: a whole small file, hashed
    #: right after it was read, in the same thread call (no second pass over its bytes).
    digest: str | None = None


class SourceCursor:
    """Reads segments [start, end) of `plan` in order, from the source files, into buffers.

    `faults` is shared with the job's other passes; `domain` says which pass this is
    (FIRST_TAPE or LATER_TAPES). Bytes of unusable files come out as zeros.
    """

    def __init__(self, plan: Plan, start: int, end: int, *, faults: SourceFaults | None = None,
                 domain: int = FIRST_TAPE) -> None:
        self.plan = plan
        self.segment = start
        self.end = end
        self.done_in_segment = 0
        self.bytes_read = 0
        self.faults = faults or SourceFaults(plan)
        self.domain = domain
        self._root = os.fsencode(plan.source_root)
        self._fd = -1
        self._fd_file = -1
        self._fd_ctime_ns = 0  # its change time when opened: _close_checked compares it
        self._dirs: DirFds | None = None  # opened on the first read
        self._dir: bytes | None = None  # the directory of the last file opened ...
        self._dir_fd = -1  # ... and its descriptor, owned by _dirs
        files = plan.files
        # The C loop takes whole files of one segment whose path is the UTF-8 column (not
        # those with a raw_path) and whose mtime fits 64 bits (an array column).
        self._native = NATIVE if isinstance(files.mtime_ns, array) else None
        self._raw = sorted(files.raw_path)

    @property
    def finished(self) -> bool:
        return self.segment >= self.end

    @property
    def container(self) -> int:
        """The container of the next byte to read."""
        return self.plan.segments.container_index[self.segment]

    def fill(self, buf: memoryview, *, one_container: bool) -> tuple[list[Piece], int]:
        """Read as many of the next bytes as fit in `buf`; return the pieces and bytes used.

        With `one_container` the chunk stops at the end of a container. A file that no longer
        matches the scan or cannot be read goes to `faults`, which raises
        SourceFileChangedError / SourceReadError unless the policy skips it; a skipped file's
        bytes are zeros.
        """
        plan = self.plan
        segments, starts = plan.segments, plan.file_starts
        reasons = self.faults.reasons
        # The columns, not Segment objects: this loop runs once per small file.
        s_container, s_file, s_length = (
            segments.container_index, segments.file_index, segments.length
        )
        pieces: list[Piece] = []
        pos = 0
        cap = len(buf)
        container = self.container if not self.finished else -1
        while pos < cap and self.segment < self.end:
            k = self.segment
            if one_container and s_container[k] != container:
                break
            f = s_file[k]
            length = s_length[k]
            whole = (self.done_in_segment == 0 and length <= cap - pos and self._fd < 0
                     and starts[f + 1] - starts[f] == 1 and f not in reasons)
            if whole:
                # First the C loop, for this file and those after it like it; it stops at any
                # file it cannot take as plainly, which then comes to the Python loop.
                digests = self._read_natively(buf, pos, container if one_container else -1)
                if digests:
                    n = len(digests)
                    lengths = s_length[k:k + n]
                    yes = itertools.repeat(True)
                    pieces.extend(map(Piece, range(k, k + n),
                                      itertools.accumulate(lengths, initial=pos), lengths, yes,
                                      yes, digests))
                    pos += sum(lengths)
                    self.segment = k + n
                    continue
                whole = f not in reasons  # another pass may have found it unusable meanwhile
            if whole:
                # The common case, a whole small file: open, read, check, close and hash in one
                # go (the hash after any zero-fill: it is of the bytes that go to tape).
                view = buf[pos:pos + length]
                try:
                    self._read_whole(f, view)
                except _SOURCE_ERRORS as e:
                    self.faults.fault(f, e, domain=self.domain, offset=0)
                    _zero(view)
                pieces.append(Piece(k, pos, length, True, True, sha256(view).hexdigest()))
                pos += length
                self.segment += 1
                continue
            seg = segments[k]
            want = min(seg.length - self.done_in_segment, cap - pos)
            offset = seg.source_offset + self.done_in_segment
            self._read_part(f, buf[pos:pos + want], offset)
            done = self.done_in_segment + want
            pieces.append(Piece(self.segment, pos, want, self.done_in_segment == 0,
                                done == seg.length))
            pos += want
            if done == seg.length:
                self.segment += 1
                self.done_in_segment = 0
                next_file = s_file[self.segment] if self.segment < self.end else -1
                if next_file != seg.file_index:
                    try:
                        self._close_checked()
                    except _SOURCE_ERRORS as e:
                        self.faults.fault(f, e, domain=self.domain,
                                          offset=plan.files.size[f])
            else:
                self.done_in_segment = done
        self.bytes_read += pos
        return pieces, pos

    def _read_natively(self, buf: memoryview, pos: int, container: int) -> list[str]:
        """Whole files from the current segment on, read into buf[pos:] by the C loop: their
        SHA-256s, one per segment done (none when it is not built or took no file)."""
        module = self._native
        if module is None:
            return []
        plan, k = self.plan, self.segment
        files, segments = plan.files, plan.segments
        f = segments.file_index[k]
        # Files the C loop must leave to Python: unusable ones, and names not in UTF-8.
        stop = len(files)
        n = bisect.bisect_left(self._raw, f)
        if n < len(self._raw):
            stop = self._raw[n]
        stop = self.faults.first_unusable(f, stop)
        try:
            root_fd = self._open_dirs().root_fd
        except OSError:
            return []  # the Python loop says why
        path_data, path_ends = files.relative_path.buffers()
        digests: list[str] = module.read_whole_files(
            root_fd, path_data, path_ends, segments.file_index, segments.length,
            segments.container_index, plan.file_starts, files.size, files.mtime_ns,
            k, self.end, stop, container, buf, pos,
        )
        if digests:
            # A file another pass found unusable meanwhile is left to the Python loop, which
            # gives its zeros, as it would have had it been found before the call.
            last = segments.file_index[k + len(digests) - 1]
            later = self.faults.first_unusable(f, last + 1)
            if later <= last:
                del digests[bisect.bisect_left(segments.file_index, later, k,
                                               k + len(digests)) - k:]
        return digests

    def _open_dirs(self) -> DirFds:
        """The source's directory descriptors (O_PATH), the root opened on first use."""
        if self._dirs is None:  # descriptors only to open files by: O_PATH
            self._dirs = DirFds(
                os.open(self._root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC), path_only=True)
        return self._dirs

    def _read_part(self, file_index: int, view: memoryview, offset: int) -> None:
        """Bytes [offset, offset + len(view)) of a file: read, or zeros once it is unusable."""
        cut = self.faults.cut(self.domain, file_index, offset)
        real = len(view) if cut is None else max(0, min(len(view), cut - offset))
        if real:
            try:
                self._read_exact(self._fd_for(file_index), view[:real], offset, file_index)
            except _SOURCE_ERRORS as e:
                self._close_file()
                self.faults.fault(file_index, e, domain=self.domain, offset=offset)
                real = 0
        if real < len(view):
            if self._fd_file == file_index:
                self._close_file()
            _zero(view[real:])

    def _read_whole(self, file_index: int, view: memoryview) -> None:
        """Read a whole file into `view` and check it against the scan, with as few steps as
        possible: this runs once per small file. One whose change time moved during the read
        (the C loop leaves those here) is read once more: only the bytes of a read the file
        stood still for go on, and a hard link or chmod meanwhile is no change."""
        files = self.plan.files
        for again in (True, False):
            fd = self._open_source(file_index)
            try:
                opened = _fstat(fd, files.relative_path[file_index])
                try:
                    n = os.preadv(fd, [view], 0)
                except OSError as e:
                    raise _read_failed(fd, files.relative_path[file_index], e) from e
                if n < len(view):
                    self._read_exact(fd, view[n:], n, file_index)
                st = _fstat(fd, files.relative_path[file_index])
            finally:
                os.close(fd)
            if st.st_ctime_ns == opened.st_ctime_ns or not again:
                break
        _check_stat(files, file_index, st, opened.st_ctime_ns)

    def close(self) -> None:
        """Close the file being read and any directories kept open."""
        self._close_file()
        if self._dirs is not None:
            self._dirs.close()
            os.close(self._dirs.root_fd)
            self._dirs = None
            self._dir, self._dir_fd = None, -1

    def _close_file(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
            self._fd_file = -1

    def _open(self, file_index: int) -> int:
        """Open a source file by its exact bytes with `_OPEN_FLAGS`, relative to its directory's
        descriptor: directories are opened one component at a time, none followed if it is a
        symlink, and kept (files come in path order, so a directory is opened about once).
        Raises OSError as os.open does; SourceFileVanishedError when a directory on the way
        was replaced by a symlink."""
        head, _, name = self.plan.files.path_bytes(file_index).rpartition(b"/")
        if head != self._dir or self._dir_fd < 0:
            self._dir_fd = -1
            try:
                self._dir_fd = self._open_dirs().open(paths.split(head))
            except OSError as e:
                if e.errno in (errno.ELOOP, errno.ENOTDIR) and self._is_symlink(e.filename):
                    # Not followed: the file is no longer where the scan saw it.
                    raise SourceFileVanishedError(
                        self.plan.files.relative_path[file_index],
                        "a directory on its path was replaced by a symbolic link",
                    ) from None
                raise
            self._dir = head
        return os.open(name, _OPEN_FLAGS, dir_fd=self._dir_fd)

    def _is_symlink(self, rel: object) -> bool:
        """Whether `rel` (bytes relative to the root, as DirFds names a component it could not
        open) is now a symlink."""
        if not isinstance(rel, bytes) or not rel or self._dirs is None:
            return False
        parts = paths.split(rel)
        try:
            st = os.lstat(parts[-1], dir_fd=self._dirs.open(parts[:-1]))
        except OSError:
            return False
        return stat.S_ISLNK(st.st_mode)

    def _open_source(self, file_index: int) -> int:
        """Open a source file for reading without following a symlink or blocking on a FIFO
        that was swapped in for it (O_NONBLOCK changes nothing for a regular file)."""
        try:
            return self._open(file_index)
        except OSError as e:
            raise _open_failed(self.plan.files.relative_path[file_index], e) from None

    def _fd_for(self, file_index: int) -> int:
        if self._fd_file == file_index:
            return self._fd
        self._close_file()
        fd = self._open_source(file_index)
        try:
            self._fd_ctime_ns = _fstat(fd, self.plan.files.relative_path[file_index]).st_ctime_ns
        except BaseException:
            os.close(fd)
            raise
        self._fd, self._fd_file = fd, file_index
        return fd

    def _read_exact(self, fd: int, view: memoryview, offset: int, file_index: int) -> None:
        while view:
            try:
                n = os.preadv(fd, [view], offset)
            except OSError as e:
                rel = self.plan.files.relative_path[file_index]
                raise _read_failed(fd, rel, e) from e
            if n == 0:
                f = self.plan.files[file_index]
                _check_kind(fd, f.relative_path)
                raise SourceFileChangedError(
                    f.relative_path, f"it is now shorter than the {f.size} bytes the scan saw"
                )
            view = view[n:]
            offset += n

    def _close_checked(self) -> None:
        """Close the current file after checking it still looks as the scan saw it (a file
        already unusable is not checked: its bytes are whatever the passes hashed)."""
        fd, file_index = self._fd, self._fd_file
        if fd < 0:
            return
        try:
            st = _fstat(fd, self.plan.files.relative_path[file_index])
        finally:
            self._close_file()
        if file_index not in self.faults.reasons:
            _check_stat(self.plan.files, file_index, st, self._fd_ctime_ns)


def _open_failed(relative_path: str, e: OSError) -> _SourceError:
    """The error for a source file that would not open."""
    if isinstance(e, (FileNotFoundError, NotADirectoryError)):
        return SourceFileVanishedError(relative_path, "it was deleted after the scan")
    if e.errno == errno.ELOOP:
        return SourceFileChangedError(relative_path, "it was replaced by a symbolic link")
    return SourceReadError(
        f"cannot read source file {relative_path!r}: {e.strerror}; fix its "
        "permissions or move it out of the source tree",
        relative_path=relative_path, what=e.strerror or str(e),
    )


def _fstat(fd: int, relative_path: str) -> os.stat_result:
    try:
        return os.fstat(fd)
    except OSError as e:
        raise SourceReadError(
            f"cannot stat source file {relative_path!r}: {e.strerror}; check the disk",
            relative_path=relative_path, what=f"stat failed: {e.strerror}",
        ) from e


def _check_kind(fd: int, relative_path: str) -> None:
    """Raise SourceFileChangedError when `fd` is no longer a regular file (a FIFO, a device)."""
    if not stat.S_ISREG(_fstat(fd, relative_path).st_mode):
        raise SourceFileChangedError(relative_path, "it is no longer a regular file")


def _read_failed(fd: int, relative_path: str, e: OSError) -> _SourceError:
    """The error for a failed read: a file swapped for a FIFO or device, one deleted on a
    network filesystem, or a real read error."""
    _check_kind(fd, relative_path)
    if e.errno == errno.ESTALE:
        return SourceFileVanishedError(relative_path, "it was deleted while being read")
    return SourceReadError(
        f"reading source file {relative_path!r} failed: {e.strerror}; check the disk, or move "
        "the file out of the source tree", relative_path=relative_path,
        what=f"read error: {e.strerror}" if e.strerror else str(e),
    )


def _check_stat(files: FileTable, i: int, st: os.stat_result, opened_ctime_ns: int) -> None:
    """File i, just read, must still be the regular file, of the size and mtime, the scan saw
    (read from the table's columns: this runs once per file), with the change time it had when
    it was opened: a rewrite in place whose writer put the mtime back (same size) shows only
    there, and the bytes read may be half old, half new."""
    if not stat.S_ISREG(st.st_mode):
        raise SourceFileChangedError(files.relative_path[i], "it is no longer a regular file")
    if st.st_nlink == 0:
        raise SourceFileVanishedError(files.relative_path[i], "it was deleted while being read")
    if st.st_size != files.size[i]:
        raise SourceFileChangedError(
            files.relative_path[i], f"its size went from {files.size[i]} to {st.st_size} bytes"
        )
    if st.st_mtime_ns != files.mtime_ns[i]:
        raise SourceFileChangedError(files.relative_path[i],
                                     "its modification time is not the one the scan saw")
    if st.st_ctime_ns != opened_ctime_ns:
        raise SourceFileChangedError(
            files.relative_path[i],
            "its change time moved while it was read")


class HashRecorder:
    """Collects SHA-256s from every pass; a second, different value means the file changed.

    Tape 1's write pass (`written=True`) has the last word on tape 1's segments: when the
    prehasher saw other bytes, the file changed and goes to `faults`, and the hash of the bytes
    on tape stays. Once `faults` is frozen (tape 1's catalog), any difference is fatal.
    """

    def __init__(self, plan: Plan, faults: SourceFaults | None = None) -> None:
        self.plan = plan
        self.hashes = Hashes.for_plan(plan)
        self.faults = faults or SourceFaults(plan)
        self._written = bytearray(len(plan.segments))

    def segment(self, index: int, digest: str, *, written: bool = True,
                replace: bool = False) -> None:
        """Record a segment's hash from tape 1's write pass (`written`), the prehasher, or the
        prehasher hashing again after a file became unusable (`replace`: the new hash wins)."""
        known = self.hashes.segments[index]
        if known is not None and known != digest:
            f = self.plan.segments[index].file_index
            if f not in self.faults.reasons or self.faults.frozen:
                rel = self.plan.files.relative_path[f]
                self.faults.fault(
                    f, SourceFileChangedError(rel, "its content differs between two reads"),
                    domain=None,
                )
            if self._written[index]:
                return  # the bytes on tape keep their hash
        if known is None or written or replace:
            self.hashes.segments[index] = digest
        if written:
            self._written[index] = 1

    def segments_written(self, done: list[tuple[int, str]]) -> None:
        """segment(index, digest) for each pair from tape 1's write pass, in order. A run of
        consecutive segments none of whose hashes is known yet (nearly always) is recorded in
        one step: a chunk of small files has thousands."""
        digests, n, i = self.hashes.segments, len(done), 0
        while i < n:
            first = done[i][0]
            j = i + 1
            while j < n and done[j][0] == first + j - i:
                j += 1
            if j - i == 1 or not digests.set_run_if_unknown(first, [d for _, d in done[i:j]]):
                for index, digest in done[i:j]:
                    self.segment(index, digest)
            else:
                self._written[first:first + j - i] = b"\x01" * (j - i)
            i = j

    def forget_written(self, segments: range) -> None:
        """These segments are about to be written again (a resume rewrites them): the hashes
        known stay for comparison, and the bytes written now have the last word."""
        for s in segments:
            self._written[s] = 0

    def seed_written(self, index: int, digest: str) -> None:
        """A segment an interrupted job put on tape: its hash is that of the bytes on tape."""
        self.hashes.segments[index] = digest
        self._written[index] = 1

    def container(self, index: int, digest: str) -> None:
        self.hashes.containers[index] = digest

    def file(self, index: int, digest: str) -> None:
        known = self.hashes.files[index]
        if known is None:
            self.hashes.files[index] = digest
        elif known != digest and index not in self.faults.reasons:
            self.faults.fault(
                index, SourceFileChangedError(
                    self.plan.files.relative_path[index], "its content differs between two reads"
                ), domain=None,
            )

    def complete(self) -> Hashes:
        """Fill the hashes that follow from others; raise ValueError if any is still missing.

        Unusable files need no whole-file hash: they leave `source_files`.
        """
        plan, h = self.plan, self.hashes
        for c in plan.containers:
            if h.containers[c.index] is None and len(c.segments) == 1:
                h.containers[c.index] = h.segments[c.segments[0]]
        starts = plan.file_starts
        h.files.fill_single_segment_files(starts, h.segments)
        for i in list(h.files.unknown()):
            first, end = starts[i], starts[i + 1]
            if first == end:  # a zero-byte file
                h.files[i] = cat.EMPTY_SHA256
            elif end - first == 1:
                h.files.set_from(i, h.segments, first)
            elif i in self.faults.reasons:
                h.files[i] = cat.PLACEHOLDER_SHA256  # never written: it is skipped
        missing = h.missing()
        if missing:
            raise ValueError(f"{missing} hashes were never computed")
        return h


class SegmentHasher:
    """Per-segment SHA-256 over pieces that may span chunks. Thread-confined like the cursor."""

    def __init__(self) -> None:
        self._open: dict[int, Any] = {}

    def update(self, data: memoryview, pieces: list[Piece]) -> list[tuple[int, str]]:
        done: list[tuple[int, str]] = []
        for p in pieces:
            if p.digest is not None:
                done.append((p.segment, p.digest))
                continue
            view = data[p.start:p.start + p.length]
            if p.first and p.last:
                done.append((p.segment, hashlib.sha256(view).hexdigest()))
                continue
            h = self._open.get(p.segment)
            if h is None:
                h = self._open[p.segment] = hashlib.sha256()
            h.update(view)
            if p.last:
                done.append((p.segment, self._open.pop(p.segment).hexdigest()))
        return done


class AggregateHasher:
    """SHA-256 of whole containers and whole files, for those that need their own hash.

    A container of one segment has that segment's hash and a file of one segment likewise,
    so only containers and files of several segments are hashed here, and only those listed in
    `want_containers` / `want_files` (the others are hashed elsewhere, or known already).
    """

    def __init__(self, plan: Plan, want_containers: bytearray, want_files: bytearray) -> None:
        self.plan = plan
        self.want_containers = want_containers
        self.want_files = want_files
        self._containers: dict[int, Any] = {}
        self._files: dict[int, Any] = {}
        # The segments of the files wanted, in order: a chunk holding none of them (nearly
        # every chunk: only files split across containers are wanted) skips its pieces.
        self._file_segments = array("q")
        f = want_files.find(1)
        while f >= 0:
            self._file_segments.extend(range(plan.file_starts[f], plan.file_starts[f + 1]))
            f = want_files.find(1, f + 1)

    def update(
        self, data: memoryview, pieces: list[Piece]
    ) -> tuple[list[tuple[int, str]], list[tuple[int, str]]]:
        plan = self.plan
        s_container, s_file = plan.segments.container_index, plan.segments.file_index
        containers: list[tuple[int, str]] = []
        files: list[tuple[int, str]] = []
        if not pieces:
            return containers, files
        # Containers: one update per run of pieces in the same container. The pieces are in
        # segment order: when the first and the last lie in the same container (nearly always,
        # a chunk holds one container's bytes), the whole chunk is one run.
        first, last = pieces[0].segment, pieces[-1].segment
        run_ends = ([len(pieces) - 1] if s_container[first] == s_container[last] else
                    [n for n in range(len(pieces)) if n + 1 == len(pieces)
                     or s_container[pieces[n + 1].segment] != s_container[pieces[n].segment]])
        run_start = 0
        for n in run_ends:
            p = pieces[n]
            c = s_container[p.segment]
            if self.want_containers[c]:
                h = self._containers.get(c)
                if h is None:
                    h = self._containers[c] = hashlib.sha256()
                h.update(data[pieces[run_start].start:p.start + p.length])
                if p.last and p.segment == plan.containers[c].segments[-1]:
                    containers.append((c, self._containers.pop(c).hexdigest()))
            run_start = n + 1
        wanted = self._file_segments
        k = bisect.bisect_left(wanted, first)
        if k == len(wanted) or wanted[k] > last:
            return containers, files
        for p in pieces:
            f = s_file[p.segment]
            if not self.want_files[f]:
                continue
            h = self._files.get(f)
            if h is None:
                h = self._files[f] = hashlib.sha256()
            h.update(data[p.start:p.start + p.length])
            if p.last and p.segment == plan.file_starts[f + 1] - 1:
                files.append((f, self._files.pop(f).hexdigest()))
        return containers, files


def multi_segment_flags(plan: Plan, containers: range, first_file: int, end_file: int
                        ) -> tuple[bytearray, bytearray]:
    """Flags for AggregateHasher: the multi-segment containers in `containers` and files in
    [first_file, end_file)."""
    want_c = bytearray(len(plan.containers))
    for c in containers:
        if len(plan.containers[c].segments) > 1:
            want_c[c] = 1
    want_f = bytearray(len(plan.files))
    for f in range(first_file, end_file):
        if plan.file_starts[f + 1] - plan.file_starts[f] > 1:
            want_f[f] = 1
    return want_c, want_f
