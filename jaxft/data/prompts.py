"""Prompts for reinforcement learning (GRPO): records -> left-padded token ids the policy completes.

A record's prompt, by its fields (TRL's formats first):
- `prompt`, a text: used as it is, no chat template (TRL's standard format);
- `prompt`, a list of turns: rendered with the chat template and its generation prompt (conversational);
- an SFT conversation (`messages`, `conversations`, Alpaca's `instruction`): the turns before its last
  answer, rendered the same way; the answer stays in the record for the reward functions;
- otherwise the record's text field (`data.text_field`, a bundled set's own): a document whose first
  tokens are the prompt, as in TRL's sentiment example.
A prompt longer than `data.seq_len` keeps its last tokens (TRL's max_prompt_length), a document its first
(and the reward functions get that beginning as its prompt).

An encoder-decoder (T5) reads the prompt as `jaxft.data.seq2seq` reads a source, and its decoder writes
the completion: a `prompt` text, an Alpaca record's or a `data.source_field` record's source, or the text
field's document; its tokens then EOS, cut to `data.seq_len` keeping the start (and the EOS). A
conversation (turns) has no one source text: a bad record.

Arrays: `input_ids` and `attention_mask` padded on the left (the completions follow every row's last
column; an encoder-decoder's on the right, as its sources are), `weight`, and `record`, the row's index in
the records, whose fields the reward functions get.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from jaxft.data import seq2seq, sft
from jaxft.data.sources import Records

TURN_FIELDS = ("messages", "conversations")


@dataclasses.dataclass
class Prompt:
    text: str  # what is tokenized (the template applied where there is one)
    value: object  # what reward functions get as the prompt: the text, or the turns
    document: bool  # a document's beginning (truncated on the right), not a prompt (on the left)


def prompt_of(row, where: str, renderer: sft.Renderer, text_field: str, fields: sft.Fields = sft.Fields()) -> Prompt:
    if not isinstance(row, dict):
        raise sft.BadRecord(f"{where}: expected a JSON object, got {type(row).__name__}")
    if "prompt" in row:
        p = row["prompt"]
        if isinstance(p, str):
            if not p.strip():
                raise sft.BadRecord(f"{where}: empty 'prompt'")
            return Prompt(p, p, False)
        turns = sft.completed(sft.turns(p, where, "prompt"), row, where, " in 'prompt'")
        return Prompt(_rendered(renderer, turns, row, where), turns, False)
    if any(k in row for k in TURN_FIELDS) or "instruction" in row or sft.pair_values(row, where, fields) is not None:
        # an Alpaca record's `output` is the reference answer, which may be absent: a stand-in, dropped below
        turns = sft.conversation({**row, "output": row.get("output") or "-"}, where, fields) \
            if "instruction" in row else _without_answer(row, where, fields)
        if turns[-1]["role"] == "assistant":
            turns = turns[:-1]
        if not turns or turns[-1]["role"] == "system":
            raise sft.BadRecord(f"{where}: no prompt before the answer")
        return Prompt(_rendered(renderer, turns, row, where), turns, False)
    text = row.get(text_field)
    if not isinstance(text, str) or not text.strip():
        raise sft.BadRecord(f"{where}: no prompt: expected a 'prompt' field, a conversation ('messages', "
                            f"'conversations', 'instruction') or a text in field {text_field!r} (fields: "
                            f"{', '.join(map(str, row))})")
    return Prompt(text, text, True)


def _rendered(renderer: sft.Renderer, turns: list[dict], row: dict, where: str) -> str:
    """The turns with the generation prompt, the record's `tools` listed as the template lists them."""
    tools = sft.record_tools(row, where)
    renderer.check_tools(turns, tools)
    return renderer(turns, add_generation_prompt=True, tools=tools)


def source_of(row, where: str, text_field: str, fields: sft.Fields = sft.Fields()) -> Prompt:
    """An encoder-decoder's prompt: the source text its encoder reads (the module docstring)."""
    if not isinstance(row, dict):
        raise sft.BadRecord(f"{where}: expected a JSON object, got {type(row).__name__}")
    one_text = ("an encoder-decoder reads one source text: expected a 'prompt' text, an Alpaca record, "
                "data.source_field / data.target_field or a text field")
    if "prompt" in row:
        if not isinstance(row["prompt"], str):
            raise sft.BadRecord(f"{where}: 'prompt' is a {type(row['prompt']).__name__} (a conversation?); {one_text}")
        return prompt_of(row, where, None, text_field, fields)
    if any(k in row for k in TURN_FIELDS):
        raise sft.BadRecord(f"{where}: a conversation (a list of turns); {one_text}")
    if "instruction" in row or sft.pair_values(row, where, fields) is not None:
        # as for a decoder, an Alpaca record's answer may be absent: a stand-in, not part of the source
        text = seq2seq.pair({**row, "output": row.get("output") or "-"} if "instruction" in row else row,
                            where, fields)[0]
        return Prompt(text, text, False)
    return prompt_of(row, where, None, text_field, fields)


def _without_answer(row: dict, where: str, fields: sft.Fields) -> list[dict]:
    """A conversation's turns; one that ends on the user's turn (a prompt only) is complete as it is."""
    key = next((k for k in TURN_FIELDS if k in row), None)
    if key is not None:
        turns = sft.turns(row[key], where, key)
        if turns and turns[-1]["role"] != "assistant":
            return sft.completed(turns, row, where)
    return sft.conversation(row, where, fields)


def encode(records: Records, tok, renderer: sft.Renderer, seq_len: int, text_field: str,
           fields: sft.Fields = sft.Fields(), skip_bad: bool = False,
           encoder_decoder: bool = False) -> tuple[dict[str, np.ndarray], sft.Encoded, list]:
    """-> (arrays, counts, each record's prompt as reward functions get it, None where skipped): the
    prompts of `records`, left-padded to seq_len (an encoder-decoder's sources right-padded); `record`
    indexes `records`."""
    rows, index, truncated, skipped, first = [], [], 0, 0, ""
    values = [None] * len(records.rows)
    special = {tok.bos_id, *(tok.eos if encoder_decoder else ())}  # left out of a document's prompt value
    for i, (row, where) in enumerate(zip(records.rows, records.where)):
        try:
            if encoder_decoder:  # the source, as the seq2seq task encodes it: its start and EOS kept
                p = source_of(row, where, text_field, fields)
                kept, cut = seq2seq.with_eos(tok, p.text, seq_len)
            else:
                p = prompt_of(row, where, renderer, text_field, fields)
                ids = tok.encode_special(p.text)
                if p.document and tok.bos_id is not None:  # a template brings its own BOS; a document gets it
                    ids = [tok.bos_id] + ids
                kept, cut = ids[:seq_len] if p.document else ids[-seq_len:], len(ids) > seq_len
            if not kept:
                raise sft.BadRecord(f"{where}: the prompt renders to no tokens")
        except sft.BadRecord as e:
            msg = sft.skip_or_raise(e, where, skip_bad)
            skipped, first = skipped + 1, first or msg
            continue
        truncated += cut
        rows.append(kept)
        index.append(i)
        # a document's prompt is the part the policy sees
        values[i] = tok.decode([t for t in kept if t not in special]).strip() if p.document else p.value
    n = len(rows)
    arrays = {"input_ids": np.full((n, seq_len), tok.pad_id, np.int32), "attention_mask": np.zeros((n, seq_len), np.int32),
              "weight": np.ones((n,), np.float32), "record": np.asarray(index, np.int32)}
    for r, ids in enumerate(rows):
        at = slice(0, len(ids)) if encoder_decoder else slice(seq_len - len(ids), seq_len)
        arrays["input_ids"][r, at], arrays["attention_mask"][r, at] = ids, 1
    return arrays, sft.Encoded([(ids, [0] * len(ids)) for ids in rows], truncated, skipped, first), values
