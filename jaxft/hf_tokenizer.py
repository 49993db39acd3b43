"""Hugging Face tokenizer directories read with the `tokenizers` library alone (no `transformers` at run time).

A directory holds `tokenizer.json` (Llama 3, Qwen2, GPT-2 as saved by recent transformers), or the
older vocabulary files: `vocab.txt` (BERT's WordPiece) or `vocab.json` + `merges.txt` (GPT-2's,
RoBERTa's and Qwen2's byte-level BPE). Which token is BOS, EOS, PAD, [CLS], [SEP], [MASK] comes from
`tokenizer_config.json` and `special_tokens_map.json`, with the defaults of the `tokenizer_class`
it names where a role is not written down, as transformers fills them in. Ids, texts and decoding
equal transformers' own tokenizers (tests/test_tokenizer.py checks each kind against them).
"""

from __future__ import annotations

from pathlib import Path

from jaxft.errors import JaxftError, read_json

ROLES = ("bos", "eos", "unk", "pad", "mask", "cls", "sep")

# The roles a tokenizer class fills in when its files leave them out (transformers' __init__ defaults).
_BERT = {"unk": "[UNK]", "sep": "[SEP]", "pad": "[PAD]", "cls": "[CLS]", "mask": "[MASK]"}
_ROBERTA = {"bos": "<s>", "eos": "</s>", "sep": "</s>", "cls": "<s>", "unk": "<unk>", "pad": "<pad>", "mask": "<mask>"}
_GPT2 = {"bos": "<|endoftext|>", "eos": "<|endoftext|>", "unk": "<|endoftext|>"}
CLASS_DEFAULTS = {
    "Bert": _BERT, "DistilBert": _BERT, "Electra": _BERT,
    "Roberta": _ROBERTA, "Camembert": _ROBERTA, "XLMRoberta": _ROBERTA,
    "GPT2": _GPT2,
    "Llama": {"bos": "<s>", "eos": "</s>", "unk": "<unk>"},
    "Qwen2": {"eos": "<|endoftext|>", "unk": "<|endoftext|>", "pad": "<|endoftext|>"},
}


def _read_json(path: Path) -> dict:
    return read_json(path) if path.is_file() else {}


def _content(value) -> str | None:
    """A special token as the config files write it: a string or an AddedToken dict."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


class HFTokenizer:
    """The parts of a transformers tokenizer jaxft uses: encode without special tokens, decode, the
    role tokens' ids (`bos_token_id` ... `sep_token_id`, None where absent), token <-> id."""

    def __init__(self, path: str | Path):
        from tokenizers import AddedToken, Tokenizer

        path = Path(path)
        config = _read_json(path / "tokenizer_config.json")
        special = _read_json(path / "special_tokens_map.json")
        kind = str(config.get("tokenizer_class") or "").removesuffix("Fast").removesuffix("Tokenizer")
        built = not (path / "tokenizer.json").is_file()  # from vocabulary files, without its special tokens
        if not built:
            try:
                self._tok = Tokenizer.from_file(str(path / "tokenizer.json"))
            except Exception as e:  # the Rust library's own message
                raise JaxftError(f"{path / 'tokenizer.json'}: could not be read ({e})") from None
        elif (path / "vocab.txt").is_file():
            kind = kind or "Bert"
            self._tok = _wordpiece(path / "vocab.txt", config)
        elif (path / "vocab.json").is_file() and (path / "merges.txt").is_file():
            kind = kind or "GPT2"
            self._tok = _byte_level_bpe(path, config, kind)
        else:
            raise JaxftError(f"tokenizer {str(path)!r}: no tokenizer.model (SentencePiece), tokenizer.json, vocab.txt or "
                            "vocab.json + merges.txt")
        defaults = CLASS_DEFAULTS.get(kind, {})
        self.tokens = {}
        for role in ROLES:
            key = f"{role}_token"
            value = config[key] if key in config else special.get(key, defaults.get(role))
            self.tokens[role] = _content(value)
        # Special tokens are matched whole in text, never split. A tokenizer.json holds its own; a tokenizer
        # built from vocabulary files marks the role and added tokens so, adding those its vocabulary lacks.
        added = [_content(v) for v in (config.get("added_tokens_decoder") or {}).values()]
        marked = [t for t in dict.fromkeys([*self.tokens.values(), *added])
                   if t and (built or self._tok.token_to_id(t) is None)]
        if marked:
            self._tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in marked])
        for role in ROLES:
            setattr(self, f"{role}_token_id", self.token_to_id(self.tokens[role]) if self.tokens[role] else None)
        self.clean_up_spaces = bool(config.get("clean_up_tokenization_spaces", False))

    def __len__(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, i: int) -> str | None:
        return self._tok.id_to_token(int(i))

    def is_special(self, i: int) -> bool:
        token = self._tok.get_added_tokens_decoder().get(int(i))
        return token is not None and token.special

    def decode(self, ids: list[int]) -> str:
        text = self._tok.decode(ids, skip_special_tokens=False)
        if self.clean_up_spaces and type(self._tok.model).__name__ != "BPE":  # transformers skips it for BPE
            for a, b in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                         (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
                text = text.replace(a, b)
        return text


def _wordpiece(vocab_file: Path, config: dict):
    """BERT's WordPiece from vocab.txt, as transformers' BertTokenizer builds it."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers

    lines = vocab_file.read_text(encoding="utf-8").split("\n")
    if lines and lines[-1] == "":
        lines = lines[:-1]
    vocab = {}
    for i, token in enumerate(lines):  # a token on several lines is its last line's, as transformers reads it
        vocab[token.rstrip("\r")] = i
    unk = _content(config.get("unk_token", "[UNK]")) or "[UNK]"
    tok = Tokenizer(models.WordPiece(vocab, unk_token=unk))
    tok.normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=bool(config.get("tokenize_chinese_chars", True)),
        strip_accents=config.get("strip_accents"), lowercase=bool(config.get("do_lower_case", True)))
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix="##")
    return tok


# Qwen2Tokenizer's words (transformers' PRETOKENIZE_REGEX), not GPT-2's: a word may open with one mark of
# punctuation ("，我们"), and digits are words of one digit each.
QWEN2_WORDS = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|"""
               r"""\s+(?!\S)|\s+""")


def _byte_level_bpe(path: Path, config: dict, kind: str = "GPT2"):
    """GPT-2's / RoBERTa's byte-level BPE from vocab.json + merges.txt; Qwen2's (`kind`) splits words by its
    own pattern after NFC, as transformers' Qwen2Tokenizer builds it from these files."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

    vocab = _read_json(path / "vocab.json")
    merges = [tuple(line.split(" ")) for line in (path / "merges.txt").read_text(encoding="utf-8").split("\n")
              if line and not line.startswith("#version")]
    tok = Tokenizer(models.BPE(vocab, merges, dropout=None, continuing_subword_prefix="", end_of_word_suffix="",
                               fuse_unk=False))
    prefix_space = bool(config.get("add_prefix_space", False))
    if kind == "Qwen2":
        tok.normalizer = normalizers.NFC()
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(QWEN2_WORDS), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=prefix_space, use_regex=False)])
    else:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=prefix_space)
    tok.decoder = decoders.ByteLevel()
    return tok
