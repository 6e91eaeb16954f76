"""Paths as exact bytes, and directory descriptors for trees deeper than PATH_MAX.

A name on disk is any bytes but '/' and NUL. The catalog keeps a readable rendering of every
path as a JSON string and, only for names that are not valid UTF-8, the exact bytes beside it in
base64. Source and target trees are walked one component at a time through directory
descriptors opened with O_NOFOLLOW, so a path of any length works and no symlink is followed.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import errno
import functools
import os
import stat
import tempfile
from pathlib import Path

#: Directory descriptors one `DirFds` keeps open; the oldest are closed first.
DIR_FD_LIMIT = 64
#: Below this many bytes a full path is opened directly (one syscall, no descriptors to keep);
#: PATH_MAX is 4096 on Linux.
SHORT_PATH_BYTES = 4000
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
#: For directories only used to open what is in them: search permission is enough.
_PATH_FLAGS = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def check_writable(root: Path) -> None:
    """Raise OSError unless a file can be made in directory `root`, or, where it does not exist
    yet, in the nearest directory above it that does (a file is made there and removed)."""
    there = root.absolute()
    while not there.exists() and there != there.parent:
        there = there.parent
    if not there.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(there))
    fd, probe = tempfile.mkstemp(prefix=".ltoflow-probe-", dir=there)
    os.close(fd)
    Path(probe).unlink()


def fd_path(fd: int) -> Path:
    """A path to what descriptor `fd` is open on (an O_PATH one too), for the calls that take
    no such descriptor (chmod, utime): /proc/self/fd/N, which Linux resolves to it itself.
    Only where have_fd_paths()."""
    return Path(f"/proc/self/fd/{fd}")


@functools.cache
def have_fd_paths() -> bool:
    """Whether fd_path works here: /proc is mounted (not in a chroot without it, say)."""
    return Path("/proc/self/fd").is_dir()


def chmod_nofollow(dir_fd: int, name: bytes, mode: int) -> None:
    """Set the mode of `name` in `dir_fd`, never through a symlink put there meanwhile: on an
    O_PATH descriptor of the entry itself (through /proc/self/fd, as Linux has no lchmod).
    OSError ELOOP when `name` is a symlink, or where that cannot be done safely (no /proc)."""
    fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    try:
        if stat.S_ISLNK(os.fstat(fd).st_mode) or not have_fd_paths():
            raise OSError(errno.ELOOP, "not changed: a symlink, or no /proc to change it safely",
                          name)
        fd_path(fd).chmod(mode)
    finally:
        os.close(fd)


def display(raw: bytes) -> str:
    """A readable, JSON-safe rendering of a path: UTF-8 as is, other bytes as `\\xNN`."""
    return raw.decode("utf-8", errors="backslashreplace")


def shown(text: str) -> str:
    """`text` for one line of output: control characters (a newline in a name) escaped, and
    in double quotes when it begins or ends with a space (which a reader would not see)."""
    if not text.isprintable():
        text = "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in text)
    if text[:1].isspace() or text[-1:].isspace():
        return f'"{text}"'
    return text


def shown_in_list(text: str) -> str:
    """shown(), for a list joined with ", ": in double quotes when it holds ", " too."""
    text = shown(text)
    return f'"{text}"' if ", " in text and not text.startswith('"') else text


def b64_if_needed(raw: bytes) -> str | None:
    """The base64 of `raw` when it is not valid UTF-8 (its rendering is then lossy), else None."""
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return base64.b64encode(raw).decode("ascii")
    return None


def exact(text: str, b64: str | None) -> bytes:
    """The exact bytes of a catalog path: its base64 when present, else its UTF-8 text.

    Raises ValueError when the base64 is damaged.
    """
    if b64 is None:
        return text.encode("utf-8", "surrogatepass")
    try:
        return base64.b64decode(b64, validate=True)
    except binascii.Error as e:
        raise ValueError(f"the base64 of {text!r} is damaged: {e}") from e


def b64_size(n: int) -> int:
    """Characters of the base64 of `n` bytes."""
    return (n + 2) // 3 * 4


def split(rel: bytes) -> tuple[bytes, ...]:
    return tuple(rel.split(b"/")) if rel else ()


class DirFds:
    """Descriptors of the directories under `root_fd`, opened a component at a time.

    No component is followed if it is a symlink (OSError ELOOP, or ENOTDIR for a file; its
    `filename` is the relative path up to the component that failed). With
    `create`, missing directories are made (mode 0o755); with `path_only` they are opened
    O_PATH, good only as `dir_fd` (no read permission needed, as for a path). At most
    DIR_FD_LIMIT descriptors stay
    open besides the root, the least recently asked for closed first, so depth is not limited by
    the descriptor limit: a walk that goes deeper one level at a time opens one directory a
    level. A descriptor just returned stays open while the next one is opened (a directory and
    its parent, say). Not thread-safe.
    """

    def __init__(self, root_fd: int, *, create: bool = False, path_only: bool = False) -> None:
        self.root_fd = root_fd
        self.create = create
        self._flags = _PATH_FLAGS if path_only else _DIR_FLAGS
        self._fds: dict[tuple[bytes, ...], int] = {}

    def open(self, parts: tuple[bytes, ...]) -> int:
        """The descriptor of the directory `parts` (() is the root); owned by this object."""
        if not parts:
            return self.root_fd
        fd = self._fds.pop(parts, None)
        if fd is not None:
            self._fds[parts] = fd  # the most recently asked for: closed last
            return fd
        n = len(parts) - 1
        while n and parts[:n] not in self._fds:
            n -= 1
        fd = self._fds[parts[:n]] if n else self.root_fd
        opened = -1
        depth = n
        try:
            for name in parts[n:]:
                depth += 1
                if self.create:
                    with contextlib.suppress(FileExistsError):
                        os.mkdir(name, 0o755, dir_fd=fd)
                new = os.open(name, self._flags, dir_fd=fd)
                if opened >= 0:
                    os.close(opened)  # intermediate levels are not kept: depth is unbounded
                fd = opened = new
        except OSError as e:
            e.filename = b"/".join(parts[:depth])  # the component that failed
            if opened >= 0:
                os.close(opened)
            raise
        except BaseException:
            if opened >= 0:
                os.close(opened)
            raise
        while len(self._fds) >= DIR_FD_LIMIT:
            os.close(self._fds.pop(next(iter(self._fds))))
        self._fds[parts] = fd
        return fd

    def close(self) -> None:
        """Close every descriptor but the root, which belongs to the caller."""
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
