"""The catalog: records, the one cattrs converter, and the streaming JSON codec.

The format is the seed's schema 2.0, key for key (see tests/fixtures/seed-format): ltoflow only
adds keys, each with a default, and readers ignore keys they do not know, so catalogs written by
either tool can be read by both. ltoflow writes compact JSON with one record per line, so a
catalog of a million files streams out record by record and `grep` finds a file in it.
"""

from __future__ import annotations

import gc
import hashlib
import mmap
import operator
import uuid
from array import array
from collections import deque
from collections.abc import Callable, Generator, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from types import NoneType
from typing import TYPE_CHECKING, Any, Protocol, TypeVar, overload

import attrs
import orjson

if TYPE_CHECKING:
    import cattrs

from ltoflow import native, paths
from ltoflow.errors import CatalogReadError

SCHEMA_VERSION = "2.0"
CATALOG_JSON = "catalog/catalog.json"
CATALOG_SHA256 = "catalog/catalog.sha256"
SHA256_HEX_LEN = 64
EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()
#: Stands in for every hash while the catalog is only being measured: same width as the real one.
PLACEHOLDER_SHA256 = "0" * SHA256_HEX_LEN
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def iso_utc(when: datetime) -> str:
    """ISO-8601 in UTC, always with microseconds, so every timestamp has the same width."""
    return when.astimezone(UTC).isoformat(timespec="microseconds")


MIN_US = (datetime(1, 1, 2, tzinfo=UTC) - _EPOCH) // timedelta(microseconds=1)
MAX_US = (datetime(9999, 12, 30, tzinfo=UTC) - _EPOCH) // timedelta(microseconds=1)


_ISO_SECONDS: dict[int, str] = {}


def iso_from_ns(mtime_ns: int) -> str:
    """`modified_at` for an mtime; mtimes beyond years 1..9999 are clamped (mtime_ns is exact).

    Runs once per file: the date and time of each whole second are formatted once and kept
    (files of a tree tend to share seconds), the microseconds are added here.
    """
    seconds, us = divmod(min(max(mtime_ns // 1000, MIN_US), MAX_US), 1_000_000)
    head = _ISO_SECONDS.get(seconds)
    if head is None:
        if len(_ISO_SECONDS) >= 1 << 16:
            _ISO_SECONDS.clear()
        head = _ISO_SECONDS[seconds] = iso_utc(_EPOCH + timedelta(seconds=seconds))[:19]
    return f"{head}.{us:06d}+00:00"


def json_string_body(text: str) -> bytes:
    """`text` as the encoder writes it inside a JSON string (escaped, no quotes)."""
    return orjson.dumps(text)[1:-1]


def iso_from_ns_at(mtimes: Sequence[int], indices: Iterable[int]) -> list[str]:
    """iso_from_ns(mtimes[i]) for each of `indices` (none negative): one call into the C
    extension for a column of 64-bit mtimes, where it is built."""
    module = native.MODULE
    if module is None or not isinstance(mtimes, array) or mtimes.typecode != "q":
        return [iso_from_ns(mtimes[i]) for i in indices]
    picked = (indices if isinstance(indices, array) and indices.typecode == "q"
              else array("q", indices))
    isos: list[str] = module.iso_times(mtimes, picked, MIN_US, MAX_US)
    return isos


@contextmanager
def gc_paused() -> Iterator[None]:
    """No cyclic garbage collection inside: for building or decoding a million records.

    The records hold no reference cycles, so nothing waits for the collector; but each of its
    full passes walks every record made so far, about a third of the time at this size. The
    collector is turned back on afterwards unless someone else had it off.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


@contextmanager
def gc_frozen() -> Iterator[None]:
    """The objects alive now are left out of cyclic garbage collection inside.

    For a job over a big plan or catalog: its records live for the whole job, and without
    this each full collection (the job's own short-lived objects trigger them) walks them
    all again: half a second of a 100,000-file backup. Acyclic records are still freed by
    reference counting; on the way out they go back to the collector (gc.unfreeze).
    """
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


#: The namespace of file ids (uuid5), as the seed uses it.
FILE_ID_NAMESPACE = uuid.NAMESPACE_DNS.bytes


#: The RFC 4122 variant bits (10xx) set in a hex digit.
_VARIANT_DIGIT = {c: "89ab"[int(c, 16) & 3] for c in "0123456789abcdef"}


def file_id_for(relative_path: str | bytes) -> str:
    """The seed's file id: uuid5 in the DNS namespace of the relative path, stable across runs.

    A path that is not valid UTF-8 is given as its exact bytes; a str is taken as UTF-8, which
    gives the same id for the same name either way. Computed as RFC 4122 says (SHA-1 of
    namespace and name, version and variant bits set), on the hex digits, without UUID objects
    or byte arithmetic: it runs once per file.
    """
    raw = (relative_path if isinstance(relative_path, bytes)
           else relative_path.encode("utf-8", "surrogatepass"))
    x = hashlib.sha1(FILE_ID_NAMESPACE + raw).hexdigest()
    return f"{x[:8]}-{x[8:12]}-5{x[13:16]}-{_VARIANT_DIGIT[x[16]]}{x[17:20]}-{x[20:32]}"


def tape_id_for(set_id: str, sequence_number: int) -> str:
    return f"TAPE-{set_id}-{sequence_number:03d}"


def set_of(tape_id: str) -> str:
    """The backup set a tape id names (tape_id_for's `set_id`)."""
    return tape_id.removeprefix("TAPE-").rsplit("-", 1)[0]


def container_id_for(set_id: str, sequence_number: int) -> str:
    return f"CNT-{set_id}-{sequence_number:05d}"


def segment_id_for(file_id: str, part: int) -> str:
    return f"SEG-{file_id}-{part:03d}"


#: Volume serials (barcode labels) are 6-8 characters; longer ones are cut to this, so the
#: catalog reserve, measured with this width, always holds.
MAX_VOLUME_SERIAL = 32
PLACEHOLDER_VOLUME_SERIAL = "X" * MAX_VOLUME_SERIAL


@attrs.frozen
class TapeEntry:
    tape_id: str
    backup_set_id: str
    sequence_number: int
    nominal_capacity_bytes: int
    reserved_catalog_bytes: int
    #: ltoflow: the cartridge's volume serial, when the drive reports one. The catalog written
    #: to tape k knows the serials of tapes 1..k; the rest are null.
    volume_serial: str | None = None


@attrs.frozen
class ContainerEntry:
    container_id: str
    backup_set_id: str
    tape_id: str
    sequence_number: int
    tape_offset: int
    size_bytes: int
    #: SHA-256 of the whole container blob; absent in some older seed catalogs.
    sha256: str | None = None


@attrs.frozen
class SourceFileEntry:
    file_id: str
    relative_path: str
    absolute_path: str
    size_bytes: int
    sha256: str
    modified_at: str
    unix_mode: int = 0o100644
    #: ltoflow: the exact mtime; `modified_at` keeps only microseconds.
    mtime_ns: int | None = None
    #: ltoflow: base64 of the path's exact bytes, only when they are not valid UTF-8
    #: (`relative_path` and `absolute_path` then hold a readable rendering).
    relative_path_b64: str | None = None

    @property
    def path_bytes(self) -> bytes:
        """The exact path; ValueError when its base64 is damaged."""
        return paths.exact(self.relative_path, self.relative_path_b64)


@attrs.frozen
class SegmentEntry:
    segment_id: str
    file_id: str
    container_id: str
    container_offset: int
    source_offset: int
    length_bytes: int
    sha256: str


@attrs.frozen
class SkippedEntry:
    """ltoflow: something under the source that is not on tape, and why.

    A file that became unusable while it was being backed up (it vanished, could not be read,
    or changed with --on-change=skip) keeps its `file_id`: its segments stay in the catalog
    with the hashes of the bytes on tape (zeros from where it went wrong), so verify still
    checks them, while restore never builds a file from them. The key is absent otherwise.
    """

    relative_path: str
    kind: str
    reason: str
    file_id: str | None = None


@attrs.frozen
class DirectoryEntry:
    """ltoflow: a directory under the source (the source itself is not listed)."""

    relative_path: str
    unix_mode: int
    mtime_ns: int
    relative_path_b64: str | None = None

    @property
    def path_bytes(self) -> bytes:
        return paths.exact(self.relative_path, self.relative_path_b64)


@attrs.frozen
class SymlinkEntry:
    """ltoflow: a symbolic link under the source, never followed; `target` as readlink gave it."""

    relative_path: str
    target: str
    mtime_ns: int
    relative_path_b64: str | None = None
    target_b64: str | None = None

    @property
    def path_bytes(self) -> bytes:
        return paths.exact(self.relative_path, self.relative_path_b64)

    @property
    def target_bytes(self) -> bytes:
        return paths.exact(self.target, self.target_b64)


#: Records made (or encoded, or joined into one chunk) at a time.
_BATCH = 4096
#: Batches the C extension encodes side by side (one a core).
ENCODE_THREADS = 2
_R = TypeVar("_R")


class RecordColumns(Sequence[_R]):
    """A list of catalog records kept as what they are made from, made only as it is read.

    A backup's own catalog has a file record and a segment record per file: held as attrs
    records that is about 600 MB for a million files, for lists that are mostly only encoded.
    `objects(i, j)` returns records i..j-1 as the converter unstructures them (a dict per
    record, keys in field order, keys it omits left out); the encoder takes them as they are,
    readers get `cls(**object)`. Equal to any sequence of equal records.
    """

    __slots__ = ("_len", "_objects", "cls", "columns", "encoded")

    def __init__(self, cls: type[_R], length: int,
                 objects: Callable[[int, int], list[dict[str, Any]]],
                 encoded: Callable[[int, int], bytes | None] | None = None,
                 columns: Mapping[str, Any] | None = None) -> None:
        self.cls = cls
        self._len = length
        self._objects = objects
        #: `encoded(i, j)`, when given: records i..j-1 as the encoder would write them,
        #: joined by ",\n" (the C extension's way), or None to have them made and encoded.
        self.encoded = encoded
        #: Segments only, when given: the columns verify checks them with, as RecordLines
        #: has them (SegmentsByContainer), so that no record is made to check them.
        self.columns = columns

    def __len__(self) -> int:
        return self._len

    @overload
    def __getitem__(self, i: int) -> _R: ...

    @overload
    def __getitem__(self, i: slice) -> Sequence[_R]: ...

    def __getitem__(self, i: int | slice) -> _R | Sequence[_R]:
        if isinstance(i, slice):
            start, stop, step = i.indices(self._len)
            return tuple(self._made(start, stop))[::step] if step > 0 else tuple(self)[i]
        if i < 0:
            i += self._len
        if not 0 <= i < self._len:
            raise IndexError("record index out of range")
        return next(self._made(i, i + 1))

    def _made(self, start: int, stop: int) -> Iterator[_R]:
        cls = self.cls
        for i in range(start, stop, _BATCH):
            for obj in self._objects(i, min(stop, i + _BATCH)):
                yield cls(**obj)

    def __iter__(self) -> Iterator[_R]:
        return self._made(0, self._len)

    def objects(self, start: int, stop: int) -> list[dict[str, Any]]:
        """Records start..stop-1 as the converter unstructures them."""
        return self._objects(start, stop)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Sequence) or isinstance(other, str | bytes):
            return NotImplemented
        return len(self) == len(other) and all(map(operator.eq, self, other))

    def __hash__(self) -> int:
        return hash(tuple(self))

    def __repr__(self) -> str:
        return f"RecordColumns({self.cls.__name__}, {self._len} records)"


class RecordLines(RecordColumns[_R]):
    """A list of catalog records kept as the lines of the catalog they were read from, each
    made only when it is read (by the C decoder, which checked every line already).

    For verify: it needs every segment's offset, length and hash (`columns`, taken as the
    lines were checked) but the records of only the few it reports; making a million file
    and segment records took most of its time and memory.
    """

    __slots__ = ("_data", "_ids", "_spec", "_starts")
    columns: Mapping[str, Any]  # always given

    def __init__(self, cls: type[_R], data: bytes | mmap.mmap, starts: memoryview,
                 spec: tuple[tuple[str, ...], bytes, tuple[object, ...], bytes],
                 columns: Mapping[str, Any]) -> None:
        self._data = memoryview(data)
        #: Where each line starts, and where the last one ends (64-bit).
        self._starts = starts
        self._spec = spec
        self._ids: dict[str, str] = {}
        # (no bound method of its own kept: that would be a cycle, and the catalog's bytes
        # or mapping would live until the next garbage collection)
        # `columns`: those of some fields, as native.scan_records returns them, plus "ids":
        # the strings of its id columns, by the number it gave them.
        super().__init__(cls, len(starts) - 1, _no_objects, columns=columns)

    def _made(self, start: int, stop: int) -> Iterator[_R]:
        module, starts = native.MODULE, self._starts
        if module is None:  # only made where the C extension read the lines
            raise CatalogReadError("catalog records kept as lines need ltoflow._native")
        for i in range(start, stop, _BATCH):
            j = min(stop, i + _BATCH)
            made, _, _ = module.decode_records(self._data[starts[i]:starts[j]], 0, self.cls,
                                               *self._spec, self._ids, _MISSING)
            if len(made) != j - i:  # the lines were checked: only if the bytes changed
                raise CatalogReadError(f"catalog record lines {i}..{j - 1} no longer decode")
            yield from made

    def objects(self, start: int, stop: int) -> list[dict[str, Any]]:
        unstructure = the_converter().get_unstructure_hook(self.cls)
        return [unstructure(r) for r in self._made(start, stop)]

    def __repr__(self) -> str:
        return f"RecordLines({self.cls.__name__}, {len(self)} records)"


def _no_objects(start: int, stop: int) -> list[dict[str, Any]]:
    raise AssertionError("RecordLines makes its records itself")


def _kept(records: Sequence[Any]) -> Sequence[Any]:
    """A big list as the Catalog keeps it: a tuple, or the RecordColumns it was given."""
    return records if isinstance(records, RecordColumns | tuple) else tuple(records)


@attrs.frozen
class Catalog:
    """The whole backup set. The same catalog is written to every tape of the set."""

    backup_set_id: str
    created_at: str
    source_root: str
    tapes: tuple[TapeEntry, ...]
    containers: tuple[ContainerEntry, ...]
    source_files: Sequence[SourceFileEntry] = attrs.field(converter=_kept)
    segments: Sequence[SegmentEntry] = attrs.field(converter=_kept)
    schema_version: str = SCHEMA_VERSION
    #: ltoflow additions, all with defaults so that seed catalogs still load.
    created_by: str | None = None
    max_container_size_bytes: int | None = None
    skipped: tuple[SkippedEntry, ...] = ()
    directories: tuple[DirectoryEntry, ...] = ()
    symlinks: tuple[SymlinkEntry, ...] = ()

    @property
    def total_bytes(self) -> int:
        return sum(f.size_bytes for f in self.source_files)

    def with_serials(self, serials: Sequence[str | None]) -> Catalog:
        """This catalog with tape i's volume serial set to serials[i] (missing: null)."""
        tapes = tuple(
            attrs.evolve(t, volume_serial=serials[i] if i < len(serials) else None)
            for i, t in enumerate(self.tapes)
        )
        return attrs.evolve(self, tapes=tapes)

    def same_set_as(self, other: Catalog) -> bool:
        """Equal but for the volume serials, which later tapes know more of."""
        return self.with_serials([]) == other.with_serials([])


def split_files(catalog: Catalog) -> tuple[int, int]:
    """(files in more than one segment, files on more than one tape)."""
    tape_of = {c.container_id: c.tape_id for c in catalog.containers}
    first_tape: dict[str, str] = {}  # file id -> the tape of its first segment
    split: set[str] = set()
    across: set[str] = set()
    for s in catalog.segments:
        tape = tape_of.get(s.container_id, "")
        first = first_tape.get(s.file_id)
        if first is None:
            first_tape[s.file_id] = tape
        else:
            split.add(s.file_id)
            if first != tape:
                across.add(s.file_id)
    return len(split), len(across)


_CONVERTER: cattrs.Converter | None = None


def the_converter() -> cattrs.Converter:
    """The one cattrs converter, made (and cattrs imported) on first use: reading ltoflow's own
    catalogs never needs it, and importing cattrs is a tenth of verify's start-up."""
    global _CONVERTER
    if _CONVERTER is None:
        import cattrs
        from cattrs.gen import make_dict_unstructure_fn, override

        made = cattrs.Converter()
        # The exact-bytes keys appear only when a name needs them, so ordinary records stay
        # as they were.
        omit_none = override(omit_if_default=True)
        made.register_unstructure_hook(
            SourceFileEntry,
            make_dict_unstructure_fn(SourceFileEntry, made, relative_path_b64=omit_none),
        )
        made.register_unstructure_hook(
            DirectoryEntry,
            make_dict_unstructure_fn(DirectoryEntry, made, relative_path_b64=omit_none),
        )
        made.register_unstructure_hook(
            SymlinkEntry,
            make_dict_unstructure_fn(SymlinkEntry, made, relative_path_b64=omit_none,
                                     target_b64=omit_none),
        )
        # `file_id` is written only when there is one, so skipped special files keep the old
        # shape.
        made.register_unstructure_hook(
            SkippedEntry,
            make_dict_unstructure_fn(SkippedEntry, made, file_id=omit_none),
        )
        _CONVERTER = made
    return _CONVERTER


def __getattr__(name: str) -> cattrs.Converter:
    """`catalog.converter`: the_converter(), made on first use."""
    if name == "converter":
        return the_converter()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class CatalogCodec(Protocol):
    """Turns a catalog into bytes and back. `encode` yields chunks so that it can stream."""

    def encode(self, catalog: Catalog) -> Iterator[bytes]: ...

    def decode(self, data: bytes, *, source: str) -> Catalog: ...


_HEAD_KEYS = (
    "schema_version", "backup_set_id", "created_at", "source_root",
    "created_by", "max_container_size_bytes",
)
_LIST_KEYS = (
    "tapes", "containers", "source_files", "segments", "skipped", "directories", "symlinks",
)
#: The record type of each list, for the fast decoder. A new list needs its entry here too,
#: or the fast decoder skips it (as it does every list it does not know).
_LIST_TYPES: dict[str, type] = {
    "tapes": TapeEntry, "containers": ContainerEntry, "source_files": SourceFileEntry,
    "segments": SegmentEntry, "skipped": SkippedEntry, "directories": DirectoryEntry,
    "symlinks": SymlinkEntry,
}


#: The lists of a set's catalog that are the same on every tape and hold nearly all its bytes.
BIG_LISTS = ("source_files", "segments")


@attrs.frozen
class ListSpan:
    """Where the records of one list lie in an encoded catalog, and their SHA-256."""

    start: int
    end: int
    sha256: str


class JsonCatalogCodec:
    """Compact JSON, one record per line, keys in the seed's order, ltoflow's keys last."""

    def encode(self, catalog: Catalog) -> Iterator[bytes]:
        return self.encode_reusing(catalog)

    def encode_reusing(
        self,
        catalog: Catalog,
        *,
        lists: Mapping[str, Iterable[bytes]] | None = None,
        spans: dict[str, ListSpan] | None = None,
    ) -> Iterator[bytes]:
        """encode, with the records of each list named in `lists` taken from there: the bytes
        an earlier encoding of the very same records gave (a later tape's catalog copies the
        big lists from tape 1's instead of encoding a million records again). `spans`, when
        given, gets where the records of each list in BIG_LISTS lie in this output."""
        pos = 0
        head = orjson.dumps({key: getattr(catalog, key) for key in _HEAD_KEYS})[:-1] + b","
        yield head
        pos += len(head)
        for n, key in enumerate(_LIST_KEYS):
            opening = b'\n"' + key.encode() + b'":['
            yield opening
            pos += len(opening)
            given = lists.get(key) if lists is not None else None
            chunks = (given if given is not None
                      else _records(getattr(catalog, key), _LIST_TYPES[key]))
            start = pos
            h = hashlib.sha256() if spans is not None and key in BIG_LISTS else None
            for chunk in chunks:
                if h is not None:
                    h.update(chunk)
                yield chunk
                pos += len(chunk)
            if h is not None and spans is not None:
                spans[key] = ListSpan(start, pos, h.hexdigest())
            closing = b"]," if n + 1 < len(_LIST_KEYS) else b"]}\n"
            yield closing
            pos += len(closing)

    def record_size(self, record: object) -> int:
        """Encoded bytes of one list record, without its separator."""
        return len(orjson.dumps(the_converter().unstructure(record)))

    @staticmethod
    def list_size(record_bytes: int, count: int) -> int:
        """Bytes a list adds beyond its empty form: the records and their separators."""
        return record_bytes + 2 * count - 1 if count else 0

    @staticmethod
    def string_size(text: str) -> int:
        """Bytes of `text` as a JSON string body (escapes counted, quotes not)."""
        return len(orjson.dumps(text)) - 2

    @staticmethod
    def strings_size(texts: list[str]) -> int:
        """The sum of string_size over `texts`, in one call to the encoder: the JSON array
        of them less its brackets, commas and quotes."""
        return len(orjson.dumps(texts)) - 2 - max(0, len(texts) - 1) - 2 * len(texts)

    def decode(self, data: bytes | mmap.mmap, *, source: str, lazy: bool = False) -> Catalog:
        """The catalog in `data` (CatalogReadError when it is not one). With `lazy`, the file
        and segment records of ltoflow's own layout are checked but made only when read
        (RecordLines, which keep `data`: a file mapped into memory stays mapped), where the C
        extension is built."""
        # ltoflow's own layout, record by record: a million-file catalog decoded as one JSON
        # tree held every record twice (dicts, then records), 3.3 GB for a 0.7 GB file.
        try:
            with gc_paused():
                return _decode_lines(data, lazy=lazy)
        except _NotLineFormat:
            pass  # someone else's layout, or something to explain: the full decoder below
        try:
            raw = orjson.loads(data if isinstance(data, bytes) else data[:])
        except orjson.JSONDecodeError as e:
            raise CatalogReadError(f"{source} is not valid JSON ({e}); it is damaged") from e
        if not isinstance(raw, dict):
            raise CatalogReadError(f"{source} is not a catalog (its JSON is not an object)")
        import cattrs

        try:
            return the_converter().structure(raw, Catalog)
        except cattrs.BaseValidationError as e:
            problems = cattrs.transform_error(e, path="catalog")
            shown = "; ".join(problems[:3]) + (" ..." if len(problems) > 3 else "")
            raise CatalogReadError(f"{source} is not a valid catalog: {shown}") from e


class _NotLineFormat(Exception):
    """Not ltoflow's one-record-a-line layout, or a value the fast decoder leaves to cattrs."""


_MISSING = object()


_JSON_TYPES: dict[object, tuple[type, ...]] = {
    str: (str,), int: (int,), bool: (bool,),
    str | None: (str, NoneType), int | None: (int, NoneType), bool | None: (bool, NoneType),
}


def _checks(cls: type) -> tuple[tuple[str, tuple[type, ...], bool], ...] | None:
    """(field, the exact JSON types it takes, whether it is required) for each field of cls;
    None when a field has a type the fast decoder does not know (cattrs decodes that class).
    A Catalog's lists are decoded on their own and left out here."""
    out = []
    for field in attrs.fields(attrs.resolve_types(cls)):
        if cls is Catalog and field.name in _LIST_TYPES:
            continue
        types = _JSON_TYPES.get(field.type)
        if types is None:
            return None
        out.append((field.name, types, field.default is attrs.NOTHING))
    return tuple(out)


_CHECKS = {cls: _checks(cls) for cls in (Catalog, *_LIST_TYPES.values())}
#: Catalog fields the fast decoder must not skip: a list of one is left to cattrs.
_CATALOG_FIELDS = frozenset(f.name for f in attrs.fields(Catalog))
#: The lists every catalog has (the seed's); the others default to empty.
_REQUIRED_LISTS = frozenset(
    f.name for f in attrs.fields(Catalog)
    if f.name in _LIST_TYPES and f.default is attrs.NOTHING
)


def _checked(cls: type, raw: object) -> dict[str, Any]:
    """The arguments for `cls` from a decoded JSON object whose values have exactly the right
    JSON types (cattrs would convert, say, "5" to 5: such catalogs take the full decoder)."""
    if type(raw) is not dict:
        raise _NotLineFormat
    checks = _CHECKS[cls]
    if checks is None:
        raise _NotLineFormat
    kwargs = {}
    for name, types, required in checks:
        value = raw.get(name, _MISSING)
        if value is _MISSING:
            if required:
                raise _NotLineFormat
        elif type(value) in types:
            kwargs[name] = value
        else:
            raise _NotLineFormat
    return kwargs


#: Field ids the decoders (C and Python) keep one string per value of (a file's id is in two
#: records).
_INTERNED = {
    SegmentEntry: ("file_id", "container_id"),
    ContainerEntry: ("container_id", "tape_id"),
    SourceFileEntry: ("file_id",),
}
_KINDS = {str: 1, int: 2, bool: 4, NoneType: 8}


def _native_spec(cls: type) -> tuple[tuple[str, ...], bytes, tuple[object, ...], bytes] | None:
    """decode_records' arguments for records of cls: field names, the JSON types each takes,
    defaults (_MISSING: required) and which are interned. The C loop sets the fields as the
    __init__ of a frozen attrs class does, without calling it: None (the Python loop decodes
    them) when that __init__ could do more, or a default is not a plain value."""
    checks = _CHECKS[cls]
    if checks is None or not attrs.has(cls):
        return None
    fields = attrs.fields(cls)
    if (len(checks) != len(fields) or "__slots__" not in vars(cls)
            or hasattr(cls, "__attrs_post_init__") or hasattr(cls, "__attrs_pre_init__")
            or cls.__new__ is not object.__new__
            or any(f.validator is not None or f.converter is not None or not f.init
                   or f.alias != f.name
                   or (f.default is not attrs.NOTHING and type(f.default) not in _KINDS)
                   for f in fields)):
        return None
    interned = _INTERNED.get(cls, ())
    return (tuple(name for name, _, _ in checks),
            bytes(sum(_KINDS[t] for t in types) for _, types, _ in checks),
            tuple(_MISSING if required else f.default
                  for (_, _, required), f in zip(checks, fields, strict=True)),
            bytes(name in interned for name, _, _ in checks))


_NATIVE_SPECS = {cls: spec for cls in _LIST_TYPES.values() if (spec := _native_spec(cls))}

#: What a lazy decode keeps of each field as a column (native.scan_records' `take`): verify
#: reads these of every segment.
_TAKE_INT, _TAKE_DIGEST, _TAKE_ID = 1, 2, 3
_LAZY_TAKE: dict[type, dict[str, int]] = {
    SourceFileEntry: {},
    SegmentEntry: {"container_id": _TAKE_ID, "container_offset": _TAKE_INT,
                   "length_bytes": _TAKE_INT, "sha256": _TAKE_DIGEST},
}


def _lazy_list(data: bytes | mmap.mmap, pos: int, cls: type, containers: Sequence[Any] | None,
               ) -> tuple[RecordLines[Any] | None, int, int]:
    """The records of one list from data[pos:] as RecordLines, when the C extension takes
    every line of it: (records, pos after the list, status as decode_records gives it), or
    (None, pos, 0) to have the list decoded record by record."""
    module, spec, take = native.MODULE, _NATIVE_SPECS.get(cls), _LAZY_TAKE.get(cls)
    if module is None or spec is None or take is None:
        return None, pos, 0
    names, kinds, defaults, _ = spec
    # Container ids are numbered by their place in the containers list (read before it),
    # other ids after them.
    known = tuple(dict.fromkeys(c.container_id for c in containers or ()))
    starts, end, status, cols, ids = module.scan_records(
        data, pos, names, kinds, defaults, _MISSING,
        bytes(take.get(name, 0) for name in names), known)
    if not status:
        return None, pos, 0
    columns: dict[str, Any] = {"ids": ids}
    for name, col in zip(names, cols, strict=True):
        if take.get(name) == _TAKE_DIGEST:
            columns[name] = col  # (32-byte digests, a byte per digest: 1 well-formed)
        elif col is not None:
            columns[name] = memoryview(col).cast("q")
    return RecordLines(cls, data, memoryview(starts).cast("q"), spec, columns), end, status


def _decode_lines(data: bytes | mmap.mmap, *, lazy: bool = False) -> Catalog:
    """Decode the layout JsonCatalogCodec.encode writes, one line at a time.

    Lines: the head object's keys ending in ','; then per list `"key":[`, its records one a
    line, each followed by ',' or by the list's end `]` plus ',' or the document's '}'. An
    empty list is `"key":[]` plus ',' or '}'. Raises _NotLineFormat at anything else. With
    `lazy`, file and segment records are RecordLines where the C extension takes them.
    """
    end = data.find(b"\n")
    if data[:18] != b'{"schema_version":' or end < 0 or data[end - 1:end] != b",":
        raise _NotLineFormat
    # With `lazy`, the segments are scanned in a thread while the files are (the C scan lets
    # go of the interpreter's lock): found by their list's opening line, which only the list
    # can begin with (a record's line breaks are escaped).
    ahead: dict[int, Future[tuple[RecordLines[Any] | None, int, int]]] = {}
    try:
        head = orjson.loads(data[:end - 1] + b"}")
        lists: dict[str, Sequence[Any]] = {}
        ids: dict[str, str] = {}  # one string per container, tape and file id, not one per use
        loads, find, n = orjson.loads, data.find, len(data)
        module = native.MODULE
        pos = end + 1
        done = False
        while not done:
            end = find(b"\n", pos)
            if end < 0:
                raise _NotLineFormat
            line = data[pos:end]
            pos = end + 1
            if not line.startswith(b'"') or b'":[' not in line:
                raise _NotLineFormat
            key, rest = line[1:].split(b'":[', 1)
            name = key.decode()
            if name in lists:
                raise _NotLineFormat
            cls = _LIST_TYPES.get(name)
            if cls is None and name in _CATALOG_FIELDS:
                raise _NotLineFormat  # a list of the Catalog without a _LIST_TYPES entry
            records: list[Any] = []
            lists[name] = records
            if rest in (b"],", b"]}"):
                done = rest == b"]}"
                continue
            if rest:
                raise _NotLineFormat
            if lazy and cls is not None:
                if name == "source_files" and module is not None and not ahead:
                    opening = data.find(b'\n"segments":[\n', pos)
                    if opening >= 0:
                        at = opening + len(b'\n"segments":[\n')
                        scanner = ThreadPoolExecutor(1, thread_name_prefix="ltoflow-ahead")
                        ahead[at] = scanner.submit(_lazy_list, data, at, SegmentEntry,
                                                   lists.get("containers"))
                        scanner.shutdown(wait=False)  # its thread ends after this scan
                got = ahead.pop(pos, None) if cls is SegmentEntry else None
                kept, pos, status = (got.result() if got is not None
                                     else _lazy_list(data, pos, cls, lists.get("containers")))
                if kept is not None:
                    lists[name] = kept
                    done = status == 2
                    continue
            spec = None if cls is None else _NATIVE_SPECS.get(cls)
            interned = _INTERNED.get(cls, ()) if cls is not None else ()
            while True:
                if module is not None and spec is not None:  # C, up to a line it leaves here
                    made, pos, status = module.decode_records(data, pos, cls, *spec, ids,
                                                              _MISSING)
                    records += made
                    if status:
                        done = status == 2
                        break
                end = find(b"\n", pos)
                if end < 0:
                    raise _NotLineFormat
                line = data[pos:end]
                pos = end + 1
                tail = 1 if line.endswith(b"},") else 2 if line.endswith((b"}],", b"}]}")) else 0
                if not tail:
                    raise _NotLineFormat
                raw = loads(line[:-tail])
                if type(raw) is not dict:
                    raise _NotLineFormat
                if cls is not None:
                    for k in interned:
                        v = raw.get(k)
                        if type(v) is str:
                            raw[k] = ids.setdefault(v, v)
                    records.append(cls(**_checked(cls, raw)))
                if tail == 2:
                    done = line.endswith(b"]}")
                    break
        if data[pos:n].strip():
            raise _NotLineFormat
    except (orjson.JSONDecodeError, UnicodeDecodeError, TypeError, ValueError):
        raise _NotLineFormat from None
    finally:  # a scan ahead that was not used (the decode stopped before it) ends first
        for left in ahead.values():
            if not left.cancel():
                left.exception()  # waits for it; what it found is not needed
    if type(head) is not dict or any(k in head for k in _LIST_TYPES):
        raise _NotLineFormat
    kwargs = _checked(Catalog, head)
    for name in _LIST_TYPES:
        if name in lists:
            records_of = lists[name]
            kwargs[name] = (records_of if isinstance(records_of, RecordLines)
                            else tuple(records_of))
        elif name in _REQUIRED_LISTS:
            raise _NotLineFormat
    return Catalog(**kwargs)


def _records(records: Sequence[object], cls: type) -> Generator[bytes]:
    """The lines of a list of `cls` records: the first after a newline, the others after
    `,` and a newline. The unstructure hook is looked up once, not once per record."""
    lead = b"\n"
    for chunk in _batches(records, the_converter().get_unstructure_hook(cls)):
        yield lead + chunk
        lead = b",\n"


def _batches(records: Sequence[object], unstructure: Callable[[Any], Any]) -> Iterator[bytes]:
    """The records _BATCH at a time, each batch's records joined by `,` and a newline. Batches
    the C extension encodes (RecordColumns.encoded) are encoded ENCODE_THREADS at a time, a
    few ahead of the caller: it lets go of the interpreter's lock while it encodes."""
    dumps, n = orjson.dumps, len(records)
    starts = range(0, n, _BATCH)
    if not isinstance(records, RecordColumns):
        for i in starts:
            yield b",\n".join(map(dumps, map(unstructure, records[i:i + _BATCH])))
        return
    columns = records

    def made(i: int, chunk: bytes | None) -> bytes:
        return chunk if chunk is not None else b",\n".join(
            map(dumps, columns.objects(i, min(n, i + _BATCH))))

    encoded = columns.encoded
    if encoded is None or len(starts) < 2:
        for i in starts:
            yield made(i, encoded(i, min(n, i + _BATCH)) if encoded is not None else None)
        return
    with ThreadPoolExecutor(ENCODE_THREADS, thread_name_prefix="ltoflow-encode") as pool:
        ahead: deque[tuple[int, Future[bytes | None]]] = deque()
        try:
            for i in starts:
                ahead.append((i, pool.submit(encoded, i, min(n, i + _BATCH))))
                if len(ahead) > ENCODE_THREADS:
                    k, done = ahead.popleft()
                    yield made(k, done.result())
            while ahead:
                k, done = ahead.popleft()
                yield made(k, done.result())
        finally:  # closed early, or a batch failed: nothing more is begun
            for _, left in ahead:
                left.cancel()


def encoded_size(codec: CatalogCodec, catalog: Catalog) -> int:
    """Bytes `codec` writes for `catalog`, without holding them all in memory."""
    return sum(len(chunk) for chunk in codec.encode(catalog))
