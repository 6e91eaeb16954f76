"""Shared helpers: seeded source trees and catalog readers that use nothing but the files."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest

from ltoflow import hashing
from ltoflow.errors import leaves

pytest_plugins = ["tests.fakes.fixtures"]

REPO = Path(__file__).resolve().parent.parent
#: The source tree and the 3-tape simulator set the seed's own implementation wrote from it
#: (tests/fixtures/README.md): ltoflow must read such sets.
SEED_FIXTURE = REPO / "tests" / "fixtures" / "seed-format"


@pytest.fixture(autouse=True)
def state_dir(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test gets its own job-journal directory, never the user's."""
    path = tmp_path_factory.mktemp("state")
    monkeypatch.setenv("LTOFLOW_STATE_DIR", str(path))
    return path


def write_tree(root: Path, sizes: dict[str, int], *, seed: int = 1) -> dict[str, bytes]:
    """Create files of the given sizes with seeded random bytes; return their contents."""
    rng = random.Random(seed)
    contents: dict[str, bytes] = {}
    for rel, size in sizes.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        data = rng.randbytes(size)
        path.write_bytes(data)
        contents[rel] = data
    return contents


def load_catalog_json(tape_root: Path) -> dict[str, object]:
    raw = (tape_root / "catalog" / "catalog.json").read_bytes()
    expected = (tape_root / "catalog" / "catalog.sha256").read_text().strip()
    assert hashlib.sha256(raw).hexdigest() == expected
    doc: dict[str, object] = json.loads(raw)
    return doc


def rebuild_files(sim_root: Path, doc: dict[str, object]) -> dict[str, bytes]:
    """Rebuild every file from the containers, using only the catalog (plain json, no ltoflow)."""
    containers = {c["container_id"]: c for c in doc["containers"]}  # type: ignore[attr-defined]
    for c in containers.values():  # the catalog's container hashes are true too (the kit's check)
        blob = (sim_root / c["tape_id"] / "data" / c["container_id"]).read_bytes()
        assert hashlib.sha256(blob).hexdigest() == c["sha256"], c["container_id"]
    by_file: dict[str, list[dict[str, int | str]]] = {}
    for s in doc["segments"]:  # type: ignore[attr-defined]
        by_file.setdefault(s["file_id"], []).append(s)
    out: dict[str, bytes] = {}
    for f in doc["source_files"]:  # type: ignore[attr-defined]
        data = bytearray()
        for s in sorted(by_file.get(f["file_id"], []), key=lambda s: int(s["source_offset"])):
            c = containers[s["container_id"]]
            blob = (sim_root / c["tape_id"] / "data" / c["container_id"]).read_bytes()
            start = int(s["container_offset"])
            part = blob[start:start + int(s["length_bytes"])]
            assert hashlib.sha256(part).hexdigest() == s["sha256"]
            assert int(s["source_offset"]) == len(data)
            data += part
        assert hashlib.sha256(data).hexdigest() == f["sha256"]
        # Keyed as write_tree names files: a name that is not UTF-8 by its exact bytes.
        exact = f.get("relative_path_b64")
        key = os.fsdecode(base64.b64decode(exact)) if exact else f["relative_path"]
        out[key] = bytes(data)
    return out


@pytest.fixture
def seed_tapes(tmp_path: Path) -> Path:
    """A writable copy of the 3-tape set written by the seed's implementation."""
    import shutil

    dest = tmp_path / "seed-tapes"
    shutil.copytree(SEED_FIXTURE / "tapes", dest)
    for p in [dest, *dest.rglob("*")]:
        p.chmod(0o755 if p.is_dir() else 0o644)
    return dest


class Raises:
    """`with Raises(SomeError, match="re"):` — the body raises a group whose leaves are all
    SomeError matching `match` (two actors may meet the same problem at once)."""

    def __init__(self, kind: type[BaseException], match: str) -> None:
        self.kind = kind
        self.match = match
        self.errors: list[BaseException] = []

    def __enter__(self) -> Raises:
        return self

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None, tb: object) -> bool:
        import re

        assert e is not None, f"expected {self.kind.__name__}, nothing was raised"
        self.errors = leaves(e)
        for err in self.errors:
            if not isinstance(err, self.kind) or not re.search(self.match, str(err)):
                return False  # let the unexpected exception propagate
        return True


#: A chain of directories whose path is over PATH_MAX (4096) bytes: 300 levels of 14 bytes.
DEEP = [b"level-%03d-pad" % i for i in range(300)]


def write_odd_tree(root: Path) -> None:
    """A tree with what real trees hold: symlinks of every sort, empty and read-only
    directories, names that are not UTF-8 (or hold a newline), a path over PATH_MAX, a FIFO.

    Everything is made through directory descriptors, with exact bytes.
    """
    import os

    root.mkdir(parents=True, exist_ok=True)
    top = os.open(root, os.O_RDONLY | os.O_DIRECTORY)

    def at(parts: list[bytes]) -> int:
        fd = os.dup(top)
        for p in parts:
            new = os.open(p, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
            os.close(fd)
            fd = new
        return fd

    def mkdir(parts: list[bytes], mode: int = 0o755) -> None:
        fd = at(parts[:-1])
        os.mkdir(parts[-1], mode, dir_fd=fd)
        os.close(fd)

    def write(parts: list[bytes], data: bytes, mode: int = 0o644) -> None:
        fd = at(parts[:-1])
        f = os.open(parts[-1], os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode, dir_fd=fd)
        os.write(f, data)
        os.fchmod(f, mode)
        os.close(f)
        os.close(fd)

    def link(parts: list[bytes], target: bytes) -> None:
        fd = at(parts[:-1])
        os.symlink(target, parts[-1], dir_fd=fd)
        os.close(fd)

    mkdir([b"docs"])
    write([b"docs", b"readme.txt"], b"hello\n")
    mkdir([b"docs", b"empty"], 0o700)
    mkdir([b"docs", b"locked"])
    write([b"docs", b"locked", b"inside.txt"], b"kept\n", 0o400)
    link([b"docs", b"to-readme"], b"readme.txt")
    link([b"docs", b"to-parent-dir"], b"..")
    link([b"docs", b"loop"], b"loop")
    link([b"docs", b"dangling"], b"/nonexistent/\xff/target")
    link([b"to-etc"], b"/etc")  # restoring it must not write into /etc
    mkdir([b"odd-\xff\xfe"])
    write([b"odd-\xff\xfe", b"caf\xe9.txt"], b"latin-1 name\n")
    write([b"odd-\xff\xfe", b"new\nline"], b"newline name\n")
    write([b"odd-\xff\xfe", b"back\\xffslash"], b"a name that looks like an escape\n")
    link([b"odd-\xff\xfe", b"link-\x80"], b"target-\x81\n")
    write([b"\xe9\xe9.bin"], bytes(range(256)) * 40)
    for n in range(len(DEEP)):
        mkdir(DEEP[: n + 1])
    write([*DEEP, b"bottom-\xff.txt"], b"deep down\n")
    write([*DEEP[:295], b"big.bin"], random.Random(7).randbytes(150_000))  # split in segments
    link([*DEEP, b"up"], b"../" * 3)
    os.mkfifo(b"pipe", dir_fd=top)
    # Times last: writing inside a directory changes its mtime.
    for n, parts in enumerate([[b"docs", b"locked"], [b"docs", b"empty"], [b"odd-\xff\xfe"],
                               DEEP[:150], DEEP, [b"docs"]]):
        fd = at(parts)
        os.utime(fd, ns=(1, 1_500_000_000_000_000_001 + n * 10**9))
        os.close(fd)
    fd = at([b"docs"])
    os.utime(b"to-readme", ns=(1, 1_400_000_000_000_000_003), dir_fd=fd, follow_symlinks=False)
    os.close(fd)
    fd = at([b"docs", b"locked"])
    os.fchmod(fd, 0o555)  # no write permission: the restore must still fill it
    os.close(fd)
    os.close(top)


def tree_snapshot(root: Path) -> dict[bytes, tuple[str, bytes, int, int]]:
    """Every entry under `root` by exact path: (kind, content or link target, mode, mtime_ns).

    Walks with directory descriptors (os.fwalk), so paths over PATH_MAX are fine; FIFOs and
    the like are left out (a backup skips them).
    """
    import os
    import stat

    out: dict[bytes, tuple[str, bytes, int, int]] = {}
    top = os.fsencode(root)
    for dirpath, dirnames, filenames, dirfd in os.fwalk(top):
        rel_dir = os.path.relpath(dirpath, top)
        prefix = b"" if rel_dir == b"." else rel_dir + b"/"
        for name in [*dirnames, *filenames]:
            st = os.lstat(name, dir_fd=dirfd)
            mode, mtime = stat.S_IMODE(st.st_mode), st.st_mtime_ns
            if stat.S_ISLNK(st.st_mode):
                out[prefix + name] = ("symlink", os.readlink(name, dir_fd=dirfd), 0, mtime)
            elif stat.S_ISDIR(st.st_mode):
                out[prefix + name] = ("dir", b"", mode, mtime)
            elif stat.S_ISREG(st.st_mode):
                fd = os.open(name, os.O_RDONLY, dir_fd=dirfd)
                with os.fdopen(fd, "rb") as f:
                    out[prefix + name] = ("file", f.read(), mode, mtime)
    return out


#: on_read's hook: (call number, offset, buffer) before each read of the file.
PreadvHook = Callable[[int, int, memoryview], None]


@pytest.fixture
def on_read(monkeypatch: pytest.MonkeyPatch) -> Callable[[str, PreadvHook], None]:
    """`on_read("a/x", hook)`: hook(call_number, offset, buffer) runs before each read of a
    file whose path ends in "a/x"; it may raise OSError or change the file.

    The hook sits in Python's os.preadv, so these tests read with the Python loop: the C loop
    (ltoflow._native) reads without os.preadv. tests/test_native.py checks that the two read
    alike, and that the C loop leaves every file it cannot take plainly to the Python one.
    """
    monkeypatch.setattr(hashing, "NATIVE", None)
    real = os.preadv
    hooks: dict[str, PreadvHook] = {}
    calls: dict[str, int] = {}

    def preadv(fd: int, buffers: list[Any], offset: int, *rest: int) -> int:
        path = str(Path(f"/proc/self/fd/{fd}").readlink())
        for suffix, hook in hooks.items():
            if path.endswith("/" + suffix):
                calls[suffix] = calls.get(suffix, 0) + 1
                hook(calls[suffix], offset, buffers[0])
        return real(fd, buffers, offset, *rest)

    monkeypatch.setattr(os, "preadv", preadv)
    return hooks.__setitem__


NOBODY = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"]
#: Root without the capabilities that let it read any file: the same permission checks as an
#: ordinary user, for when nobody cannot run this venv's python (it lives under /root).
ROOT_WITHOUT_DAC = ["setpriv", "--bounding-set=-dac_override,-dac_read_search"]


@attrs.frozen
class Unprivileged:
    prefix: list[str]
    base: Path

    def ltoflow(self, *args: str | Path) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*self.prefix, sys.executable, "-I", "-m", "ltoflow", *map(str, args)],
            capture_output=True, text=True, check=False, timeout=120, cwd="/",
            env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)})


@pytest.fixture
def unprivileged() -> Iterator[Unprivileged]:
    """A way to run ltoflow without the right to read every file, and a directory it can
    use; or a skip that says why there is none (we run as root, which reads mode-000 files)."""
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv (util-linux) is not installed: cannot drop root's privileges")
    why = []
    for prefix in (NOBODY, ROOT_WITHOUT_DAC):
        probe = subprocess.run([*prefix, sys.executable, "-c", "import ltoflow, trio, orjson"],
                               capture_output=True, text=True, check=False, timeout=60,
                               env={"PYTHONPATH": str(REPO)})
        if probe.returncode == 0:
            break
        why.append(f"{' '.join(prefix[1:])}: "
                   f"{(probe.stderr.strip().splitlines() or ['?'])[-1]}")
    else:
        pytest.skip(f"cannot run {sys.executable} unprivileged ({'; '.join(why)})")
    base = Path(tempfile.mkdtemp(prefix="ltoflow-unprivileged-", dir="/tmp"))
    base.chmod(0o777)
    try:
        yield Unprivileged(prefix, base)
    finally:
        shutil.rmtree(base, ignore_errors=True)
