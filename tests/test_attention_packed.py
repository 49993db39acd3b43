"""Packed rows (several examples per row, segment ids) through every attention implementation, against
the xla reference: attention never crosses examples, with padding, grouped-query heads, a sliding window
and P-Tuning v2 prefix columns (which every example sees). On CPU: the cudnn path's masks and layout
through `jax.nn.dot_product_attention(implementation="xla")`, the Pallas TPU kernels in interpret mode.
The reference itself is checked against plain numpy, example by example."""

import contextlib
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxft.models import attention as A
from test_attention import GPU, PALLAS, TOL, assert_matches, interpreted

# Three packed rows of 24: uneven examples then padding; one example filling the row; many short ones
# (a single-token one among them) then padding.
LENGTHS = [(7, 9, 5), (24,), (3, 1, 4, 6, 2)]


def packed(heads=(4, 2), prefix=0, t=24, d=64, dtype="float32", seed=0):
    h, kv = heads
    r = np.random.RandomState(seed)
    q, k, v = r.randn(3, t, h, d), r.randn(3, prefix + t, kv, d), r.randn(3, prefix + t, kv, d)
    segments = np.zeros((3, t), np.int32)
    for row, lengths in enumerate(LENGTHS):
        start = 0
        for n, length in enumerate(lengths, 1):
            segments[row, start : start + length] = n
            start += length
    mask = segments > 0
    return tuple(jnp.asarray(x, dtype) for x in (q, k, v)) + (jnp.asarray(mask), jnp.asarray(segments))


def numpy_packed(q, k, v, segments, prefix, window, causal):
    """Each example alone: its queries see the prefix and its own tokens (up to themselves, in the window,
    the prefix at positions 0..P-1 in front of the example's)."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    b, t, h, d = q.shape
    k, v = np.repeat(k, h // k.shape[2], axis=2), np.repeat(v, h // v.shape[2], axis=2)
    seg = np.asarray(segments)
    out = np.zeros_like(q)
    for i in range(b):
        for j in range(t):
            if not seg[i, j]:
                continue
            cols = [c for c in range(t) if seg[i, c] == seg[i, j] and (not causal or c <= j)
                    and (not window or j - c < window)]
            start = int(np.argmax(seg[i] == seg[i, j]))  # the prefix: positions 0..P-1 before each example
            seen = [c for c in range(prefix) if not window or prefix + j - start - c < window]
            keys = seen + [prefix + c for c in cols]
            s = np.einsum("hd,khd->hk", q[i, j], k[i, keys]) / np.sqrt(d)
            p = np.exp(s - s.max(-1, keepdims=True))
            p /= p.sum(-1, keepdims=True)
            out[i, j] = np.einsum("hk,khd->hd", p, v[i, keys])
    return out


def call(fn, causal=True):
    return jax.jit(lambda q, k, v, m, s, p, w: fn(q, k, v, m, p, w, segments=s, causal=causal), static_argnums=(5, 6))


def grads(fn, q, k, v, mask, segments, prefix, window, causal=True):
    w = jnp.asarray(np.random.RandomState(1).randn(*q.shape), jnp.float32) * mask[:, :, None, None]
    loss = lambda q, k, v: jnp.sum(fn(q, k, v, mask, prefix, window, segments=segments, causal=causal)  # noqa: E731
                                   .astype(jnp.float32) * w)
    return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)


def assert_grads_match(got, ref, dtype="float32"):
    for name, g, r in zip("qkv", got, ref):
        g, r = np.asarray(g, np.float32), np.asarray(r, np.float32)
        assert np.isfinite(g).all(), name
        scale = float(np.max(np.abs(r)))
        np.testing.assert_allclose(g, r, atol=TOL[dtype] * scale, rtol=TOL[dtype], err_msg=name)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
@pytest.mark.parametrize("window,prefix", [(None, 0), (None, 3), (5, 3)])
def test_xla_reference_keeps_examples_apart(window, prefix, causal):
    if window and not causal:
        pytest.skip("encoders have no window")
    q, k, v, mask, seg = packed(prefix=prefix)
    got = call(A.xla, causal)(q, k, v, mask, seg, prefix, window)
    assert_matches(got, numpy_packed(q, k, v, seg, prefix, window, causal), mask, "float32")


# Grouped and not, window and not, prefix and not: each once (a per-row `lax.map` compiles for seconds).
CUDNN_GRID = [((4, 2), None, 0), ((4, 2), 5, 0), ((4, 4), None, 3), ((4, 2), 5, 3)]


@pytest.mark.parametrize("case", CUDNN_GRID, ids=lambda c: f"{'gqa' if c[0][1] < c[0][0] else 'mha'}-w{c[1] or 0}-p{c[2]}")
def test_dot_product_attention_call_matches_xla(case):
    """The cudnn path's per-row mask and dummy rows, through jax.nn's own XLA implementation."""
    heads, window, prefix = case
    fn = functools.partial(A.cudnn, implementation="xla")
    q, k, v, mask, seg = packed(heads, prefix)
    ref = call(A.xla)(q, k, v, mask, seg, prefix, window)
    assert_matches(call(fn)(q, k, v, mask, seg, prefix, window), ref, mask, "float32")
    if case == ((4, 2), 5, 3):
        assert_grads_match(grads(fn, q, k, v, mask, seg, prefix, window), grads(A.xla, q, k, v, mask, seg, prefix, window))


def test_dot_product_attention_bidirectional_packed():
    fn, prefix = functools.partial(A.cudnn, implementation="xla"), 3
    q, k, v, mask, seg = packed(prefix=prefix, t=23)  # odd: the even-length rows
    ref = call(A.xla, False)(q, k, v, mask, seg, prefix, None)
    assert_matches(call(fn, False)(q, k, v, mask, seg, prefix, None), ref, mask, "float32")


@pytest.mark.skipif(not GPU, reason="cuDNN flash attention needs an NVIDIA GPU")
@pytest.mark.parametrize("prefix", [0, 3])
def test_cudnn_packed_matches_xla(prefix):
    q, k, v, mask, seg = packed(prefix=prefix, dtype="bfloat16")
    ref = call(A.xla)(q, k, v, mask, seg, prefix, None)
    assert_matches(call(A.cudnn)(q, k, v, mask, seg, prefix, None), ref, mask, "bfloat16")
    assert_grads_match(grads(A.cudnn, q, k, v, mask, seg, prefix, None),
                       grads(A.xla, q, k, v, mask, seg, prefix, None), "bfloat16")


# Interpret mode compiles for seconds per case: each kernel's new packed path (with a prefix: splash's
# log-sum-exp merge, flash's bias), causal forward and backward, bidirectional forward. Segment ids
# without a prefix, the kernels' own, are checked in tests/test_sft.py.
GQA, MHA = (4, 2), (4, 4)
PALLAS_CASES = [("splash", GQA, 5, 3, True), ("splash", MHA, None, 3, False), ("flash", GQA, None, 3, True),
                ("flash", MHA, None, 3, False)]


@pytest.mark.skipif(not PALLAS, reason="the Pallas TPU kernels run on TPU, or interpreted on CPU")
@pytest.mark.parametrize("kernel,heads,window,prefix,causal", PALLAS_CASES,
                         ids=[f"{c[0]}-{'gqa' if c[1] == GQA else 'mha'}-w{c[2] or 0}-p{c[3]}-{'causal' if c[4] else 'bi'}"
                              for c in PALLAS_CASES])
def test_pallas_kernel_packed_matches_xla(kernel, heads, window, prefix, causal):
    fn = getattr(A, kernel)
    q, k, v, mask, seg = packed(heads, prefix)
    ref = call(A.xla, causal)(q, k, v, mask, seg, prefix, window)
    with interpreted():
        got = call(fn, causal)(q, k, v, mask, seg, prefix, window)
        g = grads(fn, q, k, v, mask, seg, prefix, window, causal) if causal else None
    assert_matches(got, ref, mask, "float32")
    if g is not None:
        assert_grads_match(g, grads(A.xla, q, k, v, mask, seg, prefix, window, causal))


def test_every_implementation_is_offered_packed_rows():
    """No implementation refuses packed rows (with or without a prefix); `auto` takes chunked for them on GPUs."""
    for impl in ("xla", "chunked", "splash", "flash") if not GPU else ("xla", "chunked", "cudnn"):
        ctx = interpreted() if impl in ("splash", "flash") else contextlib.nullcontext()
        with ctx:
            assert A.resolve(impl, jnp.bfloat16 if impl == "cudnn" else jnp.float32, 64, packed=True,
                             num_prefix=3) == impl
    assert A.resolve("auto", jnp.bfloat16, 64, packed=True, num_prefix=3) == {"tpu": "splash", "gpu": "chunked"}.get(
        jax.default_backend(), "xla")
