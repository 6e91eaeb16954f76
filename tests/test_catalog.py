from __future__ import annotations

import base64
import json
from datetime import UTC
from pathlib import Path

import attrs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ltoflow import catalog as cat
from ltoflow.catalog import Catalog, JsonCatalogCodec
from ltoflow.errors import CatalogReadError

from .conftest import SEED_FIXTURE

CODEC = JsonCatalogCodec()
hexes = st.text("0123456789abcdef", min_size=64, max_size=64)
ids = st.uuids().map(str)
sizes = st.integers(0, 2**53)
paths = st.text(st.characters(blacklist_categories=["Cs"], blacklist_characters="\x00"),
                min_size=1, max_size=40)
b64s = st.none() | st.binary(min_size=1, max_size=30).map(lambda b: base64.b64encode(b).decode())
modes = st.integers(0, 0o177777)
mtimes = st.integers(-(2**62), 2**62)

catalogs = st.builds(
    Catalog,
    backup_set_id=ids,
    created_at=st.datetimes(timezones=st.just(UTC)).map(cat.iso_utc),
    source_root=paths,
    tapes=st.lists(st.builds(cat.TapeEntry, ids, ids, sizes, sizes, sizes), max_size=3).map(tuple),
    containers=st.lists(st.builds(cat.ContainerEntry, ids, ids, ids, sizes, sizes, sizes,
                                  st.none() | hexes), max_size=3).map(tuple),
    source_files=st.lists(st.builds(cat.SourceFileEntry, ids, paths, paths, sizes, hexes,
                                    st.text(max_size=32), modes, st.none() | mtimes, b64s),
                          max_size=4).map(tuple),
    segments=st.lists(st.builds(cat.SegmentEntry, ids, ids, ids, sizes, sizes, sizes, hexes),
                      max_size=4).map(tuple),
    created_by=st.none() | st.text(max_size=20),
    max_container_size_bytes=st.none() | sizes,
    skipped=st.lists(st.builds(cat.SkippedEntry, paths, st.text(max_size=9),
                               st.text(max_size=30), st.none() | ids), max_size=2).map(tuple),
    directories=st.lists(st.builds(cat.DirectoryEntry, paths, modes, mtimes, b64s),
                         max_size=3).map(tuple),
    symlinks=st.lists(st.builds(cat.SymlinkEntry, paths, paths, mtimes, b64s, b64s),
                      max_size=3).map(tuple),
)


@settings(max_examples=200, deadline=None)
@given(catalogs)
def test_catalog_round_trips_through_the_codec(c: Catalog) -> None:
    data = b"".join(CODEC.encode(c))
    assert CODEC.decode(data, source="test") == c
    assert cat.encoded_size(CODEC, c) == len(data)
    json.loads(data)  # plain JSON: the seed's readers and the stdlib parse it


@settings(max_examples=50, deadline=None)
@given(catalogs)
def test_catalog_is_one_record_per_line(c: Catalog) -> None:
    lines = b"".join(CODEC.encode(c)).splitlines()
    records = (len(c.tapes) + len(c.containers) + len(c.source_files) + len(c.segments)
               + len(c.skipped) + len(c.directories) + len(c.symlinks))
    assert len(lines) == 1 + 7 + records  # head, one line per list, one per record


def seed_catalog_doc() -> dict[str, object]:
    tape = next((SEED_FIXTURE / "tapes").iterdir())
    doc: dict[str, object] = json.loads((tape / "catalog" / "catalog.json").read_bytes())
    return doc


def test_seed_catalog_loads_and_keeps_every_value() -> None:
    doc = seed_catalog_doc()
    c = CODEC.decode(json.dumps(doc).encode(), source="seed")
    assert c.schema_version == "2.0"
    assert (len(c.tapes), len(c.source_files), len(c.segments)) == (3, 6, 10)
    again = json.loads(b"".join(CODEC.encode(c)))
    for key in ("schema_version", "backup_set_id", "created_at", "source_root"):
        assert again[key] == doc[key]
    for key in ("tapes", "containers", "source_files", "segments"):
        for ours, theirs in zip(again[key], doc[key], strict=True):  # type: ignore[call-overload]
            # Every key of the seed, same value and type; ltoflow may only add keys.
            assert {k: ours[k] for k in theirs} == theirs


def test_seed_file_ids_are_reproduced() -> None:
    doc = seed_catalog_doc()
    for f in doc["source_files"]:  # type: ignore[attr-defined]
        assert cat.file_id_for(f["relative_path"]) == f["file_id"]


def test_unknown_keys_are_ignored_and_new_keys_have_defaults() -> None:
    doc = seed_catalog_doc()
    doc["from_the_future"] = {"x": 1}
    for f in doc["source_files"]:  # type: ignore[attr-defined]
        f["new_field"] = True
    for c in doc["containers"]:  # type: ignore[attr-defined]
        del c["sha256"]
    c = CODEC.decode(json.dumps(doc).encode(), source="newer")
    assert all(x.sha256 is None for x in c.containers)
    assert c.skipped == ()
    assert c.source_files[0].mtime_ns is None


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"{not json", "not valid JSON"),
        (b"[1, 2]", "not a catalog"),
        (b'{"schema_version": "2.0"}', "not a valid catalog"),
        (b'{"backup_set_id": 5, "created_at": "x", "source_root": "/", "tapes": [],'
         b' "containers": [], "source_files": [{"file_id": 1}], "segments": []}',
         "not a valid catalog"),
    ],
)
def test_damaged_catalog_gives_one_clear_error(data: bytes, message: str) -> None:
    with pytest.raises(CatalogReadError, match=message) as info:
        CODEC.decode(data, source="tape X/catalog/catalog.json")
    assert "tape X/catalog/catalog.json" in str(info.value)
    assert "\n" not in str(info.value)


def test_timestamps_have_a_fixed_width() -> None:
    a = cat.iso_from_ns(1_700_000_000_000_000_000)  # whole second: microseconds still shown
    b = cat.iso_from_ns(1_700_000_000_123_456_789)
    assert len(a) == len(b) == 32
    assert a == "2023-11-14T22:13:20.000000+00:00"
    assert b.endswith(".123456+00:00")


def test_seed_catalog_has_no_key_ltoflow_lacks(tmp_path: Path) -> None:
    doc = seed_catalog_doc()
    fields = {
        "tapes": cat.TapeEntry, "containers": cat.ContainerEntry,
        "source_files": cat.SourceFileEntry, "segments": cat.SegmentEntry,
    }
    for key, cls in fields.items():
        names = {a.name for a in attrs.fields(cls)}
        for record in doc[key]:  # type: ignore[attr-defined]
            assert set(record) <= names
    assert set(doc) <= {a.name for a in attrs.fields(Catalog)}


@settings(max_examples=200)
@given(st.text(st.characters(blacklist_categories=["Cs"]), max_size=60))
def test_file_ids_are_the_standard_uuid5(path: str) -> None:
    import uuid

    assert cat.file_id_for(path) == str(uuid.uuid5(uuid.NAMESPACE_DNS, path))


def test_exact_bytes_key_appears_only_for_names_that_are_not_utf8() -> None:
    plain = cat.SourceFileEntry("id", "é", "/r/é", 0, cat.EMPTY_SHA256, "m", 0o100644, 1)
    odd = attrs.evolve(plain, relative_path="a\\xff", relative_path_b64="Yf8=")
    assert "relative_path_b64" not in cat.converter.unstructure(plain)
    assert cat.converter.unstructure(odd)["relative_path_b64"] == "Yf8="
    assert (plain.path_bytes, odd.path_bytes) == ("é".encode(), b"a\xff")


def test_damaged_base64_of_a_name_is_a_value_error() -> None:
    d = cat.DirectoryEntry("x", 0o40755, 0, relative_path_b64="not base64!")
    with pytest.raises(ValueError, match="base64 of 'x' is damaged"):
        _ = d.path_bytes


def test_file_id_of_exact_bytes_matches_the_utf8_id_and_differs_for_odd_names() -> None:
    assert cat.file_id_for("dir/é") == cat.file_id_for("dir/é".encode())
    assert cat.file_id_for(b"a\xff") != cat.file_id_for("a\\xff")  # its readable rendering


def test_new_lists_come_after_the_seed_lists() -> None:
    doc = seed_catalog_doc()
    c = CODEC.decode(json.dumps(doc).encode(), source="seed")
    assert (c.directories, c.symlinks) == ((), ())
    keys = list(json.loads(b"".join(CODEC.encode(c))))
    assert keys[-3:] == ["skipped", "directories", "symlinks"]
    assert keys.index("segments") < keys.index("directories")


def test_skipped_entry_writes_file_id_only_when_it_has_one() -> None:
    special = cat.converter.unstructure(cat.SkippedEntry("p", "fifo", "not a regular file"))
    assert special == {"relative_path": "p", "kind": "fifo", "reason": "not a regular file"}
    fid = cat.file_id_for("f")
    failed = cat.converter.unstructure(cat.SkippedEntry("f", "file", "vanished", fid))
    assert failed["file_id"] == fid
