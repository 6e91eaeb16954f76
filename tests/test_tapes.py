"""The tape-change path: operators, retries, and what a wrong tape is told."""

from __future__ import annotations

import io
import sys
from pathlib import Path

import pytest

from ltoflow.drives import LoadedTape, TapeRequest
from ltoflow.drives.simulator import SimulatorDrive
from ltoflow.errors import TapeNotLoadedError, WrongTapeError
from ltoflow.operator import (
    CommandOperator,
    ConsolePromptOperator,
    NoPromptOperator,
    UnattendedOperator,
)
from ltoflow.progress import ListReporter, Note
from ltoflow.tapes import MAX_TAPE_ATTEMPTS, check_blank, check_member, load_requested_tape

REQ = TapeRequest("TAPE-s-002", 2, "s", 3)


async def test_command_operator_passes_the_tape_in_its_environment(tmp_path: Path) -> None:
    out = tmp_path / "env.txt"
    op = CommandOperator(f'echo "$LTOFLOW_TAPE_ID $LTOFLOW_TAPE_SEQ $LTOFLOW_SET_ID '
                         f'$LTOFLOW_PURPOSE" > {out}')
    await op.insert_tape(REQ)
    assert out.read_text().split() == ["TAPE-s-002", "2", "s", "write"]


async def test_command_operator_says_each_run_and_gives_no_id_when_any_tape_will_do(
    tmp_path: Path,
) -> None:
    """A read job's first tape is any of the set (its catalog is not read yet): the command
    gets empty ids, not a made-up one. Every run is said first: a command that hangs shows."""
    out = tmp_path / "env.txt"
    said = ListReporter()
    op = CommandOperator(f'echo "[$LTOFLOW_TAPE_ID] [$LTOFLOW_SET_ID] $LTOFLOW_TAPE_SEQ" >> {out}',
                         said)
    await op.insert_tape(TapeRequest("(any tape of the set)", 1, "", purpose="read"))
    await op.insert_tape(REQ)
    assert out.read_text().splitlines() == ["[] [] 1", "[TAPE-s-002] [s] 2"]
    assert [e.text for e in said.events if isinstance(e, Note)] == [
        "running the tape-change command for tape 1",
        "running the tape-change command for TAPE-s-002 (tape 2 of 3)"]


async def test_command_operator_failure_shows_its_stderr() -> None:
    op = CommandOperator("echo 'slot 12 is empty' >&2; exit 3")
    with pytest.raises(TapeNotLoadedError, match=r"exit 3\): slot 12 is empty"):
        await op.insert_tape(REQ)


async def test_command_operator_is_told_the_problem_when_asked_again(tmp_path: Path) -> None:
    out = tmp_path / "problem.txt"
    await CommandOperator(f'printf %s "$LTOFLOW_PROBLEM" > {out}').insert_tape(
        REQ, problem="wrong tape")
    assert out.read_text() == "wrong tape"


async def test_unattended_operator_uses_the_tape_in_the_drive_then_fails_clearly() -> None:
    op = UnattendedOperator()
    await op.insert_tape(REQ)  # the first tape: whatever is in the drive
    with pytest.raises(TapeNotLoadedError, match=r"TAPE-s-002 .* is needed and nobody"):
        await op.insert_tape(REQ)
    with pytest.raises(TapeNotLoadedError) as failed:  # one full stop at most, at the end
        await op.insert_tape(REQ, problem="ltfs could not mount /dev/nst0: No medium present.")
    assert "No medium present; tape TAPE-s-002" in str(failed.value)


async def test_console_prompt_is_the_seeds_and_waits_for_enter(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    shown = io.StringIO()
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n"))
    op = ConsolePromptOperator()
    await op.insert_tape(REQ)  # the first tape is the one in the drive: no prompt
    # sys.stderr as it is when asking: a live view, started after the operator was made,
    # puts its proxy there, which prints above the bars
    monkeypatch.setattr(sys, "stderr", shown)
    assert shown.getvalue() == ""
    await op.insert_tape(REQ, problem="that was TAPE-s-001")
    assert shown.getvalue().splitlines() == [
        "Cannot use the tape in the drive: that was TAPE-s-001",
        "Please insert tape TAPE-s-002 (tape 2) and press Enter.",
    ]
    with pytest.raises(TapeNotLoadedError, match="end of input"):
        await op.insert_tape(REQ)


class CountingOperator:
    def __init__(self) -> None:
        self.problems: list[str | None] = []

    async def insert_tape(self, request: TapeRequest, *, problem: str | None = None) -> None:
        self.problems.append(problem)


async def test_a_wrong_tape_is_named_and_asked_for_again(tmp_path: Path) -> None:
    drive = SimulatorDrive(tmp_path, 1000)
    calls = 0

    async def check(tape: LoadedTape, request: TapeRequest) -> None:
        nonlocal calls
        calls += 1
        if calls < 3:
            raise WrongTapeError(f"this is TAPE-other-00{calls}")

    op = CountingOperator()
    loaded = await load_requested_tape(drive, op, REQ, check)
    assert loaded.label == "TAPE-s-002"
    assert op.problems == [None, "this is TAPE-other-001", "this is TAPE-other-002"]


async def test_gives_up_after_the_attempts_naming_the_last_problem(tmp_path: Path) -> None:
    async def never(tape: LoadedTape, request: TapeRequest) -> None:
        raise WrongTapeError("still the cleaning cartridge")

    op = CountingOperator()
    with pytest.raises(TapeNotLoadedError, match="after 5 attempts: still the cleaning"):
        await load_requested_tape(SimulatorDrive(tmp_path, 1000), op, REQ, never)
    assert len(op.problems) == MAX_TAPE_ATTEMPTS


async def test_without_an_operator_a_wrong_tape_ends_the_job_at_once(tmp_path: Path) -> None:
    async def wrong(tape: LoadedTape, request: TapeRequest) -> None:
        raise WrongTapeError("this is TAPE-x-001 of set x")

    with pytest.raises(TapeNotLoadedError, match="TAPE-x-001 of set x; no operator"):
        await load_requested_tape(SimulatorDrive(tmp_path, 1000), NoPromptOperator(), REQ, wrong)


async def _tape_with_catalog(root: Path, tape_id: str, set_id: str) -> LoadedTape:
    drive = SimulatorDrive(root, 10_000)
    tape = await drive.load(TapeRequest(tape_id, 1, set_id))
    w = await tape.open_write("catalog/catalog.json")
    await w.write(b'{"schema_version":"2.0","backup_set_id":"' + set_id.encode() + b'"}')
    await w.close()
    return tape


async def test_checks_name_what_they_found(tmp_path: Path) -> None:
    foreign = await _tape_with_catalog(tmp_path, "TAPE-other-001", "other")
    with pytest.raises(WrongTapeError, match="holds backup set other and is never overwritten"):
        await check_blank(foreign, REQ)
    with pytest.raises(WrongTapeError, match="holds backup set other, not s"):
        await check_member(foreign, TapeRequest("TAPE-s-001", 1, "s", purpose="read"))
    ours = await _tape_with_catalog(tmp_path, "TAPE-s-001", "s")
    with pytest.raises(WrongTapeError, match="a tape of this set, already written"):
        await check_blank(ours, REQ)
    await check_member(ours, TapeRequest("TAPE-s-001", 1, "s", purpose="read"))
    blank = await SimulatorDrive(tmp_path, 10).load(TapeRequest("TAPE-new-001", 1, "s"))
    await check_blank(blank, REQ)
    with pytest.raises(WrongTapeError, match="is blank"):
        await check_member(blank, TapeRequest("TAPE-s-001", 1, "s", purpose="read"))


async def test_reading_refuses_another_tape_of_the_same_set_by_its_serial(tmp_path: Path) -> None:
    from ltoflow.drives.simulator import SimulatorTape

    tape = await _tape_with_catalog(tmp_path, "TAPE-s-002", "s")
    assert isinstance(tape, SimulatorTape)

    class Labelled(SimulatorTape):
        @property
        def volume_serial(self) -> str | None:
            return "VOL002L9"

    tape.__class__ = Labelled
    wanted = TapeRequest("TAPE-s-003", 3, "s", purpose="read", volume_serial="VOL003L9")
    with pytest.raises(WrongTapeError, match="not volume VOL003L9"):
        await check_member(tape, wanted)
    await check_member(tape, TapeRequest("TAPE-s-002", 2, "s", purpose="read",
                                         volume_serial="VOL002L9"))


async def test_a_resumed_backup_accepts_only_the_tape_it_left_or_a_blank_one(
    tmp_path: Path,
) -> None:
    from ltoflow.tapes import check_resumable

    request = TapeRequest("TAPE-s1-001", 1, "s1", 3)
    drive = SimulatorDrive(tmp_path, 10_000)

    async def tape_with(*names: str) -> LoadedTape:
        await drive.unload()
        for n in names:
            (tmp_path / "TAPE-s1-001" / "data").mkdir(parents=True, exist_ok=True)
            (tmp_path / "TAPE-s1-001" / "data" / n).write_bytes(b"x")
        return await drive.load(request)

    ours, theirs = frozenset({"CNT-s1-00001", "CNT-s1-00002"}), frozenset({"CNT-s1-00003"})
    await check_resumable(await tape_with(), request, others=theirs)  # blank
    await check_resumable(await tape_with("CNT-s1-00001"), request, others=theirs)
    with pytest.raises(WrongTapeError, match=r"another tape of this set .*CNT-s1-00003"):
        await check_resumable(await tape_with("CNT-s1-00003"), request, others=theirs)
    (tmp_path / "TAPE-s1-001" / "data" / "CNT-s1-00003").unlink()
    # Loaded again to replace its catalog, it must hold its containers: a blank one would not.
    with pytest.raises(WrongTapeError, match="lacks CNT-s1-00002"):
        await check_resumable(await tape_with(), request, others=theirs, needs=ours)
    await check_resumable(await tape_with("CNT-s1-00002"), request, others=theirs, needs=ours)
    with pytest.raises(WrongTapeError, match="another set"):
        await check_resumable(await tape_with("CNT-other-00001"), request)
