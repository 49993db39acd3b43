"""SentencePiece training and the Tokenizer: determinism, exact round trips, special ids, the HF view, the CLI."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from jaxft.errors import JaxftError
from conftest import synthetic_texts
from jaxft.tokenizer import Tokenizer, train_sentencepiece


@pytest.fixture(scope="module")
def tok(tok_dir):
    return Tokenizer(tok_dir)


# Seen and unseen text. Nothing below is normalised away: no NFKC (full-width punctuation stays),
# no whitespace folding (runs of spaces, tabs, newlines stay), unseen characters go to bytes.
ROUND_TRIP = [
    "the movie was good",
    "It's a CHARMING film, not boring.",
    "电影很好看",
    "我们今天不喜欢这个故事。",
    "今天天气很好，我们去看电影！（真的）",  # full-width ， ！ （ ）: NFKC would turn them ASCII
    "emoji 😀👍🏽 and rare 龘 𠀀 Ωμέγα",
    "ＡＢＣ① x² ﬁ",  # NFKC-foldable
    "mixed 中文 and English 123",
    "two  spaces,   three, trailing  ",
    "tab\there\nnew line\r\n",
    "",
]


def test_training_is_deterministic(tmp_path):
    texts = synthetic_texts(seed=1)
    a = train_sentencepiece(texts, tmp_path / "a", vocab_size=300)
    b = train_sentencepiece(list(texts), tmp_path / "b", vocab_size=300)
    assert (a / "tokenizer.model").read_bytes() == (b / "tokenizer.model").read_bytes()
    assert (a / "tokenizer_config.json").read_bytes() == (b / "tokenizer_config.json").read_bytes()


def test_special_ids(tok, tok_dir):
    import sentencepiece as spm

    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 3)
    assert tok.vocab_size == 300
    sp = spm.SentencePieceProcessor(model_file=str(tok_dir / "tokenizer.model"))
    assert [sp.id_to_piece(i) for i in range(4)] == ["<unk>", "<s>", "</s>", "<pad>"]
    assert sp.unk_id() == 0
    assert sp.id_to_piece(4) == "<0x00>" and sp.id_to_piece(259) == "<0xFF>"  # byte fallback pieces
    cfg = json.loads((tok_dir / "tokenizer_config.json").read_text())
    assert (cfg["bos_token"], cfg["eos_token"], cfg["pad_token"], cfg["unk_token"]) == ("<s>", "</s>", "<pad>", "<unk>")


@pytest.mark.parametrize("text", ROUND_TRIP)
def test_round_trip(tok, text):
    ids = tok.encode(text)
    assert all(isinstance(i, int) and 0 <= i < tok.vocab_size for i in ids)
    assert 0 not in ids  # byte fallback: nothing becomes <unk>
    assert not {tok.bos_id, tok.eos_id, tok.pad_id} & set(ids)  # encode adds no special tokens
    assert tok.decode(ids) == text


def test_unseen_characters_use_bytes(tok):
    text = "😀"
    ids = tok.encode(text)
    pieces = [i for i in ids if 4 <= i < 260]  # the 256 byte pieces <0x00>..<0xFF>
    assert [i - 4 for i in pieces] == list(text.encode("utf-8"))
    assert tok.decode(ids) == text
    # Seen Chinese characters are whole pieces, not bytes.
    assert all(not 4 <= i < 260 for i in tok.encode("电影很好看"))


def test_not_normalised(tok):
    assert tok.encode("a  b") != tok.encode("a b")
    assert tok.encode("好，") != tok.encode("好,")  # full-width comma is not folded to ASCII


def test_training_errors_are_jaxft_errors(tmp_path):
    with pytest.raises(JaxftError, match="vocab_size=100"):  # fewer than the 256 byte pieces
        train_sentencepiece(synthetic_texts(), tmp_path / "small", vocab_size=100)
    with pytest.raises(JaxftError, match="vocab_size=5000"):  # more pieces than these texts can give
        train_sentencepiece(synthetic_texts(), tmp_path / "big", vocab_size=5000)


# --------------------------------------------------------------------------------------------------
# transformers' view of the same directory

HF_SAME = [
    "the movie was good",
    "It's a CHARMING film, not boring.",
    "电影很好看",
    "今天天气很好，我们去看电影！（真的）",
    "the movie. 电影很好看",
    "emoji 😀 and rare 龘",
    "a  b\tc\nd",
    "trailing  ",
]


@pytest.fixture(scope="module")
def hf_tok(tok_dir):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(tok_dir))


def test_hf_loads_with_same_special_tokens(hf_tok, tok):
    assert (hf_tok.bos_token_id, hf_tok.eos_token_id, hf_tok.pad_token_id, hf_tok.unk_token_id) == (1, 2, 3, 0)
    assert len(hf_tok) == tok.vocab_size


@pytest.mark.parametrize("text", HF_SAME)
def test_hf_encodes_the_same_ids(hf_tok, tok, text):
    ids = tok.encode(text)
    assert hf_tok.encode(text, add_special_tokens=False) == ids
    assert hf_tok.encode(text) == [tok.bos_id] + ids  # add_bos_token, no EOS
    assert hf_tok.decode(ids) == text


@pytest.mark.parametrize("text", [" leading", "  two leading", " "])
def test_hf_leading_space_difference(hf_tok, tok, text):
    """SentencePiece always adds the dummy-prefix "▁"; the Metaspace pre-tokenizer of transformers'
    LlamaTokenizer (prepend_scheme="first") adds it only when the text does not already start with a space
    (" x" -> "▁x", not "▁▁x"; noted in huggingface/transformers PR #47862). So for text with leading
    spaces the HF ids are ours without the first "▁". Ours are SentencePiece's, the reference, and decode
    back to the text exactly. Any other difference fails test_hf_encodes_the_same_ids."""
    ids = tok.encode(text)
    space = hf_tok.convert_tokens_to_ids("▁")
    assert ids[0] == space
    assert hf_tok.encode(text, add_special_tokens=False) == ids[1:]
    assert tok.decode(ids) == text


# --------------------------------------------------------------------------------------------------
# The CLI


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "jaxft.tokenizer", *args], capture_output=True, text=True,
                          timeout=120)


def test_cli_trains_from_jsonl(tmp_path):
    data = tmp_path / "texts.jsonl"
    data.write_text("".join(json.dumps({"text": t, "id": i}, ensure_ascii=False) + "\n"
                            for i, t in enumerate(synthetic_texts())), encoding="utf-8")
    out = tmp_path / "out"
    r = run_cli(f"--data={data}", "--field=text", "--vocab_size=300", f"--out={out}")
    assert r.returncode == 0, r.stderr
    assert "tokenizer.model" in r.stdout and "400 texts" in r.stdout
    assert (out / "tokenizer.model").is_file() and (out / "tokenizer_config.json").is_file()
    # Same texts through the library: the same model, byte for byte.
    lib = train_sentencepiece(synthetic_texts(), tmp_path / "lib", vocab_size=300)
    assert (out / "tokenizer.model").read_bytes() == (lib / "tokenizer.model").read_bytes()
    t = Tokenizer(out)
    assert t.decode(t.encode("电影 good 😀")) == "电影 good 😀"


def one_line_error(r, *parts):
    assert r.returncode == 2, (r.returncode, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert "Traceback" not in r.stderr
    for part in parts:
        assert part in lines[0], (part, lines[0])


def test_cli_missing_data_file(tmp_path):
    missing = tmp_path / "nope.jsonl"
    one_line_error(run_cli(f"--data={missing}", "--field=text", "--vocab_size=300", f"--out={tmp_path / 'o'}"),
                   str(missing), "not found")
    assert not (tmp_path / "o").exists()


def test_cli_bad_field_and_bad_vocab_size(tmp_path):
    data = tmp_path / "texts.jsonl"
    data.write_text('{"text": "a b c"}\n{"body": "d"}\n')
    one_line_error(run_cli(f"--data={data}", "--field=text", "--vocab_size=300", f"--out={tmp_path / 'o'}"),
                   f"{data}:2:", "missing field 'text'")
    one_line_error(run_cli(f"--data={data}", "--field=body", "--vocab_size=4096", f"--out={tmp_path / 'o'}"),
                   f"{data}:1:", "missing field 'body'")
    data.write_text('{"text": "a b c"}\n')
    one_line_error(run_cli(f"--data={data}", "--field=text", "--vocab_size=4096", f"--out={tmp_path / 'o'}"),
                   "sentencepiece", "vocab_size=4096")



def test_cli_bad_input_is_one_line_and_writes_nothing(tmp_path):
    """Found by the input audit. Was: a usage page for a bad --kind, tracebacks for an --out that is a file,
    sentencepiece's internal message for vocab_size 0 or empty texts (and an empty --out directory left),
    and exit 0 with a 58-token vocab.txt for a WordPiece vocab_size of 3."""
    data = tmp_path / "texts.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in synthetic_texts()[:50]))
    out = tmp_path / "o"
    one_line_error(run_cli(f"--data={data}", "--field=text", "--vocab_size=0", f"--out={out}"),
                   "--vocab_size=0: expected a positive integer")
    one_line_error(run_cli(f"--data={data}", "--kind=bpe", f"--out={out}"), "--kind", "'bpe'")
    one_line_error(run_cli(f"--data={data}", "--field=text", "--kind=wordpiece", "--vocab_size=3", f"--out={out}"),
                   "vocab_size=3", "more than its 5 special tokens")
    one_line_error(run_cli(f"--data={data}", "--field=text", "--vocab_size=4096", f"--out={out}"),
                   "sentencepiece", "vocab_size=4096")
    assert not out.exists()
    afile = tmp_path / "afile"
    afile.write_text("x")
    for where in (afile, afile / "sub"):
        one_line_error(run_cli(f"--data={data}", "--field=text", "--vocab_size=300", f"--out={where}"),
                       f"--out={where}", f"{afile} is a file")
    blank = tmp_path / "blank.jsonl"
    blank.write_text('{"text": ""}\n{"text": "  "}\n')
    one_line_error(run_cli(f"--data={blank}", "--field=text", "--vocab_size=300", f"--out={out}"),
                   f"--data={blank}", "no text to train on")
    assert not out.exists() and afile.read_text() == "x"

# ---------------------------------------------------------------------------------------------
# HF tokenizer files, read with `tokenizers` alone (jaxft.hf_tokenizer): transformers is the oracle.

HF_TEXTS = ["The movie wasn't Boring, it's GREAT!", "Café naïve résumé", "电影很好看，真的！", "a  b\tc\nd [MASK] x",
            "<|im_start|>user\nhi<|im_end|>", "ids 12345 and ½ x²"]


def _wordpiece_dir():
    from jaxft import hf

    return hf.resolve("jaxft-tiny-bert")  # vocab.txt + tokenizer_config.json


def _byte_level_dir(root):
    """GPT-2's older layout: vocab.json + merges.txt, no tokenizer.json."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(synthetic_texts() + HF_TEXTS, trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    root.mkdir()
    tok.model.save(str(root))
    (root / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "GPT2Tokenizer"}))
    return root


def _chatml_dir(root):
    """A Qwen2-style tokenizer.json with ChatML tokens added, saved by transformers."""
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(synthetic_texts() + HF_TEXTS, trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                         additional_special_tokens=["<|im_start|>"]).save_pretrained(root)
    return root


def _gemma_dir(root):
    """Gemma's tokenizer.json (a SentencePiece BPE as transformers' GemmaTokenizer lays it out: spaces as
    U+2581, splits after them, byte fallback for what the pieces miss, e.g. most Chinese here), saved by
    transformers: its pieces trained on the synthetic texts, after the specials and the 256 byte tokens."""
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.Replace(" ", "\u2581")
    tok.pre_tokenizer = pre_tokenizers.Split(pattern=" ", behavior="merged_with_previous")
    tok.train_from_iterator(synthetic_texts(), trainers.BpeTrainer(vocab_size=300))
    trained = json.loads(tok.to_str())["model"]
    vocab = {t: i for i, t in enumerate(["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"]
                                         + [f"<0x{b:02X}>" for b in range(256)])}
    for piece in sorted(trained["vocab"], key=trained["vocab"].get):
        vocab.setdefault(piece, len(vocab))
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in trained["merges"]]
    transformers.GemmaTokenizer(vocab=vocab, merges=merges).save_pretrained(root)
    return root


@pytest.mark.parametrize("kind", ["wordpiece", "byte_level_bpe", "tokenizer_json", "gemma"])
def test_hf_tokenizer_files_read_as_transformers_reads_them(tmp_path, kind):
    transformers = pytest.importorskip("transformers")
    from jaxft.hf_tokenizer import HFTokenizer

    d = {"wordpiece": _wordpiece_dir, "byte_level_bpe": lambda: _byte_level_dir(tmp_path / "bpe"),
         "tokenizer_json": lambda: _chatml_dir(tmp_path / "chatml"),
         "gemma": lambda: _gemma_dir(tmp_path / "gemma")}[kind]()
    ours, ref = HFTokenizer(d), transformers.AutoTokenizer.from_pretrained(str(d))
    assert len(ours) == len(ref)
    for role in ("bos", "eos", "unk", "pad", "mask", "cls", "sep"):
        assert getattr(ours, f"{role}_token_id") == getattr(ref, f"{role}_token_id"), role
    for text in HF_TEXTS:
        ids = ours.encode(text)
        assert ids == ref.encode(text, add_special_tokens=False), text
        assert ours.decode(ids) == ref.decode(ids), text
    if kind == "gemma":  # the Chinese text really takes the byte fallback
        assert any(p.startswith("<0x") for p in ref.convert_ids_to_tokens(ours.encode(HF_TEXTS[2])))
    tok = Tokenizer(d)
    assert tok.encode(HF_TEXTS[0]) == ref.encode(HF_TEXTS[0], add_special_tokens=False)
    assert [tok.piece(i) for i in tok.encode(HF_TEXTS[0])] == ref.convert_ids_to_tokens(tok.encode(HF_TEXTS[0]))


def test_qwen2_vocabulary_files_split_words_as_qwen2_does(tmp_path):
    """A Qwen2 tokenizer saved as vocab.json + merges.txt (no tokenizer.json) reads as transformers'
    Qwen2Tokenizer builds it: NFC, then Qwen2's words (one mark of punctuation may open a word, "，我们";
    digits one by one), not GPT-2's. Before, GPT-2's split gave other ids for most Chinese sentences."""
    transformers = pytest.importorskip("transformers")
    from tokenizers import Regex, Tokenizer as RustTokenizer, models, normalizers, pre_tokenizers, trainers

    from jaxft.data.sources import ASSETS
    from jaxft.hf_tokenizer import HFTokenizer

    rows = json.loads((ASSETS / "alpaca_zh_demo" / "alpaca_zh_demo.json").read_text(encoding="utf-8"))
    texts = [r["instruction"] + "\n" + r["input"] + "\n" + r["output"] for r in rows]
    words = transformers.models.qwen2.tokenization_qwen2.PRETOKENIZE_REGEX
    tok = RustTokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(words), behavior="isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.train_from_iterator(texts[:300], trainers.BpeTrainer(vocab_size=2000, special_tokens=["<|endoftext|>"],
                                                             initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    d = tmp_path / "qwen2"
    d.mkdir()
    tok.model.save(str(d))  # vocab.json + merges.txt
    (d / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "Qwen2Tokenizer"}))
    ours, ref = HFTokenizer(d), transformers.AutoTokenizer.from_pretrained(str(d))
    assert type(ref).__name__ == "Qwen2Tokenizer" and len(ours) == len(ref)
    for text in texts[900:940] + ["价格１２３元，约合123.45美元！（含税）", "e\u0301 café 😀"]:
        ids = ours.encode(text)
        assert ids == ref.encode(text, add_special_tokens=False), text
        assert ours.decode(ids) == ref.decode(ids), text


def test_a_vocabulary_with_repeated_lines_reads_as_transformers_reads_it(tmp_path):
    """A BERT vocab.txt whose characters repeat (Chinese vocabularies extended by hand often hold a
    character twice): the token is its last line's id, as transformers' BertTokenizer (and the tokenizers
    library) read the file, not its first's; decoding and the vocabulary size agree too."""
    transformers = pytest.importorskip("transformers")
    from jaxft.hf_tokenizer import HFTokenizer

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "你", "好", "世", "界", "，", "好", "##好", "你", "。"]
    d = tmp_path / "bert"
    d.mkdir()
    (d / "vocab.txt").write_text("".join(t + "\n" for t in vocab), encoding="utf-8")
    (d / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "BertTokenizer", "do_lower_case": False}))
    ours, ref = HFTokenizer(d), transformers.AutoTokenizer.from_pretrained(str(d))
    assert len(ours) == len(ref)
    for text in ("你好，世界。", "好好你", "世界你好"):
        ids = ours.encode(text)
        assert ids == ref.encode(text, add_special_tokens=False), text
        assert 10 in ids or 12 in ids
        assert ours.decode(ids) == ref.decode(ids)
    assert [ours.id_to_token(i) for i in range(len(vocab))] == ref.convert_ids_to_tokens(list(range(len(vocab))))


def test_training_imports_no_transformers():
    """transformers is a test oracle only: the main job's modules and HF tokenizer files load without it."""
    code = ("import sys; sys.modules['transformers'] = None\n"
            "import jaxft.train, jaxft.evaluate, jaxft.generate\n"
            "from jaxft import hf\nfrom jaxft.tokenizer import Tokenizer\n"
            "t = Tokenizer(hf.resolve('jaxft-tiny-bert')); print(t.encode('a good movie'), t.bos, t.eos)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip().endswith("[2] [3]")  # [CLS], [SEP]


def test_files_read_as_utf8_under_a_gbk_locale(tmp_path, tok_dir):
    """On a machine whose locale is zh_CN.GBK (Chinese Linux servers), a SentencePiece directory whose
    tokenizer_config.json holds Chinese text (InternLM's chat template names 书生·浦语; transformers saves
    it unescaped) and a config.json with Chinese class names load as transformers loads them, as UTF-8.
    Before, the locale's GBK was used: a UnicodeDecodeError traceback."""
    import os
    import shutil

    transformers = pytest.importorskip("transformers")
    if not shutil.which("localedef"):
        pytest.skip("no localedef to build a zh_CN.GBK locale")
    locales = tmp_path / "locales"
    locales.mkdir()
    r = subprocess.run(["localedef", "-i", "zh_CN", "-f", "GBK", str(locales / "zh_CN.GBK")], capture_output=True)
    if not (locales / "zh_CN.GBK").exists():
        pytest.skip(f"cannot build a zh_CN.GBK locale: {r.stderr.decode(errors='replace').strip()[-200:]}")
    d = tmp_path / "tok"
    shutil.copytree(tok_dir, d)
    config = json.loads((d / "tokenizer_config.json").read_text(encoding="utf-8"))
    config["chat_template"] = "你是书生·浦语。{% for m in messages %}{{ m.content }}{% endfor %}"
    (d / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False), encoding="utf-8")
    cfg = transformers.LlamaConfig(vocab_size=300, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                   num_attention_heads=2, id2label={0: "负面", 1: "正面"})
    cfg.save_pretrained(d)
    (d / "config.json").write_text(json.dumps(cfg.to_dict(), ensure_ascii=False), encoding="utf-8")
    script = tmp_path / "load.py"  # a file: the locale would misread Chinese in a -c argument
    script.write_text(
        "import locale, pathlib, transformers\nfrom jaxft import hf\nfrom jaxft.tokenizer import Tokenizer\n"
        "assert locale.getpreferredencoding(False) == 'GBK'\n"
        f"d = pathlib.Path({str(d)!r})\nref = transformers.AutoTokenizer.from_pretrained(d)\ntok = Tokenizer(d)\n"
        "assert tok.vocab_size == len(ref) and tok.encode('好') == ref.encode('好', add_special_tokens=False)\n"
        "labels = transformers.AutoConfig.from_pretrained(d).id2label\n"
        "assert hf.read_config(d).labels == (labels[0], labels[1]) == ('负面', '正面')\n", encoding="utf-8")
    env = {**os.environ, "LOCPATH": str(locales), "LC_ALL": "zh_CN.GBK", "PYTHONUTF8": "0",
           "PYTHONIOENCODING": "utf-8"}
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, encoding="utf-8",
                       errors="replace", env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
