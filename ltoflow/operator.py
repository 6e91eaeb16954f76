"""The person (or robot) who puts tapes in the drive."""

from __future__ import annotations

import sys
from typing import Protocol

import trio

from ltoflow.drives import TapeRequest
from ltoflow.errors import TapeNotLoadedError


class Operator(Protocol):
    async def insert_tape(self, request: TapeRequest, *, problem: str | None = None) -> None:
        """Return once `request`'s tape should be in the drive.

        `problem` says why it is asked again (the wrong tape was inserted, say). Raises
        TapeNotLoadedError when nobody can insert it.
        """
        ...


class NoPromptOperator:
    """For drives that find their own tapes (the simulator, a library driven elsewhere)."""

    async def insert_tape(self, request: TapeRequest, *, problem: str | None = None) -> None:
        if problem is not None:
            raise TapeNotLoadedError(f"{problem}; no operator is available to change the tape")


class ConsolePromptOperator:
    """The seed's prompt: 'Please insert tape TAPE-002 (tape 2) and press Enter.'"""

    async def insert_tape(self, request: TapeRequest, *, problem: str | None = None) -> None:
        if not sys.stdin.isatty():
            raise TapeNotLoadedError(
                f"tape {request.describe()} is needed but stdin is not a terminal; "
                "run interactively or use a tape-change command"
            )
        if problem:
            print(problem, file=sys.stderr)
        prompt = (
            f"Please insert tape {request.tape_id} (tape {request.sequence_number}) "
            "and press Enter."
        )
        print(prompt, file=sys.stderr, flush=True)
        line = await trio.to_thread.run_sync(sys.stdin.readline, abandon_on_cancel=True)
        if not line:
            raise TapeNotLoadedError(f"no answer to the request for tape {request.describe()}")
