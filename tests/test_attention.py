"""Every attention implementation against the xla reference (`jaxft.models.attention`).

One grid: a left-padded, a right-padded and a full row in every batch; grouped-query and multi-head
attention; with and without a sliding window; with and without P-Tuning v2 prefix columns; fp32 and bf16.
On CPU it checks the cudnn call convention through `jax.nn.dot_product_attention(implementation="xla")`
and the Pallas TPU kernels (splash, flash) in TPU interpret mode. On an NVIDIA GPU it checks the real cuDNN
kernel in bf16: `JAX_PLATFORMS=cuda python -m pytest -q tests/test_attention.py`. No torch or
transformers, so it runs anywhere.
"""

import contextlib
import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from jaxft import sharding
from jaxft.config import CHOICES, base_config, validate
from jaxft.cross_entropy import fused_cross_entropy
from jaxft.errors import JaxftError
from jaxft.models import attention as A
from jaxft.models.llama import LlamaConfig, LlamaModel
from jaxft.peft import build

BACKEND = jax.default_backend()
GPU = BACKEND == "gpu"
# The TPU kernels run natively on a TPU and in TPU interpret mode on CPU (not offered on GPUs here).
PALLAS = BACKEND in ("cpu", "tpu")
needs_gpu = pytest.mark.skipif(not GPU, reason="cuDNN flash attention needs an NVIDIA GPU")
needs_pallas = pytest.mark.skipif(not PALLAS, reason="the Pallas TPU kernels run on TPU, or interpreted on CPU")
# fp32 matmuls run as TF32 on GPUs by default, hence the looser accelerator tolerance.
TOL = {"float32": 2e-5 if BACKEND == "cpu" else 5e-3, "bfloat16": 3e-2}

GRID = [(heads, window, prefix) for heads in ((4, 2), (4, 4)) for window in (None, 5) for prefix in (0, 3)]


def case_id(case):
    (h, kv), window, prefix = case
    return f"{'gqa' if kv < h else 'mha'}-window{window or 0}-prefix{prefix}"


def inputs(dtype, heads=(4, 2), prefix=0, t=24, d=64, seed=0):
    """q [3, t, H, d]; k, v [3, prefix + t, KV, d]; mask [3, t]: left padding, right padding, none."""
    h, kv = heads
    r = np.random.RandomState(seed)
    q, k, v = r.randn(3, t, h, d), r.randn(3, prefix + t, kv, d), r.randn(3, prefix + t, kv, d)
    mask = np.ones((3, t), bool)
    mask[0, :9] = False
    mask[1, 15:] = False
    return tuple(jnp.asarray(x, dtype) for x in (q, k, v)) + (jnp.asarray(mask),)


def interpreted():
    """TPU interpret mode off a TPU; the real kernels on one."""
    return A.pallas_interpret() if BACKEND != "tpu" else contextlib.nullcontext()


def run(fn, q, k, v, mask, prefix, window):
    return jax.jit(fn, static_argnums=(4, 5))(q, k, v, mask, prefix, window)


def assert_matches(got, ref, mask, dtype):
    """Equal on real query rows; finite everywhere (padding rows may differ: nothing reads them)."""
    got, ref = np.asarray(got, np.float32), np.asarray(ref, np.float32)
    assert np.isfinite(got).all()
    real = np.asarray(mask).reshape(mask.shape + (1,) * (got.ndim - 2))
    np.testing.assert_allclose(np.where(real, got, 0), np.where(real, ref, 0), atol=TOL[dtype], rtol=TOL[dtype])


def check(fn, case, dtype):
    heads, window, prefix = case
    q, k, v, mask = inputs(dtype, heads, prefix)
    ref = run(A.xla, q, k, v, mask, prefix, window)
    assert_matches(run(fn, q, k, v, mask, prefix, window), ref, mask, dtype)


# Every heads, window, prefix and dtype value and every window x prefix pair stays in the default run:
# gqa-window5-prefix3-float32, mha-window0-prefix0-bfloat16, gqa-window0-prefix3-bfloat16, mha-window5-prefix0-float32.
# slow: the other twelve cells, each a repetition of a mask/offset/permutation path those four take.
DPA_DEFAULT = {((4, 2), 5, 3, "float32"), ((4, 4), None, 0, "bfloat16"), ((4, 2), None, 3, "bfloat16"),
               ((4, 4), 5, 0, "float32")}
DPA_CASES = [pytest.param(c, d, id=f"{case_id(c)}-{d}", marks=[] if (*c, d) in DPA_DEFAULT else [pytest.mark.slow])
             for c in GRID for d in ("float32", "bfloat16")]


@pytest.mark.parametrize("case,dtype", DPA_CASES)
def test_dot_product_attention_call_matches_xla(case, dtype):
    """The cudnn path's masks, offsets and permutations, through jax.nn's own XLA implementation."""
    check(functools.partial(A.cudnn, implementation="xla"), case, dtype)


@needs_pallas
def test_splash_caps_scores_as_xla():
    """Gemma 2's capped scores (softcap * tanh(scores / softcap)) in the splash kernel, forward and
    gradients, against the xla reference with the same cap, which the cap really changes; packed rows
    with a prefix and a cap take the reference itself."""
    q, k, v, mask = inputs("float32", GQA, 3)
    q = q * 3  # scores well past the cap
    capped = lambda fn: functools.partial(fn, softcap=2.0)  # noqa: E731
    ref = run(capped(A.xla), q, k, v, mask, 3, 5)
    assert np.abs(np.asarray(ref - run(A.xla, q, k, v, mask, 3, 5))).max() > 1e-2
    with interpreted():
        assert_matches(run(capped(A.splash), q, k, v, mask, 3, 5), ref, mask, "float32")
        got = grads(capped(A.splash), q, k, v, mask, 3, 5)
    for name, g, r in zip("qkv", got, grads(capped(A.xla), q, k, v, mask, 3, 5)):
        scale = float(np.max(np.abs(np.asarray(r))))
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), atol=TOL["float32"] * scale, rtol=TOL["float32"],
                                   err_msg=name)
    segments = jnp.asarray(np.repeat([[1, 2]], 12, axis=1).reshape(1, 24).repeat(3, 0))
    packed = A.splash(q, k, v, mask, 3, None, segments, softcap=2.0)
    np.testing.assert_array_equal(packed, A.xla(q, k, v, mask, 3, None, segments, softcap=2.0))


@needs_gpu
@pytest.mark.parametrize("case", GRID, ids=case_id)
def test_cudnn_matches_xla(case):
    check(A.cudnn, case, "bfloat16")


# Interpret mode compiles for seconds per case: each kernel gets the cases that take its different paths
# (splash: causal, offset, window, window OR prefix, one query head per kv head; flash: dummy query rows,
# repeated kv heads, the xla fallback for windows), and bf16 on the fullest one.
GQA, MHA = (4, 2), (4, 4)
PALLAS_CASES = [("splash", c, "float32")
                for c in ((GQA, None, 0), (GQA, None, 3), (GQA, 5, 0), (GQA, 5, 3), (MHA, 5, 3))]
PALLAS_CASES += [("flash", c, "float32") for c in ((GQA, None, 0), (GQA, None, 3), (MHA, None, 3), (GQA, 5, 3))]
PALLAS_CASES += [("splash", (GQA, 5, 3), "bfloat16"), ("flash", (GQA, None, 3), "bfloat16")]
# slow: splash-gqa-window5-prefix3-float32: the same case runs in bf16 here and splash's window + prefix in
# float32 through a whole model in test_model_logits_match_xla[splash-window6-prefix3].
SLOW_PALLAS = {("splash", (GQA, 5, 3), "float32")}


@needs_pallas
@pytest.mark.parametrize("kernel,case,dtype", [
    pytest.param(k, c, d, id=f"{k}-{case_id(c)}-{d}", marks=[pytest.mark.slow] if (k, c, d) in SLOW_PALLAS else [])
    for k, c, d in PALLAS_CASES])
def test_pallas_kernel_matches_xla(kernel, case, dtype):
    with interpreted():
        check(getattr(A, kernel), case, dtype)


def grads(fn, q, k, v, mask, prefix, window):
    """Gradients wrt q, k, v of a weighted sum of the real rows' outputs."""
    w = jnp.asarray(np.random.RandomState(1).randn(*q.shape), jnp.float32) * mask[:, :, None, None]
    loss = lambda q, k, v: jnp.sum(fn(q, k, v, mask, prefix, window).astype(jnp.float32) * w)  # noqa: E731
    return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)


GRAD_IMPLS = {
    "dot_product_xla": (functools.partial(A.cudnn, implementation="xla"), True),
    "cudnn": (A.cudnn, GPU),
    "splash": (A.splash, PALLAS),
    "flash": (A.flash, PALLAS),
}


@pytest.mark.parametrize("prefix", [0, 3])
@pytest.mark.parametrize("impl", list(GRAD_IMPLS))
def test_gradients_match_xla(impl, prefix):
    """Causal attention over padded rows, grouped-query, with and without prefix columns."""
    fn, available = GRAD_IMPLS[impl]
    if not available:
        pytest.skip(f"{impl} does not run on {BACKEND}")
    if impl in ("splash", "flash") and prefix == 0:
        pytest.skip("interpret mode is slow: the kernels' backward passes are checked with a prefix")
    dtype = "bfloat16" if impl == "cudnn" else "float32"
    q, k, v, mask = inputs(dtype, (4, 2), prefix)
    with interpreted() if impl in ("splash", "flash") else contextlib.nullcontext():
        got = grads(fn, q, k, v, mask, prefix, None)
    ref = grads(A.xla, q, k, v, mask, prefix, None)
    for name, g, r in zip("qkv", got, ref):
        assert np.isfinite(np.asarray(g, np.float32)).all(), name
        scale = float(np.max(np.abs(np.asarray(r, np.float32))))
        np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(r, np.float32),
                                   atol=TOL[dtype] * scale, rtol=TOL[dtype], err_msg=name)


@needs_gpu
def test_cudnn_runs_the_fused_causal_kernel():
    """cuDNN's own causal mask, not a dense one: it skips the masked half, forward and backward."""
    q, k, v, mask = inputs("bfloat16", (4, 2), 3)
    fwd = jax.jit(A.cudnn, static_argnums=(4, 5)).lower(q, k, v, mask, 3, None).as_text()
    bwd = jax.jit(lambda q: jax.grad(lambda q: A.cudnn(q, k, v, mask, 3).astype(jnp.float32).sum())(q)).lower(q)
    for text in (fwd, bwd.as_text()):
        assert "__cudnn$fmha" in text and "CAUSAL" in text


def tiny_model(attention, dtype, window, prefix=3):
    cfg = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4, num_kv_heads=2,
                      head_dim=64, sliding_window=window, dtype=dtype, attention=attention)
    if not prefix:
        return LlamaModel(cfg)
    method = base_config().method
    method.name, method.num_virtual_tokens = "ptuning_v2", prefix
    return LlamaModel(cfg, hooks=build(method, cfg).hooks)


# cudnn runs a window with a prefix as chunked, so its window case has no prefix (the kernel's own window).
# flash's model case would repeat its grid cases at interpret mode's cost: splash's covers the model path.
MODEL_CASES = [("cudnn", None, 3, "bfloat16", GPU), ("cudnn", 6, 0, "bfloat16", GPU),
               ("splash", 6, 3, "float32", PALLAS), ("chunked", 6, 3, "float32", True)]


@pytest.mark.parametrize("impl,window,prefix,dtype,available", MODEL_CASES,
                         ids=[f"{c[0]}-window{c[1] or 0}-prefix{c[2]}" for c in MODEL_CASES])
def test_model_logits_match_xla(impl, window, prefix, dtype, available, monkeypatch):
    """A whole Llama (P-Tuning v2 prefix, padded on either side): the same logits whatever the attention
    (chunked in blocks of 8 of the 24 tokens)."""
    if not available:
        pytest.skip(f"{impl} does not run on {BACKEND}")
    monkeypatch.setattr(A, "CHUNK", 8)
    ids = jnp.asarray(np.random.RandomState(0).randint(1, 64, (3, 24)))
    mask = inputs("float32")[3].astype(jnp.int32)
    ref_model = tiny_model("xla", dtype, window, prefix)
    params = nn.unbox(jax.jit(ref_model.init)(jax.random.PRNGKey(0), ids, mask)["params"])
    ref = jax.jit(ref_model.apply)({"params": params}, ids, mask)
    with interpreted() if impl in ("splash", "flash") else contextlib.nullcontext():
        got = jax.jit(tiny_model(impl, dtype, window, prefix).apply)({"params": params}, ids, mask)
    # bf16 differences go through two layers and the LM head: compare against the logits' spread.
    tol = TOL[dtype] * (1 if dtype == "float32" else float(np.std(np.asarray(ref))) * 4)
    got, ref = np.asarray(got), np.asarray(ref)
    real = np.asarray(mask, bool)[:, :, None]
    assert np.isfinite(got).all()
    np.testing.assert_allclose(np.where(real, got, 0), np.where(real, ref, 0), atol=tol, rtol=TOL[dtype])


@needs_pallas
@pytest.mark.parametrize("axes", ["auto", "explicit"])
def test_splash_per_shard_under_a_mesh(axes):
    """Under `jax.set_mesh` the kernel runs per shard (batch over data/fsdp, heads over tensor): on
    jaxft's mesh (automatic axes) and on one with explicit axes (`jax.make_mesh`'s default)."""
    if len(jax.devices()) < 8:
        pytest.skip("needs 8 devices")
    mesh_cfg = {"data": 2, "fsdp": 2, "tensor": 2}
    mesh = sharding.make_mesh(mesh_cfg) if axes == "auto" else jax.make_mesh((2, 2, 1, 2), sharding.MESH_AXES)
    q, k, v, mask = inputs("float32", (4, 2), 3)
    q, k, v, mask = (jnp.concatenate([x, x[:1]]) for x in (q, k, v, mask))  # 4 rows: over data x fsdp
    put = lambda x: jax.device_put(x, NamedSharding(mesh, PartitionSpec(sharding.BATCH_AXES)))  # noqa: E731
    ref = run(A.xla, q, k, v, mask, 3, None)
    with interpreted(), jax.set_mesh(mesh):
        fn = jax.jit(A.splash, static_argnums=(4, 5))
        args = tuple(map(put, (q, k, v, mask)))
        assert "shard_map" in str(jax.make_jaxpr(fn, static_argnums=(4, 5))(*args, 3, None))
        got = fn(*args, 3, None)
    assert_matches(got, ref, mask, "float32")


def dot_generals(jaxpr):
    """Every dot_general of a jaxpr, inside scans, custom_vjps and pjits too."""
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            yield eqn
        for param in eqn.params.values():
            for sub in param if isinstance(param, (list, tuple)) else (param,):
                sub = getattr(sub, "jaxpr", sub)
                if hasattr(sub, "eqns"):
                    yield from dot_generals(sub)


def test_scores_and_logits_accumulate_in_fp32():
    """In bf16, attention scores and every logit come out of their matmuls in fp32, not rounded to bf16."""
    q, k, v, mask = inputs("bfloat16", (4, 2), 3)
    dots = list(dot_generals(jax.make_jaxpr(lambda *a: A.xla(*a, 3, None))(q, k, v, mask).jaxpr))
    assert dots and all(e.params["preferred_element_type"] == jnp.float32 for e in dots)

    ids = jnp.ones((2, 8), jnp.int32)
    for kw in ({}, {"tie_word_embeddings": True}, {"head": "classification", "num_labels": 3}):
        cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=1, num_heads=2,
                          num_kv_heads=2, dtype="bfloat16", **kw)
        model = LlamaModel(cfg)
        params = jax.eval_shape(lambda: nn.unbox(model.init(jax.random.PRNGKey(0), ids)["params"]))
        jaxpr = jax.make_jaxpr(lambda p: model.apply({"params": p}, ids))(params).jaxpr
        width = cfg.num_labels if cfg.head == "classification" else cfg.vocab_size
        heads = [e for e in dot_generals(jaxpr) if e.outvars[0].aval.shape[-1] == width]
        assert heads and all(e.outvars[0].aval.dtype == jnp.float32 for e in heads), kw

    hidden, emb = jnp.ones((2, 8, 32), jnp.bfloat16), jnp.ones((64, 32), jnp.float32)
    targets, weights = jnp.ones((2, 8), jnp.int32), jnp.ones((2, 8))
    jaxpr = jax.make_jaxpr(lambda h, e: fused_cross_entropy(h, e, targets, weights, jnp.bfloat16))(hidden, emb).jaxpr
    logits = [e for e in dot_generals(jaxpr) if e.outvars[0].aval.shape[-1] == 64]
    assert logits and all(e.outvars[0].aval.dtype == jnp.float32 for e in logits)


def test_choice_and_errors():
    """`auto` picks what the backend runs; a choice it cannot run is a one-line error naming it."""
    assert CHOICES["model.attention"] == A.CHOICES
    assert A.resolve("auto", jnp.float32, 64) in (("splash",) if BACKEND == "tpu" else ("xla",))
    assert A.resolve("auto", jnp.bfloat16, 64) == {"gpu": "cudnn", "tpu": "splash"}.get(BACKEND, "xla")
    with pytest.raises(JaxftError, match="model.attention='cudnn'.*float32"):
        A.resolve("cudnn", jnp.float32, 64)
    if BACKEND != "tpu":
        for kernel in ("splash", "flash"):
            with pytest.raises(JaxftError, match=f"model.attention='{kernel}'.*{BACKEND}"):
                A.resolve(kernel, jnp.bfloat16, 64)
    if not GPU:
        with pytest.raises(JaxftError, match=f"model.attention='cudnn'.*{BACKEND}"):
            A.resolve("cudnn", jnp.bfloat16, 64)
    # capped scores (Gemma 2): auto leaves cuDNN for xla on a GPU; cudnn and flash, asked for, are an error
    assert A.resolve("auto", jnp.bfloat16, 64, backend="gpu") == "cudnn"
    assert A.resolve("auto", jnp.bfloat16, 64, backend="gpu", softcap=50.0) == "chunked"
    assert A.resolve("auto", jnp.float32, 64, backend="gpu") == "chunked"
    assert A.resolve("auto", jnp.bfloat16, 64, backend="tpu", softcap=50.0) == "splash"
    for kernel in ("cudnn", "flash"):
        with pytest.raises(JaxftError, match=f"model.attention='{kernel}' does not cap attention scores"):
            A.resolve(kernel, jnp.bfloat16, 64, backend={"cudnn": "gpu", "flash": "tpu"}[kernel], softcap=50.0)
    config = base_config()
    assert config.model.attention == "auto"
    config.model.attention = "fast"
    with pytest.raises(JaxftError, match="model.attention='fast'"):
        validate(config)


# Bidirectional attention (encoders such as BERT): padding and prefix columns only.
BIDIRECTIONAL = {
    "dot_product_xla": (functools.partial(A.cudnn, implementation="xla"), True),
    "cudnn": (A.cudnn, GPU),
    "splash": (A.splash, PALLAS),
    "flash": (A.flash, PALLAS),
}


def numpy_bidirectional(q, k, v, mask, prefix):
    """Plain numpy: every real query sees the prefix columns and every real key."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    b, t, h, d = q.shape
    k, v = np.repeat(k, h // k.shape[2], axis=2), np.repeat(v, h // v.shape[2], axis=2)
    seen = np.concatenate([np.ones((b, prefix), bool), np.asarray(mask)], axis=1)  # [B, P+T]
    s = np.einsum("bthd,bshd->bhts", q, k) / np.sqrt(d)
    s = np.where(seen[:, None, None, :], s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("bhts,bshd->bthd", p, v)


# slow: [gqa-0] and [mha-3]: each heads layout and each prefix stays in [gqa-3] and [mha-0].
@pytest.mark.parametrize("heads,prefix", [pytest.param((4, 2), 0, id="gqa-0", marks=pytest.mark.slow),
                                          pytest.param((4, 2), 3, id="gqa-3"), pytest.param((4, 4), 0, id="mha-0"),
                                          pytest.param((4, 4), 3, id="mha-3", marks=pytest.mark.slow)])
def test_bidirectional_xla_matches_numpy(heads, prefix):
    q, k, v, mask = inputs("float32", heads, prefix)
    got = A.xla(q, k, v, mask, prefix, None, causal=False)
    ref = numpy_bidirectional(q, k, v, mask, prefix)
    assert_matches(got, ref, mask, "float32")
    causal = A.xla(q, k, v, mask, prefix, None)
    assert not np.allclose(np.asarray(causal), ref, atol=1e-3)  # the flag changes what a row sees


# slow: [splash-0] (splash's non-causal path forward and backward in [splash-3], with no prefix through the
# kernel in [flash-0]) and [flash-3] (flash's in [flash-0], a prefix in [splash-3]); every implementation and
# each prefix stays in the default run.
SLOW_BIDIRECTIONAL = {("splash", 0), ("flash", 3)}


@pytest.mark.parametrize("impl,prefix", [
    pytest.param(i, p, id=f"{i}-{p}", marks=[pytest.mark.slow] if (i, p) in SLOW_BIDIRECTIONAL else [])
    for i in BIDIRECTIONAL for p in (0, 3)])
def test_bidirectional_matches_xla(impl, prefix):
    """Each implementation's non-causal path, forward and gradients, against the xla reference."""
    fn, available = BIDIRECTIONAL[impl]
    if not available:
        pytest.skip(f"{impl} does not run on {BACKEND}")
    dtype = "bfloat16" if impl == "cudnn" else "float32"
    q, k, v, mask = inputs(dtype, (4, 2), prefix)
    bi = lambda f: lambda q, k, v, m, p, w: f(q, k, v, m, p, w, causal=False)  # noqa: E731
    ref = run(bi(A.xla), q, k, v, mask, prefix, None)
    with interpreted() if impl in ("splash", "flash") else contextlib.nullcontext():
        assert_matches(run(bi(fn), q, k, v, mask, prefix, None), ref, mask, dtype)
        got = grads(bi(fn), q, k, v, mask, prefix, None)
    for name, g, r in zip("qkv", got, grads(bi(A.xla), q, k, v, mask, prefix, None)):
        scale = float(np.max(np.abs(np.asarray(r, np.float32))))
        np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(r, np.float32),
                                   atol=TOL[dtype] * scale, rtol=TOL[dtype], err_msg=name)


@needs_gpu
def test_cudnn_runs_the_fused_bidirectional_kernel():
    """The encoder path is cuDNN's fused kernel too (key lengths, no dense mask), forward and backward."""
    q, k, v, mask = inputs("bfloat16", (4, 2), 3)
    bi = lambda q: A.cudnn(q, k, v, mask, 3, causal=False)  # noqa: E731
    fwd = jax.jit(bi).lower(q).as_text()
    bwd = jax.jit(lambda q: jax.grad(lambda q: bi(q).astype(jnp.float32).sum())(q)).lower(q).as_text()
    for text in (fwd, bwd):
        assert "__cudnn$fmha" in text


@pytest.mark.parametrize("impl,available", [("cudnn", GPU), ("splash", PALLAS)])
def test_encoder_logits_match_xla(impl, available):
    """A whole BERT classifier with a P-Tuning v2 prefix over right-padded rows: the same logits whatever
    the attention (cuDNN in bf16 on a GPU, splash interpreted on CPU)."""
    from jaxft.models.bert import BertConfig, BertModel

    if not available:
        pytest.skip(f"{impl} does not run on {BACKEND}")
    dtype = "bfloat16" if impl == "cudnn" else "float32"
    ids = jnp.asarray(np.random.RandomState(0).randint(1, 64, (3, 24)))
    mask = inputs("float32")[3].astype(jnp.int32)[:, ::-1]  # right padding, as BERT batches are
    method = base_config().method
    method.name, method.num_virtual_tokens = "ptuning_v2", 3

    def model(attention):
        cfg = BertConfig(vocab_size=64, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4,
                         max_position_embeddings=32, head="token_classification", num_labels=5, dtype=dtype,
                         attention=attention)
        return BertModel(cfg, hooks=build(method, cfg).hooks)

    ref_model = model("xla")
    params = nn.unbox(jax.jit(ref_model.init)(jax.random.PRNGKey(0), ids, mask)["params"])
    ref = np.asarray(jax.jit(ref_model.apply)({"params": params}, ids, mask))
    with interpreted() if impl == "splash" else contextlib.nullcontext():
        got = np.asarray(jax.jit(model(impl).apply)({"params": params}, ids, mask))
    tol = TOL[dtype] * (1 if dtype == "float32" else float(np.std(ref)) * 4)
    real = np.asarray(mask, bool)[:, :, None]
    assert np.isfinite(got).all()
    np.testing.assert_allclose(np.where(real, got, 0), np.where(real, ref, 0), atol=tol, rtol=TOL[dtype])


def test_the_run_names_the_attention_it_takes(monkeypatch):
    """`family.attention_impl` (what jaxft.train prints at start-up): `auto` on a GPU in bf16 is cuDNN, but
    chunked for packed rows and in fp32, and XLA's einsum for T5 (its position bias); on this CPU, XLA."""
    from jaxft.models import family
    from jaxft.models.t5 import T5Config

    llama = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=96, num_layers=1, num_heads=4,
                        num_kv_heads=2, dtype="bfloat16", attention="auto")
    t5 = T5Config(vocab_size=64, d_model=64, d_kv=16, d_ff=96, num_layers=1, num_decoder_layers=1, num_heads=4,
                  dtype="bfloat16", attention="auto")
    assert family.attention_impl(llama, False) == family.attention_impl(t5, False) == "xla"
    monkeypatch.setattr(A.jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(A, "_cudnn_head_dim", lambda d, local=True: True)
    assert family.attention_impl(llama, False) == "cudnn"
    assert family.attention_impl(llama, True) == "chunked"
    assert family.attention_impl(t5, False) == "xla"
    assert family.attention_impl(llama.replace(dtype="float32"), False) == "chunked"


CHUNKED_CASES = [(window, prefix, packed) for window in (None, 5) for prefix in (0, 3) for packed in (False, True)]


@pytest.mark.parametrize("window,prefix,packed", CHUNKED_CASES,
                         ids=[f"window{w or 0}-prefix{p}-{'packed' if k else 'rows'}" for w, p, k in CHUNKED_CASES])
def test_chunked_matches_xla(window, prefix, packed):
    """24 queries in blocks of 8, each over only the keys it can see: the xla reference's outputs and
    gradients, causal (capped scores on packed rows) and, without a window, bidirectional; grouped-query."""
    q, k, v, mask = inputs("float32", GQA, prefix)
    segments = jnp.asarray(np.repeat([[1, 2, 3]], 8, axis=1).reshape(1, 24).repeat(3, 0)) if packed else None
    softcap = 2.0 if packed else None
    for causal in (True, False) if not window else (True,):
        kw = dict(segments=segments, causal=causal, softcap=softcap)
        ref_fn = lambda q, k, v, m, p, w: A.xla(q, k, v, m, p, w, **kw)  # noqa: E731
        fn = lambda q, k, v, m, p, w: A.chunked(q, k, v, m, p, w, block=8, **kw)  # noqa: E731
        assert_matches(run(fn, q, k, v, mask, prefix, window), run(ref_fn, q, k, v, mask, prefix, window), mask,
                       "float32")
        for name, g, r in zip("qkv", grads(fn, q, k, v, mask, prefix, window),
                              grads(ref_fn, q, k, v, mask, prefix, window)):
            scale = float(np.max(np.abs(np.asarray(r))))
            np.testing.assert_allclose(np.asarray(g), np.asarray(r), atol=TOL["float32"] * scale,
                                       rtol=TOL["float32"], err_msg=f"{name} causal={causal}")


@pytest.mark.parametrize("window", [None, 5])
def test_chunked_reads_only_what_a_block_can_see(window):
    """Blocks of 8 queries (`lax.map`) score the 3 prefix columns and, with a window of 5, the 8 + 5 - 1 keys
    their queries reach; without one, the 3 blocks run as GROUPS = 2 groups (one `lax.map` each) of 2 and 1
    blocks, each over the keys up to its last query: 16 and 24."""
    q, k, v, mask = inputs("float32", GQA, 3)
    jaxpr = jax.make_jaxpr(lambda q, k, v: A.chunked(q, k, v, mask, 3, window, block=8))(q, k, v).jaxpr
    scored = [e.outvars[0].aval.shape for e in dot_generals(jaxpr) if 64 not in e.outvars[0].aval.shape]  # not P V
    b, h = q.shape[0], q.shape[2]
    assert A.GROUPS == 2
    columns = [8 + window - 1] if window else [16, 24]
    assert [int(np.prod(s)) for s in scored] == [b * h * 8 * (3 + c) for c in columns], scored


def test_chunked_holds_no_full_scores():
    """A 2,048-token row: chunked's forward and backward need a fraction of xla's temporary memory (XLA's own
    figure), which holds fp32 [T, T] scores and probabilities per head (807 MB; chunked 182 MB in blocks of
    512, 108 MB in blocks of 256). Also inside a layer's remat policy, as the model runs it (output named):
    remat none keeps every dot, and once kept every block's scores through their checkpoints (445 MB)."""
    from jaxft.models.layers import remat_policy

    q, k, v, mask = inputs("float32", GQA, 0, t=2048, d=16)

    def temp(fn, policy=None):
        out = lambda q, k, v: A.checkpoint_name(fn(q, k, v, mask, 0, None), A.ATTENTION)  # noqa: E731
        if policy:
            out = jax.checkpoint(out, policy=remat_policy(policy))
        grad = jax.jit(jax.grad(lambda q, k, v: jnp.sum(out(q, k, v) ** 2), argnums=(0, 1, 2)))
        return grad.lower(q, k, v).compile().memory_analysis().temp_size_in_bytes

    xla = temp(A.xla)
    got = {policy: temp(A.chunked, policy) for policy in (None, "none", "full", "save_dots")}
    assert all(v < xla / 3 for v in got.values()), (xla, got)


def test_chunked_gradients_under_each_remat_policy(monkeypatch):
    """A whole Llama (prefix, window, padding; blocks of 8 of 24 tokens) under each remat policy: chunked's
    custom VJP (which keeps a layer's policy away from its blocks) gives xla's loss and gradients."""
    monkeypatch.setattr(A, "CHUNK", 8)
    ids = jnp.asarray(np.random.RandomState(0).randint(1, 64, (3, 24)))
    mask = inputs("float32")[3].astype(jnp.int32)
    reference = tiny_model("xla", "float32", 6)
    params = nn.unbox(jax.jit(reference.init)(jax.random.PRNGKey(0), ids, mask)["params"])

    def grads(model):
        loss = lambda p: jnp.sum(model.apply({"params": p}, ids, mask) ** 2 * mask[..., None])  # noqa: E731
        return jax.jit(jax.value_and_grad(loss))(params)

    want = grads(reference)
    for remat in ("none", "full", "save_dots"):
        model = tiny_model("chunked", "float32", 6)
        got = grads(LlamaModel(dataclasses.replace(model.cfg, remat=remat), hooks=model.hooks))
        np.testing.assert_allclose(got[0], want[0], rtol=2e-5)
        for g, r in zip(jax.tree_util.tree_leaves(got[1]), jax.tree_util.tree_leaves(want[1])):
            np.testing.assert_allclose(g, r, rtol=2e-4, atol=2e-5 * float(np.max(np.abs(r))))


def test_chunked_under_a_mesh_matches_one_device(monkeypatch):
    """A whole Llama with chunked attention (blocks of 8 of 24 tokens, two groups) on a 2 x 2 x 2 mesh (batch
    over data and fsdp, heads over tensor): the logits and gradients of one device."""
    if len(jax.devices()) < 8:
        pytest.skip("needs 8 devices")
    monkeypatch.setattr(A, "CHUNK", 8)
    ids = jnp.asarray(np.random.RandomState(0).randint(1, 64, (4, 24)))
    mask = jnp.concatenate([inputs("float32")[3], inputs("float32")[3][:1]]).astype(jnp.int32)
    model = tiny_model("chunked", "float32", None, prefix=0)
    params = nn.unbox(jax.jit(model.init)(jax.random.PRNGKey(0), ids, mask)["params"])
    loss = lambda p, ids, mask: jnp.sum(model.apply({"params": p}, ids, mask) ** 2 * mask[..., None])  # noqa: E731
    ref = jax.jit(jax.value_and_grad(loss))(params, ids, mask)
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    put = lambda x: jax.device_put(x, NamedSharding(mesh, PartitionSpec(sharding.BATCH_AXES)))  # noqa: E731
    with sharding.axis_rules(mesh):
        got = jax.jit(jax.value_and_grad(loss))(params, put(ids), put(mask))
    np.testing.assert_allclose(got[0], ref[0], rtol=2e-5)
    for g, r in zip(jax.tree_util.tree_leaves(got[1]), jax.tree_util.tree_leaves(ref[1])):
        np.testing.assert_allclose(g, r, rtol=2e-4, atol=2e-5 * float(np.max(np.abs(r))))
