"""ltoflow: back up a records archive to LTO tape, streaming, verifiable, self-describing."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ltoflow._version import __version__
from ltoflow.api import (
    BackupConfig,
    Components,
    backup,
    backup_async,
    compose,
    make_backup_plan,
    restore,
    restore_async,
    verify,
    verify_async,
)
from ltoflow.catalog import Catalog, CatalogCodec, JsonCatalogCodec
from ltoflow.drives import LoadedTape, TapeDrive, TapeRequest
from ltoflow.drives.simulator import SimulatorDrive, SimulatorFailureConfig
from ltoflow.errors import (
    BackupError,
    BackupPlanError,
    CatalogReadError,
    CatalogWriteError,
    FileWriteError,
    Interrupted,
    SkippedEntriesError,
    SourceFileChangedError,
    SourceFileVanishedError,
    SourceReadError,
    TapeFullError,
    TapeNotLoadedError,
    TapeReadError,
    UsageError,
    WrongTapeError,
)
from ltoflow.restore import RestoreReport
from ltoflow.verify import VerifyReport

if TYPE_CHECKING:
    from ltoflow.engine import BackupResult

__all__ = [
    "BackupConfig",
    "BackupError",
    "BackupPlanError",
    "BackupResult",
    "Catalog",
    "CatalogCodec",
    "CatalogReadError",
    "CatalogWriteError",
    "Components",
    "FileWriteError",
    "Interrupted",
    "JsonCatalogCodec",
    "LoadedTape",
    "RestoreReport",
    "SimulatorDrive",
    "SimulatorFailureConfig",
    "SkippedEntriesError",
    "SourceFileChangedError",
    "SourceFileVanishedError",
    "SourceReadError",
    "TapeDrive",
    "TapeFullError",
    "TapeNotLoadedError",
    "TapeReadError",
    "TapeRequest",
    "UsageError",
    "VerifyReport",
    "WrongTapeError",
    "__version__",
    "backup",
    "backup_async",
    "compose",
    "make_backup_plan",
    "restore",
    "restore_async",
    "verify",
    "verify_async",
]


def __getattr__(name: str) -> Any:
    # The engine loads on first use: a job that only reads tapes never needs it (start-up).
    if name == "BackupResult":
        from ltoflow.engine import BackupResult

        return BackupResult
    raise AttributeError(f"module 'ltoflow' has no attribute {name!r}")
