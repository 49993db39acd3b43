"""Layers shared by the model families: hookable linear, RMSNorm, rotary embeddings, attention.

Every parameter is created with logical axis names (see `jaxft.sharding`), so one rules table
decides how it is laid out on the mesh. `Linear` is the named point where PEFT methods that
change a projection (LoRA and friends) hook in: it calls `hook.linear(module, x, y, kernel)` for
each hook of the model, and a hook may add its own parameters inside the module's scope.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

Dtype = Any
# The name every projection's output carries, for remat policies that keep it (`model.remat=save_dots`).
PROJECTION = "projection"


def param_with_axes(module: nn.Module, name: str, init, shape, axes, dtype=jnp.float32):
    """A parameter annotated with logical axis names."""
    return module.param(name, nn.with_logical_partitioning(init, axes), shape, dtype)


class Linear(nn.Module):
    """y = x @ kernel (+ bias), kernel stored [in, out] with logical axes; then the model's hooks."""

    features: int
    axes: tuple[str | None, str | None]
    use_bias: bool = False
    dtype: Dtype = jnp.float32
    hooks: Sequence[Any] = ()
    init_std: float = 0.02

    @nn.compact
    def __call__(self, x, kernel_only: bool = False):
        """`kernel_only`: return the kernel [in, out] itself, for a caller that fuses the product."""
        kernel = param_with_axes(
            self, "kernel", nn.initializers.normal(self.init_std), (x.shape[-1], self.features), self.axes
        )
        if kernel_only:
            return kernel
        y = jnp.dot(x.astype(self.dtype), kernel.astype(self.dtype))
        if self.use_bias:
            bias = param_with_axes(self, "bias", nn.initializers.zeros, (self.features,), (self.axes[1],))
            y = y + bias.astype(self.dtype)
        for hook in self.hooks:
            y = hook.linear(self, x, y, kernel)
        return checkpoint_name(y, PROJECTION)


class RMSNorm(nn.Module):
    eps: float = 1e-6
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        weight = param_with_axes(self, "weight", nn.initializers.ones, (x.shape[-1],), ("norm",))
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        # Match HF: normalise in fp32, cast back, then scale.
        return weight.astype(self.dtype) * x32.astype(self.dtype)


def rope_inv_freq(head_dim: int, theta: float, scaling: tuple | None) -> jnp.ndarray:
    """Inverse frequencies, with HF's `linear` and `llama3` rope scaling."""
    inv = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    if not scaling:
        return inv
    s = dict(scaling)
    kind = s.get("rope_type", s.get("type", "default"))
    if kind == "default":
        return inv
    if kind == "linear":
        return inv / s["factor"]
    if kind == "llama3":
        factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
        old_len = s["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        scaled = jnp.where(wavelen > old_len / low, inv / factor, inv)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        return jnp.where(medium, smoothed, scaled)
    raise ValueError(f"unsupported rope_type {kind!r}: expected default, linear or llama3")


def apply_rope(x, positions, inv_freq):
    """Rotate-half rotary embedding (HF Llama layout). x: [B, T, H, D], positions: [B, T]."""
    freqs = positions[..., None].astype(jnp.float32) * inv_freq  # [B, T, D/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]
    cos, sin = jnp.cos(emb), jnp.sin(emb)
    x1, x2 = jnp.split(x, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return (x.astype(jnp.float32) * cos + rotated.astype(jnp.float32) * sin).astype(x.dtype)


def attention(q, k, v, mask, dtype):
    """Grouped-query attention. q: [B, T, H, D]; k, v: [B, S, KV, D]; mask: [B, T, S] bool."""
    b, t, h, d = q.shape
    kv = k.shape[2]
    q = q.reshape(b, t, kv, h // kv, d)
    scores = jnp.einsum("btkgd,bskd->bkgts", q, k).astype(jnp.float32) / math.sqrt(d)
    scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v)
    return out.reshape(b, t, h * d)
