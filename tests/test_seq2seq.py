"""Encoder-decoder data (`jaxft.data.seq2seq`) and T5 trained through the CLI.

Oracles: transformers' T5 tokenizer and `DataCollatorForSeq2Seq` (the arrays), torch's
`T5ForConditionalGeneration` (the first step's loss, the exported model's logits) and peft (the
exported adapters' logits). Every model is a tiny random T5 saved with transformers, with a T5
(Unigram) tokenizer built from E2E NLG's words and some of ADGEN's characters; no hub access.
"""

from __future__ import annotations

import collections
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from jaxft import hf  # noqa: E402
from jaxft.data import mixture, seq2seq, sources, tasks  # noqa: E402
from jaxft.data.iterator import Batches  # noqa: E402
from jaxft.data.sft import BadRecord, Fields  # noqa: E402
from jaxft.errors import JaxftError  # noqa: E402
from jaxft.tokenizer import Tokenizer  # noqa: E402
from test_train import ROOT, assert_same_adapter, cli, losses  # noqa: E402

E2E = sources.BUNDLED["e2e_nlg"]
FIELDS = Fields("meaning_representation", "human_reference")


@pytest.fixture(scope="module")
def t5_dir(tmp_path_factory):
    """A T5 v1.1 layout (gated GELU, untied LM head), 2 + 2 layers of width 32, and a T5 tokenizer of
    E2E's 300 most common words, their characters and 150 ADGEN characters (494 tokens)."""
    d = tmp_path_factory.mktemp("t5")
    lines = E2E.train.read_text().splitlines()[:400]
    words = collections.Counter(w for line in lines for w in line.replace("||", " ").split())
    zh = collections.Counter(c for line in (ROOT / "jaxft/assets/adgen/dev.json").read_text().splitlines()[:50]
                             for c in line)
    pieces = [("▁" + w, -i / 100 - 1.0) for i, (w, _) in enumerate(words.most_common(300))]
    chars = sorted(set("".join(words)) | {c for c, _ in zh.most_common(150)})
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + pieces + [(c, -10.0) for c in chars] + [("▁", -5.0)]
    tok = transformers.T5Tokenizer(vocab=vocab, extra_ids=0)
    tok.save_pretrained(d)
    torch.manual_seed(0)
    config = transformers.T5Config(vocab_size=len(tok), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                                   relative_attention_num_buckets=8, relative_attention_max_distance=20,
                                   dropout_rate=0.0, feed_forward_proj="gated-gelu", decoder_start_token_id=0,
                                   tie_word_embeddings=False)
    model = transformers.T5ForConditionalGeneration(config)
    model.lm_head.weight = torch.nn.Parameter(torch.randn_like(model.lm_head.weight) * 0.05)  # its own head
    model.save_pretrained(d)
    return d


def hf_tok(d):
    return transformers.AutoTokenizer.from_pretrained(str(d))


def records(tmp_path, rows, name="data.jsonl") -> sources.Records:
    p = tmp_path / name
    p.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return sources.read_file(p)


PAIRS = [
    {"mr": "name : Blue Spice | area : city centre", "ref": "Blue Spice is in the city centre ."},
    {"mr": "name : The Vaults | eatType : pub | priceRange : more than £ 30 | customer rating : 5 out of 5 | "
           "near : Café Adriatic",
     "ref": "The Vaults pub near Café Adriatic has a 5 star rating . Prices start at £ 30 ."},
    {"mr": "name : Alimentum", "ref": "Alimentum 咖啡 ."},  # unknown characters: <unk>
]
ALPACA = [
    {"instruction": "Describe the coffee shop", "input": "name : Blue Spice", "output": "A coffee shop ."},
    {"instruction": "Name a pub", "input": "", "output": "The Vaults"},
    {"instruction": "Name a pub", "system": "You are friendly", "output": "The Vaults"},
]


# ---------------------------------------------------------------------------------------------
# Arrays against transformers' tokenizer and DataCollatorForSeq2Seq.


def test_encode_source_is_the_t5_tokenizer_with_truncation(t5_dir):
    tok, ref = Tokenizer(t5_dir), hf_tok(t5_dir)
    text = PAIRS[1]["mr"]
    full = ref(text).input_ids
    assert full[-1] == ref.eos_token_id and len(full) > 12
    for n in (4, 12, len(full), len(full) + 5):
        assert seq2seq.encode_source(tok, text, n) == ref(text, max_length=n, truncation=True).input_ids


@pytest.mark.parametrize("kind", ["pairs", "alpaca"])
def test_arrays_match_transformers_collator(t5_dir, tmp_path, kind):
    """input_ids, attention_mask, labels (-100 padded) and decoder_input_ids as DataCollatorForSeq2Seq
    makes them from the tokenizer's truncated encodings, with the model's own label shifting."""
    tok, ref = Tokenizer(t5_dir), hf_tok(t5_dir)
    rows = PAIRS if kind == "pairs" else ALPACA
    recs = records(tmp_path, rows)
    fields = Fields("mr", "ref") if kind == "pairs" else Fields()
    if kind == "pairs":
        src, tgt = [r["mr"] for r in rows], [r["ref"] for r in rows]
    else:  # the stated rule: [system + blank line] instruction [+ blank line + input] -> output
        src = ["Describe the coffee shop\n\nname : Blue Spice", "Name a pub", "You are friendly\n\nName a pub"]
        tgt = [r["output"] for r in rows]
    n = 14
    arrays, truncated = seq2seq.arrays(recs, tok, n, n, fields)
    model = transformers.T5ForConditionalGeneration.from_pretrained(t5_dir)
    features = [{"input_ids": ref(s, max_length=n, truncation=True).input_ids,
                 "labels": ref(text_target=t, max_length=n, truncation=True).input_ids} for s, t in zip(src, tgt)]
    collator = transformers.DataCollatorForSeq2Seq(ref, model=model, padding="max_length", max_length=n,
                                                   label_pad_token_id=-100, return_tensors="pt")
    want = collator(features)
    for key in ("input_ids", "attention_mask", "labels", "decoder_input_ids"):
        np.testing.assert_array_equal(arrays[key], want[key].numpy(), err_msg=key)
    np.testing.assert_array_equal(arrays["weight"], np.ones(len(rows)))
    longer = sum(len(ref(s).input_ids) > n or len(ref(text_target=t).input_ids) > n for s, t in zip(src, tgt))
    assert truncated == longer and (kind == "alpaca" or truncated >= 1)

    # A shorter decoder: labels cut to target_len, the encoder side unchanged.
    short, _ = seq2seq.arrays(recs, tok, n, 6, fields)
    np.testing.assert_array_equal(short["input_ids"], arrays["input_ids"])
    for i, t in enumerate(tgt):
        labels = ref(text_target=t, max_length=6, truncation=True).input_ids
        np.testing.assert_array_equal(short["labels"][i], labels + [-100] * (6 - len(labels)))
    assert short["decoder_input_ids"].shape == (len(rows), 6)


def test_bad_records_name_file_and_line(t5_dir, tmp_path):
    tok = Tokenizer(t5_dir)
    recs = records(tmp_path, [PAIRS[0], {"mr": "name : Alimentum", "ref": "  "}, {"mr": "x"}, PAIRS[1]])
    with pytest.raises(BadRecord, match=r"data\.jsonl:2: 'ref' is empty .*data\.skip_bad_records=True"):
        seq2seq.arrays(recs, tok, 16, 16, Fields("mr", "ref"))
    enc = seq2seq.examples(recs, tok, 16, 16, Fields("mr", "ref"), skip_bad=True)
    assert len(enc.examples) == 2 and enc.skipped == 2
    assert enc.first_skip.endswith("data.jsonl:2: 'ref' is empty")
    history = records(tmp_path, [{**ALPACA[0], "history": [["hi", "hello"]]}], "h.jsonl")
    with pytest.raises(BadRecord, match=r"h\.jsonl:1: 'history'"):
        seq2seq.arrays(history, tok, 16)
    with pytest.raises(BadRecord, match=r"h\.jsonl: no usable"):
        seq2seq.arrays(history, tok, 16, skip_bad=True)


# ---------------------------------------------------------------------------------------------
# Which task: the data and the model.


def test_task_follows_the_model(t5_dir, tmp_path):
    from jaxft.train import check_task

    pairs = records(tmp_path, PAIRS)
    alpaca = records(tmp_path, ALPACA, "alpaca.jsonl")
    turns = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    chat = records(tmp_path, [{"messages": turns}], "chat.jsonl")
    def choose(recs, encoder_decoder):
        return tasks.choose_task("", recs, "d", "text", "label", False, Fields("mr", "ref"), encoder_decoder)

    assert choose(pairs, True) == "seq2seq" and choose(alpaca, True) == "seq2seq"
    assert choose(pairs, False) == "sft" and choose(alpaca, False) == "sft"  # a decoder-only model keeps SFT
    with pytest.raises(JaxftError, match="chat records .* encoder-decoder"):
        choose(chat, True)
    t5, llama = hf.read_config(t5_dir), hf.read_config(hf.resolve("jaxft-tiny"))
    check_task("seq2seq", t5)
    check_task("classification", t5)  # T5ForSequenceClassification
    with pytest.raises(JaxftError, match=r"data.task='seq2seq' trains a seq2seq_lm head, which this llama model"):
        check_task("seq2seq", llama)
    with pytest.raises(JaxftError, match=r"data.task='sft' trains a causal_lm head, which an encoder-decoder t5"):
        check_task("sft", t5)


def test_decoder_only_model_refuses_seq2seq_through_the_cli(tmp_path):
    r = cli(tmp_path / "run", "--config.model.path=jaxft-tiny", "--config.data.name=e2e_nlg",
            "--config.data.task=seq2seq", config="configs/e2e_t5.py")
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == ["error: data.task='seq2seq' trains a seq2seq_lm head, which this llama "
                                             "model does not have (its heads: causal_lm, classification, "
                                             "token_classification)"]
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------------------------
# Length buckets, the data cache and mixtures.


def test_length_buckets_cut_both_sides_and_keep_the_loss(t5_dir):
    import jax

    from jaxft.objectives import OBJECTIVES
    from jaxft.peft import build
    from jaxft.peft.partition import split
    from jaxft.step import make_eval_step
    from hooked_models import method_cfg

    train, _, _, _ = sources.resolve(_data_cfg("e2e_nlg"))
    recs = sources.Records(train.rows[:32], train.where[:32])
    arrays, _ = seq2seq.arrays(recs, Tokenizer(t5_dir), 48, 40, FIELDS)
    whole = Batches(arrays, 8, 0)
    cut = Batches(arrays, 8, 0, buckets=(16, 32, 48))
    model, params = hf.load(t5_dir)
    trainable, frozen = split(params, build(method_cfg(name="full"), model.cfg).trainable)
    step = jax.jit(make_eval_step(model, objective=OBJECTIVES["seq2seq"]))
    shapes = set()
    for position in range(4):
        b = cut.local(position, (0, 8))
        src, tgt = b["attention_mask"].sum(1).max(), (b["labels"] >= 0).sum(1).max()
        width, target = b["input_ids"].shape[1], b["labels"].shape[1]
        assert b["decoder_input_ids"].shape[1] == target and b["attention_mask"].shape[1] == width
        assert width == min(w for w in (16, 32, 48) if w >= src) and target == min(w for w in (16, 32, 40) if w >= tgt)
        shapes.add((width, target))
        full = {k: v[cut.indices(position)] for k, v in arrays.items()}
        a, c = step(trainable, frozen, full), step(trainable, frozen, b)
        np.testing.assert_allclose(c["loss_sum"], a["loss_sum"], rtol=1e-5)
        assert c["count"] == a["count"]
    assert whole.local(0, (0, 8))["labels"].shape[1] == 40 and len(shapes) >= 1


def _data_cfg(name, **kw):
    import ml_collections

    from jaxft.config import base_config

    d = base_config().data
    d.update(dict(name=name, seq_len=32, target_len=24, cache_dir=kw.pop("cache_dir", "none"), **kw))
    return ml_collections.ConfigDict(d.to_dict())


def test_mixture_cache_and_per_source_eval(t5_dir, tmp_path):
    """e2e_nlg + adgen, each with its own fields: rows keep their source, eval rows their one-hot
    source; the second load reads the cache and gives the same arrays."""
    d = _data_cfg("e2e_nlg+adgen", cache_dir=str(tmp_path / "cache"), weights="0.5,0.5", eval_holdout=8,
                  max_train_examples=24)
    tok, said = Tokenizer(t5_dir), []

    def load():
        resolved = []
        for name in ("e2e_nlg", "adgen"):
            tr, ev, field = sources.resolve(d, name)[:3]
            resolved.append((name, sources.Records(tr.rows[:24], tr.where[:24]),
                             ev and sources.Records(ev.rows[:8], ev.where[:8]), field))
        return mixture.load(d, tok, "seq2seq", resolved, said.append, 0)

    first, second = load(), load()
    assert sum("[tokenized earlier: data cache]" in line for line in said) == 4
    for a, b in ((first.train, second.train), (first.eval, second.eval)):
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    assert first.names == ["e2e_nlg", "adgen"] and first.weights == [0.5, 0.5]
    np.testing.assert_array_equal(first.groups, [0] * 24 + [1] * 16)  # adgen: 24 - 8 held out
    assert first.eval["task_weight"].shape == (16, 2) and first.train["labels"].shape == (40, 24)
    adgen = sources.resolve(d, "adgen")[0]
    alone, _ = seq2seq.arrays(sources.Records(adgen.rows[:16], adgen.where[:16]), tok, 32, 24,
                              Fields("content", "summary"))
    for key in alone:
        np.testing.assert_array_equal(first.train[key][24:], alone[key])


def test_mixture_generation_reads_each_source_with_its_fields_and_scores_each(t5_dir, tmp_path):
    """Generation eval of e2e_nlg + adgen (pairs of other fields each): every source's prompts are its
    own records' sources, its references their targets, and each source is scored on its own answers
    (`eval/rougeL/<source>`), in `jaxft.evaluate` and in training's periodic eval alike."""
    from jaxft import evaluate
    from jaxft.config import base_config
    from jaxft.train import load_data

    c = base_config()
    c.model.path = str(t5_dir)
    c.data.update(_data_cfg("e2e_nlg+adgen", weights="0.5,0.5", eval_holdout=4, max_train_examples=12,
                            max_eval_examples=4).to_dict())
    c.train.batch_size = 8
    c.eval.generate_examples = 100  # all
    result = evaluate.evaluate(c, str(t5_dir), max_new_tokens=4, out=str(tmp_path / "out"))
    rows = [json.loads(line) for line in (tmp_path / "out" / "predictions.jsonl").read_text().splitlines()]
    tok, got = Tokenizer(t5_dir), result["metrics"]

    adgen = sources.resolve(c.data, "adgen")[0]
    held = adgen.rows[-4:]  # the source's last 4 (data.eval_holdout comes before data.max_train_examples)
    mine = [r for r in rows if r["source"] == "adgen"]
    # references as the tokenizer writes the targets (transformers' decoded labels: unknown characters dropped)
    labels = [hf_tok(t5_dir)(text_target=h["summary"]).input_ids for h in held]
    assert [r["reference"] for r in mine] == hf_tok(t5_dir).batch_decode(labels, skip_special_tokens=True)
    assert all(r["reference"] != h["summary"] for r, h in zip(mine, held))  # 150 of ADGEN's characters
    assert [r["prompt"] for r in mine] == [tok.decode(seq2seq.encode_source(tok, h["content"], 32)) for h in held]
    e2e = sources.resolve(c.data, "e2e_nlg")[1]
    assert {r["prompt"] for r in rows if r["source"] == "e2e_nlg"} == {
        tok.decode(seq2seq.encode_source(tok, h["meaning_representation"], 32)) for h in e2e.rows[:4]}
    assert rows[0]["source"] == "e2e_nlg" and rows[1]["source"] == "adgen"  # in turn

    for name in ("e2e_nlg", "adgen"):
        part = [r for r in rows if r["source"] == name]
        alone = evaluate.generation_scores([r["prediction"] for r in part], [r["reference"] for r in part])
        for k, v in alone.items():
            assert got[f"eval/{k}/{name}"] == pytest.approx(v, abs=1e-12)
    assert got["eval/rougeL"] == pytest.approx(evaluate.generation_scores(
        [r["prediction"] for r in rows], [r["reference"] for r in rows])["rougeL"], abs=1e-12)

    # Training's periodic eval: the same prompts, answers and per-source scores.
    cfg = hf.read_config(t5_dir)
    model, params = hf.load(str(t5_dir))
    c.eval.max_new_tokens = 4
    from etils import epath

    logged = evaluate.generation_eval(c, load_data(c, cfg, str(t5_dir)), model, epath.Path(tmp_path / "run"))(params, 7)
    for k in ("eval/rougeL", "eval/rougeL/e2e_nlg", "eval/rougeL/adgen", "eval/bleu/adgen"):
        assert logged[k] == pytest.approx(got[k], abs=1e-6)
    samples = [json.loads(line) for line in (tmp_path / "run" / "samples" / "step_7.jsonl").read_text().splitlines()]
    assert samples == rows  # its answers, as jaxft.evaluate writes them


# ---------------------------------------------------------------------------------------------
# T5 through `python -m jaxft.train`.

QUICK = ("--config.train.batch_size=8", "--config.data.max_train_examples=32", "--config.data.max_eval_examples=16",
         "--config.train.log_every_steps=1", "--config.eval.every_steps=0", "--config.eval.at_start=False",
         "--config.eval.batch_size=16",
         "--config.optimizer.warmup_steps=0", "--config.data.seq_len=32", "--config.data.target_len=32",
         "--config.data.length_buckets=False")  # one batch shape: one compile


def metrics(workdir):
    return [json.loads(line) for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]


def batch_for_logits():
    rng = np.random.RandomState(0)
    ids = rng.randint(3, 300, (2, 9))
    mask = np.ones_like(ids)
    mask[1, 6:] = 0
    dec = rng.randint(3, 300, (2, 5))
    return ids, mask, dec


def assert_peft_logits(t5_dir, export, scan=True):
    """The exported adapter in peft over the torch base gives jaxft's logits (`hf.load(base, adapter=)`)."""
    ids, mask, dec = batch_for_logits()
    base = transformers.T5ForConditionalGeneration.from_pretrained(t5_dir).eval()
    with torch.no_grad():
        plain = base(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                     decoder_input_ids=torch.tensor(dec)).logits.numpy()
        model = peft.PeftModel.from_pretrained(base, export).eval()
        ref = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                    decoder_input_ids=torch.tensor(dec)).logits.numpy()
    ours_model, params = hf.load(str(t5_dir), adapter=str(export), scan_layers=scan)
    ours = np.asarray(ours_model.apply({"params": params}, ids, mask, decoder_input_ids=dec))
    scale = np.abs(ref).max()
    assert np.abs(ref - plain).max() / scale > 1e-4  # training moved the adapter away from the base
    assert np.abs(ours - ref).max() / scale < 1e-4


def test_full_fine_tuning_first_loss_is_torch_and_export_loads(t5_dir, tmp_path):
    """The first step's loss is T5ForConditionalGeneration's on the same batch; eval loss and
    perplexity are logged; transformers reads the export and gives jaxft's logits."""
    r = cli(tmp_path, f"--config.model.path={t5_dir}", "--config.method.name=full", "--config.train.steps=3", *QUICK,
            "--config.optimizer.learning_rate=1e-2", config="configs/e2e_t5.py")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "model: t5 2x32 head=seq2seq_lm | float32, attention xla" in r.stdout and "| method: full |" in r.stdout
    assert "seq2seq e2e_nlg (train): 32 source -> target pairs" in r.stdout
    train, _, _, _ = sources.resolve(_data_cfg("e2e_nlg"))
    arrays, _ = seq2seq.arrays(sources.Records(train.rows[:32], train.where[:32]), Tokenizer(t5_dir), 32, 32, FIELDS)
    first = Batches(arrays, 8, 0).local(0, (0, 8))
    base = transformers.T5ForConditionalGeneration.from_pretrained(t5_dir).eval()
    with torch.no_grad():
        ref = base(input_ids=torch.tensor(first["input_ids"]), attention_mask=torch.tensor(first["attention_mask"]),
                   labels=torch.tensor(first["labels"], dtype=torch.long)).loss.item()
    got = losses(tmp_path)
    assert got[1] == pytest.approx(ref, rel=1e-5)
    assert got[3] < got[1]
    final = metrics(tmp_path)[-1]
    assert final["eval/perplexity"] == pytest.approx(math.exp(final["eval/loss"]), rel=1e-6)

    export = tmp_path / "export"
    assert json.loads((export / "config.json").read_text())["architectures"] == ["T5ForConditionalGeneration"]
    ids, mask, dec = batch_for_logits()
    with torch.no_grad():
        want = transformers.T5ForConditionalGeneration.from_pretrained(export).eval()(
            input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), decoder_input_ids=torch.tensor(dec)).logits
        before = base(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                      decoder_input_ids=torch.tensor(dec)).logits
    model, params = hf.load(str(export))
    ours = np.asarray(model.apply({"params": params}, ids, mask, decoder_input_ids=dec))
    assert np.abs(want.numpy() - before.numpy()).max() > 1e-3  # the weights trained
    assert np.abs(ours - want.numpy()).max() / np.abs(want.numpy()).max() < 1e-5


def test_adgen_config_trains_prefix_prompt_ia3_and_peft_serves_each_export(t5_dir, tmp_path):
    """configs/adgen_t5.py over a tiny T5 with the PEFT methods the other tests leave out, trained
    together in one run: the loss falls, the held-out dev loss and perplexity are logged, and peft
    serves each exported adapter (alone) with jaxft's logits."""
    method = "prefix_tuning+prompt_tuning+ia3"
    r = cli(tmp_path, f"--config.model.path={t5_dir}", f"--config.method.name={method}", "--config.train.steps=4",
            *QUICK, "--config.data.max_train_examples=40", "--config.data.eval_holdout=8",
            "--config.optimizer.learning_rate=3e-2", "--config.method.num_virtual_tokens=4",
            "--config.method.projection_hidden=16", config="configs/adgen_t5.py")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "seq2seq adgen (eval): 8 source -> target pairs" in r.stdout  # data.eval_holdout
    got = losses(tmp_path)
    assert got[4] < got[1], got
    final = metrics(tmp_path)[-1]
    assert final["eval/perplexity"] == pytest.approx(math.exp(final["eval/loss"]), rel=1e-6)
    for m in method.split("+"):
        assert_peft_logits(t5_dir, tmp_path / "export" / m)


def test_e2e_config_on_a_2x2x2_mesh_resumes_exactly(t5_dir, tmp_path):
    """configs/e2e_t5.py over a tiny T5 with LoRA + P-Tuning v2, on a (data, fsdp, tensor) = 2 x 2 x 2
    mesh of 8 devices and a weighted mixture of E2E and ADGEN: with its last checkpoint removed, a
    rerun resumes from the one before and ends with the same adapters, losses and per-source eval
    losses; peft serves each exported adapter with jaxft's logits."""
    args = (f"--config.model.path={t5_dir}", "--config.method.name=lora+ptuning_v2", *QUICK,
            "--config.data.name=e2e_nlg+adgen", "--config.data.weights=0.7,0.3", "--config.data.eval_holdout=8",
            "--config.method.num_virtual_tokens=4", "--config.mesh.data=2",
            "--config.mesh.fsdp=2", "--config.mesh.tensor=2", "--config.checkpoint.every_steps=3",
            "--config.train.steps=6", "--config.optimizer.learning_rate=1e-2")
    # The resumed run compiles what the first one did: the test run's persistent cache serves it (conftest).
    r = cli(tmp_path, *args, config="configs/e2e_t5.py", devices=8)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "mesh {'data': 2, 'fsdp': 2, 'tensor': 2} over 8 devices" in r.stdout
    first_losses, first_eval = losses(tmp_path), metrics(tmp_path)[-1]
    assert {"eval/loss/e2e_nlg", "eval/loss/adgen", "eval/perplexity"} <= set(first_eval)
    assert first_losses[6] < first_losses[1], first_losses
    first = {m: adapter_of(tmp_path, m) for m in ("lora", "ptuning_v2")}
    shutil.rmtree(tmp_path / "checkpoints" / "6")
    r = cli(tmp_path, *args, config="configs/e2e_t5.py", devices=8)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resuming from step 3" in r.stdout
    for m in first:
        assert_same_adapter(adapter_of(tmp_path, m), first[m])
        assert_peft_logits(t5_dir, tmp_path / "export" / m)
    assert losses(tmp_path) == first_losses
    again = metrics(tmp_path)[-1]
    assert {k: again[k] for k in again if k.startswith("eval/")} == {k: first_eval[k] for k in first_eval
                                                                     if k.startswith("eval/")}


def adapter_of(workdir, method):
    """One method's tensors of a composed method's export (a directory per method)."""
    from safetensors.numpy import load_file

    return load_file(str(Path(workdir) / "export" / method / "adapter_model.safetensors"))
