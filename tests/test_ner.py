"""Token classification (NER) through the CLI: tagged words read, aligned to tokens as HF's recipes align
them (WordPiece and SentencePiece), trained (on BERT, and on T5's encoder), scored by entity (seqeval's rules,
tests/test_entities.py) and exported as a model transformers reads with its tag names."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from test_train import cli

from jaxft import hf
from jaxft.data import tasks
from jaxft.data.sources import Records
from jaxft.errors import JaxftError
from jaxft.tokenizer import Tokenizer

TINY_T5 = Path(__file__).resolve().parents[1] / "jaxft" / "assets" / "jaxft-tiny-t5"  # bundled, SentencePiece

PEOPLE = [["john"], ["mary", "smith"], ["peter", "brown"], ["anna"], ["schwarzenegger"]]
PLACES = [["paris"], ["london"], ["new", "york"], ["berlin"]]
ORGS = [["google"], ["the", "red", "cross"], ["microsoft"]]
FORMS = [("{p} lives in {l} .", "p l"), ("{p} works for {o} in {l} .", "p o l"), ("yesterday {p} visited {l}", "p l"),
         ("{o} hired {p}", "o p"), ("the weather in {l} was fine", "l")]


def sentences(n, seed):
    """Tagged sentences from templates: people (PER), places (LOC), organisations (ORG); a name of several
    words is B- then I-, and one word (schwarzenegger) is several WordPiece tokens."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        form, _ = FORMS[rng.integers(len(FORMS))]
        words, tags = [], []
        for part in form.split():
            kind = {"{p}": ("PER", PEOPLE), "{l}": ("LOC", PLACES), "{o}": ("ORG", ORGS)}.get(part)
            if kind is None:
                words.append(part)
                tags.append("O")
                continue
            name = kind[1][rng.integers(len(kind[1]))]
            words += name
            tags += [f"B-{kind[0]}"] + [f"I-{kind[0]}"] * (len(name) - 1)
        out.append({"tokens": words, "ner_tags": tags})
    return out


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    """A random BertForMaskedLM (hidden 32, 2 layers) with a WordPiece vocabulary of the sentences' words, in
    which `schwarzenegger` is three tokens."""
    d = tmp_path_factory.mktemp("ner-bert")
    words = {w for group in (PEOPLE, PLACES, ORGS) for name in group for w in name} - {"schwarzenegger"}
    words |= {w for form, _ in FORMS for w in form.split() if not w.startswith("{")}
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "schwarz", "##ene", "##gger", *sorted(words)]
    transformers.BertTokenizer(vocab={w: i for i, w in enumerate(vocab)}, do_lower_case=True).save_pretrained(d)
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, max_position_embeddings=64)
    transformers.BertForMaskedLM(cfg).save_pretrained(d)
    return d


def write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("kind", ["wordpiece", "sentencepiece"])
def test_tags_align_with_transformers(tiny_bert, kind):
    """A word's tag on its first token, -100 on its other tokens and on [CLS] / [SEP] / </s> / padding: what
    HF's token-classification recipe makes from `word_ids()`, with BERT's WordPiece and T5's SentencePiece
    (each word its own "▁" piece first, as `is_split_into_words` splits it)."""
    directory, seq_len = (tiny_bert, 24) if kind == "wordpiece" else (TINY_T5, 40)
    rows = sentences(60, 0)
    records = Records(rows, [f"x.jsonl:{i + 1}" for i in range(len(rows))])
    labels = tasks.tag_labels([records], "tokens", "ner_tags", [])
    arrays, cut, empty = tasks.token_classification(records, Tokenizer(directory), seq_len, "tokens", "ner_tags",
                                                    labels)
    assert (cut, empty) == (0, 0) and labels == ["B-LOC", "B-ORG", "B-PER", "I-LOC", "I-ORG", "I-PER", "O"]
    ref = transformers.AutoTokenizer.from_pretrained(str(directory))
    several = 0
    for i, row in enumerate(rows):
        enc = ref(row["tokens"], is_split_into_words=True, padding="max_length", max_length=seq_len)
        words = enc.word_ids()
        want = [-100 if w is None or (k and words[k - 1] == w) else labels.index(row["ner_tags"][w])
                for k, w in enumerate(words)]
        several += sum(1 for k, w in enumerate(words) if w is not None and k and words[k - 1] == w)
        assert arrays["input_ids"][i].tolist() == enc["input_ids"], row
        assert arrays["labels"][i].tolist() == want, row
        assert arrays["attention_mask"][i].tolist() == enc["attention_mask"]
    assert several  # some words are several tokens


def test_label_all_tokens_is_run_ners(tiny_bert):
    """`data.label_all_tokens`: every token of a word labelled, as HF run_ner's `label_all_tokens` makes it from
    `word_ids()` and its `b_to_i_label` (B-X's later tokens I-X); BMES's B-X goes to M-X, S-X and numbers stay."""
    rows = sentences(60, 0) + [{"tokens": ["anna", "schwarzenegger"], "ner_tags": ["B-PER", "I-PER"]},
                               {"tokens": ["schwarzenegger", "sang"], "ner_tags": ["O", "O"]}]
    records = Records(rows, [f"x.jsonl:{i + 1}" for i in range(len(rows))])
    labels = tasks.tag_labels([records], "tokens", "ner_tags", [])
    arrays = tasks.token_classification(records, Tokenizer(tiny_bert), 24, "tokens", "ner_tags", labels, True)[0]
    b_to_i = [labels.index(n.replace("B-", "I-")) if n.startswith("B-") and n.replace("B-", "I-") in labels else k
              for k, n in enumerate(labels)]  # run_ner's b_to_i_label
    ref = transformers.AutoTokenizer.from_pretrained(str(tiny_bert))
    for i, row in enumerate(rows):
        words = ref(row["tokens"], is_split_into_words=True, padding="max_length", max_length=24).word_ids()
        tags = [None if w is None else labels.index(row["ner_tags"][w]) for w in words]
        want = [-100 if w is None else t if not k or words[k - 1] != w else b_to_i[t]
                for k, (w, t) in enumerate(zip(words, tags))]
        assert arrays["labels"][i].tolist() == want, row
    assert labels.index("I-PER") in arrays["labels"][:60][arrays["input_ids"][:60] == ref.vocab["##gger"]]
    assert tasks.continuation_classes(["B-X", "M-X", "E-X", "S-X", "O"]) == [1, 1, 2, 3, 4]
    assert tasks.continuation_classes(["B-X", "I-X", "M-X", "S-X"]) == [1, 1, 2, 3]
    assert tasks.continuation_classes([0, 1, 2]) == [0, 1, 2]


def ner_data(tiny_bert, **settings):
    """jaxft.train's data for `settings` (data.* keys) on the tiny BERT."""
    from jaxft.config import base_config
    from jaxft.train import load_data, load_model_config

    c = base_config()
    c.model.path, c.data.seq_len = str(tiny_bert), 24
    c.data.update(settings)
    cfg, _, tokenizer = load_model_config(c)
    return load_data(c, cfg, tokenizer)


def test_label_all_tokens_labels_the_training_split_only(tiny_bert, tmp_path):
    """The eval split keeps a label per word, so that entity scores count the same words with the option."""
    train, dev = write(tmp_path / "train.jsonl", sentences(40, 1)), write(tmp_path / "dev.jsonl", sentences(20, 2))
    first = ner_data(tiny_bert, name=str(train), eval_name=str(dev))
    every = ner_data(tiny_bert, name=str(train), eval_name=str(dev), label_all_tokens=True)
    np.testing.assert_array_equal(every.eval["labels"], first.eval["labels"])
    words = first.train["labels"] >= 0
    np.testing.assert_array_equal(every.train["labels"][words], first.train["labels"][words])
    assert (every.train["labels"][~words] >= 0).any()  # the later tokens of schwarzenegger


def test_label_all_tokens_needs_tagged_words(tiny_bert, tmp_path):
    path = write(tmp_path / "c.jsonl", [{"text": f"john lives in paris {i}", "label": i % 2} for i in range(4)])
    with pytest.raises(JaxftError, match=r"^data.label_all_tokens=True: labels every token of tagged words, and "
                                         r"the task is classification: expected data.task=token_classification"):
        ner_data(tiny_bert, name=str(path), label_all_tokens=True)


def test_long_sentences_keep_their_first_words_whole(tiny_bert):
    rows = [{"tokens": ["schwarzenegger"] * 6, "ner_tags": ["B-PER"] * 6}, {"tokens": ["a", "b"], "ner_tags": ["O"] * 2}]
    tok = Tokenizer(tiny_bert)
    per_word = len(tok.encode("schwarzenegger"))
    arrays, cut, _ = tasks.token_classification(Records(rows, ["a:1", "a:2"]), tok, 2 + 2 * per_word + 1, "tokens",
                                                "ner_tags", ["B-PER", "O"])
    assert cut == 1 and (arrays["labels"][0] == 0).sum() == 2  # two whole words fit, not a third's first token
    assert arrays["input_ids"][0][2 * per_word + 1] == tok.eos_id


def test_text_tagged_by_word_or_by_character():
    records = Records([{"text": "John lives here", "tags": ["B-PER", "O", "O"]},
                       {"text": "张三在北京", "tags": ["B-PER", "I-PER", "O", "B-LOC", "I-LOC"]}], ["f:1", "f:2"])
    assert tasks.words_and_tags(records, 0, "text", "tags")[0] == ["John", "lives", "here"]
    assert tasks.words_and_tags(records, 1, "text", "tags")[0] == list("张三在北京")
    bad = Records([{"text": "John lives", "tags": ["B-PER", "O", "O"]}], ["f:7"])
    with pytest.raises(JaxftError, match=r"^f:7: 3 tags for the text of 'text', which has 2 words and 9 characters"):
        tasks.words_and_tags(bad, 0, "text", "tags")


def test_conll_files_read_as_tagged_words(tmp_path):
    """CoNLL-2003's four columns with -DOCSTART- and blank lines, and a Chinese .bio file tagged per character:
    records in conll2003's layout, found as token classification; a line without a tag names its line."""
    from jaxft.data.sources import read_file

    conll = tmp_path / "train.conll"
    conll.write_text("-DOCSTART- -X- -X- O\n\nEU NNP B-NP B-ORG\nrejects VBZ B-VP O\n\n\nPeter NNP B-NP B-PER\n"
                     "Blackburn NNP I-NP I-PER\n")
    records = read_file(conll)
    assert records.rows == [{"tokens": ["EU", "rejects"], "ner_tags": ["B-ORG", "O"]},
                            {"tokens": ["Peter", "Blackburn"], "ner_tags": ["B-PER", "I-PER"]}]
    assert records.where == [f"{conll}:3", f"{conll}:7"]
    assert tasks.tagged_fields(records, "text", "label", False, False) == ("tokens", "ner_tags")
    bio = tmp_path / "msra.bio"
    bio.write_text("张\tB-PER\n三\tI-PER\n在\tO\n\n北\tB-LOC\n京\tI-LOC\n")
    assert read_file(bio).rows[1] == {"tokens": ["北", "京"], "ner_tags": ["B-LOC", "I-LOC"]}
    bad = tmp_path / "bad.bmes"
    bad.write_text("张 B-PER\n三\n")
    with pytest.raises(JaxftError, match=f"^{bad}:2: '三' has no tag: expected a word and its tag"):
        read_file(bad)


def test_bundled_sets_tag_their_attribute_values():
    """e2e_ner and adgen_ner: each reference's words (E2E) or characters (ADGEN) that spell one of its record's
    values, tagged with the attribute, longest value first; the first record of each, by hand."""
    from jaxft.data.sources import BUNDLED

    e2e = BUNDLED["e2e_ner"].reader(BUNDLED["e2e_ner"].train)
    # name : Alimentum | area : city centre | family friendly : no||There is a place in the city centre , ...
    assert e2e.rows[0]["tokens"][6:10] == ["city", "centre", ",", "Alimentum"]
    assert e2e.rows[0]["ner_tags"] == ["O"] * 6 + ["B-area", "I-area", "O", "B-name"] + ["O"] * 8
    adgen = BUNDLED["adgen_ner"].reader(BUNDLED["adgen_ner"].train)
    # 类型#上衣*材质#牛仔布*颜色#白色*风格#简约*图案#刺绣*衣样式#外套*衣款式#破洞 || 简约而不简单的牛仔外套，白色的...
    row = adgen.rows[0]
    spans = [("".join(row["tokens"][i:j]), row["ner_tags"][i][2:]) for i, j in ((0, 2), (9, 11), (12, 14), (29, 31))]
    assert spans == [("简约", "风格"), ("外套", "衣样式"), ("白色", "颜色"), ("破洞", "衣款式")]
    assert row["ner_tags"][1] == "I-风格" and row["ner_tags"][7:9] == ["O", "O"]  # 牛仔 is not 牛仔布
    assert len(adgen.rows) == 1070 and adgen.where[0].endswith("dev.json:1")
    # E2E's test split has tags its training split lacks (multi-word foods): the set declares its classes
    test = BUNDLED["e2e_ner"].reader(BUNDLED["e2e_ner"].eval)
    labels = list(BUNDLED["e2e_ner"].labels)
    assert tasks.tag_labels([e2e, test], "tokens", "ner_tags", labels) == labels
    assert set(tasks.tag_labels([e2e], "tokens", "ner_tags", [])) < set(tasks.tag_labels([test], "tokens", "ner_tags", []))


def test_hub_tags_read_by_name():
    """A hub NER set's class numbers with the names its features declare (conll2003's ner_tags), other
    columns untouched."""
    import datasets

    from jaxft.data.sources import named_tags

    features = datasets.Features({"tokens": datasets.Sequence(datasets.Value("string")), "id": datasets.Value("int32"),
                                  "ner_tags": datasets.Sequence(datasets.ClassLabel(names=["O", "B-PER", "I-PER"]))})
    ds = datasets.Dataset.from_dict({"tokens": [["Mary", "Smith", "sang"]], "id": [7], "ner_tags": [[1, 2, 0]]},
                                    features=features)
    assert named_tags(ds) == [{"tokens": ["Mary", "Smith", "sang"], "id": 7, "ner_tags": ["B-PER", "I-PER", "O"]}]


@pytest.mark.parametrize("rows, declared, message", [
    ([{"tokens": ["a", "b"], "ner_tags": ["O"]}], [], "t.jsonl:1: 2 words in 'tokens' but 1 tags in 'ner_tags'"),
    ([{"tokens": ["a"], "ner_tags": ["O"]}, {"tokens": ["b"], "ner_tags": [3]}], [],
     "t.jsonl:2: tag 3 is a class number, but t.jsonl:1 has the tag 'O'"),
    ([{"tokens": ["a"], "ner_tags": [0]}, {"tokens": ["b"], "ner_tags": [2]}], ["O", "B-X"],
     "data.labels='O,B-X': 2 names, but t.jsonl:2 has class 2"),
    ([{"tokens": ["a"], "ner_tags": ["B-Y"]}], ["O", "B-X"], "t.jsonl:1: tag 'B-Y' is not one of data.labels"),
    ([{"tokens": "a", "ner_tags": [None]}], [], "t.jsonl:1: tag None in 'ner_tags'"),
])
def test_bad_tags_name_the_record(rows, declared, message):
    records = Records(rows, [f"t.jsonl:{i + 1}" for i in range(len(rows))])
    with pytest.raises(JaxftError, match="^" + message.replace("(", r"\(").replace(")", r"\)")):
        tasks.tag_labels([records], "tokens", "ner_tags", declared)


def test_ner_trains_scores_entities_and_exports(tiny_bert, tmp_path):
    """conll2003's layout (`tokens`, `ner_tags`) is found without settings; entity F1 rises from the untrained
    model's; `jaxft.evaluate` scores the export as training's eval did and writes each sentence's tags; the
    export is a BertForTokenClassification with the tag names and our logits."""
    from test_evaluate import cli as evaluate

    train, dev = write(tmp_path / "train.jsonl", sentences(200, 1)), write(tmp_path / "dev.jsonl", sentences(40, 2))
    run = tmp_path / "run"
    settings = (f"--config.model.path={tiny_bert}", "--config.method.name=full", f"--config.data.name={train}",
                f"--config.data.eval_name={dev}", "--config.data.seq_len=24")
    r = cli(run, *settings, "--config.train.steps=30", "--config.train.batch_size=16",
            "--config.optimizer.learning_rate=5e-3", "--config.eval.every_steps=30", "--config.eval.at_start=True",
            "--config.train.log_every_steps=10")
    assert r.returncode == 0, r.stderr
    assert "token classification: words 'tokens', tags 'ner_tags', 7 classes" in r.stdout
    assert "head=token_classification" in r.stdout
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [row for row in rows if "eval/entity_f1" in row]
    assert evals[0]["step"] == 0 and evals[-1]["step"] == 30
    assert evals[-1]["eval/entity_f1"] > 0.8 > evals[0]["eval/entity_f1"] + 0.5, evals  # 0.91 and 0.17
    assert {"eval/entity_f1/PER", "eval/entity_f1/LOC", "eval/entity_f1/ORG", "eval/f1/B-PER"} <= set(evals[-1])

    export = run / "export"
    r = evaluate("--config=configs/tiny_test.py", *settings, f"--checkpoint={export}", f"--out={tmp_path / 'eval'}")
    assert r.returncode == 0, r.stderr
    scored = json.loads((tmp_path / "eval" / "metrics.json").read_text())["metrics"]
    assert scored == pytest.approx({k: v for k, v in evals[-1].items() if k.startswith("eval/")}, abs=1e-5)
    tagged = [json.loads(line) for line in (tmp_path / "eval" / "predictions.jsonl").read_text().splitlines()]
    assert [row["words"] for row in tagged] == [row["tokens"] for row in sentences(40, 2)]
    assert [row["reference"] for row in tagged] == [row["ner_tags"] for row in sentences(40, 2)]
    assert np.mean([p == t for row in tagged for p, t in zip(row["prediction"], row["reference"])]) == \
        pytest.approx(evals[-1]["eval/accuracy"])
    back = transformers.BertForTokenClassification.from_pretrained(export).eval()
    assert back.config.id2label == {i: n for i, n in enumerate(["B-LOC", "B-ORG", "B-PER", "I-LOC", "I-ORG",
                                                                 "I-PER", "O"])}
    model, params = hf.load(export)
    ref = transformers.AutoTokenizer.from_pretrained(str(tiny_bert))
    enc = ref([["mary", "smith", "lives", "in", "paris"]], is_split_into_words=True, return_tensors="np")
    ours = np.asarray(model.apply({"params": params}, enc["input_ids"], attention_mask=enc["attention_mask"]))
    with torch.no_grad():
        theirs = back(**{k: torch.tensor(v) for k, v in enc.items()}).logits.numpy()
    np.testing.assert_allclose(ours, theirs, atol=1e-4)
    names = [back.config.id2label[i] for i in theirs[0].argmax(-1)[1:-1]]
    assert names == ["B-PER", "I-PER", "O", "O", "B-LOC"]


def test_ner_on_t5_trains_a_token_head_on_its_encoder(tmp_path):
    """A T5 seq2seq checkpoint (the bundled jaxft-tiny-t5) trains as T5ForTokenClassification: its encoder and
    a new `classifier`, the decoder's weights left unread; entity F1 rises; the export is a
    T5ForTokenClassification with the tag names and our logits."""
    train, dev = write(tmp_path / "train.jsonl", sentences(200, 1)), write(tmp_path / "dev.jsonl", sentences(40, 2))
    run = tmp_path / "run"
    r = cli(run, f"--config.model.path={TINY_T5}", "--config.method.name=full", f"--config.data.name={train}",
            f"--config.data.eval_name={dev}", "--config.data.seq_len=40", "--config.train.steps=30",
            "--config.train.batch_size=16", "--config.optimizer.learning_rate=2e-3", "--config.eval.every_steps=30",
            "--config.eval.at_start=True", "--config.train.log_every_steps=10")
    assert r.returncode == 0, r.stderr
    assert "new classification head classifier/kernel (256, 7): random init, trains" in r.stdout
    assert "model: t5 3x256 head=token_classification" in r.stdout
    evals = [row for row in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "eval/entity_f1" in row]
    assert evals[-1]["eval/entity_f1"] > evals[0]["eval/entity_f1"] + 0.3, evals  # 0.08 -> 0.50

    back = transformers.T5ForTokenClassification.from_pretrained(run / "export").eval()
    assert back.config.id2label[2] == "B-PER" and back.config.num_labels == 7
    model, params = hf.load(run / "export")
    assert model.cfg.head == "token_classification" and not any(k.startswith("decoder") for k in params)
    enc = transformers.AutoTokenizer.from_pretrained(str(TINY_T5))(
        [["mary", "smith", "lives", "in", "paris"], ["john", "sang"]], is_split_into_words=True, padding=True,
        return_tensors="np")
    ours = np.asarray(model.apply({"params": params}, enc["input_ids"], attention_mask=enc["attention_mask"]))
    with torch.no_grad():
        theirs = back(**{k: torch.tensor(v) for k, v in enc.items()}).logits.numpy()
    real = enc["attention_mask"].astype(bool)
    np.testing.assert_allclose(ours[real], theirs[real], atol=1e-4)


@pytest.mark.parametrize("case", ["not tagged", "unseen tag"])
def test_bad_ner_data_is_one_line_and_writes_nothing(tmp_path, case):
    train = write(tmp_path / "train.jsonl", sentences(20, 1))
    if case == "not tagged":  # SST-2's labels are one per sentence
        args, message = ("--config.data.name=sst2", "--config.data.task=token_classification"), \
            "sst2/train.tsv:2: field 'label' is str, expected a list of tags, one per word of 'sentence'"
    else:
        dev = write(tmp_path / "dev.jsonl", [{"tokens": ["john", "sang"], "ner_tags": ["B-PER", "B-SONG"]}])
        args, message = (f"--config.data.name={train}", f"--config.data.eval_name={dev}"), \
            f"{dev}:1: tag 'B-SONG' never occurs in the training set"
    r = cli(tmp_path / "run", "--config.model.path=jaxft-tiny", "--config.method.name=lora", *args)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and message in r.stderr, r.stderr
    assert not (tmp_path / "run").exists()
