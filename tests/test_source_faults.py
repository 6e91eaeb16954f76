"""Source files that fail during a backup: unreadable, vanished, changed (hashing.SourceFaults).

Faults are injected at the read layer (a wrapped os.preadv that acts when it reads a given
file) or by changing the file when a given tape is loaded: no sleeps, no timing.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio

from ltoflow import api, hashing, native
from ltoflow import catalog as cat
from ltoflow.cli import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_USAGE,
    EXIT_WARNINGS,
    SUMMARY_SKIPPED,
    main,
)
from ltoflow.drives.simulator import SimulatorDrive
from ltoflow.engine import BackupResult
from ltoflow.errors import SourceFileChangedError, SourceFileVanishedError, SourceReadError
from ltoflow.hashing import MAX_REASON_BYTES, FaultPolicy, short_reason
from ltoflow.plan import Hashes, JsonPlanSizer, build_catalog
from ltoflow.progress import FileSkipped, ListReporter, LogReporter
from ltoflow.scan import ScannedFile, ScanResult, scan_tree

from .conftest import (
    REPO,
    PreadvHook,
    Raises,
    Unprivileged,
    load_catalog_json,
    rebuild_files,
    write_tree,
)
from .test_engine import KB, TREE, _TamperingDrive, config_for, run

RECOVERY = REPO / "ltoflow" / "recovery" / "restore.py"


# ----------------------------------------------------------------------------- helpers


def tape_dirs(sim: Path) -> list[Path]:
    return sorted(p for p in sim.iterdir() if p.is_dir())


async def check_invariants(sim: Path, result: BackupResult, contents: dict[str, bytes],
                     skipped: set[str]) -> Any:
    """What must hold after any backup that skipped files: the same catalog on every tape,
    every segment hash (skipped files' too) equal to the bytes on tape, verify clean, and the
    other files rebuilt exactly."""
    dirs = tape_dirs(sim)
    raw = [(d / "catalog" / "catalog.json").read_bytes() for d in dirs]
    docs = [load_catalog_json(d) for d in dirs]
    assert all(cat.Catalog.same_set_as(result.catalog.with_serials([]), c)
               for c in (cat.JsonCatalogCodec().decode(r, source="t") for r in raw))
    assert len(set(raw)) == 1, "every tape carries the same catalog"
    doc: Any = docs[0]
    tape_of = {c["container_id"]: c["tape_id"] for c in doc["containers"]}
    for s in doc["segments"]:
        blob = (sim / tape_of[s["container_id"]] / "data" / s["container_id"]).read_bytes()
        part = blob[s["container_offset"]:s["container_offset"] + s["length_bytes"]]
        assert hashlib.sha256(part).hexdigest() == s["sha256"], s["segment_id"]
    assert {k["relative_path"] for k in doc["skipped"]} == skipped
    assert {f["relative_path"] for f in doc["source_files"]} == set(contents) - skipped
    for k in doc["skipped"]:
        assert k["kind"] == "file"
        assert k["file_id"] == cat.file_id_for(k["relative_path"])
        assert any(s["file_id"] == k["file_id"] for s in doc["segments"]) or (
            len(contents[k["relative_path"]]) == 0)
    report = await api.verify_async(api.Components(drive=SimulatorDrive(sim)))
    assert report.ok, [p.describe() for p in report.problems]
    rebuilt = rebuild_files(sim, doc)
    assert rebuilt == {p: c for p, c in contents.items() if p not in skipped}
    return doc


async def backup(config: api.BackupConfig, **overrides: object) -> tuple[BackupResult,
                                                                         ListReporter]:
    reporter = ListReporter()
    result = await run(config, reporter=reporter, **overrides)
    return result, reporter


def skipped_events(reporter: ListReporter) -> dict[str, str]:
    return {e.relative_path: e.reason for e in reporter.events if isinstance(e, FileSkipped)}


# ----------------------------------------------------------------------------- the policy


@pytest.mark.parametrize(
    ("error", "default", "skip_changed", "strict"),
    [
        (SourceReadError("x", relative_path="p", what="Permission denied"), True, True, False),
        (SourceFileVanishedError("p", "it was deleted after the scan"), True, True, False),
        (SourceFileChangedError("p", "its size went from 1 to 2 bytes"), False, True, False),
    ],
    ids=["unreadable", "vanished", "changed"],
)
def test_policy_skips_unreadable_and_vanished_by_default_and_changed_on_request(
    error: SourceFileChangedError | SourceReadError, default: bool, skip_changed: bool,
    strict: bool,
) -> None:
    assert FaultPolicy().skips(error) is default
    assert FaultPolicy(skip_changed=True).skips(error) is skip_changed
    assert FaultPolicy(strict=True).skips(error) is strict


# ----------------------------------------------------------------------------- the scan probe


def test_scan_skips_a_file_this_user_cannot_read(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    write_tree(tmp_path, {"ok.txt": 3, "secret/locked.txt": 5})
    # The fault is injected into Python's os.access, which only the Python listing calls (the
    # C one asks faccessat itself; the unprivileged tests below see a real refusal).
    monkeypatch.setattr(native, "MODULE", None)
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: (
        not os.fsdecode(p).endswith("locked.txt") and real(p, mode, **kw)))
    scan = scan_tree(tmp_path)
    assert [f.relative_path for f in scan.files] == ["ok.txt"]
    (entry,) = scan.skipped
    assert (entry.relative_path, entry.kind) == ("secret/locked.txt", "file")
    assert "permission denied" in entry.reason


# ----------------------------------------------------------------------------- vanished


async def test_file_deleted_before_it_is_read_is_skipped_with_a_warning(tmp_path: Path) -> None:
    src, sim = tmp_path / "src", tmp_path / "tapes"
    contents = write_tree(src, TREE)
    config = config_for(src, sim)
    drive = _TamperingDrive(sim, config.tape_nominal_capacity_bytes, 1,
                            lambda: (src / "a" / "video.bin").unlink())
    result, reporter = await backup(config, drive=drive)
    assert len(result.tapes) >= 3
    await check_invariants(sim, result, contents, {"a/video.bin"})
    (entry,) = result.catalog.skipped
    assert entry.reason == "vanished: it was deleted after the scan"
    assert skipped_events(reporter) == {"a/video.bin": entry.reason}


async def test_file_deleted_while_being_read_is_skipped(
    tmp_path: Path, on_read: Callable[[str, PreadvHook], None]
) -> None:
    src, sim = tmp_path / "src", tmp_path / "tapes"
    contents = write_tree(src, TREE)
    on_read("b/ledger.csv", lambda n, off, buf: (src / "b" / "ledger.csv").unlink(
        missing_ok=True))
    result, _ = await backup(config_for(src, sim, capacity=10_000 * KB))
    await check_invariants(sim, result, contents, {"b/ledger.csv"})
    assert result.catalog.skipped[0].reason == "vanished: it was deleted while being read"


# ----------------------------------------------------------------------------- unreadable


async def test_io_error_while_reading_skips_the_file_and_zeros_its_bytes(
    tmp_path: Path, on_read: Callable[[str, PreadvHook], None]
) -> None:
    src, sim = tmp_path / "src", tmp_path / "tapes"
    contents = write_tree(src, TREE)

    def fail_late(n: int, offset: int, buf: memoryview) -> None:
        if offset >= 300 * KB:  # part of the file is read (and on tape) before the error
            raise OSError(errno.EIO, os.strerror(errno.EIO))

    on_read("a/video.bin", fail_late)
    result, reporter = await backup(config_for(src, sim))
    doc = await check_invariants(sim, result, contents, {"a/video.bin"})
    (entry,) = result.catalog.skipped
    assert entry.reason == "unreadable: read error: Input/output error"
    assert "a/video.bin" in skipped_events(reporter)
    video = contents["a/video.bin"]
    tape_of = {c["container_id"]: c["tape_id"] for c in doc["containers"]}
    on_tape = bytearray()
    for s in sorted((s for s in doc["segments"] if s["file_id"] == entry.file_id),
                    key=lambda s: s["source_offset"]):
        blob = (sim / tape_of[s["container_id"]] / "data" / s["container_id"]).read_bytes()
        on_tape += blob[s["container_offset"]:s["container_offset"] + s["length_bytes"]]
    # Its bytes on tape: each pass gives what it read before the file went bad, then zeros.
    assert len(on_tape) == len(video)
    assert on_tape[:KB] == video[:KB]
    assert on_tape[-KB:] == bytes(KB)
    assert all(t in (v, 0) for t, v in zip(on_tape, video, strict=True))


async def test_strict_makes_a_read_error_fatal(
    tmp_path: Path, on_read: Callable[[str, PreadvHook], None]
) -> None:
    src, sim = tmp_path / "src", tmp_path / "tapes"
    write_tree(src, TREE)

    def fail(n: int, offset: int, buf: memoryview) -> None:
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    on_read("b/ledger.csv", fail)
    with Raises(SourceReadError, match="b/ledger.csv.*Input/output error"):
        await run(attrs.evolve(config_for(src, sim), strict=True))


# ----------------------------------------------------------------------------- changed


def _grow(path: Path) -> PreadvHook:
    def hook(n: int, offset: int, buf: memoryview) -> None:
        if n == 1:
            with path.open("ab") as f:
                f.write(b"appended while being read")
    return hook


async def test_file_that_grows_while_read_fails_by_default(
    tmp_path: Path, on_read: Callable[[str, PreadvHook], None]
) -> None:
    src, sim = tmp_path / "src", tmp_path / "tapes"
    write_tree(src, TREE)
    on_read("c/scan-007.tif", _grow(src / "c" / "scan-007.tif"))
    with Raises(SourceFileChangedError, match="c/scan-007.tif.*size went"):
        await run(config_for(src, sim))


@pytest.mark.parametrize("name", ["c/scan-007.tif", "a/video.bin", "d/big.iso"],
                         ids=["on-tape-1", "across-tapes", "later-tape"])
async def test_on_change_skip_lists_a_growing_file_as_skipped(
    tmp_path: Path, on_read: Callable[[str, PreadvHook], None], name: str
) -> None:
    src, sim = tmp_path / "src", tmp_path / "tapes"
    contents = write_tree(src, TREE)
    on_read(name, _grow(src / name))
    result, reporter = await backup(attrs.evolve(config_for(src, sim), on_change="skip"))
    assert len(result.tapes) >= 3
    await check_invariants(sim, result, contents, {name})
    (entry,) = result.catalog.skipped
    assert entry.reason.startswith("changed during the backup: its size went from")
    assert set(skipped_events(reporter)) == {name}


def _rewrite_in_place(path: Path, *, at_calls: tuple[int, ...]) -> PreadvHook:
    """Its first bytes rewritten, same size, and the mtime put back (as some tools and
    `touch -d` do): only the change time tells."""
    def hook(n: int, offset: int, buf: memoryview) -> None:
        if n in at_calls:
            st = path.stat()
            with path.open("r+b") as f:
                f.write(b"X" * 100)
            os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    return hook


# A file read whole is read again once when its change time moved: rewritten at both reads.
@pytest.mark.parametrize(("name", "at_calls"), [("c/scan-007.tif", (1, 2)),
                                               ("a/video.bin", (2,))],
                         ids=["read-whole", "read-in-pieces"])
@pytest.mark.parametrize("on_change", ["fail", "skip"])
async def test_a_file_rewritten_in_place_while_read_with_its_mtime_put_back_is_caught(
    tmp_path: Path, on_read: Callable[[str, PreadvHook], None], name: str,
    at_calls: tuple[int, ...], on_change: str,
) -> None:
    """Same size, same mtime: the bytes read may be half old, half new. The change time,
    taken as it is opened and once read, tells; never a torn file on tape, reported clean."""
    src, sim = tmp_path / "src", tmp_path / "tapes"
    contents = write_tree(src, TREE)
    on_read(name, _rewrite_in_place(src / name, at_calls=at_calls))
    # One tape: one pass reads it (two passes would also tell the change by its hashes).
    config = attrs.evolve(config_for(src, sim, capacity=10_000 * KB), on_change=on_change)
    if on_change == "fail":
        with Raises(SourceFileChangedError, match=f"{name}.*its change time moved"):
            await run(config)
        return
    result, _ = await backup(config)
    await check_invariants(sim, result, contents, {name})
    (entry,) = result.catalog.skipped
    assert entry.reason == "changed during the backup: its change time moved while it was read"


@pytest.mark.parametrize("change", ["rewritten", "hard-linked"])
async def test_a_file_read_whole_whose_change_time_moved_once_is_read_again(
    tmp_path: Path, on_read: Callable[[str, PreadvHook], None], change: str,
) -> None:
    """A small file read whole is read once more when its change time moved: the bytes of a
    read it stood still for go to tape (the new ones, after a rewrite), and a hard link made
    meanwhile (its content the same) is no change at all."""
    src, sim = tmp_path / "src", tmp_path / "tapes"
    contents = write_tree(src, TREE)
    name = "c/scan-007.tif"
    if change == "rewritten":
        on_read(name, _rewrite_in_place(src / name, at_calls=(1,)))
    else:
        on_read(name, lambda n, off, buf: (src / "link").hardlink_to(src / name)
                if n == 1 else None)
    result, _ = await backup(config_for(src, sim, capacity=10_000 * KB))
    assert result.catalog.skipped == ()
    contents[name] = (src / name).read_bytes()
    if change == "hard-linked":
        assert contents[name] == write_tree(tmp_path / "again", TREE)[name]
    await check_invariants(sim, result, contents, set())


@pytest.fixture
def ticking_mount(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """(a directory to fill, its FUSE view where each `*.ticking` file has a new change time
    at every stat: tests/fakes/ticking.py), unmounted at the end."""
    from tests.fakes.harness import require_fuse

    require_fuse()
    real, view = tmp_path / "real", tmp_path / "view"
    real.mkdir()
    view.mkdir()
    rfd, wfd = os.pipe()
    server = subprocess.Popen(
        [sys.executable, "-m", "tests.fakes.ticking", str(real), str(view), str(wfd)],
        cwd=REPO, pass_fds=(wfd,), stderr=subprocess.PIPE)
    os.close(wfd)
    try:
        with os.fdopen(rfd, "rb") as ready:  # "ok" once mounted; EOF if the server died
            assert ready.read(2) == b"ok", server.stderr.read() if server.stderr else ""
        yield real, view
    finally:
        ctypes.CDLL(None, use_errno=True).umount2(str(view).encode(), 2)  # MNT_DETACH
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        if server.stderr is not None:
            server.stderr.close()


def test_the_c_loop_takes_no_file_whose_change_time_moves_as_it_is_read(
    ticking_mount: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    """The C loop reads most small files; one whose change time differs after its read from
    the one it had when opened (written in place, its mtime put back) is left to the Python
    loop, which reads it again and says it changed. Without the C loop's check its torn bytes
    would go to tape and the backup end clean."""
    if native.MODULE is None:
        pytest.skip("ltoflow._native is not built here")
    real, view = ticking_mount
    write_tree(real, {"a.bin": 3000, "b.ticking": 5000, "c.bin": 7000})
    code = main(["backup", "--source", str(view), "--simulator", str(tmp_path / "tapes"),
                 "--capacity-tb", "0.001", "--container-size-gb", "0.001", "--quiet"])
    assert code == EXIT_FAILED
    assert "'b.ticking' changed during the backup (its change time moved while it was read)" \
        in capsys.readouterr().err


async def test_content_differing_between_prehash_and_tape_one_is_skipped(
    tmp_path: Path, on_read: Callable[[str, PreadvHook], None],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """a/video.bin spans tapes 1-3: the prehasher and tape 1's writer both read its first
    bytes. Each read here sees other bytes (same size and mtime), so the passes disagree.
    (The hook changes it during a read, which its change time would tell first; a change
    between two passes shows only in their hashes, so the change time is not checked here.)"""
    real = hashing._check_stat
    monkeypatch.setattr(hashing, "_check_stat",
                        lambda files, i, st, _: real(files, i, st, st.st_ctime_ns))
    src, sim = tmp_path / "src", tmp_path / "tapes"
    contents = write_tree(src, TREE)
    path = src / "a" / "video.bin"
    st = path.stat()

    def scramble(n: int, offset: int, buf: memoryview) -> None:
        with path.open("r+b") as f:
            for at in (0, st.st_size - 8):  # its tape 1 part and its last tape's part
                f.seek(at)
                f.write(n.to_bytes(8, "big"))
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))

    on_read("a/video.bin", scramble)
    config = attrs.evolve(config_for(src, sim), on_change="skip")
    with trio.fail_after(60):  # a file that keeps changing ends neither in a hang nor a spin
        result, _ = await backup(config)
    contents["a/video.bin"] = path.read_bytes()
    doc = await check_invariants(sim, result, contents, {"a/video.bin"})
    (entry,) = result.catalog.skipped
    assert entry.reason == "changed during the backup: its content differs between two reads"
    # Found out before tape 1's catalog: its bytes on the later tapes became zeros, so those
    # tapes never needed it again (it kept changing).
    tape_of = {c["container_id"]: c["tape_id"] for c in doc["containers"]}
    later = [s for s in doc["segments"] if s["file_id"] == entry.file_id
             and tape_of[s["container_id"]] != result.tapes[0].tape_id]
    assert later
    for s in later:
        assert s["sha256"] == hashlib.sha256(bytes(s["length_bytes"])).hexdigest()


async def test_change_after_tape_one_catalog_fails_even_with_on_change_skip(
    tmp_path: Path,
) -> None:
    src, sim = tmp_path / "src", tmp_path / "tapes"
    write_tree(src, TREE)
    config = attrs.evolve(config_for(src, sim), on_change="skip")
    path = src / "d" / "big.iso"
    drive = _TamperingDrive(sim, config.tape_nominal_capacity_bytes, 3,
                            lambda: path.write_bytes(path.read_bytes()[:-10]))
    with Raises(SourceFileChangedError,
                match="d/big.iso.*tape 1's catalog already holds its hashes"):
        await run(config, drive=drive)


@pytest.mark.parametrize("on_change", ["fail", "skip"])
async def test_fifo_swapped_in_for_a_file_never_blocks(tmp_path: Path, on_change: str) -> None:
    src, sim = tmp_path / "src", tmp_path / "tapes"
    contents = write_tree(src, TREE)
    path = src / "b" / "ledger.csv"

    def swap() -> None:
        path.unlink()
        os.mkfifo(path)

    config = attrs.evolve(config_for(src, sim, capacity=10_000 * KB), on_change=on_change)
    drive = _TamperingDrive(sim, config.tape_nominal_capacity_bytes, 1, swap)
    with trio.fail_after(60):
        if on_change == "fail":
            with Raises(SourceFileChangedError, match="b/ledger.csv.*no longer a regular file"):
                await run(config, drive=drive)
            return
        result, _ = await backup(config, drive=drive)
    await check_invariants(sim, result, contents, {"b/ledger.csv"})


async def test_symlink_swapped_in_for_a_file_is_not_followed(tmp_path: Path) -> None:
    src, sim = tmp_path / "src", tmp_path / "tapes"
    contents = write_tree(src, TREE)
    (tmp_path / "elsewhere").write_bytes(b"not part of the backup")
    path = src / "b" / "ledger.csv"

    def swap() -> None:
        path.unlink()
        path.symlink_to(tmp_path / "elsewhere")

    config = attrs.evolve(config_for(src, sim, capacity=10_000 * KB), on_change="skip")
    drive = _TamperingDrive(sim, config.tape_nominal_capacity_bytes, 1, swap)
    result, _ = await backup(config, drive=drive)
    await check_invariants(sim, result, contents, {"b/ledger.csv"})
    assert result.catalog.skipped[0].reason == (
        "changed during the backup: it was replaced by a symbolic link")


# ----------------------------------------------------------------------------- restore


async def test_restore_and_recovery_script_never_build_a_skipped_file(
    tmp_path: Path, on_read: Callable[[str, PreadvHook], None]
) -> None:
    src, sim = tmp_path / "src", tmp_path / "tapes"
    contents = write_tree(src, TREE)

    def fail(n: int, offset: int, buf: memoryview) -> None:
        if offset > 0:
            raise OSError(errno.EIO, os.strerror(errno.EIO))

    on_read("a/video.bin", fail)
    result, _ = await backup(config_for(src, sim))
    await check_invariants(sim, result, contents, {"a/video.bin"})

    target = tmp_path / "restored"
    components = api.Components(drive=SimulatorDrive(sim))
    report = await api.restore_async(components, target)
    assert report.ok
    assert [s.relative_path for s in report.skipped] == ["a/video.bin"]
    assert not (target / "a" / "video.bin").exists()
    assert (target / "b" / "ledger.csv").read_bytes() == contents["b/ledger.csv"]
    # Asking for it by name lists it as skipped rather than "nothing matches".
    only = await api.restore_async(components, tmp_path / "only", ["a/video.bin"])
    assert (only.requested, [s.relative_path for s in only.skipped]) == (0, ["a/video.bin"])

    kit = tmp_path / "kit"
    with trio.fail_after(120):
        done = await trio.run_process(
            [sys.executable, "-I", str(RECOVERY), "--target", str(kit),
             *map(str, tape_dirs(sim))],
            capture_stdout=True, capture_stderr=True, check=False)
    assert done.returncode == 4, done.stderr  # nothing failed; a selected entry is not on tape
    assert b"skipped by the backup, not restored: a/video.bin (file): unreadable" in done.stdout
    assert b"; 0 failed; 1 selected entry skipped by the backup, not in it (listed above)\n" \
        in done.stdout
    assert not (kit / "a" / "video.bin").exists()
    assert (kit / "b" / "ledger.csv").read_bytes() == contents["b/ledger.csv"]
    with trio.fail_after(120):  # a selection without it is a success
        done = await trio.run_process(
            [sys.executable, "-I", str(RECOVERY), "--target", str(tmp_path / "kit-b"),
             "--only", "b", *map(str, tape_dirs(sim))],
            capture_stdout=True, capture_stderr=True, check=False)
    assert done.returncode == 0, done.stderr
    assert b"skipped by the backup" not in done.stdout


# ----------------------------------------------------------------------------- odd names, deep


ODD = b"odd-\xff\xfe.bin"


async def test_unreadable_file_with_a_name_that_is_not_utf8_is_skipped_under_a_readable_name(
    tmp_path: Path, on_read: Callable[[str, PreadvHook], None]
) -> None:
    src, sim = tmp_path / "src", tmp_path / "tapes"
    contents = write_tree(src, {"ok.txt": 3_000})
    write_tree(src, {os.fsdecode(ODD): 150 * KB})

    def fail_late(n: int, offset: int, buf: memoryview) -> None:
        if offset >= 64 * KB:
            raise OSError(errno.EIO, os.strerror(errno.EIO))

    on_read(os.fsdecode(ODD), fail_late)
    result, reporter = await backup(config_for(src, sim))

    (entry,) = result.catalog.skipped
    assert (entry.relative_path, entry.kind) == ("odd-\\xff\\xfe.bin", "file")
    assert entry.reason == "unreadable: read error: Input/output error"
    assert entry.file_id == cat.file_id_for(ODD) != cat.file_id_for(entry.relative_path)
    assert skipped_events(reporter) == {entry.relative_path: entry.reason}
    doc: Any = load_catalog_json(tape_dirs(sim)[0])
    assert [f["relative_path"] for f in doc["source_files"]] == ["ok.txt"]
    assert sum(s["length_bytes"] for s in doc["segments"]
               if s["file_id"] == entry.file_id) == 150 * KB
    report = await api.verify_async(api.Components(drive=SimulatorDrive(sim)))
    assert report.ok, [p.describe() for p in report.problems]
    assert rebuild_files(sim, doc) == contents

    # Asked for by its exact bytes (as a shell passes the name), it is listed, not restored.
    components = api.Components(drive=SimulatorDrive(sim))
    only = await api.restore_async(components, tmp_path / "only", [os.fsdecode(ODD)])
    assert (only.requested, only.skipped) == (0, (entry,))
    assert not (tmp_path / "only").exists() or not any((tmp_path / "only").iterdir())
    with trio.fail_after(120):
        done = await trio.run_process(
            [sys.executable, "-I", str(RECOVERY), "--target", str(tmp_path / "kit"),
             "--only", ODD, *map(str, tape_dirs(sim))],
            capture_stdout=True, capture_stderr=True, check=False)
    assert done.returncode == 4, done.stderr  # all it selected is not on tape
    assert (b"skipped by the backup, not restored: odd-\\xff\\xfe.bin (file): unreadable"
            in done.stdout)
    assert not (tmp_path / "kit").exists()  # nothing else was asked for


def _deep_fd(root: Path, parts: list[bytes]) -> tuple[int, Callable[[], None]]:
    """The descriptor of the directory `root/parts...` (made if missing), and its closer."""
    from ltoflow.paths import DirFds

    dirs = DirFds(os.open(root, os.O_RDONLY | os.O_DIRECTORY), create=True)

    def close() -> None:
        dirs.close()
        os.close(dirs.root_fd)

    return dirs.open(tuple(parts)), close


async def test_file_deeper_than_path_max_that_vanishes_is_skipped(tmp_path: Path) -> None:
    from .conftest import DEEP

    src, sim = tmp_path / "src", tmp_path / "tapes"
    contents = write_tree(src, {"top.txt": 2_000})
    kept, gone = os.urandom(100 * KB), os.urandom(100 * KB)
    fd, close = _deep_fd(src, DEEP)
    for name, data in ((b"gone.bin", gone), (b"kept.bin", kept)):
        f = os.open(name, os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd)
        os.write(f, data)
        os.close(f)
    close()
    deep = b"/".join(DEEP)
    assert len(os.fsencode(src)) + len(deep) > 4096

    def unlink() -> None:
        fd, close = _deep_fd(src, DEEP)
        os.unlink(b"gone.bin", dir_fd=fd)
        close()

    config = config_for(src, sim, capacity=2_000 * KB)  # the deep paths' catalog
    drive = _TamperingDrive(sim, config.tape_nominal_capacity_bytes, 1, unlink)
    result, reporter = await backup(config, drive=drive)

    (entry,) = result.catalog.skipped
    assert entry.relative_path == os.fsdecode(deep + b"/gone.bin")
    assert entry.reason == "vanished: it was deleted after the scan"
    assert entry.file_id == cat.file_id_for(deep + b"/gone.bin")
    assert skipped_events(reporter) == {entry.relative_path: entry.reason}
    report = await api.verify_async(api.Components(drive=SimulatorDrive(sim)))
    assert report.ok, [p.describe() for p in report.problems]
    doc: Any = load_catalog_json(tape_dirs(sim)[0])
    assert rebuild_files(sim, doc) == {**contents, os.fsdecode(deep + b"/kept.bin"): kept}


async def test_deep_directory_replaced_by_a_symlink_is_not_followed(tmp_path: Path) -> None:
    """Past PATH_MAX a file is opened through directory descriptors: a directory on its way
    swapped for a symlink after the scan is noticed (never followed) and, with
    --on-change=skip, the file is skipped."""
    from .conftest import DEEP

    src, sim = tmp_path / "src", tmp_path / "tapes"
    contents = write_tree(src, {"top.txt": 2_000})
    fd, close = _deep_fd(src, DEEP)
    f = os.open(b"leaf.bin", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd)
    os.write(f, b"secret" * 1000)
    os.close(f)
    close()

    def swap() -> None:
        fd, close = _deep_fd(src, DEEP[:200])
        os.rename(DEEP[200], b"moved", src_dir_fd=fd, dst_dir_fd=fd)
        os.symlink(b"moved", DEEP[200], dir_fd=fd)
        close()

    config = attrs.evolve(config_for(src, sim, capacity=2_000 * KB), on_change="skip")
    drive = _TamperingDrive(sim, config.tape_nominal_capacity_bytes, 1, swap)
    result, _ = await backup(config, drive=drive)
    (entry,) = result.catalog.skipped
    assert entry.relative_path.endswith("/leaf.bin")
    assert entry.reason == "vanished: a directory on its path was replaced by a symbolic link"
    doc: Any = load_catalog_json(tape_dirs(sim)[0])
    assert rebuild_files(sim, doc) == contents


async def test_directory_replaced_by_a_symlink_is_not_followed(tmp_path: Path) -> None:
    """Short paths too: every file is opened relative to its directory's descriptor, and
    directories are opened one component at a time without following symlinks, so a
    directory swapped for a symlink to another tree after the scan is never read through."""
    src, sim = tmp_path / "src", tmp_path / "tapes"
    contents = write_tree(src, {"a/b/leaf.bin": 3_000, "top.txt": 2_000})
    decoy = tmp_path / "decoy"
    (decoy / "b").mkdir(parents=True)
    (decoy / "b" / "leaf.bin").write_bytes(b"not part of the backup" * 100)

    def swap() -> None:
        (src / "a").rename(tmp_path / "moved")
        (src / "a").symlink_to(decoy)

    config = config_for(src, sim, capacity=2_000 * KB)  # vanished: skipped by default
    drive = _TamperingDrive(sim, config.tape_nominal_capacity_bytes, 1, swap)
    result, _ = await backup(config, drive=drive)
    (entry,) = result.catalog.skipped
    assert entry.relative_path == "a/b/leaf.bin"
    assert entry.reason == "vanished: a directory on its path was replaced by a symbolic link"
    doc: Any = load_catalog_json(tape_dirs(sim)[0])
    del contents["a/b/leaf.bin"]
    assert rebuild_files(sim, doc) == contents


# ----------------------------------------------------------------------------- catalog size


def test_moving_any_file_to_skipped_never_outgrows_the_planned_catalog(tmp_path: Path) -> None:
    """The reserve is measured before writing; a skip must never make the catalog larger,
    even for the shortest names, the longest reason and every file skipped at once."""
    names = ["a", "é", "x" * 200, "quote\"d", "ctl\x01", "d/" * 40 + "f"]
    files = tuple(ScannedFile(n, size, 0, 0o100000) for n, size in
                  zip(names, [0, 1, 10**12, 7, 3, 5], strict=True))
    scan = ScanResult(tmp_path, files, ())
    from ltoflow.plan import make_plan

    sizer = JsonPlanSizer(cat.JsonCatalogCodec(), "ltoflow 0.1.0")
    plan = make_plan(scan, capacity_bytes=10**13, container_size_bytes=10**11,
                     measure_catalog=sizer)
    reason = short_reason("changed during the backup: " + "its size went from 1 to 2 " * 20)
    assert len(reason.encode()) <= MAX_REASON_BYTES
    codec = cat.JsonCatalogCodec()

    def size(unusable: dict[int, str]) -> int:
        return cat.encoded_size(codec, build_catalog(
            plan, Hashes.placeholders(plan), set_id="0" * 36, created_at="x" * 32,
            created_by="ltoflow 0.1.0", serial=cat.PLACEHOLDER_VOLUME_SERIAL,
            unusable=unusable))

    planned = sizer(plan)
    assert size({}) == planned
    for i in range(len(files)):
        assert size({i: reason}) < planned
    assert size(dict.fromkeys(range(len(files)), reason)) < planned


def test_skip_reasons_are_bounded_and_need_no_json_escapes() -> None:
    reason = short_reason('päth "quoted" \\ \x00 ' * 20)
    assert len(reason.encode()) <= MAX_REASON_BYTES
    assert reason.endswith("...")
    assert json.dumps(reason, ensure_ascii=False)[1:-1] == reason


# ----------------------------------------------------------------------------- reporting


def test_log_reporter_prints_a_warning_per_skipped_file() -> None:
    import io

    line = "warning: skipping a/b.txt: vanished: it was deleted after the scan\n"
    for quiet in (False, True):  # --quiet and --json say warnings all the same
        out = io.StringIO()
        LogReporter(out, quiet=quiet).event(
            FileSkipped("a/b.txt", "vanished: it was deleted after the scan"))
        assert out.getvalue() == line


# ----------------------------------------------------------------------------- the command line


def cli(capsys: pytest.CaptureFixture[str], *args: str | Path) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


SMALL = ["--capacity-tb", "0.0000003", "--container-size-gb", "0.00005"]


def test_strict_refuses_before_writing_anything(tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    src, sim = tmp_path / "src", tmp_path / "tapes"
    write_tree(src, {"a/one.bin": 1_000})
    os.mkfifo(src / "a" / "pipe")
    code, _, err = cli(capsys, "backup", "--source", src, "--simulator", sim, *SMALL,
                       "--strict")
    assert code == EXIT_FAILED
    (line,) = err.splitlines()
    assert "--strict: 1 entry" in line
    assert "'a/pipe' (fifo: not a regular file)" in line
    assert "nothing was written" in line
    assert not sim.exists() or not any(sim.iterdir())


def test_summary_counts_skipped_entries_and_names_the_first_few(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src, sim = tmp_path / "src", tmp_path / "tapes"
    write_tree(src, {"a/one.bin": 1_000})
    for i in range(SUMMARY_SKIPPED + 3):
        os.mkfifo(src / f"pipe-{i:02d}")
    code, out, _ = cli(capsys, "backup", "--source", src, "--simulator", sim, *SMALL)
    assert code == EXIT_WARNINGS
    assert (f"{SUMMARY_SKIPPED + 3} entries skipped (listed in the catalog; see "
            "`ltoflow catalog show`):") in out
    assert out.count("  skipped pipe-") == SUMMARY_SKIPPED
    assert "  ... and 3 more" in out
    code, out, _ = cli(capsys, "catalog", "--simulator", sim, "show")
    assert code == EXIT_OK
    assert out.count("    pipe-") == SUMMARY_SKIPPED + 3


def test_json_summary_and_log_carry_a_file_skipped_mid_backup(
    tmp_path: Path, capsys: pytest.CaptureFixture[str],
    on_read: Callable[[str, PreadvHook], None],
) -> None:
    src, sim = tmp_path / "src", tmp_path / "tapes"
    write_tree(src, {"a/one.bin": 1_000, "b/two.bin": 2_000})

    def fail(n: int, offset: int, buf: memoryview) -> None:
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    on_read("b/two.bin", fail)
    code, out, err = cli(capsys, "backup", "--source", src, "--simulator", sim, *SMALL,
                         "--json")
    assert code == EXIT_WARNINGS
    assert "warning: skipping b/two.bin" in err
    doc = json.loads(out)
    assert doc["files"] == 1
    assert doc["skipped"] == [{
        "relative_path": "b/two.bin", "kind": "file",
        "reason": "unreadable: read error: Input/output error",
        "file_id": cat.file_id_for("b/two.bin"),
    }]
    code, out, err = cli(capsys, "backup", "--source", src, "--simulator", tmp_path / "t2",
                         *SMALL)
    assert code == EXIT_WARNINGS
    assert "warning: skipping b/two.bin: unreadable: read error: Input/output error" in err


def test_on_change_takes_fail_or_skip(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["backup", "--source", str(tmp_path), "--simulator", str(tmp_path / "t"),
              *SMALL, "--on-change", "ignore"])
    assert exit_.value.code == EXIT_USAGE
    err = capsys.readouterr().err
    assert "invalid choice: 'ignore'" in err


# ----------------------------------------------------------------------------- as nobody


def test_unreadable_file_is_skipped_for_an_unprivileged_user(unprivileged: Unprivileged) -> None:
    src, sim = unprivileged.base / "src", unprivileged.base / "tapes"
    write_tree(src, {"open.txt": 100, "locked.txt": 200})
    for p in (src, *src.iterdir()):
        p.chmod(0o755 if p.is_dir() else 0o644)
    (src / "locked.txt").chmod(0o000)
    done = unprivileged.ltoflow("backup", "--source", src, "--simulator", sim, *SMALL, "--json")
    assert done.returncode == EXIT_WARNINGS, done.stderr
    doc = json.loads(done.stdout)
    assert doc["files"] == 1
    assert [(s["relative_path"], s["reason"]) for s in doc["skipped"]] == [
        ("locked.txt", "permission denied: this user cannot read it")]
    done = unprivileged.ltoflow("backup", "--source", src, "--simulator",
                                unprivileged.base / "t2", *SMALL, "--strict")
    assert done.returncode == EXIT_FAILED
    assert "'locked.txt' (file: permission denied" in done.stderr
    assert "Traceback" not in done.stderr
    assert not (unprivileged.base / "t2").exists()


def test_file_made_unreadable_after_the_scan_is_skipped(unprivileged: Unprivileged) -> None:
    """The scan saw it readable; by the time it is opened it is not: skipped, exit 4."""
    src = unprivileged.base / "src"
    write_tree(src, {"a.txt": 100, "b.txt": 200})
    for p in (src, *src.iterdir()):
        p.chmod(0o755 if p.is_dir() else 0o644)
    script = (
        "import os, sys, ltoflow.scan as s\n"
        "real = s.scan_tree\n"
        "def scan(root):\n"
        "    r = real(root); os.chmod(os.path.join(root, 'b.txt'), 0); return r\n"
        "s.scan_tree = scan\n"
        "import ltoflow.api as a; a.scan_tree = scan\n"
        "from ltoflow.cli import main; sys.exit(main(sys.argv[1:]))\n"
    )
    done = subprocess.run(
        [*unprivileged.prefix, sys.executable, "-I", "-c", script, "backup", "--source",
         str(src), "--simulator", str(unprivileged.base / "tapes"), *SMALL, "--json"],
        capture_output=True, text=True, check=False, timeout=120, cwd="/",
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)})
    assert done.returncode == EXIT_WARNINGS, done.stderr
    (skipped,) = json.loads(done.stdout)["skipped"]
    assert skipped["relative_path"] == "b.txt"
    assert skipped["reason"] == "unreadable: Permission denied"


def test_files_in_a_directory_this_user_may_only_search_are_backed_up(
    unprivileged: Unprivileged,
) -> None:
    """Files are opened through directory descriptors, which need no read permission on the
    directory (O_PATH), as an open by path needs none: a directory left with only search
    permission (mode 0311) after the scan still has its files backed up."""
    src = unprivileged.base / "src"
    contents = write_tree(src, {"a/one.txt": 100, "a/two.txt": 200, "b.txt": 300})
    for p in (src, src / "a", *src.rglob("*.txt")):
        p.chmod(0o755 if p.is_dir() else 0o644)
    script = (
        "import os, sys, ltoflow.scan as s\n"
        "real = s.scan_tree\n"
        "def scan(root):\n"
        "    r = real(root); os.chmod(os.path.join(root, 'a'), 0o311); return r\n"
        "import ltoflow.api as a; a.scan_tree = scan\n"
        "from ltoflow.cli import main; sys.exit(main(sys.argv[1:]))\n"
    )
    tapes = unprivileged.base / "tapes"
    done = subprocess.run(
        [*unprivileged.prefix, sys.executable, "-I", "-c", script, "backup", "--source",
         str(src), "--simulator", str(tapes), *SMALL, "--json"],
        capture_output=True, text=True, check=False, timeout=120, cwd="/",
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)})
    (src / "a").chmod(0o755)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["skipped"] == []
    doc: Any = load_catalog_json(tape_dirs(tapes)[0])
    assert rebuild_files(tapes, doc) == contents


def test_strict_and_on_change_skip_contradict(tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = cli(capsys, "backup", "--source", tmp_path, "--simulator", tmp_path / "t",
                       *SMALL, "--strict", "--on-change", "skip")
    assert code == EXIT_USAGE
    assert "--strict allows no skipped entries" in err
