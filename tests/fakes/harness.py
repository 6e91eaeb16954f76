"""Test harness for the fake LTFS tools: install them, run them, look at cartridges, clean up.

`FakeLtfs` is what the `fake_ltfs` fixture (tests/fakes/fixtures.py) returns; import the class
from here for type annotations (importing it from the plugin module before pytest registers it
would stop pytest from rewriting that module's asserts).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import signal
import subprocess
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from tests.fakes import cartridge as cart

REPO_ROOT = Path(__file__).resolve().parents[2]

#: program name -> (module, function called with sys.argv)
PROGRAMS = {
    "ltfs": ("tests.fakes.ltfs", "main"),
    "mt": ("tests.fakes.mt", "main"),
    "umount": ("tests.fakes.unmount", "umount_main"),
    "fusermount": ("tests.fakes.unmount", "fusermount_main"),
}


def install_fakes(bin_dir: Path) -> Path:
    """Write the fake programs into `bin_dir` as scripts run by this interpreter (the venv's)."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    for name, (module, func) in PROGRAMS.items():
        script = bin_dir / name
        script.write_text(
            f"#!{sys.executable}\n"
            f"# Fake {name} for ltoflow's tests (tests/fakes).\n"
            "import sys\n"
            f"sys.path.insert(0, {str(REPO_ROOT)!r})\n"
            f"from {module} import {func}\n"
            f"sys.exit({func}(sys.argv))\n"
        )
        script.chmod(0o755)
    return bin_dir


def fuse_unavailable_reason() -> str | None:
    """Why a FUSE mount cannot be made here, or None when it can."""
    if not Path("/dev/fuse").exists():
        return "no /dev/fuse: FUSE is not available in this environment"
    if os.geteuid() != 0:
        return "the fake ltfs mounts FUSE without fusermount, which needs root"
    if ctypes.util.find_library("fuse") is None:
        return "libfuse.so.2 is missing (apt-get install -y libfuse2)"
    try:
        import fuse  # type: ignore[import-untyped]  # noqa: F401  # fusepy ships no type hints
    except (ImportError, OSError) as e:
        return f"fusepy cannot be imported ({e}); pip install fusepy"
    return None


class FakeLtfs:
    """What a test gets from the `fake_ltfs` fixture."""

    def __init__(self, base: Path, bin_dir: Path, scan_root: Path | None = None) -> None:
        self.base = base
        self.bin_dir = bin_dir
        #: cleanup() unmounts every mount under here (code under test may mount elsewhere
        #: than `mount_point`).
        self.scan_root = scan_root or base
        self.drives_dir = base / "drives"
        self.drives_dir.mkdir(parents=True, exist_ok=True)
        #: An empty directory to mount on.
        self.mount_point = base / "mnt"
        self.mount_point.mkdir(parents=True, exist_ok=True)
        self.cartridges: list[Path] = []

    # --- cartridges

    def cartridge(self, name: str, *, files: Mapping[str, bytes] | None = None,
                  **knobs: Any) -> Path:
        """A new cartridge loaded in a drive; returns DEV (for `-o devname=` and `mt -f`).

        Knobs (see `tests.fakes.cartridge.Knobs`): serial, volume_uuid, capacity_bytes,
        reserve_bytes, formatted, write_protected, enospc_mode ("write" | "close"),
        enospc_after_bytes, mount_error, ltfs_xattrs, unmount_delay_s, sync_delay_s,
        mount_delay_s, sync_period_s. The serial defaults to one made from `name`.
        """
        if "serial" not in knobs:
            stem = "".join(c for c in name.upper() if c.isalnum())[:6]
            knobs["serial"] = stem.ljust(6, "0") + "L9"
        dev = cart.make_cartridge(self.drives_dir / name, files=files, **knobs)
        self.cartridges.append(dev)
        return dev

    def set_knobs(self, dev: Path, **changes: Any) -> cart.Knobs:
        return cart.set_knobs(dev, **changes)

    # --- running the programs

    def ltfs(self, dev: Path, mount_point: Path | None = None, *options: str,
             check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run `ltfs -o devname=DEV [-o OPTION]... MOUNTPOINT` (as the code under test would)."""
        argv = ["ltfs", "-o", f"devname={dev}"]
        for opt in options:
            argv += ["-o", opt]
        argv.append(str(mount_point or self.mount_point))
        done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
        if check and done.returncode != 0:
            raise AssertionError(f"ltfs failed ({done.returncode}): {done.stderr}")
        return done

    def umount(self, mount_point: Path | None = None, *, wait_dev: Path | None = None,
               check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run `umount MOUNTPOINT`; with `wait_dev`, also wait until its ltfs has exited."""
        done = subprocess.run(["umount", str(mount_point or self.mount_point)],
                              capture_output=True, text=True, timeout=60, check=False)
        if check and done.returncode != 0:
            raise AssertionError(f"umount failed ({done.returncode}): {done.stderr}")
        if wait_dev is not None and not cart.wait_ltfs_exit(wait_dev, 30):
            raise AssertionError(f"ltfs for {wait_dev} did not exit after umount")
        return done

    def mt(self, dev: Path, *command: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["mt", "-f", str(dev), *command], capture_output=True, text=True,
                              timeout=60, check=False)

    # --- looking

    def is_mounted(self, mount_point: Path | None = None) -> bool:
        """Listed in /proc/self/mounts (a lost mount, whose ltfs died, still is)."""
        return cart.is_mounted(mount_point or self.mount_point)

    def syncs(self, dev: Path, reason: str | None = None) -> int:
        """Indexes written by mounts of `dev` (reason: "Sync by EA", "Periodic Sync",
        "Sync on close", "Unmount", "Recovery")."""
        return cart.syncs(dev, reason)

    def sync_log(self, dev: Path) -> list[cart.SyncRecord]:
        return cart.sync_log(dev)

    def indexed_files(self, dev: Path) -> dict[str, int]:
        """Path -> size of each file the last index covers: what survives a crash."""
        return cart.indexed_files(dev)

    def tape_files(self, dev: Path) -> dict[str, bytes]:
        """Every file on the tape now (read from the cartridge, not through the mount)."""
        root = dev / cart.ROOT
        return {p.relative_to(root).as_posix(): p.read_bytes()
                for p in sorted(root.rglob("*")) if p.is_file() and not p.is_symlink()}

    def used_bytes(self, dev: Path) -> int:
        return cart.read_used_bytes(dev)

    def ltfs_pid(self, dev: Path) -> int | None:
        return cart.ltfs_pid(dev)

    def wait_ltfs_exit(self, dev: Path, timeout: float = 10.0) -> bool:
        return cart.wait_ltfs_exit(dev, timeout)

    def crash(self, dev: Path) -> int | None:
        """kill -9 the ltfs daemon of `dev`; its mount is left lost (ENOTCONN)."""
        return cart.crash(dev)

    def is_corrupted(self, dev: Path) -> bool:
        return cart.is_corrupted(dev)

    def is_ejected(self, dev: Path) -> bool:
        return cart.is_ejected(dev)

    def eject_count(self, dev: Path) -> int:
        return cart.eject_count(dev)

    def load(self, dev: Path) -> None:
        """Put an ejected cartridge back in the drive."""
        cart.load(dev)

    def invocations(self, dev: Path) -> list[list[str]]:
        return cart.invocations(dev)

    def daemon_log(self, dev: Path) -> str:
        try:
            return (dev / cart.DAEMON_LOG).read_text()
        except FileNotFoundError:
            return ""

    # --- teardown

    def daemons(self) -> list[int]:
        """Pids of the live ltfs daemons started from this fixture's bin directory."""
        ltfs = str(self.bin_dir / "ltfs")
        out = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as fh:
                    argv = [a.decode(errors="replace") for a in fh.read().split(b"\0") if a]
            except OSError:
                continue
            if ltfs in argv[:2] and cart.pid_alive(int(entry)):
                out.append(int(entry))
        return out

    def leftover_mounts(self) -> list[cart.MountEntry]:
        base = str(self.scan_root)
        devs = {f"ltfs:{d}" for d in self.cartridges}
        return [m for m in cart.mount_table()
                if m.target == base or m.target.startswith(base + "/")
                or m.source.startswith(f"ltfs:{base}/") or m.source in devs]

    def cleanup(self) -> None:
        """Kill every ltfs daemon of this fixture, then unmount everything left under base."""
        for pid in self.daemons():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for pid in self.daemons():
            cart.wait_pid_exit(pid, 5)
        libc = ctypes.CDLL(None, use_errno=True)
        for _ in range(20):
            left = self.leftover_mounts()
            if not left:
                return
            for m in reversed(left):  # stacked and nested mounts: last mounted first
                libc.umount2(m.target.encode(), 2)  # MNT_DETACH
        left = self.leftover_mounts()
        if left:
            raise RuntimeError(f"could not unmount: {[m.target for m in left]}")


@contextlib.contextmanager
def fake_ltfs_env(base: Path, monkeypatch: pytest.MonkeyPatch,
                  scan_root: Path | None = None) -> Iterator[FakeLtfs]:
    """Install the fakes under `base`, put them first on PATH, clean up on the way out
    (every mount under `scan_root`, default `base`)."""
    bin_dir = install_fakes(base / "bin")
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")
    fake = FakeLtfs(base, bin_dir, scan_root)
    try:
        yield fake
    finally:
        fake.cleanup()


def require_fuse() -> None:
    """Skip (or, with LTOFLOW_REQUIRE_FUSE=1, fail) the test when FUSE cannot be used."""
    reason = fuse_unavailable_reason()
    if reason is None:
        return
    if os.environ.get("LTOFLOW_REQUIRE_FUSE") == "1":
        pytest.fail(f"LTOFLOW_REQUIRE_FUSE=1 but {reason}")
    pytest.skip(reason)
