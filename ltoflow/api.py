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

import shutil
import uuid
from collections.abc import Callable, Sequence
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING

import attrs
import trio

from ltoflow import paths, recovery
from ltoflow._version import __version__
from ltoflow.catalog import (
    Catalog,
    CatalogCodec,
    JsonCatalogCodec,
    gc_frozen,
    gc_paused,
    iso_utc,
    set_of,
)
from ltoflow.clock import Clock, SystemClock
from ltoflow.drives import TapeDrive
from ltoflow.drives.simulator import (
    TAPE_JSON,
    SimulatorDrive,
    SimulatorFailureConfig,
    list_simulated_tapes,
)
from ltoflow.errors import BackupError, SetExistsError, SkippedEntriesError, UsageError
from ltoflow.operator import NoPromptOperator, Operator
from ltoflow.progress import Note, NullReporter, ReadMeter, Reporter, reporting
from ltoflow.restore import OpenedUp, RestorePlan, RestoreReport, plan_restore, run_restore
from ltoflow.tapes import TapeHolder
from ltoflow.units import GB, TB, MiB
from ltoflow.verify import FoundCatalog, VerifyReport, find_catalog, verify_set

if TYPE_CHECKING:
    from ltoflow.engine import BackupResult
    from ltoflow.journal import Journal, ResumeState
    from ltoflow.plan import Plan
    from ltoflow.scan import ScanResult

# The backup's modules (scan, plan, engine, journal) are imported by the functions that use
# them: a job that only reads tapes (verify, restore, catalog) starts without them, 40-60 ms
# sooner on this machine.

DEFAULT_BUFFER_BYTES = 256 * MiB
ON_CHANGE = ("fail", "skip")
#: How many skipped entries a --strict error names before it says "and N more".
STRICT_NAMED = 5


def created_by() -> str:
    # From the module, not importlib.metadata: importing that took 70 ms of every backup.
    return f"ltoflow {__version__}"


@attrs.frozen
class BackupConfig:
    """What to back up and onto what. Sizes are bytes; `simulator` builds one from TB/GB."""

    source_root: Path = attrs.field(converter=Path)
    tape_nominal_capacity_bytes: int
    max_container_size_bytes: int
    tapes_root: Path | None = attrs.field(default=None, converter=attrs.converters.optional(Path))
    buffer_bytes: int = DEFAULT_BUFFER_BYTES
    verify_after_write: bool = False
    #: Any entry that would be skipped (unreadable, special file, ...) ends the job before
    #: anything is written; files that fail while being read end it too.
    strict: bool = False
    #: A file that changes while it is backed up: "fail" ends the job, "skip" lists it as
    #: skipped (its bytes on tape are marked unusable in the catalog).
    on_change: str = attrs.field(default="fail", validator=attrs.validators.in_(ON_CHANGE))
    #: Where the job journal lives (None: journal.default_state_dir()).
    state_dir: Path | None = attrs.field(default=None,
                                         converter=attrs.converters.optional(Path))
    #: Continue the interrupted backup of this source onto this drive, from its journal.
    resume: bool = False

    @classmethod
    def simulator(
        cls,
        source: str | Path,
        tapes: str | Path,
        *,
        capacity_tb: float | Decimal | str,
        container_size_gb: float | Decimal | str,
        **kwargs: int | bool | str,
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
    from ltoflow.scan import scan_tree

    with gc_paused():  # one record per file, none in a reference cycle
        scan = scan_tree(config.source_root)
    return plan_from_scan(scan, config, codec)


def _measure(codec: CatalogCodec) -> Callable[[Plan], int]:
    # The fast sizer knows how the JSON codec encodes; any other codec is measured by encoding.
    from ltoflow.plan import JsonPlanSizer, catalog_measurer

    if type(codec) is JsonCatalogCodec:
        return JsonPlanSizer(codec, created_by())
    return catalog_measurer(codec, created_by())


def plan_from_scan(scan: ScanResult, config: BackupConfig,
                   codec: CatalogCodec | None = None) -> Plan:
    """The plan of `scan` with `config`'s sizes (deterministic: a resume rebuilds it)."""
    from ltoflow.plan import make_plan

    codec = codec or JsonCatalogCodec()
    return make_plan(
        scan,
        capacity_bytes=config.tape_nominal_capacity_bytes,
        container_size_bytes=config.max_container_size_bytes,
        measure_catalog=_measure(codec),
        extra_reserve_bytes=recovery.kit_size(),
    )


def check_simulator_is_writable(root: Path) -> None:
    """Refuse, before the scan, a simulator directory that could not be made or written to:
    a file is made and removed in it, or in the nearest directory above it that exists (it is
    made only when the first tape is)."""
    try:
        paths.check_writable(root)
    except OSError as e:
        raise UsageError(f"cannot write to the simulator directory {root}: {e.strerror}; "
                         "give --simulator a directory this user can write to") from e


def check_simulator_is_free(root: Path) -> None:
    """Refuse a simulator directory that already holds a backup set.

    A tape directory with no file but its tape.json (a job stopped inside its first
    container, before anything was kept) is a blank tape: it is removed, not refused.
    """
    tapes = []
    for name in list_simulated_tapes(root):
        files = [p for p in (root / name).rglob("*") if p.is_file()]
        if all(p.name == TAPE_JSON for p in files):
            shutil.rmtree(root / name)
        else:
            tapes.append(name)
    if tapes:
        set_id = set_of(tapes[0])
        raise SetExistsError(
            f"simulator directory {root} already holds backup set {set_id} "
            f"({len(tapes)} tape(s)); use an empty directory for a new backup", set_id
        )


def check_nothing_skipped(plan: Plan) -> None:
    """--strict: raise SkippedEntriesError naming what the scan would skip."""
    if not plan.skipped:
        return
    named = ", ".join(f"{s.relative_path!r} ({s.kind}: {s.reason})"
                      for s in plan.skipped[:STRICT_NAMED])
    more = len(plan.skipped) - STRICT_NAMED
    raise SkippedEntriesError(
        f"--strict: {len(plan.skipped)} entr{'y' if len(plan.skipped) == 1 else 'ies'} under "
        f"{plan.source_root} would be skipped: {named}{f' and {more} more' if more > 0 else ''}"
        "; nothing was written; fix them (or see `ltoflow plan`), or run without --strict"
    )


def job_journal(config: BackupConfig, drive: TapeDrive) -> Journal:
    """The journal of backing up `config.source_root` onto `drive` with `config`'s sizes."""
    from ltoflow.journal import Journal, default_state_dir, job_key

    def journal_for(target: str) -> Journal:
        key = job_key(config.source_root, target, config.tape_nominal_capacity_bytes,
                      config.max_container_size_bytes)
        return Journal(config.state_dir or default_state_dir(), key)

    now, *before = _drive_names(drive)
    journal = journal_for(now)
    if before and not journal.exists():
        # An interrupted job of an earlier version, which named its drive as spelled.
        earlier = journal_for(before[0])
        if earlier.exists():
            return earlier
    return journal


def _drive_names(drive: TapeDrive) -> tuple[str, ...]:
    """What names `drive` in a job's key: its description, then the one ltoflow 0.1.0 gave
    (the simulator's and LTFS's, whose paths it took as spelled), if it differs."""
    named_before = getattr(drive, "described_before", None)
    now = drive.describe()
    before = now if named_before is None else named_before()
    return (now,) if before == now else (now, before)


@attrs.frozen
class _Job:
    """A backup about to be written: its plan and journal, and what was done (a resume)."""

    plan: Plan
    journal: Journal
    resume: ResumeState | None
    set_id: str
    created_at: str
    scan: ScanResult


def _prepare(config: BackupConfig, drive: TapeDrive, codec: CatalogCodec,
             clock: Clock) -> _Job:
    """Scan and plan, or read the journal of the job to resume. Writes nothing, so it can be
    abandoned (Ctrl-C during the scan of millions of files)."""
    from ltoflow.plan import SHA256_FILE_BYTES, with_tape_breaks
    from ltoflow.scan import scan_tree

    journal = job_journal(config, drive)
    where = f"{config.source_root} onto the {drive.describe()}"
    if config.resume:
        if not journal.exists():
            other = _started_otherwise(config, drive, journal.state_dir)
            raise UsageError(
                f"there is no interrupted backup of {where} with these sizes to resume (no "
                f"journal {journal.path}); there is {other}" if other else
                f"there is no interrupted backup of {where} to resume (no journal "
                f"{journal.path}); run without --resume to start a new one"
            )
        resume = journal.load(codec)
        planned = plan_from_scan(resume.scan, config, codec)
        if (len(planned.containers), len(planned.tapes)) != (
                resume.planned_containers, resume.planned_tapes):
            raise UsageError(
                f"the interrupted backup {resume.set_id} was planned as "
                f"{resume.planned_containers} containers on {resume.planned_tapes} tapes, "
                f"this version of ltoflow plans it differently; start a new backup"
            )
        plan = with_tape_breaks(planned, resume.breaks)
        if _measure(codec)(plan) + SHA256_FILE_BYTES + recovery.kit_size() > plan.reserve_bytes:
            raise UsageError(  # the reserve has slack for many more tapes: a bug, not a user error
                f"the catalog of set {resume.set_id} no longer fits its reserve after "
                f"{len(resume.breaks)} early-filled tape(s); please report this"
            )
        return _Job(plan, journal, resume, resume.set_id, resume.created_at, resume.scan)
    if journal.exists() and not journal.is_stale():
        if journal.in_use():
            raise UsageError(f"another ltoflow is running this backup of {where} (its journal "
                             f"{journal.path} is locked); let it finish, or stop it first")
        try:
            what = journal.load(codec).describe()
        except BackupError as e:
            what = str(e)
        raise UsageError(
            f"an interrupted backup of {where} exists ({what}); continue it with --resume, "
            f"or delete {journal.path} to start a new one"
        )
    if config.tapes_root is not None and isinstance(drive, SimulatorDrive):
        check_simulator_is_writable(config.tapes_root)
        try:
            check_simulator_is_free(config.tapes_root)
        except SetExistsError as e:
            other = _started_otherwise(config, drive, journal.state_dir, set_id=e.set_id)
            if other is None:
                raise
            raise SetExistsError(
                f"simulator directory {config.tapes_root} holds {other}; for a new backup use "
                "an empty directory", e.set_id) from None
    with gc_paused():  # one record per file, none in a reference cycle
        scan = scan_tree(config.source_root)
    plan = plan_from_scan(scan, config, codec)
    if config.strict:
        check_nothing_skipped(plan)
    return _Job(plan, journal, None, str(uuid.uuid4()), iso_utc(clock.now()), scan)


def _started_otherwise(config: BackupConfig, drive: TapeDrive, state_dir: Path, *,
                       set_id: str | None = None) -> str | None:
    """When this job has no journal: the interrupted backup of this source onto this drive
    (or of set `set_id`) that another journal in `state_dir` records, named with the sizes it
    was started with (job_key sets jobs apart by them), or None."""
    from ltoflow.journal import interrupted_jobs

    source = str(config.source_root.absolute())
    targets = (None, *_drive_names(drive))
    for job in interrupted_jobs(state_dir):
        if set_id is not None:
            ours = job.set_id == set_id
        else:
            ours = job.source_root == source and job.target in targets
        if not ours:
            continue
        if job.capacity_bytes and job.container_bytes:
            sizes = (f"--capacity-tb {_in(job.capacity_bytes, TB)} --container-size-gb "
                     f"{_in(job.container_bytes, GB)}")
        else:
            sizes = "other --capacity-tb or --container-size-gb"
        return (f"the interrupted backup of set {job.set_id} from {job.source_root}, started "
                f"with {sizes} (journal {job.path}); to go on with it, run the command it was "
                "started with, adding --resume")
    return None


def _in(nbytes: int, unit: int) -> str:
    """`nbytes` in `unit`s, as a flag takes it: exact, no exponent."""
    return format((Decimal(nbytes) / unit).normalize(), "f")


def _claim(job: _Job, config: BackupConfig, drive: TapeDrive) -> None:
    """Open the journal for this run: take over the interrupted job's, or start one."""
    if job.resume is not None:
        job.journal.reopen()
        return
    if job.journal.exists():  # stale (see _prepare): nobody is writing it
        job.journal.finish()
    job.journal.begin(set_id=job.set_id, created_at=job.created_at, scan=job.scan,
                      containers=len(job.plan.containers), tapes=len(job.plan.tapes),
                      target=drive.describe(),
                      capacity_bytes=config.tape_nominal_capacity_bytes,
                      container_bytes=config.max_container_size_bytes)


async def backup_async(config: BackupConfig, components: Components) -> BackupResult:
    """Scan, plan and write the set, journaling progress; or, with `config.resume`, go on
    with the interrupted one."""
    if config.strict and config.on_change == "skip":
        raise UsageError("--strict allows no skipped entries and --on-change=skip asks to skip "
                         "changed files; give one of them")
    job = await trio.to_thread.run_sync(
        _prepare, config, components.drive, components.codec, components.clock,
        abandon_on_cancel=True,  # a scan of millions of files must not hold up Ctrl-C
    )
    await trio.to_thread.run_sync(_claim, job, config, components.drive)
    plan, journal, resume, set_id, created_at = (job.plan, job.journal, job.resume, job.set_id,
                                                 job.created_at)
    try:
        return await _write_set(plan, config, components, journal, resume, set_id, created_at)
    except BaseException:
        if not journal.has_progress:  # nothing reached a tape: nothing to resume
            journal.finish()
        raise
    finally:
        journal.close()


async def _write_set(plan: Plan, config: BackupConfig, components: Components,
                     journal: Journal, resume: ResumeState | None, set_id: str,
                     created_at: str) -> BackupResult:
    from ltoflow.engine import EngineSettings, run_backup
    from ltoflow.hashing import FaultPolicy

    settings = EngineSettings(
        buffer_bytes=config.buffer_bytes,
        verify_after_write=config.verify_after_write,
        created_by=created_by(),
        extra_files=recovery.kit_files(),
        faults=FaultPolicy(strict=config.strict, skip_changed=config.on_change == "skip"),
    )
    with gc_frozen():  # the scan's and the plan's records, alive for the whole job
        return await run_backup(
            plan,
            drive=components.drive,
            operator=components.operator,
            clock=components.clock,
            codec=components.codec,
            reporter=components.reporter,
            settings=settings,
            set_id=set_id,
            created_at=created_at,
            journal=journal,
            resume=resume,
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
        catalog = _said(await find_catalog(components.drive, components.codec, holder,
                                           newest=True),
                        components.reporter)
    except BaseException:
        await holder.release_after_error()
        raise
    await holder.release()
    return catalog


def _said(found: FoundCatalog, reporter: Reporter) -> Catalog:
    """The catalog found, after a warning for each copy passed over on the way (damaged, or
    on a tape that would not load): verify reports them as problems, a reader warns."""
    for p in found.problems:
        reporter.event(Note(f"warning: {p.describe()}; the catalog was read from "
                            f"{found.found_on} instead"))
    return found.catalog


async def check_catalog_fits_drive(catalog: Catalog, drive: TapeDrive) -> None:
    """Refuse a catalog given from elsewhere whose tapes a drive that lists its tapes (the
    simulator) holds none of: another set's catalog would fail every file, one by one."""
    inventory = await drive.inventory()
    if inventory is not None and not any(t.tape_id in inventory for t in catalog.tapes):
        holds = (f"it holds {', '.join(inventory[:2])}{', ...' if len(inventory) > 2 else ''}"
                 if inventory else "it holds no tape at all")
        raise UsageError(
            f"the catalog given is of backup set {catalog.backup_set_id}, but "
            f"{drive.describe()} holds none of its tapes ({holds}); give that set's catalog, "
            "or its tapes")


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
    opened = OpenedUp(target)  # a normal user's directories that an earlier restore locked
    try:
        if catalog is None:
            catalog = _said(await find_catalog(components.drive, components.codec, holder,
                                               newest=True),
                            components.reporter)
        else:
            await check_catalog_fits_drive(catalog, components.drive)
        chosen = catalog

        meter = ReadMeter("comparing the files already in the target", 0)
        started = components.clock.monotonic()

        def make_plan() -> RestorePlan:
            with gc_paused():  # a job and a range a file, none in a reference cycle
                return plan_restore(chosen, patterns, target, overwrite=overwrite, meter=meter,
                                    opened=opened)

        # It reads the files already in the target: a Ctrl-C does not wait for that.
        with reporting(meter, components.reporter):
            plan = await trio.to_thread.run_sync(make_plan, abandon_on_cancel=True)
        if before is not None and not before(plan):
            await holder.release()
            report = RestoreReport.from_plan(plan)
            return attrs.evolve(report, problems=(*report.problems, *opened.put_back()))
        with gc_frozen():  # the catalog's and the plan's records, alive for the whole job
            return await run_restore(
                plan, target, drive=components.drive, operator=components.operator,
                clock=components.clock, reporter=components.reporter, overwrite=overwrite,
                holder=holder, started=started, opened=opened,
            )
    finally:
        for problem in opened.put_back():  # after an error before the restore
            components.reporter.event(Note(f"warning: {problem.describe()}"))
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
