"""Data: file formats and their error messages, label vocabularies, tokenised task arrays, batch order.

The tokenizer is a small SentencePiece model trained once per session on synthetic English and
Chinese sentences; nothing is downloaded.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from jaxft.config import base_config
from jaxft.data import iterator, sources, tasks
from jaxft.data.sources import Records, read_file
from jaxft.errors import JaxftError
from jaxft.tokenizer import Tokenizer

@pytest.fixture(scope="session")
def tok(tok_dir):
    return Tokenizer(tok_dir)


def write(path, text, encoding="utf-8"):
    path.write_bytes(text.encode(encoding))
    return path


def records(rows, name="mem.jsonl"):
    return Records(list(rows), [f"{name}:{i + 1}" for i in range(len(rows))])


def raises(match_parts, fn, *args, **kwargs):
    """fn raises JaxftError and every part (file name, line number, value) is in its message."""
    with pytest.raises(JaxftError) as e:
        fn(*args, **kwargs)
    msg = str(e.value)
    for part in match_parts:
        assert str(part) in msg, f"{part!r} not in {msg!r}"
    return msg


# --------------------------------------------------------------------------------------------------
# Reading each format


def test_jsonl_rows_and_lines(tmp_path):
    p = write(tmp_path / "d.jsonl", '{"text": "hello", "label": 1}\n\n{"text": "你好，世界", "label": 0}\n')
    r = read_file(p)
    assert r.rows == [{"text": "hello", "label": 1}, {"text": "你好，世界", "label": 0}]
    assert r.where == [f"{p}:1", f"{p}:3"]  # the blank line still counts


def test_json_array(tmp_path):
    rows = [{"text": "a, b", "label": "pos"}, {"text": "中文", "label": "neg"}]
    p = write(tmp_path / "d.json", "\n  " + json.dumps(rows, ensure_ascii=False, indent=2))
    r = read_file(p)
    assert r.rows == rows
    assert r.where == [f"{p}:item 0", f"{p}:item 1"]  # an array has no per-record line: the item names it


def test_json_file_with_json_lines(tmp_path):
    p = write(tmp_path / "d.json", '{"text": "one"}\n{"text": "二"}\n')
    r = read_file(p)
    assert r.rows == [{"text": "one"}, {"text": "二"}]
    assert r.where == [f"{p}:1", f"{p}:2"]


def test_csv_quotes_chinese_and_bom(tmp_path):
    text = 'text,label\n"hello, world",1\n"他说：""好""，然后走了",0\nplain,1\n'
    p = write(tmp_path / "d.csv", "\ufeff" + text)  # Excel writes a BOM: the header must not keep it
    r = read_file(p)
    assert list(r.rows[0]) == ["text", "label"]
    assert [row["text"] for row in r.rows] == ["hello, world", '他说："好"，然后走了', "plain"]
    assert [row["label"] for row in r.rows] == ["1", "0", "1"]
    assert r.where == [f"{p}:2", f"{p}:3", f"{p}:4"]


def test_csv_crlf_and_newline_inside_quotes(tmp_path):
    p = write(tmp_path / "d.csv", 'text,label\r\n"line one\r\nline two",1\r\nnext,0\r\n')
    r = read_file(p)
    assert [row["text"] for row in r.rows] == ["line one\nline two", "next"]
    assert r.where == [f"{p}:2", f"{p}:4"]  # a record is named by the line it starts on


def test_tsv_keeps_quotes_literally(tmp_path):
    p = write(tmp_path / "d.tsv", 'sentence\tlabel\nhe said "hi" , then left\t1\n"quoted whole"\t0\n" lone\t1\n')
    r = read_file(p)
    assert [row["sentence"] for row in r.rows] == ['he said "hi" , then left', '"quoted whole"', '" lone']
    assert [row["label"] for row in r.rows] == ["1", "0", "1"]
    assert r.where == [f"{p}:2", f"{p}:3", f"{p}:4"]


def test_unicode_line_separators_inside_text_are_text(tmp_path):
    # str.splitlines would split on these; they are ordinary characters inside a record.
    odd = "a\u2028b\u2029c\x1cd\x85e\x0bf\x0cg"
    p = write(tmp_path / "d.jsonl", json.dumps({"text": odd}, ensure_ascii=False) + "\n" + '{"text": "x"}\n')
    r = read_file(p)
    assert [row["text"] for row in r.rows] == [odd, "x"]
    assert r.where == [f"{p}:1", f"{p}:2"]
    p = write(tmp_path / "d.tsv", f"sentence\tlabel\n{odd}\t1\n")
    assert read_file(p).rows == [{"sentence": odd, "label": "1"}]


def test_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    p = tmp_path / "d.parquet"
    pq.write_table(pa.table({"text": ["good film", "很好看", "bad"], "label": [1, 1, 0]}), p)
    r = read_file(p)
    assert r.rows == [{"text": "good film", "label": 1}, {"text": "很好看", "label": 1}, {"text": "bad", "label": 0}]
    assert r.where == [f"{p}:row 1", f"{p}:row 2", f"{p}:row 3"]


def test_extension_is_case_insensitive(tmp_path):
    p = write(tmp_path / "D.JSONL", '{"text": "x"}\n')
    assert read_file(p).rows == [{"text": "x"}]


# --------------------------------------------------------------------------------------------------
# Malformed input: JaxftError naming the file and the line


def test_invalid_json_line(tmp_path):
    p = write(tmp_path / "bad.jsonl", '{"text": "a"}\n{"text": "b"}\n{"text": "c",, }\n{"text": "d"}\n')
    raises([f"{p}:3:", "invalid JSON"], read_file, p)


def test_json_line_not_an_object(tmp_path):
    p = write(tmp_path / "bad.jsonl", '{"text": "a"}\n["text", "b"]\n')
    raises([f"{p}:2:", "expected a JSON object", "list"], read_file, p)


def test_invalid_json_array(tmp_path):
    p = write(tmp_path / "bad.json", '[\n  {"text": "a"},\n  {"text": "b"\n]\n')
    raises([f"{p}:4:", "invalid JSON"], read_file, p)
    p = write(tmp_path / "bad2.json", '[{"text": "a"}, 3]')
    raises([str(p), "item 1", "expected a JSON object"], read_file, p)


def test_tsv_wrong_field_count(tmp_path):
    p = write(tmp_path / "bad.tsv", "sentence\tlabel\nfine\t1\nno label here\nx\t1\n")
    raises([f"{p}:3:", "1 fields, expected 2", "sentence, label"], read_file, p)
    p = write(tmp_path / "bad2.tsv", "sentence\tlabel\nfine\t1\ntoo\tmany\t1\n")
    raises([f"{p}:3:", "3 fields, expected 2"], read_file, p)


def test_csv_wrong_field_count(tmp_path):
    p = write(tmp_path / "bad.csv", 'text,label\n"a, b",1\nunquoted, comma,0\n')
    raises([f"{p}:3:", "3 fields, expected 2"], read_file, p)


def test_empty_csv(tmp_path):
    p = write(tmp_path / "empty.csv", "")
    raises([str(p), "empty file"], read_file, p)


def test_not_utf8(tmp_path):
    p = write(tmp_path / "latin.csv", "text,label\nok,1\ncafé,0\n", encoding="latin-1")
    raises([f"{p}:3:", "not UTF-8"], read_file, p)


def test_unknown_extension(tmp_path):
    p = write(tmp_path / "data.xml", "hello\n")
    raises([str(p), "unknown format", ".xml", ".jsonl"], read_file, p)


def test_missing_file(tmp_path):
    p = tmp_path / "nope.jsonl"
    raises([str(p), "not found"], read_file, p)
    raises([str(tmp_path), "not found"], read_file, tmp_path)  # a directory is not a data file


def test_missing_text_and_label_fields(tmp_path, tok):
    p = write(tmp_path / "d.jsonl", '{"text": "good", "label": 1}\n{"txt": "typo", "label": 0}\n')
    raises([f"{p}:2:", "missing field 'text'", "txt, label"], tasks.classification,
           read_file(p), tok, 16, "text", "label", [0, 1])
    p = write(tmp_path / "d2.jsonl", '{"text": "good", "label": 1}\n\n{"text": "no label"}\n')
    raises([f"{p}:3:", "missing field 'label'"], tasks.classification, read_file(p), tok, 16, "text", "label", [0, 1])
    p = write(tmp_path / "d3.jsonl", '{"text": "good", "label": 1}\n{"text": null, "label": 1}\n')
    raises([f"{p}:2:", "missing field 'text'"], tasks.classification, read_file(p), tok, 16, "text", "label", [0, 1])


def test_text_field_not_text(tmp_path, tok):
    p = write(tmp_path / "d.jsonl", '{"text": "good", "label": 1}\n{"text": 5, "label": 1}\n')
    raises([f"{p}:2:", "'text' is int", "expected text"], tasks.classification,
           read_file(p), tok, 16, "text", "label", [1])
    raises([f"{p}:2:", "'text' is int"], tasks.causal_lm, read_file(p), tok, 4, "text")


def test_label_not_seen_in_training(tmp_path, tok):
    train = read_file(write(tmp_path / "train.csv", "text,label\na,pos\nb,neg\n"))
    labels = tasks.label_vocab(train, "label")
    assert labels == ["neg", "pos"]
    ev = write(tmp_path / "eval.csv", "text,label\nc,pos\nd,neutral\n")
    raises([f"{ev}:3:", "'neutral'", "not one of the training labels", "['neg', 'pos']"], tasks.classification,
           read_file(ev), tok, 16, "text", "label", labels)
    # Checked before tokenizing (train.py), naming why it matters.
    raises([f"{ev}:3: label 'neutral' never occurs in the training set, whose labels are ['neg', 'pos']: the model "
            "could never predict it"], tasks.check_labels, read_file(ev), "label", labels, False)
    tasks.check_labels(train, "label", labels, False)


def test_declared_labels():
    """data.labels: the label set and its order; integer-like entries are integers, as the data's labels."""
    assert tasks.declared_labels("") == [] and tasks.declared_labels("  ") == []
    assert tasks.declared_labels("pos, neg") == ["pos", "neg"]  # the order declared, not sorted
    assert tasks.declared_labels("1,0") == [1, 0] and tasks.declared_labels(["neg", "pos"]) == ["neg", "pos"]
    assert tasks.declared_labels("not entailment,entailment") == ["not entailment", "entailment"]
    for value, fragment in (("pos", "one label: expected at least 2 classes"),
                            ("neg,,pos", "an empty label: expected labels separated by commas"),
                            ("neg,pos,neg", "label 'neg' is named twice"),
                            ("0,pos", "labels mix integers and strings"),
                            ([0, 1.5], "label 1.5 is float, expected an integer or a string")):
        raises([f"data.labels={value!r}: {fragment}"], tasks.declared_labels, value)


def test_labels_outside_the_declared_set(tmp_path):
    """A stray label (a "2" in a binary set, an empty cell, a float) is one line naming file, line, value and
    the labels expected; the declared order is the class order."""
    p = write(tmp_path / "train.csv", "text,label\na,0\nb,1\nc,2\n")
    raises([f"{p}:4: label 2 is not one of data.labels: expected one of [0, 1]"], tasks.check_labels,
           read_file(p), "label", [0, 1], True)
    tasks.check_labels(read_file(p), "label", [2, 1, 0], True)
    for rows, value in (([{"text": "a", "label": ""}], "''"), ([{"text": "a", "label": 1.0}], "1.0"),
                        ([{"text": "a", "label": True}], "True")):
        raises([f"mem.jsonl:1: label {value} is not one of data.labels"], tasks.check_labels, records(rows), "label",
               [0, 1], True)


# --------------------------------------------------------------------------------------------------
# Label vocabularies


def test_label_vocab_integer_like_strings_sort_numerically():
    r = records([{"label": v} for v in ["10", "2", "1", "2", " 0 ", "-3"]])
    labels = tasks.label_vocab(r, "label")
    assert labels == [-3, 0, 1, 2, 10]
    assert all(type(v) is int for v in labels)


def test_label_vocab_ints_and_int_strings_are_the_same_label():
    assert tasks.label_vocab(records([{"label": 1}, {"label": "1"}, {"label": 0}]), "label") == [0, 1]


def test_label_vocab_strings_sort():
    r = records([{"label": v} for v in ["positive", "negative", "neutral", "negative"]])
    assert tasks.label_vocab(r, "label") == ["negative", "neutral", "positive"]


def test_label_vocab_mixed_is_an_error():
    r = records([{"label": "1"}, {"label": "pos"}], name="mix.jsonl")
    raises(["mix.jsonl", "mix integers and strings"], tasks.label_vocab, r, "label")


def test_label_vocab_rejects_other_types():
    for bad in (True, 1.5, None, [1]):
        r = records([{"label": 0}, {"label": bad}], name="t.jsonl")
        raises(["t.jsonl:2:"], tasks.label_vocab, r, "label")


def test_label_vocab_digit_lookalikes_are_strings():
    # "²" and "١" pass str.isdigit but are not ASCII integers: they must stay strings, not crash int().
    assert tasks.label_vocab(records([{"label": "²"}, {"label": "--1"}]), "label") == ["--1", "²"]


# --------------------------------------------------------------------------------------------------
# Tokenised task arrays


def test_classification_shapes_bos_eos_padding(tok):
    texts = ["the movie was good", "电影很好看", "a", ""]
    r = records([{"text": t, "label": lab} for t, lab in zip(texts, ["1", "0", "1", "0"])])
    labels = tasks.label_vocab(r, "label")
    arrays, truncated = tasks.classification(r, tok, 24, "text", "label", labels)
    assert truncated == 0
    assert set(arrays) == {"input_ids", "attention_mask", "labels", "weight"}
    assert arrays["input_ids"].shape == arrays["attention_mask"].shape == (4, 24)
    assert arrays["input_ids"].dtype == arrays["attention_mask"].dtype == arrays["labels"].dtype == np.int32
    np.testing.assert_array_equal(arrays["labels"], [1, 0, 1, 0])
    np.testing.assert_array_equal(arrays["weight"], np.ones(4, np.float32))
    assert tok.pad_id == 3 and tok.pad_id not in (tok.bos_id, tok.eos_id)
    for i, t in enumerate(texts):
        ids, mask = arrays["input_ids"][i], arrays["attention_mask"][i]
        expected = [tok.bos_id] + tok.encode(t) + [tok.eos_id]
        n = len(expected)
        assert n < 24
        assert ids[:n].tolist() == expected
        assert ids[0] == tok.bos_id and ids[n - 1] == tok.eos_id  # EOS at the last real position
        assert (ids[n:] == tok.pad_id).all()  # right padding
        assert mask.tolist() == [1] * n + [0] * (24 - n)


def test_classification_truncation_keeps_eos(tok):
    long = " ".join(["the charming movie was very good"] * 8)
    short = "good"
    r = records([{"text": long, "label": 1}, {"text": short, "label": 0}, {"text": long + " 电影", "label": 0}])
    seq_len = 10
    arrays, truncated = tasks.classification(r, tok, seq_len, "text", "label", [0, 1])
    assert truncated == 2
    assert arrays["input_ids"].shape == (3, seq_len)
    for i in (0, 2):
        ids = arrays["input_ids"][i].tolist()
        text = r.rows[i]["text"]
        assert ids == [tok.bos_id] + tok.encode(text)[: seq_len - 2] + [tok.eos_id]
        assert arrays["attention_mask"][i].tolist() == [1] * seq_len
    n = len(tok.encode(short)) + 2
    assert arrays["input_ids"][1, n - 1] == tok.eos_id and arrays["attention_mask"][1].sum() == n
    # Exactly full is not truncated.
    exact = records([{"text": short, "label": 0}])
    _, truncated = tasks.classification(exact, tok, n, "text", "label", [0])
    assert truncated == 0


def test_causal_lm_packs_blocks(tok):
    texts = ["the movie was good", "电影很好看", "a funny story , not boring .", "我们喜欢"]
    r = records([{"text": t} for t in texts])
    stream = []
    for t in texts:
        stream += [tok.bos_id] + tok.encode(t) + [tok.eos_id]
    seq_len = 8
    arrays, truncated = tasks.causal_lm(r, tok, seq_len, "text")
    n = len(stream) // seq_len
    assert n >= 2 and truncated == 0
    assert set(arrays) == {"input_ids", "attention_mask", "weight"}
    assert arrays["input_ids"].shape == (n, seq_len) and arrays["input_ids"].dtype == np.int32
    assert arrays["input_ids"].reshape(-1).tolist() == stream[: n * seq_len]
    assert (arrays["attention_mask"] == 1).all() and arrays["attention_mask"].shape == (n, seq_len)
    np.testing.assert_array_equal(arrays["weight"], np.ones(n, np.float32))


def test_causal_lm_too_short(tmp_path, tok):
    p = write(tmp_path / "short.jsonl", '{"text": "a"}\n')
    raises([str(p), "fewer than one block of 512"], tasks.causal_lm, read_file(p), tok, 512, "text")
    p = write(tmp_path / "blank.jsonl", "\n\n")  # no records at all
    raises(["0 tokens", "fewer than one block"], tasks.causal_lm, read_file(p), tok, 8, "text")


def test_synthetic_deterministic():
    a = tasks.synthetic(64, 16, 100, seed=3, num_labels=5)
    b = tasks.synthetic(64, 16, 100, seed=3, num_labels=5)
    c = tasks.synthetic(64, 16, 100, seed=4, num_labels=5)
    assert set(a) == {"input_ids", "attention_mask", "weight", "labels"}
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    assert not np.array_equal(a["input_ids"], c["input_ids"])
    assert a["input_ids"].shape == (64, 16) and a["input_ids"].dtype == np.int32
    assert a["input_ids"].min() >= 0 and a["input_ids"].max() < 100
    assert a["labels"].shape == (64,) and set(a["labels"].tolist()) <= set(range(5))
    assert (a["attention_mask"] == 1).all() and (a["weight"] == 1).all()
    assert "labels" not in tasks.synthetic(8, 4, 10, seed=0, num_labels=0)


# --------------------------------------------------------------------------------------------------
# Sources


def test_bundled_sst2_resolves():
    train, ev, text_field, label_field = sources.resolve(base_config().data)
    assert (text_field, label_field) == ("sentence", "label")
    assert len(train.rows) == len(train.where) == 60614
    assert len(ev.rows) == len(ev.where) == 872
    assert set(train.rows[0]) == set(ev.rows[0]) == {"sentence", "label"}
    assert train.where[0].endswith("train.tsv:2") and ev.where[-1].endswith("dev.tsv:873")
    assert tasks.label_vocab(train, "label") == [0, 1]
    assert tasks.label_vocab(ev, "label") == [0, 1]


def test_resolve_local_files(tmp_path):
    import ml_collections

    tr = write(tmp_path / "train.jsonl", '{"body": "x", "y": "a"}\n')
    ev = write(tmp_path / "eval.csv", "body,y\nz,a\n")
    cfg = ml_collections.ConfigDict({"name": str(tr), "eval_name": str(ev), "text_field": "body", "label_field": "y"})
    train, evr, text_field, label_field = sources.resolve(cfg)
    assert train.rows == [{"body": "x", "y": "a"}] and evr.rows == [{"body": "z", "y": "a"}]
    assert (text_field, label_field) == ("body", "y")
    cfg = ml_collections.ConfigDict({"name": str(tr), "eval_name": "", "text_field": "", "label_field": ""})
    train, evr, text_field, label_field = sources.resolve(cfg)
    assert evr is None and (text_field, label_field) == ("text", "label")
    cfg = ml_collections.ConfigDict({"name": str(tmp_path / "missing.jsonl"), "eval_name": ""})
    raises(["missing.jsonl", "not found"], sources.resolve, cfg)


@pytest.mark.parametrize("rows,task,label_field,given,expect", [
    ([{"text": "a", "label": 1}], "", "label", False, "classification"),
    ([{"text": "a"}], "", "label", False, "causal_lm"),  # the text is the only column
    ([{"text": "a", "url": "u"}], "causal_lm", "label", False, "causal_lm"),
    ([{"sentence": ["a", "b"]}], "", None, False, "causal_lm"),  # a bundled source without labels
    ([{"text": "a", "stars": 5}], "", "stars", True, "classification"),
    ([{"text": "a", "sentiment": "pos"}], "", "label", False, "data.task is empty and there is no 'label' column "
                                                             "(columns found: text, sentiment)"),
    ([{"text": "a", "sentiment": "pos"}], "classification", "label", False,
     "no label column 'label' for classification (columns found: text, sentiment)"),
    ([{"text": "a"}], "", "stars", True, "no label column 'stars'"),
    ([{"text": "a"}], "classification", None, False, "no label field for classification"),
])
def test_choose_task(rows, task, label_field, given, expect):
    """data.task, else only what the data says unambiguously (issue 10: a label column under another
    name used to train a causal LM on the text)."""
    args = (task, records(rows), "src.jsonl", "text" if "text" in rows[0] else "sentence", label_field, given)
    if expect in ("classification", "causal_lm"):
        assert tasks.choose_task(*args) == expect
    else:
        raises(["data.name='src.jsonl'", expect], tasks.choose_task, *args)


def test_tokenizer_without_bos_or_eos(tok):
    """Qwen2's tokenizer has no BOS: tasks add only the special tokens that exist."""
    class NoSpecials:
        bos, eos, bos_id, eos_id, pad_id = [], [7], None, 7, 7

        def encode(self, text):
            return tok.encode(text)

    t = NoSpecials()
    r = records([{"text": "hello world", "label": 0}])
    arrays, _ = tasks.classification(r, t, 16, "text", "label", [0])
    n = len(tok.encode("hello world"))
    assert arrays["input_ids"][0, : n + 1].tolist() == tok.encode("hello world") + [7]
    t.eos, t.eos_id = [], None
    arrays, cut = tasks.classification(records([{"text": "hello world " * 20, "label": 0}]), t, 8, "text", "label", [0])
    assert cut == 1 and arrays["input_ids"][0].tolist() == tok.encode("hello world " * 20)[:8]
    lm, _ = tasks.causal_lm(records([{"text": "hello world " * 5}]), t, 4, "text")
    assert lm["input_ids"].reshape(-1).tolist() == tok.encode("hello world " * 5)[: lm["input_ids"].size]


def test_load_texts(tmp_path):
    p = write(tmp_path / "t.jsonl", '{"text": "a"}\n{"text": "二"}\n')
    assert sources.load_texts(str(p)) == ["a", "二"]
    p = write(tmp_path / "t2.jsonl", '{"text": "a"}\n{"text": ["b"]}\n')
    raises([f"{p}:2:", "expected text"], sources.load_texts, str(p))


# --------------------------------------------------------------------------------------------------
# Batch order


def index_arrays(n):
    x = np.arange(n * 3).reshape(n, 3).astype(np.float32)
    return {"idx": np.arange(n), "x": x, "weight": np.ones(n, np.float32)}


def test_batches_pure_function_of_seed_and_position():
    arrays = index_arrays(10)
    a = iterator.Batches(arrays, 4, seed=7)
    positions = [0, 1, 2, 3, 7, 25, 3, 0, 12]  # any order, repeats, far ahead (epoch wraps)
    first = {p: a.local(p, (0, 4)) for p in positions}
    b = iterator.Batches(arrays, 4, seed=7)  # a fresh object, as after a restart
    for p in reversed(positions):
        got = b.local(p, (0, 4))
        for k in arrays:
            np.testing.assert_array_equal(got[k], first[p][k])
        np.testing.assert_array_equal(got["idx"], a.indices(p))
    c = iterator.Batches(arrays, 4, seed=8)
    assert any(not np.array_equal(c.indices(p), a.indices(p)) for p in range(5))


def test_resume_mid_run_sees_the_same_batches():
    arrays = index_arrays(13)
    run = iterator.Batches(arrays, 5, seed=0)
    uninterrupted = [run.indices(s) for s in range(12)]
    resumed = iterator.Batches(arrays, 5, seed=0)
    for s in range(7, 12):
        np.testing.assert_array_equal(resumed.indices(s), uninterrupted[s])


@pytest.mark.parametrize("n,gb", [(12, 4), (10, 4), (7, 3), (5, 8)])
def test_each_epoch_sees_every_example_once(n, gb):
    b = iterator.Batches(index_arrays(n), gb, seed=1)
    epochs = 3
    num_batches = -(-epochs * n // gb)
    flat = np.concatenate([b.indices(s) for s in range(num_batches)])
    assert all(len(b.indices(s)) == gb for s in range(num_batches))
    orders = [flat[e * n : (e + 1) * n] for e in range(epochs)]
    for order in orders:
        assert sorted(order.tolist()) == list(range(n))
    if n >= 7:
        assert not np.array_equal(orders[0], orders[1]) and not np.array_equal(orders[1], orders[2])


def test_epochs_reshuffle():
    n = 64
    b = iterator.Batches(index_arrays(n), 16, seed=0)
    epoch = lambda e: np.concatenate([b.indices(s) for s in range(4 * e, 4 * e + 4)])  # noqa: E731
    e0, e1, e2 = epoch(0), epoch(1), epoch(2)
    assert sorted(e0.tolist()) == sorted(e1.tolist()) == list(range(n))
    assert not np.array_equal(e0, e1) and not np.array_equal(e1, e2)
    assert not np.array_equal(e0, np.arange(n))


def test_no_shuffle_is_sequential():
    b = iterator.Batches(index_arrays(6), 4, seed=0, shuffle=False)
    assert [b.indices(s).tolist() for s in range(3)] == [[0, 1, 2, 3], [4, 5, 0, 1], [2, 3, 4, 5]]


def test_local_rows_concatenate_to_the_global_batch():
    arrays = index_arrays(20)
    b = iterator.Batches(arrays, 8, seed=3)
    for p in (0, 1, 2, 5):
        full = b.local(p, (0, 8))
        lo, hi = iterator.Batches(arrays, 8, seed=3).local(p, (0, 4)), b.local(p, (4, 8))  # each process its own
        for k in arrays:
            assert lo[k].shape[0] == hi[k].shape[0] == 4
            np.testing.assert_array_equal(np.concatenate([lo[k], hi[k]]), full[k])
            np.testing.assert_array_equal(full[k], arrays[k][b.indices(p)])


@pytest.mark.parametrize("n,gb", [(10, 4), (8, 4), (3, 4), (1, 1)])
def test_eval_batches_cover_every_example_once(n, gb):
    arrays = index_arrays(n)
    batches = list(iterator.eval_batches(arrays, gb, (0, gb)))
    assert len(batches) == -(-n // gb)
    seen = []
    for batch in batches:
        assert all(v.shape[0] == gb for v in batch.values())
        seen += batch["idx"][batch["weight"] == 1].tolist()
        assert set(batch["weight"].tolist()) <= {0.0, 1.0}
    assert seen == list(range(n))  # in order, once each, weight 1
    pad = gb * len(batches) - n
    last = batches[-1]
    assert (last["weight"][gb - pad :] == 0).all() and (last["weight"][: gb - pad] == 1).all()
    assert (last["idx"][gb - pad :] == 0).all()  # padding copies row 0
    assert sum(float(b["weight"].sum()) for b in batches) == n


def test_eval_batches_per_process_rows():
    arrays = index_arrays(10)
    whole = list(iterator.eval_batches(arrays, 4, (0, 4)))
    halves = zip(iterator.eval_batches(arrays, 4, (0, 2)), iterator.eval_batches(arrays, 4, (2, 4)))
    for full, (a, b) in zip(whole, halves, strict=True):
        for k in arrays:
            np.testing.assert_array_equal(np.concatenate([a[k], b[k]]), full[k])


def test_length_buckets_cut_padding_and_stay_deterministic():
    rng = np.random.default_rng(0)
    n, width = 1000, 64
    lengths = rng.integers(2, width + 1, n)
    mask = (np.arange(width)[None] < lengths[:, None]).astype(np.int32)
    arrays = {"input_ids": np.arange(n * width).reshape(n, width), "attention_mask": mask,
              "labels": np.arange(n), "weight": np.ones(n, np.float32)}
    buckets = (16, 32, 64)
    a, b = iterator.Batches(arrays, 32, seed=3, buckets=buckets), iterator.Batches(arrays, 32, seed=3, buckets=buckets)
    per_epoch = n // 32
    seen, widths, padding = [], set(), 0
    for pos in range(per_epoch):
        batch = a.local(pos, (0, 32))
        np.testing.assert_array_equal(batch["input_ids"], b.local(pos, (0, 32))["input_ids"])
        w = batch["input_ids"].shape[1]
        widths.add(w)
        longest = batch["attention_mask"].sum(1).max()
        assert longest <= w and (w == 16 or longest > w // 2)  # the smallest bucket that fits
        assert (batch["attention_mask"].sum(1) == lengths[batch["labels"]]).all()  # nothing real was cut
        halves = [a.local(pos, (0, 16)), a.local(pos, (16, 32))]
        assert all(h["input_ids"].shape[1] == w for h in halves)  # processes agree on the width
        seen += list(batch["labels"])
        padding += w * 32 - batch["attention_mask"].sum()
    assert widths == set(buckets)
    assert len(seen) == len(set(seen)) == per_epoch * 32  # each example at most once per epoch
    assert padding < 0.25 * per_epoch * 32 * width  # far less than padding everything to 64
    assert not np.array_equal(a.indices(0), a.indices(per_epoch))  # the next epoch reshuffles


def test_group_phrases_puts_sub_phrases_after_their_sentence(tok):
    rows = ["a b c d e f", "c d e", "x y z", "b c d e f", "x y", "q"]
    rec = Records([{"sentence": r} for r in rows], [f"f:{i + 2}" for i in range(len(rows))])
    grouped = sources.group_phrases(rec, "sentence")
    assert [r["sentence"] for r in grouped.rows] == [["a b c d e f", "b c d e f", "c d e"], ["x y z", "x y"], ["q"]]
    assert grouped.where == ["f:2", "f:4", "f:7"]
    arrays, _ = tasks.causal_lm(grouped, tok, 4, "sentence")
    stream = arrays["input_ids"].reshape(-1)
    first = [tok.bos_id] + tok.encode("a b c d e f") + [tok.eos_id] + tok.encode("b c d e f") + [tok.eos_id]
    np.testing.assert_array_equal(stream[: len(first)], first[: len(stream)])  # BOS s1 EOS s2 EOS ...


def test_bundled_grouped_sst2_keeps_every_phrase():
    train, ev, text_field, label_field = sources.resolve(base_config().data, "sst2_grouped")
    assert label_field is None and len(ev.rows) == 872
    assert sum(len(r[text_field]) for r in train.rows) == 60614
    assert all(s in r[text_field][0] for r in train.rows for s in r[text_field])  # each phrase inside its sentence


# --------------------------------------------------------------------------------------------------
# Classification from every format, with configurable fields, and sentence pairs


ROWS = [{"review": "good film", "stars": "pos", "h": "it was good"}, {"review": "很好看", "stars": "pos", "h": "好"},
        {"review": "bad , boring", "stars": "neg", "h": "it was not good"}]


def write_format(path, rows):
    """The same rows as a csv, tsv, json array, jsonl or parquet file."""
    suffix = path.suffix
    if suffix == ".parquet":
        pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
        pq.write_table(pa.table({k: [r[k] for r in rows] for k in rows[0]}), path)
    elif suffix == ".csv":
        import csv

        with open(path, "w", newline="", encoding="utf-8") as f:
            csv.writer(f).writerows([list(rows[0])] + [list(r.values()) for r in rows])  # quotes "bad , boring"
    elif suffix == ".tsv":
        write(path, "\n".join(["\t".join(rows[0])] + ["\t".join(r.values()) for r in rows]) + "\n")
    elif suffix == ".json":
        write(path, json.dumps(rows, ensure_ascii=False))
    else:
        write(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".json", ".jsonl", ".parquet"])
def test_every_format_gives_the_same_classification_arrays(tmp_path, tok, suffix):
    import ml_collections

    path = write_format(tmp_path / f"reviews{suffix}", ROWS)
    cfg = ml_collections.ConfigDict({"name": str(path), "eval_name": "", "text_field": "review",
                                     "label_field": "stars", "text_pair_field": "h"})
    train, _, text_field, label_field = sources.resolve(cfg)
    assert (text_field, label_field, sources.pair_field(cfg)) == ("review", "stars", "h")
    labels = tasks.label_vocab(train, label_field)
    assert labels == ["neg", "pos"]  # names sorted: their ids are their positions
    arrays, _ = tasks.classification(train, tok, 32, text_field, label_field, labels, "h", token_type_ids=True)
    np.testing.assert_array_equal(arrays["labels"], [1, 1, 0])
    for i, row in enumerate(ROWS):
        a, b = tok.encode(row["review"]), tok.encode(row["h"])
        n = len(a) + len(b) + 3
        assert arrays["input_ids"][i, :n].tolist() == [tok.bos_id] + a + [tok.eos_id] + b + [tok.eos_id]
        assert arrays["token_type_ids"][i].tolist() == [0] * (len(a) + 2) + [1] * (len(b) + 1) + [0] * (32 - n)
        assert arrays["attention_mask"][i].sum() == n


def test_token_type_ids_only_when_configured(tok):
    r = records(ROWS)
    single, _ = tasks.classification(r, tok, 16, "review", "stars", ["neg", "pos"])
    pair, _ = tasks.classification(r, tok, 16, "review", "stars", ["neg", "pos"], "h")
    assert set(single) == set(pair) == {"input_ids", "attention_mask", "labels", "weight"}
    with_types, _ = tasks.classification(r, tok, 16, "review", "stars", ["neg", "pos"], token_type_ids=True)
    assert (with_types["token_type_ids"] == 0).all()  # one text: every token is of type 0
    np.testing.assert_array_equal(with_types["input_ids"], single["input_ids"])


@pytest.fixture(scope="session")
def bert_tok(tmp_path_factory):
    """BERT's uncased WordPiece tokenizer (transformers, the oracle), saved to a directory."""
    transformers = pytest.importorskip("transformers")
    vocab = Path("/work/shared/data/tokenizers/bert-base-uncased/vocab.txt")
    if not vocab.exists():
        words = "[PAD] [UNK] [CLS] [SEP] [MASK] the a movie film is was good bad it not and of".split()
        vocab = tmp_path_factory.mktemp("vocab") / "vocab.txt"
        vocab.write_text("\n".join(words) + "\n")
    hf = transformers.BertTokenizerFast(vocab=str(vocab))
    out = tmp_path_factory.mktemp("bert_tok")
    hf.save_pretrained(out)
    return hf, Tokenizer(out)


def test_pairs_match_bert_tokenizer_with_longest_first_truncation(bert_tok):
    """[CLS] a [SEP] b [SEP] with token_type_ids, cut as HF cuts pairs, for many length combinations (no
    empty texts: HF takes an empty second text for none, jaxft keeps its [SEP])."""
    hf, tok = bert_tok
    rng = np.random.default_rng(0)
    words = "the a movie film is was good bad it not and of".split()
    rows = [{"a": " ".join(rng.choice(words, rng.integers(1, 14))), "b": " ".join(rng.choice(words, rng.integers(1, 14))),
             "y": 0} for _ in range(200)]
    for seq_len in (5, 8, 9, 16, 40):
        arrays, truncated = tasks.classification(records(rows), tok, seq_len, "a", "y", [0], "b", token_type_ids=True)
        cut = 0
        for i, row in enumerate(rows):
            want = hf(row["a"], row["b"], truncation="longest_first", max_length=seq_len)
            cut += len(hf(row["a"], row["b"])["input_ids"]) > seq_len
            n = len(want["input_ids"])
            assert arrays["input_ids"][i, :n].tolist() == want["input_ids"], (seq_len, row)
            assert arrays["token_type_ids"][i, :n].tolist() == want["token_type_ids"], (seq_len, row)
            assert arrays["attention_mask"][i].tolist() == [1] * n + [0] * (seq_len - n)
            assert (arrays["input_ids"][i, n:] == hf.pad_token_id).all()
        assert truncated == cut


def test_bert_single_text_is_cls_text_sep(bert_tok):
    hf, tok = bert_tok
    arrays, _ = tasks.classification(records([{"t": "the film was good", "y": 1}]), tok, 12, "t", "y", [1])
    want = hf("the film was good")["input_ids"]
    assert arrays["input_ids"][0, : len(want)].tolist() == want


def test_missing_pair_field_names_file_and_line(tmp_path, tok):
    p = write(tmp_path / "pairs.jsonl", '{"premise": "a", "hypothesis": "b", "label": "x"}\n'
                                        '{"premise": "c", "hyp": "d", "label": "x"}\n')
    raises([f"{p}:2:", "missing field 'hypothesis'", "premise, hyp, label"], tasks.classification,
           read_file(p), tok, 16, "premise", "label", ["x"], "hypothesis")


def test_parquet_without_pyarrow_is_one_clear_error(tmp_path, monkeypatch):
    import sys

    p = write(tmp_path / "d.parquet", "not really parquet")
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)  # import fails as if pyarrow were absent
    raises([str(p), "reading parquet needs pyarrow"], read_file, p)


def test_bundled_rte_is_pairs_with_named_labels(tok):
    cfg = base_config().data
    cfg.name = "rte"
    train, ev, text_field, label_field = sources.resolve(cfg)
    assert (text_field, label_field, sources.pair_field(cfg)) == ("premise", "label", "hypothesis")
    assert (len(train.rows), len(ev.rows)) == (2490, 277)
    labels = tasks.label_vocab(train, label_field)
    assert labels == ["entailment", "not_entailment"]
    arrays, _ = tasks.classification(ev, tok, 256, text_field, label_field, labels, "hypothesis")
    assert arrays["labels"].tolist().count(0) == 146  # entailment, as the SuperGLUE counts


def test_bundled_chnsenticorp_is_the_documented_fixed_seed_split():
    cfg = base_config().data
    cfg.name = "chnsenticorp"
    train, ev, text_field, label_field = sources.resolve(cfg)
    assert (text_field, label_field, sources.pair_field(cfg)) == ("review", "label", None)
    assert (len(train.rows), len(ev.rows)) == (6965, 800)
    assert tasks.label_vocab(train, "label") == [0, 1]
    assert sum(tasks._label(r["label"]) for r in ev.rows) == 542
    source = Path("/work/shared/data/chinese_sentiment/ChnSentiCorp_htl_all.csv")
    if source.exists():  # the split is what the README's code makes of the source
        import csv

        rows = list(csv.reader(source.open(encoding="utf-8", newline="")))[1:]
        kept = [r for r in rows if r[1].strip()]
        order = np.random.default_rng(0).permutation(len(kept))
        assert [(r["label"], r["review"]) for r in ev.rows] == [tuple(kept[i]) for i in order[:800]]
        assert [(r["label"], r["review"]) for r in train.rows] == [tuple(kept[i]) for i in order[800:]]
    assert {tasks._label(r["label"]) for r in train.rows[:96]} == {0, 1}  # shuffled: a quick run sees both


@pytest.mark.parametrize("name", ["e2e_nlg/valid.txt", "e2e_nlg/test.txt", "adgen/dev.json",
                                  "alpaca_en_demo/alpaca_en_demo.json", "alpaca_zh_demo/alpaca_zh_demo.json"])
def test_bundled_generation_sets_are_there_with_attribution(name):
    path = sources.ASSETS / name
    assert path.stat().st_size > 100_000
    readme = (path.parent / "README.md").read_text(encoding="utf-8")
    assert "commit" in readme and "licen" in readme.lower()


def test_token_types_auto_for_pairs_on_models_that_embed_them():
    """`data.token_type_ids=auto` (the default) gives RTE's pairs BERT's token types, as transformers'
    tokenizer does; a decoder, single sentences and `False` get none; another value is one error."""
    transformers = pytest.importorskip("transformers")
    from jaxft import hf
    from jaxft.train import load_data

    def data(model, **kw):
        c = base_config()
        c.data.name, c.data.seq_len, c.data.max_train_examples, c.data.max_eval_examples = "rte", 64, 16, 4
        for k, v in kw.items():
            c.data[k] = v
        path = hf.BUNDLED_MODELS[model]
        return load_data(c, hf.read_config(path), path)

    bert = data("jaxft-tiny-bert")
    hf_tok = transformers.BertTokenizerFast.from_pretrained(hf.BUNDLED_MODELS["jaxft-tiny-bert"])
    rte = base_config().data
    rte.name = "rte"
    rows = sources.resolve(rte)[0].rows[:16]
    want = hf_tok([r["premise"] for r in rows], [r["hypothesis"] for r in rows], truncation="longest_first",
                  max_length=64, padding="max_length", return_tensors="np")
    np.testing.assert_array_equal(bert.train["input_ids"], want["input_ids"])
    np.testing.assert_array_equal(bert.train["token_type_ids"], want["token_type_ids"])
    assert bert.train["token_type_ids"].any()
    assert "token_type_ids" not in data("jaxft-tiny").train  # a decoder: no token-type embeddings
    assert "token_type_ids" not in data("jaxft-tiny-bert", name="sst2").train  # single sentences
    assert "token_type_ids" not in data("jaxft-tiny-bert", token_type_ids="False").train
    with pytest.raises(JaxftError, match="data.token_type_ids='yes': expected auto, True or False"):
        data("jaxft-tiny-bert", token_type_ids="yes")


def test_eval_holdout_gives_classification_an_eval_split(tmp_path):
    """`data.eval_holdout=N` holds out a classification file's last N records for evaluation when it has no
    eval split, as it does for language-model sources; a file with an eval split keeps it."""
    from jaxft import hf
    from jaxft.train import load_data

    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps({"text": f"row {i}", "label": i % 2}) + "\n" for i in range(20)))
    model = hf.BUNDLED_MODELS["jaxft-tiny"]

    def data(**kw):
        c = base_config()
        c.data.name, c.data.seq_len = str(path), 16
        for k, v in kw.items():
            c.data[k] = v
        return load_data(c, hf.read_config(model), model)

    assert data().eval is None
    held = data(eval_holdout=6)
    assert held.task == "classification"
    assert len(held.train["input_ids"]) == 14 and len(held.eval["input_ids"]) == 6
    np.testing.assert_array_equal(held.eval["labels"], [i % 2 for i in range(14, 20)])
    assert len(data(eval_holdout=6, eval_name=str(path)).eval["input_ids"]) == 20  # its own eval split wins
    # data.max_train_examples cuts what the holdout leaves: the eval records are the same whatever the cut
    cut = data(eval_holdout=6, max_train_examples=10)
    assert len(cut.train["input_ids"]) == 10
    np.testing.assert_array_equal(cut.eval["input_ids"], held.eval["input_ids"])
    np.testing.assert_array_equal(cut.train["input_ids"], held.train["input_ids"][:10])
    with pytest.raises(JaxftError, match=r"eval_holdout=20: the source has only 20 records$"):
        data(eval_holdout=20, max_train_examples=6)
