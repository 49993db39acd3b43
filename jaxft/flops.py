"""Model FLOPs of a training step, counted per matmul, the devices' peaks, and a run's MFU.

One formula for every user of it (the train loop's `train/mfu`, `tools/benchmark.py`, `jaxft.plan`),
so a figure means the same thing everywhere. It counts the model as defined, not what a framework
happens to run: causal attention is halved (a query sees itself and the keys before it), which is
what a fused kernel that skips the masked half really computes, and what MaxText reports.
"""

from __future__ import annotations

import functools
import re
import time

import jax
import numpy as np

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
    """Weights that take part in a matmul for every token, as the config's family counts them (the
    input embedding is a lookup: 0 FLOPs)."""
    from jaxft.models import family

    return family.of(cfg).matmul_weights(cfg)


def attention_flops_per_token(cfg, seq_len: int, num_prefix: int = 0) -> float:
    """Forward QK^T and PV per token, averaged over a causal sequence of `seq_len`: query i sees the
    `num_prefix` prefix columns, itself and the i keys before it (a sliding window caps that). An
    encoder family (`Family.causal` false) sees all `seq_len` keys."""
    from jaxft.models import family

    windows = getattr(cfg, "layer_windows", None) or (getattr(cfg, "sliding_window", None),) * cfg.num_layers
    if family.of(cfg).causal:  # summed over layers: each has its own window (Gemma 2/3), or none
        seen = {w: sum(min(i + 1, w or i + 1) for i in range(seq_len)) / seq_len + num_prefix for w in set(windows)}
        keys = sum(seen[w] for w in windows)
    else:
        keys = cfg.num_layers * (seq_len + num_prefix)
    return 2 * 2 * keys * cfg.num_heads * cfg.dim_per_head


def train_flops_per_token(cfg, seq_len: int, *, trains_base: bool, adapter_weights: int = 0,
                          num_prefix: int = 0, head_width: int | None = None) -> float:
    """Training FLOPs per token: forward 2N; backward 2N to the activations and, where the base trains,
    2N more to its weights; attention 3x its forward; a frozen base's adapters (`adapter_weights`
    matmul weights, e.g. LoRA's A and B) all three. `head_width`: the positions per row the output head
    runs at, where fewer than `seq_len` (a masked LM's targets)."""
    from jaxft.models import family

    n = matmul_weights(cfg)
    if head_width is not None:
        n -= (1 - head_width / seq_len) * family.of(cfg).head_weights(cfg)
    base = (6 if trains_base else 4) * n
    return base + 6 * adapter_weights + 3 * attention_flops_per_token(cfg, seq_len, num_prefix)


# ---------------------------------------------------------------------------------------------
# A run's peak and throughput (the train loop's train/mfu).


@functools.cache
def measured_peak_flops(dtype: str, n: int = 1024, budget_s: float = 0.5) -> float:
    """Best FLOP/s of an n x n matmul on the first device, timed for about `budget_s` seconds: the
    peak for MFU where the datasheet table has no row (CPUs). Timed once per process: runs started from
    one Python session (a notebook, a sweep) rate their steps against the same peak."""
    import jax.numpy as jnp

    a = jnp.ones((n, n), dtype)
    matmul = jax.jit(lambda x: x @ x)
    matmul(a).block_until_ready()
    best, start = 0.0, time.perf_counter()
    while time.perf_counter() - start < budget_s:
        t0 = time.perf_counter()
        matmul(a).block_until_ready()
        best = max(best, 2 * n**3 / (time.perf_counter() - t0))
    return best


def trained_matmuls(cfg, params_trainable, method) -> tuple[bool, int, int]:
    """-> (whether the base's own matmuls train, the adapter weights run per token, virtual tokens)."""
    from jaxft.models import family
    from jaxft.peft.partition import ADDED_PARAMS, flat

    names = flat(params_trainable)
    # The output head trains in nearly every method; only the base's own matmuls cost 2N more.
    head = family.of(cfg).head_params
    trains_base = any(not ADDED_PARAMS.search(k) and not re.search(head, k) for k in names)
    # Per-token adapter matmuls: method-added kernels inside the layers (a prefix encoder runs per batch).
    adapter = sum(int(np.prod(v.shape)) for k, v in names.items()
                  if ADDED_PARAMS.search(k) and k.startswith("layers") and v.ndim >= 2)
    return trains_base, adapter, sum(int(getattr(h, "num_virtual_tokens", 0)) for h in method.hooks)


class Throughput:
    """Tokens/s per device and MFU between two log steps, from host-side counts (no device reads).

    FLOPs come from `train_flops_per_token` per batch width (padded tokens are computed too); the peak is the
    datasheet's for the device kind, `train.peak_flops` if given, or on CPUs a matmul measured once.
    A measured peak is a sample of a machine that may have been busier then: an interval that runs faster
    than it raises it to the interval's rate (`log` says so once), so MFU never exceeds 1.
    `own`: (config, trainable parameters, method) of a model the objective trains beside this one, on the
    same rows (PPO's critic).
    """

    def __init__(self, cfg, params_trainable, method, peak: float, measured: bool = False, log=print, own=None):
        self.trains_base, self.adapter, self.num_prefix = trained_matmuls(cfg, params_trainable, method)
        self.own = None if own is None else (own[0], *trained_matmuls(*own))
        self.cfg, self.peak, self.devices = cfg, peak, jax.device_count()
        self.measured, self.log = measured, log
        self._per_token = {}
        self.tokens = self.flops = 0.0  # running totals over dispatched steps
        self._mark = (time.time(), 0.0, 0.0)

    def add(self, batch_rows: int, width: int, real_tokens: float, head_width: int | None = None):
        if (width, head_width) not in self._per_token:
            self._per_token[width, head_width] = train_flops_per_token(
                self.cfg, width, trains_base=self.trains_base, adapter_weights=self.adapter, num_prefix=self.num_prefix,
                head_width=head_width)
            if self.own is not None:
                own_cfg, trains_base, adapter, num_prefix = self.own
                self._per_token[width, head_width] += train_flops_per_token(
                    own_cfg, width, trains_base=trains_base, adapter_weights=adapter, num_prefix=num_prefix)
        self.tokens += real_tokens
        self.flops += self._per_token[width, head_width] * batch_rows * width

    def restart(self):
        """Start a fresh interval now (after a compile, which is not training time)."""
        self._mark = (time.time(), self.tokens, self.flops)

    def report(self, tokens: float, flops: float) -> dict:
        """Rates over the steps whose totals were (tokens, flops) when dispatched, since the last report."""
        now = time.time()
        t0, tok0, flop0 = self._mark
        if tokens == tok0:  # only a compiling step since the last report: no training time to rate yet
            return {}
        dt = max(now - t0, 1e-9)
        self._mark = (now, tokens, flops)
        rate = (flops - flop0) / dt / self.devices
        if self.measured and rate > self.peak:
            if self.log:
                self.log(f"train/mfu: the steps ran at {rate / 1e9:.1f} GFLOP/s per device, above the matmul peak "
                         f"measured at start-up ({self.peak / 1e9:.1f}; the machine was busier then): MFU is now "
                         "against the faster rate (train.peak_flops sets the peak)")
                self.log = None
            self.peak = rate
        return {
            "train/tokens_per_second": (tokens - tok0) / dt,
            "train/tokens_per_second_per_device": (tokens - tok0) / dt / self.devices,
            "train/mfu": (flops - flop0) / dt / (self.peak * self.devices),
        }


def run_peak(config) -> tuple[float, str, bool]:
    """Per-device peak FLOP/s for MFU, where it came from (for the start-up line), and whether it was
    timed here (`Throughput` may raise such a peak)."""
    kind = jax.devices()[0].device_kind
    if float(config.train.peak_flops) > 0:
        return float(config.train.peak_flops), "train.peak_flops", False
    table = peak_flops(kind, config.model.dtype)
    if table:
        return table, f"datasheet {kind} {config.model.dtype}", False
    # No datasheet row (CPUs): time a matmul; fake CPU devices share the host's cores.
    measured = measured_peak_flops(config.model.dtype) / jax.local_device_count()
    source = f"measured {config.model.dtype} matmul on {kind} (no datasheet row; train.peak_flops overrides)"
    return measured, source, True
