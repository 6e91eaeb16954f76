"""Scan a source tree: stat only (plus an access() probe), never read contents, sorted by the
path's bytes.

The plan depends only on what the scan returns (names, sizes), so the same tree gives the same
plan. Anything that is not a regular file or a directory is recorded as skipped with its kind, so
nothing goes missing silently; later issues back symlinks up for real. Regular files this user
may not read are skipped as well ("permission denied"); I/O errors only show when reading.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import attrs

from ltoflow.errors import UsageError

UNREADABLE = "permission denied: this user cannot read it"


@attrs.frozen
class ScannedFile:
    """A regular file as the scan saw it; `relative_path` uses '/' and is valid UTF-8."""

    relative_path: str
    size: int
    mtime_ns: int
    mode: int


@attrs.frozen
class SkippedEntry:
    """Something under the source that is not backed up, and why."""

    relative_path: str
    kind: str
    reason: str


@attrs.frozen
class ScanResult:
    root: Path
    files: tuple[ScannedFile, ...]
    skipped: tuple[SkippedEntry, ...]

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)


def _kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISLNK, "symlink"),
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
    non-regular files end up in `skipped`, never silently dropped.
    """
    root = root.absolute()
    if not root.exists():
        raise UsageError(f"source directory {root} does not exist; check --source")
    if not root.is_dir():
        raise UsageError(f"source {root} is not a directory; --source takes a directory")
    files: list[tuple[bytes, ScannedFile]] = []
    skipped: list[SkippedEntry] = []
    root_b = os.fsencode(root)
    stack: list[bytes] = [b""]
    while stack:
        rel_dir = stack.pop()
        try:
            with os.scandir(os.path.join(root_b, rel_dir) if rel_dir else root_b) as it:
                entries = list(it)
        except OSError as e:
            if not rel_dir:  # the source itself: an empty backup would look like success
                raise UsageError(f"cannot list the source directory {root}: {e.strerror}") from e
            skipped.append(
                SkippedEntry(_display(rel_dir), "directory", f"cannot list: {e.strerror}")
            )
            continue
        for entry in entries:
            rel = os.path.join(rel_dir, entry.name) if rel_dir else entry.name
            try:
                st = entry.stat(follow_symlinks=False)
            except OSError as e:
                skipped.append(SkippedEntry(_display(rel), "unknown", f"cannot stat: {e.strerror}"))
                continue
            if stat.S_ISDIR(st.st_mode):
                stack.append(rel)
                continue
            try:
                text = rel.decode("utf-8")
            except UnicodeDecodeError:
                skipped.append(
                    SkippedEntry(_display(rel), _kind(st.st_mode) if not stat.S_ISREG(st.st_mode)
                                 else "file", "name is not valid UTF-8")
                )
                continue
            if stat.S_ISREG(st.st_mode):
                # One access() per file (a few µs, no open): a file this user may not read is
                # skipped now, with its reason, instead of failing the job halfway.
                if not os.access(entry.path, os.R_OK):
                    skipped.append(SkippedEntry(text, "file", UNREADABLE))
                    continue
                files.append((rel, ScannedFile(text, st.st_size, st.st_mtime_ns, st.st_mode)))
            else:
                skipped.append(SkippedEntry(text, _kind(st.st_mode), "not a regular file"))
    files.sort(key=lambda pair: pair[0])
    skipped.sort(key=lambda s: s.relative_path)
    return ScanResult(root, tuple(f for _, f in files), tuple(skipped))


def _display(rel: bytes) -> str:
    """A printable, JSON-safe rendering of a path that may not be UTF-8."""
    return rel.decode("utf-8", errors="backslashreplace") or "."
