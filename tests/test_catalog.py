from __future__ import annotations

import base64
import json
import os
from datetime import UTC
from pathlib import Path

import attrs
import orjson
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


@settings(max_examples=100, deadline=None)
@given(catalogs, st.lists(st.none() | st.text(min_size=1, max_size=8), max_size=4))
def test_big_lists_copied_from_an_earlier_encoding_give_the_same_bytes(
    c: Catalog, serials: list[str | None]
) -> None:
    """A later tape's catalog (other volume serials) with the file and segment records taken
    from tape 1's bytes, where `spans` said they lie, is the catalog encoded afresh."""
    import hashlib

    spans: dict[str, cat.ListSpan] = {}
    first = b"".join(CODEC.encode_reusing(c, spans=spans))
    assert first == b"".join(CODEC.encode(c))
    assert set(spans) == set(cat.BIG_LISTS)
    for span in spans.values():
        assert hashlib.sha256(first[span.start:span.end]).hexdigest() == span.sha256
    later = c.with_serials(serials)
    lists = {key: [first[span.start:span.end]] for key, span in spans.items()}
    assert b"".join(CODEC.encode_reusing(later, lists=lists)) == b"".join(CODEC.encode(later))


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


@settings(max_examples=100, deadline=None)
@given(catalogs)
def test_line_decoder_gives_what_the_full_decoder_gives(c: Catalog) -> None:
    data = b"".join(CODEC.encode(c))
    fast = cat._decode_lines(data)
    assert fast == cat.converter.structure(json.loads(data), Catalog) == c


def _sample_catalog() -> Catalog:
    fid = cat.file_id_for("a/b.txt")
    cid = cat.container_id_for("s", 1)
    return Catalog(
        backup_set_id="s", created_at=cat.iso_from_ns(0), source_root="/src",
        tapes=(cat.TapeEntry(cat.tape_id_for("s", 1), "s", 1, 10**12, 10**6),),
        containers=(cat.ContainerEntry(cid, "s", cat.tape_id_for("s", 1), 1, 0, 5, "a" * 64),),
        source_files=(cat.SourceFileEntry(fid, "a/b.txt", "/src/a/b.txt", 5, "b" * 64,
                                          cat.iso_from_ns(0), 0o100644, 0),),
        segments=(cat.SegmentEntry(cat.segment_id_for(fid, 1), fid, cid, 0, 0, 5, "b" * 64),),
    )


def test_decoded_records_share_one_string_per_id() -> None:
    c = CODEC.decode(b"".join(CODEC.encode(_sample_catalog())), source="test")
    assert c.segments[0].file_id is c.source_files[0].file_id
    assert c.segments[0].container_id is c.containers[0].container_id


def test_unknown_lists_and_keys_in_ltoflow_layout_are_ignored() -> None:
    data = b"".join(CODEC.encode(_sample_catalog()))
    data = data.replace(b'\n"segments":[', b'\n"acls":[\n{"path":"a"},\n{"path":"b"}],'
                        b'\n"segments":[')
    data = data.replace(b'"length_bytes":5,', b'"length_bytes":5,"compressed":false,')
    assert b'"compressed":false' in data
    assert CODEC.decode(data, source="newer") == _sample_catalog()


def test_ltoflow_layout_with_a_wrong_value_gives_the_clear_error() -> None:
    data = b"".join(CODEC.encode(_sample_catalog())).replace(b'"size_bytes":5', b'"size_bytes":[]')
    with pytest.raises(CatalogReadError, match="not a valid catalog") as info:
        CODEC.decode(data, source="tape X/catalog/catalog.json")
    assert "size_bytes" in str(info.value)


def test_ltoflow_layout_with_a_record_that_is_not_an_object_gives_the_clear_error() -> None:
    data = b"".join(CODEC.encode(_sample_catalog()))
    data = data.replace(b'\n"segments":[\n', b'\n"segments":[\n[1,2],\n')
    with pytest.raises(CatalogReadError, match="not a valid catalog"):
        CODEC.decode(data, source="tape X/catalog/catalog.json")


@pytest.mark.parametrize("enabled", [True, False])
def test_gc_paused_turns_the_collector_off_inside_and_restores_it(enabled: bool) -> None:
    import gc

    was = gc.isenabled()
    (gc.enable if enabled else gc.disable)()
    try:
        with cat.gc_paused():
            inside = gc.isenabled()
        assert (inside, gc.isenabled()) == (False, enabled)
    finally:
        (gc.enable if was else gc.disable)()


@pytest.mark.parametrize(
    "path", ["plain/name.txt", 'a},{"b', "tab\there", 'q"uote\\s', "é/ü", "\x7f"]
)
def test_records_stay_one_a_line_and_sizes_exact_whatever_the_path(path: str) -> None:
    c = attrs.evolve(_sample_catalog(), source_files=(
        attrs.evolve(_sample_catalog().source_files[0], relative_path=path),
    ) * 3)
    data = b"".join(CODEC.encode(c))
    assert len(data.splitlines()) == 1 + 5 + 1 + 1 + 3 + 1 + 2  # + empty directories, symlinks
    assert CODEC.decode(data, source="test") == c
    assert CODEC.string_size(path) == len(json.dumps(path, ensure_ascii=False).encode()) - 2


def test_gc_frozen_leaves_todays_objects_out_of_collections_until_the_end() -> None:
    import gc

    records = [_sample_catalog() for _ in range(100)]
    with cat.gc_frozen():
        inside = gc.get_freeze_count()
    assert inside >= len(records)
    assert gc.get_freeze_count() == 0


def test_a_catalog_list_the_fast_decoder_does_not_know_is_still_decoded(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    c = attrs.evolve(_sample_catalog(), skipped=(cat.SkippedEntry("dev/null", "fifo", "x"),))
    data = b"".join(CODEC.encode(c))
    monkeypatch.delitem(cat._LIST_TYPES, "skipped")
    assert CODEC.decode(data, source="test") == c


def test_records_with_field_types_the_fast_decoder_does_not_know_go_to_cattrs() -> None:
    @attrs.frozen
    class Future:
        name: str
        ratio: float = 0.5

    assert cat._checks(Future) is None
    assert cat._checks(cat.SegmentEntry) is not None


def test_fast_decoder_reads_odd_names_directories_symlinks_and_skipped_file_ids(
    tmp_path: Path,
) -> None:
    from ltoflow.plan import Hashes, JsonPlanSizer, build_catalog, make_plan
    from ltoflow.scan import scan_tree

    root = os.fsencode(tmp_path)
    os.mkdir(root + b"/caf\xe9")  # noqa: PTH102 - bytes names, exactly (Latin-1, not UTF-8)
    with open(root + b"/caf\xe9/n\xff.txt", "wb") as f:
        f.write(b"odd")
    (tmp_path / "plain.txt").write_bytes(b"plain")
    (tmp_path / "gone.txt").write_bytes(b"gone")
    os.symlink(b"caf\xe9/n\xff.txt", root + b"/link\xfd")  # noqa: PTH211 - bytes names
    os.mkfifo(tmp_path / "pipe")
    plan = make_plan(scan_tree(tmp_path), capacity_bytes=10**9, container_size_bytes=10**6,
                     measure_catalog=JsonPlanSizer(CODEC, "ltoflow test"))
    gone = [f.relative_path for f in plan.files].index("gone.txt")
    hashes = Hashes.placeholders(plan)
    hashes.files[gone] = None  # an unusable file has no whole-file hash
    catalog = build_catalog(plan, hashes, set_id="12345678-1234-4234-8234-123456789abc",
                            created_at=cat.iso_from_ns(0), created_by="ltoflow test",
                            unusable={gone: "it vanished"})
    data = b"".join(CODEC.encode(catalog))

    fast = cat._decode_lines(data)
    assert fast == cat.converter.structure(orjson.loads(data), Catalog) == catalog
    assert CODEC.decode(data, source="test") == catalog
    assert [d.path_bytes for d in fast.directories] == [b"caf\xe9"]
    assert [(s.path_bytes, s.target_bytes) for s in fast.symlinks] == [
        (b"link\xfd", b"caf\xe9/n\xff.txt")]
    assert {f.path_bytes for f in fast.source_files} == {b"caf\xe9/n\xff.txt", b"plain.txt"}
    assert {(k.relative_path, k.kind, k.file_id) for k in fast.skipped} == {
        ("gone.txt", "file", cat.file_id_for(b"gone.txt")), ("pipe", "fifo", None)}


def _columns(n: int, encoded: object) -> cat.RecordColumns[cat.SkippedEntry]:
    def objects(i: int, j: int) -> list[dict[str, object]]:
        return [{"relative_path": f"f{k}", "kind": "file", "reason": "gone"} for k in range(i, j)]

    return cat.RecordColumns(cat.SkippedEntry, n, objects, encoded)  # type: ignore[arg-type]


def test_batches_encoded_in_threads_come_out_in_order_and_stop_at_a_failure(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Batches the C extension would encode (here a stand-in) run a few ahead in threads: the
    output is in record order whatever order they finish in, a batch it declines (None) is
    made in Python, and a batch that fails ends the list with its error, with no batch begun
    far past it."""
    import threading

    monkeypatch.setattr(cat, "_BATCH", 2)
    begun: list[int] = []
    finished = {i: threading.Event() for i in range(0, 200, 2)}

    def encoded(i: int, j: int) -> bytes | None:
        begun.append(i)
        if i == 40:
            raise MemoryError("batch 40")
        if i % 4 == 0 and j < 20:  # finishes after the batch behind it, in the other thread
            assert finished[i + 2].wait(10)
        finished[i].set()
        if i % 4:
            return b",\n".join(b'{"relative_path":"f%d","kind":"file","reason":"gone"}' % k
                               for k in range(i, j))
        return None

    lines = b"".join(cat._records(_columns(20, encoded), cat.SkippedEntry))
    assert [json.loads(line.rstrip(b","))["relative_path"] for line in lines.split(b"\n")[1:]
            ] == [f"f{k}" for k in range(20)]

    begun.clear()
    with pytest.raises(MemoryError, match="batch 40"):
        b"".join(cat._records(_columns(200, encoded), cat.SkippedEntry))
    assert max(begun) <= 40 + 2 * (cat.ENCODE_THREADS + 1)


def test_a_list_closed_early_leaves_no_batch_encoding() -> None:
    """Closing the encoding of a list (the catalog write failed) waits for the batches being
    encoded and begins no more."""
    begun: list[int] = []

    def encoded(i: int, j: int) -> bytes | None:
        begun.append(i)
        return None

    import threading

    records = cat._records(_columns(10 * cat._BATCH, encoded), cat.SkippedEntry)
    next(records)
    records.close()
    assert len(begun) <= cat.ENCODE_THREADS + 2
    assert not [t for t in threading.enumerate() if t.name.startswith("ltoflow-encode")]
