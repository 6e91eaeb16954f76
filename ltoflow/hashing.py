"""Reading planned segments from the source tree, and the SHA-256s they produce.

`SourceCursor` is the one place that opens source files: the engine's reader and the prehasher
both use it, so change detection (size, mtime, short reads) is the same for both. It runs in
worker threads; one cursor is only ever used by one thread at a time.
"""

from __future__ import annotations

import hashlib
import os
from hashlib import sha256
from typing import Any, NamedTuple

from ltoflow import catalog as cat
from ltoflow.errors import SourceFileChangedError, SourceReadError
from ltoflow.plan import Hashes, Plan
from ltoflow.scan import ScannedFile


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
    """Reads segments [start, end) of `plan` in order, from the source files, into buffers."""

    def __init__(self, plan: Plan, start: int, end: int) -> None:
        self.plan = plan
        self.segment = start
        self.end = end
        self.done_in_segment = 0
        self.bytes_read = 0
        self._root = str(plan.source_root)
        self._fd = -1
        self._fd_file = -1

    @property
    def finished(self) -> bool:
        return self.segment >= self.end

    @property
    def container(self) -> int:
        """The container of the next byte to read."""
        return self.plan.segments.container_index[self.segment]

    def fill(self, buf: memoryview, *, one_container: bool) -> tuple[list[Piece], int]:
        """Read as many of the next bytes as fit in `buf`; return the pieces and bytes used.

        With `one_container` the chunk stops at the end of a container. Raises
        SourceFileChangedError when a file no longer matches the scan, SourceReadError when it
        cannot be read.
        """
        plan = self.plan
        segments, starts = plan.segments, plan.file_starts
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
            if (self.done_in_segment == 0 and length <= cap - pos and self._fd < 0
                    and starts[f + 1] - starts[f] == 1):
                # The common case, a whole small file: open, read, check, close and hash in one
                # go.
                view = buf[pos:pos + length]
                self._read_whole(f, view)
                pieces.append(Piece(k, pos, length, True, True, sha256(view).hexdigest()))
                pos += length
                self.segment += 1
                continue
            seg = segments[k]
            fd = self._fd_for(seg.file_index)
            want = min(seg.length - self.done_in_segment, cap - pos)
            offset = seg.source_offset + self.done_in_segment
            self._read_exact(fd, buf[pos:pos + want], offset, seg.file_index)
            done = self.done_in_segment + want
            pieces.append(Piece(self.segment, pos, want, self.done_in_segment == 0,
                                done == seg.length))
            pos += want
            if done == seg.length:
                self.segment += 1
                self.done_in_segment = 0
                next_file = s_file[self.segment] if self.segment < self.end else -1
                if next_file != seg.file_index:
                    self._close_checked()
            else:
                self.done_in_segment = done
        self.bytes_read += pos
        return pieces, pos

    def _read_whole(self, file_index: int, view: memoryview) -> None:
        """Read a whole file into `view` and check it against the scan, with as few steps as
        possible: this runs once per small file."""
        f = self.plan.files[file_index]
        try:
            fd = os.open(f"{self._root}/{f.relative_path}", os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise SourceFileChangedError(f.relative_path, "it was deleted after the scan") from None
        except OSError as e:
            raise SourceReadError(
                f"cannot read source file {f.relative_path!r}: {e.strerror}; fix its "
                "permissions or move it out of the source tree"
            ) from e
        try:
            try:
                n = os.preadv(fd, [view], 0)
            except OSError as e:
                raise SourceReadError(
                    f"reading source file {f.relative_path!r} failed: {e.strerror}") from e
            if n < len(view):
                self._read_exact(fd, view[n:], n, file_index)
            st = os.fstat(fd)
        finally:
            os.close(fd)
        if st.st_size != f.size or st.st_mtime_ns != f.mtime_ns:
            _check_stat(f, st.st_size, st.st_mtime_ns)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
            self._fd_file = -1

    def _path(self, file_index: int) -> str:
        return os.path.join(self._root, self.plan.files[file_index].relative_path)

    def _fd_for(self, file_index: int) -> int:
        if self._fd_file == file_index:
            return self._fd
        self.close()
        rel = self.plan.files[file_index].relative_path
        try:
            self._fd = os.open(self._path(file_index), os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise SourceFileChangedError(rel, "it was deleted after the scan") from None
        except OSError as e:
            raise SourceReadError(
                f"cannot read source file {rel!r}: {e.strerror}; fix its permissions or "
                "move it out of the source tree"
            ) from e
        self._fd_file = file_index
        return self._fd

    def _read_exact(self, fd: int, view: memoryview, offset: int, file_index: int) -> None:
        while view:
            try:
                n = os.preadv(fd, [view], offset)
            except OSError as e:
                rel = self.plan.files[file_index].relative_path
                raise SourceReadError(f"reading source file {rel!r} failed: {e.strerror}") from e
            if n == 0:
                f = self.plan.files[file_index]
                raise SourceFileChangedError(
                    f.relative_path, f"it is now shorter than the {f.size} bytes the scan saw"
                )
            view = view[n:]
            offset += n

    def _close_checked(self) -> None:
        """Close the current file after checking it still looks as the scan saw it."""
        fd, file_index = self._fd, self._fd_file
        if fd < 0:
            return
        try:
            st = os.fstat(fd)
        finally:
            self.close()
        _check_stat(self.plan.files[file_index], st.st_size, st.st_mtime_ns)


def _check_stat(f: ScannedFile, size: int, mtime_ns: int) -> None:
    """A file just read must still have the size and mtime the scan saw."""
    if size != f.size:
        raise SourceFileChangedError(
            f.relative_path, f"its size went from {f.size} to {size} bytes"
        )
    if mtime_ns != f.mtime_ns:
        raise SourceFileChangedError(f.relative_path, "it was modified while being read")


class HashRecorder:
    """Collects SHA-256s from every reader; a second, different value means the file changed."""

    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        self.hashes = Hashes.for_plan(plan)

    def segment(self, index: int, digest: str) -> None:
        known = self.hashes.segments[index]
        if known is None:
            self.hashes.segments[index] = digest
        elif known != digest:
            rel = self.plan.files[self.plan.segments[index].file_index].relative_path
            raise SourceFileChangedError(rel, "its content differs between two reads")

    def container(self, index: int, digest: str) -> None:
        self.hashes.containers[index] = digest

    def file(self, index: int, digest: str) -> None:
        known = self.hashes.files[index]
        if known is None:
            self.hashes.files[index] = digest
        elif known != digest:
            raise SourceFileChangedError(
                self.plan.files[index].relative_path, "its content differs between two reads"
            )

    def complete(self) -> Hashes:
        """Fill the hashes that follow from others; raise ValueError if any is still missing."""
        plan, h = self.plan, self.hashes
        for c in plan.containers:
            if h.containers[c.index] is None and len(c.segments) == 1:
                h.containers[c.index] = h.segments[c.segments[0]]
        for i, f in enumerate(plan.files):
            if h.files[i] is None:
                segs = plan.segments_of(i)
                if f.size == 0:
                    h.files[i] = cat.EMPTY_SHA256
                elif len(segs) == 1:
                    h.files[i] = h.segments[segs[0]]
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

    def update(
        self, data: memoryview, pieces: list[Piece]
    ) -> tuple[list[tuple[int, str]], list[tuple[int, str]]]:
        plan = self.plan
        s_container, s_file = plan.segments.container_index, plan.segments.file_index
        containers: list[tuple[int, str]] = []
        files: list[tuple[int, str]] = []
        # Containers: one update per run of pieces in the same container (usually the chunk).
        run_start = 0
        for n, p in enumerate(pieces):
            c = s_container[p.segment]
            ends_run = n + 1 == len(pieces) or s_container[pieces[n + 1].segment] != c
            if not ends_run:
                continue
            if self.want_containers[c]:
                h = self._containers.get(c)
                if h is None:
                    h = self._containers[c] = hashlib.sha256()
                h.update(data[pieces[run_start].start:p.start + p.length])
                if p.last and p.segment == plan.containers[c].segments[-1]:
                    containers.append((c, self._containers.pop(c).hexdigest()))
            run_start = n + 1
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
