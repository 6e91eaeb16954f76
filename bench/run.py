"""Benchmark ltoflow against a same-machine floor: tar | tee | sha256, and sha256 for verify.

Usage: python bench/run.py [--sets mixed,small] [--runs 3] [--size-factor 1.0]
                           [--workdir DIR] [--json OUT]

For every set the jobs run alternately (round-robin, with the order rotated each round),
each preceded by deleting the previous outputs, re-reading the source into the page cache
and `sync`.  The report gives medians and the ratio floor_median / job_median, measured in
the same invocation on the same files.  See bench/README.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import datasets

GB = 1000**3
MB = 1000**2
MiB = 2**20
DEFAULT_WORKDIR = Path("/var/tmp/ltoflow-bench")
TIME_BIN = "/usr/bin/time"

# job keys, in the order they appear in the report
FLOOR = "floor"
SINGLE = "single"
MULTI = "multi"
PLAN = "plan"
FEED = "feed"
FEED_PERSIST = "feed-persist"
VERIFY_FLOOR = "verify-floor"
VERIFY = "verify"
VERIFY_COLD = "verify-cold"
RESTORE = "restore"
RESTORE_ONE = "restore-one"
JOB_ORDER = (
    FLOOR,
    SINGLE,
    MULTI,
    VERIFY_FLOOR,
    VERIFY,
    VERIFY_COLD,
    RESTORE,
    RESTORE_ONE,
    PLAN,
    FEED,
    FEED_PERSIST,
)
LABELS = {
    FLOOR: "floor: tar | tee | openssl sha256",
    SINGLE: "ltoflow backup, 1 tape",
    MULTI: "ltoflow backup, multi-tape",
    VERIFY_FLOOR: "floor: openssl dgst -sha256 containers",
    VERIFY: "ltoflow verify, 1 tape",
    VERIFY_COLD: "ltoflow verify, 1 tape, its catalog from disk",
    RESTORE: "ltoflow restore, 1 tape, all files (ratio: vs backup)",
    RESTORE_ONE: "ltoflow restore, 1 file (~1 MB) on the last tape",
    PLAN: "ltoflow plan --json",
    FEED: "drive feed: LTO-9 throttled, discard mode",
    FEED_PERSIST: "drive feed: LTO-9 throttled, persisted",
}
# What each job's ratio is taken against (None: no ratio).  Restore's "floor" is the
# single-tape backup: its ratio is restore MB/s / backup MB/s.
FLOOR_OF: dict[str, str | None] = {
    FLOOR: FLOOR,
    SINGLE: FLOOR,
    MULTI: FLOOR,
    VERIFY_FLOOR: VERIFY_FLOOR,
    VERIFY: VERIFY_FLOOR,
    VERIFY_COLD: VERIFY_FLOOR,
    RESTORE: SINGLE,
    RESTORE_ONE: None,
    PLAN: None,
    FEED: None,
    FEED_PERSIST: None,
}
# Jobs whose MB/s and files/s (set bytes or files / wall time) mean something.  Plan
# reads no data (files/s only); one-file restore moves one file (neither).
MB_PER_S_JOBS = {FLOOR, SINGLE, MULTI, VERIFY_FLOOR, VERIFY, VERIFY_COLD, RESTORE, FEED,
                 FEED_PERSIST}
FILES_PER_S_JOBS = MB_PER_S_JOBS | {PLAN}
DRIVE_JOBS = (FEED, FEED_PERSIST)
VERIFY_JOBS = (VERIFY, VERIFY_COLD)
# Jobs that print a JSON report on stdout.
JSON_JOBS = {SINGLE, MULTI, VERIFY, VERIFY_COLD, RESTORE, RESTORE_ONE, FEED, FEED_PERSIST}
# Sets that get the jobs only asked of them.
RESTORE_ONE_SETS = {"mixed"}
#: Sets whose full restore is timed unless --restore-sets says otherwise. The million-file
#: restore took 736 s a run (39 of the 71 minutes of the full benchmark on 2026-11-26).
DEFAULT_RESTORE_SETS = ("mixed", "small", "large")
FEED_PERSIST_SETS = {"mixed"}
DRIVE = "lto9"
DRIVE_NATIVE_BYTES = 18 * 1000**4  # LTO-9: the capacity `--drive lto9` defaults to
DRIVE_NATIVE_MB_PER_S = 400
ONE_FILE_TARGET_BYTES = 1 * 1000**2


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- processes


class JobFailed(RuntimeError):
    pass


@dataclass
class Sample:
    round: int
    seconds: float
    peak_rss_kib: int | None
    stdout: str
    #: User plus system CPU seconds of the command and every process it waited for.
    cpu_seconds: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # drive numbers, timeline, file


def _tail(text: str, lines: int = 15) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def run_timed(cmd: list[str], *, discard_stdout: bool = False
              ) -> tuple[float, int | None, float | None, str]:
    """Run `cmd`; return (wall seconds, peak RSS in KiB of its largest process, CPU seconds,
    stdout).

    Peak RSS comes from GNU time's %M when /usr/bin/time exists, otherwise from os.wait4
    on the child itself (not RUSAGE_CHILDREN, which is a max over every child so far). CPU
    seconds are user plus system time of the command and of every process it waited for (the
    floor's shell counts its whole pipeline), from %U and %S or the same wait4.
    With `discard_stdout` the command writes to /dev/null (`> /dev/null`) and "" is returned.
    """
    out_dest = subprocess.DEVNULL if discard_stdout else subprocess.PIPE
    if os.access(TIME_BIN, os.X_OK):
        with tempfile.NamedTemporaryFile("r", suffix=".rss") as rss_file:
            full = [TIME_BIN, "-f", "%M %U %S", "-o", rss_file.name, *cmd]
            start = time.perf_counter()
            proc = subprocess.run(
                full, stdout=out_dest, stderr=subprocess.PIPE, text=True, check=False
            )
            seconds = time.perf_counter() - start
            lines = Path(rss_file.name).read_text().strip().splitlines()
        rc, out, err = proc.returncode, proc.stdout or "", proc.stderr
        fields = lines[-1].split() if lines else []
        rss = int(fields[0]) if len(fields) == 3 and fields[0].isdigit() else None
        cpu = float(fields[1]) + float(fields[2]) if rss is not None else None
    else:
        with tempfile.TemporaryFile("w+") as fout, tempfile.TemporaryFile("w+") as ferr:
            start = time.perf_counter()
            stdout = subprocess.DEVNULL if discard_stdout else fout
            popen = subprocess.Popen(cmd, stdout=stdout, stderr=ferr)
            _, status, usage = os.wait4(popen.pid, 0)
            seconds = time.perf_counter() - start
            popen.returncode = rc = os.waitstatus_to_exitcode(status)
            fout.seek(0)
            ferr.seek(0)
            out, err = fout.read(), ferr.read()
        rss = usage.ru_maxrss  # KiB on Linux
        cpu = usage.ru_utime + usage.ru_stime
    if rc != 0:
        raise JobFailed(f"exit {rc}: {shlex.join(cmd)}\n{_tail(err or out)}")
    return seconds, rss, cpu, out


def warm(paths: list[Path]) -> None:
    """Read every file under `paths` once so it sits in the page cache."""
    files: list[str] = []
    for p in paths:
        if p.is_dir():
            proc = subprocess.run(
                [
                    "bash",
                    "-c",
                    'set -o pipefail; find "$1" -type f -print0 | xargs -0 -r cat',
                    "warm",
                    str(p),
                ],
                stdout=subprocess.DEVNULL,
                check=False,
            )
            if proc.returncode != 0:
                raise JobFailed(f"warming {p} failed (exit {proc.returncode})")
        else:
            files.append(str(p))
    if files:
        subprocess.run(["cat", *files], stdout=subprocess.DEVNULL, check=True)


def evict(paths: list[Path]) -> None:
    """Drop these files' pages from the page cache (they must be clean: after os.sync())."""
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


# --------------------------------------------------------------------------- parameters


def tb(nbytes: int) -> str:
    return f"{Decimal(nbytes) / 10**12:f}"


def gb(nbytes: int) -> str:
    return f"{Decimal(nbytes) / 10**9:f}"


@dataclass(frozen=True)
class TapeParams:
    capacity_bytes: int
    container_bytes: int

    def args(self) -> list[str]:
        return [
            "--capacity-tb",
            tb(self.capacity_bytes),
            "--container-size-gb",
            gb(self.container_bytes),
        ]

    def describe(self) -> dict[str, Any]:
        return {
            "capacity_bytes": self.capacity_bytes,
            "capacity_tb": tb(self.capacity_bytes),
            "container_bytes": self.container_bytes,
            "container_size_gb": gb(self.container_bytes),
        }


def _single_container(total: int) -> int:
    # Containers of 1 GB, or a quarter of the set for small sets so there are still several.
    return max(MB, min(GB, -(-total // 4)))


def ltoflow_plan(ltoflow: str, source: Path, params: TapeParams) -> dict[str, Any] | str:
    """`ltoflow plan --json` for these parameters: the plan, or the error text."""
    cmd = [ltoflow, "plan", "--source", str(source), *params.args(), "--json"]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        return _tail(proc.stderr or proc.stdout, 3)
    doc: dict[str, Any] = json.loads(proc.stdout)
    return doc


def choose_params(
    ltoflow: str, source: Path, total: int, warn: Callable[[str], None]
) -> tuple[TapeParams, TapeParams]:
    """Capacities and container sizes for the single- and the multi-tape backups.

    Every tape reserves room for the whole catalog (which grows with the file count), so the
    capacities are the reserve that `ltoflow plan` reports plus the data share: the whole
    set for one tape (with room to spare), total/2.7 for the multi-tape run (3 or more
    tapes), whose containers are a fifth of a tape's data share so several fit per tape.
    """
    container = _single_container(total)
    probe = ltoflow_plan(ltoflow, source, TapeParams(10 * total + 10 * GB, container))
    reserve = probe["reserved_catalog_bytes"] if isinstance(probe, dict) else 0
    if isinstance(probe, str):
        warn(f"ltoflow plan failed, guessing capacities: {probe}")
    single = TapeParams(total + 2 * reserve + GB, container)
    check = ltoflow_plan(ltoflow, source, single)
    if isinstance(check, dict) and len(check["tapes"]) != 1:
        warn(f"single-tape parameters plan {len(check['tapes'])} tapes")

    share = max(1, -(-total * 10 // 27))  # ceil(total / 2.7)
    multi = TapeParams(reserve + share, max(1, min(GB, share // 5)))
    for _ in range(8):
        multi = TapeParams(int(reserve * 1.05) + share, max(1, min(GB, share // 5)))
        attempt = ltoflow_plan(ltoflow, source, multi)
        if isinstance(attempt, str):
            reserve = int(reserve * 1.5) + MB  # the reserve outgrew our estimate
            continue
        if len(attempt["tapes"]) >= 3:
            return single, multi
        reserve = attempt["reserved_catalog_bytes"]
    warn(f"could not find multi-tape parameters that plan 3+ tapes; using {multi}")
    return single, multi


# --------------------------------------------------------------------------- one set


@dataclass
class JobResult:
    key: str
    samples: list[Sample] = field(default_factory=list)
    reports: list[dict[str, Any]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def median(self) -> float | None:
        return statistics.median(s.seconds for s in self.samples) if self.samples else None


@dataclass
class Config:
    ltoflow: str
    runs: int
    buffer_mb: int | None
    workdir: Path
    restore_sets: frozenset[str] = frozenset(DEFAULT_RESTORE_SETS)


def _feed_container(total: int) -> int:
    """One container for the whole set: its size in whole MB, plus one MB."""
    return (max(total, 1) + MB - 1) // MB * MB + MB


def drive_totals(report: dict[str, Any]) -> dict[str, Any] | None:
    """The drive model's numbers of one backup, summed over its tapes (None if absent)."""
    tapes = report.get("drive_model") or []
    if not tapes:
        return None
    written = sum(t["bytes_written"] for t in tapes)
    streaming = sum(t["seconds_streaming"] for t in tapes)
    return {
        "tapes": len(tapes),
        "bytes_written": written,
        "back_hitches": sum(t["back_hitches"] for t in tapes),
        "seconds_streaming": streaming,
        "seconds_stopped": sum(t["seconds_stopped"] for t in tapes),
        "seconds_repositioning": sum(t["seconds_repositioning"] for t in tapes),
        "mean_streaming_mb_per_s": written / MB / streaming if streaming > 0 else None,
        "peak_buffer_bytes": max(t["peak_buffer_bytes"] for t in tapes),
        "per_tape": tapes,
    }


class SetBench:
    def __init__(self, ds: datasets.DataSet, cfg: Config) -> None:
        self.ds = ds
        self.cfg = cfg
        self.out = cfg.workdir / "out" / ds.name
        self.tar_path = self.out / "floor.tar"
        self.single_dir = self.out / "tapes-single"
        self.multi_dir = self.out / "tapes-multi"
        self.feed_dir = self.out / "tapes-feed"
        self.feed_persist_dir = self.out / "tapes-feed-persist"
        self.restore_dir = self.out / "restore-1"  # one a round: see _after_single
        self.restore_one_dir = self.out / "restore-one"
        self.timeline_path = self.out / "drive-timeline.json"
        # Jobs that read the source, run round-robin; the ones after a single- or multi-tape
        # backup run on its tapes right after it.
        self.source_jobs: tuple[str, ...] = (FLOOR, SINGLE, MULTI, PLAN, FEED)
        if ds.name in FEED_PERSIST_SETS:
            self.source_jobs += (FEED_PERSIST,)
        self.restore_skipped = ds.name not in cfg.restore_sets
        self.after_single: tuple[str, ...] = (VERIFY_FLOOR, VERIFY, VERIFY_COLD) + (
            () if self.restore_skipped else (RESTORE,)
        )
        self.after_multi: tuple[str, ...] = (RESTORE_ONE,) if ds.name in RESTORE_ONE_SETS else ()
        # A skipped full restore keeps its (empty) row, so the table says it was not run.
        jobs = {*self.source_jobs, *self.after_single, *self.after_multi, RESTORE}
        self.results = {k: JobResult(k) for k in JOB_ORDER if k in jobs}
        self.warnings: list[str] = []
        self.single, self.multi = choose_params(cfg.ltoflow, ds.root, ds.bytes, self._warn)
        self.feed_container = _feed_container(ds.bytes)
        self._check_feed_params()
        self.one_file: dict[str, Any] | None = None  # the file RESTORE_ONE restores this round

    def _warn(self, message: str) -> None:
        if message not in self.warnings:
            self.warnings.append(message)
            log(f"WARNING [{self.ds.name}]: {message}")

    def _check_feed_params(self) -> None:
        """The drive feed must be one container on one tape (see bench/README.md)."""
        plan = ltoflow_plan(
            self.cfg.ltoflow, self.ds.root, TapeParams(DRIVE_NATIVE_BYTES, self.feed_container)
        )
        if isinstance(plan, str):
            self._warn(f"ltoflow plan failed for the drive-feed parameters: {plan}")
        elif len(plan["tapes"]) != 1 or len(plan["containers"]) != 1:
            self._warn(
                f"drive feed plans {len(plan['tapes'])} tape(s) and "
                f"{len(plan['containers'])} container(s), not one of each"
            )

    def command(self, key: str, containers: list[Path] | None = None) -> list[str]:
        src = str(self.ds.root)
        buffer = [] if self.cfg.buffer_mb is None else ["--buffer-mb", str(self.cfg.buffer_mb)]
        if key == FLOOR:
            script = (
                f"set -o pipefail; tar -cf - -C {shlex.quote(src)} . "
                f"| tee {shlex.quote(str(self.tar_path))} | openssl dgst -sha256"
            )
            return ["bash", "-c", script]
        if key in (SINGLE, MULTI):
            target, params = (
                (self.single_dir, self.single) if key == SINGLE else (self.multi_dir, self.multi)
            )
            return [
                self.cfg.ltoflow,
                "backup",
                "--source",
                src,
                "--simulator",
                str(target),
                *params.args(),
                "--json",
                "--quiet",
                *buffer,
            ]
        if key in DRIVE_JOBS:
            return [
                self.cfg.ltoflow,
                "backup",
                "--source",
                src,
                "--simulator",
                str(self.feed_dir if key == FEED else self.feed_persist_dir),
                "--drive",
                DRIVE,
                "--throttle",
                *(["--discard"] if key == FEED else []),
                "--container-size-gb",
                gb(self.feed_container),
                "--drive-timeline",
                str(self.timeline_path),
                "--json",
                "--quiet",
                *buffer,
            ]
        if key == PLAN:
            return [self.cfg.ltoflow, "plan", "--source", src, *self.single.args(), "--json"]
        if key == VERIFY_FLOOR:
            assert containers
            return ["openssl", "dgst", "-sha256", *map(str, containers)]
        if key in VERIFY_JOBS:
            return [self.cfg.ltoflow, "verify", "--simulator", str(self.single_dir), "--json"]
        if key == RESTORE:
            return [
                self.cfg.ltoflow,
                "restore",
                "--simulator",
                str(self.single_dir),
                "--target",
                str(self.restore_dir),
                "--json",
            ]
        if key == RESTORE_ONE:
            assert self.one_file is not None
            return [
                self.cfg.ltoflow,
                "restore",
                "--simulator",
                str(self.multi_dir),
                "--target",
                str(self.restore_one_dir),
                "--json",
                "--",
                self.one_file["relative_path"],
            ]
        raise ValueError(key)

    def output_of(self, key: str) -> Path | None:
        return {
            FLOOR: self.tar_path,
            SINGLE: self.single_dir,
            MULTI: self.multi_dir,
            FEED: self.feed_dir,
            FEED_PERSIST: self.feed_persist_dir,
            RESTORE: self.restore_dir,
            RESTORE_ONE: self.restore_one_dir,
        }.get(key)

    def _measure(
        self, key: str, rnd: int, warm_paths: list[Path], containers: list[Path] | None = None,
        cold_paths: list[Path] | None = None,
    ) -> bool:
        result = self.results[key]
        out = self.output_of(key)
        if out is not None:
            remove(out)
        if key in DRIVE_JOBS:
            remove(self.timeline_path)
        warm(warm_paths)
        os.sync()  # no dirty pages from earlier runs are flushed on this run's clock
        evict(cold_paths or [])
        try:
            seconds, rss, cpu, stdout = run_timed(
                self.command(key, containers), discard_stdout=key == PLAN
            )
        except JobFailed as exc:
            result.errors.append(f"round {rnd}: {exc}")
            log(f"[{self.ds.name}] round {rnd} {key}: FAILED {exc}")
            if out is not None:
                remove(out)
            return False
        sample = Sample(rnd, seconds, rss, stdout, cpu)
        result.samples.append(sample)
        extra = ""
        if key in JSON_JOBS:
            report: dict[str, Any] = json.loads(stdout)
            result.reports.append(report)
            self._check(key, report)
            if key in (SINGLE, MULTI, *DRIVE_JOBS):
                extra = f", {len(report.get('tapes', []))} tape(s)"
            if key in DRIVE_JOBS:
                sample.extra["drive"] = drive_totals(report)
                sample.extra["timeline"] = self._read_timeline()
                if (d := sample.extra["drive"]) is not None:
                    extra += (
                        f", {d['back_hitches']} back-hitch(es), "
                        f"{d['seconds_stopped']:.2f} s stopped"
                    )
            if key == RESTORE_ONE:
                sample.extra["file"] = dict(self.one_file or {})
        rss_text = f", peak RSS {rss / 1024:.0f} MiB" if rss is not None else ""
        rss_text += f", CPU {cpu:.2f} s" if cpu is not None else ""
        log(f"[{self.ds.name}] round {rnd} {key}: {seconds:.3f} s{rss_text}{extra}")
        return True

    def _read_timeline(self) -> list[dict[str, Any]] | None:
        try:
            doc: list[dict[str, Any]] = json.loads(self.timeline_path.read_text())
        except (OSError, ValueError) as exc:
            self._warn(f"no drive timeline: {exc}")
            return None
        finally:
            remove(self.timeline_path)
        return doc

    def _check(self, key: str, report: dict[str, Any]) -> None:
        if key in VERIFY_JOBS:
            if report.get("ok") is not True:
                self._warn(f"verify reported problems: {report.get('problems')}")
            return
        if key in (RESTORE, RESTORE_ONE):
            want_files, want_bytes = (
                (self.ds.files, self.ds.bytes)
                if key == RESTORE
                else (1, (self.one_file or {}).get("size_bytes"))
            )
            if report.get("ok") is not True:
                self._warn(f"{key} reported problems: {report.get('problems')}")
            if report.get("restored") != want_files or report.get("bytes_restored") != want_bytes:
                self._warn(
                    f"{key}: restored {report.get('restored')} files, "
                    f"{report.get('bytes_restored')} bytes; expected {want_files}, {want_bytes}"
                )
            return
        if report.get("bytes") != self.ds.bytes:
            self._warn(
                f"{key}: ltoflow backed up {report.get('bytes')} bytes, the set has {self.ds.bytes}"
            )
        tapes = len(report.get("tapes", []))
        if key in (SINGLE, *DRIVE_JOBS) and tapes != 1:
            self._warn(f"{key} backup used {tapes} tapes")
        if key == MULTI and tapes < 3:
            self._warn(f"multi-tape backup used only {tapes} tapes")
        if key in DRIVE_JOBS:
            if report.get("containers") != 1:
                self._warn(
                    f"{key}: {report.get('containers')} containers, not 1: the drive stops "
                    "(sync) after every container"
                )
            if not report.get("drive_model"):
                self._warn(f"{key}: no drive_model in ltoflow's report")

    def run(self) -> None:
        name = self.ds.name
        remove(self.out)
        self.out.mkdir(parents=True)
        log(
            f"[{name}] warming the page cache ({self.ds.files:,} files, "
            f"{self.ds.bytes / MB:,.1f} MB)"
        )
        warm([self.ds.root])
        for rnd in range(1, self.cfg.runs + 1):
            jobs = self.source_jobs
            shift = (rnd - 1) % len(jobs)
            for key in jobs[shift:] + jobs[:shift]:
                ok = self._measure(key, rnd, [self.ds.root])
                if key == SINGLE and ok:
                    self._after_single(rnd)
                if key == MULTI and ok and self.after_multi:
                    self._after_multi(rnd)
                if (out := self.output_of(key)) is not None:
                    remove(out)
        remove(self.out)

    def _after_single(self, rnd: int) -> None:
        """Time verify, its floor and restore on the single-tape set just written.

        They rotate by one each round, so verify and its floor change order every round, as
        the backups do. Each job starts with its input in the page cache, as the backups'
        source is: openssl's is the containers, verify's the whole tape (containers and
        catalog). Verify is also timed with its catalog dropped from the cache, read from the
        disk as it would be from a tape (the backup wrote it past the cache, O_DIRECT).
        """
        containers = sorted(self.single_dir.glob("*/data/*"))
        if not containers:
            self._warn("no container files found under tapes-single/*/data/")
            return
        catalogs = sorted(self.single_dir.glob("*/catalog/*"))
        jobs = self.after_single
        shift = (rnd - 1) % len(jobs)
        # Each round restores into a directory of its own, removed with the set's outputs at
        # its end: a removal of 100,000 files just before would have the next restore time
        # the filesystem's search past their inodes (ext4 without a journal skips an inode
        # freed in the last minute or more, and pays a lookup to find out).
        self.restore_dir = self.out / f"restore-{rnd}"
        for key in jobs[shift:] + jobs[:shift]:
            if key == RESTORE:
                self._measure(key, rnd, [self.single_dir])
            elif key == VERIFY:
                self._measure(key, rnd, [self.single_dir], containers)
            elif key == VERIFY_COLD:
                self._measure(key, rnd, containers, containers, cold_paths=catalogs)
            else:
                self._measure(key, rnd, containers, containers)

    def _after_multi(self, rnd: int) -> None:
        """Time restoring one ~1 MB file that lies on the multi-tape set's last tape."""
        self.one_file = self._pick_one_file()
        if self.one_file is None:
            self.results[RESTORE_ONE].errors.append(
                f"round {rnd}: no file on the last tape alone to restore"
            )
            return
        self._measure(RESTORE_ONE, rnd, [self.multi_dir])
        remove(self.restore_one_dir)

    def _pick_one_file(self) -> dict[str, Any] | None:
        """From the catalog: the file held by the last tape alone whose size is nearest 1 MB."""
        cmd = [self.cfg.ltoflow, "catalog", "--simulator", str(self.multi_dir), "ls", "--json"]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            self._warn(f"ltoflow catalog ls failed: {_tail(proc.stderr or proc.stdout, 3)}")
            return None
        # Files only: `catalog ls` also lists directories and symlinks (their `kind`).
        rows: list[dict[str, Any]] = [r for r in json.loads(proc.stdout)
                                      if r.get("kind", "file") == "file"]
        tape_ids = sorted({t for r in rows for t in r["tapes"]})
        if not tape_ids:
            return None
        last = tape_ids[-1]
        candidates = [r for r in rows if r["tapes"] == [last]]
        if not candidates:
            return None
        best = min(
            candidates,
            key=lambda r: (abs(r["size_bytes"] - ONE_FILE_TARGET_BYTES), r["relative_path"]),
        )
        return {
            "relative_path": best["relative_path"],
            "size_bytes": best["size_bytes"],
            "tape_id": last,
            "tape_number": len(tape_ids),
            "tapes_in_set": len(tape_ids),
        }

    # ----------------------------------------------------------------- summary

    def rows(self) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = []
        for key, result in self.results.items():
            med = result.median()
            floor_key = FLOOR_OF[key]
            floor_med = self.results[floor_key].median() if floor_key else None
            reads = [
                r["source_bytes_read"] / r["bytes"]
                for r in result.reports
                if r.get("bytes") and "source_bytes_read" in r
            ]
            rss = [s.peak_rss_kib for s in result.samples if s.peak_rss_kib is not None]
            cpu = [s.cpu_seconds for s in result.samples if s.cpu_seconds is not None]
            skipped = key == RESTORE and self.restore_skipped
            row: dict[str, Any] = {
                "job": key,
                "label": LABELS[key] + (" — not run (--restore-sets)" if skipped else ""),
                "skipped": skipped,
                "floor": floor_key,
                "runs": len(result.samples),
                "failures": len(result.errors),
                "errors": result.errors,
                "rounds": [s.round for s in result.samples],
                "seconds": [round(s.seconds, 4) for s in result.samples],
                "median_seconds": med,
                "min_seconds": min(s.seconds for s in result.samples) if result.samples else None,
                "max_seconds": max(s.seconds for s in result.samples) if result.samples else None,
                "mb_per_s": self.ds.bytes / MB / med if med and key in MB_PER_S_JOBS else None,
                "files_per_s": self.ds.files / med if med and key in FILES_PER_S_JOBS else None,
                "ratio": floor_med / med if med and floor_med else None,
                "reads_per_source_byte": statistics.median(reads) if reads else None,
                "peak_rss_kib": max(rss) if rss else None,
                "peak_rss_kib_per_run": [s.peak_rss_kib for s in result.samples],
                "cpu_seconds": [round(s.cpu_seconds, 3) if s.cpu_seconds is not None else None
                                for s in result.samples],
                "median_cpu_seconds": statistics.median(cpu) if cpu else None,
                "tapes": None,
                "containers": None,
                "ltoflow_seconds": [r.get("seconds") for r in result.reports] or None,
                "command": shlex.join(self._command_for_report(key)),
            }
            backups = [r for r in result.reports if "containers" in r and "tapes" in r]
            if backups:
                row["tapes"] = len(backups[-1]["tapes"])
                row["containers"] = backups[-1].get("containers")
            elif key in VERIFY_JOBS and result.reports:
                row["tapes"] = result.reports[-1].get("tapes_checked")
                row["containers"] = result.reports[-1].get("containers_checked")
            elif key in (RESTORE, RESTORE_ONE) and result.reports:
                row["tapes"] = len(result.reports[-1].get("tapes", []))
                row["restored_files"] = [r.get("restored") for r in result.reports]
                row["restored_bytes"] = [r.get("bytes_restored") for r in result.reports]
            if key == RESTORE_ONE:
                row["file_per_run"] = [s.extra.get("file") for s in result.samples]
            if key in DRIVE_JOBS:
                row.update(self._drive_row(result))
            rows.append(row)
        return rows

    def _command_for_report(self, key: str) -> list[str]:
        if key == VERIFY_FLOOR:
            return ["openssl", "dgst", "-sha256", "TAPES/*/data/*"]
        if key == RESTORE_ONE and self.one_file is None:
            return [self.cfg.ltoflow, "restore", "--simulator", str(self.multi_dir), "FILE"]
        return self.command(key)

    def _drive_row(self, result: JobResult) -> dict[str, Any]:
        drives = [s.extra.get("drive") for s in result.samples]
        present = [d for d in drives if d]

        def med(name: str) -> float | None:
            values = [d[name] for d in present if d.get(name) is not None]
            return statistics.median(values) if values else None

        return {
            "mode": "discard" if result.key == FEED else "persisted",
            "drive": DRIVE,
            "container_bytes": self.feed_container,
            "container_size_gb": gb(self.feed_container),
            "drive_median": {
                name: med(name)
                for name in (
                    "back_hitches",
                    "seconds_streaming",
                    "seconds_stopped",
                    "seconds_repositioning",
                    "mean_streaming_mb_per_s",
                    "peak_buffer_bytes",
                )
            },
            "back_hitches_per_run": [d["back_hitches"] if d else None for d in drives],
            "drive_per_run": drives,
            "timeline_per_run": [s.extra.get("timeline") for s in result.samples],
        }

    def summary(self) -> dict[str, Any]:
        return {
            "name": self.ds.name,
            "description": datasets.DESCRIPTIONS[self.ds.name],
            "files": self.ds.files,
            "bytes": self.ds.bytes,
            "directories": self.ds.directories,
            "sparse": self.ds.sparse,
            "scale_factor": self.ds.scale_factor,
            "seed": self.ds.seed,
            "root": str(self.ds.root),
            "single_tape": self.single.describe(),
            "multi_tape": self.multi.describe(),
            "drive_feed": {
                "drive": DRIVE,
                "capacity": "the drive's native capacity (--drive default)",
                "container_bytes": self.feed_container,
                "container_size_gb": gb(self.feed_container),
            },
            "warnings": self.warnings,
            "jobs": self.rows(),
        }


# --------------------------------------------------------------------------- report


def _fmt(value: float | None, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def _spread(values: list[Any]) -> str:
    """The median of `values`, and their range when they differ: "3 (2-5)"."""
    present = [v for v in values if v is not None]
    if not present:
        return "—"
    med = statistics.median(present)
    text = f"{med:g}"
    if min(present) != max(present):
        text += f" ({min(present):g}-{max(present):g})"
    return text


def markdown(sets: list[dict[str, Any]]) -> str:
    header = (
        "| set | job | runs | median s | MB/s | files/s | ratio | CPU s | reads/B "
        "| peak RSS MiB | tapes | containers |"
    )
    lines = [header, "|" + "---|" * 2 + "---:|" * 10]
    for s in sets:
        for row in s["jobs"]:
            runs = str(row["runs"]) + (f" ({row['failures']} failed)" if row["failures"] else "")
            rss = row["peak_rss_kib"] / 1024 if row["peak_rss_kib"] is not None else None
            label = row["label"].replace("|", r"\|")
            lines.append(
                f"| {s['name']} | {label} | {runs} | {_fmt(row['median_seconds'], '.3f')}"
                f" | {_fmt(row['mb_per_s'], ',.1f')} | {_fmt(row['files_per_s'], ',.0f')}"
                f" | {_fmt(row['ratio'], '.2f')} | {_fmt(row.get('median_cpu_seconds'), '.2f')}"
                f" | {_fmt(row['reads_per_source_byte'], '.2f')}"
                f" | {_fmt(rss, ',.0f')} | {row['tapes'] if row['tapes'] is not None else '—'}"
                f" | {row['containers'] if row['containers'] is not None else '—'} |"
            )

    drive_rows = [(s, row) for s in sets for row in s["jobs"] if row["job"] in DRIVE_JOBS]
    drive_lines: list[str] = []
    if drive_rows:
        drive_lines = [
            f"Drive feed: `ltoflow backup --drive {DRIVE} --throttle [--discard]`, one container "
            f"on one tape, drive buffer 1 GiB (ltoflow's default); native rate "
            f"{DRIVE_NATIVE_MB_PER_S} MB/s.",
            "",
            "| set | mode | runs | median s | overall MB/s | back-hitches | streaming s "
            "| stopped s | repositioning s | MB/s while streaming | peak buffer MiB |",
            "|---|---|" + "---:|" * 9,
        ]
        for s, row in drive_rows:
            runs = str(row["runs"]) + (f" ({row['failures']} failed)" if row["failures"] else "")
            per_run = row.get("drive_per_run") or []
            med = row.get("drive_median") or {}
            peak = med.get("peak_buffer_bytes")
            drive_lines.append(
                f"| {s['name']} | {row['mode']} mode | {runs}"
                f" | {_fmt(row['median_seconds'], '.3f')} | {_fmt(row['mb_per_s'], ',.1f')}"
                f" | {_spread([d['back_hitches'] if d else None for d in per_run])}"
                f" | {_fmt(med.get('seconds_streaming'), '.2f')}"
                f" | {_fmt(med.get('seconds_stopped'), '.2f')}"
                f" | {_fmt(med.get('seconds_repositioning'), '.2f')}"
                f" | {_fmt(med.get('mean_streaming_mb_per_s'), ',.1f')}"
                f" | {_fmt(peak / MiB if peak is not None else None, ',.0f')} |"
            )

    notes = [
        "Ratio: floor median / job median (above 1 is faster than the floor). Backups are "
        "compared with the tar pipeline, verify with `openssl dgst`. **Restore's ratio is "
        "restore MB/s ÷ single-tape backup MB/s** (same set, same invocation; above 1 restores "
        "faster than it backs up). Plan, one-file restore and the drive feeds have no ratio.",
        "",
        "CPU s: median user + system CPU seconds of the command and every process it waited "
        "for (the floor's whole pipeline); above its median s, more than one core was busy.",
        "",
        "Every job starts with its input in the page cache: the source for the backups, the "
        "containers for openssl, the whole tape (containers and catalog) for verify. \"Its "
        "catalog from disk\" is verify with the catalog dropped from the cache first, read from "
        "the disk as from a tape.",
        "",
    ]
    skipped = [s["name"] for s in sets for row in s["jobs"] if row.get("skipped")]
    if skipped:
        notes[-1:-1] = [
            "",
            f"Full restore not timed for {', '.join(skipped)} (not in `--restore-sets`, to keep "
            "the run near 30 minutes: the million-file restore takes ~12 min a run); "
            "`bench/run.py --sets scale --restore-sets scale --runs 1` times it on its own.",
        ]
    for s in sets:
        st, mt = s["single_tape"], s["multi_tape"]
        notes.append(
            f"- **{s['name']}**: {s['files']:,} files, {s['bytes'] / MB:,.1f} MB"
            f"{' (sparse)' if s['sparse'] else ''}, size factor {s['scale_factor']}; "
            f"1 tape: capacity {st['capacity_tb']} TB, containers {st['container_size_gb']} GB; "
            f"multi-tape: capacity {mt['capacity_tb']} TB, containers {mt['container_size_gb']} GB"
        )
        if (feed := s.get("drive_feed")) is not None:
            notes.append(
                f"  - drive feed: {feed['drive']}, native capacity, one container of "
                f"{feed['container_size_gb']} GB"
            )
        for row in s["jobs"]:
            if row["job"] == RESTORE_ONE:
                files = [f for f in row.get("file_per_run") or [] if f]
                if files:
                    f = files[-1]
                    notes.append(
                        f"  - one-file restore: `{f['relative_path']}` "
                        f"({f['size_bytes'] / MB:,.2f} MB) on tape {f['tape_number']} of "
                        f"{f['tapes_in_set']}; times are wall seconds for the whole command "
                        f"(catalog load, tape mount, seek and read)"
                    )
        notes.extend(f"  - warning: {w}" for w in s["warnings"])
    parts = ["\n".join(lines)]
    if drive_lines:
        parts.append("\n".join(drive_lines))
    parts.append("\n".join(notes))
    return "\n\n".join(parts) + "\n"


def _first_line(cmd: list[str]) -> str | None:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    text = (out.stdout or out.stderr).strip()
    return text.splitlines()[0] if out.returncode == 0 and text else None


def source_state() -> dict[str, Any]:
    """The commit and the uncommitted changes of ltoflow's checkout (an editable install
    runs whatever is in it, so a commit during the run changes what is measured)."""
    repo = str(Path(__file__).resolve().parent.parent)
    proc = subprocess.run(
        ["git", "-C", repo, "status", "--porcelain", "--", "ltoflow", "pyproject.toml"],
        capture_output=True,
        text=True,
        check=False,
    )
    return {
        "commit": _first_line(["git", "-C", repo, "rev-parse", "HEAD"]),
        "uncommitted": proc.stdout.splitlines() if proc.returncode == 0 else None,
    }


def machine_info(workdir: Path, ltoflow: str) -> dict[str, Any]:
    cpu_model = None
    meminfo: dict[str, int] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
        for line in Path("/proc/meminfo").read_text().splitlines():
            key, _, rest = line.partition(":")
            if rest.strip().endswith("kB"):
                meminfo[key] = int(rest.split()[0])
    except OSError:
        pass
    repo = Path(__file__).resolve().parent.parent
    return {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "hostname": platform.node(),
        "nproc": len(os.sched_getaffinity(0)),
        "cpu_count": os.cpu_count(),
        "cpu_model": cpu_model,
        "mem_total_kib": meminfo.get("MemTotal"),
        "mem_available_kib": meminfo.get("MemAvailable"),
        "kernel": platform.release(),
        "kernel_version": platform.version(),
        "python": platform.python_version(),
        "python_executable": sys.executable,
        "ltoflow": ltoflow,
        "git_commit": _first_line(["git", "-C", str(repo), "rev-parse", "HEAD"]),
        "workdir": str(workdir),
        "workdir_fs": _first_line(["stat", "-f", "-c", "%T", str(workdir)]),
        "tar": _first_line(["tar", "--version"]),
        "openssl": _first_line(["openssl", "version"]),
        "peak_rss_method": "/usr/bin/time -f %M" if os.access(TIME_BIN, os.X_OK) else "wait4",
        # how ltoflow's simulator writes its tapes (the floor's tee: through the page cache)
        "simulator_writes": ("through the page cache"
                             if os.environ.get("LTOFLOW_SIM_DIRECT", "1") == "0"
                             else "O_DIRECT where the filesystem takes it"),
    }


# --------------------------------------------------------------------------- main


def compile_bytecode(ltoflow: str) -> str:
    """Byte-compile the ltoflow package the command runs, as `pip install` does for a regular
    install. An editable install compiles on first use and keeps the result, unless
    PYTHONDONTWRITEBYTECODE is set (it is in some sandboxes): then every command compiled
    ltoflow's sources again, 0.1-0.2 s of each job's start-up that no installed copy pays."""
    # The interpreter beside the command (a venv's), else this one; run away from any
    # checkout in the current directory, so the package found is the one the command runs.
    sibling = Path(ltoflow).parent / "python"
    python = str(sibling) if sibling.exists() else sys.executable
    where = subprocess.run(
        [python, "-c", "import ltoflow, os; print(os.path.dirname(ltoflow.__file__))"],
        capture_output=True, text=True, check=False, cwd="/",
    )
    if where.returncode != 0:
        return "not compiled (the ltoflow package was not found)"
    package = where.stdout.strip()
    done = subprocess.run([python, "-m", "compileall", "-q", package], capture_output=True,
                          text=True, check=False)
    skipped = " (PYTHONDONTWRITEBYTECODE is set)" if os.environ.get(
        "PYTHONDONTWRITEBYTECODE") else ""
    if done.returncode != 0:
        return f"compileall failed{skipped}: {_tail(done.stdout or done.stderr, 2)}"
    return f"compiled before the run{skipped}: {package}"


def default_ltoflow() -> str:
    sibling = Path(sys.executable).parent / "ltoflow"
    if sibling.exists():
        return str(sibling)
    found = shutil.which("ltoflow")
    if found is None:
        raise SystemExit("ltoflow not found: pass --ltoflow PATH")
    return found


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument(
        "--sets",
        default=",".join(datasets.NAMES),
        help=f"comma-separated, from {','.join(datasets.NAMES)} (default: all)",
    )
    p.add_argument("--runs", type=int, default=3, help="timed runs of each job (default 3)")
    p.add_argument(
        "--size-factor",
        type=float,
        default=1.0,
        help="scale data set sizes/counts, e.g. 0.05 for a quick run (default 1.0)",
    )
    p.add_argument(
        "--workdir",
        type=Path,
        default=DEFAULT_WORKDIR,
        help=f"data sets (kept, reused) and outputs (default {DEFAULT_WORKDIR})",
    )
    p.add_argument(
        "--json",
        type=Path,
        default=None,
        dest="json_out",
        help="write results here (default WORKDIR/results/bench-DATE.json)",
    )
    p.add_argument("--ltoflow", default=None, help="ltoflow executable (default: the venv's)")
    p.add_argument(
        "--restore-sets",
        default=",".join(DEFAULT_RESTORE_SETS),
        help="sets whose full restore is timed, --runs times each (default: "
        f"{','.join(DEFAULT_RESTORE_SETS)}; the million-file scale restore takes ~12 min a "
        "run; 'none' for no set)",
    )
    p.add_argument(
        "--buffer-mb",
        type=int,
        default=None,
        help="pass --buffer-mb to ltoflow backup (default: ltoflow's own)",
    )
    args = p.parse_args(argv)
    args.set_names = [s.strip() for s in args.sets.split(",") if s.strip()]
    args.restore_set_names = frozenset(
        s.strip() for s in args.restore_sets.split(",") if s.strip() and s.strip() != "none"
    )
    if unknown_restore := sorted(args.restore_set_names - set(datasets.NAMES)):
        p.error(f"unknown --restore-sets {unknown_restore}; "
                f"choose from {', '.join(datasets.NAMES)}")
    unknown = [s for s in args.set_names if s not in datasets.NAMES]
    if unknown or not args.set_names:
        p.error(f"unknown set(s) {unknown}; choose from {', '.join(datasets.NAMES)}")
    if args.runs < 1:
        p.error("--runs must be at least 1")
    if not args.size_factor > 0:
        p.error("--size-factor must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    for tool in ("bash", "tar", "tee", "openssl", "find", "xargs", "cat"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is required")
    workdir: Path = args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    cfg = Config(
        ltoflow=args.ltoflow or default_ltoflow(),
        runs=args.runs,
        buffer_mb=args.buffer_mb,
        workdir=workdir,
        restore_sets=args.restore_set_names,
    )
    machine = machine_info(workdir, cfg.ltoflow)
    machine["bytecode"] = compile_bytecode(cfg.ltoflow)
    log(f"ltoflow's bytecode: {machine['bytecode']}")
    source_start = source_state()
    if machine["workdir_fs"] == "tmpfs":
        log(f"WARNING: {workdir} is tmpfs: outputs go to RAM, not to a disk")
    if not os.access(TIME_BIN, os.X_OK):
        log(f"note: {TIME_BIN} missing (apt-get install time); peak RSS comes from wait4")

    results: list[dict[str, Any]] = []
    for name in args.set_names:
        dest = workdir / "datasets" / f"{name}-x{args.size_factor:g}"
        log(f"[{name}] data set in {dest}")
        ds = datasets.make(name, dest, args.size_factor, progress=log)
        log(
            f"[{name}] {'reused' if ds.reused else 'created'}: {ds.files:,} files, "
            f"{ds.bytes / MB:,.1f} MB"
        )
        bench = SetBench(ds, cfg)
        avail = machine["mem_available_kib"]
        if avail and not ds.sparse and ds.bytes * 2 > avail * 1024:
            bench._warn(
                "source plus one output exceed available memory: the source will "
                "not stay in the page cache"
            )
        bench.run()
        results.append(bench.summary())

    source_end = source_state()
    machine["source_at_start"], machine["source_at_end"] = source_start, source_end
    source_note = ""
    if source_start != source_end:
        source_note = (
            f"**Warning: ltoflow's source changed during the run** (commit "
            f"{source_start['commit']} at the start, {source_end['commit']} at the end, or "
            "uncommitted changes differ): later jobs may have run different code.\n\n"
        )
        log("WARNING: ltoflow's source changed during the run (see machine.source_at_*)")
    elif source_start["uncommitted"]:
        source_note = (
            "Note: ltoflow's source had uncommitted changes (machine.source_at_start).\n\n"
        )
    doc = {
        "machine": machine,
        "config": {
            "sets": args.set_names,
            "runs": args.runs,
            "size_factor": args.size_factor,
            "buffer_mb": args.buffer_mb,
            "restore_sets": sorted(cfg.restore_sets),
            "ltoflow": cfg.ltoflow,
        },
        "sets": results,
    }
    json_out: Path = args.json_out or (
        workdir / "results" / f"bench-{dt.datetime.now():%Y%m%d-%H%M%S}.json"
    )
    json_out.parent.mkdir(parents=True, exist_ok=True)
    json_out.write_text(json.dumps(doc, indent=2) + "\n")

    cpu = machine["cpu_model"] or "unknown CPU"
    print(
        f"ltoflow benchmark, {machine['date']}: {cpu}, {machine['nproc']} CPUs, "
        f"Linux {machine['kernel']}, Python {machine['python']}, "
        f"runs={args.runs}, size factor {args.size_factor:g}; simulator writes "
        f"{machine['simulator_writes']}; ltoflow's bytecode {machine['bytecode']}\n"
    )
    if source_note:
        print(source_note, end="")
    print(markdown(results))
    log(f"results written to {json_out}")
    failed = any(row["failures"] for s in results for row in s["jobs"])
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
