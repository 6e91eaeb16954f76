"""What a running job tells the operator: small frozen events and the Reporter that shows them."""

from __future__ import annotations

import sys
from typing import Protocol, TextIO

import attrs

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
class Note:
    text: str


Event = (
    TapeStarted | ContainerWritten | TapeFinished | CatalogWritten | TapeVerified | Note | Progress
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
    """One line per tape (and per container with `verbose`), for logs and pipes."""

    def __init__(self, stream: TextIO | None = None, *, verbose: bool = False,
                 quiet: bool = False) -> None:
        self.stream = stream or sys.stderr
        self.verbose = verbose
        self.quiet = quiet

    def _say(self, text: str) -> None:
        print(text, file=self.stream, flush=True)

    def event(self, event: Event) -> None:
        if self.quiet:
            return
        match event:
            case TapeStarted():
                self._say(
                    f"tape {event.sequence_number}/{event.total_tapes} {event.tape_id}: "
                    f"writing {human_bytes(event.planned_bytes)}"
                )
            case ContainerWritten() if self.verbose:
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
                self._say(f"  verified {event.tape_id}: {event.containers} containers, {state}")
            case Note():
                self._say(event.text)
            case _:
                pass
