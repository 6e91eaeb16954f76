"""What read jobs (verify, restore, restore's comparison of files already there) say about how
far they have come while they run: the reports on trio's virtual clock, the counts they come
from at the end of real jobs."""

from __future__ import annotations

import importlib
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from ltoflow import BackupConfig, api, backup, restore, verify
from ltoflow.drives.simulator import SimulatorDrive
from ltoflow.progress import (
    Event,
    ListReporter,
    ReadMeter,
    ReadProgress,
    read_progress_line,
    reporting,
)

from .conftest import write_tree

TREE = {f"case-{k}/scan-{j}.tif": 40_000 + 1_000 * j for k in range(3) for j in range(4)}


async def test_a_read_job_is_reported_every_interval_with_the_rate_since_the_last(
    autojump_clock: trio.testing.MockClock,
) -> None:
    reporter = ListReporter()
    meter = ReadMeter("restoring", 6_000, total_tapes=2)  # tapes 2 and 4 of the set
    with reporting(meter, reporter, every=30):
        await trio.sleep(29.9)
        assert reporter.events == []  # a job shorter than one interval says nothing
        meter.begin_tape("T2", 2)
        meter.done_bytes = 600
        await trio.sleep(0.2)
        assert reporter.events == [
            ReadProgress("restoring", 30.0, 600, 6_000, 20.0, "T2", 2, 2, 1)]
        meter.tape_id = ""  # between tapes: nothing read for the next interval
        await trio.sleep(30)
        assert reporter.events[-1] == ReadProgress("restoring", 60.0, 600, 6_000, 0.0, "", 2, 2,
                                                   1)
        meter.begin_tape("T4", 4)
        await trio.sleep(30)
        assert reporter.events[-1].tape_index == 2
    await trio.sleep(100)
    assert len(reporter.events) == 3  # none once the job is over


async def test_a_log_that_cannot_be_written_stops_the_reports_not_the_job(
    autojump_clock: trio.testing.MockClock,
) -> None:
    class Broken:
        calls = 0

        def event(self, event: Event) -> None:
            self.calls += 1
            raise BrokenPipeError("the log's reader went away")

    broken = Broken()
    with reporting(ReadMeter("verifying", 10), broken, every=5):
        await trio.sleep(60)
    assert broken.calls == 1


def test_the_progress_line_gives_the_share_the_tape_the_rate_and_the_time_left() -> None:
    line = read_progress_line(
        ReadProgress("restoring", 600.0, 1_200_000_000_000, 4_000_000_000_000, 312e6, "T3", 3,
                     2, 2))
    assert line == ("  restoring: 1.20 TB of 4.00 TB (30%), tape 3 (2 of 2 to read), 312 MB/s, "
                    "about 2 h 30 min left")
    waiting = read_progress_line(ReadProgress("verifying", 90.0, 500, 1_000, 0.0))
    assert waiting == "  verifying: 500 B of 1.00 kB (50%), 0 MB/s"
    ending = read_progress_line(
        ReadProgress("verifying", 90.0, 990_000_000, 10**9, 300e6, "T1", 1, 1, 1))
    assert ending.endswith(", tape 1 (1 of 1 to read), 300 MB/s, under a minute left")


@pytest.fixture
def tape_set(tmp_path: Path) -> Path:
    write_tree(tmp_path / "src", TREE)
    config = BackupConfig.simulator(tmp_path / "src", tmp_path / "tapes",
                                    capacity_tb="0.0000002", container_size_gb="0.00005")
    backup(config)
    return tmp_path / "tapes"


@pytest.fixture
def meters(monkeypatch: pytest.MonkeyPatch) -> list[ReadMeter]:
    """Every meter a job reports from, kept to look at once the job is over (the reports
    themselves come every 30 seconds, tested above on the virtual clock)."""
    kept: list[ReadMeter] = []

    @contextmanager
    def keep(meter: ReadMeter, reporter: object) -> Iterator[None]:
        kept.append(meter)
        yield

    # `ltoflow.restore` and `ltoflow.verify` are the API's functions; these are the modules.
    for module in (api, importlib.import_module("ltoflow.restore"),
                   importlib.import_module("ltoflow.verify")):
        monkeypatch.setattr(module, "reporting", keep)
    return kept


def test_verify_counts_every_container_of_every_tape(tape_set: Path,
                                                     meters: list[ReadMeter]) -> None:
    report = verify(tape_set)
    assert report.ok
    assert report.tapes_checked >= 2
    [meter] = meters
    assert (meter.job, meter.total_tapes) == ("verifying", report.tapes_checked)
    assert meter.tape_index == report.tapes_checked
    assert meter.done_bytes == meter.total_bytes == report.bytes_checked


def test_verify_leaves_a_missing_tape_out_of_its_total(tape_set: Path,
                                                       meters: list[ReadMeter]) -> None:
    lost = sorted(tape_set.iterdir())[-1]
    shutil.rmtree(lost)
    report = verify(tape_set)
    assert not report.ok
    [meter] = meters
    assert meter.tape_index == meter.total_tapes == report.tapes_checked  # not the lost one
    assert meter.done_bytes == meter.total_bytes == report.bytes_checked > 0


def test_restore_counts_the_bytes_it_restores_and_a_second_run_those_it_compares(
        tape_set: Path, tmp_path: Path, meters: list[ReadMeter]) -> None:
    target = tmp_path / "restored"
    report = restore(tape_set, target)
    assert report.restored == len(TREE)
    compared, restored = meters
    assert compared.total_bytes == 0  # nothing was there yet: never reported
    assert (restored.job, restored.done_bytes, restored.total_bytes) == (
        "restoring", sum(TREE.values()), sum(TREE.values()))

    meters.clear()
    report = restore(tape_set, target)
    assert report.already_present == len(TREE)
    assert report.restored == 0
    compared, restored = meters
    assert compared.job == "comparing the files already in the target"
    assert compared.done_bytes == compared.total_bytes == sum(TREE.values())
    assert restored.total_bytes == 0


def test_a_container_cut_short_takes_what_it_lost_off_the_counts(
        tape_set: Path, tmp_path: Path, meters: list[ReadMeter]) -> None:
    """Restore: its ranges not completed leave the total and what was counted of them;
    verify: what could not be read leaves the total. Both counts still end at their totals,
    and a verify of bytes appended counts only the catalog's."""
    blob = max(tape_set.glob("*/data/CNT-*"), key=lambda p: p.stat().st_size)
    data = blob.read_bytes()
    blob.write_bytes(data[:len(data) // 2])
    report = restore(tape_set, tmp_path / "out")
    assert report.problems
    _, restored = meters
    assert restored.done_bytes == restored.total_bytes < sum(TREE.values())
    meters.clear()
    verify(tape_set)
    [checked] = meters
    assert checked.done_bytes == checked.total_bytes < report.bytes_to_read
    blob.write_bytes(data + b"appended")
    meters.clear()
    verify(tape_set)
    [checked] = meters
    assert checked.done_bytes == checked.total_bytes


def test_a_reporter_that_fails_leaves_the_restores_links_and_directories_done(
        tape_set: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    @contextmanager
    def failing(meter: ReadMeter, reporter: object) -> Iterator[None]:
        yield
        raise ValueError("the reporter's own bug")

    monkeypatch.setattr(importlib.import_module("ltoflow.restore"), "reporting", failing)
    with pytest.raises(ValueError, match="the reporter's own bug"):
        restore(tape_set, tmp_path / "out")
    # the directories got their times, which is the restore's last step
    for d in (tmp_path / "out").iterdir():
        assert d.stat().st_mtime_ns == (tape_set.parent / "src" / d.name).stat().st_mtime_ns


def test_a_restore_times_its_comparison_of_the_files_already_there(
        tape_set: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Its summary's seconds are the whole job's: a second run that only compares used to say
    `in 0.0 s` after comparing for hours."""
    target = tmp_path / "restored"
    assert restore(tape_set, target).restored == len(TREE)

    class Stepping:  # stands still but for the comparisons, an hour each
        t = 0.0

        def now(self) -> datetime:
            return datetime(2026, 11, 27, tzinfo=UTC)

        def monotonic(self) -> float:
            return self.t

    clock = Stepping()
    module = importlib.import_module("ltoflow.restore")
    differs: Callable[..., str | None] = module._differs

    def slow_differs(*args: Any) -> str | None:
        clock.t += 3600
        return differs(*args)

    monkeypatch.setattr(module, "_differs", slow_differs)
    report = restore(api.Components(drive=SimulatorDrive(tape_set), clock=clock), target)
    assert report.already_present == len(TREE)
    assert report.seconds == 3600 * len(TREE)


async def test_a_reporter_that_fails_otherwise_stops_the_reports_and_its_error_comes_out(
    autojump_clock: trio.testing.MockClock,
) -> None:
    class Faulty:
        def event(self, event: Event) -> None:
            raise ValueError("a bug in the caller's reporter")

    finished = []

    async def job() -> None:
        with reporting(ReadMeter("verifying", 10), Faulty(), every=5):
            await trio.sleep(60)
            finished.append(trio.current_time())

    with pytest.raises(ValueError, match="a bug in the caller's reporter"):
        await job()
    assert finished  # the job itself ran to its end
