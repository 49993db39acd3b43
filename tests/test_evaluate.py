"""jaxft.evaluate against its oracles: predictions against transformers (argmax of its logits; its greedy
`generate`), the metrics against scikit-learn, rouge-score and sacrebleu on the predictions the CLI wrote;
a training checkpoint and its export give the same answers, as does training's own generation eval."""

import json
import os
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest
import torch

from jaxft.config import base_config
from jaxft.data import generation, sft
from jaxft.data.sources import Records, read_file
from jaxft.errors import JaxftError
from jaxft.evaluate import evaluate
from jaxft.tokenizer import Tokenizer
from test_train import cli as train_cli
from test_train import xla_flags
from forkserver import python_m

ROOT = Path(__file__).resolve().parent.parent
EN = "the a movie film is was very good bad funny boring story actor charming , . it 's not and of".split()


def save_tiny(cls, d: Path, tok_dir: Path, **kw) -> Path:
    from transformers import LlamaConfig

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, bos_token_id=1, eos_token_id=2, pad_token_id=3, initializer_range=0.2,
                      **kw)
    cls(cfg).eval().save_pretrained(d)
    for f in ("tokenizer.model", "tokenizer_config.json"):
        shutil.copy(Path(tok_dir) / f, d / f)
    return d


def sentences(n, seed, lo=2, hi=6):
    rng = np.random.RandomState(seed)
    return [" ".join(EN[i] for i in rng.randint(0, len(EN), rng.randint(lo, hi))) for _ in range(n)]


SEQ = 128  # no example of the tests' data is cut


def config(model_dir, train, dev, **data):
    c = base_config()
    c.model.path = str(model_dir)
    c.data.name, c.data.eval_name = str(train), str(dev)
    c.data.seq_len = SEQ
    c.data.cache_dir = "none"
    for k, v in data.items():
        c.data[k] = v
    c.train.batch_size = 8
    c.train.seed = 0
    return c


def read_jsonl(p):
    return [json.loads(line) for line in Path(p).read_text().splitlines()]


# ---------------------------------------------------------------------------------------------
# Classification: argmax of transformers' logits; sklearn's scores.


def test_classification_equals_transformers_and_sklearn(tmp_path, tok_dir):
    from sklearn.metrics import accuracy_score, precision_recall_fscore_support
    from transformers import LlamaForSequenceClassification

    from jaxft.data import tasks

    model_dir = save_tiny(LlamaForSequenceClassification, tmp_path / "clf", tok_dir, num_labels=3)
    rng = np.random.RandomState(0)
    for name, n in (("train", 24), ("dev", 21)):
        rows = [{"text": t, "label": ["neg", "neu", "pos"][i]} for t, i in zip(sentences(n, n), rng.randint(0, 3, n))]
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    c = config(model_dir, tmp_path / "train.jsonl", tmp_path / "dev.jsonl", task="classification")
    result = evaluate(c, str(model_dir), out=str(tmp_path / "out"))
    rows = read_jsonl(tmp_path / "out" / "predictions.jsonl")
    assert len(rows) == 21 and result["examples"] == 21

    # transformers' logits of the same token ids (jaxft's classification encoding of the dev records)
    tok = Tokenizer(model_dir)
    names = ["neg", "neu", "pos"]
    arrays, _ = tasks.classification(read_file(tmp_path / "dev.jsonl"), tok, SEQ, "text", "label", names)
    m = LlamaForSequenceClassification.from_pretrained(model_dir).eval()
    with torch.no_grad():
        logits = m(input_ids=torch.tensor(arrays["input_ids"], dtype=torch.long),
                   attention_mask=torch.tensor(arrays["attention_mask"], dtype=torch.long)).logits.numpy()
    assert [r["prediction"] for r in rows] == [["neg", "neu", "pos"][i] for i in logits.argmax(-1)]
    np.testing.assert_allclose([[r["scores"][n] for n in names] for r in rows], logits, rtol=1e-4, atol=1e-4)
    assert len({r["prediction"] for r in rows}) > 1  # not one class for all: the comparison means something

    preds, refs = [r["prediction"] for r in rows], [r["reference"] for r in rows]
    got = json.loads((tmp_path / "out" / "metrics.json").read_text())["metrics"]
    assert got["eval/accuracy"] == pytest.approx(accuracy_score(refs, preds))
    for avg in ("macro", "micro"):
        p, r, f, _ = precision_recall_fscore_support(refs, preds, average=avg, zero_division=0)
        assert [got[f"eval/{k}_{avg}"] for k in ("precision", "recall", "f1")] == pytest.approx([p, r, f])
    p, r, f, _ = precision_recall_fscore_support(refs, preds, labels=["neg", "neu", "pos"], zero_division=0)
    for i, name in enumerate(["neg", "neu", "pos"]):
        assert [got[f"eval/{k}/{name}"] for k in ("precision", "recall", "f1")] == pytest.approx([p[i], r[i], f[i]])
    assert (tmp_path / "out" / "tensorboard").is_dir()


# ---------------------------------------------------------------------------------------------
# Generation: transformers' greedy generate; rouge-score and sacrebleu.


def sft_files(d: Path, n_train=24, n_dev=10):
    for name, n, seed in (("train", n_train, 1), ("dev", n_dev, 2)):
        rows = [{"instruction": "repeat twice", "input": s, "output": f"{s} {s}"} for s in sentences(n, seed)]
        (d / f"{name}.json").write_text(json.dumps(rows))
    return d / "train.json", d / "dev.json"


@pytest.fixture(scope="module")
def lm(tmp_path_factory, tok_dir):
    from transformers import LlamaForCausalLM

    d = tmp_path_factory.mktemp("lm")
    return save_tiny(LlamaForCausalLM, d / "model", tok_dir), sft_files(d)


def spelled(text):
    """Each CJK ideograph as an ASCII word of its own, which rouge-score keeps whole (jaxft's rule)."""
    return "".join(f" u{ord(ch):x} " if "\u4e00" <= ch <= "\u9fff" else ch for ch in text)


@pytest.mark.parametrize("penalty", [1.0, 1.3])
def test_generation_equals_transformers_and_scorers(tmp_path, lm, penalty):
    """Greedy answers as transformers' greedy `generate` gives them, with its repetition penalty
    (`eval.repetition_penalty`) too."""
    import sacrebleu
    from rouge_score import rouge_scorer
    from transformers import LlamaForCausalLM

    from jaxft.generate import answer_text

    model_dir, (train, dev) = lm
    tok = Tokenizer(model_dir)
    # The prompt: the training example's tokens before its response (jaxft.data.sft's rendering).
    records = read_file(dev)
    prompts, _ = generation.prompts_and_references(records, tok, SEQ, max_new_tokens=8)
    for (ids, mask), prompt in zip(sft.examples(records, tok, sft.renderer(tok), SEQ).examples, prompts, strict=True):
        assert ids[: mask.index(1)] == prompt

    # transformers' greedy generate on the same prompts, left-padded
    width = max(map(len, prompts))
    ids = torch.tensor([[3] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    m = LlamaForCausalLM.from_pretrained(model_dir).eval()
    with torch.no_grad():
        new = m.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False, eos_token_id=2,
                         pad_token_id=3, repetition_penalty=penalty).numpy()[:, width:].tolist()
    expected = [answer_text(tok, r, 2).strip() for r in new]  # jaxft's decoding of answers

    # References made from those answers (half exact, half longer), so that every score is a real one.
    refs = [(e if i % 2 == 0 else f"{e} good movie").strip() or "good movie" for i, e in enumerate(expected)]
    rows = [{**r, "output": ref} for r, ref in zip(records.rows, refs)]
    (tmp_path / "dev.json").write_text(json.dumps(rows, ensure_ascii=False))
    c = config(model_dir, train, tmp_path / "dev.json", task="sft")
    c.eval.repetition_penalty = penalty
    evaluate(c, str(model_dir), max_new_tokens=8, out=str(tmp_path / "out"))
    written = read_jsonl(tmp_path / "out" / "predictions.jsonl")
    assert [r["prediction"] for r in written] == expected
    assert [r["reference"] for r in written] == refs

    preds = [r["prediction"] for r in written]
    got = json.loads((tmp_path / "out" / "metrics.json").read_text())["metrics"]
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"])
    scores = [scorer.score(spelled(r), spelled(p)) for r, p in zip(refs, preds)]
    for k in ("rouge1", "rouge2", "rougeL"):
        assert got[f"eval/{k}"] == pytest.approx(np.mean([s[k].fmeasure for s in scores]), abs=1e-9)
    chinese = any("\u4e00" <= ch <= "\u9fff" for t in preds + refs for ch in t)
    want = sacrebleu.corpus_bleu(preds, [refs], tokenize="zh" if chinese else "13a").score
    assert got["eval/bleu"] == pytest.approx(want, abs=1e-9)
    assert got["eval/exact_match"] == np.mean([p.strip() == r.strip() for p, r in zip(preds, refs)]) >= 0.5
    assert got["eval/rouge1"] > 0.5 and got["eval/perplexity"] == pytest.approx(np.exp(got["eval/loss"]))


def test_checkpoint_export_and_training_eval_agree(tmp_path, lm, monkeypatch):
    """One LoRA run that generates during its evals: its workdir and its export evaluate alike, and the
    training's eval/rougeL and eval/bleu (logged to TensorBoard) are jaxft.evaluate's on the same prompts."""
    from jax.experimental.compilation_cache import compilation_cache as cc
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from jaxft.compilation_cache import CACHE_HITS
    from jaxft.train import train_and_evaluate

    model_dir, (train, dev) = lm
    c = config(model_dir, train, dev, task="sft")
    c.method.name, c.method.rank = "lora", 4
    c.train.steps, c.optimizer.learning_rate = 3, 3e-2
    c.eval.generate_examples, c.eval.max_new_tokens, c.eval.at_start = 4, 6, True
    # The run's own compilation cache (not the tests' shared one): evaluating its checkpoint again loads the
    # steps the first evaluation compiled.
    shared = jax.config.jax_compilation_cache_dir
    cc.reset_cache()
    cc.set_cache_dir(None)
    try:
        train_and_evaluate(c, str(tmp_path / "run"))
        logged = [r for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if "eval/rougeL" in r]
        assert logged and logged[-1]["step"] == 3 and "eval/bleu" in logged[-1]

        a = evaluate(c, str(tmp_path / "run"), max_examples=4)
        b = evaluate(c, str(tmp_path / "run" / "export"), max_examples=4)
        assert a["step"] == 3 and a["out"] == str(tmp_path / "run" / "eval" / "validation-3")
        pa, pb = (read_jsonl(Path(x["out"]) / "predictions.jsonl") for x in (a, b))
        assert pa == pb
        assert read_jsonl(tmp_path / "run" / "samples" / "step_3.jsonl") == pa  # training wrote its answers too
        monkeypatch.chdir(tmp_path)  # a relative --checkpoint (Orbax itself takes absolute paths only)
        hits = CACHE_HITS[0]
        evaluate(c, "run/checkpoints/3", max_examples=4, out="rel")
        assert CACHE_HITS[0] > hits
        assert read_jsonl(tmp_path / "rel" / "predictions.jsonl") == pa
    finally:
        cc.reset_cache()
        cc.set_cache_dir(shared)
    assert len(read_jsonl(tmp_path / "run" / "samples" / "step_0.jsonl")) == 4
    untrained = [r for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if r["step"] == 0][0]
    assert a["metrics"]["eval/loss"] != pytest.approx(untrained["eval/loss"])  # the trained weights count
    for k in ("eval/loss", "eval/rougeL", "eval/bleu"):
        assert a["metrics"][k] == pytest.approx(b["metrics"][k], rel=1e-5)
        assert a["metrics"][k] == pytest.approx(logged[-1][k], rel=1e-5)
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard")).Reload()
    steps = [e.step for e in events.Scalars("eval/rougeL")]
    assert steps.count(3) == 2 and 0 in steps  # training's at steps 0 and 3, jaxft.evaluate's at the checkpoint's 3

    # A checkpoint that another method made does not fit: one error, nothing written.
    c.method.rank = 8
    with pytest.raises(JaxftError, match=r"method.rank=8: the checkpoint .* was made with method.rank=4"):
        evaluate(c, str(tmp_path / "run" / "checkpoints" / "3"), out=str(tmp_path / "never"))
    assert not (tmp_path / "never").exists()


def test_export_of_another_head_does_not_fit(tmp_path, lm, tok_dir):
    from transformers import LlamaForSequenceClassification

    model_dir, (train, dev) = lm
    clf = save_tiny(LlamaForSequenceClassification, tmp_path / "clf", tok_dir, num_labels=2)
    with pytest.raises(JaxftError, match="classification head does not fit data.task='sft'"):
        evaluate(config(model_dir, train, dev, task="sft"), str(clf), out=str(tmp_path / "never"))
    assert not (tmp_path / "never").exists()


def test_encoder_decoder_export_does_not_fit_a_decoder_task(tmp_path, lm):
    """An sft (or causal_lm, dpo) task wants a causal LM head; T5's seq2seq LM would be fed the decoder's
    rows as its source and scored on them (a loss, not an error). A T5 config's own task is seq2seq."""
    model_dir, (train, dev) = lm
    t5 = Path(__file__).resolve().parent.parent / "jaxft" / "assets" / "jaxft-tiny-t5"
    with pytest.raises(JaxftError, match=r"a seq2seq_lm head does not fit data.task='sft' \(expected a causal_lm"):
        evaluate(config(model_dir, train, dev, task="sft"), str(t5), out=str(tmp_path / "never"))
    assert not (tmp_path / "never").exists()


def cli(*args):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": xla_flags()}
    return python_m("jaxft.evaluate", *args, env=env)


@pytest.mark.parametrize("args,message", [
    (("--checkpoint={tmp}/missing",), "error: --checkpoint={tmp}/missing: no such directory"),
    (("--checkpoint={model}", "--split=test"), "error: --split=test: expected one of validation, train"),
    ((), "error: --checkpoint=DIR is required"),
    # Was a FileExistsError traceback, after the whole split had been scored.
    (("--checkpoint={model}", "--out={tmp}/afile"), "error: --out={tmp}/afile: {tmp}/afile is a file"),
])
def test_cli_bad_input_is_one_line(tmp_path, lm, args, message):
    model_dir, (train, dev) = lm
    (tmp_path / "afile").write_text("x")
    args = [a.format(tmp=tmp_path, model=model_dir) for a in args]
    r = cli("--config=configs/e2e_lora.py", f"--config.model.path={model_dir}", f"--out={tmp_path / 'out'}", *args)
    assert r.returncode == 2, r.stdout + r.stderr
    assert r.stderr.count("\n") == 1 and r.stderr.startswith(message.format(tmp=tmp_path, model=model_dir)), r.stderr
    assert not (tmp_path / "out").exists()


def test_adapter_without_a_base_model_path_is_one_line(tmp_path):
    """An adapter is applied to `model.path`; a config that builds its model from `model.init` has none."""
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text('{"peft_type": "LORA"}')
    r = cli("--config=configs/tiny_test.py", "--config.data.synthetic_labels=2", f"--out={tmp_path / 'out'}",
            f"--checkpoint={tmp_path / 'adapter'}")
    assert r.returncode == 2, r.stdout + r.stderr
    assert r.stderr.count("\n") == 1 and "model.path is empty" in r.stderr, r.stderr
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------
# Prompts and references.


def test_prompts_keep_their_end_and_share_references(tok_dir):
    tok = Tokenizer(tok_dir)
    long = {"instruction": " ".join(sentences(1, 0, 30, 31)), "output": "good"}
    prompts, refs = generation.prompts_and_references(Records([long], ["f:1"]), tok, 32, max_new_tokens=8)
    full = sft.encode(sft.renderer(tok).segments(sft.conversation(long, "f:1"))[:-1], tok)[0]
    assert len(full) > 24 and prompts[0] == [tok.bos_id] + full[len(full) - 23:] and refs == ["good"]
    assert generation.distinct([[1, 2], [3], [1, 2]], ["a", "b", "c"]) == ([[1, 2], [3]], [["a", "c"], ["b"]])
    assert generation.interleave([["a1", "a2", "a3"], [], ["b1"]]) == ["a1", "b1", "a2", "a3"]
    with pytest.raises(JaxftError, match="f:2: empty assistant turn"):
        generation.prompts_and_references(Records([long, {"instruction": "a", "output": ""}], ["f:1", "f:2"]), tok, 32)


def test_references_are_what_the_tokenizer_writes():
    """ADGEN on jaxft-tiny-t5: T5's NFKC writes Chinese full-width punctuation as ASCII ('，' -> ','), so the
    references are scored as the model can write them: transformers' decoded labels, as its seq2seq recipes
    score. A model that answers every target exactly then scores BLEU 100 and exact match 1 (against the
    records' own text: BLEU 84, exact match 0)."""
    from transformers import AutoTokenizer

    from jaxft import hf
    from jaxft.data.sources import ASSETS
    from jaxft.evaluate import generation_scores

    d = hf.resolve("jaxft-tiny-t5")
    tok, ref = Tokenizer(d), AutoTokenizer.from_pretrained(str(d))
    rows = [json.loads(line) for line in (ASSETS / "adgen" / "dev.json").read_text(encoding="utf-8").splitlines()]
    # targets transformers' T5Tokenizer (no byte fallback) reads without <unk>: its decoded labels are whole
    rows = [r for r in rows if "，" in r["summary"] and ref.unk_token_id not in ref(text_target=r["summary"]).input_ids]
    rows = rows[:12]
    assert len(rows) == 12
    records = Records(rows, [f"dev.json:{i + 1}" for i in range(len(rows))])
    _, refs = generation.prompts_and_references(records, tok, 64, fields=sft.Fields("content", "summary"),
                                                encoder_decoder=True)
    labels = [ref(text_target=r["summary"]).input_ids for r in rows]
    assert refs == ref.batch_decode(labels, skip_special_tokens=True)
    perfect = [tok.decode(tok.encode(r["summary"])).strip() for r in rows]  # what greedy answers decode to
    got = generation_scores(perfect, [[r] for r in refs])
    assert got["bleu"] == pytest.approx(100.0) and got["exact_match"] == 1.0 and got["rougeL"] == pytest.approx(1.0)
    assert generation_scores(perfect, [r["summary"] for r in rows])["exact_match"] == 0.0


def test_e2e_pairs_are_bundled():
    from jaxft.data.sources import resolve

    c = base_config()
    c.data.name = "e2e_nlg"
    train, ev, _, _ = resolve(c.data)
    assert len(train.rows) == 4672 and len(ev.rows) == 4693
    assert ev.rows[0] == {"meaning_representation": "name : Blue Spice | Type : coffee shop | area : city centre",
                          "human_reference": "A coffee shop in the city centre area called Blue Spice ."}


def test_encoder_decoder_prompts_are_the_pairs_training_reads(tok_dir):
    """On an encoder-decoder the prompt is the source training's arrays hold (`seq2seq.examples`), for
    source/target pairs and Alpaca records alike; a bad record stops naming its file and line."""
    from jaxft.data import seq2seq

    tok = Tokenizer(tok_dir)
    pairs = [{"src": "the movie was good", "tgt": "good"}, {"src": "it was bad", "tgt": "bad"}]
    alpaca = [{"instruction": "is it good", "input": "the movie was good", "output": "yes"},
              {"instruction": "is it good", "input": "", "system": "be short", "output": "no"}]
    cases = ((pairs, sft.Fields("src", "tgt"), ["good", "bad"]), (alpaca, sft.Fields(), ["yes", "no"]))
    for rows, fields, refs in cases:
        records = Records(rows, ["f:1", "f:2"])
        got = generation.prompts_and_references(records, tok, 64, fields=fields, encoder_decoder=True)
        assert got == ([s for s, _ in seq2seq.examples(records, tok, 64, 16, fields).examples], refs)
    assert got[0][0] == tok.encode("is it good\n\nthe movie was good") + tok.eos  # Alpaca's user turn
    bad = Records([pairs[0], {"src": "it was bad", "tgt": " "}], ["d.jsonl:1", "d.jsonl:2"])
    with pytest.raises(JaxftError, match=r"^d\.jsonl:2: 'tgt' is empty \(data\.skip_bad_records=True skips") as e:
        generation.prompts_and_references(bad, tok, 16, fields=sft.Fields("src", "tgt"), encoder_decoder=True)
    assert "\n" not in str(e.value)
    kept = generation.prompts_and_references(bad, tok, 16, fields=sft.Fields("src", "tgt"), encoder_decoder=True,
                                             skip_bad=True)
    assert kept[1] == ["good"]



def test_max_examples_applies_to_a_language_models_rows(tmp_path):
    """Found by the second input audit. Was: --max_examples ignored for tasks that neither classify nor
    generate (exit 0, the loss of the whole split). Oracle: the export's cross-entropy on the first 3 rows."""
    from jaxft import hf
    from jaxft.compare import load_config
    from jaxft.data import tasks

    r = train_cli(tmp_path, "--config.method.name=full", "--config.train.steps=2", "--config.checkpoint.every_steps=0")
    assert r.returncode == 0, r.stderr[-3000:]
    config, export = load_config(str(ROOT / "configs" / "tiny_test.py")), str(tmp_path / "export")
    every = evaluate(config, export, out=str(tmp_path / "all"))["metrics"]["eval/loss"]
    three = evaluate(config, export, max_examples=3, out=str(tmp_path / "three"))["metrics"]["eval/loss"]

    model, params = hf.load(export)
    ids = tasks.synthetic(32, 16, 128, config.train.seed + 1, 0)["input_ids"][:3]  # the eval split's first rows
    logits = np.asarray(model.apply({"params": params}, ids, np.ones_like(ids)), np.float64)[:, :-1]
    top = logits.max(-1, keepdims=True)
    logp = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
    want = -np.take_along_axis(logp, ids[:, 1:, None], -1).mean()
    assert three == pytest.approx(want, rel=1e-5) and abs(three - every) > 1e-4
