"""Preference pairs (DPO, reward models): one prompt answered twice, `chosen` and `rejected` -> two rows of token ids.

Record formats, recognised by their fields (every one has `chosen` and `rejected`):
- ShareGPT (LLaMA-Factory's dpo_en_demo): `{"conversations": [{"from", "value"}, ...], "chosen": {"from":
  "gpt", "value"}, "rejected": {...}}`; `messages` ({"role", "content"} turns) works the same way.
- TRL's standard format: `{"prompt": text, "chosen": text, "rejected": text}`.
- TRL's conversational format: `prompt` a list of turns, `chosen` and `rejected` lists of assistant turns.
- Implicit prompt (TRL): no prompt field, `chosen` and `rejected` whole conversations; the turns before
  the last are the prompt and must be the same on both sides.
An answer may be a text, one turn, or a list of turns; its last turn must be the assistant's.

Each side is rendered as SFT renders a conversation (`jaxft.data.sft`: the chat template, BOS/EOS,
the truncation rule) and the loss mask covers the last assistant turn only: the answer being compared.
Rows are padded: `input_ids`, `attention_mask`, `loss_mask` for the chosen answer and the same three
with a `rejected_` prefix.
"""

from __future__ import annotations

import numpy as np

from jaxft.data import sft
from jaxft.data.sources import Records

REJECTED = "rejected_"  # prefix of the rejected answer's arrays


def is_pair(row) -> bool:
    return isinstance(row, dict) and {"chosen", "rejected"} <= set(row)


def detect(records: Records) -> bool:
    """Whether the first record is a preference pair (for choosing the task when data.task is empty)."""
    return bool(records.rows) and is_pair(records.rows[0])


def _turns(value, where: str, what: str) -> list[dict]:
    """A text (one assistant turn), a turn, or a list of turns (ShareGPT's or chat's) -> [{"role", "content"}, ...]."""
    if isinstance(value, str):
        return [{"role": "assistant", "content": value}]
    return sft.turns([value] if isinstance(value, dict) else value, where, what)


def _prompt(row: dict, where: str) -> list[dict] | None:
    if "prompt" in row:
        p = row["prompt"]
        if isinstance(p, str):
            return [{"role": "user", "content": p}]
        return _turns(p, where, "prompt")
    for key in ("messages", "conversations"):
        if key in row:
            return sft.turns(row[key], where, key)
    return None


def pair(row, where: str) -> tuple[list[dict], list[dict]]:
    """One record -> (chosen conversation, rejected conversation), each ending in the assistant's answer."""
    if not isinstance(row, dict):
        raise sft.BadRecord(f"{where}: expected a JSON object, got {type(row).__name__}")
    for name in ("chosen", "rejected"):
        if row.get(name) is None:
            raise sft.BadRecord(f"{where}: missing field {name!r} (fields: {', '.join(map(str, row))})")
    prompt = _prompt(row, where)
    chosen, rejected = _turns(row["chosen"], where, "chosen"), _turns(row["rejected"], where, "rejected")
    if prompt is None:  # implicit prompt: both sides are whole conversations sharing all but the last turn
        if chosen[:-1] != rejected[:-1]:
            raise sft.BadRecord(f"{where}: 'chosen' and 'rejected' are whole conversations (no 'prompt', 'messages' "
                                "or 'conversations' field) whose turns before the last differ: expected one prompt")
        prompt, chosen, rejected = chosen[:-1], chosen[-1:], rejected[-1:]
    out = []
    for name, answer in (("chosen", chosen), ("rejected", rejected)):
        if answer[-1]["role"] != "assistant":
            raise sft.BadRecord(f"{where}: {name!r} ends with a {answer[-1]['role']} turn, expected the assistant's answer")
        if (prompt + answer)[0]["role"] == "assistant":
            raise sft.BadRecord(f"{where}: no prompt before the {name} answer")
        out.append(sft.completed(prompt + answer, row, where, f" in {name!r}"))
    return out[0], out[1]


def encode(records: Records, tok, renderer: sft.Renderer, seq_len: int,
           skip_bad: bool = False) -> tuple[dict[str, np.ndarray], sft.Encoded]:
    """-> (padded arrays, counts): `Encoded.examples` holds the chosen sides; truncated counts pairs."""
    chosen, rejected, truncated, skipped, first = [], [], 0, 0, ""
    for row, where in zip(records.rows, records.where):
        try:
            sides = []
            for name, messages in zip(("chosen", "rejected"), pair(row, where)):
                ids, mask = sft.encode(renderer.last_answer(messages, sft.record_tools(row, where)), tok)
                if not any(mask):
                    raise sft.BadRecord(f"{where}: the {name} answer renders to no tokens")
                sides.append(sft.truncate(ids, mask, seq_len, tok.bos_id))
        except sft.BadRecord as e:
            msg = sft.skip_or_raise(e, where, skip_bad)
            skipped, first = skipped + 1, first or msg
            continue
        truncated += sides[0][2] or sides[1][2]
        chosen.append(sides[0][:2])
        rejected.append(sides[1][:2])
    arrays = sft.padded(chosen, seq_len, tok.pad_id)
    arrays.update({REJECTED + k: v for k, v in sft.padded(rejected, seq_len, tok.pad_id).items() if k != "weight"})
    return arrays, sft.Encoded(chosen, truncated, skipped, first)
