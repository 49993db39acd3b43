"""Instruction SFT (`jaxft.data.sft`, `jaxft.data.mixture`): record formats, chat templates against
transformers' `apply_chat_template` (text, ids and assistant masks), the truncation rule, packing
(a packed batch's loss is the sum of the examples' losses alone, every attention implementation),
mixtures, and the CLI: bad records, a short SFT run whose loss falls and resumes exactly."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_train import cli, losses

from jaxft.data import iterator, sft, tasks
from jaxft.data.sources import Records, read_file
from jaxft.errors import JaxftError
from jaxft.models import attention as A
from jaxft.models.llama import LlamaConfig, LlamaModel, segment_positions
from jaxft.objectives import causal_lm_loss, packed_inputs
from jaxft.tokenizer import Tokenizer

GPT2 = Path("/work/shared/data/tokenizers/gpt2")
CHATML = (  # Qwen2-style, with transformers' {% generation %} markup around what the model must learn
    "{% for m in messages %}"
    "{% if m.role == 'assistant' %}{{ '<|im_start|>assistant\\n' }}"
    "{% generation %}{{ m.content + '<|im_end|>\\n' }}{% endgeneration %}"
    "{% else %}{{ '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
CHATS = [
    [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "4."}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi there"},
     {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "用中文说再见"},
     {"role": "assistant", "content": "再见 ，朋友。"}],
]


@pytest.fixture(scope="module")
def chatml_dir(tmp_path_factory):
    """A byte-level BPE tokenizer (GPT-2's) with ChatML special tokens and a chat template."""
    from transformers import PreTrainedTokenizerFast

    if not (GPT2 / "tokenizer.json").is_file():
        pytest.skip("no GPT-2 tokenizer.json in shared/data")
    out = tmp_path_factory.mktemp("chatml")
    t = PreTrainedTokenizerFast(tokenizer_file=str(GPT2 / "tokenizer.json"), eos_token="<|im_end|>",
                                additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    t.chat_template = CHATML
    t.save_pretrained(out)
    config = json.loads((out / "tokenizer_config.json").read_text())
    config["chat_template"] = CHATML  # in tokenizer_config.json, as most hub models still have it
    (out / "tokenizer_config.json").write_text(json.dumps(config))
    (out / "chat_template.jinja").unlink(missing_ok=True)
    return out


# ---------------------------------------------------------------------------------------------
# Formats


def test_record_formats():
    conv = sft.conversation
    assert conv({"instruction": "Sum", "input": "1 2", "output": "3"}, "f:1") == [
        {"role": "user", "content": "Sum\n\n1 2"}, {"role": "assistant", "content": "3"}]
    assert conv({"instruction": "Hi", "input": "", "output": "Yo", "system": "Be brief.",
                 "history": [["a", "b"]]}, "f:1") == [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b"}, {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Yo"}]
    share = {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}], "system": "s"}
    assert conv(share, "f:1") == [{"role": "system", "content": "s"}, {"role": "user", "content": "q"},
                                  {"role": "assistant", "content": "a"}]
    assert conv({"messages": CHATS[1]}, "f:1") == CHATS[1]
    pair = {"content": "类型#裙", "summary": "一条裙子"}
    assert conv(pair, "f:1", sft.Fields("content", "summary")) == [
        {"role": "user", "content": "类型#裙"}, {"role": "assistant", "content": "一条裙子"}]


@pytest.mark.parametrize("row, message", [
    ({"instruction": "x", "output": ""}, "empty assistant turn"),
    ({"instruction": "x", "output": 3}, "'output' is int"),
    ({"messages": [{"role": "user", "content": "q"}]}, "no assistant turn"),
    ({"messages": [{"role": "bot", "content": "q"}]}, "role 'bot' is not one of"),
    ({"conversations": "q"}, "not a non-empty list"),
    ({"text": "q"}, "not an SFT record"),
])
def test_bad_records_name_where(row, message):
    with pytest.raises(sft.BadRecord) as e:
        sft.conversation(row, "data.jsonl:7")
    assert str(e.value).startswith("data.jsonl:7: ") and message in str(e.value)


def test_task_detection():
    rec = lambda row: Records([row], ["f:1"])  # noqa: E731
    assert tasks.choose_task("", rec({"instruction": "a", "output": "b"}), "f", "text", "label", False) == "sft"
    assert tasks.choose_task("", rec({"messages": []}), "f", "text", "label", False) == "sft"
    assert tasks.choose_task("", rec({"a": 1, "b": 2}), "f", "text", "label", False, sft.Fields("a", "b")) == "sft"
    assert tasks.choose_task("", rec({"text": "x"}), "f", "text", "label", False) == "causal_lm"


def test_txt_documents(tmp_path):
    p = tmp_path / "corpus.txt"
    p.write_text("first doc\nline two\n\n\n\nsecond doc\n\nthird\n")
    r = read_file(p)
    assert r.rows == [{"text": "first doc\nline two"}, {"text": "second doc"}, {"text": "third"}]
    assert r.where == [f"{p}:1", f"{p}:6", f"{p}:8"]


# ---------------------------------------------------------------------------------------------
# Templates against transformers


@pytest.mark.parametrize("chat", CHATS, ids=["one-turn", "multi-turn"])
def test_chat_template_matches_transformers(chatml_dir, chat):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(chatml_dir))
    tok = Tokenizer(chatml_dir)
    r = sft.renderer(tok)
    assert r.where.endswith("tokenizer_config.json")
    for gen in (False, True):
        prompt = chat[:-1] if gen else chat
        assert r(prompt, add_generation_prompt=gen) == hf.apply_chat_template(prompt, tokenize=False,
                                                                             add_generation_prompt=gen)
    ids, mask = sft.encode(r.segments(chat), tok)
    out = hf.apply_chat_template(chat, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    assert ids == list(out["input_ids"])  # tokenised turn by turn, the same ids as the whole text
    assert mask == list(out["assistant_masks"])  # every assistant turn, with its <|im_end|>\n
    assert tok.decode([i for i, m in zip(ids, mask) if m]) == "".join(
        m["content"] + "<|im_end|>\n" for m in chat if m["role"] == "assistant")


# Qwen3's kind of template (written here in its manner): an answer after the last question shows its
# reasoning in <think> tags; earlier answers lose theirs. Rendering a later turn rewrites an earlier one.
THINKING = (
    "{%- set ns = namespace(found=false, last_query=messages|length - 1) %}"
    "{%- for m in messages[::-1] %}{%- if m.role == 'user' and not ns.found %}"
    "{%- set ns.found = true %}{%- set ns.last_query = (messages|length - 1) - loop.index0 %}{%- endif %}"
    "{%- endfor %}"
    "{%- for m in messages %}"
    "{%- if m.role == 'assistant' %}"
    "{%- set content = m.content %}{%- set thought = '' %}"
    "{%- if m.reasoning_content is string %}{%- set thought = m.reasoning_content.strip('\n') %}"
    "{%- elif '</think>' in content %}"
    "{%- set thought = content.split('</think>')[0].split('<think>')[-1].strip('\n') %}"
    "{%- set content = content.split('</think>')[-1].lstrip('\n') %}{%- endif %}"
    "{{- '<|im_start|>assistant\n' }}{% generation %}"
    "{%- if loop.index0 > ns.last_query %}{{- '<think>\n' + thought + '\n</think>\n\n' }}{%- endif %}"
    "{{- content + '<|im_end|>\n' }}{% endgeneration %}"
    "{%- else %}{{- '<|im_start|>' + m.role + '\n' + m.content + '<|im_end|>\n' }}{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\n\n</think>\n\n' }}{%- endif %}"
    "{%- endif %}"
)


def with_template(tokenizer_dir, d, template=THINKING):
    """`tokenizer_dir`'s files copied into `d` (which may hold a model already), its chat template `template`."""
    shutil.copytree(tokenizer_dir, d, dirs_exist_ok=True)
    config = json.loads((d / "tokenizer_config.json").read_text())
    (d / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": template}))
    return d


THOUGHTFUL = [{"role": "user", "content": "2 + 2?"}, {"role": "assistant", "content": "<think>Add them.</think>4"},
              {"role": "user", "content": "再乘以三？"}, {"role": "assistant", "content": "<think>4 × 3</think>12"}]


def test_a_template_that_rewrites_earlier_turns_trains_each_answer_alone(chatml_dir, tmp_path):
    """Each answer of a conversation is its own example, the conversation before it as the template
    renders it then (transformers' ids), the answer alone learned (transformers' assistant mask of that
    turn); a preference side and a generation prompt read the last answer the same way."""
    from transformers import AutoTokenizer

    from jaxft.data import generation, preference

    d = with_template(chatml_dir, tmp_path / "thinking")
    hf, tok = AutoTokenizer.from_pretrained(str(d)), Tokenizer(d)
    r = sft.renderer(tok)
    with pytest.raises(sft.NotTurnByTurn, match="does not render turn by turn"):
        r.segments(THOUGHTFUL)
    enc = sft.examples(Records([{"messages": THOUGHTFUL}, {"messages": CHATS[0]}], ["f:1", "f:2"]), tok, r, 256)
    assert enc.split == 1 and len(enc.examples) == 3  # two answers, then the one-turn chat as before

    def last_run(mask):  # transformers marks every answer; keep the last one's tokens
        start = max(i for i, m in enumerate(mask) if m and (i == 0 or not mask[i - 1]))
        return [int(m and i >= start) for i, m in enumerate(mask)]

    for (ids, mask), end in zip(enc.examples, (2, 4)):
        out = hf.apply_chat_template(THOUGHTFUL[:end], tokenize=True, return_dict=True,
                                     return_assistant_tokens_mask=True)
        assert ids == list(out["input_ids"]) and mask == last_run(list(out["assistant_masks"]))
    first, second = (tok.decode([i for i, m in zip(ids, mask) if m]) for ids, mask in enc.examples[:2])
    assert first == "<think>\nAdd them.\n</think>\n\n4<|im_end|>\n"
    assert second == "<think>\n4 × 3\n</think>\n\n12<|im_end|>\n"
    assert "Add them" not in tok.decode(enc.examples[1][0])  # the earlier answer as history: no reasoning

    pair = {"conversations": [{"from": "human", "value": "2 + 2?"}, {"from": "gpt", "value": "4"},
                              {"from": "human", "value": "再乘以三？"}],
            "chosen": {"from": "gpt", "value": "<think>4 × 3</think>12"}, "rejected": {"from": "gpt", "value": "7"}}
    arrays, counts = preference.encode(Records([pair], ["p:1"]), tok, r, 256)
    chosen = THOUGHTFUL[:3] + [THOUGHTFUL[3]]
    out = hf.apply_chat_template(chosen, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    n = len(out["input_ids"])
    assert arrays["input_ids"][0][:n].tolist() == list(out["input_ids"])
    assert arrays["loss_mask"][0][:n].tolist() == last_run(list(out["assistant_masks"]))
    prompts, references = generation.prompts_and_references(Records([{"messages": THOUGHTFUL}], ["g:1"]), tok, 256,
                                                            max_new_tokens=16)
    assert prompts[0] == list(hf.apply_chat_template(THOUGHTFUL[:3], tokenize=True, return_dict=True,
                                                     add_generation_prompt=True)["input_ids"])
    assert references == [THOUGHTFUL[3]["content"]]

    # the reasoning apart from the answer (`reasoning_content`), as transformers hands it to the template
    apart = [{"role": "user", "content": "2 + 2?"}, {"role": "assistant", "content": "4", "reasoning_content": "Add."}]
    assert sft.conversation({"messages": apart}, "f:1") == apart
    [(ids, mask)] = sft.examples(Records([{"messages": apart}], ["f:1"]), tok, r, 256).examples
    out = hf.apply_chat_template(apart, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    assert ids == list(out["input_ids"]) and mask == list(out["assistant_masks"])
    assert tok.decode([i for i, m in zip(ids, mask) if m]) == "<think>\nAdd.\n</think>\n\n4<|im_end|>\n"


def test_template_variables_as_transformers_passes_them(chatml_dir, tmp_path):
    """data.chat_template_kwargs=enable_thinking=false (Qwen3's non-thinking mode): the text and ids of
    transformers' apply_chat_template(..., enable_thinking=False); the empty reasoning block is part of
    the generation prompt, so it is prompt in training too, and the eval prompts end with it."""
    from transformers import AutoTokenizer

    from jaxft.data import generation, prompts

    d = with_template(chatml_dir, tmp_path / "thinking")
    hf, tok = AutoTokenizer.from_pretrained(str(d)), Tokenizer(d)
    chat = [{"role": "user", "content": "2 + 2?"}, {"role": "assistant", "content": "4"}]
    plain, quiet = sft.renderer(tok), sft.renderer(tok, "", "enable_thinking=false")
    for gen in (False, True):
        prompt = chat[:-1] if gen else chat
        want = hf.apply_chat_template(prompt, tokenize=False, add_generation_prompt=gen, enable_thinking=False)
        assert quiet(prompt, add_generation_prompt=gen) == want
    assert plain(chat[:1], add_generation_prompt=True) != quiet(chat[:1], add_generation_prompt=True)
    ids, mask = sft.examples(Records([{"messages": chat}], ["f:1"]), tok, quiet, 64).examples[0]
    # the prompt's ids as generation sees them (its "\n\n" one token, where the whole text splits it in two)
    prompt = list(hf.apply_chat_template(chat[:1], tokenize=True, return_dict=True, add_generation_prompt=True,
                                         enable_thinking=False)["input_ids"])
    assert ids == prompt + hf.encode("4<|im_end|>\n", add_special_tokens=False)
    assert mask == [0] * len(prompt) + [1] * (len(ids) - len(prompt))  # the empty <think> block: prompt
    ids, mask = sft.examples(Records([{"messages": chat}], ["f:1"]), tok, plain, 64).examples[0]
    assert tok.decode([i for i, m in zip(ids, mask) if m]) == "<think>\n\n</think>\n\n4<|im_end|>\n"
    prompts, _ = generation.prompts_and_references(Records([{"messages": chat}], ["g:1"]), tok, 64,
                                                   chat_template_kwargs="enable_thinking=false")
    assert prompts[0] == prompt

    assert sft.template_variables("enable_thinking=false, reasoning_effort=high,n=2") == {
        "enable_thinking": False, "reasoning_effort": "high", "n": 2}
    assert sft.template_variables('{"tools": [{"name": "f"}]}') == {"tools": [{"name": "f"}]}
    assert sft.template_variables("") == {}
    for bad, match in (("enable_thinking", "expected name=value"), ("2x=1", "expected name=value"),
                       ("{1: 2}", "invalid JSON"), ("[1]", "expected name=value"),
                       ("eos_token=x", "set by jaxft itself")):
        with pytest.raises(JaxftError, match=match):
            sft.template_variables(bad)
    with pytest.raises(JaxftError, match=r"data.chat_template_kwargs: the chat template jaxft's default \(Alpaca "
                                         r"layout\) does not read 'enable_thinking': expected one of the variables "
                                         r"it reads \(bos_token, eos_token\)"):
        sft.renderer(tok, "default", "enable_thinking=false")  # a setting that would change nothing
    from jaxft.config import base_config, validate

    c = base_config()
    c.model.path, c.data.chat_template_kwargs = "jaxft-tiny", "thinking"
    with pytest.raises(JaxftError, match="data.chat_template_kwargs: 'thinking'"):
        validate(c)  # at start-up, before anything is written


def test_generation_stops_where_the_chat_template_ends_an_answer(chatml_dir, tok_dir, tmp_path):
    """A base model's tokenizer (EOS <|endoftext|>) under a ChatML template: the answers it learns end in
    <|im_end|>, so its generation eval stops there too; where EOS is what ends an answer (an instruct
    tokenizer, jaxft's default template), EOS alone."""
    from ml_collections import ConfigDict

    from jaxft import evaluate

    base = tmp_path / "base"
    shutil.copytree(chatml_dir, base)
    config = json.loads((base / "tokenizer_config.json").read_text())
    (base / "tokenizer_config.json").write_text(json.dumps({**config, "eos_token": "<|endoftext|>"}))
    tok = Tokenizer(base)
    endoftext, im_end = tok.token_id("<|endoftext|>"), tok.token_id("<|im_end|>")
    assert tok.eos == [endoftext] and tok.is_special(im_end) and not any(map(tok.is_special, tok.encode("hi 你好")))
    assert sft.stop_ids(tok) == [endoftext, im_end]
    assert sft.stop_ids(Tokenizer(chatml_dir)) == [im_end]
    plain = Tokenizer(tok_dir)
    assert sft.stop_ids(plain) == plain.eos and plain.is_special(plain.eos_id)  # "...</s>": EOS ends an answer
    c = ConfigDict({"eval": {"max_new_tokens": 8, "num_beams": 1, "repetition_penalty": 1.0},
                    "data": {"chat_template": ""}})
    assert evaluate.decoding(c, tok, encoder_decoder=False)["stop"] == [endoftext, im_end]
    assert evaluate.decoding(c, tok, encoder_decoder=True)["stop"] is None  # T5: its EOS

    # generate_texts cuts each answer at the first of the stop ids
    cfg = LlamaConfig(vocab_size=tok.vocab_size, hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2,
                      num_kv_heads=1, head="causal_lm")
    model = LlamaModel(cfg)
    params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32))["params"]
    prompts = [tok.encode("用中文说再见"), tok.encode("What is 2 + 2?")]
    from jaxft.generate import generate

    rows = [list(np.asarray(generate(model, params, np.asarray([p]), np.ones((1, len(p)), np.int32), max_new_tokens=8,
                                     pad_token_id=tok.pad_id))[0]) for p in prompts]
    stop = [int(rows[0][3]), int(rows[1][5])]
    got = evaluate.generate_texts(model, params, prompts, tok, batch_size=2, max_new_tokens=8, stop=stop)
    cut = [next(i for i, t in enumerate(row) if t in stop) for row in rows]
    assert cut[0] <= 3 and cut[1] <= 5 and got == [tok.decode(row[:n]).strip() for row, n in zip(rows, cut)]


def test_generation_also_stops_where_generation_config_says(chatml_dir, tmp_path):
    """generation_config.json's eos_token_id (one id or a list), as transformers' generate reads it: GLM-4's
    chat models end a turn with <|user|>, which its template does not close an answer with. A file that
    names no ids, or bad ones, is one line."""
    d = tmp_path / "glm_like"
    shutil.copytree(chatml_dir, d)
    tok = Tokenizer(d)
    im_start, im_end = tok.token_id("<|im_start|>"), tok.token_id("<|im_end|>")
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": [im_end, im_start]}))
    assert sft.stop_ids(Tokenizer(d)) == [im_end, im_start]
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": im_start, "do_sample": True}))
    assert sft.generation_eos(d) == [im_start] and sft.stop_ids(Tokenizer(d)) == [im_end, im_start]
    (d / "generation_config.json").write_text(json.dumps({"do_sample": True}))
    assert sft.stop_ids(Tokenizer(d)) == [im_end]
    for bad in ('{"eos_token_id": ["x"]}', '{"eos_token_id": '):
        (d / "generation_config.json").write_text(bad)
        with pytest.raises(JaxftError, match=f"^{re.escape(str(d / 'generation_config.json'))}: ") as e:
            sft.stop_ids(Tokenizer(d))
        assert "\n" not in str(e.value)


def test_default_template(tok_dir, tmp_path):
    """No chat template: jaxft's default, whose rendering transformers' renderer agrees with; special
    token strings become their ids; the masked tokens decode to the answers and their EOS."""
    from transformers import AutoTokenizer

    tok = Tokenizer(tok_dir)
    r = sft.renderer(tok)
    assert "default" in r.where
    chat = CHATS[1]
    text = r(chat)
    assert text == ("<s>You are terse.\n\n### Instruction:\nHi there\n\n### Response:\nHello!</s>\n\n"
                    "### Instruction:\n用中文说再见\n\n### Response:\n再见 ，朋友。</s>")
    d = tmp_path / "tok"
    shutil.copytree(tok_dir, d)
    config = json.loads((d / "tokenizer_config.json").read_text())
    (d / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": sft.DEFAULT_TEMPLATE}))
    assert AutoTokenizer.from_pretrained(str(d)).apply_chat_template(chat, tokenize=False) == text
    ids, mask = sft.encode(r.segments(chat), tok)
    assert ids[0] == tok.bos_id and ids.count(tok.eos_id) == 2
    runs, prev = [], 0
    for i, m in zip(ids, mask):  # each run of response tokens, decoded on its own
        if m and not prev:
            runs.append([])
        if m:
            runs[-1].append(i)
        prev = m
    assert [tok.decode(run) for run in runs] == ["Hello!</s>", "再见 ，朋友。</s>"] or \
        [tok.decode([i for i in run if i != tok.eos_id]) for run in runs] == ["Hello!", "再见 ，朋友。"]
    assert [i for i, m in zip(ids, mask) if m].count(tok.eos_id) == 2  # each answer learns to stop
    assert Tokenizer(d).encode_special("<s>a</s>") == [tok.bos_id] + tok.encode("a") + [tok.eos_id]


def test_truncation_rule():
    prompt, response = [1] + list(range(10, 30)), list(range(100, 110))
    ids, mask = prompt + response, [0] * len(prompt) + [1] * len(response)
    # Fits: untouched.
    assert sft.truncate(ids, mask, 64, 1) == (ids, mask, False)
    # A short response is whole; the prompt is cut from the left (BOS kept).
    got, m, cut = sft.truncate(ids[:-6], mask[:-6], 16, 1)
    assert cut and got == [1] + prompt[-11:] + response[:4] and m == [0] * 12 + [1] * 4
    got, m, cut = sft.truncate(ids, mask, 16, 1)
    assert cut and got == [1] + prompt[-7:] + response[:8] and m == [0] * 8 + [1] * 8
    # A response longer than half the budget keeps seq_len // 2 tokens (cut from the right).
    got, m, cut = sft.truncate(ids, mask, 12, 1)
    assert got == [1] + prompt[-5:] + response[:6] and sum(m) == 6


LLAMA2_SP = Path("/work/shared/data/tokenizers/llama2_sentencepiece")
LLAMA2 = ("{% for m in messages %}{% if m.role == 'user' %}{{ bos_token + '[INST] ' + m.content + ' [/INST]' }}"
          "{% elif m.role == 'assistant' %}{{ ' ' + m.content + ' ' + eos_token }}{% endif %}{% endfor %}")


@pytest.mark.parametrize("files", ["tokenizer.model", "tokenizer.json"])
def test_sentencepiece_segments_tokenize_as_the_whole_conversation(tmp_path, files):
    """Llama 2's SentencePiece vocabulary marks the start of what it encodes with '▁': encoded alone, an
    answer would start with one that the conversation, tokenized whole by transformers, lacks (an extra '▁'
    token before Chinese). Each segment is encoded as it follows the one before it."""
    from transformers import AutoTokenizer, LlamaTokenizer

    if not (LLAMA2_SP / "tokenizer.model").is_file():
        pytest.skip("no Llama 2 tokenizer.model in shared/data")
    d = tmp_path / files
    d.mkdir()
    shutil.copy(LLAMA2_SP / "tokenizer.model", d)
    if files == "tokenizer.json":  # transformers' conversion (Metaspace, prepend_scheme "first"), as hub repos ship it
        LlamaTokenizer.from_pretrained(str(d), legacy=False).save_pretrained(str(d))
        (d / "tokenizer.model").unlink()
        hf = AutoTokenizer.from_pretrained(str(d))
    else:  # the SentencePiece model alone, read as transformers' legacy LlamaTokenizer reads it
        hf = LlamaTokenizer.from_pretrained(str(d), legacy=True)
    tok = Tokenizer(d)
    chat = [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "Four, 四。"},
            {"role": "user", "content": "用中文说再见"}, {"role": "assistant", "content": "再见 ，朋友。"}]
    for template in (LLAMA2, sft.DEFAULT_TEMPLATE):
        hf.chat_template = template
        r = sft.Renderer(template, sft.special_strings(tok), "test")
        ids, mask = sft.encode(r.segments(chat), tok)
        assert ids == list(hf.apply_chat_template(chat, tokenize=True, return_dict=True)["input_ids"])
        answers = [tok.decode([i for i, m in zip(ids, mask) if m])]
        assert "再见 ，朋友。" in answers[0] and tok.piece(ids[mask.index(1)]) != "\u2581"


# ---------------------------------------------------------------------------------------------
# Tool calling

# Qwen2.5's kind of tool template (written here in its manner): the tools listed in the system turn, calls
# as <tool_call> JSON, consecutive results in one user turn of <tool_response>s.
TOOLS_TEMPLATE = (
    "{%- if tools %}{{- '<|im_start|>system\n' }}"
    "{%- if messages[0].role == 'system' %}{{- messages[0].content + '\n\n' }}{%- endif %}"
    "{{- '# Tools\n<tools>' }}{%- for tool in tools %}{{- '\n' + (tool | tojson) }}{%- endfor %}"
    "{{- '\n</tools><|im_end|>\n' }}"
    "{%- elif messages[0].role == 'system' %}{{- '<|im_start|>system\n' + messages[0].content + '<|im_end|>\n' }}"
    "{%- endif %}"
    "{%- for m in messages %}"
    "{%- if m.role == 'user' %}{{- '<|im_start|>user\n' + m.content + '<|im_end|>\n' }}"
    "{%- elif m.role == 'assistant' %}{{- '<|im_start|>assistant\n' }}{% generation %}"
    "{%- if m.content %}{{- m.content }}{%- endif %}"
    "{%- for call in m.tool_calls %}{%- set fn = call.function if call.function is defined else call %}"
    "{%- if m.content or not loop.first %}{{- '\n' }}{%- endif %}"
    "{{- '<tool_call>\n{\"name\": \"' + fn.name + '\", \"arguments\": ' + (fn.arguments | tojson) + '}\n</tool_call>' }}"
    "{%- endfor %}{{- '<|im_end|>\n' }}{% endgeneration %}"
    "{%- elif m.role == 'tool' %}"
    "{%- if messages[loop.index0 - 1].role != 'tool' %}{{- '<|im_start|>user' }}{%- endif %}"
    "{{- '\n<tool_response>\n' + m.content + '\n</tool_response>' }}"
    "{%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}{{- '<|im_end|>\n' }}{%- endif %}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}"
)
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "今天的天气",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}
TOOL_CHAT = [  # OpenAI's form: arguments as JSON text, content null beside the calls
    {"role": "system", "content": "You help with travel."},
    {"role": "user", "content": "北京和上海今天天气怎么样？"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "北京"}'}},
        {"id": "c2", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "上海"}'}}]},
    {"role": "tool", "tool_call_id": "c1", "content": "晴，25°C"},
    {"role": "tool", "tool_call_id": "c2", "content": "小雨，19°C"},
    {"role": "assistant", "content": "北京晴，25°C；上海小雨，19°C。"},
]


def _as_transformers_takes_it(chat):
    """TOOL_CHAT with arguments as objects, the form transformers' templates are written for."""
    out = json.loads(json.dumps(chat))
    for m in out:
        for c in m.get("tool_calls", ()):
            c["function"]["arguments"] = json.loads(c["function"]["arguments"])
        if m.get("content") is None:
            m["content"] = ""
    return out


def test_tool_calls_match_transformers(chatml_dir, tmp_path):
    from transformers import AutoTokenizer

    d = with_template(chatml_dir, tmp_path / "tools", TOOLS_TEMPLATE)
    hf, tok = AutoTokenizer.from_pretrained(str(d)), Tokenizer(d)
    messages = sft.conversation({"messages": TOOL_CHAT, "tools": [WEATHER]}, "f:1")
    assert messages == _as_transformers_takes_it(TOOL_CHAT)
    r = sft.renderer(tok)
    [segments] = r.examples(messages, sft.record_tools({"tools": [WEATHER]}, "f:1"))
    ids, mask = sft.encode(segments, tok)
    out = hf.apply_chat_template(_as_transformers_takes_it(TOOL_CHAT), tools=[WEATHER], tokenize=True,
                                 return_dict=True, return_assistant_tokens_mask=True)
    assert ids == list(out["input_ids"])
    assert mask == list(out["assistant_masks"])  # the calls are learned, the results are prompt
    learned = tok.decode([i for i, m in zip(ids, mask) if m])
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "上海"}}\n</tool_call>' in learned
    assert "<tool_response>" not in learned and "今天的天气" not in learned
    assert "今天的天气" in tok.decode(ids)  # the tool's schema, listed in the system turn
    # one list of tools for every record (data.chat_template_kwargs), which a record's own replaces
    everyone = sft.renderer(tok, kwargs=json.dumps({"tools": [WEATHER]}))
    assert everyone.examples(messages) == [segments]
    other = {**WEATHER, "function": {**WEATHER["function"], "name": "get_time"}}
    assert everyone(messages, tools=[other]) == r(messages, tools=[other]) != r(messages, tools=[WEATHER])


def test_llama_factory_function_call_records(chatml_dir, tmp_path):
    """LLaMA-Factory's ShareGPT tool records (function_call / observation turns, tools as JSON text) read as
    the chat form says the same."""
    row = {"conversations": [
        {"from": "human", "value": "北京和上海今天天气怎么样？"},
        {"from": "function_call", "value": json.dumps([{"name": "get_weather", "arguments": {"city": "北京"}},
                                                      {"name": "get_weather", "arguments": {"city": "上海"}}])},
        {"from": "observation", "value": "晴，25°C"}, {"from": "observation", "value": "小雨，19°C"},
        {"from": "gpt", "value": "北京晴，25°C；上海小雨，19°C。"}],
        "system": "You help with travel.", "tools": json.dumps([WEATHER])}
    chat = _as_transformers_takes_it(TOOL_CHAT)
    for m in chat:
        m.pop("tool_call_id", None)
        for c in m.get("tool_calls", ()):
            c.pop("id")
    assert sft.conversation(row, "f:1") == chat
    assert sft.record_tools(row, "f:1") == [WEATHER]
    tok = Tokenizer(with_template(chatml_dir, tmp_path / "tools", TOOLS_TEMPLATE))
    enc = sft.examples(Records([row], ["f:1"]), tok, sft.renderer(tok), 512)
    assert len(enc.examples) == 1 and sum(enc.examples[0][1]) > 0


@pytest.mark.parametrize("row, message", [
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "tool_calls": '{"name": '}]},
     "messages[1].tool_calls is not valid JSON"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "tool_calls": [{"function": {}}]}]},
     "messages[1].tool_calls[0]: expected a tool call with a name"),
    ({"messages": [{"role": "user", "content": "q"},
                   {"role": "assistant", "tool_calls": [{"name": "f", "arguments": "[1]"}]}]},
     "messages[1].tool_calls[0].arguments is a list"),
    ({"messages": [{"role": "user", "content": "q", "tool_calls": [{"name": "f"}]},
                   {"role": "assistant", "content": "a"}]}, "a user turn with tool_calls"),
    ({"conversations": [{"from": "human", "value": "q"}, {"from": "function_call", "value": "get_weather"}]},
     "conversations[1].value is not valid JSON"),
])
def test_bad_tool_records_name_where(row, message):
    with pytest.raises(sft.BadRecord) as e:
        sft.conversation(row, "data.jsonl:7")
    assert str(e.value).startswith("data.jsonl:7: ") and message in str(e.value)


def test_bad_tools_field_and_a_template_without_tools(chatml_dir, tok_dir):
    for tools, message in (("[{", "'tools' is not valid JSON"), ({"name": "f"}, "'tools' is a dict")):
        with pytest.raises(sft.BadRecord, match=message):
            sft.record_tools({"tools": tools}, "f:3")
    # jaxft's default template and a plain ChatML one have no tool support: the record is refused, not
    # trained without the calls it answers
    for tok in (Tokenizer(tok_dir), Tokenizer(chatml_dir)):
        with pytest.raises(JaxftError) as e:
            sft.examples(Records([{"messages": TOOL_CHAT}], ["f:3"]), tok, sft.renderer(tok), 256)
        assert str(e.value).startswith("f:3: ") and "does not render the tool call 'get_weather'" in str(e.value)
        with pytest.raises(JaxftError, match="does not render the tool 'get_weather' of 'tools'"):
            sft.examples(Records([{"messages": CHATS[0], "tools": [WEATHER]}], ["f:4"]), tok, sft.renderer(tok), 256)


def test_a_tool_call_is_scored_as_the_model_writes_it(chatml_dir, tmp_path):
    """A generation eval on a turn of tool calls: the prompt lists the tools, the reference is the calls as
    the template renders them, up to where generation stops."""
    from transformers import AutoTokenizer

    from jaxft.data import generation, prompts

    d = with_template(chatml_dir, tmp_path / "tools", TOOLS_TEMPLATE)
    hf, tok = AutoTokenizer.from_pretrained(str(d)), Tokenizer(d)
    row = {"messages": TOOL_CHAT[:3], "tools": [WEATHER]}
    [prompt], [reference] = generation.prompts_and_references(Records([row], ["f:1"]), tok, 512)
    assert prompt == hf.apply_chat_template(_as_transformers_takes_it(TOOL_CHAT[:2]), tools=[WEATHER],
                                            add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    assert reference == ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "北京"}}\n</tool_call>\n'
                         '<tool_call>\n{"name": "get_weather", "arguments": {"city": "上海"}}\n</tool_call>')
    # a GRPO prompt (the turns before the answer) lists them too
    text = prompts.prompt_of(row, "f:1", sft.renderer(tok), "text").text
    assert text == hf.apply_chat_template(_as_transformers_takes_it(TOOL_CHAT[:2]), tools=[WEATHER],
                                          add_generation_prompt=True, tokenize=False)


# ---------------------------------------------------------------------------------------------
# Packing


def tiny(attention="xla", **kw):
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                      head_dim=64 // 4 * 2, head="causal_lm", attention=attention, **kw)
    model = LlamaModel(cfg)
    return model, model.init(jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32))


def examples(n=7, seed=0):
    rng = np.random.RandomState(seed)
    out = []
    for _ in range(n):
        p, r = rng.randint(1, 6), rng.randint(1, 8)
        out.append((list(rng.randint(3, 64, p + r)), [0] * p + [1] * r))
    return out


def test_segment_positions():
    seg = jnp.asarray([[1, 1, 1, 2, 2, 3, 0, 0]])
    assert segment_positions(seg).tolist() == [[0, 1, 2, 0, 1, 0, 0, 1]]


@pytest.mark.parametrize("fused", [False, True])
def test_packed_loss_is_the_sum_of_separate_losses(fused):
    model, params = tiny()
    ex = examples()
    packed = sft.pack(ex, 16, 0)
    assert len(packed["input_ids"]) < len(ex)  # really packed
    assert sorted(int(n) for row in packed["segment_ids"] for n in np.bincount(row)[1:] if n) == \
        sorted(len(x) for x, _ in ex)
    batch = {k: jnp.asarray(v) for k, v in packed.items()}
    total = causal_lm_loss(model.apply(params, **packed_inputs(batch), return_hidden=fused), batch)
    alone_sum, alone_count = 0.0, 0.0
    apply = jax.jit(lambda b: causal_lm_loss(model.apply(params, **packed_inputs(b), return_hidden=fused), b))
    for x, m in ex:  # each alone, right-padded to one shape (padding changes no causal loss)
        s = apply({k: jnp.asarray(v) for k, v in sft.padded([(x, m)], 16, 0).items()})
        alone_sum, alone_count = alone_sum + float(s["loss_sum"]), alone_count + float(s["count"])
    assert float(total["count"]) == alone_count == sum(sum(m[1:]) for _, m in ex)
    np.testing.assert_allclose(float(total["loss_sum"]), alone_sum, rtol=1e-6)
    # Without segment ids the same rows attend across examples: a different loss.
    crossed = {k: v for k, v in batch.items() if k != "segment_ids"}
    s = causal_lm_loss(model.apply(params, **packed_inputs(crossed), return_hidden=fused), crossed)
    assert abs(float(s["loss_sum"]) - alone_sum) > 1e-3


def attention_inputs(prefix=0):
    r = np.random.RandomState(0)
    q, k, v = r.randn(2, 16, 4, 64), r.randn(2, prefix + 16, 2, 64), r.randn(2, prefix + 16, 2, 64)
    seg = np.array([[1] * 5 + [2] * 7 + [3] * 2 + [0] * 2, [1] * 16])
    return tuple(jnp.asarray(x, jnp.float32) for x in (q, k, v)) + (jnp.asarray(seg > 0), jnp.asarray(seg))


@pytest.mark.parametrize("impl", ["xla", "chunked", "splash", "flash"])
def test_every_implementation_keeps_examples_apart(impl, monkeypatch):
    """Each segment's output equals attention over that segment alone (the xla reference); chunked in blocks
    of 4 queries."""
    monkeypatch.setattr(A, "CHUNK", 4)
    if impl in ("splash", "flash") and jax.default_backend() == "gpu":
        pytest.skip("the Pallas TPU kernels run on TPU, or interpreted on CPU")
    q, k, v, mask, seg = attention_inputs()
    ctx = A.pallas_interpret() if impl in ("splash", "flash") and jax.default_backend() != "tpu" else None
    with ctx or _null():
        got = A.attention(q, k, v, mask, impl=impl, segment_ids=seg)
    for b in range(2):
        for s in range(1, 4):
            idx = np.flatnonzero(np.asarray(seg[b]) == s)
            if not len(idx):
                continue
            sl = slice(idx[0], idx[-1] + 1)
            alone = A.attention(q[b:b + 1, sl], k[b:b + 1, sl], v[b:b + 1, sl], mask[b:b + 1, sl], impl="xla")
            np.testing.assert_allclose(got[b, sl], alone[0], atol=2e-5)


def _null():
    import contextlib

    return contextlib.nullcontext()


def test_packing_and_auto():
    """Every implementation takes packed rows (tests/test_attention_packed.py compares them with xla);
    `auto` takes chunked (xla's arithmetic in blocks) for them on a GPU."""
    q, k, v, mask, seg = attention_inputs()
    assert A.resolve("auto", jnp.float32, 64, packed=True) in ("xla", "splash")
    if jax.default_backend() != "gpu":
        return
    assert A.resolve("auto", jnp.bfloat16, 64) == "cudnn"
    assert A.resolve("auto", jnp.bfloat16, 64, packed=True) == "chunked"
    bf = lambda x: x.astype(jnp.bfloat16)  # noqa: E731
    got = A.attention(bf(q), bf(k), bf(v), mask, dtype=jnp.bfloat16, impl="cudnn", segment_ids=seg)
    ref = A.attention(bf(q), bf(k), bf(v), mask, dtype=jnp.bfloat16, impl="xla", segment_ids=seg)
    real = np.asarray(mask)[:, :, None]
    np.testing.assert_allclose(np.where(real, np.asarray(got, np.float32), 0), np.where(real, np.asarray(ref, np.float32), 0),
                               atol=3e-2, rtol=3e-2)


def test_causal_lm_documents_get_segments(tok_dir):
    tok = Tokenizer(tok_dir)
    texts = ["the movie was good", "电影很好看", "a funny story , not boring ."]
    r = Records([{"text": t} for t in texts], [f"m:{i}" for i in range(3)])
    plain, _ = tasks.causal_lm(r, tok, 8, "text")
    seg, _ = tasks.causal_lm(r, tok, 8, "text", segments=True)
    np.testing.assert_array_equal(plain["input_ids"], seg["input_ids"])
    starts = (seg["input_ids"] == tok.bos_id)
    for row, s in zip(starts, seg["segment_ids"]):  # a new segment exactly where a document starts
        assert s[0] == 1 and ((np.diff(s) == 1) == row[1:]).all()


# ---------------------------------------------------------------------------------------------
# Mixtures


def test_mixture_order_follows_weights_and_is_stateless():
    groups = np.array([0] * 30 + [1] * 70)
    arrays = {"input_ids": np.arange(100)[:, None], "weight": np.ones(100, np.float32)}
    b = iterator.Batches(arrays, 10, seed=3, groups=groups, weights=[3, 1])
    epoch = np.concatenate([b.indices(p) for p in range(10)])
    assert (groups[epoch] == 0).sum() == 75  # 3:1 of 100 draws, though source 0 has only 30 examples
    second = np.concatenate([b.indices(p) for p in range(10, 20)])
    both = np.concatenate([epoch, second])
    # Source 0 is read in whole passes: each of its examples 5 times in 150 draws.
    assert np.array_equal(np.bincount(both[groups[both] == 0], minlength=30), np.full(30, 5))
    fresh = iterator.Batches(arrays, 10, seed=3, groups=groups, weights=[3, 1])
    assert np.array_equal(fresh.indices(13), b.indices(13))  # a pure function of (seed, position)


# ---------------------------------------------------------------------------------------------
# Through the CLI

MODEL = ("--config.data.task=sft", "--config.data.seq_len=128", "--config.train.batch_size=8",
         "--config.optimizer.learning_rate=3e-3", "--config.method.name=full")


def alpaca_file(path, n, seed, zh=False):
    from conftest import EN, ZH

    rng = np.random.RandomState(seed)
    rows = []
    for _ in range(n):
        words = [EN[i] for i in rng.randint(0, len(EN), rng.randint(2, 6))]
        if zh:
            words = [ZH[i] for i in rng.randint(0, len(ZH), rng.randint(2, 6))]
        sep = "" if zh else " "
        rows.append({"instruction": "repeat twice", "input": sep.join(words), "output": sep.join(words * 2)})
    path.write_text(json.dumps(rows, ensure_ascii=False, indent=1))
    return path


def tokenizer_args(tok_dir):
    return (f"--config.model.tokenizer={tok_dir}", "--config.model.init.vocab_size=300")


def test_cli_bad_record_is_one_line(tmp_path, tok_dir):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "a", "output": ""}\n')
    r = cli(tmp_path / "run", f"--config.data.name={p}", *MODEL, *tokenizer_args(tok_dir))
    assert r.returncode == 2, r.stdout + r.stderr
    assert r.stderr.count("\n") == 1 and r.stderr.startswith(f"error: {p}:2: empty assistant turn"), r.stderr
    assert not (tmp_path / "run").exists()
    p.write_text("".join('{"instruction": "say it", "output": "the movie was good"}\n' for _ in range(16))
                 + '{"instruction": "a", "output": ""}\n')
    r = cli(tmp_path / "run2", f"--config.data.name={p}", *MODEL, *tokenizer_args(tok_dir),
            "--config.data.skip_bad_records=True", "--config.train.steps=1", "--config.export.enabled=False")
    assert r.returncode == 0, r.stderr
    assert f"16 examples, 0 longer than data.seq_len=128 truncated" in r.stdout
    assert f"1 bad records skipped (first: {p}:17: empty assistant turn" in r.stdout


@pytest.fixture(scope="module")
def mixture(tmp_path_factory, tok_dir):
    d = tmp_path_factory.mktemp("mix")
    en, zh = alpaca_file(d / "en.json", 96, 0), alpaca_file(d / "zh.json", 96, 1, zh=True)
    return (f"--config.data.name={en}+{zh}", "--config.data.weights=0.7,0.3", "--config.data.eval_holdout=16",
            *MODEL, *tokenizer_args(tok_dir), "--config.optimizer.schedule=constant",
            "--config.train.log_every_steps=1", "--config.checkpoint.every_steps=10", "--config.eval.at_start=True")


def metrics(workdir):
    return [json.loads(line) for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]


def test_cli_sft_mixture_learns_and_resumes_exactly(tmp_path, mixture):
    # 20 steps at lr 6e-3 (the fixture's 3e-3 took 40): the held-out loss ends at 0.53 of step 0's (en 0.50,
    # zh 0.64), the last 5 train losses' mean at 0.61 of the first 5's.
    run = (*mixture, "--config.optimizer.learning_rate=6e-3")
    straight = tmp_path / "straight"
    r = cli(straight, *run, "--config.train.steps=20")
    assert r.returncode == 0, r.stderr
    rows = metrics(straight)
    before, after = rows[0], [row for row in rows if "eval/loss" in row][-1]
    assert before["step"] == 0 and after["step"] == 20
    for key in ("eval/loss", "eval/loss/en", "eval/loss/zh"):  # response-token loss, total and per source
        assert after[key] < 0.7 * before[key], (key, before[key], after[key])
    train = losses(straight)
    assert np.mean([train[s] for s in range(16, 21)]) < 0.7 * np.mean([train[s] for s in range(1, 6)])
    # Interrupted at 10 (a shorter run), then trained on to 20: the same steps, bit for bit.
    split = tmp_path / "split"
    assert cli(split, *run, "--config.train.steps=10").returncode == 0
    r = cli(split, *run, "--config.train.steps=20")
    assert r.returncode == 0 and "resuming from step 10" in r.stdout, r.stderr
    assert [losses(split)[s] for s in range(11, 21)] == [train[s] for s in range(11, 21)]


def test_cli_sft_unpacked_compiles_once_per_bucket(tmp_path, mixture):
    r = cli(tmp_path, *mixture, "--config.data.packing=False", "--config.train.steps=12",
            "--config.export.enabled=False", "--config.data.seq_len=256")
    assert r.returncode == 0, r.stderr
    widths = [int(line.split(" x ")[1].split()[0]) for line in r.stdout.splitlines()
              if line.startswith("compiled the train step")]
    assert widths and len(widths) == len(set(widths)) and set(widths) <= {16, 32, 64, 128, 256}
    assert "rows padded" in r.stdout


def test_sft_alpaca_config_runs(tmp_path):
    r = cli(tmp_path, "--config.train.steps=2", "--config.data.max_train_examples=64", "--config.data.eval_holdout=8",
            "--config.data.seq_len=128", "--config.eval.every_steps=0", "--config.export.enabled=False",
            "--config.eval.generate_examples=4", "--config.eval.max_new_tokens=4",
            "--config.optimizer.warmup_steps=0", config="configs/sft_alpaca.py")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "step 0: eval/loss=" in r.stdout and "eval/loss/alpaca_zh_demo=" in r.stdout and "done:" in r.stdout
    # the generation eval answers 2 prompts of each language (taken in turn) and scores each language alone
    assert "eval/rougeL/alpaca_en_demo=" in r.stdout and "eval/rougeL/alpaca_zh_demo=" in r.stdout


def test_tokenized_once(tmp_path, tok_dir, monkeypatch):
    """The second load reads the cache (no tokenization); another setting is another entry."""
    from jaxft.config import base_config
    from jaxft.data import mixture

    d = base_config().data
    d.unlock()
    d.cache_dir, d.seq_len = str(tmp_path / "cache"), 128
    p = alpaca_file(tmp_path / "a.json", 20, 0)
    sources = [(str(p), read_file(p), None, "text")]
    tok = Tokenizer(tok_dir)
    first = mixture.load(d, tok, "sft", sources, print)
    monkeypatch.setattr(sft, "examples", lambda *a, **k: (_ for _ in ()).throw(AssertionError("tokenized again")))
    again = mixture.load(d, tok, "sft", sources, print)
    assert first.train.keys() == again.train.keys()
    for k in first.train:
        np.testing.assert_array_equal(first.train[k], again.train[k])
    d.train_on_prompt = True
    with pytest.raises(AssertionError, match="tokenized again"):
        mixture.load(d, tok, "sft", sources, print)


def test_generate_cli_lists_tools_as_training_does(chatml_dir, tmp_path):
    """`jaxft.generate --chat --tools=FILE`: the prompt lists the tools as transformers' template does;
    a bad file or a template without tool support is one error."""
    import argparse

    from transformers import AutoTokenizer

    from jaxft.generate import chat_rows

    d = with_template(chatml_dir, tmp_path / "tools", TOOLS_TEMPLATE)
    hf, tok = AutoTokenizer.from_pretrained(str(d)), Tokenizer(d)
    (tmp_path / "tools.json").write_text(json.dumps([WEATHER], ensure_ascii=False), encoding="utf-8")
    args = argparse.Namespace(chat_template="", chat_template_kwargs="", system=None, tools=str(tmp_path / "tools.json"))
    rows, _ = chat_rows(tok, ["北京天气？"], args)
    assert rows[0] == hf.apply_chat_template([{"role": "user", "content": "北京天气？"}], tools=[WEATHER],
                                             add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    (tmp_path / "bad.json").write_text('{"name": "f"}')
    for tools, tokenizer, message in ((tmp_path / "bad.json", tok, "'tools' is a dict"),
                                      (tmp_path / "missing.json", tok, "cannot be read"),
                                      (tmp_path / "tools.json", Tokenizer(chatml_dir), "does not render the tool")):
        with pytest.raises(JaxftError, match=message):
            chat_rows(tokenizer, ["北京天气？"], argparse.Namespace(**{**vars(args), "tools": str(tools)}))
