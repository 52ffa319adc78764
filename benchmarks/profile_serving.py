"""Summarise a GPU timeline of the LLM stage taken while it serves (dev-only, issue 11).

On the GPU machine, the trace comes from benchmarks/profiling/sitecustomize.py:
    PYTHONPATH=benchmarks/profiling OMNI_PROFILE_OUT=/tmp/prof \
      python3 benchmarks/serve_vs_vllm.py --workloads a --servers omni --omni-args "..."
    python3 benchmarks/profile_serving.py /tmp/prof/trace.json > $OUT/profile.txt

It prints where the device's time went in the recorded window: how much of it any kernel ran
(the union over streams), each stream's share, the kernels that took the most time, the LLM
steps by kind (decode only, or admitting prompt tokens) with the device's busy share inside
them, and the longest idle gaps with what the stepping thread was doing then.
"""

from __future__ import annotations

import argparse
import bisect
import json
import re
from collections import defaultdict
from dataclasses import dataclass


@dataclass
class Span:
    start: float  # microseconds
    end: float
    name: str
    stream: int = -1
    tid: int = -1


def union(spans: list[tuple[float, float]]) -> list[tuple[float, float]]:
    merged: list[tuple[float, float]] = []
    for start, end in sorted(spans):
        if merged and start <= merged[-1][1]:
            if end > merged[-1][1]:
                merged[-1] = (merged[-1][0], end)
        else:
            merged.append((start, end))
    return merged


def covered(merged: list[tuple[float, float]], starts: list[float], lo: float, hi: float) -> float:
    """Time inside [lo, hi] that the merged intervals cover."""
    total = 0.0
    i = max(bisect.bisect_right(starts, lo) - 1, 0)
    while i < len(merged) and merged[i][0] < hi:
        s, e = merged[i]
        total += max(0.0, min(e, hi) - max(s, lo))
        i += 1
    return total


def load(path: str) -> tuple[list[Span], list[Span]]:
    import gzip

    with (gzip.open if path.endswith(".gz") else open)(path, "rt") as f:
        trace = json.load(f)
    kernels, cpu = [], []
    for ev in trace.get("traceEvents", []):
        if ev.get("ph") != "X" or "dur" not in ev:
            continue
        cat = ev.get("cat", "")
        span = Span(float(ev["ts"]), float(ev["ts"]) + float(ev["dur"]), ev.get("name", ""))
        if cat in ("kernel", "gpu_memcpy", "gpu_memset"):
            span.stream = int(ev.get("args", {}).get("stream", -1))
            kernels.append(span)
        elif cat in ("cpu_op", "user_annotation", "python_function"):
            span.tid = ev.get("tid", -1)
            cpu.append(span)
    return kernels, cpu


def save_reduced(path: str, kernels: list[Span], cpu: list[Span]) -> None:
    """A trace this script reads again: the device events and the omni.* annotations only
    (a few MB gzipped where the whole trace is hundreds)."""
    import gzip

    events = [
        {
            "ph": "X",
            "cat": "kernel",
            "name": k.name,
            "ts": k.start,
            "dur": k.end - k.start,
            "args": {"stream": k.stream},
        }
        for k in kernels
    ] + [
        {
            "ph": "X",
            "cat": "user_annotation",
            "name": c.name,
            "ts": c.start,
            "dur": c.end - c.start,
            "tid": c.tid,
        }
        for c in cpu
        if c.name.startswith("omni.")
    ]
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "wt") as f:
        json.dump({"traceEvents": events}, f)


def summarise_steps(path: str) -> None:
    """The "timing" mode's steps.json: medians per kind of step, wall and CPU time of the
    stepping thread, in all and per phase, and the time between steps (the stage loop)."""
    import statistics

    with open(path) as f:
        steps = json.load(f)
    steps.sort(key=lambda r: r["t"])
    for i, row in enumerate(steps[:-1]):
        row["between"] = steps[i + 1]["t"] - row["t"] - row["wall"]
    span = steps[-1]["t"] + steps[-1]["wall"] - steps[0]["t"]
    kinds: dict[str, list[dict[str, float]]] = defaultdict(list)
    for row in steps:
        reqs, tokens = row["requests"], row["tokens"]
        kind = (
            "nothing scheduled"
            if not reqs
            else f"decode only, {8 * (reqs // 8)}-{8 * (reqs // 8) + 7} requests"
            if tokens == reqs
            else "with prompt tokens"
        )
        kinds[kind].append(row)
    print(f"{len(steps)} steps over {span * 1e3:.0f} ms; medians in ms (wall / cpu)")
    keys = ["wall", "cpu", "between"] + [p for name in PHASE_NAMES for p in (name, name + ".cpu")]
    print(f"{'kind':32s} {'n':>5s} {'share':>6s} " + " ".join(f"{k[:14]:>14s}" for k in keys))
    for kind, rows in sorted(kinds.items()):
        share = sum(r["wall"] + r.get("between", 0.0) for r in rows) / span
        cells = []
        for key in keys:
            values = [r[key] for r in rows if key in r]
            cells.append(f"{statistics.median(values) * 1e3:14.2f}" if values else f"{'-':>14s}")
        print(f"{kind:32s} {len(rows):5d} {share:6.1%} " + " ".join(cells))


PHASE_NAMES = (
    "schedule",
    "launch_forward",
    "forward_hidden",
    "build_host_inputs",
    "to_device",
    "copy_to_device",
    "run",
    "sample",
    "_resolve",
)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("trace", help="trace.json (mode trace) or steps.json (mode timing)")
    p.add_argument("--top", type=int, default=30)
    p.add_argument("--save-reduced", default=None, help="write the kernels and omni.* ops here")
    args = p.parse_args()
    if args.trace.endswith("steps.json"):
        summarise_steps(args.trace)
        return
    kernels, cpu = load(args.trace)
    if args.save_reduced:
        save_reduced(args.save_reduced, kernels, cpu)
    steps = [c for c in cpu if c.name.startswith("omni.step")]
    scheduled = sorted(
        (c for c in cpu if c.name.startswith("omni.scheduled")), key=lambda c: c.start
    )
    if not kernels or not steps:
        print(f"{len(kernels)} kernels, {len(steps)} steps: nothing to summarise")
        return
    lo, hi = min(s.start for s in steps), max(s.end for s in steps)
    window = hi - lo
    busy = union([(k.start, k.end) for k in kernels if k.end > lo and k.start < hi])
    starts = [s for s, _ in busy]
    print(f"window {window / 1e3:.1f} ms over {len(steps)} LLM steps; {len(kernels)} device events")
    print(f"device busy (any stream): {covered(busy, starts, lo, hi) / window:.1%}")
    per_stream: dict[int, float] = defaultdict(float)
    for k in kernels:
        per_stream[k.stream] += max(0.0, min(k.end, hi) - max(k.start, lo))
    for stream, t in sorted(per_stream.items(), key=lambda x: -x[1]):
        print(f"  stream {stream}: kernels {t / window:.1%} of the window")

    print("\ntop kernels in the window (ms, share of the window, count, streams)")
    by_name: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    streams_of: dict[str, set[int]] = defaultdict(set)
    for k in kernels:
        if k.end > lo and k.start < hi:
            name = re.sub(r"\s+", " ", k.name)[:110]
            by_name[name][0] += k.end - k.start
            by_name[name][1] += 1
            streams_of[name].add(k.stream)
    for name, (t, n) in sorted(by_name.items(), key=lambda x: -x[1][0])[: args.top]:
        print(f"{t / 1e3:9.2f} {t / window:6.1%} {n:7d} {sorted(streams_of[name])} {name}")

    # Steps by kind: what the scheduler put in them (the label inside each step's span).
    stepping_tid = steps[0].tid
    sched_starts = [s.start for s in scheduled]
    kinds: dict[str, list[float]] = defaultdict(lambda: [0, 0.0, 0.0])
    for st in steps:
        i = bisect.bisect_left(sched_starts, st.start)
        label = scheduled[i].name if i < len(scheduled) and scheduled[i].start <= st.end else ""
        m = re.search(r"tokens=(\d+) requests=(\d+)", label)
        tokens, reqs = (int(m[1]), int(m[2])) if m else (0, 0)
        kind = (
            "empty"
            if not reqs
            else "decode only"
            if tokens == reqs
            else (
                "prefill <=512 tok"
                if tokens - reqs <= 512
                else "prefill <=2048 tok"
                if tokens - reqs <= 2048
                else "prefill >2048 tok"
            )
        )
        row = kinds[kind]
        row[0] += 1
        row[1] += st.end - st.start
        row[2] += covered(busy, starts, st.start, st.end)
    print("\nLLM steps by kind: count, host ms in all, ms per step, device busy inside them")
    for kind, (n, t, b) in sorted(kinds.items()):
        print(f"  {kind:20s} {n:5d} {t / 1e3:9.1f} {t / n / 1e3:8.2f} {b / t if t else 0:7.1%}")

    # Idle gaps, and what the stepping thread was inside then (its innermost labelled op).
    gaps = [(busy[i][1], busy[i + 1][0]) for i in range(len(busy) - 1)]
    gaps = [(s, e) for s, e in gaps if lo <= s and e <= hi]
    sizes = [e - s for s, e in gaps]
    print()
    for limit in (20, 100, 500, 2000):
        big = [g for g in sizes if g >= limit]
        print(f"idle gaps >= {limit} us: {len(big)}, {sum(big) / 1e3:.1f} ms in all")
    mine = sorted((c for c in cpu if c.tid == stepping_tid), key=lambda c: c.start)
    blame: dict[str, float] = defaultdict(float)
    for s, e in gaps:
        if e - s < 100:
            continue
        mid = (s + e) / 2
        inside = [c for c in mine if c.start <= mid <= c.end]
        innermost = min(inside, key=lambda c: c.end - c.start) if inside else None
        name = innermost.name if innermost else "(stepping thread outside any op)"
        blame[re.sub(r"=\d+", "=N", name)[:80]] += e - s
    print("idle gaps >= 100 us by what the stepping thread was in at their middle (ms):")
    for name, t in sorted(blame.items(), key=lambda x: -x[1])[:20]:
        print(f"  {t / 1e3:8.1f} {name}")
    phase_breakdown(mine, steps, scheduled)


def phase_breakdown(mine: list[Span], steps: list[Span], scheduled: list[Span]) -> None:
    """Inside decode-only steps of >= 32 requests, and inside steps with prompt tokens: each
    phase's host time split into its top-level ops (by name) and what no op covers."""
    kinds: dict[str, list[Span]] = defaultdict(list)
    for st in steps:
        label = next((c.name for c in scheduled if st.start <= c.start <= st.end), "")
        m = re.search(r"tokens=(\d+) requests=(\d+)", label)
        if m and m[1] == m[2] and int(m[2]) >= 32:
            kinds["decode-only steps of >= 32 requests"].append(st)
        elif m and m[1] != m[2]:
            kinds["steps with prompt tokens"].append(st)
    starts = [c.start for c in mine]
    for kind, chosen in kinds.items():
        print(f"\nhost time of {len(chosen)} {kind}, per phase (us a step)")
        phase_ops(mine, starts, chosen)


def phase_ops(mine: list[Span], starts: list[float], decode: list[Span]) -> None:
    for phase in PHASE_NAMES:
        spans = []
        for st in decode:
            i = bisect.bisect_left(starts, st.start)
            while i < len(mine) and mine[i].start <= st.end:
                if mine[i].name.endswith("." + phase):
                    spans.append(mine[i])
                i += 1
        if not spans:
            continue
        total = sum(s.end - s.start for s in spans)
        ops: dict[str, float] = defaultdict(float)
        for sp in spans:
            i = bisect.bisect_right(starts, sp.start)
            edge = sp.start
            while i < len(mine) and mine[i].start < sp.end:
                child = mine[i]
                if child.start >= edge:  # a top-level op inside the phase
                    ops[child.name[:60]] += child.end - child.start
                    edge = child.end
                i += 1
        python = total - sum(ops.values())
        n = len(spans)
        print(f"  {phase}: {total / n:8.0f}, of which not inside any op {python / n:8.0f}")
        for name, t in sorted(ops.items(), key=lambda x: -x[1])[:12]:
            print(f"      {t / n:8.0f} {name}")


if __name__ == "__main__":
    main()
