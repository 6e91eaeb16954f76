"""The `fake_ltfs` pytest fixture: fake `ltfs`, `umount`, `fusermount`, `mt` first on PATH.

Register it in tests/conftest.py with ``pytest_plugins = ["tests.fakes.fixtures"]``; annotate
with ``from tests.fakes.harness import FakeLtfs``. Then::

    def test_backup_to_tape(fake_ltfs: FakeLtfs) -> None:
        dev = fake_ltfs.cartridge("tape1", capacity_bytes=64 * 1024**2)
        drive = LtfsDrive(str(dev), fake_ltfs.mount_point)   # runs `ltfs`, `umount`, `mt`
        ...
        assert fake_ltfs.syncs(dev) >= 1
        assert not fake_ltfs.is_corrupted(dev)

The fixture skips the test when FUSE cannot be used here (no /dev/fuse, no libfuse.so.2, no
fusepy, not root); with LTOFLOW_REQUIRE_FUSE=1 in the environment it fails instead. At teardown
it kills every ltfs daemon it started and unmounts every mount left under tmp_path, even when
the test failed.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fakes.harness import FakeLtfs, fake_ltfs_env, require_fuse


@pytest.fixture
def fake_ltfs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeLtfs]:
    """Fake LTFS tools first on PATH; cartridges, a mount point, and helpers to inspect them."""
    require_fuse()
    with fake_ltfs_env(tmp_path / "fake-ltfs", monkeypatch, scan_root=tmp_path) as fake:
        yield fake
