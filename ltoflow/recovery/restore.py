#!/usr/bin/env python3
"""Restore files from an ltoflow tape set without ltoflow.

Needs nothing but Python 3.8 or newer (standard library only).  Read README.txt on the
same tape first; it also explains how to do everything below by hand.

    python3 restore.py --target DIR TAPE_ROOT [TAPE_ROOT ...]
    python3 restore.py --list TAPE_ROOT [TAPE_ROOT ...]
    python3 restore.py --target DIR --only 'case-001/*' TAPE_ROOT ...

A TAPE_ROOT is the directory that holds the tape's `data/` and `catalog/` folders (for
example the mount point of an LTFS tape, or a copy of it on disk).  Give every tape you
have; a file is restored only if every tape holding a piece of it is given.

Exit status: 0 = every selected file was restored and verified, 1 = some files failed
(each one is reported with the reason), 2 = usage error or no usable catalog, 4 = nothing
failed, but some selected entries were skipped by the backup and cannot be restored (each
one is listed).

Symbolic links and directories in the catalog (newer catalogs) come back too: links are
created (never followed), and directories get their permissions and times last, deepest
first.  Names are restored with their exact bytes (`relative_path_b64` when a name is not
UTF-8), and directories are walked one at a time through descriptors, so very long paths work.
"""

import argparse
import base64
import binascii
import calendar
import errno
import fnmatch
import functools
import glob
import hashlib
import io
import json
import os
import re
import signal
import stat
import sys
import tempfile
from typing import IO, Any, Dict, List, Optional, Sequence, Set, Tuple, Union

CHUNK = 8 * 1024 * 1024  # read and write in pieces of this size; never whole containers
# Gaps between wanted segments up to this size are read through (keeps the tape streaming
# and lets the container checksum be verified); larger gaps are skipped with a seek.
READ_THROUGH_GAP = 64 * 1024 * 1024

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_SKIPPED = 4  # nothing failed, but the backup skipped some selected entries (not on tape)

HEX64 = re.compile(r"^[0-9a-f]{64}$")
ISO_RE = re.compile(
    r"^(\d{4})-(\d{2})-(\d{2})[T ](\d{2}):(\d{2}):(\d{2})(?:[.,](\d+))?"
    r"\s*(Z|z|[+-]\d{2}:?\d{2})?$"
)
TEMP_PREFIX = ".ltoflow-restore-"
DIR_FD_LIMIT = 64  # directory descriptors kept open; the oldest are closed first
# Walk the target through directory descriptors (no PATH_MAX limit, no symlink followed) where
# the OS supports it; elsewhere (Windows) by path, checking each component.
HAVE_DIR_FD = (
    all(f in os.supports_dir_fd for f in (os.open, os.mkdir, os.stat, os.unlink, os.rename))
    and hasattr(os, "O_DIRECTORY")
    and hasattr(os, "O_NOFOLLOW")
)


class UsageError(Exception):
    """The command line cannot work, or no usable catalog was found (exit 2)."""


class Problem(Exception):
    """Something is wrong with one file; it is reported and the restore goes on."""


class ReadProblem(Problem):
    """Reading a container failed part-way; the read position is unknown afterwards."""


class DamagedSegment(Problem):
    """A segment was read completely but its SHA-256 is wrong (the tape data is damaged)."""


# --------------------------------------------------------------------------- output


def _setup_stdio() -> None:
    """Never crash on printing an odd file name, whatever the terminal's encoding."""
    for stream in (sys.stdout, sys.stderr):
        if isinstance(stream, io.TextIOWrapper):
            try:
                stream.reconfigure(errors="backslashreplace")
            except (AttributeError, ValueError):  # pragma: no cover - exotic streams
                pass


def say(message: str) -> None:
    print(message, flush=True)


def warn(message: str) -> None:
    print("WARNING: " + message, file=sys.stderr, flush=True)


def show(path: str) -> str:
    """A file name as it can be shown safely (control characters escaped)."""
    if all(ch.isprintable() for ch in path):
        return path
    return repr(path)[1:-1]


def show_bytes(raw: bytes) -> str:
    """Exact name bytes as they can be shown: bytes that are not UTF-8 as \\xNN, control
    characters escaped (as the catalog's readable rendering shows them)."""
    out = []
    for ch in raw.decode("utf-8", "surrogateescape"):
        if "\udc80" <= ch <= "\udcff":
            out.append("\\x%02x" % (ord(ch) - 0xDC00))
        elif ch.isprintable():
            out.append(ch)
        else:
            out.append(repr(ch)[1:-1])
    return "".join(out)


def exact_path(rec: Dict[str, Any], key: str) -> Optional[bytes]:
    """The exact bytes of a path: base64 in KEY_b64 when present (a name that is not UTF-8),
    otherwise the UTF-8 of KEY.  None when neither is usable."""
    b64 = rec.get(key + "_b64")
    if isinstance(b64, str):
        try:
            return base64.b64decode(b64, validate=True)
        except (binascii.Error, ValueError):
            return None
    text = rec.get(key)
    if not isinstance(text, str):
        return None
    return text.encode("utf-8", "surrogatepass")


# --------------------------------------------------------------------------- catalog model


class Container:
    __slots__ = ("container_id", "tape_id", "sequence_number", "size_bytes", "sha256")

    def __init__(
        self,
        container_id: str,
        tape_id: str,
        sequence_number: Optional[int],
        size_bytes: Optional[int],
        sha256: Optional[str],
    ) -> None:
        self.container_id = container_id
        self.tape_id = tape_id
        self.sequence_number = sequence_number
        self.size_bytes = size_bytes
        self.sha256 = sha256


class Segment:
    __slots__ = (
        "segment_id",
        "entry",
        "container_id",
        "container_offset",
        "source_offset",
        "length",
        "sha256",
    )

    def __init__(
        self,
        segment_id: str,
        entry: "Entry",
        container_id: str,
        container_offset: int,
        source_offset: int,
        length: int,
        sha256: Optional[str],
    ) -> None:
        self.segment_id = segment_id
        self.entry = entry
        self.container_id = container_id
        self.container_offset = container_offset
        self.source_offset = source_offset
        self.length = length
        self.sha256 = sha256


class Entry:
    """One source file of the catalog, plus the state of its restore."""

    __slots__ = (
        "index",
        "file_id",
        "rel",
        "size",
        "sha256",
        "mode",
        "mtime_ns",
        "segments",
        "problem",
        "raw",
        "components",
        "tmp_name",
        "hasher",
        "hashed_upto",
        "remaining",
        "done",
        "already_present",
    )

    def __init__(self, index: int) -> None:
        self.index = index
        self.file_id = ""
        self.rel = ""
        self.size = 0
        self.sha256 = ""
        self.mode: Optional[int] = None
        self.mtime_ns: Optional[int] = None
        self.segments: List[Segment] = []
        self.problem: Optional[str] = None
        self.raw = b""  # the exact path bytes
        self.components: List[bytes] = []
        self.tmp_name: Optional[bytes] = None  # in the parent directory
        self.hasher: Optional[Any] = None  # hashlib object fed while segments arrive in order
        self.hashed_upto = 0
        self.remaining = 0
        self.done = False
        self.already_present = False

    def name(self) -> str:
        if self.raw:
            return show_bytes(self.raw)
        return show(self.rel) if self.rel else "<file #%d without a usable path>" % self.index


class TreeEntry:
    """A symbolic link or a directory of the catalog (newer catalogs only)."""

    __slots__ = ("kind", "rel", "raw", "target", "mode", "mtime_ns", "problem", "components")

    def __init__(self, kind: str, rel: str) -> None:
        self.kind = kind  # "symlink" or "directory"
        self.rel = rel
        self.raw = b""
        self.target = b""
        self.mode: Optional[int] = None
        self.mtime_ns: Optional[int] = None
        self.problem: Optional[str] = None
        self.components: List[bytes] = []

    def name(self) -> str:
        return show_bytes(self.raw) if self.raw else show(self.rel) or "<unnamed %s>" % self.kind


class Catalog:
    def __init__(self) -> None:
        self.backup_set_id = ""
        self.created_at = ""
        self.entries: List[Entry] = []
        self.links: List[TreeEntry] = []
        self.dirs: List[TreeEntry] = []
        self.containers: Dict[str, Container] = {}
        self.tape_seq: Dict[str, int] = {}
        # (relative_path, kind, reason) of what the backup skipped: never restored, only listed.
        # A file that became unusable during the backup is here, not in source_files, so its
        # segments (which may hold zeros) are never used.
        self.skipped: List[Tuple[str, str, str]] = []


def _int(rec: Dict[str, Any], key: str) -> Optional[int]:
    value = rec.get(key)
    if isinstance(value, bool) or not isinstance(value, int):
        return None
    return value


def _str(rec: Dict[str, Any], key: str) -> Optional[str]:
    value = rec.get(key)
    return value if isinstance(value, str) else None


def _sha(rec: Dict[str, Any], key: str) -> Optional[str]:
    value = _str(rec, key)
    if value is None:
        return None
    value = value.strip().lower()
    return value if HEX64.match(value) else None


def parse_iso_ns(text: str) -> Optional[int]:
    """ISO-8601 time ('2026-11-26T06:03:57.025135+00:00') to nanoseconds since 1970 UTC."""
    m = ISO_RE.match(text.strip())
    if not m:
        return None
    year, month, day, hour, minute, second = (int(m.group(i)) for i in range(1, 7))
    try:
        secs = calendar.timegm((year, month, day, hour, minute, second, 0, 0, 0))
    except (ValueError, OverflowError):
        return None
    zone = m.group(8)
    if zone and zone not in ("Z", "z"):
        digits = zone[1:].replace(":", "")
        offset = int(digits[:2]) * 3600 + int(digits[2:]) * 60
        secs -= offset if zone[0] == "+" else -offset
    frac = (m.group(7) or "")[:9].ljust(9, "0")
    return secs * 1_000_000_000 + int(frac)


def parse_catalog(doc: Any) -> Catalog:
    """Turn the catalog JSON into the model; unknown keys are ignored everywhere."""
    if not isinstance(doc, dict):
        raise UsageError("the catalog is not a JSON object; it is not an ltoflow catalog")
    files_raw = doc.get("source_files")
    if not isinstance(files_raw, list):
        raise UsageError("the catalog has no 'source_files' list; it is not an ltoflow catalog")
    segs_raw = doc.get("segments", [])
    conts_raw = doc.get("containers", [])
    tapes_raw = doc.get("tapes", [])
    for key, value in (("segments", segs_raw), ("containers", conts_raw), ("tapes", tapes_raw)):
        if not isinstance(value, list):
            raise UsageError("the catalog's '%s' is not a list" % key)
    version = doc.get("schema_version")
    if isinstance(version, str) and not version.startswith("2."):
        warn("catalog schema_version is %r; this script knows 2.x; trying anyway" % version)

    cat = Catalog()
    cat.backup_set_id = _str(doc, "backup_set_id") or ""
    cat.created_at = _str(doc, "created_at") or ""
    skipped_raw = doc.get("skipped", [])
    for rec in skipped_raw if isinstance(skipped_raw, list) else []:
        if isinstance(rec, dict) and isinstance(rec.get("relative_path"), str):
            cat.skipped.append(
                (rec["relative_path"], _str(rec, "kind") or "?", _str(rec, "reason") or "")
            )
    for rec in tapes_raw:
        if isinstance(rec, dict):
            tid, seq = _str(rec, "tape_id"), _int(rec, "sequence_number")
            if tid is not None and seq is not None:
                cat.tape_seq[tid] = seq
    for rec in conts_raw:
        if isinstance(rec, dict):
            cid = _str(rec, "container_id")
            if cid is not None:
                cat.containers[cid] = Container(
                    cid,
                    _str(rec, "tape_id") or "",
                    _int(rec, "sequence_number"),
                    _int(rec, "size_bytes"),
                    _sha(rec, "sha256"),
                )

    by_file_id: Dict[str, Entry] = {}
    for index, rec in enumerate(files_raw):
        entry = Entry(index)
        cat.entries.append(entry)
        if not isinstance(rec, dict):
            entry.problem = "catalog record is not an object"
            continue
        rel = rec.get("relative_path")
        if isinstance(rel, str):
            entry.rel = rel
        raw = exact_path(rec, "relative_path")
        if raw is not None:
            entry.raw = raw
        file_id = _str(rec, "file_id")
        size = _int(rec, "size_bytes")
        sha = _sha(rec, "sha256")
        if not isinstance(rel, str):
            entry.problem = "catalog record has no relative_path text"
        elif raw is None:
            entry.problem = "catalog record has a damaged relative_path_b64"
        elif file_id is None:
            entry.problem = "catalog record has no file_id"
        elif size is None or size < 0:
            entry.problem = "catalog record has no valid size_bytes"
        elif sha is None:
            entry.problem = "catalog record has no valid sha256; the file cannot be verified"
        elif file_id in by_file_id:
            entry.problem = "file_id %s appears twice in the catalog" % file_id
            by_file_id[file_id].problem = entry.problem
        if entry.problem is not None:
            continue
        assert file_id is not None
        assert size is not None
        assert sha is not None
        entry.file_id, entry.size, entry.sha256 = file_id, size, sha
        by_file_id[file_id] = entry
        mode = _int(rec, "unix_mode")
        entry.mode = mode & 0o7777 if mode is not None and mode >= 0 else None
        mtime_ns = _int(rec, "mtime_ns")
        if mtime_ns is None:
            text = _str(rec, "modified_at")
            if text is not None:
                mtime_ns = parse_iso_ns(text)
        entry.mtime_ns = mtime_ns

    for rec in segs_raw:
        if not isinstance(rec, dict):
            continue
        file_id = _str(rec, "file_id")
        if file_id is None or file_id not in by_file_id:
            continue
        entry = by_file_id[file_id]
        seg_id = _str(rec, "segment_id") or "?"
        cid = _str(rec, "container_id")
        c_off = _int(rec, "container_offset")
        s_off = _int(rec, "source_offset")
        length = _int(rec, "length_bytes")
        if cid is None or c_off is None or s_off is None or length is None:
            entry.problem = "segment %s in the catalog lacks container_id/offsets/length" % seg_id
            continue
        if c_off < 0 or s_off < 0 or length < 0:
            entry.problem = "segment %s in the catalog has a negative offset or length" % seg_id
            continue
        entry.segments.append(
            Segment(seg_id, entry, cid, c_off, s_off, length, _sha(rec, "sha256"))
        )

    for key, kind, out in (("symlinks", "symlink", cat.links), ("directories", "directory",
                                                                 cat.dirs)):
        raw_list = doc.get(key, [])
        if not isinstance(raw_list, list):
            warn("the catalog's '%s' is not a list; ignoring it" % key)
            continue
        for rec in raw_list:
            if not isinstance(rec, dict):
                continue
            item = TreeEntry(kind, _str(rec, "relative_path") or "")
            out.append(item)
            path = exact_path(rec, "relative_path")
            if path is None:
                item.problem = "catalog record has no usable relative_path"
                continue
            item.raw = path
            item.mtime_ns = _int(rec, "mtime_ns")
            if kind == "symlink":
                target = exact_path(rec, "target")
                if target is None:
                    item.problem = "catalog record has no usable link target"
                else:
                    item.target = target
            else:
                mode = _int(rec, "unix_mode")
                item.mode = mode & 0o7777 if mode is not None and mode >= 0 else None
    return cat


# --------------------------------------------------------------------------- finding the catalog


def _expected_sha(path: str) -> Optional[str]:
    """The hash stored in a catalog.sha256 file ('HEX' or 'HEX  name'), or None if absent."""
    try:
        with open(path, "rb") as f:
            text = f.read(4096).decode("ascii", "replace").strip()
    except OSError:
        return None
    return text.split()[0].lower() if text else ""


def load_catalog(roots: List[str], catalog_arg: Optional[str], force: bool) -> Catalog:
    """Find a catalog whose SHA-256 matches its catalog.sha256, parse it and return it."""
    candidates: List[Tuple[str, List[str]]] = []
    root_sha_files = [os.path.join(r, "catalog", "catalog.sha256") for r in roots]
    if catalog_arg is not None:
        sibling = os.path.join(os.path.dirname(os.path.abspath(catalog_arg)), "catalog.sha256")
        candidates.append((catalog_arg, [sibling] + root_sha_files))
    else:
        for root in roots:
            path = os.path.join(root, "catalog", "catalog.json")
            if os.path.isfile(path):
                candidates.append((path, [os.path.join(root, "catalog", "catalog.sha256")]))
    if not candidates:
        raise UsageError(
            "no catalog found: none of the given roots has catalog/catalog.json "
            "(give the directories that hold data/ and catalog/, or use --catalog FILE)"
        )

    # Hash every copy (reporting damaged ones) but hold at most one in memory: catalogs of
    # millions of files are large.
    verified: List[Tuple[str, str]] = []
    unverified: List[Tuple[str, str]] = []
    for path, sha_files in candidates:
        try:
            actual = hash_file(path)
        except OSError as exc:
            if path == catalog_arg:
                raise UsageError(
                    "cannot read --catalog %s: %s" % (path, exc.strerror or exc)
                ) from None
            warn("cannot read catalog %s: %s" % (path, exc.strerror or exc))
            continue
        expected = [e for e in (_expected_sha(p) for p in sha_files) if e is not None]
        if actual in expected:
            say("catalog %s: SHA-256 verified (%s)" % (path, actual))
            verified.append((path, actual))
        elif expected:
            warn(
                "catalog %s does NOT match catalog.sha256: the file hashes to %s but "
                "catalog.sha256 says %s; this copy is damaged or was changed"
                % (path, actual, expected[0] or "nothing")
            )
            unverified.append((path, actual))
        else:
            warn("catalog %s has no catalog.sha256 next to it; it cannot be verified" % path)
            unverified.append((path, actual))

    if len({digest for _, digest in verified}) > 1:
        warn("the given roots hold different catalogs (different backup sets, or a backup not "
             "finished after a tape filled early: then give --catalog of the tape whose copy "
             "lists the most tapes); using the first")
    choices = verified
    if not verified:
        if not force:
            alike = ""
            if len(unverified) > 1 and len({digest for _, digest in unverified}) == 1:
                alike = (" (all %d copies of catalog.json are identical, so their "
                         "catalog.sha256 files are more likely the damaged part)" % len(unverified))
            raise UsageError(
                "no catalog could be verified against its catalog.sha256%s; give another tape "
                "of the set (every tape holds the full catalog), or use --force-catalog to use "
                "an unverified catalog at your own risk" % alike
            )
        warn("--force-catalog: using an UNVERIFIED catalog; its checksums may be wrong too")
        choices = unverified
    for path, digest in choices:
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as exc:
            warn("cannot read catalog %s: %s" % (path, exc.strerror or exc))
            continue
        if hashlib.sha256(data).hexdigest() != digest:
            warn("catalog %s changed while it was being read; skipping it" % path)
            continue
        try:
            doc = json.loads(data)
        except ValueError as exc:
            warn("catalog %s is not valid JSON: %s" % (path, exc))
            continue
        del data
        cat = parse_catalog(doc)
        say(
            "using catalog %s: backup set %s, created %s, %d files"
            % (path, cat.backup_set_id or "?", cat.created_at or "?", len(cat.entries))
        )
        return cat
    raise UsageError("no usable catalog: no copy of the catalog could be read and parsed")


# --------------------------------------------------------------------------- selection


def relative(pattern: str) -> str:
    """A pattern as the catalog's relative paths are written: `./case-1/` is `case-1`."""
    p = pattern.strip("/")
    while p.startswith("./"):
        p = p[2:].lstrip("/")
    return "" if p == "." else p


def literal_patterns(patterns: List[str], everything: Sequence[Union["Entry", "TreeEntry"]]
                     ) -> List[str]:
    """A pattern that is the very name of an entry (`Photos [2019]`) means that entry only,
    not also what it matches as a glob (`Photos 1`): it is escaped."""
    if not any(ch in p for p in patterns for ch in "*?["):
        return patterns
    names = set()
    for e in everything:
        names.add(e.rel)
        if e.raw is not None:
            names.add(os.fsdecode(e.raw))
    return [glob.escape(p) if (p.rstrip("/") or p) in names else p for p in patterns]


def under(path: bytes, name: bytes) -> bool:
    """Whether `path` is `name` or lies under it (both exact bytes; an unusable path never)."""
    return bool(path) and (path == name or path.startswith(name + b"/"))


def selected(rel: str, patterns: List[str], raw: Optional[bytes] = None,
             shown: bool = False) -> bool:
    """True if the path, or one of its parent directories, matches one of the globs.

    A glob matches the catalog's text of the path or, as the shell passes an odd name, the
    exact bytes of it."""
    if not patterns:
        return True
    parts = rel.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    raw_parts = raw.split(b"/") if raw is not None else []
    raw_prefixes = [b"/".join(raw_parts[: i + 1]) for i in range(len(raw_parts))]
    if shown and not rel.isprintable():  # as --list shows them (a newline as \n)
        prefixes += [p for p in ([show_bytes(p) for p in raw_prefixes] if raw is not None
                                 else [show(p) for p in prefixes]) if p not in prefixes]
    for pat in patterns:
        pat = pat.rstrip("/") or pat
        for prefix in prefixes:
            if prefix == pat or fnmatch.fnmatchcase(prefix, pat):
                return True
        if raw_prefixes:
            try:
                pat_b = os.fsencode(pat)
            except UnicodeError:
                continue
            for raw_prefix in raw_prefixes:
                if raw_prefix == pat_b or fnmatch.fnmatchcase(raw_prefix, pat_b):
                    return True
    return False


def skipped_patterns(patterns: List[str]) -> List[str]:
    """Patterns for skipped entries, which keep only the readable rendering of a path: each
    pattern as given and, for an odd name the shell passes as exact bytes, rendered the same
    way (bytes that are not UTF-8 as \\xNN)."""
    out = list(patterns)
    for pat in patterns:
        try:
            rendered = os.fsencode(pat).decode("utf-8", "backslashreplace")
        except UnicodeError:
            continue
        if rendered != pat:
            out.append(rendered)
    return out


# --------------------------------------------------------------------------- the target tree


Where = Union[int, bytes]  # a directory: an open descriptor, or a path (no dir_fd support)


def at(where: Where, name: bytes) -> bytes:
    return name if isinstance(where, int) else os.path.join(where, name)


def dfd(where: Where) -> Optional[int]:
    """The dir_fd argument for a name in WHERE."""
    return where if isinstance(where, int) else None


def chmod_here(dir_fd: int, name: bytes, mode: int) -> bool:
    """Set the mode of NAME in DIR_FD without following a symbolic link put there meanwhile
    (through an O_PATH descriptor, on Linux); False where that cannot be done safely."""
    if not hasattr(os, "O_PATH") or not os.path.isdir("/proc/self/fd"):
        return False
    fd = os.open(name, os.O_PATH | os.O_NOFOLLOW, dir_fd=dir_fd)
    try:
        if stat.S_ISLNK(os.fstat(fd).st_mode):
            return False
        os.chmod("/proc/self/fd/%d" % fd, mode)
    finally:
        os.close(fd)
    return True


def own_entry(dir_fd: int, name: bytes) -> Optional[os.stat_result]:
    """NAME's lstat when it belongs to the user running this (who may change its mode)."""
    try:
        st = os.lstat(name, dir_fd=dir_fd)
    except OSError:
        return None
    return st if st.st_uid == os.geteuid() else None


class Dirs:
    """The directories under the target, reached one component at a time, never through a
    symbolic link: a link (or a file) where a directory should be is refused with a Problem.

    A directory of the target this user cannot enter but owns (an earlier run gave it its
    backed-up mode, 0o000 say) is opened up for this run (owner rwx added) and its mode put
    back by put_back(), unless the restore sets it (set_mode)."""

    def __init__(self, target: str) -> None:
        self.target = os.fsencode(target)
        self.root_fd = -1
        if HAVE_DIR_FD:
            self.root_fd = os.open(self.target, os.O_RDONLY | os.O_DIRECTORY)
        self.fds: Dict[Tuple[bytes, ...], int] = {}
        self.target_real = os.path.realpath(self.target)
        self.opened_up: Dict[Tuple[bytes, ...], int] = {}  # directory: its mode before

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()
        if self.root_fd >= 0:
            os.close(self.root_fd)
            self.root_fd = -1

    def get(self, parts: Sequence[bytes], create: bool) -> Optional[Where]:
        """The directory PARTS (a tuple of names) below the target; None when it does not
        exist and CREATE is false.  Descriptors returned belong to this object."""
        key = tuple(parts)
        if not HAVE_DIR_FD:
            return self._by_path(key, create)
        if not key:
            return self.root_fd
        fd = self.fds.get(key)
        if fd is not None:
            return fd
        n = len(key) - 1
        while n and key[:n] not in self.fds:
            n -= 1
        fd = self.fds[key[:n]] if n else self.root_fd
        opened = -1
        try:
            for i in range(n, len(key)):
                name = key[i]
                if create:
                    try:
                        try:
                            os.mkdir(name, 0o755, dir_fd=fd)
                        except PermissionError:  # in a directory of ours made read-only?
                            if not self.open_up(key[:i]):
                                raise
                            os.mkdir(name, 0o755, dir_fd=fd)
                    except FileExistsError:
                        pass
                    except OSError as exc:
                        raise Problem(
                            "cannot create directory %s: %s"
                            % (show_bytes(b"/".join(key[: i + 1])), exc.strerror)
                        ) from None
                try:
                    new = self._open(fd, name, key[: i + 1])
                except FileNotFoundError:
                    if create:
                        raise Problem(
                            "directory %s vanished" % show_bytes(b"/".join(key[: i + 1]))
                        ) from None
                    return None
                except OSError as exc:
                    where = show_bytes(b"/".join(key[: i + 1]))
                    if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                        raise Problem(
                            "parent %s in the target is a symbolic link or not a directory; "
                            "refusing to follow it" % where
                        ) from None
                    raise Problem("cannot open %s: %s" % (where, exc.strerror)) from None
                if opened >= 0:
                    os.close(opened)  # intermediate levels are not kept: depth is unbounded
                fd = opened = new
        except BaseException:
            if opened >= 0:
                os.close(opened)
            raise
        while len(self.fds) >= DIR_FD_LIMIT:
            os.close(self.fds.pop(next(iter(self.fds))))
        self.fds[key] = fd
        return fd

    def _open(self, fd: int, name: bytes, key: Tuple[bytes, ...]) -> int:
        flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW
        try:
            return os.open(name, flags, dir_fd=fd)
        except PermissionError:
            st = own_entry(fd, name)
            if st is None or not stat.S_ISDIR(st.st_mode) or key in self.opened_up:
                raise
            if not chmod_here(fd, name, stat.S_IMODE(st.st_mode) | 0o700):
                raise
            self.opened_up[key] = stat.S_IMODE(st.st_mode)
            return os.open(name, flags, dir_fd=fd)

    def open_up(self, key: Tuple[bytes, ...]) -> bool:
        """Add owner rwx to directory KEY, one of this user's that it may enter but not write
        to (a backed-up mode 0o555, given by a run before); False when it cannot or was."""
        if not key or key in self.opened_up or not HAVE_DIR_FD:
            return False
        parent = self.get(key[:-1], create=False)
        if not isinstance(parent, int):
            return False
        st = own_entry(parent, key[-1])
        if st is None or not stat.S_ISDIR(st.st_mode):
            return False
        if not chmod_here(parent, key[-1], stat.S_IMODE(st.st_mode) | 0o700):
            return False
        self.opened_up[key] = stat.S_IMODE(st.st_mode)
        return True

    def set_mode(self, key: Tuple[bytes, ...]) -> None:
        """The restore has given this directory its mode: put_back() leaves it."""
        self.opened_up.pop(tuple(key), None)

    def put_back(self) -> None:
        """Give the directories opened up for this run their modes back, deepest first (one
        reached on the way that must be opened up again is put back in its turn)."""
        done: Set[Tuple[bytes, ...]] = set()
        while True:
            pending = [k for k in self.opened_up if k not in done]
            if not pending:
                break
            key = max(pending, key=len)
            done.add(key)
            try:
                parent = self.get(key[:-1], create=False)
                if isinstance(parent, int) and not chmod_here(parent, key[-1],
                                                              self.opened_up[key]):
                    raise OSError(errno.ENOTSUP, "cannot be done safely here")
            except (OSError, Problem) as exc:
                warn("cannot give directory %s its mode %o back: %s"
                     % (show_bytes(b"/".join(key)), self.opened_up[key], exc))
        self.opened_up.clear()

    def _by_path(self, key: Tuple[bytes, ...], create: bool) -> Optional[bytes]:
        current = self.target
        for part in key:
            current = os.path.join(current, part)
            try:
                st = os.lstat(current)
            except FileNotFoundError:
                if not create:
                    return None
                try:
                    os.mkdir(current)
                except FileExistsError:
                    pass
                except OSError as exc:
                    raise Problem(
                        "cannot create directory %s: %s" % (show_bytes(current), exc.strerror)
                    ) from None
                st = os.lstat(current)
            except OSError as exc:
                raise Problem(
                    "cannot inspect %s: %s" % (show_bytes(current), exc.strerror)
                ) from None
            if stat.S_ISLNK(st.st_mode):
                raise Problem(
                    "parent %s in the target is a symbolic link; refusing to follow it"
                    % show_bytes(current)
                )
            if not stat.S_ISDIR(st.st_mode):
                raise Problem("parent %s in the target is not a directory" % show_bytes(current))
        real = os.path.realpath(current)
        if real != self.target_real and not real.startswith(
            self.target_real.rstrip(os.sep.encode()) + os.sep.encode()
        ):
            raise Problem("parent %s resolves outside the target; refusing" % show_bytes(current))
        return current


# --------------------------------------------------------------------------- the restore


def _size_of(path: str) -> Optional[int]:
    try:
        return os.stat(path).st_size
    except OSError:
        return None


class Restorer:
    def __init__(self, cat: Catalog, roots: List[str], target: str, overwrite: bool) -> None:
        self.cat = cat
        self.roots = roots
        self.target = target
        self.dirs: Optional[Dirs] = None  # opened by run()
        self.overwrite = overwrite
        self.failed = 0
        self.restored = 0
        self.restored_bytes = 0
        self.already_present = 0
        self.links_restored = 0
        self.dirs_restored = 0
        self.tree_failed = 0  # symlinks and directories
        self.missing_tapes: Dict[str, int] = {}
        self.tmp_counter = 0
        self._located: Dict[str, Optional[str]] = {}
        self._given: Optional[Dict[str, str]] = None
        umask = os.umask(0)
        os.umask(umask)
        self.default_mode = 0o666 & ~umask

    # ---- reporting

    def fail(self, entry: Entry, message: str) -> None:
        if entry.done:
            return
        entry.done = True
        entry.problem = message
        self.failed += 1
        self._remove_tmp(entry)
        print("FAILED: %s: %s" % (entry.name(), message), file=sys.stderr, flush=True)

    def _remove_tmp(self, entry: Entry) -> None:
        if entry.tmp_name is not None:
            try:
                parent = self.parent_dir(entry, create=False)
                if parent is not None:
                    os.unlink(at(parent, entry.tmp_name), dir_fd=dfd(parent))
            except (OSError, Problem):
                pass
            entry.tmp_name = None

    # ---- where things are

    def locate(self, container_id: str) -> Optional[str]:
        """Path of the container's blob on one of the given roots, or None. Where several
        roots have a file of that name (a piece an interrupted backup left on another tape),
        the one of the catalog's size wins, on the root of the catalog's tape first."""
        if container_id in self._located:
            return self._located[container_id]
        found: List[str] = []
        own: Optional[str] = None
        if (
            container_id
            and "\0" not in container_id
            and "/" not in container_id
            and "\\" not in container_id
            and container_id not in (".", "..")
        ):
            own = self.given_tapes().get(self.tape_of(container_id))
            for root in ([own] if own else []) + [r for r in self.roots if r != own]:
                for path in (
                    os.path.join(root, "data", container_id),
                    os.path.join(root, container_id),
                ):
                    if os.path.isfile(path):
                        found.append(path)
                        break
        cont = self.cat.containers.get(container_id)
        size = cont.size_bytes if cont is not None else None
        best = next((p for p in found if size is None or _size_of(p) == size), None)
        if best is None and own and found and found[0].startswith(own):
            best = found[0]  # cut short on its own tape: reported as damaged when read
        self._located[container_id] = best  # a piece on another tape is not it
        return best

    def given_tapes(self) -> Dict[str, str]:
        """The tapes among the given roots, each with its root: a root is the tape most of
        whose containers (by the catalog) it holds; one that holds none of them (its data/
        lost or empty) is the tape its tape.json names (ltoflow's simulator keeps one), else
        the tape its folder is named after, when the catalog has a tape of that name."""
        if self._given is None:
            self._given = {}
            unknown: List[str] = []
            for root in self.roots:
                count: Dict[str, int] = {}
                for folder in (os.path.join(root, "data"), root):
                    try:
                        names = os.listdir(folder)
                    except OSError:
                        continue
                    for name in names:
                        cont = self.cat.containers.get(name)
                        if cont is not None and cont.tape_id:
                            count[cont.tape_id] = count.get(cont.tape_id, 0) + 1
                if count:
                    self._given.setdefault(max(sorted(count), key=lambda t: count[t]), root)
                else:
                    unknown.append(root)
            for root in unknown:
                tape = self._named_tape(root)
                if tape is not None:
                    self._given.setdefault(tape, root)
        return self._given

    def _named_tape(self, root: str) -> Optional[str]:
        tapes = set(self.cat.tape_seq)
        try:
            with open(os.path.join(root, "tape.json"), "rb") as fh:
                named = json.loads(fh.read().decode("utf-8")).get("tape_id")
            if isinstance(named, str) and named in tapes:
                return named
        except (OSError, ValueError, AttributeError):
            pass
        name = os.path.basename(os.path.normpath(root))
        return name if name in tapes else None

    def tape_of(self, container_id: str) -> str:
        cont = self.cat.containers.get(container_id)
        if cont is None or not cont.tape_id:
            return "(unknown tape; container %s is not listed in the catalog)" % container_id
        return cont.tape_id

    # ---- path safety

    def check_path(self, entry: Union[Entry, TreeEntry]) -> None:
        raw = entry.raw
        if not raw:
            raise Problem("empty relative_path in the catalog; refusing it")
        if b"\0" in raw:
            raise Problem("relative_path contains a NUL character; refusing it")
        if raw.startswith(b"/") or os.path.isabs(raw):
            raise Problem("relative_path is absolute; refusing to write outside the target")
        parts = raw.split(b"/")
        for part in parts:
            if part in (b"", b".", b".."):
                raise Problem(
                    "relative_path has an empty, '.' or '..' component; refusing to write "
                    "outside the target"
                )
            if (os.sep != "/" and os.sep.encode() in part) or (
                os.altsep and os.altsep.encode() in part
            ):
                raise Problem("relative_path has a path separator inside a name; refusing it")
            if os.name == "nt" and b":" in part:
                raise Problem("relative_path has ':' in a name (not allowed on Windows)")
        entry.components = parts

    def parent_dir(self, entry: Union[Entry, TreeEntry], create: bool) -> Optional[Where]:
        """The parent directory inside the target (None: it does not exist yet).

        Refuses any parent that is a symlink or not a directory, so nothing can be
        written outside the target."""
        assert self.dirs is not None
        return self.dirs.get(entry.components[:-1], create)

    # ---- planning

    def check_segments(self, entry: Entry) -> None:
        """The segments must tile the file exactly: no gap, no overlap, sum = size_bytes."""
        segs = sorted(entry.segments, key=lambda s: s.source_offset)
        pos = 0
        for seg in segs:
            if seg.source_offset < pos:
                raise Problem(
                    "catalog segments overlap at byte %d of the file (segment %s)"
                    % (seg.source_offset, seg.segment_id)
                )
            if seg.source_offset > pos:
                raise Problem(
                    "catalog segments leave a gap at bytes %d..%d of the file"
                    % (pos, seg.source_offset)
                )
            pos += seg.length
        if pos != entry.size:
            raise Problem(
                "catalog segments add up to %d bytes but size_bytes is %d" % (pos, entry.size)
            )
        entry.segments = [s for s in segs if s.length > 0]

    def check_existing(self, entry: Entry) -> None:
        parent = self.parent_dir(entry, create=False)
        if parent is None:
            return
        name = entry.components[-1]
        try:
            st = os.lstat(at(parent, name), dir_fd=dfd(parent))
        except FileNotFoundError:
            return
        except OSError as exc:
            raise Problem("cannot inspect the target file: %s" % exc.strerror) from None
        if stat.S_ISDIR(st.st_mode):
            raise Problem("a directory with this name exists in the target")
        if self.overwrite:
            return
        if stat.S_ISREG(st.st_mode) and st.st_size == entry.size:
            if self.same_as_backup(entry, parent, name, st):
                entry.already_present = True
                return
        raise Problem(
            "already exists in the target and differs from the backup; "
            "not overwritten (use --overwrite to replace it)"
        )

    def same_as_backup(self, entry: Entry, parent: Where, name: bytes,
                       st: os.stat_result) -> bool:
        """Whether the regular file NAME, of the entry's size, holds the backed-up bytes; if
        so it gets the backed-up mode and time too (a restore before, or a copy by hand, may
        have left others). One of this user's that cannot be read (mode 0o000, as restored)
        is made readable to tell, and given its mode back if it differs."""
        flags = os.O_RDONLY | getattr(os, "O_BINARY", 0) | getattr(os, "O_NOFOLLOW", 0)
        where, d = at(parent, name), dfd(parent)
        opened_up = False
        try:
            fd = os.open(where, flags, dir_fd=d)
        except PermissionError:
            if not isinstance(parent, int) or own_entry(parent, name) is None:
                raise
            if not chmod_here(parent, name, stat.S_IMODE(st.st_mode) | 0o400):
                raise
            opened_up = True
            fd = os.open(where, flags, dir_fd=d)
        try:
            same = hash_fd(os.dup(fd)) == entry.sha256
            mode = stat.S_IMODE(st.st_mode)
            if same:
                mode = entry.mode if entry.mode is not None else mode
                try:
                    if entry.mtime_ns is not None and os.utime in os.supports_fd:
                        os.utime(fd, ns=(entry.mtime_ns, entry.mtime_ns))
                    if (opened_up or entry.mode is not None) and os.chmod in os.supports_fd:
                        os.chmod(fd, mode)
                        opened_up = False
                except (OSError, OverflowError, ValueError) as exc:
                    warn("%s: identical to the backup, but its mode or time cannot be set: %s"
                         % (entry.name(), exc))
        finally:  # also after a read error or a Ctrl-C: the mode it had
            if opened_up and os.chmod in os.supports_fd:
                try:
                    os.chmod(fd, stat.S_IMODE(st.st_mode))
                except OSError:
                    pass
            os.close(fd)
        return same

    def plan(self, entries: List[Entry]) -> Dict[str, List[Segment]]:
        by_container: Dict[str, List[Segment]] = {}
        seen_paths: Set[bytes] = set()
        for entry in entries:
            if entry.problem is not None:
                self.fail(entry, entry.problem)
                continue
            try:
                self.check_path(entry)
                key = entry.raw if os.name != "nt" else entry.raw.lower()
                if key in seen_paths:
                    raise Problem("the same relative_path appears twice in the catalog")
                seen_paths.add(key)
                self.parent_dir(entry, create=False)
                self.check_segments(entry)
                missing: List[str] = []
                lost: List[str] = []  # not found on a tape that was given
                for seg in entry.segments:
                    if self.locate(seg.container_id) is None:
                        tape = self.tape_of(seg.container_id)
                        root = self.given_tapes().get(tape)
                        if root is not None:
                            why = "container %s is missing from tape %s (%s), or is not a " \
                                "regular file there" % (seg.container_id, tape, root)
                            if why not in lost:
                                lost.append(why)
                        elif tape not in missing:
                            missing.append(tape)
                for tape in missing:
                    self.missing_tapes[tape] = self.missing_tapes.get(tape, 0) + 1
                if missing:
                    lost.append(
                        "needs tape(s) not given: %s (give the directory of each of these "
                        "tapes as a TAPE_ROOT)" % ", ".join(missing)
                    )
                if lost:
                    raise Problem("; ".join(lost))
                self.check_existing(entry)
            except Problem as exc:
                self.fail(entry, str(exc))
                continue
            except OSError as exc:
                self.fail(entry, "cannot check the target: %s" % (exc.strerror or exc))
                continue
            if entry.already_present:
                entry.done = True
                self.restored += 1
                self.already_present += 1
                self.restored_bytes += entry.size
                continue
            if not entry.segments:
                self.finalize(entry)
                continue
            entry.remaining = len(entry.segments)
            entry.hasher = hashlib.sha256()
            for seg in entry.segments:
                by_container.setdefault(seg.container_id, []).append(seg)
        return by_container

    def container_order(self, container_id: str) -> Tuple[int, int, str]:
        big = 1 << 62
        cont = self.cat.containers.get(container_id)
        if cont is None:
            return (big, big, container_id)
        tape_seq = self.cat.tape_seq.get(cont.tape_id, big)
        seq = cont.sequence_number if cont.sequence_number is not None else big
        return (tape_seq, seq, container_id)

    # ---- writing

    def open_tmp(self, entry: Entry) -> IO[bytes]:
        flags = os.O_WRONLY | getattr(os, "O_BINARY", 0) | getattr(os, "O_NOFOLLOW", 0)
        parent = self.parent_dir(entry, create=True)
        assert parent is not None
        if entry.tmp_name is not None:
            return os.fdopen(os.open(at(parent, entry.tmp_name), flags, dir_fd=dfd(parent)), "wb")
        for _ in range(100):
            self.tmp_counter += 1
            name = ("%s%d-%d.tmp" % (TEMP_PREFIX, os.getpid(), self.tmp_counter)).encode()
            try:
                fd = self.opening_up(entry, functools.partial(
                    os.open, at(parent, name), flags | os.O_CREAT | os.O_EXCL, 0o600,
                    dir_fd=dfd(parent)))
            except FileExistsError:
                continue
            entry.tmp_name = name
            return os.fdopen(fd, "wb")
        raise Problem(
            "cannot create a temporary file in %s" % show_bytes(b"/".join(entry.components[:-1]))
        )

    def copy_segment(self, src: IO[bytes], seg: Segment, chash: Optional[Any]) -> None:
        entry = seg.entry
        try:
            out = self.open_tmp(entry)
        except OSError as exc:
            raise Problem("cannot create the temporary file: %s" % exc.strerror) from None
        in_order = entry.hasher is not None and entry.hashed_upto == seg.source_offset
        if not in_order:
            entry.hasher = None  # hash the finished file instead
        shash = hashlib.sha256()
        with out:
            try:
                out.seek(seg.source_offset)
            except OSError as exc:
                raise Problem("cannot write the temporary file: %s" % exc.strerror) from None
            remaining = seg.length
            while remaining > 0:
                try:
                    buf = src.read(min(CHUNK, remaining))
                except OSError as exc:
                    raise ReadProblem(
                        "read error in container %s: %s (tape damaged?)"
                        % (seg.container_id, exc.strerror or exc)
                    ) from None
                if not buf:
                    raise ReadProblem("container %s ended early" % seg.container_id)
                shash.update(buf)
                if chash is not None:
                    chash.update(buf)
                if in_order and entry.hasher is not None:
                    entry.hasher.update(buf)
                try:
                    out.write(buf)
                except OSError as exc:
                    raise ReadProblem(
                        "cannot write the temporary file: %s" % exc.strerror
                    ) from None
                remaining -= len(buf)
        if in_order:
            entry.hashed_upto += seg.length
        if seg.sha256 is not None and shash.hexdigest() != seg.sha256:
            raise DamagedSegment(
                "SHA-256 mismatch in segment %s (container %s, bytes %d..%d): the data on the "
                "tape is damaged"
                % (
                    seg.segment_id,
                    seg.container_id,
                    seg.container_offset,
                    seg.container_offset + seg.length,
                )
            )

    def finalize(self, entry: Entry) -> None:
        """Verify the whole file, set mode and mtime, and give it its final name."""
        try:
            if entry.tmp_name is None:  # zero-byte file
                self.open_tmp(entry).close()
            assert entry.tmp_name is not None
            parent = self.parent_dir(entry, create=True)
            assert parent is not None
            tmp = at(parent, entry.tmp_name)
            flags = os.O_RDWR | getattr(os, "O_BINARY", 0) | getattr(os, "O_NOFOLLOW", 0)
            fd = os.open(tmp, flags, dir_fd=dfd(parent))
            try:
                size = os.fstat(fd).st_size
                if size != entry.size:
                    raise Problem(
                        "restored %d bytes but the catalog says %d" % (size, entry.size)
                    )
                if entry.hasher is not None and entry.hashed_upto == entry.size:
                    digest = entry.hasher.hexdigest()
                else:
                    digest = hash_fd(os.dup(fd))
                if digest != entry.sha256:
                    raise Problem(
                        "whole-file SHA-256 mismatch (got %s, catalog says %s)"
                        % (digest, entry.sha256)
                    )
                mode = entry.mode if entry.mode is not None else self.default_mode
                if os.chmod in os.supports_fd:
                    os.chmod(fd, mode)
                else:  # pragma: no cover - Windows
                    os.chmod(tmp, mode)
                if entry.mtime_ns is not None:
                    try:
                        if os.utime in os.supports_fd:
                            os.utime(fd, ns=(entry.mtime_ns, entry.mtime_ns))
                        else:  # pragma: no cover - Windows
                            os.utime(tmp, ns=(entry.mtime_ns, entry.mtime_ns))
                    except (OSError, OverflowError, ValueError) as exc:
                        warn("%s: cannot set the modification time: %s" % (entry.name(), exc))
            finally:
                os.close(fd)
            final = at(parent, entry.components[-1])
            d = dfd(parent)
            try:
                st: Optional[os.stat_result] = os.lstat(final, dir_fd=d)
            except FileNotFoundError:
                st = None
            if st is not None:
                if not self.overwrite or stat.S_ISDIR(st.st_mode):
                    raise Problem("appeared in the target during the restore; not overwritten")
                os.replace(tmp, final, src_dir_fd=d, dst_dir_fd=d)
            else:
                os.rename(tmp, final, src_dir_fd=d, dst_dir_fd=d)
            entry.tmp_name = None
        except Problem as exc:
            self.fail(entry, str(exc))
            return
        except OSError as exc:
            self.fail(entry, "cannot finish the file: %s" % (exc.strerror or exc))
            return
        entry.done = True
        self.restored += 1
        self.restored_bytes += entry.size

    # ---- reading containers

    def process_container(self, container_id: str, segs: List[Segment], number: str) -> None:
        segs = [s for s in segs if not s.entry.done]
        if not segs:
            return
        segs.sort(key=lambda s: (s.container_offset, s.source_offset))
        path = self.locate(container_id)
        assert path is not None
        say("%s reading %s (%d piece(s))" % (number, path, len(segs)))
        try:
            src = open(path, "rb")
        except OSError as exc:
            for seg in segs:
                self.fail(seg.entry, "cannot open container %s: %s" % (path, exc.strerror))
            return
        with src:
            actual_size = os.fstat(src.fileno()).st_size
            cont = self.cat.containers.get(container_id)
            if cont is not None and cont.size_bytes is not None and cont.size_bytes != actual_size:
                warn(
                    "container %s holds %d bytes but the catalog says %d%s"
                    % (path, actual_size, cont.size_bytes,
                       "; the bytes past that belong to no file" if actual_size > cont.size_bytes
                       else "")
                )
            chash: Optional[Any] = hashlib.sha256() if cont is not None and cont.sha256 else None
            pos = 0  # -1: position unknown
            for seg in segs:
                entry = seg.entry
                if entry.done:
                    continue
                end = seg.container_offset + seg.length
                if end > actual_size:
                    self.fail(
                        entry,
                        "segment %s needs bytes %d..%d of container %s, which holds only %d bytes"
                        % (seg.segment_id, seg.container_offset, end, container_id, actual_size),
                    )
                    continue
                try:
                    if seg.container_offset != pos:
                        gap = seg.container_offset - pos
                        if chash is not None and pos >= 0 and 0 < gap <= READ_THROUGH_GAP:
                            skip_by_reading(src, gap, chash)
                        else:
                            src.seek(seg.container_offset)
                            chash = None
                        pos = seg.container_offset
                    self.copy_segment(src, seg, chash)
                    pos = end
                except DamagedSegment as exc:
                    pos = end  # read completely: the position and container hash stay valid
                    self.fail(entry, str(exc))
                    continue
                except Problem as exc:
                    pos, chash = -1, None  # position unknown: seek for the next piece
                    self.fail(entry, str(exc))
                    continue
                except OSError as exc:
                    pos, chash = -1, None
                    self.fail(entry, "read error in container %s: %s" % (path, exc.strerror))
                    continue
                entry.remaining -= 1
                if entry.remaining == 0:
                    self.finalize(entry)
            if cont is not None and cont.sha256 and chash is not None and pos >= 0:
                try:  # up to the catalog's size: bytes appended later are no file's
                    tail = min(actual_size, cont.size_bytes or actual_size) - pos
                    if 0 <= tail <= READ_THROUGH_GAP:
                        skip_by_reading(src, tail, chash)
                        if chash.hexdigest() != cont.sha256:
                            warn(
                                "container %s does not match its SHA-256 in the catalog "
                                "(the tape is damaged; affected files are reported)" % path
                            )
                except OSError:
                    pass

    def run(self, entries: List[Entry], links: List[TreeEntry], dirs: List[TreeEntry]) -> None:
        try:
            self.dirs = Dirs(self.target)
        except OSError as exc:
            raise UsageError(
                "cannot open --target %s: %s" % (self.target, exc.strerror or exc)
            ) from None
        by_container = self.plan(entries)
        order = sorted(by_container, key=self.container_order)
        for i, container_id in enumerate(order, 1):
            self.process_container(
                container_id, by_container[container_id], "[%d/%d]" % (i, len(order))
            )
        for entry in entries:
            if not entry.done:  # cannot happen; never claim success for a file by accident
                self.fail(entry, "was not completely restored")
        self.cleanup(entries)  # before the directories get their times
        for link in links:
            self.tree_guarded(link, self.make_link)
        # Deepest first: a directory's contents are complete (and its children's times set)
        # before its own permissions and time are set.
        for d in sorted(dirs, key=lambda d: -d.raw.count(b"/")):
            self.tree_guarded(d, self.set_directory)

    def tree_guarded(self, item: TreeEntry, action: Any) -> None:
        try:
            if item.problem is not None:
                raise Problem(item.problem)
            self.check_path(item)
            action(item)
        except Problem as exc:
            self.tree_failed += 1
            print("FAILED: %s: %s" % (item.name(), exc), file=sys.stderr, flush=True)
        except OSError as exc:
            self.tree_failed += 1
            print(
                "FAILED: %s: cannot restore the %s: %s"
                % (item.name(), item.kind, exc.strerror or exc),
                file=sys.stderr,
                flush=True,
            )

    def opening_up(self, item: Union[Entry, TreeEntry], action: Any) -> Any:
        """ACTION's result, in ITEM's directory; again once that is opened up if it was
        refused (a directory of this user's that a run before made read-only)."""
        assert self.dirs is not None
        try:
            return action()
        except PermissionError:
            if not self.dirs.open_up(tuple(item.components[:-1])):
                raise
            return action()

    def make_link(self, link: TreeEntry) -> None:
        """Create the symbolic link (never following it), replacing a file only with
        --overwrite."""
        parent = self.parent_dir(link, create=True)
        assert parent is not None
        name, d = at(parent, link.components[-1]), dfd(parent)
        try:
            st: Optional[os.stat_result] = os.lstat(name, dir_fd=d)
        except FileNotFoundError:
            st = None
        if st is not None:
            if stat.S_ISLNK(st.st_mode) and os.readlink(name, dir_fd=d) == link.target:
                pass  # restored before: keep it
            elif not self.overwrite:
                raise Problem(
                    "already exists in the target; not overwritten (use --overwrite to replace it)"
                )
            elif stat.S_ISDIR(st.st_mode):
                raise Problem("a directory with this name exists in the target")
            else:
                self.opening_up(link, lambda: os.unlink(name, dir_fd=d))
                st = None
        if st is None:
            self.opening_up(link, lambda: os.symlink(link.target, name, dir_fd=d))
        if link.mtime_ns is not None and os.utime in os.supports_follow_symlinks:
            try:
                os.utime(name, ns=(link.mtime_ns, link.mtime_ns), dir_fd=d, follow_symlinks=False)
            except (OSError, OverflowError, ValueError) as exc:
                warn("%s: cannot set the link's modification time: %s" % (link.name(), exc))
        self.links_restored += 1

    def set_directory(self, d: TreeEntry) -> None:
        """Create the directory if missing (empty ones too); set its permissions and time."""
        assert self.dirs is not None
        where = self.dirs.get(d.components, create=True)
        assert where is not None
        if isinstance(where, int):
            if d.mode is not None:
                os.chmod(where, d.mode)
                self.dirs.set_mode(tuple(d.components))
            if d.mtime_ns is not None:
                os.utime(where, ns=(d.mtime_ns, d.mtime_ns))
        else:  # pragma: no cover - no dir_fd support (Windows)
            if d.mode is not None:
                os.chmod(where, d.mode)
            if d.mtime_ns is not None:
                os.utime(where, ns=(d.mtime_ns, d.mtime_ns))
        self.dirs_restored += 1

    def cleanup(self, entries: List[Entry]) -> None:
        if self.dirs is None:
            return
        for entry in entries:
            self._remove_tmp(entry)

    def close(self) -> None:
        if self.dirs is not None:
            self.dirs.put_back()
            self.dirs.close()
            self.dirs = None


def skip_by_reading(src: IO[bytes], count: int, chash: Any) -> None:
    while count > 0:
        buf = src.read(min(CHUNK, count))
        if not buf:
            raise ReadProblem("container ended early")
        chash.update(buf)
        count -= len(buf)


def hash_fd(fd: int) -> str:
    """SHA-256 of an open file from its start; the descriptor is closed."""
    h = hashlib.sha256()
    with os.fdopen(fd, "rb") as f:
        while True:
            buf = f.read(CHUNK)
            if not buf:
                break
            h.update(buf)
    return h.hexdigest()


def hash_file(path: str) -> str:
    return hash_fd(os.open(path, os.O_RDONLY | getattr(os, "O_BINARY", 0)))


# --------------------------------------------------------------------------- commands


def list_files(
    cat: Catalog,
    entries: List[Entry],
    roots: List[str],
    links: Sequence[TreeEntry] = (),
    dirs: Sequence[TreeEntry] = (),
) -> int:
    restorer = Restorer(cat, roots, ".", overwrite=False)
    total = 0
    all_tapes: Set[str] = set()
    for entry in entries:
        if entry.problem is not None:
            say("%15s  %s  [unusable catalog entry: %s]" % ("?", entry.name(), entry.problem))
            continue
        tapes: List[str] = []
        missing: List[str] = []
        for seg in sorted(entry.segments, key=lambda s: s.source_offset):
            tape = restorer.tape_of(seg.container_id)
            if tape not in tapes:
                tapes.append(tape)
            if restorer.locate(seg.container_id) is None and tape not in missing:
                missing.append(tape)
        all_tapes.update(tapes)
        line = "%15s  %s  tapes: %s" % (
            "{:,}".format(entry.size),
            entry.name(),
            ", ".join(tapes) if tapes else "(empty file, no data)",
        )
        if missing:
            line += "  [not on the given roots: %s]" % ", ".join(missing)
        say(line)
        total += entry.size
    for link in links:
        say("%15s  %s -> %s" % ("symlink", link.name(), show_bytes(link.target)))
    for d in dirs:
        say("%15s  %s/" % ("directory", d.name()))
    say("%d files, %s bytes, on %d tape(s)" % (len(entries), "{:,}".format(total), len(all_tapes)))
    if links or dirs:
        say("%d symbolic links, %d directories" % (len(links), len(dirs)))
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="restore.py",
        description="Restore files from an ltoflow tape set (no ltoflow needed). "
        "Each TAPE_ROOT is a directory holding a tape's data/ and catalog/ folders.",
    )
    parser.add_argument("roots", nargs="+", metavar="TAPE_ROOT", help="tape root directory")
    parser.add_argument("--target", metavar="DIR", help="restore into this directory")
    parser.add_argument("--catalog", metavar="FILE", help="use this catalog.json")
    parser.add_argument(
        "--list", action="store_true", help="only list the files, sizes and tapes; restore nothing"
    )
    parser.add_argument(
        "--only",
        action="append",
        default=[],
        metavar="GLOB",
        help="restore only paths matching GLOB (fnmatch; a directory selects everything "
        "under it); may be repeated",
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace files that already exist in DIR"
    )
    parser.add_argument(
        "--force-catalog",
        action="store_true",
        help="use a catalog that does not match its catalog.sha256 (at your own risk)",
    )
    parser.add_argument(
        "--skip-self-check",
        action="store_true",
        help="run although this copy of restore.py does not match the SHA256SUMS beside it "
        "(at your own risk: use when SHA256SUMS is the damaged one and no other tape is at hand)",
    )
    return parser


def check_own_copy() -> None:
    """Refuse to run from a damaged copy of this program: its SHA-256 must be the one in the
    SHA256SUMS beside it (written to tape with it). A copy without one is not checked."""
    here = os.path.abspath(__file__)
    sums = os.path.join(os.path.dirname(here), "SHA256SUMS")
    try:
        with open(sums, "rb") as f:
            lines = f.read(1 << 16).decode("utf-8", "replace").splitlines()
    except OSError:
        return
    expected = None
    for line in lines:
        digest, _, name = line.partition(" ")
        if name.lstrip(" *") == os.path.basename(here) and len(digest) == 64:
            expected = digest.lower()
    if expected is None:
        return
    actual = hash_file(here)
    if actual != expected:
        raise UsageError(
            "this copy of restore.py (%s) is damaged, or the SHA256SUMS beside it is: its "
            "SHA-256 is %s, SHA256SUMS says %s; run recovery/restore.py from another tape of "
            "the set (check a copy with `sha256sum -c SHA256SUMS` in its recovery/ directory), "
            "or, if only SHA256SUMS is damaged, add --skip-self-check" % (here, actual, expected))


def run(args: argparse.Namespace) -> int:
    if not args.skip_self_check:
        check_own_copy()
    roots: List[str] = list(args.roots)
    for root in roots:
        if not os.path.isdir(root):
            raise UsageError("tape root %s is not a directory" % root)
        if not os.path.isdir(os.path.join(root, "data")) and not os.path.isdir(
            os.path.join(root, "catalog")
        ):
            warn("%s has no data/ or catalog/ folder; is it really a tape root?" % root)
    if not args.list and not args.target:
        raise UsageError("say where to restore with --target DIR (or use --list)")
    cat = load_catalog(roots, args.catalog, args.force_catalog)
    everything: List[Union[Entry, TreeEntry]] = [*cat.entries, *cat.links, *cat.dirs]
    given = [relative(p) for p in args.only]
    # A pattern that is the exact bytes of a path (or of a directory above one) means those
    # entries only, not also a name whose readable rendering it equals (`\xff` written in four
    # characters, beside the single byte 0xff).
    named = [(p, os.fsencode(p.rstrip("/") or p)) for p in given]
    exact = [b for _, b in named if any(under(e.raw, b) for e in everything)]
    patterns: List[str] = literal_patterns([p for p, b in named if b not in exact], everything)
    # A pattern that matches no name as it is matches names as --list shows them.
    plain = [p for p in patterns if any(selected(e.rel, [p], e.raw) for e in everything)]
    as_shown = [p for p in patterns if p not in plain]

    def chosen(e: Union[Entry, TreeEntry]) -> bool:
        if not given:
            return True
        return any(under(e.raw, b) for b in exact) or bool(
            plain and selected(e.rel, plain, e.raw)) or bool(
            as_shown and selected(e.rel, as_shown, e.raw, shown=True))

    entries = [e for e in cat.entries if chosen(e)]
    links = [e for e in cat.links if chosen(e)]
    dirs = [e for e in cat.dirs if chosen(e)]
    unmatched = [pat for pat in as_shown
                 if not any(selected(e.rel, [pat], e.raw, shown=True) for e in everything)
                 and not any(selected(k[0], skipped_patterns([pat])) for k in cat.skipped)]
    if unmatched:  # a typo: refused before any tape is read, as ltoflow restore does
        raise UsageError("nothing in the catalog matches %s; nothing restored (see --list)"
                         % ", ".join(repr(p) for p in unmatched))
    # A skipped entry keeps only the rendering of its path: every pattern is matched against it.
    skipped = [k for k in cat.skipped
               if selected(k[0], skipped_patterns(literal_patterns(given, everything)))]
    for rel, kind, reason in skipped:
        if kind == "directory":  # itself restored (empty), not its contents
            say("skipped by the backup, not restored: the contents of %s (directory): %s"
                % (show(rel), reason))
        else:
            say("skipped by the backup, not restored: %s (%s): %s" % (show(rel), kind, reason))
    if given and not (entries or links or dirs):  # each matched a skipped entry only
        return EXIT_OK if args.list else EXIT_SKIPPED
    if args.list:
        return list_files(cat, entries, roots, links, dirs)

    target: str = args.target
    if os.path.lexists(target) and not os.path.isdir(target):
        raise UsageError("--target %s exists and is not a directory" % target)
    try:
        os.makedirs(target, exist_ok=True)
    except OSError as exc:
        raise UsageError("cannot create --target %s: %s" % (target, exc.strerror)) from None
    try:  # before hours of reading: a read-only filesystem, no permission
        fd, probe = tempfile.mkstemp(prefix=".ltoflow-probe-", dir=target)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise UsageError(
            "cannot write into --target %s: %s; give a directory this user can write to"
            % (target, exc.strerror)
        ) from None

    restorer = Restorer(cat, roots, target, args.overwrite)
    try:
        restorer.run(entries, links, dirs)
    finally:
        restorer.cleanup(entries)
        restorer.close()

    if restorer.missing_tapes:
        say("files needing tapes that were not given:")
        for tape in sorted(restorer.missing_tapes, key=lambda t: (cat.tape_seq.get(t, 1 << 62), t)):
            say("  %s: %d file(s)" % (tape, restorer.missing_tapes[tape]))
    if restorer.already_present:
        say(
            "%d file(s) were already present in the target and verified identical"
            % restorer.already_present
        )
    say(
        "restored %d of %d files (%s bytes); %d failed%s"
        % (restorer.restored, len(entries), "{:,}".format(restorer.restored_bytes), restorer.failed,
           "; %d selected entr%s skipped by the backup, not in it (listed above)"
           % (len(skipped), "y" if len(skipped) == 1 else "ies") if skipped else "")
    )
    if links or dirs:
        say(
            "restored %d of %d symbolic links and %d of %d directories; %d failed"
            % (restorer.links_restored, len(links), restorer.dirs_restored, len(dirs),
               restorer.tree_failed)
        )
    if restorer.failed or restorer.tree_failed:
        return EXIT_FAILED
    return EXIT_SKIPPED if skipped else EXIT_OK


def main(argv: Optional[Sequence[str]] = None) -> int:
    _setup_stdio()
    args = build_parser().parse_args(argv)
    # SIGTERM (kill, systemd, timeout) as Ctrl-C: the temporary file of the file being written
    # is removed, rather than left behind by a silent death.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        return run(args)
    except UsageError as exc:
        print("error: %s" % exc, file=sys.stderr, flush=True)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("interrupted; temporary files removed", file=sys.stderr, flush=True)
        return 130


if __name__ == "__main__":
    sys.exit(main())
