"""What read jobs (verify, restore, restore's comparison of files already there) say about how
far they have come while they run, on trio's virtual clock."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
import trio.testing

from ltoflow import BackupConfig, backup
from ltoflow.api import Components, restore_async, verify_async
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


def _reads(events: list[Event]) -> list[ReadProgress]:
    return [e for e in events if isinstance(e, ReadProgress)]


async def test_a_read_job_is_reported_every_interval_with_the_rate_since_the_last(
    autojump_clock: trio.testing.MockClock,
) -> None:
    reporter = ListReporter()
    meter = ReadMeter("restoring", 6_000, total_tapes=3)
    with reporting(meter, reporter, every=30):
        await trio.sleep(29.9)
        assert reporter.events == []  # a job shorter than one interval says nothing
        meter.done_bytes, meter.tape_id, meter.sequence_number = 600, "T2", 2
        await trio.sleep(0.2)
        assert reporter.events == [ReadProgress("restoring", 30.0, 600, 6_000, 20.0, "T2", 2, 3)]
        meter.tape_id = ""  # between tapes: nothing read for the next interval
        await trio.sleep(30)
        assert reporter.events[-1] == ReadProgress("restoring", 60.0, 600, 6_000, 0.0, "", 2, 3)
    await trio.sleep(100)
    assert len(reporter.events) == 2  # none once the job is over


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
        ReadProgress("restoring", 600.0, 1_200_000_000_000, 4_000_000_000_000, 312e6, "T2", 2,
                     3))
    assert line == ("  restoring: 1.20 TB of 4.00 TB (30%), tape 2/3, 312 MB/s, "
                    "about 2 h 30 min left")
    waiting = read_progress_line(ReadProgress("verifying", 90.0, 500, 1_000, 0.0))
    assert waiting == "  verifying: 500 B of 1.00 kB (50%), 0 MB/s"
    ending = read_progress_line(
        ReadProgress("verifying", 90.0, 990_000_000, 10**9, 300e6, "T1", 1, 1))
    assert ending.endswith(", tape 1/1, 300 MB/s, under a minute left")


@pytest.fixture
def tape_set(tmp_path: Path) -> Path:
    write_tree(tmp_path / "src", TREE)
    config = BackupConfig.simulator(tmp_path / "src", tmp_path / "tapes",
                                    capacity_tb="0.0000002", container_size_gb="0.00005")
    backup(config)
    return tmp_path / "tapes"


def _in_order(reads: list[ReadProgress], job: str, total: int) -> None:
    assert reads, "no progress reported"
    assert {r.job for r in reads} == {job}
    assert {r.total_bytes for r in reads} == {total}
    done = [r.done_bytes for r in reads]
    assert done == sorted(done)
    assert done[-1] <= total


async def test_verify_reports_its_progress_over_the_containers_of_every_tape(
    tape_set: Path, autojump_clock: trio.testing.MockClock,
) -> None:
    # Every wait for a hashing thread lets the virtual clock jump to the next report.
    reporter = ListReporter()
    report = await verify_async(Components(drive=SimulatorDrive(tape_set), reporter=reporter))
    assert report.ok
    assert report.tapes_checked >= 2
    reads = _reads(reporter.events)
    _in_order(reads, "verifying", report.bytes_checked)
    assert {r.sequence_number for r in reads if r.tape_id} >= {1, 2}


async def test_restore_reports_its_progress_and_then_the_comparison_of_a_second_run(
    tape_set: Path, tmp_path: Path, autojump_clock: trio.testing.MockClock,
) -> None:
    target = tmp_path / "restored"
    first = ListReporter()
    report = await restore_async(Components(drive=SimulatorDrive(tape_set), reporter=first),
                                 target)
    assert report.ok
    assert report.restored == len(TREE)
    _in_order(_reads(first.events), "restoring", sum(TREE.values()))

    again = ListReporter()
    report = await restore_async(Components(drive=SimulatorDrive(tape_set), reporter=again),
                                 target)
    assert report.ok
    assert report.already_present == len(TREE)
    assert report.restored == 0
    _in_order(_reads(again.events), "comparing the files already in the target",
              sum(TREE.values()))
