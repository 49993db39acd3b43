"""Records -> fixed-shape numpy arrays, so the train step compiles once.

classification: [BOS] text [EOS] right-padded to seq_len, plus `labels` (BOS and EOS where the
                tokenizer has them: Qwen2's has no BOS). A sentence pair (premise, hypothesis) is
                [BOS] text [SEP] pair [EOS], SEP being the tokenizer's separator (BERT's [SEP]) or
                else its EOS; with `token_type_ids`, 0 up to the SEP and 1 after it, as BERT's.
causal_lm:      texts joined with BOS/EOS and cut into seq_len blocks (packing, no padding); a text
                that is a list of segments becomes BOS seg1 EOS seg2 EOS ...; with `segments`, each
                block's `segment_ids` number its documents so attention stays within each.
masked_lm:      packed as causal_lm ([CLS] text [SEP] for BERT), then BERT's masking (`mask_tokens`, redrawn
                for every training batch): `input_ids` masked, `mlm_labels` the original tokens at the
                targets, -100 elsewhere, `mlm_positions` the targets' positions.
sft:            see `jaxft.data.sft` (instruction data, chat templates, loss masks, packing).
dpo:            see `jaxft.data.preference` (chosen and rejected answers to one prompt, padded).
seq2seq:        see `jaxft.data.seq2seq` (source -> target pairs for encoder-decoders such as T5).
Every array set carries `weight` (1 for a real example) so padded eval batches count nothing.
"""

from __future__ import annotations

import dataclasses
import math
import re

import numpy as np

from jaxft.data import preference, seq2seq
from jaxft.data.embeddings import nearest
from jaxft.data.sft import Fields, detect as detect_sft
from jaxft.data.sources import BUNDLED, Records, field
from jaxft.errors import JaxftError


def choose_task(task: str, records: Records, source: str, text_field: str, label_field: str | None,
                label_given: bool, sft_fields: Fields = Fields(), encoder_decoder: bool = False) -> str:
    """`data.task`, else what the data says when it says it unambiguously: classification when the label
    column is there (token_classification when it holds lists, `tagged_fields`), dpo for preference pairs
    (`chosen` and `rejected`), sft for instruction, chat or source/target records (`jaxft.data.sft.detect`) -- or,
    for an encoder-decoder model (`encoder_decoder`), seq2seq for Alpaca and source/target records
    (`jaxft.data.seq2seq.detect`) --, causal_lm when the text column is the only one. A label column
    under another name must not turn a classification run into a language model of the text, so
    anything else is an error."""
    columns = list(records.rows[0]) if records.rows else []
    found = f"columns found: {', '.join(map(str, columns)) or 'none'}"
    if not task and tagged_fields(records, text_field, label_field, True, label_given):
        return "token_classification"  # the tags' column holds lists: a tag per word
    if task in ("classification", "cloze") or (not task and label_given):
        kind = task or "classification"
        if not label_field:
            raise JaxftError(f"data.name={source!r}: no label field for {kind}: set data.label_field ({found})")
        if label_field not in columns:
            raise JaxftError(f"data.name={source!r}: no label column {label_field!r} for {kind} ({found}); "
                             f"set data.label_field")
        return kind
    if task:
        return task
    if preference.detect(records):
        return "dpo"
    if encoder_decoder and seq2seq.detect(records, sft_fields):
        return "seq2seq"
    if detect_sft(records, sft_fields):
        if encoder_decoder:  # chat or ShareGPT: several turns, not one source -> target pair
            raise JaxftError(f"data.name={source!r}: chat records (messages / conversations) have several turns; an "
                             "encoder-decoder model trains on source -> target pairs: Alpaca records, or "
                             f"data.source_field and data.target_field naming two of the columns ({found})")
        return "sft"
    if label_field is None or not columns:  # a source without labels by definition (c4_demo)
        return "causal_lm"
    if label_field in columns:
        return "classification"
    if set(columns) <= {text_field}:
        return "causal_lm"
    raise JaxftError(f"data.name={source!r}: data.task is empty and there is no {label_field!r} column ({found}): set "
                     f"data.task=classification with data.label_field=COLUMN, or data.task=causal_lm")


def _text(records: Records, i: int, name: str) -> str:
    t = field(records, i, name)
    if not isinstance(t, str):
        raise JaxftError(f"{records.where[i]}: field {name!r} is {type(t).__name__}, expected text")
    return t


def _label(v):
    """Integer-like strings ("0", " 1", "-2") are integers; ASCII digits only, so int() cannot fail."""
    return int(v) if isinstance(v, str) and re.fullmatch(r"\s*-?[0-9]+\s*", v) else v


def label_vocab(records: Records, label_field: str) -> list:
    """Sorted distinct labels; integers 0..C-1 keep their meaning."""
    values = []
    for i in range(len(records.rows)):
        v = _label(field(records, i, label_field))
        if not isinstance(v, (int, str)) or isinstance(v, bool):
            raise JaxftError(f"{records.where[i]}: label {v!r} is {type(v).__name__}, expected an integer or a string")
        if isinstance(v, str) and not v.strip():  # a missing value in a CSV: it would become a class of its own
            raise JaxftError(f"{records.where[i]}: label field {label_field!r} is empty, expected a label")
        values.append(v)
    kinds = {type(v) for v in values}
    if len(kinds) > 1:
        other = next(i for i, v in enumerate(values) if type(v) is not type(values[0]))
        raise JaxftError(f"{records.where[other]}: label {values[other]!r} is {type(values[other]).__name__}, but "
                         f"{records.where[0]} has {values[0]!r}: labels mix integers and strings")
    distinct = sorted(set(values))
    seen = {}
    for i, v in enumerate(values):  # "pos" and "pos " would be two classes
        if isinstance(v, str) and seen.setdefault(v.strip(), v) != v:
            raise JaxftError(f"{records.where[i]}: label {v!r} differs from {seen[v.strip()]!r} only in white space: "
                             "expected one spelling per label")
    return distinct


def declared_labels(value) -> list:
    """data.labels ("neg,pos", or a list) -> the labels in their order; [] = none declared (the training
    set's are used). Integer-like entries are integers, as the data's labels are."""
    if isinstance(value, str):
        if not value.strip():
            return []
        items = [v.strip() for v in value.split(",")]
    else:
        items = list(value or [])
    labels = [_label(v) for v in items]
    if any(v == "" for v in labels):
        raise JaxftError(f"data.labels={value!r}: an empty label: expected labels separated by commas, e.g. 'neg,pos'")
    for v in labels:
        if isinstance(v, bool) or not isinstance(v, (int, str)):
            raise JaxftError(f"data.labels={value!r}: label {v!r} is {type(v).__name__}, "
                             "expected an integer or a string")
    if len({type(v) for v in labels}) > 1:
        raise JaxftError(f"data.labels={value!r}: labels mix integers and strings (a data set's labels are one or "
                         "the other)")
    dup = next((v for k, v in enumerate(labels) if v in labels[:k]), None)
    if dup is not None:
        raise JaxftError(f"data.labels={value!r}: label {dup!r} is named twice: expected each label once")
    if len(labels) < 2:
        raise JaxftError(f"data.labels={value!r}: one label: expected at least 2 classes")
    return labels


def check_labels(records: Records, label_field: str, labels: list, declared: bool) -> None:
    """Every record's label is one of `labels`: data.labels if `declared`, else the training set's (an eval
    label never seen in training is a class the model cannot predict: every such example would count wrong)."""
    known = set(labels)
    for i in range(len(records.rows)):
        v = _label(field(records, i, label_field))
        if isinstance(v, (int, str)) and not isinstance(v, bool) and v in known:
            continue
        if declared:
            raise JaxftError(f"{records.where[i]}: label {v!r} is not one of data.labels: expected one of {labels}")
        raise JaxftError(f"{records.where[i]}: label {v!r} never occurs in the training set, whose labels are "
                         f"{labels}: the model could never predict it (data.labels declares the label set)")


def class_index(records: Records, i: int, label_field: str, index: dict) -> int:
    """Record i's label as its class number (`index`: label -> number, the training labels')."""
    v = _label(field(records, i, label_field))
    if v not in index:
        raise JaxftError(f"{records.where[i]}: label {v!r} is not one of the training labels {list(index)}")
    return index[v]


def classification(records: Records, tok, seq_len: int, text_field: str, label_field: str, labels: list,
                   text_pair_field: str | None = None, token_type_ids: bool = False, template=None):
    """-> (arrays, number of truncated examples). A single text too long for `seq_len` loses its end; a
    pair is cut as HF's (fast) tokenizers do with `truncation="longest_first"`: the shorter text keeps
    up to half the room (the first text counts as the shorter on a tie), the longer one the rest.
    `template`: (ids before, ids after) the text, BOS and EOS included (a P-Tuning template rendered
    by `jaxft.peft.prompt.render`); the text is cut to fit between them."""
    n = len(records.rows)
    ids = np.full((n, seq_len), tok.pad_id, np.int32)
    mask = np.zeros((n, seq_len), np.int32)
    types = np.zeros((n, seq_len), np.int32)
    y = np.zeros((n,), np.int32)
    index = {v: k for k, v in enumerate(labels)}
    sep = getattr(tok, "sep", None) or tok.eos
    truncated = 0
    for i in range(n):
        a = tok.encode(_text(records, i, text_field))
        b = tok.encode(_text(records, i, text_pair_field)) if text_pair_field else None
        if template is not None:
            if b is not None:
                raise JaxftError("method.template: supported for single-text classification (this data has pairs)")
            room = max(seq_len - len(template[0]) - len(template[1]), 0)
            truncated += len(a) > room
            first = toks = (list(template[0]) + a[:room] + list(template[1]))[:seq_len]
        elif b is None:
            first = toks = tok.bos + a + tok.eos
            if len(toks) > seq_len:
                truncated += 1
                toks = toks[: seq_len - len(tok.eos)] + tok.eos
        else:
            room = max(seq_len - len(tok.bos) - len(sep) - len(tok.eos), 0)
            truncated += len(a) + len(b) > room
            a, b = fit_pair(a, b, room)
            first = tok.bos + a + sep
            toks = (first + b + tok.eos)[:seq_len]
        ids[i, : len(toks)] = toks
        mask[i, : len(toks)] = 1
        types[i, len(first) : len(toks)] = 1
        y[i] = class_index(records, i, label_field, index)
    arrays = {"input_ids": ids, "attention_mask": mask, "labels": y, "weight": np.ones((n,), np.float32)}
    if token_type_ids:
        arrays["token_type_ids"] = types
    return arrays, truncated


def fit_pair(a: list, b: list, room: int) -> tuple[list, list]:
    """Two texts cut to `room` tokens together as HF's `truncation="longest_first"` does: the shorter
    keeps up to half the room (the first counts as the shorter on a tie), the longer one the rest."""
    keep = fit_texts([len(a), len(b)], room)
    return a[: keep[0]], b[: keep[1]]


def fit_texts(lengths: list[int], room: int) -> list[int]:
    """How many tokens each text keeps so that they fit `room` together, longest first (HF's
    `longest_first` for a pair, generalised): every text keeps min(its length, c) for the largest such
    c, and the tokens left over go one each to the longest texts that were cut (a later text on a tie)."""
    if sum(lengths) <= room:
        return list(lengths)
    low, high = 0, max(lengths)  # the largest c that fits: sum(min(n, c)) grows with c
    while low < high:
        mid = (low + high + 1) // 2
        low, high = (mid, high) if sum(min(n, mid) for n in lengths) <= room else (low, mid - 1)
    c = low
    keep = [min(n, c) for n in lengths]
    left = room - sum(keep)
    for i in sorted((i for i, n in enumerate(lengths) if n > c), key=lambda i: (-lengths[i], -i))[:left]:
        keep[i] += 1
    return keep


CLOZE_SLOT = re.compile(r"\{(\w*)\}")


@dataclasses.dataclass(frozen=True)
class Demonstrations:
    """LM-BFF's demonstrations (Gao et al. 2021): `per_class` training examples of every class, the
    template filled with their label word, put beside each input; drawn for row i of a split from
    (seed, split, i), from `pool` (the training records), never the row itself when it is one of them.
    `separator`: text between the segments ("" = a masked LM's separator token, a space on a causal LM).
    `draw`: which of independent sets (LM-BFF's ensemble at evaluation, `jaxft.evaluate
    --demonstration_sets`): draw 0 is the one training and its evaluation show, each other one its own.
    `embed` (LM-BFF's demonstration filter, section 6.2): records -> their sentence embeddings
    (`jaxft.data.embeddings.embed`); a row's demonstrations of class c then come from the max(per_class,
    floor(`keep` x n)) of its n candidates of class c nearest it by cosine (ties: the lower index)."""
    per_class: int
    pool: Records
    seed: int = 0
    separator: str = ""
    draw: int = 0
    keep: float = 1.0
    embed: object = dataclasses.field(default=None, compare=False, repr=False)
    # The pool's classes by (label field, labels) and its texts' tokens, shared by every draw
    # (`dataclasses.replace` keeps it): redrawn each batch, the demonstrations of 32 rows would otherwise
    # read all 60k of SST-2's labels, and tokenize the same texts again and again.
    cache: dict = dataclasses.field(default_factory=dict, compare=False, repr=False)


def cloze(records: Records, tok, seq_len: int, text_field: str, label_field: str, labels: list, template: str,
          verbalizer: str, text_pair_field: str | None = None, token_type_ids: bool = False, causal: bool = False,
          demonstrations: Demonstrations | None = None, which=None):
    """PET's cloze form (Schick & Schuetze 2021): each text put into `template` ("{text} it was {mask} .";
    "{text_b}" places a pair's second text), BOS/[CLS] before and EOS/[SEP] after; the literal parts
    are tokenized on their own, joined as the whole text would be. Each label has a word (`verbalizer`,
    comma-separated, in `labels`' order): the class is the word the model puts at the mask. Texts too
    long lose their end (longest first); the template stays whole. -> (arrays, truncated):
    classification's arrays plus `mlm_positions` (where the answer is read) and `verbalizer` (the
    words' ids), in one of two layouts:

    - every word one token: rows [N, L], `mlm_positions` [N, 1], `verbalizer` [N, C]; the class
      logits are the words' logits at the mask.
    - a word of several tokens (PET's multi-token verbalizers; a Chinese word of several characters):
      the class logit is the sum of the word's tokens' log-probabilities, `verbalizer` [N, C, K]
      (K the longest word, -1 after a shorter one's end). On a masked LM whose words are all K tokens
      long, the mask is K [MASK]s and one row [N, L] serves every class (`mlm_positions` [N, K]);
      otherwise each class has its own row, [N, C, L] with `mlm_positions` [N, C, K]: K_c masks on a
      masked LM, the word's own first tokens after the question on a causal LM. Summed log-probabilities
      favour short words, which training corrects; equally long words avoid it.

    `causal`: the question goes to a causal LM, which reads left to right: the row ends where the
    mask would be (no EOS), and the answer is the next word after the row's last token, which is
    `mlm_positions`. Nothing the answer depends on may follow the mask in the template.
    `demonstrations` (LM-BFF): labelled examples after the input (a masked LM) or before it (a causal
    LM, as in-context examples, so that the question stays last). `which`: the indices of the records
    to encode, in this order (a training batch's, its demonstrations redrawn); default all."""
    where = "data.cloze_template"
    if not template or not verbalizer:
        raise JaxftError("data.task='cloze' needs data.cloze_template (e.g. '{text} it was {mask} .') and "
                         "data.verbalizer (a label word per label, e.g. 'bad,good')")
    if not causal and tok.mask_id is None:
        raise JaxftError("data.task='cloze': the tokenizer has no mask token (expected a masked LM's, e.g. [MASK])")
    slots = CLOZE_SLOT.findall(template)
    want = ["text", "mask"] + (["text_b"] if text_pair_field else [])
    if sorted(slots) != sorted(want):
        pair = " and {text_b} (this data has pairs)" if text_pair_field else " (no {text_b}: this data has single texts)"
        raise JaxftError(f"{where}={template!r}: expected {{text}} and {{mask}} once each{pair}, found "
                         f"{', '.join('{' + x + '}' for x in slots) or 'none'}")
    if causal and slots[-1] != "mask":
        raise JaxftError(f"{where}={template!r}: a causal LM reads left to right, so {{mask}} must come after "
                         f"{{{slots[-1]}}} (the answer is the next word)")
    words = str(verbalizer).split(",")
    if len(words) != len(labels):
        raise JaxftError(f"data.verbalizer={verbalizer!r}: {len(words)} words for the {len(labels)} labels {labels} "
                         "(one per label, in this order)")
    word_ids = label_words(tok, words, template)
    dup = next((i for i, w in enumerate(word_ids) if w in word_ids[:i]), None)
    if dup is not None:  # else exit 0: equal scores, loss log(C) and no gradient, accuracy from the tie-break
        first = word_ids.index(word_ids[dup])
        raise JaxftError(f"data.verbalizer={verbalizer!r}: labels {labels[first]!r} and {labels[dup]!r} have the same "
                         f"word ({[tok.piece(i) for i in word_ids[dup]]}): expected a different word per label")
    per_class, longest = cloze_layout(word_ids, causal)
    parts = CLOZE_SLOT.split(template)  # literal, slot name, literal, ...
    # The pieces join as the whole text tokenizes (`follow`); a literal after a slot is a new word where it
    # starts with a space, else glued on. A trailing space is never a token of its own.
    marks = marks_words(tok)
    literal = {j: follow(tok, marks, "a " if parts[j][:1].isspace() else "a", parts[j].strip())
               if parts[j].strip() else [] for j in range(2, len(parts), 2)}
    literal[0] = tok.encode(parts[0].strip()) if parts[0].strip() else []  # the row's start
    asked = parts[: parts.index("mask")] if causal else parts  # a causal LM's row stops at the mask
    index = {v: k for k, v in enumerate(labels)}
    which = np.arange(len(records.rows)) if which is None else np.asarray(which)
    demos = _demonstrations(records, demonstrations, label_field, index, tok, causal, which) if demonstrations else None
    per_row = len(labels) * demonstrations.per_class if demos else 0
    sep = demos["separator"] if demos else []
    # A later segment opens after the separator: after a space as a new word (the default join on a causal
    # LM is one), else glued on, as the whole text tokenizes (after a newline neither SentencePiece nor
    # GPT-2 marks the next word).
    joiner = (demonstrations.separator if demonstrations else "") or (" " if causal else "")
    opened = follow(tok, marks, joiner, parts[0].strip()) if parts[0].strip() else []  # the template's first literal there
    slots = [(j, parts[j]) for j in range(1, len(parts), 2) if parts[j] != "mask"]  # text, text_b
    fields = {"text": text_field, "text_b": text_pair_field}
    # the question's answer: a causal LM's word less its last token, or a masked LM's masks; a demonstration's: its word
    fixed = (len(tok.bos) + (longest - 1 if causal else len(tok.eos) + longest)
             + sum(len(literal[j]) for j in range(0, len(asked), 2))
             + per_row * (sum(len(v) for v in literal.values()) + longest + len(sep))
             + (1 + per_row) * max(len(opened) - len(literal[0]), 0))
    room = seq_len - fixed
    if room < len(slots) * (1 + per_row):
        more = f" and {per_row} demonstrations" if per_row else ""
        raise JaxftError(f"{where}={template!r}: the template{more} take {fixed} of data.seq_len={seq_len} tokens, "
                         "leaving no room for the texts")
    encoded = {}
    # The pool's texts are kept across calls (the Demonstrations' cache, by tokenizer): redrawn for every
    # batch, the same texts would be tokenized again and again.
    kept = demonstrations.cache.setdefault(("texts", tok), {}) if demonstrations else {}

    def encode(recs, i, first: bool) -> list[list[int]]:  # a record's texts in template order, once each
        out = []
        for j, slot in slots:
            # what the text follows: the separator where it opens a later segment, the row's start, or a literal
            before = (joiner if not first else "") if j == 1 and not parts[0] else parts[j - 1] or "a"
            pooled = demonstrations is not None and recs is demonstrations.pool
            memo, key = (kept, (i, fields[slot], before)) if pooled else (encoded, (id(recs), i, slot, before))
            if key not in memo:
                text = _text(recs, i, fields[slot]).strip()  # SST-2's end in a space: no token of its own
                memo[key] = follow(tok, marks, before, text)
            out.append(memo[key])
        return out

    def segment(texts, answer, stop, first):  # the template filled; `stop` ends it at the mask
        out, at, it = [], None, iter(texts)
        for j, part in enumerate(parts[: parts.index("mask") + 1] if stop else parts):
            if j % 2 == 0:
                out += opened if j == 0 and not first else literal[j]
            elif part == "mask":
                at = len(out)
                out += answer
            else:
                out += next(it)
        return out, at

    n, rows = len(which), len(labels) if per_class else 1
    ids = np.full((n, rows, seq_len), tok.pad_id, np.int32)
    mask = np.zeros((n, rows, seq_len), np.int32)
    y = np.zeros((n,), np.int32)
    position = np.full((n, rows, longest), -1, np.int32)
    truncated = 0
    q = per_row if causal else 0  # the question's place among the row's segments
    for o, i in enumerate(which.tolist()):  # output row o, record i
        # the row's segments in order: (records, row, answer, stops at the mask); the question first on a
        # masked LM ([CLS] question [SEP] demo [SEP] ...), last on a causal LM ([BOS] demo demo ... question)
        shots = [(demonstrations.pool, j, word_ids[demos["label"][j]], False) for j in demos["rows"](i)] if demos else []
        order = shots + [(records, i, None, causal)] if causal else [(records, i, None, causal)] + shots
        pieces = [encode(recs, j, k == 0) for k, (recs, j, _, _) in enumerate(order)]
        lengths = [len(t) for texts in pieces for t in texts]
        keep = iter(fit_texts(lengths, room))  # one text or a pair alone: what fit_pair keeps
        pieces = [[t[: next(keep)] for t in texts] for texts in pieces]
        truncated += sum(len(t) for texts in pieces for t in texts) < sum(lengths)
        for r in range(rows):
            word = word_ids[r] if per_class else word_ids[0]  # a shared row's words are equally long
            answer = word[:-1] if causal else [tok.mask_id] * len(word)
            toks = list(tok.bos)
            for k, (texts, (_, _, shown, stop)) in enumerate(zip(pieces, order)):
                filled, at = segment(texts, answer if k == q else shown, stop, k == 0)
                if k == q:  # a masked LM reads the word at its masks, a causal LM each token one place earlier
                    first = len(toks) + (len(sep) if k else 0) + at - causal
                    position[o, r, : len(word)] = first + np.arange(len(word))
                toks += (sep if k else []) + filled
            toks += [] if causal else tok.eos
            ids[o, r, : len(toks)] = toks
            mask[o, r, : len(toks)] = 1
        y[o] = class_index(records, i, label_field, index)
    if not per_class:
        ids, mask, position = ids[:, 0], mask[:, 0], position[:, 0]
    words = np.full((len(labels), longest), -1, np.int32)
    for c, w in enumerate(word_ids):
        words[c, : len(w)] = w
    words = words[:, 0] if longest == 1 else words  # one token each: [C], the layout before multi-token words
    arrays = {"input_ids": ids, "attention_mask": mask, "labels": y, "weight": np.ones((n,), np.float32),
              "mlm_positions": position, "verbalizer": np.ascontiguousarray(np.broadcast_to(words, (n,) + words.shape))}
    if token_type_ids:  # one sequence: every token is type 0
        arrays["token_type_ids"] = np.zeros_like(ids)
    return arrays, truncated


def in_context(tok, before: str, text: str) -> list[int]:
    """`text`'s tokens where it follows `before` in one string (after a newline a SentencePiece word has
    no word mark, say), or its own where the two merge at the seam."""
    lead, both = tok.encode(before), tok.encode(before + text)
    return both[len(lead):] if both[: len(lead)] == lead else tok.encode(text)


def marks_words(tok) -> bool:
    """Whether the tokenizer opens every text it encodes with a word mark (SentencePiece's dummy prefix)."""
    return len(tok.encode(" a")) > len(tok.encode("a"))


def follow(tok, marks: bool, before: str, text: str) -> list[int]:
    """`text`'s tokens where it follows `before` in one string, so that pieces join as the whole text
    tokenizes: at the start ("") as it is; after a space a new word (SentencePiece: its own word mark;
    a byte-level BPE such as GPT-2's, Llama 3's or RoBERTa's: " text", the space part of the word;
    WordPiece ignores spaces); after anything else glued on (after a newline, say, neither
    SentencePiece nor GPT-2 marks the next word). `marks`: `marks_words(tok)`."""
    if not before:
        return tok.encode(text)
    if before.endswith(" "):
        return tok.encode(text if marks else " " + text)
    return in_context(tok, before[-1], text)


def label_words(tok, words: list[str], template: str) -> list[list[int]]:
    """A cloze task's label words (`data.verbalizer`, split) -> their token ids, each as it stands in
    place of the template's {mask}: a new word after a space there (or where the word is written with a
    leading space), else glued to what precedes the mask."""
    parts = CLOZE_SLOT.split(template)
    at = parts.index("mask")
    before = parts[at - 1] or ("a" if at > 1 else "")  # "": the row's start, or glued to a text
    marks, out = marks_words(tok), []
    for word in words:
        if not word.strip():
            raise JaxftError(f"data.verbalizer={','.join(words)!r}: an empty label word")
        ids = follow(tok, marks, " " if word[:1].isspace() else before, word.strip())
        if getattr(tok, "unk_id", None) in ids:
            raise JaxftError(f"data.verbalizer: the word {word!r} is not in the vocabulary "
                             f"(it reads as {[tok.piece(i) for i in ids]}, with the unknown token)")
        out.append(ids)
    return out


def cloze_layout(word_ids: list[list[int]], causal: bool) -> tuple[bool, int]:
    """-> (a row per class, positions read per row): one row serves every class where all read the same
    positions, with one-token words or a masked LM's equally long ones; else each class has its own row
    (a causal LM reads a word's tokens after its own first ones)."""
    longest = max(len(w) for w in word_ids)
    return longest > 1 and (causal or len({len(w) for w in word_ids}) > 1), longest


def joined_texts(records: Records, fields: list[str]) -> list[str]:
    """Each record's texts of `fields`, stripped and joined by a space (a pair's two in one sentence, as
    LM-BFF embeds a pair for its demonstration filter)."""
    return [" ".join(_text(records, i, f).strip() for f in fields) for i in range(len(records.rows))]


def _demonstrations(records: Records, d: Demonstrations, label_field: str, index: dict, tok, causal: bool,
                    which=None) -> dict:
    """-> {"rows": i -> the pool rows shown with row i, in the order shown, "label": pool row -> class,
    "separator": ids, "candidates": (i, class) -> the pool rows row i draws that class's from, ascending}.
    Row i of `records` draws from (seed, split, i): the split is the training one when `records` is the
    pool itself, and then row i is never its own demonstration. `which`: the rows about to be drawn for,
    in order (their similarities to the pool are computed in blocks; any order gives the same draws)."""
    own = records is d.pool
    key = (label_field, tuple(index))
    if key not in d.cache:
        classes = [class_index(d.pool, j, label_field, index) for j in range(len(d.pool.rows))]
        by_class = [[j for j, c in enumerate(classes) if c == k] for k in range(len(index))]
        place = {j: p for pool in by_class for p, j in enumerate(pool)}  # a row's index within its class
        d.cache[key] = classes, by_class, place
    classes, by_class, place = d.cache[key]
    for k, rows in enumerate(by_class):
        if len(rows) < d.per_class + own:
            label = list(index)[k]
            raise JaxftError(f"data.demonstrations={d.per_class}: the training data has {len(rows)} examples of "
                             f"label {label!r}, expected at least {d.per_class + own}")
    if d.separator:  # as it tokenizes after a word; its trailing spaces mark the next word
        separator = in_context(tok, "a", d.separator.rstrip(" "))
    else:
        separator = [] if causal else list(getattr(tok, "sep", None) or tok.eos)
    members = [np.asarray(pool, np.int64) for pool in by_class]
    similar = _similarities(records, d, which, members, key) if d.embed is not None else None

    def candidates(i: int, k: int) -> np.ndarray:
        skip = own and classes[i] == k
        if similar is None:  # the whole class, less the row itself
            return np.delete(members[k], place[i]) if skip else members[k]
        sims = similar(i)[k]
        if skip:
            sims = sims.copy()
            sims[place[i]] = -np.inf  # never among the nearest: at most n of the n + 1 are taken
        n = len(sims) - skip
        return members[k][nearest(sims, max(d.per_class, math.floor(d.keep * n)))]

    def rows(i: int) -> list[int]:
        rng = np.random.default_rng([d.seed, 0 if own else 1, i] + ([d.draw] if d.draw else []))
        shown = []
        for k, pool in enumerate(by_class):
            if similar is not None:  # the same numbers drawn as unfiltered, over the nearest
                near = candidates(i, k)
                shown += [int(near[j]) for j in rng.choice(len(near), d.per_class, replace=False)]
                continue
            skip = own and classes[i] == k  # draw from the others: indices from `at` on move up by one
            at = place[i] if skip else len(pool)
            drawn = rng.choice(len(pool) - skip, d.per_class, replace=False)
            shown += [pool[j + (j >= at)] for j in drawn]
        return [shown[j] for j in rng.permutation(len(shown))]

    return {"rows": rows, "label": classes, "separator": separator, "candidates": candidates}


def _similarities(records: Records, d: Demonstrations, which, members: list, key) -> object:
    """-> i -> [row i's cosines with the pool rows `members[c]` of each class c] (integers,
    `jaxft.data.embeddings`), for the rows of `which`, 128 rows at a time. Embeddings are computed once per
    records (`d.cache`)."""
    def embedded(recs):
        got = d.cache.get(("embeddings", id(recs)))
        if got is None or got[0] is not recs:  # the records kept: an id is never another's
            got = d.cache[("embeddings", id(recs))] = recs, d.embed(recs)
        return got[1]

    query = embedded(records)
    if ("by class", key) not in d.cache:  # the pool's embeddings of each class (`key`: its label field and labels)
        d.cache[("by class", key)] = [embedded(d.pool)[m] for m in members]
    pools = d.cache[("by class", key)]
    which = np.arange(len(records.rows)) if which is None else np.asarray(which)
    first = {}
    for o, i in enumerate(which.tolist()):
        first.setdefault(i, o)
    block = {}

    def similar(i: int) -> list[np.ndarray]:
        if i not in block:
            at = first.get(i)
            rows = [i] if at is None else list(dict.fromkeys(which[at : at + 128].tolist()))
            block.clear()
            per_class = [query[rows] @ p.T for p in pools]  # exact: integer values in float64
            block.update((r, [s[o] for s in per_class]) for o, r in enumerate(rows))
        return block[i]

    return similar


# ---------------------------------------------------------------------------------------------
# Tagged words (NER): a tag per word, read at the word's first token.

WORD_FIELDS = ("tokens", "words")  # where HF's NER sets (conll2003, wnut_17, ...) keep the words
TAG_FIELDS = ("ner_tags", "tags", "labels", "label")  # and the tags


def tagged_fields(records: Records, text_field: str, label_field: str | None, text_given: bool,
                  label_given: bool) -> tuple[str, str] | None:
    """(words field, tags field) when the records are tagged words (the tags' column holds lists): the
    fields given, else the first of WORD_FIELDS / TAG_FIELDS the records have; None otherwise."""
    row = records.rows[0] if records.rows else {}
    words = text_field if text_given or text_field in row else next((f for f in WORD_FIELDS if f in row), text_field)
    tags = label_field if label_given else next((f for f in (label_field, *TAG_FIELDS) if f and f in row), label_field)
    return (words, tags) if tags and isinstance(row.get(tags), list) else None


def tagged_setup(d, source: str, records: Records, text_field: str, label_field: str | None):
    """A token-classification source's ((words field, tags field), declared classes), as training and
    `jaxft.plan` read it: `tagged_fields` (else the configured fields, whose records then say what is wrong),
    and data.labels, else the bundled set's own classes."""
    fields = tagged_fields(records, text_field, label_field, bool(d.text_field), bool(d.label_field))
    declared = declared_labels(d.get("labels", "")) or list(BUNDLED[source].labels if source in BUNDLED else ())
    return fields or (text_field, label_field), declared


def words_and_tags(records: Records, i: int, words_field: str, tags_field: str) -> tuple[list[str], list]:
    """Record i's words and their tags. Words are a list of strings, or a string: its whitespace-separated
    words when there are as many as tags, else its characters without spaces (a Chinese sentence
    tagged character by character)."""
    where = records.where[i]
    words, tags = field(records, i, words_field), field(records, i, tags_field)
    if not isinstance(tags, list):
        raise JaxftError(f"{where}: field {tags_field!r} is {type(tags).__name__}, expected a list of tags, one per "
                         f"word of {words_field!r} (data.label_field)")
    if isinstance(words, str):
        split, chars = words.split(), [c for c in words if not c.isspace()]
        words = split if len(split) == len(tags) else chars if len(chars) == len(tags) else None
        if words is None:
            raise JaxftError(f"{where}: {len(tags)} tags for the text of {words_field!r}, which has {len(split)} words "
                             f"and {len(chars)} characters: expected a tag per word (or per character)")
    elif not isinstance(words, list) or not all(isinstance(w, str) for w in words):
        raise JaxftError(f"{where}: field {words_field!r} is {type(words).__name__}, expected a list of words "
                         "(data.text_field)")
    if len(words) != len(tags):
        raise JaxftError(f"{where}: {len(words)} words in {words_field!r} but {len(tags)} tags in {tags_field!r}: "
                         "expected a tag per word")
    for tag in tags:
        if isinstance(tag, bool) or not isinstance(tag, (int, str)) or (isinstance(tag, str) and not tag.strip()):
            raise JaxftError(f"{where}: tag {tag!r} in {tags_field!r}: expected a tag name (e.g. B-PER) or a "
                             "class number")
    return words, tags


def tag_labels(splits: list[Records], words_field: str, tags_field: str, declared: list) -> list:
    """The classes of tagged words: named tags, sorted (or `data.labels`, which must hold every tag);
    class numbers 0..N-1 (named by `data.labels` in that order, if given: seqeval's entity scores need
    the names)."""
    seen = {}
    for records in splits:
        for i in range(len(records.rows)):
            for tag in words_and_tags(records, i, words_field, tags_field)[1]:
                seen.setdefault(tag, records.where[i])
    kinds = {type(t) for t in seen}
    if len(kinds) > 1:
        number = next(t for t in seen if isinstance(t, int))
        name = next(t for t in seen if isinstance(t, str))
        raise JaxftError(f"{seen[number]}: tag {number!r} is a class number, but {seen[name]} has the tag {name!r}: "
                         "expected names or numbers throughout")
    if kinds == {int}:
        top = max(seen)
        bad = next((t for t in seen if t < 0), None)
        if bad is not None:
            raise JaxftError(f"{seen[bad]}: tag {bad}: expected class numbers from 0")
        if declared and len(declared) <= top:
            given = ",".join(map(str, declared))
            raise JaxftError(f"data.labels={given!r}: {len(declared)} names, but {seen[top]} has class {top}: expected "
                             f"a name for each class 0..{top}")
        return list(declared) if declared else list(range(top + 1))
    if declared:
        missing = next((t for t in seen if t not in declared), None)
        if missing is not None:
            raise JaxftError(f"{seen[missing]}: tag {missing!r} is not one of data.labels: expected one of {declared}")
        return list(declared)
    return sorted(seen)


def continuation_classes(labels: list) -> list[int]:
    """The class of a word's later tokens by the class of its first, for `data.label_all_tokens`: B-X -> I-X
    (HF run_ner's `b_to_i_label`), or M-X in BMES (no I-X); other tags and unnamed class numbers as they are."""
    index = {v: k for k, v in enumerate(labels)}
    # S-X (IOBES / BMES: a one-token entity split into sub-words) stays S-X, as HF's b_to_i_label leaves it
    inside = [[f"I-{v[2:]}", f"M-{v[2:]}"] if isinstance(v, str) and v.startswith("B-") else [] for v in labels]
    return [next((index[t] for t in names if t in index), k) for k, names in enumerate(inside)]


def token_classification(records: Records, tok, seq_len: int, words_field: str, tags_field: str, labels: list,
                         all_tokens: bool = False):
    """Tagged words -> (arrays, examples truncated, words without a token). Each word is tokenized as it
    stands in the sentence (the first on its own, the others after a space: `follow`), BOS/[CLS] before
    and EOS/[SEP] after; its tag is the label of its first token, -100 (no loss, no score) on its other
    tokens and the special ones, as HF's token-classification recipes align them; `all_tokens`
    (`data.label_all_tokens`, training only): its other tokens get `continuation_classes`' label. A sentence
    too long for `seq_len` keeps its first words whole and loses the rest (their tags are not scored). A word
    that tokenizes to nothing has no label."""
    n = len(records.rows)
    ids = np.full((n, seq_len), tok.pad_id, np.int32)
    mask = np.zeros((n, seq_len), np.int32)
    y = np.full((n, seq_len), -100, np.int32)
    index = {v: k for k, v in enumerate(labels)}
    later = continuation_classes(labels) if all_tokens else [-100] * len(labels)
    marks = marks_words(tok)
    room = seq_len - len(tok.bos) - len(tok.eos)
    truncated = empty = 0
    for i in range(n):
        words, tags = words_and_tags(records, i, words_field, tags_field)
        toks, tagged = list(tok.bos), [-100] * len(tok.bos)
        for j, (word, tag) in enumerate(zip(words, tags)):
            pieces = tok.encode(word) if j == 0 else follow(tok, marks, " ", word)
            if not pieces:
                empty += 1
                continue
            if len(toks) - len(tok.bos) + len(pieces) > room:
                truncated += 1
                break
            toks += pieces
            first = tag if isinstance(tag, int) else index[tag]
            tagged += [first] + [later[first]] * (len(pieces) - 1)
        toks, tagged = toks + tok.eos, tagged + [-100] * len(tok.eos)
        ids[i, :len(toks)], mask[i, :len(toks)], y[i, :len(toks)] = toks, 1, tagged
    arrays = {"input_ids": ids, "attention_mask": mask, "labels": y, "weight": np.ones((n,), np.float32)}
    return arrays, truncated, empty


def causal_lm(records: Records, tok, seq_len: int, text_field: str, segments: bool = False):
    stream, document = [], []
    for i in range(len(records.rows)):  # a record's text may be a list of segments, each ended by EOS
        value = field(records, i, text_field)
        parts = value if isinstance(value, list) else [_text(records, i, text_field)]
        start = len(stream)
        stream += tok.bos
        for part in parts:
            stream += tok.encode(str(part)) + tok.eos
        document += [i] * (len(stream) - start)
    n = len(stream) // seq_len
    if n == 0:
        source = records.where[0].split(":")[0] if records.where else "data"  # no records at all: no where[0]
        raise JaxftError(f"{source}: {len(stream)} tokens, fewer than one block of {seq_len}")
    ids = np.asarray(stream[: n * seq_len], np.int32).reshape(n, seq_len)
    arrays = {"input_ids": ids, "attention_mask": np.ones_like(ids), "weight": np.ones((n,), np.float32)}
    if segments:  # 1, 2, ... per document within each block
        doc = np.asarray(document[: n * seq_len], np.int32).reshape(n, seq_len)
        arrays["segment_ids"] = doc - doc[:, :1] + 1
    return arrays, 0


MLM_PROBABILITY = 0.15  # BERT's share of masked-LM targets


def mlm_width(seq_len: int, probability: float = MLM_PROBABILITY) -> int:
    """Targets per row of a masked LM (`mlm_positions`' width): round(probability x seq_len), at least 1."""
    return max(int(seq_len * probability + 0.5), 1)


def mask_tokens(arrays: dict, tok, rngs, probability: float = MLM_PROBABILITY) -> dict:
    """BERT's masking: in each row round(`probability` x its non-special tokens) become targets (at least
    one; BERT's `create_pretraining_data` counts them so too) in `mlm_labels` (-100 elsewhere), listed
    in `mlm_positions` (padded with -1 to round(probability x seq_len), the same width for every batch,
    so the step compiles once); 80% of them are replaced by the mask token, 10% by a random token, 10%
    kept. Row i draws from `rngs[i]`, or from `row_rngs(rngs, n)` when `rngs` is a seed; training redraws
    every batch (`redraw`), RoBERTa's dynamic masking."""
    if getattr(tok, "mask_id", None) is None:
        raise JaxftError("data.task='masked_lm': the tokenizer has no mask token (expected e.g. BERT's [MASK])")
    ids = arrays["input_ids"]
    n, t = ids.shape
    rngs = row_rngs(rngs, n) if isinstance(rngs, int) else rngs
    candidate = ~np.isin(ids, [i for i in (tok.bos_id, tok.eos_id, tok.pad_id) if i is not None]) & (
        arrays["attention_mask"] > 0)
    width = mlm_width(t, probability)
    masked = ids.astype(np.int32, copy=True)
    labels = np.full(ids.shape, -100, np.int32)
    where = np.full((n, width), -1, np.int32)
    for i, rng in enumerate(rngs):
        pool = np.flatnonzero(candidate[i])
        k = min(max(int(len(pool) * probability + 0.5), 1), len(pool))
        chosen = np.sort(rng.choice(pool, k, replace=False)) if k else pool
        roll = rng.random(k)
        labels[i, chosen] = ids[i, chosen]
        masked[i, chosen[roll < 0.8]] = tok.mask_id
        swap = chosen[(roll >= 0.8) & (roll < 0.9)]
        masked[i, swap] = rng.integers(0, tok.vocab_size, len(swap))
        # The head computes logits at these positions only (BERT's own pretraining code does the same,
        # `max_predictions_per_seq`), not at every token.
        where[i, :k] = chosen
    return {**arrays, "input_ids": masked, "mlm_labels": labels, "mlm_positions": where}


def row_rngs(seed: int, n: int, *key: int, first: int = 0) -> list:
    """Generators for rows first..first+n-1, row r's from (seed, *key, r): a row draws the same whatever
    the batch is split into (processes, micro-batches)."""
    return [np.random.default_rng([seed, *key, first + i]) for i in range(n)]


def redraw(fn, seed: int):
    """A per-batch transform for `Batches`: `fn(batch, rngs)`, global row r of batch number `position`
    drawing from (seed, position, r). A pure function of the position, so resume stays exact; new
    draws every batch, so no epoch repeats another's masks."""
    return lambda batch, position, first, examples: fn(batch, row_rngs(seed, len(batch["weight"]), position,
                                                                        first=first))


def synthetic(n: int, seq_len: int, vocab_size: int, seed: int, num_labels: int | None):
    """Random token ids (no tokenizer): for benchmarks, sharding tests and smoke runs."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab_size, (n, seq_len), dtype=np.int32)
    arrays = {"input_ids": ids, "attention_mask": np.ones_like(ids), "weight": np.ones((n,), np.float32)}
    if num_labels:
        arrays["labels"] = rng.integers(0, num_labels, (n,), dtype=np.int32)
    return arrays
