from __future__ import annotations

import hashlib
import random
from datetime import UTC, datetime
from pathlib import Path

import attrs
import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from ltoflow import catalog as cat
from ltoflow.catalog import JsonCatalogCodec
from ltoflow.errors import BackupPlanError
from ltoflow.hashing import MAX_REASON_BYTES
from ltoflow.plan import (
    Digests,
    Hashes,
    Plan,
    build_catalog,
    catalog_measurer,
    make_plan,
    with_tape_breaks,
)
from ltoflow.scan import (
    ScannedDirectory,
    ScannedFile,
    ScannedSymlink,
    ScanResult,
    path_fields,
)

CODEC = JsonCatalogCodec()
MEASURE = catalog_measurer(CODEC, "ltoflow test")


def scan_of(sizes: list[int]) -> ScanResult:
    files = tuple(
        ScannedFile(f"dir{i % 3}/file-{i:05d}.bin", size, 1_700_000_000_000_000_000 + i, 0o100644)
        for i, size in enumerate(sizes)
    )
    return ScanResult(Path("/srv/records"), files, ())


def plan_of(sizes: list[int], capacity: int, container: int, extra: int = 0) -> Plan:
    return make_plan(scan_of(sizes), capacity_bytes=capacity, container_size_bytes=container,
                     measure_catalog=MEASURE, extra_reserve_bytes=extra)


PlanInput = tuple[list[int], int, float]
plans = st.builds(
    lambda sizes, capacity, container_share: (sizes, capacity, container_share),
    st.lists(st.integers(0, 60_000), max_size=25),
    st.integers(20_000, 120_000),
    st.floats(0.05, 0.6),
)


def _plan_or_none(sizes: list[int], capacity: int, share: float) -> Plan | None:
    try:
        return plan_of(sizes, capacity, max(1, int(capacity * share)))
    except BackupPlanError:
        return None  # the catalog of many files does not fit a tiny tape: a valid refusal


@settings(max_examples=150, deadline=None)
@given(plans)
def test_every_byte_of_every_file_lies_in_exactly_one_segment(p: PlanInput) -> None:
    plan = _plan_or_none(*p)
    if plan is None:
        return
    for i, f in enumerate(plan.files):
        covered = 0
        parts = [plan.segments[s] for s in plan.segments_of(i)]
        for n, seg in enumerate(parts, start=1):
            assert seg.file_index == i
            assert seg.part == n
            assert seg.source_offset == covered, "segments are contiguous and in order"
            assert seg.length > 0
            covered += seg.length
        assert covered == f.size
    assert sum(s.length for s in plan.segments) == plan.total_bytes


@settings(max_examples=150, deadline=None)
@given(plans)
def test_containers_and_tapes_respect_their_limits(p: PlanInput) -> None:
    plan = _plan_or_none(*p)
    if plan is None:
        return
    for c in plan.containers:
        assert 0 < c.size <= plan.container_size_bytes
        offset = 0
        for s in c.segments:
            seg = plan.segments[s]
            assert seg.container_index == c.index
            assert seg.container_offset == offset
            offset += seg.length
        assert offset == c.size
    for t in plan.tapes:
        assert t.data_bytes <= plan.capacity_bytes - plan.reserve_bytes
        offset = 0
        for ci in t.containers:
            assert plan.containers[ci].tape_index == t.index
            assert plan.containers[ci].tape_offset == offset
            offset += plan.containers[ci].size
        assert offset == t.data_bytes
    # Tapes are filled before the next one starts: only the last may have room left.
    for t in plan.tapes[:-1]:
        assert t.data_bytes == plan.usable_bytes


@settings(max_examples=150, deadline=None)
@given(plans, st.randoms(use_true_random=False))
def test_tape_breaks_move_containers_whole_onto_later_tapes(p: PlanInput,
                                                            rnd: random.Random) -> None:
    """A tape that filled early ends at the break; containers keep their bytes and order,
    every tape still fits, and the tapes before the first break are untouched."""
    plan = _plan_or_none(*p)
    if plan is None or len(plan.containers) < 2:
        return
    breaks = sorted(rnd.sample(range(1, len(plan.containers)),
                               rnd.randint(1, min(3, len(plan.containers) - 1))))
    moved = with_tape_breaks(plan, breaks)
    assert with_tape_breaks(plan, []) is plan
    assert moved.segments == plan.segments
    assert [(c.index, c.size, c.segments) for c in moved.containers] == [
        (c.index, c.size, c.segments) for c in plan.containers]
    starts = {t.containers.start for t in moved.tapes}
    assert set(breaks) <= starts
    assert moved.tapes[: plan.containers[breaks[0]].tape_index] == plan.tapes[
        : plan.containers[breaks[0]].tape_index]
    assert len(moved.tapes) <= len(plan.tapes) + len(breaks)
    next_start = 0
    for t in moved.tapes:
        assert t.containers.start == next_start
        next_start = t.containers.stop
        assert 0 < t.data_bytes <= plan.usable_bytes
        offset = 0
        for ci in t.containers:
            assert (moved.containers[ci].tape_index, moved.containers[ci].tape_offset) == (
                t.index, offset)
            offset += moved.containers[ci].size
        assert offset == t.data_bytes
    assert next_start == len(plan.containers)


def real_catalog(plan: Plan, rnd: random.Random) -> tuple[cat.Catalog, Hashes]:
    """The catalog of `plan` with random (real-width) hashes, a real set id and date; and
    those hashes."""
    def hexes(n: int) -> list[str | None]:
        return [rnd.randbytes(32).hex() for _ in range(n)]

    h = Hashes(hexes(len(plan.segments)), hexes(len(plan.containers)), hexes(len(plan.files)))
    return build_catalog(plan, h, set_id="12345678-1234-4234-8234-123456789abc",
                         created_at=cat.iso_utc(datetime.now(UTC)),
                         created_by="ltoflow test"), h


@settings(max_examples=60, deadline=None)
@given(plans, st.randoms(use_true_random=False))
def test_reserve_holds_the_real_catalog(p: PlanInput, rnd: random.Random) -> None:
    plan = _plan_or_none(*p)
    if plan is None:
        return
    real, _ = real_catalog(plan, rnd)
    assert cat.encoded_size(CODEC, real) + cat.SHA256_HEX_LEN <= plan.reserve_bytes


@settings(max_examples=60, deadline=None)
@given(plans)
def test_same_input_gives_same_plan(p: PlanInput) -> None:
    a, b = _plan_or_none(*p), _plan_or_none(*p)
    if a is None:
        assert b is None
        return
    assert b is not None
    assert (a.segments, a.containers, a.tapes, a.reserve_bytes) == (
        b.segments, b.containers, b.tapes, b.reserve_bytes
    )


@settings(max_examples=60, deadline=None)
@given(st.integers(2, 5), st.integers(200_000, 400_000))
def test_file_larger_than_a_tape_spans_tapes(factor: int, capacity: int) -> None:
    plan = plan_of([100, capacity * factor, 100], capacity, capacity // 8)
    tapes = plan.tapes_of(1)
    assert len(tapes) >= factor
    assert tapes == list(range(tapes[0], tapes[-1] + 1))


def test_empty_tree_still_gets_one_tape_for_the_catalog() -> None:
    plan = plan_of([], 100_000, 10_000)
    assert len(plan.tapes) == 1
    assert not plan.containers


def test_zero_byte_files_get_no_segment() -> None:
    plan = plan_of([0, 10, 0], 100_000, 10_000)
    assert [len(plan.segments_of(i)) for i in range(3)] == [0, 1, 0]


def test_container_larger_than_usable_capacity_is_refused() -> None:
    with pytest.raises(BackupPlanError, match="larger than a tape's usable capacity"):
        plan_of([10], 100_000, 100_000)


def test_capacity_too_small_for_catalog_is_refused() -> None:
    with pytest.raises(BackupPlanError, match="cannot hold the catalog"):
        plan_of([1] * 50, 2_000, 100)


def test_reserve_covers_extra_files() -> None:
    assert plan_of([10], 100_000, 1_000, extra=5_000).reserve_bytes >= 5_000 + 64


names = st.text(st.characters(blacklist_categories=["Cs"], blacklist_characters="\x00/"),
                min_size=1, max_size=12).map(str.encode) | st.binary(min_size=1, max_size=12).map(
    lambda b: b.replace(b"/", b"_").replace(b"\x00", b"_"))


tree_entries = st.lists(
    st.tuples(names, st.integers(-(2**62), 2**62), st.integers(0, 0o177777), names),
    max_size=6, unique_by=lambda t: t[0])


def tree_of(files: list[tuple[bytes, int, int, int]],
            entries: list[tuple[bytes, int, int, bytes]], root: str) -> ScanResult:
    """A scan with files, directories and symlinks of any names, as scan_tree builds them."""
    scanned = tuple(ScannedFile(*path_fields(name)[:1], size, mtime, mode,
                                path_fields(name)[1]) for name, size, mtime, mode in files)
    dirs = tuple(ScannedDirectory(path_fields(b"d/" + name)[0], mode, mtime,
                                  path_fields(b"d/" + name)[1])
                 for name, mtime, mode, _ in entries)
    links = tuple(ScannedSymlink(path_fields(b"l/" + name)[0], target, mtime,
                                 path_fields(b"l/" + name)[1])
                  for name, mtime, _, target in entries)
    return ScanResult(Path("/" + root.replace("\x00", "")), scanned, (), dirs, links)


@settings(max_examples=150, deadline=None)
@given(
    st.lists(st.tuples(names, st.integers(0, 40_000), st.integers(-(2**62), 2**62),
                       st.integers(0, 0o177777)), max_size=30, unique_by=lambda t: t[0]),
    tree_entries,
    st.integers(2_000, 200_000),
    st.floats(0.01, 0.9),
    st.text(max_size=20),
)
def test_fast_json_sizer_equals_encoding_the_placeholder_catalog(
    files: list[tuple[bytes, int, int, int]], entries: list[tuple[bytes, int, int, bytes]],
    capacity: int, share: float, root: str
) -> None:
    from ltoflow.plan import JsonPlanSizer

    scan = tree_of(files, entries, root)
    container = max(1, int(capacity * share))
    sizer = JsonPlanSizer(CODEC, "ltoflow test")
    try:
        plan = make_plan(scan, capacity_bytes=capacity, container_size_bytes=container,
                         measure_catalog=MEASURE)
    except BackupPlanError:
        event("plan refused")
        return
    event(f"{len(plan.segments) // 10 * 10}+ segments")
    assert sizer(plan) == MEASURE(plan)
    assert sizer(plan) == MEASURE(plan)  # the cached file records stay right


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.tuples(names, st.integers(0, 40_000), st.integers(-(2**62), 2**62),
                       st.integers(0, 0o177777)), max_size=20, unique_by=lambda t: t[0]),
    tree_entries,
    st.randoms(use_true_random=False),
)
def test_reserve_holds_the_real_catalog_of_odd_names_dirs_and_links(
    files: list[tuple[bytes, int, int, int]], entries: list[tuple[bytes, int, int, bytes]],
    rnd: random.Random,
) -> None:
    from ltoflow.plan import JsonPlanSizer

    scan = tree_of(files, entries, "srv/\udcff".encode("utf-8", "surrogateescape").decode(
        "utf-8", "surrogateescape"))
    try:
        plan = make_plan(scan, capacity_bytes=150_000, container_size_bytes=20_000,
                         measure_catalog=JsonPlanSizer(CODEC, "ltoflow test"))
    except BackupPlanError:
        return

    real, h = real_catalog(plan, rnd)
    data = b"".join(CODEC.encode(real))
    assert len(data) + cat.SHA256_HEX_LEN <= plan.reserve_bytes
    back = CODEC.decode(data, source="test")
    assert [f.path_bytes for f in back.source_files] == [f.path_bytes for f in plan.files]
    assert [s.target_bytes for s in back.symlinks] == [s.target for s in plan.symlinks]
    assert [d.path_bytes for d in back.directories] == [d.path_bytes for d in plan.directories]
    # Files that become unusable mid-backup move to `skipped` under their readable name, with
    # the file_id of their exact bytes, and only ever shrink the catalog below the reserve.
    unusable = {i: "u" * MAX_REASON_BYTES for i in range(len(plan.files))
                if rnd.random() < 0.5}
    moved = build_catalog(plan, h, set_id="12345678-1234-4234-8234-123456789abc",
                          created_at=real.created_at, created_by="ltoflow test",
                          unusable=unusable)
    assert cat.encoded_size(CODEC, moved) <= len(data)
    assert {(k.relative_path, k.file_id) for k in moved.skipped} == {
        (plan.files[i].relative_path, cat.file_id_for(plan.files[i].path_bytes))
        for i in unusable}
    assert len(moved.source_files) == len(plan.files) - len(unusable)


@settings(max_examples=80, deadline=None)
@given(
    st.lists(st.tuples(names, st.integers(0, 40_000), st.integers(-(2**62), 2**62),
                       st.integers(0, 0o177777)), max_size=20, unique_by=lambda t: t[0]),
    st.randoms(use_true_random=False),
)
def test_catalog_lists_made_as_read_equal_and_encode_as_records(
    files: list[tuple[bytes, int, int, int]], rnd: random.Random,
) -> None:
    """build_catalog keeps source_files and segments as RecordColumns: they must read, compare
    and encode exactly as tuples of the records they stand for (names not UTF-8 included)."""
    scan = tree_of(files, [], "srv")
    try:
        plan = make_plan(scan, capacity_bytes=150_000, container_size_bytes=20_000,
                         measure_catalog=MEASURE)
    except BackupPlanError:
        return
    unusable = {i: "gone" for i in range(len(plan.files)) if rnd.random() < 0.2}
    _, h = real_catalog(plan, rnd)
    lazy = build_catalog(plan, h, set_id="12345678-1234-4234-8234-123456789abc",
                         created_at=cat.iso_from_ns(0), created_by="ltoflow test",
                         unusable=unusable)
    assert isinstance(lazy.source_files, cat.RecordColumns)
    records = attrs.evolve(lazy, source_files=list(lazy.source_files),
                           segments=list(lazy.segments))
    assert isinstance(records.segments, tuple)
    assert lazy == records
    assert records == lazy
    assert b"".join(CODEC.encode(lazy)) == b"".join(CODEC.encode(records))
    assert CODEC.decode(b"".join(CODEC.encode(lazy)), source="test") == lazy
    n = len(lazy.segments)
    assert [lazy.segments[i] for i in range(-n, n)] == [*records.segments, *records.segments]
    assert lazy.segments[1::2] == records.segments[1::2]
    with pytest.raises(IndexError):
        lazy.segments[n]
    # The catalog reads the recorder's digests: a pass may confirm one, never change it.
    if n:
        h.segments[0] = h.segments[0]
        h.files.set_from(0, h.files, 0)
        other = cat.EMPTY_SHA256 if h.segments[0] != cat.EMPTY_SHA256 else "0" * 64
        with pytest.raises(RuntimeError, match="changed after its catalog"):
            h.segments[0] = other
        with pytest.raises(RuntimeError, match="changed after its catalog"):
            h.segments[n - 1] = None
    assert lazy == records


@settings(max_examples=100, deadline=None)
@given(plans, st.randoms(use_true_random=False))
def test_split_files_are_the_files_of_several_segments(p: PlanInput, rnd: random.Random) -> None:
    plan = _plan_or_none(*p)
    if plan is None:
        return
    if len(plan.containers) > 2 and rnd.random() < 0.5:
        plan = with_tape_breaks(plan, [rnd.randrange(1, len(plan.containers))])
    split = [i for i in range(len(plan.files)) if len(plan.segments_of(i)) > 1]
    assert plan.split_files() == split
    assert plan.split_counts() == (len(split), sum(len(plan.tapes_of(i)) > 1 for i in split))


hex_digests = st.binary(min_size=32, max_size=32).map(bytes.hex)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.none() | hex_digests, max_size=12),
       st.lists(st.tuples(st.integers(-20, 20), st.none() | hex_digests), max_size=20))
def test_digests_behave_as_a_list_of_hex_strings(
    start: list[str | None], writes: list[tuple[int, str | None]]
) -> None:
    from ltoflow.plan import Digests

    model, digests = list(start), Digests(start)
    for i, value in writes:
        if -len(model) <= i < len(model):
            model[i] = value
            digests[i] = value
        else:
            with pytest.raises(IndexError):
                digests[i] = value
    assert digests == model
    assert list(digests) == model == digests[:]
    assert [digests[i] for i in range(-len(model), 0)] == model
    assert (None in digests) == (None in model)
    assert list(digests.unknown()) == [i for i, v in enumerate(model) if v is None]
    assert digests.missing() == model.count(None)
    if None in model:
        assert digests.index(None) == model.index(None)
    from ltoflow.plan import digest_pairs

    lo, hi = sorted((abs(writes[0][0]) % (len(model) + 1), len(model))) if writes else (0, 0)
    runs = digests.known_runs(lo, hi)
    assert list(digest_pairs(runs)) == [(i, v) for i, v in enumerate(model)
                                        if lo <= i < hi and v is not None]
    assert all(model[first - 1] is None for first, _ in runs if first > lo)  # maximal runs
    copy = Digests(model)
    if model:
        copy.set_from(0, digests, len(model) - 1)
        assert copy[0] == model[-1]
        with pytest.raises(IndexError):
            copy.set_from(-1, digests, 0)
        assert len(copy) == len(model)
    assert digests == model  # set_from reads, never writes, its source
    for bad in ("AB" * 32, "ab" * 31, "zz" * 32):
        with pytest.raises(ValueError, match="SHA-256"):
            Digests([bad])


def test_segment_table_reads_as_a_sequence_of_segments() -> None:
    plan = plan_of([30_000, 0, 50_000, 7], 60_000, 20_000)
    segs = plan.segments
    listed = list(segs)
    assert listed == [segs[i] for i in range(len(segs))] == segs[:]
    assert segs[-1] == listed[-1]
    assert segs[1:3] == listed[1:3]
    assert [s.length for s in listed] == list(segs.length)
    assert sum(s.length for s in segs) == plan.total_bytes == 80_007
    assert segs == plan_of([30_000, 0, 50_000, 7], 60_000, 20_000).segments
    assert segs != plan_of([30_000, 0, 50_000, 8], 60_000, 20_000).segments


def test_a_missing_file_hash_is_an_error_unless_the_file_is_unusable() -> None:
    plan = plan_of([10, 20, 30], 600_000, 20_000)
    hashes = Hashes.placeholders(plan)
    hashes.files[1] = None

    def catalog_of(unusable: dict[int, str]) -> cat.Catalog:
        return build_catalog(plan, hashes, set_id="12345678-1234-4234-8234-123456789abc",
                             created_at=cat.iso_from_ns(0), created_by="ltoflow test",
                             unusable=unusable)

    with pytest.raises(ValueError, match=f"no hash for {plan.files[1].relative_path}"):
        catalog_of({})
    catalog = catalog_of({1: "it vanished"})
    assert [f.relative_path for f in catalog.source_files] == [
        plan.files[0].relative_path, plan.files[2].relative_path]
    assert [(k.relative_path, k.reason) for k in catalog.skipped] == [
        (plan.files[1].relative_path, "it vanished")]
    assert len(catalog.segments) == 3  # its bytes stay on tape


def test_a_run_of_digests_is_set_only_when_none_is_known_or_frozen() -> None:
    hexes = [hashlib.sha256(bytes([i])).hexdigest() for i in range(6)]
    d = Digests.unknown_of(6)
    assert d.set_run_if_unknown(1, hexes[1:4])
    assert list(d) == [None, *hexes[1:4], None, None]
    assert not d.set_run_if_unknown(3, hexes[3:6])  # digest 3 is known: nothing set
    assert list(d)[4:] == [None, None]
    with pytest.raises(ValueError, match="lowercase SHA-256"):
        d.set_run_if_unknown(4, [hexes[4], hexes[5].upper()])
    d.freeze()
    assert not d.set_run_if_unknown(5, hexes[5:])
