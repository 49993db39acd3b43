"""Forward + backward time of each attention implementation on a Llama-1B-like attention layer.

    python tools/attention_bench.py [--seq 2048] [--batch 8] [--impls xla,cudnn] [--left_pad 0]

Shape: 32 query heads, 8 kv heads, head dim 64, causal, bf16 (`--dtype`). `--left_pad N` pads the
first N tokens of every row, so the kernels' padding path runs; `--prefix P` adds P prefix columns
(P-Tuning v2). Prints ms per forward+backward (the mean of `--steps` after `--warmup`) and TFLOP/s,
FLOPs counted as `jaxft.flops` counts them for training: causal attention halved, backward twice the
forward, over all T positions. Default implementations: those the backend runs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from jaxft.errors import JaxftError  # noqa: E402
from jaxft.flops import attention_flops_per_token  # noqa: E402
from jaxft.models import attention as A  # noqa: E402
from jaxft.models.llama import LlamaConfig  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv_heads", type=int, default=8)
    p.add_argument("--head_dim", type=int, default=64)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--left_pad", type=int, default=0)
    p.add_argument("--prefix", type=int, default=0)
    p.add_argument("--window", type=int, default=0)
    p.add_argument("--impls", default="", help="comma-separated; default: every one the backend runs")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--json", default="", help="also append the rows (one JSON object per line) to this file")
    args = p.parse_args(argv)

    b, t, h, kv, d, n = args.batch, args.seq, args.heads, args.kv_heads, args.head_dim, args.prefix
    impls = args.impls.split(",") if args.impls else [i for i in A.IMPLEMENTATIONS if runs(i, args.dtype, d)]
    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    q = jax.random.normal(keys[0], (b, t, h, d), args.dtype)
    k, v = (jax.random.normal(key, (b, n + t, kv, d), args.dtype) for key in keys[1:])
    mask = jnp.arange(t)[None, :].repeat(b, 0) >= args.left_pad
    cfg = LlamaConfig(num_layers=1, hidden_size=h * d, num_heads=h, num_kv_heads=kv, head_dim=d,
                      sliding_window=args.window or None)
    flops = 3 * attention_flops_per_token(cfg, t, n) * b * t
    print(f"{jax.devices()[0].device_kind}: batch {b}, seq {t}, heads {h}/{kv}, head dim {d}, {args.dtype}, "
          f"left padding {args.left_pad}, prefix {n}, window {args.window or None}; {flops / 1e9:.4g} GFLOP/step")
    for impl in impls:
        def loss(q, k, v, impl=impl):
            out = A.attention(q, k, v, mask, n, args.window or None, args.dtype, impl)
            return jnp.sum(out.astype(jnp.float32))

        step = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
        try:
            for _ in range(args.warmup):
                jax.block_until_ready(step(q, k, v))
        except (JaxftError, ValueError, NotImplementedError) as e:
            print(f"{impl:>7}: cannot run: {str(e).splitlines()[0]}")
            continue
        start = time.perf_counter()
        for _ in range(args.steps):
            out = step(q, k, v)
        jax.block_until_ready(out)
        sec = (time.perf_counter() - start) / args.steps
        print(f"{impl:>7}: {sec * 1e3:8.2f} ms  {flops / sec / 1e12:8.3g} TFLOP/s")
        if args.json:
            row = {k: getattr(args, k) for k in ("batch", "seq", "heads", "kv_heads", "head_dim", "dtype",
                                                 "left_pad", "prefix", "window")}
            with open(args.json, "a") as f:
                f.write(json.dumps({**row, "impl": impl, "ms": sec * 1e3, "tflops": flops / sec / 1e12,
                                    "device_kind": jax.devices()[0].device_kind}) + "\n")


def runs(impl: str, dtype: str, head_dim: int) -> bool:
    try:
        return A.resolve(impl, dtype, head_dim) == impl
    except JaxftError:
        return False


if __name__ == "__main__":
    main()
