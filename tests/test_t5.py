"""The T5 family against transformers and peft: logits (v1.0, v1.1, mT5; padded), HF round trips, the
KV cache, the seq2seq loss, LoRA and prefix adapters both ways, training, generation."""

import copy
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import (MT5Config, MT5ForConditionalGeneration, MT5ForTokenClassification, T5Config,
                          T5ForConditionalGeneration, T5ForSequenceClassification, T5ForTokenClassification)

from jaxft import hf
from jaxft.errors import JaxftError
from jaxft.models import family
from jaxft.objectives import OBJECTIVES, shift_labels
from jaxft.peft import build
from jaxft.peft.hf_peft import save_adapter
from jaxft.peft.partition import added_params, flat, merge, split, unflat
from jaxft.step import TrainState, make_eval_step, make_train_step
from test_peft import method_cfg

V = 99
TINY = dict(vocab_size=V, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4, relative_attention_num_buckets=8,
            relative_attention_max_distance=20, decoder_start_token_id=0, dropout_rate=0.0)
VARIANTS = {
    "v1.0": (T5Config, T5ForConditionalGeneration, dict(feed_forward_proj="relu", tie_word_embeddings=True)),
    "v1.1": (T5Config, T5ForConditionalGeneration, dict(feed_forward_proj="gated-gelu", tie_word_embeddings=False)),
    "mt5": (MT5Config, MT5ForConditionalGeneration, dict(feed_forward_proj="gated-gelu", tie_word_embeddings=False)),
}
SEQ2SEQ = OBJECTIVES["seq2seq_lm"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """variant -> (transformers model, its saved directory). v1.1 and mT5 get their own LM head (as the
    released checkpoints have; a fresh transformers 5 model ties it)."""
    out = {}
    for i, (name, (config_cls, model_cls, kw)) in enumerate(VARIANTS.items()):
        torch.manual_seed(i)
        m = model_cls(config_cls(**TINY, **kw)).eval()
        if not kw["tie_word_embeddings"]:
            m.lm_head.weight = torch.nn.Parameter(torch.randn_like(m.lm_head.weight))
        d = tmp_path_factory.mktemp(name.replace(".", ""))
        m.save_pretrained(d)
        out[name] = (m, d)
    return out


def batch(seed=0):
    """Encoder inputs padded right and left, decoder inputs padded right."""
    rng = np.random.RandomState(seed)
    ids = rng.randint(2, V, (3, 11))
    mask = np.ones_like(ids)
    mask[1, 7:] = 0
    mask[2, :3] = 0
    dec = rng.randint(2, V, (3, 6))
    dmask = np.ones_like(dec)
    dmask[0, 4:] = 0
    return ids, mask, dec, dmask


def torch_logits(m, ids, mask, dec, dmask):
    with torch.no_grad():
        return m(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), decoder_input_ids=torch.tensor(dec),
                 decoder_attention_mask=torch.tensor(dmask)).logits.numpy()


def close(ours, ref, real, rtol=1e-5):
    """Within rtol of the largest logit, at the real decoder positions."""
    err = np.abs(np.asarray(ours)[real] - ref[real]).max() / np.abs(ref[real]).max()
    assert err < rtol, err


# Each variant scanned and each scan setting on the two layouts (tied relu v1.0, untied gated v1.1/mT5); the
# slow cells repeat a variant with the other scan setting:
# slow: [True-v1.0] (v1.0 checked unscanned in [False-v1.0], scanning in [True-v1.1] and [True-mt5]),
# [False-v1.1] and [False-mt5] (the gated layout scanned in [True-v1.1]/[True-mt5], unscanned layers in [False-v1.0]).
SLOW = pytest.mark.slow
LOGIT_CASES = [pytest.param(True, "v1.0", marks=SLOW), pytest.param(True, "v1.1"), pytest.param(True, "mt5"),
               pytest.param(False, "v1.0"), pytest.param(False, "v1.1", marks=SLOW),
               pytest.param(False, "mt5", marks=SLOW)]


@pytest.mark.parametrize("scan,variant", LOGIT_CASES, ids=[f"{c.values[0]}-{c.values[1]}" for c in LOGIT_CASES])
def test_logits_match_transformers(tiny, variant, scan):
    m, d = tiny[variant]
    model, params = hf.load(d, scan_layers=scan)
    assert model.cfg.tie_word_embeddings == (variant == "v1.0")
    assert model.cfg.scale_decoder_outputs == (variant == "v1.0")
    ids, mask, dec, dmask = batch()
    ours = model.apply({"params": params}, ids, mask, decoder_input_ids=dec, decoder_attention_mask=dmask)
    assert ours.shape == (3, 6, V)
    close(ours, torch_logits(m, ids, mask, dec, dmask), dmask.astype(bool))


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_save_roundtrip_loads_in_transformers(tiny, tmp_path, variant):
    m, d = tiny[variant]
    model, params = hf.load(d)
    hf.save(model, params, tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["architectures"] == [("MT5" if variant == "mt5" else "T5") + "ForConditionalGeneration"]
    back = type(m).from_pretrained(tmp_path / "out").eval()
    ids, mask, dec, dmask = batch(1)
    ref = torch_logits(m, ids, mask, dec, dmask)
    close(torch_logits(back, ids, mask, dec, dmask), ref, dmask.astype(bool))
    model2, params2 = hf.load(tmp_path / "out")
    assert model2.cfg == model.cfg
    close(model2.apply({"params": params2}, ids, mask, decoder_input_ids=dec, decoder_attention_mask=dmask), ref,
          dmask.astype(bool))


def test_classifier_matches_transformers(tmp_path):
    """T5ForSequenceClassification: the decoder reads the input shifted right; the head its state at the EOS."""
    torch.manual_seed(3)
    m = T5ForSequenceClassification(T5Config(**TINY, num_labels=3, feed_forward_proj="gated-gelu")).eval()
    m.save_pretrained(tmp_path / "cls")
    ids, mask, _, _ = batch(9)
    mask[2] = 1  # right padding only, one EOS (id 1) at each row's last real token, as a tokenizer writes
    ids[np.arange(3), mask.sum(1) - 1] = 1
    ids[mask == 0] = 0
    with torch.no_grad():
        ref = m(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
    model, params = hf.load(tmp_path / "cls")
    assert model.cfg.head == "classification" and model.cfg.num_labels == 3
    np.testing.assert_allclose(model.apply({"params": params}, ids, mask), ref, rtol=1e-5, atol=1e-6)
    hf.save(model, params, tmp_path / "out")
    back = T5ForSequenceClassification.from_pretrained(tmp_path / "out").eval()
    with torch.no_grad():
        again = back(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
    np.testing.assert_allclose(again, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("variant", ["v1.0", "mt5"])
def test_token_classifier_matches_transformers(tmp_path, variant):
    """T5ForTokenClassification / MT5ForTokenClassification: the encoder alone and a linear `classifier` per
    token, padded on either side; saved back under the same class."""
    config_cls, model_cls, kw = VARIANTS[variant]
    token_cls = MT5ForTokenClassification if variant == "mt5" else T5ForTokenClassification
    torch.manual_seed(4)
    m = token_cls(config_cls(**TINY, num_labels=5, feed_forward_proj=kw["feed_forward_proj"])).eval()
    m.save_pretrained(tmp_path / "tok")
    ids, mask, _, _ = batch(10)  # row 1 padded right, row 2 left
    with torch.no_grad():
        ref = m(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
    model, params = hf.load(tmp_path / "tok")
    assert model.cfg.head == "token_classification" and set(params) == {"shared", "encoder", "classifier"}
    ours = np.asarray(model.apply({"params": params}, ids, mask))
    assert ours.shape == (3, 11, 5)
    close(ours, ref, mask.astype(bool))
    hf.save(model, params, tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["architectures"] == [token_cls.__name__]
    back = token_cls.from_pretrained(tmp_path / "out").eval()
    with torch.no_grad():
        again = back(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
    close(again, ref, mask.astype(bool))


def test_quantized_base(tiny):
    """model.quantization: every T5 projection (attention q/k/v/o, feed-forward) stored in int8, none else."""
    from jaxft.quant import Quantized, quantize_params

    model, params = hf.load(tiny["v1.1"][1])
    q = quantize_params(params, "int8", targets=family.of(model.cfg).projections)
    leaves = jax.tree_util.tree_leaves_with_path(q, is_leaf=lambda x: isinstance(x, Quantized))
    quantized = {jax.tree_util.keystr(p) for p, v in leaves if isinstance(v, Quantized)}
    assert len(quantized) == (4 + 3) + (8 + 3)  # scanned: one stacked kernel per module (encoder, decoder)
    assert not any("shared" in p or "lm_head" in p or "relative" in p for p in quantized)
    ids, mask, dec, dmask = batch()
    ref = np.asarray(model.apply({"params": params}, ids, mask, decoder_input_ids=dec))
    out = np.asarray(model.apply({"params": q}, ids, mask, decoder_input_ids=dec))
    assert 0 < np.abs(out - ref).max() / np.abs(ref).max() < 0.05


def test_unknown_feed_forward_is_one_line_error(tmp_path):
    c = {**TINY, "model_type": "t5", "feed_forward_proj": "gated-foo"}
    with pytest.raises(JaxftError, match="feed_forward_proj='gated-foo'"):
        hf.config_from_dict(c, "config.json")


def test_fused_attention_is_refused(tiny):
    with pytest.raises(JaxftError, match="relative position bias"):  # at load, which builds the model
        hf.load(tiny["v1.0"][1], attention="cudnn")
    model, params = hf.load(tiny["v1.0"][1])
    ids, mask, dec, dmask = batch()
    with pytest.raises(JaxftError, match="relative position bias"):
        family.build(model.cfg.replace(attention="cudnn")).apply({"params": params}, ids, mask,
                                                                 decoder_input_ids=dec)


@pytest.mark.parametrize("scan", [True, False])
def test_cached_decoding_equals_one_forward(tiny, scan):
    """encode once; decode 3 tokens at once, then one at a time with the cache: the logits of one full forward."""
    model, params = hf.load(tiny["v1.1"][1], scan_layers=scan)
    p = {"params": params}
    ids, mask, dec, _ = batch(2)
    full = np.asarray(model.apply(p, ids, mask, decoder_input_ids=dec))
    states, enc_mask = model.apply(p, ids, mask, method="encode")
    S = 8  # cache slots: more than the tokens decoded
    cache = family.of(model.cfg).init_cache(model.cfg, 3, S, jnp.float32)
    step = jax.jit(lambda p, x, m, s, c, i: model.apply(p, x, m, encoder_states=s, encoder_mask=enc_mask, cache=c,
                                                        cache_index=i, method="decode"))
    dmask = np.zeros((3, S), np.int32)
    dmask[:, :3] = 1
    logits, cache = step(p, dec[:, :3], dmask, states, cache, jnp.int32(0))
    outs = [logits]
    assert set(cache) == {"self_k", "self_v", "cross_k", "cross_v"}  # cross-attention keys/values: computed once
    for t in range(3, dec.shape[1]):
        dmask[:, t] = 1
        logits, cache = step(p, dec[:, t:t + 1], dmask, None, cache, jnp.int32(t))
        outs.append(logits)
    np.testing.assert_allclose(np.concatenate(outs, axis=1), full, rtol=1e-5, atol=1e-5 * np.abs(full).max())


@pytest.mark.parametrize("variant", ["v1.0", "v1.1"])
def test_seq2seq_loss_matches_transformers(tiny, variant):
    m, d = tiny[variant]
    model, params = hf.load(d)
    ids, mask, labels, _ = batch(3)
    labels[0, 4:] = -100  # a shorter target
    labels[2, 5:] = -100
    dec = np.asarray(shift_labels(labels, model.cfg.decoder_start_token_id, model.cfg.pad_token_id))
    np.testing.assert_array_equal(dec, m._shift_right(torch.tensor(labels)).numpy())
    b = {"input_ids": ids, "attention_mask": mask, "decoder_input_ids": dec, "labels": labels,
         "weight": np.ones(3, np.float32)}
    with torch.no_grad():
        ref = m(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), labels=torch.tensor(labels)).loss.item()
    method = build(method_cfg(name="full"), model.cfg)
    trainable, frozen = split(params, method.trainable)
    sums = jax.jit(make_eval_step(model, objective=SEQ2SEQ))(trainable, frozen, b)  # fused head (return_hidden)
    np.testing.assert_allclose(sums["loss_sum"] / sums["count"], ref, rtol=1e-5)
    assert sums["count"] == (labels != -100).sum()
    logits = model.apply({"params": params}, **SEQ2SEQ.inputs(b))  # and through plain logits
    plain = SEQ2SEQ.loss(logits, b)
    np.testing.assert_allclose(plain["loss_sum"] / plain["count"], ref, rtol=1e-5)


def with_random_added(model, params, method, seed=1):
    """The method's parameters, randomised so that they matter."""
    model = family.build(model.cfg, method.hooks)
    fresh = nn.unbox(model.init(jax.random.PRNGKey(seed), jnp.zeros((1, 4), jnp.int32))["params"])
    added = {k: 0.3 * jax.random.normal(jax.random.PRNGKey(i), v.shape)
             for i, (k, v) in enumerate(flat(added_params(fresh)).items())}
    return model, merge(params, unflat(added))


# slow: [False]: unscanned T5 blocks export as scanned ones (and load back) in
# test_family_methods.py::test_unscanned_blocks_export_as_scanned[t5]; PEFT reads the scanned export in [True].
@pytest.mark.parametrize("scan", [True, pytest.param(False, marks=pytest.mark.slow)])
def test_lora_adapter_loads_in_peft(tiny, tmp_path, scan):
    m, d = tiny["v1.1"]
    base, params = hf.load(d, scan_layers=scan)
    method = build(method_cfg(name="lora", rank=4, alpha=8.0, targets=family.of(base.cfg).lora_targets), base.cfg)
    model, params = with_random_added(base, params, method)
    trainable, _ = split(params, method.trainable)
    assert {k.split("/")[-2] for k in flat(trainable)} == {"q", "v"}  # PEFT's default targets for T5
    save_adapter(model, method, trainable, tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_2_SEQ_LM"
    ids, mask, dec, dmask = batch(4)
    ours = np.asarray(model.apply({"params": params}, ids, mask, decoder_input_ids=dec, decoder_attention_mask=dmask))
    peft_model = PeftModel.from_pretrained(copy.deepcopy(m), tmp_path / "adapter").eval()
    names = {n for n, _ in peft_model.named_modules() if n.endswith(".lora_A")}
    assert len(names) == 2 * 2 + 2 * 4  # q, v in encoder self-attention, decoder self- and cross-attention
    ref = torch_logits(peft_model, ids, mask, dec, dmask)
    real = dmask.astype(bool)
    assert np.abs(ref[real] - torch_logits(m, ids, mask, dec, dmask)[real]).max() > 1e-3  # the adapter matters
    close(ours, ref, real, rtol=1e-4)
    model2, params2 = hf.load(d, adapter=str(tmp_path / "adapter"), scan_layers=scan)
    close(model2.apply({"params": params2}, ids, mask, decoder_input_ids=dec, decoder_attention_mask=dmask), ours, real)


def test_peft_saved_lora_loads(tiny, tmp_path):
    m, d = tiny["v1.0"]
    torch.manual_seed(5)
    peft_model = get_peft_model(copy.deepcopy(m), LoraConfig(task_type="SEQ_2_SEQ_LM", r=4, lora_alpha=8))
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.3)
    peft_model.save_pretrained(tmp_path / "peft")
    ids, mask, dec, dmask = batch(5)
    ref = torch_logits(peft_model.eval(), ids, mask, dec, dmask)
    model, params = hf.load(d, adapter=str(tmp_path / "peft"))
    close(model.apply({"params": params}, ids, mask, decoder_input_ids=dec, decoder_attention_mask=dmask), ref,
          dmask.astype(bool), rtol=1e-4)


@pytest.mark.parametrize("kind", ["prompt_tuning", "ptuning"])
def test_peft_saved_soft_prompt_loads(tiny, tmp_path, kind):
    """PEFT's seq2seq soft prompts default to num_transformer_submodules=2: the adapter holds twice the
    virtual tokens, and PEFT's forward puts the first num_virtual_tokens in front of the encoder's input
    only. jaxft loads them with PEFT's logits (was: all rows in front, wrong logits)."""
    from peft import PromptEncoderConfig, PromptTuningConfig

    m, d = tiny["v1.1"]
    torch.manual_seed(5)
    config = (PromptTuningConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=3) if kind == "prompt_tuning" else
              PromptEncoderConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=3, encoder_hidden_size=16))
    peft_model = get_peft_model(copy.deepcopy(m), config)
    for name, p in peft_model.named_parameters():
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.5)
    peft_model.save_pretrained(tmp_path / "peft")
    ids, mask, dec, dmask = batch(5)
    ref = torch_logits(peft_model.eval(), ids, mask, dec, dmask)
    model, params = hf.load(d, adapter=str(tmp_path / "peft"))
    assert model.hooks[0].num_virtual_tokens == 3
    close(model.apply({"params": params}, ids, mask, decoder_input_ids=dec, decoder_attention_mask=dmask), ref,
          dmask.astype(bool))


def test_prefix_adapter_matches_peft_prefix_tuning(tiny, tmp_path):
    """P-Tuning v2 on T5 is PEFT's prefix tuning: keys/values in front of the decoder's self-attention."""
    m, d = tiny["v1.1"]
    base, params = hf.load(d)
    method = build(method_cfg(name="ptuning_v2", num_virtual_tokens=3), base.cfg)
    model, params = with_random_added(base, params, method)
    trainable, _ = split(params, method.trainable)
    save_adapter(model, method, trainable, tmp_path / "adapter")
    ids, mask, dec, dmask = batch(6)
    ours = np.asarray(model.apply({"params": params}, ids, mask, decoder_input_ids=dec, decoder_attention_mask=dmask))
    peft_model = PeftModel.from_pretrained(copy.deepcopy(m), tmp_path / "adapter").eval()
    ref = torch_logits(peft_model, ids, mask, dec, dmask)
    real = dmask.astype(bool)
    assert np.abs(ref[real] - torch_logits(m, ids, mask, dec, dmask)[real]).max() > 1e-3
    close(ours, ref, real, rtol=1e-4)
    model2, params2 = hf.load(d, adapter=str(tmp_path / "adapter"))
    close(model2.apply({"params": params2}, ids, mask, decoder_input_ids=dec, decoder_attention_mask=dmask), ours, real)

    # The prefix with the cache: decoding token by token gives the same logits.
    p = {"params": params}
    states, enc_mask = model.apply(p, ids, mask, method="encode")
    cache = family.of(model.cfg).init_cache(model.cfg, 3, dec.shape[1], jnp.float32)
    step = jax.jit(lambda c, x, m, i: model.apply(p, x, m, encoder_states=states, encoder_mask=enc_mask, cache=c,
                                                  cache_index=i, method="decode"))
    outs = []
    for t in range(dec.shape[1]):
        seen = (np.arange(dec.shape[1]) <= t)[None].repeat(3, 0).astype(np.int32)
        logits, cache = step(cache, dec[:, t:t + 1], seen, jnp.int32(t))
        outs.append(logits)
    full = np.asarray(model.apply(p, ids, mask, decoder_input_ids=dec))
    np.testing.assert_allclose(np.concatenate(outs, 1), full, rtol=1e-5, atol=1e-5 * np.abs(full).max())


# slow: [full]: a full T5 train step lowers the loss in test_seq2seq.py::
# test_full_fine_tuning_first_loss_is_torch_and_export_loads, and equals one device's in
# test_sharded_train_step_matches_one_device; [lora] keeps the T5 train step lowering the loss here.
@pytest.mark.parametrize("method_name", [pytest.param("full", marks=pytest.mark.slow), "lora"])
def test_train_step_lowers_the_loss(tiny, method_name):
    model, params = hf.load(tiny["v1.1"][1])
    method = build(method_cfg(name=method_name, rank=4, alpha=8.0, targets="q,v"), model.cfg)
    model = family.build(model.cfg, method.hooks)
    fresh = nn.unbox(model.init(jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32))["params"])
    params = merge(params, added_params(fresh))
    trainable, frozen = split(params, method.trainable)
    ids, mask, labels, _ = batch(7)
    labels[1, 4:] = -100
    b = {"input_ids": ids, "attention_mask": mask, "labels": labels, "weight": np.ones(3, np.float32),
         "decoder_input_ids": np.asarray(shift_labels(labels, 0, 0))}
    tx = optax.adam(1e-2)
    state = TrainState(step=jnp.zeros((), jnp.int32), params=trainable, opt_state=tx.init(trainable),
                       rng=jax.random.PRNGKey(0))
    step = jax.jit(make_train_step(model, tx, optax.constant_schedule(1e-2), grad_accum=1, objective=SEQ2SEQ))
    losses = []
    for _ in range(8):
        state, metrics = step(state, frozen, b)
        losses.append(float(metrics["loss"]))
    assert losses[-1] < 0.7 * losses[0], losses
    if method_name == "lora":
        assert set(flat(state.params)) == {k for k in flat(params) if "lora_" in k}


def test_greedy_decoding_with_the_cache_matches_transformers(tiny):
    """The cache convention end to end, without jaxft.generate: encode once, one jitted decode step per token."""
    m, d = tiny["v1.0"]
    model, params = hf.load(d)
    ids, mask, _, _ = batch(10)
    new = 6
    with torch.no_grad():
        ref = m.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), max_new_tokens=new,
                         do_sample=False, num_beams=1, eos_token_id=None, decoder_start_token_id=0).numpy()
    p = {"params": params}
    states, enc_mask = model.apply(p, ids, mask, method="encode")
    cache = family.of(model.cfg).init_cache(model.cfg, 3, new, jnp.float32)
    step = jax.jit(lambda c, x, m, i, s: model.apply(p, x, m, encoder_states=s, encoder_mask=enc_mask, cache=c,
                                                     cache_index=i, method="decode"))
    tokens = np.zeros((3, 1), np.int32)  # decoder_start_token_id
    out = [tokens]
    for t in range(new):
        logits, cache = step(cache, tokens, (np.arange(new) <= t)[None].repeat(3, 0).astype(np.int32), jnp.int32(t),
                             states if t == 0 else None)
        tokens = np.asarray(jnp.argmax(logits[:, -1:], axis=-1), np.int32)
        out.append(tokens)
    np.testing.assert_array_equal(np.concatenate(out, 1), ref)


def test_prefix_init_from_tokens(tiny):
    """`method.init_from_tokens`: the prefix slots start from the decoder self-attention keys of real tokens."""
    base, params = hf.load(tiny["v1.1"][1])
    method = build(method_cfg(name="ptuning_v2", num_virtual_tokens=3, init_from_tokens=True), base.cfg)
    model, params = with_random_added(base, params, method)
    ids, mask, _, _ = batch(11)
    (hook,) = method.hooks
    new = hook.initialize(model, params, {"input_ids": ids, "attention_mask": mask})
    emb = np.asarray(new["prefix_encoder"]["embedding"])
    assert emb.shape == (3, 2 * 2 * 4 * 8) and np.isfinite(emb).all()
    assert np.abs(emb - np.asarray(params["prefix_encoder"]["embedding"])).max() > 1e-3


def test_sharded_train_step_matches_one_device(tiny):
    """data x fsdp x tensor = 2 x 2 x 2: the T5 train step's loss and updated weights as on one device."""
    from jaxft import sharding
    from jaxft.config import base_config
    from jaxft.step import init_state, make_optimizer
    from jaxft.train import init_params

    _, d = tiny["v1.1"]
    model, _ = hf.load(d)
    method = build(method_cfg(name="full"), model.cfg)
    c = base_config()
    ids, mask, labels, _ = batch(12)
    ids, mask, labels = (np.concatenate([x, x[:1]]) for x in (ids, mask, labels))  # 4 rows: 2 x 2 shards
    b = {"input_ids": ids, "attention_mask": mask, "labels": labels, "weight": np.ones(4, np.float32),
         "decoder_input_ids": np.asarray(shift_labels(labels, 0, 0))}
    results = []
    for sizes in ((1, 1, 1), (2, 2, 2)):
        c.mesh.data, c.mesh.fsdp, c.mesh.tensor = sizes
        mesh = sharding.make_mesh(c.mesh, jax.devices()[:int(np.prod(sizes))])
        params = init_params(model, d, mesh, 0)
        trainable, frozen = split(params, method.trainable)
        tx, schedule = make_optimizer(c.optimizer, 10)
        state, shardings = init_state(tx, trainable, 0, mesh)
        mb = {k: jax.device_put(v, sharding.batch_sharding(mesh, v.ndim)) for k, v in b.items()}
        step = jax.jit(make_train_step(model, tx, schedule, 1, mesh, shardings.params, objective=SEQ2SEQ))
        state, metrics = step(state, frozen, mb)
        results.append((float(metrics["loss"]), np.asarray(state.params["decoder"]["block"]["layer_0"]
                                                          ["SelfAttention"]["q"]["kernel"])))
    np.testing.assert_allclose(results[1][0], results[0][0], rtol=1e-5)
    np.testing.assert_allclose(results[1][1], results[0][1], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("num_beams", [1, 4])
def test_generate_matches_transformers(tiny, num_beams):
    generate = pytest.importorskip("jaxft.generate").generate
    m, d = tiny["v1.1"]
    model, params = hf.load(d)
    ids, mask, _, _ = batch(8)
    new = 7
    with torch.no_grad():
        ref = m.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), max_new_tokens=new,
                         num_beams=num_beams, do_sample=False, eos_token_id=1, pad_token_id=0,
                         decoder_start_token_id=0).numpy()[:, 1:]  # without the start token
    ours = np.asarray(generate(model, params, ids, mask, max_new_tokens=new, num_beams=num_beams, eos_token_id=1,
                               pad_token_id=0))
    ref = np.pad(ref, ((0, 0), (0, new - ref.shape[1])), constant_values=0)
    np.testing.assert_array_equal(ours, ref)
