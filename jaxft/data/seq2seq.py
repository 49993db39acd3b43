"""Encoder-decoder examples (T5): a source text the encoder reads, a target text the decoder learns.

Records (one pair each):
- pairs: `data.source_field` -> `data.target_field` (E2E NLG's meaning representation -> text, ADGEN's
  content -> summary);
- Alpaca: `{"instruction", "input" (optional), "output"}`: the source is the instruction, then a blank
  line ("\n\n") and the input when the input is not empty, the same user turn as `jaxft.data.sft`; a
  non-empty `system` goes in front of it, followed by a blank line; the target is the output. Earlier
  turns (`history`) do not make one pair: such a record is a bad record.
An empty (or blank) source or target, a missing field or a non-text value is a bad record: the run
stops naming its file and line, or skips and counts it with `data.skip_bad_records=True`.

Tokens, as T5's tokenizer makes them (`tokenizer(source, text_target=target, max_length=n,
truncation=True)`): the text's tokens, then EOS (no BOS). A text longer than n keeps its first n - 1
tokens and the EOS; the log counts the cut sources and targets.

Arrays, as transformers' `DataCollatorForSeq2Seq` pads them: `input_ids` / `attention_mask`
[N, data.seq_len] right-padded with the pad id; `labels` [N, target_len] the target tokens and EOS,
-100 after them (ignored by the `seq2seq` objective); `decoder_input_ids` [N, target_len] the labels
shifted right behind the decoder start token, -100 read as padding (transformers' `_shift_right`);
`weight` 1 per real example. The decoder is causal, so its right padding changes no real position
and needs no mask.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from jaxft.data.sft import BadRecord, Fields, pair_values
from jaxft.data.sources import Records

IGNORE = -100  # transformers' label of a position without a target


def encode_source(tok, text: str, seq_len: int) -> list[int]:
    """The encoder's ids of one text: its tokens then EOS, cut to `seq_len` keeping the start (and the EOS)."""
    return with_eos(tok, text, seq_len)[0]


def with_eos(tok, text: str, n: int) -> tuple[list[int], bool]:
    """-> (tokens + EOS cut to n keeping the start and the EOS, whether it was cut)."""
    ids = tok.encode(text) + tok.eos
    if len(ids) <= n:
        return ids, False
    return ids[: max(n - len(tok.eos), 0)] + tok.eos[: n], True


def detect(records: Records, fields: Fields = Fields()) -> bool:
    """Whether the first record is a source -> target pair: the pair fields, or Alpaca's."""
    if not records.rows:
        return False
    row = records.rows[0]
    return (("instruction" in row and "output" in row)
            or bool(fields.source and fields.target and fields.source in row and fields.target in row))


def _text(value, where: str, name: str) -> str:
    if not isinstance(value, str):
        raise BadRecord(f"{where}: {name} is {type(value).__name__}, expected text")
    if not value.strip():
        raise BadRecord(f"{where}: {name} is empty")
    return value


def pair(row, where: str, fields: Fields = Fields()) -> tuple[str, str]:
    """One record -> (source text, target text), by the rule in the module docstring."""
    values = pair_values(row, where, fields)
    if values is not None:
        return _text(values[0], where, repr(fields.source)), _text(values[1], where, repr(fields.target))
    if "instruction" in row and "output" in row:
        if row.get("history"):
            raise BadRecord(f"{where}: 'history' holds earlier turns; an encoder-decoder learns one source -> target "
                            "pair per record")
        source = _text(row["instruction"], where, "'instruction'")
        extra = row.get("input") or ""
        if extra:
            source = f"{source}\n\n{_text(extra, where, repr('input'))}"
        system = row.get("system") or ""
        if system:
            source = f"{_text(system, where, repr('system'))}\n\n{source}"
        return source, _text(row["output"], where, "'output'")
    pairs = f"data.source_field/target_field ({fields.source!r}, {fields.target!r})" if fields.source else \
        "data.source_field and data.target_field set"
    raise BadRecord(f"{where}: not a source -> target record: expected 'instruction' and 'output' (Alpaca) or "
                    f"{pairs} (fields: {', '.join(map(str, row))})")


@dataclasses.dataclass
class Encoded:
    examples: list[tuple[list[int], list[int]]]  # (source ids, target ids), each ending in EOS
    truncated: int  # examples with a cut source or target
    cut_sources: int
    cut_targets: int
    skipped: int
    first_skip: str


def examples(records: Records, tok, seq_len: int, target_len: int, fields: Fields = Fields(),
             skip_bad: bool = False) -> Encoded:
    out, truncated, cut_s, cut_t, skipped, first = [], 0, 0, 0, 0, ""
    for row, where in zip(records.rows, records.where):
        try:
            source, target = pair(row, where, fields)
        except BadRecord as e:
            if not skip_bad:
                raise BadRecord(f"{e} (data.skip_bad_records=True skips such records)") from None
            skipped, first = skipped + 1, first or str(e)
            continue
        s, s_cut = with_eos(tok, source, seq_len)
        t, t_cut = with_eos(tok, target, target_len)
        truncated, cut_s, cut_t = truncated + (s_cut or t_cut), cut_s + s_cut, cut_t + t_cut
        out.append((s, t))
    return Encoded(out, truncated, cut_s, cut_t, skipped, first)


def padded(examples: list[tuple[list[int], list[int]]], seq_len: int, target_len: int, pad_id: int,
           decoder_start_id: int) -> dict[str, np.ndarray]:
    """The fixed-shape arrays of the module docstring."""
    n = len(examples)
    ids = np.full((n, seq_len), pad_id, np.int32)
    mask = np.zeros((n, seq_len), np.int32)
    labels = np.full((n, target_len), IGNORE, np.int32)
    for i, (s, t) in enumerate(examples):
        ids[i, : len(s)], mask[i, : len(s)], labels[i, : len(t)] = s, 1, t
    return {"input_ids": ids, "attention_mask": mask, "labels": labels,
            "decoder_input_ids": decoder_inputs(labels, decoder_start_id, pad_id), "weight": np.ones((n,), np.float32)}


def decoder_inputs(labels: np.ndarray, decoder_start_id: int, pad_id: int) -> np.ndarray:
    """Labels [N, T] (-100 after the target) -> the decoder's inputs: the start token, then the labels up
    to the last but one, -100 read as padding (transformers' `_shift_right`)."""
    decoder = np.concatenate([np.full((len(labels), 1), decoder_start_id, np.int32), labels[:, :-1]], axis=1)
    return np.where(decoder == IGNORE, pad_id, decoder).astype(np.int32)


def arrays(records: Records, tok, seq_len: int, target_len: int = 0, fields: Fields = Fields(),
           decoder_start_id: int | None = None, skip_bad: bool = False) -> tuple[dict[str, np.ndarray], int]:
    """Records -> (the arrays of the module docstring, number of examples truncated). `target_len` 0:
    seq_len; `decoder_start_id` None: the tokenizer's pad id (T5's decoder start token)."""
    target_len = target_len or seq_len
    enc = examples(records, tok, seq_len, target_len, fields, skip_bad)
    if not enc.examples:
        where = records.where[0].rsplit(":", 1)[0] if records.where else "data"
        raise BadRecord(f"{where}: no usable source -> target record")
    start = tok.pad_id if decoder_start_id is None else decoder_start_id
    return padded(enc.examples, seq_len, target_len, tok.pad_id, start), enc.truncated
