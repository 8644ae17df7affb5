"""Report of scripts/soak: python3 soak-report.py RUN_DIR OUT_DIR NAME.

Reads the run directory (meta.txt, load.jsonl, samples.txt, events.txt, check.json, grants.json,
provider-stats.json, upstream.json), draws OUT_DIR/NAME.png and writes the section <!-- NAME -->
of OUT_DIR/soak.md (replacing an earlier one). Prints the section.
"""
import json
import os
import re
import statistics
import sys
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

run, out_dir, name = sys.argv[1], sys.argv[2], sys.argv[3]
path = lambda f: os.path.join(run, f)  # noqa: E731
meta = dict(line.split("=", 1) for line in open(path("meta.txt")).read().splitlines())
params = dict(kv.split("=") for kv in meta["params"].split())
seconds = [json.loads(line) for line in open(path("load.jsonl"))]
samples = [line.split() for line in open(path("samples.txt"))]
events = [(float(line.split(" ", 1)[0]), line.split(" ", 1)[1].strip()) for line in open(path("events.txt"))]
check = json.load(open(path("check.json")))
grants = [g for g in json.load(open(path("grants.json")))["grants"] if str(g.get("sub")).startswith("soak-")]
upstream = json.load(open(path("upstream.json")))
t0 = next(t for t, e in events if e.startswith("load:"))
t_end = next(t for t, e in events if e == "load: end")

# ---- phases: the whole run, or the stretches between chaos events ------------------------------
# A fault's phase runs from its start to the next fault's start ("after ..." events only mark the
# plot); a second is counted in the phase where it ends, so errors it saw after a fault began count
# for that fault.
chaos_events = [(t, e.removeprefix("chaos: ")) for t, e in events if e.startswith("chaos:")]
starts = [(t, e) for t, e in chaos_events if not e.startswith(("after", "replica b down"))]
afters = [t for t, e in chaos_events if e.startswith("after")]
starts = [(t, f"{e}, lasting {a - t:.1f} s, and after") for (t, e), a in zip(starts, afters)]
bounds = [(t0 - 1, "before the faults" if starts else "steady")] + starts + [(t_end + 1, "")]
phases = [(a, b, label) for (a, label), (b, _) in zip(bounds, bounds[1:])]


def add(into, status):
    for k, v in status.items():
        into[k] = into.get(k, 0) + v


def phase_rows():
    rows = []
    for a, b, label in phases:
        inside = [s for s in seconds if a < s["t"] + 1 <= b]
        status = {}
        for s in inside:
            add(status, s["status"])
        p99s = [s["p99"] for s in inside if s["p99"] is not None]
        rows.append((label, max(a - t0, 0), min(b, t_end) - t0, status, max(p99s, default=None)))
    return rows


def fmt_status(status):
    return ", ".join(f"{k}: {v}" for k, v in sorted(status.items(), key=lambda kv: (kv[0] != "200", kv[0]))) or "-"


# ---- refresh grants per session per expiry -----------------------------------------------------
uses = {}
for g in grants:
    for k, v in g["uses_per_refresh_token"].items():
        uses[int(k)] = uses.get(int(k), 0) + v
refreshes = sorted(g["refresh_token"] for g in grants)
refresh_errors = sum(g["refresh_token_errors"] for g in grants)
ttl, skew = int(params["at_ttl"]), int(params["refresh_skew"])
gaps = [b - a for g in grants for a, b in zip(g["refreshed_at"], g["refreshed_at"][1:])]
expected = (t_end - t0) / (ttl - skew)

# ---- RSS and descriptors -----------------------------------------------------------------------
by_replica = {}
for t, r, pid, rss, fds in samples:
    by_replica.setdefault(r, []).append((float(t) - t0, pid, int(rss) / 1024, int(fds)))


def memory_rows():
    rows = []
    for r, pts in sorted(by_replica.items()):
        for pid in dict.fromkeys(p for _, p, _, _ in pts):
            mine = [p for p in pts if p[1] == pid and p[0] >= 0]
            if len(mine) < 2:
                continue
            # after a fifth of the run (warm-up), to the end: that is what should be flat
            warm = [p for p in mine if p[0] >= mine[0][0] + (mine[-1][0] - mine[0][0]) / 5]
            rss = [p[2] for p in warm]
            fds = [p[3] for p in warm]
            rows.append((f"{r} (pid {pid})", len(mine), mine[0][2], min(rss), max(rss), rss[-1],
                         (rss[-1] - rss[0]) / rss[0] * 100, mine[0][3], min(fds), max(fds), fds[-1]))
    return rows


# ---- plot --------------------------------------------------------------------------------------
fig, (ax1, ax2, ax3) = plt.subplots(3, 1, sharex=True, figsize=(10, 8))
xs = [s["t"] + 0.5 - t0 for s in seconds]
ax1.plot(xs, [sum(s["status"].values()) for s in seconds], lw=0.8, label="finished/s")
ax1.plot(xs, [sum(v for k, v in s["status"].items() if k != "200") for s in seconds], lw=0.8, color="red", label="not 200/s")
per_second = {}
for g in grants:
    for ms in g["refreshed_at"]:
        per_second[int(ms // 1000)] = per_second.get(int(ms // 1000), 0) + 1
ax1.plot(xs, [per_second.get(s["t"], 0) for s in seconds], lw=0.8, color="green", label="refresh grants/s")
ax1.set_ylabel("requests/s")
ax1.legend(loc="lower left", fontsize=8)
ax2.plot(xs, [s["p99"] for s in seconds], lw=0.8, color="purple")
ax2.set_ylabel("p99 ms (per second)")
ax2.set_yscale("log")
for r, pts in sorted(by_replica.items()):
    ax3.plot([p[0] for p in pts], [p[2] for p in pts], ".", ms=2, label=f"replica {r}")
ax3.set_ylabel("RSS MiB")
ax3.set_xlabel("seconds since the load started")
ax3.set_ylim(bottom=0)
ax3.legend(loc="lower left", fontsize=8)
for (t, e), a in zip(starts, afters):
    for ax in (ax1, ax2, ax3):
        ax.axvspan(t - t0, max(a - t0, t - t0 + 0.5), color="grey", alpha=0.3, lw=0)
    ax1.annotate(e.split(" (")[0], (t - t0, 1), xycoords=("data", "axes fraction"), fontsize=7,
                 va="top", ha="right", rotation=90)
fig.suptitle(f"scripts/soak{' --chaos' if params['chaos'] == 'true' else ''}: {params['sessions']} sessions, "
             f"{params['rate']} requests/s, 2 replicas, access tokens {ttl} s")
fig.tight_layout()
os.makedirs(out_dir, exist_ok=True)
fig.savefig(os.path.join(out_dir, f"{name}.png"), dpi=90)

# ---- the section -------------------------------------------------------------------------------
total = {}
for s in seconds:
    add(total, s["status"])
answered = sum(v for k, v in total.items() if k not in ("skipped",))
not_ok = sum(v for k, v in total.items() if k != "200")
lines = [
    f"## {'Chaos run' if params['chaos'] == 'true' else 'Steady run'} "
    f"({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(t0))}, {params['minutes']} min)",
    "",
    f"- Vestibule {meta['commit']}, release build; {meta['machine']}; {meta['versions']}.",
    f"- {params['sessions']} sessions (users soak-001…), logged in through the provider's login form; "
    f"{params['rate']} requests/s of `GET /api/items` (`token = \"user\"`), each session alternating the "
    f"two replicas; access tokens live {ttl} s, `refresh_skew = \"{skew}s\"`; RSS and descriptors sampled "
    f"every {params['sample_every']} s.",
    "",
    f"![requests/s, p99 and RSS against time]({name}.png)",
    "",
    f"**Requests**: {answered} finished, {not_ok} not 200 ({not_ok / max(answered, 1) * 100:.3f} %). "
    f"By status: {fmt_status(total)} (`conn`: connection refused or reset, `timeout`: no answer in 30 s, "
    "`skipped`: more than 4096 in flight). "
    f"{seconds[-1].get('reused_retries', 0) if seconds else 0} requests were sent a second time because the "
    "kept-alive connection they went out on had just been closed by the replica (as a browser does).",
    "",
    "| phase | from s | to s | statuses | worst p99 of a second, ms |",
    "|---|---:|---:|---|---:|",
]
for label, a, b, status, p99 in phase_rows():
    lines.append(f"| {label} | {a:.1f} | {b:.1f} | {fmt_status(status)} | {p99 if p99 is not None else '-'} |")
hist = ", ".join(f"{k}×: {v}" for k, v in sorted(uses.items())) or "none"
once = uses.get(1, 0) == sum(uses.values()) and refresh_errors == 0
lines += [
    "",
    f"**Refresh grants** (the provider's own counters, `/_test/grants`): {sum(refreshes)} successful over "
    f"{len(grants)} sessions, {refresh_errors} failed. Per session: min {refreshes[0] if refreshes else 0}, "
    f"median {statistics.median(refreshes) if refreshes else 0}, max {refreshes[-1] if refreshes else 0} "
    f"(one per {ttl - skew} s of load would be {expected:.1f}). "
    f"Refresh tokens by number of uses — one token per access-token lifetime, so this is refresh grants "
    f"per session per expiry: {hist}; want every one 1×: **{'yes' if once else 'no'}**. "
    + (f"Time between two refreshes of one session: min {min(gaps) / 1000:.1f} s, median "
       f"{statistics.median(gaps) / 1000:.1f} s, max {max(gaps) / 1000:.1f} s. " if gaps else "")
    + f"The upstream saw {upstream['expired_token']} expired and {upstream['missing_token']} missing bearer "
    f"tokens in {upstream['requests']} requests.",
    "",
    f"**Sessions at the end** (each on both replicas): {check['ok']} of {check['sessions']} work, "
    f"{check['lost']} lost ({fmt_status(check['statuses'])}). Zero lost sessions: "
    f"**{'yes' if check['lost'] == 0 else 'no'}**.",
    "",
    "**RSS and open descriptors** per replica process, after the first fifth of its life (warm-up):",
    "",
    "| replica | samples | RSS at start MiB | min | max | end | end vs warm | fds at start | min | max | end |",
    "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
]
for r, n, r0, lo, hi, end, growth, f0, flo, fhi, fend in memory_rows():
    lines.append(f"| {r} | {n} | {r0:.1f} | {lo:.1f} | {hi:.1f} | {end:.1f} | {growth:+.1f} % | {f0} | {flo} | {fhi} | {fend} |")
section = "\n".join(lines) + "\n"
print(section)

doc = os.path.join(out_dir, "soak.md")
if not os.path.exists(doc):
    open(doc, "w").write("# Soak\n")
text = open(doc).read()
block = f"<!-- {name} -->\n{section.rstrip()}\n<!-- /{name} -->\n"
pattern = re.compile(rf"<!-- {re.escape(name)} -->.*?<!-- /{re.escape(name)} -->\n", re.S)
text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block
open(doc, "w").write(text)
