"""The fault-injection matrix: every simulator injection point x backup / verify / restore.

Each cell runs the real command (in-process `main`) on a 3-tape set with one fault on one tape
and checks what the operator gets: the exit status, one clear line naming the tape, no
traceback; for a backup, that no tape's catalog describes data the tape does not hold and that
`--resume` then completes the set; for verify and restore, what still gets checked or restored.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from ltoflow.cli import EXIT_DAMAGED, EXIT_FAILED, EXIT_OK, main

from .conftest import write_tree
from .test_resume import SIZES, TREE, assert_complete_set, the_plan


def run(capsys: pytest.CaptureFixture[str], *args: str | Path) -> tuple[int, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    return code, out + err


def assert_catalogs_truthful(tapes: Path) -> None:
    """A tape with a catalog holds every container the catalog puts on it, hash for hash."""
    for root in sorted(p for p in tapes.iterdir() if p.is_dir()):
        path = root / "catalog" / "catalog.json"
        if not path.exists():
            continue
        doc = json.loads(path.read_bytes())
        for c in doc["containers"]:
            if c["tape_id"] == root.name:
                blob = (root / "data" / c["container_id"]).read_bytes()
                assert hashlib.sha256(blob).hexdigest() == c["sha256"], c["container_id"]


@pytest.fixture
def src(tmp_path: Path) -> tuple[Path, dict[str, bytes]]:
    contents = write_tree(tmp_path / "src", TREE)
    return tmp_path / "src", contents


def backup_faults(src: Path) -> dict[str, tuple[list[str], str]]:
    """Injection point -> (--sim-fault values, what the error line must say)."""
    plan = the_plan(src)
    t1 = plan.tapes[0]
    mid = plan.containers[0].size + plan.containers[1].size // 2
    return {
        "load": (["fail_on_load", "failed_tape_ids=2"], "did not load"),
        "container write (open)": (["fail_on_write", "failed_tape_ids=2"], "cannot write data/"),
        "container write (mid-container I/O error)": (
            [f"fail_write_after_bytes={mid}", "failed_tape_ids=1"], "failed after"),
        "container write (mid-container, tape full)": (
            [f"fail_after_bytes_written={mid}", "failed_tape_ids=1"],
            "no room left for its catalog"),
        "catalog write": ([f"fail_after_bytes_written={t1.data_bytes + 100}",
                           "failed_tape_ids=1"], "could not write the catalog"),
        "unload": (["fail_on_unload", "failed_tape_ids=1"], "did not unload"),
    }


@pytest.mark.parametrize("point", ["load", "container write (open)",
                                   "container write (mid-container I/O error)",
                                   "container write (mid-container, tape full)", "catalog write",
                                   "unload"])
def test_backup_fault_gives_a_clear_error_and_a_resumable_set(
    point: str, src: tuple[Path, dict[str, bytes]], tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    root, contents = src
    faults, says = backup_faults(root)[point]
    tapes = tmp_path / "tapes"
    args: list[str | Path] = ["backup", "--source", root, "--simulator", tapes, *SIZES, "--quiet"]
    code, err = run(capsys, *args, *(x for f in faults for x in ("--sim-fault", f)))
    assert code == EXIT_FAILED
    (error,) = [line for line in err.splitlines() if "error:" in line]
    assert says in error
    assert "TAPE-" in error  # names the tape
    assert "--resume" in err.splitlines()[-1]
    assert_catalogs_truthful(tapes)

    code, err = run(capsys, *args, "--resume")
    assert code == EXIT_OK, err
    assert_complete_set(tapes, contents)


@pytest.fixture
def written_set(src: tuple[Path, dict[str, bytes]], tmp_path_factory: pytest.TempPathFactory,
                capsys: pytest.CaptureFixture[str]) -> Path:
    tapes = tmp_path_factory.mktemp("set") / "tapes"
    code, _ = run(capsys, "backup", "--source", src[0], "--simulator", tapes, *SIZES, "--quiet")
    assert code == EXIT_OK
    return tapes


# (fault, exit status, what the output must say) for reading jobs; tape 2 of 3 is faulty.
READ_CELLS = {
    "load": ("fail_on_load", EXIT_DAMAGED, "did not load"),
    "read": ("fail_on_read", EXIT_DAMAGED, "cannot read data/"),
    "unload": ("fail_on_unload", EXIT_OK, "warning: injected simulator failure"),
}


@pytest.mark.parametrize("point", list(READ_CELLS))
def test_verify_fault_is_reported_against_its_tape_and_the_rest_is_checked(
    point: str, written_set: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fault, status, says = READ_CELLS[point]
    code, out = run(capsys, "verify", "--simulator", written_set,
                    "--sim-fault", fault, "--sim-fault", "failed_tape_ids=2")
    assert code == status
    assert says in out
    # Tapes 1 and 3 are verified whatever happened to tape 2.
    for n in ("001", "003"):
        assert f"-{n}: " in out, out


@pytest.mark.parametrize("point", list(READ_CELLS))
def test_restore_fault_names_the_files_it_costs_and_restores_the_rest(
    point: str, written_set: Path, src: tuple[Path, dict[str, bytes]], tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    fault, status, says = READ_CELLS[point]
    target = tmp_path / "out"
    code, out = run(capsys, "restore", "--simulator", written_set, "--target", target,
                    "--sim-fault", fault, "--sim-fault", "failed_tape_ids=2")
    assert code == status
    assert says in out
    restored = {p.relative_to(target).as_posix(): p.read_bytes()
                for p in target.rglob("*") if p.is_file()}
    contents = src[1]
    # Every restored file is whole and right; every file not restored is named as failed.
    for rel, data in restored.items():
        assert data == contents[rel]
    for rel in set(contents) - set(restored):
        assert f"FAILED {rel}:" in out
    if status == EXIT_OK:
        assert set(restored) == set(contents)
    shutil.rmtree(target, ignore_errors=True)
