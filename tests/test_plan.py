from __future__ import annotations

import random
from datetime import UTC, datetime
from pathlib import Path

import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from ltoflow import catalog as cat
from ltoflow.catalog import JsonCatalogCodec
from ltoflow.errors import BackupPlanError
from ltoflow.plan import Hashes, Plan, build_catalog, catalog_measurer, make_plan
from ltoflow.scan import ScannedFile, ScanResult

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


@settings(max_examples=60, deadline=None)
@given(plans, st.randoms(use_true_random=False))
def test_reserve_holds_the_real_catalog(p: PlanInput, rnd: random.Random) -> None:
    plan = _plan_or_none(*p)
    if plan is None:
        return
    def hexes(n: int) -> list[str | None]:
        return [rnd.randbytes(32).hex() for _ in range(n)]

    h = Hashes(hexes(len(plan.segments)), hexes(len(plan.containers)), hexes(len(plan.files)))
    real = build_catalog(plan, h, set_id="12345678-1234-4234-8234-123456789abc",
                         created_at=cat.iso_utc(datetime.now(UTC)), created_by="ltoflow test")
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
                min_size=1, max_size=12)


@settings(max_examples=150, deadline=None)
@given(
    st.lists(st.tuples(names, st.integers(0, 40_000), st.integers(-(2**62), 2**62),
                       st.integers(0, 0o177777)), max_size=30, unique_by=lambda t: t[0]),
    st.integers(2_000, 200_000),
    st.floats(0.01, 0.9),
    st.text(max_size=20),
)
def test_fast_json_sizer_equals_encoding_the_placeholder_catalog(
    files: list[tuple[str, int, int, int]], capacity: int, share: float, root: str
) -> None:
    from ltoflow.plan import JsonPlanSizer

    scanned = tuple(ScannedFile(name, size, mtime, mode) for name, size, mtime, mode in files)
    scan = ScanResult(Path("/" + root.replace("\x00", "")), scanned, ())
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
