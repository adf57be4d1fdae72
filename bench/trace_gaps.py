"""Where the GPU waits: idle gaps in a ``torch.profiler`` Chrome trace, each charged to the host code that
launched the kernel ending it.

A gap is time in which no kernel, copy or memset runs on any stream. The kernel after a gap was launched by
a runtime call (``cudaLaunchKernel``, ``cudaGraphLaunch``, ...) with the same ``correlation`` id; the
innermost ``record_function`` range around that call on the same thread names the gap ("encode",
"forward", ...). Launches from the autograd engine's thread are charged to "backward". A long gap in a
labelled range means the host was late there: a device sync before it, or slow Python.

    python -m bench.trace_gaps trace.json.gz   # report of a saved trace
"""

from __future__ import annotations

import bisect
import gzip
import json
import sys
from collections import defaultdict
from pathlib import Path

DEVICE_CATS = {"kernel", "gpu_memcpy", "gpu_memset"}


def load(path: str | Path) -> list[dict]:
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as f:
        data = json.load(f)
    return data["traceEvents"] if isinstance(data, dict) else data


def gap_report(events: list[dict], min_gap_us: float = 50.0, top: int = 15) -> dict:
    """Idle time between the first and last device event, in total, per launching label, and the longest gaps."""
    device = sorted((e for e in events if e.get("ph") == "X" and e.get("cat") in DEVICE_CATS),
                    key=lambda e: e["ts"])
    if not device:
        return {"span_ms": 0.0, "busy_ms": 0.0, "idle_ms": 0.0, "by_label_ms": {}, "gaps": []}
    launches = {e["args"]["correlation"]: e for e in events
                if e.get("ph") == "X" and e.get("cat") == "cuda_runtime" and "correlation" in e.get("args", {})}
    ranges = defaultdict(list)  # tid -> [(start, end, name)] of record_function ranges
    for e in events:
        if e.get("ph") == "X" and e.get("cat") == "user_annotation":
            ranges[e["tid"]].append((e["ts"], e["ts"] + e.get("dur", 0), e["name"]))
    main_tid = max(ranges, key=lambda t: len(ranges[t])) if ranges else None
    starts = {t: sorted(r) for t, r in ranges.items()}

    def label(kernel: dict) -> str:
        launch = launches.get(kernel.get("args", {}).get("correlation"))
        if launch is None:
            return "unknown launch"
        tid, ts = launch["tid"], launch["ts"]
        rs = starts.get(tid, [])
        i = bisect.bisect_right(rs, (ts, float("inf"), ""))
        inner = None
        for s, e, name in reversed(rs[:i]):  # the innermost (latest-starting) range still open at ts
            if e >= ts:
                inner = name
                break
        if inner is not None:
            return inner
        return "main thread, unlabelled" if tid == main_tid else "backward (autograd thread)"

    busy, gaps = 0.0, []
    end = device[0]["ts"]
    for k in device:
        s, e = k["ts"], k["ts"] + k.get("dur", 0)
        if s - end >= min_gap_us:
            gaps.append((s - end, end, k))
        busy += max(0.0, e - max(s, end))
        end = max(end, e)
    first = device[0]["ts"]
    by_label: dict[str, float] = defaultdict(float)
    rows = []
    for dur, at, k in gaps:
        lab = label(k)
        by_label[lab] += dur / 1000
        rows.append({"ms": round(dur / 1000, 3), "at_ms": round((at - first) / 1000, 2), "label": lab,
                     "next_kernel": k["name"][:90]})
    rows.sort(key=lambda r: -r["ms"])
    span = end - first
    return {"span_ms": round(span / 1000, 2), "busy_ms": round(busy / 1000, 2),
            "idle_ms": round((span - busy) / 1000, 2), "overlap": overlap_report(events),
            "gaps_over_min": len(gaps), "min_gap_us": min_gap_us,
            "by_label_ms": {k: round(v, 2) for k, v in sorted(by_label.items(), key=lambda kv: -kv[1])},
            "gaps": rows[:top]}


def _merged(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    out: list[list[float]] = []
    for s, e in sorted(intervals):
        if out and s <= out[-1][1]:
            out[-1][1] = max(out[-1][1], e)
        else:
            out.append([s, e])
    return [(s, e) for s, e in out]


def overlap_report(events: list[dict]) -> dict:
    """How much of the copies' time (``gpu_memcpy``, any stream) ran beside kernels: ms of kernels (and memsets),
    of copies, of both at once, each as a union over streams. Copies that overlap little with kernels (``both_ms``
    far below the smaller of the two) mean the step pays for them in sequence (offload's streamed weights)."""
    spans: dict[str, list] = {"kernel": [], "copy": []}
    for e in events:
        if e.get("ph") == "X" and e.get("cat") in DEVICE_CATS:
            spans["copy" if e["cat"] == "gpu_memcpy" else "kernel"].append((e["ts"], e["ts"] + e.get("dur", 0)))
    kern, copy = _merged(spans["kernel"]), _merged(spans["copy"])
    both, i, j = 0.0, 0, 0
    while i < len(kern) and j < len(copy):
        lo, hi = max(kern[i][0], copy[j][0]), min(kern[i][1], copy[j][1])
        both += max(0.0, hi - lo)
        if kern[i][1] < copy[j][1]:
            i += 1
        else:
            j += 1
    k_ms, c_ms = sum(e - s for s, e in kern) / 1000, sum(e - s for s, e in copy) / 1000
    return {"kernel_ms": round(k_ms, 2), "copy_ms": round(c_ms, 2), "both_ms": round(both / 1000, 2)}


def format_report(rep: dict) -> str:
    lines = [f"device span {rep['span_ms']} ms, busy {rep['busy_ms']} ms, idle {rep['idle_ms']} ms "
             f"({rep.get('gaps_over_min', 0)} gaps >= {rep.get('min_gap_us', 0)} us)"]
    if rep.get("overlap"):
        o = rep["overlap"]
        lines.append(f"  kernels {o['kernel_ms']} ms, copies {o['copy_ms']} ms, both at once {o['both_ms']} ms")
    for lab, ms in rep["by_label_ms"].items():
        lines.append(f"  idle before launches in {lab!r}: {ms} ms")
    for g in rep["gaps"]:
        lines.append(f"  gap {g['ms']:8.3f} ms at {g['at_ms']:9.2f} ms  [{g['label']}] -> {g['next_kernel']}")
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        raise SystemExit("usage: python -m bench.trace_gaps TRACE.json[.gz]")
    sys.stdout.write(format_report(gap_report(load(argv[0]))) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
