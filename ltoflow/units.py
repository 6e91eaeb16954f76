"""Decimal capacities as operators write them (`--capacity-tb 0.000004` is 4 MB)."""

from __future__ import annotations

from decimal import Decimal, InvalidOperation

from ltoflow.errors import UsageError

TB = 10**12
GB = 10**9
MB = 10**6
MiB = 2**20


#: More than any tape, container or buffer holds (1 EB): byte counts stay well within 64 bits,
#: where the C loops and the catalog's readers keep them.
MAX_BYTES = 10**18


def parse_decimal_bytes(text: str, unit: int, *, flag: str) -> int:
    """Turn a decimal number of `unit`s into whole bytes; raise UsageError if it is not
    positive, or more than MAX_BYTES."""
    try:
        value = Decimal(text.strip())
    except InvalidOperation:
        raise UsageError(f"{flag} expects a number, got {text!r}") from None
    if not value.is_finite() or value <= 0:
        raise UsageError(f"{flag} must be a positive number, got {text!r}")
    if value > Decimal(MAX_BYTES) / unit:  # before multiplying: 1e999999 is a number too
        raise UsageError(f"{flag} {text} is beyond any real size (at most 1 EB, "
                         f"{MAX_BYTES // unit:,} in this flag's unit); check the value")
    nbytes = int(value * unit)
    if nbytes < 1:
        raise UsageError(f"{flag} {text} is less than one byte")
    return nbytes


def human_bytes(n: int) -> str:
    """Decimal units, as tape vendors and operators count: 1.50 TB, 412.3 MB, 900 B."""
    for unit, name in ((TB, "TB"), (GB, "GB"), (MB, "MB"), (1000, "kB")):
        if abs(n) >= unit:
            return f"{n / unit:.2f} {name}"
    return f"{n} B"
