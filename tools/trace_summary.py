"""Where a training step's device time goes: a profile's kernels summed by kind, per step.

MFU says how far a step is from the matmul units; this says why. It reads a `jax.profiler` trace (the
newest one under a directory: what `jaxft.train --profile_steps=A:B` writes to
`<workdir>/profile`, or `tools/benchmark.py --profile_steps`) or a `torch.profiler` run, and sums
the device's kernels by kind (matmul, attention, collective, copy, other: the memory-bound
elementwise, norm and reduction fusions between the matmuls), with the largest kernels by name.

  python tools/trace_summary.py DIR [--steps N] [--top 20] [--json FILE]

On a GPU or TPU the events are the device's own (the trace's `/device:...` processes). A CPU trace
has no device rows; its XLA worker threads' events stand in, and XLA:CPU names them by runtime
(`ynn_fusion`, ...), not by kind, so there the split says little.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys

# First match wins; the names are kernels (CUDA, ROCm, TPU ops) or XLA HLO ops (`args.hlo_op`).
KINDS = (
    ("attention", re.compile(r"fmha|flash|sdpa|splash|attention|attn", re.I)),
    ("collective", re.compile(r"nccl|rccl|all-reduce|all-gather|reduce-scatter|collective-permute|all-to-all"
                              r"|allreduce|allgather|reducescatter", re.I)),
    ("matmul", re.compile(r"gemm|nvjet|cublas|cutlass|xmma|wgmma|Cijk|matmul|convolution|dot|"
                          r"(?:^|::|_)(?:add|b)?mm(?:$|_)|aten::linear", re.I)),
    ("copy", re.compile(r"memcpy|memset|\bcopy|d2h|h2d|d2d", re.I)),
)
# Host bookkeeping the XLA:CPU threads record around the real work.
CPU_NOISE = re.compile(r"Threadpool|Await|ThunkExecutor|^end: |Wait for", re.I)


def kind(name: str, op: str = "") -> str:
    """The kind of one kernel, from its name or the HLO op it ran for."""
    for label, pattern in KINDS:
        if pattern.search(name) or (op and pattern.search(op)):
            return label
    return "other"


def summarize(events, steps: int, top: int = 20) -> dict:
    """Per-step milliseconds by kind and by kernel name. `events`: dicts with `name`, `dur` (microseconds)
    and optionally `op` (the HLO op), `ts` (start, microseconds; gives the window the kernels span) and
    `calls` (launches one row stands for, 1 by default) and `row` (the stream or thread it ran on)."""
    steps = max(int(steps), 1)
    by_kind, by_name, calls, kinds = collections.Counter(), collections.Counter(), collections.Counter(), {}
    by_row = collections.Counter()
    start, end = float("inf"), float("-inf")
    for e in events:
        dur = float(e["dur"])
        kinds.setdefault(e["name"], kind(e["name"], e.get("op", "")))
        by_kind[kinds[e["name"]]] += dur
        by_name[e["name"]] += dur
        calls[e["name"]] += e.get("calls", 1)
        if "row" in e:
            by_row[e["row"]] += dur
        if "ts" in e:
            start, end = min(start, float(e["ts"])), max(end, float(e["ts"]) + dur)
    busy = sum(by_kind.values())
    share = (lambda us: us / busy) if busy else (lambda us: 0.0)
    out = {
        "steps": steps, "kernels_per_step": sum(calls.values()) / steps, "busy_ms_per_step": busy / steps / 1e3,
        "by_kind": {k: {"ms_per_step": us / steps / 1e3, "share": share(us)} for k, us in by_kind.most_common()},
        "top": [{"name": n, "kind": kinds[n], "calls_per_step": calls[n] / steps, "ms_per_step": us / steps / 1e3,
                 "share": share(us)} for n, us in by_name.most_common(top)],
    }
    if by_row:  # the trace's rows (streams, threads) the kernels ran on: one row counted twice would show here
        out["by_row"] = {r: us / steps / 1e3 for r, us in by_row.most_common()}
    if end > start:  # the window from the first kernel's start to the last one's end
        out["span_ms_per_step"] = (end - start) / steps / 1e3
    return out


def newest_trace(path: str) -> str:
    """The newest trace under `path` (or `path` itself): `*.trace.json.gz`, which every jax.profiler trace
    writes, or `perfetto_trace.json.gz` (`create_perfetto_trace=True`); both hold the same events."""
    if os.path.isfile(path):
        return path
    found = [f for pattern in ("*.trace.json.gz", "perfetto_trace.json.gz")
             for f in glob.glob(os.path.join(path, "**", pattern), recursive=True)]
    if not found:
        raise FileNotFoundError(f"{path}: no *.trace.json.gz or perfetto_trace.json.gz under it (a jax.profiler "
                                f"trace directory, e.g. <workdir>/profile of jaxft.train --profile_steps)")
    return max(found, key=os.path.getmtime)


def jax_events(path: str) -> tuple[list[dict], str]:
    """The kernels of a `jax.profiler` trace, and which rows they came from."""
    trace = json.load(gzip.open(newest_trace(path), "rt"))
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    procs = {e["pid"]: e["args"]["name"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"}
    threads = {(e["pid"], e.get("tid")): e["args"]["name"] for e in events
               if e.get("ph") == "M" and e.get("name") == "thread_name"}
    done = [e for e in events if e.get("ph") == "X" and "dur" in e]
    device = [e for e in done if str(procs.get(e["pid"], "")).startswith("/device:")]
    # Per-op summary rows some backends add beside the stream rows would count the time twice.
    device = [e for e in device if not re.search(r"XLA Modules|XLA Ops|Steps|Framework|Source|Name Scope",
                                                 threads.get((e["pid"], e.get("tid")), ""))] or device
    if device:
        rows = sorted({procs[e["pid"]] for e in device})
    else:  # CPU: the XLA worker threads' own events
        device = [e for e in done if threads.get((e["pid"], e.get("tid")), "").startswith("tf_XLA")
                  and not CPU_NOISE.search(e["name"])]
        rows = ["XLA:CPU worker threads"]
    return [{"name": e["name"], "dur": e["dur"], "ts": e["ts"], "op": str(e.get("args", {}).get("hlo_op", "")),
             "row": f'{procs.get(e["pid"], e["pid"])} / {threads.get((e["pid"], e.get("tid")), e.get("tid"))}'}
            for e in leaves(device)], ", ".join(rows)


def leaves(events: list[dict]) -> list[dict]:
    """The events that hold no other event of their row: a loop's or an op's span around its kernels
    would count their time twice. An event that only overlaps the next one is kept: on Hopper GPUs a
    kernel may start before the one ahead of it on its stream ends (programmatic dependent launch)."""
    by_row = collections.defaultdict(list)
    for e in events:
        by_row[e["pid"], e.get("tid")].append(e)
    out = []
    for row in by_row.values():
        row.sort(key=lambda e: (e["ts"], -e["dur"]))
        out += [e for e, nxt in zip(row, row[1:] + [None])
                if nxt is None or nxt["ts"] >= e["ts"] + e["dur"] or nxt["ts"] + nxt["dur"] > e["ts"] + e["dur"]]
    return out


def torch_events(prof, device: str) -> list[dict]:
    """The kernels (CUDA) or operators' own time (CPU) of a finished `torch.profiler.profile`."""
    rows = []
    averages = prof.key_averages()
    if device == "cuda":  # the kernels' own rows: an operator's row repeats the time of the kernels it launched
        kernels = [a for a in averages if str(getattr(a, "device_type", "")).endswith(("CUDA", "PrivateUse1"))]
        averages = kernels or averages
    for a in averages:
        if device == "cuda":
            us = getattr(a, "self_device_time_total", None)
            us = getattr(a, "self_cuda_time_total", 0) if us is None else us
        else:
            us = a.self_cpu_time_total
        if us > 0:
            rows.append({"name": a.key, "dur": us, "calls": a.count})
    return rows


def table(summary: dict) -> str:
    lines = [f"{summary['busy_ms_per_step']:.2f} ms of kernels per step ({summary['kernels_per_step']:.0f} kernels)"
             + (f" in a {summary['span_ms_per_step']:.2f} ms window" if "span_ms_per_step" in summary else "")]
    lines += [f"  {k:<11} {v['ms_per_step']:9.2f} ms  {100 * v['share']:5.1f}%" for k, v in summary["by_kind"].items()]
    if len(summary.get("by_row", {})) > 1:
        lines += [f"  on {r}: {ms:.2f} ms" for r, ms in summary["by_row"].items()]
    lines.append("  largest kernels:")
    lines += [f"  {t['ms_per_step']:9.2f} ms {100 * t['share']:5.1f}% x{t['calls_per_step']:<5g} [{t['kind']}] "
              f"{t['name'][:100]}" for t in summary["top"]]
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("path", help="a jax.profiler trace directory (its newest trace counts) or a .trace.json.gz file")
    p.add_argument("--steps", type=int, default=1, help="steps the trace holds (figures are per step)")
    p.add_argument("--top", type=int, default=20)
    p.add_argument("--json", default="", help="also write the summary to this file")
    args = p.parse_args(argv)
    try:
        events, rows = jax_events(args.path)
    except (OSError, ValueError, KeyError) as e:
        sys.exit(f"error: {e}")
    summary = summarize(events, args.steps, args.top)
    summary["rows"] = rows
    print(f"{rows}: " + table(summary))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=2)


if __name__ == "__main__":
    main()
