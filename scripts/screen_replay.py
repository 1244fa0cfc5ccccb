#!/usr/bin/env python3
"""Replays the coordinator's gradient screen on the norms a real job recorded.

Record a fault-free job with the norms in its log, e.g.

    RUST_LOG=info,coordinator::trainer=trace coordinator --workers 3 --model mlp \
        --epochs 20 2> job.log

then `scripts/screen_replay.py job.log [more.log ...]` prints, for each job, how far honest
members came to the screen's thresholds (the largest single-step norm over the others'
median, and the largest geometric mean of that over 32 steps), and how many steps after it
starts a member sending ten times its gradient is refused by the sustained rule. The
thresholds are those of coordinator/src/screening.rs; keep them in step.
"""
import math
import re
import sys

OUTLIER_FACTOR = 1e4
SUSTAINED_STEPS = 32
SUSTAINED_FACTOR = 4.0
REFERENCE_FLOOR = 1e-3
NORM = re.compile(r"\b(w\d+):([-+0-9.eEinfNa]+)")


def steps(path):
    """The recorded steps, each a list of (worker, norm), in order."""
    with open(path, errors="replace") as f:
        for line in f:
            if "gradient norms" in line:
                found = [(w, float(v)) for w, v in NORM.findall(line)]
                if found:
                    yield found


def upper_median(values):
    values = sorted(values)
    return values[len(values) // 2]


def replay(rows, attacker=None, scale=10.0, start=0):
    """(largest honest single-step ratio, largest honest geometric mean, steps from `start`
    until the attacker is refused or None)."""
    windows, spike, typical, caught = {}, 0.0, 0.0, None
    for i, row in enumerate(rows):
        row = [(w, v * scale if w == attacker and i >= start else v) for w, v in row]
        present = {w for w, _ in row}
        windows = {w: q for w, q in windows.items() if w in present}
        if len(row) < 3:
            continue
        floor = upper_median([v for _, v in row]) * REFERENCE_FLOOR
        for w, v in row:
            others = [x for u, x in row if u != w and x >= floor and x > 0]
            if not others or v <= 0:
                continue
            over = v / upper_median(others)
            q = windows.setdefault(w, [])
            q.append(math.log(over))
            del q[:-SUSTAINED_STEPS]
            mean = math.exp(sum(q) / len(q)) if len(q) == SUSTAINED_STEPS else 0.0
            if w == attacker and i >= start:
                if caught is None and (over > OUTLIER_FACTOR or mean > SUSTAINED_FACTOR):
                    caught = i - start
            elif w != attacker:
                spike, typical = max(spike, over), max(typical, mean)
    return spike, typical, caught


def main():
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    print("| job | steps | members | largest spike | largest 32-step geometric mean "
          "| ten times the gradient refused after (steps) |")
    print("|---|---:|---:|---:|---:|---|")
    for path in sys.argv[1:]:
        rows = list(steps(path))
        if not rows:
            print(f"| {path} | no 'gradient norms' lines: was the log at trace level? | | | | |")
            continue
        members = sorted({w for w, _ in rows[len(rows) // 2]})
        spike, typical, _ = replay(rows)
        caught = [
            replay(rows, attacker=a, start=s)[2]
            for a in members[:2]
            for s in (len(rows) // 3, len(rows) * 4 // 5)
        ]
        shown = ", ".join("never" if c is None else str(c) for c in caught)
        print(f"| {path} | {len(rows)} | {len(members)} | {spike:.1f} | {typical:.2f} | {shown} |")


if __name__ == "__main__":
    main()
