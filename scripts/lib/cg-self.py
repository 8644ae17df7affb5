#!/usr/bin/env python3
"""Self cost per function of a callgrind dump, per request.

callgrind_annotate 3.19 puts a Rust binary's costs on `clone`; this sums each `fn=` block's own
cost lines (the line after `calls=` is the callee's inclusive cost and is skipped). Give dumps
made with `--compress-strings=no --compress-pos=no`.

    scripts/lib/cg-self.py DUMP [IDLE_DUMP] --requests N [--top 60] [--event Ir]
"""
import argparse
import collections
import re


def self_costs(path, event):
    costs = collections.Counter()
    events = None
    fn = "?"
    skip = False
    with open(path, errors="replace") as f:
        for line in f:
            if line.startswith("events:"):
                events = line.split()[1:]
                column = events.index(event) + 1
                continue
            if line.startswith("fn="):
                fn = line[3:].strip()
                continue
            if line.startswith("calls="):
                skip = True
                continue
            if line[:1].isdigit() or line[:1] in "+-*":
                if skip:
                    skip = False
                    continue
                parts = line.split()
                if events and len(parts) > column:
                    costs[fn] += int(parts[column])
                continue
    return costs


def main():
    p = argparse.ArgumentParser()
    p.add_argument("dump")
    p.add_argument("idle", nargs="?")
    p.add_argument("--requests", type=int, required=True)
    p.add_argument("--top", type=int, default=60)
    p.add_argument("--event", default="Ir")
    a = p.parse_args()
    costs = self_costs(a.dump, a.event)
    if a.idle:
        costs.subtract(self_costs(a.idle, a.event))
    total = sum(costs.values())
    print(f"total {total / a.requests:.0f} {a.event} per request")
    for fn, c in costs.most_common(a.top):
        short = re.sub(r"::h[0-9a-f]{16}$", "", fn)
        print(f"{c / a.requests:8.0f} {100 * c / total:5.1f}%  {short[:150]}")


if __name__ == "__main__":
    main()
