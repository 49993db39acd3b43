"""Predict a run's memory per device before anything runs.

TODO docstring
"""

from __future__ import annotations

import dataclasses
import math
import re
import sys

import jax
import numpy as np

from jaxft.errors import JaxftError


@dataclasses.dataclass
class Setup:
    """What a run would build, as shapes only: no weight is read, no step compiled."""

    config: object
    cfg: object  # LlamaConfig
    method: object
    model: object
    mesh: object  # an AbstractMesh: plans for more devices than this machine has
    abstract: dict  # flat path -> ShapeDtypeStruct (the dtype it is stored in)
    trainable: dict  # flat path -> bool
    shardings: dict  # flat path -> NamedSharding
    num_prefix: int
    platform: str  # where the run goes: cpu, gpu or tpu


def head_of(config) -> tuple[str, int | None]:
    """The task's head and label count, read from the config, or from the data file's first rows."""
    from jaxft.data import sources, tasks

    d = config.data
    task = config.model.head or d.task
    labels = int(d.synthetic_labels) or None if d.name == "synthetic" else None
    if not task and d.name == "synthetic":
        task = "classification" if labels else "causal_lm"
    if not task or task == "classification" and labels is None:
        first = str(d.name).split("+")[0]
        if first not in sources.BUNDLED and not re.search(r"\.(jsonl|json|csv|tsv|parquet)$", first, re.I):
            raise JaxftError(f"data.name={d.name!r}: set data.task (the plan reads no hub dataset)")
        train, _, _, label_field = sources.resolve(d, first)
        has_labels = bool(train.rows) and label_field in train.rows[0]
        task = task or ("classification" if has_labels else "causal_lm")
        if task == "classification" and has_labels:
            labels = len(tasks.label_vocab(train, label_field))
    return task, labels


def setup(config, num_devices: int | None = None, platform: str | None = None) -> Setup:
    """config -> the model, method, mesh and parameter shapes/shardings a run would build."""
    import flax.linen as nn
    from jax.sharding import AbstractMesh

    from jaxft import sharding
    from jaxft.config import validate
    from jaxft.models.llama import LlamaModel
    from jaxft.peft import build
    from jaxft.peft.partition import flat, is_trainable
    from jaxft.train import load_model_config

    validate(config)
    num_devices = num_devices or jax.device_count()
    mesh = AbstractMesh(sharding.mesh_shape(config.mesh, num_devices), sharding.MESH_AXES)
    cfg, _, _ = load_model_config(config)  # config.json only
    head, labels = head_of(config)
    cfg = cfg.replace(
        head=head,
        num_labels=labels or cfg.num_labels,
        pooling=config.model.pooling or cfg.pooling,
        dtype=config.model.dtype,
        scan_layers=config.model.scan_layers,
        remat=config.model.remat,
        param_dtype=config.model.param_dtype,
    )
    method = build(config.method, cfg)
    model = LlamaModel(cfg, hooks=method.hooks)
    dummy = jax.ShapeDtypeStruct((1, 2), np.int32)
    boxed = jax.eval_shape(lambda r, x: model.init(r, x), jax.random.PRNGKey(0), dummy)["params"]
    shardings = flat(sharding.param_shardings(boxed, mesh))
    shapes = flat(nn.unbox(boxed))
    trainable = {p: is_trainable(p, method.trainable) for p in shapes}
    frozen_dtype = np.dtype(cfg.param_dtype) if cfg.param_dtype != "bfloat16" else jax.numpy.bfloat16
    abstract = {p: jax.ShapeDtypeStruct(x.shape, x.dtype if trainable[p] else frozen_dtype) for p, x in shapes.items()}
    num_prefix = sum(getattr(h, "num_virtual_tokens", 0) for h in method.hooks)
    platform = platform or jax.default_backend()
    return Setup(config, cfg, method, model, mesh, abstract, trainable, shardings, num_prefix, platform)


def per_device(shape, dtype, named_sharding) -> int:
    return math.prod(named_sharding.shard_shape(tuple(shape))) * np.dtype(dtype).itemsize


# ---------------------------------------------------------------------------------------------
# The estimate.

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _layer_modules(s: Setup) -> tuple[set, set, bool]:
    """-> (projections whose kernel trains, projections with a LoRA adapter, whether the norms train)."""
    trained, adapted, norms = set(), set(), False
    for path, t in s.trainable.items():
        parts = path.split("/")
        if not parts[0].startswith("layers") or not t:
            continue
        if parts[-1] == "kernel" and parts[-2] in PROJECTIONS:
            trained.add(parts[-2])
        elif parts[-1] in ("lora_a", "lora_b"):
            adapted.add(parts[-2])
        elif parts[-1] == "weight":
            norms = True
    return trained, adapted, norms


# How much of one layer's residuals the backward pass needs on top of the saved ones, by remat
# policy: the gradients of one layer's residuals (none), plus what it recomputes (save_dots, full).
# Measured on XLA:CPU for full, LoRA and P-Tuning v2 (tests/test_plan.py): 0.81-1.11, 0.65-0.73,
# 1.25-1.44 over sequence lengths 128-256, batches 4-16, vocabularies 512-4096 and MLP widths.
WORKING_SET = {"none": 1.0, "save_dots": 0.7, "offload": 0.7, "full": 1.35}
LOSS_CHUNK_BUFFERS = 3  # fp32 [chunk, vocab] arrays of the fused loss: logits, exp, their gradient


def activation_bytes(s: Setup, batch: int) -> dict:
    """Activation bytes per device for a global batch of `batch` (see the module docstring)."""
    from jaxft.cross_entropy import CHUNK_TOKENS, MIN_CHUNK_LENGTH

    cfg, config, mesh = s.cfg, s.config, s.mesh
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    tp = mesh.shape["tensor"]
    b = max(batch // config.train.grad_accum // shards, 1)  # rows of one micro-batch on one device
    t, p = config.data.seq_len, s.num_prefix
    k = t + p  # keys per query
    # XLA:CPU emulates bf16 arithmetic in fp32: its temporaries match an fp32 run's (measured).
    c = 4 if s.platform == "cpu" else np.dtype(cfg.compute_dtype).itemsize
    split = lambda n: n // tp if n % tp == 0 else n  # noqa: E731  (axes the tensor axis divides)
    d_model, d = cfg.hidden_size, cfg.dim_per_head
    heads, kv, ffn = split(cfg.num_heads), split(cfg.num_kv_heads), split(cfg.intermediate_size)
    trained, adapted, norms = _layer_modules(s)
    rank = next((h.rank for h in s.method.hooks if hasattr(h, "rank")), 0)
    inputs = {"q_proj": d_model, "k_proj": d_model, "v_proj": d_model, "o_proj": heads * d,
              "gate_proj": d_model, "up_proj": d_model, "down_proj": ffn}
    outputs = {"q_proj": heads * d, "k_proj": kv * d, "v_proj": kv * d, "o_proj": d_model,
               "gate_proj": ffn, "up_proj": ffn, "down_proj": d_model}

    # What the backward pass keeps of one layer without remat, per token.
    keep = 4 * 2 * d_model + c * (heads * d + 2 * kv * d * k / t + 5 * ffn)  # norms' fp32 inputs, q, k, v, MLP
    keep += 4 * heads * k + c * heads * k + 4 * (4 + 2 * heads)  # fp32 scores, probabilities, statistics
    keep += c * sum(_grad_inputs(trained | adapted, inputs))  # inputs of projections whose weights get gradients
    keep += 4 * 2 * d_model * norms  # normalised states, for the norms' weight gradients
    keep += c * rank * len(adapted)  # LoRA's x @ A
    prefix = c * 2 * b * p * kv * d  # this layer's prefix keys and values
    per_layer = keep * b * t + prefix

    saved = {  # what each layer leaves for the backward pass
        "none": per_layer,
        "full": c * b * t * d_model + prefix,  # its input
        "save_dots": c * b * t * (d_model + sum(outputs.values())) + prefix,  # its input, every projection's output
        "offload": c * b * t * d_model + prefix,  # its input; the projections' outputs wait in host memory
    }[cfg.remat]
    working = WORKING_SET[cfg.remat] * per_layer
    loss = 0
    if cfg.head == "causal_lm":
        length = max(1, min(t, max(MIN_CHUNK_LENGTH, CHUNK_TOKENS // b)))
        loss = LOSS_CHUNK_BUFFERS * 4 * b * length * cfg.vocab_size // (tp if cfg.vocab_size % tp == 0 else 1)
    inputs_bytes = b * config.train.grad_accum * (t * 8 + 12)  # ids, mask, labels, weight
    total = cfg.num_layers * saved + max(working, loss) + inputs_bytes
    return {"total": int(total), "per_layer": per_layer, "saved": saved, "working": working, "loss": loss}


def _grad_inputs(modules, inputs):
    """Distinct inputs that projections with weight gradients read: q, k, v share one, gate and up another."""
    groups = {"q_proj": "attn_in", "k_proj": "attn_in", "v_proj": "attn_in", "o_proj": "attn_out",
              "gate_proj": "mlp_in", "up_proj": "mlp_in", "down_proj": "mlp_act"}
    seen = {}
    for m in modules:
        seen[groups[m]] = inputs[m]
    return seen.values()


def estimate(s: Setup, batch: int | None = None) -> dict:
    """Per-device bytes of a run: weights, gradients, optimizer state, activations, total."""
    batch = batch or s.config.train.batch_size
    weights = trainable = mu = 0
    mu_dtype = np.dtype(jax.numpy.bfloat16) if s.config.optimizer.get("mu_dtype") == "bfloat16" else None
    for path, x in s.abstract.items():
        weights += per_device(x.shape, x.dtype, s.shardings[path])
        if s.trainable[path]:
            trainable += per_device(x.shape, x.dtype, s.shardings[path])
            mu += per_device(x.shape, mu_dtype or x.dtype, s.shardings[path])
    optimizer = mu + trainable  # Adam's two moments (nu as the parameters)
    compute = np.dtype(s.cfg.compute_dtype).itemsize
    # A frozen base stored narrower than the compute dtype is converted once per step, whole (measured
    # on XLA:CPU): bf16 storage saves memory only with bf16 compute.
    weights += sum(per_device(x.shape, s.cfg.compute_dtype, s.shardings[p]) for p, x in s.abstract.items()
                   if not s.trainable[p] and x.dtype.itemsize < compute)
    activations = activation_bytes(s, batch)["total"]
    # The update (clipped gradients, new moments) is made after the activations are freed: the step
    # needs the larger of the two, on top of the gradients.
    gradients = trainable * (2 if s.config.train.grad_accum > 1 else 1)  # + one micro-batch's, when accumulating
    total = weights + gradients + optimizer + max(activations, trainable)
    return {"weights": int(weights), "gradients": int(gradients), "optimizer": int(optimizer),
            "activations": int(activations), "total": int(total)}
