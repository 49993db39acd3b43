"""PET's hard prompts (`data.task=cloze`): the template's rows against transformers' tokenizer, the loss
against torch on a BertForMaskedLM, the errors, and a LoRA run whose export jaxft.evaluate and peft
read with the run's own predictions."""

from __future__ import annotations

import dataclasses
import json
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from jaxft import hf, objectives  # noqa: E402
from jaxft.data import sources, tasks  # noqa: E402
from jaxft.errors import JaxftError  # noqa: E402
from jaxft.tokenizer import Tokenizer  # noqa: E402
from tests.test_train import ROOT, cli, losses  # noqa: E402
from forkserver import python_m

BERT = hf.resolve("jaxft-tiny-bert")
TEMPLATE, WORDS = "{text} it was {mask} .", "bad,good"


def sst2(n=6):
    dev = sources.read_file(sources.BUNDLED["sst2"].eval)
    return sources.Records(dev.rows[:n], dev.where[:n])


def rte(n=4):
    dev = sources.read_file(sources.BUNDLED["rte"].eval)
    return sources.Records(dev.rows[:n], dev.where[:n])


@pytest.fixture(scope="module")
def tiny_mlm(tmp_path_factory):
    """A random BertForMaskedLM (hidden 32, 2 layers) with the bundled WordPiece vocabulary."""
    return tiny_bert(tmp_path_factory.mktemp("tiny-mlm"), "BertForMaskedLM")


def tiny_bert(d, model_class: str):
    """A random `model_class` (hidden 32, 2 layers) saved in `d` with the bundled WordPiece vocabulary."""
    for name in ("vocab.txt", "tokenizer_config.json"):
        shutil.copy(BERT / name, d / name)
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=8192, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, max_position_embeddings=128)
    getattr(transformers, model_class)(cfg).save_pretrained(d)
    return d


def test_rows_are_the_filled_template_as_transformers_tokenizes_it():
    tok, ref = Tokenizer(BERT), transformers.AutoTokenizer.from_pretrained(str(BERT))
    records = sst2()
    arrays, cut = tasks.cloze(records, tok, 64, "sentence", "label", [0, 1], TEMPLATE, WORDS)
    assert cut == 0
    assert (arrays["verbalizer"] == ref.convert_tokens_to_ids(["bad", "good"])).all()
    for i, row in enumerate(records.rows):
        want = ref(row["sentence"] + " it was [MASK] .")["input_ids"]
        n = int(arrays["attention_mask"][i].sum())
        assert arrays["input_ids"][i, :n].tolist() == want
        assert arrays["input_ids"][i, arrays["mlm_positions"][i, 0]] == ref.mask_token_id
        assert arrays["labels"][i] == int(row["label"])

    # Too long: the text loses its end, the template stays whole.
    short, cut = tasks.cloze(records, tok, 8, "sentence", "label", [0, 1], TEMPLATE, WORDS)
    assert cut == len(records.rows)
    tail = ref.convert_tokens_to_ids(["it", "was", "[MASK]", ".", "[SEP]"])
    assert all(r[-5:].tolist() == tail for r in short["input_ids"])

    # Pairs: {text_b} is the second text (RTE), cut longest first.
    pairs = rte()
    arrays, _ = tasks.cloze(pairs, tok, 256, "premise", "label", ["entailment", "not_entailment"],
                            "{text} ? {mask} , {text_b}", "yes,no", "hypothesis")
    for i, row in enumerate(pairs.rows):
        want = ref(row["premise"] + " ? [MASK] , " + row["hypothesis"])["input_ids"]
        assert arrays["input_ids"][i, : len(want)].tolist() == want
    arrays, _ = tasks.cloze(pairs, tok, 24, "premise", "label", ["entailment", "not_entailment"],
                            "{text} ? {mask} , {text_b}", "yes,no", "hypothesis")
    assert (arrays["attention_mask"].sum(1) == 24).all()
    assert all(r[arrays["mlm_positions"][i, 0]] == ref.mask_token_id for i, r in enumerate(arrays["input_ids"]))


@pytest.mark.parametrize("template, words, pair, message", [
    ("{text} it was .", WORDS, None, r"expected \{text\} and \{mask\} once each .*found \{text\}"),
    ("{text} {mask} {mask}", WORDS, None, r"found \{text\}, \{mask\}, \{mask\}"),
    ("{text} {mask} {foo}", WORDS, None, r"found .*\{foo\}"),
    ("{text} {mask} {text_b}", WORDS, None, r"no \{text_b\}: this data has single texts"),
    ("{text} {mask}", WORDS, "hypothesis", r"and \{text_b\} \(this data has pairs\)"),
    (TEMPLATE, "bad", None, r"data.verbalizer='bad': 1 words for the 2 labels"),
    (TEMPLATE, "bad,\u2603", None, r"the word '\u2603' is not in the vocabulary \(it reads as \['\[UNK\]'\], with "
                                  r"the unknown token\)"),
    (TEMPLATE, "bad,", None, r"data.verbalizer='bad,': an empty label word"),
])
def test_bad_templates_and_verbalizers_are_one_line(template, words, pair, message):
    tok = Tokenizer(BERT)
    records = rte() if pair else sst2()
    text, labels = ("premise", ["entailment", "not_entailment"]) if pair else ("sentence", [0, 1])
    with pytest.raises(JaxftError, match=message):
        tasks.cloze(records, tok, 64, text, "label", labels, template, words, pair)


def test_a_tokenizer_without_a_mask_token_is_an_error():
    with pytest.raises(JaxftError, match="the tokenizer has no mask token"):
        tasks.cloze(sst2(), Tokenizer(hf.resolve("jaxft-tiny")), 64, "sentence", "label", [0, 1], TEMPLATE, WORDS)


def test_loss_and_predictions_are_the_label_words_at_the_mask(tiny_mlm):
    import jax.numpy as jnp

    model, params = hf.load(str(tiny_mlm))
    arrays, _ = tasks.cloze(sst2(), Tokenizer(tiny_mlm), 32, "sentence", "label", [0, 1], TEMPLATE, WORDS)
    batch = {k: jnp.asarray(v) for k, v in arrays.items()}
    out = model.apply({"params": params}, **objectives.masked_lm_inputs(batch))
    sums = objectives.cloze_loss(out, batch)

    ref = transformers.BertForMaskedLM.from_pretrained(tiny_mlm).eval()
    with torch.no_grad():
        logits = ref(input_ids=torch.tensor(arrays["input_ids"]).long(),
                     attention_mask=torch.tensor(arrays["attention_mask"]).long()).logits
    rows = torch.arange(len(logits))
    words = logits[rows, torch.tensor(arrays["mlm_positions"][:, 0]).long()][:, torch.tensor(arrays["verbalizer"][0]).long()]
    want = torch.nn.functional.cross_entropy(words, torch.tensor(arrays["labels"]).long())
    assert float(sums["loss_sum"] / sums["count"]) == pytest.approx(float(want), rel=1e-5)
    assert float(sums["correct"]) == float((words.argmax(-1).numpy() == arrays["labels"]).sum())


def test_lora_on_cloze_trains_exports_and_evaluates_alike(tiny_mlm, tmp_path):
    """LoRA on the masked LM through the CLI: the loss falls; jaxft.evaluate on the export gives the run's
    final accuracy; peft serves the exported adapter with jaxft's logits at the mask."""
    from peft import PeftModel

    from jaxft.evaluate import evaluate

    args = (f"--config.model.path={tiny_mlm}", "--config.method.name=lora", "--config.data.max_train_examples=8",
            "--config.data.max_eval_examples=16", "--config.data.seq_len=32", "--config.train.batch_size=8",
            "--config.optimizer.learning_rate=3e-2", "--config.optimizer.warmup_steps=0",
            "--config.train.log_every_steps=1", "--config.train.steps=6", "--config.eval.at_start=False")
    r = cli(tmp_path, *args, config="configs/pet_bert.py")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "head=masked_lm" in r.stdout
    got = losses(tmp_path)
    assert got[6] < got[1], got
    final = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()][-1]

    import importlib.util

    spec = importlib.util.spec_from_file_location("cfg", ROOT / "configs/pet_bert.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config()
    c.model.path, c.method.name = str(tiny_mlm), "lora"
    c.data.max_eval_examples, c.data.seq_len, c.train.batch_size = 16, 32, 8
    result = evaluate(c, str(tmp_path / "export"), out=str(tmp_path / "eval"))
    assert result["metrics"]["eval/accuracy"] == pytest.approx(final["eval/accuracy"], abs=1e-9)

    base = transformers.BertForMaskedLM.from_pretrained(tiny_mlm).eval()
    arrays, _ = tasks.cloze(sst2(16), Tokenizer(tiny_mlm), 32, "sentence", "label", [0, 1], TEMPLATE, WORDS)
    with torch.no_grad():
        before = base(input_ids=torch.tensor(arrays["input_ids"]).long(),
                      attention_mask=torch.tensor(arrays["attention_mask"]).long()).logits.numpy()
    served = PeftModel.from_pretrained(base, tmp_path / "export").eval()
    model, params = hf.load(str(tiny_mlm), adapter=str(tmp_path / "export"))
    ours = np.asarray(model.apply({"params": params}, **objectives.masked_lm_inputs(arrays)))[:, 0]
    with torch.no_grad():
        theirs = served(input_ids=torch.tensor(arrays["input_ids"]).long(),
                        attention_mask=torch.tensor(arrays["attention_mask"]).long()).logits.numpy()
    at_mask = (np.arange(len(theirs)), arrays["mlm_positions"][:, 0])
    theirs, before = theirs[at_mask], before[at_mask]
    assert np.abs(theirs - before).max() > 1e-3  # the adapter trained
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------------------
# Causal LMs: the row ends where the mask would be, the answer is the next word.

LLAMA = hf.resolve("jaxft-tiny")
CAUSAL, CAUSAL_WORDS = "{text} It was {mask}", "bad,good"


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory):
    """A random LlamaForCausalLM (hidden 32, 2 layers, untied head) with jaxft-tiny's SentencePiece."""
    d = tmp_path_factory.mktemp("tiny-lm")
    for name in ("tokenizer.model", "tokenizer_config.json"):
        shutil.copy(LLAMA / name, d / name)
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=4096, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                   tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=3)
    transformers.LlamaForCausalLM(cfg).save_pretrained(d)
    return d


def test_causal_rows_end_at_the_mask_as_transformers_tokenizes_the_text():
    tok, ref = Tokenizer(LLAMA), transformers.AutoTokenizer.from_pretrained(str(LLAMA))
    records = sst2()
    arrays, cut = tasks.cloze(records, tok, 64, "sentence", "label", [0, 1], CAUSAL, CAUSAL_WORDS, causal=True)
    assert cut == 0
    assert arrays["verbalizer"][0].tolist() == [ref.encode(w, add_special_tokens=False)[0] for w in ("bad", "good")]
    for i, row in enumerate(records.rows):
        want = ref(row["sentence"].strip() + " It was")["input_ids"]  # BOS, no EOS: the next word answers
        n = int(arrays["attention_mask"][i].sum())
        assert arrays["input_ids"][i, :n].tolist() == want
        assert arrays["mlm_positions"][i, 0] == n - 1

    # Too long: the text loses its end, "It was" stays and ends the row.
    short, cut = tasks.cloze(records, tok, 6, "sentence", "label", [0, 1], CAUSAL, CAUSAL_WORDS, causal=True)
    assert cut == len(records.rows)
    assert all(r[-2:].tolist() == ref.encode("It was", add_special_tokens=False) for r in short["input_ids"])


def test_causal_template_needs_the_mask_last():
    tok = Tokenizer(LLAMA)
    with pytest.raises(JaxftError, match=r"a causal LM reads left to right, so \{mask\} must come after \{text\}"):
        tasks.cloze(sst2(), tok, 64, "sentence", "label", [0, 1], "It was {mask} : {text}", CAUSAL_WORDS, causal=True)
    # Literal text after the mask is no part of the question (it cannot change the next word).
    a, _ = tasks.cloze(sst2(), tok, 64, "sentence", "label", [0, 1], CAUSAL + " .", CAUSAL_WORDS, causal=True)
    b, _ = tasks.cloze(sst2(), tok, 64, "sentence", "label", [0, 1], CAUSAL, CAUSAL_WORDS, causal=True)
    assert (a["input_ids"] == b["input_ids"]).all()


@pytest.fixture(scope="module")
def byte_bpe(tmp_path_factory):
    """A GPT-2-style byte-level BPE (600 pieces) trained on RTE and SST-2 sentences."""
    from tokenizers import Tokenizer as Raw, decoders, models, pre_tokenizers, trainers

    d = tmp_path_factory.mktemp("byte-bpe")
    texts = [r["premise"] + " " + r["hypothesis"] for r in rte(40).rows] + [r["sentence"] for r in sst2(200).rows]
    raw = Raw(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    raw.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=600, special_tokens=["<|endoftext|>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    end = "<|endoftext|>"
    transformers.GPT2TokenizerFast(tokenizer_object=raw, bos_token=end, eos_token=end,
                                   unk_token=end).save_pretrained(d)
    return d


def test_byte_level_bpe_pieces_join_as_the_whole_text(byte_bpe):
    """A byte-level BPE makes the space part of the next word ("Ġword"): the template's pieces and the
    pair's second text are encoded so that the row is what GPT-2's tokenizer makes of the whole string."""
    tok, ref = Tokenizer(byte_bpe), transformers.AutoTokenizer.from_pretrained(str(byte_bpe))
    pairs = rte(4)
    arrays, cut = tasks.cloze(pairs, tok, 1024, "premise", "label", ["entailment", "not_entailment"],
                              "{text} Question: {text_b} True or false? Answer:{mask}", " a, the", "hypothesis",
                              causal=True)
    assert cut == 0
    for i, row in enumerate(pairs.rows):
        want = tok.bos + ref.encode(row["premise"].strip() + " Question: " + row["hypothesis"].strip() +
                                    " True or false? Answer:")  # jaxft starts a row with GPT-2's <|endoftext|>
        n = int(arrays["attention_mask"][i].sum())
        assert arrays["input_ids"][i, :n].tolist() == want
    shots = tasks.Demonstrations(1, sst2(8), seed=3)
    arrays, _ = tasks.cloze(sst2(4), tok, 256, "sentence", "label", [0, 1], CAUSAL, " a, the", causal=True,
                            demonstrations=shots)  # words the small vocabulary has whole
    rows = sst2(8).rows
    for i in range(4):
        shown = tasks._demonstrations(sst2(4), shots, "label", {0: 0, 1: 1}, tok, True)["rows"](i)
        text = " ".join(rows[j]["sentence"].strip() + " It was " + ["a", "the"][int(rows[j]["label"])]
                        for j in shown)
        want = tok.bos + ref.encode(text + " " + rows[i]["sentence"].strip() + " It was")
        n = int(arrays["attention_mask"][i].sum())
        assert arrays["input_ids"][i, :n].tolist() == want


def test_causal_loss_is_the_next_word_after_the_template(tiny_lm):
    import jax.numpy as jnp

    model, params = hf.load(str(tiny_lm))
    assert model.cfg.head == "causal_lm"
    arrays, _ = tasks.cloze(sst2(), Tokenizer(tiny_lm), 32, "sentence", "label", [0, 1], CAUSAL, CAUSAL_WORDS,
                            causal=True)
    batch = {k: jnp.asarray(v) for k, v in arrays.items()}
    fused = model.apply({"params": params}, **objectives.masked_lm_inputs(batch), return_hidden=True)
    logits = model.apply({"params": params}, **objectives.masked_lm_inputs(batch))
    assert isinstance(fused, tuple) and logits.shape == (len(arrays["labels"]), 1, 4096)

    ref = transformers.LlamaForCausalLM.from_pretrained(tiny_lm).eval()
    with torch.no_grad():
        out = ref(input_ids=torch.tensor(arrays["input_ids"]).long(),
                  attention_mask=torch.tensor(arrays["attention_mask"]).long()).logits
    rows = torch.arange(len(out))
    words = out[rows, torch.tensor(arrays["mlm_positions"][:, 0]).long()][:, torch.tensor(arrays["verbalizer"][0]).long()]
    want = torch.nn.functional.cross_entropy(words, torch.tensor(arrays["labels"]).long())
    for outputs in (fused, logits):  # the words' logits from the fused states, and from the full vocabulary
        np.testing.assert_allclose(np.asarray(objectives.cloze_logits(outputs, batch)), words.numpy(), rtol=1e-5,
                                   atol=1e-5)
        sums = objectives.cloze_loss(outputs, batch)
        assert float(sums["loss_sum"] / sums["count"]) == pytest.approx(float(want), rel=1e-5)


# ---------------------------------------------------------------------------------------------------
# LM-BFF's demonstrations.


def test_demonstrations_follow_a_masked_lm_question_as_transformers_tokenizes_them():
    tok, ref = Tokenizer(BERT), transformers.AutoTokenizer.from_pretrained(str(BERT))
    train, dev = sst2(40), sources.read_file(sources.BUNDLED["sst2"].eval)
    dev = sources.Records(dev.rows[40:46], dev.where[40:46])
    shots = tasks.Demonstrations(2, train, seed=0)
    for records in (train, dev):
        arrays, cut = tasks.cloze(records, tok, 256, "sentence", "label", [0, 1], TEMPLATE, WORDS, demonstrations=shots)
        again, _ = tasks.cloze(records, tok, 256, "sentence", "label", [0, 1], TEMPLATE, WORDS, demonstrations=shots)
        assert cut == 0 and (arrays["input_ids"] == again["input_ids"]).all()  # drawn from the seed
        pick = tasks._demonstrations(records, shots, "label", {0: 0, 1: 1}, tok, False)["rows"]
        for i, row in enumerate(records.rows):
            shown = pick(i)
            assert sorted(int(train.rows[j]["label"]) for j in shown) == [0, 0, 1, 1]  # two of each class
            assert records is not train or i not in shown  # never the example itself
            text = row["sentence"] + " it was [MASK] ." + "".join(
                " [SEP] " + train.rows[j]["sentence"] + " it was " + ["bad", "good"][int(train.rows[j]["label"])] + " ."
                for j in shown)
            want = ref(text)["input_ids"]
            n = int(arrays["attention_mask"][i].sum())
            assert arrays["input_ids"][i, :n].tolist() == want
            assert arrays["input_ids"][i, arrays["mlm_positions"][i, 0]] == ref.mask_token_id
    drawn = tasks.cloze(train, tok, 256, "sentence", "label", [0, 1], TEMPLATE, WORDS, demonstrations=shots)[0]
    other = tasks.cloze(train, tok, 256, "sentence", "label", [0, 1], TEMPLATE, WORDS,
                        demonstrations=tasks.Demonstrations(2, train, seed=1))[0]
    assert (other["input_ids"] != drawn["input_ids"]).any()  # another seed, other demonstrations
    # Another draw of the same seed (LM-BFF's ensemble at evaluation): other demonstrations, drawn by the same rules.
    second = dataclasses.replace(shots, draw=1)
    again = tasks.cloze(train, tok, 256, "sentence", "label", [0, 1], TEMPLATE, WORDS, demonstrations=second)[0]
    assert (again["input_ids"] != drawn["input_ids"]).any()
    first, pick = (tasks._demonstrations(train, s, "label", {0: 0, 1: 1}, tok, False)["rows"] for s in (shots, second))
    assert sum(first(i) != pick(i) for i in range(len(train.rows))) > len(train.rows) // 2
    for i in range(len(train.rows)):
        assert sorted(int(train.rows[j]["label"]) for j in pick(i)) == [0, 0, 1, 1] and i not in pick(i)

    # Too long for data.seq_len: every text is cut, longest first; the templates and label words stay.
    short, cut = tasks.cloze(train, tok, 40, "sentence", "label", [0, 1], TEMPLATE, WORDS, demonstrations=shots)
    assert cut > 0 and (short["attention_mask"].sum(1) <= 40).all()
    assert (short["input_ids"][np.arange(40), short["mlm_positions"][:, 0]] == ref.mask_token_id).all()
    assert ((short["input_ids"] == ref.convert_tokens_to_ids("[SEP]")).sum(1) == 5).all()


def test_demonstrations_come_before_a_causal_question():
    tok, ref = Tokenizer(LLAMA), transformers.AutoTokenizer.from_pretrained(str(LLAMA))
    train = sst2(30)
    shots = tasks.Demonstrations(1, train, seed=0)
    arrays, _ = tasks.cloze(train, tok, 256, "sentence", "label", [0, 1], CAUSAL, CAUSAL_WORDS, causal=True,
                            demonstrations=shots)
    pick = tasks._demonstrations(train, shots, "label", {0: 0, 1: 1}, tok, True)["rows"]
    for i, row in enumerate(train.rows):
        shown = pick(i)
        text = " ".join(train.rows[j]["sentence"].strip() + " It was " + ["bad", "good"][int(train.rows[j]["label"])]
                        for j in shown + [i])
        want = ref(text.rsplit(" ", 1)[0])["input_ids"]  # the question's answer is left out
        n = int(arrays["attention_mask"][i].sum())
        assert arrays["input_ids"][i, :n].tolist() == want and arrays["mlm_positions"][i, 0] == n - 1


def test_fit_texts_is_longest_first():
    assert tasks.fit_texts([3, 4], 10) == [3, 4]
    for a, b, room in ((9, 3, 8), (3, 9, 8), (9, 9, 7), (10, 9, 7), (9, 10, 7)):  # fit_pair's HF rule
        x, y = tasks.fit_pair(list(range(a)), list(range(b)), room)
        assert tasks.fit_texts([a, b], room) == [len(x), len(y)]
    assert tasks.fit_texts([2, 10, 7, 10], 20) == [2, 6, 6, 6]  # the short one whole, the rest evened
    assert tasks.fit_texts([2, 10, 7, 9], 21) == [2, 7, 6, 6]  # the token left over: the longest text
    assert tasks.fit_texts([5, 5, 5], 14) == [4, 5, 5]  # on a tie: a later text


@pytest.mark.parametrize("args, message", [
    (dict(per_class=3, n=5), r"data.demonstrations=3: the training data has 2 examples of label 0, expected at "
                             r"least 4"),
    (dict(per_class=1, n=30, seq_len=18), r"the template and 2 demonstrations take 16 of data.seq_len=18 tokens"),
])
def test_demonstration_errors_are_one_line(args, message):
    train = sst2(args["n"])
    with pytest.raises(JaxftError, match=message):
        tasks.cloze(train, Tokenizer(BERT), args.get("seq_len", 128), "sentence", "label", [0, 1], TEMPLATE, WORDS,
                    demonstrations=tasks.Demonstrations(args["per_class"], train))


def config_of(settings: dict):
    from jaxft.config import base_config

    c = base_config()
    for key, value in settings.items():
        section, name = key.split(".")
        c[section][name] = value
    return c


def train_and_evaluate(tmp_path, settings: dict):
    """The CLI with `settings` ({"section.key": value}) for 6 steps: the loss falls, and jaxft.evaluate
    on the export gives the run's final accuracy. -> (the run, its last metrics row, evaluate's result)."""
    from jaxft.evaluate import evaluate

    r = cli(tmp_path, *(f"--config.{k}={v}" for k, v in settings.items()))
    assert r.returncode == 0, r.stderr[-3000:]
    got = losses(tmp_path)
    assert got[6] < got[1], got
    final = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()][-1]
    result = evaluate(config_of(settings), str(tmp_path / "export"), out=str(tmp_path / "eval"))
    assert result["metrics"]["eval/accuracy"] == pytest.approx(final["eval/accuracy"], abs=1e-9)
    return r, final, result


def test_lora_on_a_causal_lm_with_demonstrations_trains_exports_and_evaluates_alike(tiny_lm, tmp_path):
    """The CLI on a decoder: LoRA, a cloze question after one demonstration per class. The loss falls;
    jaxft.evaluate on the export gives the run's final accuracy; peft serves the adapter with jaxft's
    logits at the row's last token, and jaxft.evaluate's ensemble over 3 sets of demonstrations predicts
    what peft's class logits averaged over the same 3 sets do."""
    from peft import PeftModel

    from jaxft.evaluate import evaluate

    settings = {"model.path": str(tiny_lm), "method.name": "lora", "data.name": "sst2", "data.task": "cloze",
                "data.cloze_template": CAUSAL, "data.verbalizer": CAUSAL_WORDS, "data.demonstrations": 1,
                "data.max_train_examples": 16, "data.max_eval_examples": 16, "data.seq_len": 96,
                "train.batch_size": 8, "optimizer.learning_rate": 3e-2, "optimizer.warmup_steps": 0,
                "train.log_every_steps": 1, "train.steps": 6, "eval.every_steps": 6}
    r, final, result = train_and_evaluate(tmp_path, settings)
    assert "head=causal_lm" in r.stdout
    assert "eval/perplexity" not in final and "eval/perplexity" not in result["metrics"]  # a loss over 2 words

    bundled = sources.read_file(sources.BUNDLED["sst2"].train)
    train = sources.Records(bundled.rows[:16], bundled.where[:16])  # dev rows, demonstrations from these
    sets = [tasks.cloze(sst2(16), Tokenizer(tiny_lm), 96, "sentence", "label", [0, 1], CAUSAL, CAUSAL_WORDS,
                        causal=True, demonstrations=tasks.Demonstrations(1, train, seed=0, draw=k))[0] for k in range(3)]
    arrays = sets[0]
    base = transformers.LlamaForCausalLM.from_pretrained(tiny_lm).eval()
    served = PeftModel.from_pretrained(base, tmp_path / "export").eval()
    model, params = hf.load(str(tiny_lm), adapter=str(tmp_path / "export"))
    ours = np.asarray(objectives.cloze_logits(model.apply({"params": params}, **objectives.masked_lm_inputs(arrays)),
                                              arrays))

    def peft_logits(a):
        with torch.no_grad():
            out = served(input_ids=torch.tensor(a["input_ids"]).long(),
                         attention_mask=torch.tensor(a["attention_mask"]).long()).logits.numpy()
        return out[np.arange(len(out))[:, None], a["mlm_positions"], a["verbalizer"]]

    theirs = np.stack([peft_logits(a) for a in sets])
    np.testing.assert_allclose(ours, theirs[0], rtol=1e-4, atol=1e-4)
    assert (ours.argmax(1) == arrays["labels"]).mean() == pytest.approx(final["eval/accuracy"], abs=1e-9)

    # LM-BFF's ensemble: the class logits averaged over 3 drawn sets of demonstrations per example.
    assert all((a["input_ids"] != arrays["input_ids"]).any() for a in sets[1:])
    ensemble = evaluate(config_of(settings), str(tmp_path / "export"), demonstration_sets=3,
                        out=str(tmp_path / "eval3"))["metrics"]
    labels = arrays["labels"]
    assert ensemble["eval/accuracy"] == pytest.approx((theirs.mean(0).argmax(1) == labels).mean(), abs=1e-9)
    assert ensemble["eval/single_set_accuracy"] == pytest.approx((theirs.argmax(2) == labels).mean(), abs=1e-9)
    rows = [json.loads(line) for line in (tmp_path / "eval3" / "predictions.jsonl").open()]
    np.testing.assert_allclose([[r["scores"][c] for c in ("0", "1")] for r in rows], theirs.mean(0), rtol=1e-4, atol=1e-4)
    assert [r["prediction"] for r in rows] == [str(c) for c in theirs.mean(0).argmax(1)]
    assert ensemble["eval/loss"] == pytest.approx(result["metrics"]["eval/loss"], rel=1e-6)  # set 0's, as training's


def test_redrawn_demonstrations_are_each_batch_encoded_with_its_own_draw(tmp_path):
    """data.redraw_demonstrations: batch p's rows are its examples encoded with draw p + 1 (the rows of a
    subset as the whole set's), other demonstrations every time an example comes again."""
    from jaxft.data.iterator import Batches

    tok, train = Tokenizer(BERT), sources.read_file(sources.BUNDLED["sst2"].train)
    train = sources.Records(train.rows[:24], train.where[:24])
    shots = tasks.Demonstrations(1, train, seed=3)
    encode = lambda **kw: tasks.cloze(train, tok, 96, "sentence", "label", [0, 1], TEMPLATE, WORDS, **kw)[0]  # noqa: E731
    whole, part = encode(demonstrations=shots), encode(demonstrations=shots, which=[7, 3, 7])
    assert all((part[k] == whole[k][[7, 3, 7]]).all() for k in whole)

    data = redrawn_data(seq_len=96, seed=3, examples=24)
    assert all((data.train[k] == whole[k]).all() for k in whole)  # draw 0, as without redrawing
    batches = Batches(data.train, 8, seed=3, transform=data.transform)
    seen = {}
    for p in range(6):  # two epochs of 3 batches: every example twice
        got, idx = batches.local(p, (0, 8)), batches.indices(p)
        want = encode(demonstrations=dataclasses.replace(shots, draw=p + 1), which=idx)
        assert all((got[k] == want[k]).all() for k in want)
        for e, row in zip(idx.tolist(), got["input_ids"]):
            seen.setdefault(e, []).append(row)
    assert sum((a != b).any() for a, b in seen.values()) > len(seen) // 2  # new demonstrations the second time


def redrawn_data(seq_len: int, seed: int, examples: int):
    """jaxft.train's data for SST-2's first `examples` training sentences as cloze questions on the bundled
    BERT, one demonstration per class redrawn every batch (data.redraw_demonstrations)."""
    from jaxft.train import load_data, load_model_config

    c = config_of({"model.path": str(BERT), "data.name": "sst2", "data.task": "cloze", "data.cloze_template": TEMPLATE,
                   "data.verbalizer": WORDS, "data.seq_len": seq_len, "data.demonstrations": 1,
                   "data.redraw_demonstrations": True, "train.seed": seed, "data.max_train_examples": examples,
                   "data.max_eval_examples": 8})
    cfg, _, tokenizer = load_model_config(c)
    return load_data(c, cfg, tokenizer)


def test_redrawn_batches_are_cut_to_the_bucket_of_their_longest_redrawn_row():
    """data.redraw_demonstrations with length buckets: batch p is as wide as the smallest bucket that holds
    the longest row of its examples encoded with draw p + 1 (not seq_len, not the bucket of draw 0's
    lengths); the rows are the uncut encoding's on their tokens; two processes' rows get the same width."""
    from jaxft.data.iterator import Batches

    tok, train = Tokenizer(BERT), sources.read_file(sources.BUNDLED["sst2"].train)
    train = sources.Records(train.rows[:48], train.where[:48])
    shots, buckets = tasks.Demonstrations(1, train, seed=5), tuple(range(16, 129, 16))  # fine buckets: widths differ
    data = redrawn_data(seq_len=128, seed=5, examples=48)
    batches = Batches(data.train, 8, seed=5, buckets=buckets, transform=data.transform)
    widths, stale = [], []
    for p in range(12):  # two epochs of 6 batches
        idx = batches.indices(p)
        want = tasks.cloze(train, tok, 128, "sentence", "label", [0, 1], TEMPLATE, WORDS,
                           demonstrations=dataclasses.replace(shots, draw=p + 1), which=idx)[0]
        longest = int(want["attention_mask"].sum(1).max())
        width = min(b for b in buckets if b >= longest)
        got = batches.local(p, (0, 8))
        assert got["input_ids"].shape == got["attention_mask"].shape == (8, width)
        assert set(got) == set(want)
        for k in want:
            assert (got[k] == (want[k][:, :width] if k in ("input_ids", "attention_mask") else want[k])).all(), k
        assert want["attention_mask"][:, width:].sum() == 0  # only padding was cut
        top, bottom = batches.local(p, (0, 3)), batches.local(p, (3, 8))  # two processes' rows
        for k in got:
            assert top[k].shape[1:] == bottom[k].shape[1:] == got[k].shape[1:], k
            assert (np.concatenate([top[k], bottom[k]]) == got[k]).all(), k
        widths.append(width)
        stale.append(min(b for b in buckets if b >= int(data.train["attention_mask"][idx].sum(1).max())))
    assert min(widths) < 128  # cut below seq_len
    assert widths != stale  # and not to the bucket of draw 0's lengths


def test_cli_redrawn_demonstrations_resume_exactly(tiny_mlm, tmp_path):
    run = [f"--config.{k}={v}" for k, v in {
        "model.path": tiny_mlm, "method.name": "lora", "data.name": "sst2", "data.task": "cloze",
        "data.cloze_template": TEMPLATE, "data.verbalizer": WORDS, "data.demonstrations": 1,
        "data.redraw_demonstrations": True, "data.max_train_examples": 16, "data.max_eval_examples": 8,
        "data.seq_len": 96, "train.batch_size": 8, "optimizer.learning_rate": 1e-2, "optimizer.warmup_steps": 0,
        "optimizer.schedule": "constant", "train.log_every_steps": 1, "eval.every_steps": 0,
        "checkpoint.every_steps": 2}.items()]
    r = cli(tmp_path / "straight", *run, "--config.train.steps=4")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "demonstrations: 1 per class, drawn anew for each example in every batch" in r.stdout
    assert cli(tmp_path / "split", *run, "--config.train.steps=2").returncode == 0
    r = cli(tmp_path / "split", *run, "--config.train.steps=4")
    assert r.returncode == 0 and "resuming from step 2" in r.stdout, r.stderr[-3000:]
    straight, split = losses(tmp_path / "straight"), losses(tmp_path / "split")
    assert [split[s] for s in (3, 4)] == [straight[s] for s in (3, 4)]


def test_demonstration_sets_are_one_line_errors(tmp_path):
    for sets, want in (("0", "--demonstration_sets=0: expected a positive number"),
                       ("2", "--demonstration_sets=2: ensembles LM-BFF's demonstrations, and data.demonstrations=0")):
        r = python_m("jaxft.evaluate", "--config=configs/pet_bert.py", f"--checkpoint={tmp_path}",
                     f"--demonstration_sets={sets}")
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith(f"error: {want}"), r.stderr
        assert not list(tmp_path.iterdir())  # nothing written


@pytest.mark.parametrize("separator", ["", "\n", "\n\n", " | ", ". ", " ;"])
@pytest.mark.parametrize("template", [CAUSAL, "Review: {text} It was {mask}", "{text}! It was {mask}"])
@pytest.mark.parametrize("kind", ["sentencepiece", "byte-level BPE"])
def test_causal_demonstrations_join_as_the_whole_text_with_any_separator(kind, template, separator, byte_bpe):
    """In-context examples joined by a separator of the user's, a template that opens with text of its
    own: the row is what the tokenizer makes of the whole string (after a newline SentencePiece and
    GPT-2 start the next word without a space mark)."""
    path = LLAMA if kind == "sentencepiece" else byte_bpe
    tok, ref = Tokenizer(path), transformers.AutoTokenizer.from_pretrained(str(path))
    words = ["bad", "good"] if kind == "sentencepiece" else ["a", "the"]  # the small BPE has these whole
    pool = sst2(8)
    shots = tasks.Demonstrations(1, pool, seed=3, separator=separator)
    arrays, _ = tasks.cloze(sst2(4), tok, 256, "sentence", "label", [0, 1], template, ",".join(words), causal=True,
                            demonstrations=shots)
    fill = lambda row, word: template.replace("{text}", row["sentence"].strip()).replace("{mask}", word)  # noqa: E731
    for i in range(4):
        shown = tasks._demonstrations(sst2(4), shots, "label", {0: 0, 1: 1}, tok, True)["rows"](i)
        pieces = [fill(pool.rows[j], words[int(pool.rows[j]["label"])]) for j in shown]
        text = (separator or " ").join(pieces + [fill(sst2(4).rows[i], "").rstrip()])
        want = ref(text)["input_ids"]
        want = want if want[:1] == tok.bos else tok.bos + want  # GPT-2's tokenizer adds no BOS; jaxft's rows start with one
        n = int(arrays["attention_mask"][i].sum())
        assert arrays["input_ids"][i, :n].tolist() == want, (ref.convert_ids_to_tokens(want),
                                                             [tok.piece(int(t)) for t in arrays["input_ids"][i, :n]])


@pytest.mark.parametrize("kind", ["sentencepiece", "byte-level BPE", "wordpiece"])
def test_label_words_are_tokenized_as_they_stand_in_the_filled_template(kind, byte_bpe):
    """A word after "It was " is a new word however it is written ("good", " good"); after "It was:" it
    is glued on unless written with its own space. As the tokenizer reads the whole string."""
    path = {"sentencepiece": LLAMA, "byte-level BPE": byte_bpe, "wordpiece": BERT}[kind]
    tok, ref = Tokenizer(path), transformers.AutoTokenizer.from_pretrained(str(path))
    for before in ("It was ", "It was:"):
        for words in ("bad,good", "bad, good", " bad, good"):
            got = tasks.label_words(tok, words.split(","), "{text} " + before + "{mask}")
            for word, ids in zip(words.split(","), got):
                text = before + (" " if before.endswith(":") and word.startswith(" ") else "") + word.strip()
                whole, lead = (ref.encode(t, add_special_tokens=False) for t in (text, before.rstrip()))
                assert whole[: len(lead)] == lead and ids == whole[len(lead):], (before, words, word)


def test_demonstrations_need_the_cloze_task(tmp_path):
    r = cli(tmp_path, "--config.data.name=sst2", "--config.data.demonstrations=1", "--config.train.steps=1")
    assert r.returncode != 0
    assert "data.demonstrations=1: demonstrations fill a cloze template: expected data.task='cloze', not ''" in r.stderr
    assert not (tmp_path / "checkpoints").exists()
    from jaxft.config import base_config, validate

    c = base_config()
    c.data.task, c.data.redraw_demonstrations = "cloze", True
    with pytest.raises(JaxftError, match=r"^data.redraw_demonstrations=True: redraws LM-BFF's demonstrations, and "
                                         r"data.demonstrations=0: expected data.demonstrations >= 1$"):
        validate(c)


def test_chinese_reviews_with_demonstrations_as_transformers_tokenizes_them():
    """ChnSentiCorp on the bundled encoder: a Chinese template and label words, one demonstration per class."""
    tok, ref = Tokenizer(BERT), transformers.AutoTokenizer.from_pretrained(str(BERT))
    reviews = sources.read_file(sources.BUNDLED["chnsenticorp"].train)
    short = [i for i, r in enumerate(reviews.rows) if len(r["review"]) < 40][:30]
    records = sources.Records([reviews.rows[i] for i in short], [reviews.where[i] for i in short])
    template, words = "{text}。总之很{mask}。", "差,好"
    shots = tasks.Demonstrations(1, records, seed=0)
    arrays, cut = tasks.cloze(records, tok, 256, "review", "label", [0, 1], template, words, demonstrations=shots)
    assert cut == 0 and arrays["verbalizer"][0].tolist() == ref.convert_tokens_to_ids(["差", "好"])
    pick = tasks._demonstrations(records, shots, "label", {0: 0, 1: 1}, tok, False)["rows"]
    for i, row in enumerate(records.rows):
        text = row["review"] + "。总之很[MASK]。" + "".join(
            "[SEP]" + records.rows[j]["review"] + "。总之很" + words.split(",")[int(records.rows[j]["label"])] + "。"
            for j in pick(i))
        n = int(arrays["attention_mask"][i].sum())
        assert arrays["input_ids"][i, :n].tolist() == ref(text)["input_ids"]


# ---------------------------------------------------------------------------------------------------
# Label words of several tokens (PET's multi-token verbalizers; Chinese words of several characters).

ZH_TEMPLATE = "{text}。总之{mask}。"


def reviews(n=6):
    """Short ChnSentiCorp training reviews, both labels."""
    bundled = sources.read_file(sources.BUNDLED["chnsenticorp"].train)
    short = [i for i, r in enumerate(bundled.rows) if len(r["review"]) < 40][:n]
    return sources.Records([bundled.rows[i] for i in short], [bundled.where[i] for i in short])


def summed_log_probs(logits, arrays, words):
    """The oracle's class scores: the sum, over a word's tokens, of their log-probabilities where they are
    read (rows [N, L] shared by the classes, or [N, C, L], one per class)."""
    logp = torch.log_softmax(logits, -1).reshape(arrays["input_ids"].shape[:-1] + logits.shape[-2:])
    out = np.zeros((len(arrays["labels"]), len(words)))
    for i in range(len(out)):
        for c, word in enumerate(words):
            r = (i,) if arrays["input_ids"].ndim == 2 else (i, c)
            out[i, c] = sum(float(logp[r][p, t]) for p, t in zip(arrays["mlm_positions"][r], word))
    return out


@pytest.mark.parametrize("words", ["很失望,很满意", "不满意,满意"])
def test_words_of_several_tokens_get_as_many_masks_as_transformers_tokenizes_them(words):
    """Equally long words share one row with K [MASK]s; otherwise each class has a row with its own count."""
    tok, ref = Tokenizer(BERT), transformers.AutoTokenizer.from_pretrained(str(BERT))
    records = reviews()
    arrays, cut = tasks.cloze(records, tok, 64, "review", "label", [0, 1], ZH_TEMPLATE, words)
    ids = [ref.encode(w, add_special_tokens=False) for w in words.split(",")]
    shared = len({len(w) for w in ids}) == 1
    assert cut == 0 and arrays["input_ids"].ndim == (2 if shared else 3)
    assert arrays["verbalizer"].shape == (len(records.rows), 2, max(len(w) for w in ids))
    for i, row in enumerate(records.rows):
        assert arrays["labels"][i] == int(row["label"])
        for c, w in enumerate(ids):
            r = (i,) if shared else (i, c)
            want = ref(row["review"] + "。总之" + "[MASK]" * len(w) + "。")["input_ids"]
            n = int(arrays["attention_mask"][r].sum())
            assert arrays["input_ids"][r][:n].tolist() == want
            at = arrays["mlm_positions"][r]
            assert [want[p] for p in at[: len(w)]] == [ref.mask_token_id] * len(w) and (at[len(w):] == -1).all()
            assert arrays["verbalizer"][i, c].tolist() == w + [-1] * (arrays["verbalizer"].shape[2] - len(w))


@pytest.mark.parametrize("words", ["很失望,很满意", "不满意,满意"])
def test_masked_lm_scores_of_several_tokens_are_summed_log_probabilities(tiny_mlm, words):
    import jax.numpy as jnp

    model, params = hf.load(str(tiny_mlm))
    arrays, _ = tasks.cloze(reviews(), Tokenizer(tiny_mlm), 48, "review", "label", [0, 1], ZH_TEMPLATE, words)
    batch = {k: jnp.asarray(v) for k, v in arrays.items()}
    outputs = model.apply({"params": params}, **objectives.cloze_inputs(batch))

    ref = transformers.BertForMaskedLM.from_pretrained(tiny_mlm).eval()
    ids = transformers.AutoTokenizer.from_pretrained(str(tiny_mlm))(words.split(","), add_special_tokens=False)
    width = arrays["input_ids"].shape[-1]
    with torch.no_grad():
        logits = ref(input_ids=torch.tensor(arrays["input_ids"].reshape(-1, width)).long(),
                     attention_mask=torch.tensor(arrays["attention_mask"].reshape(-1, width)).long()).logits
    want = summed_log_probs(logits, arrays, ids["input_ids"])
    np.testing.assert_allclose(np.asarray(objectives.cloze_logits(outputs, batch)), want, rtol=1e-5, atol=1e-5)
    sums = objectives.cloze_loss(outputs, batch)
    loss = torch.nn.functional.cross_entropy(torch.tensor(want), torch.tensor(arrays["labels"]).long())
    assert float(sums["loss_sum"] / sums["count"]) == pytest.approx(float(loss), rel=1e-5)


def test_causal_scores_of_several_tokens_read_each_word_after_its_own_first_tokens(tiny_lm):
    """A row per class, the question followed by the word's first tokens: the score is the word's
    log-likelihood after the question, as a causal LM gives it on the whole text (fused and full logits)."""
    import jax.numpy as jnp

    words = ["not good", "great"]  # two tokens and one in jaxft-tiny's vocabulary
    model, params = hf.load(str(tiny_lm))
    arrays, _ = tasks.cloze(sst2(), Tokenizer(tiny_lm), 48, "sentence", "label", [0, 1], CAUSAL, ",".join(words),
                            causal=True)
    assert arrays["input_ids"].shape == (6, 2, 48) and arrays["mlm_positions"].shape == (6, 2, 2)
    batch = {k: jnp.asarray(v) for k, v in arrays.items()}
    fused = model.apply({"params": params}, **objectives.cloze_inputs(batch), return_hidden=True)
    logits = model.apply({"params": params}, **objectives.cloze_inputs(batch))

    ref_tok = transformers.AutoTokenizer.from_pretrained(str(LLAMA))
    ref = transformers.LlamaForCausalLM.from_pretrained(tiny_lm).eval()
    want = np.zeros((6, 2))
    for i, row in enumerate(sst2().rows):
        question = ref_tok(row["sentence"].strip() + " It was")["input_ids"]
        for c, word in enumerate(words):
            whole = ref_tok(row["sentence"].strip() + " It was " + word)["input_ids"]
            assert whole[: len(question)] == question
            with torch.no_grad():
                logp = torch.log_softmax(ref(torch.tensor([whole])).logits[0], -1)
            want[i, c] = sum(float(logp[p - 1, whole[p]]) for p in range(len(question), len(whole)))
    loss = torch.nn.functional.cross_entropy(torch.tensor(want), torch.tensor(arrays["labels"]).long())
    for outputs in (fused, logits):
        np.testing.assert_allclose(np.asarray(objectives.cloze_logits(outputs, batch)), want, rtol=1e-5, atol=1e-5)
        sums = objectives.cloze_loss(outputs, batch)
        assert float(sums["loss_sum"] / sums["count"]) == pytest.approx(float(loss), rel=1e-5)


def test_rows_per_class_train_alike_on_eight_devices(tiny_lm, tmp_path):
    """[B, C, L] batches split over a 2 x 2 x 2 mesh in two micro-batches: the figures of one device."""
    go = [f"--config.model.path={tiny_lm}", "--config.method.name=lora", "--config.data.name=sst2",
          "--config.data.task=cloze", f"--config.data.cloze_template={CAUSAL}", "--config.data.verbalizer=not good,great",
          "--config.data.max_train_examples=16", "--config.data.max_eval_examples=16", "--config.data.seq_len=48",
          "--config.train.batch_size=8", "--config.optimizer.learning_rate=3e-2", "--config.train.log_every_steps=1",
          "--config.train.steps=3", "--config.eval.every_steps=3"]
    one, eight = tmp_path / "one", tmp_path / "eight"
    r = cli(one, *go)
    assert r.returncode == 0, r.stderr[-3000:]
    r = cli(eight, *go, "--config.mesh.data=2", "--config.mesh.fsdp=2", "--config.mesh.tensor=2",
            "--config.train.grad_accum=2", devices=8)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [[json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()] for d in (one, eight)]
    assert len(rows[0]) == len(rows[1]) >= 4 and "eval/accuracy" in rows[0][-1]
    for a, b in zip(*rows):
        for k in a:
            if "per_second" not in k and "mfu" not in k:
                assert b[k] == pytest.approx(a[k], rel=2e-5, abs=1e-6), (a["step"], k)


def test_evaluate_shows_each_causal_question_once(tiny_lm, tmp_path):
    """jaxft.evaluate's predictions with a row per class: each example's prompt is its question alone."""
    from jaxft.config import base_config
    from jaxft.evaluate import evaluate

    c = base_config()
    c.model.path, c.data.name, c.data.task, c.data.seq_len = str(tiny_lm), "sst2", "cloze", 48
    c.data.cloze_template, c.data.verbalizer, c.data.max_eval_examples = CAUSAL, "not good,great", 4
    result = evaluate(c, str(tiny_lm), out=str(tmp_path / "eval"))
    shown = [json.loads(line)["prompt"] for line in (tmp_path / "eval" / "predictions.jsonl").read_text().splitlines()]
    tok = Tokenizer(tiny_lm)
    questions, _ = tasks.cloze(sst2(4), tok, 48, "sentence", "label", [0, 1], CAUSAL, "bad,good", causal=True)
    assert result["examples"] == 4
    assert shown == [tok.decode(row[mask > 0]) for row, mask in zip(questions["input_ids"], questions["attention_mask"])]


def test_length_buckets_cut_the_tokens_and_leave_the_label_words_whole():
    """Twenty classes on a batch cut to a short bucket: the words' arrays keep all twenty; rows of one
    class each ([N, C, L]) are cut along their tokens."""
    from jaxft.data.iterator import Batches

    tok = Tokenizer(BERT)
    many = sources.Records([{"sentence": r["sentence"], "label": i % 20} for i, r in enumerate(sst2(40).rows)],
                           sst2(40).where)
    letters = ",".join("abcdefghijklmnopqrst")
    arrays, _ = tasks.cloze(many, tok, 128, "sentence", "label", list(range(20)), TEMPLATE, letters)
    batch = Batches(arrays, 8, seed=0, buckets=(16, 32, 64, 128)).local(0, (0, 8))
    assert batch["input_ids"].shape[1] < 128 and batch["verbalizer"].shape == (8, 20)
    arrays, _ = tasks.cloze(sst2(16), tok, 128, "sentence", "label", [0, 1], TEMPLATE, "not good,good")
    batches = Batches(arrays, 8, seed=0, buckets=(16, 32, 64, 128))
    batch, rows = batches.local(0, (0, 8)), batches.indices(0)
    width = batch["input_ids"].shape[-1]
    assert batch["input_ids"].shape == (8, 2, width) and width < 128 and batch["mlm_positions"].shape == (8, 2, 2)
    assert (batch["input_ids"] == arrays["input_ids"][rows][..., :width]).all()
    assert arrays["attention_mask"][rows][..., width:].sum() == 0  # only padding was cut


def test_lora_on_words_of_several_tokens_trains_exports_and_evaluates_alike(tiny_mlm, tmp_path):
    """The CLI on Chinese reviews whose label words differ in length (a row per class): the loss falls;
    jaxft.evaluate on the export gives the run's final accuracy; peft serves the adapter with jaxft's scores."""
    import jax.numpy as jnp
    from peft import PeftModel

    words = "不满意,满意"
    settings = {"model.path": str(tiny_mlm), "method.name": "lora", "data.name": "chnsenticorp", "data.task": "cloze",
                "data.cloze_template": ZH_TEMPLATE, "data.verbalizer": words, "data.max_train_examples": 8,
                "data.max_eval_examples": 16, "data.seq_len": 64, "train.batch_size": 8,
                "optimizer.learning_rate": 3e-2, "optimizer.warmup_steps": 0, "train.log_every_steps": 1,
                "train.steps": 6, "eval.every_steps": 6}
    r, final, _ = train_and_evaluate(tmp_path, settings)
    assert "note: label words of up to 3 tokens: each example is 2 rows, one a class" in r.stdout

    dev = sources.read_file(sources.BUNDLED["chnsenticorp"].eval)
    arrays, _ = tasks.cloze(sources.Records(dev.rows[:16], dev.where[:16]), Tokenizer(tiny_mlm), 64, "review",
                            "label", [0, 1], ZH_TEMPLATE, words)
    assert arrays["input_ids"].shape == (16, 2, 64)
    base = transformers.BertForMaskedLM.from_pretrained(tiny_mlm).eval()
    served = PeftModel.from_pretrained(base, tmp_path / "export").eval()
    model, params = hf.load(str(tiny_mlm), adapter=str(tmp_path / "export"))
    batch = {k: jnp.asarray(v) for k, v in arrays.items()}
    ours = np.asarray(objectives.cloze_logits(model.apply({"params": params}, **objectives.cloze_inputs(batch)), batch))
    with torch.no_grad():
        logits = served(input_ids=torch.tensor(arrays["input_ids"].reshape(-1, 64)).long(),
                        attention_mask=torch.tensor(arrays["attention_mask"].reshape(-1, 64)).long()).logits
    ids = [[int(i) for i in w if i >= 0] for w in arrays["verbalizer"][0]]
    np.testing.assert_allclose(ours, summed_log_probs(logits, arrays, ids), rtol=1e-4, atol=1e-4)
    assert (ours.argmax(1) == arrays["labels"]).mean() == pytest.approx(final["eval/accuracy"], abs=1e-9)
