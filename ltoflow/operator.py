"""The person (or robot) who puts tapes in the drive.

Three operators, picked by the CLI: nobody (the simulator finds its own tapes), a person at the
terminal (the seed's prompt), and a tape-change command for libraries and scripts. None of them
ever blocks on a prompt nobody can answer.
"""

from __future__ import annotations

import os
import sys
from typing import Protocol, TextIO

import trio

from ltoflow.drives import TapeRequest
from ltoflow.errors import TapeNotLoadedError
from ltoflow.progress import Note, Reporter


class Operator(Protocol):
    async def insert_tape(self, request: TapeRequest, *, problem: str | None = None) -> None:
        """Return once `request`'s tape should be in the drive.

        `problem` says why it is asked again (the wrong tape was inserted, say). Raises
        TapeNotLoadedError when nobody can insert it.
        """
        ...


class NoPromptOperator:
    """For drives that find their own tapes (the simulator)."""

    async def insert_tape(self, request: TapeRequest, *, problem: str | None = None) -> None:
        if problem is not None:
            raise TapeNotLoadedError(f"{_clause(problem)}; no operator is available to change "
                                     "the tape")


class UnattendedOperator:
    """No prompt and no command (--yes, or stdin is not a terminal): the tape already in the
    drive is used for the first request; any other tape needed is a clear error."""

    def __init__(self) -> None:
        self._first = True

    async def insert_tape(self, request: TapeRequest, *, problem: str | None = None) -> None:
        first, self._first = self._first, False
        if first and problem is None:
            return
        why = f"{_clause(problem)}; " if problem else ""
        raise TapeNotLoadedError(
            f"{why}tape {request.describe()} is needed and nobody can be asked for it "
            "(no terminal, or --yes); insert it and run again, or give --tape-change-command"
        )


class ConsolePromptOperator:
    """The seed's prompt: 'Please insert tape TAPE-002 (tape 2) and press Enter.'

    The first request uses the tape already in the drive; later ones (the next tape, or the
    right one after a wrong tape) wait for Enter.
    """

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream  # None: sys.stderr as it is when asking (a live view's proxy)
        self._first = True

    async def insert_tape(self, request: TapeRequest, *, problem: str | None = None) -> None:
        first, self._first = self._first, False
        if first and problem is None:
            return
        # Looked up now: while the live view runs, sys.stderr prints above its bars.
        stream = self.stream or sys.stderr
        if problem:
            print(f"Cannot use the tape in the drive: {problem}", file=stream)
        print(f"Please insert tape {request.tape_id} (tape {request.sequence_number}"
              f"{', volume ' + request.volume_serial if request.volume_serial else ''}) "
              "and press Enter.", file=stream, flush=True)
        line = await trio.to_thread.run_sync(sys.stdin.readline, abandon_on_cancel=True)
        if not line:
            raise TapeNotLoadedError(
                f"no answer (end of input) to the request for tape {request.describe()}"
            )


class CommandOperator:
    """Runs a command (an `mtx load` script, say) whenever a tape is needed.

    The command runs through the shell with LTOFLOW_TAPE_ID, LTOFLOW_TAPE_SEQ (1-based),
    LTOFLOW_SET_ID, LTOFLOW_PURPOSE (write/read) and, when asked again, LTOFLOW_PROBLEM; the
    tape and set ids are empty when any tape of the set will do (the first tape a read job
    loads, for the catalog). A non-zero exit is an error that shows the command's stderr.
    Each run is said first (`reporter`), so that a command that hangs is seen to.
    """

    def __init__(self, command: str, reporter: Reporter | None = None) -> None:
        self.command = command
        self.reporter = reporter

    async def insert_tape(self, request: TapeRequest, *, problem: str | None = None) -> None:
        known = bool(request.backup_set_id)  # else: any tape of the set, sequence 1 first
        if self.reporter is not None:
            what = request.describe() if known else f"tape {request.sequence_number}"
            self.reporter.event(Note(f"running the tape-change command for {what}"))
        env = {
            **os.environ,
            "LTOFLOW_TAPE_ID": request.tape_id if known else "",
            "LTOFLOW_TAPE_SEQ": str(request.sequence_number),
            "LTOFLOW_SET_ID": request.backup_set_id,
            "LTOFLOW_PURPOSE": request.purpose,
        }
        if request.volume_serial:
            env["LTOFLOW_VOLUME_SERIAL"] = request.volume_serial
        if problem:
            env["LTOFLOW_PROBLEM"] = problem
        done = await trio.run_process(self.command, shell=True, env=env, check=False,
                                      capture_stdout=True, capture_stderr=True)
        if done.returncode != 0:
            err = done.stderr.decode(errors="replace").strip().splitlines()
            shown = " / ".join(err[-3:]) if err else "no message"
            raise TapeNotLoadedError(
                f"the tape-change command failed for tape {request.describe()} "
                f"(exit {done.returncode}): {shown}"
            )


def _clause(problem: str) -> str:
    """`problem` to go on with `; ...` (no full stop before it)."""
    return problem.rstrip().rstrip(".")
