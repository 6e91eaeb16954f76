"""The recovery kit written to every tape: README.txt and restore.py (stdlib only), and
SHA256SUMS, their checksums (restore.py checks itself against it; verify checks both)."""

from __future__ import annotations

import functools
import hashlib
from importlib import resources

KIT = ("README.txt", "restore.py")
SUMS = "recovery/SHA256SUMS"


@functools.cache  # asked by the plan's reserve, its check and the writer: read once
def kit_files() -> tuple[tuple[str, bytes], ...]:
    """(path on tape, contents) for every file of the kit that ships with this install, and
    their SHA256SUMS (as `sha256sum` writes it) last."""
    files = []
    for name in KIT:
        res = resources.files(__package__).joinpath(name)
        if res.is_file():
            files.append((f"recovery/{name}", res.read_bytes()))
    sums = "".join(f"{hashlib.sha256(data).hexdigest()}  {path.removeprefix('recovery/')}\n"
                   for path, data in files)
    return (*files, (SUMS, sums.encode()))


def parse_sums(text: bytes) -> dict[str, str]:
    """A SHA256SUMS file's names and hashes (`HEX  NAME` or `HEX *NAME` lines)."""
    sums = {}
    for line in text.decode("utf-8", "replace").splitlines():
        digest, _, name = line.partition(" ")
        if len(digest) == 64 and name:
            sums[name[1:] if name[0] in " *" else name] = digest.lower()
    return sums


def kit_size() -> int:
    return sum(len(data) for _, data in kit_files())
