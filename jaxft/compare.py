"""Compare methods on one task: `python -m jaxft.compare --configs=configs/lora.py,configs/bitfit.py
[--seeds=3] [--jobs=N] [--workdir=runs/compare] [--reference='majority class=0.509'] [--collect]
[--config.KEY=VALUE ...]`.

Each config runs `--seeds` times (train.seed = the config's seed + 0, 1, ...) through jaxft.train's own
command line, one process per run (each run's peak memory is its own), with the given
`--config.KEY=VALUE` overrides applied to every run; `--jobs` runs that many at once. Runs go seed by
seed (every config's first seed before any second seed), so a comparison cut short still covers every
method. The workdir gets one run directory per config and seed, `compare.json` (every run's figures),
`compare.md` (the table: dev metric mean and spread over seeds, each seed's figure, trainable
parameters, adapter/export size, tokens/s, peak host memory) and a plot of the dev metric against
trainable parameters (`compare.png` with matplotlib, else `compare.svg`), with `--reference` as a
dashed line. A run that fails is a row with its one-line error, not the end of the comparison; but
the comparison then exits with status 1 and one `error:` line naming the runs that failed or did not
finish (a table with a row missing is not the comparison asked for), after writing the table of the
runs that did. Exit status 0 means every run finished and reports the metric.

A run that finished writes its figures to `<run dir>/result.json`; a later comparison with the same
workdir reuses them instead of training again, as long as the config file's text and the overrides
are the same (so a killed comparison continues where it stopped, adding a config or a seed trains only
the new runs, and an edited config trains again). A run that failed, was stopped (SIGTERM: jaxft.train
checkpoints and exits cleanly) or did not finish is run again from scratch. The table and plot are
rewritten after every run; `--collect` writes them from the finished runs alone, training nothing
(exit status 1 if any run was not run).
"""

from __future__ import annotations

import concurrent.futures
import json
import math
import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

from jaxft.errors import ArgumentParser, JaxftError, printable_stdout


def parse_args(argv):
    p = ArgumentParser(prog="python -m jaxft.compare", description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", required=True, help="comma-separated configs/*.py files")
    p.add_argument("--seeds", type=int, default=1, help="runs per config (train.seed + 0, 1, ...)")
    p.add_argument("--workdir", default="runs/compare")
    p.add_argument("--metric", default="", help="the dev metric (default: eval/accuracy, else eval/loss)")
    p.add_argument("--reference", default="", help="NAME=VALUE: a reference figure of the metric, e.g. "
                   "'majority class=0.509', drawn as a dashed line and written under the table")
    p.add_argument("--collect", action="store_true", help="train nothing: the table and plot of the runs that "
                   "finished; the others are counted as not run")
    p.add_argument("--jobs", type=int, default=1, help="runs at the same time (each its own process)")
    args, rest = p.parse_known_args(argv)
    bad = [a for a in rest if not a.startswith("--config.")]
    if bad:
        raise JaxftError(f"unexpected arguments: {' '.join(bad)} (expected --config.KEY=VALUE overrides)")
    args.overrides = rest
    args.configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    if not args.configs:
        raise JaxftError("--configs: expected one or more config files, comma-separated")
    for c in args.configs:
        if not Path(c).is_file():
            raise JaxftError(f"--configs: {c}: no such config file")
    args.ref = None
    if args.reference:
        name, _, value = args.reference.rpartition("=")
        try:
            args.ref = (name.strip() or "reference", float(value))
        except ValueError:
            raise JaxftError(f"--reference={args.reference!r}: expected NAME=VALUE, e.g. 'majority class=0.509'") from None
    if args.jobs < 1:
        raise JaxftError(f"--jobs={args.jobs}: expected a positive integer")
    if args.seeds < 1:
        raise JaxftError(f"--seeds={args.seeds}: expected a positive integer")
    return args


def load_config(config_file: str):
    """The ConfigDict that `config_file`'s get_config() returns."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("jaxft_compare_cfg", config_file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def config_seed(config_file: str) -> int:
    return int(load_config(config_file).train.seed)


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.exists() else 0


def config_digest(config_file: str, everything: bool = False) -> str:
    """A digest of what the config sets away from jaxft's defaults: not its text (a docstring edit keeps a
    finished run reusable), nor the defaults (a new config key keeps it reusable too; a changed default
    counts as a code change, which no digest sees). `everything`: all values, the digest of earlier
    versions, still accepted."""
    import hashlib

    from jaxft.config import base_config

    config = load_config(config_file)
    if everything:
        text = config.to_json_best_effort(sort_keys=True)
    else:
        defaults = _flat(json.loads(base_config().to_json_best_effort()))
        text = json.dumps({k: v for k, v in _flat(json.loads(config.to_json_best_effort())).items()
                           if k not in defaults or defaults[k] != v}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) and v else {f"{prefix}{k}": v})
    return out


def finished(config_file: str, workdir: Path, overrides) -> dict | None:
    """The figures of a run that finished in `workdir` from the same config values and overrides, else None."""
    try:
        row = json.loads((workdir / "result.json").read_text())
    except (OSError, ValueError):
        return None
    digest = row.get("config_sha256")  # the earlier versions' digest is computed only where needed
    same = row.get("overrides") == list(overrides) and (
        digest == config_digest(config_file) or digest == config_digest(config_file, everything=True))
    return row if row.get("returncode") == 0 and row.get("eval") and same else None


LIVE: set = set()  # the training processes running now (killed if the comparison is interrupted)


def run_one(config_file: str, seed: int, workdir: Path, overrides) -> dict:
    """One training run through the CLI -> its figures (or its error)."""
    import shutil

    shutil.rmtree(workdir, ignore_errors=True)  # a run that did not finish starts again, not from its checkpoint
    cmd = [sys.executable, "-m", "jaxft.train", f"--config={config_file}", f"--workdir={workdir}", *overrides,
           f"--config.train.seed={seed}"]
    workdir.mkdir(parents=True, exist_ok=True)
    with open(workdir / "stdout.log", "w") as out_f, open(workdir / "stderr.log", "w") as err_f:
        proc = subprocess.Popen(cmd, stdout=out_f, stderr=err_f)
        LIVE.add(proc)
        try:
            _, status, usage = os.wait4(proc.pid, 0)  # this child's own resource use, its peak memory included
        except BaseException:  # interrupted: the run must not go on alone
            proc.kill()
            proc.wait()
            raise
        finally:
            LIVE.discard(proc)
        proc.returncode = os.waitstatus_to_exitcode(status)
    out, err = (workdir / "stdout.log").read_text(), (workdir / "stderr.log").read_text()
    row = {"config": Path(config_file).stem, "seed": seed, "workdir": str(workdir), "returncode": proc.returncode,
           "overrides": list(overrides), "config_sha256": config_digest(config_file), "peak_rss_mib": usage.ru_maxrss / 1024}  # Linux: KiB
    if proc.returncode != 0:
        lines = [line for line in err.splitlines() if line.strip()]
        row["error"] = lines[-1] if lines else f"exit status {proc.returncode}"
        return row
    stopped = re.search(r"preempted \(SIGTERM\): saved step (\d+)", out + err)
    if stopped:  # jaxft.train saved a checkpoint and exited cleanly: not a finished run
        row.update(returncode=-15, error=f"stopped by SIGTERM at step {stopped[1]} (not finished)")
        return row
    m = re.search(r"method: (\S+) \| trainable ([\d,]+) / ([\d,]+)", out)
    if m:
        row.update(method=m[1], trainable=int(m[2].replace(",", "")), total=int(m[3].replace(",", "")))
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    evals = [r for r in rows if any(k.startswith("eval/") for k in r)]
    row["eval"] = {k: v for k, v in (evals[-1] if evals else {}).items() if k.startswith("eval/")}
    speeds = [r["train/tokens_per_second"] for r in rows if "train/tokens_per_second" in r]
    row["tokens_per_second"] = sum(speeds) / len(speeds) if speeds else None
    row["export_bytes"] = dir_bytes(workdir / "export")
    (workdir / "result.json").write_text(json.dumps(row, indent=2) + "\n")
    return row


def unfinished_runs(rows, summary) -> list[dict]:
    """The runs with no figure in the table: failed, stopped, not run, or finished without the dev metric
    -> [{"config", "seed", "why"}], in the table's order."""
    metric = {s["config"]: s["metric"] for s in summary}
    out = []
    for r in rows:
        if r.get("returncode") != 0:
            why = (r.get("error") or f"exit status {r.get('returncode')}").removeprefix("error: ")
        elif metric[r["config"]] not in r.get("eval", {}):
            why = f"finished without {metric[r['config']]}"
        else:
            continue
        out.append({"config": r["config"], "seed": r["seed"], "why": why})
    return out


def mean_std(values):
    if not values:
        return None, None
    mu = sum(values) / len(values)
    sd = math.sqrt(sum((v - mu) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return mu, sd


def summarize(rows, metric: str) -> list[dict]:
    out = []
    for name in dict.fromkeys(r["config"] for r in rows):
        runs = [r for r in rows if r["config"] == name]
        ok = [r for r in runs if r["returncode"] == 0]
        key = metric or next((k for k in ("eval/accuracy", "eval/loss") if ok and k in ok[0]["eval"]), "eval/accuracy")
        values = [r["eval"][key] for r in ok if key in r.get("eval", {})]
        mu, sd = mean_std(values)
        first = ok[0] if ok else {}
        speeds = [r["tokens_per_second"] for r in ok if r.get("tokens_per_second")]
        out.append({
            "config": name, "method": first.get("method", ""), "metric": key, "mean": mu, "std": sd, "runs": len(runs),
            "ok": len(ok), "values": values, "trainable": first.get("trainable"), "total": first.get("total"),
            "export_bytes": first.get("export_bytes"), "tokens_per_second": sum(speeds) / len(speeds) if speeds else None,
            "peak_rss_mib": max((r["peak_rss_mib"] for r in ok), default=None),
            "error": next((r["error"] for r in runs if r.get("error") not in (None, "not run")),
                          "not run" if len(ok) < len(runs) else None),
        })
    return out


def table(summary, ref=None) -> str:
    lines = ["| config | method | dev metric | mean | spread (std) | per seed | seeds | trainable params | export size | "
             "tokens/s | peak host memory |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    fmt = lambda v, f: "" if v is None else format(v, f)  # noqa: E731
    for s in summary:
        if not s["ok"]:
            what = "not run" if s["error"] == "not run" else f"failed: {s['error']}"
            lines.append(f"| {s['config']} | | | {what} | | | 0/{s['runs']} | | | | |")
            continue
        size = s["export_bytes"]
        lines.append(
            f"| {s['config']} | {s['method']} | {s['metric']} | {fmt(s['mean'], '.4f')} | {fmt(s['std'], '.4f')} | "
            f"{' '.join(format(v, '.3f') for v in s['values'])} | {s['ok']}/{s['runs']} | {fmt(s['trainable'], ',')} | {'' if size is None else f'{size / 2**20:.2f} MiB'} | "
            f"{fmt(s['tokens_per_second'], ',.0f')} | {fmt(s['peak_rss_mib'], ',.0f')} MiB |")
    if ref:
        lines.append(f"\n{ref[0]}: {ref[1]:.4f}")
    return "\n".join(lines) + "\n"


def plot(summary, out_dir: Path, ref=None) -> Path:
    """The dev metric (mean, spread as error bars) against trainable parameters, log x."""
    points = [s for s in summary if s["ok"] and s["mean"] is not None and s["trainable"]]
    metric = points[0]["metric"] if points else "metric"
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return svg_plot(points, metric, out_dir / "compare.svg", ref)
    fig, ax = plt.subplots(figsize=(6, 4))
    for s in points:
        ax.errorbar(s["trainable"], s["mean"], yerr=s["std"] or 0, fmt="o", capsize=3)
        ax.annotate(s["config"], (s["trainable"], s["mean"]), textcoords="offset points", xytext=(4, 4), fontsize=8)
    if ref:
        ax.axhline(ref[1], linestyle="--", color="gray")
        ax.annotate(ref[0], (ax.get_xlim()[0], ref[1]), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters")
    ax.set_ylabel(metric)
    fig.tight_layout()
    fig.savefig(out_dir / "compare.png", dpi=120)
    return out_dir / "compare.png"


def svg_plot(points, metric: str, path: Path, ref=None) -> Path:
    w, h, left, right, top, bottom = 640, 400, 70, 20, 20, 50
    xs = [math.log10(s["trainable"]) for s in points] or [0, 1]
    lo = [s["mean"] - (s["std"] or 0) for s in points] or [0]
    hi = [s["mean"] + (s["std"] or 0) for s in points] or [1]
    x0, x1 = math.floor(min(xs)), math.ceil(max(xs)) + (1 if math.ceil(max(xs)) == math.floor(min(xs)) else 0)
    y0, y1 = min(lo + [ref[1]] if ref else lo), max(hi + [ref[1]] if ref else hi)
    pad = (y1 - y0) * 0.1 or 0.05
    y0, y1 = y0 - pad, y1 + pad
    sx = lambda x: left + (x - x0) / (x1 - x0) * (w - left - right)  # noqa: E731
    sy = lambda y: h - bottom - (y - y0) / (y1 - y0) * (h - top - bottom)  # noqa: E731
    esc = lambda t: str(t).replace("&", "&amp;").replace("<", "&lt;")  # noqa: E731
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="11">',
             f'<rect width="{w}" height="{h}" fill="white"/>',
             f'<line x1="{left}" y1="{h - bottom}" x2="{w - right}" y2="{h - bottom}" stroke="black"/>',
             f'<line x1="{left}" y1="{top}" x2="{left}" y2="{h - bottom}" stroke="black"/>']
    for e in range(x0, x1 + 1):
        parts.append(f'<text x="{sx(e):.1f}" y="{h - bottom + 16}" text-anchor="middle">1e{e}</text>')
    for i in range(5):
        y = y0 + (y1 - y0) * i / 4
        parts.append(f'<text x="{left - 6}" y="{sy(y) + 4:.1f}" text-anchor="end">{y:.3f}</text>')
    parts.append(f'<text x="{(left + w - right) / 2}" y="{h - 10}" text-anchor="middle">trainable parameters (log)</text>')
    parts.append(f'<text x="14" y="{(top + h - bottom) / 2}" transform="rotate(-90 14 {(top + h - bottom) / 2})" '
                 f'text-anchor="middle">{esc(metric)}</text>')
    if ref:
        parts.append(f'<line x1="{left}" y1="{sy(ref[1]):.1f}" x2="{w - right}" y2="{sy(ref[1]):.1f}" stroke="gray" '
                     'stroke-dasharray="5,4"/>')
        parts.append(f'<text x="{left + 6}" y="{sy(ref[1]) - 5:.1f}" fill="gray">{esc(ref[0])} {ref[1]:.3f}</text>')
    for s, x in zip(points, xs):
        cx, cy, sd = sx(x), sy(s["mean"]), s["std"] or 0
        parts.append(f'<line x1="{cx:.1f}" y1="{sy(s["mean"] - sd):.1f}" x2="{cx:.1f}" y2="{sy(s["mean"] + sd):.1f}" '
                     'stroke="steelblue"/>')
        parts.append(f'<circle cx="{cx:.1f}" cy="{cy:.1f}" r="4" fill="steelblue"/>')
        parts.append(f'<text x="{cx + 6:.1f}" y="{cy - 6:.1f}">{esc(s["config"])}</text>')
    parts.append("</svg>")
    path.write_text("\n".join(parts) + "\n")
    return path


def write_results(rows, metric: str, work: Path, ref=None) -> Path:
    summary = summarize(rows, metric)
    doc = {"runs": rows, "summary": summary, **({"reference": {"name": ref[0], "value": ref[1]}} if ref else {})}
    (work / "compare.json").write_text(json.dumps(doc, indent=2) + "\n")
    (work / "compare.md").write_text(table(summary, ref))
    return plot(summary, work, ref)


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv=None) -> int:
    printable_stdout()  # a failed run's error line quotes its data
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _interrupt)  # `timeout`, `kill`: the training processes end with it
    try:
        args = parse_args(sys.argv[1:] if argv is None else argv)
        work = Path(args.workdir)
        from jaxft import storage

        storage.check_writable_dir(storage.path(str(work), "--workdir"), "--workdir")
        storage.make_dir(storage.path(str(work), "--workdir"), "--workdir")
        order = {c: k for k, c in enumerate(args.configs)}
        base_seeds = {c: config_seed(c) for c in args.configs}
        rows, figure = [], None
        lock = threading.Lock()

        def one(i: int, config_file: str):
            seed = base_seeds[config_file] + i
            run_dir = work / f"{Path(config_file).stem}-seed{seed}"
            row = finished(config_file, run_dir, args.overrides)
            if row is not None:
                print(f"compare: {config_file} seed {seed}: finished before, reused ({run_dir / 'result.json'})",
                      flush=True)
            elif args.collect:
                row = {"config": Path(config_file).stem, "seed": seed, "workdir": str(run_dir), "returncode": None,
                       "peak_rss_mib": None, "error": "not run"}
            else:
                print(f"compare: {config_file} seed {seed} -> {run_dir}", flush=True)
                row = run_one(config_file, seed, run_dir, args.overrides)
            print(f"  {config_file} seed {seed}: {row.get('error') or row.get('eval')}", flush=True)
            if args.metric and row.get("returncode") == 0 and args.metric not in row.get("eval", {}):
                raise JaxftError(f"--metric={args.metric}: the run {run_dir} reports no such metric (it reports "
                                 f"{', '.join(sorted(row.get('eval', {}))) or 'none'})")  # else an empty table, exit 0
            row["order"] = (order[config_file], i)
            with lock:
                rows.append(row)
                rows.sort(key=lambda r: tuple(r["order"]))
                return write_results(rows, args.metric, work, args.ref)

        # Seed by seed: every config's first seed starts before any second seed, so a comparison cut short
        # still has every method in its table.
        tasks = [(i, c) for i in range(args.seeds) for c in args.configs]
        with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
            futures = [pool.submit(one, i, c) for i, c in tasks]
            try:
                for f in futures:
                    figure = f.result()
            except BaseException:
                for f in futures:
                    f.cancel()
                for proc in list(LIVE):
                    proc.kill()
                raise
        summary = summarize(rows, args.metric)
        print(table(summary, args.ref) + f"written: {work / 'compare.md'}, {work / 'compare.json'}, {figure}")
        unfinished = unfinished_runs(rows, summary)
        if unfinished:
            first = unfinished[0]
            print(f"error: {len(unfinished)} of {len(rows)} runs failed or did not finish (first: {first['config']} "
                  f"seed {first['seed']}: {first['why']}); {work / 'compare.md'} holds the "
                  f"{len(rows) - len(unfinished)} that finished", file=sys.stderr)
            return 1
        return 0
    except JaxftError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
