"""The job journal: durable lines, torn tails, one writer at a time, errors a user can act on."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from ltoflow.catalog import JsonCatalogCodec
from ltoflow.cli import EXIT_OK, EXIT_USAGE, main
from ltoflow.errors import JournalError, UsageError
from ltoflow.journal import JOURNAL_VERSION, ContainerDone, Journal
from ltoflow.scan import scan_tree

from .conftest import write_tree

CODEC = JsonCatalogCodec()


@pytest.fixture
def journal(tmp_path: Path) -> Journal:
    write_tree(tmp_path / "src", {"a": 10})
    j = Journal(tmp_path / "state", "job-test")
    j.begin(set_id="set-1", created_at="2026-11-26T00:00:00.000000+00:00",
            scan=scan_tree(tmp_path / "src"), containers=3, tapes=1, target="the simulator",
            capacity_bytes=10**12, container_bytes=10**9)
    return j


def done(index: int) -> ContainerDone:
    return ContainerDone(index, "c" * 64, ((index, b"s" * 32),), ())


def test_a_line_torn_by_a_crash_is_cut_off_before_the_next_record(journal: Journal) -> None:
    journal.container_done(done(0))
    journal.close()
    with open(journal.path, "ab") as fh:  # power lost in the middle of container 1's line
        fh.write(b'{"kind":"container","index":1,"sha')
    resumed = Journal(journal.state_dir, journal.key)
    assert sorted(resumed.load(CODEC).containers) == [0]
    resumed.reopen()
    resumed.container_done(done(1))
    resumed.container_done(done(2))
    resumed.close()
    assert sorted(Journal(journal.state_dir, journal.key).load(CODEC).containers) == [0, 1, 2]


def test_only_one_process_writes_a_journal(journal: Journal) -> None:
    other = Journal(journal.state_dir, journal.key)
    with pytest.raises(UsageError, match="another ltoflow is running this backup"):
        other.reopen()
    journal.close()
    other.reopen()  # free once the first one let go
    other.close()


def test_commands_that_look_at_a_journal_are_not_taken_for_a_running_job(
    journal: Journal, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A look (a shared lock, for an instant) is neither a running job to another look nor a
    reason for the job that takes the journal next to give up: it waits for the look."""
    import fcntl
    import time

    journal.close()
    looking = os.open(journal.path, os.O_RDONLY)
    try:
        fcntl.flock(looking, fcntl.LOCK_SH | fcntl.LOCK_NB)  # another command, looking
        assert not Journal(journal.state_dir, journal.key).in_use()
        assert not Journal(journal.state_dir, journal.key).is_stale()
        waits: list[float] = []

        def look_ends(seconds: float) -> None:
            waits.append(seconds)
            fcntl.flock(looking, fcntl.LOCK_UN)

        monkeypatch.setattr(time, "sleep", look_ends)  # as the journal's module calls it
        resumed = Journal(journal.state_dir, journal.key)
        resumed.reopen()  # waited for the look, then took the journal
        assert len(waits) == 1
        assert Journal(journal.state_dir, journal.key).in_use()
        resumed.close()
    finally:
        os.close(looking)


def test_a_journal_that_cannot_be_written_says_what_is_safe(
    journal: Journal, monkeypatch: pytest.MonkeyPatch
) -> None:
    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(JournalError, match=r"No space left on device; what it recorded before "
                                           r"is safe: .* --resume"):
        journal.container_done(done(0))


def test_a_journal_left_without_a_beginning_does_not_block_a_new_backup(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A job killed while it created its journal left one with no first line: nothing to
    resume, and a new backup goes ahead."""
    from ltoflow import api
    from ltoflow.drives.simulator import SimulatorDrive

    write_tree(tmp_path / "src", {"a": 1000})
    src, tapes = tmp_path / "src", tmp_path / "tapes"
    config = api.BackupConfig(src, 100_000_000, 10_000, tapes_root=tapes)
    stale = api.job_journal(config, SimulatorDrive(tapes)).path
    stale.parent.mkdir(parents=True, exist_ok=True)
    stale.write_bytes(b'{"kind":"beg')
    args = ["backup", "--source", str(src), "--simulator", str(tapes),
            "--capacity-tb", "0.0001", "--container-size-gb", "0.00001", "--quiet"]
    assert main([*args, "--resume"]) == EXIT_USAGE
    assert "the backup never started; start it again without --resume" in capsys.readouterr().err
    assert main(args) == EXIT_OK
    assert not stale.exists()


def test_a_second_backup_of_a_running_job_is_told_to_let_it_finish(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Not "an interrupted backup exists ... delete its journal": deleting a running job's
    journal takes away its resume."""
    from ltoflow import api
    from ltoflow.drives.simulator import SimulatorDrive

    src, tapes = tmp_path / "src", tmp_path / "tapes"
    write_tree(src, {"a": 1000})
    config = api.BackupConfig(src, 100_000_000, 10_000, tapes_root=tapes)
    running = api.job_journal(config, SimulatorDrive(tapes))  # begun and locked, as a job's
    running.begin(set_id="set-1", created_at="2026-11-26T00:00:00.000000+00:00",
                  scan=scan_tree(src), containers=1, tapes=1, target="the simulator",
                  capacity_bytes=100_000_000, container_bytes=10_000)
    args = ["backup", "--source", str(src), "--simulator", str(tapes),
            "--capacity-tb", "0.0001", "--container-size-gb", "0.00001", "--quiet"]
    assert main(args) == EXIT_USAGE
    err = capsys.readouterr().err
    assert f"another ltoflow is running this backup of {src} onto the simulator at {tapes} " \
           f"(its journal {running.path} is locked); let it finish, or stop it first" in err
    assert "delete" not in err
    running.close()
    assert main(args) == EXIT_USAGE  # stopped: now it is an interrupted one, to resume
    assert "an interrupted backup of" in capsys.readouterr().err


def test_a_full_state_disk_while_the_catalog_is_copied_is_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import io

    from ltoflow.cli import EXIT_FAILED
    from ltoflow.journal import CatalogCopy

    class FullDisk(io.BytesIO):
        def write(self, data: object) -> int:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(Journal, "open_catalog_copy",
                        lambda self: CatalogCopy(self, FullDisk()))
    write_tree(tmp_path / "src", {"a": 3_000_000, "b": 3_000_000})
    code = main(["backup", "--source", str(tmp_path / "src"), "--simulator",
                 str(tmp_path / "tapes"), "--capacity-tb", "0.0000052",
                 "--container-size-gb", "0.0006", "--quiet"])
    err = capsys.readouterr().err
    assert code == EXIT_FAILED
    assert "cannot write the job journal" in err
    assert "internal error" not in err


def test_a_journal_of_another_version_says_so(journal: Journal) -> None:
    journal.close()
    ours = f'"version":{JOURNAL_VERSION}'.encode()
    data = journal.path.read_bytes()
    assert ours in data
    journal.path.write_bytes(data.replace(ours, b'"version":3'))
    with pytest.raises(UsageError, match="written by another version of ltoflow"):
        Journal(journal.state_dir, journal.key).load(CODEC)


def test_a_container_record_with_cut_hashes_is_refused(journal: Journal) -> None:
    journal.container_done(ContainerDone(0, "c" * 64, ((0, b"\xab" * 40),), ()))
    journal.close()
    with pytest.raises(UsageError, match=r"damaged .* segment hashes are cut short"):
        Journal(journal.state_dir, journal.key).load(CODEC)


def test_segment_hashes_are_kept_as_runs(journal: Journal) -> None:
    runs = ((3, b"\xaa" * 32 + b"\xbb" * 32), (7, b"\xcc" * 32))
    journal.container_done(ContainerDone(0, "c" * 64, runs, ((2, "d" * 64),)))
    journal.close()
    (loaded,) = Journal(journal.state_dir, journal.key).load(CODEC).containers.values()
    assert loaded.segment_runs == runs
    assert loaded.files == ((2, "d" * 64),)


def test_a_one_tape_set_interrupted_after_its_last_tape_is_resumed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Stopped after the tape's journal line, before the journal is removed: the resume has
    nothing to write and ends the job (it builds the set's catalog again: a set of one tape
    keeps no copy of it in the journal)."""
    from ltoflow.cli import EXIT_INTERRUPTED, EXIT_OK

    write_tree(tmp_path / "src", {"a": 30_000, "b": 2000})
    args = ["backup", "--source", str(tmp_path / "src"), "--simulator", str(tmp_path / "t"),
            "--capacity-tb", "0.0001", "--container-size-gb", "0.00001", "--quiet"]
    real = Journal.finish

    def interrupted(self: Journal) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(Journal, "finish", interrupted)
    assert main(args) == EXIT_INTERRUPTED
    monkeypatch.setattr(Journal, "finish", real)
    assert main([*args, "--resume"]) == EXIT_OK
    assert main(["verify", "--simulator", str(tmp_path / "t")]) == EXIT_OK


def test_an_empty_set_that_fails_after_its_catalog_is_resumed(tmp_path: Path) -> None:
    """No container, but the catalog is on the tape: the journal stays, and a resume ends it."""
    from ltoflow.cli import EXIT_OK

    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "empty").write_bytes(b"")
    args = ["backup", "--source", str(tmp_path / "src"), "--simulator", str(tmp_path / "t"),
            "--capacity-tb", "0.0001", "--container-size-gb", "0.00001", "--quiet"]
    assert main([*args, "--sim-fault", "fail_on_unload"]) != EXIT_OK
    assert main([*args, "--resume"]) == EXIT_OK


def test_what_is_done_counts_tapes_against_the_plan_until_one_fills_early(
    journal: Journal,
) -> None:
    journal.container_done(done(0))
    journal.tape_done(0, None)
    journal.close()
    state = Journal(journal.state_dir, journal.key).load(CODEC)
    assert state.describe() == "set set-1: 1 of 3 containers and 1 of 1 tapes done"
    journal.reopen()
    journal.tape_break(1)
    journal.container_done(done(1))
    journal.tape_done(1, None, layout=1)
    journal.close()
    state = Journal(journal.state_dir, journal.key).load(CODEC)
    assert state.describe() == ("set set-1: 2 of 3 containers and 2 tape(s) done (1 filled "
                                "early, so it may need more than the 1 planned)")


def test_the_hint_after_a_changed_file_offers_skipping_only_where_a_resume_can(
    journal: Journal,
) -> None:
    """--on-change=skip helps a resume only while tape 1's catalog is not written (after it,
    every hash is fixed) and never with --strict, which refuses skipping."""
    from ltoflow.cli import _resume_hint

    journal.container_done(done(0))
    assert "--on-change=skip" in _resume_hint(journal, "a/x")
    assert "--on-change=skip" not in _resume_hint(journal, "a/x", strict=True)
    journal.tape_done(0, None)
    hint = _resume_hint(journal, "a/x")
    assert "--on-change=skip" not in hint
    assert "only with a/x as it was when scanned; to back up its new content" in hint
