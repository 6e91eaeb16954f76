"""Deterministic benchmark data sets for ltoflow.

Every set is a pure function of its name, its seed and the size factor: the same call
produces the same tree (same paths, same sizes, same bytes) on any machine.

Content is incompressible but cheap to make.  Python's ``random.randbytes`` runs at
about 90 MB/s, too slow for gigabytes, so each set draws one 64 MiB random block from
its seed once, and every file chunk is the XOR of two slices of that block taken at
seeded offsets (two different offsets, so the XOR is never zero).  That yields about
250 MB/s of uniformly random-looking bytes without repeating the block, so even a
long-window compressor (zstd --long) finds nothing to deduplicate, across or within
files.  Each file also starts with a 16-byte digest of its set, seed and index, so no
two files are ever identical.

The ``scale`` set is the exception: a million sparse files made with ``os.truncate``;
only their number and sizes matter (they read as zeros).

Layout under ``dest``::

    dest/manifest.json   written last: marks a complete set and describes it
    dest/tree/...        the source tree to back up

A second ``make`` with the same parameters finds the manifest and reuses the set.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

GENERATOR_VERSION = 1
BLOCK_SIZE = 64 * 2**20
CHUNK_SIZE = 4 * 2**20
MANIFEST = "manifest.json"
INCOMPLETE = "INCOMPLETE"
TREE = "tree"

KB = 1000
MB = 1000**2
GB = 1000**3
KiB = 1024

SEEDS: dict[str, int] = {"mixed": 1001, "small": 1002, "large": 1003, "scale": 1004}
DESCRIPTIONS: dict[str, str] = {
    "mixed": "~2 GB: files of 50 KB-2 MB plus 3 files of 200-400 MB, nested directories",
    "small": "100,000 files of 1-8 KiB in ~1000 directories",
    "large": "3 files of 1-2 GB",
    "scale": "1,000,000 sparse files of 1 B-4 KiB (only sizes matter)",
}
NAMES: tuple[str, ...] = tuple(SEEDS)


@dataclass(frozen=True)
class FileSpec:
    path: str  # relative to the tree root, '/'-separated
    size: int


@dataclass(frozen=True)
class DataSet:
    name: str
    root: Path  # the tree to back up
    files: int
    bytes: int
    directories: int
    scale_factor: float
    seed: int
    sparse: bool
    reused: bool


# --------------------------------------------------------------------------- plans


def _dir_names(rng: random.Random, count: int, fanout: int, max_depth: int) -> list[str]:
    """`count` nested directory paths: each new one goes under a random existing one."""
    dirs: list[str] = []
    depth: dict[str, int] = {"": 0}
    children: dict[str, int] = {"": 0}
    while len(dirs) < count:
        candidates = [d for d in depth if depth[d] < max_depth and children[d] < fanout]
        parent = rng.choice(candidates)
        children[parent] += 1
        name = f"{parent}/d{children[parent]:03d}" if parent else f"d{children[parent]:03d}"
        depth[name] = depth[parent] + 1
        children[name] = 0
        dirs.append(name)
    return dirs


def _grid_dirs(count: int, per_top: int) -> list[str]:
    """`count` directories two levels deep: gNNN/dNNNN."""
    return [f"g{i // per_top:03d}/d{i:04d}" for i in range(count)]


def _plan_mixed(rng: random.Random, factor: float) -> list[FileSpec]:
    target = round(2 * GB * factor)
    big = [max(1, round(rng.randint(200 * MB, 400 * MB) * factor)) for _ in range(3)]
    dirs = _dir_names(rng, max(1, round(120 * factor)), fanout=6, max_depth=5)
    specs = [FileSpec(f"{rng.choice(dirs)}/big-{i}.bin", size) for i, size in enumerate(big)]
    total = sum(big)
    i = 0
    while total < target:
        size = rng.randint(50 * KB, 2 * MB)
        specs.append(FileSpec(f"{rng.choice(dirs)}/f{i:05d}.dat", size))
        total += size
        i += 1
    return specs


def _plan_small(rng: random.Random, factor: float) -> list[FileSpec]:
    count = max(1, round(100_000 * factor))
    dirs = _grid_dirs(max(1, round(1000 * factor)), per_top=32)
    return [
        FileSpec(f"{dirs[i % len(dirs)]}/r{i:06d}.rec", rng.randint(1 * KiB, 8 * KiB))
        for i in range(count)
    ]


def _plan_large(rng: random.Random, factor: float) -> list[FileSpec]:
    return [
        FileSpec(f"large-{i}.bin", max(1, round(rng.randint(1 * GB, 2 * GB) * factor)))
        for i in range(3)
    ]


def _plan_scale(rng: random.Random, factor: float) -> list[FileSpec]:
    count = max(1, round(1_000_000 * factor))
    dirs = _grid_dirs(max(1, round(1000 * factor)), per_top=32)
    return [
        FileSpec(f"{dirs[i % len(dirs)]}/s{i:07d}", rng.randint(1, 4 * KiB)) for i in range(count)
    ]


PLANNERS: dict[str, Callable[[random.Random, float], list[FileSpec]]] = {
    "mixed": _plan_mixed,
    "small": _plan_small,
    "large": _plan_large,
    "scale": _plan_scale,
}


def plan(name: str, scale_factor: float = 1.0) -> list[FileSpec]:
    """The files of set `name` at `scale_factor`, without creating anything."""
    if name not in PLANNERS:
        raise ValueError(f"unknown data set {name!r}; choose from {', '.join(NAMES)}")
    if not scale_factor > 0:
        raise ValueError(f"scale factor must be positive, got {scale_factor}")
    return PLANNERS[name](random.Random(SEEDS[name]), scale_factor)


# --------------------------------------------------------------------------- content


class ContentSource:
    """Seeded incompressible bytes: XOR of two seeded slices of one random block."""

    def __init__(self, seed: int) -> None:
        self._seed = seed
        self._block = memoryview(random.Random(seed).randbytes(BLOCK_SIZE))

    def chunks(self, index: int, size: int) -> Iterator[bytes]:
        """The bytes of file number `index` (`size` bytes), in chunks of at most 4 MiB."""
        rng = random.Random(f"{self._seed}:{index}")
        header = hashlib.blake2b(f"ltoflow-bench:{self._seed}:{index}".encode(), digest_size=16)
        remaining = size
        first = True
        while remaining > 0:
            n = min(remaining, CHUNK_SIZE)
            a = rng.randrange(BLOCK_SIZE - n + 1)
            b = rng.randrange(BLOCK_SIZE - n)
            if b >= a:
                b += 1  # never the same slice twice: XOR would be all zeros
            mixed = int.from_bytes(self._block[a : a + n], "little") ^ int.from_bytes(
                self._block[b : b + n], "little"
            )
            chunk = mixed.to_bytes(n, "little")
            if first:
                head = header.digest()[:n]
                chunk = head + chunk[len(head) :]
                first = False
            yield chunk
            remaining -= n


# --------------------------------------------------------------------------- make


def _read_manifest(dest: Path) -> dict[str, object] | None:
    try:
        data = json.loads((dest / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _prepare_dest(dest: Path) -> None:
    """Make `dest` empty, but only delete what an earlier (interrupted) make left there."""
    if dest.exists():
        entries = {p.name for p in dest.iterdir()}
        if entries and not entries <= {MANIFEST, INCOMPLETE, TREE}:
            raise FileExistsError(f"{dest} holds files that are not a benchmark set; not touching")
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    (dest / INCOMPLETE).write_text("generation in progress or interrupted\n")


def make(
    name: str,
    dest: Path | str,
    scale_factor: float = 1.0,
    *,
    progress: Callable[[str], None] | None = None,
) -> DataSet:
    """Create set `name` under `dest` (tree in dest/tree), or reuse a complete one there."""
    dest = Path(dest)
    specs = plan(name, scale_factor)
    seed = SEEDS[name]
    sparse = name == "scale"
    total = sum(s.size for s in specs)
    dirs = sorted({s.path.rpartition("/")[0] for s in specs} - {""})
    expected = {
        "generator_version": GENERATOR_VERSION,
        "name": name,
        "seed": seed,
        "scale_factor": scale_factor,
        "files": len(specs),
        "bytes": total,
    }
    manifest = _read_manifest(dest)
    if (
        manifest is not None
        and not (dest / INCOMPLETE).exists()
        and all(manifest.get(k) == v for k, v in expected.items())
    ):
        return DataSet(
            name, dest / TREE, len(specs), total, len(dirs), scale_factor, seed, sparse, reused=True
        )

    _prepare_dest(dest)
    root = dest / TREE
    root.mkdir()
    for d in dirs:
        (root / d).mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    last_report = started
    source = None if sparse else ContentSource(seed)
    for index, spec in enumerate(specs):
        path = f"{root}/{spec.path}"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            if source is None:
                os.ftruncate(fd, spec.size)
            else:
                for chunk in source.chunks(index, spec.size):
                    view = memoryview(chunk)
                    while view:
                        view = view[os.write(fd, view) :]
        finally:
            os.close(fd)
        now = time.monotonic()
        if progress is not None and now - last_report >= 5:
            progress(f"{name}: {index + 1:,}/{len(specs):,} files")
            last_report = now
    info = {
        **expected,
        "directories": len(dirs),
        "sparse": sparse,
        "description": DESCRIPTIONS[name],
        "generation_seconds": round(time.monotonic() - started, 3),
    }
    (dest / MANIFEST).write_text(json.dumps(info, indent=2) + "\n")
    (dest / INCOMPLETE).unlink()
    return DataSet(
        name, root, len(specs), total, len(dirs), scale_factor, seed, sparse, reused=False
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Create a deterministic benchmark data set.")
    parser.add_argument("name", choices=NAMES)
    parser.add_argument("dest", type=Path, help="directory to create (the tree goes in DEST/tree)")
    parser.add_argument(
        "--size-factor",
        type=float,
        default=1.0,
        help="scale sizes/counts down (0.05 = 5%%) for quick runs",
    )
    args = parser.parse_args(argv)
    result = make(
        args.name, args.dest, args.size_factor, progress=lambda m: print(m, file=sys.stderr)
    )
    print(json.dumps({**asdict(result), "root": str(result.root)}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
