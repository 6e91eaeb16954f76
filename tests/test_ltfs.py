"""The LTFS drive against fake `ltfs`, `umount`, `fusermount` and `mt` on a real FUSE mount.

The fakes (tests/fakes) reproduce what LTFS 2.4.8 measurably does; the adapter runs exactly the
code it runs against real LTFS.
"""

from __future__ import annotations

import errno
import json
import os
import re
from pathlib import Path

import attrs
import pytest
import trio

from ltoflow import api
from ltoflow.cli import EXIT_FAILED, EXIT_OK, main
from ltoflow.drives import TapeRequest
from ltoflow.drives.ltfs import LtfsDrive, _xattr, mount_is_ltfs
from ltoflow.errors import DriveLostError, TapeFullError, TapeNotLoadedError, UsageError
from ltoflow.operator import CommandOperator, UnattendedOperator
from tests.fakes.harness import FakeLtfs

from .conftest import Raises, write_tree

MiB = 2**20
REQ = TapeRequest("TAPE-s-001", 1, "s", 1)


def config(src: Path, *, capacity: int = 60 * MiB, container: int = 1 * MiB) -> api.BackupConfig:
    return api.BackupConfig(source_root=src, tape_nominal_capacity_bytes=capacity,
                            max_container_size_bytes=container, buffer_bytes=4 * MiB)


def components(drive: LtfsDrive, operator: object = None) -> api.Components:
    return api.Components(drive=drive, operator=operator or UnattendedOperator())  # type: ignore[arg-type]


async def test_backup_to_a_cartridge_writes_syncs_unmounts_then_ejects(
    fake_ltfs: FakeLtfs, tmp_path: Path
) -> None:
    dev = fake_ltfs.cartridge("vol1", capacity_bytes=64 * MiB)
    contents = write_tree(tmp_path / "src", {f"d/f{i}": 300_000 + i for i in range(10)})
    drive = LtfsDrive(str(dev), fake_ltfs.mount_point)
    result = await api.backup_async(config(tmp_path / "src"), components(drive))
    (tape,) = result.tapes
    assert tape.volume_serial == "VOL100L9"
    on_tape = fake_ltfs.tape_files(dev)
    doc = json.loads(on_tape["catalog/catalog.json"])
    assert doc["tapes"][0]["volume_serial"] == "VOL100L9"
    assert {f"data/{c['container_id']}" for c in doc["containers"]} <= set(on_tape)
    assert "recovery/restore.py" in on_tape
    # Every container and the catalog were made durable with an index sync.
    assert fake_ltfs.syncs(dev, "Sync by EA") >= len(doc["containers"]) + 1
    assert set(fake_ltfs.indexed_files(dev)) >= {f"data/{c['container_id']}"
                                                for c in doc["containers"]}
    assert not fake_ltfs.is_mounted()
    assert fake_ltfs.is_ejected(dev)
    assert not fake_ltfs.is_corrupted(dev), "ejected only after ltfs had exited"
    rebuilt = {}
    for f in doc["source_files"]:
        segs = sorted((s for s in doc["segments"] if s["file_id"] == f["file_id"]),
                      key=lambda s: s["source_offset"])
        rebuilt[f["relative_path"]] = b"".join(
            on_tape[f"data/{s['container_id']}"][s["container_offset"]:
                                                 s["container_offset"] + s["length_bytes"]]
            for s in segs)
    assert rebuilt == contents


async def test_unload_waits_for_ltfs_to_finish_its_index(fake_ltfs: FakeLtfs) -> None:
    dev = fake_ltfs.cartridge("slow", unmount_delay_s=1.5)
    drive = LtfsDrive(str(dev), fake_ltfs.mount_point)
    tape = await drive.load(REQ)
    w = await tape.open_write("data/x")
    await w.write(b"x" * 1000)
    await w.close()
    await drive.unload()
    assert fake_ltfs.is_ejected(dev)
    assert not fake_ltfs.is_corrupted(dev)


async def test_a_cancelled_unload_still_waits_for_ltfs_and_ejects(fake_ltfs: FakeLtfs) -> None:
    """Ctrl-C while ltfs writes its index after the unmount: the unload goes on to the end
    (a tape ejected before ltfs is done may be unreadable), and only then does the cancel
    take effect."""
    dev = fake_ltfs.cartridge("t1", unmount_delay_s=0.5)
    drive = LtfsDrive(str(dev), fake_ltfs.mount_point)
    await drive.load(REQ)
    with trio.CancelScope() as interrupted:
        interrupted.cancel()
        await drive.unload()
    assert fake_ltfs.daemons() == []
    assert fake_ltfs.is_ejected(dev)


async def test_an_unload_whose_umount_hangs_gives_up_after_its_limit(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, autojump_clock: trio.abc.Clock
) -> None:
    """Not cancelled by a Ctrl-C, an unload still has a limit of its own: a `umount` of a hung
    FUSE daemon can block for good."""
    from ltoflow.drives import ltfs

    async def hung(*args: object, **kwargs: object) -> None:
        await trio.sleep_forever()

    monkeypatch.setattr(trio, "run_process", hung)
    drive = LtfsDrive("/dev/nst9", tmp_path, unmount_timeout=60)
    drive._tape = ltfs.LtfsTape(tmp_path, "", "")  # as if mounted
    started = trio.current_time()
    with trio.CancelScope() as interrupted:
        interrupted.cancel()
        with pytest.raises(TapeNotLoadedError, match=r"did not finish in 660 s .*do NOT eject"):
            await drive.unload()
    assert trio.current_time() - started == pytest.approx(660)


async def test_unload_that_times_out_never_ejects(fake_ltfs: FakeLtfs) -> None:
    dev = fake_ltfs.cartridge("stuck", unmount_delay_s=3.0)
    drive = LtfsDrive(str(dev), fake_ltfs.mount_point, unmount_timeout=0.3)
    tape = await drive.load(REQ)
    await (await tape.open_write("data/x")).close()
    with pytest.raises(TapeNotLoadedError, match=r"still writing the index .* do NOT eject"):
        await drive.unload()
    assert not fake_ltfs.is_ejected(dev)
    fake_ltfs.wait_ltfs_exit(dev)


async def test_no_eject(fake_ltfs: FakeLtfs) -> None:
    dev = fake_ltfs.cartridge("stay")
    drive = LtfsDrive(str(dev), fake_ltfs.mount_point, eject=False)
    await drive.load(REQ)
    await drive.unload()
    assert not fake_ltfs.is_ejected(dev)
    assert not fake_ltfs.is_mounted()


async def test_refused_mount_shows_the_ltfs_message(fake_ltfs: FakeLtfs) -> None:
    dev = fake_ltfs.cartridge("raw", formatted=False)
    with pytest.raises(TapeNotLoadedError, match=r"LTFS17168E.*not partitioned"):
        await LtfsDrive(str(dev), fake_ltfs.mount_point).load(REQ)


async def test_a_mount_that_is_not_ltfs_is_refused_and_nothing_is_written(
    fake_ltfs: FakeLtfs,
) -> None:
    dev = fake_ltfs.cartridge("plain", ltfs_xattrs=False)
    with pytest.raises(TapeNotLoadedError, match="not an LTFS mount"):
        await LtfsDrive(str(dev), fake_ltfs.mount_point).load(REQ)
    assert not fake_ltfs.is_mounted()
    assert os.listdir(fake_ltfs.mount_point) == []


def test_an_empty_directory_is_not_an_ltfs_mount(tmp_path: Path) -> None:
    assert not mount_is_ltfs(tmp_path)


@pytest.mark.parametrize("mode", ["write", "close"])
async def test_enospc_from_write_or_from_close_is_tape_full(fake_ltfs: FakeLtfs,
                                                            mode: str) -> None:
    dev = fake_ltfs.cartridge(f"full{mode}", capacity_bytes=64 * MiB, enospc_mode=mode,
                              enospc_after_bytes=2 * MiB)
    drive = LtfsDrive(str(dev), fake_ltfs.mount_point, eject=False)
    tape = await drive.load(REQ)
    w = await tape.open_write("data/big")

    async def write_8_mib() -> None:
        for _ in range(8):
            await w.write(b"z" * MiB)
        await w.close()

    with pytest.raises(TapeFullError, match="is full after") as info:
        await write_8_mib()
    if mode == "write":  # a short write, then ENOSPC
        assert 2 * MiB - MiB // 50 <= info.value.bytes_written <= 2 * MiB
    else:  # every write seemed to succeed; only close() said no
        assert info.value.bytes_written == 8 * MiB
    await w.abort()
    await drive.unload()


async def test_a_tape_smaller_than_planned_takes_what_fits_before_the_catalog_reserve(
    fake_ltfs: FakeLtfs, tmp_path: Path
) -> None:
    """The plan believes in 60 MiB tapes; this cartridge really holds 3 MiB. The space LTFS
    reports stops the backup before the container that would not leave room for the catalog
    (a resume then goes on with an extra tape: tests/test_resume.py)."""
    dev = fake_ltfs.cartridge("small", capacity_bytes=3 * MiB)
    write_tree(tmp_path / "src", {f"f{i}": 900_000 for i in range(6)})
    drive = LtfsDrive(str(dev), fake_ltfs.mount_point)
    with Raises(TapeFullError, match=r"filled before its planned share: it holds 2 of its 6"):
        await api.backup_async(config(tmp_path / "src"), components(drive))
    plan = api.make_backup_plan(config(tmp_path / "src"))
    on_tape = [data for p, data in sorted(fake_ltfs.tape_files(dev).items())
               if p.startswith("data/")]
    assert [len(d) for d in on_tape] == [c.size for c in plan.containers[:2]]  # whole ones
    assert not fake_ltfs.is_mounted()
    assert not fake_ltfs.is_corrupted(dev)



async def test_lost_mount_is_reported_as_the_drive_lost(fake_ltfs: FakeLtfs) -> None:
    dev = fake_ltfs.cartridge("lost")
    drive = LtfsDrive(str(dev), fake_ltfs.mount_point, eject=False)
    tape = await drive.load(REQ)
    w = await tape.open_write("data/x")
    await w.write(b"a" * 1000)
    fake_ltfs.crash(dev)

    async def more() -> None:
        await w.write(b"b" * 1000)
        await w.close()

    with pytest.raises(DriveLostError, match=r"LTFS mount at .* was lost .*clear the mount "
                       r"if it is still there \(`fusermount -u"):
        await more()
    await w.abort()
    await drive.unload()
    assert not fake_ltfs.is_mounted()


@pytest.mark.parametrize("code", [errno.ENOTCONN, errno.ECONNABORTED])
def test_a_label_read_from_a_dying_mount_is_an_error_not_a_missing_label(
        code: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """ECONNABORTED is what a request gets while the kernel tears a dead ltfs's mount down."""
    def getxattr(path: object, name: str) -> bytes:
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(os, "getxattr", getxattr)
    with pytest.raises(OSError, match=os.strerror(code)) as caught:
        _xattr(tmp_path, "user.ltfs.volumeSerial")
    assert caught.value.errno == code


def test_a_label_the_mount_does_not_have_reads_as_none(tmp_path: Path) -> None:
    assert _xattr(tmp_path, "user.ltfs.volumeSerial") is None  # ENODATA (or ENOTSUP)


async def test_a_mount_lost_while_reading_is_the_drive_lost_even_after_the_close(
        fake_ltfs: FakeLtfs) -> None:
    """verify and restore close what they read in a `finally`: closing the file of a dead
    ltfs (ENOTCONN) must not replace the drive-lost error with an internal one."""
    dev = fake_ltfs.cartridge("lost", files={"data/x": b"x" * (16 * MiB)})
    drive = LtfsDrive(str(dev), fake_ltfs.mount_point, eject=False)
    tape = await drive.load(attrs.evolve(REQ, purpose="read"))
    reader = await tape.open_read("data/x")
    buf = bytearray(10)
    assert await reader.readinto(memoryview(buf)) == 10
    fake_ltfs.crash(dev)

    async def read_then_close() -> None:
        try:
            await reader.seek(12 * MiB)  # past what the kernel may have read ahead
            await reader.readinto(memoryview(buf))
        finally:
            await reader.close()

    with pytest.raises(DriveLostError, match=r"LTFS mount at .* was lost"):
        await read_then_close()
    await drive.unload()


@pytest.mark.parametrize(("files", "told"), [
    ({"catalog/catalog.json": json.dumps({"schema_version": "2.0",
                                          "backup_set_id": "other-set"}).encode()},
     "holds backup set other-set and is never overwritten"),
    ({"README": b"mine", "projects/thesis.docx": b"draft"},
     "is not blank (it holds README, projects) and is never written to"),
    ({}, "volume FOREIGL9 is write-protected or full (LTFS mounted it read-only); "
         "write-enable it, or insert another writable tape"),
], ids=["another-set", "someones-files", "write-protected"])
async def test_a_tape_of_another_set_is_never_written_and_the_next_one_is_asked_for(
    fake_ltfs: FakeLtfs, tmp_path: Path, files: dict[str, bytes], told: str
) -> None:
    fake_ltfs.cartridge("foreign", files=files, write_protected=not files)
    fake_ltfs.cartridge("blank")
    cartridges = fake_ltfs.drives_dir
    dev = tmp_path / "nst0"
    dev.symlink_to(cartridges / "foreign")
    # The "library": the first tape it loads is the foreign one; asked again, it loads a blank.
    command = (f'if [ -n "$LTOFLOW_PROBLEM" ]; then echo "$LTOFLOW_PROBLEM" > {tmp_path}/told;'
               f' ln -sfn {cartridges}/blank {dev}; fi')
    write_tree(tmp_path / "src", {"a": 5000})
    drive = LtfsDrive(str(dev), fake_ltfs.mount_point)
    result = await api.backup_async(config(tmp_path / "src"),
                                    components(drive, CommandOperator(command)))
    assert result.tapes[0].volume_serial == "BLANK0L9"
    assert told in (tmp_path / "told").read_text()
    assert fake_ltfs.tape_files(cartridges / "foreign") == files


async def test_a_mount_left_behind_stops_the_job_without_asking_for_tapes(
        fake_ltfs: FakeLtfs, tmp_path: Path) -> None:
    """An LTFS mount an earlier job left (kill -9, a second Ctrl-C) is no reason to have the
    robot load tapes five times: the job stops at once, saying what to do."""
    dev = fake_ltfs.cartridge("t1")
    done = await trio.run_process(["ltfs", "-o", f"devname={dev}", str(fake_ltfs.mount_point)],
                                  capture_stderr=True, check=False)
    assert done.returncode == 0, done.stderr
    asked = tmp_path / "asked"
    write_tree(tmp_path / "src", {"a": 5000})
    drive = LtfsDrive(str(dev), fake_ltfs.mount_point)
    with Raises(UsageError, match=r"is already an LTFS mount \(left by an earlier job, or an "
                                  r"unmount that failed\); unmount it \(umount "):
        await api.backup_async(config(tmp_path / "src"),
                               components(drive, CommandOperator(f"echo x >> {asked}")))
    assert len(asked.read_text().splitlines()) == 1  # asked for tape 1 once, as always


def library(fake_ltfs: FakeLtfs, tmp_path: Path, capacities: list[int]) -> list[str]:
    """Cartridges t1..tN (volume serials LIB00nL9) in a "library" whose tape-change command
    points the drive at cartridge $LTOFLOW_TAPE_SEQ; the CLI flags that use it."""
    for n, capacity in enumerate(capacities, start=1):
        fake_ltfs.cartridge(f"t{n}", capacity_bytes=capacity, serial=f"LIB00{n}L9")
    dev = tmp_path / "nst0"
    dev.symlink_to(fake_ltfs.drives_dir / "t1")
    load = (f'ln -sfn {fake_ltfs.drives_dir}/t$LTOFLOW_TAPE_SEQ {dev} && '
            f'mt -f {dev} load')
    return ["--device", str(dev), "--mount-point", str(fake_ltfs.mount_point),
            "--tape-change-command", load, "--yes"]


def test_cli_three_tapes_through_a_library_then_verify_and_restore(
    fake_ltfs: FakeLtfs, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    drive_args = library(fake_ltfs, tmp_path, [64 * MiB] * 3)
    contents = write_tree(tmp_path / "src", {f"case/{i:02d}.bin": 1_000_000 for i in range(5)})
    code = main(["backup", "--source", str(tmp_path / "src"), *drive_args,
                 "--capacity-tb", "0.000002", "--container-size-gb", "0.0005", "--json"])
    out = capsys.readouterr().out
    assert code == EXIT_OK
    doc = json.loads(out)
    assert [t["volume_serial"] for t in doc["tapes"]] == ["LIB001L9", "LIB002L9", "LIB003L9"]
    assert all(fake_ltfs.is_ejected(fake_ltfs.drives_dir / f"t{n}") for n in (1, 2, 3))
    assert not any(fake_ltfs.is_corrupted(fake_ltfs.drives_dir / f"t{n}") for n in (1, 2, 3))

    assert main(["verify", *drive_args]) == EXIT_OK
    assert "3 of 3 tape(s)" in capsys.readouterr().out

    assert main(["restore", *drive_args, "--target", str(tmp_path / "out")]) == EXIT_OK
    got = {str(p.relative_to(tmp_path / "out")): p.read_bytes()
           for p in (tmp_path / "out").rglob("*") if p.is_file()}
    assert got == contents


def test_verify_and_restore_ask_again_for_another_tape_of_the_set_loaded_in_its_place(
    fake_ltfs: FakeLtfs, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Tape 1's catalog knows no later tape's volume serial: when the library first loads
    tape 3 for tape 2, the containers on it tell, and tape 2 is asked for again (instead of
    its containers reported missing and its files failed)."""
    drive_args = library(fake_ltfs, tmp_path, [64 * MiB] * 3)
    contents = write_tree(tmp_path / "src", {f"case/{i:02d}.bin": 1_000_000 for i in range(5)})
    assert main(["backup", "--source", str(tmp_path / "src"), *drive_args, "--capacity-tb",
                 "0.000002", "--container-size-gb", "0.0005", "--quiet"]) == EXIT_OK
    dev = Path(drive_args[1])
    told = tmp_path / "problems"
    wrong_first = (f'echo "$LTOFLOW_PROBLEM" >> {told}; n=$LTOFLOW_TAPE_SEQ; '
                   f'if [ $n = 2 ] && [ -z "$LTOFLOW_PROBLEM" ]; then n=3; fi; '
                   f'ln -sfn {fake_ltfs.drives_dir}/t$n {dev} && mt -f {dev} load')
    mixed_up = [*drive_args[:-2], wrong_first, "--yes"]
    for job in (["verify"], ["restore", "--target", str(tmp_path / "out")]):
        dev.unlink()
        dev.symlink_to(fake_ltfs.drives_dir / "t1")
        told.unlink(missing_ok=True)
        assert main([*job, *mixed_up]) == EXIT_OK
        problems = [line for line in told.read_text().splitlines() if line]
        assert len(problems) == 1, problems
        assert re.fullmatch(r"volume LIB003L9 is TAPE-\S+-003 of this set \(by the "
                            r"containers on it\); insert TAPE-\S+-002 \(tape 2 of 3\)",
                            problems[0]), problems
    got = {str(p.relative_to(tmp_path / "out")): p.read_bytes()
           for p in (tmp_path / "out").rglob("*") if p.is_file()}
    assert got == contents


def test_cli_resume_through_a_library_after_a_cartridge_fills_early(
    fake_ltfs: FakeLtfs, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Cartridge 2 really holds 1.3 MiB of the 2 MB planned: the backup stops before the
    container that would leave no room for its catalog; the resume writes cartridge 2's
    catalog, goes on with an extra cartridge, and replaces cartridge 1's catalog, so all four
    say where everything is; verify and restore then read the set through the library."""
    drive_args = library(fake_ltfs, tmp_path, [64 * MiB, 13 * MiB // 10, 64 * MiB, 64 * MiB])
    contents = write_tree(tmp_path / "src", {f"case/{i:02d}.bin": 1_000_000 for i in range(5)})
    backup = ["backup", "--source", str(tmp_path / "src"), *drive_args,
              "--capacity-tb", "0.000002", "--container-size-gb", "0.0005", "--quiet"]
    assert main(backup) == EXIT_FAILED
    err = capsys.readouterr().err
    assert re.search(r"TAPE-\S+-002 filled before its planned share: it holds 1 of its 4", err)
    assert "--resume" in err.splitlines()[-1]

    assert main([*backup, "--resume", "--json"]) == EXIT_OK
    doc = json.loads(capsys.readouterr().out)
    assert [(t["volume_serial"], t["finished_before"]) for t in doc["tapes"]] == [
        ("LIB001L9", True), ("LIB002L9", False), ("LIB003L9", False), ("LIB004L9", False)]
    catalogs = {fake_ltfs.tape_files(fake_ltfs.drives_dir / f"t{n}")["catalog/catalog.json"]
                for n in (1, 2, 3, 4)}
    assert len({json.dumps({**json.loads(c), "tapes": None}) for c in catalogs}) == 1
    assert not any(fake_ltfs.is_corrupted(fake_ltfs.drives_dir / f"t{n}") for n in (1, 2, 3, 4))

    assert main(["verify", *drive_args]) == EXIT_OK
    assert "4 of 4 tape(s)" in capsys.readouterr().out
    assert main(["restore", *drive_args, "--target", str(tmp_path / "out")]) == EXIT_OK
    got = {str(p.relative_to(tmp_path / "out")): p.read_bytes()
           for p in (tmp_path / "out").rglob("*") if p.is_file()}
    assert got == contents
