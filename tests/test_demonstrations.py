"""LM-BFF's demonstration filter (`data.demonstration_filter`, Gao et al. 2021 section 6.2): each
example's demonstrations come from the top fraction of each class's training examples nearest it by the
cosine of mean-pooled sentence embeddings. Against transformers' BertModel and numpy; the unfiltered
draws unchanged; the errors; a CLI run."""

from __future__ import annotations

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from jaxft import hf  # noqa: E402
from jaxft.data import embeddings, sources, tasks  # noqa: E402
from jaxft.errors import JaxftError  # noqa: E402
from jaxft.tokenizer import Tokenizer  # noqa: E402
from test_cloze import tiny_bert  # noqa: E402
from test_train import cli  # noqa: E402

BERT = hf.resolve("jaxft-tiny-bert")
TEMPLATE, WORDS = "{text} it was {mask} .", "bad,good"


def split(name: str, start: int, stop: int):
    records = sources.read_file(getattr(sources.BUNDLED["sst2"], name))
    return sources.Records(records.rows[start:stop], records.where[start:stop])


@pytest.fixture(scope="module")
def sbert(tmp_path_factory):
    """A random bare BertModel (hidden 32, 2 layers) as a sentence-transformers directory holds one, with
    the bundled WordPiece vocabulary: no masked-LM head in its weights."""
    return tiny_bert(tmp_path_factory.mktemp("sbert"), "BertModel")


def reference_embeddings(path, texts, seq_len=64):
    """transformers: the last hidden states mean-pooled over the attention mask, as unit vectors."""
    tok = transformers.AutoTokenizer.from_pretrained(str(path))
    model = transformers.BertModel.from_pretrained(path).eval()
    batch = tok(texts, padding=True, truncation=True, max_length=seq_len, return_tensors="pt")
    with torch.no_grad():
        h = model(**batch).last_hidden_state
    m = batch["attention_mask"][..., None].float()
    e = ((h * m).sum(1) / m.sum(1)).numpy().astype(np.float64)
    return e / np.linalg.norm(e, axis=1, keepdims=True)


def test_embeddings_are_transformers_mean_pooled_states(sbert):
    texts = [r["sentence"] for r in split("eval", 0, 20).rows]
    ours = embeddings.embed([t.strip() for t in texts], str(sbert), 64) / embeddings.SCALE
    np.testing.assert_allclose(ours, reference_embeddings(sbert, [t.strip() for t in texts]), atol=1e-4)


@pytest.mark.parametrize("name, auto", [("jaxft-tiny", "AutoModel"), ("jaxft-tiny-t5", "T5EncoderModel")])
def test_causal_and_t5_embeddings_are_transformers_mean_pooled_states(name, auto):
    """A causal LM's final (normed) states after its BOS, T5's encoder states before its </s>, each as
    transformers' tokenizer frames the text, mean-pooled."""
    path = hf.resolve(name)
    texts = [r["sentence"].strip() for r in split("eval", 0, 12).rows]
    tok = transformers.AutoTokenizer.from_pretrained(str(path))
    model = getattr(transformers, auto).from_pretrained(path).eval()
    ids = [tok(t)["input_ids"] for t in texts]
    want = []
    with torch.no_grad():
        for row in ids:  # one at a time: no padding for the reference to handle
            h = model(input_ids=torch.tensor([row])).last_hidden_state[0].numpy().astype(np.float64)
            want.append(h.mean(0) / np.linalg.norm(h.mean(0)))
    ours = embeddings.embed(texts, str(path), 64) / embeddings.SCALE
    np.testing.assert_allclose(ours, np.stack(want), atol=1e-4)


def test_filtered_candidates_are_the_nearest_fraction_of_each_class(sbert):
    """jaxft's candidates for each (row, class) are numpy's top half of the class by cosine with the row
    (the row itself left out of its own class), and every demonstration drawn comes from them."""
    train, dev = split("train", 0, 40), split("eval", 0, 12)
    embed = lambda records: embeddings.embed(tasks.joined_texts(records, ["sentence"]), str(sbert), 64)  # noqa: E731
    shots = tasks.Demonstrations(2, train, seed=0, keep=0.5, embed=embed)
    pool = reference_embeddings(sbert, tasks.joined_texts(train, ["sentence"]))
    labels = np.array([int(r["label"]) for r in train.rows])
    checked = total = 0
    for records in (train, dev):
        own = records is train
        query = pool if own else reference_embeddings(sbert, tasks.joined_texts(records, ["sentence"]))
        demos = tasks._demonstrations(records, shots, "label", {0: 0, 1: 1}, Tokenizer(sbert), False)
        for i in range(len(records.rows)):
            shown = demos["rows"](i)
            assert sorted(labels[shown].tolist()) == [0, 0, 1, 1] and not (own and i in shown)
            for k in (0, 1):
                members = np.flatnonzero(labels == k)
                members = members[members != i] if own else members
                cos = pool[members] @ query[i]
                m = max(2, math.floor(0.5 * len(members)))
                ranked = np.argsort(-cos, kind="stable")
                want = set(members[ranked[:m]].tolist())
                got = demos["candidates"](i, k).tolist()
                assert got == sorted(got) and len(got) == m
                assert {j for j in shown if labels[j] == k} <= set(got)  # drawn from the candidates
                total += 1
                if cos[ranked[m - 1]] - cos[ranked[m]] > 1e-4:  # else a near tie the float rounding may flip
                    assert set(got) == want, (i, k)
                    checked += 1
    assert checked >= 0.8 * total, (checked, total)

    # The filter matters: other demonstrations than unfiltered draws for most rows.
    plain = tasks._demonstrations(train, tasks.Demonstrations(2, train, seed=0), "label", {0: 0, 1: 1},
                                  Tokenizer(sbert), False)["rows"]
    filtered = tasks._demonstrations(train, shots, "label", {0: 0, 1: 1}, Tokenizer(sbert), False)["rows"]
    assert sum(plain(i) != filtered(i) for i in range(len(train.rows))) > len(train.rows) // 2


def test_a_filter_of_one_draws_what_no_filter_does(sbert):
    """keep=1.0 through the filter's code (every example of a class a candidate) gives exactly the
    unfiltered draws, for the training rows (never their own demonstration) and held-out ones, and for
    other draws of the ensemble."""
    import dataclasses

    tok = Tokenizer(BERT)
    train, dev = split("train", 0, 30), split("eval", 0, 10)
    embed = lambda records: embeddings.embed(tasks.joined_texts(records, ["sentence"]), str(sbert), 64)  # noqa: E731
    for draw in (0, 3):
        plain = tasks.Demonstrations(2, train, seed=4, draw=draw)
        whole = dataclasses.replace(plain, keep=1.0, embed=embed)
        for records in (train, dev):
            a = tasks.cloze(records, tok, 256, "sentence", "label", [0, 1], TEMPLATE, WORDS, demonstrations=plain)[0]
            b = tasks.cloze(records, tok, 256, "sentence", "label", [0, 1], TEMPLATE, WORDS, demonstrations=whole)[0]
            assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    assert ("embeddings", id(train)) in whole.cache  # the filter's code did run


def test_filtered_draws_do_not_depend_on_the_batch(sbert):
    """A row's filtered demonstrations are the same whether it is encoded alone, in a batch, or with the
    whole split (resume stays exact: a batch's rows are a function of the seed and the position alone)."""
    tok = Tokenizer(BERT)
    train = split("train", 0, 40)
    embed = lambda records: embeddings.embed(tasks.joined_texts(records, ["sentence"]), str(sbert), 64)  # noqa: E731
    shots = tasks.Demonstrations(1, train, seed=2, keep=0.5, embed=embed)
    encode = lambda **kw: tasks.cloze(train, tok, 256, "sentence", "label", [0, 1], TEMPLATE, WORDS,  # noqa: E731
                                      demonstrations=shots, **kw)[0]
    whole = encode()
    for which in ([7], [31, 7, 2, 7], list(range(39, -1, -1))):
        part = encode(which=which)
        assert all((part[k] == whole[k][which]).all() for k in whole)


@pytest.mark.parametrize("settings, message", [
    ({"data.demonstrations": 1, "data.demonstration_filter": 0.0},
     r"^data.demonstration_filter=0.0: expected a fraction in \(0, 1\]"),
    ({"data.demonstrations": 1, "data.demonstration_filter": 1.5},
     r"^data.demonstration_filter=1.5: expected a fraction in \(0, 1\]"),
    ({"data.demonstration_filter": 0.5}, r"^data.demonstration_filter=0.5: filters LM-BFF's demonstrations, and "
                                         r"data.demonstrations=0: expected data.demonstrations >= 1$"),
])
def test_filter_errors_are_one_line(settings, message):
    from jaxft.config import base_config, validate

    c = base_config()
    c.data.task = "cloze"
    for key, value in settings.items():
        section, name = key.split(".")
        c[section][name] = value
    with pytest.raises(JaxftError, match=message):
        validate(c)


def test_an_encoder_that_is_not_a_model_is_one_line(tmp_path):
    for path, message in ((tmp_path / "none", r"^data.demonstration_encoder='.*none': no such directory"),
                          (tmp_path, r"config.json: missing \(expected a Hugging Face config.json\)$")):
        with pytest.raises(JaxftError, match=message):
            embeddings.embed(["a text"], str(path), 64)


def test_cli_with_filtered_demonstrations(sbert, tmp_path):
    """A short run of a cloze config with one demonstration per class from the nearest half, embedded
    by a bare sentence encoder: exit 0, and the log says how the demonstrations are drawn."""
    r = cli(tmp_path, "--config.data.demonstrations=1",
            "--config.data.demonstration_filter=0.5", f"--config.data.demonstration_encoder={sbert}",
            "--config.data.max_train_examples=16", "--config.data.max_eval_examples=8", "--config.data.seq_len=96",
            "--config.train.batch_size=8", "--config.train.steps=2", "--config.eval.every_steps=2",
            "--config.eval.at_start=False", "--config.export.enabled=False", config="configs/pet_bert.py")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "drawn from the 50% of each class's training examples nearest each example" in r.stdout
