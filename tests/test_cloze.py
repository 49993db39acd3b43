"""PET's hard prompts (`data.task=cloze`): the template's rows against transformers' tokenizer, the loss
against torch on a BertForMaskedLM, the errors, and a LoRA run whose export jaxft.evaluate and peft
read with the run's own predictions."""

from __future__ import annotations

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
    d = tmp_path_factory.mktemp("tiny-mlm")
    for name in ("vocab.txt", "tokenizer_config.json"):
        shutil.copy(BERT / name, d / name)
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=8192, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, max_position_embeddings=128)
    transformers.BertForMaskedLM(cfg).save_pretrained(d)
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
    (TEMPLATE, "bad,unbelievably", None, r"the word 'unbelievably' for label 1 is 3 tokens \(\['unbelie', '##v', "
                                         r"'##ably'\]\), expected one"),
    (TEMPLATE, "bad,\u2603", None, r"the word '\u2603' for label 1 is not in the vocabulary \(it is the unknown token "
                                  r"'\[UNK\]'\)"),
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
