"""Layers shared by the model families: hookable linear, RMSNorm, LayerNorm, rotary embeddings, pooling, remat.

Every parameter is created with logical axis names (see `jaxft.sharding`), so one rules table
decides how it is laid out on the mesh. `Linear` is the named point where PEFT methods that
change a projection hook in, in three steps (see `jaxft.peft.hook.Hook`): `linear_input` (IA3 scales
the feed-forward input), `linear_product` (DoRA replaces x @ kernel) and `linear` (LoRA adds to the
output); a hook may add its own parameters inside the module's scope.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from jaxft.models.attention import ATTENTION, interpreting
from jaxft.models.family import POOLING, REMAT
from jaxft.quant import Quantized, dequantize, matmul as quantized_matmul

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
    preferred_element_type: Dtype | None = None  # e.g. float32 for logits: accumulate and return them in fp32

    @nn.compact
    def __call__(self, x, kernel_only: bool = False):
        """`kernel_only`: return the kernel [in, out] itself, for a caller that fuses the product."""
        stored = self.get_variable("params", "kernel") if self.has_variable("params", "kernel") else None
        if isinstance(stored, Quantized):  # an int8 / NF4 frozen base: dequantized here, fused by XLA
            kernel = dequantize(stored, self.dtype)
        else:
            kernel = param_with_axes(
                self, "kernel", nn.initializers.normal(self.init_std), (x.shape[-1], self.features), self.axes
            )
        if kernel_only:
            return kernel
        from jaxft.peft.hook import Hook  # here: jaxft.peft imports this module

        # The matmul point, in three steps: hooks may change the input (IA3 on the feed-forward), the
        # product before the bias (DoRA), and the output (LoRA adds B(A x), IA3 scales k and v). Only the
        # hooks that override a step are called at it, so a model without such hooks traces as before.
        for hook in self.hooks:
            if type(hook).linear_input is not Hook.linear_input:
                x = hook.linear_input(self, x)
        if isinstance(stored, Quantized):
            y = quantized_matmul(x.astype(self.dtype), stored)
        else:
            y = jnp.dot(x.astype(self.dtype), kernel.astype(self.dtype),
                        preferred_element_type=self.preferred_element_type)
        for hook in self.hooks:
            if type(hook).linear_product is not Hook.linear_product:
                y = hook.linear_product(self, x, y, kernel)
        if self.use_bias:
            bias = param_with_axes(self, "bias", nn.initializers.zeros, (self.features,), (self.axes[1],))
            y = y + bias.astype(self.dtype)
        for hook in self.hooks:
            y = hook.linear(self, x, y, kernel)
        return checkpoint_name(y, PROJECTION)


MAX_TILE = 512  # rows per product in `grouped_matmul`


def grouped_tile(rows: int, groups: int) -> int:
    """`grouped_matmul`'s rows per product: about a group's share of the rows, a power of 2 from 8 to MAX_TILE."""
    return int(min(MAX_TILE, max(8, 2 ** math.ceil(math.log2(max(1, -(-rows // groups)))))))


def grouped_matmul(x, w, sizes):
    """x [M, K], its rows sorted into groups of `sizes` [G] rows; w [G, K, N] -> [M, N]: each group's rows
    times its own weights, what `jax.lax.ragged_dot` computes. Each group is padded to whole tiles of rows
    and every tile is one [tile, K] x [K, N] product with its group's weights (a `lax.map`): the work is
    the rows' own plus at most a tile per group, where XLA's CPU and GPU lowering of `ragged_dot` multiplies
    every row by every group's weights (64 groups on 2 CPU cores: 14x the time, 18x the memory; BENCHMARKS).
    Rows past sum(sizes) belong to no group (an expert-parallel shard's room for the worst case): the tiles
    past the last group's are skipped (a `lax.cond`), their rows' results are zero. Under `shard_map`, w
    must vary over the manual axes x does (`varying`): else its gradient is summed over them tile by tile."""
    m, k = x.shape
    g, _, n = w.shape
    tile = grouped_tile(m, g)
    count = -(-m // tile) + g
    padded = (sizes + tile - 1) // tile * tile
    ends = jnp.cumsum(padded)
    starts, padded_starts = jnp.cumsum(sizes) - sizes, ends - padded
    at = jnp.arange(count * tile)  # the padded layout: each group from a tile's start
    # each tile's group (no `searchsorted`: under `shard_map` it fails JAX's varying-axes check)
    tiles = jnp.minimum(jnp.sum(ends[None, :] <= at[::tile, None], axis=1), g - 1)
    group = jnp.repeat(tiles, tile)
    offset = at - padded_starts[group]
    real = (at < ends[-1]) & (offset < sizes[group])
    rows = jnp.where(real[:, None], x[jnp.where(real, starts[group] + offset, 0)], 0).reshape(count, tile, k)
    def product(a):
        rows, group, live = a
        kernel = jax.lax.dynamic_index_in_dim(w, group, keepdims=False)
        skipped = varying(jnp.zeros((tile, n), jnp.result_type(x, w)), varying_axes(rows) | varying_axes(kernel))
        return jax.lax.cond(live, lambda: jnp.dot(rows, kernel), lambda: skipped)

    products = jax.lax.map(product, (rows, tiles, at[::tile] < ends[-1]))
    of_row = jnp.repeat(jnp.arange(g), sizes, total_repeat_length=m)
    out = products.reshape(-1, n)[padded_starts[of_row] + jnp.arange(m) - starts[of_row]]
    return jnp.where((jnp.arange(m) < starts[-1] + sizes[-1])[:, None], out, 0)


def varying_axes(x) -> frozenset:
    """The manual mesh axes over which x differs between shards inside a `shard_map` (none outside one)."""
    return frozenset(getattr(getattr(jax.typeof(x), "manual_axis_type", None), "varying", ()))


def varying(x, axes):
    """x marked as differing over `axes` too (`jax.lax.pcast`): its gradient is summed over them there."""
    return jax.lax.pcast(x, tuple(sorted(axes)), to="varying") if axes else x


def recomputed(fn, static_argnums=()):
    """`fn` whose backward pass recomputes its insides from its inputs instead of keeping them.

    For cheap elementwise work between matmuls (norms, the MLP's activation): left to autodiff, a
    norm keeps an fp32 copy of its bf16 input and its normalised value, and SwiGLU keeps four
    [tokens, intermediate] tensors beside gate and up. Writing them in the forward pass and reading
    them back costs more than recomputing them inside the backward's own fusions (and holds memory).
    No CSE barrier: the recomputation is meant to fuse with the backward work around it."""
    return jax.checkpoint(fn, prevent_cse=False, static_argnums=static_argnums)


@functools.partial(recomputed, static_argnums=(0,))
def gated(act, gate, up):
    """A gated MLP's activation, act(gate) * up (Llama's SwiGLU, T5's gated GELU): it keeps gate and up."""
    return act(gate) * up


@functools.partial(recomputed, static_argnums=(2, 3, 4))
def _rms_norm(x, weight, eps: float, dtype, offset: bool = False):
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    if offset:  # Gemma: scaled by 1 + weight in fp32, then cast
        return (x32 * (1.0 + weight.astype(jnp.float32))).astype(dtype)
    # Match HF: normalise in fp32, cast back, then scale.
    return weight.astype(dtype) * x32.astype(dtype)


@functools.partial(recomputed, static_argnums=(3, 4))
def _layer_norm(x, weight, bias, eps: float, dtype):
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + eps)
    return (y * weight.astype(jnp.float32) + bias.astype(jnp.float32)).astype(dtype)


class RMSNorm(nn.Module):
    eps: float = 1e-6
    dtype: Dtype = jnp.float32
    offset: bool = False  # Gemma's: x * (1 + weight), the weight starting at 0

    @nn.compact
    def __call__(self, x):
        init = nn.initializers.zeros if self.offset else nn.initializers.ones
        weight = param_with_axes(self, "weight", init, (x.shape[-1],), ("norm",))
        return _rms_norm(x, weight, self.eps, jnp.dtype(self.dtype), self.offset)


class LayerNorm(nn.Module):
    """LayerNorm with HF's parameter names (weight, bias): statistics in fp32, output in `dtype`."""

    eps: float = 1e-5
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        weight = param_with_axes(self, "weight", nn.initializers.ones, (x.shape[-1],), ("norm",))
        bias = param_with_axes(self, "bias", nn.initializers.zeros, (x.shape[-1],), ("norm",))
        return _layer_norm(x, weight, bias, self.eps, jnp.dtype(self.dtype))


ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "llama3", "longrope")  # as transformers computes them


def rope_inv_freq(head_dim: int, theta: float, scaling: tuple | None) -> jnp.ndarray:
    """Inverse frequencies, with HF's `linear`, `llama3` and `yarn` rope scaling (`dynamic`: see `rope`)."""
    inv = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    if not scaling:
        return inv
    s = dict(scaling)
    kind = s.get("rope_type", s.get("type", "default"))
    if kind in ("default", "dynamic"):  # dynamic NTK changes only past max_position_embeddings
        return inv
    if kind == "longrope":  # LongRoPE (Phi-3): per-frequency factors, the short ones up to the original length
        return inv / jnp.asarray(s["short_factor"], jnp.float32)
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
    if kind == "yarn":  # YaRN (Peng et al. 2023): interpolate low frequencies, keep high ones
        factor, old_len = s["factor"], s["original_max_position_embeddings"]
        beta_fast, beta_slow = s.get("beta_fast") or 32, s.get("beta_slow") or 1
        def dim_of(rotations):  # the dimension that turns `rotations` times over the original length
            return head_dim * math.log(old_len / (rotations * 2 * math.pi)) / (2 * math.log(theta))

        low, high = dim_of(beta_fast), dim_of(beta_slow)
        if s.get("truncate", True):
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, head_dim - 1)
        ramp = jnp.clip((jnp.arange(head_dim // 2, dtype=jnp.float32) - low) / ((high - low) or 0.001), 0, 1)
        return inv / factor * ramp + inv * (1 - ramp)
    raise ValueError(f"unsupported rope_type {kind!r}: expected one of {', '.join(ROPE_TYPES)}")


def rope_switch_length(scaling: tuple | None) -> int | None:
    """The length past which `rope` rotates every position differently (LongRoPE: the long factors once a
    batch passes the original length), or None."""
    s = dict(scaling or ())
    return s["original_max_position_embeddings"] if s.get("rope_type") == "longrope" else None


def rope_attention_factor(scaling: tuple | None) -> float:
    """YaRN scales cos and sin (so the attention logits) by this factor; 1 for the other types."""
    s = dict(scaling or ())
    kind = s.get("rope_type", s.get("type"))
    if kind not in ("yarn", "longrope"):
        return 1.0
    if s.get("attention_factor") is not None:
        return float(s["attention_factor"])
    if kind == "longrope":
        factor, old_len = s["factor"], s["original_max_position_embeddings"]
        return 1.0 if factor <= 1 else math.sqrt(1 + math.log(factor) / math.log(old_len))
    mscale = lambda scale, m=1.0: 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0  # noqa: E731
    if s.get("mscale") and s.get("mscale_all_dim"):
        return mscale(s["factor"], s["mscale"]) / mscale(s["factor"], s["mscale_all_dim"])
    return mscale(s["factor"])


def rope(q, k, positions, head_dim: int, theta: float, scaling: tuple | None, max_positions: int,
         interleaved: bool = False):
    """q and k rotated. Dynamic NTK scaling raises the base once the longest position passes
    `max_positions`, from the positions of this batch, as transformers does (stateless here). `head_dim`:
    the rotated width, the first `head_dim` of each head (GLM's partial rotary: half a head); the rest
    passes unrotated. `interleaved`: the pairs rotated are (2i, 2i + 1), GLM's layout, not (i, i + D/2)."""
    inv = rope_inv_freq(head_dim, theta, scaling)
    s = dict(scaling or ())
    if s.get("rope_type", s.get("type")) == "dynamic":
        seq_len = jnp.maximum(jnp.max(positions) + 1, max_positions).astype(jnp.float32)
        factor = s["factor"]
        base = theta * ((factor * seq_len / max_positions) - (factor - 1)) ** (head_dim / (head_dim - 2))
        inv = 1.0 / (base ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    if rope_switch_length(scaling):  # the long factors once the batch passes the original length, as transformers
        seq_len = jnp.max(positions) + 1
        long = rope_inv_freq(head_dim, theta, None) / jnp.asarray(s["long_factor"], jnp.float32)
        inv = jnp.where(seq_len > rope_switch_length(scaling), long, inv)
    scale = rope_attention_factor(scaling)
    return apply_rope(q, positions, inv, scale, interleaved), apply_rope(k, positions, inv, scale, interleaved)


def apply_rope(x, positions, inv_freq, scale: float = 1.0, interleaved: bool = False):
    """Rotary embedding of x's first 2 len(inv_freq) features (the rest as they are): rotate-half (HF
    Llama layout) or, `interleaved`, over adjacent pairs (HF GLM). x: [B, T, H, D], positions: [B, T]."""
    width = 2 * inv_freq.shape[0]
    x, rest = (x, None) if width == x.shape[-1] else (x[..., :width], x[..., width:])
    freqs = positions[..., None].astype(jnp.float32) * inv_freq  # [B, T, R/2]
    if interleaved:
        emb = jnp.repeat(freqs, 2, axis=-1)[:, :, None, :]
        rotated = jnp.stack([-x[..., 1::2], x[..., 0::2]], axis=-1).reshape(x.shape)
    else:
        emb = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]
        x1, x2 = jnp.split(x, 2, axis=-1)
        rotated = jnp.concatenate([-x2, x1], axis=-1)
    cos, sin = jnp.cos(emb) * scale, jnp.sin(emb) * scale
    out = (x.astype(jnp.float32) * cos + rotated.astype(jnp.float32) * sin).astype(x.dtype)
    return out if rest is None else jnp.concatenate([out, rest], axis=-1)


def last_token(mask):
    """[B, T] padding mask -> index of each row's last real token, the state a classifier head reads."""
    return mask.shape[1] - 1 - jnp.argmax(mask[:, ::-1], axis=-1)


def pool(h, mask, how: str):
    """[B, T, D] final states -> [B, D], what the classifier head reads.

    "last": the last real token's state, as HF's `*ForSequenceClassification` decoders do.
    "first": the first token's state ([CLS] of BERT-like encoders).
    "every": no pooling, every state [B, T, D] (PPO's separate critic: a value at each position; internal,
    never a `model.pooling` choice).
    "mean": the average over real tokens. A frozen decoder's last state is trained to predict the next
    token, not to summarise the sentence; the mean lets every token's own features (and what a method
    writes into them) reach the head (P-Tuning v2 on jaxft-tiny: 0.764 against 0.672 SST-2 dev accuracy).
    """
    if how == "last":
        return h[jnp.arange(h.shape[0]), last_token(mask)]
    if how == "first":
        return h[:, 0]
    if how == "every":
        return h
    if how == "mean":  # summed in fp32: bf16 sums of long sequences lose the low bits
        m = mask.astype(jnp.float32)[..., None]
        return ((h.astype(jnp.float32) * m).sum(axis=1) / jnp.maximum(m.sum(axis=1), 1)).astype(h.dtype)
    raise ValueError(f"pooling={how!r}: expected one of {POOLING}")


# Fused attention kernels' primitives (cuDNN; Pallas on TPU): remat "none" keeps what they compute.
KERNELS = ("dot_product_attention_fwd", "dot_product_attention_fwd_wrapper", "pallas_call")
_NAMED_PRODUCTS = jax.checkpoint_policies.save_only_these_names(PROJECTION, ATTENTION)


def keep_products(prim, *args, **params) -> bool:
    """remat "none": keep what the matmuls and attention kernels computed, and attention's named inputs
    and output; recompute the elementwise work between them (norms, rotary, activations, the kernels'
    casts to the compute dtype, residual adds, masks, softmax) inside the backward's own fusions.

    Keeping one of those costs a write in the forward pass and a read in the backward, and under a layer
    scan a copy into a stacked buffer, zeros written into it first and a copy out of it again; the
    recomputation is one more output of a fusion the backward pass runs anyway. On an H200 the stacked
    copies and zeros took 24 of a full fine-tuning step's 253 ms (BENCHMARKS.md)."""
    return (jax.checkpoint_policies.dots_saveable(prim, *args, **params) or prim.name in KERNELS
            or _NAMED_PRODUCTS(prim, *args, **params))


def remat_policy(name: str):
    """`model.remat` -> the `jax.checkpoint` policy of each layer.

    none: keep every product (`keep_products`), recompute only the cheap elementwise work. full: keep
    only the layer's input, recompute everything in the backward pass. save_dots: keep every
    projection's output (named in `Linear`), recompute norms, rotary, attention and the MLP
    activation. offload: as save_dots, but the kept tensors wait in pinned host memory. On CPU the
    device memory is host memory: offload runs and keeps exactly what save_dots keeps.
    """
    if name == "none":
        return keep_products
    if name == "full":
        return jax.checkpoint_policies.nothing_saveable
    if name == "save_dots":
        return jax.checkpoint_policies.save_only_these_names(PROJECTION)
    if name == "offload":
        kinds = {m.kind for m in jax.local_devices()[0].addressable_memories()}
        if "pinned_host" not in kinds:
            from jaxft.errors import JaxftError

            raise JaxftError(
                f"model.remat='offload': the {jax.default_backend()} backend has no pinned host memory "
                f"(memory kinds {sorted(kinds)}); use save_dots or full"
            )
        return jax.checkpoint_policies.save_and_offload_only_these_names(
            names_which_can_be_saved=(), names_which_can_be_offloaded=(PROJECTION,),
            offload_src="device", offload_dst="pinned_host",
        )
    raise ValueError(f"remat={name!r}: expected one of {REMAT}")


def remat(layer, cfg):
    """A family's layer (module class) under `cfg.remat`'s policy. Unrolled layers (`scan_layers=False`)
    need a CSE barrier where a policy recomputes to hold less memory, or XLA would reuse the forward
    pass's values; "none" recomputes to move fewer bytes, and reusing them would lose nothing."""
    if cfg.remat == "none" and interpreting():  # Pallas interpret mode's callbacks: jax.checkpoint refuses them
        return layer
    barrier = not cfg.scan_layers and cfg.remat != "none"
    return nn.remat(layer, prevent_cse=barrier, policy=remat_policy(cfg.remat))


def block_output(module, h, where: str):
    """A sublayer's output through every hook's `block_output` (adapters), before the residual add."""
    for hook in module.hooks:
        h = hook.block_output(module, h, where)
    return h


def segment_positions(segment_ids):
    """[B, T] segment ids -> each token's position within its segment (0 at every segment's start)."""
    t = segment_ids.shape[1]
    index = jnp.broadcast_to(jnp.arange(t), segment_ids.shape)
    starts = jnp.concatenate([jnp.ones_like(segment_ids[:, :1], bool), segment_ids[:, 1:] != segment_ids[:, :-1]], 1)
    return index - jax.lax.cummax(jnp.where(starts, index, 0), axis=1)
