"""The seam between the engine and a tape: one `TapeDrive` Protocol, two implementations.

A loaded tape looks like a small append-only filesystem rooted at the tape: containers go to
`data/<container_id>`, the catalog to `catalog/`, the recovery kit to `recovery/`. The simulator
(`ltoflow.drives.simulator`) keeps each tape as a directory; the LTFS drive mounts a real
cartridge. Implementations do not inherit from these Protocols; they only match them.
"""

from __future__ import annotations

from collections.abc import Buffer
from typing import Protocol

import attrs


@attrs.frozen
class TapeRequest:
    """Which tape the engine needs in the drive, and why."""

    tape_id: str
    sequence_number: int  # 1-based
    backup_set_id: str
    total_tapes: int | None = None
    purpose: str = "write"  # "write" | "read"
    volume_serial: str | None = None  # when the catalog knows it

    def describe(self) -> str:
        of = f" of {self.total_tapes}" if self.total_tapes else ""
        vol = f", volume {self.volume_serial}" if self.volume_serial else ""
        return f"{self.tape_id} (tape {self.sequence_number}{of}{vol})"


class TapeWriter(Protocol):
    """One file being written to tape. `close` commits it and may still raise TapeFullError."""

    async def write(self, data: Buffer) -> None: ...

    async def close(self) -> None: ...

    async def abort(self) -> None: ...


class TapeReader(Protocol):
    """One file being read, front to back. A reader may also offer `async map_chunk(offset,
    length)`: up to `length` of the file's bytes from `offset` (where the chunk before it
    ended) as an mmap verify closes when done, None at the end of the file. Verify then hashes
    them where they lie (the simulator maps its files on disk)."""

    async def readinto(self, buf: memoryview) -> int: ...

    async def seek(self, offset: int) -> None:
        """Move to `offset` bytes from the start of the file (a locate on real tape)."""
        ...

    async def close(self) -> None: ...


class LoadedTape(Protocol):
    """The tape currently in the drive. Paths are relative to the tape root, with '/'."""

    @property
    def label(self) -> str:
        """How to name this tape to an operator (tape id, and volume serial when known)."""
        ...

    @property
    def volume_serial(self) -> str | None:
        """The cartridge's volume serial (barcode label), when the drive reports one."""
        ...

    async def free_bytes(self) -> int | None:
        """Bytes that can still be written, or None if the drive cannot tell."""
        ...

    async def open_write(self, path: str, *, replace: bool = False) -> TapeWriter:
        """A new file; an existing one is an error unless `replace` (a resumed job rewriting
        what an interrupted one left half-written: its old bytes stay used on the medium)."""
        ...

    async def open_read(self, path: str) -> TapeReader: ...

    async def read_small(self, path: str, *, limit: int) -> bytes | None:
        """The whole file (at most `limit` bytes), or None when it does not exist. A drive
        may also offer `read_whole`, the same for a file that may be hundreds of MB (a set's
        catalog), which can give it mapped into memory (read-only) instead of copied (the
        simulator does)."""
        ...

    async def size_of(self, path: str) -> int | None: ...

    async def list_dir(self, path: str) -> list[str]: ...

    async def sync(self) -> None:
        """Make everything written so far durable on the medium."""
        ...

    async def replace(self, src: str, dst: str) -> None:
        """Rename `src` over `dst` in one step: `dst` is the old file or the new, never torn."""
        ...


class TapeDrive(Protocol):
    """Loads and unloads tapes. Every tape is loaded once per job and unloaded when done."""

    def describe(self) -> str: ...

    async def load(self, request: TapeRequest) -> LoadedTape:
        """Put the requested tape in the drive; raises TapeNotLoadedError when it cannot."""
        ...

    async def unload(self) -> None: ...

    async def inventory(self) -> list[str] | None:
        """Tape ids the drive can reach without an operator (a simulator, a library), or None."""
        ...
