"""Tokenizers: SentencePiece models (ours, Llama's, T5's) directly, HF tokenizer files through `tokenizers`.

`python -m jaxft.tokenizer --data=sst2 --vocab_size=4096 --out=DIR` trains the tokenizers of the
bundled models, deterministically (one thread, every text, in order), by `--kind`:
  sentencepiece  jaxft-tiny's: BPE with byte fallback (any UTF-8 text, Chinese included, round-trips);
  t5             jaxft-tiny-t5's: a unigram SentencePiece model as T5's (NFKC, whitespace folded, pad 0,
                 eos 1, unk 2, no bos) with byte fallback, plus the 100 sentinels `<extra_id_0..99>`
                 after it as T5Tokenizer numbers them (`<extra_id_0>` the last id);
  wordpiece      jaxft-tiny-bert's: BERT's uncased WordPiece (lowercase, accents stripped, punctuation
                 and each CJK character split off), vocab.txt as BertTokenizer reads it.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from jaxft.errors import ArgumentParser, JaxftError, read_json

# A directory holding one of these is a tokenizer jaxft reads: SentencePiece (Llama's name, T5's name),
# WordPiece (BERT), or a tokenizers JSON (GPT-2, Qwen2).
VOCABULARY_FILES = ("tokenizer.model", "spiece.model", "vocab.txt", "tokenizer.json")


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
        if not sp_file.exists() and path.is_dir() and (path / "spiece.model").exists():  # T5's file name
            sp_file = path / "spiece.model"
        if sp_file.suffix == ".model" and sp_file.exists():
            import sentencepiece as spm

            try:
                self._sp = spm.SentencePieceProcessor(model_file=str(sp_file))
            except (RuntimeError, OSError) as e:  # the C++ library's message: "could not parse ModelProto ..."
                raise JaxftError(f"{sp_file}: not a SentencePiece model ({str(e).strip()})") from None
            self._added = added_tokens(path, self._sp.get_piece_size()) if path.is_dir() else {}
            self._added_ids = {v: k for k, v in self._added.items()}
            self.vocab_size = self._sp.get_piece_size() + len(self._added)
            self.bos_id, self.eos_id = self._sp.bos_id(), self._sp.eos_id()
            self.unk_id = self._sp.unk_id()
            pad = self._sp.pad_id()
            self.pad_id = pad if pad >= 0 else self.eos_id
            self.mask_id = None
            self._hf = None
            self._specials()
            return
        if not path.is_dir():
            raise JaxftError(f"tokenizer {str(path)!r}: no such directory or tokenizer.model file")
        from jaxft.hf_tokenizer import HFTokenizer

        self._hf = HFTokenizer(path)
        self._sp = None
        self.vocab_size = len(self._hf)
        self.bos_id, self.eos_id = self._hf.bos_token_id, self._hf.eos_token_id
        if self.bos_id is None and self.eos_id is None:  # BERT's WordPiece: [CLS] text [SEP]
            self.bos_id, self.eos_id = self._hf.cls_token_id, self._hf.sep_token_id
        self.mask_id = self._hf.mask_token_id  # BERT's [MASK], RoBERTa's <mask>: for data.task=masked_lm
        self.unk_id = self._hf.unk_token_id
        pad = self._hf.pad_token_id
        self.pad_id = pad if pad is not None else (self.eos_id if self.eos_id is not None else 0)
        self._specials()

    def _specials(self):
        """SentencePiece says -1 and `tokenizers` None for a missing special token: None for both."""
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
        return self._hf.encode(text)

    def token_id(self, piece: str) -> int | None:
        """The id of a token string (`<extra_id_0>`, `[MASK]`), None where the vocabulary lacks it."""
        if self._sp is not None:
            if piece in self._added:
                return self._added[piece]
            i = self._sp.piece_to_id(piece)
            return i if self._sp.id_to_piece(i) == piece else None
        return self._hf.token_to_id(piece)

    def is_special(self, i: int) -> bool:
        """Whether id `i` is a special token (a role or control token, a chat template's `<|im_end|>`), not text."""
        if self._sp is None:
            return self._hf.is_special(i)
        return i in self._added_ids or self._sp.is_control(i) or self._sp.is_unknown(i)

    def sentinels(self, n: int) -> list[int]:
        """T5's span-corruption sentinels `<extra_id_0>` ... `<extra_id_{n-1}>`, as ids."""
        ids = [self.token_id(f"<extra_id_{i}>") for i in range(n)]
        if None in ids:
            raise JaxftError(f"tokenizer {str(self._path)!r}: no sentinel token <extra_id_{ids.index(None)}> "
                             f"(expected T5's <extra_id_0..{n - 1}>)")
        return ids

    def encode_special(self, text: str) -> list[int]:
        """Like `encode`, but special-token strings in the text (`<s>`, `</s>`, a chat template's
        `<|im_end|>`) become their ids, as transformers' tokenizers read them."""
        if self._sp is None:
            return self._hf.encode(text)
        if not hasattr(self, "_special_split"):
            sp = self._sp
            self._special = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())
                             if sp.is_control(i) or sp.is_unknown(i)}
            self._special.update(self._added)
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
        names = (*VOCABULARY_FILES, "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
                 "added_tokens.json", "chat_template.jinja")
        return [self.directory / n for n in names if (self.directory / n).is_file()]

    def piece(self, i: int) -> str:
        """The string of token `i` (e.g. '</s>' for EOS)."""
        if self._sp is not None:
            return self._added_ids[int(i)] if int(i) in self._added_ids else self._sp.id_to_piece(int(i))
        return self._hf.id_to_token(int(i))

    def decode(self, ids) -> str:
        ids = [int(i) for i in ids]
        if self._sp is None:
            return self._hf.decode(ids)
        out, run = [], []
        for i in ids + [None]:  # added tokens (T5's sentinels) are not SentencePiece pieces: decode the runs between
            if i is not None and i not in self._added_ids:
                run.append(i)
                continue
            if run:  # a run after a sentinel keeps its leading space (SentencePiece drops it at the start)
                space = " " if out and self._sp.id_to_piece(run[0]).startswith("\u2581") else ""
                out.append(space + self._sp.decode(run))
                run = []
            if i is not None:
                out.append(self._added_ids[i])
        return "".join(out)


def added_tokens(directory: Path, sp_size: int) -> dict[str, int]:
    """Tokens a SentencePiece directory's tokenizer_config.json adds after the model's pieces: its
    `added_tokens_decoder` entries with ids >= `sp_size`, else T5's `extra_ids` sentinels numbered as
    T5Tokenizer does (`<extra_id_0>` = sp_size + extra_ids - 1, down to `<extra_id_{n-1}>` = sp_size)."""
    file = directory / "tokenizer_config.json"
    if not file.is_file():
        return {}
    c = read_json(file)
    decoder = c.get("added_tokens_decoder") or {}
    added = {v["content"]: int(k) for k, v in decoder.items() if int(k) >= sp_size}
    if not added and int(c.get("extra_ids") or 0) > 0:
        n = int(c["extra_ids"])
        added = {f"<extra_id_{i}>": sp_size + n - 1 - i for i in range(n)}
    if added and sorted(added.values()) != list(range(sp_size, sp_size + len(added))):
        raise JaxftError(f"{file}: added tokens have ids {sorted(added.values())[:3]}..., expected {sp_size}, "
                         f"{sp_size + 1}, ... after the model's {sp_size} pieces")
    return added


def train_sentencepiece(texts, out_dir: str | Path, vocab_size: int) -> Path:
    """Deterministic BPE SentencePiece training; writes tokenizer.model + HF tokenizer_config.json."""
    import io

    import sentencepiece as spm

    out = Path(out_dir)
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
    out.mkdir(parents=True, exist_ok=True)  # only now: a failed training leaves no empty directory
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


T5_EXTRA_IDS = 100  # T5's sentinels <extra_id_0..99>
BERT_SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")  # ids 0-4 (bert-base-uncased: 0, 100-103)


def train_t5(texts, out_dir: str | Path, vocab_size: int) -> Path:
    """Deterministic unigram SentencePiece training in T5's layout; writes spiece.model + tokenizer_config.json.

    `vocab_size` counts the model's pieces; the 100 sentinels come after them (the HF vocabulary is
    vocab_size + 100). NFKC and whitespace folding as T5's own model, so transformers' T5Tokenizer
    (a unigram model with whitespace split and T5's normalizer) gives the same ids; byte fallback
    makes any text encodable here, where T5Tokenizer (no byte fallback) says <unk> for a character
    the vocabulary lacks."""
    import io

    import sentencepiece as spm

    out = Path(out_dir)
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(texts), model_writer=model, vocab_size=vocab_size, model_type="unigram",
            byte_fallback=True, character_coverage=0.9995, normalization_rule_name="nmt_nfkc",
            pad_id=0, eos_id=1, unk_id=2, bos_id=-1, input_sentence_size=0, shuffle_input_sentence=False,
            num_threads=1, minloglevel=2)
    except RuntimeError as e:
        reason = str(e).strip().splitlines()[-1]
        raise JaxftError(f"sentencepiece training (vocab_size={vocab_size}): {reason}") from None
    out.mkdir(parents=True, exist_ok=True)  # only now: a failed training leaves no empty directory
    (out / "spiece.model").write_bytes(model.getvalue())
    flags = {"lstrip": False, "normalized": False, "rstrip": False, "single_word": False, "special": True}
    added = {str(vocab_size + T5_EXTRA_IDS - 1 - i): {"content": f"<extra_id_{i}>", **flags}
             for i in range(T5_EXTRA_IDS)}
    config = {"tokenizer_class": "T5Tokenizer", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>",
              "extra_ids": T5_EXTRA_IDS, "additional_special_tokens": [f"<extra_id_{i}>" for i in range(T5_EXTRA_IDS)],
              "added_tokens_decoder": dict(sorted(added.items(), key=lambda kv: int(kv[0]))),
              "model_max_length": 512, "legacy": False}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out


def train_wordpiece(texts, out_dir: str | Path, vocab_size: int, limit_alphabet: int = 2500) -> Path:
    """Deterministic WordPiece training as BERT's uncased tokenizer; writes vocab.txt + tokenizer_config.json.

    Words as BertTokenizer sees them (the `tokenizers` library's BERT normalizer and pre-tokenizer:
    lowercase, accents stripped, control characters dropped, each CJK character its own word, split
    on whitespace and punctuation), then `wordpiece_merges`. `limit_alphabet` keeps the most
    frequent characters (the rest read as [UNK]): Chinese text alone has thousands."""
    from tokenizers import normalizers, pre_tokenizers

    if vocab_size <= len(BERT_SPECIALS):
        raise JaxftError(f"wordpiece vocab_size={vocab_size}: expected more than its {len(BERT_SPECIALS)} special tokens")
    normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True, lowercase=True)
    split = pre_tokenizers.BertPreTokenizer()
    counts: dict[str, int] = {}
    for text in texts:
        for word, _ in split.pre_tokenize_str(normalizer.normalize_str(text)):
            counts[word] = counts.get(word, 0) + 1
    vocab = list(BERT_SPECIALS) + wordpiece_merges(counts, vocab_size - len(BERT_SPECIALS), limit_alphabet)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.txt").write_text("".join(t + "\n" for t in vocab), encoding="utf-8")
    config = {"tokenizer_class": "BertTokenizer", "do_lower_case": True, "tokenize_chinese_chars": True,
              "strip_accents": None, "unk_token": "[UNK]", "sep_token": "[SEP]", "pad_token": "[PAD]",
              "cls_token": "[CLS]", "mask_token": "[MASK]", "model_max_length": 512}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out


def wordpiece_merges(counts: dict[str, int], size: int, limit_alphabet: int, min_frequency: int = 2) -> list[str]:
    """`size` WordPiece tokens learned from word counts as the `tokenizers` library's WordPieceTrainer
    learns them (BPE over characters, a word's later characters prefixed `##`, the most frequent pair
    merged first), but with ties broken by the pair's text, so the result does not depend on hash
    order (the library's does). The alphabet first (the `limit_alphabet` most frequent characters,
    then their `##` forms), then the merges in order."""
    import heapq

    chars: dict[str, int] = {}
    for w, n in counts.items():
        for c in w:
            chars[c] = chars.get(c, 0) + n
    alphabet = set(sorted(chars, key=lambda c: (-chars[c], c))[:limit_alphabet])
    words = [([w[0]] + ["##" + c for c in w[1:]], n) for w, n in sorted(counts.items())
             if all(c in alphabet for c in w)]
    first = {w[0] for w, _ in words}
    later = {s for w, _ in words for s in w[1:]}
    tokens = sorted(first, key=lambda c: (-chars[c], c)) + sorted(later, key=lambda s: (-chars[s[2:]], s))
    pairs: dict[tuple[str, str], int] = {}
    where: dict[tuple[str, str], set[int]] = {}
    for k, (w, n) in enumerate(words):
        for p in zip(w, w[1:]):
            pairs[p] = pairs.get(p, 0) + n
            where.setdefault(p, set()).add(k)
    heap = [(-n, p) for p, n in pairs.items()]
    heapq.heapify(heap)
    known = set(tokens)
    while len(tokens) < size and heap:
        neg, p = heapq.heappop(heap)
        if pairs.get(p, 0) != -neg:  # stale entry
            continue
        if -neg < min_frequency:
            break
        merged = p[0] + p[1][2:]
        if merged not in known:
            tokens.append(merged)
            known.add(merged)
        changed = set()
        for k in sorted(where.pop(p, ())):
            w, n = words[k]
            for q in zip(w, w[1:]):  # take the word's pairs out, merge, put them back
                pairs[q] -= n
                changed.add(q)
            out, i = [], 0
            while i < len(w):
                if i + 1 < len(w) and (w[i], w[i + 1]) == p:
                    out.append(merged)
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            words[k] = (out, n)
            for q in zip(out, out[1:]):
                pairs[q] = pairs.get(q, 0) + n
                where.setdefault(q, set()).add(k)
                changed.add(q)
        pairs.pop(p, None)
        for q in changed:
            if pairs.get(q, 0) > 0:
                heapq.heappush(heap, (-pairs[q], q))
    return tokens[:size]


TRAIN = {"sentencepiece": (train_sentencepiece, "tokenizer.model"), "t5": (train_t5, "spiece.model"),
         "wordpiece": (train_wordpiece, "vocab.txt")}


def main(argv=None):
    import sys

    from jaxft.data.sources import load_texts

    ap = ArgumentParser(prog="python -m jaxft.tokenizer", description=__doc__.split("\n")[0])
    ap.add_argument("--data", default="sst2", help="bundled dataset name or a local file")
    ap.add_argument("--field", default=None, help="text field (default: the dataset's)")
    ap.add_argument("--vocab_size", type=int, default=4096)
    ap.add_argument("--kind", choices=sorted(TRAIN), default="sentencepiece",
                    help="sentencepiece (jaxft-tiny), t5 (jaxft-tiny-t5) or wordpiece (jaxft-tiny-bert)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    train, name = TRAIN[args.kind]
    try:
        if args.vocab_size <= 0:
            raise JaxftError(f"--vocab_size={args.vocab_size}: expected a positive integer")
        from jaxft import storage

        storage.check_writable_dir(storage.path(args.out, "--out"), "--out")
        texts = load_texts(args.data, args.field)
        if not any(t.strip() for t in texts):
            raise JaxftError(f"--data={args.data}: no text to train on (every text is empty)")
        out = train(texts, args.out, args.vocab_size)
    except JaxftError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"wrote {out / name} ({args.kind}, {args.vocab_size} tokens from {len(texts)} texts)")


if __name__ == "__main__":
    main()
