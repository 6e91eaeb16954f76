"""Types of the optional C extension (ltoflow/_native.c)."""

from collections.abc import Buffer
from typing import Any

def read_whole_files(
    root_fd: int, paths: Buffer, path_ends: Buffer, seg_file: Buffer, seg_length: Buffer,
    seg_container: Buffer, file_starts: Buffer, sizes: Buffer, mtimes: Buffer, seg: int,
    seg_end: int, stop_file: int, container: int, buf: Buffer, pos: int, /,
) -> list[str]: ...

def file_ids(namespace: bytes, paths: Buffer, path_ends: Buffer, indices: Buffer, /,
             ) -> list[str]: ...

def iso_times(mtimes: Buffer, indices: Buffer, min_us: int, max_us: int, /) -> list[str]: ...

def list_dir(dir_fd: int, prefix: bytes, prefix_is_utf8: bool, /) -> list[tuple[Any, ...]]: ...

def encode_files(namespace: bytes, paths: Buffer, path_ends: Buffer, indices: Buffer,
                 sizes: Buffer, mtimes: Buffer, modes: Buffer, digests: Buffer, known: Buffer,
                 absolute_prefix: bytes, min_us: int, max_us: int, /) -> bytes | None: ...
def encode_segments(namespace: bytes, paths: Buffer, path_ends: Buffer, seg_file: Buffer,
                    seg_part: Buffer, seg_container: Buffer, seg_container_offset: Buffer,
                    seg_source_offset: Buffer, seg_length: Buffer, start: int, stop: int,
                    container_ids: Buffer, container_id_ends: Buffer, digests: Buffer,
                    known: Buffer, /) -> bytes | None: ...
def layout_fit(sizes: Buffer, start: int, room: int, container: int, offset: int, count: int,
               /) -> tuple[Any, ...]: ...
def digit_total(column: Buffer, /) -> int: ...
def json_strings_size(data: Buffer, ends: Buffer, /) -> int | None: ...
