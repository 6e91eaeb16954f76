"""The LTO drive model on trio's virtual clock: rate limiting, speed matching, back-hitches."""

from __future__ import annotations

import itertools

import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

from ltoflow.drives.model import (
    DEFAULT_BUFFER_BYTES,
    PROFILES,
    DriveCore,
    DriveModel,
    DriveProfile,
    TapeMode,
)
from ltoflow.units import GB, MB, TB, MiB

CHUNK = 8 * MiB
LTO9 = PROFILES["lto9"]
BUF = DEFAULT_BUFFER_BYTES
R = 2.0


async def feed(model: DriveModel, total: int, rate: float | None) -> float:
    """Offer `total` bytes in CHUNK pieces, each after `n / rate` s of host time making it
    (None: no host time at all); return the elapsed virtual time."""
    start = trio.current_time()
    left = total
    while left:
        n = min(CHUNK, left)
        if rate is not None:
            await trio.sleep(n / rate)
        await model.accept(n)
        left -= n
    return trio.current_time() - start


def test_profiles_have_the_published_numbers() -> None:
    expected = {
        "lto5": (1.5, 140, 40),
        "lto6": (2.5, 160, 40),
        "lto7": (6, 300, 101),
        "lto8": (12, 360, 112),
        "lto9": (18, 400, 177),
        "lto10": (30, 400, 157),
    }
    assert set(PROFILES) == set(expected)
    for name, (tb, native_mb, minimum_mb) in expected.items():
        assert PROFILES[name] == DriveProfile(name, round(tb * TB), native_mb * MB, minimum_mb * MB)


async def test_host_faster_than_native_is_held_to_the_native_rate(
    autojump_clock: trio.testing.MockClock,
) -> None:
    model = DriveModel(LTO9)
    total = 10 * GB
    start = trio.current_time()
    fed = await feed(model, total, None)
    # The first buffer's worth goes in at once; the rest only as fast as the tape drains it.
    assert fed == pytest.approx((total - BUF) / LTO9.native_rate, rel=1e-9)
    assert model.core.tape_rate == LTO9.native_rate
    await model.flush()
    assert trio.current_time() - start == pytest.approx(total / LTO9.native_rate, rel=1e-9)
    s = model.statistics()
    assert s.back_hitches == 0
    assert s.bytes_accepted == s.bytes_written == total
    assert s.mean_streaming_rate == pytest.approx(LTO9.native_rate, rel=1e-9)
    assert s.peak_buffer_bytes == BUF
    assert s.seconds_repositioning == 0.0


async def test_host_between_minimum_and_native_is_speed_matched(
    autojump_clock: trio.testing.MockClock,
) -> None:
    model = DriveModel(LTO9)
    rate = 250 * MB
    total = 20 * GB
    fed = await feed(model, total, rate)
    # The drive barely slows the host: only while the rate estimate is still climbing.
    assert fed == pytest.approx(total / rate, rel=0.01)
    assert model.core.mode is TapeMode.STREAMING
    assert model.core.tape_rate == pytest.approx(rate, rel=1e-3)
    await model.flush()
    s = model.statistics()
    assert s.back_hitches == 0
    assert s.bytes_accepted == s.bytes_written == total
    assert s.mean_streaming_rate == pytest.approx(rate, rel=0.01)
    streaming = [x for x in model.timeline() if x.mode is TapeMode.STREAMING]
    assert streaming
    assert all(LTO9.minimum_rate <= x.tape_rate <= LTO9.native_rate for x in streaming)


async def test_host_below_minimum_back_hitches_once_per_buffer_cycle(
    autojump_clock: trio.testing.MockClock,
) -> None:
    model = DriveModel(LTO9, reposition_seconds=R)
    host = 50 * MB
    tape = LTO9.minimum_rate  # a host below the minimum gets the minimum speed
    # One cycle: the buffer fills (idle), then streams at `tape` while the host adds `host`,
    # running dry after BUF / (tape - host) s. It takes BUF * tape / (tape - host) bytes.
    per_cycle = BUF * tape / (tape - host)
    chunks = round(4.5 * per_cycle / CHUNK)  # end mid-cycle, far from any boundary
    total = chunks * CHUNK
    hitches = int(total // per_cycle)
    assert hitches == 4
    fed = await feed(model, total, host)
    s = model.statistics()
    assert s.back_hitches == hitches
    assert s.seconds_repositioning == hitches * R
    # The host loses up to R per back-hitch: its next chunk waits out the reposition.
    p = CHUNK / host
    assert total / host + hitches * (R - p) <= fed <= total / host + hitches * R
    # Each back-hitch is R seconds of no acceptance, then the drive idles until it refills.
    samples = model.timeline()
    for i, x in enumerate(samples):
        if x.mode is TapeMode.REPOSITIONING:
            assert x.buffer_fill == 0
            assert samples[i + 1].mode is TapeMode.IDLE
            assert samples[i + 1].time == x.time + R
    await model.flush()
    s = model.statistics()
    assert s.back_hitches == hitches
    assert s.bytes_accepted == s.bytes_written == total
    assert s.mean_streaming_rate == pytest.approx(tape, rel=1e-9)


def test_an_offer_during_a_reposition_waits_until_it_is_over() -> None:
    core = DriveCore(LTO9, buffer_bytes=100 * MB, reposition_seconds=R, start_time=0.0)
    assert core.add(100 * MB, 0.0) == 0.0  # full buffer: the tape starts at the minimum rate
    dry = 100 * MB / LTO9.minimum_rate
    assert core.add(0, dry - 0.01) == dry - 0.01
    assert core.add(CHUNK, dry + 0.5) == dry + R
    assert core.mode is TapeMode.IDLE
    assert core.buffer_fill == CHUNK
    s = core.statistics()
    assert s.back_hitches == 1
    assert s.seconds_repositioning == R
    assert s.seconds_streaming == dry


@pytest.mark.parametrize(
    ("pause", "hitches"),
    [(30.0, 1), (1.1 * BUF / LTO9.native_rate, 1), (0.9 * BUF / LTO9.native_rate, 0), (2.0, 0)],
)
async def test_a_pause_back_hitches_only_if_it_outlasts_the_buffer(
    autojump_clock: trio.testing.MockClock, pause: float, hitches: int
) -> None:
    model = DriveModel(LTO9, reposition_seconds=R)
    await feed(model, 4 * GB, None)
    # Full buffer at the native rate: it runs dry after BUF / native s (2.68 s) without data.
    assert model.core.buffer_fill == BUF
    assert model.core.tape_rate == LTO9.native_rate
    await trio.sleep(pause)
    await feed(model, 2 * GB, None)
    await model.flush()
    s = model.statistics()
    assert s.back_hitches == hitches
    assert s.seconds_repositioning == hitches * R
    assert s.bytes_accepted == s.bytes_written == 6 * GB


async def test_flush_and_the_idle_drive_after_it_are_not_back_hitches(
    autojump_clock: trio.testing.MockClock,
) -> None:
    model = DriveModel(LTO9)
    await feed(model, 300 * MB, 50 * MB)  # never fills the buffer: the tape never started
    assert model.core.mode is TapeMode.IDLE
    assert model.statistics().bytes_written == 0
    await model.flush()  # starts the tape and writes it all
    s = model.statistics()
    assert (s.back_hitches, s.bytes_accepted, s.bytes_written) == (0, 300 * MB, 300 * MB)
    assert s.seconds_streaming == pytest.approx(300 * MB / LTO9.minimum_rate, rel=1e-12)
    await trio.sleep(60)  # host done: the stopped drive idles
    await feed(model, 3 * GB, None)
    await model.flush()
    await model.flush()  # nothing left: returns at once
    s = model.statistics()
    assert s.back_hitches == 0
    assert s.bytes_accepted == s.bytes_written == 3 * GB + 300 * MB
    assert model.core.mode is TapeMode.IDLE
    assert model.timeline()[-1].mode is TapeMode.IDLE


def test_core_time_accounting_adds_up() -> None:
    core = DriveCore(LTO9, reposition_seconds=R, start_time=10.0)
    t = 10.0
    for _ in range(400):
        t = core.add(CHUNK, t) + CHUNK / (60 * MB)
    end = core.flush(t)
    s = core.statistics()
    assert s.back_hitches > 0
    elapsed = s.seconds_streaming + s.seconds_stopped + s.seconds_repositioning
    assert elapsed == pytest.approx(end - 10.0, rel=1e-12)
    assert s.bytes_written == s.bytes_accepted == 400 * CHUNK


def test_timeline_is_bounded_and_ordered() -> None:
    core = DriveCore(LTO9, buffer_bytes=64 * MB, sample_interval=0.0, max_samples=50)
    t = 0.0
    for _ in range(3_000):
        t = core.add(CHUNK, t) + CHUNK / (30 * MB)  # below the minimum: a back-hitch per fill
    core.flush(t)
    samples = core.timeline()
    assert core.statistics().back_hitches > 100
    assert 25 <= len(samples) <= 50
    assert samples[0].time == 0.0
    assert all(a.time <= b.time for a, b in itertools.pairwise(samples))


async def test_default_timeline_samples_at_most_once_a_second_between_mode_changes(
    autojump_clock: trio.testing.MockClock,
) -> None:
    model = DriveModel(LTO9)
    await feed(model, 8 * GB, 250 * MB)
    samples = model.timeline()
    span = samples[-1].time - samples[0].time
    assert span > 30
    assert len(samples) <= span + 3  # one a second, plus the start and the first fill
    assert all(a.time <= b.time for a, b in itertools.pairwise(samples))


@settings(max_examples=150, deadline=None)
@given(
    steps=st.lists(
        st.tuples(st.floats(0.0, 20.0), st.integers(0, 300 * MB)), min_size=1, max_size=40
    ),
    buffer_mb=st.integers(1, 2_000),
    start_fraction=st.floats(0.01, 1.0),
)
def test_core_invariants(
    steps: list[tuple[float, int]], buffer_mb: int, start_fraction: float
) -> None:
    buffer_bytes = buffer_mb * MB
    core = DriveCore(
        LTO9,
        buffer_bytes=buffer_bytes,
        start_fill_bytes=max(1, int(buffer_bytes * start_fraction)),
        sample_interval=0.5,
        max_samples=20,
        start_time=0.0,
    )
    t = 0.0
    total = 0
    for gap, nbytes in steps:
        t += gap
        done = core.add(nbytes, t)
        assert done >= t
        total += nbytes
        assert 0.0 <= core.buffer_fill <= buffer_bytes
        assert core.statistics().bytes_written <= total
        t = done
    end = core.flush(t)
    s = core.statistics()
    assert s.bytes_accepted == s.bytes_written == total
    assert s.peak_buffer_bytes <= buffer_bytes
    assert s.seconds_repositioning == pytest.approx(s.back_hitches * R)
    elapsed = s.seconds_streaming + s.seconds_stopped + s.seconds_repositioning
    assert elapsed == pytest.approx(end, rel=1e-9, abs=1e-9)
    samples = core.timeline()
    assert len(samples) <= 20
    assert all(a.time <= b.time for a, b in itertools.pairwise(samples))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"buffer_bytes": 0},
        {"start_fill_bytes": 0},
        {"start_fill_bytes": BUF + 1},
        {"reposition_seconds": -1.0},
        {"rate_time_constant": 0.0},
        {"max_samples": 1},
    ],
)
def test_bad_parameters_are_refused(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError, match="must be"):
        DriveCore(LTO9, **kwargs)  # type: ignore[arg-type]
