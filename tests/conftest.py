"""Shared helpers: seeded source trees and catalog readers that use nothing but the files."""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

import pytest

from ltoflow.errors import leaves

pytest_plugins = ["tests.fakes.fixtures"]

SEED_FIXTURE = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "seed-format"


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
        out[f["relative_path"]] = bytes(data)
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
