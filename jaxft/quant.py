"""Frozen base weights in 8 or 4 bits, in plain jax.numpy: int8 per output channel and QLoRA's NF4.

`quantize(w)` returns a `Quantized` pytree that sits in the parameter tree where the kernel was;
`jaxft.models.layers.Linear` multiplies through `matmul`, which dequantizes inside the jitted step in
the compute dtype (XLA fuses it) and again in the backward pass, so no full-precision copy of the
base is kept between steps or as a residual. There is no int8 x int8 -> int32 path yet.
Kernels are stored [in, out] in jaxft, so output channels are the last axis.

NF4 follows Dettmers et al. 2023 (QLoRA): 16 NormalFloat levels, absmax blocks of 64 over the
flattened weight, two 4-bit codes per byte (the first in the high nibble, as bitsandbytes packs),
and double quantization of the absmax constants: their mean is subtracted, then they are stored
in 8 bits with one fp32 scale per block of 256. The 8-bit format of the constants is linear int8
absmax here, not bitsandbytes' dynamic 8-bit map; the codes and fp32 absmax without double
quantization match bitsandbytes bit for bit (tests/test_quant.py).
"""

from __future__ import annotations

import re
from statistics import NormalDist

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxft.errors import JaxftError

KINDS = ("int8", "nf4")
DOUBLE_QUANT_BLOCK = 256
# The projections of the decoder layers; never embeddings, norms, the LM head or a classifier head.
TARGETS = re.compile(r"(^|/)(q|k|v|o|gate|up|down|gate_up|qkv)_proj/kernel$")


def nf4_levels() -> np.ndarray:
    """The 16 NormalFloat4 levels: quantiles of N(0, 1), 8 for the positive half and 7 for the
    negative one, sharing an exact 0, scaled to [-1, 1]. The outermost quantile is taken at
    delta = (1 - 1/(2*15) + 1 - 1/(2*16)) / 2, the mean of the two halves' end points (QLoRA)."""
    delta = 0.5 * ((1 - 1 / 30) + (1 - 1 / 32))
    ppf = NormalDist().inv_cdf
    positive = [ppf(p) for p in np.linspace(delta, 0.5, 9)[:-1]]
    negative = [-ppf(p) for p in np.linspace(delta, 0.5, 8)[:-1]]
    levels = np.array(sorted(negative + [0.0] + positive), np.float64)
    return (levels / levels.max()).astype(np.float32)


NF4 = nf4_levels()


@struct.dataclass
class Quantized:
    """A quantized weight of logical `shape` (leading dims of the leaves, e.g. scanned layers, extra).

    int8: `values` int8 [..., in, out], `scale` fp32 [..., out].
    nf4: `values` uint8 [..., ceil(n/block)*block/2]; `scale` the absmax per block: fp32
    [..., blocks], or with double quantization int8 [..., blocks padded to 256] with `scale2` fp32
    [..., blocks/256] and `offset` fp32 [...] (the constants' mean).
    """

    values: jax.Array
    scale: jax.Array
    scale2: jax.Array | None = None
    offset: jax.Array | None = None
    kind: str = struct.field(pytree_node=False, default="int8")
    shape: tuple = struct.field(pytree_node=False, default=())
    dtype: str = struct.field(pytree_node=False, default="float32")
    block_size: int = struct.field(pytree_node=False, default=64)

    @property
    def nbytes(self) -> int:
        return int(sum(x.nbytes for x in jax.tree_util.tree_leaves(self)))


def quantize(w, kind: str = "int8", double_quant: bool = True, block_size: int = 64, batch_dims: int = 0) -> Quantized:
    """`w` -> Quantized. `batch_dims` leading axes (e.g. stacked layers) are quantized separately."""
    if kind not in KINDS:
        raise JaxftError(f"quantization kind {kind!r}: expected one of {', '.join(KINDS)}")
    w = jnp.asarray(w)
    lead, shape = w.shape[:batch_dims], tuple(w.shape[batch_dims:])
    if kind == "int8":
        if len(shape) < 2:
            raise JaxftError(f"int8 quantization needs a kernel [in, out], got shape {shape}")
        x = w.astype(jnp.float32)
        absmax = jnp.max(jnp.abs(x), axis=-2)
        scale = jnp.where(absmax > 0, absmax / 127.0, 1.0)
        q = jnp.clip(jnp.round(x / scale[..., None, :]), -127, 127).astype(jnp.int8)
        return Quantized(q, scale, kind=kind, shape=shape, dtype=str(w.dtype), block_size=0)
    if block_size <= 0 or block_size % 2:
        raise JaxftError(f"nf4 block_size={block_size}: expected a positive even number")
    n = int(np.prod(shape))
    blocks = -(-n // block_size)
    x = w.astype(jnp.float32).reshape(lead + (n,))
    x = jnp.pad(x, [(0, 0)] * len(lead) + [(0, blocks * block_size - n)]).reshape(lead + (blocks, block_size))
    absmax = jnp.max(jnp.abs(x), axis=-1)
    scaled = x / jnp.where(absmax > 0, absmax, 1.0)[..., None]
    midpoints = jnp.asarray((NF4[1:] + NF4[:-1]) / 2)
    codes = jnp.sum(scaled[..., None] > midpoints, axis=-1).astype(jnp.uint8).reshape(lead + (-1, 2))
    packed = (codes[..., 0] << 4) | codes[..., 1]
    if not double_quant:
        return Quantized(packed, absmax, kind=kind, shape=shape, dtype=str(w.dtype), block_size=block_size)
    offset = jnp.mean(absmax, axis=-1)
    groups = -(-blocks // DOUBLE_QUANT_BLOCK)
    c = jnp.pad(absmax - offset[..., None], [(0, 0)] * len(lead) + [(0, groups * DOUBLE_QUANT_BLOCK - blocks)])
    c = c.reshape(lead + (groups, DOUBLE_QUANT_BLOCK))
    cmax = jnp.max(jnp.abs(c), axis=-1)
    scale2 = jnp.where(cmax > 0, cmax / 127.0, 1.0)
    cq = jnp.clip(jnp.round(c / scale2[..., None]), -127, 127).astype(jnp.int8).reshape(lead + (-1,))
    return Quantized(packed, cq, scale2, offset, kind=kind, shape=shape, dtype=str(w.dtype), block_size=block_size)


def nf4_absmax(q: Quantized) -> jax.Array:
    """The fp32 absmax per block (undoing the double quantization)."""
    if q.scale2 is None:
        return q.scale
    lead = q.scale.shape[:-1]
    c = q.scale.astype(jnp.float32).reshape(lead + q.scale2.shape[-1:] + (DOUBLE_QUANT_BLOCK,)) * q.scale2[..., None]
    blocks = -(-int(np.prod(q.shape)) // q.block_size)
    return c.reshape(lead + (-1,))[..., :blocks] + q.offset[..., None]


def dequantize(q: Quantized, dtype=None) -> jax.Array:
    """The float array (in `dtype`, default the original's); leading dims follow the leaves'."""
    dtype = jnp.dtype(dtype or q.dtype)
    if q.kind == "int8":
        return q.values.astype(dtype) * q.scale.astype(dtype)[..., None, :]
    lead = q.values.shape[:-1]
    codes = jnp.stack([q.values >> 4, q.values & 15], axis=-1).reshape(lead + (-1, q.block_size))
    x = jnp.asarray(NF4)[codes] * nf4_absmax(q)[..., None]
    n = int(np.prod(q.shape))
    return x.reshape(lead + (-1,))[..., :n].reshape(lead + q.shape).astype(dtype)


@jax.custom_vjp
def matmul(x, q: Quantized):
    """x @ dequantize(q) in x's dtype. The backward pass dequantizes again instead of keeping the
    dequantized kernel as a residual (which would hold the fp32 bytes the quantization saved)."""
    return jnp.dot(x, dequantize(q, x.dtype))


def _matmul_fwd(x, q):
    return matmul(x, q), q


def _matmul_bwd(q, dy):
    return jnp.dot(dy, dequantize(q, dy.dtype).T), None  # the frozen base gets no gradient


matmul.defvjp(_matmul_fwd, _matmul_bwd)


# ---------------------------------------------------------------------------------------------
# Whole parameter trees.


def _sharding(q: Quantized, kernel_sharding, batch_dims: int):
    """Shardings for the leaves of `q`, from its kernel's: int8 keeps the kernel's layout (the scale
    its output axis); NF4's flat leaves are split over every mesh axis the kernel was (FSDP of the
    packed weights), where the sizes divide."""
    from jax.sharding import NamedSharding, PartitionSpec as P

    from jaxft.sharding import _fit

    mesh = kernel_sharding.mesh
    spec = tuple(kernel_sharding.spec) + (None,) * (batch_dims + 2 - len(kernel_sharding.spec))
    lead = spec[:batch_dims]

    def named(leaf, s):
        return None if leaf is None else NamedSharding(mesh, _fit(P(*s), leaf.shape, mesh))

    if q.kind == "int8":
        return q.replace(values=named(q.values, spec), scale=named(q.scale, lead + spec[-1:]))
    axes = tuple(a for s in spec[batch_dims:] for a in ((s,) if isinstance(s, str) else (s or ())))
    flat = lead + ((axes or None),)
    return q.replace(values=named(q.values, flat), scale=named(q.scale, flat), scale2=named(q.scale2, lead + (None,)),
                     offset=named(q.offset, lead))


def quantize_params(params: dict, kind: str, double_quant: bool = True, block_size: int = 64,
                    targets: str | None = None) -> dict:
    """The decoder projections' kernels of a (frozen) tree quantized, each sharded like its kernel.
    `targets`: the family's regex of projection kernels (`Family.projections`); default `TARGETS`."""
    from jaxft.peft.partition import flat, unflat

    rx = re.compile(targets) if targets else TARGETS
    out, done = flat(params), 0
    for path, w in out.items():
        if not rx.search(path) or w.ndim < 2:
            continue
        batch_dims = w.ndim - 2
        fn = lambda x: quantize(x, kind, double_quant, block_size, batch_dims)  # noqa: E731
        shardings = None
        if hasattr(w, "sharding") and hasattr(w.sharding, "mesh"):
            shardings = _sharding(jax.eval_shape(fn, w), w.sharding, batch_dims)
        out[path] = jax.jit(fn, out_shardings=shardings)(w)
        done += 1
    if not done:
        raise JaxftError(f"model.quantization={kind!r}: no frozen projection kernel to quantize "
                         "(the method trains them all)")
    return unflat(out)


def dequantize_params(params: dict) -> dict:
    """Every Quantized leaf of a tree back to a float array."""
    return jax.tree_util.tree_map(lambda x: dequantize(x) if isinstance(x, Quantized) else x, params,
                                  is_leaf=lambda x: isinstance(x, Quantized))


def nbytes(params) -> int:
    """Bytes of a tree's leaves, quantized or not."""
    return int(sum(x.nbytes for x in jax.tree_util.tree_leaves(params)))
