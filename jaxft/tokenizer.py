"""Tokenizers: SentencePiece models (ours and Llama's) directly, anything else through `transformers`.

`python -m jaxft.tokenizer --data=sst2 --vocab_size=4096 --out=DIR` trains the SentencePiece model
that jaxft-tiny uses (BPE with byte fallback, so any UTF-8 text, Chinese included, round-trips).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from jaxft.errors import JaxftError


class Tokenizer:
    """encode(text) -> ids without special tokens; bos/eos/pad ids; vocab_size.

    `bos_id` / `eos_id` are None where the tokenizer has no such token (Qwen2 has no BOS); `bos` and
    `eos` are then empty lists, so `tok.bos + ids + tok.eos` adds only the tokens that exist. `sep`
    separates the two texts of a pair: the tokenizer's separator token (BERT's [SEP]), else `eos`."""

    def __init__(self, path: str | Path):
        path = Path(path)
        self.directory = path if path.is_dir() else None  # where tokenizer_config.json (chat template) lives
        self._path = path
        sp_file = path / "tokenizer.model" if path.is_dir() else path
        if sp_file.suffix == ".model" and sp_file.exists():
            import sentencepiece as spm

            self._sp = spm.SentencePieceProcessor(model_file=str(sp_file))
            self.vocab_size = self._sp.get_piece_size()
            self.bos_id, self.eos_id = self._sp.bos_id(), self._sp.eos_id()
            pad = self._sp.pad_id()
            self.pad_id = pad if pad >= 0 else self.eos_id
            self.mask_id = None
            self._hf = None
            self._specials()
            return
        if not path.is_dir():
            raise JaxftError(f"tokenizer {str(path)!r}: no such directory or tokenizer.model file")
        try:
            from transformers import AutoTokenizer

            self._hf = AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)
        except Exception as e:
            raise JaxftError(f"tokenizer {str(path)!r}: could not be loaded ({e})") from None
        self._sp = None
        self.vocab_size = len(self._hf)
        self.bos_id, self.eos_id = self._hf.bos_token_id, self._hf.eos_token_id
        if self.bos_id is None and self.eos_id is None:  # BERT's WordPiece: [CLS] text [SEP]
            self.bos_id, self.eos_id = self._hf.cls_token_id, self._hf.sep_token_id
        self.mask_id = self._hf.mask_token_id  # BERT's [MASK], RoBERTa's <mask>: for data.task=masked_lm
        pad = self._hf.pad_token_id
        self.pad_id = pad if pad is not None else (self.eos_id if self.eos_id is not None else 0)
        self._specials()

    def _specials(self):
        """SentencePiece says -1 and transformers None for a missing special token: None for both."""
        self.bos_id = self.bos_id if self.bos_id is not None and self.bos_id >= 0 else None
        self.eos_id = self.eos_id if self.eos_id is not None and self.eos_id >= 0 else None
        if self.pad_id is None or self.pad_id < 0:
            self.pad_id = self.eos_id if self.eos_id is not None else 0
        self.bos = [self.bos_id] if self.bos_id is not None else []
        self.eos = [self.eos_id] if self.eos_id is not None else []
        # BERT-like tokenizers have no BOS/EOS but [CLS]/[SEP]: texts become [CLS] a [SEP] (b [SEP]).
        cls_id = getattr(self._hf, "cls_token_id", None) if self._hf is not None else None
        sep_id = getattr(self._hf, "sep_token_id", None) if self._hf is not None else None
        if not self.bos and cls_id is not None:
            self.bos = [cls_id]
        if not self.eos and sep_id is not None:
            self.eos = [sep_id]
        self.sep = [sep_id] if sep_id is not None else self.eos

    def encode(self, text: str) -> list[int]:
        if self._sp is not None:
            return self._sp.encode(text)
        return self._hf.encode(text, add_special_tokens=False)

    def encode_special(self, text: str) -> list[int]:
        """Like `encode`, but special-token strings in the text (`<s>`, `</s>`, a chat template's
        `<|im_end|>`) become their ids, as transformers' tokenizers read them."""
        if self._sp is None:
            return self._hf.encode(text, add_special_tokens=False)
        if not hasattr(self, "_special_split"):
            sp = self._sp
            self._special = {sp.id_to_piece(i): i for i in range(self.vocab_size)
                             if sp.is_control(i) or sp.is_unknown(i)}
            names = sorted(self._special, key=len, reverse=True)
            self._special_split = re.compile("(" + "|".join(map(re.escape, names)) + ")") if names else None
        if self._special_split is None:
            return self.encode(text)
        ids = []
        for part in self._special_split.split(text):
            if part in self._special:
                ids.append(self._special[part])
            elif part:
                ids += self.encode(part)
        return ids

    def files(self) -> list[Path]:
        """The files that define this tokenizer (for cache keys)."""
        if self.directory is None:
            return [self._path]
        names = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                 "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja")
        return [self.directory / n for n in names if (self.directory / n).is_file()]

    def piece(self, i: int) -> str:
        """The string of token `i` (e.g. '</s>' for EOS)."""
        return self._sp.id_to_piece(int(i)) if self._sp is not None else self._hf.convert_ids_to_tokens(int(i))

    def decode(self, ids) -> str:
        ids = [int(i) for i in ids]
        return self._sp.decode(ids) if self._sp is not None else self._hf.decode(ids)


def train_sentencepiece(texts, out_dir: str | Path, vocab_size: int) -> Path:
    """Deterministic BPE SentencePiece training; writes tokenizer.model + HF tokenizer_config.json."""
    import io

    import sentencepiece as spm

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(texts),
            model_writer=model,
            vocab_size=vocab_size,
            model_type="bpe",
            byte_fallback=True,
            character_coverage=0.9995,
            # No NFKC and no whitespace folding, as in Llama's own model and in what transformers'
            # LlamaTokenizer (no normalizer) does: text round-trips and the HF tokenizer gives the same ids.
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            unk_id=0,
            bos_id=1,
            eos_id=2,
            pad_id=3,
            input_sentence_size=0,
            shuffle_input_sentence=False,
            num_threads=1,
            minloglevel=2,
        )
    except RuntimeError as e:  # vocab_size too small for the characters or too large for the data, no text
        reason = str(e).strip().splitlines()[-1]
        raise JaxftError(f"sentencepiece training (vocab_size={vocab_size}): {reason}") from None
    (out / "tokenizer.model").write_bytes(model.getvalue())
    config = {
        "tokenizer_class": "LlamaTokenizer",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "pad_token": "<pad>",
        "add_bos_token": True,
        "add_eos_token": False,
        "legacy": False,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out


def main(argv=None):
    import argparse
    import sys

    from jaxft.data.sources import load_texts

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default="sst2", help="bundled dataset name or a local file")
    ap.add_argument("--field", default=None, help="text field (default: the dataset's)")
    ap.add_argument("--vocab_size", type=int, default=4096)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    try:
        texts = load_texts(args.data, args.field)
        out = train_sentencepiece(texts, args.out, args.vocab_size)
    except JaxftError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"wrote {out / 'tokenizer.model'} ({args.vocab_size} pieces from {len(texts)} texts)")


if __name__ == "__main__":
    main()
