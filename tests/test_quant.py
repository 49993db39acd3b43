"""int8 and NF4 quantization (jaxft.quant) against references written from their definitions,
bitsandbytes where it is installed, and the model and training loop over quantized bases."""

from statistics import NormalDist

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxft import quant
from jaxft.errors import JaxftError

# bitsandbytes' published NF4 table (bitsandbytes/functional.py, also QLoRA's appendix), for comparison.
BNB_NF4 = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
           -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
           0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
           0.7229568362236023, 1.0]


def paper_nf4():
    """QLoRA, section 3: q_i = Q_X(p_i) for N(0, 1), 2^(k-1) quantiles for the positive half and
    2^(k-1) - 1 for the negative one from the outermost probability delta to 1/2, the two zeros merged,
    normalised to [-1, 1]; delta is the mean of 1 - 1/(2*15) and 1 - 1/(2*16)."""
    delta = ((1 - 1 / (2 * 15)) + (1 - 1 / (2 * 16))) / 2
    q = NormalDist().inv_cdf
    pos = [q(delta + (0.5 - delta) * i / 8) for i in range(8)]
    neg = [-q(delta + (0.5 - delta) * i / 7) for i in range(7)]
    v = np.sort(np.array(pos + neg + [0.0]))
    return (v / v.max()).astype(np.float32)


def test_nf4_levels_match_paper_and_bitsandbytes_table():
    ref = paper_nf4()
    np.testing.assert_array_equal(quant.NF4, ref)
    assert quant.NF4[7] == 0.0 and len(set(quant.NF4.tolist())) == 16
    np.testing.assert_allclose(quant.NF4, np.float32(BNB_NF4), rtol=0, atol=2e-7)  # within 2 float32 ulps


@pytest.mark.parametrize("absmax", [1.0, 0.0371])
def test_single_level_dequantization_is_exact(absmax):
    """A block holding each level once (times absmax), plus +-absmax: every value comes back bit for bit."""
    ref = paper_nf4()
    codes = np.concatenate([np.arange(16), np.arange(16)[::-1], np.arange(32) % 16])
    w = ref[codes] * np.float32(absmax)
    q = quant.quantize(w.reshape(8, 8), "nf4", double_quant=False)
    assert q.values.dtype == jnp.uint8 and q.values.shape == (32,)
    np.testing.assert_array_equal(np.asarray(q.values), (codes[0::2] << 4) | codes[1::2])
    np.testing.assert_array_equal(np.asarray(quant.dequantize(q)).reshape(-1), ref[codes] * np.float32(absmax))


def test_packing_two_codes_per_byte_high_nibble_first():
    ref = paper_nf4()
    codes = np.arange(64) % 16
    q = quant.quantize(ref[codes].reshape(4, 16), "nf4", double_quant=False)
    np.testing.assert_array_equal(np.asarray(q.values), (codes[0::2] << 4) | codes[1::2])


def error_bound(w, block=64):
    """Half the widest gap between NF4 levels, times each block's absmax."""
    flat = np.pad(w.reshape(-1), (0, -w.size % block)).reshape(-1, block)
    bound = np.broadcast_to(np.abs(flat).max(1, keepdims=True) * np.diff(paper_nf4()).max() / 2, flat.shape)
    return bound.reshape(-1)[: w.size].reshape(w.shape)


@pytest.mark.parametrize("shape", [(256, 384), (33, 47), (5, 7)])  # 47*33 is not a multiple of 64 or 256*64
@pytest.mark.parametrize("double_quant", [False, True])
def test_nf4_round_trip_error_bounds_and_odd_sizes(shape, double_quant):
    w = np.random.RandomState(0).standard_normal(shape).astype(np.float32) * 0.02
    q = quant.quantize(w, "nf4", double_quant=double_quant)
    out = np.asarray(quant.dequantize(q))
    assert out.shape == shape and out.dtype == np.float32
    err = np.abs(out - w)
    slack = 1.02 if double_quant else 1.0 + 1e-6  # the 8-bit absmax moves each block's scale by < 1/127
    assert (err <= error_bound(w) * slack + 1e-9).all()
    assert err.mean() < 0.1 * np.abs(w).mean()  # NF4 on normal weights: about 7% mean relative error


def test_int8_round_trip_per_output_channel():
    w = np.random.RandomState(1).standard_normal((48, 24)).astype(np.float32)
    w[:, 3] *= 100  # one loud output channel must not blur the others
    q = quant.quantize(w, "int8")
    assert q.values.dtype == jnp.int8 and q.scale.shape == (24,)
    out = np.asarray(quant.dequantize(q))
    step = np.abs(w).max(0) / 127
    assert (np.abs(out - w) <= step / 2 * (1 + 1e-6)).all()
    np.testing.assert_array_equal(np.asarray(q.values), np.round(w / step).astype(np.int8))


def test_byte_counts():
    w = np.random.RandomState(2).standard_normal((1024, 768)).astype(np.float32)
    nf4, nf4_fp32_absmax, int8 = (quant.quantize(w, "nf4"), quant.quantize(w, "nf4", double_quant=False),
                                  quant.quantize(w, "int8"))
    assert nf4.nbytes <= 0.16 * w.nbytes
    assert nf4.nbytes < nf4_fp32_absmax.nbytes <= 0.15 * w.nbytes
    assert int8.nbytes <= 0.27 * w.nbytes


def test_leading_dims_quantize_each_matrix_alone():
    """Stacked (scanned) layers: quantizing [L, in, out] equals quantizing each [in, out]."""
    w = np.random.RandomState(3).standard_normal((3, 40, 24)).astype(np.float32)
    for kind in quant.KINDS:
        stacked = quant.dequantize(quant.quantize(w, kind, batch_dims=1))
        for i in range(3):
            alone = quant.dequantize(quant.quantize(w[i], kind))
            np.testing.assert_array_equal(np.asarray(stacked[i]), np.asarray(alone))


def test_bad_arguments_are_errors():
    with pytest.raises(JaxftError, match="kind 'fp4'"):
        quant.quantize(np.ones((4, 4)), "fp4")
    with pytest.raises(JaxftError, match="block_size=63"):
        quant.quantize(np.ones((4, 4)), "nf4", block_size=63)


def test_codes_and_absmax_match_bitsandbytes():
    """Where bitsandbytes runs (its CPU backend does 4-bit), its packed codes and fp32 absmax are ours."""
    F = pytest.importorskip("bitsandbytes.functional")
    import torch

    w = np.random.RandomState(4).standard_normal((96, 200)).astype(np.float32)
    packed, state = F.quantize_4bit(torch.tensor(w), blocksize=64, quant_type="nf4", compress_statistics=False)
    q = quant.quantize(w, "nf4", double_quant=False)
    np.testing.assert_array_equal(packed.numpy().reshape(-1), np.asarray(q.values))
    np.testing.assert_array_equal(state.absmax.numpy(), np.asarray(q.scale))


# ---------------------------------------------------------------------------------------------
# Quantized bases in the model: the bundled pretrained jaxft-tiny with LoRA on every projection.

ALL_LINEAR = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"


@pytest.fixture(scope="module")
def tiny_lora():
    import flax.linen as nn

    from jaxft import hf
    from jaxft.config import base_config
    from jaxft.models.llama import LlamaModel
    from jaxft.peft import build
    from jaxft.peft.partition import added_params, flat, unflat

    model, base = hf.load("jaxft-tiny")
    m = base_config().method
    m.name, m.targets = "lora", ALL_LINEAR
    model = LlamaModel(model.cfg, hooks=build(m, model.cfg).hooks)
    fresh = nn.unbox(model.init(jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32))["params"])
    lora = unflat({k: 0.05 * jax.random.normal(jax.random.PRNGKey(i), v.shape)
                   for i, (k, v) in enumerate(flat(added_params(fresh)).items())})
    ids = np.random.RandomState(0).randint(4, 4096, (4, 24))
    return model, base, lora, ids


def test_quantized_base_through_linear_and_lora(tiny_lora):
    """The model over a quantized tree equals the model over its dequantized copy, LoRA included,
    for logits and LoRA gradients; the quantized logits stay near fp32's."""
    from jaxft.peft.partition import flat, merge

    model, base, lora, ids = tiny_lora
    mask = np.ones_like(ids)
    run = jax.jit(lambda lo, b: model.apply({"params": merge(lo, b)}, ids, mask))
    exact = run(lora, base)
    errors = {}
    for kind in quant.KINDS:
        q = quant.quantize_params(base, kind)
        quantized = [k for k, v in flat(q).items() if isinstance(v, quant.Quantized)]
        assert len(quantized) == 7 and all(k.startswith("layers/") for k in quantized)  # not embeddings or norms
        deq = quant.dequantize_params(q)
        np.testing.assert_allclose(run(lora, q), run(lora, deq), rtol=1e-5, atol=1e-5)
        nll = lambda lo, b: -jnp.mean(jnp.take_along_axis(  # noqa: E731
            jax.nn.log_softmax(run(lo, b)[:, :-1]), ids[:, 1:, None], axis=-1))
        grad = jax.jit(jax.grad(nll))
        for a, b in zip(jax.tree_util.tree_leaves(grad(lora, q)), jax.tree_util.tree_leaves(grad(lora, deq))):
            assert jnp.linalg.norm(a - b) <= 1e-4 * jnp.linalg.norm(b)
        assert not np.allclose(run(lora, q), run(jax.tree_util.tree_map(jnp.zeros_like, lora), q))  # LoRA acts
        errors[kind] = float(jnp.linalg.norm(run(lora, q) - exact) / jnp.linalg.norm(exact))
    assert 0 < errors["int8"] < errors["nf4"] < 0.1, errors


def test_fsdp_sharded_nf4_base(tiny_lora):
    """On 8 devices with FSDP the packed leaves are split over `fsdp` and the logits are unchanged."""
    from jax.sharding import NamedSharding, PartitionSpec as P

    from jaxft import sharding
    from jaxft.peft.partition import flat, merge, unflat

    model, base, lora, ids = tiny_lora
    mesh = sharding.make_mesh({"data": 1, "fsdp": 8, "tensor": 1})
    spec = {"layers/self_attn/q_proj/kernel": P(None, "fsdp", None)}
    sharded = {k: jax.device_put(v, NamedSharding(mesh, spec.get(k, P()))) for k, v in flat(base).items()}
    q = quant.quantize_params(unflat(sharded), "nf4")
    qp = flat(q)["layers/self_attn/q_proj/kernel"]
    assert qp.values.sharding.spec == P(None, "fsdp") and qp.scale.sharding.spec == P(None, "fsdp")
    assert qp.values.addressable_shards[0].data.size == qp.values.size // 8
    mask = np.ones_like(ids)
    run = jax.jit(lambda lo, b: model.apply({"params": merge(lo, b)}, ids, mask))
    np.testing.assert_allclose(run(lora, q), run(lora, quant.quantize_params(base, "nf4")), rtol=1e-5, atol=1e-5)


def test_export_of_quantized_base_is_dequantized(tiny_lora, tmp_path):
    from jaxft import hf
    from jaxft.peft.partition import flat

    model, base, _, _ = tiny_lora
    q = quant.quantize_params(base, "nf4")
    hf.save(model, q, str(tmp_path))
    _, loaded = hf.load(str(tmp_path))
    want = flat(quant.dequantize_params(q))
    for k, v in flat(loaded).items():
        np.testing.assert_array_equal(v, want[k])


# ---------------------------------------------------------------------------------------------
# Through the CLI: NF4 base + LoRA on every projection, 1 vs 8 devices, resume, export.

QLORA = ("--config.model.quantization=nf4", f"--config.method.targets={ALL_LINEAR}", "--config.train.steps=4",
         "--config.train.log_every_steps=1", "--config.checkpoint.every_steps=2")


@pytest.fixture(scope="module")
def qlora_run(tmp_path_factory):
    from test_train import cli

    wd = tmp_path_factory.mktemp("qlora1")
    r = cli(wd, *QLORA)
    assert r.returncode == 0, r.stderr
    assert "base quantized to nf4" in r.stdout
    return wd


def test_qlora_cli_one_vs_eight_devices(qlora_run, tmp_path):
    from test_train import cli, losses

    r = cli(tmp_path, *QLORA, "--config.mesh.fsdp=8", "--config.mesh.data=1", devices=8)
    assert r.returncode == 0, r.stderr
    one, eight = losses(qlora_run), losses(tmp_path)
    assert one.keys() == eight.keys() == {1, 2, 3, 4}
    np.testing.assert_allclose([eight[s] for s in one], [one[s] for s in one], rtol=1e-4)
    # the export is the adapter alone (a PEFT directory), not a dequantized base
    assert sorted(p.name for p in (qlora_run / "export").iterdir()) == ["adapter_config.json",
                                                                        "adapter_model.safetensors"]


def test_qlora_cli_resume_is_exact(qlora_run, tmp_path):
    """The frozen tree is rebuilt (and re-quantized) from the base at start-up, not checkpointed:
    resuming from step 2 ends with the uninterrupted run's adapter."""
    import shutil

    from test_train import adapter, assert_same_adapter, cli

    wd = tmp_path / "resumed"
    shutil.copytree(qlora_run, wd)
    shutil.rmtree(wd / "checkpoints" / "4")
    shutil.rmtree(wd / "export")
    r = cli(wd, *QLORA)
    assert r.returncode == 0, r.stderr
    assert "resuming from step 2" in r.stdout
    assert_same_adapter(adapter(wd), adapter(qlora_run))


def test_quantization_config_errors(tmp_path):
    from test_train import cli

    r = cli(tmp_path / "a", "--config.model.quantization=fp4")
    assert r.returncode == 2 and "model.quantization='fp4': expected one of 'none', 'int8', 'nf4'" in r.stderr
    r = cli(tmp_path / "b", "--config.model.quantization=int8", "--config.method.name=full")
    assert r.returncode == 2 and "no frozen projection kernel to quantize" in r.stderr
    assert not (tmp_path / "b").exists()


# ---------------------------------------------------------------------------------------------
# fp16 compute with dynamic loss scaling (jaxft.step.dynamic_loss_scale).


def test_loss_scale_skips_overflow_and_regrows():
    import optax

    from jaxft.step import dynamic_loss_scale

    tx = dynamic_loss_scale(optax.adam(0.1), init_scale=8.0, period=2)
    params = {"w": jnp.ones(3)}
    state = tx.init(params)
    u, s1 = tx.update({"w": jnp.array([1.0, jnp.inf, 0.0])}, state, params)
    assert float(s1.scale) == 4.0 and not np.any(np.asarray(u["w"]))  # skipped, halved
    for a, b in zip(jax.tree_util.tree_leaves(s1.inner), jax.tree_util.tree_leaves(state.inner)):
        np.testing.assert_array_equal(a, b)  # Adam's moments and count untouched
    g = {"w": jnp.array([1.0, 2.0, 3.0])}
    u, s2 = tx.update(g, s1, params)
    want, _ = optax.adam(0.1).update(g, optax.adam(0.1).init(params), params)
    np.testing.assert_allclose(u["w"], want["w"])
    assert float(s2.scale) == 4.0 and int(s2.good_steps) == 1
    _, s3 = tx.update(g, s2, params)
    assert float(s3.scale) == 8.0 and int(s3.good_steps) == 0  # `period` finite steps double it


def test_fp16_train_step_skips_overflowing_steps():
    """A scale of 2^40 overflows fp16's gradients: those steps leave the parameters alone and halve
    the scale until it fits; then the fp16 step trains, with the loss of the fp32 model."""
    import flax.linen as nn
    import optax

    from jaxft.hf import config_from_dict
    from jaxft.models.llama import LlamaModel
    from jaxft.step import TrainState, dynamic_loss_scale, make_train_step

    cfg = config_from_dict(dict(model_type="llama", vocab_size=64, hidden_size=32, intermediate_size=64,
                                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))
    ids = np.random.RandomState(0).randint(0, 64, (4, 12))
    batch = {"input_ids": ids, "attention_mask": np.ones_like(ids), "weight": np.ones(4, np.float32)}
    params = nn.unbox(LlamaModel(cfg).init(jax.random.PRNGKey(0), ids[:1])["params"])
    losses = {}
    for dtype in ("float32", "float16"):
        tx = optax.sgd(0.1)
        if dtype == "float16":
            tx = dynamic_loss_scale(tx, init_scale=2.0**40)
        step = jax.jit(make_train_step(LlamaModel(cfg.replace(dtype=dtype)), tx, lambda s: 0.1, 1))
        state = TrainState(jnp.int32(0), params, tx.init(params), jax.random.PRNGKey(0))
        history = []
        for _ in range(30 if dtype == "float16" else 1):
            new, metrics = step(state, {}, batch)
            moved = any(bool(jnp.any(a != b)) for a, b in zip(jax.tree_util.tree_leaves(new.params),
                                                              jax.tree_util.tree_leaves(state.params)))
            history.append((float(metrics.get("loss_scale", 1.0)), moved, float(metrics["loss"])))
            state = new
        losses[dtype] = history
    fp16 = losses["float16"]
    assert not fp16[0][1] and fp16[0][0] == 2.0**39  # overflowed: skipped, halved
    first = next(i for i, (_, moved, _) in enumerate(fp16) if moved)
    assert 0 < first < 29 and all(moved for _, moved, _ in fp16[first:])
    assert fp16[first][0] == fp16[first - 1][0]  # a finite step keeps the scale
    np.testing.assert_allclose(fp16[0][2], losses["float32"][0][2], rtol=1e-2)


def test_backward_keeps_no_dequantized_copy():
    """XLA's memory analysis of a LoRA train step (SST-2's shapes): over an NF4 base it needs no
    more scratch memory than over the fp32 base (the backward dequantizes again rather than saving
    fp32 kernels), so the bytes saved on the base are saved on the device."""
    import flax.linen as nn
    import optax

    from jaxft import hf
    from jaxft.config import base_config
    from jaxft.models.llama import LlamaModel
    from jaxft.peft import build
    from jaxft.peft.partition import split
    from jaxft.step import TrainState, make_train_step

    model, _ = hf.load("jaxft-tiny")
    m = base_config().method
    m.name, m.targets = "lora", ALL_LINEAR
    cfg = model.cfg.replace(head="classification", num_labels=2, pooling="mean")
    method = build(m, cfg)
    model = LlamaModel(cfg, hooks=method.hooks)
    ids = np.random.RandomState(1).randint(4, 4096, (32, 64))
    batch = {"input_ids": ids, "attention_mask": np.ones_like(ids), "labels": ids[:, 0] % 2,
             "weight": np.ones(32, np.float32)}
    trainable, frozen = split(nn.unbox(model.init(jax.random.PRNGKey(0), ids[:1])["params"]), method.trainable)
    tx = optax.adamw(1e-3)
    state = TrainState(jnp.int32(0), trainable, tx.init(trainable), jax.random.PRNGKey(0))
    step = jax.jit(make_train_step(model, tx, lambda s: 1e-3, 1))
    temp = lambda f: step.lower(state, f, batch).compile().memory_analysis().temp_size_in_bytes  # noqa: E731
    assert temp(quant.quantize_params(frozen, "nf4")) <= temp(frozen) + 4096
