"""The optional C extension (ltoflow/_native.c): loops that run once per file or record.

`MODULE` is the extension, or None when it was not built, was built from older sources, or
the environment sets LTOFLOW_NATIVE=0; every caller has a Python loop that does the same, more
slowly.
"""

from __future__ import annotations

import os
from types import ModuleType

#: What callers use; an extension built from older sources (an editable install not built
#: again after an update) lacks some of them and is not used.
FUNCTIONS = ("read_whole_files", "list_dir", "layout_fit", "digit_total", "json_strings_size",
             "file_ids", "iso_times", "encode_files", "encode_segments",
             "copy_single_segment_digests", "decode_records", "scan_records", "check_segments",
             "group_segments")


def load() -> ModuleType | None:
    if os.environ.get("LTOFLOW_NATIVE", "1") == "0":
        return None
    try:
        from ltoflow import _native
    except ImportError:
        return None
    if not all(hasattr(_native, name) for name in FUNCTIONS):
        return None
    return _native


MODULE = load()
