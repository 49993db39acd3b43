"""Evaluate a trained model on a config's data.

  python -m jaxft.evaluate --config=configs/NAME.py [--config.KEY=VALUE ...] --checkpoint=DIR
      [--split=validation|train] [--max_examples=N] [--max_new_tokens=N] [--num_beams=N]
      [--demonstration_sets=N] [--out=DIR]

`--checkpoint` is a training workdir (its newest Orbax checkpoint, restored as a resume restores it),
one step directory `WORKDIR/checkpoints/STEP`, or an export: a HF model directory, or a HF PEFT /
jaxft adapter directory applied to the config's base model (`model.path`).
- classification: accuracy, precision/recall/F1 (macro, micro and per class, by label name) of the
  argmax predictions, and the loss; with LM-BFF's demonstrations (`data.demonstrations`),
  `--demonstration_sets=N` predicts from the class logits averaged over N independently drawn sets
  of demonstrations per example (Gao et al. 2021's ensemble; set 0 is training's, and the loss is
  its) and adds `eval/single_set_accuracy`, the sets' mean accuracy alone;
- generation tasks (sft; source/target pairs on an encoder-decoder): an answer generated for each
  distinct prompt of the split (greedy unless --num_beams; `eval.repetition_penalty`; prompts that
  share several references, as E2E's, are scored against all), ROUGE-1/2/L, BLEU and exact match
  (`jaxft.metrics`: Chinese on characters), and the split's loss and perplexity; on a mixture, each
  source's records read with its own fields and also scored alone (`eval/rougeL/<source>`, ...);
- token classification (NER): the loss, accuracy and per-tag precision/recall/F1 over the tagged words,
  and with tag names (`B-PER`, ...) seqeval's entity precision, recall and F1 (`jaxft.entities`);
  predictions.jsonl holds each sentence's words, true and predicted tags;
- other tasks (a reward model's preference pairs, language modelling): what training's eval reports,
  the split's loss and accuracy (a reward model's: the share of pairs whose chosen answer scores
  higher, and the mean rewards; a language model's: perplexity);
- DPO: answers generated for the split's prompts, scored against the chosen answers as above (the
  DPO loss needs the run's starting point: training's eval reports it);
- GRPO and PPO (policies trained on rewards): greedy completions of the split's prompts, scored by the run's
  reward functions (`eval/reward`, as training's eval).
Outputs: `metrics.json` and `predictions.jsonl` (prompt, reference, prediction; a classifier's class
logits too, `scores` by label name) in --out (default
`<workdir>/eval/<split>-<step>` for a training checkpoint, `<export>/../eval/<split>-<export name>`
for an export), and the metrics as `eval/...` TensorBoard scalars at the checkpoint's step (an export
counts as step 0): in the run's own `<workdir>/tensorboard` by default, else `<out>/tensorboard`.
Bad input (a missing checkpoint, an unknown split, a checkpoint that does not fit the config) is one
line `error: ...` and exit status 2, with nothing written.

Training's periodic eval generates too with `eval.generate_examples=N` (`generation_eval`).
"""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxft.errors import JaxftError, printable_stdout

SPLITS = ("validation", "train")
GENERATION_TASKS = ("sft", "seq2seq", "dpo")  # dpo: the prompts of the held-out pairs, the chosen answers the references


# ---------------------------------------------------------------------------------------------
# Generation and its scores: shared with training's periodic eval.


def generate_texts(model, params, prompts: list[list[int]], tok, *, batch_size: int, max_new_tokens: int,
                   num_beams: int = 1, repetition_penalty: float = 1.0, stop: list[int] | None = None,
                   progress=None) -> list[str]:
    """Decoded answers to `prompts` (`jaxft.generate.answer_text`: text up to the first of the `stop` ids,
    default EOS, no character cut short at the end), `batch_size` at a time. Every batch has the same
    shape (left-padded to the longest prompt, the last filled up), so generation compiles once."""
    from jaxft.generate import answer_text, generate

    eos = stop or [tok.eos_id if tok.eos_id is not None else model.cfg.eos_token_id]
    width = max(map(len, prompts))
    out = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        rows = chunk + [chunk[0]] * (batch_size - len(chunk))
        ids = np.array([[tok.pad_id] * (width - len(r)) + list(r) for r in rows], np.int32)
        mask = np.array([[0] * (width - len(r)) + [1] * len(r) for r in rows], np.int32)
        new = generate(model, params, ids, mask, max_new_tokens=max_new_tokens, num_beams=num_beams,
                       repetition_penalty=repetition_penalty, eos_token_id=eos, pad_token_id=tok.pad_id)
        for row in np.asarray(new)[: len(chunk)].tolist():
            out.append(answer_text(tok, row, eos).strip())
        if progress is not None:
            progress.update(len(chunk))
    return out


def decoding(config, tok, encoder_decoder: bool) -> dict:
    """The `eval.*` decoding settings, as `generate_texts` takes them (training's and evaluate's eval alike);
    a decoder's answers stop where the chat template ends them (`jaxft.data.sft.stop_ids`)."""
    from jaxft.data import sft

    e = config.eval
    stop = None if encoder_decoder or tok is None else sft.stop_ids(
        tok, str(config.data.chat_template), str(config.data.get("chat_template_kwargs", "")))
    return dict(max_new_tokens=e.max_new_tokens, num_beams=e.num_beams, repetition_penalty=float(e.repetition_penalty),
                stop=stop)


def generation_scores(predictions: list[str], references: list, sources: list[str] | None = None) -> dict[str, float]:
    """ROUGE-1/2/L F-measures, corpus BLEU (0-100) and exact match of the final answers (`final_answer`:
    reasoning in <think> tags is not scored; predictions.jsonl keeps it), and where references make tool
    calls, `tool_call_accuracy` over those (`jaxft.scores.tool_call_accuracy`); a reference may be a list.
    With `sources` (each prediction's source in a mixture), also each source's, as "<metric>/<source>"."""
    from jaxft import metrics
    from jaxft.scores import final_answer

    def scores(preds, refs):
        preds = [final_answer(p) for p in preds]
        refs = [[final_answer(x) for x in r] if isinstance(r, list) else final_answer(r) for r in refs]
        out = {**metrics.rouge(preds, refs), "bleu": metrics.bleu(preds, refs),
               "exact_match": metrics.exact_match(preds, refs)}
        calls = metrics.tool_call_accuracy(preds, refs)
        return out if calls is None else {**out, "tool_call_accuracy": calls}

    out = scores(predictions, references)
    names = list(dict.fromkeys(sources or ()))
    for name in names if len(names) > 1 else ():
        mine = [i for i, s in enumerate(sources) if s == name]
        out.update({f"{k}/{name}": v for k, v in scores([predictions[i] for i in mine],
                                                        [references[i] for i in mine]).items()})
    return out


def generation_prompts(config, data, split: str, encoder_decoder: bool, limit: int = 0):
    """-> (distinct prompt ids, their references (lists), the source of each) of a split's records.
    Each source of a mixture reads its own records with its own pair fields (data.*_field, else that
    bundled set's); its prompts are made distinct, then the sources are taken in turn, so the first
    `limit` prompts (all when 0) hold every source."""
    from jaxft.data import generation, mixture, sft, sources

    d = config.data
    names = str(d.name).split("+")
    short = mixture.source_names(names)  # as eval/loss/<source> names them
    parts = []
    for name, label, records in zip(names, short, data.records[split], strict=True):
        if records is None or not records.rows:
            continue
        prompts, refs = generation.prompts_and_references(
            records, data.tokenizer, d.seq_len, fields=sft.Fields(*sources.pair_fields(d, name)),
            chat_template=d.chat_template, chat_template_kwargs=d.chat_template_kwargs, encoder_decoder=encoder_decoder,
            max_new_tokens=config.eval.max_new_tokens, skip_bad=d.skip_bad_records)
        prompts, refs = generation.distinct(prompts, refs)
        parts.append([(p, r, label) for p, r in zip(prompts, refs)])
    rows = generation.interleave(parts)
    if not rows:
        raise JaxftError(f"data.name={d.name!r}: no usable record in the {split} split to generate from")
    rows = rows[:limit] if limit else rows
    return [r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows]


def prediction_rows(tok, prompts, refs, predictions, tags) -> list[dict]:
    """predictions.jsonl's rows: prompt, reference (a list where several), prediction (and source, on a mixture)."""
    mixed = len(set(tags)) > 1
    return [{"prompt": tok.decode(p), "reference": r[0] if len(r) == 1 else r, "prediction": pred,
             **({"source": t} if mixed else {})} for p, r, pred, t in zip(prompts, refs, predictions, tags)]


def write_jsonl(path, rows: list[dict]):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def generation_eval(config, data, model, workdir=None, objective=None):
    """Training's periodic generation (`eval.generate_examples` > 0 on a generation task): a function
    of (the merged parameters, step) -> {"eval/rouge1", ..., "eval/bleu", "eval/exact_match"}, and each
    source's ("eval/rougeL/<source>", ...) on a mixture; for a policy that learns from its own
    completions (an objective with a `rollout`: GRPO, PPO), `jaxft.grpo.reward_eval`'s rewards; else None.
    With a `workdir` (an epath), the answers go to `samples/step_N.jsonl` there, so a run's outputs can be
    read as it trains. `objective`: the run's (default: the data task's)."""
    from jaxft import objectives
    from jaxft.models import family

    if objective is None:
        objective = objectives.for_task(data.task, config.train, model.cfg, config.method)
    if objective.rollout is not None:  # a policy's eval: the rewards of its completions
        from jaxft.grpo import reward_eval

        return reward_eval(config, data, model, workdir)
    n = int(config.eval.generate_examples)
    if not n or data.task not in GENERATION_TASKS or not any(r is not None and r.rows
                                                            for r in (data.records or {}).get("validation", ())):
        return None
    encoder_decoder = family.of(model.cfg).encoder_decoder
    prompts, refs, tags = generation_prompts(config, data, "validation", encoder_decoder, n)
    batch = config.eval.batch_size or config.train.batch_size
    settings = decoding(config, data.tokenizer, encoder_decoder)

    def run(params, step: int) -> dict[str, float]:
        predictions = generate_texts(model, params, prompts, data.tokenizer, batch_size=batch, **settings)
        if workdir is not None and jax.process_index() == 0:
            rows = prediction_rows(data.tokenizer, prompts, refs, predictions, tags)
            (workdir / "samples").mkdir(parents=True, exist_ok=True)
            write_jsonl(workdir / "samples" / f"step_{step}.jsonl", rows)
        return {f"eval/{k}": v for k, v in generation_scores(predictions, refs, tags).items()}

    return run


# ---------------------------------------------------------------------------------------------
# What --checkpoint names.


def checkpoint_kind(path) -> tuple[str, Path, int | None]:
    """An (epath) path -> ("orbax", workdir, step or None for the newest) | ("adapter" | "model", directory, None)."""
    if not path.is_dir():
        raise JaxftError(f"--checkpoint={path}: no such directory")
    if (path / "checkpoints").is_dir():
        return "orbax", path, None
    if path.name == "checkpoints":
        return "orbax", path.parent, None
    if path.name.isdigit() and path.parent.name == "checkpoints":
        return "orbax", path.parent.parent, int(path.name)
    if (path / "adapter_config.json").is_file() or any(path.glob("*/adapter_config.json")):
        return "adapter", path, None
    if (path / "config.json").is_file():
        return "model", path, None
    raise JaxftError(f"--checkpoint={path}: not a training workdir (no checkpoints/), an Orbax step directory, a HF "
                     "model directory (config.json) or an adapter directory (adapter_config.json)")


def restore_trained(config, workdir: Path, step: int | None, cfg, base_root, data, mesh):
    """The run's model rebuilt from `config` (`jaxft.train.build_model`) with the trainable parameters
    of checkpoint `step` (the newest if None) -> (model, params, step). The checkpoint must have been
    made by this config's model and method."""
    from etils import epath

    from jaxft.checkpoint import HOW, Checkpoints, changed_settings, check_layout, run_settings
    from jaxft.peft.partition import flat, merge
    from jaxft.step import dynamic_loss_scale, init_state, make_optimizer
    from jaxft.train import build_model, quantize_base

    ckpt = Checkpoints(epath.Path(workdir), 1, 0)
    try:
        steps = ckpt.all_steps()
        if step is None and not steps:
            raise JaxftError(f"--checkpoint={workdir}: no checkpoint in {workdir / 'checkpoints'}")
        step = max(steps) if step is None else step
        if step not in steps:
            raise JaxftError(f"--checkpoint: no checkpoint of step {step} in {workdir / 'checkpoints'} (it holds "
                             f"{', '.join(map(str, steps)) or 'none'})")
        method, model, trainable, frozen = build_model(config, cfg, base_root, data, mesh)
        frozen = quantize_base(config, model.cfg, frozen)
        tx, _ = make_optimizer(config.optimizer, config.train.steps)
        if config.model.dtype == "float16":
            tx = dynamic_loss_scale(tx)
        state, _ = init_state(tx, trainable, config.train.seed, mesh, model.hooks)
        abstract = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
        where = workdir / "checkpoints" / str(step)

        def fits(meta):
            if meta.get("trainable") != sorted(flat(trainable)):
                raise JaxftError(f"--checkpoint={where}: it trained other parameters than method {method.name!r} of "
                                 "the config (another method or model?)")
            check_layout(model.cfg, meta, f"--checkpoint={where}")
            made = {k: v for k, v in meta.get("settings", {}).items() if k.split(".")[0] in ("model", "method")}
            changed = [c for c in changed_settings(made, run_settings(config)) if c[0] not in HOW]
            if changed:
                key, old, new = changed[0]
                raise JaxftError(f"{key}={new!r}: the checkpoint {where} was made with {key}={old!r}")

        state, _ = ckpt.restore(step, abstract, fits)
    finally:
        ckpt.close()
    return model, merge(state.params, frozen), step


def load_export(config, kind: str, path: Path, data, mesh):
    """A HF model directory, or an adapter directory on the config's base -> (model, params), checked
    against the data: the head its task needs, the number and names of its classes."""
    from jaxft import objectives, sharding
    from jaxft.generate import load
    from jaxft.models import family
    from jaxft.train import model_settings

    overrides = {k: v for k, v in model_settings(config, types.SimpleNamespace(pooling="")).items()
                 if k in ("dtype", "scan_layers", "attention")}
    if kind == "adapter":
        if not config.model.path:
            raise JaxftError(f"--checkpoint={path}: an adapter is applied to model.path, and model.path is empty "
                             "(this config builds its model from model.init): set --config.model.path=BASE_DIR")
        model, params, _ = load(config.model.path, str(path), **overrides)
    else:
        model, params, _ = load(str(path), **overrides)
    cfg = model.cfg
    want = objectives.head_for(data.task, family.of(cfg).heads) or data.task
    if cfg.head != want:
        raise JaxftError(f"--checkpoint={path}: a model with a {cfg.head} head does not fit data.task={data.task!r} "
                         f"(expected a {want} head)")
    if data.labels:
        names = tuple(str(v) for v in data.labels)
        if cfg.num_labels != len(names) or (cfg.labels and tuple(cfg.labels) != names):
            raise JaxftError(f"--checkpoint={path}: its classes {list(cfg.labels or range(cfg.num_labels))} are not "
                             f"the data's {list(names)}")
    if data.tokenizer is not None and data.tokenizer.vocab_size > cfg.vocab_size:
        raise JaxftError(f"--checkpoint={path}: vocab_size {cfg.vocab_size} is smaller than the tokenizer's "
                         f"{data.tokenizer.vocab_size}")
    return model, jax.device_put(params, sharding.replicated(mesh))


# ---------------------------------------------------------------------------------------------
# Evaluation.


def class_logits(model, params, arrays, batch_size: int, objective, progress=None, read=None) -> np.ndarray:
    """[N, C]: the objective's class logits of every row of `arrays` (a classifier's own, or cloze's label
    words at the mask); with `read`, read(outputs, batch) of every row instead."""
    read = read or objective.class_logits

    def logits(p, batch):
        return read(model.apply({"params": p}, **objective.inputs(batch)), batch)

    forward = jax.jit(logits)
    n, out = len(arrays["input_ids"]), []
    for start in range(0, n, batch_size):
        idx = np.minimum(np.arange(start, start + batch_size), n - 1)  # the last batch filled up: one shape
        out.append(np.asarray(forward(params, {k: v[idx] for k, v in arrays.items()}))[: n - start])
        if progress is not None:
            progress.update(min(batch_size, n - start))
    return np.concatenate(out)


def evaluate(config, checkpoint: str, *, split: str = "validation", max_examples: int = 0,
             max_new_tokens: int | None = None, num_beams: int | None = None, demonstration_sets: int = 1,
             out: str | None = None, log=print) -> dict:
    """The CLI's work: -> {"step", "split", "examples", "out", "metrics": {...}}; see the module docstring."""
    from jaxft import metrics, objectives, sharding, storage
    from jaxft.compilation_cache import cache_dir, compilation_cache
    from jaxft.config import validate
    from jaxft.train import load_data, load_model_config

    if split not in SPLITS:
        raise JaxftError(f"--split={split}: expected one of {', '.join(SPLITS)}")
    if max_examples < 0:
        raise JaxftError(f"--max_examples={max_examples}: expected 0 (all) or a positive number")
    if demonstration_sets < 1:
        raise JaxftError(f"--demonstration_sets={demonstration_sets}: expected a positive number (1: no ensemble)")
    if demonstration_sets > 1 and not int(config.data.get("demonstrations", 0)):
        raise JaxftError(f"--demonstration_sets={demonstration_sets}: ensembles LM-BFF's demonstrations, and "
                         "data.demonstrations=0: expected data.demonstrations >= 1 (a cloze task) or no ensemble")
    with config.unlocked():
        config.eval.max_new_tokens = config.eval.max_new_tokens if max_new_tokens is None else max_new_tokens
        config.eval.num_beams = config.eval.num_beams if num_beams is None else num_beams
        config.data.label_all_tokens = False  # tags scored per word (--split=train too), as training's eval does
    validate(config)
    kind, where, step = checkpoint_kind(storage.path(checkpoint, "--checkpoint"))  # absolute: Orbax needs it
    mesh = sharding.make_mesh(config.mesh)
    batch = config.eval.batch_size or config.train.batch_size
    shards = sharding.batch_shards(mesh)
    if batch % shards:
        raise JaxftError(f"eval batch {batch} must be divisible by the {shards} data-parallel shards of "
                         f"{sharding.described(mesh.shape.values())} (set eval.batch_size)")

    cfg, base_root, tokenizer_path = load_model_config(config)
    data = load_data(config, cfg, tokenizer_path)
    arrays = data.eval if split == "validation" else data.train
    if arrays is None:
        raise JaxftError(f"--split=validation: data.name={config.data.name!r} has no validation split (set "
                         "data.eval_name, or data.eval_holdout=N for the last N training records)")
    objective = objectives.for_task(data.task, config.train, cfg, config.method)
    if kind == "orbax":
        model, params, step = restore_trained(config, where, step, cfg, base_root, data, mesh)
        params_out = where
    else:
        model, params = load_export(config, kind, where, data, mesh)
        step, params_out = 0, where.parent
    if out:
        out_dir, tb_dir = storage.path(out, "--out"), storage.path(out, "--out") / "tensorboard"
    else:
        name = f"{split}-{step}" if kind == "orbax" else f"{split}-{where.name}"
        out_dir = storage.path(str(params_out / "eval" / name), "--out")
        tb_dir = storage.path(str(where / "tensorboard"), "--out") if kind == "orbax" else out_dir / "tensorboard"
    storage.check_writable_dir(out_dir, "--out")  # before the scoring, not a traceback once it is done

    # A run's workdir: its compilation cache, which holds the eval and generation steps its evals compiled.
    with compilation_cache(cache_dir(config.train.compilation_cache, where / "xla_cache") if kind == "orbax" else None):
        if objective.rollout is not None:  # a policy trained on rewards (GRPO): its greedy completions' rewards
            from jaxft.grpo import reward_scores

            scores, rows = reward_scores(config, data, model, params, split, max_examples)
        else:
            scores, rows = score_split(config, data, model, params, arrays, objective, mesh, batch, split,
                                       max_examples, demonstration_sets)

    # Only now, with everything computed, is anything written.
    if jax.process_index() == 0:
        storage.make_dir(out_dir, "--out")
        summary = {"checkpoint": str(checkpoint), "step": step, "split": split, "examples": len(rows),
                   "metrics": scores}
        (out_dir / "metrics.json").write_text(json.dumps(summary, indent=1, ensure_ascii=False) + "\n")
        write_jsonl(out_dir / "predictions.jsonl", rows)
        metrics.write_scalars(tb_dir, step, scores)
    what = f"at step {step}" if kind == "orbax" else f"of {where} (an export: TensorBoard step 0)"
    log(f"{split} {what}, {len(rows)} examples: " + " ".join(
        f"{k}={v:.4f}" for k, v in scores.items() if not any(f"/{m}/" in k for m in ("precision", "recall", "f1")))
        + f" | {out_dir}")
    return {"step": step, "split": split, "examples": len(rows), "out": str(out_dir), "metrics": scores}


def score_split(config, data, model, params, arrays, objective, mesh, batch: int, split: str, max_examples: int,
                demonstration_sets: int = 1):
    """-> (scores, prediction rows) of a split: the loss eval's figures, and a classifier's predictions
    (from the class logits averaged over `demonstration_sets` draws of LM-BFF's demonstrations) or a
    generation task's answers."""
    from tqdm import tqdm

    from jaxft import metrics, objectives, sharding
    from jaxft.models import family
    from jaxft.step import make_eval_step
    from jaxft.train import evaluate as loss_eval

    classifies = objective.class_logits is not None
    # The loss (and perplexity) over the split, as training's eval computes it. A DPO loss is measured
    # against the run's starting point, which a checkpoint does not hold: its eval runs during training.
    def first(a):  # --max_examples: the first rows (examples, pairs or blocks)
        return {k: v[:max_examples] for k, v in a.items()} if max_examples else a

    if classifies or data.task not in GENERATION_TASKS:
        arrays = first(arrays)
    scores = {}
    if objective.prepare is None:
        eval_step = jax.jit(make_eval_step(model, mesh, objective), out_shardings=sharding.replicated(mesh))
        scores = loss_eval(eval_step, types.SimpleNamespace(params=params), {}, arrays, mesh, batch,
                           objectives.has_perplexity(objective, model.cfg.head), model.cfg.labels, data.sources)
    tok = data.tokenizer
    if classifies:
        names = [str(v) for v in data.labels]
        with tqdm(total=len(arrays["input_ids"]) * demonstration_sets, desc="classify", file=sys.stdout,
                  dynamic_ncols=True) as bar:  # set k > 0 drawn as its turn comes: the bar moves from the start
            logits = np.stack([class_logits(model, params, first(data.demonstration_set(split, k)) if k else arrays,
                                            batch, objective, bar) for k in range(demonstration_sets)])
        mean = logits.mean(0)
        preds, refs = [names[i] for i in mean.argmax(-1)], [names[i] for i in arrays["labels"]]
        scores["eval/accuracy"] = metrics.accuracy(preds, refs)
        if demonstration_sets > 1:
            scores["eval/single_set_accuracy"] = float(np.mean(logits.argmax(-1) == arrays["labels"]))
        scores.update({f"eval/{k}": v for k, v in metrics.precision_recall_f1(preds, refs, names).items()})
        ids, real = arrays["input_ids"], arrays["attention_mask"] > 0
        if ids.ndim == 3:  # a row per class (cloze, words of several tokens): the first, on a causal LM up to its question's end
            ids, real = ids[:, 0], real[:, 0]
            if model.cfg.head == "causal_lm":
                real = real & (np.arange(ids.shape[1]) <= arrays["mlm_positions"][:, 0, :1])
        texts = [tok.decode(row[keep]) if tok else "" for row, keep in zip(ids, real)]
        rows = [{"prompt": t, "reference": r, "prediction": p, "scores": dict(zip(names, map(float, s)))}
                for t, p, r, s in zip(texts, preds, refs, mean)]
    elif data.task == "token_classification":  # the loss eval's figures (tags and entities), and each tagged word
        with tqdm(total=len(arrays["input_ids"]), desc="tag", file=sys.stdout, dynamic_ncols=True) as bar:
            preds = class_logits(model, params, arrays, batch, objective, bar, lambda out, b: jnp.argmax(out, -1))
        rows = tagged_rows(arrays, preds, [str(v) for v in data.labels], tok)
    elif data.task not in GENERATION_TASKS:  # scored pairs (a reward model): the loss eval's figures are all
        rows = []
    else:
        encoder_decoder = family.of(model.cfg).encoder_decoder
        prompts, refs, tags = generation_prompts(config, data, split, encoder_decoder, max_examples)
        with tqdm(total=len(prompts), desc="generate", file=sys.stdout, dynamic_ncols=True) as bar:
            preds = generate_texts(model, params, prompts, tok, batch_size=batch, progress=bar,
                                   **decoding(config, tok, encoder_decoder))
        scores.update({f"eval/{k}": v for k, v in generation_scores(preds, refs, tags).items()})
        rows = prediction_rows(tok, prompts, refs, preds, tags)
    return scores, rows


def tagged_rows(arrays, preds, names: list[str], tok) -> list[dict]:
    """predictions.jsonl's rows of tagged words: each sentence's words (as its tokens decode: the words a
    truncated sentence kept), their true and predicted tags."""
    rows = []
    for ids, labels, mask, pred in zip(arrays["input_ids"], arrays["labels"], arrays["attention_mask"], preds):
        starts = np.flatnonzero(labels >= 0)
        end = int(mask.sum()) - len(tok.eos)  # the words end where EOS / [SEP] is
        bounds = list(starts[1:]) + [end]
        rows.append({"words": [tok.decode(ids[a:b].tolist()).strip() for a, b in zip(starts, bounds)],
                     "reference": [names[i] for i in labels[starts]], "prediction": [names[i] for i in pred[starts]]})
    return rows


# ---------------------------------------------------------------------------------------------
# Command line.


def define_flags():
    """jaxft.evaluate's flags, next to the --config flag (and the rest) that importing jaxft.train defines."""
    from absl import flags

    import jaxft.train  # noqa: F401

    flags.DEFINE_string("checkpoint", None, "Training workdir, Orbax step directory, HF model or adapter directory.")
    flags.DEFINE_string("split", "validation", "validation or train.")
    flags.DEFINE_integer("max_examples", 0, "Evaluate the first N examples (distinct prompts; a language model's "
                         "rows) only; 0 = all.")
    flags.DEFINE_integer("max_new_tokens", None, "Longest generated answer (default: eval.max_new_tokens).")
    flags.DEFINE_integer("num_beams", None, "Beam search width; 1 is greedy (default: eval.num_beams).")
    flags.DEFINE_integer("demonstration_sets", 1, "Cloze with data.demonstrations: predict from the class logits "
                         "averaged over N drawn sets of demonstrations per example (LM-BFF's ensemble).")
    flags.DEFINE_string("out", None, "Where metrics.json, predictions.jsonl and TensorBoard events go.")


def parse_flags(argv):
    from absl import flags

    from jaxft.train import parse_flags as parse_train_flags

    args = parse_train_flags(argv)  # one-line usage errors, the config checked
    if not flags.FLAGS.checkpoint:
        print("error: --checkpoint=DIR is required (a training workdir, HF model or adapter directory)",
              file=sys.stderr)
        sys.exit(2)
    return args


def main(argv):
    from absl import flags, logging

    FLAGS = flags.FLAGS
    printable_stdout()
    logging.set_verbosity(logging.WARNING)
    try:
        evaluate(FLAGS.config, FLAGS.checkpoint, split=FLAGS.split, max_examples=FLAGS.max_examples,
                 max_new_tokens=FLAGS.max_new_tokens, num_beams=FLAGS.num_beams,
                 demonstration_sets=FLAGS.demonstration_sets, out=FLAGS.out)
    except JaxftError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)


def run():
    from absl import app

    define_flags()
    app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
    run()
