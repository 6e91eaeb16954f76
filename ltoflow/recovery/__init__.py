"""The recovery kit written to every tape: README.txt and restore.py (stdlib only)."""

from __future__ import annotations

from importlib import resources

KIT = ("README.txt", "restore.py")


def kit_files() -> tuple[tuple[str, bytes], ...]:
    """(path on tape, contents) for every file of the kit that ships with this install."""
    files = []
    for name in KIT:
        res = resources.files(__package__).joinpath(name)
        if res.is_file():
            files.append((f"recovery/{name}", res.read_bytes()))
    return tuple(files)


def kit_size() -> int:
    return sum(len(data) for _, data in kit_files())
