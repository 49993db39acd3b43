"""A mixture of experts' cost: one grouped matmul, and a whole train step on a device mesh.

    python tools/moe_bench.py grouped [--rows 8192 --dim 128 --out 192 --experts 64 --dtype float32]
    XLA_FLAGS=--xla_force_host_platform_device_count=8 python tools/moe_bench.py step [--meshes 1x1x1,8x1x1]

`grouped`: forward and backward (both operands' gradients) of `layers.grouped_matmul` and of
`jax.lax.ragged_dot` on random group sizes: ms (the mean of `--steps` after one warm-up) and XLA's temp MB.
`step`: the full-fine-tuning train step of a 2-layer Qwen3-MoE-shaped model (8 experts, 2 per token) on each
`data x fsdp x tensor` mesh: ms per step and the compiled temp MB per device. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from jaxft import sharding  # noqa: E402
from jaxft.config import base_config  # noqa: E402
from jaxft.models.layers import grouped_matmul  # noqa: E402
from jaxft.models.llama import LlamaConfig, LlamaModel  # noqa: E402
from jaxft.peft import build  # noqa: E402
from jaxft.peft.partition import split  # noqa: E402
from jaxft.step import init_state, make_optimizer, make_train_step  # noqa: E402
from jaxft.train import init_params  # noqa: E402


def timed(fn, args, steps: int) -> tuple[float, float]:
    """(ms per call, temp MB) of a jitted fn."""
    compiled = fn.lower(*args).compile()
    temp = compiled.memory_analysis().temp_size_in_bytes / 1e6
    jax.block_until_ready(compiled(*args))
    start = time.perf_counter()
    for _ in range(steps):
        out = compiled(*args)
    jax.block_until_ready(out)
    return (time.perf_counter() - start) / steps * 1e3, temp


def grouped(a) -> list[str]:
    rng = np.random.default_rng(0)
    dt = jnp.dtype(a.dtype)
    x = jnp.asarray(rng.normal(size=(a.rows, a.dim)), dt)
    w = jnp.asarray(rng.normal(size=(a.experts, a.dim, a.out)) / np.sqrt(a.dim), dt)
    cuts = np.sort(rng.integers(0, a.rows + 1, a.experts - 1))
    sizes = jnp.asarray(np.diff(np.concatenate([[0], cuts, [a.rows]])), jnp.int32)
    rows = []
    for name, fn in (("grouped_matmul", grouped_matmul), ("ragged_dot", jax.lax.ragged_dot)):
        loss = lambda x, w, fn=fn: jnp.sum(fn(x, w, sizes).astype(jnp.float32) ** 2)  # noqa: E731
        ms, temp = timed(jax.jit(jax.grad(loss, argnums=(0, 1))), (x, w), a.steps)
        rows.append(f"| {name} | {a.rows:,} x {a.dim} -> {a.out}, {a.experts} | {ms:.1f} | {temp:.1f} |")
    return ["| matmul | rows x in -> out, experts | ms | temp MB |", "|---|---|---|---|", *rows]


def step(a) -> list[str]:
    cfg = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_layers=2, num_heads=8,
                      num_kv_heads=4, head_dim=32, head="causal_lm", num_experts=8, experts_per_token=2,
                      moe_intermediate_size=256, norm_topk_prob=True)
    rows = ["| mesh (data x fsdp x tensor) | ms per step | temp MB per device |", "|---|---|---|"]
    for mesh_sizes in a.meshes.split(","):
        c = base_config()
        c.mesh.data, c.mesh.fsdp, c.mesh.tensor = (int(n) for n in mesh_sizes.split("x"))
        devices = jax.devices()[:c.mesh.data * c.mesh.fsdp * c.mesh.tensor]
        mesh = sharding.make_mesh(c.mesh, devices)
        method = build(c.method, cfg)
        model = LlamaModel(cfg, hooks=method.hooks)
        trainable, frozen = split(init_params(model, None, mesh, 0), method.trainable)
        tx, schedule = make_optimizer(c.optimizer, 10)
        state, shardings = init_state(tx, trainable, 0, mesh)
        ids = np.random.default_rng(0).integers(0, cfg.vocab_size, (a.batch, a.seq)).astype(np.int32)
        batch = {"input_ids": ids, "attention_mask": np.ones_like(ids), "weight": np.ones((a.batch,), np.float32)}
        batch = {k: jax.device_put(v, sharding.batch_sharding(mesh, v.ndim)) for k, v in batch.items()}
        fn = jax.jit(make_train_step(model, tx, schedule, 1, mesh, shardings.params),
                     out_shardings=(shardings, sharding.replicated(mesh)))
        ms, temp = timed(fn, (state, frozen, batch), a.steps)
        rows.append(f"| {mesh_sizes} | {ms:.0f} | {temp:.1f} |")
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("what", choices=("grouped", "step"))
    p.add_argument("--rows", type=int, default=8192)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--out", type=int, default=192)
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--meshes", default="1x1x1,8x1x1,1x8x1,1x2x4")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--steps", type=int, default=3)
    a = p.parse_args(argv)
    print(f"{jax.devices()[0].device_kind} x {jax.device_count()}, jax {jax.__version__}")
    print("\n".join(grouped(a) if a.what == "grouped" else step(a)))


if __name__ == "__main__":
    main()
