"""Chart the throttled drive's tape rate and buffer fill over time (PNG, matplotlib).

Usage: python bench/chart.py RESULTS.json [--set mixed] [--job feed] [--run N] [--out PNG]
       python bench/chart.py TIMELINE.json --out PNG

RESULTS.json is what bench/run.py writes (`--json`): by default the chart shows the run with
the median wall time of the `mixed` set's discard-mode drive feed (`--job feed-persist` for
the persisted one). A TIMELINE.json written by `ltoflow backup --drive-timeline` works too.
The default output is bench/results/drive-feed-SET.png.

Needs matplotlib (`pip install matplotlib`); run.py itself does not.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
from pathlib import Path
from typing import Any

MB = 1000**2
MiB = 2**20
RESULTS_DIR = Path(__file__).resolve().parent / "results"
MODE_COLOURS = {"repositioning": "tab:red", "idle": "0.85"}


def pick_run(doc: dict[str, Any], set_name: str, job: str, run: int | None) -> dict[str, Any]:
    """The timeline and the numbers of one drive-feed run in run.py's results."""
    sets = {s["name"]: s for s in doc.get("sets", [])}
    if set_name not in sets:
        raise SystemExit(f"set {set_name!r} not in the results (have: {', '.join(sets)})")
    rows = {r["job"]: r for r in sets[set_name]["jobs"]}
    if job not in rows or "timeline_per_run" not in rows[job]:
        feeds = [k for k, r in rows.items() if "timeline_per_run" in r]
        raise SystemExit(f"no drive-feed job {job!r} for {set_name} (have: {', '.join(feeds)})")
    row = rows[job]
    seconds: list[float] = row["seconds"]
    timelines: list[Any] = row["timeline_per_run"]
    if not seconds:
        raise SystemExit(f"{set_name}/{job} has no successful runs")
    if run is None:  # the run whose wall time is the median (the lower middle one if even)
        med = statistics.median_low(seconds)
        index = seconds.index(med)
    else:
        if not 1 <= run <= len(seconds):
            raise SystemExit(f"--run must be between 1 and {len(seconds)}")
        index = run - 1
    if not timelines[index]:
        raise SystemExit(f"run {index + 1} of {set_name}/{job} has no timeline")
    drive = (row.get("drive_per_run") or [None] * len(seconds))[index] or {}
    return {
        "timeline": timelines[index],
        "title": (
            f"{set_name}: {row['label']}, run {index + 1} of {len(seconds)} "
            f"({seconds[index]:.1f} s wall)"
        ),
        "drive": drive,
        "set_bytes": sets[set_name]["bytes"],
    }


def draw(
    timeline: list[dict[str, Any]], title: str, out: Path, drive: dict[str, Any] | None = None
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    samples = [s for tape in timeline for s in tape["samples"]]
    if not samples:
        raise SystemExit("the timeline holds no samples")
    t0 = min(s["time"] for s in samples)
    fig, (ax_rate, ax_fill) = plt.subplots(2, 1, sharex=True, figsize=(10, 6), dpi=120)
    for tape in timeline:
        pts = sorted(tape["samples"], key=lambda s: s["time"])
        if not pts:
            continue
        t = [s["time"] - t0 for s in pts]
        ax_rate.step(t, [s["tape_rate"] / MB for s in pts], where="post", color="tab:blue", lw=1.5)
        ax_fill.plot(
            t, [s["buffer_fill"] / MB for s in pts], color="tab:green", lw=1.5, marker=".", ms=4
        )
        # shade the time the tape was not streaming: idle (grey) or repositioning (red)
        for a, b in itertools.pairwise(pts):
            colour = MODE_COLOURS.get(a["mode"])
            if colour is not None:
                for ax in (ax_rate, ax_fill):
                    ax.axvspan(a["time"] - t0, b["time"] - t0, color=colour, alpha=0.3, lw=0)
    ax_rate.set_ylabel("tape rate (MB/s)")
    ax_rate.set_ylim(bottom=0)
    ax_rate.grid(alpha=0.3)
    ax_fill.set_ylabel("drive buffer fill (MB)\n(dots: samples)")
    ax_fill.set_xlabel("time since the drive model started (s)")
    ax_fill.set_ylim(bottom=0)
    ax_fill.grid(alpha=0.3)
    subtitle = ""
    if drive:
        subtitle = (
            f"\n{drive.get('back_hitches', '?')} back-hitches, "
            f"{drive.get('seconds_streaming', 0):.1f} s streaming, "
            f"{drive.get('seconds_stopped', 0):.1f} s stopped, "
            f"{drive.get('seconds_repositioning', 0):.1f} s repositioning; shaded: "
            "grey idle, red repositioning"
        )
    fig.suptitle(title + subtitle, fontsize=10)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("input", type=Path, help="bench/run.py results JSON or a --drive-timeline file")
    p.add_argument("--set", default="mixed", dest="set_name", help="data set (default mixed)")
    p.add_argument(
        "--job",
        default="feed",
        choices=("feed", "feed-persist"),
        help="feed: discard mode (default); feed-persist: the persisted run",
    )
    p.add_argument("--run", type=int, default=None, help="run number (default: the median run)")
    p.add_argument("--out", type=Path, default=None, help="PNG to write")
    args = p.parse_args(argv)
    doc = json.loads(args.input.read_text())
    if isinstance(doc, list):  # a raw --drive-timeline file
        out = args.out or RESULTS_DIR / f"{args.input.stem}.png"
        draw(doc, f"drive timeline {args.input.name}", out)
    else:
        picked = pick_run(doc, args.set_name, args.job, args.run)
        suffix = "" if args.job == "feed" else "-persisted"
        out = args.out or RESULTS_DIR / f"drive-feed-{args.set_name}{suffix}.png"
        draw(picked["timeline"], picked["title"], out, picked["drive"])
    print(out, file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
