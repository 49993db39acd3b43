"""Records -> fixed-shape numpy arrays, so the train step compiles once.

classification: [BOS] text [EOS] right-padded to seq_len, plus `labels`.
causal_lm:      texts joined with BOS/EOS and cut into seq_len blocks (packing, no padding); a text
                that is a list of segments becomes BOS seg1 EOS seg2 EOS ...
Every array set carries `weight` (1 for a real example) so padded eval batches count nothing.
"""

from __future__ import annotations

import re

import numpy as np

from jaxft.data.sources import Records, field
from jaxft.errors import JaxftError


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
        values.append(v)
    kinds = {type(v) for v in values}
    if len(kinds) > 1:
        raise JaxftError(f"{records.where[0]}: labels mix integers and strings")
    return sorted(set(values))


def classification(records: Records, tok, seq_len: int, text_field: str, label_field: str, labels: list):
    n = len(records.rows)
    ids = np.full((n, seq_len), tok.pad_id, np.int32)
    mask = np.zeros((n, seq_len), np.int32)
    y = np.zeros((n,), np.int32)
    index = {v: k for k, v in enumerate(labels)}
    truncated = 0
    for i in range(n):
        toks = [tok.bos_id] + tok.encode(_text(records, i, text_field)) + [tok.eos_id]
        if len(toks) > seq_len:
            truncated += 1
            toks = toks[: seq_len - 1] + [tok.eos_id]
        ids[i, : len(toks)] = toks
        mask[i, : len(toks)] = 1
        v = _label(field(records, i, label_field))
        if v not in index:
            raise JaxftError(f"{records.where[i]}: label {v!r} is not one of the training labels {labels}")
        y[i] = index[v]
    arrays = {"input_ids": ids, "attention_mask": mask, "labels": y, "weight": np.ones((n,), np.float32)}
    return arrays, truncated


def causal_lm(records: Records, tok, seq_len: int, text_field: str):
    stream = []
    for i in range(len(records.rows)):  # a record's text may be a list of segments, each ended by EOS
        value = field(records, i, text_field)
        segments = value if isinstance(value, list) else [_text(records, i, text_field)]
        stream.append(tok.bos_id)
        for segment in segments:
            stream += tok.encode(str(segment)) + [tok.eos_id]
    n = len(stream) // seq_len
    if n == 0:
        source = records.where[0].split(":")[0] if records.where else "data"  # no records at all: no where[0]
        raise JaxftError(f"{source}: {len(stream)} tokens, fewer than one block of {seq_len}")
    ids = np.asarray(stream[: n * seq_len], np.int32).reshape(n, seq_len)
    return {"input_ids": ids, "attention_mask": np.ones_like(ids), "weight": np.ones((n,), np.float32)}, 0


def synthetic(n: int, seq_len: int, vocab_size: int, seed: int, num_labels: int | None):
    """Random token ids (no tokenizer): for benchmarks, sharding tests and smoke runs."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab_size, (n, seq_len), dtype=np.int32)
    arrays = {"input_ids": ids, "attention_mask": np.ones_like(ids), "weight": np.ones((n,), np.float32)}
    if num_labels:
        arrays["labels"] = rng.integers(0, num_labels, (n,), dtype=np.int32)
    return arrays
