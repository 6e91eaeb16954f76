"""The command line: messages, exit codes, JSON output. Runs `main()` in-process."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest

from ltoflow import api
from ltoflow.cli import (
    EXIT_DAMAGED,
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_USAGE,
    EXIT_WARNINGS,
    _operator,
    build_parser,
    main,
)
from ltoflow.errors import TargetFullError, UsageError
from ltoflow.operator import UnattendedOperator

from .conftest import REPO, SEED_FIXTURE, Unprivileged, load_catalog_json, write_tree

TREE = {"a/one.bin": 150_000, "a/two.txt": 2_000, "b/three.bin": 420_000, "b/empty": 0}
SMALL = ["--capacity-tb", "0.0000003", "--container-size-gb", "0.00005"]  # 300 kB tapes, 50 kB


def cli(capsys: pytest.CaptureFixture[str], *args: str | Path) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(err: str, *needles: str) -> None:
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.fixture
def src(tmp_path: Path) -> Path:
    write_tree(tmp_path / "src", TREE)
    return tmp_path / "src"


def test_backup_then_verify_is_clean(src: Path, tmp_path: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    sim = tmp_path / "tapes"
    code, out, _ = cli(capsys, "backup", "--source", src, "--simulator", sim, *SMALL)
    assert code == EXIT_OK
    assert out.startswith("Backup complete. 3 tape(s), 4 file(s).")
    assert f"tapes are in {sim}" in out
    code, out, _ = cli(capsys, "verify", "--simulator", sim)
    assert code == EXIT_OK
    assert "3 of 3 tape(s)" in out
    assert out.rstrip().endswith("clean.")


@pytest.mark.parametrize("mapped", [True, False], ids=["catalog-mapped", "catalog-read"])
def test_verify_of_a_set_it_wrote_names_the_damaged_file_and_the_files_of_a_lost_tape(
        src: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch, mapped: bool) -> None:
    """ltoflow's own catalogs are read lazily by verify (records made only for what it
    reports): the report still names every segment and file."""
    from ltoflow.drives import simulator

    monkeypatch.setattr(simulator, "MAP_BYTES", 1 if mapped else 1 << 40)
    sim = tmp_path / "tapes"
    assert cli(capsys, "backup", "--source", src, "--simulator", sim, *SMALL)[0] == EXIT_OK
    tapes = sorted(sim.iterdir())
    doc: dict[str, Any] = load_catalog_json(tapes[0])
    fid = next(f["file_id"] for f in doc["source_files"] if f["relative_path"] == "a/two.txt")
    seg = next(s for s in doc["segments"] if s["file_id"] == fid)
    tape_of = {c["container_id"]: c["tape_id"] for c in doc["containers"]}
    blob = sim / tape_of[seg["container_id"]] / "data" / seg["container_id"]
    data = bytearray(blob.read_bytes())
    data[seg["container_offset"] + 10] ^= 1
    blob.write_bytes(bytes(data))
    lost = next(t for t in tapes if t.name != tape_of[seg["container_id"]])
    on_lost = {f["relative_path"] for f in doc["source_files"]
               for s in doc["segments"] if s["file_id"] == f["file_id"]
               and tape_of[s["container_id"]] == lost.name}
    shutil.rmtree(lost)
    code, out, _ = cli(capsys, "verify", "--simulator", sim, "--json")
    assert code == EXIT_DAMAGED
    problems = json.loads(out)["problems"]
    assert [(p["what"], p["segment_id"], p["files"]) for p in problems
            if p["tape_id"] != lost.name] == [("SHA-256 mismatch", seg["segment_id"],
                                                ["a/two.txt"])]
    assert [(p["what"], set(p["files"])) for p in problems if p["tape_id"] == lost.name] == [
        ("tape is missing", on_lost)]
    assert on_lost


def test_a_dry_run_says_which_tapes_it_needs_are_not_in_the_simulator_directory(
        src: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    sim = tmp_path / "tapes"
    assert cli(capsys, "backup", "--source", src, "--simulator", sim, *SMALL)[0] == EXIT_OK
    tapes = sorted(t.name for t in sim.iterdir())
    shutil.rmtree(sim / tapes[-1])
    code, out, _ = cli(capsys, "restore", "--simulator", sim, "--target", tmp_path / "a",
                       "--dry-run")
    assert code == EXIT_OK  # the plan itself is sound
    assert (f"Not in {sim}: {tapes[-1]}; the files on it will fail unless it is put there."
            in out)


def test_restore_with_a_lost_tape_counts_only_the_tapes_it_read(
        src: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    sim = tmp_path / "tapes"
    assert cli(capsys, "backup", "--source", src, "--simulator", sim, *SMALL)[0] == EXIT_OK
    tapes = sorted(t.name for t in sim.iterdir())
    assert len(tapes) >= 2
    assert len(tapes) == 3
    shutil.rmtree(sim / tapes[-1])
    code, out, _ = cli(capsys, "restore", "--simulator", sim, "--target", tmp_path / "a")
    assert code == EXIT_DAMAGED
    # tape 2 holds only pieces of the file that tape 3 ends: not read either
    assert "from 1 of the 3 tape(s) it needs in " in out
    code, out, _ = cli(capsys, "restore", "--simulator", sim, "--target", tmp_path / "b",
                       "--json")
    doc = json.loads(out)
    assert (doc["tapes"], doc["tapes_read"]) == (tapes, tapes[:1])


def test_damage_reports_keep_a_name_with_a_newline_on_one_line(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A file name may hold a newline or a control byte: verify's BAD line and restore's FAILED
    line show it escaped, one line each, so a name cannot forge a report line."""
    name = "new\nline\x01"
    write_tree(tmp_path / "src", {name: 2_000})
    sim = tmp_path / "tapes"
    assert cli(capsys, "backup", "--source", tmp_path / "src", "--simulator", sim,
               *SMALL)[0] == EXIT_OK
    blob = next((sim).glob("*/data/CNT-*"))
    data = bytearray(blob.read_bytes())
    data[100] ^= 1
    blob.write_bytes(bytes(data))
    code, out, _ = cli(capsys, "verify", "--simulator", sim)
    assert code == EXIT_DAMAGED
    [bad] = [line for line in out.splitlines() if line.startswith("BAD")]
    assert bad.endswith("SHA-256 mismatch; damages new\\nline\\x01")
    code, out, _ = cli(capsys, "restore", "--simulator", sim, "--target", tmp_path / "out")
    assert code == EXIT_DAMAGED
    [failed] = [line for line in out.splitlines() if line.startswith("FAILED")]
    assert failed.startswith("FAILED new\\nline\\x01: ")
    assert not (tmp_path / "out" / name).exists()


def test_ctrl_c_while_the_command_loads_ends_it_without_a_traceback(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """The console script's entry (ltoflow_command) turns a KeyboardInterrupt while the
    package imports, or one the job lets through, into one line and exit 130."""
    import types

    import ltoflow_command

    def interrupted(name: str) -> object:
        raise KeyboardInterrupt

    loading = types.ModuleType("ltoflow.cli")
    loading.__getattr__ = interrupted  # type: ignore[method-assign]
    monkeypatch.setitem(sys.modules, "ltoflow.cli", loading)
    with pytest.raises(SystemExit) as exited:
        ltoflow_command.main()
    assert exited.value.code == EXIT_INTERRUPTED == 130
    assert capsys.readouterr().err == "ltoflow: interrupted while starting\n"

    monkeypatch.undo()
    monkeypatch.setattr("ltoflow.cli.entry", lambda: interrupted("entry"))
    with pytest.raises(SystemExit) as exited:
        ltoflow_command.main()
    assert exited.value.code == EXIT_INTERRUPTED
    assert capsys.readouterr().err == "ltoflow: interrupted\n"


def test_sigterm_while_the_command_loads_ends_it_as_ctrl_c_does() -> None:
    """Before a job takes the signals over, SIGTERM is no silent death (exit 143): one line
    and exit 130, as for Ctrl-C. The signal arrives while the package is imported."""
    script = (
        "import builtins, os, signal, sys, ltoflow_command\n"
        "real = builtins.__import__\n"
        "def imp(name, *a, **k):\n"
        "    if name == 'ltoflow.cli':\n"
        "        os.kill(os.getpid(), signal.SIGTERM)\n"
        "    return real(name, *a, **k)\n"
        "builtins.__import__ = imp\n"
        "sys.argv = ['ltoflow', '--help']\n"
        "ltoflow_command.main()\n"
    )
    done = subprocess.run([sys.executable, "-I", "-c", script], capture_output=True, text=True,
                          check=False, timeout=120, cwd="/", env={"PYTHONPATH": str(REPO)})
    assert (done.returncode, done.stderr) == (130, "ltoflow: interrupted while starting\n")


def test_a_closed_stdin_means_no_prompt(monkeypatch: pytest.MonkeyPatch) -> None:
    """A job run with its standard input closed (a daemon's, some schedulers'): Python's
    sys.stdin is None, and the tape-change prompt is not offered, as with no terminal."""
    monkeypatch.setattr(sys, "stdin", None)
    args = build_parser().parse_args(["verify", "--device", "/dev/nst0", "--mount-point", "/m"])
    assert isinstance(_operator(args), UnattendedOperator)


def test_a_restore_target_that_cannot_be_made_is_a_usage_error(
        src: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    sim = tmp_path / "tapes"
    assert cli(capsys, "backup", "--source", src, "--simulator", sim, *SMALL)[0] == EXIT_OK
    (tmp_path / "afile").write_bytes(b"")
    code, _, err = cli(capsys, "restore", "--simulator", sim, "--target",
                       tmp_path / "afile" / "sub")
    assert code == EXIT_USAGE
    one_line_error(err, f"cannot write into the restore target {tmp_path / 'afile' / 'sub'}: "
                        "Not a directory; give --target a directory")


def test_a_restore_target_that_cannot_be_written_is_refused_before_any_tape_is_read(
        src: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A read-only filesystem (made here by failing the probe file, as root writes anywhere
    else): one line and exit 2 before the catalog is looked for, not a FAILED line a file
    after hours of reading; a dry run writes nothing, and goes on."""
    sim, out = tmp_path / "tapes", tmp_path / "out"
    assert cli(capsys, "backup", "--source", src, "--simulator", sim, *SMALL)[0] == EXIT_OK
    out.mkdir()

    def read_only(*args: object, **kwargs: object) -> None:
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(tempfile, "mkstemp", read_only)
    code, text, err = cli(capsys, "restore", "--simulator", sim, "--target", out)
    assert code == EXIT_USAGE
    assert text == ""  # not even the tapes it needs: the catalog was not looked for
    one_line_error(err, f"cannot write into the restore target {out}: Read-only file system; "
                        "give --target a directory this user can write to")
    code, text, _ = cli(capsys, "restore", "--simulator", sim, "--target", out, "--dry-run")
    assert code == EXIT_OK
    assert text.startswith("Restore of ")
    with pytest.raises(UsageError, match="cannot write into the restore target"):
        api.restore(sim, out)  # the API checks it too, before the containers are read


def test_restoring_again_leaves_identical_files_and_names_changed_ones(
        src: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A restore run again into the same target (after an interruption, say) reads what is
    there: identical files are left as they are, one that differs is named, not replaced."""
    sim, out = tmp_path / "tapes", tmp_path / "out"
    assert cli(capsys, "backup", "--source", src, "--simulator", sim, *SMALL)[0] == EXIT_OK
    assert cli(capsys, "restore", "--simulator", sim, "--target", out)[0] == EXIT_OK
    code, text, _ = cli(capsys, "restore", "--simulator", sim, "--target", out)
    assert code == EXIT_OK
    assert "Restored 0 of 4 file(s) (0 B), 4 already there (identical, left as they were)" \
        in text
    assert text.rstrip().endswith("; 0 file(s) failed.")
    (out / "a" / "two.txt").write_bytes(b"changed since")
    three = out / "b" / "three.bin"  # the same size and mtime, one byte changed
    st = three.stat()
    with open(three, "r+b") as fh:
        fh.seek(1000)
        fh.write(bytes([fh.read(1)[0] ^ 1]))
    os.utime(three, ns=(st.st_atime_ns, st.st_mtime_ns))
    code, text, _ = cli(capsys, "restore", "--simulator", sim, "--target", out, "--json")
    assert code == EXIT_DAMAGED
    doc = json.loads(text)
    assert (doc["restored"], doc["already_present"]) == (0, 2)
    assert doc["problems"] == [
        {"relative_path": path, "what": f"already exists in the target and differs from the "
                                        f"backup ({how}); use --overwrite to replace it"}
        for path, how in (("a/two.txt", "its size"),
                          ("b/three.bin", "its SHA-256"))]
    assert (out / "a" / "two.txt").read_bytes() == b"changed since"


def test_restoring_again_with_overwrite_reads_only_the_files_that_differ(
        src: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--overwrite replaces what differs; an identical file is left, not read from tape again
    (an interrupted --overwrite restore goes on where it stopped)."""
    sim, out = tmp_path / "tapes", tmp_path / "out"
    assert cli(capsys, "backup", "--source", src, "--simulator", sim, *SMALL)[0] == EXIT_OK
    assert cli(capsys, "restore", "--simulator", sim, "--target", out)[0] == EXIT_OK
    (out / "a" / "two.txt").write_bytes(b"changed since")
    code, text, _ = cli(capsys, "restore", "--simulator", sim, "--target", out, "--overwrite",
                        "--json")
    assert code == EXIT_OK
    doc = json.loads(text)
    assert (doc["restored"], doc["already_present"], doc["bytes_to_read"]) == (
        1, 3, TREE["a/two.txt"])
    assert (out / "a" / "two.txt").stat().st_size == TREE["a/two.txt"]


def test_a_full_restore_target_stops_the_restore_with_one_line(
        src: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """ENOSPC ends the restore at once (exit 3), saying how to go on, instead of reading every
    tape left to fail file after file; the files finished before stay, no temporary file."""
    sim, out = tmp_path / "tapes", tmp_path / "out"
    assert cli(capsys, "backup", "--source", src, "--simulator", sim, *SMALL)[0] == EXIT_OK
    real, writes = os.pwrite, []

    def filling(fd: int, data: Any, at: int) -> int:
        writes.append(len(data))
        if len(writes) > 1:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd, data, at)

    monkeypatch.setattr(os, "pwrite", filling)
    code, text, err = cli(capsys, "restore", "--simulator", sim, "--target", out)
    assert code == EXIT_FAILED
    assert "FAILED" not in text
    one_line_error(err, f"the restore target {out} is full (No space left on device) after ",
                   "run the same restore again")
    assert len(writes) == 2  # nothing more was tried
    assert not [p for p in out.rglob("*") if p.name.startswith(".ltoflow-restore-")]
    with pytest.raises(TargetFullError, match="is full"):  # plain, for the API's callers
        api.restore(sim, tmp_path / "out2")


def test_restoring_again_gives_a_file_with_the_backups_bytes_its_mode_and_time(
        src: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A file already there with the backup's bytes but another mode or mtime (copied back
    by hand, say) counts as already there and gets them back; a dry run changes nothing."""
    sim, out = tmp_path / "tapes", tmp_path / "out"
    assert cli(capsys, "backup", "--source", src, "--simulator", sim, *SMALL)[0] == EXIT_OK
    assert cli(capsys, "restore", "--simulator", sim, "--target", out)[0] == EXIT_OK
    one = out / "a" / "one.bin"
    want = one.stat()
    one.chmod(0o600)
    os.utime(one, ns=(0, 0))
    code, text, _ = cli(capsys, "restore", "--simulator", sim, "--target", out, "--dry-run",
                        "--json")
    assert code == EXIT_OK
    assert json.loads(text)["retouched"] == 1  # would be
    assert (one.stat().st_mode & 0o777, one.stat().st_mtime_ns) == (0o600, 0)
    code, text, _ = cli(capsys, "restore", "--simulator", sim, "--target", out, "--json")
    assert code == EXIT_OK
    doc = json.loads(text)
    assert (doc["restored"], doc["already_present"], doc["retouched"], doc["problems"]) == (
        0, 4, 1, [])
    assert (one.stat().st_mode, one.stat().st_mtime_ns) == (want.st_mode, want.st_mtime_ns)
    os.utime(one, ns=(0, 0))
    code, text, _ = cli(capsys, "restore", "--simulator", sim, "--target", out)
    assert "4 already there (identical; 1 of them given the backup's mode and time)" in text


def test_a_directory_holding_two_sets_is_refused_not_half_verified(
        src: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    mixed = tmp_path / "mixed"
    for name in ("one", "two"):
        assert cli(capsys, "backup", "--source", src, "--simulator", tmp_path / name,
                   *SMALL)[0] == EXIT_OK
        for tape in (tmp_path / name).iterdir():
            shutil.copytree(tape, mixed / tape.name)
    commands: list[list[str | Path]] = [
        ["verify"], ["restore", "--target", tmp_path / "out"], ["catalog", "show"]]
    for command in commands:
        code, _, err = cli(capsys, command[0], "--simulator", mixed, *command[1:])
        assert code == EXIT_USAGE
        one_line_error(err, "holds tapes of 2 backup sets", ": 3 tape(s), set ",
                       "give a directory that holds the tapes of one set")
    assert not (tmp_path / "out").exists()


def test_swapped_tape_directories_are_said_once_each_as_such(
        src: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    sim = tmp_path / "tapes"
    assert cli(capsys, "backup", "--source", src, "--simulator", sim, *SMALL)[0] == EXIT_OK
    one, two, _ = sorted(sim.iterdir())
    one.rename(sim / "swap")
    two.rename(one)
    (sim / "swap").rename(two)
    code, out, _ = cli(capsys, "verify", "--simulator", sim)
    assert code == EXIT_DAMAGED
    bad = [line for line in out.splitlines() if line.startswith("BAD")]
    assert [line.split(": damages")[0].split("; no operator")[0] for line in bad] == [
        f"BAD tape {a.name}: cannot be loaded: the simulator's directory {a.name} holds tape "
        f"{b.name} (its tape.json says so): tape directories were renamed or swapped; give "
        "each its tape's name back" for a, b in ((one, two), (two, one))]


def test_a_tape_json_naming_no_tape_of_the_set_does_not_stop_reading(
        src: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """tape.json is the simulator's bookkeeping: one damaged into naming a tape that is not
    there (one digit changed) is read past, as one that is not JSON is, and as the recovery
    kit does; only another tape's name there means directories were swapped."""
    sim = tmp_path / "tapes"
    assert cli(capsys, "backup", "--source", src, "--simulator", sim, *SMALL)[0] == EXIT_OK
    one = sorted(sim.iterdir())[0]
    doc = json.loads((one / "tape.json").read_text())
    doc["tape_id"] = doc["tape_id"][:-3] + "000"
    (one / "tape.json").write_text(json.dumps(doc))
    code, out, _ = cli(capsys, "verify", "--simulator", sim)
    assert (code, out.rstrip().splitlines()[-1].endswith("clean.")) == (EXIT_OK, True), out
    assert cli(capsys, "restore", "--simulator", sim, "--target", tmp_path / "out")[0] == EXIT_OK


def test_bytes_appended_to_a_container_are_reported_without_blaming_its_files(
        src: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    sim = tmp_path / "tapes"
    assert cli(capsys, "backup", "--source", src, "--simulator", sim, *SMALL)[0] == EXIT_OK
    blob = sorted(sim.glob("*/data/CNT-*"))[0]
    size = blob.stat().st_size
    with open(blob, "ab") as fh:
        fh.write(b"appended later")
    code, out, _ = cli(capsys, "verify", "--simulator", sim)
    assert code == EXIT_DAMAGED
    assert [line for line in out.splitlines() if line.startswith("BAD")] == [
        f"BAD tape {blob.parent.parent.name} container {blob.name}: container holds "
        f"{size + 14} bytes, the catalog says {size}: the bytes past that belong to no file"]


def test_backup_json_summary(src: Path, tmp_path: Path,
                             capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = cli(capsys, "backup", "--source", src, "--simulator", tmp_path / "t",
                       *SMALL, "--json", "--verify")
    assert code == EXIT_OK
    doc = json.loads(out)
    assert doc["files"] == 4
    assert doc["bytes"] == sum(TREE.values())
    assert len(doc["tapes"]) == 3
    assert doc["files_split_across_tapes"] >= 1
    assert doc["verified"] is True
    assert doc["verify_problems"] == []
    assert doc["bytes"] < doc["source_bytes_read"] <= 2 * doc["bytes"]


def test_backup_verify_that_finds_damage_does_not_say_complete(
        src: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = cli(capsys, "backup", "--source", src, "--simulator", tmp_path / "t",
                       *SMALL, "--verify", "--sim-fault", "fail_on_read")
    assert code == EXIT_DAMAGED
    first, *rest = out.splitlines()
    assert first.startswith("Backup written, but the check after writing found ")
    assert "Backup complete" not in out
    assert any(line.startswith("  BAD ") for line in rest)
    assert "  Check those tapes again with `ltoflow verify` (a read error may be the drive's: " \
           "clean it first). Where their data is wrong (a SHA-256 mismatch, a missing " \
           "container), the files it names cannot come back whole from this set: back up " \
           "again onto blank tapes" in out


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["backup"], ["required"]),
        (["backup", "--source", "S", "--simulator", "T", "--capacity-tb", "x",
          "--container-size-gb", "1"], ["--capacity-tb", "expects a number"]),
        (["backup", "--source", "S", "--simulator", "T", "--capacity-tb", "-1",
          "--container-size-gb", "1"], ["positive"]),
        (["backup", "--source", "S", "--simulator", "T", "--capacity-tb", "20000000",
          "--container-size-gb", "1"], ["--capacity-tb 20000000 is beyond any real size",
                                       "1,000,000 in this flag's unit"]),
        (["plan", "--source", "S", "--capacity-tb", "1", "--container-size-gb", "1e12"],
         ["--container-size-gb 1e12 is beyond any real size"]),
        (["plan", "--source", "S", "--capacity-tb", "1e999999", "--container-size-gb", "1"],
         ["--capacity-tb 1e999999 is beyond any real size"]),
        (["backup", "--source", "S", "--simulator", "T", "--device", "/dev/nst0",
          "--capacity-tb", "1", "--container-size-gb", "1"], ["not allowed with"]),
        (["backup", "--source", "S", "--capacity-tb", "1", "--container-size-gb", "1"],
         ["--simulator", "--device"]),
        (["backup", "--source", "S", "--simulator", "T", "--capacity-tb", "1",
          "--container-size-gb", "1", "--sim-fault", "explode"], ["unknown fault"]),
        (["backup", "--source", "S", "--simulator", "T", "--capacity-tb", "1",
          "--container-size-gb", "1", "--verbose", "--quiet"], ["--quiet: not allowed with"]),
        (["nonsense"], ["invalid choice"]),
    ],
)
def test_bad_flags_give_one_line_and_exit_2(
    args: list[str], needles: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        main(args)
    assert info.value.code == EXIT_USAGE
    one_line_error(capsys.readouterr().err, *needles)


def test_a_tape_change_command_with_the_simulator_is_refused_not_ignored(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = cli(capsys, "restore", "--simulator", tmp_path, "--target", tmp_path / "o",
                       "--tape-change-command", "true")
    assert code == EXIT_USAGE
    one_line_error(err, "--tape-change-command is for a real drive (--device)")


def test_missing_source(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = cli(capsys, "backup", "--source", tmp_path / "nope", "--simulator",
                       tmp_path / "t", *SMALL)
    assert code == EXIT_USAGE
    one_line_error(err, "does not exist", "nope")


def test_a_simulator_directory_that_cannot_be_written_is_refused_before_the_scan(
        src: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "afile").write_bytes(b"")
    code, _, err = cli(capsys, "backup", "--source", src, "--simulator",
                       tmp_path / "afile" / "tapes", *SMALL)
    assert code == EXIT_USAGE
    one_line_error(err, f"cannot write to the simulator directory {tmp_path / 'afile'}",
                   "Not a directory; give --simulator a directory this user can write to")
    # A directory that does not exist yet is checked where it would be made, not made
    # before the job can start (here the source is missing).
    code, _, err = cli(capsys, "backup", "--source", tmp_path / "missing", "--simulator",
                       tmp_path / "new" / "tapes", *SMALL)
    assert code == EXIT_USAGE
    assert not (tmp_path / "new").exists()


def test_container_larger_than_usable_capacity(src: Path, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = cli(capsys, "backup", "--source", src, "--simulator", tmp_path / "t",
                       "--capacity-tb", "0.0000003", "--container-size-gb", "0.0003")
    assert code == EXIT_USAGE
    one_line_error(err, "larger than a tape's usable capacity", "smaller container")
    assert not (tmp_path / "t").exists(), "nothing is written for an impossible plan"


def test_capacity_too_small_for_catalog(src: Path, tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = cli(capsys, "plan", "--source", src, "--capacity-tb", "0.00000001",
                       "--container-size-gb", "0.000000001")
    assert code == EXIT_USAGE
    one_line_error(err, "cannot hold the catalog", "--capacity-tb")


def test_simulator_directory_holding_another_set_is_refused(
    src: Path, seed_tapes: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = cli(capsys, "backup", "--source", src, "--simulator", seed_tapes, *SMALL)
    assert code == EXIT_USAGE
    one_line_error(err, "already holds backup set 28ad0eff-a584-452c-9d9b-60c9e615d6f6")


def test_device_without_ltfs_installed_says_so(
    src: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    code, _, err = cli(capsys, "backup", "--source", src, "--device", "/dev/nst0",
                       "--mount-point", tmp_path, *SMALL)
    assert code == EXIT_USAGE
    one_line_error(err, "`ltfs` command was not found")


def test_device_needs_a_mount_point(src: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = cli(capsys, "backup", "--source", src, "--device", "/dev/nst0", *SMALL)
    assert code == EXIT_USAGE
    one_line_error(err, "--mount-point")


def test_plan_json_is_deterministic(src: Path, capsys: pytest.CaptureFixture[str]) -> None:
    runs = [cli(capsys, "plan", "--source", src, *SMALL, "--json") for _ in range(2)]
    assert runs[0] == runs[1]
    doc = json.loads(runs[0][1])
    assert len(doc["tapes"]) == 3
    assert doc["usable_capacity_bytes"] == 300_000 - doc["reserved_catalog_bytes"]
    assert doc["split_files"][0]["relative_path"] == "a/one.bin"
    assert sum(s["length_bytes"] for s in doc["segments"]) == sum(TREE.values())


def test_plan_text_names_split_files(src: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = cli(capsys, "plan", "--source", src, *SMALL)
    assert code == EXIT_OK
    assert "b/three.bin" in out
    assert "catalog reserve" in out


def test_verify_reads_the_seed_format_fixture(seed_tapes: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = cli(capsys, "verify", "--simulator", seed_tapes)
    assert code == EXIT_OK
    assert "3 of 3 tape(s), 6 container(s)" in out


def test_verify_names_tape_container_and_damaged_file(
    seed_tapes: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tape = sorted(seed_tapes.iterdir())[1]
    blob = tape / "data" / "CNT-28ad0eff-a584-452c-9d9b-60c9e615d6f6-00004"
    data = bytearray(blob.read_bytes())
    data[52_000] ^= 1  # inside ledger.csv's segment
    blob.write_bytes(bytes(data))
    code, out, _ = cli(capsys, "verify", "--simulator", seed_tapes)
    assert code == EXIT_DAMAGED
    bad = [line for line in out.splitlines() if line.startswith("BAD")]
    assert len(bad) == 1
    assert tape.name in bad[0]
    assert "CNT-28ad0eff-a584-452c-9d9b-60c9e615d6f6-00004" in bad[0]
    assert "case-002/ledger.csv" in bad[0]
    assert "video.bin" not in bad[0]
    # and what to do about it, once
    assert out.splitlines()[1].startswith("The 1 file(s) named above cannot come back whole ")


def test_verify_reports_missing_container_and_tape(
    seed_tapes: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tapes = sorted(seed_tapes.iterdir())
    (tapes[0] / "data" / "CNT-28ad0eff-a584-452c-9d9b-60c9e615d6f6-00001").unlink()
    shutil.rmtree(tapes[2])
    code, out, _ = cli(capsys, "verify", "--simulator", seed_tapes, "--json")
    assert code == EXIT_DAMAGED
    doc = json.loads(out)
    whats = {(p["tape_id"], p["what"]) for p in doc["problems"]}
    assert (tapes[0].name, "container is missing from the tape") in whats
    assert (tapes[2].name, "tape is missing") in whats
    missing_tape = next(p for p in doc["problems"] if p["what"] == "tape is missing")
    assert "case-002/scans/page-002.tif" in missing_tape["files"]
    containers = load_catalog_json(tapes[0])["containers"]
    assert isinstance(containers, list)
    # checked: those of the tapes there, less the one missing from tape 1
    assert doc["containers_checked"] == sum(
        1 for c in containers if c["tape_id"] != tapes[2].name) - 1


def test_verify_says_a_set_is_unfinished_when_a_later_tape_knows_more_tapes(
    seed_tapes: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A tape filled early and the resume stopped before tape 1's catalog was replaced: the
    tapes written last list one tape more. Not "damage", but an unfinished backup, said so,
    with the way out."""
    tapes = sorted(seed_tapes.iterdir())
    doc = load_catalog_json(tapes[2])
    listed = doc["tapes"]
    assert isinstance(listed, list)
    listed.append({**listed[-1], "tape_id": listed[-1]["tape_id"][:-3] + "004",
                   "sequence_number": 4})
    raw = json.dumps(doc).encode()
    (tapes[2] / "catalog" / "catalog.json").write_bytes(raw)
    (tapes[2] / "catalog" / "catalog.sha256").write_text(hashlib.sha256(raw).hexdigest() + "\n")
    code, out, _ = cli(capsys, "verify", "--simulator", seed_tapes)
    assert code == EXIT_DAMAGED
    assert [line for line in out.splitlines() if line.startswith("BAD")] == [
        f"BAD tape {tapes[2].name}: the catalog on this tape lists 4 tapes, the one verify read "
        "first 3: this set's backup was not finished after a tape filled early (tape 1's copy "
        "is replaced last); finish it with `ltoflow backup --resume`, or restore with "
        f"--catalog {tapes[2].name}'s catalog/catalog.json"]


def test_tapes_whose_catalog_was_overwritten_are_known_by_their_containers(
    seed_tapes: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A catalog.json emptied or overwritten where it names its set no longer tells whose tape
    it is: the containers on it do. Verify still checks its containers, and restore with a
    good copy of the catalog (--catalog) still reads it."""
    tapes = sorted(seed_tapes.iterdir())
    kept = tmp_path / "kept"
    shutil.copytree(tapes[0] / "catalog", kept)
    (tapes[2] / "catalog" / "catalog.json").write_bytes(b"")
    code, out, _ = cli(capsys, "verify", "--simulator", seed_tapes, "--json")
    assert code == EXIT_DAMAGED
    doc = json.loads(out)
    assert [(p["tape_id"], "catalog" in p["what"]) for p in doc["problems"]] == [
        (tapes[2].name, True)]
    assert doc["containers_checked"] == 6  # tape 3's two among them
    for t in tapes:
        (t / "catalog" / "catalog.json").write_bytes(b"overwritten\n")
    code, out, _ = cli(capsys, "restore", "--simulator", seed_tapes, "--target",
                       tmp_path / "out", "--catalog", kept / "catalog.json")
    assert code == EXIT_OK, out
    source = SEED_FIXTURE / "source"
    assert {str(p.relative_to(tmp_path / "out")): p.read_bytes()
            for p in (tmp_path / "out").rglob("*") if p.is_file()} == {
        str(p.relative_to(source)): p.read_bytes() for p in source.rglob("*") if p.is_file()}


def test_a_tape_of_another_set_with_an_unreadable_catalog_is_refused(
    seed_tapes: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tapes = sorted(seed_tapes.iterdir())
    kept = tmp_path / "kept"
    shutil.copytree(tapes[0] / "catalog", kept)
    data = tapes[2] / "data"
    for c in list(data.iterdir()):
        c.rename(data / c.name.replace("28ad0eff", "99990eff"))
    (tapes[2] / "catalog" / "catalog.json").write_bytes(b"")
    code, out, _ = cli(capsys, "restore", "--simulator", seed_tapes, "--target",
                       tmp_path / "out", "--catalog", kept / "catalog.json")
    assert code == EXIT_DAMAGED
    assert ("holds containers of another set (CNT-99990eff-a584-452c-9d9b-60c9e615d6f6-0000"
            in out)


def test_verify_uses_a_good_catalog_when_one_tape_has_a_damaged_one(
    seed_tapes: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tapes = sorted(seed_tapes.iterdir())
    cat_file = tapes[0] / "catalog" / "catalog.json"
    cat_file.write_bytes(cat_file.read_bytes().replace(b"case-001", b"case-00X"))
    code, out, err = cli(capsys, "verify", "--simulator", seed_tapes)
    assert code == EXIT_DAMAGED
    # Said once: the search for a good catalog found it, and the tape's check does not again.
    assert [line for line in out.splitlines() if line.startswith("BAD")] == [
        f"BAD tape {tapes[0].name}: catalog/catalog.json does not "
        "match catalog/catalog.sha256 (the catalog on this tape is damaged)"]
    assert "6 container(s)" in out
    assert out.rstrip().endswith("1 problem(s).")
    assert f"verified {tapes[0].name}: 2 container(s), 1 PROBLEMS" in err


@pytest.mark.parametrize("tape", [0, 2])
def test_a_damaged_catalog_sha256_is_told_from_a_damaged_catalog(
    seed_tapes: Path, capsys: pytest.CaptureFixture[str], tape: int
) -> None:
    """When a tape's catalog.json is the set's catalog byte for byte, its catalog.sha256 is the
    part that is damaged: said so, whether the search for the catalog met it (tape 1) or the
    tape's own check did (tape 3)."""
    tapes = sorted(seed_tapes.iterdir())
    sha = tapes[tape] / "catalog" / "catalog.sha256"
    text = sha.read_text()
    sha.write_text(("1" if text[0] != "1" else "2") + text[1:])
    code, out, _ = cli(capsys, "verify", "--simulator", seed_tapes)
    assert code == EXIT_DAMAGED
    assert [line for line in out.splitlines() if line.startswith("BAD")] == [
        f"BAD tape {tapes[tape].name}: catalog/catalog.sha256 is damaged: catalog/catalog.json "
        "is the set's catalog, byte for byte; copy catalog/catalog.sha256 from a tape whose "
        "catalog checks out"]


def test_no_usable_catalog_says_where_else_to_get_one(
    seed_tapes: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for t in seed_tapes.iterdir():
        cat_file = t / "catalog" / "catalog.json"
        cat_file.write_bytes(cat_file.read_bytes().replace(b"case-001", b"case-00X"))
    code, _, err = cli(capsys, "restore", "--simulator", seed_tapes, "--target", tmp_path / "o")
    assert code == EXIT_FAILED
    assert err.count("does not match catalog/catalog.sha256") == 3
    assert err.rstrip().endswith("give the set's other tapes (each holds the whole catalog), "
                                 "or restore with --catalog FILE (a copy kept elsewhere)")


def test_skipped_entries_exit_with_warnings(tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "src"
    write_tree(src, {"real.txt": 100})
    os.mkfifo(src / "pipe")
    code, out, _ = cli(capsys, "backup", "--source", src, "--simulator", tmp_path / "t", *SMALL)
    assert code == EXIT_WARNINGS
    assert "skipped pipe (fifo)" in out
    doc = load_catalog_json(next((tmp_path / "t").iterdir()))
    assert doc["skipped"] == [{"relative_path": "pipe", "kind": "fifo",
                               "reason": "not a regular file"}]


def test_restore_of_a_selection_the_backup_skipped_is_not_a_success(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Exit 4, as the backup's: a script must not take "nothing failed" for "all came back"."""
    src, tapes = tmp_path / "src", tmp_path / "t"
    write_tree(src, {"real.txt": 100})
    os.mkfifo(src / "pipe")
    assert cli(capsys, "backup", "--source", src, "--simulator", tapes, *SMALL)[0] == 4

    code, out, _ = cli(capsys, "restore", "--simulator", tapes, "--target", tmp_path / "one",
                       "pipe")
    assert code == EXIT_WARNINGS
    assert "SKIPPED pipe (fifo): not in the backup, not a regular file" in out
    assert out.rstrip().endswith(
        "0 file(s) failed; 1 selected entry skipped by the backup, not in it (listed above).")

    code, out, _ = cli(capsys, "restore", "--simulator", tapes, "--target", tmp_path / "all",
                       "--json")
    assert code == EXIT_WARNINGS
    doc = json.loads(out)
    assert (doc["ok"], doc["exit_code"], doc["restored"],
            [s["relative_path"] for s in doc["skipped"]]) == (True, EXIT_WARNINGS, 1, ["pipe"])
    assert (tmp_path / "all" / "real.txt").stat().st_size == 100

    code, out, _ = cli(capsys, "restore", "--simulator", tapes, "--target", tmp_path / "real",
                       "--only", "real.txt")  # as the recovery kit takes a pattern
    assert code == EXIT_OK
    assert "skipped by the backup" not in out
    assert [p.name for p in (tmp_path / "real").iterdir()] == ["real.txt"]


@pytest.mark.parametrize(
    ("fault", "needle"),
    [
        ("fail_on_write", "cannot write"),
        ("fail_on_load", "did not load"),
        ("fail_after_bytes_written=120000", "is full"),
    ],
)
def test_injected_backup_faults_give_a_clear_error(
    fault: str, needle: str, src: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = cli(capsys, "backup", "--source", src, "--simulator", tmp_path / "t", *SMALL,
                       "--sim-fault", fault, "--sim-fault", "error_message=drive on fire")
    assert code == EXIT_FAILED
    one_line_error(err, "drive on fire", needle)


def test_injected_read_fault_makes_verify_report_every_container(
    seed_tapes: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tape3 = sorted(seed_tapes.iterdir())[2].name
    code, out, _ = cli(capsys, "verify", "--simulator", seed_tapes, "--sim-fault",
                       "fail_on_read", "--sim-fault", f"failed_tape_ids={tape3}")
    assert code == EXIT_DAMAGED
    bad = [line for line in out.splitlines() if line.startswith("BAD")]
    assert bad
    assert all(tape3 in line for line in bad)
    assert any("cannot be read" in line and "page-002.tif" in line for line in bad)


def test_throttle_flags_are_checked(src: Path, tmp_path: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = cli(capsys, "backup", "--source", src, "--simulator", tmp_path / "t",
                       *SMALL, "--throttle")
    assert code == EXIT_USAGE
    one_line_error(err, "--throttle needs --drive")
    code, _, err = cli(capsys, "backup", "--source", src, "--simulator", tmp_path / "t",
                       "--container-size-gb", "1")
    assert code == EXIT_USAGE
    one_line_error(err, "--capacity-tb")


@pytest.mark.parametrize(("timeline", "why"), [
    ("no-such-dir/timeline.json", "does not exist"),
    (".", "is a directory"),
    ("afile/timeline.json", "afile is not a directory"),
])
def test_a_drive_timeline_that_cannot_be_written_is_refused_before_the_backup(
    src: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], timeline: str, why: str
) -> None:
    (tmp_path / "afile").write_bytes(b"")
    code, _, err = cli(capsys, "backup", "--source", src, "--simulator", tmp_path / "t",
                       "--drive", "lto9", "--throttle", "--container-size-gb", "1",
                       "--drive-timeline", tmp_path / timeline)
    assert code == EXIT_USAGE
    one_line_error(err, why)
    assert not (tmp_path / "t").exists()  # nothing written


def test_a_drive_timeline_that_exists_and_can_be_written_is_taken_as_it_is(
        src: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A file there to overwrite, or a device (/dev/stdout), needs no file made beside it: its
    directory may be one this user cannot write to (/dev), made so here by failing the probe."""
    timeline = tmp_path / "locked" / "timeline.json"
    timeline.parent.mkdir()
    timeline.write_bytes(b"")
    real = tempfile.mkstemp

    def no_probe(*args: Any, **kwargs: Any) -> tuple[int, str]:
        if kwargs.get("dir") == timeline.parent:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))
        return real(*args, **kwargs)

    monkeypatch.setattr(tempfile, "mkstemp", no_probe)
    code, _, _ = cli(capsys, "backup", "--source", src, "--simulator", tmp_path / "t",
                     "--drive", "lto9", "--throttle", "--container-size-gb", "1",
                     "--drive-timeline", timeline)
    assert code == EXIT_OK
    assert timeline.read_bytes()


def test_drive_sets_the_capacity_and_the_summary_shows_the_drive_model(
    src: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    timeline = tmp_path / "timeline.json"
    code, out, _ = cli(capsys, "backup", "--source", src, "--simulator", tmp_path / "t",
                       "--drive", "lto9", "--throttle", "--drive-buffer-mb", "1",
                       "--container-size-gb", "1", "--json", "--drive-timeline", timeline)
    assert code == EXIT_OK
    doc = json.loads(out)
    assert len(doc["tapes"]) == 1
    (model,) = doc["drive_model"]
    assert model["drive"] == "lto9"
    assert model["back_hitches"] >= 0
    assert model["bytes_written"] > sum(TREE.values())
    (tape,) = json.loads(timeline.read_bytes())
    assert tape["samples"]
    doc = load_catalog_json(next((tmp_path / "t").iterdir()))
    assert doc["tapes"][0]["nominal_capacity_bytes"] == 18 * 10**12  # type: ignore[index]


def test_backup_and_plan_count_directories_and_symlinks(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = tmp_path / "src"
    write_tree(src, {"a/b/f.txt": 10})
    (src / "a" / "link").symlink_to("b")
    (src / "empty").mkdir()
    code, out, _ = cli(capsys, "plan", "--source", src, *SMALL, "--json")
    assert code == EXIT_OK
    doc = json.loads(out)
    assert (doc["file_count"], doc["directory_count"], doc["symlink_count"]) == (1, 3, 1)
    code, out, _ = cli(capsys, "backup", "--source", src, "--simulator", tmp_path / "t", *SMALL)
    assert code == EXIT_OK
    assert "; 3 directories, 1 symlink(s)" in out


def test_tapes_this_user_may_not_read_are_reported_not_an_internal_error(
    unprivileged: Unprivileged, src: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    """A simulator tape directory of mode 000: verify and restore report that tape, one clear
    reason, and go on with the others; a simulator directory it may not list is exit 2."""
    tapes = unprivileged.base / "tapes"
    assert cli(capsys, "backup", "--source", src, "--simulator", tapes, *SMALL)[0] == EXIT_OK
    second = sorted(tapes.iterdir())[1]
    second.chmod(0o000)
    done = unprivileged.ltoflow("verify", "--simulator", tapes)
    assert done.returncode == EXIT_DAMAGED, done.stderr
    assert "internal error" not in done.stderr
    assert (f"BAD tape {second.name}: cannot be loaded: tape {second.name} (tape 2 of 3) "
            "cannot be read in the "
            f"simulator directory {tapes}: Permission denied (run as a user who may read the "
            "simulator's tapes)") in done.stdout
    assert "verified" in done.stderr  # the other tapes were checked
    done = unprivileged.ltoflow("restore", "--simulator", tapes, "--target",
                                unprivileged.base / "out")
    assert done.returncode == EXIT_DAMAGED, done.stderr
    assert "internal error" not in done.stderr
    assert "Permission denied (run as a user who may read the simulator's tapes)" in done.stdout
    tapes.chmod(0o000)
    done = unprivileged.ltoflow("verify", "--simulator", tapes)
    assert (done.returncode, done.stderr.strip()) == (EXIT_USAGE, (
        f"ltoflow verify: error: cannot list the simulator directory {tapes}: Permission denied "
        "(run as a user who may read the simulator's tapes)"))


def test_a_directory_the_backup_could_not_list_comes_back_empty_and_is_said_so(
    unprivileged: Unprivileged, capsys: pytest.CaptureFixture[str],
) -> None:
    """Its contents are not in the backup; itself (mode, mtime) is: restore and the recovery
    kit make it, empty, and say that its contents are missing, not that it is."""
    src = unprivileged.base / "src"
    write_tree(src, {"ok.txt": 10, "shut/inside.txt": 10})
    (src / "shut").chmod(0o000)
    tapes = unprivileged.base / "tapes"
    done = unprivileged.ltoflow("backup", "--source", src, "--simulator", tapes, *SMALL)
    assert done.returncode == EXIT_WARNINGS, done.stderr
    (src / "shut").chmod(0o755)
    code, out, _ = cli(capsys, "restore", "--simulator", tapes, "--target",
                       unprivileged.base / "out")
    assert code == EXIT_WARNINGS
    assert "SKIPPED shut (directory): its contents are not in the backup, cannot list: " \
           "Permission denied" in out
    shut = unprivileged.base / "out" / "shut"
    assert (shut.stat().st_mode & 0o777, list(shut.iterdir())) == (0o000, [])
    kit = subprocess.run(
        [sys.executable, "-I", REPO / "ltoflow" / "recovery" / "restore.py", "--target",
         unprivileged.base / "kit", *sorted(tapes.iterdir())],
        capture_output=True, text=True, check=False, timeout=120)
    assert kit.returncode == EXIT_WARNINGS, kit.stderr
    assert "skipped by the backup, not restored: the contents of shut (directory): cannot " \
           "list: Permission denied" in kit.stdout


def test_paths_under_a_directory_this_user_may_not_enter_are_one_line_exit_2(
    unprivileged: Unprivileged,
) -> None:
    """Python's Path.exists() raises on EACCES: a source, simulator or target below a directory
    of mode 000 was an 'internal error' (exit 70)."""
    shut = unprivileged.base / "shut"
    (shut / "sub").mkdir(parents=True)
    shut.chmod(0o000)
    runs: list[list[str | Path]] = [
        ["backup", "--source", shut / "sub", "--simulator", unprivileged.base / "t",
         *SMALL],
        ["verify", "--simulator", shut / "sub"],
        ["restore", "--simulator", shut / "sub", "--target", unprivileged.base / "o"]]
    for args in runs:
        done = unprivileged.ltoflow(*args)
        assert done.returncode == EXIT_USAGE, (args, done.stderr)
        assert "internal error" not in done.stderr
        assert "Traceback" not in done.stderr
        assert f"permission denied ({shut / 'sub'}" in done.stderr, done.stderr


def test_a_state_directory_that_is_a_file_is_said_so(
    src: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    """It said 'another backup of this source onto this drive has just started'."""
    (tmp_path / "state").write_bytes(b"")
    code, _, err = cli(capsys, "backup", "--source", src, "--simulator", tmp_path / "t", *SMALL,
                       "--state-dir", tmp_path / "state")
    assert code == EXIT_USAGE
    one_line_error(err, f"cannot use {tmp_path / 'state'} as the state directory (for the job "
                        "journal): it exists and is not a directory; give a writable "
                        "--state-dir")


def test_a_journal_this_user_may_not_read_says_so_not_to_start_again(
    src: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An interrupted backup whose scan file cannot be read (another user's, mode 600): the
    way out is reading it, not starting again (which sent the operator back to --resume)."""
    args: list[str | Path] = ["backup", "--source", src, "--simulator", tmp_path / "t", *SMALL]
    code, _, _ = cli(capsys, *args, "--sim-fault", "interrupt_after_bytes_written=60000")
    assert code == EXIT_INTERRUPTED
    real = Path.read_bytes

    def read_bytes(self: Path) -> bytes:
        if self.suffix == ".scan":
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real(self)

    monkeypatch.setattr(Path, "read_bytes", read_bytes)
    code, _, err = cli(capsys, *args, "--resume")
    assert code == EXIT_USAGE
    one_line_error(err, "cannot read the job journal's ", ".scan: Permission denied; run as the "
                   "user who started the backup")
    assert "start the backup again" not in err


def test_catalog_and_restore_warn_of_a_damaged_copy_they_passed_over(
    seed_tapes: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """They read the next tape's copy, as they should, and now say so (verify reports it)."""
    tapes = sorted(seed_tapes.iterdir())
    cat_file = tapes[0] / "catalog" / "catalog.json"
    cat_file.write_bytes(cat_file.read_bytes().replace(b"case-001", b"case-00X"))
    warning = (f"warning: tape {tapes[0].name}: catalog/catalog.json does not match "
               "catalog/catalog.sha256 (the catalog on this tape is damaged); the catalog was "
               f"read from {tapes[1].name} instead\n")
    code, _, err = cli(capsys, "catalog", "--simulator", seed_tapes, "show")
    assert (code, err) == (EXIT_OK, warning)
    code, _, err = cli(capsys, "restore", "--simulator", seed_tapes, "--target",
                       tmp_path / "out", "--dry-run")
    assert (code, err) == (EXIT_OK, warning)
    code, _, err = cli(capsys, "restore", "--simulator", seed_tapes, "--target",
                       tmp_path / "out", "--dry-run", "--json")  # quiet, but for warnings
    assert code == EXIT_OK
    assert warning in err


def test_catalog_show_marks_the_tapes_the_simulator_directory_lacks(
    seed_tapes: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tapes = sorted(seed_tapes.iterdir())
    shutil.rmtree(tapes[2])
    code, out, _ = cli(capsys, "catalog", "--simulator", seed_tapes, "show")
    assert code == EXIT_OK
    lines = [line for line in out.splitlines() if line.startswith("    tape ")]
    assert [line.endswith("(not in the simulator directory)") for line in lines] == [
        False, False, True]
    code, out, _ = cli(capsys, "catalog", "--simulator", seed_tapes, "show", "--json")
    assert [t["in_simulator"] for t in json.loads(out)["tapes"]] == [True, True, False]
    code, out, _ = cli(capsys, "catalog", "--catalog", tapes[0] / "catalog" / "catalog.json",
                       "show", "--json")
    assert all("in_simulator" not in t for t in json.loads(out)["tapes"])


def test_json_gives_a_document_when_the_job_fails_too(
    src: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A script reading --json's stdout got nothing when the job failed: it gets ok false, the
    exit code and the lines stderr has."""
    sim = tmp_path / "tapes"
    code, out, err = cli(capsys, "backup", "--source", src, "--simulator", sim, *SMALL, "--json",
                         "--sim-fault", "fail_after_bytes_written=60000")
    assert code == EXIT_FAILED
    doc = json.loads(out)
    assert (doc["ok"], doc["exit_code"]) == (False, EXIT_FAILED)
    assert [f"ltoflow backup: {'error: ' * (k == 0)}{line}"
            for k, line in enumerate(doc["errors"])] == err.splitlines()
    assert "--resume" in doc["errors"][-1]
    code, out, _ = cli(capsys, "verify", "--simulator", tmp_path / "none", "--json")
    assert code == EXIT_USAGE
    assert json.loads(out) == {"ok": False, "exit_code": EXIT_USAGE, "errors": [
        f"simulator directory {tmp_path / 'none'} does not exist"]}


def test_json_gives_a_document_when_the_command_line_is_wrong(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["backup", "--source", str(tmp_path), "--simulator", str(tmp_path / "t"),
              "--json", "--capacity-tb", "1"])
    assert exit_.value.code == EXIT_USAGE
    out, err = capsys.readouterr()
    line = ("the following arguments are required: --container-size-gb "
            "(see ltoflow backup --help)")
    assert json.loads(out) == {"ok": False, "exit_code": EXIT_USAGE, "errors": [line]}
    assert err == f"ltoflow backup: error: {line}\n"
    with pytest.raises(SystemExit):  # without --json, stdout stays empty
        main(["verify", "--bogus"])
    assert capsys.readouterr().out == ""
    with pytest.raises(SystemExit):  # --jso is --json to argparse
        main(["verify", "--jso", "--bogus"])
    assert json.loads(capsys.readouterr().out)["exit_code"] == EXIT_USAGE
