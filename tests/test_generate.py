"""Generation against transformers' `generate` (and, for prefixes, against transformers' forward with
PEFT's prompt as the cache, which PEFT 0.21's own generate ignores on transformers 5)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel
from transformers import LlamaConfig as HFLlamaConfig
from transformers import LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM
from transformers import Glm4Config, Glm4ForCausalLM, Phi3Config, Phi3ForCausalLM, Qwen3Config, Qwen3ForCausalLM
from transformers import Gemma2Config, Gemma2ForCausalLM, Gemma3ForCausalLM, Gemma3TextConfig
from transformers import MixtralConfig, MixtralForCausalLM, Qwen2MoeConfig, Qwen2MoeForCausalLM

from jaxft import generate as gen
from jaxft import hf
from jaxft.errors import JaxftError
from jaxft.generate import generate
from jaxft.models import family
from jaxft.peft.lora import merge_lora
from forkserver import python_m

ROOT = Path(__file__).resolve().parents[1]
# initializer_range 0.2: peaked logits, so that no two candidates tie within float error.
TINY = dict(vocab_size=96, hidden_size=64, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, pad_token_id=0, initializer_range=0.2)
FAMILIES = {
    "llama": (LlamaForCausalLM, HFLlamaConfig, {}),
    # windows shorter than prompt + new tokens, so that they cut
    "mistral": (MistralForCausalLM, MistralConfig, dict(sliding_window=4)),
    "qwen2": (Qwen2ForCausalLM, Qwen2Config, dict(use_sliding_window=True, sliding_window=5, max_window_layers=0)),
    "qwen3": (Qwen3ForCausalLM, Qwen3Config, dict(head_dim=24, use_sliding_window=True, sliding_window=5,
                                                  max_window_layers=0)),
    "gpt2": (GPT2LMHeadModel, GPT2Config, dict(n_inner=80, n_positions=64)),  # learned positions, fused c_attn
    # half of each head rotated over adjacent pairs: the cached keys keep the rest unrotated
    "glm4": (Glm4ForCausalLM, Glm4Config, dict(head_dim=24)),
    # fused q/k/v, half of each head rotated, a window, and LongRoPE's long factors: the prompts are already
    # past the original 6 positions (generating across them: test_longrope_recomputes_the_cache_once)
    "phi3": (Phi3ForCausalLM, Phi3Config, dict(sliding_window=5, max_position_embeddings=64,
                                               original_max_position_embeddings=6, rope_parameters={
        "rope_type": "longrope", "rope_theta": 1e4, "partial_rotary_factor": 0.5,
        "short_factor": [1.0, 1.2, 1.5, 2.0], "long_factor": [2.0, 3.0, 4.0, 6.0]})),
    # every other layer sliding (the cache keeps every slot; the window is in the mask), capped scores and logits
    "gemma2": (Gemma2ForCausalLM, Gemma2Config, dict(head_dim=24, sliding_window=4, query_pre_attn_scalar=20,
                                                     attn_logit_softcapping=3.0, final_logit_softcapping=30.0)),
    # two sliding layers at their own rotary base to one full layer with linear scaling
    "gemma3": (Gemma3ForCausalLM, Gemma3TextConfig, dict(num_hidden_layers=3, head_dim=24, sliding_window=4,
                                                         sliding_window_pattern=3, rope_parameters={
        "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e5},
        "sliding_attention": {"rope_type": "default", "rope_theta": 100.0}})),
    # experts: the first layer sliding, the second not (Qwen2-MoE's layout below max_window_layers), a shared expert
    "qwen2_moe": (Qwen2MoeForCausalLM, Qwen2MoeConfig, dict(
        num_experts=4, num_experts_per_tok=2, moe_intermediate_size=24, shared_expert_intermediate_size=32,
        use_sliding_window=True, sliding_window=4, max_window_layers=2)),
    "mixtral": (MixtralForCausalLM, MixtralConfig, dict(num_local_experts=4, num_experts_per_tok=2, sliding_window=5)),
}
PAD = 7
NEW = 10


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    out = {}
    for name, (cls, cfg_cls, extra) in FAMILIES.items():
        torch.manual_seed(0)
        m = cls(cfg_cls(**{**TINY, **extra})).eval()
        d = tmp_path_factory.mktemp(name)
        m.save_pretrained(d)
        out[name] = (m, d)
    return out


def prompts(lengths=(5, 8, 3), width=8, seed=0, pad=0):
    """A left-padded batch of prompts of different lengths (`pad` in the padding slots)."""
    rs = np.random.RandomState(seed)
    ids, mask = np.full((len(lengths), width), pad, np.int64), np.zeros((len(lengths), width), np.int64)
    for r, n in enumerate(lengths):
        ids[r, width - n:], mask[r, width - n:] = rs.randint(1, 96, n), 1
    return ids, mask


def hf_generate(m, ids, mask, new=NEW, **kw):
    kw.setdefault("eos_token_id", [96])  # not the config's EOS: none, as in jaxft's call, unless given
    with torch.no_grad():
        out = m.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), max_new_tokens=new,
                         do_sample=False, pad_token_id=PAD, **kw).numpy()[:, ids.shape[1]:]
    return np.pad(out, ((0, 0), (0, new - out.shape[1])), constant_values=PAD)  # it stops when all rows end


def until_eos(row, eos):
    """The tokens before the first EOS."""
    row = list(row)
    return row[:row.index(eos)] if eos in row else row


# slow: llama with scanned layers and beams is llama-True-1 (scan) and llama-False-4 (beams) apart, and
# qwen2-True-4 together.
@pytest.mark.parametrize("name,scan,beams", [("llama", True, 1),
                                             pytest.param("llama", True, 4, marks=pytest.mark.slow), ("llama", False, 4),
                                             ("mistral", True, 1), ("qwen2", True, 4), ("qwen3", False, 1), ("gpt2", True, 1),
                                             ("gpt2", False, 4), ("glm4", True, 1), ("phi3", True, 1),
                                             ("gemma2", True, 1), ("gemma3", False, 4), ("qwen2_moe", True, 1),
                                             ("mixtral", False, 1)])
def test_matches_transformers(saved, name, scan, beams):
    m, d = saved[name]
    model, params = hf.load(d, scan_layers=scan)
    if name in ("mistral", "qwen2", "qwen3", "phi3", "gemma2", "gemma3", "qwen2_moe", "mixtral"):
        assert model.cfg.sliding_window is not None
    ids, mask = prompts()
    unused = [96, 97]  # EOS ids that cannot come up (beyond the vocabulary)
    plain = generate(model, params, ids, mask, max_new_tokens=NEW, num_beams=beams, pad_token_id=PAD,
                     eos_token_id=unused)
    np.testing.assert_array_equal(plain, hf_generate(m, ids, mask, num_beams=beams, eos_token_id=unused))
    # EOS: tokens the rows produce part-way (two ids: EOS may be a list), so that rows end at different steps
    eos = [int(plain[0, 3]), int(plain[1, 6])]
    out = generate(model, params, ids, mask, max_new_tokens=NEW, num_beams=beams, pad_token_id=PAD, eos_token_id=eos)
    np.testing.assert_array_equal(out, hf_generate(m, ids, mask, num_beams=beams, eos_token_id=eos))
    ended = np.isin(out, eos)
    assert ended.any()
    for row, hits in zip(out, ended):
        if hits.any():  # padding after EOS
            assert (row[np.argmax(hits) + 1:] == PAD).all()


@pytest.mark.parametrize("beams", [1, 4])
def test_longrope_recomputes_the_cache_once(saved, beams):
    """Prompts within LongRoPE's original 6 positions, answers past them: when a sequence first holds 7 tokens,
    transformers' Phi-3 drops its cache and feeds everything again with the long factors; so does jaxft (it
    had kept the short-factor keys, and its tokens parted from transformers' there)."""
    m, d = saved["phi3"]
    model, params = hf.load(d)
    ids, mask = prompts(lengths=(4, 2, 3), width=4)
    out = generate(model, params, ids, mask, max_new_tokens=NEW, num_beams=beams, pad_token_id=PAD,
                   eos_token_id=[96])
    np.testing.assert_array_equal(out, hf_generate(m, ids, mask, num_beams=beams))


def test_right_padded_prompts_are_left_aligned(saved):
    m, d = saved["llama"]
    model, params = hf.load(d)
    ids, mask = prompts()
    order = np.argsort(-mask, axis=1, kind="stable")  # real tokens first: right padding
    right_ids, right_mask = np.take_along_axis(ids, order, 1), np.take_along_axis(mask, order, 1)
    assert not (right_mask == mask).all()
    np.testing.assert_array_equal(generate(model, params, right_ids, right_mask, max_new_tokens=NEW),
                                  generate(model, params, ids, mask, max_new_tokens=NEW))


def _peft(d, config, tmp_path, prefix_std=None, cls=LlamaForCausalLM):
    from peft import get_peft_model

    torch.manual_seed(1)
    pm = get_peft_model(cls.from_pretrained(d), config).eval()
    if prefix_std:
        with torch.no_grad():
            pm.prompt_encoder["default"].embedding.weight.normal_(0, prefix_std)
    pm.save_pretrained(tmp_path)
    return pm


@pytest.mark.parametrize("beams", [1, 4])
def test_lora_adapter_merged_and_unmerged(saved, tmp_path, beams):
    from peft import LoraConfig

    _, d = saved["llama"]
    pm = _peft(d, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False,
                             task_type="CAUSAL_LM"), tmp_path)
    model, params = hf.load(d, adapter=tmp_path)
    ids, mask = prompts()
    out = generate(model, params, ids, mask, max_new_tokens=NEW, num_beams=beams, pad_token_id=PAD)
    np.testing.assert_array_equal(out, hf_generate(pm, ids, mask, num_beams=beams))
    merged_model, merged = merge_lora(model, params)
    assert not merged_model.hooks and "lora_a" not in str(jax.tree_util.tree_structure(merged))
    np.testing.assert_array_equal(generate(merged_model, merged, ids, mask, max_new_tokens=NEW, num_beams=beams,
                                           pad_token_id=PAD), out)
    base_model, base = hf.load(d)  # the adapter changes what is generated
    assert not (generate(base_model, base, ids, mask, max_new_tokens=NEW, num_beams=beams) == out).all()


@pytest.mark.parametrize("window", [None, 12])
def test_prefix_adapter_matches_transformers_forward(saved, tmp_path, window):
    """Greedy from transformers' forward over the whole sequence each step, PEFT's prompt as the cache
    and positions counting real tokens from the prefix length (jaxft's and PEFT's forward convention).
    With Mistral's sliding window (12), as in transformers, the prefix sits at positions 0..4 in front
    of the tokens, and later tokens' windows leave it (was: always visible, other tokens)."""
    from peft import PrefixTuningConfig

    _, d = saved["llama"]
    if window:
        torch.manual_seed(0)
        d = tmp_path / "mistral"
        MistralForCausalLM(MistralConfig(**TINY, sliding_window=window)).save_pretrained(d)
    pm = _peft(d, PrefixTuningConfig(num_virtual_tokens=5, task_type="CAUSAL_LM"), tmp_path, prefix_std=1.0,
               cls=MistralForCausalLM if window else LlamaForCausalLM)
    model, params = hf.load(d, adapter=tmp_path)
    ids, mask = prompts()
    out = generate(model, params, ids, mask, max_new_tokens=NEW)
    seq, m = torch.tensor(ids), torch.tensor(mask)
    with torch.no_grad():
        for _ in range(NEW):
            positions = (m.cumsum(-1) - 1).clamp(min=0) + 5
            logits = pm.base_model(input_ids=seq, attention_mask=torch.cat([torch.ones(3, 5, dtype=m.dtype), m], 1),
                                   position_ids=positions, cache=pm.get_prompt(batch_size=3)).logits
            seq = torch.cat([seq, logits[:, -1].argmax(-1, keepdim=True)], 1)
            m = torch.cat([m, torch.ones(3, 1, dtype=m.dtype)], 1)
    np.testing.assert_array_equal(out, seq[:, ids.shape[1]:].numpy())
    base_model, base = hf.load(d)
    assert not (generate(base_model, base, ids, mask, max_new_tokens=NEW) == out).all()


def rerun_greedy(model, params, ids, mask, n):
    """Greedy by the full forward, recomputed over the whole sequence each step (no cache). The
    sequence has its final width from the start, the columns not yet generated masked (and later than
    every token that reads logits), so one compiled forward serves every step."""
    width = ids.shape[1]
    ids, mask = (np.pad(x, ((0, 0), (0, n))) for x in (ids, mask))
    forward = jax.jit(lambda p, i, m: model.apply({"params": p}, i, m))
    for i in range(width, width + n):
        ids[:, i] = np.asarray(forward(params, ids, mask)[:, i - 1].argmax(-1))
        mask[:, i] = 1
    return ids[:, width:]


@pytest.mark.parametrize("kind", ["int8", "nf4"])
def test_quantized_base(saved, kind):
    from jaxft.quant import Quantized, quantize_params

    _, d = saved["llama"]
    model, params = hf.load(d)
    q = quantize_params(params, kind)
    is_q = lambda x: isinstance(x, Quantized)  # noqa: E731
    assert any(is_q(x) for x in jax.tree_util.tree_leaves(q, is_leaf=is_q))
    ids, mask = prompts()
    np.testing.assert_array_equal(generate(model, q, ids, mask, max_new_tokens=6), rerun_greedy(model, q, ids, mask, 6))


@pytest.mark.parametrize("scan,method", [(False, "none"), (True, "ptuning_v2"), (False, "lora+ptuning_v2")])
def test_cached_logits_equal_full_forward(saved, scan, method):
    """Prefill then one token at a time through the cache: the logits of the full forward, every slot."""
    import flax.linen as nn

    from jaxft.config import base_config
    from jaxft.peft import build
    from jaxft.peft.partition import added_params, flat, merge, unflat

    _, d = saved["mistral"]  # with its sliding window
    model, params = hf.load(d, scan_layers=scan)
    if method != "none":
        m = base_config().method
        m.name, m.num_virtual_tokens, m.rank = method, 3, 4
        model = family.build(model.cfg, build(m, model.cfg).hooks)
        fresh = nn.unbox(jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32))["params"])
        added = {k: 0.5 * jax.random.normal(jax.random.PRNGKey(i), v.shape)
                 for i, (k, v) in enumerate(flat(added_params(fresh)).items())}
        params = merge(params, unflat(added))
    ids, mask = prompts(width=9)
    full = model.apply({"params": params}, ids, mask)
    slots, first = 12, 5
    cache = family.of(model.cfg).init_cache(model.cfg, 3, slots, jnp.float32)
    slot_mask = np.zeros((3, slots), np.int32)
    slot_mask[:, :first] = mask[:, :first]
    apply = jax.jit(lambda *a: model.apply({"params": params}, *a[:2], cache=a[2], cache_index=a[3]))
    logits, cache = apply(ids[:, :first], slot_mask, cache, jnp.int32(0))
    parts = [logits]
    for i in range(first, 9):
        slot_mask[:, i] = mask[:, i]
        logits, cache = apply(ids[:, i:i + 1], slot_mask, cache, jnp.int32(i))
        parts.append(logits)
    real = mask == 1
    np.testing.assert_allclose(np.concatenate(parts, 1)[real], np.asarray(full)[real], atol=2e-5, rtol=1e-5)


def test_sampling(saved):
    _, d = saved["llama"]
    model, params = hf.load(d)
    ids, mask = prompts()
    kw = dict(max_new_tokens=NEW, temperature=1.5, top_p=0.9, top_k=20, repetition_penalty=1.3)
    a = generate(model, params, ids, mask, seed=1, **kw)
    np.testing.assert_array_equal(a, generate(model, params, ids, mask, seed=1, **kw))
    assert not (a == generate(model, params, ids, mask, seed=2, **kw)).all()
    greedy = generate(model, params, ids, mask, max_new_tokens=NEW)
    np.testing.assert_array_equal(generate(model, params, ids, mask, max_new_tokens=NEW, temperature=0.7, top_k=1,
                                           seed=3), greedy)
    # beam sampling runs and is reproducible
    b = generate(model, params, ids, mask, max_new_tokens=NEW, num_beams=3, temperature=1.0, seed=4)
    np.testing.assert_array_equal(b, generate(model, params, ids, mask, max_new_tokens=NEW, num_beams=3,
                                              temperature=1.0, seed=4))


def test_repetition_penalty_matches_transformers(saved):
    m, d = saved["llama"]
    model, params = hf.load(d)
    ids, mask = prompts()
    for beams in (1, 4):
        out = generate(model, params, ids, mask, max_new_tokens=NEW, repetition_penalty=1.8, num_beams=beams,
                       pad_token_id=PAD)
        np.testing.assert_array_equal(out, hf_generate(m, ids, mask, repetition_penalty=1.8, num_beams=beams))


@pytest.mark.parametrize("beams", [1, 3])
def test_logits_processors_match_transformers(beams):
    from transformers.generation.logits_process import (
        LogitsProcessorList, RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper, TopKLogitsWarper,
        TopPLogitsWarper,
    )

    rs = np.random.RandomState(0)
    scores = (rs.randn(4, 50) * 3).astype(np.float32)
    seq = rs.randint(0, 50, (4, 7))
    keep = 2 if beams > 1 else 1  # one EOS id: beams keep two tokens
    hf_procs = LogitsProcessorList([RepetitionPenaltyLogitsProcessor(1.3), TemperatureLogitsWarper(0.7),
                                    TopKLogitsWarper(10, min_tokens_to_keep=keep),
                                    TopPLogitsWarper(0.8, min_tokens_to_keep=keep)])
    want = hf_procs(torch.tensor(seq), torch.tensor(scores)).numpy()
    s = gen.Settings(4, temperature=0.7, top_k=10, top_p=0.8, repetition_penalty=1.3, num_beams=beams, num_eos=1)
    seen = np.zeros(scores.shape, bool)
    np.put_along_axis(seen, seq, True, 1)
    got = np.asarray(gen.process(s, jnp.asarray(scores), jnp.asarray(seen)))
    np.testing.assert_array_equal(np.isinf(got), np.isinf(want))
    np.testing.assert_allclose(got[~np.isinf(got)], want[~np.isinf(want)], rtol=1e-6)
    assert np.isinf(got).any() and not np.isinf(got).all(axis=1).any()


def test_no_recompilation_per_token(saved):
    _, d = saved["llama"]
    model, params = hf.load(d)
    ids, mask = prompts()
    for beams in (1, 2):
        gen.TRACES.clear()
        generate(model, params, ids, mask, max_new_tokens=12, num_beams=beams)
        assert gen.TRACES["step"] == 2  # the prefill and the loop body, not one per token
        other, _ = prompts(seed=5)
        generate(model, params, other, mask, max_new_tokens=12, num_beams=beams)
        assert gen.TRACES["step"] == 2
        assert gen.compiled(model, gen.Settings(12, num_beams=beams))._cache_size() == 1


def test_bad_arguments(saved):
    _, d = saved["llama"]
    model, params = hf.load(d)
    ids, mask = prompts()
    for kw, text in [(dict(max_new_tokens=0), "max_new_tokens=0"), (dict(max_new_tokens=2, top_p=0), "top_p=0"),
                     (dict(max_new_tokens=2, num_beams=0), "num_beams=0"),
                     (dict(max_new_tokens=2, temperature=-1), "temperature=-1")]:
        with pytest.raises(JaxftError, match=text):
            generate(model, params, ids, mask, **kw)
    with pytest.raises(JaxftError, match="row 0 has no real token"):
        generate(model, params, ids, np.zeros_like(mask), max_new_tokens=2)


# ---------------------------------------------------------------------------------------------
# The command line.


def cli(*args, cwd=ROOT):
    return python_m("jaxft.generate", *args, cwd=cwd, timeout=600)


def test_cli_bundled_model(tmp_path):
    from jaxft.tokenizer import Tokenizer

    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text("the movie was\n\na charming and funny film\n")
    r = cli("--model=jaxft-tiny", f"--prompts={prompts_file}", "--max_new_tokens=8",
            f"--compilation_cache={tmp_path / 'xla'}")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.rstrip("\n").split("\n")
    assert len(lines) == 2  # blank lines are skipped
    assert any(p.name.endswith("-cache") for p in (tmp_path / "xla").iterdir())  # the compiled generation
    model, params = hf.load("jaxft-tiny")
    tok = Tokenizer(hf.BUNDLED_MODELS["jaxft-tiny"])
    texts = ["the movie was", "a charming and funny film"]
    rows = [tok.bos + tok.encode(t) for t in texts]
    width = max(map(len, rows))
    ids = np.array([[tok.pad_id] * (width - len(r)) + r for r in rows])
    mask = np.array([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    out = generate(model, params, ids, mask, max_new_tokens=8, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
    want = [tok.decode(until_eos(row, tok.eos_id)).replace("\n", "\\n") for row in out]
    assert lines == want
    one = cli("--model=jaxft-tiny", "--prompt=the movie was", "--max_new_tokens=8")
    assert one.returncode == 0, one.stderr
    assert one.stdout.rstrip("\n") == want[0]


def test_cli_chat_renders_prompts_as_sft_trains_on_them(tmp_path):
    """--chat: each prompt a user turn (after --system) in the chat template with its generation prompt
    (the text transformers' apply_chat_template renders), tokenized as SFT's generation eval tokenizes
    it; answers end at the template's end of answer."""
    import json
    import shutil

    from transformers import AutoTokenizer

    from jaxft.data import generation, sft
    from jaxft.data.sources import Records
    from jaxft.tokenizer import Tokenizer

    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text("Name a film.\n用中文说你好\n")
    r = cli("--model=jaxft-tiny", f"--prompts={prompts_file}", "--chat", "--system=Be brief.", "--max_new_tokens=12")
    assert r.returncode == 0, r.stderr
    model, params = hf.load("jaxft-tiny")
    tok = Tokenizer(hf.BUNDLED_MODELS["jaxft-tiny"])
    d = tmp_path / "tok"  # jaxft-tiny's tokenizer with the template it is rendered with (jaxft's default) written in
    shutil.copytree(hf.BUNDLED_MODELS["jaxft-tiny"], d, ignore=shutil.ignore_patterns("*.safetensors"))
    config = json.loads((d / "tokenizer_config.json").read_text())
    (d / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": sft.DEFAULT_TEMPLATE}))
    hf_tok = AutoTokenizer.from_pretrained(str(d))
    want = []
    for text in ("Name a film.", "用中文说你好"):
        chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": text}]
        rendered = hf_tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
        assert rendered.startswith("<s>Be brief.") and rendered.endswith("### Response:\n")
        ids, _ = generation.prompts_and_references(Records([{"messages": chat + [{"role": "assistant", "content": "x"}]}],
                                                           ["f:1"]), tok, 256, max_new_tokens=12)
        assert ids[0][0] == tok.bos_id and tok.decode(ids[0]) == rendered.removeprefix("<s>")  # decode drops <s>
        out = generate(model, params, np.array(ids), np.ones((1, len(ids[0])), np.int32), max_new_tokens=12,
                       eos_token_id=sft.stop_ids(tok), pad_token_id=tok.pad_id)
        want.append(tok.decode(until_eos(out[0], tok.eos_id)).replace("\n", "\\n"))
    assert r.stdout.rstrip("\n").split("\n") == want
    plain = cli("--model=jaxft-tiny", "--prompt=Name a film.", "--max_new_tokens=12")
    assert plain.returncode == 0 and plain.stdout.rstrip("\n") != want[0]  # without --chat: the bare text


@pytest.mark.parametrize("name", ["jaxft-tiny-t5", "jaxft-tiny-bert"])
def test_cli_finds_t5_and_bert_tokenizers(name):
    """A directory with T5's spiece.model or BERT's vocab.txt is its own tokenizer, as one with
    tokenizer.model is: the same answer as with --tokenizer= given."""
    given = cli(f"--model={name}", f"--tokenizer={hf.BUNDLED_MODELS[name]}", "--prompt=the movie was", "--max_new_tokens=4")
    found = cli(f"--model={name}", "--prompt=the movie was", "--max_new_tokens=4")
    if name == "jaxft-tiny-bert":  # found, then refused for what it is: an encoder without a generating head
        assert found.returncode == given.returncode == 2 and found.stderr == given.stderr
        assert "tokenizer" not in found.stderr, found.stderr
        return
    assert given.returncode == 0, given.stderr
    assert found.returncode == 0 and found.stdout == given.stdout and found.stdout.strip(), found.stderr


def test_cli_adapter_and_bad_input(saved, tok_dir, tmp_path):
    import shutil

    from peft import LoraConfig

    torch.manual_seed(0)  # a model whose vocabulary is the test tokenizer's, saved with it
    model_dir = tmp_path / "model"
    LlamaForCausalLM(HFLlamaConfig(**{**TINY, "vocab_size": 300})).save_pretrained(model_dir)
    shutil.copy(tok_dir / "tokenizer.model", model_dir)
    pm = _peft(model_dir, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], init_lora_weights=False,
                                     task_type="CAUSAL_LM"), tmp_path / "adapter")
    r = cli(f"--model={model_dir}", f"--adapter={tmp_path / 'adapter'}", "--prompt=the film", "--num_beams=2",
            "--max_new_tokens=4", "--repetition_penalty=1.2")
    assert r.returncode == 0, r.stderr
    from jaxft.tokenizer import Tokenizer

    tok = Tokenizer(model_dir)
    ids = np.array([tok.bos + tok.encode("the film")])
    want = hf_generate(pm, ids, np.ones_like(ids), new=4, num_beams=2, repetition_penalty=1.2, eos_token_id=tok.eos_id)
    # decoded as jaxft decodes answers (no stray bytes at the end of one that ran out of tokens)
    assert r.stdout.rstrip("\n") == gen.answer_text(tok, want[0], tok.eos_id).replace("\n", "\\n")
    # generation_config.json's end ids stop plain prompts too, as transformers' generate: here the greedy
    # answer's second token
    greedy = hf_generate(pm, ids, np.ones_like(ids), new=4, eos_token_id=tok.eos_id)[0]
    (model_dir / "generation_config.json").write_text(json.dumps({"eos_token_id": [tok.eos_id, int(greedy[1])]}))
    r = cli(f"--model={model_dir}", f"--adapter={tmp_path / 'adapter'}", "--prompt=the film", "--max_new_tokens=4")
    assert r.returncode == 0, r.stderr
    assert r.stdout.rstrip("\n") == gen.answer_text(tok, greedy[:1], tok.eos_id).replace("\n", "\\n")
    _, d = saved["llama"]
    bad = [
        (["--prompt=x"], "--model"),
        (["--model=jaxft-tiny"], "--prompt"),
        (["--model=jaxft-tiny", "--prompt=x", "--prompts=p.txt"], "--prompt"),
        (["--model=jaxft-tiny", f"--prompts={tmp_path / 'missing.txt'}"], "missing.txt"),
        (["--model=jaxft-tiny", "--prompt=x", "--top_p=2"], "top_p=2"),
        (["--model=jaxft-tiny", "--prompt=x", "--num_beams=two"], "num_beams"),
        (["--model=jaxft-tiny", "--prompt=x", "--system=Be brief."], "--chat"),
        (["--model=jaxft-tiny", "--prompt=x", "--chat_template_kwargs=enable_thinking=false"], "--chat"),
        (["--model=jaxft-tiny", "--prompt=x", "--chat", "--chat_template_kwargs=thinking"], "'thinking'"),
        (["--model=/no/such/dir", "--prompt=x"], "/no/such/dir"),
        (["--model=jaxft-tiny", f"--adapter={tmp_path}", "--prompt=x"], str(tmp_path)),
        (["--model=jaxft-tiny", "--prompt=x", "--compilation_cache=README.md/xla"], "README.md is a file"),
        ([f"--model={d}", "--prompt=x"], "tokenizer"),
    ]
    for args, text in bad:
        r = cli(*args)
        assert r.returncode == 2, (args, r.stdout, r.stderr)
        err = r.stderr.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and text in err[0], (args, r.stderr)


def test_prompts_file_with_a_byte_order_mark(tmp_path):
    """Windows Notepad saves UTF-8 with a byte order mark (EF BB BF): it is not part of the first prompt, as
    jaxft's data files read it (before, U+FEFF became 3 byte tokens in front of the first prompt)."""
    from jaxft.data.sources import read_file

    p = tmp_path / "prompts.txt"
    p.write_bytes("\ufeff今天天气很好，\n\n写一首诗。\n".encode("utf-8"))
    args = gen.parse_args(["--model=jaxft-tiny", f"--prompts={p}"])
    assert gen.read_prompts(args) == ["今天天气很好，", "写一首诗。"] == [r["text"] for r in read_file(p).rows]


def gpt2_bytes() -> dict[str, int]:
    """GPT-2's byte-level alphabet, character -> byte (its bytes_to_unicode, inverted)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = [b for b in range(256) if b not in keep]
    return {**{chr(b): b for b in keep}, **{chr(256 + i): b for i, b in enumerate(extra)}}


@pytest.mark.parametrize("kind", ["sentencepiece", "tokenizer.json", "byte_level_bpe"])
def test_an_answer_cut_inside_a_character_ends_before_it(kind, tmp_path):
    """jaxft-tiny writes most Chinese characters as 3 byte tokens: an answer that runs out of new tokens
    after the first 1 or 2 of them ends before that character, not in U+FFFD (before: 1 or 2 U+FFFD, which
    sacrebleu's zh tokenizer scores as words of the answer). Oracle: the tokens' bytes
    as UTF-8, a character cut short at the end left out. For jaxft-tiny as SentencePiece, as transformers'
    tokenizer.json (whose byte-fallback decoder turns a whole run of byte tokens into U+FFFD) and a
    byte-level BPE (Qwen2's kind: a character's bytes inside tokens, each token's bytes whole)."""
    import transformers
    from tokenizers import Tokenizer as RustTokenizer, decoders, models, pre_tokenizers, trainers

    from jaxft.tokenizer import Tokenizer

    text = "细胞理论是生物科学的一个理论😀，好的。OK"
    d = hf.resolve("jaxft-tiny")
    if kind == "tokenizer.json":  # transformers' conversion of the same SentencePiece model
        d = tmp_path / "tok"
        transformers.AutoTokenizer.from_pretrained(str(hf.resolve("jaxft-tiny"))).save_pretrained(d)
        assert not (d / "tokenizer.model").exists()
    elif kind == "byte_level_bpe":
        rust = RustTokenizer(models.BPE())
        rust.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        rust.decoder = decoders.ByteLevel()
        rust.train_from_iterator(["理论是科学", "好的 OK"] * 3, trainers.BpeTrainer(
            vocab_size=300, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
        d = tmp_path / "bpe"
        transformers.PreTrainedTokenizerFast(tokenizer_object=rust, eos_token="<|endoftext|>").save_pretrained(d)
    tok = Tokenizer(d)
    alphabet = gpt2_bytes()

    def token_bytes(i) -> bytes:
        piece = tok.piece(i)
        if kind == "byte_level_bpe":
            return bytes(alphabet[c] for c in piece)
        if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
            return bytes([int(piece[3:5], 16)])
        return piece.replace("\u2581", " ").encode()

    ids = tok.encode(text)
    assert tok.decode(ids) == text
    cut = 0
    for n in range(1, len(ids) + 1):
        raw = b"".join(token_bytes(i) for i in ids[:n])
        want = raw.decode("utf-8", errors="ignore").removeprefix(" ")  # SentencePiece's word mark at the start
        cut += want != raw.decode("utf-8", errors="replace").removeprefix(" ")
        assert gen.answer_text(tok, ids[:n], None) == want, n
    assert cut >= 10  # many cuts fall inside a character
    assert gen.answer_text(tok, ids + [tok.eos_id, 5], tok.eos_id) == text  # up to EOS


FAKE_ANSWER = """
import sys
import numpy as np
import jaxft.generate as g
from jaxft import hf
from jaxft.tokenizer import Tokenizer

tok = Tokenizer(hf.resolve("jaxft-tiny"))
answer = tok.encode("好的😀 ok\\nbye")  # the model's answer, whatever the prompt
assert tok.decode(answer) == "好的😀 ok\\nbye"
g.generate = lambda *a, **kw: np.array([answer + [tok.eos_id]])
g.main(sys.argv[1:])
"""


@pytest.mark.parametrize("encoding,want", [("gbk", "好的? ok\\nbye\n"), ("utf-8", "好的😀 ok\\nbye\n")])
def test_cli_prints_to_a_console_that_cannot_write_an_emoji(tmp_path, encoding, want):
    """Was: UnicodeEncodeError (a traceback, exit 1) printing an answer with an emoji to a GBK console; now the
    character the console cannot write is `?` and the rest is the answer. A UTF-8 stdout keeps it."""
    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text("hello\n")
    r = subprocess.run([sys.executable, "-c", FAKE_ANSWER, "--model=jaxft-tiny", f"--prompts={prompts_file}",
                        "--max_new_tokens=8"], cwd=ROOT, capture_output=True, timeout=600,
                       env={**os.environ, "PYTHONIOENCODING": encoding})
    assert r.returncode == 0, r.stderr.decode(errors="replace")[-3000:]
    assert r.stdout.decode(encoding) == want


def test_printable_stdout_replaces_only_what_the_encoding_cannot_write(monkeypatch):
    import io

    from jaxft.errors import printable_stdout

    for encoding, written in (("gbk", "好?".encode("gbk")), ("cp1252", b"caf\xe9 ?"), ("utf-8", "好😀".encode())):
        raw = io.BytesIO()
        out = io.TextIOWrapper(raw, encoding=encoding)
        monkeypatch.setattr(sys, "stdout", out)
        printable_stdout()
        print("好😀" if encoding != "cp1252" else "café 😀", end="")
        out.flush()
        assert raw.getvalue() == written, encoding
        assert out.errors == ("strict" if encoding == "utf-8" else "replace")
