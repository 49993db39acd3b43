"""Attention behind one call: the XLA einsum reference and the fused kernels, picked by `model.attention`.

`xla`: einsum scores accumulated in fp32 and a dense mask; the reference, and what CPUs run.
`chunked`: xla's arithmetic a block of queries at a time over the keys each block may see (what a window
leaves behind and half of causality's masked half skipped), its scores recomputed in the backward pass: no
[T, T] tensor is kept.
`cudnn`: flash attention through `jax.nn.dot_product_attention` on NVIDIA GPUs (bf16/fp16).
`splash`, `flash`: the Pallas TPU kernels (`jax.experimental.pallas.ops.tpu`).
`auto`: cudnn on a GPU computing in bf16/fp16 (chunked where cuDNN cannot: fp32, capped scores, packed
rows), splash on a TPU, xla otherwise.

Every implementation gets the same structured mask, not a dense one: the [B, T] padding mask, the number
P of prefix key/value columns in front of the keys (P-Tuning v2), the sliding window, whether it is
causal and, for packed rows, the [B, T] segment ids (1, 2, ... per example, 0 for padding). Query i
sees key column c when c < P and P + i - c < window (the prefix holds positions 0..P-1 and the tokens,
in packed rows each example's, follow it, as in transformers with PEFT's prefix as the cache: far rows'
windows leave it), or c = P + j with token j real, j <= i, i - j < window and j in i's segment. Without
causality (encoders: BERT) query i sees every prefix column and every real token of its segment; there
is no window then. The fused kernels build this from their own causal masks and skip the masked tiles;
rows of padding queries are finite but may differ between implementations (nothing downstream reads
them).

Packed rows (segment ids), exact with every implementation: xla folds them into its dense mask; splash
and flash take them as their own segment ids; with a prefix as well (which segment ids would hide from
all examples but one) splash attends over the tokens and merges a dense [T, P] prefix softmax by
log-sum-exp (`_merge_prefix`), flash takes the mask as its dense bias; cudnn (JAX's call has no segment
ids) takes the mask as a boolean mask, one row at a time, with its causal tiles still skipped
(`_cudnn_packed`). `auto` takes chunked (xla's arithmetic) for packed rows on a GPU (the cuDNN packed path
is not timed yet).

Capped scores (Gemma 2's `attn_logit_softcapping`: softcap * tanh(scores / softcap) before the mask): xla,
chunked, the cache's path and splash (the kernel's own `attn_logits_soft_cap`) compute them; cuDNN's call
and the flash kernel cannot, so `auto` takes chunked on a GPU and asking for either is an error.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name
from jax.sharding import PartitionSpec

from jaxft.cross_entropy import softcap as cap
from jaxft.errors import JaxftError
from jaxft.sharding import TENSOR_AXIS, batch_axes_dividing, shard_map_over

ATTENTION = "attention"  # names attention's inputs and output, which remat "none" keeps (`layers.keep_products`)

IMPLEMENTATIONS = ("xla", "chunked", "cudnn", "splash", "flash")
CHOICES = ("auto",) + IMPLEMENTATIONS
CHUNK = 512  # `chunked`: queries per block
GROUPS = 2  # `chunked`, causal without a window: groups of query blocks, each reading the keys up to its end
BLOCK = 128  # the Pallas TPU kernels' tile along both sequence axes: lengths are padded to a multiple
_INTERPRET = contextvars.ContextVar("jaxft_pallas_interpret", default=False)


def attention(q, k, v, mask, num_prefix: int = 0, window: int | None = None, dtype=jnp.float32, impl: str = "xla",
              segment_ids=None, causal: bool = True, softcap: float | None = None):
    """q [B, T, H, D]; k, v [B, P+T, KV, D] with the P prefix columns first; mask [B, T] (1 = real token);
    segment_ids [B, T] or None (packed rows: attention stays within each example) -> [B, T, H*D] in
    `dtype`. H may be a multiple of KV (grouped-query attention). `causal=False`: bidirectional
    (padding and prefix only), for encoders. `softcap` (Gemma 2): scores -> softcap * tanh(scores /
    softcap) before the mask; xla and splash take it."""
    b, t, h, d = q.shape
    impl = resolve(impl, dtype, d, packed=segment_ids is not None, num_prefix=num_prefix, softcap=softcap)
    q, k, v = (checkpoint_name(x.astype(dtype), ATTENTION) for x in (q, k, v))  # kept by remat "none"
    kw = {} if causal else {"causal": False}  # the decoder path calls the implementations as it always did
    if softcap:
        kw["softcap"] = softcap
    if not causal:
        window = None
    if segment_ids is None:
        out = IMPLS[impl](q, k, v, mask.astype(bool), num_prefix, window or None, **kw)
    else:  # padding is segment 0 whatever the ids say
        segments = jnp.where(mask.astype(bool), segment_ids.astype(jnp.int32), 0)
        out = IMPLS[impl](q, k, v, mask.astype(bool), num_prefix, window or None, segments=segments, **kw)
    return checkpoint_name(out.reshape(b, t, h * d), ATTENTION)


def resolve(impl: str, dtype, head_dim: int, packed: bool = False, num_prefix: int = 0, backend: str | None = None,
            softcap: float | None = None) -> str:
    """`model.attention` -> the implementation this backend runs. One it cannot run is an error, never a
    silent fallback; `auto` picks the fastest it can. `packed`: rows hold several examples (segment ids).
    `backend`: another backend than this machine's (`jaxft.plan --platform`). `softcap`: capped scores
    (Gemma 2), which cuDNN's and flash's kernels do not compute."""
    local = jax.default_backend()
    backend, half = backend or local, jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
    if impl == "auto":  # packed rows on a GPU: chunked (cuDNN's packed path, a per-row mask, is not timed yet)
        if backend == "gpu":
            fits = half and _cudnn_head_dim(head_dim, backend == local)
            return "cudnn" if fits and not packed and not softcap else "chunked"
        return "splash" if backend == "tpu" else "xla"
    if impl not in IMPLEMENTATIONS:
        raise JaxftError(f"model.attention={impl!r}: expected one of {', '.join(map(repr, CHOICES))}")
    if softcap and impl in ("cudnn", "flash"):
        raise JaxftError(f"model.attention={impl!r} does not cap attention scores (this model's attn_logit_softcapping="
                         f"{softcap}): use xla, chunked, splash (TPU) or auto")
    if impl == "cudnn" and not (backend == "gpu" and half):
        raise JaxftError(
            f"model.attention='cudnn' needs an NVIDIA GPU and model.dtype=bfloat16 (cuDNN flash attention): "
            f"this run has backend {backend!r} and dtype {jnp.dtype(dtype).name}"
        )
    if impl in ("splash", "flash") and backend != "tpu" and not _INTERPRET.get():
        raise JaxftError(f"model.attention={impl!r} is a Pallas TPU kernel: this run's backend is {backend!r}")
    return impl


def _cudnn_head_dim(d: int, local: bool = True) -> bool:
    """cuDNN's flash attention takes head dims that are multiples of 8, up to 256 from Hopper on, else 128
    (`local`: this machine's GPU; else a Hopper one is assumed)."""
    cc = tuple(int(x) for x in getattr(jax.local_devices()[0], "compute_capability", "0.0").split(".")) \
        if local else (9, 0)
    return d % 8 == 0 and d <= (256 if cc >= (9, 0) else 128)


def interpreting() -> bool:
    """Whether `pallas_interpret` is on."""
    return _INTERPRET.get()


@contextlib.contextmanager
def pallas_interpret():
    """Run the Pallas TPU kernels (splash, flash) in TPU interpret mode on any backend: slow, for tests."""
    from jax.experimental.pallas import tpu as pltpu

    token = _INTERPRET.set(True)
    try:
        with pltpu.force_tpu_interpret_mode():
            yield
    finally:
        _INTERPRET.reset(token)


def causal_mask(mask, num_prefix: int, sliding_window: int | None, segments=None, causal: bool = True,
                rows=None, cols=None):
    """[B, T] padding mask -> [B, T, P+T] boolean: causal, padding, window, same segment (where
    `segments` [B, T] is given); prefix columns at positions 0..P-1, inside the window as the tokens
    after them. `causal=False`: no causality (every real
    token sees every real token of its segment). `rows`, `cols`: only those queries and token columns
    (index arrays)."""
    t = mask.shape[1]
    rows = jnp.arange(t) if rows is None else rows
    cols = jnp.arange(t) if cols is None else cols
    i, j = rows[:, None], cols[None, :]
    allowed = j <= i if causal else jnp.ones((rows.shape[0], cols.shape[0]), bool)
    if sliding_window:
        allowed &= i - j < sliding_window
    full = allowed[None] & mask[:, None, cols].astype(bool)
    if segments is not None:
        full &= segments[:, rows, None] == segments[:, None, cols]
    if num_prefix:
        seen = prefix_seen(mask.shape[0], t, num_prefix, sliding_window, segments, rows)
        full = jnp.concatenate([seen, full], axis=-1)
    return full


def prefix_seen(b: int, t: int, num_prefix: int, window: int | None, segments=None, rows=None):
    """[B, T, P]: which prefix columns each query (of `rows`, an index array) sees. The prefix holds positions
    0..P-1 and each example's tokens follow it (packed rows: from its segment's start), so a window leaves
    it behind."""
    rows = jnp.arange(t) if rows is None else rows
    pos = jnp.broadcast_to(rows, (b, rows.shape[0]))
    if not window:
        return jnp.ones(pos.shape + (num_prefix,), bool)
    if segments is not None:  # from the segment's start
        pos = pos - jnp.argmax(segments[:, None, :] == segments[:, rows, None], axis=-1)
    return num_prefix + pos[..., None] - jnp.arange(num_prefix) < window


def xla(q, k, v, mask, num_prefix: int = 0, window: int | None = None, segments=None, causal: bool = True,
        softcap: float | None = None):
    """The reference: scores accumulated in fp32 (not rounded to bf16 first), a dense [B, T, P+T] mask,
    softmax in fp32. q [B, T, H, D], k, v [B, P+T, KV, D] -> [B, T, H, D]."""
    return _attend(q, k, v, causal_mask(mask, num_prefix, window, segments, causal), softcap)


def _attend(q, k, v, allowed, softcap=None):
    """q [B, t, H, D] over k, v [B, s, KV, D] where `allowed` [B, t, s]: xla's arithmetic."""
    b, t, h, d = q.shape
    kv = k.shape[2]
    q = q.reshape(b, t, kv, h // kv, d)
    scores = cap(jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32) / math.sqrt(d), softcap)
    scores = jnp.where(allowed[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v, preferred_element_type=jnp.float32)
    return out.reshape(b, t, h, d).astype(v.dtype)


def chunked(q, k, v, mask, num_prefix: int = 0, window: int | None = None, segments=None, causal: bool = True,
            softcap: float | None = None, block: int | None = None):
    """xla's arithmetic `block` queries at a time (CHUNK by default), one block after another (`lax.map`),
    each block's scores recomputed in its backward pass (`jax.checkpoint`): the most a layer holds is one
    block's [block, P + keys] scores (or one per group, below), never [T, T]. Each block reads the prefix and
    only the keys it may see: with a sliding window the block + window - 1 its queries reach; without one,
    causally, the blocks run in up to GROUPS groups (one `lax.map` each), a group reading the keys up to its
    last query, so part of the masked half of causal attention is never scored (half of it with 2 groups;
    more groups skip more but may run side by side, each holding its block's scores).
    For what the fused kernels cannot do on a GPU (capped scores, packed rows, fp32) and for long rows on any
    backend. Exact as xla is, but for the rows of padding queries (which nothing reads)."""
    block = block or CHUNK
    if mask.shape[1] <= block:
        return xla(q, k, v, mask, num_prefix, window, segments, causal, softcap)
    return _chunked(q, k, v, mask, segments, num_prefix, window, causal, softcap, block)


def chunk_groups(t: int, block: int, causal: bool = True, window: int | None = None) -> list[tuple[int, int, int]]:
    """`chunked`'s groups of query blocks for rows of `t` tokens: (first block, end block, token keys each of
    its blocks reads). Also what `jaxft.plan` counts a layer's blocks by."""
    n = -(-t // block)
    if causal and window:
        return [(0, n, min(t, block + window - 1))]
    if causal:
        per = -(-n // min(GROUPS, n))
        return [(a, min(a + per, n), min(t, min(a + per, n) * block)) for a in range(0, n, per)]
    return [(0, n, t)]


def _blocks(q, k, v, mask, segments, p, window, causal, softcap, block):
    """`chunked`'s blocks, each recomputed in the backward pass by its own `jax.checkpoint`."""
    b, t = mask.shape
    n = -(-t // block)
    qs = jnp.pad(q, [(0, 0), (0, n * block - t), (0, 0), (0, 0)])  # whole blocks; the padding rows are dropped
    tokens = k[:, p:], v[:, p:]

    def attend(i, span):  # query block i over the `span` token keys that end with its reach
        lo = jnp.clip(i * block + block - span, 0, t - span)  # the first key the block's first query reaches
        rows, cols = i * block + jnp.arange(block), lo + jnp.arange(span)
        keys, values = (jnp.concatenate([x[:, :p], jax.lax.dynamic_slice_in_dim(y, lo, span, axis=1)], axis=1)
                        for x, y in zip((k, v), tokens))
        allowed = causal_mask(mask, p, window, segments, causal, jnp.minimum(rows, t - 1), cols)
        return _attend(jax.lax.dynamic_slice_in_dim(qs, i * block, block, axis=1), keys, values, allowed, softcap)

    out = jnp.concatenate([jax.lax.map(jax.checkpoint(functools.partial(attend, span=span)), jnp.arange(a, z))
                           for a, z, span in chunk_groups(t, block, causal, window)])  # [n, B, block, H, D]
    return jnp.moveaxis(out, 0, 1).reshape((b, n * block) + q.shape[2:])[:, :t]


# A custom VJP around the blocks, for their checkpoints to hold: an enclosing layer's remat policy overrides a
# nested `jax.checkpoint`'s, and remat "none" (`layers.keep_products`, which keeps dots) kept every block's
# scores (0.75 of an fp32 [H, T, T] per layer, causal; 2,048 tokens: 715 MB for a 4-layer step, now 211 MB).
# The backward pass differentiates the blocks afresh, outside any policy: each block's scores are recomputed
# there, one block at a time.
_chunked = jax.custom_vjp(_blocks, nondiff_argnums=(5, 6, 7, 8, 9))


def _chunked_forward(q, k, v, mask, segments, *static):
    return _blocks(q, k, v, mask, segments, *static), (q, k, v, mask, segments)


def _chunked_backward(*args):
    *static, (q, k, v, mask, segments), grad = args
    _, vjp = jax.vjp(lambda q, k, v: _blocks(q, k, v, mask, segments, *static), q, k, v)
    return vjp(grad) + (None, None)  # no gradient for the mask and the segment ids


_chunked.defvjp(_chunked_forward, _chunked_backward)


def cudnn(q, k, v, mask, num_prefix: int = 0, window: int | None = None, implementation: str = "cudnn",
          causal: bool = True, segments=None):
    """cuDNN flash attention through `jax.nn.dot_product_attention`, with its plain causal mask (top-left,
    tiles above the diagonal skipped) and window: no dense mask, no sequence lengths.
    `implementation="xla"` runs the same call on any backend (the tests' CPU check).

    - Each row's real tokens move to the front, in order (a permutation, undone on the output): padding
      ends up after every real token, where the causal mask already hides it from real queries. Exact for
      any padding mask without a window, and with one for left or right padding (index gaps are kept).
    - P prefix columns get P dummy query rows in front, so queries and keys have one length and the
      causal mask lets row P+i see the whole prefix and the tokens up to i; the dummies are dropped.
    - A window with prefix columns is not expressible: moving real tokens to the front moves them nearer
      the prefix, and a dense bias has no batched gradient in cuDNN. That combination runs `chunked` (the
      xla reference's arithmetic a block of queries at a time).
    - An odd total length gets one zero row and column at the end: JAX's cuDNN call refuses odd lengths
      when it is differentiated (seen on an H200, jax 0.11.2), and the causal mask hides the extra key
      from every earlier row.
    - Not causal (encoders): the same permutation, no dummy rows, and the kernel's key lengths (P plus the
      row's real tokens) hide the padding that now sits at the end of the keys.
    - Packed rows (`segments`): see `_cudnn_packed`.
    """
    if segments is not None:
        return _cudnn_packed(q, k, v, mask, segments, num_prefix, window, implementation, causal)
    if not causal:
        return _cudnn_bidirectional(q, k, v, mask, num_prefix, implementation)
    if window and num_prefix:
        return chunked(q, k, v, mask, num_prefix, window)
    b, t, h, d = q.shape
    p = num_prefix
    order = jnp.argsort(1 - mask.astype(jnp.int32), axis=1, stable=True).astype(jnp.int32)
    inverse = jnp.argsort(order, axis=1).astype(jnp.int32)
    rows = lambda x: _permute(x, order, inverse)  # noqa: E731
    q = _prepend(jnp.zeros((b, p, h, d), q.dtype), rows(q))
    k, v = (_prepend(x[:, :p], rows(x[:, p:])) for x in (k, v))
    even = (p + t) + (p + t) % 2
    q, k, v = (_pad(x, even) for x in (q, k, v))
    out = jax.nn.dot_product_attention(
        q, k, v, is_causal=True, local_window_size=(window - 1, 0) if window else None, implementation=implementation
    )
    return _permute(out[:, p : p + t], inverse, order)


def _cudnn_packed(q, k, v, mask, segments, p, window, implementation, causal):
    """Packed rows through cuDNN: JAX's call has no segment ids, so the structured mask goes in as a boolean
    mask (a bias to cuDNN) over the P dummy query rows + T queries, while the kernel's own causal mask (and
    window, without a prefix) still skips the tiles above the diagonal. cuDNN takes a bias gradient only
    for a batch of one (jax issue 30593), so the rows go through one at a time (`lax.map`). Query rows
    that are no real token (dummies, padding, the even-length row) also see their own column: no row is
    empty."""
    b, t, h, d = q.shape
    allowed = causal_mask(mask, p, window, segments, causal)  # [B, T, P+T]
    lead = p if causal else 0  # causal: P dummy query rows in front, as without packing
    nq = lead + t + (lead + t) % 2
    nk = (p + nq - lead) + (p + nq - lead) % 2  # every query row has its own column
    q = _pad(_prepend(jnp.zeros((b, lead, h, d), q.dtype), q), nq)
    k, v = _pad(k, nk), _pad(v, nk)
    full = jnp.zeros((b, nq, nk), bool).at[:, lead : lead + t, : p + t].set(allowed)
    real = jnp.zeros((b, nq), bool).at[:, lead : lead + t].set(mask.astype(bool))
    own = jnp.arange(nk)[None, None, :] == jnp.arange(nq)[None, :, None] + (p - lead)
    full |= own & ~real[:, :, None]
    kernel_window = (window - 1, 0) if window and not p else None

    def one_row(x):
        q, k, v, m = (a[None] for a in x)
        return jax.nn.dot_product_attention(q, k, v, mask=m[:, None], is_causal=causal,
                                            local_window_size=kernel_window, implementation=implementation)[0]

    out = jax.lax.map(one_row, (q, k, v, full))
    return out[:, lead : lead + t]


def _cudnn_bidirectional(q, k, v, mask, p, implementation):
    b, t, h, d = q.shape
    order = jnp.argsort(1 - mask.astype(jnp.int32), axis=1, stable=True).astype(jnp.int32)
    inverse = jnp.argsort(order, axis=1).astype(jnp.int32)
    q = _permute(q, order, inverse)
    k, v = (_prepend(x[:, :p], _permute(x[:, p:], order, inverse)) for x in (k, v))
    q = _pad(q, t + t % 2)
    k, v = (_pad(x, (p + t) + (p + t) % 2) for x in (k, v))
    lengths = (p + mask.astype(jnp.int32).sum(axis=1)).astype(jnp.int32)
    out = jax.nn.dot_product_attention(q, k, v, key_value_seq_lengths=lengths, implementation=implementation)
    return _permute(out[:, :t], inverse, order)


def _prepend(head, x):
    return jnp.concatenate([head, x], axis=1) if head.shape[1] else x


@jax.custom_vjp
def _permute(x, order, inverse):
    """x[b, order[b]] along axis 1. Its gradient is the inverse permutation: a gather, not a scatter."""
    return jnp.take_along_axis(x, order.reshape(order.shape + (1,) * (x.ndim - 2)), axis=1)


_permute.defvjp(
    lambda x, order, inverse: (_permute(x, order, inverse), (order, inverse)),
    lambda res, g: (_permute(g, res[1], res[0]), None, None),
)


def splash(q, k, v, mask, num_prefix: int = 0, window: int | None = None, segments=None, causal: bool = True,
           softcap: float | None = None):
    """Pallas TPU splash attention. Its static masks are block-sparse (fully masked tiles are skipped):
    causal with the prefix as an offset, `CausalMask(offset=P)`, or a `LocalMask` window (offset P too, so
    far rows leave the prefix), or (not causal) a `FullMask`; padding is segment ids (1 real, 0 padding),
    or the packed rows' own segment ids (0 padding). No dense mask is built. The kernel caps scores
    itself (`softcap`); packed rows with a prefix and a cap run `chunked` (the xla reference's arithmetic in
    blocks: the merge's exact log-sum-exp gradient assumes uncapped scores)."""
    if segments is not None:
        if num_prefix and softcap:
            return chunked(q, k, v, mask, num_prefix, window, segments, causal, softcap)
        mask = segments  # 0 = padding already
        if num_prefix:  # the kernel's segment ids would hide the prefix from every example but one
            fn = functools.partial(_merge_prefix, _splash_packed(window, causal), num_prefix=num_prefix,
                                   window=window)
            return _on_shards(fn, q, k, v, mask)
    fn = functools.partial(_splash, num_prefix=num_prefix, window=window, causal=causal, softcap=softcap)
    return _on_shards(fn, q, k, v, mask)


def _splash_packed(window, causal):
    """The token part of packed rows for `_merge_prefix`: splash over the tokens alone with the rows' own
    segment ids, as its output (differentiable) and its row log-sum-exps (forward only)."""
    def token_part(q, k, v, segments, residuals=False):
        return _splash(q, k, v, segments, 0, window, causal, residuals=residuals)
    return token_part


def _merge_prefix(token_part, q, k, v, segments, num_prefix, window=None):
    """Packed rows with P prefix columns that every example sees, exactly, from a kernel that keeps
    attention within segments: the kernel attends over the tokens (its segment ids and causal tiles as
    without a prefix), the P prefix columns are a small dense [T, P] softmax here, and the two merge by
    their log-sum-exps, o = (e^l_t o_t + e^l_p o_p) / (e^l_t + e^l_p). The kernel's log-sum-exp has no
    gradient of its own, so it gets its exact one from two kernel outputs: d l_t / d q_i = s * sum_j p_ij
    k_j (the kernel with the keys as values: `kbar`), and d l_t / d k_j = s * sum_i c_i p_ij q_i (the same
    call's gradient wrt those values). `token_part(q, k, v, segments, residuals)` -> [B, T, H, D], or
    with residuals the row log-sum-exps [B, T, H] of the scaled scores. With a window, prefix columns it
    leaves get the lowest finite score: their weight after the merge is exactly zero."""
    b, t, h, d = q.shape
    kv, p, scale = k.shape[2], num_prefix, 1 / math.sqrt(d)
    sg = jax.lax.stop_gradient
    kp, vp, kt, vt = k[:, :p], v[:, :p], k[:, p:], v[:, p:]
    out_t = token_part(q, kt, vt, segments)
    lse_t = sg(token_part(sg(q), sg(kt), sg(vt), segments, residuals=True)).astype(jnp.float32)
    kbar = token_part(sg(q), sg(kt), kt, segments).astype(jnp.float32)  # keys as values: only they get gradients
    q32 = q.astype(jnp.float32)
    lse_t = lse_t + scale * (jnp.sum((q32 - sg(q32)) * sg(kbar), -1) + jnp.sum(sg(q32) * (kbar - sg(kbar)), -1))
    groups = q.reshape(b, t, kv, h // kv, d)
    scores = jnp.einsum("btkgd,bskd->btkgs", groups, kp, preferred_element_type=jnp.float32) * scale
    if window:
        seen = prefix_seen(b, t, p, window, segments)[:, :, None, None, :]
        scores = jnp.where(seen, scores, jnp.finfo(jnp.float32).min)
    lse_p = jax.nn.logsumexp(scores, axis=-1).reshape(b, t, h)
    out_p = jnp.einsum("btkgs,bskd->btkgd", jax.nn.softmax(scores, -1).astype(vp.dtype), vp,
                       preferred_element_type=jnp.float32).reshape(b, t, h, d)
    total = jnp.logaddexp(lse_t, lse_p)
    out = jnp.exp(lse_t - total)[..., None] * out_t.astype(jnp.float32) + jnp.exp(lse_p - total)[..., None] * out_p
    return out.astype(q.dtype)


def _splash(q, k, v, mask, num_prefix, window, causal=True, residuals=False, softcap=None):
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    b, t, h, d = q.shape
    kv, p = k.shape[2], num_prefix
    tq, s = _round(t), _round(p + _round(t))  # queries and keys padded at the end to whole tiles
    q = _pad(q * jnp.asarray(1 / math.sqrt(d), q.dtype), tq)  # the kernel does not scale the scores
    k, v = _pad(k, s), _pad(v, s)
    # Padding queries (segment 0) see padding keys up to themselves, never an empty row; the columns
    # added past P + tq are beyond every row's causal reach.
    seg_q = _pad(mask.astype(jnp.int32), tq)
    seg_kv = _pad(jnp.concatenate([jnp.ones((b, p), jnp.int32), mask.astype(jnp.int32)], axis=1), s)
    if not causal:  # segment ids alone: real rows see the prefix and the real tokens
        m = sm.FullMask((tq, s))
    elif window:
        m = sm.LocalMask((tq, s), (window - 1, 0), offset=p)  # far rows' windows leave the prefix
    else:
        m = sm.CausalMask((tq, s), offset=p)
    kernel = sk.make_splash_mqa_single_device(sm.MultiHeadMask([m] * (h // kv)), save_residuals=residuals,
                                              attn_logits_soft_cap=softcap)
    heads = lambda x, n: x.transpose(0, 2, 1, 3).reshape((b, kv, n) + x.shape[1:2] + (d,))  # noqa: E731
    per_kv_head = _vmap(lambda q, k, v, seg: kernel(q, k, v, seg), broadcast_last=True)
    k, v = heads(k, 1)[:, :, 0], heads(v, 1)[:, :, 0]
    out = _vmap(per_kv_head)(heads(q, h // kv), k, v, sk.SegmentIds(seg_q, seg_kv))
    if residuals:  # the rows' log-sum-exps [B, KV, H/KV, tq] of the scaled scores -> [B, T, H]
        return out[1][0].reshape(b, h, tq).transpose(0, 2, 1)[:, :t]
    return out.reshape(b, h, tq, d).transpose(0, 2, 1, 3)[:, :t]


def flash(q, k, v, mask, num_prefix: int = 0, window: int | None = None, segments=None, causal: bool = True):
    """Pallas TPU flash attention (the older kernel; splash is the one `auto` picks). Its causal mask is
    top-left, so P prefix columns get P dummy query rows in front; padding is segment ids (not causal:
    the segment ids alone). It takes equal head counts: grouped keys and values are repeated per query
    head. It has no window: with one, this runs `chunked` (the xla reference's arithmetic in blocks)."""
    if window:
        return chunked(q, k, v, mask, num_prefix, window, segments, causal)
    if segments is not None:
        mask = segments  # its segment ids: 0 = padding
        if num_prefix:  # segment ids would hide the prefix from all examples but one: a bias instead
            return _on_shards(functools.partial(_flash_biased, num_prefix=num_prefix, causal=causal), q, k, v, mask)
    return _on_shards(functools.partial(_flash, num_prefix=num_prefix, causal=causal), q, k, v, mask)


def _flash_biased(q, k, v, segments, num_prefix, causal=True):
    """Packed rows with a prefix: the structured mask as the kernel's dense bias `ab` [B, H, S, S] (flash
    takes one; splash does not), over the dummy-row layout of `_flash`, its causal tiles still skipped.
    Rows that are no real token see their own column."""
    from jax.experimental.pallas.ops.tpu import flash_attention as fa

    b, t, h, d = q.shape
    p, s = num_prefix, _round(num_prefix + t)
    real = segments > 0
    allowed = causal_mask(real, p, None, segments, causal)
    full = jnp.zeros((b, s, s), bool).at[:, p : p + t, : p + t].set(allowed)
    rows = jnp.zeros((b, s), bool).at[:, p : p + t].set(real)
    full |= jnp.eye(s, dtype=bool)[None] & ~rows[:, :, None]
    bias = jnp.broadcast_to(jnp.where(full, 0.0, -1e30).astype(jnp.float32)[:, None], (b, h, s, s))
    q = _pad(_prepend(jnp.zeros((b, p, h, d), q.dtype), q), s)
    k, v = (_pad(jnp.repeat(x, h // x.shape[2], axis=2), s) for x in (k, v))
    heads_first = lambda x: x.transpose(0, 2, 1, 3)  # noqa: E731
    out = fa.flash_attention(heads_first(q), heads_first(k), heads_first(v), ab=bias, causal=causal,
                             sm_scale=1 / math.sqrt(d))
    return heads_first(out)[:, p : p + t]


def _flash(q, k, v, mask, num_prefix, causal=True):
    from jax.experimental.pallas.ops.tpu import flash_attention as fa

    b, t, h, d = q.shape
    p, s = num_prefix, _round(num_prefix + t)
    q = _pad(_prepend(jnp.zeros((b, p, h, d), q.dtype), q), s)
    k, v = (_pad(jnp.repeat(x, h // x.shape[2], axis=2), s) for x in (k, v))
    # Dummy rows see prefix columns up to themselves; padding rows see padding keys up to themselves.
    seg = _pad(jnp.concatenate([jnp.ones((b, p), jnp.int32), mask.astype(jnp.int32)], axis=1), s)
    heads_first = lambda x: x.transpose(0, 2, 1, 3)  # noqa: E731
    out = fa.flash_attention(
        heads_first(q), heads_first(k), heads_first(v), segment_ids=fa.SegmentIds(seg, seg), causal=causal,
        sm_scale=1 / math.sqrt(d),
    )
    return heads_first(out)[:, p : p + t]


def _vmap(fn, broadcast_last: bool = False):
    """vmap over the leading axis of every argument (but the last, if `broadcast_last`). In interpret mode a
    loop instead: TPU interpret mode does not take a kernel whose grid vmap has extended."""
    if not _INTERPRET.get():
        return jax.vmap(fn, in_axes=(0,) * 3 + (None if broadcast_last else 0,))
    if broadcast_last:
        return lambda *xs: jax.lax.map(lambda a: fn(*a, xs[-1]), xs[:-1])
    return lambda *xs: jax.lax.map(lambda a: fn(*a), xs)


def _round(n: int) -> int:
    return -(-n // BLOCK) * BLOCK


def _pad(x, length: int):
    """Zeros at the end of axis 1 up to `length`."""
    return jnp.pad(x, [(0, 0), (0, length - x.shape[1])] + [(0, 0)] * (x.ndim - 2))


def _on_shards(fn, q, k, v, mask):
    """A Pallas kernel sees one device's arrays: under a mesh (`jax.set_mesh`), run `fn` per shard with
    the batch over the data axes and heads over the tensor axis where they divide; else as it is."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return fn(q, k, v, mask)
    batch = batch_axes_dividing(mesh, q.shape[0])
    heads = TENSOR_AXIS if TENSOR_AXIS in mesh.axis_names and k.shape[2] % mesh.shape[TENSOR_AXIS] == 0 else None
    spec = PartitionSpec(tuple(batch) or None, None, heads, None)
    specs = (spec, spec, spec, PartitionSpec(spec[0], None))
    return shard_map_over(fn, mesh, (q, k, v, mask), specs, spec, check_vma=False)


def cached(q, keys, values, mask, cache_index, prefix=None, window: int | None = None, softcap: float | None = None):
    """Attention of t new queries over a KV cache (generation), the xla reference's arithmetic.

    q [B, t, H, D] at cache slots [cache_index, cache_index + t); keys, values [B, S, KV, D] (the new
    ones already written); mask [B, S] over all slots. Query i sees slot j iff j <= cache_index + i,
    mask[j], and cache_index + i - j < window. `prefix` (keys, values [B, P, KV, D]) holds positions
    0..P-1 in front of the slots (visible while P + cache_index + i - c < window): its scores join the
    cache's before the softmax, so the cache is never copied to put it in front.
    -> [B, t, H*D] in the values' dtype."""
    b, t, h, d = q.shape
    kv, s = keys.shape[2], keys.shape[1]
    q = q.astype(keys.dtype).reshape(b, t, kv, h // kv, d)
    scores = cap(jnp.einsum("btkgd,bskd->bkgts", q, keys, preferred_element_type=jnp.float32) / math.sqrt(d), softcap)
    i, j = cache_index + jnp.arange(t)[:, None], jnp.arange(s)[None, :]
    allowed = j <= i
    if window:
        allowed &= i - j < window
    allowed = allowed[None] & mask[:, None, :].astype(bool)
    scores = jnp.where(allowed[:, None, None], scores, jnp.finfo(jnp.float32).min)
    p = 0
    if prefix is not None:
        p = prefix[0].shape[1]
        pk = prefix[0].astype(keys.dtype)
        prefix_scores = cap(jnp.einsum("btkgd,bskd->bkgts", q, pk, preferred_element_type=jnp.float32) / math.sqrt(d),
                            softcap)
        if window:
            seen = p + i[:, :1] - jnp.arange(p)[None, :] < window
            prefix_scores = jnp.where(seen, prefix_scores, jnp.finfo(jnp.float32).min)
        scores = jnp.concatenate([prefix_scores, scores], axis=-1)
    probs = jax.nn.softmax(scores, axis=-1).astype(values.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs[..., p:], values, preferred_element_type=jnp.float32)
    if prefix is not None:
        pv = prefix[1].astype(values.dtype)
        out = out + jnp.einsum("bkgts,bskd->btkgd", probs[..., :p], pv, preferred_element_type=jnp.float32)
    return out.reshape(b, t, h * d).astype(values.dtype)


IMPLS = {"xla": xla, "chunked": chunked, "cudnn": cudnn, "splash": splash, "flash": flash}
