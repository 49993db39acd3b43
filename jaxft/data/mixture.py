"""Language-model data (causal_lm, sft) from one source or a mixture `data.name='a+b'`.

Each source becomes its own rows (packed or padded), so a row never mixes sources; the rows are
joined, each remembering its source: `data.weights` samples the sources by weight (see
`jaxft.data.iterator.Batches`), and evaluation reports the loss of each source next to the total.
A source without an eval split gives its last `data.eval_holdout` records to evaluation.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from jaxft.data import sft, tasks
from jaxft.data.sources import Records
from jaxft.errors import JaxftError


@dataclasses.dataclass
class Mixture:
    train: dict[str, np.ndarray]
    eval: dict[str, np.ndarray] | None
    groups: np.ndarray  # the source of each training row, 0..K-1
    weights: list[float] | None  # sampling weights, or None: every row once per epoch
    names: list[str]  # the sources' short names (eval/loss/<name>)


def source_names(names: list[str]) -> list[str]:
    """'path/to/alpaca_en_demo.json' -> 'alpaca_en_demo'; repeated names get their index."""
    short = [Path(n).stem if Path(n).suffix else n.replace("/", "_") for n in names]
    return [s if short.count(s) == 1 else f"{s}{i}" for i, s in enumerate(short)]


def parse_weights(text: str, n: int) -> list[float] | None:
    if not str(text).strip():
        return None
    try:
        w = [float(x) for x in str(text).split(",")]
    except ValueError:
        w = []
    if len(w) != n or any(not x > 0 for x in w):
        raise JaxftError(f"data.weights={text!r}: expected {n} positive numbers separated by commas, one per source "
                         f"of data.name")
    return w


def holdout(train: Records, ev: Records | None, n: int) -> tuple[Records, Records | None]:
    if ev is not None or not n:
        return train, ev
    if n >= len(train.rows):
        raise JaxftError(f"data.eval_holdout={n}: the source has only {len(train.rows)} records")
    return Records(train.rows[:-n], train.where[:-n]), Records(train.rows[-n:], train.where[-n:])


def load(d, tok, task: str, sources: list[tuple[str, Records, Records | None, str]], log) -> Mixture:
    """sources: (name, train records, eval records or None, text field) each."""
    seq_len = int(d.seq_len)
    names = source_names([s[0] for s in sources])
    renderer = None
    if task == "sft":
        template, where = sft.chat_template(tok, str(d.get("chat_template", "")))
        renderer = sft.Renderer(template, sft.special_strings(tok), where)
        log(f"sft: chat template from {where}; loss on {'every token' if d.train_on_prompt else 'responses only'}")
    fields = sft.Fields(str(d.get("source_field", "")), str(d.get("target_field", "")))

    def arrays(records: Records, name: str, text_field: str, split: str):
        if task == "causal_lm":
            return tasks.causal_lm(records, tok, seq_len, text_field, segments=bool(d.packing))[0]
        enc = sft.examples(records, tok, renderer, seq_len, fields, bool(d.train_on_prompt), bool(d.skip_bad_records))
        if not enc.examples:
            raise JaxftError(f"data source {name!r} ({split}): no usable SFT record")
        out = (sft.pack if d.packing else sft.padded)(enc.examples, seq_len, tok.pad_id)
        fill = out["attention_mask"].mean()
        log(f"sft {name} ({split}): {len(enc.examples)} examples, {enc.truncated} longer than data.seq_len={seq_len} "
            f"truncated (prompt cut from the left, response from the right), {enc.skipped} bad records skipped"
            + (f" (first: {enc.first_skip})" if enc.skipped else "")
            + f"; {len(out['input_ids'])} rows {'packed' if d.packing else 'padded'}, {100 * fill:.1f}% real tokens")
        return out

    trains, evals, eval_groups = [], [], []
    for k, ((_, train_rec, eval_rec, text_field), name) in enumerate(zip(sources, names)):
        train_rec, eval_rec = holdout(train_rec, eval_rec, int(d.get("eval_holdout", 0)))
        trains.append(arrays(train_rec, name, text_field, "train"))
        if eval_rec is not None and eval_rec.rows:
            evals.append(arrays(eval_rec, name, text_field, "eval"))
            eval_groups.append(np.full(len(evals[-1]["weight"]), k))
    if len({frozenset(a) for a in trains + evals}) > 1:  # e.g. packed causal_lm blocks next to padded ones
        raise JaxftError(f"data.name={d.name!r}: the sources give different array fields")
    join = lambda parts: {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}  # noqa: E731
    train = join(trains)
    groups = np.concatenate([np.full(len(t["weight"]), k) for k, t in enumerate(trains)])
    ev = join(evals) if evals else None
    if ev is not None and len(sources) > 1:  # one-hot source of each eval row: per-source losses
        ev["task_weight"] = np.eye(len(sources), dtype=np.float32)[np.concatenate(eval_groups)]
    return Mixture(train, ev, groups, parse_weights(d.get("weights", ""), len(sources)), names)
