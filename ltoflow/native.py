"""The optional C extension (ltoflow/_native.c): loops that run once per file, in C.

`MODULE` is the extension, or None when it was not built or the environment sets
LTOFLOW_NATIVE=0; every caller has a Python loop that does the same, more slowly.
"""

from __future__ import annotations

import os
from types import ModuleType


def load() -> ModuleType | None:
    if os.environ.get("LTOFLOW_NATIVE", "1") == "0":
        return None
    try:
        from ltoflow import _native
    except ImportError:
        return None
    return _native


MODULE = load()
