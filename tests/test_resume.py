"""Interrupted backups: the journal, --resume, Ctrl-C and SIGTERM, and kill -9 at any moment.

The kill and Ctrl-C tests run the real command in a subprocess; the simulator's
`crash_after_bytes_written` / `interrupt_after_bytes_written` faults make the process kill or
interrupt itself at an exact byte of a tape, so no test waits on a timer.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio
import trio.testing

from ltoflow.api import BackupConfig, make_backup_plan
from ltoflow.cli import (
    EXIT_DAMAGED,
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_USAGE,
    EXIT_WARNINGS,
    main,
    run_interruptible,
)
from ltoflow.errors import Interrupted
from ltoflow.plan import Plan

from .conftest import PreadvHook, Raises, load_catalog_json, rebuild_files, write_tree

# 1 MB over three 450 kB tapes in 60 kB containers; big files cross containers and tapes.
# Every tape reserves room for the catalog and the recovery kit (about 93 kB): a kit grown by
# more than about 850 bytes spills this tree onto a fourth tape, which the_plan says.
TREE = {
    "a/big-1.bin": 230_000, "a/doc.txt": 1_000, "a/small-2.bin": 40_000,
    "b/big-2.bin": 310_000, "b/c/deep.bin": 75_000, "b/empty": 0,
    "c/x.bin": 120_000, "c/y.bin": 150_000, "c/z.bin": 31_000,
    "c/\udcff-odd.bin": 45_000,  # a name that is not UTF-8 (b"c/\xff-odd.bin")
}
SIZES = ["--capacity-tb", "0.00000045", "--container-size-gb", "0.00006"]


@pytest.fixture
def src(tmp_path: Path) -> tuple[Path, dict[str, bytes]]:
    contents = write_tree(tmp_path / "src", TREE)
    return tmp_path / "src", contents


def the_plan(src: Path) -> Plan:
    plan = make_backup_plan(BackupConfig(src, 450_000, 60_000))
    assert len(plan.tapes) == 3, "the tree is meant to fill three tapes"
    return plan


def ltoflow(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ltoflow", *(str(a) for a in args)],
        capture_output=True, text=True, timeout=120, env=os.environ.copy(), check=False,
    )


def backup_args(src: Path, tapes: Path, *extra: str) -> list[str | Path]:
    return ["backup", "--source", src, "--simulator", tapes, *SIZES, "--quiet", *extra]


def assert_complete_set(tapes: Path, contents: dict[str, bytes]) -> None:
    """Every tape holds the same catalog, and every file rebuilds from it byte for byte."""
    roots = sorted(p for p in tapes.iterdir() if p.is_dir())
    docs = [load_catalog_json(r) for r in roots]
    assert len(docs) == len(docs[0]["tapes"])  # type: ignore[arg-type]
    for doc in docs[1:]:
        for d in (doc, docs[0]):
            for t in d["tapes"]:  # type: ignore[attr-defined]
                t["volume_serial"] = None
        assert doc == docs[0]
    assert rebuild_files(tapes, docs[0]) == contents
    # Nothing on any tape that the catalog does not describe (no half-written leftovers).
    listed = {(c["tape_id"], c["container_id"]) for c in docs[0]["containers"]}  # type: ignore[attr-defined]
    on_tapes = {(r.name, f.name) for r in roots for f in (r / "data").iterdir()}
    assert on_tapes == listed


def crash_points(plan: Plan) -> dict[str, tuple[int, str]]:
    """Byte offsets (on one tape) where the backup is killed, by what is going on there."""
    t1, t2, t3 = plan.tapes
    c = plan.containers
    first_two = c[t1.containers[0]].size + c[t1.containers[1]].size
    return {
        "tape 1, between containers 2 and 3": (first_two, "1"),
        "tape 1, mid-container 2": (c[0].size + c[1].size // 2, "1"),
        "tape 1, catalog write": (t1.data_bytes + 1_000, "1"),
        "tape 2, first container": (c[t2.containers[0]].size // 3, "2"),
        "tape 2, mid-container 3": (sum(c[i].size for i in t2.containers[:2]) + 7, "2"),
        "tape 3, catalog write": (t3.data_bytes + 20, "3"),
    }


@pytest.mark.parametrize("moment", [
    "tape 1, between containers 2 and 3", "tape 1, mid-container 2", "tape 1, catalog write",
    "tape 2, first container", "tape 2, mid-container 3", "tape 3, catalog write",
])
def test_kill_9_at_any_moment_then_resume_gives_the_whole_set(
    moment: str, src: tuple[Path, dict[str, bytes]], tmp_path: Path
) -> None:
    root, contents = src
    at, tape = crash_points(the_plan(root))[moment]
    tapes = tmp_path / "tapes"
    crashed = ltoflow(*backup_args(root, tapes, "--sim-fault", f"crash_after_bytes_written={at}",
                                   "--sim-fault", f"failed_tape_ids={tape}"))
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr

    resumed = ltoflow(*backup_args(root, tapes, "--resume"))
    assert resumed.returncode == EXIT_OK, resumed.stderr
    assert ltoflow("verify", "--simulator", tapes).returncode == EXIT_OK
    assert_complete_set(tapes, contents)


def killed_in_tape_ones_last_container(root: Path, tapes: Path, plan: Plan,
                                       reached: int) -> tuple[Path, Path]:
    """Back up, killed (kill -9) in tape 1's last container, and leave `reached` bytes of
    it on the tape, as the medium would have them: (tape 1's directory, that piece)."""
    crashed = ltoflow(*backup_args(root, tapes, "--sim-fault",
                                   f"crash_after_bytes_written={plan.tapes[0].data_bytes - 10}",
                                   "--sim-fault", "failed_tape_ids=1"))
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr
    [tape1] = tapes.iterdir()
    piece = sorted((tape1 / "data").iterdir())[-1]
    piece.write_bytes(os.urandom(reached))
    return tape1, piece


def test_a_crash_in_a_full_tapes_last_container_resumes_on_that_tape(
    src: tuple[Path, dict[str, bytes]], tmp_path: Path
) -> None:
    """The plan fills tape 1 to its last byte. Killed half-way through its last container,
    the backup leaves half of that container on the tape: the resume writes it over that
    leftover on the same tape (its room is the leftover's), and nothing else is left behind."""
    root, contents = src
    plan = the_plan(root)
    last = plan.containers[plan.tapes[0].containers[-1]]
    tapes = tmp_path / "tapes"
    _, leftover = killed_in_tape_ones_last_container(root, tapes, plan, last.size - 10)

    resumed = ltoflow(*backup_args(root, tapes, "--resume"))
    assert resumed.returncode == EXIT_OK, resumed.stderr
    assert ltoflow("verify", "--simulator", tapes).returncode == EXIT_OK
    assert_complete_set(tapes, contents)
    assert leftover.stat().st_size == last.size


def test_a_crash_in_the_last_container_of_a_tape_that_holds_less_goes_on_to_an_extra_tape(
    src: tuple[Path, dict[str, bytes]], tmp_path: Path
) -> None:
    """As above, but the tape holds a little less than planned: its last container no longer
    fits. The resume ends the tape there (a break in the journal, the piece removed), and the
    next one writes its catalog and puts the rest on an extra tape."""
    root, contents = src
    tapes = tmp_path / "tapes"
    tape1, piece = killed_in_tape_ones_last_container(root, tapes, the_plan(root), 20_000)
    doc = json.loads((tape1 / "tape.json").read_text())
    doc["capacity_bytes"] -= 5_000  # the medium holds a little less than its nominal size
    (tape1 / "tape.json").write_text(json.dumps(doc))

    first = ltoflow(*backup_args(root, tapes, "--resume"))
    assert first.returncode == EXIT_FAILED
    assert "filled before its planned share: it holds 5 of its 6 containers" in first.stderr
    assert not piece.exists()
    again = ltoflow(*backup_args(root, tapes, "--resume"))
    assert again.returncode == EXIT_OK, again.stderr
    assert len(list(tapes.iterdir())) == 4
    assert ltoflow("verify", "--simulator", tapes).returncode == EXIT_OK
    assert_complete_set(tapes, contents)


def test_resume_after_a_crash_during_the_resume(
    src: tuple[Path, dict[str, bytes]], tmp_path: Path
) -> None:
    root, contents = src
    plan = the_plan(root)
    tapes = tmp_path / "tapes"
    first = ltoflow(*backup_args(root, tapes, "--sim-fault",
                                 f"crash_after_bytes_written={plan.containers[1].size}"))
    assert first.returncode == -signal.SIGKILL
    again = ltoflow(*backup_args(root, tapes, "--resume", "--sim-fault",
                                 "crash_after_bytes_written=150000", "--sim-fault",
                                 "failed_tape_ids=2"))
    assert again.returncode == -signal.SIGKILL
    assert ltoflow(*backup_args(root, tapes, "--resume")).returncode == EXIT_OK
    assert_complete_set(tapes, contents)


def test_a_one_tape_set_keeps_no_catalog_copy_and_resumes_after_its_catalog(
    src: tuple[Path, dict[str, bytes]], tmp_path: Path, state_dir: Path
) -> None:
    """The journal's copy of the catalog is for later tapes: a set of one tape writes none
    (70 MB for 100,000 files), and a kill after its catalog is on tape, while the recovery kit
    is written, resumes by writing the same catalog again."""
    root, contents = src
    one_tape = ["--capacity-tb", "0.00001", "--container-size-gb", "0.00006"]
    reference = tmp_path / "reference"
    done = ltoflow("backup", "--source", root, "--simulator", reference, *one_tape, "--quiet",
                   "--state-dir", tmp_path / "reference-state")
    assert done.returncode == EXIT_OK, done.stderr
    (tape,) = reference.iterdir()
    total = json.loads((tape / "tape.json").read_text())["bytes_written"]

    tapes = tmp_path / "tapes"
    crashed = ltoflow("backup", "--source", root, "--simulator", tapes, *one_tape, "--quiet",
                      "--sim-fault", f"crash_after_bytes_written={total - 100}")
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr
    (written,) = tapes.iterdir()
    assert (written / "catalog" / "catalog.json").stat().st_size == (
        tape / "catalog" / "catalog.json").stat().st_size
    assert not [p.name for p in state_dir.iterdir() if ".catalog.json" in p.name]

    resumed = ltoflow("backup", "--source", root, "--simulator", tapes, *one_tape, "--quiet",
                      "--resume")
    assert resumed.returncode == EXIT_OK, resumed.stderr
    assert ltoflow("verify", "--simulator", tapes).returncode == EXIT_OK
    assert_complete_set(tapes, contents)
    assert not list(state_dir.iterdir())


def test_ctrl_c_stops_cleanly_and_says_how_to_resume(
    src: tuple[Path, dict[str, bytes]], tmp_path: Path, state_dir: Path
) -> None:
    root, contents = src
    plan = the_plan(root)
    tapes = tmp_path / "tapes"
    mid_third = sum(c.size for c in plan.containers[:2]) + 1_000
    stopped = ltoflow(*backup_args(root, tapes, "--sim-fault",
                                   f"interrupt_after_bytes_written={mid_third}"))
    assert stopped.returncode == EXIT_INTERRUPTED, stopped.stderr
    assert "Traceback" not in stopped.stderr
    last = stopped.stderr.strip().splitlines()[-1]
    assert "2 of" in last, stopped.stderr
    assert last.endswith("all safe on tape; run the same command with --resume to continue")
    # The container in flight was dropped; the two before it are on tape and in the journal.
    (tape1,) = tapes.iterdir()
    assert sorted(f.name[-5:] for f in (tape1 / "data").iterdir()) == ["00001", "00002"]
    journal = next(state_dir.glob("*.journal")).read_text().splitlines()
    assert [json.loads(line)["kind"] for line in journal] == ["begin", "container", "container"]

    assert ltoflow(*backup_args(root, tapes, "--resume")).returncode == EXIT_OK
    assert_complete_set(tapes, contents)
    assert not list(state_dir.iterdir()), "a finished job leaves no journal behind"


def interrupted_in_relative_tapes(root: Path, tmp_path: Path,
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """A backup into `tapes` (relative to tmp_path, the working directory from now on),
    interrupted after its first container."""
    monkeypatch.chdir(tmp_path)
    at = the_plan(root).containers[0].size
    stopped = ltoflow(*backup_args(root, Path("tapes"), "--sim-fault",
                                   f"interrupt_after_bytes_written={at}"))
    assert stopped.returncode == EXIT_INTERRUPTED, stopped.stderr


@pytest.mark.parametrize("spelling", ["absolute", "dot-dot", "symlink"])
def test_a_resume_finds_the_job_however_the_simulator_directory_is_spelled(
    src: tuple[Path, dict[str, bytes]], tmp_path: Path, state_dir: Path,
    monkeypatch: pytest.MonkeyPatch, spelling: str,
) -> None:
    """Started with `--simulator tapes`, resumed with its absolute path (as the messages
    print it), through `..` or through a symlink: the same job."""
    root, contents = src
    interrupted_in_relative_tapes(root, tmp_path, monkeypatch)
    (tmp_path / "sub").mkdir()
    (tmp_path / "link").symlink_to("tapes")
    again = {"absolute": tmp_path / "tapes", "dot-dot": Path("sub/../tapes"),
             "symlink": Path("link")}[spelling]
    resumed = ltoflow(*backup_args(root, again, "--resume"))
    assert resumed.returncode == EXIT_OK, resumed.stderr
    assert_complete_set(tmp_path / "tapes", contents)


def test_a_job_interrupted_under_the_earlier_version_resumes(
    src: tuple[Path, dict[str, bytes]], tmp_path: Path, state_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """ltoflow 0.1.0's journals (version 4) named a simulator directory as it was spelled:
    a job it left, started with a relative `--simulator`, is found and resumed."""
    from ltoflow.journal import job_key

    root, contents = src
    interrupted_in_relative_tapes(root, tmp_path, monkeypatch)
    (journal,) = state_dir.glob("*.journal")
    old = job_key(root, "simulator at tapes", 450_000, 60_000)
    for p in state_dir.iterdir():
        p.rename(state_dir / p.name.replace(journal.stem, old))
    lines = (state_dir / f"{old}.journal").read_text().splitlines(keepends=True)
    begin = json.loads(lines[0])
    assert begin["version"] == 5
    begin["version"], begin["target"] = 4, "simulator at tapes"
    (state_dir / f"{old}.journal").write_text(json.dumps(begin) + "\n" + "".join(lines[1:]))
    resumed = ltoflow(*backup_args(root, Path("tapes"), "--resume"))
    assert resumed.returncode == EXIT_OK, resumed.stderr
    assert_complete_set(tmp_path / "tapes", contents)
    assert not list(state_dir.iterdir())


def test_the_summary_of_a_resume_lists_the_tapes_finished_before(
    src: tuple[Path, dict[str, bytes]], tmp_path: Path
) -> None:
    root, contents = src
    on_tape_1 = len(the_plan(root).tapes[0].containers)
    resumed: list[str] = []
    for tapes in (tmp_path / "tapes", tmp_path / "again"):  # as JSON, then as text
        stopped = ltoflow(*backup_args(root, tapes, "--sim-fault",
                                       "interrupt_after_bytes_written=1", "--sim-fault",
                                       "failed_tape_ids=2"))
        assert stopped.returncode == EXIT_INTERRUPTED, stopped.stderr
        done = ltoflow(*backup_args(root, tapes, "--resume",
                                    *(["--json"] if not resumed else [])))
        assert done.returncode == EXIT_OK, done.stderr
        resumed.append(done.stdout)
        assert_complete_set(tapes, contents)
    listed = json.loads(resumed[0])["tapes"]
    assert [(t["sequence_number"], t["finished_before"]) for t in listed] == [
        (1, True), (2, False), (3, False)]
    assert listed[0]["earlier_containers"] == on_tape_1
    lines = [line for line in resumed[1].splitlines() if line.startswith("  tape ")]
    assert len(lines) == 3
    assert lines[0].endswith(f"  {on_tape_1} containers, written before the interruption (not "
                             "loaded again)")


def test_a_stop_while_a_container_is_closed_keeps_it_for_the_resume(
    src: tuple[Path, dict[str, bytes]], tmp_path: Path, state_dir: Path,
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    """A Ctrl-C while a container's file is being closed (with --throttle the drive's buffer
    drains then, for seconds) is acted on once it is closed, and whole on tape: the container
    is recorded in the journal before the job stops. It was left on tape unrecorded, and with
    nothing else recorded the journal went too: nothing to resume, and a simulator directory
    that no new backup would take."""
    from ltoflow.drives.simulator import SimulatorWriter

    closing = SimulatorWriter.close
    stopped: list[bool] = []

    async def close_during_a_ctrl_c(self: SimulatorWriter) -> None:
        await closing(self)
        if not stopped:
            stopped.append(True)
            with trio.CancelScope(shield=True):  # the job is cancelled meanwhile
                signal.raise_signal(signal.SIGINT)
                await trio.testing.wait_all_tasks_blocked()

    monkeypatch.setattr(SimulatorWriter, "close", close_during_a_ctrl_c)
    root, contents = src
    tapes = tmp_path / "tapes"
    assert main([str(a) for a in backup_args(root, tapes)]) == EXIT_INTERRUPTED
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith(
        "all safe on tape; run the same command with --resume to continue")
    (tape1,) = tapes.iterdir()
    assert [f.name[-5:] for f in (tape1 / "data").iterdir()] == ["00001"]
    journal = next(state_dir.glob("*.journal")).read_text().splitlines()
    assert [json.loads(line)["kind"] for line in journal] == ["begin", "container"]
    monkeypatch.setattr(SimulatorWriter, "close", closing)
    assert main([str(a) for a in backup_args(root, tapes, "--resume")]) == EXIT_OK
    assert_complete_set(tapes, contents)


async def test_sigterm_cancels_the_job_and_raises_interrupted() -> None:
    started = trio.Event()

    async def job() -> int:
        started.set()
        await trio.sleep_forever()
        return 0  # pragma: no cover - never gets here

    async with trio.open_nursery() as nursery:
        async def send() -> None:
            await started.wait()
            signal.raise_signal(signal.SIGTERM)
        nursery.start_soon(send)
        with pytest.raises(Interrupted, match="SIGTERM"):
            await run_interruptible(job, abort=lambda: None)


async def test_second_ctrl_c_aborts_at_once_while_cleanup_runs() -> None:
    aborted = trio.Event()
    cleanup_started = trio.Event()

    async def job() -> str:
        try:
            await trio.sleep_forever()
        finally:
            with trio.CancelScope(shield=True):  # a long, shielded cleanup (an unmount)
                cleanup_started.set()
                await aborted.wait()
        return "not reached"  # pragma: no cover

    async def press_twice() -> None:
        await trio.testing.wait_all_tasks_blocked()
        signal.raise_signal(signal.SIGINT)
        await cleanup_started.wait()
        signal.raise_signal(signal.SIGINT)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(press_twice)
        with pytest.raises(Interrupted, match="SIGINT"):
            await run_interruptible(job, abort=aborted.set)
    assert aborted.is_set()


def test_a_new_backup_is_refused_while_an_interrupted_one_waits(
    src: tuple[Path, dict[str, bytes]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root, _ = src
    tapes = tmp_path / "tapes"
    args = [str(a) for a in backup_args(root, tapes)]
    assert main([*args, "--sim-fault", "fail_after_bytes_written=100000"]) == EXIT_FAILED
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert "1 of" in err
    assert "--resume" in err.splitlines()[-1]

    assert main(args) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "an interrupted backup" in err
    assert "--resume" in err

    assert main([*args, "--resume"]) == EXIT_OK


def test_resume_without_an_interrupted_backup_says_so(
    src: tuple[Path, dict[str, bytes]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root, _ = src
    code = main([str(a) for a in backup_args(root, tmp_path / "tapes", "--resume")])
    assert code == EXIT_USAGE
    assert "no interrupted backup" in capsys.readouterr().err


def test_resume_with_other_sizes_names_the_flags_the_backup_was_started_with(
    src: tuple[Path, dict[str, bytes]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Sizes are part of what makes a job (its journal's key): given other ones, neither a
    resume nor a new backup finds the interrupted job, and both say how to go on with it."""
    root, _ = src
    tapes = tmp_path / "tapes"
    started = [str(a) for a in backup_args(root, tapes)]
    assert main([*started, "--sim-fault", "fail_after_bytes_written=100000"]) == EXIT_FAILED
    capsys.readouterr()
    other = [a if a != "0.00006" else "0.00005" for a in started]
    advice = ("started with --capacity-tb 0.00000045 --container-size-gb 0.00006 (journal ",
              "); to go on with it, run the command it was started with, adding --resume")

    assert main([*other, "--resume"]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "there is no interrupted backup of" in err
    assert all(part in err for part in advice), err
    assert main(other) == EXIT_USAGE
    err = capsys.readouterr().err
    assert f"simulator directory {tapes} holds the interrupted backup of set " in err
    assert all(part in err for part in advice), err

    assert main([*started, "--resume"]) == EXIT_OK


@pytest.mark.parametrize("fault", ["fail_on_load", "fail_after_bytes_written=1000"])
def test_a_failure_before_any_container_is_on_tape_leaves_nothing_to_resume(
    fault: str, src: tuple[Path, dict[str, bytes]], tmp_path: Path, state_dir: Path,
    capsys: pytest.CaptureFixture[str]
) -> None:
    """Nothing to resume: no journal, and the same command starts afresh (in the same
    simulator directory, whose tape got nothing but a dropped first container)."""
    root, _ = src
    args = [str(a) for a in backup_args(root, tmp_path / "tapes")]
    assert main([*args, "--sim-fault", fault]) == EXIT_FAILED
    assert not list(state_dir.iterdir())
    capsys.readouterr()
    assert main(args) == EXIT_OK


def test_resume_detects_a_file_changed_since_the_interruption(
    src: tuple[Path, dict[str, bytes]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root, _ = src
    args = [str(a) for a in backup_args(root, tmp_path / "tapes")]
    assert main([*args, "--sim-fault", "fail_after_bytes_written=100000"]) == EXIT_FAILED
    late = root / "c" / "y.bin"  # on tape 2 or 3: not written yet
    late.write_bytes(b"x" * len(late.read_bytes()))
    os.utime(late, ns=(1, 1))
    capsys.readouterr()
    assert main([*args, "--resume"]) == EXIT_FAILED
    err = capsys.readouterr().err
    assert "Traceback" not in err
    # Changed between the runs, not "while being read"; and one way out, not two.
    assert ("source file 'c/y.bin' changed during the backup (its modification time is not "
            "the one the scan saw); stop whatever changes it\n") in err
    assert "--resume can finish this set only with c/y.bin as it was when scanned" in err
    assert "run the backup again" not in err


def test_resume_catches_a_file_changed_in_place_since_its_hashes_went_on_tape(
    src: tuple[Path, dict[str, bytes]], tmp_path: Path
) -> None:
    """The file (a name that is not UTF-8, on tape 3) is rewritten with the same size and
    mtime after tape 1's catalog recorded its hashes: the resumed job must refuse it, not write
    bytes the catalog does not describe."""
    root, _ = src
    odd = root / "c" / "\udcff-odd.bin"
    plan = the_plan(root)
    assert plan.containers[plan.segments[plan.file_starts[-2]].container_index].tape_index == 2
    tapes = tmp_path / "tapes"
    crashed = ltoflow(*backup_args(root, tapes, "--sim-fault", "crash_after_bytes_written=1000",
                                   "--sim-fault", "failed_tape_ids=2"))
    assert crashed.returncode == -signal.SIGKILL
    st = odd.stat()
    odd.write_bytes(b"\0" * st.st_size)
    os.utime(odd, ns=(st.st_atime_ns, st.st_mtime_ns))
    for flags in ([], ["--on-change", "skip"]):  # too late to skip: tape 1's catalog holds it
        resumed = ltoflow(*backup_args(root, tapes, "--resume", *flags))
        assert resumed.returncode == EXIT_FAILED, resumed.stderr
        assert "\\xff-odd.bin" in resumed.stderr
        assert "content differs" in resumed.stderr
        assert "only with c/\\xff-odd.bin as it was when scanned" in resumed.stderr


def test_resume_on_a_blank_tape_records_what_it_writes_now(
    src: tuple[Path, dict[str, bytes]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Tape 1 is lost after two containers and a file in them changed (same mtime): with
    --on-change=skip the resumed job writes tape 1 afresh and skips the file, and every
    segment hash in the catalog is that of the bytes now on tape."""
    root, contents = src
    tapes = tmp_path / "tapes"
    args = [str(a) for a in backup_args(root, tapes, "--on-change", "skip")]
    assert main([*args, "--sim-fault", "fail_after_bytes_written=150000"]) == EXIT_FAILED
    (tape1,) = [p for p in tapes.iterdir() if p.name.endswith("-001")]
    shutil.rmtree(tape1)  # lost: a blank tape goes in its place
    big = root / "a" / "big-1.bin"
    st = big.stat()
    big.write_bytes(b"\1" * st.st_size)
    os.utime(big, ns=(st.st_atime_ns, st.st_mtime_ns))
    capsys.readouterr()
    assert main([*args, "--resume"]) == EXIT_WARNINGS
    assert "a/big-1.bin" in capsys.readouterr().out
    assert ltoflow("verify", "--simulator", tapes).returncode == EXIT_OK
    del contents["a/big-1.bin"]
    doc = load_catalog_json(sorted(tapes.iterdir())[0])
    assert rebuild_files(tapes, doc) == contents


def test_resume_rewrites_containers_missing_from_the_tape_it_is_given(
    src: tuple[Path, dict[str, bytes]], tmp_path: Path
) -> None:
    """The operator lost the half-written tape and gives a blank one: it is written whole."""
    root, contents = src
    tapes = tmp_path / "tapes"
    args = [str(a) for a in backup_args(root, tapes)]
    assert main([*args, "--sim-fault", "fail_after_bytes_written=150000",
                 "--sim-fault", "failed_tape_ids=2"]) == EXIT_FAILED
    (tape2,) = [p for p in tapes.iterdir() if p.name.endswith("-002")]
    for f in (tape2 / "data").iterdir():
        f.unlink()
    (tape2 / "tape.json").unlink()
    assert main([*args, "--resume"]) == EXIT_OK
    assert_complete_set(tapes, contents)


def test_tapes_that_hold_less_than_planned_fill_up_and_the_rest_goes_to_extra_tapes(
    src: tuple[Path, dict[str, bytes]], tmp_path: Path
) -> None:
    """Every cartridge really holds 350 kB, not the 450 kB planned: each tape takes the
    containers that fit with room for the catalog, the job stops and says so, and each resume
    goes on with an extra tape. In the end every tape, including those written before a tape
    filled early, carries the catalog of where everything really is."""
    from ltoflow import api
    from ltoflow.drives.simulator import SimulatorDrive
    from ltoflow.errors import TapeFullError

    root, contents = src
    tapes = tmp_path / "tapes"
    planned = len(the_plan(root).tapes)
    messages: list[str] = []
    for attempt in range(10):
        config = BackupConfig(root, 450_000, 60_000, tapes_root=tapes, resume=attempt > 0)
        drive = SimulatorDrive(tapes, 350_000)  # what the cartridges really hold
        try:
            result = api.backup(config, api.Components(drive=drive))
            break
        except* TapeFullError as group:
            messages.append(str(group.exceptions[0]))
    else:
        pytest.fail("the backup never finished")
    # Tape 1 filled early, and so did tape 2 after tape 1's catalog was written (which the
    # final rewrite then corrected).
    assert len(messages) >= 2, messages
    assert all("filled before its planned share" in m for m in messages)
    assert len(result.catalog.tapes) > planned
    assert ltoflow("verify", "--simulator", tapes).returncode == EXIT_OK
    assert_complete_set(tapes, contents)


async def _unfinished_early_fill_set(root: Path, tapes: Path, *, attempts: int) -> None:
    """Back up `root` onto cartridges that hold 350 kB, not the 450 kB planned, stopping after
    `attempts` tries (each ends where a tape filled early) or, with more, just before the copies
    of the tapes written before the last short one are replaced (tape 1 is the first of them,
    and it will not load again)."""
    from ltoflow import api
    from ltoflow.drives.simulator import SimulatorDrive, SimulatorFailureConfig
    from ltoflow.errors import BackupError

    # Tape 1 is written, then given its catalog by the first resume; after that it loads only
    # for its catalog to be replaced, once the later tapes are done.
    no_tape_one = SimulatorFailureConfig(fail_on_load=True, failed_tape_ids=frozenset({"1"}))
    errors: list[str] = []
    for attempt in range(attempts):
        config = BackupConfig(root, 450_000, 60_000, tapes_root=tapes, resume=attempt > 0)
        drive = SimulatorDrive(tapes, 350_000, no_tape_one if attempt > 1 else None)
        try:
            await api.backup_async(config, api.Components(drive=drive))
        except* BackupError as group:
            errors.append(str(group.exceptions[0]))
        assert len(errors) == attempt + 1, "the backup finished"
        if "filled before its planned share" not in errors[-1]:
            assert "did not load" in errors[-1]  # tape 1, for its new catalog
            break


async def _restore_with_warnings(tapes: Path, target: Path) -> tuple[Any, list[str]]:
    from ltoflow import api
    from ltoflow.drives.simulator import SimulatorDrive
    from ltoflow.progress import Event, Note

    notes: list[str] = []

    class Notes:
        def event(self, event: Event) -> None:
            if isinstance(event, Note) and event.text.startswith("warning"):
                notes.append(event.text)

    report = await api.restore_async(
        api.Components(drive=SimulatorDrive(tapes), reporter=Notes()), target)
    return report, notes


def _older_than(stale: Path, newest: Path) -> str:
    return (f"warning: tape {stale.name}: its catalog is older than the one on {newest.name} "
            "(they place containers differently): this set's backup was not finished after a "
            "tape filled early (the copies of the tapes before it are replaced last), and the "
            "copy on the last tape written says where the data is; finish it with `ltoflow "
            f"backup --resume`; the catalog was read from {newest.name} instead")


async def test_restore_of_a_set_left_unfinished_after_a_tape_filled_early_uses_the_newest_copy(
    src: tuple[Path, dict[str, bytes]], tmp_path: Path
) -> None:
    """Every tape written, but the copies of the tapes before the last short one not replaced
    yet: they hold older layouts. Restore takes the last tape's copy, which says where the data
    is, and says why; verify still calls the set unfinished."""
    root, contents = src
    tapes = tmp_path / "tapes"
    await _unfinished_early_fill_set(root, tapes, attempts=10)
    roots = sorted(tapes.iterdir())
    stale, newest = load_catalog_json(roots[0]), load_catalog_json(roots[-1])
    assert len(the_plan(root).tapes) < len(stale["tapes"]) < len(  # type: ignore[arg-type]
        newest["tapes"]) == len(roots)  # type: ignore[arg-type]

    report, notes = await _restore_with_warnings(tapes, tmp_path / "out")
    assert report.ok, [p.describe() for p in report.problems]
    restored = {p.relative_to(tmp_path / "out").as_posix(): p.read_bytes()
                for p in (tmp_path / "out").rglob("*") if p.is_file()}
    assert restored == contents
    assert notes == [_older_than(roots[0], roots[-1])]
    assert ltoflow("verify", "--simulator", tapes).returncode == EXIT_DAMAGED

    # The last copy damaged: the next one down that checks out is the newest there is.
    last = roots[-1] / "catalog" / "catalog.json"
    last.write_bytes(last.read_bytes().replace(b'"tapes"', b'"tapez"'))
    report, notes = await _restore_with_warnings(tapes, tmp_path / "out2")
    assert notes[0].startswith(f"warning: tape {roots[-1].name}: ")
    assert notes[0].endswith(f"its copy of the catalog was passed over; the catalog was read "
                             f"from {roots[-2].name} instead")
    assert notes[1:] == [_older_than(roots[0], roots[-2])]
    # Written after the last early fill, like the last tape's: the same layout, all of it.
    assert report.ok, [p.describe() for p in report.problems]
    assert report.restored == len(contents)


async def test_a_damaged_catalog_sha256_on_the_last_tape_is_named_as_such_and_restore_goes_on(
    src: tuple[Path, dict[str, bytes]], tmp_path: Path
) -> None:
    """A finished set: the walk down from the last tape finds that tape's catalog.json to be
    the copy already found, so only its catalog.sha256 is damaged, and it stops there."""
    from ltoflow import api
    from ltoflow.drives.simulator import SimulatorDrive

    root, contents = src
    tapes = tmp_path / "tapes"
    await api.backup_async(BackupConfig(root, 450_000, 60_000, tapes_root=tapes),
                           api.Components(drive=SimulatorDrive(tapes, 450_000)))
    roots = sorted(tapes.iterdir())
    assert len(roots) >= 3
    (roots[-1] / "catalog" / "catalog.sha256").write_text("0" * 64 + "  catalog.json\n")
    report, notes = await _restore_with_warnings(tapes, tmp_path / "out")
    assert notes == [f"warning: tape {roots[-1].name}: catalog/catalog.sha256 is damaged: "
                     "catalog/catalog.json is the set's catalog, byte for byte; copy "
                     "catalog/catalog.sha256 from a tape whose catalog checks out; the catalog "
                     f"was read from {roots[0].name} instead"]
    assert report.ok
    assert report.restored == len(contents)


async def test_restore_of_a_set_stopped_between_early_fills_reads_the_last_copy_written(
    src: tuple[Path, dict[str, bytes]], tmp_path: Path
) -> None:
    """Stopped where the third tape filled early: it has no copy yet, and tapes 1 and 2 hold an
    older layout than the one before it. The files on the tapes that exist come back."""
    root, contents = src
    tapes = tmp_path / "tapes"
    await _unfinished_early_fill_set(root, tapes, attempts=4)
    roots = sorted(tapes.iterdir())
    assert not (roots[-1] / "catalog" / "catalog.json").exists()
    report, notes = await _restore_with_warnings(tapes, tmp_path / "out")
    assert notes[0].startswith(f"warning: tape {roots[-1].name}: ")
    with_copy = max(r for r in roots if (r / "catalog" / "catalog.json").exists())
    assert notes[1:] == [_older_than(roots[0], with_copy)]
    listed = {t["tape_id"] for t in load_catalog_json(with_copy)["tapes"]}  # type: ignore[attr-defined]
    assert {r.name for r in roots} < listed  # the files on a tape not written yet fail
    failed = {p.relative_path for p in report.problems}
    (unwritten,) = listed - {r.name for r in roots}
    assert failed
    assert all(f"tape {unwritten} " in p.what and "is not in the simulator directory" in p.what
               for p in report.problems)
    restored = {p.relative_to(tmp_path / "out").as_posix(): p.read_bytes()
                for p in (tmp_path / "out").rglob("*") if p.is_file()}
    assert all(contents[name] == data for name, data in restored.items())
    assert len(restored) + len(failed) == len(contents)


async def test_a_file_skipped_before_the_interruption_stays_skipped_after_resume(
    tmp_path: Path, on_read: Callable[[str, PreadvHook], None]
) -> None:
    """a/big-1.bin fails to read part-way (zeros on tape from there), then tape 1 fills early;
    the resumed job, where the file reads fine again, must still treat it as skipped: its
    bytes on tape are zeros, and a whole-file hash of it would describe bytes nobody wrote."""
    from ltoflow import api
    from ltoflow.drives.simulator import SimulatorDrive, SimulatorFailureConfig
    from ltoflow.errors import TapeFullError

    from .test_source_faults import check_invariants

    src, sim = tmp_path / "src", tmp_path / "tapes"
    contents = write_tree(src, {k: v for k, v in TREE.items() if k.isascii()})

    def fail_late(n: int, offset: int, buf: memoryview) -> None:
        if offset >= 100_000:
            raise OSError(errno.EIO, os.strerror(errno.EIO))

    on_read("a/big-1.bin", fail_late)
    config = BackupConfig(src, 450_000, 60_000, tapes_root=sim)
    faults = SimulatorFailureConfig(fail_after_bytes_written=3 * 60_000 + 5,
                                    failed_tape_ids=frozenset({"1"}))
    with Raises(TapeFullError, match="no room left for its catalog"):
        await api.backup_async(config, api.Components(drive=SimulatorDrive(sim, 450_000, faults)))
    on_read("a/big-1.bin", lambda n, offset, buf: None)  # readable again

    result = await api.backup_async(attrs.evolve(config, resume=True),
                                    api.Components(drive=SimulatorDrive(sim, 450_000)))
    await check_invariants(sim, result, contents, {"a/big-1.bin"})
    (entry,) = result.catalog.skipped
    assert "Input/output error" in entry.reason


async def test_ctrl_c_during_a_restore_leaves_whole_files_and_no_temporary_ones(
    src: tuple[Path, dict[str, bytes]], tmp_path: Path
) -> None:
    from ltoflow import api
    from ltoflow.drives.simulator import SimulatorDrive
    from ltoflow.progress import Event, Note
    from ltoflow.restore import TEMP_PREFIX

    root, contents = src
    tapes, target = tmp_path / "tapes", tmp_path / "out"
    await api.backup_async(BackupConfig(root, 450_000, 60_000, tapes_root=tapes),
                           api.Components(drive=SimulatorDrive(tapes, 450_000)))

    class CtrlCAfterTapeOne:
        def event(self, event: Event) -> None:
            if isinstance(event, Note) and event.text.startswith("tape 1 "):
                signal.raise_signal(signal.SIGINT)

    components = api.Components(drive=SimulatorDrive(tapes), reporter=CtrlCAfterTapeOne())
    with pytest.raises(Interrupted):
        await run_interruptible(lambda: api.restore_async(components, target),
                                abort=lambda: None)
    files = {p.relative_to(target).as_posix(): p for p in target.rglob("*") if p.is_file()}
    assert not [p for p in files if Path(p).name.startswith(TEMP_PREFIX)]
    assert files, "tape 1's files were restored before the interrupt"
    assert len(files) < len(contents)
    for rel, path in files.items():
        assert path.read_bytes() == contents[rel]

    # The same restore again goes on: the files already there are read, found identical and
    # left be; the rest are restored.
    again = await api.restore_async(api.Components(drive=SimulatorDrive(tapes)), target)
    assert again.ok, again.problems
    assert (again.already_present, again.restored) == (len(files), len(contents) - len(files))
    restored = {p.relative_to(target).as_posix(): p.read_bytes()
                for p in target.rglob("*") if p.is_file()}
    assert restored == contents


def test_a_tape_that_runs_out_mid_container_is_replaced_by_a_blank_one(
    src: tuple[Path, dict[str, bytes]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """ENOSPC in mid-container: that tape has no room for its catalog. Put back, it fails
    the same way; a blank tape in its place gets all its containers again."""
    root, contents = src
    tapes = tmp_path / "tapes"
    args = [str(a) for a in backup_args(root, tapes)]
    full = ["--sim-fault", "fail_after_bytes_written=150000", "--sim-fault", "failed_tape_ids=1"]
    assert main([*args, *full]) == EXIT_FAILED
    assert "put a blank tape in its place" in capsys.readouterr().err
    assert main([*args, "--resume", *full]) == EXIT_FAILED  # the same full tape again
    assert "put a blank tape in its place" in capsys.readouterr().err
    (tape1,) = [p for p in tapes.iterdir() if p.name.endswith("-001")]
    shutil.rmtree(tape1)  # a blank tape in its place
    assert main([*args, "--resume"]) == EXIT_OK
    assert_complete_set(tapes, contents)


async def test_a_catalog_rewrite_that_fails_leaves_the_old_catalog_whole(tmp_path: Path) -> None:
    """A resumed job writes a tape's catalog under a temporary name and renames it over the
    old one: when the rewrite fails half-way, the tape still has its whole old catalog."""
    import hashlib

    from ltoflow.catalog import CATALOG_JSON, CATALOG_SHA256, JsonCatalogCodec
    from ltoflow.drives import TapeRequest
    from ltoflow.drives.simulator import SimulatorDrive, SimulatorFailureConfig
    from ltoflow.engine import write_catalog
    from ltoflow.errors import CatalogWriteError

    from .test_catalog import _sample_catalog as sample_catalog

    catalog = sample_catalog()
    request = TapeRequest("TAPE-x-001", 1, catalog.backup_set_id)
    tape = await SimulatorDrive(tmp_path, 10_000_000).load(request)
    size, digest = await write_catalog(tape, catalog, codec=JsonCatalogCodec(),
                                       limit=1 << 20, extra_files=())
    old = (tmp_path / "TAPE-x-001" / CATALOG_JSON).read_bytes()
    faults = SimulatorFailureConfig(fail_write_after_bytes=size + size // 2)
    drive = SimulatorDrive(tmp_path, 10_000_000, faults)
    again = await drive.load(request)
    newer = attrs.evolve(catalog, created_by="ltoflow, rewritten")
    with Raises(CatalogWriteError, match="could not write the catalog"):
        await write_catalog(again, newer, codec=JsonCatalogCodec(), limit=1 << 20,
                            extra_files=(), replace=True)
    root = tmp_path / "TAPE-x-001"
    assert (root / CATALOG_JSON).read_bytes() == old
    assert hashlib.sha256(old).hexdigest() == (root / CATALOG_SHA256).read_text() == digest
