"""The standalone recovery kit (ltoflow/recovery/restore.py) against a real 3-tape set.

The script must work decades from now without ltoflow, so it is run exactly as a person would
run it: as a separate process, isolated (-I), with the current interpreter and, when installed,
with Python 3.8 (the oldest version it promises to support).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from .conftest import REPO, SEED_FIXTURE, tree_snapshot, write_odd_tree

SCRIPT = REPO / "ltoflow" / "recovery" / "restore.py"
README = REPO / "ltoflow" / "recovery" / "README.txt"
FIXTURE = SEED_FIXTURE
SOURCE = FIXTURE / "source"
SET_ID = "28ad0eff-a584-452c-9d9b-60c9e615d6f6"
TAPE_IDS = [f"TAPE-{SET_ID}-00{n}" for n in (1, 2, 3)]
PY38 = Path("/root/.pyenv/versions/3.8.18/bin/python3")

ALL_FILES = {
    "case-001/notes.txt",
    "case-001/video.bin",
    "case-002/empty.dat",
    "case-002/ledger.csv",
    "case-002/scans/page-001.tif",
    "case-002/scans/page-002.tif",
}

@pytest.fixture(
    params=[
        pytest.param(sys.executable, id="current-python"),
        pytest.param(
            str(PY38),
            id="python3.8",
            marks=pytest.mark.skipif(
                not PY38.exists(),
                reason=f"Python 3.8 is not installed at {PY38}; cannot check 3.8 compatibility",
            ),
        ),
    ]
)
def python(request: pytest.FixtureRequest) -> str:
    interpreter: str = request.param
    return interpreter


@pytest.fixture
def tapes(tmp_path: Path) -> list[Path]:
    """A writable copy of the fixture's three tape roots, in sequence order."""
    dest = tmp_path / "tapes"
    shutil.copytree(FIXTURE / "tapes", dest, copy_function=shutil.copyfile)
    for dirpath, _dirnames, _filenames in os.walk(dest):
        Path(dirpath).chmod(0o755)
    roots = [dest / tape_id for tape_id in TAPE_IDS]
    assert all(r.is_dir() for r in roots)
    return roots


def run(python: str, *args: str | Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [python, "-I", str(SCRIPT), *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=60,
        check=False,
    )
    assert "Traceback" not in proc.stdout + proc.stderr, proc.stderr
    return proc


def output(proc: subprocess.CompletedProcess[str]) -> str:
    return proc.stdout + proc.stderr


def files_under(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if not p.is_dir()}


def assert_same_as_source(target: Path, rel: str) -> None:
    assert (target / rel).read_bytes() == (SOURCE / rel).read_bytes(), rel


def load_catalog(root: Path) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads((root / "catalog" / "catalog.json").read_bytes())
    return doc


def write_catalog(roots: list[Path], doc: dict[str, Any], *, compact: bool = False) -> None:
    """Replace the catalog on every root with `doc`, with a matching catalog.sha256."""
    if compact:
        data = json.dumps(doc, separators=(",", ":")).encode()
    else:
        data = json.dumps(doc, indent=2).encode()
    for root in roots:
        (root / "catalog" / "catalog.json").write_bytes(data)
        (root / "catalog" / "catalog.sha256").write_text(hashlib.sha256(data).hexdigest())


def file_record(doc: dict[str, Any], rel: str) -> dict[str, Any]:
    record: dict[str, Any] = next(f for f in doc["source_files"] if f["relative_path"] == rel)
    return record


def container_path(roots: list[Path], seq: int) -> Path:
    name = f"CNT-{SET_ID}-{seq:05d}"
    return next(r / "data" / name for r in roots if (r / "data" / name).exists())


def no_temp_files(target: Path) -> bool:
    return not [p for p in target.rglob("*") if p.name.startswith(".ltoflow-restore-")]


# ------------------------------------------------------------------------------- happy path


def test_full_restore_equals_source(python: str, tapes: list[Path], tmp_path: Path) -> None:
    target = tmp_path / "out"
    proc = run(python, "--target", target, *tapes, cwd=tmp_path)

    assert proc.returncode == 0, output(proc)
    assert "restored 6 of 6 files (566,200 bytes); 0 failed" in proc.stdout
    assert files_under(target) == ALL_FILES
    for rel in ALL_FILES:
        assert_same_as_source(target, rel)
    assert (target / "case-002/empty.dat").stat().st_size == 0
    catalog = load_catalog(tapes[0])
    notes = file_record(catalog, "case-001/notes.txt")
    st = (target / "case-001/notes.txt").stat()
    assert st.st_mode & 0o7777 == notes["unix_mode"] & 0o7777 == 0o644
    expected = dt.datetime.fromisoformat(notes["modified_at"])
    expected_ns = int(expected.timestamp()) * 10**9 + expected.microsecond * 1000
    assert st.st_mtime_ns == expected_ns
    assert no_temp_files(target)


def test_rerun_keeps_identical_files_and_succeeds(
    python: str, tapes: list[Path], tmp_path: Path
) -> None:
    target = tmp_path / "out"
    assert run(python, "--target", target, *tapes, cwd=tmp_path).returncode == 0
    proc = run(python, "--target", target, *tapes, cwd=tmp_path)
    assert proc.returncode == 0, output(proc)
    assert "6 file(s) were already present in the target and verified identical" in proc.stdout
    assert "restored 6 of 6 files" in proc.stdout


def test_existing_different_file_is_kept_unless_overwrite(
    python: str, tapes: list[Path], tmp_path: Path
) -> None:
    target = tmp_path / "out"
    (target / "case-001").mkdir(parents=True)
    (target / "case-001/notes.txt").write_bytes(b"local edits")

    proc = run(python, "--target", target, *tapes, cwd=tmp_path)
    assert proc.returncode == 1
    assert "case-001/notes.txt: already exists" in proc.stderr
    assert "--overwrite" in proc.stderr
    assert (target / "case-001/notes.txt").read_bytes() == b"local edits"
    assert "restored 5 of 6 files" in proc.stdout

    proc = run(python, "--overwrite", "--target", target, *tapes, cwd=tmp_path)
    assert proc.returncode == 0, output(proc)
    assert_same_as_source(target, "case-001/notes.txt")


def test_only_glob_restores_just_matching_files(
    python: str, tapes: list[Path], tmp_path: Path
) -> None:
    target = tmp_path / "tifs"
    proc = run(python, "--target", target, "--only", "*.tif", *tapes, cwd=tmp_path)
    assert proc.returncode == 0, output(proc)
    assert files_under(target) == {"case-002/scans/page-001.tif", "case-002/scans/page-002.tif"}
    assert "restored 2 of 2 files (210,000 bytes); 0 failed" in proc.stdout
    for rel in files_under(target):
        assert_same_as_source(target, rel)

    target = tmp_path / "dirs"
    proc = run(
        python, "--target", target, "--only", "case-001", "--only", "*/ledger.csv", *tapes,
        cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, output(proc)
    assert files_under(target) == {
        "case-001/notes.txt",
        "case-001/video.bin",
        "case-002/ledger.csv",
    }
    for rel in files_under(target):
        assert_same_as_source(target, rel)


def test_only_without_match_is_a_usage_error(
    python: str, tapes: list[Path], tmp_path: Path
) -> None:
    """As in ltoflow restore: one pattern of several that matches nothing (a typo) is refused
    before anything is restored."""
    proc = run(python, "--target", tmp_path / "o", "--only", "case-001", "--only", "nope/*",
               *tapes, cwd=tmp_path)
    assert proc.returncode == 2
    assert "nothing in the catalog matches 'nope/*'; nothing restored" in proc.stderr
    assert not (tmp_path / "o").exists()


def test_only_takes_a_leading_dot_slash_or_slash_as_ltoflow_does(
    python: str, tapes: list[Path], tmp_path: Path
) -> None:
    proc = run(python, "--target", tmp_path / "o", "--only", "./case-001/", "--only",
               "/case-002/ledger.csv", *tapes, cwd=tmp_path)
    assert proc.returncode == 0, output(proc)
    assert files_under(tmp_path / "o") == {
        "case-001/notes.txt", "case-001/video.bin", "case-002/ledger.csv"}


def test_list_shows_sizes_and_tapes(python: str, tapes: list[Path], tmp_path: Path) -> None:
    proc = run(python, "--list", tapes[0], cwd=tmp_path)
    assert proc.returncode == 0, output(proc)
    lines = {line.split()[1]: line for line in proc.stdout.splitlines() if "  tapes: " in line}
    assert set(lines) == ALL_FILES
    video = lines["case-001/video.bin"]
    assert "350,000" in video
    assert TAPE_IDS[0] in video
    assert TAPE_IDS[1] in video
    assert f"not on the given roots: {TAPE_IDS[1]}" in video
    assert "6 files, 566,200 bytes, on 3 tape(s)" in proc.stdout
    assert not (tmp_path / "case-001").exists()


def test_compact_catalog_with_unknown_keys_mtime_ns_and_null_container_hash(
    python: str, tapes: list[Path], tmp_path: Path
) -> None:
    doc = load_catalog(tapes[0])
    doc["future_top_level"] = {"anything": [1, 2]}
    for section in ("tapes", "containers", "source_files", "segments"):
        for record in doc[section]:
            record["future_field"] = "ignored"
    for container in doc["containers"]:
        container["sha256"] = None
    del doc["containers"][0]["sha256"]
    notes = file_record(doc, "case-001/notes.txt")
    notes["mtime_ns"] = 1_234_567_890_123_456_789
    notes["unix_mode"] = 0o100600
    write_catalog(tapes, doc, compact=True)

    target = tmp_path / "out"
    proc = run(python, "--target", target, *tapes, cwd=tmp_path)
    assert proc.returncode == 0, output(proc)
    for rel in ALL_FILES:
        assert_same_as_source(target, rel)
    st = (target / "case-001/notes.txt").stat()
    assert st.st_mtime_ns == 1_234_567_890_123_456_789
    assert st.st_mode & 0o7777 == 0o600


# ------------------------------------------------------------------------------- missing tapes


@pytest.mark.parametrize(
    ("given", "restored", "missing_tape"),
    [
        (
            [0, 1],
            {"case-001/notes.txt", "case-001/video.bin", "case-002/ledger.csv",
             "case-002/empty.dat"},
            2,
        ),
        ([2], {"case-002/scans/page-002.tif", "case-002/empty.dat"}, 0),
    ],
)  # fmt: skip
def test_only_some_tapes_restores_what_they_hold(
    python: str,
    tapes: list[Path],
    tmp_path: Path,
    given: list[int],
    restored: set[str],
    missing_tape: int,
) -> None:
    target = tmp_path / "out"
    proc = run(python, "--target", target, *[tapes[i] for i in given], cwd=tmp_path)

    assert proc.returncode == 1
    assert files_under(target) == restored
    for rel in restored:
        assert_same_as_source(target, rel)
    for rel in ALL_FILES - restored:
        assert f"FAILED: {rel}: needs tape(s) not given:" in proc.stderr
    assert TAPE_IDS[missing_tape] in proc.stderr
    assert f"restored {len(restored)} of 6 files" in proc.stdout
    assert f"{len(ALL_FILES - restored)} failed" in proc.stdout
    assert no_temp_files(target)


# ------------------------------------------------------------------------------- damaged data


@pytest.mark.parametrize(
    ("container_seq", "offset", "damaged"),
    [
        (4, 52_000, "case-002/ledger.csv"),  # a file inside one container
        (3, 10, "case-001/video.bin"),  # one piece of a file spread over two tapes
    ],
)
def test_corrupted_byte_fails_only_the_damaged_file(
    python: str,
    tapes: list[Path],
    tmp_path: Path,
    container_seq: int,
    offset: int,
    damaged: str,
) -> None:
    blob = container_path(tapes, container_seq)
    data = bytearray(blob.read_bytes())
    data[offset] ^= 0xFF
    blob.write_bytes(bytes(data))

    target = tmp_path / "out"
    proc = run(python, "--target", target, *tapes, cwd=tmp_path)

    assert proc.returncode == 1
    assert f"FAILED: {damaged}: SHA-256 mismatch" in proc.stderr
    assert proc.stderr.count("FAILED:") == 1
    assert not (target / damaged).exists()
    assert files_under(target) == ALL_FILES - {damaged}  # also: no temporary file left over
    for rel in ALL_FILES - {damaged}:
        assert_same_as_source(target, rel)
    assert "restored 5 of 6 files" in proc.stdout
    assert "1 failed" in proc.stdout


def test_truncated_container_reports_out_of_range(
    python: str, tapes: list[Path], tmp_path: Path
) -> None:
    blob = container_path(tapes, 6)
    blob.write_bytes(blob.read_bytes()[:1000])
    target = tmp_path / "out"
    proc = run(python, "--target", target, *tapes, cwd=tmp_path)
    assert proc.returncode == 1
    assert "FAILED: case-002/scans/page-002.tif: segment" in proc.stderr
    assert "holds only 1000 bytes" in proc.stderr
    assert files_under(target) == ALL_FILES - {"case-002/scans/page-002.tif"}


def _segments_of(doc: dict[str, Any], rel: str) -> list[dict[str, Any]]:
    file_id = file_record(doc, rel)["file_id"]
    return [s for s in doc["segments"] if s["file_id"] == file_id]


def test_inconsistent_segments_fail_that_file_only(
    python: str, tapes: list[Path], tmp_path: Path
) -> None:
    doc = load_catalog(tapes[0])
    _segments_of(doc, "case-001/video.bin")[0]["length_bytes"] -= 1
    _segments_of(doc, "case-002/scans/page-002.tif")[0]["length_bytes"] += 1
    file_record(doc, "case-002/ledger.csv")["size_bytes"] += 1
    _segments_of(doc, "case-001/notes.txt")[0]["container_offset"] += 10**12
    write_catalog(tapes, doc)
    expected = {
        "case-001/video.bin": "catalog segments leave a gap at bytes 98799..98800",
        "case-002/scans/page-002.tif": "catalog segments overlap at byte 53800",
        "case-002/ledger.csv": "segments add up to 5000 bytes but size_bytes is 5001",
        "case-001/notes.txt": f"container CNT-{SET_ID}-00001, which holds only 100000 bytes",
    }

    target = tmp_path / "out"
    proc = run(python, "--target", target, *tapes, cwd=tmp_path)

    assert proc.returncode == 1
    for rel, message in expected.items():
        line = next(x for x in proc.stderr.splitlines() if x.startswith(f"FAILED: {rel}: "))
        assert message in line
    assert files_under(target) == ALL_FILES - set(expected)
    assert "restored 2 of 6 files (90,000 bytes); 4 failed" in proc.stdout


# ------------------------------------------------------------------------------- hostile catalogs

HOSTILE = [
    ("{outside}/absolute.txt", "relative_path is absolute"),
    ("../escape.txt", "'..' component"),
    ("case-001/../../escape.txt", "'..' component"),
    ("", "empty relative_path"),
    ("nul\x00byte.txt", "NUL character"),
]


def test_hostile_paths_are_refused(python: str, tapes: list[Path], tmp_path: Path) -> None:
    """Extra catalog entries with hostile paths (and ledger.csv's real data) are refused."""
    outside = tmp_path / "outside"
    outside.mkdir()
    target = tmp_path / "work" / "out"
    doc = load_catalog(tapes[0])
    ledger = file_record(doc, "case-002/ledger.csv")
    ledger_segments = _segments_of(doc, "case-002/ledger.csv")
    shown: dict[str, str] = {}
    for n, (template, message) in enumerate(HOSTILE):
        path = template.replace("{outside}", str(outside))
        file_id = f"hostile-{n}"
        doc["source_files"].append({**ledger, "file_id": file_id, "relative_path": path})
        doc["segments"] += [{**s, "file_id": file_id} for s in ledger_segments]
        index = len(doc["source_files"]) - 1
        display = path.replace("\x00", "\\x00") or f"<file #{index} without a usable path>"
        shown[display] = message
    write_catalog(tapes, doc)

    proc = run(python, "--target", target, *tapes, cwd=tmp_path)

    assert proc.returncode == 1
    for name, message in shown.items():
        line = next(x for x in proc.stderr.splitlines() if x.startswith(f"FAILED: {name}: "))
        assert message in line
    assert list(outside.iterdir()) == []
    assert not (tmp_path / "work" / "escape.txt").exists()
    assert not (tmp_path / "escape.txt").exists()
    assert files_under(tmp_path / "work") == {f"out/{rel}" for rel in ALL_FILES}
    assert "restored 6 of 11 files (566,200 bytes); 5 failed" in proc.stdout


def test_symlink_in_target_is_not_followed(python: str, tapes: list[Path], tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    target = tmp_path / "out"
    target.mkdir()
    (target / "case-002").symlink_to(outside, target_is_directory=True)

    proc = run(python, "--target", target, *tapes, cwd=tmp_path)

    assert proc.returncode == 1
    assert list(outside.iterdir()) == []
    for rel in ("case-002/empty.dat", "case-002/ledger.csv", "case-002/scans/page-001.tif"):
        assert f"FAILED: {rel}: parent " in proc.stderr
    assert "is a symbolic link" in proc.stderr
    for rel in ("case-001/notes.txt", "case-001/video.bin"):
        assert_same_as_source(target, rel)
    assert "restored 2 of 6 files" in proc.stdout


def test_symlink_as_final_name_is_not_written_through(
    python: str, tapes: list[Path], tmp_path: Path
) -> None:
    victim = tmp_path / "victim.txt"
    victim.write_bytes(b"precious")
    target = tmp_path / "out"
    (target / "case-001").mkdir(parents=True)
    (target / "case-001/notes.txt").symlink_to(victim)

    proc = run(python, "--target", target, *tapes, cwd=tmp_path)
    assert proc.returncode == 1
    assert "FAILED: case-001/notes.txt: already exists" in proc.stderr
    assert victim.read_bytes() == b"precious"

    proc = run(python, "--overwrite", "--target", target, *tapes, cwd=tmp_path)
    assert proc.returncode == 0, output(proc)
    assert victim.read_bytes() == b"precious"
    assert not (target / "case-001/notes.txt").is_symlink()
    assert_same_as_source(target, "case-001/notes.txt")


def test_a_container_missing_from_a_given_tape_is_named_not_the_tape(
    python: str, tapes: list[Path], tmp_path: Path
) -> None:
    """Every tape given, one container gone from tape 3: its files fail naming the container
    and the tape it should be on; the tape is not said to be missing."""
    blob = container_path(tapes, 6)
    blob.unlink()
    proc = run(python, "--target", tmp_path / "out", *tapes, cwd=tmp_path)
    assert proc.returncode == 1
    assert (
        f"FAILED: case-002/scans/page-002.tif: container {blob.name} is missing from tape "
        f"{TAPE_IDS[2]} ({tapes[2]}), or is not a regular file there"
    ) in proc.stderr
    assert "not given" not in output(proc)
    assert files_under(tmp_path / "out") == ALL_FILES - {"case-002/scans/page-002.tif"}


def test_bytes_appended_to_a_container_are_said_to_be_no_files_not_damage(
    python: str, tapes: list[Path], tmp_path: Path
) -> None:
    blob = container_path(tapes, 6)
    with blob.open("ab") as fh:
        fh.write(b"appended later")
    proc = run(python, "--target", tmp_path / "out", *tapes, cwd=tmp_path)
    assert proc.returncode == 0, output(proc)
    assert "the bytes past that belong to no file" in proc.stderr
    assert "does not match its SHA-256" not in proc.stderr
    assert files_under(tmp_path / "out") == ALL_FILES


def test_a_given_tape_whose_data_is_gone_is_known_by_its_name_not_called_missing(
    python: str, tapes: list[Path], tmp_path: Path
) -> None:
    """A tape whose data/ is empty (its LTFS index lost, say) holds none of the containers
    that tell which tape a root is: its folder's name does (or the simulator's tape.json),
    and its files fail naming the missing containers, not a tape "not given"."""
    for blob in (tapes[2] / "data").iterdir():
        blob.unlink()
    proc = run(python, "--target", tmp_path / "out", *tapes, cwd=tmp_path)
    assert proc.returncode == 1
    assert f"is missing from tape {TAPE_IDS[2]} ({tapes[2]}), or is not a regular" in proc.stderr
    assert "not given" not in output(proc)
    # under another name, it is its tape.json that tells (a damaged one, nothing: no traceback)
    renamed = tapes[2].with_name("third")
    tapes[2].rename(renamed)
    (renamed / "tape.json").write_text(json.dumps({"tape_id": TAPE_IDS[2]}))
    proc = run(python, "--target", tmp_path / "o2", *tapes[:2], renamed, cwd=tmp_path)
    assert f"is missing from tape {TAPE_IDS[2]} ({renamed})" in proc.stderr
    (renamed / "tape.json").write_text(json.dumps({"tape_id": [TAPE_IDS[2]]}))
    proc = run(python, "--target", tmp_path / "o3", *tapes[:2], renamed, cwd=tmp_path)
    assert proc.returncode == 1
    assert f"needs tape(s) not given: {TAPE_IDS[2]}" in proc.stderr


def test_a_piece_of_a_container_left_on_another_tape_is_passed_over(
    python: str, tapes: list[Path], tmp_path: Path
) -> None:
    """An interrupted backup may leave the start of a container on a tape that filled, and
    write it whole on the next one: the whole one, on the catalog's tape, is read."""
    blob = container_path(tapes, 6)
    assert blob.parent.parent == tapes[2]
    (tapes[0] / "data" / blob.name).write_bytes(blob.read_bytes()[:1000])
    target = tmp_path / "out"
    proc = run(python, "--target", target, *tapes, cwd=tmp_path)
    assert proc.returncode == 0, output(proc)
    assert files_under(target) == ALL_FILES
    for rel in ALL_FILES:
        assert_same_as_source(target, rel)
    # Without tape 3, pieces are not taken for its containers: tape 3 is asked for.
    other = container_path(tapes, 5)  # page-002.tif lies in containers 5 and 6
    (tapes[0] / "data" / other.name).write_bytes(other.read_bytes()[:1000])
    proc = run(python, "--target", tmp_path / "out2", tapes[0], tapes[1], cwd=tmp_path)
    assert proc.returncode == 1
    assert (f"FAILED: case-002/scans/page-002.tif: needs tape(s) not given: {TAPE_IDS[2]}"
            in proc.stderr)


def test_container_id_cannot_point_outside_data(
    python: str, tapes: list[Path], tmp_path: Path
) -> None:
    doc = load_catalog(tapes[0])
    file_id = file_record(doc, "case-001/notes.txt")["file_id"]
    next(s for s in doc["segments"] if s["file_id"] == file_id)["container_id"] = "../tape.json"
    write_catalog(tapes, doc)
    proc = run(python, "--target", tmp_path / "out", *tapes, cwd=tmp_path)
    assert proc.returncode == 1
    assert "FAILED: case-001/notes.txt: needs tape(s) not given" in proc.stderr


# ------------------------------------------------------------------------------- the catalog


def test_catalog_checksum_mismatch_is_reported_and_another_copy_used(
    python: str, tapes: list[Path], tmp_path: Path
) -> None:
    bad = tapes[0] / "catalog" / "catalog.json"
    bad.write_bytes(bad.read_bytes().replace(b"/srv/records", b"/srv/recordz", 1))

    proc = run(python, "--target", tmp_path / "out", *tapes, cwd=tmp_path)

    assert proc.returncode == 0, output(proc)
    assert f"catalog {bad} does NOT match catalog.sha256" in proc.stderr
    assert f"using catalog {tapes[1] / 'catalog' / 'catalog.json'}" in proc.stdout
    assert files_under(tmp_path / "out") == ALL_FILES


def test_no_verified_catalog_stops_unless_forced(
    python: str, tapes: list[Path], tmp_path: Path
) -> None:
    sha_file = tapes[0] / "catalog" / "catalog.sha256"
    sha_file.write_text("0" * 64)
    target = tmp_path / "out"

    proc = run(python, "--target", target, tapes[0], cwd=tmp_path)
    assert proc.returncode == 2
    assert "does NOT match catalog.sha256" in proc.stderr
    assert "no catalog could be verified" in proc.stderr
    assert "--force-catalog" in proc.stderr
    assert not target.exists()

    proc = run(python, "--force-catalog", "--target", target, *tapes, cwd=tmp_path)
    assert proc.returncode == 0, output(proc)  # tapes 2 and 3 still have a good catalog
    assert "UNVERIFIED" not in proc.stderr

    for root in tapes[1:]:
        (root / "catalog" / "catalog.sha256").write_text("0" * 64)
    proc = run(python, "--target", tmp_path / "o2", *tapes, cwd=tmp_path)
    assert proc.returncode == 2
    assert ("(all 3 copies of catalog.json are identical, so their catalog.sha256 files are "
            "more likely the damaged part)") in proc.stderr
    proc = run(python, "--force-catalog", "--target", tmp_path / "o2", *tapes, cwd=tmp_path)
    assert proc.returncode == 0, output(proc)
    assert "using an UNVERIFIED catalog" in proc.stderr
    assert files_under(tmp_path / "o2") == ALL_FILES


def test_explicit_catalog_is_checked_against_the_tapes(
    python: str, tapes: list[Path], tmp_path: Path
) -> None:
    copy = tmp_path / "elsewhere" / "my-catalog.json"
    copy.parent.mkdir()
    shutil.copyfile(tapes[0] / "catalog" / "catalog.json", copy)
    for root in tapes:
        shutil.rmtree(root / "catalog")
    proc = run(python, "--catalog", copy, "--target", tmp_path / "out", *tapes, cwd=tmp_path)
    assert proc.returncode == 2
    assert "cannot be verified" in proc.stderr

    proc = run(
        python, "--force-catalog", "--catalog", copy, "--target", tmp_path / "out", *tapes,
        cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, output(proc)
    assert files_under(tmp_path / "out") == ALL_FILES


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--target", "{tmp}/out", "{tmp}/no-such-tape"], "is not a directory"),
        (["{tape}"], "--target"),
        (["--target", "{tmp}/out", "{tmp}"], "no catalog found"),
        (["--target", "{tmp}/out", "--catalog", "{tmp}/nope.json", "{tape}"],
         "cannot read --catalog {tmp}/nope.json: No such file or directory"),
    ],
    ids=["missing-root", "no-target", "no-catalog", "unreadable-catalog-file"],
)
def test_usage_errors_exit_2(
    python: str, tapes: list[Path], tmp_path: Path, args: list[str], message: str
) -> None:
    argv = [a.replace("{tmp}", str(tmp_path)).replace("{tape}", str(tapes[0])) for a in args]
    proc = run(python, *argv, cwd=tmp_path)
    assert proc.returncode == 2
    assert message.replace("{tmp}", str(tmp_path)) in proc.stderr


# ------------------------------------------------------------------------------- the README


def test_readme_is_plain_narrow_text_covering_every_catalog_field() -> None:
    text = README.read_text(encoding="ascii")
    assert max(len(line) for line in text.splitlines()) < 120
    assert "\t" not in text
    doc = json.loads((FIXTURE / "tapes" / TAPE_IDS[0] / "catalog" / "catalog.json").read_bytes())
    fields = set(doc) | {"mtime_ns"}
    for section in ("tapes", "containers", "source_files", "segments"):
        fields |= set(doc[section][0])
    for field in fields:
        assert f"  {field} " in text, field
    for tool in ("sha256sum", "iflag=skip_bytes,count_bytes", "tail -c +", "restore.py"):
        assert tool in text


def test_the_readmes_python_step_prints_the_record_and_its_pieces_in_order() -> None:
    """Section 5's Step 1, run as printed (its indentation removed) in a tape's root."""
    lines = README.read_text(encoding="ascii").splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("  python3 - catalog/"))
    end = lines.index("  END", start)
    script = "\n".join(line[2:] for line in lines[start:end + 1]) + "\n"
    proc = subprocess.run(["bash", "-c", script], capture_output=True, text=True, check=True,
                          cwd=FIXTURE / "tapes" / TAPE_IDS[0], timeout=60)
    record, *pieces = proc.stdout.splitlines()
    assert "'relative_path': 'case-001/video.bin'" in record
    assert [p.split()[1][-5:] + " " + p.split()[2] for p in pieces] == [
        "00001 skip=1200", "00002 skip=0", "00003 skip=0", "00004 skip=0"]
    assert pieces[2].startswith(TAPE_IDS[1])


# ------------------------------------------------------------------------------- odd trees


#: The kit's exit status when nothing failed but the selection holds entries the backup
#: skipped: the odd tree's FIFO.
SKIPPED_SOME = 4


@pytest.fixture(scope="module")
def odd_tapes(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    """conftest.write_odd_tree backed up by ltoflow: (source, tape roots in order)."""
    from ltoflow import BackupConfig, backup

    root = tmp_path_factory.mktemp("odd")
    src = root / "src"
    write_odd_tree(src)
    result = backup(BackupConfig(source_root=src, tapes_root=root / "tapes",
                                 tape_nominal_capacity_bytes=2_000_000,
                                 max_container_size_bytes=4_000))
    roots = [root / "tapes" / t.tape_id for t in result.catalog.tapes]
    return src, roots


def test_odd_tree_comes_back_exactly(python: str, odd_tapes: tuple[Path, list[Path]],
                                     tmp_path: Path) -> None:
    src, roots = odd_tapes
    target = tmp_path / "out"
    proc = run(python, "--target", target, *roots, cwd=tmp_path)
    assert proc.returncode == SKIPPED_SOME, output(proc)
    assert "skipped by the backup, not restored: pipe (fifo): not a regular file" in proc.stdout
    before = tree_snapshot(src)
    assert tree_snapshot(target) == before  # names, bytes, link targets, modes, mtimes
    links = sum(kind == "symlink" for kind, *_ in before.values())
    dirs = sum(kind == "dir" for kind, *_ in before.values())
    assert f"restored {links} of {links} symbolic links and {dirs} of {dirs} directories; " \
           "0 failed" in proc.stdout
    again = run(python, "--target", target, *roots, cwd=tmp_path)  # a rerun keeps it all
    assert again.returncode == SKIPPED_SOME, output(again)
    assert tree_snapshot(target) == before


def test_a_rerun_gives_identical_files_their_backed_up_mode_and_time(
        python: str, odd_tapes: tuple[Path, list[Path]], tmp_path: Path) -> None:
    """A file already there with the backed-up bytes but another mode or time (a copy made by
    hand, say) is counted identical and given the backed-up mode and time."""
    src, roots = odd_tapes
    target = tmp_path / "out"
    assert run(python, "--target", target, *roots, cwd=tmp_path).returncode == SKIPPED_SOME
    rel = next(p.relative_to(src) for d in (src, *sorted(src.iterdir()))
               if d.is_dir() and not d.is_symlink() for p in sorted(d.iterdir())
               if p.is_file() and not p.is_symlink() and p.stat().st_size
               and p.name.isascii() and os.access(p, os.W_OK))
    changed = target / rel
    changed.chmod(0o600)
    os.utime(changed, ns=(0, 0))
    proc = run(python, "--target", target, *roots, cwd=tmp_path)
    assert proc.returncode == SKIPPED_SOME, output(proc)
    assert "were already present in the target and verified identical" in proc.stdout
    assert tree_snapshot(target) == tree_snapshot(src)


def test_odd_names_are_selected_by_exact_bytes(python: str, odd_tapes: tuple[Path, list[Path]],
                                               tmp_path: Path) -> None:
    _, roots = odd_tapes
    target = tmp_path / "out"
    proc = subprocess.run(
        [python, "-I", SCRIPT, "--target", target, "--only", b"odd-\xff\xfe/new\nline",
         "--only", "\\xe9\\xe9.bin", *roots],
        capture_output=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    assert sorted(tree_snapshot(target)) == [
        b"odd-\xff\xfe", b"odd-\xff\xfe/new\nline", b"\xe9\xe9.bin"]
    # and as --list shows it (the newline as \n), copied from there
    shown = run(python, "--target", tmp_path / "shown", "--only", r"odd-\xff\xfe/new\nline",
                *roots, cwd=tmp_path)
    assert shown.returncode == 0, output(shown)
    assert sorted(tree_snapshot(tmp_path / "shown")) == [b"odd-\xff\xfe", b"odd-\xff\xfe/new\nline"]


def test_a_pattern_that_is_a_name_by_its_bytes_does_not_also_take_a_name_rendered_so(
        python: str, tmp_path: Path) -> None:
    """A file named `\\xff` in four characters beside one named with the single byte 0xff
    (which the catalog renders `\\xff`): the four characters select the first only, the byte
    the second only, in ltoflow restore and in the recovery kit alike."""
    from ltoflow import BackupConfig, api, backup
    from ltoflow.drives.simulator import SimulatorDrive

    src = tmp_path / "src"
    src.mkdir()
    (src / "\\xff").write_bytes(b"four characters")
    (src / os.fsdecode(b"\xff")).write_bytes(b"one byte")
    result = backup(BackupConfig(source_root=src, tapes_root=tmp_path / "tapes",
                                 tape_nominal_capacity_bytes=2_000_000,
                                 max_container_size_bytes=4_000))
    roots = [tmp_path / "tapes" / t.tape_id for t in result.catalog.tapes]
    for pattern, name in (("\\xff", b"\\xff"), (os.fsdecode(b"\xff"), b"\xff")):
        out = tmp_path / f"kit-{len(name)}"
        proc = subprocess.run([python, "-I", SCRIPT, "--target", out, "--only", pattern, *roots],
                              capture_output=True, timeout=60, check=False)
        assert proc.returncode == 0, proc.stderr
        assert sorted(tree_snapshot(out)) == [name]
        mine = tmp_path / f"ltoflow-{len(name)}"
        report = api.restore(api.Components(drive=SimulatorDrive(tmp_path / "tapes")), mine,
                             [pattern])
        assert (report.ok, report.restored) == (True, 1)
        assert sorted(tree_snapshot(mine)) == [name]


def test_list_shows_links_and_directories(python: str, odd_tapes: tuple[Path, list[Path]],
                                          tmp_path: Path) -> None:
    _, roots = odd_tapes
    proc = run(python, "--list", *roots, cwd=tmp_path)
    assert proc.returncode == 0, output(proc)
    assert "symlink  docs/to-readme -> readme.txt" in proc.stdout
    assert "symlink  odd-\\xff\\xfe/link-\\x80 -> target-\\x81\\n\n" in proc.stdout
    assert "  odd-\\xff\\xfe/new\\nline  tapes: " in proc.stdout
    assert "directory  docs/empty/" in proc.stdout


def test_a_link_in_the_catalog_is_never_written_through(
    python: str, odd_tapes: tuple[Path, list[Path]], tmp_path: Path
) -> None:
    """A hostile catalog: link `esc` -> outside, then a directory and a file below it."""
    _, roots = odd_tapes
    tapes = tmp_path / "tapes"
    copies = []
    for r in roots:
        shutil.copytree(r, tapes / r.name)
        copies.append(tapes / r.name)
    outside = tmp_path / "outside"
    outside.mkdir()
    doc = load_catalog(copies[0])
    doc["symlinks"] = [{"relative_path": "esc", "target": str(outside), "mtime_ns": 0}]
    doc["directories"] = [{"relative_path": "esc/sub", "unix_mode": 0o40755, "mtime_ns": 0}]
    doc["source_files"] = [{**doc["source_files"][0], "relative_path": "esc/planted"}]
    write_catalog(copies, doc, compact=True)
    target = tmp_path / "out"
    proc = run(python, "--target", target, *copies, cwd=tmp_path)
    assert proc.returncode == 1
    assert list(outside.iterdir()) == []
    assert "FAILED: esc: already exists in the target" in proc.stderr
    assert "FAILED: esc/sub: " not in proc.stderr  # `esc` is a real directory, made for the file
    assert (target / "esc" / "sub").is_dir()
    assert not (target / "esc").is_symlink()


SYSTEM_PYTHON = Path("/usr/bin/python3")


@pytest.mark.skipif(os.geteuid() != 0 or not SYSTEM_PYTHON.exists(),
                    reason="needs root to run the script as an unprivileged user")
def test_read_only_directory_does_not_stop_an_unprivileged_restore(
    odd_tapes: tuple[Path, list[Path]], tmp_path: Path
) -> None:
    """As a normal user (root ignores permissions): docs/locked is r-x only, and its file must
    still come back, since directory modes are set last, deepest first. The script is the copy
    on the tape, run by the system's Python."""
    import tempfile

    src, roots = odd_tapes
    nobody = 65534
    work = Path(tempfile.mkdtemp(dir="/tmp", prefix="ltoflow-nobody-"))
    try:
        work.chmod(0o755)
        copies = []
        for r in roots:
            shutil.copytree(r, work / r.name)
            copies.append(work / r.name)
        target = work / "out"
        target.mkdir()
        os.chown(target, nobody, nobody)
        for _ in range(2):  # and a rerun into the finished tree keeps it all
            proc = subprocess.run(
                [SYSTEM_PYTHON, "-I", copies[0] / "recovery" / "restore.py", "--target", target,
                 *copies],
                capture_output=True, text=True, timeout=60, check=False, cwd=work,
                user=nobody, group=nobody, extra_groups=[])
            assert proc.returncode == SKIPPED_SOME, proc.stdout + proc.stderr
            assert tree_snapshot(target) == tree_snapshot(src)
        assert (target / "docs" / "locked").stat().st_mode & 0o777 == 0o555
    finally:
        shutil.rmtree(work)  # as root: read-only directories are no obstacle


@pytest.mark.skipif(os.geteuid() != 0 or not SYSTEM_PYTHON.exists(),
                    reason="needs root to run the script as an unprivileged user")
def test_an_unprivileged_rerun_opens_up_what_the_first_run_locked(tmp_path: Path) -> None:
    """A directory and a file backed up with mode 000, and directories with 0o555, come back
    so; a normal user running the kit again (for more tapes, say) could neither enter the
    first, nor read the second, nor make a file, a directory or a symlink in the others. The
    kit opens up its own user's entries for the run and puts their modes back. A target that
    user cannot write to is refused at once, before any tape is read."""
    import tempfile

    from ltoflow import BackupConfig, backup

    nobody = 65534
    work = Path(tempfile.mkdtemp(dir="/tmp", prefix="ltoflow-nobody-"))
    try:
        work.chmod(0o755)
        src = work / "src"
        (src / "locked").mkdir(parents=True)
        (src / "locked" / "in.txt").write_bytes(b"inside")
        (src / "ro" / "sub").mkdir(parents=True)
        (src / "ro" / "a.txt").write_bytes(b"read-only directory")
        (src / "ro" / "sub" / "deep.txt").write_bytes(b"deeper")
        (src / "ro" / "link").symlink_to("a.txt")
        (src / "ro" / "sub").chmod(0o555)
        (src / "zero.txt").write_bytes(b"unreadable")
        (src / "plain.txt").write_bytes(b"plain")
        (src / "zero.txt").chmod(0o000)
        (src / "locked").chmod(0o000)
        (src / "ro").chmod(0o555)
        result = backup(BackupConfig(source_root=src, tapes_root=work / "tapes",
                                     tape_nominal_capacity_bytes=2_000_000,
                                     max_container_size_bytes=4_000))
        roots = [work / "tapes" / t.tape_id for t in result.catalog.tapes]

        def kit(target: Path) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                [SYSTEM_PYTHON, "-I", SCRIPT, "--target", target, *roots],
                capture_output=True, text=True, timeout=60, check=False, cwd=work,
                user=nobody, group=nobody, extra_groups=[])

        target = work / "out"
        target.mkdir()
        os.chown(target, nobody, nobody)
        for run_ in range(5):  # lost since (removed as root): to be made again
            if run_ == 3:  # a file in each
                (target / "ro" / "a.txt").unlink()
                (target / "locked" / "in.txt").unlink()
            if run_ == 4:  # a directory and a symlink in the read-only one
                (target / "ro" / "link").unlink()
                shutil.rmtree(target / "ro" / "sub")
            proc = kit(target)
            assert proc.returncode == 0, proc.stdout + proc.stderr
            if run_ in (1, 2):
                assert "5 file(s) were already present" in proc.stdout
            assert (target / "locked").stat().st_mode & 0o777 == 0
            assert (target / "ro").stat().st_mode & 0o777 == 0o555
            assert (target / "ro" / "sub").stat().st_mode & 0o777 == 0o555
            assert (target / "ro" / "link").readlink() == Path("a.txt")
            assert (target / "zero.txt").stat().st_mode & 0o777 == 0
        assert (target / "locked" / "in.txt").read_bytes() == b"inside"
        assert (target / "ro" / "a.txt").read_bytes() == b"read-only directory"
        assert (target / "ro" / "sub" / "deep.txt").read_bytes() == b"deeper"

        proc = kit(work)  # root's, 0o755
        assert proc.returncode == 2
        assert proc.stderr.strip().endswith(
            f"cannot write into --target {work}: Permission denied; give a directory this "
            "user can write to")
        assert "reading" not in proc.stdout
    finally:
        shutil.rmtree(work)


def test_the_kit_on_tape_checks_itself_and_verify_checks_it(
    odd_tapes: tuple[Path, list[Path]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Every tape's recovery/SHA256SUMS holds the kit's checksums, as `sha256sum -c` reads
    them. A copy of restore.py changed by one byte (here in a comment: it still runs, and would
    restore with whatever else changed) refuses to run, and verify names it."""
    from ltoflow.cli import EXIT_DAMAGED, main

    _, roots = odd_tapes
    tapes = tmp_path / "tapes"
    for r in roots:
        shutil.copytree(r, tapes / r.name)
    kit = tapes / roots[0].name / "recovery"
    check = subprocess.run(["sha256sum", "-c", "SHA256SUMS"], cwd=kit, capture_output=True,
                           text=True, check=False)
    assert (check.returncode, check.stdout) == (0, "README.txt: OK\nrestore.py: OK\n")
    shutil.copytree(kit, tmp_path / "kit-of-another-tape")
    script = kit / "restore.py"
    text = script.read_bytes()
    assert text.count(b"# ---") > 1
    script.write_bytes(text.replace(b"# ---", b"# -+-", 1))
    proc = subprocess.run([sys.executable, "-I", str(script), "--target", str(tmp_path / "o"),
                           *(str(tapes / r.name) for r in roots)],
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 2, output(proc)
    assert f"error: this copy of restore.py ({script}) is damaged" in proc.stderr
    assert "or, if only SHA256SUMS is damaged, add --skip-self-check" in proc.stderr
    assert "run recovery/restore.py from another tape of the set" in proc.stderr
    assert not (tmp_path / "o").exists()
    # The copy on another tape runs.
    other = tmp_path / "kit-of-another-tape" / "restore.py"
    proc = subprocess.run([sys.executable, "-I", str(other), "--list", str(tapes / roots[0].name)],
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, output(proc)
    assert main(["verify", "--simulator", str(tapes)]) == EXIT_DAMAGED
    bad = [line for line in capsys.readouterr().out.splitlines() if line.startswith("BAD")]
    assert bad == [f"BAD tape {roots[0].name}: recovery/restore.py does not match "
                   "recovery/SHA256SUMS (one of them is damaged): copy recovery/ from another "
                   "tape of the set"]
    # With SHA256SUMS the damaged one and no other tape, the kit still runs when told to.
    proc = subprocess.run([sys.executable, "-I", str(script), "--skip-self-check", "--list",
                           *(str(tapes / r.name) for r in roots)],
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, output(proc)


def test_a_pattern_that_is_a_name_means_that_name_in_the_kit_too(
    python: str, tmp_path: Path
) -> None:
    from ltoflow import BackupConfig, backup

    src = tmp_path / "src"
    for name, size in (("Photos [2019]/a.jpg", 10), ("Photos 1/b.jpg", 20)):
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        (src / name).write_bytes(b"x" * size)
    result = backup(BackupConfig(source_root=src, tapes_root=tmp_path / "tapes",
                                 tape_nominal_capacity_bytes=2_000_000,
                                 max_container_size_bytes=100_000))
    roots = [tmp_path / "tapes" / t.tape_id for t in result.catalog.tapes]
    proc = run(python, "--target", tmp_path / "out", "--only", "Photos [2019]", *roots,
               cwd=tmp_path)
    assert proc.returncode == 0, output(proc)
    assert sorted(p for p, (kind, *_) in tree_snapshot(tmp_path / "out").items()
                  if kind == "file") == [b"Photos [2019]/a.jpg"]
    proc = run(python, "--target", tmp_path / "globs", "--only", "Photos [0-9]", *roots,
               cwd=tmp_path)
    assert proc.returncode == 0, output(proc)
    assert sorted(p for p, (kind, *_) in tree_snapshot(tmp_path / "globs").items()
                  if kind == "file") == [b"Photos 1/b.jpg"]


def test_sigterm_removes_the_temporary_files_as_ctrl_c_does(
    python: str, tapes: list[Path], tmp_path: Path
) -> None:
    """kill, systemd and timeout send SIGTERM: the kit stops as on Ctrl-C, exit 130, and
    leaves no temporary file (it left the one being written, killed silently)."""
    target = tmp_path / "out"
    code = (
        "import os, signal, sys\n"
        f"sys.path.insert(0, {str(SCRIPT.parent)!r})\n"
        "import restore\n"
        "calls = []\n"
        "process = restore.Restorer.process_container\n"
        "def stopped(self, *args, **kwargs):\n"
        "    calls.append(1)\n"
        "    if len(calls) == 2:  # the first container's files are half written\n"
        "        os.kill(os.getpid(), signal.SIGTERM)\n"
        "    return process(self, *args, **kwargs)\n"
        "restore.Restorer.process_container = stopped\n"
        "sys.exit(restore.main(sys.argv[1:]))\n")
    proc = subprocess.run([python, "-c", code, "--target", str(target), *map(str, tapes)],
                          capture_output=True, text=True, timeout=60, check=False, cwd=tmp_path)
    assert proc.returncode == 130, output(proc)
    assert "interrupted; temporary files removed" in proc.stderr
    assert target.is_dir()
    assert not [p for p in target.rglob("*") if p.name.startswith(".ltoflow-restore-")]
