"""The Python API and its composition root.

```python
from ltoflow import BackupConfig, backup, verify
config = BackupConfig.simulator("/srv/records", "/srv/tapes", capacity_tb=18, container_size_gb=100)
result = backup(config)
report = verify(config)
```
`compose` is the one place that picks the drive, the operator, the clock, the catalog codec and
the reporter; everything else receives them. Pass your own `Components` to swap any of them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from decimal import Decimal
from pathlib import Path

import attrs
import trio

from ltoflow import recovery
from ltoflow.catalog import Catalog, CatalogCodec, JsonCatalogCodec, gc_frozen, gc_paused
from ltoflow.clock import Clock, SystemClock
from ltoflow.drives import TapeDrive
from ltoflow.drives.simulator import SimulatorDrive, SimulatorFailureConfig, list_simulated_tapes
from ltoflow.engine import BackupResult, EngineSettings, run_backup
from ltoflow.errors import SetExistsError, UsageError
from ltoflow.operator import NoPromptOperator, Operator
from ltoflow.plan import JsonPlanSizer, Plan, catalog_measurer, make_plan
from ltoflow.progress import NullReporter, Reporter
from ltoflow.restore import RestorePlan, RestoreReport, plan_restore, run_restore
from ltoflow.scan import scan_tree
from ltoflow.tapes import TapeHolder
from ltoflow.units import GB, TB, MiB
from ltoflow.verify import VerifyReport, find_catalog, verify_set

DEFAULT_BUFFER_BYTES = 256 * MiB


def created_by() -> str:
    # Imported here: importlib.metadata costs 50 ms at start-up, which every command would pay.
    from importlib import metadata

    try:
        return f"ltoflow {metadata.version('ltoflow')}"
    except metadata.PackageNotFoundError:  # pragma: no cover - running from a bare checkout
        return "ltoflow"


@attrs.frozen
class BackupConfig:
    """What to back up and onto what. Sizes are bytes; `simulator` builds one from TB/GB."""

    source_root: Path = attrs.field(converter=Path)
    tape_nominal_capacity_bytes: int
    max_container_size_bytes: int
    tapes_root: Path | None = attrs.field(default=None, converter=attrs.converters.optional(Path))
    buffer_bytes: int = DEFAULT_BUFFER_BYTES
    verify_after_write: bool = False

    @classmethod
    def simulator(
        cls,
        source: str | Path,
        tapes: str | Path,
        *,
        capacity_tb: float | Decimal | str,
        container_size_gb: float | Decimal | str,
        **kwargs: int | bool,
    ) -> BackupConfig:
        return cls(
            source_root=Path(source),
            tapes_root=Path(tapes),
            tape_nominal_capacity_bytes=int(Decimal(str(capacity_tb)) * TB),
            max_container_size_bytes=int(Decimal(str(container_size_gb)) * GB),
            **kwargs,  # type: ignore[arg-type]  # attrs checks the names at run time
        )


@attrs.frozen
class Components:
    """Everything the engine talks to; `compose` builds the defaults."""

    drive: TapeDrive
    operator: Operator = attrs.field(factory=NoPromptOperator)
    clock: Clock = attrs.field(factory=SystemClock)
    codec: CatalogCodec = attrs.field(factory=JsonCatalogCodec)
    reporter: Reporter = attrs.field(factory=NullReporter)


def compose(
    config: BackupConfig,
    *,
    failures: SimulatorFailureConfig | None = None,
    reporter: Reporter | None = None,
) -> Components:
    """The composition root: the simulator drive for `config.tapes_root`, and the defaults."""
    if config.tapes_root is None:
        raise UsageError("no drive: give a simulator directory (tapes_root) or a device")
    drive = SimulatorDrive(config.tapes_root, config.tape_nominal_capacity_bytes, failures)
    return Components(drive=drive, reporter=reporter or NullReporter())


def make_backup_plan(config: BackupConfig, codec: CatalogCodec | None = None) -> Plan:
    """Scan and plan without writing anything. Raises UsageError / BackupPlanError."""
    with gc_paused():  # one record per file, none in a reference cycle
        scan = scan_tree(config.source_root)
    codec = codec or JsonCatalogCodec()
    # The fast sizer knows how the JSON codec encodes; any other codec is measured by encoding.
    measure = (
        JsonPlanSizer(codec, created_by()) if type(codec) is JsonCatalogCodec
        else catalog_measurer(codec, created_by())
    )
    return make_plan(
        scan,
        capacity_bytes=config.tape_nominal_capacity_bytes,
        container_size_bytes=config.max_container_size_bytes,
        measure_catalog=measure,
        extra_reserve_bytes=recovery.kit_size(),
    )


def check_simulator_is_free(root: Path) -> None:
    """Refuse a simulator directory that already holds a backup set."""
    tapes = list_simulated_tapes(root)
    if tapes:
        set_id = tapes[0].removeprefix("TAPE-").rsplit("-", 1)[0]
        raise SetExistsError(
            f"simulator directory {root} already holds backup set {set_id} "
            f"({len(tapes)} tape(s)); use an empty directory for a new backup"
        )


async def backup_async(config: BackupConfig, components: Components) -> BackupResult:
    if config.tapes_root is not None and isinstance(components.drive, SimulatorDrive):
        await trio.to_thread.run_sync(check_simulator_is_free, config.tapes_root)
    plan = await trio.to_thread.run_sync(make_backup_plan, config, components.codec)
    settings = EngineSettings(
        buffer_bytes=config.buffer_bytes,
        verify_after_write=config.verify_after_write,
        created_by=created_by(),
        extra_files=recovery.kit_files(),
    )
    with gc_frozen():  # the scan and the plan: one record per file and segment
        return await run_backup(
            plan,
            drive=components.drive,
            operator=components.operator,
            clock=components.clock,
            codec=components.codec,
            reporter=components.reporter,
            settings=settings,
        )


def backup(config: BackupConfig, components: Components | None = None) -> BackupResult:
    """Run a whole backup; raises BackupError subclasses on failure."""
    return trio.run(backup_async, config, components or compose(config))


async def verify_async(components: Components) -> VerifyReport:
    return await verify_set(
        components.drive, components.codec, clock=components.clock,
        operator=components.operator, reporter=components.reporter,
    )


def verify(target: BackupConfig | Path | str | Components) -> VerifyReport:
    """Verify the set on a simulator directory (or a config naming one, or given components)."""
    if isinstance(target, Components):
        components = target
    else:
        root = target.tapes_root if isinstance(target, BackupConfig) else Path(target)
        if root is None:
            raise UsageError("verify needs a simulator directory")
        components = Components(drive=SimulatorDrive(root))
    return trio.run(verify_async, components)


async def find_set_catalog(components: Components) -> Catalog:
    """The catalog of the set on the drive's tapes (the first good copy found)."""
    holder = TapeHolder(components.drive, components.operator)
    try:
        catalog = (await find_catalog(components.drive, components.codec, holder)).catalog
    except BaseException:
        await holder.release_after_error()
        raise
    await holder.release()
    return catalog


async def restore_async(
    components: Components,
    target: Path,
    patterns: Sequence[str] = (),
    *,
    catalog: Catalog | None = None,
    overwrite: bool = False,
    before: Callable[[RestorePlan], bool] | None = None,
) -> RestoreReport:
    """Restore the files matching `patterns` (all when empty) into `target`.

    Without `catalog`, it is read from the tapes; with a single drive, the tape it was read
    from stays in the drive and is used first if the restore needs it. `before` sees the plan
    (the tapes needed, in order) before anything is read; returning False makes it a dry run.
    """
    holder = TapeHolder(components.drive, components.operator)
    try:
        if catalog is None:
            catalog = (await find_catalog(components.drive, components.codec, holder)).catalog
        chosen = catalog
        plan = await trio.to_thread.run_sync(
            lambda: plan_restore(chosen, patterns, target, overwrite=overwrite))
        if before is not None and not before(plan):
            await holder.release()
            return RestoreReport.from_plan(plan)
        return await run_restore(
            plan, target, drive=components.drive, operator=components.operator,
            clock=components.clock, reporter=components.reporter, overwrite=overwrite,
            holder=holder,
        )
    finally:
        await holder.release_after_error()  # a no-op unless something above failed


def restore(
    tapes: Path | str | Components,
    target: Path | str,
    patterns: Sequence[str] = (),
    *,
    overwrite: bool = False,
) -> RestoreReport:
    """Restore from a simulator directory (or given components) into `target`."""
    components = tapes if isinstance(tapes, Components) else Components(
        drive=SimulatorDrive(Path(tapes)))
    return trio.run(
        lambda: restore_async(components, Path(target), patterns, overwrite=overwrite))
