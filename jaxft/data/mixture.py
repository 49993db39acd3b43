"""Language-model data (causal_lm, sft, seq2seq) from one source or a mixture `data.name='a+b'`.

Each source becomes its own rows (packed or padded), so a row never mixes sources; the rows are
joined, each remembering its source: `data.weights` samples the sources by weight (see
`jaxft.data.iterator.Batches`), and evaluation reports the loss of each source next to the total.
A source without an eval split gives its last `data.eval_holdout` records to evaluation. The arrays
are cached (`data.cache_dir`), so a rerun or resume does not tokenize again.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path

import numpy as np

from jaxft import storage
from jaxft.data import preference, seq2seq, sft, tasks
from jaxft.data.sources import Records, pair_fields
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
    """The last `n` training records evaluate when there is no eval split (taken before
    data.max_train_examples cuts the rest, so the eval records do not depend on that cut)."""
    if ev is not None or not n:
        return train, ev
    if n >= len(train.rows):
        raise JaxftError(f"data.eval_holdout={n}: the source has only {len(train.rows)} records")
    return Records(train.rows[:-n], train.where[:-n]), Records(train.rows[-n:], train.where[-n:])


# ---------------------------------------------------------------------------------------------
# Tokenize once: arrays cached under data.cache_dir, keyed by the records' content, the tokenizer's
# files and every setting that changes the arrays.

CACHE_VERSION = 2  # bump when the arrays' recipe changes


def cache_key(records: Records, tok, settings: dict) -> str:
    h = hashlib.sha256(json.dumps([CACHE_VERSION, settings], sort_keys=True, default=str).encode())
    h.update(json.dumps(records.rows, sort_keys=True, ensure_ascii=False, default=str).encode())
    h.update(json.dumps(list(records.where)).encode())  # the log line names records by file and line
    for f in tok.files():
        h.update(f.name.encode() + Path(f).read_bytes())
    return h.hexdigest()[:32]


def cache_dir(d) -> Path | None:
    where = str(d.get("cache_dir", ""))
    if where == "none":
        return None
    return Path(where or storage.user_cache()) / "data"


def read_cache(d, key: str):
    root = cache_dir(d)
    if root is None or not (root / f"{key}.npz").is_file():
        return None
    try:
        with np.load(root / f"{key}.npz") as z:
            arrays = {k: z[k] for k in z.files if k != "__log__"}
            return arrays, str(z["__log__"])
    except Exception:  # noqa: BLE001  (a damaged entry is rebuilt)
        return None


def write_cache(d, key: str, arrays: dict, line: str):
    root = cache_dir(d)
    if root is None:
        return
    try:
        root.mkdir(parents=True, exist_ok=True)
        tmp = root / f".{key}.{os.getpid()}.npz"
        np.savez(tmp, **arrays, __log__=np.asarray(line))
        os.replace(tmp, root / f"{key}.npz")  # atomic: processes writing the same entry do not clash
    except OSError:
        pass  # a read-only cache only costs the tokenization next time


def load(d, tok, task: str, sources: list[tuple[str, Records, Records | None, str]], log,
         decoder_start_id: int | None = None) -> Mixture:
    """sources: (name, train records, eval records or None, text field) each. `decoder_start_id`: the
    model's decoder start token (seq2seq; None: the tokenizer's pad id)."""
    seq_len = int(d.seq_len)
    if task == "span_corruption":  # packed blocks of the length whose corrupted input fills seq_len
        from jaxft.data.span_corruption import raw_length

        seq_len = raw_length(seq_len)
    target_len = int(d.get("target_len", 0)) or seq_len
    names = source_names([s[0] for s in sources])
    renderer = None
    if task in ("sft", "dpo", "reward"):
        renderer = sft.renderer(tok, str(d.get("chat_template", "")), str(d.get("chat_template_kwargs", "")))
        scored = "each pair's two answers" if task != "sft" else "every token" if d.train_on_prompt else "responses only"
        log(f"{task}: chat template from {renderer.where}"
            + (f" with {d.chat_template_kwargs}" if renderer.variables else "") + f"; loss on {scored}")
    settings = {"task": task, "seq_len": seq_len, "packing": bool(d.packing), "text_field": None,
                "train_on_prompt": bool(d.train_on_prompt), "skip_bad": bool(d.skip_bad_records),
                "template": renderer and renderer.template, "fields": None}
    if renderer and renderer.variables:  # only then, as for seq2seq below
        settings.update(template_variables=renderer.variables)
    if task == "seq2seq":  # only then, so the other tasks' cache keys stay as they were
        settings.update(target_len=target_len, decoder_start=decoder_start_id, packing=False, train_on_prompt=False)
    if task in ("dpo", "reward"):  # padded pairs, scored on their answers: neither setting applies
        settings.update(packing=False, train_on_prompt=False)

    def arrays(records: Records, name: str, text_field: str, split: str, fields: sft.Fields):
        key = cache_key(records, tok, {**settings, "text_field": text_field, "fields": dataclasses.astuple(fields)})
        hit = read_cache(d, key)
        if hit is not None:
            out, line = hit
        elif task in ("causal_lm", "masked_lm", "span_corruption"):
            out, line = tasks.causal_lm(records, tok, seq_len, text_field, segments=bool(d.packing))[0], ""
        elif task == "seq2seq":
            enc = seq2seq.examples(records, tok, seq_len, target_len, fields, bool(d.skip_bad_records))
            if not enc.examples:
                raise JaxftError(f"data source {name!r} ({split}): no usable source -> target record")
            start = tok.pad_id if decoder_start_id is None else decoder_start_id
            out = seq2seq.padded(enc.examples, seq_len, target_len, tok.pad_id, start)
            line = (f"{len(enc.examples)} source -> target pairs, {enc.cut_sources} sources longer than "
                    f"data.seq_len={seq_len} and {enc.cut_targets} targets longer than target length {target_len} "
                    f"truncated (their start kept, EOS last), {enc.skipped} bad records skipped"
                    + (f" (first: {enc.first_skip})" if enc.skipped else "")
                    + f"; {100 * out['attention_mask'].mean():.1f}% real source tokens, "
                    f"{100 * (out['labels'] >= 0).mean():.1f}% real target tokens")
        elif task in ("dpo", "reward"):
            out, enc = preference.encode(records, tok, renderer, seq_len, bool(d.skip_bad_records))
            if not enc.examples:
                raise JaxftError(f"data source {name!r} ({split}): no usable preference pair")
            rejected = {k: out[preference.REJECTED + k] for k in ("input_ids", "attention_mask", "loss_mask")}
            if split == "train" and all(np.array_equal(out[k], v) for k, v in rejected.items()):
                # else exit 0: the loss is log 2 and its gradient 0 from the first step, nothing learned
                raise JaxftError(f"data source {name!r}: in every training pair the chosen and rejected answers are "
                                 f"the same tokens (after truncation to data.seq_len={seq_len}): expected pairs that "
                                 "prefer one answer")
            line = (f"{len(enc.examples)} preference pairs, {enc.truncated} with an answer longer than data.seq_len="
                    f"{seq_len} truncated (prompt cut from the left, answer from the right), {enc.skipped} bad records "
                    "skipped" + (f" (first: {enc.first_skip})" if enc.skipped else "")
                    + f"; {50 * (out['attention_mask'].mean() + out[preference.REJECTED + 'attention_mask'].mean()):.1f}%"
                    " real tokens")
        else:
            enc = sft.examples(records, tok, renderer, seq_len, fields, bool(d.train_on_prompt),
                               bool(d.skip_bad_records))
            if not enc.examples:
                raise JaxftError(f"data source {name!r} ({split}): no usable SFT record")
            out = (sft.pack if d.packing else sft.padded)(enc.examples, seq_len, tok.pad_id)
            line = (f"{len(enc.examples)} examples"
                    + (f" ({enc.split} conversations one example per answer: the chat template rewrites earlier "
                       "turns)" if enc.split else "")
                    + f", {enc.truncated} longer than data.seq_len={seq_len} truncated "
                    f"(prompt cut from the left, response from the right), {enc.skipped} bad records skipped"
                    + (f" (first: {enc.first_skip})" if enc.skipped else "")
                    + f"; {len(out['input_ids'])} rows {'packed' if d.packing else 'padded'}, "
                    f"{100 * out['attention_mask'].mean():.1f}% real tokens")
        if hit is None:
            write_cache(d, key, out, line)
        if line:
            log(f"{task} {name} ({split}): {line}" + (" [tokenized earlier: data cache]" if hit else ""))
        return out

    trains, evals, eval_groups = [], [], []
    for k, ((source, train_rec, eval_rec, text_field), name) in enumerate(zip(sources, names)):
        fields = sft.Fields(*pair_fields(d, source))  # data.source_field / target_field, else a bundled set's own
        train_rec, eval_rec = holdout(train_rec, eval_rec, int(d.get("eval_holdout", 0)))
        trains.append(arrays(train_rec, name, text_field, "train", fields))
        if eval_rec is not None and eval_rec.rows:
            evals.append(arrays(eval_rec, name, text_field, "eval", fields))
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
