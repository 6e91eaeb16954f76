"""Every error ltoflow raises on purpose, under one root: `BackupError`.

The seed's classes keep their names and meaning. Each message is one sentence that says what
happened, to which file or tape, and what to do next; only the CLI turns them into exit codes.
"""

from __future__ import annotations


def leaves(error: BaseException) -> list[BaseException]:
    """The plain exceptions inside an exception group, however deeply nested."""
    if isinstance(error, BaseExceptionGroup):
        return [leaf for e in error.exceptions for leaf in leaves(e)]
    return [error]


class BackupError(Exception):
    """Root of every error ltoflow raises on purpose."""


class UsageError(BackupError):
    """The command line or the configuration asks for something that cannot work."""


class BackupPlanError(UsageError):
    """A valid backup plan cannot be made (container larger than a tape, capacity too small)."""


class CatalogWriteError(BackupError):
    """The catalog cannot be serialized or written to tape."""


class CatalogReadError(BackupError):
    """No usable catalog: missing, damaged, or not a catalog at all."""


class FileWriteError(BackupError):
    """A segment cannot be written to tape (the seed also uses it for injected read failures)."""


class TapeReadError(FileWriteError):
    """Reading from a tape failed.

    A subclass of `FileWriteError` because the seed documents `fail_on_read` as raising
    FileWriteError; catching either works.
    """


class SourceFileChangedError(BackupError):
    """A source file changed (size, mtime or content) between the scan and the backup."""

    def __init__(self, relative_path: str, what: str) -> None:
        super().__init__(
            f"source file {relative_path!r} changed during the backup ({what}); "
            "stop whatever changes it"
        )
        self.relative_path = relative_path
        self.what = what


class SourceFileVanishedError(SourceFileChangedError):
    """A source file was deleted (or moved away) between the scan and the end of its read."""


class TapeFullError(BackupError):
    """A write would exceed the tape's usable capacity."""

    def __init__(self, message: str, *, bytes_written: int = 0) -> None:
        super().__init__(message)
        self.bytes_written = bytes_written


class TapeFilledEarlyError(TapeFullError):
    """A tape filled before its planned share: container `container_index` did not fit."""

    def __init__(self, message: str, *, bytes_written: int = 0, container_index: int) -> None:
        super().__init__(message, bytes_written=bytes_written)
        self.container_index = container_index


class TapeNotLoadedError(BackupError):
    """A drive operation was attempted with no (usable) tape loaded."""


class WrongTapeError(BackupError):
    """The tape in the drive belongs to another backup set or has the wrong sequence number."""


class SetExistsError(UsageError):
    """The simulator directory already holds another backup set, `set_id`."""

    def __init__(self, message: str, set_id: str) -> None:
        super().__init__(message)
        self.set_id = set_id


class SourceReadError(BackupError):
    """A source file could not be opened or read (permission denied, I/O error)."""

    def __init__(self, message: str, *, relative_path: str = "", what: str = "") -> None:
        super().__init__(message)
        self.relative_path = relative_path
        self.what = what or message


class SkippedEntriesError(BackupError):
    """`--strict`: the scan found entries that would be skipped, so nothing was written."""


class DriveLostError(BackupError):
    """The drive (the LTFS mount) went away in the middle of the job."""


class TargetFullError(BackupError):
    """The restore's target filesystem is full (or the user's quota spent): nothing more can
    be written, so reading on from tape would only fail file after file."""


class JournalError(BackupError):
    """The job journal (the record that makes --resume possible) cannot be written or read."""


class Interrupted(BackupError):
    """The job was stopped by SIGINT or SIGTERM; a backup's journal keeps what is on tape."""
