"""The PEFT suite's gaps, each against peft / transformers: soft prompts in generation, several
adapters active at once, BitFit on models with biases, P-Tuning templates, T5 classifier adapters."""

import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from jaxft import hf
from jaxft.generate import generate
from test_generate import prompts

TINY = dict(vocab_size=96, hidden_size=64, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, pad_token_id=0, initializer_range=0.2)
GPT2 = dict(vocab_size=96, n_embd=64, n_inner=80, n_layer=2, n_head=4, n_positions=64, pad_token_id=0,
            initializer_range=0.2)
PAD, NEW = 7, 6


@pytest.fixture(scope="module")
def lms(tmp_path_factory):
    out = {}
    for name, make in (("llama", lambda: LlamaForCausalLM(LlamaConfig(**TINY))),
                       ("gpt2", lambda: GPT2LMHeadModel(GPT2Config(**GPT2)))):
        torch.manual_seed(0)
        m = make().eval()
        d = tmp_path_factory.mktemp(name)
        m.save_pretrained(d)
        out[name] = (m, d)
    return out


def peft_generate(pm, ids, beams=1):
    """PeftModel.generate on unpadded rows (PEFT drops position ids for prompt learning, so only
    there do its positions count real tokens, as transformers' generate and jaxft's do). Without its
    cache: on transformers 5 PEFT 0.21's cached decoding leaves its own forward from the second new
    token on (greedy by `pm(ids).logits` and use_cache=False agree, and with jaxft)."""
    with torch.no_grad():
        out = pm.generate(input_ids=torch.tensor(ids), attention_mask=torch.ones(ids.shape, dtype=torch.long),
                          max_new_tokens=NEW, do_sample=False, num_beams=beams, pad_token_id=PAD, eos_token_id=[96],
                          use_cache=False)
    out = out.numpy()[:, ids.shape[1]:]
    return np.pad(out, ((0, 0), (0, NEW - out.shape[1])), constant_values=PAD)


def soft_prompt_config(kind):
    from peft import PromptEncoderConfig, PromptTuningConfig

    if kind == "prompt_tuning":
        return PromptTuningConfig(num_virtual_tokens=4, task_type="CAUSAL_LM")
    return PromptEncoderConfig(num_virtual_tokens=4, encoder_hidden_size=32, task_type="CAUSAL_LM")


# ---------------------------------------------------------------------------------------------
# 1. Soft prompts in generation: the virtual tokens' keys and values in front of the cache.


@pytest.mark.parametrize("name,kind,beams", [("llama", "prompt_tuning", 3), ("gpt2", "ptuning", 1)])
def test_soft_prompt_generation_matches_peft(lms, tmp_path, name, kind, beams):
    """A padded batch of prompts of different lengths: each row as PeftModel.generate makes it alone."""
    from peft import get_peft_model

    m, d = lms[name]
    torch.manual_seed(1)
    pm = get_peft_model(copy.deepcopy(m), soft_prompt_config(kind)).eval()
    pm.save_pretrained(tmp_path)
    model, params = hf.load(d, adapter=tmp_path)
    ids, mask = prompts(pad=PAD)
    out = generate(model, params, ids, mask, max_new_tokens=NEW, num_beams=beams, pad_token_id=PAD, eos_token_id=96)
    for r in range(len(ids)):
        np.testing.assert_array_equal(out[r], peft_generate(pm, ids[r:r + 1, mask[r] == 1], beams)[0])
    with torch.no_grad():  # the prompt changes what is generated
        plain = m.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), max_new_tokens=NEW,
                           do_sample=False, num_beams=beams, pad_token_id=PAD, eos_token_id=[96]).numpy()
    assert not (plain[:, ids.shape[1]:] == out).all()


def test_soft_prompt_generation_with_a_sliding_window(tmp_path):
    """Mistral with a window (5) shorter than 4 virtual tokens + prompt + answer: greedy from transformers'
    forward over [virtual tokens, left-padded prompt, answer so far] each step (PEFT's layout; positions
    counting the real tokens after the virtual ones), which the window leaves behind by slot. (PEFT's own
    generate drops positions on padded rows.)"""
    from peft import get_peft_model
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    m = MistralForCausalLM(MistralConfig(**TINY, sliding_window=5)).eval()
    m.save_pretrained(tmp_path / "base")
    torch.manual_seed(1)
    pm = get_peft_model(copy.deepcopy(m), soft_prompt_config("prompt_tuning")).eval()
    pm.save_pretrained(tmp_path / "adapter")
    model, params = hf.load(tmp_path / "base", adapter=tmp_path / "adapter")
    ids, mask = prompts(pad=PAD)
    out = generate(model, params, ids, mask, max_new_tokens=NEW, pad_token_id=PAD, eos_token_id=96)
    seq, m_ = torch.tensor(ids), torch.tensor(mask)
    virtual = pm.get_prompt(batch_size=len(ids))  # [3, 4, D]
    with torch.no_grad():
        for _ in range(NEW):
            full = torch.cat([torch.ones(len(ids), 4, dtype=m_.dtype), m_], 1)
            embeds = torch.cat([virtual, m.get_input_embeddings()(seq)], 1)
            logits = m(inputs_embeds=embeds, attention_mask=full, position_ids=(full.cumsum(-1) - 1).clamp(min=0)).logits
            seq = torch.cat([seq, logits[:, -1].argmax(-1, keepdim=True)], 1)
            m_ = torch.cat([m_, torch.ones(len(ids), 1, dtype=m_.dtype)], 1)
    np.testing.assert_array_equal(out, seq[:, ids.shape[1]:].numpy())
    wide, wide_params = hf.load(tmp_path / "base", adapter=tmp_path / "adapter", sliding_window=None)
    assert not (generate(wide, wide_params, ids, mask, max_new_tokens=NEW, pad_token_id=PAD, eos_token_id=96)
                == out).all()  # the window matters here


# ---------------------------------------------------------------------------------------------
# 2. Several adapters active at once (jaxft.peft.multi), as PEFT's set_adapter(["a", "b"]).


def _peft_dirs(m, tmp_path, configs):
    from peft import get_peft_model

    dirs = {}
    for i, (name, config) in enumerate(configs.items()):
        torch.manual_seed(10 + i)
        get_peft_model(copy.deepcopy(m), config).save_pretrained(tmp_path / name)
        dirs[name] = tmp_path / name
    return dirs


def test_adapters_active_at_once_match_peft(lms, tmp_path):
    from peft import IA3Config, LoraConfig, PeftModel

    from jaxft.peft.multi import Adapters
    from jaxft.peft.partition import flat, split

    m, d = lms["llama"]
    dirs = _peft_dirs(m, tmp_path, {
        "a": LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
        "b": LoraConfig(r=2, lora_alpha=4, target_modules=["v_proj", "down_proj"], init_lora_weights=False),
        "c": IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"],
                       init_ia3_weights=False)})
    ids = np.array([[1, 5, 9, 20, 33, 4, 17]])
    base_model, base = hf.load(d)
    adapters = Adapters(base_model, base)
    for name, path in dirs.items():
        adapters.load(name, path)

    def ours(active, params=None):
        model, joint = adapters.use(active)
        return np.asarray(model.apply({"params": params or joint}, jnp.asarray(ids)))

    def peft(active, where=dirs):
        pm = PeftModel.from_pretrained(copy.deepcopy(m), where[active[0]], adapter_name=active[0])
        for name in active[1:]:
            pm.load_adapter(where[name], adapter_name=name)
        pm.base_model.set_adapter(active)
        with torch.no_grad():
            return pm(input_ids=torch.tensor(ids)).logits.numpy()

    both = peft(["a", "b"])
    np.testing.assert_allclose(ours(["a", "b"]), both, atol=1e-5)  # the two LoRA updates add
    np.testing.assert_allclose(ours("a"), peft(["a"]), atol=1e-5)  # switched back: one alone
    assert np.abs(ours("a") - both).max() > 1e-2
    # LoRA "a" + IA3 "c" (PEFT's mixed model refuses IA3): IA3 over the base with "a" merged into it.
    merged = PeftModel.from_pretrained(copy.deepcopy(m), dirs["a"]).merge_and_unload()
    with torch.no_grad():
        ref = PeftModel.from_pretrained(merged, dirs["c"])(input_ids=torch.tensor(ids)).logits.numpy()
    np.testing.assert_allclose(ours(["a", "c"]), ref, atol=1e-5)

    # Train "a" while "b" stays frozen, both active; then save each on its own.
    model, joint = adapters.use(["a", "b"])
    train, frozen = split(joint, adapters.trainable("a", ["a", "b"]))
    assert sorted(flat(train)) and all("@a" in k for k in flat(train))
    target = jnp.asarray(ids[:, 1:])

    def loss(t):
        logits = model.apply({"params": _merge(frozen, t)}, jnp.asarray(ids))[:, :-1]
        return -jnp.take_along_axis(jax.nn.log_softmax(logits), target[..., None], -1).mean()

    step = jax.jit(jax.value_and_grad(loss))
    losses = []
    for _ in range(3):
        value, grads = step(train)
        losses.append(float(value))
        train = jax.tree.map(lambda p, g: p - 0.05 * g, train, grads)
    assert losses[-1] < losses[0]
    b_before = flat(adapters.own_params("b"))
    a_before = flat(adapters.own_params("a"))
    adapters.put_joint(_merge(frozen, train), ["a", "b"])
    assert all((np.asarray(v) == np.asarray(flat(adapters.own_params("b"))[k])).all() for k, v in b_before.items())
    assert all(np.abs(np.asarray(v) - np.asarray(flat(adapters.own_params("a"))[k])).max() > 0
               for k, v in a_before.items())
    saved = {name: adapters.save(name, tmp_path / f"saved_{name}") for name in ("a", "b")}
    np.testing.assert_allclose(ours(["a", "b"]), peft(["a", "b"], saved), atol=1e-5)


def _merge(*trees):
    from jaxft.peft.partition import merge

    return merge(*trees)


# ---------------------------------------------------------------------------------------------
# 3. BitFit on models with biases: only the biases (and the new head) train; full weights export.


def _bitfit_base(name, d):
    from transformers import BertConfig, BertForSequenceClassification, GPT2ForSequenceClassification

    torch.manual_seed(0)
    if name == "gpt2":
        m = GPT2ForSequenceClassification(GPT2Config(**GPT2))
    else:
        m = BertForSequenceClassification(BertConfig(vocab_size=96, hidden_size=32, num_hidden_layers=2,
                                                     num_attention_heads=4, intermediate_size=48,
                                                     max_position_embeddings=32))
    with torch.no_grad():  # biases start away from zero, as a pretrained model's
        for n, p in m.named_parameters():
            if n.endswith("bias"):
                p.normal_(0, 0.1)
    m.eval().save_pretrained(d)
    return m


# slow: [bert]: BitFit through train_and_evaluate is checked on gpt2 here; on BERT (a classifier: exactly the
# biases and the head train, the whole-model export reads in transformers with jaxft's logits, the loss falls) in
# tests/test_family_methods.py::test_method_on_family[bert-bitfit].
@pytest.mark.parametrize("name", ["gpt2", pytest.param("bert", marks=pytest.mark.slow)])
def test_bitfit_trains_exactly_the_biases(tmp_path, name):
    from safetensors.numpy import load_file
    from transformers import AutoModelForSequenceClassification

    from jaxft import train
    from jaxft.config import base_config

    _bitfit_base(name, tmp_path / "base")
    c = base_config()
    c.model.path, c.method.name = str(tmp_path / "base"), "bitfit"
    c.data.name, c.data.synthetic_labels, c.data.synthetic_examples, c.data.seq_len = "synthetic", 2, 16, 12
    c.train.steps, c.train.batch_size, c.train.log_every_steps = 8, 8, 1
    c.optimizer.learning_rate, c.optimizer.warmup_steps = 3e-2, 0
    c.checkpoint.every_steps = 0
    train.train_and_evaluate(c, str(tmp_path / "run"))
    rows = [__import__("json").loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    loss = [r["train/loss"] for r in rows if "train/loss" in r]
    assert loss[-1] < loss[0]
    # The export is the full model (BitFit adds nothing); against the base, exactly the biases changed.
    export = tmp_path / "run" / "export"
    assert not (export / "adapter_config.json").exists()
    before = load_file(str(tmp_path / "base" / "model.safetensors"))
    after = load_file(str(export / "model.safetensors"))
    head = ("score.",) if name == "gpt2" else ("classifier.", "bert.pooler.")  # the family's classifier head
    body = {k for k in before if not k.startswith(head)}
    changed = {k for k in body if k in after and not np.array_equal(before[k], after[k])}
    assert changed == {k for k in body if k.endswith("bias")} and changed
    assert body - {k for k in body if k.endswith("bias")} <= set(after)
    # Round trip: transformers and jaxft read the export to the same logits.
    ids = np.random.RandomState(0).randint(1, 96, (2, 9))
    model, params = hf.load(export)
    with torch.no_grad():
        ref = AutoModelForSequenceClassification.from_pretrained(export).eval()(input_ids=torch.tensor(ids)).logits
    np.testing.assert_allclose(np.asarray(model.apply({"params": params}, jnp.asarray(ids))), ref.numpy(), atol=1e-5)


# ---------------------------------------------------------------------------------------------
# 4. P-Tuning's virtual tokens placed in a template (method.template).


class FakeTokenizer:
    """Characters as ids (3 + their code mod 90); BOS 1, EOS 2."""

    bos, eos, pad_id = [1], [2], 0

    def encode(self, text):
        return [3 + ord(ch) % 90 for ch in text]


def _ptuning_from_peft(lms, tmp_path, template=""):
    """A tiny Llama with PEFT's P-Tuning (an MLP encoder) loaded into jaxft, with `template` set."""
    import dataclasses

    from peft import get_peft_model

    m, d = lms["llama"]
    torch.manual_seed(1)
    pm = get_peft_model(copy.deepcopy(m), soft_prompt_config("ptuning")).eval()
    pm.save_pretrained(tmp_path)
    model, params = hf.load(d, adapter=tmp_path)
    if template:
        from jaxft.models import family

        model = family.build(model.cfg, [dataclasses.replace(h, template=template) for h in model.hooks])
    return pm, m, model, params


def _rows(template, texts, width):
    """Rendered rows, right-padded (template=None: PEFT's input, BOS text EOS)."""
    from jaxft.peft.prompt import render

    tok = FakeTokenizer()
    before, after = render(template, 4, tok) if template else (tok.bos, tok.eos)
    rows = [before + tok.encode(t) + after for t in texts]
    ids, mask = np.zeros((len(rows), width), np.int64), np.zeros((len(rows), width), np.int64)
    for r, row in enumerate(rows):
        ids[r, :len(row)], mask[r, :len(row)] = row, 1
    return ids, mask


def test_template_in_front_is_peft_layout(lms, tmp_path):
    """"[P][P][P][P] {text}": the virtual tokens go before BOS, where PEFT puts them; logits equal PEFT's."""
    pm, _, model, params = _ptuning_from_peft(lms, tmp_path, "[P][P] [P][P] {text}")
    texts = ["a good film", "bad"]
    ids, mask = _rows("[P][P] [P][P] {text}", texts, 17)
    assert (ids[:, :4] == -1).all() and (ids[:, 4] == 1).all()
    plain, plain_mask = _rows(None, texts, 13)
    with torch.no_grad():
        ref = pm(input_ids=torch.tensor(plain), attention_mask=torch.tensor(plain_mask)).logits.numpy()[:, 4:]
    out = np.asarray(model.apply({"params": params}, jnp.asarray(ids), jnp.asarray(mask)))[:, 4:]
    real = plain_mask == 1
    np.testing.assert_allclose(out[real], ref[real], atol=1e-5)


def test_template_places_virtual_tokens(lms, tmp_path):
    """"[P][P] {text} [P] It was": the encoder's k-th output at the k-th [P] (the 4th: 'It [P] was');
    against transformers fed inputs_embeds with those vectors spliced in; then generation from a
    left-padded batch, against greedy by transformers' forward; then the export and its reload."""
    from jaxft.hf import save_adapter

    template = "[P][P] {text} [P] It [P] was"
    pm, m, model, params = _ptuning_from_peft(lms, tmp_path / "peft", template)
    hook = model.hooks[-1]
    virtual = torch.tensor(hook.prompt_embeddings(model.cfg, params["prompt_encoder"]))
    ids, mask = _rows(template, ["a good film", "bad"], 26)

    def spliced(ids):
        e = m.get_input_embeddings()(torch.tensor(np.where(ids < 0, 0, ids)))
        for r in range(ids.shape[0]):
            e[r, ids[r] < 0] = virtual
        return e

    with torch.no_grad():
        ref = m(inputs_embeds=spliced(ids), attention_mask=torch.tensor(mask)).logits.numpy()
    out = np.asarray(model.apply({"params": params}, jnp.asarray(ids), jnp.asarray(mask)))
    np.testing.assert_allclose(out[mask == 1], ref[mask == 1], atol=1e-5)
    base_model, base = hf.load(lms["llama"][1])
    plain = np.asarray(base_model.apply({"params": base}, jnp.asarray(np.where(ids < 0, 0, ids)), jnp.asarray(mask)))
    assert np.abs(plain - out)[mask == 1].max() > 1e-2

    # Generation: the placeholders are in the (left-padded) prompt, the cache holds what they became.
    lengths = mask.sum(1)
    left = np.zeros_like(ids)
    left_mask = np.zeros_like(mask)
    for r, n in enumerate(lengths):
        left[r, -n:], left_mask[r, -n:] = ids[r, :n], 1
    out = generate(model, params, left, left_mask, max_new_tokens=NEW, pad_token_id=PAD, eos_token_id=96)
    seq, sm = left.copy(), left_mask.copy()
    with torch.no_grad():
        for _ in range(NEW):
            pos = np.maximum(sm.cumsum(1) - 1, 0)
            logits = m(inputs_embeds=spliced(seq), attention_mask=torch.tensor(sm),
                       position_ids=torch.tensor(pos)).logits[:, -1]
            seq = np.concatenate([seq, logits.argmax(-1).numpy()[:, None]], 1)
            sm = np.concatenate([sm, np.ones((len(seq), 1), sm.dtype)], 1)
    np.testing.assert_array_equal(out, seq[:, left.shape[1]:])

    # The export records the template (PEFT ignores the key); jaxft reads it back.
    import json

    save_adapter(model, params, tmp_path / "export")
    assert json.loads((tmp_path / "export" / "adapter_config.json").read_text())["jaxft_template"] == template
    model2, params2 = hf.load(lms["llama"][1], adapter=tmp_path / "export")
    np.testing.assert_allclose(np.asarray(model2.apply({"params": params2}, jnp.asarray(ids), jnp.asarray(mask))),
                               np.asarray(model.apply({"params": params}, jnp.asarray(ids), jnp.asarray(mask))),
                               atol=1e-6)


def test_template_config_and_data():
    from jaxft.data import tasks
    from jaxft.data.sources import Records
    from jaxft.errors import JaxftError
    from jaxft.peft import build
    from jaxft.peft.prompt import PLACEHOLDER, render
    from tests.hooked_models import method_cfg

    cfg = hf.config_from_dict(dict(model_type="llama", vocab_size=96, hidden_size=32, intermediate_size=48,
                                   num_hidden_layers=2, num_attention_heads=4))
    hook = build(method_cfg(name="ptuning", num_virtual_tokens=3, template="[P] {text} [P][P] It was"), cfg).hooks[0]
    assert hook.template and hook.virtual_tokens == 0
    for template, match in (("[P] {text}", "1 \\[P\\] marks, expected method.num_virtual_tokens=3"),
                            ("[P][P][P] text", "expected \\{text\\} exactly once")):
        with pytest.raises(JaxftError, match=match):
            build(method_cfg(name="ptuning", num_virtual_tokens=3, template=template), cfg)
    tok = FakeTokenizer()
    before, after = render("[P] {text} [P][P] It was", 3, tok)
    assert before == [PLACEHOLDER, 1] and after == [PLACEHOLDER, PLACEHOLDER] + tok.encode(" It was") + [2]
    arrays, cut = tasks.classification(Records([{"text": "abcdefgh", "label": 1}, {"text": "ab", "label": 0}],
                                               ["x:1", "x:2"]), tok, 14, "text", "label", [0, 1],
                                       template=(before, after))
    assert cut == 1
    np.testing.assert_array_equal(arrays["input_ids"][0], before + tok.encode("ab") + after)
    np.testing.assert_array_equal(arrays["input_ids"][1], before + tok.encode("ab") + after)


# ---------------------------------------------------------------------------------------------
# 5. T5 with its classification head: LoRA and prefix adapters PEFT loads on T5ForSequenceClassification.


@pytest.mark.parametrize("kind", ["lora", "prefix_tuning"])
def test_t5_classifier_adapters_load_in_peft(tmp_path, kind):
    from peft import PeftModel
    from transformers import T5Config, T5ForSequenceClassification

    from jaxft.hf import save_adapter
    from jaxft.peft.partition import flat, unflat
    from tests.hooked_models import hooked

    torch.manual_seed(3)
    m = T5ForSequenceClassification(T5Config(vocab_size=99, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4,
                                             relative_attention_num_buckets=8, decoder_start_token_id=0,
                                             dropout_rate=0.0, num_labels=3, feed_forward_proj="gated-gelu")).eval()
    m.save_pretrained(tmp_path / "base")
    model, _, params = hooked(tmp_path / "base", dict(name=kind, rank=4, alpha=8.0, num_virtual_tokens=3,
                                                      projection_hidden=16))
    params = unflat({k: v + 0.1 if k.startswith("classification_head/") else v  # the head trained too
                     for k, v in flat(params).items()})
    save_adapter(model, params, tmp_path / "adapter")
    ids = np.random.RandomState(0).randint(2, 99, (2, 7))
    ids[:, -1] = 1  # T5ForSequenceClassification reads the state at the EOS
    ours = np.asarray(model.apply({"params": params}, jnp.asarray(ids)))
    pm = PeftModel.from_pretrained(copy.deepcopy(m), tmp_path / "adapter").eval()
    t = torch.tensor(ids)
    with torch.no_grad():
        if kind == "lora":
            ref = pm(input_ids=t).logits.numpy()
        else:  # PEFT's classifier forward refuses prefixes on T5; its own prompt as the cache, by hand
            inner = pm.base_model
            h = inner.transformer(input_ids=t, decoder_input_ids=inner._shift_right(t),
                                  past_key_values=pm.get_prompt(batch_size=2)).last_hidden_state
            ref = inner.classification_head(h[t.eq(1)].view(2, -1, h.shape[-1])[:, -1]).numpy()
        assert np.abs(ref - m(input_ids=t).logits.numpy()).max() > 1e-2
    np.testing.assert_allclose(ours, ref, atol=1e-5)
    model2, params2 = hf.load(tmp_path / "base", adapter=tmp_path / "adapter")
    np.testing.assert_allclose(np.asarray(model2.apply({"params": params2}, jnp.asarray(ids))), ours, atol=1e-6)
