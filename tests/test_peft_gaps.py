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


def prompts(lengths=(5, 8, 3), width=8, seed=0):
    """A left-padded batch of prompts of different lengths."""
    rs = np.random.RandomState(seed)
    ids, mask = np.full((len(lengths), width), PAD, np.int64), np.zeros((len(lengths), width), np.int64)
    for r, n in enumerate(lengths):
        ids[r, width - n:], mask[r, width - n:] = rs.randint(1, 96, n), 1
    return ids, mask


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


@pytest.mark.parametrize("name,kind,beams", [("llama", "prompt_tuning", 1), ("llama", "ptuning", 3),
                                             ("gpt2", "ptuning", 1), ("gpt2", "prompt_tuning", 3)])
def test_soft_prompt_generation_matches_peft(lms, tmp_path, name, kind, beams):
    """A padded batch of prompts of different lengths: each row as PeftModel.generate makes it alone."""
    from peft import get_peft_model

    m, d = lms[name]
    torch.manual_seed(1)
    pm = get_peft_model(copy.deepcopy(m), soft_prompt_config(kind)).eval()
    pm.save_pretrained(tmp_path)
    model, params = hf.load(d, adapter=tmp_path)
    ids, mask = prompts()
    out = generate(model, params, ids, mask, max_new_tokens=NEW, num_beams=beams, pad_token_id=PAD, eos_token_id=96)
    for r in range(len(ids)):
        np.testing.assert_array_equal(out[r], peft_generate(pm, ids[r:r + 1, mask[r] == 1], beams)[0])
    with torch.no_grad():  # the prompt changes what is generated
        plain = m.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), max_new_tokens=NEW,
                           do_sample=False, num_beams=beams, pad_token_id=PAD, eos_token_id=[96]).numpy()
    assert not (plain[:, ids.shape[1]:] == out).all()
