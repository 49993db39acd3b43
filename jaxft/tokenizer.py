"""Tokenizers: SentencePiece models (ours and Llama's) directly, anything else through `transformers`.

`python -m jaxft.tokenizer --data=sst2 --vocab_size=4096 --out=DIR` trains the SentencePiece model
that jaxft-tiny uses (BPE with byte fallback, so any UTF-8 text, Chinese included, round-trips).
"""

from __future__ import annotations

import json
from pathlib import Path

from jaxft.errors import JaxftError


class Tokenizer:
    """encode(text) -> ids without special tokens; bos/eos/pad ids; vocab_size.

    `bos_id` / `eos_id` are None where the tokenizer has no such token (Qwen2 has no BOS); `bos` and
    `eos` are then empty lists, so `tok.bos + ids + tok.eos` adds only the tokens that exist."""

    def __init__(self, path: str | Path):
        path = Path(path)
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

    def encode(self, text: str) -> list[int]:
        if self._sp is not None:
            return self._sp.encode(text)
        return self._hf.encode(text, add_special_tokens=False)

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
