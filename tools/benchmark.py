"""Training throughput of jaxft against HF PEFT + PyTorch, same model, same device (CPU or GPU), one run.

It trains one Llama (random weights, causal LM loss on fixed random token ids) with each method
(LoRA r=8 on q_proj/v_proj, full fine-tuning, P-Tuning v2) in both frameworks and prints, per
(framework, method): trainable parameters, compile time, tokens/s, jaxft's ratio to PEFT, peak RSS
and MFU. Results go into BENCHMARKS.md.

    python tools/benchmark.py --layers 8 --hidden 512 --heads 8 --kv_heads 8 --intermediate 1376 \
        --vocab 32000 --batch 8 --seq 256 --steps 10 --warmup 2 --methods lora,full,ptuning_v2 \
        --frameworks jaxft,peft --dtype float32 --num_virtual_tokens 16 --json benchmark.json

What each side runs:
- jaxft: the production step, `jax.jit(make_train_step(...), donate_argnums=(0,))`, with the
  optimizer from `make_optimizer` (AdamW, lr 1e-4, constant, no weight decay, grad clip 1.0) and
  scanned layers, as `jaxft.train` builds them (one device, so no mesh or out_shardings). "compile s" is the first step including trace,
  lowering and XLA compilation (blocking); the timed steps follow `--warmup` untimed ones and
  block once at the end, as the train loop does.
- PEFT: `transformers.LlamaForCausalLM` with attn_implementation="sdpa" (the default), wrapped
  by `peft.get_peft_model` (LoraConfig / PrefixTuningConfig, PEFT's prefix tuning being P-Tuning
  v2's deep prompts) or left plain for full; `torch.optim.AdamW` (lr 1e-4, no weight decay) with
  `clip_grad_norm_(1.0)`, `torch.set_num_threads(os.cpu_count())`, loss from `labels=input_ids`.
  With --dtype bfloat16 it runs under `torch.autocast(device, torch.bfloat16)`, so both sides keep
  fp32 master weights and compute in bf16. Eager: no compile time. On a GPU, model, data and
  optimizer live on the GPU (CUDA) and attention is PyTorch's SDPA (flash / memory-efficient
  kernels); timing synchronises the device.

On a GPU (`jax.default_backend() == "gpu"` and `torch.cuda.is_available()`), jaxft runs with
`--attention` (default `auto`: cuDNN flash attention in bf16) and `--remat`; the memory column is the
device's peak bytes in use (JAX's `memory_stats`, PyTorch's `max_memory_allocated`).

Each (framework, method) runs in its own subprocess, importing only its own framework, so the peak
RSS (VmHWM) belongs to that configuration alone. jaxft rows also give XLA's own estimate
of the step's memory (argument + temporary buffers) from `memory_analysis()`.

MFU = model FLOPs per second (`jaxft.flops.train_flops_per_token`, the same for both frameworks:
per matmul, causal attention halved) over the device's peak: on a GPU or TPU its datasheet peak
(`jaxft.flops.PEAK_FLOPS`; the measured matmul rate is printed next to it); on a CPU the best
n x n matmul FLOP/s in --dtype measured once at start, the faster of JAX and PyTorch. Run it on an otherwise idle machine: PyTorch's OpenMP threads slow down by orders
of magnitude when other processes hold the cores, XLA's thread pool much less.

`--profile_steps N` profiles N more steps after the timed ones (`jax.profiler` / `torch.profiler`) and
adds where the device's time went, by kernel kind (matmul, attention, other: the memory-bound work
between matmuls, ...) per step, to each row and to the printout (`tools/trace_summary.py`).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time

METHODS = ("lora", "full", "ptuning_v2")
FRAMEWORKS = ("jaxft", "peft")
LORA_RANK, LORA_ALPHA, LORA_TARGETS = 8, 16, ("q_proj", "v_proj")
LEARNING_RATE, GRAD_CLIP = 1e-4, 1.0
RESULT = "@@benchmark-result "  # prefix of the one stdout line a child hands back


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv_heads", type=int, default=8)
    p.add_argument("--intermediate", type=int, default=1376)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--steps", type=int, default=10, help="timed steps")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps after the first (compiling) one")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--frameworks", default=",".join(FRAMEWORKS))
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--num_virtual_tokens", type=int, default=16)
    p.add_argument("--attention", default="auto", help="jaxft model.attention (xla, cudnn, splash, flash, auto)")
    p.add_argument("--remat", default="none", help="jaxft model.remat (none, full, save_dots, offload)")
    p.add_argument("--param_dtype", default="float32", help="jaxft model.param_dtype of the frozen base")
    p.add_argument("--scan_layers", type=int, default=1, choices=(0, 1), help="jaxft model.scan_layers")
    p.add_argument("--loss_chunk_tokens", type=int, default=0,
                   help="jaxft's fused cross-entropy: tokens per chunk (0: jaxft's own choice), for experiments")
    p.add_argument("--hlo", default="",
                   help="write jaxft's compiled train step (optimized HLO, gzip) to this path, {method} replaced by the method")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--peak_n", type=int, default=2048, help="matmul size for the measured FLOP/s peak")
    p.add_argument("--peak_reps", type=int, default=10, help="matmuls timed for the peak (best one counts)")
    p.add_argument("--profile_steps", type=int, default=0,
                   help="profile this many steps after the timed ones: device time by kernel kind")
    p.add_argument("--keep_trace", default="",
                   help="copy jaxft's raw profile (*.trace.json.gz) to this path, {method} replaced by the method")
    p.add_argument("--json", default="", help="also write all rows (and the header) to this file")
    p.add_argument("--_one", default="", help=argparse.SUPPRESS)  # framework:method, run in a child
    args = p.parse_args(argv)
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    args.frameworks = [f.strip() for f in args.frameworks.split(",") if f.strip()]
    for m in args.methods:
        if m not in METHODS:
            p.error(f"--methods: unknown method {m!r} (expected some of {', '.join(METHODS)})")
    for f in args.frameworks:
        if f not in FRAMEWORKS:
            p.error(f"--frameworks: unknown framework {f!r} (expected some of {', '.join(FRAMEWORKS)})")
    if args.hidden % args.heads or args.heads % args.kv_heads:
        p.error("--hidden must be divisible by --heads, and --heads by --kv_heads")
    return args


# ---------------------------------------------------------------------------------------------
# Model FLOPs: one formula (jaxft.flops), applied to both frameworks.


def model_config(args, method: str = "full"):
    """The benchmark's Llama as a jaxft LlamaConfig; the jaxft-only settings only where this jaxft has them."""
    import dataclasses

    from jaxft.models.llama import LlamaConfig

    extra = {"attention": args.attention, "remat": args.remat, "param_dtype": args.param_dtype}
    fields = {f.name: f for f in dataclasses.fields(LlamaConfig)}
    extra = {k: v for k, v in extra.items() if k in fields and not isinstance(fields[k].default, bool)}
    if "remat" in fields and isinstance(fields["remat"].default, bool):  # older jaxft: remat on/off
        extra["remat"] = args.remat != "none"
    return LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_layers=args.layers, num_heads=args.heads, num_kv_heads=args.kv_heads,
        max_position_embeddings=max(2048, args.seq + args.num_virtual_tokens),
        head="causal_lm", dtype=args.dtype, scan_layers=bool(args.scan_layers), **extra,
    )


def flops_per_token(args, method: str) -> float:
    """Training FLOPs per token of the model as defined (`jaxft.flops`), whatever a framework runs:
    full 6N, frozen base 4N + 6 x LoRA's A and B, attention 3x its causal (halved) forward, with the
    P-Tuning v2 prefix columns visible to every query."""
    from jaxft.flops import train_flops_per_token

    cfg = model_config(args, method)
    d = args.hidden // args.heads
    lora = args.layers * LORA_RANK * ((args.hidden + args.heads * d) + (args.hidden + args.kv_heads * d))
    return train_flops_per_token(
        cfg, args.seq, trains_base=method == "full", adapter_weights=lora if method == "lora" else 0,
        num_prefix=args.num_virtual_tokens if method == "ptuning_v2" else 0,
    )


# ---------------------------------------------------------------------------------------------
# One configuration, in a child process.


def rss_mib() -> float:
    """Peak resident set size of this process so far, in MiB.

    VmHWM, not ru_maxrss: Linux carries ru_maxrss over fork + exec, so a child would report the
    parent's peak whenever the parent's was higher. ru_maxrss (KiB) only where /proc is missing.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def token_ids(args):
    """The same random token ids for every configuration."""
    import numpy as np

    return np.random.RandomState(args.seed).randint(0, args.vocab, size=(args.batch, args.seq)).astype(np.int32)


def run_jaxft(args, method_name: str) -> dict:
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from jaxft.config import base_config
    from jaxft.models.llama import LlamaModel
    from jaxft.peft import build
    from jaxft.peft.partition import count, split
    from jaxft.step import TrainState, make_optimizer, make_train_step

    base_rss = rss_mib()
    if args.loss_chunk_tokens:
        import jaxft.cross_entropy

        jaxft.cross_entropy.CHUNK_TOKENS, jaxft.cross_entropy.CHUNK_LOGITS_BYTES = args.loss_chunk_tokens, 0
    c = base_config()
    c.method.name = method_name
    c.method.rank, c.method.alpha, c.method.targets = LORA_RANK, float(LORA_ALPHA), ",".join(LORA_TARGETS)
    c.method.num_virtual_tokens = args.num_virtual_tokens
    c.optimizer.learning_rate, c.optimizer.schedule = LEARNING_RATE, "constant"
    c.optimizer.warmup_steps, c.optimizer.weight_decay, c.optimizer.grad_clip = 0, 0.0, GRAD_CLIP
    cfg = model_config(args, method_name)
    method = build(c.method, cfg)
    model = LlamaModel(cfg, hooks=method.hooks)

    ids = jnp.asarray(token_ids(args))
    params = jax.jit(lambda r: nn.unbox(model.init(r, ids[:1])["params"]))(jax.random.PRNGKey(args.seed))
    trainable, frozen = split(params, method.trainable)
    del params
    if args.param_dtype != "float32":  # the frozen base stored in bf16; trainable leaves stay fp32
        frozen = jax.tree_util.tree_map(lambda x: x.astype(args.param_dtype), frozen)
    tx, schedule = make_optimizer(c.optimizer, 1 + args.warmup + args.steps)
    state = TrainState(
        step=jnp.zeros((), jnp.int32), params=trainable, opt_state=jax.jit(tx.init)(trainable),
        rng=jax.random.PRNGKey(args.seed),
    )
    batch = {"input_ids": ids, "attention_mask": jnp.ones_like(ids), "weight": jnp.ones((args.batch,), jnp.float32)}
    train_step = jax.jit(make_train_step(model, tx, schedule, grad_accum=1), donate_argnums=(0,))

    # Compile ahead of time to read XLA's memory estimate; the jitted call below reuses this executable.
    t0 = time.perf_counter()
    compiled = train_step.lower(state, frozen, batch).compile()
    xla_compile_s = time.perf_counter() - t0
    if args.hlo:
        import gzip

        with gzip.open(args.hlo.format(method=method_name), "wt") as f:
            f.write(compiled.as_text())
    xla_mib = None
    try:
        mem = compiled.memory_analysis()
        xla_mib = (mem.argument_size_in_bytes + mem.temp_size_in_bytes) / 2**20
    except Exception:  # not every backend or version reports it
        pass
    state, metrics = train_step(state, frozen, batch)
    jax.block_until_ready((state, metrics))
    compile_s = time.perf_counter() - t0
    loss_first = float(metrics["loss"])

    for _ in range(args.warmup):
        state, metrics = train_step(state, frozen, batch)
    jax.block_until_ready((state, metrics))
    t0 = time.perf_counter()
    for _ in range(args.steps):
        state, metrics = train_step(state, frozen, batch)
    jax.block_until_ready((state, metrics))
    elapsed = time.perf_counter() - t0
    profile = None
    if args.profile_steps:  # after the timing, so tracing costs the timed steps nothing
        import tempfile

        from trace_summary import jax_events, summarize

        try:  # a profiler that cannot run here (no CUPTI, ...) costs the profile, not the row
            with tempfile.TemporaryDirectory() as trace_dir:
                with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
                    for _ in range(args.profile_steps):
                        state, metrics = train_step(state, frozen, batch)
                    jax.block_until_ready((state, metrics))
                events, rows = jax_events(trace_dir)
                if args.keep_trace:
                    import shutil

                    from trace_summary import newest_trace

                    shutil.copy(newest_trace(trace_dir), args.keep_trace.format(method=method_name))
            profile = {**summarize(events, args.profile_steps, top=40), "rows": rows}
        except Exception as e:  # noqa: BLE001
            profile = {"error": f"{type(e).__name__}: {e}"}
    return {
        "profile": profile, "trainable_params": count(state.params), "total_params": count(state.params) + count(frozen),
        "compile_s": compile_s, "xla_compile_s": xla_compile_s, "step_s": elapsed / args.steps,
        "loss_first": loss_first, "loss_last": float(metrics["loss"]), "xla_mib": xla_mib,
        "base_rss_mib": base_rss, "device_mib": device_peak_mib_jax(), "versions": {"jax": jax.__version__},
        "attention": getattr(cfg, "attention", "xla"), "remat": cfg.remat, "scan_layers": cfg.scan_layers,
        "loss_chunk_tokens": args.loss_chunk_tokens or None,
    }


def device_peak_mib_jax():
    """Peak bytes in use on the accelerator (None on CPU, where peak RSS is the figure)."""
    import jax

    dev = jax.devices()[0]
    if dev.platform == "cpu":
        return None
    stats = dev.memory_stats() or {}
    return stats.get("peak_bytes_in_use", 0) / 2**20 or None


def run_peft(args, method_name: str) -> dict:
    import warnings

    import peft
    import torch
    import transformers

    warnings.filterwarnings("ignore", category=FutureWarning)  # deprecation notices from inside PEFT
    base_rss = rss_mib()
    torch.set_num_threads(os.cpu_count())
    torch.manual_seed(args.seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    hf_cfg = transformers.LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        max_position_embeddings=max(2048, args.seq + args.num_virtual_tokens), rms_norm_eps=1e-6,
        tie_word_embeddings=False, attn_implementation="sdpa",
    )
    with torch.device(device):  # weights created where they train
        model = transformers.LlamaForCausalLM(hf_cfg)
    if method_name == "lora":
        model = peft.get_peft_model(model, peft.LoraConfig(
            r=LORA_RANK, lora_alpha=LORA_ALPHA, target_modules=list(LORA_TARGETS), task_type="CAUSAL_LM"))
    elif method_name == "ptuning_v2":
        model = peft.get_peft_model(model, peft.PrefixTuningConfig(
            num_virtual_tokens=args.num_virtual_tokens, task_type="CAUSAL_LM"))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LEARNING_RATE, weight_decay=0.0)
    model.to(device)  # PEFT's added parameters too
    ids = torch.from_numpy(token_ids(args)).long().to(device)
    mask = torch.ones_like(ids)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def step():
        with torch.autocast(device, dtype=torch.bfloat16, enabled=args.dtype == "bfloat16"):
            loss = model(input_ids=ids, attention_mask=mask, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, GRAD_CLIP)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    t0 = time.perf_counter()
    loss_first = float(step())
    first_s = time.perf_counter() - t0
    for _ in range(args.warmup):
        step()
    sync()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        loss_last = step()
    sync()
    elapsed = time.perf_counter() - t0
    loss_last = float(loss_last)
    profile = None
    if args.profile_steps:
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as torch_profile
        from trace_summary import summarize, torch_events

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
        try:
            with torch_profile(activities=activities) as prof:
                for _ in range(args.profile_steps):
                    step()
                sync()
            what = "CUDA kernels" if device == "cuda" else "CPU operators' own time"
            profile = {**summarize(torch_events(prof, device), args.profile_steps, top=40), "rows": f"torch.profiler, {what}"}
        except Exception as e:  # noqa: BLE001
            profile = {"error": f"{type(e).__name__}: {e}"}
    return {
        "profile": profile,
        "trainable_params": sum(p.numel() for p in params), "total_params": sum(p.numel() for p in model.parameters()),
        "compile_s": None, "first_step_s": first_s, "step_s": elapsed / args.steps,
        "loss_first": loss_first, "loss_last": loss_last, "xla_mib": None, "base_rss_mib": base_rss,
        "device_mib": torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else None, "device": device,
        "attn_implementation": model.config._attn_implementation,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__},
    }


def run_one(args) -> None:
    framework, method = args._one.split(":")
    if framework == "peak":  # in a child too: the parent holds no device memory while the others run
        print(RESULT + json.dumps(matmul_peak(args.dtype, args.peak_n, args.peak_reps)), flush=True)
        return
    row = (run_jaxft if framework == "jaxft" else run_peft)(args, method)
    row.update(framework=framework, method=method, peak_rss_mib=rss_mib(),
               tokens_per_s=args.batch * args.seq / row["step_s"])
    print(RESULT + json.dumps(row), flush=True)


# ---------------------------------------------------------------------------------------------
# The parent: machine peak, children, table.


def matmul_peak(dtype: str, n: int, reps: int) -> dict:
    """Best FLOP/s of an n x n matmul, jitted in JAX and in PyTorch, on the device each trains on; and
    the device's peak for MFU: the datasheet's on a GPU/TPU (`jaxft.flops`), else the faster measured."""
    import jax
    import jax.numpy as jnp
    import torch

    from jaxft.flops import peak_flops

    torch.set_num_threads(os.cpu_count())
    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.dtype(dtype))
    mm = jax.jit(lambda x, y: x @ y)
    mm(a, a).block_until_ready()
    best_jax = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        mm(a, a).block_until_ready()
        best_jax = min(best_jax, time.perf_counter() - t0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    t = torch.randn(n, n, dtype=getattr(torch, dtype), device=device)
    torch.mm(t, t)
    sync()
    best_torch = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        torch.mm(t, t)
        sync()
        best_torch = min(best_torch, time.perf_counter() - t0)
    flops = 2 * n**3
    dev = jax.devices()[0]
    out = {"jax_flops": flops / best_jax, "torch_flops": flops / best_torch, "platform": dev.platform,
           "device_kind": dev.device_kind, "datasheet_flops": peak_flops(dev.device_kind, dtype)}
    out["peak_flops"] = out["datasheet_flops"] or max(out["jax_flops"], out["torch_flops"])
    return out


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def run_child(argv, framework: str, method: str) -> dict:
    """Runs one configuration in a fresh interpreter; its stderr passes through, one stdout line comes back."""
    cmd = [sys.executable, os.path.abspath(__file__), *argv, "--_one", f"{framework}:{method}"]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT):
            return json.loads(line[len(RESULT):])
    return {"framework": framework, "method": method, "error": f"exit status {proc.returncode}"}


def fmt(x, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def print_table(rows) -> None:
    cols = ("framework", "method", "trainable", "compile s", "tokens/s", "vs PEFT", "peak RSS MiB", "XLA MiB",
            "device MiB", "MFU %")
    lines = []
    for r in rows:
        if "error" in r:
            lines.append((r["framework"], r["method"], "failed: " + r["error"]) + ("",) * (len(cols) - 3))
            continue
        lines.append((
            r["framework"], r["method"], f"{r['trainable_params']:,}", fmt(r["compile_s"], ".1f"),
            f"{r['tokens_per_s']:,.0f}", fmt(r.get("ratio_to_peft"), ".2f") + ("x" if r.get("ratio_to_peft") else ""),
            f"{r['peak_rss_mib']:,.0f}", fmt(r["xla_mib"], ",.0f"), fmt(r.get("device_mib"), ",.0f"),
            f"{100 * r['mfu']:.1f}",
        ))
    widths = [max([len(c)] + [len(line[i]) for line in lines]) for i, c in enumerate(cols)]
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths)))
    print("  ".join("-" * w for w in widths))
    for line in lines:
        print("  ".join(v.ljust(w) if i < 2 else v.rjust(w) for i, (v, w) in enumerate(zip(line, widths))).rstrip())


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args._one:
        return run_one(args)

    import jax
    import torch

    peak = run_child(argv, "peak", "matmul")
    if "error" in peak:
        raise SystemExit(f"error: measuring the matmul peak failed ({peak['error']})")
    header = {
        "cpu": cpu_model(), "cores": os.cpu_count(), "jax": jax.__version__, "torch": torch.__version__,
        "dtype": args.dtype, "matmul_n": args.peak_n, **peak,
        "model": {k: getattr(args, k) for k in ("layers", "hidden", "heads", "kv_heads", "intermediate", "vocab")},
        "batch": args.batch, "seq": args.seq, "steps": args.steps, "warmup": args.warmup,
        "num_virtual_tokens": args.num_virtual_tokens,
    }
    where = f"{peak['device_kind']} ({peak['platform']})" if peak["platform"] != "cpu" else "CPU"
    basis = "datasheet" if peak["datasheet_flops"] else "measured"
    print(f"{where}: {header['cpu']} | {header['cores']} cores | jax {jax.__version__} | torch {torch.__version__} | "
          f"{args.dtype} peak for MFU {peak['peak_flops'] / 1e9:,.1f} GFLOP/s ({basis}; measured {args.peak_n}^2 matmul: "
          f"jax {peak['jax_flops'] / 1e9:,.1f}, torch {peak['torch_flops'] / 1e9:,.1f})")
    print(f"Llama {args.layers}x{args.hidden} (heads {args.heads}/{args.kv_heads}, mlp {args.intermediate}, "
          f"vocab {args.vocab}) | batch {args.batch} x {args.seq} tokens | {args.steps} timed steps after "
          f"{args.warmup} warm-up | PEFT attention: sdpa | jaxft attention: {args.attention}, remat: {args.remat}, "
          f"frozen base: {args.param_dtype}", flush=True)

    rows = []
    for method in args.methods:
        for framework in args.frameworks:
            print(f"running {framework}:{method} ...", file=sys.stderr, flush=True)
            row = run_child(argv, framework, method)
            if "error" not in row:
                row["flops_per_token"] = flops_per_token(args, method)
                row["mfu"] = row["flops_per_token"] * row["tokens_per_s"] / peak["peak_flops"]
            rows.append(row)
    for r in rows:
        peft_row = next((p for p in rows if p["framework"] == "peft" and p["method"] == r["method"]), None)
        if r["framework"] == "jaxft" and "error" not in r and peft_row and "error" not in peft_row:
            r["ratio_to_peft"] = r["tokens_per_s"] / peft_row["tokens_per_s"]

    print()
    print_table(rows)
    for r in rows:
        if r.get("profile") and "error" in r["profile"]:
            print(f"\n{r['framework']} {r['method']}: not profiled ({r['profile']['error']})")
        elif r.get("profile"):
            from trace_summary import table

            print(f"\n{r['framework']} {r['method']}, {r['step_s'] * 1e3:.1f} ms per step; profiled "
                  f"({r['profile']['rows']}): " + table(r["profile"]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"header": header, "rows": rows}, f, indent=2)
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
