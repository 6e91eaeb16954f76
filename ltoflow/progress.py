"""What a running job tells the operator: small frozen events and the Reporter that shows them."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Protocol, TextIO

import attrs
import trio

from ltoflow.paths import shown
from ltoflow.units import human_bytes


@attrs.frozen
class TapeStarted:
    tape_id: str
    sequence_number: int
    total_tapes: int
    planned_bytes: int
    label: str = ""


@attrs.frozen
class Progress:
    """A snapshot of a running backup, sent every half second."""

    elapsed: float
    total_bytes: int
    done_bytes: int
    tape_id: str
    sequence_number: int
    total_tapes: int
    tape_bytes: int
    tape_planned: int
    container_id: str
    buffer_filled: int
    buffer_capacity: int
    stalls: int
    stall_seconds: float
    phase: str


@attrs.frozen
class ContainerWritten:
    tape_id: str
    container_id: str
    size_bytes: int
    seconds: float


@attrs.frozen
class TapeFinished:
    tape_id: str
    sequence_number: int
    containers: int
    data_bytes: int
    seconds: float
    stalls: int
    stall_seconds: float


@attrs.frozen
class CatalogWritten:
    tape_id: str
    size_bytes: int
    sha256: str


@attrs.frozen
class TapeVerified:
    tape_id: str
    containers: int
    problems: int


@attrs.frozen
class ReadProgress:
    """How far a job that reads (verify, restore, restore's check of the files already in its
    target) has come, sent every READ_TICK_SECONDS while it runs."""

    job: str
    elapsed: float
    done_bytes: int
    total_bytes: int
    #: Bytes a second since the last report: a tape streams at one speed, and this one drops
    #: to 0 while a tape is changed, where an average since the start would not.
    rate: float
    tape_id: str = ""
    sequence_number: int = 0
    #: The tapes this job reads, and which of them this one is (1-based): a restore of a few
    #: files may need tapes 2 and 3 of 4 only.
    total_tapes: int = 0
    tape_index: int = 0


#: How often a read job says how far it has come: a tape takes hours to read, and without
#: these lines its log shows nothing between "loaded" and "done".
READ_TICK_SECONDS = 30.0


@attrs.define
class ReadMeter:
    """A read job's running count, kept by the job (a thread may add to `done_bytes`) and read
    by `reporting`. `tape_id` is the tape being read, empty when none is."""

    job: str
    total_bytes: int
    total_tapes: int = 0
    done_bytes: int = 0
    tape_id: str = ""
    sequence_number: int = 0
    tape_index: int = 0

    def begin_tape(self, tape_id: str, sequence_number: int) -> None:
        """The job reads its next tape (of `total_tapes`), `sequence_number` of the set."""
        self.tape_id, self.sequence_number = tape_id, sequence_number
        self.tape_index += 1

    def snapshot(self, elapsed: float, rate: float) -> ReadProgress:
        return ReadProgress(self.job, elapsed, self.done_bytes, self.total_bytes, rate,
                            self.tape_id, self.sequence_number, self.total_tapes,
                            self.tape_index)


@contextmanager
def reporting(meter: ReadMeter, reporter: Reporter,
              every: float = READ_TICK_SECONDS) -> Iterator[None]:
    """Send `meter`'s snapshot to `reporter` every `every` seconds while the body runs (none
    for a job shorter than that, nor while its total is 0: not known yet). The reports come
    from a task of their own, beside the job rather than in a nursery around it, so that the
    job's errors come out as they are. A reporter that fails stops the reports: its error
    is raised when the body is done (unless the body failed), or dropped for an OSError (the
    log went away, a closed pipe say: the job goes on)."""
    scope = trio.CancelScope()
    failed: list[Exception] = []

    async def tick() -> None:
        with scope:
            started = last = trio.current_time()
            done = meter.done_bytes
            while True:
                await trio.sleep(every)
                now, now_done = trio.current_time(), meter.done_bytes
                rate = (now_done - done) / (now - last) if now > last else 0.0
                try:
                    if meter.total_bytes:
                        reporter.event(meter.snapshot(now - started, rate))
                except OSError:
                    return
                except Exception as e:  # a system task's error would end trio.run itself
                    failed.append(e)
                    return
                last, done = now, now_done

    trio.lowlevel.spawn_system_task(tick)
    try:
        yield
    finally:
        scope.cancel()
    if failed:
        raise failed[0]


@attrs.frozen
class Note:
    text: str


@attrs.frozen
class FileSkipped:
    """A source file that could not be backed up after all; it is listed in the catalog."""

    relative_path: str
    reason: str


Event = (
    TapeStarted | ContainerWritten | TapeFinished | CatalogWritten | TapeVerified | Note
    | FileSkipped | Progress | ReadProgress
)


class Reporter(Protocol):
    def event(self, event: Event) -> None: ...


class NullReporter:
    def event(self, event: Event) -> None:
        pass


class ListReporter:
    """Keeps every event, for tests and for the Python API."""

    def __init__(self) -> None:
        self.events: list[Event] = []

    def event(self, event: Event) -> None:
        self.events.append(event)


class LogReporter:
    """One line per container and per tape, for logs and pipes (containers hidden by `quiet`)."""

    def __init__(self, stream: TextIO | Any = None, *, verbose: bool = False,
                 quiet: bool = False) -> None:
        self.stream: Any = stream or sys.stderr
        self.verbose = verbose
        self.quiet = quiet

    def _say(self, text: str) -> None:
        print(text, file=self.stream, flush=True)

    def event(self, event: Event) -> None:
        warning = isinstance(event, FileSkipped) or (
            isinstance(event, Note) and event.text.startswith("warning:"))
        if self.quiet and not warning:  # warnings no summary repeats as they happen (a
            return  # damaged catalog copy, a file skipped as it is met) are said all the same
        match event:
            case TapeStarted():
                self._say(
                    f"tape {event.sequence_number}/{event.total_tapes} {event.tape_id}: "
                    f"writing {human_bytes(event.planned_bytes)}"
                )
            case ContainerWritten():
                rate = event.size_bytes / event.seconds / 1e6 if event.seconds > 0 else 0.0
                self._say(
                    f"  {event.container_id}: {human_bytes(event.size_bytes)} "
                    f"in {event.seconds:.2f} s ({rate:.0f} MB/s)"
                )
            case TapeFinished():
                rate = event.data_bytes / event.seconds / 1e6 if event.seconds > 0 else 0.0
                self._say(
                    f"tape {event.sequence_number} {event.tape_id}: {event.containers} "
                    f"containers, {human_bytes(event.data_bytes)} in {event.seconds:.1f} s "
                    f"({rate:.0f} MB/s), writer waited {event.stalls} times "
                    f"({event.stall_seconds:.2f} s)"
                )
            case CatalogWritten():
                self._say(
                    f"  catalog written to {event.tape_id} ({human_bytes(event.size_bytes)}, "
                    f"sha256 {event.sha256[:16]}...)"
                )
            case TapeVerified():
                state = "clean" if not event.problems else f"{event.problems} PROBLEMS"
                self._say(f"  verified {event.tape_id}: {event.containers} container(s), {state}")
            case Note():
                self._say(event.text)
            case FileSkipped():
                self._say(f"warning: skipping {shown(event.relative_path)}: {event.reason}")
            case ReadProgress():
                self._say(read_progress_line(event))
            case _:
                pass


def read_progress_line(p: ReadProgress) -> str:
    """`  restoring: 1.20 TB of 4.00 TB (30%), tape 3 (2 of 2 to read), 312 MB/s, about 2 h 30
    min left`: tape 3 of the set, the second of the two this job reads."""
    share = f" ({100 * p.done_bytes // p.total_bytes}%)" if p.total_bytes else ""
    tape = (f", tape {p.sequence_number} ({p.tape_index} of {p.total_tapes} to read)"
            if p.tape_id else "")
    left = ""
    if p.rate > 0 and p.total_bytes > p.done_bytes:
        left = f", {_time_left((p.total_bytes - p.done_bytes) / p.rate)}"
    return (f"  {p.job}: {human_bytes(p.done_bytes)} of {human_bytes(p.total_bytes)}{share}"
            f"{tape}, {p.rate / 1e6:.0f} MB/s{left}")


def _time_left(seconds: float) -> str:
    minutes = round(seconds / 60)
    if minutes < 1:
        return "under a minute left"
    if minutes < 60:
        return f"about {minutes} min left"
    return f"about {minutes // 60} h {minutes % 60} min left"


class LiveReporter:
    """The operator's live view on a terminal (rich): overall and per-tape progress, MB/s now
    and on average, ETA, tape and container, buffer fill, and how often the writer waited."""

    def __init__(self, *, verbose: bool = False) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            TextColumn,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )
        from rich.progress import (
            Progress as Bars,
        )

        self.console = Console(stderr=True)
        self.verbose = verbose
        self.bars = Bars(
            TextColumn("{task.description}"), BarColumn(), DownloadColumn(binary_units=False),
            TransferSpeedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[status]}"),
            console=self.console, transient=False, refresh_per_second=4,
        )
        self._overall: Any = None
        self._tape: Any = None
        self._last: tuple[float, int] | None = None
        self._log = LogReporter(verbose=verbose)

    def event(self, event: Event) -> None:
        match event:
            case Progress():
                self._progress(event)
            case (TapeStarted() | TapeFinished() | CatalogWritten() | TapeVerified() | Note()
                  | FileSkipped() | ReadProgress()):
                self._print(event)
            case ContainerWritten() if self.verbose:
                self._print(event)
            case _:
                pass

    def _print(self, event: Event) -> None:
        self._log.stream = _ConsoleStream(self.console)
        self._log.event(event)

    def _progress(self, p: Progress) -> None:
        if self._overall is None:
            self.bars.start()
            self._overall = self.bars.add_task("all tapes", total=p.total_bytes, status="")
            self._tape = self.bars.add_task("tape", total=max(1, p.tape_planned), status="")
        now_rate = 0.0
        if self._last is not None and p.elapsed > self._last[0]:
            now_rate = (p.done_bytes - self._last[1]) / (p.elapsed - self._last[0])
        self._last = (p.elapsed, p.done_bytes)
        avg = p.done_bytes / p.elapsed if p.elapsed > 0 else 0.0
        fill = p.buffer_filled / p.buffer_capacity * 100 if p.buffer_capacity else 0.0
        self.bars.update(
            self._overall, completed=p.done_bytes,
            status=f"now {now_rate / 1e6:.0f} MB/s, avg {avg / 1e6:.0f} MB/s",
        )
        self.bars.update(
            self._tape, completed=p.tape_bytes, total=max(1, p.tape_planned),
            description=f"tape {p.sequence_number}/{p.total_tapes}",
            status=f"{p.phase} {p.container_id[-5:] if p.container_id else ''} "
                   f"buffer {fill:.0f}% waits {p.stalls} ({p.stall_seconds:.1f} s)",
        )

    def close(self) -> None:
        if self._overall is not None:
            self.bars.stop()


class _ConsoleStream:
    """Lets LogReporter print above rich's live bars."""

    def __init__(self, console: Any) -> None:
        self.console = console

    def write(self, text: str) -> int:
        if text.strip():
            self.console.print(text.rstrip("\n"), highlight=False)
        return len(text)

    def flush(self) -> None:
        pass
