"""Fake `umount` and `fusermount` that really unmount, but only fake LTFS mounts.

`umount` hands its arguments to the system's umount (util-linux), so messages and exit codes are
the real ones; it refuses only a target that is mounted but is not a fake LTFS mount, so a bug
can never unmount the machine's filesystems from a test. `fusermount -u [-z] [-q] MOUNTPOINT`
unmounts a fuse mount with umount2(2), as the real one does for root.
Neither waits for the ltfs daemon: it goes on writing its index after the kernel unmount.
"""

# ruff: noqa: PTH100, PTH112, PTH119, PTH120
# os.path.abspath (not Path.resolve) on purpose: resolving a lost mount point fails (ENOTCONN).

from __future__ import annotations

import ctypes
import os
import sys

from tests.fakes import cartridge as cart

MNT_FORCE = 1
MNT_DETACH = 2


def _real_umount() -> str | None:
    here = os.path.dirname(os.path.abspath(sys.argv[0]))
    for d in [*os.environ.get("PATH", "").split(os.pathsep), "/usr/bin", "/bin", "/usr/sbin"]:
        if not d or os.path.abspath(d) == here:
            continue
        candidate = os.path.join(d, "umount")
        if os.access(candidate, os.X_OK) and not os.path.isdir(candidate):
            return candidate
    return None


def umount_main(argv: list[str]) -> int:
    args = argv[1:]
    takes_value = {"-t", "-O", "--types", "--test-opts", "-N", "--namespace"}
    targets: list[str] = []
    skip = False
    for a in args:
        if skip:
            skip = False
            continue
        if a in takes_value:
            skip = True
        elif not a.startswith("-"):
            targets.append(a)
    for t in targets:
        entries = cart.mounts_at(os.path.abspath(t))
        if entries and not entries[-1].source.startswith("ltfs:"):
            e = entries[-1]
            sys.stderr.write(f"umount: {t}: the fake umount refuses to unmount a mount that is "
                             f"not a fake LTFS mount ({e.fstype} from {e.source})\n")
            return 32
    real = _real_umount()
    if real is None:
        sys.stderr.write("umount: the system umount was not found on PATH\n")
        return 1
    os.execv(real, ["umount", *args])
    return 1  # not reached


def fusermount_main(argv: list[str]) -> int:
    args = argv[1:]
    unmount = lazy = quiet = False
    paths: list[str] = []
    for a in args:
        if a.startswith("-") and not a.startswith("--") and len(a) > 1:
            for ch in a[1:]:
                if ch == "u":
                    unmount = True
                elif ch == "z":
                    lazy = True
                elif ch == "q":
                    quiet = True
                elif ch == "V":
                    print("fusermount version: 2.9.9")
                    return 0
                elif ch == "h":
                    print("fusermount: [options] mountpoint\n -u  unmount\n -q  quiet\n"
                          " -z  lazy unmount")
                    return 0
                else:
                    sys.stderr.write(f"fusermount: invalid option -- '{ch}'\n")
                    return 1
        else:
            paths.append(a)
    if len(paths) != 1:
        sys.stderr.write("fusermount: missing mountpoint argument\n")
        return 1
    if not unmount:
        sys.stderr.write("fusermount: the fake supports only -u (mounting is done by ltfs)\n")
        return 1
    mp = os.path.abspath(paths[0])
    entries = cart.mounts_at(mp)
    if not entries or entries[-1].fstype.split(".")[0] not in ("fuse", "fuseblk"):
        if not quiet:
            sys.stderr.write(f"fusermount: entry for {mp} not found in /etc/mtab\n")
        return 1
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.umount2(mp.encode(), MNT_DETACH if lazy else 0) != 0:
        err = ctypes.get_errno()
        if not quiet:
            sys.stderr.write(f"fusermount: failed to unmount {mp}: {os.strerror(err)}\n")
        return 1
    return 0


if __name__ == "__main__":
    name = os.path.basename(sys.argv[0])
    sys.exit(fusermount_main(sys.argv) if name == "fusermount" else umount_main(sys.argv))
