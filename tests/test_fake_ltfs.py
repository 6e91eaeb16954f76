"""The fake LTFS tools (tests/fakes) behave like LTFS 2.4.8 at the OS level.

Only plain subprocess and os calls here, never ltoflow: these tests pin down what the LTFS
adapter's tests can rely on.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.fakes import BLOCK_SIZE, MIB, mount_table, mounts_at
from tests.fakes.harness import FakeLtfs

pytest_plugins = ["tests.fakes.fixtures"]

MiB = 1024 * 1024
FAST: dict[str, Any] = {"unmount_delay_s": 0.05}


def run(*argv: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=30,
                          check=False)


def mount(dev: Path, mp: Path, *options: str) -> subprocess.CompletedProcess[str]:
    argv: list[str | Path] = ["ltfs", "-o", f"devname={dev}"]
    for opt in options:
        argv += ["-o", opt]
    done = run(*argv, mp)
    assert done.returncode == 0, done.stderr
    return done


def unmount_and_wait(fake: FakeLtfs, dev: Path, mp: Path) -> None:
    done = run("umount", mp)
    assert done.returncode == 0, done.stderr
    assert fake.wait_ltfs_exit(dev, 10)


def eventually(cond: Callable[[], bool], what: str, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, what
        time.sleep(0.005)


def errno_of(fn: Callable[..., object], *args: object) -> int:
    """The errno of the OSError that fn(*args) raises."""
    with pytest.raises(OSError, match=r"^\[Errno \d+\]") as info:
        fn(*args)
    assert info.value.errno is not None
    return info.value.errno


def write_chunks(path: Path, chunk: int, count: int) -> list[int | str]:
    """os.write `count` chunks; the result of each: bytes written, or the errno name."""
    out: list[int | str] = []
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        for _ in range(count):
            try:
                out.append(os.write(fd, b"\x5a" * chunk))
            except OSError as e:
                out.append(errno.errorcode[e.errno or 0])
    finally:
        os.close(fd)
    return out


# --- the programs and the mount -------------------------------------------------------------


def test_the_fakes_come_first_on_path(fake_ltfs: FakeLtfs) -> None:
    for name in ("ltfs", "umount", "fusermount", "mt"):
        assert shutil.which(name) == str(fake_ltfs.bin_dir / name)


def test_a_mount_point_with_nothing_mounted_is_a_plain_empty_directory(
        fake_ltfs: FakeLtfs) -> None:
    mp = fake_ltfs.mount_point
    assert os.listdir(mp) == []
    assert not fake_ltfs.is_mounted(mp)
    assert errno_of(os.getxattr, mp, "user.ltfs.volumeUUID") == errno.ENODATA


def test_ltfs_mounts_a_fuse_filesystem_and_returns(fake_ltfs: FakeLtfs) -> None:
    dev = fake_ltfs.cartridge("t1", files={"old/a.bin": b"abc"}, **FAST)
    mp = fake_ltfs.mount_point
    done = mount(dev, mp)
    assert "LTFS14000I" in done.stderr
    assert not re.search(r"LTFS\d{5}E", done.stderr)
    (entry,) = mounts_at(mp)
    assert entry.fstype == "fuse"
    assert entry.source == f"ltfs:{dev}"
    assert (mp / "old" / "a.bin").read_bytes() == b"abc"
    (mp / "new").mkdir()
    (mp / "new" / "b.bin").write_bytes(b"hello")
    pid = fake_ltfs.ltfs_pid(dev)
    assert pid is not None
    unmount_and_wait(fake_ltfs, dev, mp)
    assert not fake_ltfs.is_mounted(mp)
    assert os.listdir(mp) == []
    assert fake_ltfs.tape_files(dev) == {"old/a.bin": b"abc", "new/b.bin": b"hello"}
    mount(dev, mp)
    assert (mp / "new" / "b.bin").read_bytes() == b"hello"


def test_options_as_repeated_joined_or_glued_o(fake_ltfs: FakeLtfs) -> None:
    dev = fake_ltfs.cartridge("t1", **FAST)
    mp = fake_ltfs.mount_point
    done = run("ltfs", mp, f"-odevname={dev},sync_type=unmount", "-o", "noatime")
    assert done.returncode == 0, done.stderr
    assert 'Sync type is "unmount"' in done.stderr
    assert fake_ltfs.is_mounted(mp)
    assert fake_ltfs.invocations(dev)[-1][1:] == [
        str(mp), f"-odevname={dev},sync_type=unmount", "-o", "noatime"]


def test_an_option_neither_ltfs_nor_fuse_knows_is_refused(fake_ltfs: FakeLtfs) -> None:
    dev = fake_ltfs.cartridge("t1")
    done = run("ltfs", "-o", f"devname={dev}", "-o", "no_such_option", fake_ltfs.mount_point)
    assert done.returncode != 0
    assert "unknown option" in done.stderr
    assert not fake_ltfs.is_mounted()
    assert fake_ltfs.ltfs_pid(dev) is None


# --- refused mounts ------------------------------------------------------------------------


def test_an_unformatted_medium_is_refused(fake_ltfs: FakeLtfs) -> None:
    dev = fake_ltfs.cartridge("blank", formatted=False)
    done = run("ltfs", "-o", f"devname={dev}", fake_ltfs.mount_point)
    assert done.returncode != 0
    assert "LTFS17168E Cannot read volume: medium is not partitioned" in done.stderr
    assert not fake_ltfs.is_mounted()
    assert os.listdir(fake_ltfs.mount_point) == []


def test_the_mount_point_must_exist_and_be_empty(fake_ltfs: FakeLtfs) -> None:
    dev = fake_ltfs.cartridge("t1")
    done = run("ltfs", "-o", f"devname={dev}", fake_ltfs.base / "missing")
    assert done.returncode != 0
    assert "bad mount point" in done.stderr
    (fake_ltfs.mount_point / "stray").write_bytes(b"")
    done = run("ltfs", "-o", f"devname={dev}", fake_ltfs.mount_point)
    assert done.returncode != 0
    assert "mountpoint is not empty" in done.stderr  # libfuse 2 refuses unless -o nonempty
    assert not fake_ltfs.is_mounted()
    assert fake_ltfs.ltfs_pid(dev) is None


def test_a_missing_device_is_refused_with_another_message(fake_ltfs: FakeLtfs) -> None:
    done = run("ltfs", "-o", f"devname={fake_ltfs.base / 'no-such-drive'}",
               fake_ltfs.mount_point)
    assert done.returncode != 0
    assert "LTFS10004E Cannot open device" in done.stderr
    assert "LTFS17168E" not in done.stderr
    assert not fake_ltfs.is_mounted()


def test_the_mount_error_knob(fake_ltfs: FakeLtfs) -> None:
    dev = fake_ltfs.cartridge("t1", mount_error="LTFS11009E Cannot read volume: failed to "
                                                "read partition labels.")
    done = run("ltfs", "-o", f"devname={dev}", fake_ltfs.mount_point)
    assert done.returncode == 1
    assert "LTFS11009E Cannot read volume" in done.stderr
    assert "LTFS14013E" in done.stderr
    assert not fake_ltfs.is_mounted()


def test_a_drive_still_held_by_an_ltfs_is_refused(fake_ltfs: FakeLtfs) -> None:
    dev = fake_ltfs.cartridge("t1", unmount_delay_s=1.0)
    mp, other = fake_ltfs.mount_point, fake_ltfs.base / "other"
    other.mkdir()
    mount(dev, mp)
    done = run("ltfs", "-o", f"devname={dev}", other)
    assert done.returncode != 0
    assert "LTFS10004E" in done.stderr
    # Even after umount, while the daemon still writes its index.
    assert run("umount", mp).returncode == 0
    done = run("ltfs", "-o", f"devname={dev}", other)
    assert done.returncode != 0
    assert not fake_ltfs.is_mounted(other)


# --- attributes and capacity ------------------------------------------------------------------


def test_the_root_answers_the_ltfs_attributes(fake_ltfs: FakeLtfs) -> None:
    dev = fake_ltfs.cartridge("t1", serial="ABC123L9", capacity_bytes=100 * MiB,
                              volume_uuid="6a1c2b2e-6c1e-4f57-9d62-0d7d3e6f0a11")
    mp = fake_ltfs.mount_point
    mount(dev, mp)
    assert os.getxattr(mp, "user.ltfs.volumeUUID") == b"6a1c2b2e-6c1e-4f57-9d62-0d7d3e6f0a11"
    assert os.getxattr(mp, "user.ltfs.volumeSerial") == b"ABC123L9"
    assert os.getxattr(mp, "user.ltfs.mediaDataPartitionTotalCapacity") == b"100"
    assert os.getxattr(mp, "user.ltfs.mediaDataPartitionAvailableSpace") == b"100"
    # Virtual attributes are not listed, and only the root has the volume's.
    assert not [n for n in os.listxattr(mp) if n.startswith("user.ltfs.")]
    (mp / "f").write_bytes(b"x")
    assert errno_of(os.getxattr, mp / "f", "user.ltfs.volumeUUID") == errno.ENODATA
    assert errno_of(os.getxattr, mp, "user.ltfs.noSuchThing") == errno.ENODATA
    # Ordinary user attributes are stored.
    os.setxattr(mp / "f", "user.sha256", b"00ff")
    assert os.getxattr(mp / "f", "user.sha256") == b"00ff"


def test_a_cartridge_without_ltfs_attributes(fake_ltfs: FakeLtfs) -> None:
    dev = fake_ltfs.cartridge("t1", ltfs_xattrs=False)
    mp = fake_ltfs.mount_point
    mount(dev, mp)
    assert mounts_at(mp)[0].fstype == "fuse"
    assert errno_of(os.getxattr, mp, "user.ltfs.volumeUUID") == errno.ENODATA


def test_statvfs_counts_512k_blocks_and_space_never_comes_back(fake_ltfs: FakeLtfs) -> None:
    dev = fake_ltfs.cartridge("t1", capacity_bytes=100 * MiB)
    mp = fake_ltfs.mount_point
    mount(dev, mp)
    st = os.statvfs(mp)
    assert st.f_bsize == st.f_frsize == BLOCK_SIZE == 524288
    assert st.f_blocks == 200
    assert st.f_bavail == st.f_bfree == 200
    (mp / "a").write_bytes(b"\1" * (3 * MiB))
    assert os.statvfs(mp).f_bavail == 194
    assert os.getxattr(mp, "user.ltfs.mediaDataPartitionAvailableSpace") == b"97"
    (mp / "a").unlink()  # append-only: deleting gives nothing back
    assert os.statvfs(mp).f_bavail == 194
    assert fake_ltfs.used_bytes(dev) == 3 * MiB
    assert MiB == MIB


def test_enospc_on_write_before_the_reserve(fake_ltfs: FakeLtfs) -> None:
    # 8 MiB medium, 1 MiB reserve: statvfs says 8 MiB are free, only 7 MiB can be written.
    dev = fake_ltfs.cartridge("t1", capacity_bytes=8 * MiB, reserve_bytes=1 * MiB, **FAST)
    mp = fake_ltfs.mount_point
    mount(dev, mp)
    assert os.statvfs(mp).f_bavail * BLOCK_SIZE == 8 * MiB
    # 3 + 3 MiB fit, the third write is cut short at the limit, the next one fails.
    assert write_chunks(mp / "big", 3 * MiB, 4) == [3 * MiB, 3 * MiB, 1 * MiB, "ENOSPC"]
    assert (mp / "big").stat().st_size == 7 * MiB
    # The tape is full: no new file, and deleting frees nothing.
    assert errno_of(os.open, mp / "new", os.O_WRONLY | os.O_CREAT, 0o644) == errno.ENOSPC
    (mp / "big").unlink()
    assert errno_of(os.open, mp / "new", os.O_WRONLY | os.O_CREAT, 0o644) == errno.ENOSPC
    assert os.statvfs(mp).f_bavail * BLOCK_SIZE == 1 * MiB
    # The final index still fits in the reserve; a full tape mounts read-only afterwards.
    unmount_and_wait(fake_ltfs, dev, mp)
    assert fake_ltfs.syncs(dev, "Unmount") == 1
    done = mount(dev, mp)
    assert "LTFS14071I" in done.stderr
    assert errno_of(os.open, mp / "new", os.O_WRONLY | os.O_CREAT, 0o644) == errno.EROFS


def test_enospc_only_on_close(fake_ltfs: FakeLtfs) -> None:
    dev = fake_ltfs.cartridge("t1", capacity_bytes=8 * MiB, reserve_bytes=1 * MiB,
                              enospc_mode="close")
    mp = fake_ltfs.mount_point
    mount(dev, mp)
    fd = os.open(mp / "big", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        written = [os.write(fd, b"\1" * MiB) for _ in range(9)]  # all seem to work
        assert written == [MiB] * 9
    finally:
        assert errno_of(os.close, fd) == errno.ENOSPC
    # What went past the limit is lost.
    assert (mp / "big").stat().st_size == 7 * MiB
    assert errno_of(os.open, mp / "new", os.O_WRONLY | os.O_CREAT, 0o644) == errno.ENOSPC


def test_enospc_after_bytes_forces_it_early(fake_ltfs: FakeLtfs) -> None:
    dev = fake_ltfs.cartridge("t1", enospc_after_bytes=1 * MiB)
    mp = fake_ltfs.mount_point
    mount(dev, mp)
    assert write_chunks(mp / "f", 768 * 1024, 3) == [768 * 1024, 256 * 1024, "ENOSPC"]


def test_a_write_protected_cartridge_mounts_read_only(fake_ltfs: FakeLtfs) -> None:
    dev = fake_ltfs.cartridge("t1", write_protected=True, files={"a": b"1"})
    mp = fake_ltfs.mount_point
    assert "LTFS14019I" in mount(dev, mp).stderr
    assert (mp / "a").read_bytes() == b"1"
    assert errno_of(os.open, mp / "b", os.O_WRONLY | os.O_CREAT, 0o644) == errno.EROFS


# --- the index ------------------------------------------------------------------------------


def test_only_sync_xattr_and_unmount_write_the_index(fake_ltfs: FakeLtfs) -> None:
    dev = fake_ltfs.cartridge("t1", **FAST)
    mp = fake_ltfs.mount_point
    mount(dev, mp)
    with open(mp / "a", "wb") as fh:
        fh.write(b"a" * 1000)
        fh.flush()
        os.fsync(fh.fileno())
    assert fake_ltfs.syncs(dev) == 0  # neither fsync nor close writes an index
    assert fake_ltfs.indexed_files(dev) == {}
    os.setxattr(mp, "user.ltfs.sync", b"1")
    assert [r.reason for r in fake_ltfs.sync_log(dev)] == ["Sync by EA"]
    assert fake_ltfs.indexed_files(dev) == {"a": 1000}
    os.setxattr(mp, "user.ltfs.sync", b"1")  # nothing changed: LTFS writes no index
    assert fake_ltfs.syncs(dev) == 1
    (mp / "b").write_bytes(b"b")
    unmount_and_wait(fake_ltfs, dev, mp)
    assert [r.reason for r in fake_ltfs.sync_log(dev)] == ["Sync by EA", "Unmount"]
    assert fake_ltfs.indexed_files(dev) == {"a": 1000, "b": 1}
    mount(dev, mp)
    unmount_and_wait(fake_ltfs, dev, mp)  # an unchanged volume is unmounted without an index
    assert fake_ltfs.syncs(dev) == 2


def test_sync_on_close_and_the_sync_timer(fake_ltfs: FakeLtfs) -> None:
    dev = fake_ltfs.cartridge("t1", **FAST)
    mp = fake_ltfs.mount_point
    mount(dev, mp, "sync_type=close")
    (mp / "a").write_bytes(b"a")
    # The kernel sends RELEASE after close() has returned: the sync follows shortly.
    eventually(lambda: fake_ltfs.syncs(dev, "Sync on close") == 1, "no index on close")
    unmount_and_wait(fake_ltfs, dev, mp)

    dev2 = fake_ltfs.cartridge("t2", sync_period_s=0.05, **FAST)
    mount(dev2, mp)
    (mp / "a").write_bytes(b"a")
    eventually(lambda: fake_ltfs.syncs(dev2, "Periodic Sync") > 0,
               "the sync timer never wrote an index")
    assert fake_ltfs.indexed_files(dev2) == {"a": 1}


# --- losing the mount ------------------------------------------------------------------------

#: What the kernel answers on a mount whose ltfs died: ENOTCONN (107) once the connection is torn
#: down, ECONNABORTED (103) to a request that meets the teardown (seen once, under load).
LOST_MOUNT = (errno.ENOTCONN, errno.ECONNABORTED)


def test_a_dead_ltfs_leaves_a_lost_mount_until_fusermount_u(fake_ltfs: FakeLtfs) -> None:
    dev = fake_ltfs.cartridge("t1")
    mp = fake_ltfs.mount_point
    mount(dev, mp)
    (mp / "a").write_bytes(b"a")
    assert fake_ltfs.crash(dev) is not None
    for fn, args in ((os.stat, (mp,)), (os.listdir, (mp,)), (os.statvfs, (mp,)),
                     (os.open, (mp / "a", os.O_RDONLY)), (os.getxattr, (mp, "user.x"))):
        assert errno_of(fn, *args) in LOST_MOUNT
    assert fake_ltfs.is_mounted(mp)  # still in the mount table
    done = run("fusermount", "-u", mp)
    assert done.returncode == 0, done.stderr
    assert not fake_ltfs.is_mounted(mp)
    assert os.listdir(mp) == []
    done = run("fusermount", "-u", mp)  # nothing left to unmount
    assert done.returncode == 1
    assert "not found" in done.stderr


def test_umount_also_clears_a_lost_mount(fake_ltfs: FakeLtfs) -> None:
    dev = fake_ltfs.cartridge("t1")
    mp = fake_ltfs.mount_point
    mount(dev, mp)
    fake_ltfs.crash(dev)
    assert errno_of(os.listdir, mp) in LOST_MOUNT
    assert run("umount", mp).returncode == 0
    assert os.listdir(mp) == []


def test_a_crash_keeps_only_what_the_last_index_covered(fake_ltfs: FakeLtfs) -> None:
    dev = fake_ltfs.cartridge("t1", files={"kept": b"k", "renamed": b"r", "deleted": b"d"})
    mp = fake_ltfs.mount_point
    mount(dev, mp)
    (mp / "synced").write_bytes(b"s" * 10)
    os.setxattr(mp, "user.ltfs.sync", b"1")
    with open(mp / "synced", "ab") as fh:
        fh.write(b"more")  # after the index
    (mp / "unsynced").write_bytes(b"u")
    (mp / "renamed").rename(mp / "renamed-later")
    (mp / "deleted").unlink()
    fake_ltfs.crash(dev)
    assert run("fusermount", "-u", mp).returncode == 0
    done = mount(dev, mp)
    assert "LTFS11022I" in done.stderr
    assert sorted(os.listdir(mp)) == ["deleted", "kept", "renamed", "synced"]
    assert (mp / "synced").read_bytes() == b"s" * 10
    assert (mp / "deleted").read_bytes() == b"d"
    assert fake_ltfs.syncs(dev, "Recovery") == 1


# --- unmount and eject -----------------------------------------------------------------------


def test_umount_returns_while_ltfs_still_writes_its_index(fake_ltfs: FakeLtfs) -> None:
    dev = fake_ltfs.cartridge("t1", unmount_delay_s=1.0)
    mp = fake_ltfs.mount_point
    mount(dev, mp)
    (mp / "a").write_bytes(b"a")
    pid = fake_ltfs.ltfs_pid(dev)
    assert pid is not None
    t0 = time.monotonic()
    assert run("umount", mp).returncode == 0
    assert not fake_ltfs.is_mounted(mp)
    assert fake_ltfs.ltfs_pid(dev) == pid  # still running
    assert fake_ltfs.syncs(dev) == 0
    assert fake_ltfs.wait_ltfs_exit(dev, 10)
    assert time.monotonic() - t0 >= 1.0
    assert [r.reason for r in fake_ltfs.sync_log(dev)] == ["Unmount"]


def test_umount_of_a_mount_with_open_files_is_refused(fake_ltfs: FakeLtfs) -> None:
    dev = fake_ltfs.cartridge("t1", **FAST)
    mp = fake_ltfs.mount_point
    mount(dev, mp)
    fd = os.open(mp / "a", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        done = run("umount", mp)
        assert done.returncode == 32
        assert "target is busy" in done.stderr
        assert fake_ltfs.is_mounted(mp)
    finally:
        os.close(fd)
    unmount_and_wait(fake_ltfs, dev, mp)


def test_fusermount_u_behaves_the_same(fake_ltfs: FakeLtfs) -> None:
    dev = fake_ltfs.cartridge("t1", unmount_delay_s=0.6)
    mp = fake_ltfs.mount_point
    mount(dev, mp)
    assert run("fusermount", "-u", mp).returncode == 0
    assert not fake_ltfs.is_mounted(mp)
    assert fake_ltfs.ltfs_pid(dev) is not None
    assert fake_ltfs.wait_ltfs_exit(dev, 10)


def test_umount_refuses_what_is_not_a_fake_ltfs_mount(fake_ltfs: FakeLtfs) -> None:
    done = run("umount", "/proc")
    assert done.returncode == 32
    assert "refuses" in done.stderr
    done = run("umount", fake_ltfs.mount_point)  # not mounted: the system umount says so
    assert done.returncode != 0
    assert "not mounted" in done.stderr


def test_ejecting_before_ltfs_exits_corrupts_the_tape(fake_ltfs: FakeLtfs) -> None:
    dev = fake_ltfs.cartridge("t1", unmount_delay_s=1.0)
    mp = fake_ltfs.mount_point
    mount(dev, mp)
    (mp / "a").write_bytes(b"a")
    assert run("umount", mp).returncode == 0
    done = run("mt", "-f", dev, "offline")
    assert done.returncode == 0  # real mt does not notice either
    assert fake_ltfs.is_corrupted(dev)
    report = json.loads((dev / "CORRUPTED").read_text().splitlines()[0])
    assert report["ltfs_pid"] > 0
    fake_ltfs.crash(dev)  # rather than wait for it to finish
    fake_ltfs.load(dev)
    done = run("ltfs", "-o", f"devname={dev}", mp)
    assert done.returncode != 0
    assert "LTFS17146E" in done.stderr


def test_ejecting_after_ltfs_exits_is_clean(fake_ltfs: FakeLtfs) -> None:
    dev = fake_ltfs.cartridge("t1", **FAST)
    mp = fake_ltfs.mount_point
    mount(dev, mp)
    unmount_and_wait(fake_ltfs, dev, mp)
    assert "ONLINE" in run("mt", "-f", dev, "status").stdout
    assert run("mt", "-f", dev, "offline").returncode == 0
    assert fake_ltfs.is_ejected(dev)
    assert fake_ltfs.eject_count(dev) == 1
    assert not fake_ltfs.is_corrupted(dev)
    assert "DR_OPEN" in run("mt", "-f", dev, "status").stdout
    done = run("ltfs", "-o", f"devname={dev}", mp)  # no tape in the drive
    assert done.returncode != 0
    assert "LTFS12016E" in done.stderr
    assert run("mt", "-f", dev, "load").returncode == 0
    mount(dev, mp)


def test_the_eject_option_ejects_after_the_index(fake_ltfs: FakeLtfs) -> None:
    dev = fake_ltfs.cartridge("t1", **FAST)
    mp = fake_ltfs.mount_point
    mount(dev, mp, "eject")
    unmount_and_wait(fake_ltfs, dev, mp)
    assert fake_ltfs.is_ejected(dev)
    assert not fake_ltfs.is_corrupted(dev)


def test_mt_on_a_missing_device(fake_ltfs: FakeLtfs) -> None:
    done = run("mt", "-f", fake_ltfs.base / "nope", "offline")
    assert done.returncode != 0
    assert "No such file or directory" in done.stderr


# --- the fixture ----------------------------------------------------------------------------


def test_cleanup_leaves_no_mount_and_no_daemon(fake_ltfs: FakeLtfs) -> None:
    live, lost = fake_ltfs.cartridge("live"), fake_ltfs.cartridge("lost")
    mp2 = fake_ltfs.base / "mnt2"
    mp2.mkdir()
    mount(live, fake_ltfs.mount_point)
    mount(lost, mp2)
    fake_ltfs.crash(lost)
    assert len(fake_ltfs.daemons()) == 1
    fake_ltfs.cleanup()
    assert fake_ltfs.daemons() == []
    assert fake_ltfs.leftover_mounts() == []
    fake_ltfs.cleanup()  # idempotent: the fixture calls it again at teardown


def test_a_failing_test_leaves_no_mount_behind(tmp_path: Path) -> None:
    """Run a test that mounts, crashes one ltfs and then fails, in a pytest of its own."""
    inner = tmp_path / "inner"
    inner.mkdir()
    (inner / "conftest.py").write_text('pytest_plugins = ["tests.fakes.fixtures"]\n')
    (inner / "test_inner.py").write_text(
        "import subprocess\n"
        "def test_fails(fake_ltfs):\n"
        "    for name in ('a', 'b'):\n"
        "        dev = fake_ltfs.cartridge(name, unmount_delay_s=5)\n"
        "        mp = fake_ltfs.base / ('mnt-' + name)\n"
        "        mp.mkdir()\n"
        "        subprocess.run(['ltfs', '-o', f'devname={dev}', str(mp)], check=True)\n"
        "    fake_ltfs.crash(dev)\n"
        "    assert False, 'on purpose'\n"
    )
    (inner / "pytest.ini").write_text("[pytest]\n")
    basetemp = tmp_path / "basetemp"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:randomly",
         f"--basetemp={basetemp}", str(inner)],
        capture_output=True, text=True, timeout=60, cwd=inner, env=env, check=False)
    if "skipped" in done.stdout and "1 failed" not in done.stdout:
        pytest.skip("FUSE unavailable")
    assert "1 failed" in done.stdout, done.stdout + done.stderr
    assert "on purpose" in done.stdout
    assert not [m for m in mount_table() if m.target.startswith(str(basetemp))]
    assert not [m for m in mount_table() if m.source.startswith(f"ltfs:{basetemp}")]
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
            except OSError:
                continue
            assert str(basetemp).encode() not in cmdline
