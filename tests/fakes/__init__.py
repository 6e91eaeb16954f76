"""Fake LTFS 2.4.8 tools for tests: `ltfs` (a real FUSE mount), `umount`, `fusermount`, `mt`.

The fakes act at the OS level like the real programs (mount table entry, errno values, xattrs,
statvfs, a daemon that outlives `umount`), so code under test takes the same paths it would
against real LTFS. A cartridge is a directory (see `tests.fakes.cartridge`); the `fake_ltfs`
fixture (`tests.fakes.fixtures`) puts the programs first on PATH and cleans up every mount.

This package imports only the standard library: the fake programs import it.
"""

from tests.fakes.cartridge import (
    BLOCK_SIZE,
    MIB,
    Knobs,
    MountEntry,
    SyncRecord,
    corruption_report,
    crash,
    eject_count,
    indexed_files,
    invocations,
    is_corrupted,
    is_ejected,
    is_mounted,
    load,
    ltfs_mounts,
    ltfs_pid,
    make_cartridge,
    mount_table,
    mounts_at,
    pid_alive,
    read_knobs,
    read_used_bytes,
    set_knobs,
    sync_log,
    syncs,
    wait_ltfs_exit,
    wait_pid_exit,
)

__all__ = [
    "BLOCK_SIZE",
    "MIB",
    "Knobs",
    "MountEntry",
    "SyncRecord",
    "corruption_report",
    "crash",
    "eject_count",
    "indexed_files",
    "invocations",
    "is_corrupted",
    "is_ejected",
    "is_mounted",
    "load",
    "ltfs_mounts",
    "ltfs_pid",
    "make_cartridge",
    "mount_table",
    "mounts_at",
    "pid_alive",
    "read_knobs",
    "read_used_bytes",
    "set_knobs",
    "sync_log",
    "syncs",
    "wait_ltfs_exit",
    "wait_pid_exit",
]
