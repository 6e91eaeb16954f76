"""Restore files from a backup set: tape by tape, container by container, front to back.

Every file is written under a temporary name in its final directory and takes its final name
only once each segment's and the whole file's SHA-256 match the catalog. Paths from the catalog
are untrusted: absolute paths, `..`, and symlinks inside the target are refused, and every file
is created relative to directory descriptors opened without following links, so nothing is ever
written outside the target, and a path of any length works. Names are the catalog's exact bytes.
Once the files are written, symlinks are created (never followed, not even those just made), and
last the directories get their modes and mtimes, deepest first, so that writing into them does
not change them and a read-only directory does not stop the restore of its contents. Problems
are reported per entry and the rest goes on.
"""

from __future__ import annotations

import bisect
import contextlib
import errno
import fcntl
import fnmatch
import functools
import glob
import hashlib
import mmap
import os
import re
import stat
import threading
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import attrs
import trio

from ltoflow import paths
from ltoflow.buffers import BufferLease, PipelineBuffer, pass_on
from ltoflow.catalog import (
    Catalog,
    ContainerEntry,
    DirectoryEntry,
    SegmentEntry,
    SkippedEntry,
    SourceFileEntry,
    SymlinkEntry,
    TapeEntry,
)
from ltoflow.clock import Clock
from ltoflow.drives import LoadedTape, TapeDrive, TapeRequest
from ltoflow.errors import BackupError, TargetFullError, UsageError, leaves
from ltoflow.operator import Operator
from ltoflow.paths import SHORT_PATH_BYTES, DirFds
from ltoflow.progress import Note, NullReporter, ReadMeter, Reporter, reporting
from ltoflow.tapes import Check, TapeHolder, check_member_of
from ltoflow.units import MiB
from ltoflow.verify import READ_AHEAD, READ_CHUNK_BYTES, read_pool

#: A gap between wanted ranges larger than this is skipped with a seek instead of read through.
SEEK_GAP_BYTES = 64 * MiB
TEMP_PREFIX = ".ltoflow-restore-"


@attrs.frozen
class FileProblem:
    relative_path: str
    what: str

    def describe(self) -> str:
        """One line: the name's control characters (a newline) escaped."""
        return f"{paths.shown(self.relative_path)}: {self.what}"


@attrs.define
class _FileJob:
    """One file being restored; private to the restore writer."""

    entry: SourceFileEntry
    parts: tuple[bytes, ...]
    segments: list[SegmentEntry]
    remaining: int  # segments still to come
    fd: int = -1
    temp_name: str = ""
    whole: Any = attrs.field(factory=hashlib.sha256)
    in_order: bool = True
    next_offset: int = 0
    failed: bool = False
    done: bool = False


@attrs.frozen
class _Range:
    """Bytes of one segment to read from a container and write into a file."""

    job: int
    segment: SegmentEntry

    @property
    def start(self) -> int:
        return self.segment.container_offset

    @property
    def end(self) -> int:
        return self.segment.container_offset + self.segment.length_bytes


@attrs.frozen
class _TreeJob:
    """A symlink or directory to restore, with its checked path."""

    entry: SymlinkEntry | DirectoryEntry
    parts: tuple[bytes, ...]
    #: A symlink the target holds already, pointing where the backup's did: only its time is
    #: set (as a file's is when its bytes are there).
    there: bool = False


@attrs.frozen
class RestorePlan:
    """What a restore will do: the files, the tapes in order, the bytes to read; then the
    symlinks and the directories."""

    catalog: Catalog
    jobs: tuple[_FileJob, ...]
    tapes: tuple[TapeEntry, ...]
    ranges: dict[str, list[_Range]]  # container id -> ranges sorted by offset
    containers: dict[str, ContainerEntry]
    problems: tuple[FileProblem, ...]
    bytes_to_read: int
    symlinks: tuple[_TreeJob, ...] = ()
    directories: tuple[_TreeJob, ...] = ()
    #: Selected files, whether they can be restored or not.
    requested_files: int = 0
    #: Entries the backup skipped that the patterns select: listed, never restored.
    skipped: tuple[SkippedEntry, ...] = ()
    #: Selected files the target already holds, identical (an interrupted restore's): left be.
    present: int = 0
    #: Those of them whose bytes are the backup's but not their mode or mtime (copied back by
    #: hand, say): given the backup's by the restore (a dry run changes nothing).
    retouch: tuple[tuple[SourceFileEntry, tuple[bytes, ...]], ...] = ()
    #: Temporary files that earlier restores, killed outright, left where this one writes.
    leftovers: tuple[tuple[bytes, ...], ...] = ()

    @property
    def files(self) -> int:
        return self.requested_files


@attrs.frozen
class RestoreReport:
    requested: int
    restored: int
    bytes_restored: int
    seconds: float
    tapes: tuple[str, ...]
    problems: tuple[FileProblem, ...]
    bytes_to_read: int = 0
    dry_run: bool = False
    symlinks_restored: int = 0
    directories_restored: int = 0
    #: Selected entries the backup skipped (not on tape, or their bytes unusable): not restored.
    skipped: tuple[SkippedEntry, ...] = ()
    #: Selected files already in the target, identical to the backup (read and hashed to
    #: tell): not restored again.
    already_present: int = 0
    #: The tapes of `tapes` (those needed) that were loaded and read.
    tapes_read: tuple[str, ...] = ()
    #: Of `already_present`, those given the backup's mode and mtime (their bytes were its;
    #: in a dry run, those that would be).
    retouched: int = 0
    #: Temporary files of earlier restores killed outright (their processes gone), removed
    #: from the directories this one writes in (in a dry run, those that would be).
    leftovers_removed: int = 0

    @property
    def ok(self) -> bool:
        if self.dry_run:
            return not self.problems
        return not self.problems and self.restored + self.already_present == self.requested

    @classmethod
    def from_plan(cls, plan: RestorePlan) -> RestoreReport:
        """What a dry run reports: the plan, nothing restored."""
        return cls(plan.files, 0, 0, 0.0, tuple(t.tape_id for t in plan.tapes), plan.problems,
                   plan.bytes_to_read, dry_run=True, skipped=plan.skipped,
                   already_present=plan.present, retouched=len(plan.retouch),
                   leftovers_removed=len(plan.leftovers))


def safe_parts(relative_path: bytes) -> tuple[bytes, ...] | None:
    """The path's components, or None when it could leave the target directory."""
    if not relative_path or relative_path.startswith(b"/") or b"\0" in relative_path:
        return None
    parts = tuple(relative_path.split(b"/"))
    if any(p in (b"", b".", b"..") for p in parts):
        return None
    return parts


@attrs.frozen
class Selection:
    """What patterns select from a catalog, each list in catalog order."""

    files: list[SourceFileEntry]
    directories: list[DirectoryEntry]
    symlinks: list[SymlinkEntry]
    unmatched: list[str]  # patterns that match nothing


def _exact(entry: SourceFileEntry | DirectoryEntry | SymlinkEntry) -> bytes:
    """The exact path; a damaged base64 falls back to the text (plan_restore refuses it)."""
    try:
        return entry.path_bytes
    except ValueError:
        return entry.relative_path.encode()


def select(catalog: Catalog, patterns: Sequence[str]) -> Selection:
    """Entries matching any pattern (exact path, directory, or glob), and patterns matching
    none. A pattern matches a path's exact bytes (as the shell passes an odd name) or its
    readable rendering in the catalog; one that is the very name of an entry (`Photos [2019]`)
    means that entry only, not also what it matches as a glob (`Photos 1`); one that matches
    nothing so matches names as `catalog ls` shows them (a newline as `\\n`)."""
    if not patterns:
        return Selection(list(catalog.source_files), list(catalog.directories),
                         list(catalog.symlinks), [])
    entries = (catalog.source_files, catalog.directories, catalog.symlinks)

    def is_a_name(p: str) -> bool:
        if not any(ch in p for ch in "*?["):  # not a glob: nothing to tell apart
            return False
        try:
            p.encode("utf-8")  # a name of valid UTF-8 is its own rendering
        except UnicodeEncodeError:  # bytes the shell passed as they are: compare those
            pb = os.fsencode(p)
            return any(_exact(e) == pb for kind in entries for e in kind)
        return any(e.relative_path == p for kind in entries for e in kind)

    tests: list[tuple[str, bytes, re.Pattern[str], re.Pattern[bytes]]] = []
    for p in map(_relative, patterns):
        as_glob = glob.escape(p) if is_a_name(p) else p
        tests.append((p, os.fsencode(p), _glob_or_under(as_glob), _glob_or_under_bytes(as_glob)))
    found: set[int] = set()
    # Patterns that are the exact bytes of an entry's path (or of a directory above one): they
    # mean those entries only, not also a path whose readable rendering they equal (a name
    # written `\xff` in four characters, beside one of the single byte 0xff).
    exact = 0  # a bit for each such pattern

    def chosen[E: (SourceFileEntry, DirectoryEntry, SymlinkEntry)](
            kind: Sequence[E]) -> list[tuple[E, bool, int]]:
        """The entries selected, each with whether a pattern took it by its exact bytes, and
        a bit for each pattern that took it otherwise."""
        nonlocal exact
        out = []
        for e in kind:
            text, raw = e.relative_path, _exact(e)
            by_bytes, by_text = False, 0
            for n, (p, pb, rx, rxb) in enumerate(tests):
                if raw == pb or raw.startswith(pb + b"/"):
                    exact |= 1 << n
                    found.add(n)
                    by_bytes = True
                elif (text == p or text.startswith(p + "/") or rx.match(text)
                        or rxb.match(raw)):
                    found.add(n)
                    by_text |= 1 << n
            if by_bytes or by_text:
                out.append((e, by_bytes, by_text))
        return out

    def kept[E: (SourceFileEntry, DirectoryEntry, SymlinkEntry)](
            hits: list[tuple[E, bool, int]]) -> list[E]:
        """Those taken by their bytes, or by a pattern that is no exact name."""
        return [e for e, by_bytes, by_text in hits if by_bytes or by_text & ~exact]

    def shown_too[E: (SourceFileEntry, DirectoryEntry, SymlinkEntry)](
            kind: Sequence[E], out: list[E], rest: list[int]) -> list[E]:
        """`out` and the entries the patterns `rest` select as `catalog ls` shows them."""
        more: set[int] = set()
        for e in kind:
            if not e.relative_path.isprintable():
                seen = paths.shown(e.relative_path)
                for n in rest:
                    p, _, rx, _ = tests[n]
                    if seen == p or seen.startswith(p + "/") or rx.match(seen):
                        found.add(n)
                        more.add(id(e))
        if not more:
            return out
        more.update(map(id, out))
        return [e for e in kind if id(e) in more]

    hits = (chosen(catalog.source_files), chosen(catalog.directories), chosen(catalog.symlinks))
    files, dirs, links = kept(hits[0]), kept(hits[1]), kept(hits[2])
    rest = [n for n in range(len(tests)) if n not in found]
    if rest:  # as `catalog ls` shows the names (to be copied from there): seldom needed
        files = shown_too(catalog.source_files, files, rest)
        dirs = shown_too(catalog.directories, dirs, rest)
        links = shown_too(catalog.symlinks, links, rest)
    unmatched = [pattern for n, pattern in enumerate(patterns) if n not in found]
    return Selection(files, dirs, links, unmatched)


def _matches(relative_path: str, pattern: str) -> bool:
    """A skipped entry keeps only the readable rendering of its path: a pattern matches it as
    given or rendered the same way (the exact bytes of an odd name, as the shell passes it)."""
    seen = paths.shown(relative_path)  # as `catalog ls` shows it
    for pat in {pattern, paths.display(os.fsencode(pattern))}:
        p = _relative(pat)
        for name in {relative_path, seen}:
            if name == p or name.startswith(p + "/") or _glob_or_under(p).match(name):
                return True
    return False


@functools.lru_cache(maxsize=256)
def _glob_or_under(pattern: str) -> re.Pattern[str]:
    """What the glob matches, and everything under a directory it matches (`case-00[12]`
    selects those directories' files, as `case-001` does, and as the recovery kit does)."""
    translated = fnmatch.translate(pattern)
    end = translated[-2:]  # the anchor at its end: \Z, or \z from Python 3.14 on
    if end not in (r"\Z", r"\z"):
        raise AssertionError(f"fnmatch.translate gave {translated!r}: no end anchor to extend")
    return re.compile(translated[:-2] + r"(?s:/.*)?\Z")


@functools.lru_cache(maxsize=256)
def _glob_or_under_bytes(pattern: str) -> re.Pattern[bytes]:
    """_glob_or_under for a path's exact bytes (the pattern's own, as the shell passed them)."""
    text = os.fsencode(pattern).decode("latin-1")  # as fnmatch takes bytes: one char a byte
    return re.compile(_glob_or_under(text).pattern.encode("latin-1"))


def _relative(pattern: str) -> str:
    """A pattern as the catalog's relative paths are written: `./case-1/` is `case-1`."""
    p = pattern.strip("/")
    while p.startswith("./"):
        p = p[2:].lstrip("/")
    return "" if p == "." else p


def select_skipped(catalog: Catalog, patterns: Sequence[str]) -> list[SkippedEntry]:
    """The skipped entries that the patterns (all when none) select."""
    return [s for s in catalog.skipped
            if not patterns or any(_matches(s.relative_path, p) for p in patterns)]


def _tree_parts(entry: SymlinkEntry | DirectoryEntry,
                problems: list[FileProblem]) -> tuple[bytes, ...] | None:
    """A link's or directory's path as safe parts, or None with why it is refused recorded."""
    try:
        parts = safe_parts(entry.path_bytes)
        if isinstance(entry, SymlinkEntry):
            _ = entry.target_bytes  # a target that does not decode is refused as well
    except ValueError as e:
        problems.append(FileProblem(entry.relative_path, f"refused: {e}"))
        return None
    if parts is None:
        problems.append(FileProblem(
            entry.relative_path, "refused: the path is absolute or leaves the target (..)"))
    return parts


def plan_restore(
    catalog: Catalog, patterns: Sequence[str], target: Path, *, overwrite: bool,
    meter: ReadMeter | None = None, opened: OpenedUp | None = None,
) -> RestorePlan:
    """Check every selected file against the catalog and the target; order the reads.
    `meter` counts the bytes of the files already in the target as they are compared;
    `opened` opens up, first, the target's directories the restore must enter or write in."""
    chosen = select(catalog, patterns)
    files = chosen.files
    skipped = select_skipped(catalog, patterns)
    unmatched = [p for p in chosen.unmatched
                 if not any(_matches(s.relative_path, p) for s in skipped)]
    if unmatched:
        raise UsageError(
            f"nothing in the catalog matches {', '.join(map(repr, unmatched))}; "
            "see `ltoflow catalog ls`"
        )
    containers = {c.container_id: c for c in catalog.containers}
    tapes = {t.tape_id: t for t in catalog.tapes}
    by_file: dict[str, list[SegmentEntry]] = defaultdict(list)
    wanted = {f.file_id for f in files}
    for s in catalog.segments:
        if s.file_id in wanted:
            by_file[s.file_id].append(s)
    jobs: list[_FileJob] = []
    exists = _Existing(target)
    problems: list[FileProblem] = []
    ranges: dict[str, list[_Range]] = defaultdict(list)
    needed_tapes: set[str] = set()
    total = 0
    present = 0
    id_counts: dict[str, int] = defaultdict(int)
    for f in catalog.source_files:
        id_counts[f.file_id] += 1
    checked: list[tuple[SourceFileEntry, tuple[bytes, ...], list[SegmentEntry]]] = []
    for f in files:
        try:
            parts = safe_parts(f.path_bytes)
        except ValueError as e:
            problems.append(FileProblem(f.relative_path, f"refused: {e}"))
            continue
        if id_counts[f.file_id] > 1:
            problems.append(FileProblem(
                f.relative_path, f"refused: its file_id {f.file_id} is shared with another "
                "file in the catalog, so its segments are ambiguous"))
            continue
        if parts is None:
            problems.append(FileProblem(
                f.relative_path, "refused: the path is absolute or leaves the target (..)"))
            continue
        segs = sorted(by_file.get(f.file_id, []), key=lambda s: s.source_offset)
        why = _check_segments(f, segs, containers, tapes)
        if why is not None:
            problems.append(FileProblem(f.relative_path, why))
            continue
        checked.append((f, parts, segs))
    leftovers: list[tuple[bytes, ...]] = []
    if _has_entries(target):  # a restore run again, say (a new target has nothing to look at)
        holders = set(_holders([parts for _, parts, _ in checked], chosen))
        if opened is not None:
            opened.open_up(holders)
        leftovers = _leftover_temps(target, holders, partial(_named_like_temps, catalog))
    # Files already in the target (an interrupted restore's, say) are read to compare them,
    # with --overwrite too (an identical one need not come from tape again): that can be
    # hours of reading, so it is counted for `meter`.
    there = [k for k, (_, parts, _) in enumerate(checked) if exists(parts)]
    if meter is not None:
        meter.total_bytes = sum(checked[k][0].size_bytes for k in there)
    differs = {k: _differs(target, checked[k][1], checked[k][0], meter) for k in there}
    retouch: list[tuple[SourceFileEntry, tuple[bytes, ...]]] = []
    for k, (f, parts, segs) in enumerate(checked):
        if k in differs:
            if differs[k] is None or differs[k] is _RETOUCH:  # restored before, whole
                present += 1
                if differs[k] is _RETOUCH:
                    retouch.append((f, parts))
                continue
            if not overwrite:
                problems.append(FileProblem(
                    f.relative_path, f"already exists in the target and {differs[k]}; use "
                    "--overwrite to replace it"))
                continue
        job = len(jobs)
        jobs.append(_FileJob(f, parts, segs, len(segs)))
        for s in segs:
            ranges[s.container_id].append(_Range(job, s))
            needed_tapes.add(containers[s.container_id].tape_id)
            total += s.length_bytes
    for rs in ranges.values():
        rs.sort(key=lambda r: (r.start, r.end))
    links: list[_TreeJob] = []
    for link in chosen.symlinks:
        parts = _tree_parts(link, problems)
        if parts is None:
            continue
        if not overwrite and exists(parts):
            if _same_link(target, parts, link.target_bytes):  # made before
                links.append(_TreeJob(link, parts, there=True))
            else:
                problems.append(FileProblem(
                    link.relative_path, "already exists in the target and differs from the "
                    "backup; use --overwrite to replace it"))
        else:
            links.append(_TreeJob(link, parts))
    dirs: list[_TreeJob] = []
    for d in chosen.directories:
        parts = _tree_parts(d, problems)
        if parts is not None:
            dirs.append(_TreeJob(d, parts))
    return RestorePlan(
        catalog=catalog,
        jobs=tuple(jobs),
        tapes=tuple(sorted((tapes[t] for t in needed_tapes), key=lambda t: t.sequence_number)),
        ranges=dict(ranges),
        containers=containers,
        problems=tuple(problems),
        bytes_to_read=total,
        symlinks=tuple(links),
        directories=tuple(dirs),
        requested_files=len(files),
        skipped=tuple(skipped),
        present=present,
        retouch=tuple(retouch),
        leftovers=tuple(leftovers),
    )


def _has_entries(target: Path) -> bool:
    try:
        with os.scandir(target) as entries:
            return next(entries, None) is not None
    except OSError:
        return False  # not there yet (or not usable: the restore says so)


#: The temporary names of ltoflow's restore (`<pid>-<n>`) and of the recovery kit (`.tmp`).
_TEMP_NAME = re.compile(re.escape(TEMP_PREFIX.encode()) + rb"([0-9]{1,10})-[0-9]+(\.tmp)?")


def _leftover_temps(target: Path, holders: Iterable[tuple[bytes, ...]],
                    held_by_set: Callable[[], set[tuple[bytes, ...]]],
                    ) -> list[tuple[bytes, ...]]:
    """The temporary files in these directories of the target whose restore is gone: killed
    outright (kill -9, a second Ctrl-C, a crash), it could not remove them. A restore still
    running (its process is there) keeps its own. Only what surely is one is taken: a file of
    such a name that the set holds (`held_by_set()`: a restore target backed up, say), or with
    any mode bit beyond 0600 (a temporary file is made 0600), is someone's file."""
    found: list[tuple[bytes, ...]] = []
    held: set[tuple[bytes, ...]] | None = None
    with _dirs_under(target) as dirs:  # the way there takes search permission only
        for parts in sorted(set(holders)):
            try:
                where = dirs.open(parts)
                listed = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=where)
            except OSError:
                continue  # not there, or not a directory: nothing of a restore's in it
            try:
                with os.scandir(listed) as entries:
                    names = [os.fsencode(e.name) for e in entries
                             if e.name.startswith(TEMP_PREFIX) and e.is_file(follow_symlinks=False)
                             and not e.stat(follow_symlinks=False).st_mode & ~0o600 & 0o7777]
            except OSError:
                continue
            finally:
                os.close(listed)
            for name in names:
                m = _TEMP_NAME.fullmatch(name)
                if m is None or _running(int(m[1])) or _locked(where, name):
                    continue
                if held is None:
                    held = held_by_set()
                if (*parts, name) not in held:
                    found.append((*parts, name))
    return found


def _named_like_temps(catalog: Catalog) -> set[tuple[bytes, ...]]:
    """The paths of the set's entries whose names begin as a restore's temporary files do."""
    held: set[tuple[bytes, ...]] = set()
    for entries in (catalog.source_files, catalog.directories, catalog.symlinks):
        for e in entries:
            if TEMP_PREFIX in e.relative_path:  # the rendering: the prefix is plain ASCII
                with contextlib.suppress(ValueError):
                    parts = safe_parts(e.path_bytes)
                    if parts is not None:
                        held.add(parts)
    return held


def _locked(dir_fd: int, name: bytes) -> bool:
    """Whether a restore holds this temporary file's lock: it is writing it, in whatever pid
    namespace (a container's pids are not this one's). A file this user may not open is
    taken to be in use too."""
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                     dir_fd=dir_fd)
    except OSError:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        os.close(fd)  # and its lock with it
    return False


def _running(pid: int) -> bool:
    """Whether process `pid` is there (any other, whoever runs it). This one has made no
    temporary file yet when this is asked: its pid on a leftover is an earlier process's (in
    a container, pid 1 every time)."""
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except PermissionError:  # another user's
        return True
    except (ProcessLookupError, OverflowError):  # gone; or no pid can be that large
        return False
    return True


def _holders(files: Sequence[tuple[bytes, ...]],
             chosen: Selection) -> Iterator[tuple[bytes, ...]]:
    """The directories a restore makes entries in: each file's and link's, and each directory
    itself (given the backup's mode); refused paths are left out."""
    yield from (parts[:-1] for parts in files)
    entries: list[SymlinkEntry | DirectoryEntry] = [*chosen.symlinks, *chosen.directories]
    for entry in entries:
        try:
            parts = safe_parts(entry.path_bytes)
        except ValueError:
            continue
        if parts is not None:
            yield parts if isinstance(entry, DirectoryEntry) else parts[:-1]


def _check_segments(
    f: SourceFileEntry,
    segs: Sequence[SegmentEntry],
    containers: dict[str, ContainerEntry],
    tapes: dict[str, TapeEntry],
) -> str | None:
    """Why this file's segments cannot rebuild it, or None when they tile it exactly."""
    offset = 0
    for s in segs:
        c = containers.get(s.container_id)
        if c is None:
            return f"segment {s.segment_id} names container {s.container_id}, not in the catalog"
        if c.tape_id not in tapes:
            return f"container {c.container_id} is on tape {c.tape_id}, not in the catalog"
        if s.length_bytes <= 0 or s.container_offset < 0:
            return f"segment {s.segment_id} has an invalid offset or length"
        if s.container_offset + s.length_bytes > c.size_bytes:
            return f"segment {s.segment_id} lies beyond the end of container {c.container_id}"
        if s.source_offset != offset:
            kind = "overlap" if s.source_offset < offset else "leave a gap"
            return f"segments {kind} at byte {min(offset, s.source_offset)}"
        offset += s.length_bytes
    if offset != f.size_bytes:
        return f"segments add up to {offset} bytes, the file has {f.size_bytes}"
    return None


@contextlib.contextmanager
def _parent_of(target: Path | bytes, parts: tuple[bytes, ...]) -> Iterator[int]:
    """The descriptor of the directory that holds `parts` under `target`, reached one
    component at a time, no symlink followed; OSError when it cannot be."""
    with _dirs_under(target) as dirs:
        yield dirs.open(parts[:-1])


def _exists(target: Path, parts: tuple[bytes, ...]) -> bool:
    root = os.fsencode(target)
    if len(root) + sum(len(p) + 1 for p in parts) < SHORT_PATH_BYTES:
        return os.path.lexists(os.path.join(root, *parts))
    try:
        with _parent_of(root, parts) as parent:
            os.lstat(parts[-1], dir_fd=parent)
    except OSError:
        return False
    return True


#: _differs: the file's bytes are the backup's, its mode or mtime not.
_RETOUCH = "its bytes are the backup's, its mode or modification time not"


def _differs(target: Path, parts: tuple[bytes, ...], entry: SourceFileEntry,
             meter: ReadMeter | None = None) -> str | None:
    """None when the target already holds this file whole, as a restore leaves it (an
    interrupted one, run again): a regular file (no symlink followed on the way) of its size
    whose SHA-256 is the catalog's (it is read to tell), with its mode and mtime; _RETOUCH
    when only those differ; else how it differs. `meter` counts its bytes as they are read,
    and the rest of its size once told."""
    counted = 0
    try:
        with _parent_of(target, parts) as parent:
            st = os.lstat(parts[-1], dir_fd=parent)  # a device is never opened
            if not stat.S_ISREG(st.st_mode):
                return "is not a regular file"
            if st.st_size != entry.size_bytes:
                return "differs from the backup (its size)"
            with open(_open_to_compare(parent, parts[-1], st), "rb", buffering=0) as fh:
                if not os.path.samestat(st, os.fstat(fh.fileno())):  # replaced meanwhile
                    return "changed while it was compared"
                h = hashlib.sha256()
                buf = bytearray(min(MiB, entry.size_bytes + 1))  # one read for a small file
                while n := fh.readinto(buf):
                    h.update(memoryview(buf)[:n])
                    if meter is not None:
                        meter.done_bytes += n
                        counted += n
                if h.hexdigest() != entry.sha256:
                    return "differs from the backup (its SHA-256)"
            if (_mtime_ns(entry) not in (None, st.st_mtime_ns)
                    or stat.S_IMODE(st.st_mode) != stat.S_IMODE(entry.unix_mode)):
                return _RETOUCH
    except OSError as e:
        return f"cannot be read to compare ({e.strerror})"
    finally:  # the rest of it, not read (different, unreadable, or grown)
        if meter is not None:
            meter.done_bytes += max(0, entry.size_bytes - counted)
    return None


def _open_to_compare(parent: int, name: bytes, st: os.stat_result) -> int:
    """`name` opened to read it, no symlink followed. A file of this user's it may not read
    (an earlier restore gave it the backup's mode 000) is given owner read for the moment of
    the open, and its mode back at once: the descriptor keeps the right to read."""
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        return os.open(name, flags, dir_fd=parent)
    except PermissionError:
        if st.st_uid != os.geteuid():
            raise
    paths.chmod_nofollow(parent, name, stat.S_IMODE(st.st_mode) | 0o400)
    try:
        return os.open(name, flags, dir_fd=parent)
    finally:
        paths.chmod_nofollow(parent, name, stat.S_IMODE(st.st_mode))


def _same_link(target: Path, parts: tuple[bytes, ...], points_to: bytes) -> bool:
    """Whether the target already holds this symlink, pointing where the backup's did."""
    try:
        with _parent_of(target, parts) as parent:
            return os.readlink(parts[-1], dir_fd=parent) == points_to
    except OSError:
        return False


class _Existing:
    """Whether a path exists under the target (as _exists says), with every directory looked
    up at most once: below one that does not exist nothing can, so a restore into a new or
    empty target looks up each directory, not each file (100,000 files: 1.8 s of lstat on the
    benchmark's VM)."""

    def __init__(self, target: Path) -> None:
        self.target = target
        self._absent: dict[tuple[bytes, ...], bool] = {}

    def __call__(self, parts: tuple[bytes, ...]) -> bool:
        return not self._dir_absent(parts[:-1]) and _exists(self.target, parts)

    def _dir_absent(self, parts: tuple[bytes, ...]) -> bool:
        absent = self._absent.get(parts)
        if absent is None:
            absent = False
            for k in range(len(parts) + 1):  # from the target down
                prefix = parts[:k]
                known = self._absent.get(prefix)
                if known is None:
                    known = self._absent[prefix] = not (
                        _exists(self.target, prefix) if prefix
                        else os.path.lexists(self.target))
                if known:
                    absent = True
                    break
            self._absent[parts] = absent
        return absent


class OpenedUp:
    """Directories of the target that this user owns but cannot enter or write in: an earlier
    restore gave them the backup's mode (0o555, 0o000), and a second run (with a tape that was
    missing, or after files were removed) must make files in them again. They are opened up
    for the run (owner rwx added), and their modes put back at its end, but for those the run
    gives the backup's mode itself (`settled`). Another user's directory is left as it is (its
    files fail, saying why). Thread-safe: a comparison abandoned on Ctrl-C, still running,
    opens up nothing once put_back has run."""

    def __init__(self, target: Path) -> None:
        self.target = target
        self.modes: dict[tuple[bytes, ...], int] = {}  # opened up: its mode before
        self._lock = threading.Lock()
        self._closed = False

    def open_up(self, holders: Iterable[tuple[bytes, ...]]) -> None:
        """Open up what needs it of the directories `holders` (owner rwx) and of every
        directory above them (owner search only: each must be entered to reach the next), from
        the target down."""
        holding = set(holders)
        wanted: set[tuple[bytes, ...]] = set()
        for parts in holding:
            wanted.update(parts[:k] for k in range(1, len(parts) + 1))
        if not wanted:
            return
        euid = os.geteuid()
        with _dirs_under(self.target) as dirs:
            gone: set[tuple[bytes, ...]] = set()  # absent, or no directory to open up
            for parts in sorted(wanted, key=len):
                if parts[:-1] in gone:
                    gone.add(parts)
                    continue
                try:
                    st = os.lstat(parts[-1], dir_fd=dirs.open(parts[:-1]))
                except OSError:
                    gone.add(parts)
                    continue
                need = 0o700 if parts in holding else 0o100
                if not stat.S_ISDIR(st.st_mode):
                    gone.add(parts)
                elif st.st_uid == euid and st.st_mode & need != need:
                    with self._lock:
                        if self._closed:
                            return
                        try:
                            paths.chmod_nofollow(dirs.open(parts[:-1]), parts[-1],
                                                 stat.S_IMODE(st.st_mode) | need)
                        except OSError:  # what is then made in it fails, saying why
                            continue
                        self.modes[parts] = stat.S_IMODE(st.st_mode)

    def settled(self, parts: tuple[bytes, ...]) -> None:
        """The run gave this directory the backup's mode: not to be put back."""
        with self._lock:
            self.modes.pop(parts, None)

    def put_back(self, only: Iterable[tuple[bytes, ...]] | None = None) -> list[FileProblem]:
        """Give the directories opened up (`only` those, or all and open up no more) their
        modes back, deepest first; what could not be put back, as problems."""
        with self._lock:
            if only is None:
                self._closed = True
                back, self.modes = self.modes, {}
            else:
                back = {p: self.modes.pop(p) for p in only if p in self.modes}
        problems: list[FileProblem] = []
        if not back:
            return problems
        try:
            with _dirs_under(self.target) as dirs:
                for parts in sorted(back, key=len, reverse=True):
                    try:
                        paths.chmod_nofollow(dirs.open(parts[:-1]), parts[-1], back[parts])
                    except OSError as e:
                        problems.append(_not_put_back(parts, back[parts], e))
        except OSError as e:  # the target itself is gone
            problems.extend(_not_put_back(parts, mode, e) for parts, mode in back.items())
        return problems


def _not_put_back(parts: tuple[bytes, ...], mode: int, e: OSError) -> FileProblem:
    return FileProblem(paths.display(b"/".join(parts)), "was opened up to restore into it, "
                       f"and its mode could not be put back to {mode:o} "
                       f"({e.strerror}): chmod {mode:o} it by hand")


@contextlib.contextmanager
def _dirs_under(target: Path | bytes) -> Iterator[DirFds]:
    """The target's directories, for their names' sake only (O_PATH: search permission is
    enough to reach one, as for a path)."""
    root_fd = os.open(target, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    dirs = DirFds(root_fd, path_only=True)
    try:
        yield dirs
    finally:
        dirs.close()
        os.close(root_fd)


class _FileWriter:
    """Writes restored bytes into temporary files under the target; runs in worker threads.

    Directories are opened one component at a time with O_NOFOLLOW, so a symlink planted inside
    the target (or in the catalog's paths) is refused instead of followed.
    """

    def __init__(self, target: Path, jobs: Sequence[_FileJob], *, overwrite: bool,
                 opened: OpenedUp | None = None) -> None:
        self.target = target
        self.jobs = jobs
        self.overwrite = overwrite
        self.opened = opened or OpenedUp(target)
        # O_PATH: making, renaming and removing entries takes write and search permission on
        # a directory, not read (a drop box's 0o333 is enough), as it does through a path.
        self.root_fd = os.open(target, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        self._dirs = DirFds(self.root_fd, create=True, path_only=True)
        self._temps = 0
        self._pid = os.getpid()  # for the temporary names: one system call, not one a file
        self.restored = 0
        self.bytes = 0
        self.symlinks = 0
        self.directories = 0
        self.retouch_failed = 0
        self.problems: list[FileProblem] = []

    def _discard_unfinished(self) -> None:
        for job in self.jobs:
            if not (job.done or job.failed):
                self.fail(job, "was not completed (the restore stopped before its data)")
            self._discard(job)  # whatever did not finish leaves nothing behind

    def close(self) -> None:
        self._discard_unfinished()
        self._dirs.close()
        os.close(self.root_fd)

    def _dir_fd(self, parts: tuple[bytes, ...]) -> int:
        try:
            return self._dirs.open(parts)
        except OSError as e:
            if e.errno in (errno.ELOOP, errno.ENOTDIR):  # a symlink, or a file in the way
                where = paths.display(e.filename if isinstance(e.filename, bytes)
                                      else b"/".join(parts))
                raise _Refused(f"{where} in the target is a symlink or not a directory") from e
            raise

    def finish_tree(self, links: Sequence[_TreeJob], dirs: Sequence[_TreeJob]) -> None:
        """After the files: create the symlinks, then give directories their modes and
        mtimes, and those opened up for the run and not restored their modes back, deepest
        first (children before the directory that holds them, which may shut them off)."""
        self._discard_unfinished()
        for job in links:
            self._tree_guarded(job, partial(self._symlink, job))
        steps = [(job.parts, partial(self._tree_guarded, job, partial(self._directory, job)))
                 for job in dirs]
        restored = {job.parts for job in dirs}
        steps.extend((parts, partial(self._put_back, parts))
                     for parts in list(self.opened.modes) if parts not in restored)
        for _, step in sorted(steps, key=lambda s: len(s[0]), reverse=True):
            step()

    def _put_back(self, parts: tuple[bytes, ...]) -> None:
        self.problems.extend(self.opened.put_back([parts]))

    def _symlink(self, job: _TreeJob) -> None:
        link = job.entry
        assert isinstance(link, SymlinkEntry)
        parent = self._dir_fd(job.parts[:-1])
        name = job.parts[-1]
        try:
            st = os.lstat(name, dir_fd=parent)
        except FileNotFoundError:
            pass
        else:
            if job.there and stat.S_ISLNK(st.st_mode):
                if st.st_mtime_ns != link.mtime_ns:
                    os.utime(name, ns=(link.mtime_ns, link.mtime_ns), dir_fd=parent,
                             follow_symlinks=False)
                return
            if not self.overwrite:
                raise _Refused("already exists in the target; use --overwrite to replace it")
            if stat.S_ISDIR(st.st_mode):
                raise _Refused("a directory of that name is in the target")
            os.unlink(name, dir_fd=parent)
        os.symlink(link.target_bytes, name, dir_fd=parent)
        os.utime(name, ns=(link.mtime_ns, link.mtime_ns), dir_fd=parent, follow_symlinks=False)
        self.symlinks += 1

    def _directory(self, job: _TreeJob) -> None:
        d = job.entry
        assert isinstance(d, DirectoryEntry)
        fd = self._dir_fd(job.parts)  # made if it is missing: empty directories come back
        changed = _set_mode_and_time(fd, self._parent_of(job.parts), job.parts[-1],
                                     d.unix_mode, d.mtime_ns)
        self.opened.settled(job.parts)
        # Counted when made or set (one made now has this moment's mtime); one already as
        # the backup had it, on a second run, is not restored again.
        self.directories += changed

    def _tree_guarded(self, job: _TreeJob, action: Callable[[], None]) -> None:
        try:
            action()
        except _Refused as e:
            self.problems.append(FileProblem(job.entry.relative_path, f"refused: {e}"))
        except OSError as e:
            self.problems.append(FileProblem(job.entry.relative_path,
                                             f"cannot restore it: {e.strerror}"))
        except (OverflowError, ValueError) as e:  # a time or mode no system can hold
            self.problems.append(FileProblem(job.entry.relative_path,
                                             f"cannot restore its metadata: {e}"))

    def retouch(self, files: Sequence[tuple[SourceFileEntry, tuple[bytes, ...]]]) -> None:
        """Give files already there with the backup's bytes its mode and mtime as well."""
        for f, parts in files:
            try:
                parent = self._parent_of(parts)
                # O_PATH: a file of its own it may not read (mode 000) is set all the same
                fd = os.open(parts[-1], os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent)
                try:
                    st = os.fstat(fd)
                    if not stat.S_ISREG(st.st_mode) or st.st_size != f.size_bytes:
                        raise OSError(errno.ESTALE, "it changed since it was compared")
                    _set_mode_and_time(fd, parent, parts[-1], f.unix_mode, _mtime_ns(f))
                finally:
                    os.close(fd)
            except (OSError, _Refused) as e:
                why = e.strerror if isinstance(e, OSError) else str(e)
                self.retouch_failed += 1  # not as the backup had it: a file failed
                self.problems.append(FileProblem(
                    f.relative_path, "is already there with the backup's bytes, but its mode "
                    f"and modification time could not be set ({why})"))

    def remove_leftovers(self, leftovers: Sequence[tuple[bytes, ...]]) -> int:
        """Remove temporary files earlier restores left; return how many were."""
        removed = 0
        for parts in leftovers:
            try:
                os.unlink(parts[-1], dir_fd=self._parent_of(parts))
            except FileNotFoundError:  # another run took it meanwhile
                continue
            except (OSError, _Refused) as e:
                why = e.strerror if isinstance(e, OSError) else str(e)
                self.problems.append(FileProblem(
                    paths.display(b"/".join(parts)), "is a temporary file an earlier "
                    f"restore left, and it could not be removed ({why})"))
                continue
            removed += 1
        return removed

    def fail(self, job: _FileJob, what: str) -> None:
        """Give up on this file, unless it is done: restored whole and checked, it stays (a
        container cut short fails every range it was read for, but only the files not done
        before the cut fail)."""
        if job.done:
            return
        if not job.failed:
            job.failed = True
            self.problems.append(FileProblem(job.entry.relative_path, what))
        self._discard(job)

    def _parent(self, job: _FileJob) -> int:
        """The file's directory, opened safely (again, if the cache let it go)."""
        return self._parent_of(job.parts)

    def _parent_of(self, parts: tuple[bytes, ...]) -> int:
        return self._dir_fd(parts[:-1]) if len(parts) > 1 else self.root_fd

    def _discard(self, job: _FileJob) -> None:
        """Close and remove the temporary file, if there is one."""
        if job.fd >= 0:
            os.close(job.fd)
            job.fd = -1
        if job.temp_name:
            with contextlib.suppress(OSError, _Refused):
                os.unlink(job.temp_name, dir_fd=self._parent(job))
            job.temp_name = ""

    def _open(self, job: _FileJob) -> None:
        # The name is ours, never the catalog's: a file_id could hold '/' or '..'.
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        for _ in range(100):  # a name taken (an earlier process of this pid's) is passed by
            self._temps += 1
            name = f"{TEMP_PREFIX}{self._pid}-{self._temps}"
            try:
                job.fd = os.open(name, flags, 0o600, dir_fd=self._parent(job))
            except FileExistsError:
                continue
            # held while it is written: another restore into this target, in another pid
            # namespace, tells it from a leftover by that (a new file: never contended)
            fcntl.flock(job.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        else:
            raise OSError(errno.EEXIST, "100 temporary names in a row are taken")
        job.temp_name = name

    def start_empty(self, job: _FileJob) -> None:
        """A file with no segments: create it and finish it at once."""
        def go() -> None:
            self._open(job)
            self._finish(job)

        self._guarded(job, go)

    def write(self, job_index: int, seg: SegmentEntry, data: memoryview, seg_pos: int) -> None:
        """`data` is the part of `seg` starting `seg_pos` bytes into it."""
        job = self.jobs[job_index]
        if job.failed:
            return

        def go() -> None:
            if job.fd < 0:
                self._open(job)
            offset = seg.source_offset + seg_pos
            _write_leaving_holes(job.fd, data, offset, job.entry.size_bytes)
            if len(job.segments) == 1:
                return  # the segment's own hash is the file's
            if job.in_order and offset == job.next_offset:
                job.whole.update(data)
                job.next_offset += len(data)
            else:
                job.in_order = False

        self._guarded(job, go)

    def segment_done(self, job_index: int, seg: SegmentEntry, digest: str) -> None:
        job = self.jobs[job_index]
        if job.failed:
            return
        if digest != seg.sha256:
            self.fail(job, f"segment {seg.segment_id} is damaged on tape (SHA-256 mismatch)")
            return
        job.remaining -= 1
        if job.remaining == 0:
            self._guarded(job, lambda: self._finish(job))

    def _finish(self, job: _FileJob) -> None:
        f = job.entry
        if len(job.segments) == 1:
            digest = job.segments[0].sha256  # checked against the bytes in segment_done
        elif job.in_order and job.next_offset == f.size_bytes:
            digest = job.whole.hexdigest()
        else:  # segments came out of order: hash what was written
            digest = _hash_fd(job.fd, f.size_bytes)
        if digest != f.sha256:
            self.fail(job, "the restored file's SHA-256 does not match the catalog")
            return
        if os.fstat(job.fd).st_size != f.size_bytes:
            self.fail(job, "the restored file came out the wrong size (is the target full?)")
            return
        _give_mode_and_mtime(job.fd, f)
        final = job.parts[-1]
        parent = self._parent(job)
        if not self.overwrite:
            try:
                os.lstat(final, dir_fd=parent)
            except FileNotFoundError:
                pass
            else:
                self.fail(job, "appeared in the target during the restore; not overwritten")
                return
        os.rename(job.temp_name, final, src_dir_fd=parent, dst_dir_fd=parent)
        job.temp_name = ""
        os.close(job.fd)  # its lock held until it has its name
        job.fd = -1
        job.done = True
        self.restored += 1
        self.bytes += f.size_bytes

    def _guarded(self, job: _FileJob, action: Callable[[], None]) -> None:
        try:
            action()
        except _Refused as e:
            self.fail(job, f"refused: {e}")
        except OSError as e:
            self.fail(job, f"cannot write it: {e.strerror}")
            if e.errno in (errno.ENOSPC, errno.EDQUOT):  # every file after it would fail too
                raise TargetFullError(
                    f"the restore target {self.target} is full ({e.strerror}) after "
                    f"{self.restored} file(s); free some space and run the same restore "
                    "again (it leaves the files restored so far and reads only what is "
                    "missing)") from e


class _Refused(Exception):
    pass


def _set_mode_and_time(fd: int, parent: int, name: bytes, mode: int,
                       mtime_ns: int | None) -> bool:
    """Give the entry open as `fd` (an O_PATH descriptor, which takes no fchmod or futimens;
    `name` in `parent`) these permission bits and mtime, changing only what differs: one
    already right is left be (another user's, restored by root, would refuse the change).
    Whether anything was changed."""
    st = os.fstat(fd)
    proc = paths.fd_path(fd)
    by_proc = paths.have_fd_paths()  # else by name: no /proc in a chroot, say
    new_mode = stat.S_IMODE(st.st_mode) != stat.S_IMODE(mode)
    if new_mode:
        if by_proc:
            proc.chmod(stat.S_IMODE(mode))
        else:
            os.chmod(name, stat.S_IMODE(mode), dir_fd=parent)
    new_time = mtime_ns is not None and st.st_mtime_ns != mtime_ns
    if new_time:
        assert mtime_ns is not None
        if by_proc:
            os.utime(proc, ns=(mtime_ns, mtime_ns))
        else:
            os.utime(name, ns=(mtime_ns, mtime_ns), dir_fd=parent, follow_symlinks=False)
    return new_mode or new_time


def _give_mode_and_mtime(fd: int, f: SourceFileEntry) -> None:
    """The backup's permission bits and mtime (to the nanosecond, when the catalog has it)."""
    os.fchmod(fd, stat.S_IMODE(f.unix_mode))
    mtime = _mtime_ns(f)
    if mtime is not None:
        os.utime(fd, ns=(mtime, mtime))


def _hash_fd(fd: int, size: int) -> str:
    h = hashlib.sha256()
    offset = 0
    while offset < size:
        data = os.pread(fd, min(READ_CHUNK_BYTES, size - offset), offset)
        if not data:
            break
        h.update(data)
        offset += len(data)
    return h.hexdigest()


def _mtime_ns(f: SourceFileEntry) -> int | None:
    """The mtime a restored file gets: the catalog's, to the nanosecond when it has that."""
    return f.mtime_ns if f.mtime_ns is not None else _ns_from_iso(f.modified_at)


def _ns_from_iso(text: str) -> int | None:
    from datetime import datetime

    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        return None
    return int(when.timestamp()) * 1_000_000_000 + when.microsecond * 1000


@attrs.define
class _Span:
    """A run of ranges (sorted by start) close enough together to read straight through,
    from `start` to `end`, with their offsets as columns. A container of small files is one
    span of tens of thousands of ranges, read a chunk at a time: `reaching` gives the ranges
    a chunk touches without going over the others each time."""

    members: list[_Range]
    starts: list[int]
    ends: list[int]
    end: int
    done: int = 0  # every range before this one ends before the bytes read so far

    @classmethod
    def of(cls, r: _Range, start: int, end: int) -> _Span:
        return cls([r], [start], [end], end)

    @property
    def start(self) -> int:
        return self.starts[0]

    def add(self, r: _Range, start: int, end: int) -> None:
        self.members.append(r)
        self.starts.append(start)
        self.ends.append(end)
        self.end = max(self.end, end)

    def reaching(self, pos: int, end: int) -> range:
        """Indices of the ranges that may hold bytes of [pos, end): chunks come in order, so
        the ranges that ended before `pos` are passed once and for all."""
        k, n = self.done, len(self.members)
        while k < n and self.ends[k] <= pos:
            k += 1
        self.done = k
        stop = bisect.bisect_left(self.starts, end, k)
        return range(k, stop)


class _SegmentHashes:
    """Hash state of the ranges of one container while it is read; thread-confined."""

    def __init__(self) -> None:
        self.open: dict[int, Any] = {}


async def _restore_container(
    tape: LoadedTape,
    container: ContainerEntry,
    ranges: list[_Range],
    writer: _FileWriter,
    pool: PipelineBuffer,
    meter: ReadMeter | None = None,
    completed: set[int] | None = None,
) -> int:
    """Read the wanted ranges of one container in order; return the bytes read. `meter`
    counts the bytes of the ranges as they are written; `completed` gets the id() of each
    range written whole, for the caller to fail only the others after an error. A container
    that ends before the ranges do has every chunk read before the end written, then raises
    _ShortContainer."""
    path = f"data/{container.container_id}"
    spans: list[_Span] = []
    for r in ranges:
        start, end = r.start, r.end
        if spans and spans[-1].start <= start <= spans[-1].end + SEEK_GAP_BYTES:
            spans[-1].add(r, start, end)
        else:
            spans.append(_Span.of(r, start, end))
    reader = await tape.open_read(path)
    send, receive = trio.open_memory_channel[tuple[mmap.mmap, int, int, _Span]](READ_AHEAD)
    read = 0
    short_at: int | None = None
    whole = completed if completed is not None else set()

    async def read_spans() -> None:
        nonlocal read, short_at
        with send:
            for span in spans:
                await reader.seek(span.start)
                pos = span.start
                while pos < span.end:
                    buf = await lease.take()
                    view = memoryview(buf)[: min(len(buf), span.end - pos)]
                    n = await reader.readinto(view)
                    if not n:  # the chunks before it are still written
                        lease.give_back(buf)
                        short_at = pos
                        return
                    if not await pass_on(send, (buf, pos, n, span)):
                        lease.give_back(buf)
                        return  # the writer failed (a full target): its error is the one
                    pos += n
                    read += n

    hashes = _SegmentHashes()

    def consume(buf: mmap.mmap, pos: int, n: int, span: _Span) -> int:
        """Hash and write the ranges' bytes in this chunk; return how many there were."""
        data = memoryview(buf)[:n]
        taken = 0
        end = pos + n
        members, starts, ends = span.members, span.starts, span.ends
        for k in span.reaching(pos, end):
            if ends[k] <= pos:
                continue  # overlaps a longer range before it (a damaged catalog) and is done
            r = members[k]
            a, b = max(starts[k], pos), min(ends[k], end)
            key = id(r)
            h = hashes.open.get(key)
            if h is None:
                h = hashes.open[key] = hashlib.sha256()
            piece = data[a - pos:b - pos]
            h.update(piece)
            writer.write(r.job, r.segment, piece, a - starts[k])
            taken += b - a
            if b == ends[k]:
                writer.segment_done(r.job, r.segment, hashes.open.pop(key).hexdigest())
                whole.add(key)
        return taken

    async def write_files() -> None:
        with receive:
            async for buf, pos, n, members in receive:
                taken = await trio.to_thread.run_sync(consume, buf, pos, n, members)
                lease.give_back(buf)
                if meter is not None:
                    meter.done_bytes += taken

    try:
        with BufferLease(pool) as lease:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(read_spans)
                nursery.start_soon(write_files)
    finally:
        await reader.close()
    if short_at is not None:
        raise _ShortContainer(short_at)
    return read


class _ShortContainer(Exception):
    def __init__(self, at: int) -> None:
        super().__init__(f"the container ends at byte {at}, before the data the catalog lists")


def check_target_is_writable(target: Path) -> None:
    """Refuse a restore target nothing could be written to (read-only, no permission), before
    hours of reading tapes for it: a file is made and removed in it, or in the nearest
    directory above it that exists."""
    try:
        paths.check_writable(target)
    except OSError as e:
        raise UsageError(f"cannot write into the restore target {target}: {e.strerror}; "
                         "give --target a directory this user can write to") from e


async def run_restore(
    plan: RestorePlan,
    target: Path,
    *,
    drive: TapeDrive,
    operator: Operator,
    clock: Clock,
    reporter: Reporter | None = None,
    overwrite: bool = False,
    holder: TapeHolder | None = None,
    started: float | None = None,
    opened: OpenedUp | None = None,
) -> RestoreReport:
    """Restore `plan` into `target`, loading each needed tape once, in sequence order.
    `started`: when the job began (its plan compared the files already in the target, say),
    on `clock`; now by default. `opened`: the directories the plan opened up, whose modes
    go back at the end."""
    reporter = reporter or NullReporter()
    holder = holder or TapeHolder(drive, operator)
    started = clock.monotonic() if started is None else started

    def open_target() -> _FileWriter:
        check_target_is_writable(target)
        try:
            target.mkdir(parents=True, exist_ok=True)
            return _FileWriter(target, plan.jobs, overwrite=overwrite, opened=opened)
        except OSError as e:  # a file in its path, a read-only filesystem, no permission
            raise UsageError(f"cannot create the restore target {target}: {e.strerror}; "
                             "give --target a directory this user can write to") from e

    writer = await trio.to_thread.run_sync(open_target)
    removed = 0
    if plan.leftovers:
        removed = await trio.to_thread.run_sync(writer.remove_leftovers, plan.leftovers)
        reporter.event(Note(f"removed {removed} temporary file(s) ({TEMP_PREFIX}*) that an "
                            "earlier restore, killed outright, left in the target"))
    if plan.retouch:
        await trio.to_thread.run_sync(writer.retouch, plan.retouch)
    pool = read_pool()
    catalog = plan.catalog
    by_tape: dict[str, list[ContainerEntry]] = defaultdict(list)
    for cid in plan.ranges:
        c = plan.containers[cid]
        by_tape[c.tape_id].append(c)
    check = check_member_of(catalog)
    meter = ReadMeter("restoring", plan.bytes_to_read, len(plan.tapes))
    try:
        for job in plan.jobs:
            if not job.segments:
                await trio.to_thread.run_sync(writer.start_empty, job)
        with reporting(meter, reporter):  # a reporter's own error comes out at its end
            read = await _restore_tapes(plan, by_tape, writer, pool, meter, holder, check,
                                        reporter)
            await holder.release()  # a tape read for the catalog and never needed
            await trio.to_thread.run_sync(writer.finish_tree, plan.symlinks,
                                          plan.directories)
    finally:
        await holder.release_after_error()  # a no-op unless something above failed
        with trio.CancelScope(shield=True):  # Ctrl-C too: no temporary file stays behind
            await trio.to_thread.run_sync(writer.close)
            writer.problems.extend(writer.opened.put_back())  # after an error: what is left
    return RestoreReport(
        requested=plan.files,
        restored=writer.restored,
        bytes_restored=writer.bytes,
        seconds=clock.monotonic() - started,
        tapes=tuple(t.tape_id for t in plan.tapes),
        problems=(*plan.problems, *writer.problems),
        bytes_to_read=plan.bytes_to_read,
        symlinks_restored=writer.symlinks,
        directories_restored=writer.directories,
        skipped=plan.skipped,
        already_present=plan.present - writer.retouch_failed,
        retouched=len(plan.retouch) - writer.retouch_failed,
        tapes_read=tuple(read),
        leftovers_removed=removed,
    )


async def _restore_tapes(
    plan: RestorePlan, by_tape: dict[str, list[ContainerEntry]], writer: _FileWriter,
    pool: PipelineBuffer, meter: ReadMeter, holder: TapeHolder,
    check: Check, reporter: Reporter,
) -> list[str]:
    """Load each tape the plan needs, in order, and restore its containers' ranges; return the
    tapes that could be loaded."""
    catalog = plan.catalog
    read: list[str] = []
    # Tapes the drive can tell are not there go first (a simulator's): their files fail
    # before any of their pieces on other tapes is read for nothing.
    there = await holder.drive.inventory()
    order = sorted(plan.tapes, key=lambda t: there is None or t.tape_id in there)
    todo: dict[str, list[_Range]] = {}  # container id -> the ranges still to read
    for t in order:
        request = TapeRequest(t.tape_id, t.sequence_number, catalog.backup_set_id,
                              len(catalog.tapes), purpose="read", volume_serial=t.volume_serial)
        containers = []
        for c in sorted(by_tape[t.tape_id], key=lambda c: (c.tape_offset, c.sequence_number)):
            # The pieces of files that failed already (on a tape not there, say) are not read.
            ranges = plan.ranges[c.container_id]
            live = [r for r in ranges if not writer.jobs[r.job].failed]
            if len(live) < len(ranges):
                meter.total_bytes -= sum(r.end - r.start for r in ranges
                                         if writer.jobs[r.job].failed)
            if live:
                containers.append(c)
                todo[c.container_id] = live
        if not containers:
            reporter.event(Note(f"tape {t.sequence_number} {t.tape_id}: not needed any more "
                                "(the files with pieces on it failed already)"))
            continue
        meter.begin_tape(t.tape_id, t.sequence_number)  # loading it counts too
        try:
            loaded = await holder.get(request, check)
        except BackupError as e:
            for c in containers:
                _fail_ranges(writer, todo[c.container_id], f"tape not available: {e}")
                meter.total_bytes -= sum(r.end - r.start for r in todo[c.container_id])
            meter.tape_id = ""
            continue
        read.append(t.tape_id)
        try:
            for c in containers:
                ranges = todo[c.container_id]
                completed: set[int] = set()
                counted = meter.done_bytes
                try:
                    await _restore_container(loaded, c, ranges, writer, pool, meter, completed)
                except* TargetFullError as group:  # the job's end, not this container's
                    full = leaves(group)[0]
                    raise full from full.__cause__  # unwrapped, for the API's callers too
                except* (BackupError, _ShortContainer) as group:
                    why = "; ".join(str(e) for e in leaves(group))
                    lost = [r for r in ranges if id(r) not in completed]
                    _fail_ranges(writer, lost,
                                 f"container {c.container_id} on tape {t.tape_id}: {why}")
                    # what was written of the ranges given up no longer counts, nor do they
                    meter.done_bytes = counted + sum(
                        r.end - r.start for r in ranges if id(r) in completed)
                    meter.total_bytes -= sum(r.end - r.start for r in lost)
            reporter.event(Note(f"tape {t.sequence_number} {t.tape_id}: done"))
        except BaseException:
            await holder.release_after_error()
            raise
        meter.tape_id = ""
        await holder.release_or_warn(reporter)
    return read


#: Whole blocks of zeros, at offsets a multiple of this, are not written into the new file: a
#: sparse file (a disk image) comes back with its holes, not at its full size on disk.
HOLE_BLOCK = 4096
_ZEROS = bytes(HOLE_BLOCK)


def _write_leaving_holes(fd: int, data: memoryview, at: int, size: int) -> None:
    """Write `data` at offset `at` of a new file `size` bytes long, leaving out the aligned
    blocks of zeros (the file's unwritten bytes read as zeros). The block that holds the
    file's last byte is always written, so the file ends at its size without a truncate."""
    start = 0  # the bytes of `data` from here on are not written yet
    i = -at % HOLE_BLOCK  # the first block boundary in `data`
    last = size - 1 - at  # the file's last byte, in `data`'s terms
    while i + HOLE_BLOCK <= len(data) and i + HOLE_BLOCK <= last:
        # Two bytes first: a memoryview compares with bytes a byte at a time (3 s a GiB), a
        # copy of the block with memcmp (the zeros at 2 GB/s, other data at 40 GB/s).
        if data[i] == 0 and data[i + HOLE_BLOCK - 1] == 0 and bytes(
                data[i:i + HOLE_BLOCK]) == _ZEROS:
            _pwrite_all(fd, data[start:i], at + start)
            start = i + HOLE_BLOCK
        i += HOLE_BLOCK
    _pwrite_all(fd, data[start:], at + start)


def _pwrite_all(fd: int, view: memoryview, at: int) -> None:
    while view:  # a short write (a filling disk) must not go unnoticed
        n = os.pwrite(fd, view, at)
        view, at = view[n:], at + n


def _fail_ranges(writer: _FileWriter, ranges: Sequence[_Range], what: str) -> None:
    for r in ranges:
        writer.fail(writer.jobs[r.job], what)
