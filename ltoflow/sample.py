"""A small sample records tree for the demo: `python -m ltoflow.sample DEST`.

Case folders with notes, ledgers, scanned pages, one video and an empty file, filled with seeded
random bytes (incompressible, like real scans) so every run makes the same tree.
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

KB = 1000


def sample_sizes(seed: int = 7) -> dict[str, int]:
    rng = random.Random(seed)
    sizes: dict[str, int] = {}
    for case in range(1, 6):
        folder = f"case-{case:03d}"
        sizes[f"{folder}/notes.txt"] = rng.randint(1 * KB, 6 * KB)
        sizes[f"{folder}/ledger.csv"] = rng.randint(5 * KB, 40 * KB)
        for page in range(1, rng.randint(4, 12)):
            sizes[f"{folder}/scans/page-{page:03d}.tif"] = rng.randint(60 * KB, 400 * KB)
    sizes["case-002/empty.dat"] = 0
    sizes["case-004/interview.mp4"] = 3_500 * KB
    return sizes


def make_sample_tree(dest: Path, *, seed: int = 7) -> tuple[int, int]:
    """Write the sample tree under `dest`; return (files, bytes)."""
    rng = random.Random(seed)
    sizes = sample_sizes(seed)
    for rel, size in sorted(sizes.items()):
        path = dest / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(rng.randbytes(size))
    return len(sizes), sum(sizes.values())


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m ltoflow.sample", description=__doc__)
    parser.add_argument("dest", type=Path)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    files, nbytes = make_sample_tree(args.dest, seed=args.seed)
    print(f"sample records tree: {files} files, {nbytes / 1e6:.1f} MB in {args.dest}")


if __name__ == "__main__":
    main()
