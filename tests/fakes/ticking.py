"""A read-only FUSE view of a directory in which every file named `*.ticking` reports a new
change time (ctime) at each stat, its size, mtime and bytes unchanged: as a file rewritten in
place while it is read, by a writer that puts its mtime back, looks to the one reading it.

    python -m tests.fakes.ticking SOURCE MOUNTPOINT READY_FD

serves in the foreground until unmounted, and writes "ok" to READY_FD once mounted. With no
attribute caching, each fstat reaches `getattr`. Only tests use it (`ticking_mount` in
tests/test_source_faults.py), as root with FUSE (the fake LTFS's conditions).
"""

from __future__ import annotations

import errno
import itertools
import os
import sys
from typing import Any

from fuse import FUSE, FuseOSError, Operations  # type: ignore[import-untyped]  # no hints


class Ticking(Operations):  # type: ignore[misc]  # fusepy's base class is untyped
    use_ns = True

    def __init__(self, root: str, ready_fd: int) -> None:
        self.root = root
        self.ready_fd = ready_fd
        self.ticks = itertools.count(1)

    def _real(self, path: str) -> str:
        return os.path.join(self.root, path.lstrip("/"))

    def init(self, path: str) -> None:
        os.write(self.ready_fd, b"ok")
        os.close(self.ready_fd)

    def getattr(self, path: str, fh: int | None = None) -> dict[str, int]:
        try:
            st = os.lstat(self._real(path))
        except OSError as e:
            raise FuseOSError(e.errno) from None
        ctime = st.st_ctime_ns
        if path.endswith(".ticking"):
            ctime += next(self.ticks) * 1000  # a microsecond later at every look
        return {
            "st_mode": st.st_mode, "st_ino": st.st_ino, "st_nlink": st.st_nlink,
            "st_uid": st.st_uid, "st_gid": st.st_gid, "st_size": st.st_size,
            "st_atime": st.st_atime_ns, "st_mtime": st.st_mtime_ns, "st_ctime": ctime,
        }

    def readdir(self, path: str, fh: int) -> list[str]:
        return [".", "..", *sorted(os.listdir(self._real(path)))]

    def open(self, path: str, flags: int) -> int:
        if flags & (os.O_WRONLY | os.O_RDWR):
            raise FuseOSError(errno.EROFS)
        return os.open(self._real(path), os.O_RDONLY)

    def read(self, path: str, size: int, offset: int, fh: int) -> bytes:
        return os.pread(fh, size, offset)

    def release(self, path: str, fh: int) -> None:
        os.close(fh)

    def statfs(self, path: str) -> dict[str, Any]:
        st = os.statvfs(self.root)
        return {k: getattr(st, k) for k in ("f_bsize", "f_frsize", "f_blocks", "f_bfree",
                                            "f_bavail", "f_files", "f_ffree", "f_namemax")}


def main(argv: list[str]) -> int:
    source, mountpoint, ready_fd = argv[1], argv[2], int(argv[3])
    FUSE(Ticking(source, ready_fd), mountpoint, foreground=True, nothreads=True, ro=True,
         attr_timeout="0", entry_timeout="0", negative_timeout="0", use_ino=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
