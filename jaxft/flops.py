"""Model FLOPs of a training step, counted per matmul, and the devices' datasheet peaks: MFU.

One formula for every user of it (the train loop's `train/mfu`, `tools/benchmark.py`, `jaxft.plan`),
so a figure means the same thing everywhere. It counts the model as defined, not what a framework
happens to run: causal attention is halved (a query sees itself and the keys before it), which is
what a fused kernel that skips the masked half really computes, and what MaxText reports.
"""

from __future__ import annotations

# Dense (no sparsity) datasheet peaks in FLOP/s, by `jax.Device.device_kind` prefix and compute dtype.
# float32 on NVIDIA GPUs runs on the tensor cores as TF32 (XLA's default matmul precision there).
PEAK_FLOPS = {
    "NVIDIA H200": {"bfloat16": 989e12, "float16": 989e12, "float32": 494e12},
    "NVIDIA H100": {"bfloat16": 989e12, "float16": 989e12, "float32": 494e12},  # SXM; PCIe is lower
    "NVIDIA A100": {"bfloat16": 312e12, "float16": 312e12, "float32": 156e12},
    "NVIDIA L4": {"bfloat16": 121e12, "float16": 121e12, "float32": 60e12},
    "NVIDIA A10G": {"bfloat16": 70e12, "float16": 70e12, "float32": 35e12},
    "TPU v4": {"bfloat16": 275e12, "float32": 275e12},
    "TPU v5 lite": {"bfloat16": 197e12, "float32": 197e12},  # v5e
    "TPU v5p": {"bfloat16": 459e12, "float32": 459e12},
    "TPU v5": {"bfloat16": 459e12, "float32": 459e12},
    "TPU v6 lite": {"bfloat16": 918e12, "float32": 918e12},  # v6e (Trillium)
}


def peak_flops(device_kind: str, dtype: str) -> float | None:
    """The datasheet peak of one device, or None where the table has no row (CPUs: measure or give it)."""
    for prefix in sorted(PEAK_FLOPS, key=len, reverse=True):
        if device_kind.startswith(prefix):
            table = PEAK_FLOPS[prefix]
            return table.get(dtype, table["bfloat16"])
    return None


def matmul_weights(cfg) -> int:
    """Weights that take part in a matmul for every token: q, k, v, o, gate, up, down per layer, plus
    the output head (the vocabulary projection, or the classifier's tiny one). The input embedding is a
    lookup: 0 FLOPs."""
    d = cfg.dim_per_head
    q, kv = cfg.num_heads * d, cfg.num_kv_heads * d
    per_layer = cfg.hidden_size * (q + 2 * kv) + q * cfg.hidden_size + 3 * cfg.hidden_size * cfg.intermediate_size
    out = cfg.hidden_size * (cfg.num_labels if cfg.head == "classification" else cfg.vocab_size)
    return cfg.num_layers * per_layer + out


def attention_flops_per_token(cfg, seq_len: int, num_prefix: int = 0) -> float:
    """Forward QK^T and PV per token, averaged over a causal sequence of `seq_len`: query i sees the
    `num_prefix` prefix columns, itself and the i keys before it (a sliding window caps that)."""
    keys = sum(min(i + 1, cfg.sliding_window or i + 1) for i in range(seq_len)) / seq_len + num_prefix
    return cfg.num_layers * 2 * 2 * keys * cfg.num_heads * cfg.dim_per_head


def train_flops_per_token(cfg, seq_len: int, *, trains_base: bool, adapter_weights: int = 0,
                          num_prefix: int = 0) -> float:
    """Training FLOPs per token: forward 2N; backward 2N to the activations and, where the base trains,
    2N more to its weights; attention 3x its forward; a frozen base's adapters (`adapter_weights`
    matmul weights, e.g. LoRA's A and B) all three."""
    n = matmul_weights(cfg)
    base = (6 if trains_base else 4) * n
    return base + 6 * adapter_weights + 3 * attention_flops_per_token(cfg, seq_len, num_prefix)
