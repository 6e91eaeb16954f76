"""The `ltoflow` command: parse arguments, build the components (the composition root), run.

Only this module turns errors into messages and exit codes (see EXIT_CODES); everything below it
raises BackupError subclasses.
"""

from __future__ import annotations

import argparse
import errno
import gc
import os
import signal
import stat
import sys
import traceback
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import attrs
import orjson
import trio

from ltoflow import api, paths
from ltoflow.catalog import Catalog, JsonCatalogCodec, SkippedEntry, iso_from_ns, split_files
from ltoflow.drives import TapeDrive
from ltoflow.drives.ltfs import LtfsDrive
from ltoflow.drives.model import DEFAULT_BUFFER_BYTES as DEFAULT_DRIVE_BUFFER
from ltoflow.drives.model import PROFILES
from ltoflow.drives.simulator import (
    SimulatorDrive,
    SimulatorFailureConfig,
    TapeDriveStats,
    Throttle,
    list_simulated_tapes,
)
from ltoflow.errors import (
    BackupError,
    Interrupted,
    SourceFileChangedError,
    UsageError,
    leaves,
)
from ltoflow.operator import (
    CommandOperator,
    ConsolePromptOperator,
    NoPromptOperator,
    Operator,
    UnattendedOperator,
)
from ltoflow.paths import shown
from ltoflow.progress import LiveReporter, LogReporter, Reporter
from ltoflow.restore import (
    TEMP_PREFIX,
    RestorePlan,
    RestoreReport,
    check_target_is_writable,
    select,
)
from ltoflow.units import GB, TB, MiB, human_bytes, parse_decimal_bytes
from ltoflow.verify import VerifyReport, load_catalog_file

if TYPE_CHECKING:  # backup's modules: imported where used, so reading jobs start sooner
    from ltoflow.engine import BackupResult
    from ltoflow.journal import Journal
    from ltoflow.plan import Plan

EXIT_OK = 0
EXIT_DAMAGED = 1
EXIT_USAGE = 2
EXIT_FAILED = 3
EXIT_WARNINGS = 4
EXIT_INTERNAL = 70
EXIT_INTERRUPTED = 130
#: Skipped entries the backup summary names; `ltoflow catalog show` lists them all.
SUMMARY_SKIPPED = 10
EXIT_CODES = {
    EXIT_OK: "success",
    EXIT_DAMAGED: "verification found damaged or missing data",
    EXIT_USAGE: "usage error: bad flags, missing source, impossible plan, occupied directory",
    EXIT_FAILED: "the job failed (drive, tape, catalog, a source file changed, or --strict "
                 "found entries to skip)",
    EXIT_WARNINGS: "completed, but some entries were skipped (listed in the catalog); a "
                   "restore: some selected entries were skipped by the backup",
    EXIT_INTERNAL: "internal error (a bug: please report it with the --verbose output)",
    EXIT_INTERRUPTED: "interrupted (Ctrl-C or SIGTERM); a backup can go on with --resume",
}


class _BadArguments(SystemExit):
    """The command line could not be parsed (exit 2); `line` says why."""

    def __init__(self, line: str) -> None:
        super().__init__(EXIT_USAGE)
        self.line = line


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        line = f"{message} (see {self.prog} --help)"
        print(f"{self.prog}: error: {line}", file=sys.stderr)
        raise _BadArguments(line)


def _size(unit: int, flag: str) -> Any:
    def parse(text: str) -> int:
        try:
            return parse_decimal_bytes(text, unit, flag=flag)
        except UsageError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    parse.__name__ = flag  # argparse names the type in its messages
    return parse


_FAULT_FLAGS = ("fail_on_write", "fail_on_read", "fail_on_load", "fail_on_unload")
_FAULT_BYTES = ("fail_after_bytes_written", "fail_write_after_bytes",
                "crash_after_bytes_written", "interrupt_after_bytes_written")


def _fault(text: str) -> tuple[str, str]:
    name, _, value = text.partition("=")
    known = (*_FAULT_FLAGS, *_FAULT_BYTES, "failed_tape_ids", "error_message")
    if name not in known:
        raise argparse.ArgumentTypeError(f"unknown fault {name!r}; known: {', '.join(known)}")
    if name in _FAULT_BYTES and not value.isdigit():
        raise argparse.ArgumentTypeError(f"{name} needs =N (bytes)")
    return name, value


def _failures(items: Sequence[tuple[str, str]] | None) -> SimulatorFailureConfig | None:
    if not items:
        return None
    kwargs: dict[str, Any] = {}
    for name, value in items:
        if name in _FAULT_FLAGS:
            kwargs[name] = True
        elif name in _FAULT_BYTES:
            kwargs[name] = int(value)
        elif name == "failed_tape_ids":
            kwargs[name] = frozenset(v for v in value.split(",") if v)
        else:
            kwargs[name] = value
    return SimulatorFailureConfig(**kwargs)


def _add_drive(p: argparse.ArgumentParser, *, write: bool) -> None:
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--simulator", metavar="DIR", type=Path,
                   help="simulated tapes: one directory per tape under DIR")
    g.add_argument("--device", metavar="DEV", help="tape device for LTFS, e.g. /dev/nst0")
    p.add_argument("--mount-point", metavar="DIR", type=Path,
                   help="LTFS mount point (with --device)")
    p.add_argument("--ltfs-option", metavar="KEY[=VALUE]", action="append", default=[],
                   help="passed to ltfs as -o KEY[=VALUE], repeatable "
                        "(e.g. tape_backend=file, sync_type=close)")
    p.add_argument("--no-eject", action="store_true",
                   help="do not run `mt offline` after unmounting (file-backed tapes, "
                        "libraries that unload with their robot)")
    p.add_argument("--tape-change-command", metavar="CMD",
                   help="run CMD (through the shell) whenever a tape is needed; it gets "
                        "LTOFLOW_TAPE_ID, LTOFLOW_TAPE_SEQ, LTOFLOW_SET_ID, LTOFLOW_PURPOSE "
                        "(write or read), LTOFLOW_VOLUME_SERIAL (when known) and, when asked "
                        "again, LTOFLOW_PROBLEM")
    p.add_argument("--yes", action="store_true",
                   help="never wait at a prompt: use --tape-change-command or fail clearly")
    p.add_argument("--sim-fault", metavar="NAME[=VALUE]", type=_fault, action="append",
                   help="simulator fault injection, repeatable: " + ", ".join(
                       (*_FAULT_FLAGS, *(f"{n}=N" for n in _FAULT_BYTES), "failed_tape_ids=ID,...",
                        "error_message=TEXT")) + (" (testing)" if write else ""))


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="ltoflow", description="Back up a records archive to LTO tape.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    b = sub.add_parser("backup", help="back up a source tree to tapes")
    b.add_argument("--source", metavar="DIR", type=Path, required=True,
                   help="directory tree to back up")
    _add_drive(b, write=True)
    b.add_argument("--capacity-tb", metavar="TB", type=_size(TB, "--capacity-tb"),
                   help="nominal tape capacity in TB (decimal: 18 for LTO-9, 0.000004 is 4 MB);"
                        " defaults to the --drive generation's native capacity")
    b.add_argument("--container-size-gb", metavar="GB", required=True,
                   type=_size(GB, "--container-size-gb"), help="maximum container size in GB")
    b.add_argument("--buffer-mb", metavar="MB", type=_size(MiB, "--buffer-mb"),
                   default=api.DEFAULT_BUFFER_BYTES,
                   help="memory for data in flight, in MiB (default 256)")
    b.add_argument("--drive", choices=sorted(PROFILES, key=lambda n: int(n[3:])),
                   help="LTO generation: sets the capacity default and the throttle's speeds")
    b.add_argument("--throttle", action="store_true",
                   help="simulator only: accept data no faster than the --drive generation, "
                        "with its buffer, speed matching and back-hitches")
    b.add_argument("--drive-buffer-mb", metavar="MB", type=_size(MiB, "--drive-buffer-mb"),
                   default=DEFAULT_DRIVE_BUFFER, help="the throttled drive's buffer (default 1024)")
    b.add_argument("--reposition-seconds", metavar="S", type=float, default=2.0,
                   help="what one back-hitch costs the throttled drive (default 2)")
    b.add_argument("--discard", action="store_true",
                   help="with --throttle: model the drive without keeping the data (measures "
                        "the feed, not this disk; the set cannot be verified or restored)")
    b.add_argument("--drive-timeline", metavar="FILE", type=Path,
                   help="with --throttle: write the drive's rate and buffer fill over time as JSON")
    b.add_argument("--verify", action="store_true",
                   help="read each tape back and check it before it is unloaded")
    b.add_argument("--strict", action="store_true",
                   help="fail (before writing anything) when any entry would be skipped: "
                        "unreadable files, special files; a file that cannot be read later "
                        "fails the job too")
    b.add_argument("--on-change", choices=api.ON_CHANGE, default="fail",
                   help="a source file that changes while it is backed up: fail the job "
                        "(default) or skip it (listed as skipped; its bytes on tape are "
                        "marked unusable in the catalog)")
    b.add_argument("--resume", action="store_true",
                   help="continue the interrupted backup of this source onto this drive "
                        "(same flags), from its journal")
    b.add_argument("--state-dir", metavar="DIR", type=Path,
                   help="where the job journal lives (default $LTOFLOW_STATE_DIR, else "
                        "$XDG_STATE_HOME/ltoflow, else ~/.local/state/ltoflow)")
    b.add_argument("--json", action="store_true", help="print the summary as JSON on stdout")
    say = b.add_mutually_exclusive_group()
    say.add_argument("--verbose", action="store_true",
                     help="container lines above the live view, tracebacks with errors")
    say.add_argument("--quiet", action="store_true", help="only errors, warnings and the summary")

    v = sub.add_parser("verify", help="check every tape of a set against its catalog")
    _add_drive(v, write=False)
    v.add_argument("--json", action="store_true", help="print the report as JSON on stdout")
    v.add_argument("--verbose", action="store_true", help="more detail")

    r = sub.add_parser("restore", help="restore files (all, or those matching PATTERNs)")
    _add_drive(r, write=False)
    r.add_argument("--target", metavar="DIR", type=Path, required=True,
                   help="directory to restore into (created if missing)")
    r.add_argument("patterns", metavar="PATH_OR_GLOB", nargs="*",
                   help="relative paths, directories or glob patterns (default: everything)")
    r.add_argument("--only", metavar="PATH_OR_GLOB", action="append", default=[],
                   dest="only", help="the same as a PATH_OR_GLOB, repeatable (as the recovery "
                   "kit on every tape takes them)")
    r.add_argument("--catalog", metavar="FILE", type=Path,
                   help="use this catalog.json instead of the one on the tapes")
    r.add_argument("--dry-run", action="store_true",
                   help="only list the tapes needed, in order, and the bytes to read")
    r.add_argument("--overwrite", action="store_true", help="replace files already in the target")
    r.add_argument("--json", action="store_true", help="print the report as JSON on stdout")
    r.add_argument("--verbose", action="store_true", help="more detail")

    c = sub.add_parser("catalog", help="list or summarise a set's catalog")
    src = c.add_mutually_exclusive_group(required=True)
    src.add_argument("--simulator", metavar="DIR", type=Path, help="read it from these tapes")
    src.add_argument("--catalog", metavar="FILE", type=Path, help="read this catalog.json")
    csub = c.add_subparsers(dest="catalog_command", required=True, parser_class=_Parser)
    ls = csub.add_parser("ls", help="files: path, size, mtime and the tapes that hold them")
    ls.add_argument("pattern", metavar="PATTERN", nargs="?",
                    help="a relative path, directory or glob")
    ls.add_argument("--json", action="store_true")
    show = csub.add_parser("show", help="the set: tapes, containers, files, bytes, split files")
    show.add_argument("--json", action="store_true")

    pl = sub.add_parser("plan", help="show the plan for a source tree without writing anything")
    pl.add_argument("--source", metavar="DIR", type=Path, required=True,
                    help="directory tree to plan (scanned, never read)")
    pl.add_argument("--capacity-tb", metavar="TB", type=_size(TB, "--capacity-tb"),
                    required=True, help="nominal tape capacity in TB, as for backup")
    pl.add_argument("--container-size-gb", metavar="GB", required=True,
                    type=_size(GB, "--container-size-gb"), help="maximum container size in GB")
    pl.add_argument("--json", action="store_true", help="print the plan as JSON")
    return parser


def _operator(args: argparse.Namespace, reporter: Reporter | None = None) -> Operator:
    if args.simulator is not None:
        if args.tape_change_command:
            raise UsageError("--tape-change-command is for a real drive (--device): the "
                             "simulator has every tape of its directory at hand")
        return NoPromptOperator()
    if args.tape_change_command:
        return CommandOperator(args.tape_change_command, reporter)
    if args.yes or sys.stdin is None or not sys.stdin.isatty():  # None: stdin closed
        return UnattendedOperator()
    return ConsolePromptOperator()


def _drive(args: argparse.Namespace, *, capacity: int | None = None,
           must_exist: bool = False, throttle: Throttle | None = None) -> TapeDrive:
    """The composition root's drive: the simulator, or a real drive through LTFS."""
    if args.device is not None:
        if args.mount_point is None:
            raise UsageError("--device needs --mount-point DIR (where LTFS mounts the tape)")
        if args.sim_fault:
            raise UsageError("--sim-fault only goes with --simulator")
        return LtfsDrive(args.device, args.mount_point, options=args.ltfs_option,
                         eject=not args.no_eject)
    if args.mount_point is not None or args.ltfs_option:
        raise UsageError("--mount-point and --ltfs-option only go with --device")
    root: Path = args.simulator
    if root.exists() and not root.is_dir():
        raise UsageError(f"--simulator {root} is not a directory")
    if must_exist and not root.is_dir():
        raise UsageError(f"simulator directory {root} does not exist")
    return SimulatorDrive(root, capacity, _failures(args.sim_fault), throttle=throttle)


def _reporter(args: argparse.Namespace, *, quiet: bool = False) -> Reporter:
    if quiet:
        return LogReporter(quiet=True)
    if sys.stderr.isatty():
        return LiveReporter(verbose=args.verbose)
    return LogReporter(verbose=args.verbose)


def _where(args: argparse.Namespace) -> str:
    if args.simulator is not None:
        return f"tapes are in {args.simulator}"
    return f"drive {args.device}, mounted at {args.mount_point}"


def _print_json(doc: object) -> None:
    # Two writes, not `dumps(...) + b"\n"`: a million-file plan's JSON is ~300 MB, and the
    # concatenation would hold it twice.
    sys.stdout.buffer.write(orjson.dumps(doc, option=orjson.OPT_INDENT_2))
    sys.stdout.buffer.write(b"\n")
    sys.stdout.flush()


def _throttle(args: argparse.Namespace) -> Throttle | None:
    if not (args.throttle or args.discard or args.drive_timeline):
        return None
    if not args.throttle:
        raise UsageError("--discard and --drive-timeline only go with --throttle")
    if args.simulator is None:
        raise UsageError("--throttle is for the simulator; a real drive sets its own pace")
    if args.drive is None:
        raise UsageError("--throttle needs --drive lto5..lto10 to know the drive's speeds")
    if not 0 <= args.reposition_seconds < 3600:  # also refuses nan
        raise UsageError("--reposition-seconds must be between 0 and 3600")
    if args.drive_timeline is not None:
        _check_can_write(args.drive_timeline, "--drive-timeline")
    return Throttle(PROFILES[args.drive], args.drive_buffer_mb, args.reposition_seconds,
                    discard=args.discard)


def _check_can_write(path: Path, flag: str) -> None:
    """Refuse, before the job, a file the job could only fail to write at its end: one that
    does not exist yet is tried by making and removing a file beside it."""
    if path.is_dir():
        raise UsageError(f"{flag} {path} is a directory; give a file name")
    if path.exists():  # a file to overwrite, or a device (/dev/stdout): it is all it needs
        if not os.access(path, os.W_OK):
            raise UsageError(f"{flag} {path} cannot be written by this user; give another "
                             "path")
        return
    try:
        if not path.parent.is_dir():
            raise FileNotFoundError(errno.ENOENT, f"directory {path.parent} does not exist"
                                    if not path.parent.exists()
                                    else f"{path.parent} is not a directory")
        paths.check_writable(path.parent)
    except OSError as e:
        raise UsageError(f"{flag} {path} cannot be written ({e.strerror}); give another "
                         "path") from e


def cmd_backup(args: argparse.Namespace) -> int:
    capacity = args.capacity_tb
    if capacity is None:
        if args.drive is None:
            raise UsageError("give --capacity-tb TB, or --drive lto5..lto10 for its capacity")
        capacity = PROFILES[args.drive].native_capacity_bytes
    throttle = _throttle(args)
    config = api.BackupConfig(
        source_root=args.source,
        tapes_root=args.simulator,
        tape_nominal_capacity_bytes=capacity,
        max_container_size_bytes=args.container_size_gb,
        buffer_bytes=args.buffer_mb,
        verify_after_write=args.verify,
        strict=args.strict,
        on_change=args.on_change,
        state_dir=args.state_dir,
        resume=args.resume,
    )
    reporter = _reporter(args, quiet=args.quiet or args.json)
    drive = _drive(args, capacity=config.tape_nominal_capacity_bytes, throttle=throttle)
    components = api.Components(drive=drive, operator=_operator(args, reporter),
                                reporter=reporter)
    journal = api.job_journal(config, drive)
    try:
        result = trio.run(run_interruptible, lambda: api.backup_async(config, components))
    except* Interrupted as group:
        if isinstance(reporter, LiveReporter):
            reporter.close()
        raise Interrupted(f"{group.exceptions[0]}; "
                          f"{_resume_hint(journal, interrupted=True)}") from None
    except* UsageError:
        raise
    except* BackupError as group:
        errors = leaves(group)
        changed = [e for e in errors if isinstance(e, SourceFileChangedError)]
        if journal.exists():
            hint = _resume_hint(journal, changed[0].relative_path if changed else None,
                                strict=config.strict)
            for e in errors:
                e.add_note(hint)
        elif changed:
            changed[0].add_note("nothing was written to tape that a resume could use; run "
                                "the backup again once the file is left alone")
        raise
    finally:
        if isinstance(reporter, LiveReporter):
            reporter.close()
    drive_stats = drive.drive_stats if isinstance(drive, SimulatorDrive) else []
    if args.drive_timeline is not None:
        try:
            write_timeline(args.drive_timeline, drive_stats)
        except OSError as e:  # the backup itself succeeded: say so, and keep its exit status
            print(f"ltoflow backup: warning: cannot write --drive-timeline "
                  f"{args.drive_timeline}: {e.strerror}", file=sys.stderr)
    if args.json:
        _print_json(backup_summary(result, _where(args), drive_stats))
    else:
        print_backup_summary(result, _where(args), drive_stats)
    if result.verify_problems:
        return EXIT_DAMAGED
    return EXIT_WARNINGS if result.catalog.skipped else EXIT_OK


def _drive_doc(s: TapeDriveStats) -> dict[str, Any]:
    st = s.statistics
    return {
        "tape_id": s.tape_id, "drive": st.drive, "bytes_written": st.bytes_written,
        "seconds_streaming": round(st.seconds_streaming, 3),
        "seconds_stopped": round(st.seconds_stopped, 3),
        "seconds_repositioning": round(st.seconds_repositioning, 3),
        "back_hitches": st.back_hitches,
        "mean_rate_mb_per_s": round(st.mean_streaming_rate / 1e6, 1),
        "peak_buffer_bytes": st.peak_buffer_bytes,
    }


def write_timeline(path: Path, stats: Sequence[TapeDriveStats]) -> None:
    """The throttled drive's samples, tape by tape, for charts."""
    doc = [{"tape_id": s.tape_id, "samples": [
        {"time": round(x.time, 4), "tape_rate": x.tape_rate, "buffer_fill": x.buffer_fill,
         "mode": str(x.mode)} for x in s.timeline]} for s in stats]
    path.write_bytes(orjson.dumps(doc))


def backup_summary(result: BackupResult, where: str,
                   drive_stats: Sequence[TapeDriveStats] = ()) -> dict[str, Any]:
    c = result.catalog
    split, across = result.split_files
    return {
        "drive_model": [_drive_doc(s) for s in drive_stats],
        "backup_set_id": c.backup_set_id,
        "created_at": c.created_at,
        "where": where,
        "tapes": [
            {"tape_id": t.tape_id, "label": t.label, "volume_serial": t.volume_serial,
             "sequence_number": t.sequence_number,
             "containers": t.containers, "data_bytes": t.data_bytes,
             "catalog_bytes": t.catalog_bytes, "seconds": round(t.seconds, 3),
             "stalls": t.stalls, "stall_seconds": round(t.stall_seconds, 3),
             "earlier_containers": t.earlier_containers, "finished_before": t.finished_before}
            for t in result.tapes
        ],
        "containers": len(c.containers),
        "files": len(c.source_files),
        "directories": len(c.directories),
        "symlinks": len(c.symlinks),
        "bytes": result.source_bytes,
        "seconds": round(result.seconds, 3),
        "mb_per_s": round(result.source_bytes / result.seconds / 1e6, 1) if result.seconds else 0,
        "source_bytes_read": result.source_bytes_read,
        "split_files": split,
        "files_split_across_tapes": across,
        "skipped": [_skipped_doc(s) for s in c.skipped],
        "verified": result.verified,
        "verify_problems": list(result.verify_problems),
        "catalog_sha256": result.catalog_sha256,
    }


def print_backup_summary(result: BackupResult, where: str,
                         drive_stats: Sequence[TapeDriveStats] = ()) -> None:
    c = result.catalog
    written = sum(t.data_bytes for t in result.tapes)  # by this run (a resume did less)
    rate = written / result.seconds / 1e6 if result.seconds else 0.0
    split, across = result.split_files
    if result.verify_problems:  # not "complete": the tapes do not hold what was written
        print(f"Backup written, but the check after writing found "
              f"{len(result.verify_problems)} problem(s). {len(c.tapes)} tape(s), "
              f"{len(c.source_files)} file(s).")
    else:
        print(f"Backup complete. {len(c.tapes)} tape(s), {len(c.source_files)} file(s).")
    print(f"  set {c.backup_set_id}: {human_bytes(result.source_bytes)} in "
          f"{len(c.containers)} containers, {split} file(s) split ({across} across tapes), "
          f"{result.seconds:.1f} s ({rate:.0f} MB/s); {len(c.directories)} director"
          f"{'y' if len(c.directories) == 1 else 'ies'}, {len(c.symlinks)} symlink(s)")
    for t in result.tapes:
        volume = f"volume {t.volume_serial}  " if t.volume_serial else ""
        if t.finished_before:
            print(f"  tape {t.sequence_number}  {t.tape_id}  {volume}{t.earlier_containers} "
                  "containers, written before the interruption (not loaded again)")
            continue
        earlier = f" (+{t.earlier_containers} already on it)" if t.earlier_containers else ""
        print(f"  tape {t.sequence_number}  {t.tape_id}  {volume}{t.containers} containers"
              f"{earlier}  "
              f"{human_bytes(t.data_bytes)}  catalog {human_bytes(t.catalog_bytes)}  "
              f"{t.seconds:.1f} s  writer waited {t.stalls}x ({t.stall_seconds:.2f} s)")
    for d in drive_stats:
        st = d.statistics
        print(f"  drive {st.drive} on tape {d.tape_id[-3:]}: {st.mean_streaming_rate / 1e6:.0f} "
              f"MB/s while streaming ({st.seconds_streaming:.1f} s), {st.back_hitches} "
              f"back-hitch(es), stopped {st.seconds_stopped:.1f} s")
    if result.verified:
        state = "clean" if not result.verify_problems else f"{len(result.verify_problems)} PROBLEMS"
        print(f"  verified after writing: {state}")
        for p in result.verify_problems:
            print(f"  BAD {p}")
        if result.verify_problems:
            print("  Check those tapes again with `ltoflow verify` (a read error may be the "
                  "drive's: clean it first). Where their data is wrong (a SHA-256 mismatch, a "
                  "missing container), the files it names cannot come back whole from this set: "
                  "back up again onto blank tapes (a new set; for the simulator, an empty "
                  "directory) and set those tapes aside. A recovery kit problem is mended as its "
                  "line says.")
    if c.skipped:
        print(f"  {len(c.skipped)} entr{'y' if len(c.skipped) == 1 else 'ies'} skipped "
              "(listed in the catalog; see `ltoflow catalog show`):")
        for s in c.skipped[:SUMMARY_SKIPPED]:
            print(f"  skipped {shown(s.relative_path)} ({s.kind}): {s.reason}")
        if len(c.skipped) > SUMMARY_SKIPPED:
            print(f"  ... and {len(c.skipped) - SUMMARY_SKIPPED} more")
    print(f"  {where}")


def _skipped_doc(s: SkippedEntry) -> dict[str, Any]:
    doc: dict[str, Any] = {"relative_path": s.relative_path, "kind": s.kind, "reason": s.reason}
    if s.file_id is not None:
        doc["file_id"] = s.file_id
    return doc


def cmd_verify(args: argparse.Namespace) -> int:
    reporter = LogReporter(verbose=args.verbose, quiet=args.json)
    components = api.Components(drive=_drive(args, must_exist=True),
                                operator=_operator(args, reporter), reporter=reporter)
    report = trio.run(run_interruptible, lambda: api.verify_async(components),
                      _abort_now("the tape in the drive was not unloaded"))
    if args.json:
        _print_json(verify_summary(report))
    else:
        print_verify_report(report)
    return EXIT_OK if report.ok else EXIT_DAMAGED


def _catalog_from(args: argparse.Namespace, components: api.Components) -> Catalog:
    if args.catalog is not None:
        catalog, _ = load_catalog_file(args.catalog, components.codec)
        return catalog
    return trio.run(api.find_set_catalog, components)


def cmd_restore(args: argparse.Namespace) -> int:
    reporter = LogReporter(verbose=args.verbose, quiet=args.json)
    components = api.Components(drive=_drive(args, must_exist=True),
                                operator=_operator(args, reporter), reporter=reporter)
    target: Path = args.target
    if target.exists() and not target.is_dir():
        raise UsageError(f"--target {target} exists and is not a directory")
    if not args.dry_run:  # before the catalog is looked for, on tape
        check_target_is_writable(target)
    given = None
    if args.catalog is not None:
        given, _ = load_catalog_file(args.catalog, components.codec)
    out = sys.stderr if args.json else sys.stdout

    def announce(plan: RestorePlan) -> bool:
        """Say which tapes are needed, in order, before anything is read."""
        tapes = ", ".join(f"{t.tape_id} (tape {t.sequence_number}"
                          f"{', volume ' + t.volume_serial if t.volume_serial else ''})"
                          for t in plan.tapes)
        more = [f"{plan.present} more already there, identical"] if plan.present else []
        failing = plan.files - len(plan.jobs) - plan.present  # refused before any read
        if failing > 0:
            more.append(f"{failing} more that cannot be restored, named "
                        f"{'below' if args.dry_run else 'at the end'}")
        present = f" ({'; '.join(more)})" if more else ""
        needs = (f"needs {len(plan.tapes)} tape(s), in this order: {tapes}; "
                 f"{human_bytes(plan.bytes_to_read)} to read" if plan.tapes
                 else "needs no tape")
        print(f"Restore of {len(plan.jobs)} file(s){present} {needs}.", file=out, flush=True)
        if args.simulator is not None:  # every tape is at hand: say now which are not
            there = set(list_simulated_tapes(args.simulator))
            absent = [t.tape_id for t in plan.tapes if t.tape_id not in there]
            if absent:
                print(f"Not in {args.simulator}: {', '.join(absent)}; the files on "
                      f"{'it' if len(absent) == 1 else 'them'} will fail unless "
                      f"{'it is' if len(absent) == 1 else 'they are'} put there.",
                      file=out, flush=True)
        return not args.dry_run

    try:
        report = trio.run(run_interruptible, lambda: api.restore_async(
            components, target, [*args.patterns, *args.only], catalog=given,
            overwrite=args.overwrite,
            before=announce), _abort_now(f"temporary {TEMP_PREFIX}* files may be left in the "
                                         "target (a later restore there removes those it meets), "
                                         "directories it opened up keep owner rwx, and "
                                         "the tape in the drive was not unloaded"))
    except* Interrupted as group:
        raise Interrupted(
            f"{group.exceptions[0]}; the files restored so far are whole: run the same restore "
            "again to go on (it leaves them be and reads only what is missing)") from None
    code = _restore_exit(report)
    if args.json:
        _print_json({
            "dry_run": report.dry_run, "requested": report.requested,
            "restored": report.restored, "bytes_restored": report.bytes_restored,
            "symlinks_restored": report.symlinks_restored,
            "directories_restored": report.directories_restored,
            "bytes_to_read": report.bytes_to_read, "seconds": round(report.seconds, 3),
            "tapes": list(report.tapes), "tapes_read": list(report.tapes_read),
            "ok": report.ok,
            "already_present": report.already_present, "retouched": report.retouched,
            "leftovers_removed": report.leftovers_removed,
            "problems": [attrs.asdict(p) for p in report.problems],
            "skipped": [_skipped_doc(s) for s in report.skipped],
            "exit_code": code,
        })
        return code
    for s in report.skipped:
        # A directory that could not be listed is itself restored (empty), not its contents.
        what = "its contents are not" if s.kind == "directory" else "not"
        print(f"SKIPPED {shown(s.relative_path)} ({s.kind}): {what} in the backup, {s.reason}")
    if report.dry_run:
        for p in report.problems:
            print(f"WILL FAIL {p.describe()}")
        if report.leftovers_removed:
            print(f"Will remove {report.leftovers_removed} temporary file(s) ({TEMP_PREFIX}*) "
                  "that an earlier restore, killed outright, left in the target.")
    else:
        for p in report.problems:
            print(f"FAILED {p.describe()}")
        rate = report.bytes_restored / report.seconds / 1e6 if report.seconds else 0.0
        present = ""
        if report.already_present:
            how = (f"; {report.retouched} of them given the backup's mode and time"
                   if report.retouched else ", left as they were")
            present = f", {report.already_present} already there (identical{how})"
        read, needed = len(report.tapes_read), len(report.tapes)
        tapes = (f"{read} tape(s)" if read == needed
                 else f"{read} of the {needed} tape(s) it needs")
        print(f"Restored {report.restored} of {report.requested} file(s) "
              f"({human_bytes(report.bytes_restored)}){present}, "
              f"{report.symlinks_restored} symlink(s) "
              f"and {report.directories_restored} directories into {target} from {tapes} "
              f"in {report.seconds:.1f} s ({rate:.0f} MB/s); "
              f"{_failed(report)}{_skipped_said(report)}.")
    return code


def _restore_exit(report: RestoreReport) -> int:
    """1 when anything failed; else 4 when the selection holds entries the backup skipped (not
    on tape: a selection of those alone must not look like a success), else 0."""
    if not report.ok:
        return EXIT_DAMAGED
    return EXIT_WARNINGS if report.skipped else EXIT_OK


def _skipped_said(report: RestoreReport) -> str:
    n = len(report.skipped)
    return (f"; {n} selected entr{'y' if n == 1 else 'ies'} skipped by the backup, not in it"
            " (listed above)" if n else "")


def _failed(report: RestoreReport) -> str:
    """How many files failed, and how many problems besides (symlinks, directories)."""
    files = report.requested - report.restored - report.already_present
    others = len(report.problems) - files
    return f"{files} file(s) failed" + (
        f", {others} other problem(s) (symlinks, directories)" if others > 0 else "")


def cmd_catalog(args: argparse.Namespace) -> int:
    if args.simulator is not None:
        if not args.simulator.is_dir():
            raise UsageError(f"simulator directory {args.simulator} does not exist")
        components = api.Components(drive=SimulatorDrive(args.simulator),
                                    reporter=LogReporter())  # a damaged copy is warned of
    else:
        components = api.Components(drive=SimulatorDrive(Path("/nonexistent")))
    catalog = _catalog_from(args, components)
    if args.catalog_command == "ls":
        return catalog_ls(catalog, args.pattern, as_json=args.json)
    there = (set(list_simulated_tapes(args.simulator)) if args.simulator is not None
             else None)
    return catalog_show(catalog, as_json=args.json, there=there)


def catalog_ls(catalog: Catalog, pattern: str | None, *, as_json: bool) -> int:
    """Files with size, time and tapes; then symlinks (`name -> target`) and directories
    (`name/`), which hold no data."""
    chosen = select(catalog, [pattern] if pattern else [])
    if chosen.unmatched:
        raise UsageError(f"nothing in the catalog matches {pattern!r}")
    tape_of = {c.container_id: c.tape_id for c in catalog.containers}
    seq = {t.tape_id: t.sequence_number for t in catalog.tapes}
    tapes: dict[str, list[str]] = {}
    for s in catalog.segments:
        held = tapes.setdefault(s.file_id, [])
        t = tape_of.get(s.container_id, "?")
        if t not in held:
            held.append(t)
    if as_json:
        _print_json(
            [{"kind": "file", "relative_path": f.relative_path, "size_bytes": f.size_bytes,
              "modified_at": f.modified_at, "sha256": f.sha256,
              "tapes": tapes.get(f.file_id, [])} for f in chosen.files]
            + [{"kind": "symlink", "relative_path": s.relative_path, "target": s.target,
                "modified_at": iso_from_ns(s.mtime_ns)} for s in chosen.symlinks]
            + [{"kind": "directory", "relative_path": d.relative_path,
                "unix_mode": f"{stat.S_IMODE(d.unix_mode):04o}",
                "modified_at": iso_from_ns(d.mtime_ns)} for d in chosen.directories])
        return EXIT_OK
    for f in chosen.files:
        on = ",".join(str(seq.get(t, "?")) for t in tapes.get(f.file_id, [])) or "-"
        print(f"{f.size_bytes:>15,}  {f.modified_at[:19]}Z  tape {on:<6} "
              f"{shown(f.relative_path)}")
    for link in chosen.symlinks:
        print(f"{'symlink':>15}  {iso_from_ns(link.mtime_ns)[:19]}Z  {'':<11} "
              f"{shown(link.relative_path)} -> {shown(link.target)}")
    for d in chosen.directories:
        print(f"{'dir ' + format(stat.S_IMODE(d.unix_mode), '04o'):>15}  "
              f"{iso_from_ns(d.mtime_ns)[:19]}Z  {'':<11} {shown(d.relative_path)}/")
    return EXIT_OK


def catalog_show(catalog: Catalog, *, as_json: bool, there: set[str] | None = None) -> int:
    """The set in a few lines; `there`: the tapes a simulator directory holds, those of the
    catalog not among them marked (a backup not finished, a tape moved away)."""
    split, across = split_files(catalog)
    per_tape = {t.tape_id: [0, 0] for t in catalog.tapes}
    for c in catalog.containers:
        if c.tape_id in per_tape:
            per_tape[c.tape_id][0] += 1
            per_tape[c.tape_id][1] += c.size_bytes
    tapes: list[dict[str, Any]] = [
        {"tape_id": t.tape_id, "sequence_number": t.sequence_number,
         "containers": per_tape[t.tape_id][0], "data_bytes": per_tape[t.tape_id][1]}
        for t in catalog.tapes]
    if there is not None:
        for doc_ in tapes:
            doc_["in_simulator"] = doc_["tape_id"] in there
    doc = {
        "backup_set_id": catalog.backup_set_id, "created_at": catalog.created_at,
        "created_by": catalog.created_by, "schema_version": catalog.schema_version,
        "source_root": catalog.source_root, "tapes": tapes,
        "containers": len(catalog.containers), "files": len(catalog.source_files),
        "bytes": catalog.total_bytes, "split_files": split, "files_split_across_tapes": across,
        "skipped": len(catalog.skipped), "directories": len(catalog.directories),
        "symlinks": len(catalog.symlinks),
        "skipped_entries": [_skipped_doc(s) for s in catalog.skipped],
    }
    if as_json:
        _print_json(doc)
        return EXIT_OK
    print(f"Backup set {catalog.backup_set_id}, created {catalog.created_at}"
          f"{' by ' + catalog.created_by if catalog.created_by else ''}")
    print(f"  source {catalog.source_root}: {len(catalog.source_files)} file(s), "
          f"{human_bytes(catalog.total_bytes)}, {split} split ({across} across tapes), "
          f"{len(catalog.skipped)} skipped, {len(catalog.directories)} director"
          f"{'y' if len(catalog.directories) == 1 else 'ies'}, "
          f"{len(catalog.symlinks)} symlink(s)")
    print(f"  {len(catalog.tapes)} tape(s), {len(catalog.containers)} container(s):")
    for t in catalog.tapes:
        count, nbytes = per_tape[t.tape_id]
        absent = "  (not in the simulator directory)" if there is not None and (
            t.tape_id not in there) else ""
        print(f"    tape {t.sequence_number}  {t.tape_id}  {count} container(s)  "
              f"{human_bytes(nbytes)}{absent}")
    if catalog.skipped:
        print(f"  {len(catalog.skipped)} skipped (not restorable):")
        for s in catalog.skipped:
            print(f"    {shown(s.relative_path)} ({s.kind}): {s.reason}")
    return EXIT_OK


def verify_summary(report: VerifyReport) -> dict[str, Any]:
    return {
        "backup_set_id": report.catalog.backup_set_id,
        "catalog_sha256": report.catalog_sha256,
        "catalog_found_on": report.catalog_found_on,
        "tapes_checked": report.tapes_checked,
        "tapes_in_set": len(report.catalog.tapes),
        "containers_checked": report.containers_checked,
        "bytes_checked": report.bytes_checked,
        "seconds": round(report.seconds, 3),
        "ok": report.ok,
        "problems": [
            {"tape_id": p.tape_id, "container_id": p.container_id, "segment_id": p.segment_id,
             "what": p.what, "files": list(p.files)}
            for p in report.problems
        ],
    }


def print_verify_report(report: VerifyReport) -> None:
    for p in report.problems:
        print(f"BAD {p.describe()}")
    damaged = {f for p in report.problems for f in p.files}
    if damaged:
        print(f"The {len(damaged)} file(s) named above cannot come back whole from these tapes "
              "as they are: bring any tape said missing and verify again; `ltoflow restore` "
              "brings back every other file and names these; take a damaged one from another "
              "copy of the set, or its intact pieces by hand (recovery/README.txt on any tape).")
    c = report.catalog
    state = "clean" if report.ok else f"{len(report.problems)} problem(s)"
    print(f"Verified set {c.backup_set_id}: {report.tapes_checked} of {len(c.tapes)} tape(s), "
          f"{report.containers_checked} container(s), {human_bytes(report.bytes_checked)} "
          f"in {report.seconds:.1f} s: {state}.")


def cmd_plan(args: argparse.Namespace) -> int:
    config = api.BackupConfig(
        source_root=args.source,
        tape_nominal_capacity_bytes=args.capacity_tb,
        max_container_size_bytes=args.container_size_gb,
    )
    plan = api.make_backup_plan(config)
    if args.json:
        _print_json(plan_document(plan))
    else:
        print_plan(plan)
    return EXIT_OK


def plan_document(plan: Plan) -> dict[str, Any]:
    """The plan as JSON: the catalog's shape without hashes, plus a summary."""
    from ltoflow import catalog as cat
    from ltoflow.plan import file_ids_of, source_root_text

    set_id = "(assigned at backup time)"
    tape_id = [f"TAPE-{n + 1:03d}" for n in range(len(plan.tapes))]
    cont_id = [f"CNT-{n + 1:05d}" for n in range(len(plan.containers))]
    file_ids = file_ids_of(plan.files)
    return {
        "backup_set_id": set_id,
        "source_root": source_root_text(plan.source_root),
        "nominal_capacity_bytes": plan.capacity_bytes,
        "reserved_catalog_bytes": plan.reserve_bytes,
        "usable_capacity_bytes": plan.usable_bytes,
        "max_container_size_bytes": plan.container_size_bytes,
        "file_count": len(plan.files),
        "directory_count": len(plan.directories),
        "symlink_count": len(plan.symlinks),
        "total_bytes": plan.total_bytes,
        "tapes": [
            {"tape_id": tape_id[t.index], "sequence_number": t.index + 1,
             "containers": len(t.containers), "data_bytes": t.data_bytes,
             "free_bytes": plan.usable_bytes - t.data_bytes}
            for t in plan.tapes
        ],
        "containers": [
            {"container_id": cont_id[c.index], "tape_id": tape_id[c.tape_index],
             "sequence_number": c.index + 1, "tape_offset": c.tape_offset,
             "size_bytes": c.size, "segments": len(c.segments)}
            for c in plan.containers
        ],
        "segments": [
            {"segment_id": cat.segment_id_for(file_ids[s.file_index], s.part),
             "file_id": file_ids[s.file_index],
             "relative_path": plan.files[s.file_index].relative_path,
             "container_id": cont_id[s.container_index], "container_offset": s.container_offset,
             "source_offset": s.source_offset, "length_bytes": s.length}
            for s in plan.segments
        ],
        "split_files": [
            {"relative_path": plan.files[i].relative_path, "size_bytes": plan.files[i].size,
             "segments": len(plan.segments_of(i)),
             "tapes": [t + 1 for t in plan.tapes_of(i)]}
            for i in plan.split_files()
        ],
        "skipped": [{"relative_path": s.relative_path, "kind": s.kind, "reason": s.reason}
                    for s in plan.skipped],
    }


def print_plan(plan: Plan) -> None:
    print(f"Plan for {plan.source_root}: {len(plan.files)} file(s), "
          f"{human_bytes(plan.total_bytes)}, {len(plan.directories)} director"
          f"{'y' if len(plan.directories) == 1 else 'ies'}, {len(plan.symlinks)} symlink(s)")
    print(f"  tape: {human_bytes(plan.capacity_bytes)} nominal - "
          f"{human_bytes(plan.reserve_bytes)} catalog reserve = "
          f"{human_bytes(plan.usable_bytes)} usable; containers up to "
          f"{human_bytes(plan.container_size_bytes)}")
    for t in plan.tapes:
        print(f"  tape {t.index + 1}: {len(t.containers)} container(s), "
              f"{human_bytes(t.data_bytes)}, {human_bytes(plan.usable_bytes - t.data_bytes)} free")
    split = plan.split_files()
    print(f"  {len(plan.containers)} container(s), {len(plan.segments)} segment(s), "
          f"{len(split)} split file(s)")
    for i in split[:20]:
        tapes = ", ".join(str(t + 1) for t in plan.tapes_of(i))
        print(f"    {plan.files[i].relative_path}: {human_bytes(plan.files[i].size)} in "
              f"{len(plan.segments_of(i))} segments on tape(s) {tapes}")
    if len(split) > 20:
        print(f"    ... and {len(split) - 20} more (see --json)")
    for s in plan.skipped:
        print(f"  will skip {s.relative_path} ({s.kind}): {s.reason}")


def _resume_hint(journal: Journal, changed: str | None = None, *,
                 interrupted: bool = False, strict: bool = False) -> str:
    """One line on what is safe on tape and how to go on (when `changed` names a source file
    that changed, a resume only helps if it is put back, or, while tape 1's catalog is not
    written and the job is not --strict, with the file skipped; after an `interrupted` job
    there is no cause to fix)."""
    if not journal.exists():
        return "nothing was written to tape that a resume could use"
    fixed = True  # whether tape 1's catalog holds every hash already
    try:
        state = journal.load(JsonCatalogCodec())
        done, fixed = state.describe(), state.catalog is not None or bool(state.tapes_done)
    except (BackupError, OSError):
        done = "progress recorded"
    if changed is not None:
        skip = "" if fixed or strict else " (or with --on-change=skip added, which skips it)"
        return (f"{done}, all safe on tape; --resume can finish this set only with "
                f"{shown(changed)} as it was when scanned{skip}; to back up its new "
                f"content, delete {journal.path} and start again on blank tapes")
    then = "" if interrupted else "fix the cause and "
    return f"{done}, all safe on tape; {then}run the same command with --resume to continue"


def _abort_now(left: str) -> Callable[[], None]:
    """Exit at once, saying what may be `left` behind."""
    def abort() -> NoReturn:
        print(f"ltoflow: aborted at once (second interrupt); {left}", file=sys.stderr)
        sys.stderr.flush()
        os._exit(EXIT_INTERRUPTED)
    return abort


_ABORT_BACKUP = _abort_now("the tape in the drive may hold a half-written container and "
                           "was not unloaded cleanly; --resume rewrites the container")


async def run_interruptible[T](
    job: Callable[[], Awaitable[T]], abort: Callable[[], None] = _ABORT_BACKUP
) -> T:
    """Run `job`; on SIGINT or SIGTERM cancel it cleanly (the container in flight is dropped,
    the journal stays true, the tape is unloaded) and raise Interrupted; on a second signal
    while that runs, call `abort` (exit at once)."""
    got: list[int] = []
    result: list[T] = []
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            scope = trio.CancelScope()

            async def watch() -> None:
                async for signum in signals:
                    if got:
                        abort()
                        continue
                    got.append(signum)
                    print(f"ltoflow: {signal.Signals(signum).name}: stopping cleanly "
                          "(again to abort at once)", file=sys.stderr)
                    scope.cancel()

            nursery.start_soon(watch)
            with scope:
                result.append(await job())
            nursery.cancel_scope.cancel()
    if not result:
        raise Interrupted(f"interrupted by {signal.Signals(got[0]).name}")
    return result[0]


#: How long a thread may keep the interpreter's lock while another waits for it (Python's
#: default is 5 ms). The jobs' threads spend most of their time in C without it, and each
#: hand-back (a chunk read, a container hashed) waited up to that long for the lock: at 0.2 ms
#: the data of 100,000 small files streamed in 0.94-1.03 s instead of 1.11-1.38 s (by hand,
#: 2026-11-27). Set by the command line only: the process is ours.
SWITCH_INTERVAL_S = 0.0002


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        args = build_parser().parse_args(argv)
    except _BadArguments as bad:  # a script that asked for JSON gets a document here too
        if any(len(a) > 3 and "--json".startswith(a) for a in argv):  # argparse takes --js
            _print_json({"ok": False, "exit_code": EXIT_USAGE, "errors": [bad.line]})
        raise
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    if args.command == "backup":  # from the scan on: big blocks go back to the system
        from ltoflow.engine import map_big_blocks

        map_big_blocks()
    commands = {"backup": cmd_backup, "verify": cmd_verify, "plan": cmd_plan,
                "restore": cmd_restore, "catalog": cmd_catalog}
    verbose = getattr(args, "verbose", False)
    prog = f"ltoflow {args.command}"
    said: list[str] = []  # the error lines, for --json too

    def tell(line: str, *, error: bool = True) -> None:
        print(f"{prog}: {'error: ' if error else ''}{line}", file=sys.stderr)
        said.append(line)

    code = EXIT_INTERNAL
    try:
        code = commands[args.command](args)
    except* Interrupted as group:
        tell(str(group.exceptions[0]), error=False)
        code = EXIT_INTERRUPTED
    except* KeyboardInterrupt:
        tell("interrupted", error=False)
        code = EXIT_INTERRUPTED
    except* BrokenPipeError:  # `ltoflow ... | head`: the reader has seen enough
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no flush error at exit
        code = EXIT_OK
    except* BackupError as group:
        errors = leaves(group)
        for e in errors:
            tell(str(e))
            if verbose:
                traceback.print_exception(e)
        notes = dict.fromkeys(n for e in errors for n in getattr(e, "__notes__", ()))
        for note in notes:  # once each, after the errors
            tell(note, error=False)
        code = EXIT_USAGE if all(isinstance(e, UsageError) for e in errors) else EXIT_FAILED
    except* (PermissionError, FileNotFoundError, NotADirectoryError) as group:
        # a path given that cannot be reached (Path.exists() raises EACCES); other OSErrors
        # that no step turned into an error of its own are bugs, below
        errors = leaves(group)
        for e in errors:
            tell(_os_error(e))
            if verbose:
                traceback.print_exception(e)
        code = EXIT_USAGE
    except* Exception as group:
        for e in leaves(group):
            tell(f"internal error: {type(e).__name__}: {e} (this is a bug; rerun with "
                 "--verbose and report the output)", error=False)
            if verbose:
                traceback.print_exception(e)
        code = EXIT_INTERNAL
    if said and getattr(args, "json", False):  # a script reading stdout gets a document too
        _print_json({"ok": False, "exit_code": code, "errors": said})
    return code


def _os_error(e: BaseException) -> str:
    """One line for an OSError no job step turned into one of its own."""
    assert isinstance(e, OSError)
    name = e.filename
    where = f" ({os.fsdecode(name)})" if name is not None else ""
    if isinstance(e, PermissionError):
        return (f"permission denied{where}: run as a user who may reach it, or give a path "
                "this one may use")
    return f"{e.strerror or e}{where}"


def entry() -> None:  # pragma: no cover - the console script
    code = main()
    # No more collections: at exit Python's own walk every object still alive, 0.15 s after
    # a 100,000-file backup. Finalizers and flushes still run.
    gc.disable()
    gc.freeze()
    sys.exit(code)
