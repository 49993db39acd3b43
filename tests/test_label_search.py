"""jaxft.label_search and jaxft.template_search (LM-BFF's automatic label words and templates): the
log-probabilities at the mask, each class's candidates, the best assignments and their accuracies against
transformers' masked LM and a brute-force search over every pair of candidates; a causal LM's next word;
each T5-written template's score against transformers' T5; the command lines' tables, JSON and one-line errors."""

from __future__ import annotations

import itertools
import json
import os

import numpy as np
import pytest
from forkserver import python_m
from test_configs import load_config

from jaxft import label_search
from jaxft.data import tasks
from jaxft.tokenizer import Tokenizer

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

BERT = os.path.join(os.path.dirname(label_search.__file__), "assets", "jaxft-tiny-bert")
SMALL = {"data.max_train_examples": 48, "data.max_eval_examples": 40, "data.seq_len": 48}


def pet_config(**overrides):
    c = load_config("pet_bert.py")
    for key, value in {**SMALL, **overrides}.items():
        section, name = key.split(".")
        c[section][name] = value
    return c


def hf_log_probs(model, arrays) -> np.ndarray:
    """[N, V]: transformers' log-softmax at each row's mask."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor(arrays["input_ids"]).long(),
                       attention_mask=torch.tensor(arrays["attention_mask"]).long()).logits.float()
    at = torch.tensor(arrays["mlm_positions"][:, 0]).long()
    return torch.log_softmax(logits[torch.arange(len(at)), at], -1).numpy()


def test_candidates_and_assignments_match_transformers_and_brute_force():
    c = pet_config()
    result = label_search.label_search(c, candidates=12, top=30, examples=32, log=lambda *_: None)
    tok = Tokenizer(BERT)
    template = c.data.cloze_template
    from jaxft.train import load_data, load_model_config

    cfg, _, tokenizer_path = load_model_config(c)
    data = load_data(c, cfg, tokenizer_path)
    train = label_search.sample(data.train, 32, int(c.train.seed))
    dev = label_search.sample(data.eval, 32, int(c.train.seed))
    assert result["examples"] == 32 == result["dev_examples"]
    model = transformers.BertForMaskedLM.from_pretrained(BERT).eval()
    logp, dev_logp = hf_log_probs(model, train), hf_log_probs(model, dev)
    labels = train["labels"]
    # Each class's candidates: the words (tokens that read back as themselves in place of the mask, no
    # special token, no word piece) with the largest summed log-probability over the class's examples.
    ids = {}
    for c_index, label in enumerate(result["labels"]):
        order = np.argsort(-logp[labels == c_index].sum(0), kind="stable")
        words = []
        for i in order:
            piece = tok.piece(int(i))
            word = tok.decode([int(i)]).strip()
            if tok.is_special(int(i)) or piece.startswith("##") or not word.isalnum():
                continue
            if tasks.label_words(tok, [word], template) == [[int(i)]]:
                words.append((int(i), word))
            if len(words) == 12:
                break
        assert result["candidates"][label] == [w for _, w in words], label
        ids[label] = [i for i, _ in words]
    # Every assignment of distinct candidates, scored on transformers' log-probabilities.
    scored = []
    for pick in itertools.product(*ids.values()):
        if len(set(pick)) == len(pick):
            acc = (np.argmax(logp[:, list(pick)], -1) == labels).mean()
            scored.append((acc, pick))
    best = sorted((a for a, _ in scored), reverse=True)
    got = result["assignments"]
    assert [row["train_accuracy"] for row in got] == pytest.approx(best[:30], abs=1e-9)
    by_words = {",".join(tok.decode([i]).strip() for i in pick): acc for acc, pick in scored}
    for row in got:
        assert by_words[row["verbalizer"]] == pytest.approx(row["train_accuracy"], abs=1e-9)
        pick = [tasks.label_words(tok, [w], template)[0][0] for w in row["verbalizer"].split(",")]
        want = (np.argmax(dev_logp[:, pick], -1) == dev["labels"]).mean()
        assert row["dev_accuracy"] == pytest.approx(want, abs=1e-9)
    own = [tasks.label_words(tok, [w], template)[0][0] for w in c.data.verbalizer.split(",")]
    assert result["config_verbalizer"]["train_accuracy"] == pytest.approx(
        (np.argmax(logp[:, own], -1) == labels).mean(), abs=1e-9)
    assert result["config_verbalizer"]["verbalizer"] == c.data.verbalizer


def test_search_keeps_the_product_of_candidates_bounded(monkeypatch):
    """Four classes x 40 candidates would be 2.6M assignments; at most 2,000: the first 6 of each are tried."""
    monkeypatch.setattr(label_search, "MAX_ASSIGNMENTS", 2000)
    rng = np.random.default_rng(0)
    logp = np.log(rng.dirichlet(np.ones(60), size=30))
    labels = np.arange(30) % 4

    class Tok:  # every token a word of its own
        def is_special(self, i):
            return False

        def decode(self, ids):
            return f"w{ids[0]}"

    notes = []
    import unittest.mock

    with unittest.mock.patch.object(tasks, "label_words", lambda tok, words, template: [[int(words[0][1:])]]):
        lists, assignments, acc = label_search.search(logp, labels, 4, 40, Tok(), "{text} {mask}", notes.append)
    assert len(lists[0]) == 40 and "trying the first 6 of each (1,296)" in notes[0]
    assert len(assignments) == len({tuple(row) for row in assignments.tolist()}) <= 6 ** 4
    assert all(len(set(row)) == 4 for row in assignments.tolist())
    assert list(acc) == sorted(acc, reverse=True)
    best = max(((np.argmax(logp[:, list(p)], -1) == labels).mean(), p)
               for p in itertools.product(*[[i for i, _ in chosen[:6]] for chosen in lists]) if len(set(p)) == 4)
    assert acc[0] == pytest.approx(best[0])


def test_a_causal_lm_is_asked_for_the_next_word(tmp_path):
    """On a causal LM the answer is the next token after the template: jaxft-tiny's log-probabilities there
    against transformers' LlamaForCausalLM."""
    c = load_config("full.py")
    c.data.task, c.data.cloze_template, c.data.verbalizer = "cloze", "{text} It was {mask}", "bad,good"
    c.data.max_train_examples, c.data.max_eval_examples, c.data.seq_len = 24, 8, 48
    result = label_search.label_search(c, candidates=5, top=3, examples=0, log=lambda *_: None)
    from jaxft import hf
    from jaxft.train import load_data, load_model_config

    cfg, _, tokenizer_path = load_model_config(c)
    data = load_data(c, cfg, tokenizer_path)
    model = transformers.LlamaForCausalLM.from_pretrained(str(hf.resolve("jaxft-tiny"))).eval()
    ids, mask = torch.tensor(data.train["input_ids"]).long(), torch.tensor(data.train["attention_mask"]).long()
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits.float()
    at = torch.tensor(data.train["mlm_positions"][:, 0]).long()
    logp = torch.log_softmax(logits[torch.arange(len(at)), at], -1).numpy()
    tok = data.tokenizer
    for c_index, label in enumerate(result["labels"]):
        words = result["candidates"][label]
        got = [tasks.label_words(tok, [w], c.data.cloze_template)[0] for w in words]
        assert all(len(g) == 1 for g in got)
        sums = logp[data.train["labels"] == c_index].sum(0)[[g[0] for g in got]]
        assert list(sums) == sorted(sums, reverse=True)  # best first
    assert len(result["assignments"]) == 3 and result["examples"] == 24


def test_cli_table_json_and_errors(tmp_path):
    def cli(*args):
        return python_m("jaxft.label_search", "--config=configs/pet_bert.py",
                        *[f"--config.{k}={v}" for k, v in SMALL.items()], *args,
                        env={**os.environ, "JAX_PLATFORMS": "cpu"})

    r = cli("--candidates=8", "--top=3", "--examples=24")
    assert r.returncode == 0, r.stderr[-3000:]
    lines = r.stdout.splitlines()
    head = lines.index(next(line for line in lines if line.startswith("rank")))
    assert [line.split()[0] for line in lines[head + 1: head + 5]] == ["1", "2", "3", "yours"]
    assert lines[head + 4].split()[-1] == "bad,good"
    r = cli("--candidates=8", "--top=3", "--examples=24", "--json")
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads(r.stdout.splitlines()[-1])
    assert len(result["assignments"]) == 3 and all(len(v) == 8 for v in result["candidates"].values())
    for args, message in ((("--candidates=0",), "--candidates=0: expected a positive integer"),
                          (("--config.data.task=classification",), "data.task='classification': jaxft.label_search"),
                          (("--config.data.verbalizer=bad,unwatchable",), "a word of several tokens"),
                          (("--examples=1",), "--examples=1: no sampled training example has label")):
        r = cli(*args)
        assert r.returncode == 2 and r.stderr.startswith("error: ") and r.stderr.count("\n") == 1, r.stderr
        assert message in r.stderr, r.stderr


# ---------------------------------------------------------------------------------------------------
# Templates written by T5 (jaxft.template_search)

T5 = os.path.join(os.path.dirname(label_search.__file__), "assets", "jaxft-tiny-t5")


def test_joint_beam_search_scores_are_t5s_summed_log_likelihoods():
    """Every template the joint beam search returns: `<extra_id_0> X <extra_id_1> Y <extra_id_2>`, its score
    transformers' T5 log-likelihood of those tokens summed over the examples, best first."""
    from jaxft import hf, template_search

    tok = Tokenizer(T5)
    s0, s1, s2 = tok.sentinels(3)
    texts = ["a gorgeous , witty film", "the plot is thin and dull", "an engaging ride", "it never takes off"]
    ids, mask = template_search.t5_inputs(tok, texts, ["great", "terrible", "great", "terrible"], 24)
    assert all(r[m > 0][-1] == tok.eos_id and s1 in r for r, m in zip(ids, mask))
    model, params = hf.load(T5)
    found = template_search.joint_beam_search(model, params, ids, mask, tok, beams=4, max_tokens=6)
    assert found and [t.score for t in found] == sorted((t.score for t in found), reverse=True)
    hf_model = transformers.T5ForConditionalGeneration.from_pretrained(T5).eval()
    for t in found:
        assert t.tokens[0] == s0 and t.tokens[-1] == s2 and t.tokens.count(s1) == 1 and len(t.tokens) <= 7
        cut = t.tokens.index(s1)
        assert (t.before, t.after) == (tok.decode(t.tokens[1:cut]).strip(), tok.decode(t.tokens[cut + 1:-1]).strip())
        assert t.template == " ".join(p for p in ("{text}", t.before, "{mask}", t.after) if p)
        labels = torch.tensor([list(t.tokens)] * len(texts)).long()
        with torch.no_grad():
            logits = hf_model(input_ids=torch.tensor(ids).long(), attention_mask=torch.tensor(mask).long(),
                              labels=labels).logits.float()
        want = torch.log_softmax(logits, -1).gather(2, labels[..., None])[..., 0].sum().item()
        assert t.score == pytest.approx(want, rel=1e-4, abs=1e-3)


def test_template_search_scores_templates_zero_shot():
    """Each template found is scored as jaxft.label_search scores words: the config's own template gets the
    same zero-shot accuracy from both tools."""
    from jaxft import template_search

    c = pet_config()
    result = template_search.template_search(c, T5, examples=16, beams=3, max_tokens=5, top=3, log=lambda *_: None)
    assert 1 <= len(result["templates"]) <= 3 and result["examples"] == 16
    assert all("{text}" in row["template"] and "{mask}" in row["template"] for row in result["templates"])
    own = label_search.label_search(c, candidates=2, top=1, examples=16, log=lambda *_: None)["config_verbalizer"]
    assert result["config_template"]["train_accuracy"] == own["train_accuracy"]
    assert result["config_template"]["dev_accuracy"] == own["dev_accuracy"]


def test_template_search_cli_errors(tmp_path):
    def cli(*args):
        return python_m("jaxft.template_search", "--config=configs/pet_bert.py",
                        *[f"--config.{k}={v}" for k, v in SMALL.items()], *args,
                        env={**os.environ, "JAX_PLATFORMS": "cpu"})

    for args, message in ((("--t5=jaxft-tiny-t5", "--beams=0"), "--beams=0: expected a positive integer"),
                          ((), "--t5=PATH is required"),
                          (("--t5=jaxft-tiny",), "--t5=jaxft-tiny: a llama causal_lm model; expected T5"),
                          (("--t5=jaxft-tiny-t5", "--config.data.name=rte", "--config.data.verbalizer=yes,no",
                            "--config.data.cloze_template={text} ? {mask} , {text_b}"), "sentence pairs")):
        r = cli(*args)
        assert r.returncode == 2 and r.stderr.startswith("error: ") and r.stderr.count("\n") == 1, r.stderr
        assert message in r.stderr, r.stderr
