"""The bundled jaxft-tiny-bert and jaxft-tiny-t5 against transformers (weights, tokenizers), T5's span
corruption against a reference written from T5's preprocessors, and the tokenizer training command."""

import csv
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
import torch
from transformers import (AutoTokenizer, BertForMaskedLM, BertTokenizer, T5Config, T5ForConditionalGeneration,
                          T5Tokenizer)

from jaxft import hf
from jaxft.data import span_corruption as sc
from jaxft.errors import JaxftError
from jaxft.tokenizer import Tokenizer

jax.clear_caches()
ROOT = Path(__file__).resolve().parent.parent
BERT, T5 = hf.BUNDLED_MODELS["jaxft-tiny-bert"], hf.BUNDLED_MODELS["jaxft-tiny-t5"]
ENGLISH = ["A thoroughly unpleasant movie, with tabs\tand  double spaces.", "It's slow -- very, very slow.",
           "Café déjà-vu: 3.14 x 10^5 (naïve) résumé!", "the film 's charm is undeniable ."]
CHINESE = ["这家酒店的服务非常好，房间干净。", "房间很小，早餐一般，不推荐。",
           "价格合理，交通方便，下次还会再来！"]


def close(ours, ref):
    """Within 1e-5 of the largest logit."""
    err = np.abs(np.asarray(ours) - ref).max() / np.abs(ref).max()
    assert err < 1e-5, err


def test_bundled_names_resolve_and_ship():
    for name in ("jaxft-tiny-bert", "jaxft-tiny-t5"):
        root = hf.resolve(name)
        assert (root / "config.json").is_file() and (root / "model.safetensors").is_file()
        assert (root / "README.md").is_file()
        assert sum(f.stat().st_size for f in root.iterdir()) <= 25 * 2**20
    setup = (ROOT / "setup.py").read_text()  # package_data reaches every asset directory's files
    assert '"assets/*/*"' in setup


@pytest.mark.parametrize("name,config", [("jaxft-tiny-bert", "pretrain_tiny_bert.py"),
                                         ("jaxft-tiny-t5", "pretrain_tiny_t5.py")])
def test_model_card_matches_weights_and_config(name, config):
    root = hf.resolve(name)
    card = (root / "README.md").read_text()
    _, params = hf.load(name)
    n = sum(int(np.prod(v.shape)) for v in jax.tree_util.tree_leaves(params))
    assert f"{n:,}" in card
    assert f"python -m jaxft.train --config=configs/{config}" in card
    assert hashlib.sha256((root / "model.safetensors").read_bytes()).hexdigest() in card


def test_bert_logits_match_transformers():
    model, params = hf.load("jaxft-tiny-bert")
    assert model.cfg.head == "masked_lm" and model.cfg.model_type == "bert"
    ref_model = BertForMaskedLM.from_pretrained(BERT).eval()
    tok = Tokenizer(BERT)
    rows = [tok.bos + tok.encode(t) + tok.eos for t in ENGLISH[:2] + CHINESE[:1]]
    n = max(map(len, rows))
    ids = np.array([r + [tok.pad_id] * (n - len(r)) for r in rows])
    mask = (np.arange(n) < np.array([len(r) for r in rows])[:, None]).astype(np.int64)
    ids[0, 3] = tok.mask_id
    with torch.no_grad():
        ref = ref_model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
    ours = model.apply({"params": params}, ids, mask)
    real = mask.astype(bool)
    close(np.asarray(ours)[real], ref[real])


def test_t5_logits_match_transformers():
    model, params = hf.load("jaxft-tiny-t5")
    assert model.cfg.head == "seq2seq_lm" and model.cfg.feed_forward_proj == "gated-gelu"
    ref_model = T5ForConditionalGeneration.from_pretrained(T5).eval()
    tok = Tokenizer(T5)
    enc = [tok.encode_special(t) + tok.eos for t in ("the movie is <extra_id_0> good .", CHINESE[0])]
    n = max(map(len, enc))
    ids = np.array([r + [0] * (n - len(r)) for r in enc])
    mask = (np.arange(n) < np.array([len(r) for r in enc])[:, None]).astype(np.int64)
    dec = np.array([([0] + tok.sentinels(1) + tok.encode("very") + [1] * 8)[:5],
                    ([0] + tok.encode("很好") + [1] * 8)[:5]])
    with torch.no_grad():
        ref = ref_model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                        decoder_input_ids=torch.tensor(dec)).logits.numpy()
    ours = model.apply({"params": params}, ids, mask, decoder_input_ids=dec, decoder_attention_mask=np.ones_like(dec))
    close(ours, ref)


@pytest.mark.parametrize("cls", [BertTokenizer, AutoTokenizer])
def test_bert_tokenizer_matches_transformers(cls):
    ref = cls.from_pretrained(BERT)
    ours = Tokenizer(BERT)
    assert ours.vocab_size == len(ref) == 8192 and ours.mask_id == ref.mask_token_id
    reviews = [r["review"][:300] for r in csv.DictReader(open(ROOT / "jaxft/assets/chnsenticorp/dev.csv"))][:20]
    for text in ENGLISH + CHINESE + reviews:
        assert ours.bos + ours.encode(text) + ours.eos == ref(text)["input_ids"], text
    assert ref.convert_ids_to_tokens(ours.encode("房间")) == ["房", "间"]  # one CJK character a token, as BERT
    assert ours.encode("MOVIE") == ours.encode("movie")  # uncased


def test_t5_tokenizer_matches_transformers():
    ref = T5Tokenizer.from_pretrained(T5)
    ours = Tokenizer(T5)
    assert ours.vocab_size == len(ref) == 4096 and ours.eos_id == ref.eos_token_id == 1 and ours.pad_id == 0
    assert ours.sentinels(100) == ref.convert_tokens_to_ids([f"<extra_id_{i}>" for i in range(100)])
    assert ours.sentinels(2) == [4095, 4094]  # T5's numbering: <extra_id_0> is the last id
    for text in ENGLISH[:2] + ENGLISH[3:] + CHINESE + ["a <extra_id_0> b <extra_id_17>"]:  # (ENGLISH[2]: below)
        assert ours.encode_special(text) + ours.eos == ref(text)["input_ids"], text
        assert ours.decode(ours.encode_special(text)) == ref.decode(ref(text)["input_ids"], skip_special_tokens=False)[
            : -len("</s>")]
    # A character outside the vocabulary: bytes here (byte fallback), <unk> in transformers' T5Tokenizer.
    for rare in ("龘", ENGLISH[2]):  # ENGLISH[2]: "à" and "ï" are not pieces
        assert ours.decode(ours.encode(rare)) == rare
        assert ref.unk_token_id in ref(rare)["input_ids"] and ref.unk_token_id not in ours.encode(rare)


# ---------------------------------------------------------------------------------------------
# Span corruption: a reference written from T5's `random_spans_noise_mask`,
# `noise_span_to_unique_sentinel`, `nonnoise_span_to_unique_sentinel` and `random_spans_helper`.


def ref_lengths(inputs_length, density=0.15, mean=3.0):
    """t5.data.preprocessors.random_spans_helper: (tokens_length, targets_length)."""
    def lengths(tokens_length):
        noise = int(round(tokens_length * density))
        spans = int(round(noise / mean))
        return tokens_length - noise + spans + 1, noise + spans + 1

    tokens_length = inputs_length - 1
    while lengths(tokens_length + 1)[0] <= inputs_length:
        tokens_length += 1
    return tokens_length, lengths(tokens_length)[1]


def ref_to_sentinel(tokens, noise_mask, first_sentinel):
    """noise_span_to_unique_sentinel: each noise span -> one sentinel, counting down from the last id."""
    prev = np.pad(noise_mask[:-1], [[1, 0]])
    first_noise = noise_mask & ~prev
    subsequent = noise_mask & prev
    sentinel = first_sentinel + 1 - np.cumsum(first_noise)
    return np.where(first_noise, sentinel, tokens)[~subsequent]


def test_span_lengths_are_t5s():
    for seq_len in (16, 64, 128, 512):
        tokens_length, targets_length = ref_lengths(seq_len)
        assert sc.raw_length(seq_len) == tokens_length
        assert sc.target_length(seq_len) == targets_length
    assert (sc.raw_length(512), sc.target_length(512)) == (568, 114)  # T5's pretraining lengths


def test_noise_mask_layout():
    rng = np.random.default_rng(0)
    spans_seen = []
    for length in (20, 141, 568):
        for _ in range(50):
            m = sc.noise_mask(rng, length)
            noise = int(round(length * 0.15))
            spans = int(round(noise / 3))
            starts = m & ~np.pad(m[:-1], [[1, 0]])
            assert m.shape == (length,) and m.sum() == noise and starts.sum() == spans
            assert not m[0] and m[-1]  # a kept span first, a noise span last, as T5's interleaving
            spans_seen += list(np.diff(np.flatnonzero(np.diff(np.r_[0, m.astype(int), 0]))))[::2]
    assert abs(np.mean(spans_seen) - 3) < 0.15


def test_corrupt_matches_reference_and_restores_the_text():
    tok = Tokenizer(T5)
    seq_len, n = 64, 6
    length = sc.raw_length(seq_len)
    rng = np.random.default_rng(5)
    blocks = rng.integers(3, 3996, (n, length)).astype(np.int32)
    out = sc.corrupt({"input_ids": blocks, "weight": np.ones(n, np.float32)}, tok, 7, seq_len=seq_len)
    draws = [np.random.default_rng([7, i]) for i in range(n)]  # row i's mask, drawn from (seed, i)
    first = tok.sentinels(1)[0]
    assert first == tok.vocab_size - 1
    for i in range(n):
        mask = sc.noise_mask(draws[i], length)
        x = np.append(ref_to_sentinel(blocks[i], mask, first), tok.eos_id)
        y = np.append(ref_to_sentinel(blocks[i], ~mask, first), tok.eos_id)
        np.testing.assert_array_equal(out["input_ids"][i], x)  # fills seq_len exactly: no padding
        np.testing.assert_array_equal(out["labels"][i], y)
        # Undo the corruption: each input sentinel -> the target's tokens after that sentinel.
        spans, k = {}, None
        for t in y[:-1]:
            if t >= 3996:
                k = int(t)
                spans[k] = []
            else:
                spans[k].append(int(t))
        restored = [t for s in x[:-1] for t in (spans[int(s)] if s >= 3996 else [int(s)])]
        assert restored == blocks[i].tolist()
    assert out["input_ids"].shape == (n, seq_len) and out["attention_mask"].all()
    assert out["labels"].shape == (n, sc.target_length(seq_len))
    reference = T5ForConditionalGeneration(T5Config(vocab_size=8, d_model=4, d_kv=2, d_ff=4, num_layers=1, num_heads=1,
                                                    decoder_start_token_id=0, pad_token_id=0))
    np.testing.assert_array_equal(out["decoder_input_ids"], reference._shift_right(torch.tensor(out["labels"])).numpy())
    with pytest.raises(JaxftError, match="blocks of"):
        sc.corrupt({"input_ids": blocks[:, :-1], "weight": np.ones(n)}, tok, 0, seq_len)


def test_span_corruption_trains_a_t5_from_the_cli(tmp_path):
    """data.task=span_corruption end to end: a 2-layer T5 from model.init with the bundled tokenizer."""
    from test_train import cli

    init = json.dumps(dict(model_type="t5", architectures=["T5ForConditionalGeneration"], vocab_size=4096, d_model=32,
                           d_kv=8, d_ff=64, num_layers=1, num_heads=2, feed_forward_proj="gated-gelu",
                           dropout_rate=0.0))
    cfg = tmp_path / "cfg.py"
    cfg.write_text("import ml_collections\nfrom jaxft.config import base_config\n\ndef get_config():\n"
                   "    c = base_config()\n    c.model.path = ''\n"
                   f"    c.model.tokenizer = {str(T5)!r}\n"
                   f"    c.model.init = ml_collections.ConfigDict({init})\n"
                   "    c.method.name = 'full'\n    c.data.name = 'sst2'\n    c.data.task = 'span_corruption'\n"
                   "    c.data.seq_len = 32\n    c.data.max_train_examples = 400\n    c.data.max_eval_examples = 40\n"
                   "    c.train.steps = 4\n    c.train.batch_size = 8\n    c.train.log_every_steps = 1\n"
                   "    c.optimizer.learning_rate = 3e-3\n    return c\n")
    r = cli(tmp_path / "run", config=str(cfg))
    assert r.returncode == 0, r.stderr[-2000:]
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [row["train/loss"] for row in rows if "train/loss" in row][-1] < np.log(4096) + 2
    assert any("eval/loss" in row for row in rows)


# ---------------------------------------------------------------------------------------------
# Tokenizer training: deterministic, and the bundled WordPiece vocabulary is what the command makes.


def digest(directory: Path) -> dict:
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(directory.iterdir())}


# slow: [wordpiece-600]: the WordPiece command's output is checked byte for byte against the bundled vocabulary
# in test_bundled_wordpiece_vocabulary_is_rebuilt_exactly (deterministic, and the requested size).
@pytest.mark.parametrize("kind,size", [pytest.param("wordpiece", 600, marks=pytest.mark.slow), ("t5", 800)])
def test_tokenizer_training_is_deterministic(tmp_path, kind, size):
    data = tmp_path / "texts.jsonl"
    rows = list(csv.DictReader(open(ROOT / "jaxft/assets/chnsenticorp/dev.csv")))[:10]
    sst = (ROOT / "jaxft/assets/sst2/train.tsv").read_text().splitlines()[1:1500]
    data.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n"
                            for t in [s.split("\t")[0] for s in sst] + [r["review"] for r in rows]))
    outs = []
    for k in range(2):
        cmd = [sys.executable, "-m", "jaxft.tokenizer", f"--kind={kind}", f"--data={data}", f"--vocab_size={size}",
               f"--out={tmp_path / str(k)}"]
        r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
        outs.append(digest(tmp_path / str(k)))
    assert outs[0] == outs[1]
    tok = Tokenizer(tmp_path / "0")
    assert tok.vocab_size == size + (100 if kind == "t5" else 0)


def test_bundled_wordpiece_vocabulary_is_rebuilt_exactly(tmp_path):
    cmd = [sys.executable, "-m", "jaxft.tokenizer", "--kind=wordpiece", "--data=sst2+c4_demo+chnsenticorp",
           "--vocab_size=8192", f"--out={tmp_path}"]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "vocab.txt").read_bytes() == (BERT / "vocab.txt").read_bytes()
