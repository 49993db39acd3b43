"""The GPT-2 family against transformers and peft: logits of every head (padded batches), HF I/O both
ways, the KV cache, LoRA adapters both ways, and training through the CLI with a byte-level BPE
tokenizer. Every reference is a tiny random model saved to a tmp dir; no hub access."""

from __future__ import annotations

import copy
import json
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from jaxft import hf  # noqa: E402
from jaxft.errors import JaxftError  # noqa: E402
from jaxft.models import family  # noqa: E402
from jaxft.peft import build  # noqa: E402
from jaxft.peft.hf_peft import save_adapter  # noqa: E402
from jaxft.peft.partition import added_params, flat, merge, split  # noqa: E402
from hooked_models import hooked, method_cfg  # noqa: E402

from test_train import adapter, assert_same_adapter, cli, losses  # noqa: E402

VOCAB, PAD = 96, 0
BASE = dict(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=64, initializer_range=0.2,
            pad_token_id=PAD, bos_token_id=1, eos_token_id=1, num_labels=3)
VARIANTS = {
    "default": {},
    # unscaled scores divided by the layer index, exact GELU, an explicit n_inner, an untied LM head
    "variants": dict(scale_attn_weights=False, scale_attn_by_inverse_layer_idx=True, activation_function="gelu",
                     n_inner=48, tie_word_embeddings=False, layer_norm_epsilon=1e-3, reorder_and_upcast_attn=True),
}
CLASSES = {"causal_lm": "GPT2LMHeadModel", "classification": "GPT2ForSequenceClassification",
           "token_classification": "GPT2ForTokenClassification"}


def build_hf(tmp_path, head="causal_lm", variant="default", seed=0, sub="hf"):
    torch.manual_seed(seed)
    config = transformers.GPT2Config(**{**BASE, **VARIANTS[variant]})
    config._attn_implementation = "eager"
    model = getattr(transformers, CLASSES[head])(config).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # LayerNorms away from 1 / 0 and non-zero biases, so a wrong mapping cannot pass
        for name, p in model.named_parameters():
            if name.endswith("ln_1.weight") or name.endswith("ln_2.weight") or name.endswith("ln_f.weight"):
                p.copy_(1.0 + 0.5 * torch.randn(p.shape, generator=g))
            elif name.endswith(".bias"):
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
    d = tmp_path / sub
    model.save_pretrained(d)
    return model, d


def padded_batch(side: str):
    """3 rows of 9 ids (never PAD), one padded by 3 on `side` and one by 1; positions as generate counts."""
    ids = np.random.default_rng(0).integers(2, VOCAB, size=(3, 9)).astype(np.int32)
    mask = np.ones_like(ids)
    for row, n in ((1, 3), (2, 1)):
        cols = slice(9 - n, 9) if side == "right" else slice(0, n)
        mask[row, cols], ids[row, cols] = 0, PAD
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    return ids, mask, positions


def torch_out(model, ids, mask, positions=None):
    kw = {} if positions is None else {"position_ids": torch.tensor(positions, dtype=torch.long)}
    with torch.no_grad():
        return model(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask, dtype=torch.long),
                     **kw).logits.float().numpy()


def ours(model, params, ids, mask, **kw):
    return np.asarray(model.apply({"params": params}, jnp.asarray(ids), jnp.asarray(mask), **kw))


def rel_err(a, b) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


def real_rows(head, out, mask):
    return out if head == "classification" else out[mask.astype(bool)]


# Both variants on the LM head (the untied LM head is the causal LM's), and each head on one variant.
# slow: [classification-default] (the classifier's last-token read in [classification-variants], the default
# layout in [causal_lm-default]), [token_classification-variants] (the token head in [token_classification-default],
# the variant layout in [causal_lm-variants]/[classification-variants]).
SLOW_LOGITS = {("classification", "default"), ("token_classification", "variants")}


@pytest.mark.parametrize("head,variant", [
    pytest.param(h, v, id=f"{h}-{v}", marks=[pytest.mark.slow] if (h, v) in SLOW_LOGITS else [])
    for h in CLASSES for v in VARIANTS])
def test_logits_match_transformers(tmp_path, head, variant):
    ref_model, d = build_hf(tmp_path, head, variant)
    model, params = hf.load(d)
    assert model.cfg.head == head and model.cfg.model_type == "gpt2"
    unscanned, unscanned_params = hf.load(d, scan_layers=False)
    for side in ("right", "left"):
        ids, mask, positions = padded_batch(side)
        # transformers' forward counts positions 0..T-1 unless given: give it the real tokens' count
        ref = torch_out(ref_model, ids, mask, positions if side == "left" else None)
        got = ours(model, params, ids, mask)
        assert rel_err(real_rows(head, got, mask), real_rows(head, ref, mask)) < 1e-5, side
        got = ours(unscanned, unscanned_params, ids, mask)
        assert rel_err(real_rows(head, got, mask), real_rows(head, ref, mask)) < 1e-5, side
    # Explicit positions: 0..T-1 on a left-padded batch is transformers' plain forward.
    ids, mask, _ = padded_batch("left")
    arange = np.broadcast_to(np.arange(ids.shape[1]), ids.shape)
    got = ours(model, params, ids, mask, position_ids=jnp.asarray(arange))
    ref = torch_out(ref_model, ids, mask)
    assert rel_err(real_rows(head, got, mask), real_rows(head, ref, mask)) < 1e-5


def test_classifier_reads_last_non_pad_token_when_pad_is_eos(tmp_path):
    """GPT-2 pads with its EOS, which also ends each example: like transformers, the head reads the last
    token that is not the pad token, not the EOS the mask still covers."""
    ref_model, d = build_hf(tmp_path, "classification")
    model, params = hf.load(d)
    ids, mask, _ = padded_batch("right")
    last = mask.sum(1) - 1
    ids[np.arange(3), last] = PAD  # an EOS (= PAD) that the mask keeps
    got, ref = ours(model, params, ids, mask), torch_out(ref_model, ids, mask)
    assert rel_err(got, ref) < 1e-5
    mean_model = family.build(model.cfg.replace(pooling="mean"))
    assert np.abs(ours(mean_model, params, ids, mask) - ref).max() > 1e-3  # pooling matters here


@pytest.mark.parametrize("head", list(CLASSES))
def test_load_save_transformers_roundtrip(tmp_path, head):
    ref_model, d = build_hf(tmp_path, head, "variants" if head == "causal_lm" else "default")
    model, params = hf.load(d)
    out = hf.save(model, params, tmp_path / "saved")
    written = json.loads((out / "config.json").read_text())
    assert written["architectures"] == [CLASSES[head]]
    reloaded = getattr(transformers, CLASSES[head]).from_pretrained(out).eval()
    ids, mask, positions = padded_batch("right")
    ref, got = torch_out(ref_model, ids, mask), torch_out(reloaded, ids, mask)
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-6 * np.abs(ref).max())
    sd, sd2 = ref_model.state_dict(), reloaded.state_dict()
    for k in sd:
        if not k.endswith("attn.bias"):
            np.testing.assert_array_equal(sd[k].numpy(), sd2[k].numpy(), err_msg=k)


def test_unsupported_config_is_one_line_error(tmp_path):
    _, d = build_hf(tmp_path)
    c = json.loads((d / "config.json").read_text())
    for key, value, message in (("add_cross_attention", True, "add_cross_attention"),
                                ("activation_function", "mish", "activation_function='mish' is not supported")):
        (d / "config.json").write_text(json.dumps({**c, key: value}))
        with pytest.raises(JaxftError, match=message):
            hf.load(d)


# Each scan setting and each method appear in a default cell: [None-True] (plain, scanned) and
# [method_kw1-False] (P-Tuning v2 prefix, unscanned).
# slow: [method_kw1-True] (the prefix with the cache in [method_kw1-False], scanned layers' cache in [None-True]),
# [None-False] (unscanned layers' cache in [method_kw1-False]).
KV_CASES = [pytest.param(None, True), pytest.param(None, False, marks=pytest.mark.slow),
            pytest.param(dict(name="ptuning_v2", num_virtual_tokens=3), True, marks=pytest.mark.slow),
            pytest.param(dict(name="ptuning_v2", num_virtual_tokens=3), False)]


@pytest.mark.parametrize("method_kw,scan", KV_CASES,
                         ids=[f"{'method_kw1' if c.values[0] else 'None'}-{c.values[1]}" for c in KV_CASES])
def test_kv_cache_decode_matches_full_forward(tmp_path, scan, method_kw):
    _, d = build_hf(tmp_path)
    if method_kw:
        model, _, params = hooked(d, method_kw, scan_layers=scan)
    else:
        model, params = hf.load(d, scan_layers=scan)
    ids, mask, _ = padded_batch("left")
    full = ours(model, params, ids, mask)
    b, total = ids.shape
    prompt = 5
    cache = family.of(model.cfg).init_cache(model.cfg, b, total, jnp.float32)
    step = jax.jit(lambda p, x, m, c, i: model.apply({"params": p}, x, m, cache=c, cache_index=i))
    visible = np.zeros_like(mask)
    visible[:, :prompt] = mask[:, :prompt]
    logits, cache = step(params, ids[:, :prompt], visible, cache, jnp.int32(0))
    got = [np.asarray(logits)]
    for i in range(prompt, total):  # one token at a time
        visible[:, i] = mask[:, i]
        logits, cache = step(params, ids[:, i:i + 1], visible, cache, jnp.int32(i))
        got.append(np.asarray(logits))
    got = np.concatenate(got, axis=1)
    real = mask.astype(bool)
    assert rel_err(got[real], full[real]) < 1e-5


LORA = dict(name="lora", rank=4, alpha=8.0, targets="c_attn")  # PEFT's default target for GPT-2


@pytest.mark.parametrize("head", ["causal_lm", "classification"])
def test_lora_adapter_matches_peft_both_ways(tmp_path, head):
    base, d = build_hf(tmp_path, head)
    assert family.of(hf.load(d)[0].cfg).lora_targets == "c_attn"
    model, method, params = hooked(d, LORA)
    trainable, _ = split(params, method.trainable)
    save_adapter(model, method, trainable, tmp_path / "adapter")
    ids, mask, _ = padded_batch("right")
    got = ours(model, params, ids, mask)
    ref = torch_out(peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "adapter").eval(), ids, mask)
    plain = torch_out(base, ids, mask)
    assert rel_err(real_rows(head, ref, mask), real_rows(head, plain, mask)) > 1e-3  # the adapter matters
    assert rel_err(real_rows(head, got, mask), real_rows(head, ref, mask)) < 1e-5
    model2, params2 = hf.load(d, adapter=str(tmp_path / "adapter"))
    assert rel_err(real_rows(head, ours(model2, params2, ids, mask), mask), real_rows(head, got, mask)) < 1e-6


def test_peft_saved_lora_loads(tmp_path):
    """An adapter PEFT itself wrote (its GPT-2 default c_attn, plus the MLP's Conv1Ds) through hf.load."""
    base, d = build_hf(tmp_path)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc", "mlp.c_proj"], fan_in_fan_out=True,
                             task_type="CAUSAL_LM")
    pm = peft.get_peft_model(copy.deepcopy(base), config)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
    pm.save_pretrained(tmp_path / "adapter")
    ids, mask, _ = padded_batch("right")
    ref = torch_out(pm.eval(), ids, mask)
    model, params = hf.load(d, adapter=str(tmp_path / "adapter"))
    assert {"layers/attn/c_attn/lora_a", "layers/mlp/c_fc/lora_b", "layers/mlp/c_proj/lora_a"} <= set(flat(params))
    assert "layers/attn/c_proj/lora_a" not in flat(params)
    real = mask.astype(bool)
    assert rel_err(ours(model, params, ids, mask)[real], ref[real]) < 1e-5
    assert rel_err(torch_out(base, ids, mask)[real], ref[real]) > 1e-3


def test_prefix_adapter_matches_peft(tmp_path):
    base, d = build_hf(tmp_path)
    model, method, params = hooked(d, dict(name="ptuning_v2", num_virtual_tokens=4))
    trainable, _ = split(params, method.trainable)
    save_adapter(model, method, trainable, tmp_path / "adapter")
    ids, mask, _ = padded_batch("right")
    ref = torch_out(peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "adapter").eval(), ids, mask)
    real = mask.astype(bool)
    assert rel_err(ours(model, params, ids, mask)[real], ref[real]) < 1e-5
    model2, params2 = hf.load(d, adapter=str(tmp_path / "adapter"))
    assert rel_err(ours(model2, params2, ids, mask)[real], ref[real]) < 1e-5


# slow: [False]: unscanned GPT-2 layers are checked in test_kv_cache_decode_matches_full_forward[method_kw1-False]
# and init_from_tokens on unscanned blocks in test_bert.py::test_prefix_init_from_tokens_on_an_encoder[False];
# [True] keeps GPT-2's keys and values here.
@pytest.mark.parametrize("scan", [True, pytest.param(False, marks=pytest.mark.slow)])
def test_prefix_init_from_tokens_uses_real_keys_and_values(tmp_path, scan):
    """P-Tuning v2's init_from_tokens finds GPT-2's keys and values (its attention is `attn`, not Llama's
    `self_attn`): transformers' own cache of the same tokens."""
    base, d = build_hf(tmp_path)
    model, params = hf.load(d, scan_layers=scan)
    method = build(method_cfg(name="ptuning_v2", num_virtual_tokens=4, init_from_tokens=True), model.cfg)
    model = family.build(model.cfg, method.hooks)
    params = merge(params, added_params(nn.unbox(model.init(jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32))[
        "params"])))
    ids = np.array([[5, 6, 7, 8, 9, 0], [11, 12, 0, 0, 0, 0]])
    out = method.hooks[0].initialize(model, params, {"input_ids": ids, "attention_mask": (ids > 0).astype(np.int32)})
    with torch.no_grad():
        cache = base(torch.tensor([[5, 6, 7, 8]]), use_cache=True).past_key_values
    emb = np.asarray(out["prefix_encoder"]["embedding"]).reshape(4, 2, 2, 4, 16)  # [P, L, k/v, H, D]
    for layer in range(2):
        k, v = cache.layers[layer].keys[0].numpy(), cache.layers[layer].values[0].numpy()  # [H, P, D]
        np.testing.assert_allclose(emb[:, layer, 0], k.transpose(1, 0, 2), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(emb[:, layer, 1], v.transpose(1, 0, 2), rtol=1e-4, atol=1e-5)


def test_bf16_and_remat_train_step(tmp_path):
    """bf16 compute with remat (scanned): logits near fp32's, and a finite gradient equal to no remat's."""
    _, d = build_hf(tmp_path)
    ids, mask, _ = padded_batch("right")
    model, params = hf.load(d)
    ref = ours(model, params, ids, mask)
    grads = {}
    for remat in ("none", "full", "save_dots"):
        m = family.build(model.cfg.replace(dtype="bfloat16", remat=remat))
        loss = lambda p: (m.apply({"params": p}, ids, mask) * mask[..., None]).std()  # noqa: E731
        grads[remat] = jax.jit(jax.grad(loss))(params)
    assert rel_err(ours(m, params, ids, mask)[mask.astype(bool)], ref[mask.astype(bool)]) < 0.05
    for remat in ("full", "save_dots"):
        for a, b in zip(jax.tree.leaves(grads["none"]), jax.tree.leaves(grads[remat])):
            assert np.isfinite(np.asarray(a, np.float32)).all()
            np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=1e-2, atol=1e-3)


# ---------------------------------------------------------------------------------------------
# Training through the CLI: a tiny GPT-2 with a byte-level BPE tokenizer, chosen by model.path alone.


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    """A tiny GPT2LMHeadModel with a 400-token byte-level BPE trained on SST-2 sentences (GPT-2's
    <|endoftext|> as BOS, EOS and, for want of a pad token, padding)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from jaxft.hf import ASSETS

    texts = [line.split("\t")[0] for line in (ASSETS / "sst2" / "train.tsv").read_text().splitlines()[1:3000]]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    d = tmp_path_factory.mktemp("gpt2")
    end = "<|endoftext|>"
    transformers.GPT2TokenizerFast(tokenizer_object=tok, bos_token=end, eos_token=end, unk_token=end).save_pretrained(d)
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=400, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=0,
                                     eos_token_id=0)
    transformers.GPT2LMHeadModel(config).save_pretrained(d)
    return d


SST2 = ("--config.data.name=sst2", "--config.data.max_train_examples=64", "--config.data.max_eval_examples=32",
        "--config.data.seq_len=32", "--config.train.batch_size=8", "--config.train.log_every_steps=1",
        "--config.eval.every_steps=0", "--config.optimizer.learning_rate=1e-2", "--config.optimizer.warmup_steps=0")


# slow: [lora] and [ptuning_v2]: both train together through the CLI in [lora+ptuning_v2] (their adapters
# exported), LoRA alone through the CLI (the same checks) in test_sharded_run_resumes; each alone trains on GPT-2 in
# test_family_methods.py::test_method_on_family[gpt2-lora]/[gpt2-ptuning_v2].
@pytest.mark.parametrize("method", ["full", "head", pytest.param("lora", marks=pytest.mark.slow),
                                    pytest.param("ptuning_v2", marks=pytest.mark.slow), "lora+ptuning_v2"])
def test_train_cli_on_sst2(gpt2_dir, tmp_path, method):
    # 8 examples = one batch seen every step, so any method can fit it a little.
    r = cli(tmp_path, f"--config.model.path={gpt2_dir}", f"--config.method.name={method}", *SST2,
            "--config.data.max_train_examples=8", "--config.train.steps=6", "--config.method.num_virtual_tokens=4")
    assert r.returncode == 0, r.stderr
    assert "model: gpt2 2x32 head=classification" in r.stdout
    got = losses(tmp_path)
    assert all(np.isfinite(v) for v in got.values()) and got[6] < got[1], got
    export = tmp_path / "export"
    if method in ("full", "head"):  # a full model: transformers reads the last non-pad (non-EOS) token as jaxft
        written = json.loads((export / "config.json").read_text())
        assert written["architectures"] == ["GPT2ForSequenceClassification"] and written["pad_token_id"] == 0
        model, params = hf.load(export)
        ids = np.array([[0, 5, 9, 30, 0, 0], [0, 7, 100, 200, 300, 0]])
        mask = np.array([[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]])
        ref = torch_out(transformers.GPT2ForSequenceClassification.from_pretrained(export).eval(), ids, mask)
        assert rel_err(ours(model, params, ids, mask), ref) < 1e-5
    else:
        assert any(export.rglob("adapter_config.json"))


def test_sharded_run_resumes(gpt2_dir, tmp_path):
    """fsdp x tensor over 4 devices; with its last checkpoint removed, a rerun resumes from the one before
    and ends with the same adapter and losses."""
    args = (f"--config.model.path={gpt2_dir}", "--config.method.name=lora", *SST2, "--config.mesh.fsdp=2",
            "--config.mesh.tensor=2", "--config.checkpoint.every_steps=3", "--config.train.steps=6",
            "--config.data.max_train_examples=8")
    r = cli(tmp_path, *args, devices=4)
    assert r.returncode == 0, r.stderr
    first, first_losses = adapter(tmp_path), losses(tmp_path)
    # LoRA through the CLI (test_train_cli_on_sst2[lora]'s checks): 8 examples, one batch seen every step, fit a little.
    assert "model: gpt2 2x32 head=classification" in r.stdout
    assert all(np.isfinite(v) for v in first_losses.values()) and first_losses[6] < first_losses[1], first_losses
    assert any((tmp_path / "export").rglob("adapter_config.json"))
    shutil.rmtree(tmp_path / "checkpoints" / "6")
    r = cli(tmp_path, *args, devices=4)
    assert r.returncode == 0, r.stderr
    assert "resuming from step 3" in r.stdout + r.stderr
    assert_same_adapter(adapter(tmp_path), first)
    assert losses(tmp_path) == first_losses
