"""A fake `mt` (mt-st) for a fake cartridge directory.

    mt -f DEV offline|rewoffl|eject|unload   eject the tape
    mt -f DEV status                         print the drive status
    mt -f DEV rewind|load|retension|...      accepted

Ejecting while the ltfs process serving DEV is still alive (it goes on writing its index for a
while after `umount` returns) corrupts the tape in the field. Real mt does not notice and exits
0; this one does the same but writes DEV/CORRUPTED, which tests assert never appears, and the
next `ltfs` mount of DEV fails as a tape without its final index would.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from tests.fakes import cartridge as cart

EJECT = {"offline", "rewoffl", "eject", "unload"}
ACCEPTED = {"rewind", "retension", "fsf", "bsf", "fsr", "bsr", "eod", "seod", "weof", "eof",
            "tell", "setblk", "compression", "lock", "unlock", "erase"}


def _status(dev: Path) -> str:
    if cart.is_ejected(dev):
        bits = "General status bits on (50000):\n DR_OPEN IM_REP_EN\n"
        density = "Density code 0x0 (default)."
    else:
        bits = "General status bits on (41010000):\n BOT ONLINE IM_REP_EN\n"
        density = "Density code 0x60 (LTO-9)."
    return ("SCSI 2 tape drive:\n"
            "File number=0, block number=0, partition=0.\n"
            f"Tape block size 0 bytes. {density}\n"
            "Soft error count since last status=0\n" + bits)


def _eject(dev: Path) -> int:
    if cart.is_ejected(dev):
        sys.stderr.write(f"{dev}: No medium found\n")
        return 2
    pid = cart.ltfs_pid(dev)
    now = time.time()
    if pid is not None:
        mounted = [m.target for m in cart.ltfs_mounts() if m.source == f"ltfs:{dev}"]
        report = {
            "time": now,
            "what": "mt offline ejected the tape while its ltfs process was still running "
                    "(writing the index after umount): the tape is left without its final index",
            "ltfs_pid": pid,
            "still_mounted_at": mounted,
            "mt_argv": sys.argv,
        }
        with open(dev / cart.CORRUPTED, "a") as fh:
            fh.write(json.dumps(report) + "\n")
    (dev / cart.EJECTED).write_text(f"{now}\n")
    with open(dev / cart.EJECTS_LOG, "a") as fh:
        fh.write(json.dumps({"time": now, "by": "mt", "ltfs_alive": pid is not None}) + "\n")
    return 0


def main(argv: list[str]) -> int:
    args = argv[1:]
    device = os.environ.get("TAPE")
    rest: list[str] = []
    i = 0
    while i < len(args):
        if args[i] in ("-f", "-t"):
            if i + 1 >= len(args):
                sys.stderr.write("mt: option requires an argument -- 'f'\n")
                return 1
            device = args[i + 1]
            i += 2
        elif args[i].startswith("-f") and len(args[i]) > 2:
            device = args[i][2:]
            i += 1
        else:
            rest.append(args[i])
            i += 1
    if not rest:
        sys.stderr.write("usage: mt [-v] [--version] [-h] [ -f device ] command [ count ]\n")
        return 1
    if device is None:
        sys.stderr.write("mt: no tape device given (-f DEV or $TAPE)\n")
        return 1
    dev = Path(device)
    if not (dev / cart.CARTRIDGE_JSON).is_file():
        sys.stderr.write(f"{device}: No such file or directory\n")
        return 1
    command = rest[0]
    if command in EJECT:
        return _eject(dev)
    if command == "status":
        sys.stdout.write(_status(dev))
        return 0
    if command == "load":
        cart.load(dev)
        return 0
    if command in ACCEPTED:
        if cart.is_ejected(dev):
            sys.stderr.write(f"{device}: No medium found\n")
            return 2
        return 0
    sys.stderr.write(f"mt: unrecognized command '{command}'\n")
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
