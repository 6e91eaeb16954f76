"""The deterministic backup plan: which bytes of which file go to which container on which tape.

Pure: the plan depends only on the scan (names, sizes, mtimes, modes) and the settings. Files, in
scan order, are streamed into containers of at most `container_size_bytes`; a file that crosses a
container boundary is split there, and the last container on a tape is cut short so the tape is
filled up to its usable capacity (nominal minus the catalog reserve). The catalog reserve is
computed, not guessed: the catalog of this very plan, with placeholder hashes of the real width,
is measured and the layout redone until the reserve holds it.
"""

from __future__ import annotations

import bisect
import itertools
import mmap
import operator
import os
from array import array
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, overload

import attrs

from ltoflow import catalog as cat
from ltoflow import native, paths
from ltoflow.errors import BackupPlanError
from ltoflow.scan import (
    FileTable,
    ScannedDirectory,
    ScannedSymlink,
    ScanResult,
    SkippedEntry,
)
from ltoflow.units import human_bytes

#: More tapes than this in one set is almost surely a mistyped capacity.
MAX_TAPES = 9_999
#: Bytes of catalog/catalog.sha256 (64 hex digits, no newline, as the seed writes it).
SHA256_FILE_BYTES = cat.SHA256_HEX_LEN
_MAX_RESERVE_ROUNDS = 64


@attrs.frozen
class Segment:
    """A contiguous slice of one file inside one container."""

    file_index: int
    part: int  # 1-based within the file
    container_index: int
    container_offset: int
    source_offset: int
    length: int


class SegmentTable(Sequence[Segment]):
    """The plan's segments as columns of machine integers: 48 bytes a segment, where a Segment
    object with its ints takes about 190, and a million-file plan has a million segments.

    Reads as a sequence of Segment (built on access); code that walks many segments can read
    the columns directly (`table.length[i]`).
    """

    __slots__ = (
        "container_index",
        "container_offset",
        "file_index",
        "length",
        "part",
        "source_offset",
    )

    def __init__(self) -> None:
        self.file_index = array("q")
        self.part = array("q")
        self.container_index = array("q")
        self.container_offset = array("q")
        self.source_offset = array("q")
        self.length = array("q")

    def _columns(self) -> tuple[array[int], ...]:
        return (self.file_index, self.part, self.container_index, self.container_offset,
                self.source_offset, self.length)

    def append(self, file_index: int, part: int, container_index: int, container_offset: int,
               source_offset: int, length: int) -> None:
        self.file_index.append(file_index)
        self.part.append(part)
        self.container_index.append(container_index)
        self.container_offset.append(container_offset)
        self.source_offset.append(source_offset)
        self.length.append(length)

    def __len__(self) -> int:
        return len(self.file_index)

    @overload
    def __getitem__(self, i: int) -> Segment: ...

    @overload
    def __getitem__(self, i: slice) -> list[Segment]: ...

    def __getitem__(self, i: int | slice) -> Segment | list[Segment]:
        if isinstance(i, slice):
            return [self[k] for k in range(*i.indices(len(self)))]
        return Segment(self.file_index[i], self.part[i], self.container_index[i],
                       self.container_offset[i], self.source_offset[i], self.length[i])

    def __iter__(self) -> Iterator[Segment]:
        return map(Segment, *self._columns())

    def __eq__(self, other: object) -> bool:
        if isinstance(other, SegmentTable):
            return self._columns() == other._columns()
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]  # mutable while the layout builds it

    def __repr__(self) -> str:
        return f"SegmentTable({len(self)} segments)"


@attrs.frozen
class Container:
    index: int  # 0-based; the catalog's sequence_number is index + 1
    tape_index: int
    tape_offset: int
    size: int
    segments: range  # indices into Plan.segments


@attrs.frozen
class Tape:
    index: int  # 0-based; the catalog's sequence_number is index + 1
    containers: range  # indices into Plan.containers
    data_bytes: int


@attrs.frozen
class Plan:
    source_root: Path
    files: FileTable
    skipped: tuple[SkippedEntry, ...]
    segments: SegmentTable
    containers: tuple[Container, ...]
    tapes: tuple[Tape, ...]
    capacity_bytes: int
    container_size_bytes: int
    reserve_bytes: int
    #: file i's segments are segments[file_starts[i]:file_starts[i + 1]]
    file_starts: array[int] = attrs.field(eq=False, repr=False)
    directories: tuple[ScannedDirectory, ...] = ()
    symlinks: tuple[ScannedSymlink, ...] = ()

    @property
    def usable_bytes(self) -> int:
        return self.capacity_bytes - self.reserve_bytes

    @property
    def total_bytes(self) -> int:
        return sum(self.segments.length)  # zero-byte files have no segment; summed in C

    def segments_of(self, file_index: int) -> range:
        return range(self.file_starts[file_index], self.file_starts[file_index + 1])

    def tapes_of(self, file_index: int) -> list[int]:
        """The tape indices holding `file_index`, in order, without repeats."""
        seen: list[int] = []
        for s in self.segments_of(file_index):
            t = self.containers[self.segments[s].container_index].tape_index
            if not seen or seen[-1] != t:
                seen.append(t)
        return seen

    def split_files(self) -> list[int]:
        """Indices of the files stored in more than one segment, in order.

        A file is split only where a container ends (layout never makes an empty container,
        and with_tape_breaks moves whole ones), so this looks at container boundaries, not at
        every file.
        """
        by_file = self.segments.file_index
        split: list[int] = []
        for c in self.containers[1:]:
            first = c.segments.start
            f = by_file[first]
            if by_file[first - 1] == f and (not split or split[-1] != f):
                split.append(f)
        return split

    def split_counts(self) -> tuple[int, int]:
        """(files in more than one segment, files on more than one tape)."""
        split = self.split_files()
        return len(split), sum(len(self.tapes_of(f)) > 1 for f in split)


@attrs.frozen
class _Layout:
    segments: SegmentTable
    containers: tuple[Container, ...]
    tapes: tuple[Tape, ...]
    file_starts: array[int]


def layout(files: FileTable, usable: int, container_size: int) -> _Layout:
    """Stream `files` into containers and tapes. Zero-byte files get no segment."""
    segments = SegmentTable()
    containers: list[Container] = []
    tapes: list[Tape] = []
    file_starts = array("q", [0])
    tape_index = 0
    tape_used = 0  # bytes of closed containers on the current tape
    tape_first_container = 0
    c_start_seg = 0
    c_size = 0
    c_cap = min(container_size, usable)

    def close_container() -> None:
        nonlocal tape_used, c_start_seg, c_size
        containers.append(
            Container(len(containers), tape_index, tape_used, c_size,
                      range(c_start_seg, len(segments)))
        )
        tape_used += c_size
        c_start_seg = len(segments)
        c_size = 0

    def close_tape() -> None:
        nonlocal tape_index, tape_used, tape_first_container
        tapes.append(Tape(tape_index, range(tape_first_container, len(containers)), tape_used))
        tape_index += 1
        tape_used = 0
        tape_first_container = len(containers)

    # Once per file: the columns' appends bound once, and a file that fits in the open
    # container (nearly all of them) takes one step; runs of such files go to C where it is
    # built.
    add_file, add_part, add_container, add_offset, add_source, add_length = (
        column.append for column in segments._columns()
    )
    add_start = file_starts.append
    count = 0  # segments so far
    module = native.MODULE
    sizes = files.size
    file_index = 0
    while file_index < len(sizes):
        if module is not None:  # the files that fit whole in the open container, in C
            (file_index, c_size, count, *columns) = module.layout_fit(
                sizes, file_index, c_cap, len(containers), c_size, count)
            for column, items in zip((*segments._columns(), file_starts), columns,
                                     strict=True):
                column.frombytes(items)
            if file_index == len(sizes):
                break
        i = file_index  # the next file, in Python: one that does not fit, or all without C
        file_index += 1
        remaining = sizes[i]
        if remaining and remaining <= c_cap - c_size:
            add_file(i)
            add_part(1)
            add_container(len(containers))
            add_offset(c_size)
            add_source(0)
            add_length(remaining)
            c_size += remaining
            count += 1
            add_start(count)
            continue
        source_offset = 0
        part = 1
        while remaining:
            if c_size == c_cap:
                close_container()
                if tape_used == usable:
                    close_tape()
                c_cap = min(container_size, usable - tape_used)
            n = min(remaining, c_cap - c_size)
            segments.append(i, part, len(containers), c_size, source_offset, n)
            c_size += n
            source_offset += n
            remaining -= n
            part += 1
            count += 1
        add_start(count)
    if c_size:
        close_container()
    if tape_used or not tapes:
        close_tape()  # an empty tree still gets one tape: the catalog has to live somewhere
    return _Layout(segments, tuple(containers), tuple(tapes), file_starts)


def make_plan(
    scan: ScanResult,
    *,
    capacity_bytes: int,
    container_size_bytes: int,
    measure_catalog: Callable[[Plan], int],
    extra_reserve_bytes: int = 0,
) -> Plan:
    """Lay out `scan` and fix the catalog reserve so that the real catalog always fits.

    `measure_catalog(plan)` returns the encoded size of the plan's catalog with placeholder
    hashes; `extra_reserve_bytes` covers the other files written with it on every tape (the
    recovery kit). Raises BackupPlanError with what to change when no plan can work.
    """
    reserve = SHA256_FILE_BYTES + extra_reserve_bytes
    total = scan.total_bytes
    lay: _Layout | None = None
    lay_usable = 0
    for _ in range(_MAX_RESERVE_ROUNDS):
        usable = capacity_bytes - reserve
        if usable <= 0:
            raise BackupPlanError(
                f"a tape of {human_bytes(capacity_bytes)} cannot hold the catalog of this tree "
                f"({human_bytes(reserve)} on every tape); use a larger --capacity-tb"
            )
        if container_size_bytes > usable:
            raise BackupPlanError(
                f"--container-size-gb ({human_bytes(container_size_bytes)}) is larger than a "
                f"tape's usable capacity ({human_bytes(usable)}: "
                f"{human_bytes(capacity_bytes)} nominal minus {human_bytes(reserve)} "
                "catalog reserve); use a smaller container size"
            )
        if total // usable + 1 > MAX_TAPES:
            raise BackupPlanError(
                f"this tree ({human_bytes(total)}) would need more than {MAX_TAPES} tapes of "
                f"{human_bytes(usable)} usable each; check --capacity-tb"
            )
        if lay is None or lay_usable < total or usable < total:
            # With the whole tree on one tape either way, a smaller reserve changes nothing:
            # each container's room, min(container size, usable - used), still exceeds what
            # is left to lay out, so the layout is the same.
            lay, lay_usable = layout(scan.files, usable, container_size_bytes), usable
        plan = Plan(
            source_root=scan.root,
            files=scan.files,
            skipped=scan.skipped,
            segments=lay.segments,
            containers=lay.containers,
            tapes=lay.tapes,
            capacity_bytes=capacity_bytes,
            container_size_bytes=container_size_bytes,
            reserve_bytes=reserve,
            file_starts=lay.file_starts,
            directories=scan.directories,
            symlinks=scan.symlinks,
        )
        needed = measure_catalog(plan) + SHA256_FILE_BYTES + extra_reserve_bytes
        if needed <= reserve:
            return plan
        del plan
        if lay_usable < total:
            lay = None  # before the next round builds its own: a million segments each
        # A little slack, so that the next layout (with a few more digits or containers)
        # nearly always settles it: each round lays out the whole tree again.
        reserve = needed + needed // 1000 + 4096
    raise BackupPlanError(  # pragma: no cover - the reserve only grows, so this needs a bug
        "the catalog reserve did not settle; please report this with the `ltoflow plan` output"
    )


def with_tape_breaks(plan: Plan, breaks: Sequence[int]) -> Plan:
    """`plan` with a new tape started at each container index in `breaks`.

    A tape that fills before its planned share (its real capacity is below nominal) ends at
    the container that did not fit; that container and the ones after it flow onto the next
    tapes, as many whole ones as fit on each. Containers keep their bytes, segments and ids;
    the tapes before the first break are unchanged.
    """
    if not breaks:
        return plan
    forced = set(breaks)
    first_tape = plan.containers[min(breaks)].tape_index
    start = plan.tapes[first_tape].containers.start
    tapes = list(plan.tapes[:first_tape])
    containers = list(plan.containers[:start])
    used = 0
    for c in plan.containers[start:]:
        if c.index > start and (c.index in forced or used + c.size > plan.usable_bytes):
            tapes.append(Tape(len(tapes), range(start, c.index), used))
            start, used = c.index, 0
        containers.append(attrs.evolve(c, tape_index=len(tapes), tape_offset=used))
        used += c.size
    tapes.append(Tape(len(tapes), range(start, len(plan.containers)), used))
    return attrs.evolve(plan, containers=tuple(containers), tapes=tuple(tapes))


#: Same width as a real set id, for measuring.
PLACEHOLDER_SET_ID = "00000000-0000-0000-0000-000000000000"
PLACEHOLDER_CREATED_AT = "2000-01-01T00:00:00.000000+00:00"


_SHA256_BYTES = 32


class Digests(Sequence[str | None]):
    """SHA-256s as lowercase hex strings (None while unknown), kept as 32 raw bytes each.

    A million files have a million segment and a million file hashes: 64 MB this way, 230 MB
    as strings. Reading one makes its string; `None in`, `index(None)` and `unknown()` look at
    the known-flags only. Once frozen (a catalog reads them) a digest can only be set again to
    the value it has.
    """

    __slots__ = ("_data", "_frozen", "_known")

    def __init__(self, hexes: Iterable[str | None] = ()) -> None:
        values = list(hexes)
        self._data: bytearray | mmap.mmap = bytearray(_SHA256_BYTES * len(values))
        self._known = bytearray(len(values))
        self._frozen = False
        for i, value in enumerate(values):
            if value is not None:
                self[i] = value

    @classmethod
    def unknown_of(cls, n: int) -> Digests:
        """n unknown digests. Their bytes are an anonymous mapping, whose pages take memory
        only once written: file hashes, mostly filled at the end, cost nothing before."""
        d = cls()
        d._data = mmap.mmap(-1, _SHA256_BYTES * n, flags=mmap.MAP_PRIVATE) if n else bytearray()
        d._known = bytearray(n)
        return d

    @classmethod
    def filled(cls, n: int, value: str) -> Digests:
        d = cls()
        d._data = bytearray.fromhex(value) * n
        d._known = bytearray(b"\x01") * n
        return d

    def freeze(self) -> None:
        """From now on refuse to change a digest (RuntimeError): a catalog made from these
        reads them as it is encoded, tape after tape, and must not see them move."""
        self._frozen = True

    def _check_unfrozen(self, i: int, raw: bytes | None) -> None:
        if self._frozen and (raw is None or not self._known[i] or self._data[
                i * _SHA256_BYTES:(i + 1) * _SHA256_BYTES] != raw):
            raise RuntimeError(f"digest {i} changed after its catalog was made")

    def __len__(self) -> int:
        return len(self._known)

    @overload
    def __getitem__(self, i: int) -> str | None: ...

    @overload
    def __getitem__(self, i: slice) -> list[str | None]: ...

    def __getitem__(self, i: int | slice) -> list[str | None] | str | None:
        if isinstance(i, slice):
            data, known, n = self._data, self._known, _SHA256_BYTES
            return [data[k * n:k * n + n].hex() if known[k] else None
                    for k in range(*i.indices(len(self)))]
        if not self._known[i]:  # IndexError as a list raises it
            return None
        k = (i + len(self._known) if i < 0 else i) * _SHA256_BYTES
        return self._data[k:k + _SHA256_BYTES].hex()

    @overload
    def __setitem__(self, i: int, value: str | None) -> None: ...

    @overload
    def __setitem__(self, i: slice, value: Iterable[str | None]) -> None: ...

    def __setitem__(self, i: int | slice, value: Iterable[str | None] | str | None) -> None:
        if isinstance(i, slice):
            if value is None or isinstance(value, str):
                raise TypeError("a slice of digests takes a sequence of them")
            for k, v in zip(range(*i.indices(len(self))), list(value), strict=True):
                self[k] = v
            return
        if value is None:
            self._check_unfrozen(i, None)
            self._known[i] = 0
            return
        if not isinstance(value, str):
            raise TypeError(f"a digest is a str, not {type(value).__name__}")
        try:
            raw = bytes.fromhex(value)
        except ValueError:
            raw = b""
        if len(raw) != _SHA256_BYTES or raw.hex() != value:
            raise ValueError(f"not a lowercase SHA-256 in hex: {value!r}")
        if not -len(self._known) <= i < len(self._known):
            raise IndexError("digest index out of range")
        i = i + len(self._known) if i < 0 else i
        if self._frozen:
            self._check_unfrozen(i, raw)
            return
        k = i * _SHA256_BYTES
        self._data[k:k + _SHA256_BYTES] = raw
        self._known[i] = 1  # after the bytes: a digest is never known before it is there

    def set_run_if_unknown(self, first: int, values: list[str]) -> bool:
        """Set digests first, first + 1, ... to `values` when none of them is known yet and
        they are not frozen; False (nothing set) otherwise. ValueError as for one digest."""
        n = len(values)
        if (self._frozen or first < 0 or first + n > len(self._known)
                or self._known.find(1, first, first + n) >= 0):
            return False
        text = "".join(values)
        try:
            raw = bytes.fromhex(text)
        except ValueError:
            raw = b""
        if len(raw) != _SHA256_BYTES * n or raw.hex() != text:
            for k, value in enumerate(values):  # one at a time: the bad one raises
                self[first + k] = value
            return True
        k = first * _SHA256_BYTES
        self._data[k:k + len(raw)] = raw
        self._known[first:first + n] = b"\x01" * n  # after the bytes, as for one digest
        return True

    def set_from(self, i: int, other: Digests, j: int) -> None:
        """self[i] = other[j] (both in range, not negative), without making the string."""
        if not (0 <= i < len(self) and 0 <= j < len(other)):
            raise IndexError("digest index out of range")
        n = _SHA256_BYTES
        if self._frozen:
            self._check_unfrozen(i, bytes(other._data[j * n:j * n + n]) if other._known[j]
                                 else None)
            return
        self._data[i * n:i * n + n] = other._data[j * n:j * n + n]
        self._known[i] = other._known[j]

    def buffers(self) -> tuple[bytearray | mmap.mmap, bytearray]:
        """The digests' 32 raw bytes each, end to end, and a known-flag byte each: not copies,
        for native code (which may write them only while they are not frozen)."""
        return self._data, self._known

    def known_runs(self, start: int, stop: int) -> list[tuple[int, bytes]]:
        """The known digests of [start, stop) as runs: (index of the first, the run's digests
        one after another, 32 bytes each). Compact where a list of pairs is not: a container
        of half a million small files has one run of 16 MB."""
        known, n = self._known, _SHA256_BYTES
        runs = []
        i = start
        while i < stop:
            first = known.find(1, i, stop)
            if first < 0:
                break
            end = known.find(0, first, stop)
            end = stop if end < 0 else end
            runs.append((first, bytes(memoryview(self._data)[first * n:end * n])))
            i = end
        return runs

    def __contains__(self, value: object) -> bool:
        if value is None:
            return 0 in self._known
        return super().__contains__(value)

    def index(self, value: object, start: int = 0, stop: int | None = None) -> int:
        if value is None:
            return self._known.index(0, start, len(self) if stop is None else stop)
        return super().index(value, start, len(self) if stop is None else stop)

    def fill_single_segment_files(self, file_starts: array[int], segments: Digests) -> None:
        """Give each unknown file digest of a file of one segment that segment's digest, in
        one call to the C extension where it is built (a million set_from calls take 0.9 s);
        without it, nothing (the caller sets them one by one)."""
        module = native.MODULE
        if module is not None and not self._frozen:
            module.copy_single_segment_digests(file_starts, *segments.buffers(),
                                               *self.buffers())

    def unknown(self) -> Iterator[int]:
        """The indices still unknown, in order."""
        known = self._known
        i = known.find(0)
        while i >= 0:
            yield i
            i = known.find(0, i + 1)

    def missing(self) -> int:
        return self._known.count(0)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Sequence) or isinstance(other, str | bytes):
            return NotImplemented
        if isinstance(other, Digests):
            return self._known == other._known and all(
                self[i] == other[i] for i in range(len(self)) if self._known[i])
        return len(self) == len(other) and all(map(operator.eq, self, other))

    __hash__ = None  # type: ignore[assignment]  # mutable

    def __repr__(self) -> str:
        return f"Digests({len(self)}, {self.missing()} unknown)"


def digest_pairs(runs: Iterable[tuple[int, bytes]]) -> Iterator[tuple[int, str]]:
    """(index, hex digest) for each digest of runs as Digests.known_runs gives them."""
    n = _SHA256_BYTES
    for first, raw in runs:
        for k in range(0, len(raw), n):
            yield first + k // n, raw[k:k + n].hex()


def _digests(values: Iterable[str | None]) -> Digests:
    return values if isinstance(values, Digests) else Digests(values)


@attrs.define
class Hashes:
    """The SHA-256s of one plan, filled in as the engine reads (None = not known yet)."""

    segments: Digests = attrs.field(converter=_digests)
    containers: Digests = attrs.field(converter=_digests)
    files: Digests = attrs.field(converter=_digests)

    @classmethod
    def for_plan(cls, plan: Plan) -> Hashes:
        return cls(Digests.unknown_of(len(plan.segments)),
                   Digests.unknown_of(len(plan.containers)),
                   Digests.unknown_of(len(plan.files)))

    @classmethod
    def placeholders(cls, plan: Plan) -> Hashes:
        p = cat.PLACEHOLDER_SHA256
        return cls(Digests.filled(len(plan.segments), p), Digests.filled(len(plan.containers), p),
                   Digests.filled(len(plan.files), p))

    def missing(self) -> int:
        return self.segments.missing() + self.containers.missing() + self.files.missing()


def build_catalog(
    plan: Plan,
    hashes: Hashes,
    *,
    set_id: str,
    created_at: str,
    created_by: str,
    serial: str | None = None,
    unusable: Mapping[int, str] | None = None,
) -> cat.Catalog:
    """The catalog of `plan`. Every hash must be known; ValueError names the first one missing.

    Tapes get `serial` as their volume serial: the placeholder when measuring, None for real
    catalogs, which get their serials tape by tape (Catalog.with_serials). `unusable` maps the
    files that could not be backed up after all to a short reason: they move from
    `source_files` to `skipped` (with their file_id), and their segments stay. Such a move
    always makes the catalog smaller (the reason is bounded), so the reserve still holds.
    """
    with cat.gc_paused():  # a few lists of a million strings, none in a reference cycle
        return _build_catalog(plan, hashes, set_id=set_id, created_at=created_at,
                              created_by=created_by, serial=serial, unusable=unusable or {})


def _build_catalog(
    plan: Plan,
    hashes: Hashes,
    *,
    set_id: str,
    created_at: str,
    created_by: str,
    serial: str | None,
    unusable: Mapping[int, str],
) -> cat.Catalog:
    """build_catalog, with the collector paused by the caller."""
    root = source_root_text(plan.source_root)
    tape_ids = [cat.tape_id_for(set_id, t.index + 1) for t in plan.tapes]
    container_ids = [cat.container_id_for(set_id, c.index + 1) for c in plan.containers]
    files = plan.files
    paths_, sizes, mtimes, modes, raws = (files.relative_path, files.size, files.mtime_ns,
                                          files.mode, files.raw_path)
    if None in hashes.containers:
        raise ValueError(f"no hash for {container_ids[hashes.containers.index(None)]}")
    for i in hashes.files.unknown():  # unusable files have no whole-file hash: not listed
        if i not in unusable:
            raise ValueError(f"no hash for {files[i].relative_path}")
    if None in hashes.segments:
        raise ValueError(f"no hash for segment {hashes.segments.index(None)}")
    # The catalog reads the recorder's digests as it is encoded, tape after tape: from here on
    # a later pass may only confirm them (a file that changed ends the job before).
    file_hashes, segment_hashes = hashes.files, hashes.segments
    file_hashes.freeze()
    segment_hashes.freeze()
    table = plan.segments
    b64 = _b64
    listed: Sequence[int] = range(len(files))
    if unusable:
        listed = [i for i in listed if i not in unusable]

    # The two big lists are made from these columns when read or encoded, never all held as
    # records (see RecordColumns): as the converter unstructures them, keys in field order.
    # File ids too are made as they are needed: a million held for the whole job cost 77 MB.
    def file_objects(start: int, stop: int) -> list[dict[str, Any]]:
        out = []
        indices = listed[start:stop]
        if isinstance(indices, range):  # no file left out: slices of the columns
            rels, shas = paths_[start:stop], file_hashes[start:stop]
        else:
            rels, shas = [paths_[i] for i in indices], [file_hashes[i] for i in indices]
        picked = array("q", indices)  # once, for both calls into the C extension
        fids, isos = file_ids_of(files, picked), cat.iso_from_ns_at(mtimes, picked)
        for i, fid, rel, sha, iso in zip(indices, fids, rels, shas, isos, strict=True):
            obj = {"file_id": fid, "relative_path": rel,
                   "absolute_path": f"{root}/{rel}", "size_bytes": sizes[i],
                   "sha256": sha, "modified_at": iso,
                   "unix_mode": modes[i], "mtime_ns": mtimes[i]}
            if raws and (raw := raws.get(i)) is not None and (b := b64(raw)) is not None:
                obj["relative_path_b64"] = b
            out.append(obj)
        return out

    def segment_objects(start: int, stop: int) -> list[dict[str, Any]]:
        fids = file_ids_of(files, table.file_index[start:stop])
        return [
            {"segment_id": sid, "file_id": fid, "container_id": cid, "container_offset": co,
             "source_offset": so, "length_bytes": n, "sha256": sha}
            for sid, fid, cid, co, so, n, sha in zip(
                map(cat.segment_id_for, fids, table.part[start:stop]), fids,
                [container_ids[c] for c in table.container_index[start:stop]],
                table.container_offset[start:stop], table.source_offset[start:stop],
                table.length[start:stop], segment_hashes[start:stop], strict=True,
            )
        ]

    # The C extension encodes whole batches of both lists from the columns, where it is built
    # and no path in the batch needs its exact bytes kept (raw_path: the Python way then).
    module = native.MODULE
    raw_indices = sorted(raws)
    ns = cat.FILE_ID_NAMESPACE
    path_data, path_ends = paths_.buffers()

    def has_raw(first: int, last: int) -> bool:
        n = bisect.bisect_left(raw_indices, first)
        return n < len(raw_indices) and raw_indices[n] <= last

    def file_records(start: int, stop: int) -> bytes | None:
        picked = array("q", listed[start:stop])
        if (module is None or not picked or not isinstance(mtimes, array)
                or has_raw(picked[0], picked[-1])):
            return None
        encoded: bytes | None = module.encode_files(
            ns, path_data, path_ends, picked, sizes, mtimes, modes, *file_hashes.buffers(),
            cat.json_string_body(root) + b"/", cat.MIN_US, cat.MAX_US)
        return encoded

    cid_data = "".join(container_ids).encode()
    cid_ends = array("Q", itertools.accumulate(len(c.encode()) for c in container_ids))

    def segment_records(start: int, stop: int) -> bytes | None:
        if (module is None or start >= stop
                or has_raw(table.file_index[start], table.file_index[stop - 1])):
            return None
        encoded: bytes | None = module.encode_segments(
            ns, path_data, path_ends, table.file_index, table.part, table.container_index,
            table.container_offset, table.source_offset, table.length, start, stop,
            cid_data, cid_ends, *segment_hashes.buffers())
        return encoded

    return cat.Catalog(
        backup_set_id=set_id,
        created_at=created_at,
        source_root=root,
        created_by=created_by,
        max_container_size_bytes=plan.container_size_bytes,
        tapes=tuple(
            cat.TapeEntry(tape_ids[t.index], set_id, t.index + 1, plan.capacity_bytes,
                          plan.reserve_bytes, serial)
            for t in plan.tapes
        ),
        containers=tuple(
            cat.ContainerEntry(container_ids[c.index], set_id, tape_ids[c.tape_index],
                               c.index + 1, c.tape_offset, c.size, hashes.containers[c.index])
            for c in plan.containers
        ),
        source_files=cat.RecordColumns(cat.SourceFileEntry, len(listed), file_objects,
                                       file_records),
        segments=cat.RecordColumns(cat.SegmentEntry, len(table), segment_objects,
                                   segment_records, columns={
                                       # Container numbers are the plan's, the containers
                                       # list's order.
                                       "container_id": table.container_index,
                                       "ids": container_ids,
                                       "container_offset": table.container_offset,
                                       "length_bytes": table.length,
                                       "sha256": segment_hashes.buffers(),
                                   }),
        skipped=tuple(sorted(
            (
                *(cat.SkippedEntry(s.relative_path, s.kind, s.reason) for s in plan.skipped),
                *(cat.SkippedEntry(plan.files[i].relative_path, "file", reason, fid)
                  for (i, reason), fid in zip(unusable.items(), file_ids_of(files, unusable),
                                              strict=True)),
            ),
            key=lambda s: s.relative_path.encode(),  # skipped entries keep only the rendering
        )),
        directories=directory_entries(plan.directories),
        symlinks=symlink_entries(plan.symlinks),
    )


def source_root_text(root: Path) -> str:
    """`source_root` as the catalog holds it: readable even if the path is not UTF-8."""
    return paths.display(os.fsencode(root))


def file_ids_of(files: FileTable, indices: Iterable[int] | None = None) -> list[str]:
    """The catalog's file ids of `indices` (default: every file), from the exact bytes of each
    path."""
    if indices is None:
        indices = range(len(files))
    module = native.MODULE
    if module is None:
        return list(map(cat.file_id_for, files.path_bytes_at(indices)))
    picked = (indices if isinstance(indices, array) and indices.typecode == "q"
              else array("q", indices))
    ids: list[str] = module.file_ids(cat.FILE_ID_NAMESPACE, *files.relative_path.buffers(), picked)
    if files.raw_path:  # names that are not UTF-8: their exact bytes, not the rendering
        raw = files.raw_path
        for k, i in enumerate(picked):
            if i in raw:
                ids[k] = cat.file_id_for(raw[i])
    return ids


def _b64(raw: bytes | None) -> str | None:
    return None if raw is None else paths.b64_if_needed(raw)


def directory_entries(dirs: tuple[ScannedDirectory, ...]) -> tuple[cat.DirectoryEntry, ...]:
    return tuple(cat.DirectoryEntry(d.relative_path, d.mode, d.mtime_ns, _b64(d.raw_path))
                 for d in dirs)


def symlink_entries(links: tuple[ScannedSymlink, ...]) -> tuple[cat.SymlinkEntry, ...]:
    return tuple(
        cat.SymlinkEntry(s.relative_path, paths.display(s.target), s.mtime_ns,
                         _b64(s.raw_path), paths.b64_if_needed(s.target))
        for s in links
    )


def catalog_measurer(codec: cat.CatalogCodec, created_by: str) -> Callable[[Plan], int]:
    """A `measure_catalog` for make_plan: the size of the plan's catalog with placeholders."""

    def measure(plan: Plan) -> int:
        placeholder = build_catalog(
            plan, Hashes.placeholders(plan), set_id=PLACEHOLDER_SET_ID,
            created_at=PLACEHOLDER_CREATED_AT, created_by=created_by,
            serial=cat.PLACEHOLDER_VOLUME_SERIAL,
        )
        return cat.encoded_size(codec, placeholder)

    return measure


#: Bytes `"relative_path_b64":""` and its comma add to a record.
_B64_KEY = len(b',"relative_path_b64":""')


def _digits(n: int) -> int:
    return len(str(n))


def _digit_total(numbers: Iterable[int]) -> int:
    """The characters of all `numbers` written in decimal, a minus sign included."""
    module = native.MODULE
    if module is not None and isinstance(numbers, array) and numbers.typecode in "qQ":
        total: int = module.digit_total(numbers)
        return total
    return sum(map(len, map(str, numbers)))


class JsonPlanSizer:
    """The exact size `JsonCatalogCodec` gives the catalog of a plan, without building it.

    Measuring by building and encoding the placeholder catalog costs ~13 µs a record, and the
    reserve search measures several times: too slow for a million files. Every record here is a
    template of known size plus the widths of its variable fields (decimal integers, escaped
    strings), which is how the codec encodes them; the file records, which do not change between
    rounds, are summed once. tests/test_plan.py checks it against `catalog_measurer`.
    """

    def __init__(self, codec: cat.JsonCatalogCodec, created_by: str) -> None:
        self.codec = codec
        self.created_by = created_by
        self._files_key: FileTable | None = None
        self._files_bytes = 0
        self._tree_key: tuple[object, object] | None = None
        self._tree_bytes = 0
        sid = PLACEHOLDER_SET_ID
        sha = cat.PLACEHOLDER_SHA256
        fid = cat.file_id_for("x")
        self._tape = codec.record_size(cat.TapeEntry(cat.tape_id_for(sid, 1), sid, 0, 0, 0,
                                                     cat.PLACEHOLDER_VOLUME_SERIAL))
        self._container = codec.record_size(
            cat.ContainerEntry(cat.container_id_for(sid, 1), sid, cat.tape_id_for(sid, 1), 0, 0,
                               0, sha))
        self._segment = codec.record_size(
            cat.SegmentEntry(cat.segment_id_for(fid, 1), fid, cat.container_id_for(sid, 1), 0, 0,
                             0, sha))

    def _file_records(self, plan: Plan) -> int:
        if self._files_key is not plan.files:
            root = source_root_text(plan.source_root)
            template = self.codec.record_size(
                cat.SourceFileEntry(cat.file_id_for("x"), "x", f"{root}/x", 0,
                                    cat.PLACEHOLDER_SHA256, cat.iso_from_ns(0), 0, 0))
            fixed = template - 2 * self.codec.string_size("x") - 3  # the three zeros
            files = plan.files
            names = files.relative_path
            module = native.MODULE
            escaped = (module.json_strings_size(*names.buffers()) if module is not None
                       else None)
            if escaped is None:
                escaped = sum(
                    self.codec.strings_size(names[i:i + 65536])
                    for i in range(0, len(names), 65536)  # a slice at a time: bounded memory
                )
            total = len(files) * fixed + 2 * escaped
            total += _digit_total(files.size) + _digit_total(files.mode)
            total += _digit_total(files.mtime_ns)
            raw_lengths = [len(raw) for raw in files.raw_path.values()]
            total += len(raw_lengths) * _B64_KEY + sum(map(paths.b64_size, raw_lengths))
            self._files_key, self._files_bytes = plan.files, total
        return self._files_bytes

    def _tree_records(self, plan: Plan) -> int:
        """Bytes of the directory and symlink lists; they do not depend on the layout."""
        key = (plan.directories, plan.symlinks)
        old = self._tree_key
        if old is None or old[0] is not key[0] or old[1] is not key[1]:
            size = self.codec.record_size
            dirs = directory_entries(plan.directories)
            links = symlink_entries(plan.symlinks)
            self._tree_bytes = (
                self.codec.list_size(sum(size(d) for d in dirs), len(dirs))
                + self.codec.list_size(sum(size(s) for s in links), len(links))
            )
            self._tree_key = key
        return self._tree_bytes

    def __call__(self, plan: Plan) -> int:
        codec = self.codec
        empty = cat.Catalog(
            backup_set_id=PLACEHOLDER_SET_ID, created_at=PLACEHOLDER_CREATED_AT,
            source_root=source_root_text(plan.source_root), tapes=(), containers=(),
            source_files=(), segments=(), created_by=self.created_by,
            max_container_size_bytes=plan.container_size_bytes,
            skipped=tuple(cat.SkippedEntry(s.relative_path, s.kind, s.reason)
                          for s in plan.skipped),
        )
        size = cat.encoded_size(codec, empty) + self._tree_records(plan)
        tapes = sum(
            self._tape + max(3, _digits(t.index + 1)) - 3 + _digits(t.index + 1) - 1
            + _digits(plan.capacity_bytes) - 1 + _digits(plan.reserve_bytes) - 1
            for t in plan.tapes
        )
        containers = sum(
            self._container + max(5, _digits(c.index + 1)) - 5
            + max(3, _digits(c.tape_index + 1)) - 3 + _digits(c.index + 1) - 1
            + _digits(c.tape_offset) - 1 + _digits(c.size) - 1
            for c in plan.containers
        )
        table = plan.segments
        # Summed a column at a time (map runs in C): a million segments per reserve round.
        segments = len(table) * (self._segment - 3) + sum(
            _digit_total(column)
            for column in (table.container_offset, table.source_offset, table.length)
        )
        # Parts and container numbers take at least 3 and 5 digits: count only the wider ones.
        if table.part and max(table.part) >= 1000:
            segments += sum(_digits(p) - 3 for p in table.part if p >= 1000)
        if table.container_index and max(table.container_index) + 1 >= 100_000:
            segments += sum(_digits(c + 1) - 5 for c in table.container_index if c + 1 >= 100_000)
        return (
            size
            + codec.list_size(tapes, len(plan.tapes))
            + codec.list_size(containers, len(plan.containers))
            + codec.list_size(self._file_records(plan), len(plan.files))
            + codec.list_size(segments, len(plan.segments))
        )
