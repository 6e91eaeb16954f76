"""A model of an LTO drive's buffer, speed matching and back-hitches, on trio's clock.

The host puts data into the drive's buffer (`buffer_bytes`); the tape drains it at the tape
speed, and the host waits whenever the buffer is full, so data goes in no faster than the drive
stores it. Speed matching: at every arrival the tape speed is set to the host's rate estimate,
clamped to [minimum speed-matching rate, native rate], and it stays there until the next
arrival. The estimate is an exponential average (time constant `rate_time_constant`) of the rate
the host offers data, measured over the host's own time: the time the drive made it wait does
not count, so a host throttled by a full buffer still reads as fast. If the buffer runs dry
while the tape moves, that is a back-hitch: the drive stops and repositions for
`reposition_seconds` and takes nothing meanwhile. A stopped drive (at first, after a reposition,
after a flush) starts the tape once the buffer holds `start_fill_bytes` (default: all of it),
or when the host flushes; a flush writes the buffer out and stops cleanly, not a back-hitch.

`DriveCore` is the exact synchronous arithmetic over times passed in; `DriveModel` wraps it for
trio and only sleeps for as long as the core says the host must wait.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable

import attrs
import trio

from ltoflow.units import MB, TB, MiB

DEFAULT_BUFFER_BYTES = 1024 * MiB
DEFAULT_REPOSITION_SECONDS = 2.0
DEFAULT_RATE_TIME_CONSTANT = 1.0
DEFAULT_SAMPLE_INTERVAL = 1.0
DEFAULT_MAX_SAMPLES = 10_000


@attrs.frozen
class DriveProfile:
    """One LTO generation: native (uncompressed) capacity and speed-matching range, in bytes."""

    name: str
    native_capacity_bytes: int
    native_rate: int  # bytes/s: the fastest the tape moves data
    minimum_rate: int  # bytes/s: the slowest speed-matching rate; below it the drive back-hitches


PROFILES: dict[str, DriveProfile] = {
    p.name: p
    for p in (
        DriveProfile("lto5", 15 * TB // 10, 140 * MB, 40 * MB),
        DriveProfile("lto6", 25 * TB // 10, 160 * MB, 40 * MB),
        DriveProfile("lto7", 6 * TB, 300 * MB, 101 * MB),
        DriveProfile("lto8", 12 * TB, 360 * MB, 112 * MB),
        DriveProfile("lto9", 18 * TB, 400 * MB, 177 * MB),
        DriveProfile("lto10", 30 * TB, 400 * MB, 157 * MB),
    )
}


class TapeMode(enum.StrEnum):
    IDLE = "idle"  # tape stopped, waiting for the buffer to reach the start fill (or a flush)
    STREAMING = "streaming"  # tape moving at the matched speed
    REPOSITIONING = "repositioning"  # back-hitch in progress: no data accepted


@attrs.frozen
class DriveStatistics:
    """Totals since the model's first call; after `flush`, bytes_written == bytes_accepted."""

    drive: str
    bytes_accepted: int
    bytes_written: int  # to tape; the rest is still in the buffer
    seconds_streaming: float
    seconds_stopped: float  # tape still, not repositioning: waiting for data or a flush
    seconds_repositioning: float  # back_hitches * reposition_seconds once each has finished
    back_hitches: int
    mean_streaming_rate: float  # bytes_written / seconds_streaming (0.0 before any streaming)
    peak_buffer_bytes: int


@attrs.frozen
class TimelineSample:
    """The drive from `time` on: tape speed (0 unless streaming), buffer fill and mode."""

    time: float
    tape_rate: float
    buffer_fill: int
    mode: TapeMode


@attrs.define
class _State:
    now: float
    started: bool
    mode: TapeMode = TapeMode.IDLE
    fill: float = 0.0  # bytes in the buffer
    speed: float = 0.0  # bytes/s while streaming
    host_rate: float = 0.0  # bytes/s, the estimate speed matching follows
    last_return: float | None = None  # when the host's previous call returned
    reposition_end: float = 0.0
    accepted: int = 0
    streaming: float = 0.0
    stopped: float = 0.0
    repositioning: float = 0.0
    back_hitches: int = 0
    peak: float = 0.0


class DriveCore:
    """The drive model's arithmetic: no clock, no I/O; every call carries its time.

    `start_time=None` starts the model's clock at its first call. Times that go backwards are
    taken as the model's current time, so overlapping callers queue up behind each other.
    """

    def __init__(
        self,
        profile: DriveProfile,
        *,
        buffer_bytes: int = DEFAULT_BUFFER_BYTES,
        reposition_seconds: float = DEFAULT_REPOSITION_SECONDS,
        start_fill_bytes: int | None = None,
        rate_time_constant: float = DEFAULT_RATE_TIME_CONSTANT,
        sample_interval: float = DEFAULT_SAMPLE_INTERVAL,
        max_samples: int = DEFAULT_MAX_SAMPLES,
        start_time: float | None = None,
    ) -> None:
        if not 0 < profile.minimum_rate <= profile.native_rate:
            raise ValueError(f"drive {profile.name}: need 0 < minimum rate <= native rate")
        if buffer_bytes <= 0:
            raise ValueError(f"buffer_bytes must be positive, got {buffer_bytes}")
        start_fill = buffer_bytes if start_fill_bytes is None else start_fill_bytes
        if not 0 < start_fill <= buffer_bytes:
            raise ValueError(f"start_fill_bytes must be in 1..{buffer_bytes}, got {start_fill}")
        if not reposition_seconds >= 0:
            raise ValueError(f"reposition_seconds must be >= 0, got {reposition_seconds}")
        if not rate_time_constant > 0:
            raise ValueError(f"rate_time_constant must be positive, got {rate_time_constant}")
        if not sample_interval >= 0:
            raise ValueError(f"sample_interval must be >= 0, got {sample_interval}")
        if max_samples < 2:
            raise ValueError(f"max_samples must be at least 2, got {max_samples}")
        self.profile = profile
        self.buffer_bytes = buffer_bytes
        self.start_fill_bytes = start_fill
        self.reposition_seconds = float(reposition_seconds)
        self.rate_time_constant = float(rate_time_constant)
        self.max_samples = max_samples
        self._native = float(profile.native_rate)
        self._minimum = float(profile.minimum_rate)
        self._sample_interval = float(sample_interval)
        self._last_sample = -math.inf
        self._samples: list[TimelineSample] = []
        self._s = _State(now=0.0, started=False)
        if start_time is not None:
            self._begin(start_time)

    # -- read-only views -------------------------------------------------------------------

    @property
    def now(self) -> float:
        """The model's time: the end of the last call (0.0 before the first)."""
        return self._s.now

    @property
    def mode(self) -> TapeMode:
        """What the tape is doing at `now`."""
        return self._s.mode

    @property
    def buffer_fill(self) -> float:
        """Bytes in the buffer at `now`."""
        return self._s.fill

    @property
    def tape_rate(self) -> float:
        """Tape speed in bytes/s at `now` (0.0 unless streaming)."""
        s = self._s
        return s.speed if s.mode is TapeMode.STREAMING else 0.0

    @property
    def host_rate(self) -> float:
        """The host-rate estimate speed matching follows, bytes/s (capped at the native rate)."""
        return self._s.host_rate

    # -- the model ---------------------------------------------------------------------------

    def advance(self, to_time: float) -> None:
        """Let the tape run until `to_time`, counting any back-hitch on the way."""
        s = self._s
        if not s.started:
            self._begin(to_time)
            return
        while True:
            if s.mode is TapeMode.REPOSITIONING and s.now >= s.reposition_end:
                s.mode = TapeMode.IDLE
                self._record()
            if s.now >= to_time:
                return
            if s.mode is TapeMode.STREAMING:
                dry_at = s.now + s.fill / s.speed
                if dry_at <= to_time:  # the host fell behind: back-hitch
                    s.streaming += dry_at - s.now
                    s.now = dry_at
                    s.fill = 0.0
                    s.back_hitches += 1
                    s.mode = TapeMode.REPOSITIONING
                    s.reposition_end = dry_at + self.reposition_seconds
                    self._record()
                else:
                    dt = to_time - s.now
                    s.streaming += dt
                    s.fill = max(0.0, s.fill - s.speed * dt)
                    s.now = to_time
            elif s.mode is TapeMode.REPOSITIONING:
                end = min(to_time, s.reposition_end)
                s.repositioning += end - s.now
                s.now = end
            else:
                s.stopped += to_time - s.now
                s.now = to_time

    def add(self, nbytes: int, at_time: float) -> float:
        """Offer `nbytes` at `at_time`; return when the last of them is in the buffer.

        The model is left at that time. The host waits for a reposition to end, and for room:
        what does not fit flows in as the tape drains the full buffer.
        """
        if nbytes < 0:
            raise ValueError(f"cannot add {nbytes} bytes")
        s = self._s
        self.advance(max(at_time, s.now))
        self._observe(nbytes)
        if s.mode is TapeMode.REPOSITIONING:
            self.advance(s.reposition_end)
        if nbytes:
            room = self.buffer_bytes - s.fill
            rest = 0.0
            if nbytes <= room:
                s.fill += nbytes
            else:
                rest = nbytes - room
                s.fill = float(self.buffer_bytes)
            s.accepted += nbytes
            s.peak = max(s.peak, s.fill)
            if s.mode is TapeMode.STREAMING:
                s.speed = self._matched()
            elif s.fill >= self.start_fill_bytes:
                self._start()
            if rest > 0.0:  # the buffer is full, so the tape is streaming: wait for room
                dt = rest / s.speed
                s.streaming += dt
                s.now += dt
        s.last_return = s.now
        if s.now - self._last_sample >= self._sample_interval:
            self._record()
        return s.now

    def flush(self, at_time: float) -> float:
        """Write out the buffer from `at_time` on and stop cleanly; return when done."""
        s = self._s
        self.advance(max(at_time, s.now))
        if s.mode is TapeMode.REPOSITIONING:
            self.advance(s.reposition_end)
        if s.fill > 0.0:
            if s.mode is TapeMode.IDLE:
                self._start()
            dt = s.fill / s.speed
            s.streaming += dt
            s.now += dt
            s.fill = 0.0
        if s.mode is TapeMode.STREAMING:
            s.mode = TapeMode.IDLE
            self._record()
        s.speed = 0.0
        s.last_return = s.now
        return s.now

    def statistics(self) -> DriveStatistics:
        """Totals as of `now`."""
        s = self._s
        written = s.accepted - round(s.fill)
        return DriveStatistics(
            drive=self.profile.name,
            bytes_accepted=s.accepted,
            bytes_written=written,
            seconds_streaming=s.streaming,
            seconds_stopped=s.stopped,
            seconds_repositioning=s.repositioning,
            back_hitches=s.back_hitches,
            mean_streaming_rate=written / s.streaming if s.streaming > 0.0 else 0.0,
            peak_buffer_bytes=round(s.peak),
        )

    def timeline(self) -> list[TimelineSample]:
        """Samples at every mode change and at most every sample interval, oldest first."""
        return list(self._samples)

    # -- internals ---------------------------------------------------------------------------

    def _begin(self, t: float) -> None:
        self._s.now = t
        self._s.started = True
        self._record()

    def _observe(self, nbytes: int) -> None:
        """Fold an offer of `nbytes` at `now` into the host-rate estimate.

        The host's time for this chunk runs from its previous call's return to this call: an
        exponential average over that interval of the rate nbytes/dt, which converges exactly to
        n/p for n bytes every p seconds and adds nbytes/tau for back-to-back calls (dt == 0).
        """
        s = self._s
        tau = self.rate_time_constant
        dt = 0.0 if s.last_return is None else max(0.0, s.now - s.last_return)
        if dt > 0.0:
            w = -math.expm1(-dt / tau)
            rate = s.host_rate * (1.0 - w) + nbytes * (w / dt)
        else:
            rate = s.host_rate + nbytes / tau
        s.host_rate = min(rate, self._native)

    def _matched(self) -> float:
        return max(self._minimum, min(self._s.host_rate, self._native))

    def _start(self) -> None:
        s = self._s
        s.mode = TapeMode.STREAMING
        s.speed = self._matched()
        self._record()

    def _record(self) -> None:
        s = self._s
        self._last_sample = s.now
        self._samples.append(TimelineSample(s.now, self.tape_rate, round(s.fill), s.mode))
        if len(self._samples) > self.max_samples:  # halve the history and the sampling rate
            self._samples = self._samples[::2]
            self._sample_interval *= 2.0


class DriveModel:
    """An LTO drive on trio's clock: `await accept(n)` per chunk written, `await flush()` at end.

    The chunk is committed to the model when `accept` is called; the call then sleeps until the
    drive has taken it, so a cancelled wait still counts those bytes as accepted.
    """

    def __init__(
        self,
        profile: DriveProfile,
        *,
        buffer_bytes: int = DEFAULT_BUFFER_BYTES,
        reposition_seconds: float = DEFAULT_REPOSITION_SECONDS,
        start_fill_bytes: int | None = None,
        rate_time_constant: float = DEFAULT_RATE_TIME_CONSTANT,
        sample_interval: float = DEFAULT_SAMPLE_INTERVAL,
        max_samples: int = DEFAULT_MAX_SAMPLES,
        clock: Callable[[], float] = trio.current_time,
    ) -> None:
        self.core = DriveCore(
            profile,
            buffer_bytes=buffer_bytes,
            reposition_seconds=reposition_seconds,
            start_fill_bytes=start_fill_bytes,
            rate_time_constant=rate_time_constant,
            sample_interval=sample_interval,
            max_samples=max_samples,
        )
        self._clock = clock

    @property
    def profile(self) -> DriveProfile:
        """The drive generation being modelled."""
        return self.core.profile

    async def accept(self, nbytes: int) -> None:
        """Hand the drive `nbytes`; return once a real drive would have taken them."""
        now = self._clock()
        await self._wait(self.core.add(nbytes, now), now)

    async def flush(self) -> None:
        """Return once the tape has written everything accepted; the drive then stops cleanly."""
        now = self._clock()
        await self._wait(self.core.flush(now), now)

    def statistics(self) -> DriveStatistics:
        """Totals as of the end of the last `accept` or `flush` (exact after `flush`)."""
        return self.core.statistics()

    def timeline(self) -> list[TimelineSample]:
        """The (time, tape rate, buffer fill, mode) samples for charts, bounded in number."""
        return self.core.timeline()

    async def _wait(self, until: float, now: float) -> None:
        if until > now:
            await trio.sleep(until - now)
        else:
            await trio.lowlevel.checkpoint()
