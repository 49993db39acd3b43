"""Train and evaluate: `python -m jaxft.train --config=configs/NAME.py [--config.KEY=VALUE] [--workdir=DIR]`.

Running the same command again resumes from the newest checkpoint in the workdir (the same run only:
its settings are checked). SIGTERM (preemption) saves a checkpoint and exits cleanly. Bad input, and a
NaN/Inf step, stop with a one-line error and exit status 2; nothing non-finite is ever saved.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import re
import signal
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from jaxft.compilation_cache import CACHE_HITS, cache_dir, compilation_cache

if __name__ == "__main__":  # `python -m jaxft.train`: a module that imports jaxft.train gets this one, not a
    sys.modules.setdefault("jaxft.train", sys.modules[__name__])  # second copy defining the same flags again

flags.DEFINE_string("workdir", None, "Where checkpoints, TensorBoard events and exports go (default: runs/<config>).")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0, for multi-host runs.")
flags.DEFINE_integer("num_processes", None, "Number of processes in a multi-host run.")
flags.DEFINE_integer("process_id", None, "This process's index in a multi-host run.")
flags.DEFINE_string("profile_steps", None, "START:END: a jax.profiler trace of these steps under <workdir>/profile "
                    "(tools/trace_summary.py sums it by kernel kind).")
config_flags.DEFINE_config_file("config", None, "A configs/*.py file.", lock_config=True)
FLAGS = flags.FLAGS


def log(message: str):
    """Process 0 prints; through tqdm, so a running progress bar is not broken."""
    if jax.process_index() == 0:
        from tqdm import tqdm

        tqdm.write(message)
        sys.stdout.flush()


# ---------------------------------------------------------------------------------------------
# Set-up: model, data, parameters.


@dataclasses.dataclass
class Data:
    train: dict
    eval: dict | None
    task: str
    labels: list | None
    tokenizer: object | None
    groups: np.ndarray | None = None  # a mixture's source of each training row
    weights: list | None = None  # its sampling weights (data.weights)
    sources: list | None = None  # its sources' names, for eval/loss/<name>
    # {"train": [Records of each source of data.name], "validation": [Records or None of each]}: for generation
    records: dict | None = None
    # (batch, position, first global row) -> batch: what is redrawn for every training batch (MLM masks)
    transform: object | None = None
    # {"train": [...], "validation": [...]}: each record's prompt as reward functions get it (GRPO), by index
    prompts: dict | None = None
    stop: list | None = None  # where the policy's completions end (GRPO): `jaxft.data.sft.stop_ids`
    # (split, k) -> a cloze split's arrays with demonstration set k (set 0: `train` or `eval` itself), for
    # LM-BFF's ensemble (`jaxft.evaluate --demonstration_sets`); None without data.demonstrations
    demonstration_set: object | None = None


def load_model_config(config):
    """-> (the family's config, base checkpoint directory or None, tokenizer path or None)."""
    from jaxft import hf

    if config.model.path:
        root = hf.resolve(config.model.path)
        cfg = hf.read_config(root)
        return cfg, root, config.model.tokenizer or str(root)
    return hf.config_from_dict(config.model.init.to_dict(), "model.init"), None, config.model.tokenizer or None


def model_settings(config, cfg) -> dict:
    """The config fields the run's config sets (how the model computes, not what it is); the
    trainer and `jaxft.plan` build the same model from them."""
    settings = dict(pooling=config.model.pooling or cfg.pooling, dtype=config.model.dtype,
                    scan_layers=config.model.scan_layers, remat=config.model.remat, attention=config.model.attention,
                    param_dtype=config.model.param_dtype)
    if config.model.router_aux_loss_coef >= 0 and getattr(cfg, "num_experts", 0):
        settings["router_aux_loss_coef"] = float(config.model.router_aux_loss_coef)
    return settings


def load_data(config, cfg, tokenizer_path) -> Data:
    from jaxft.errors import JaxftError

    data = _load_data(config, cfg, tokenizer_path)
    if data.task in ("causal_lm", "sft") and config.data.seq_len < 2:
        raise JaxftError(f"data.seq_len={config.data.seq_len}: a causal LM needs at least 2 tokens per sequence")
    if config.data.get("label_all_tokens", False) and data.task != "token_classification":
        raise JaxftError(f"data.label_all_tokens=True: labels every token of tagged words, and the task is "
                         f"{data.task}: expected data.task=token_classification (NER)")
    return data


def check_task(task: str, cfg, head: str = ""):
    """A data task (or `model.head`) the model has no head for is one error, not a failure mid-run."""
    from jaxft import objectives
    from jaxft.errors import JaxftError
    from jaxft.models import family

    heads = family.of(cfg).heads
    want = head or objectives.head_for(task, heads)
    if want is not None and want not in heads:
        kind = "an encoder-decoder" if family.of(cfg).encoder_decoder else "this"
        raise JaxftError(f"data.task={task!r} trains a {want} head, which {kind} {cfg.model_type} model does not have "
                         f"(its heads: {', '.join(heads)})")


def token_types(setting, pair_field, cfg) -> bool:
    """`data.token_type_ids`: `auto` gives sentence pairs token types on a model that embeds them (BERT's
    type_vocab_size 2), as HF's tokenizers and Trainer do; RoBERTa (one type) and decoders get none."""
    from jaxft.errors import JaxftError

    value = str(setting).strip().lower()
    if value == "auto":
        return bool(pair_field) and int(getattr(cfg, "type_vocab_size", 0) or 0) >= 2
    if value in ("true", "false"):
        return value == "true"
    raise JaxftError(f"data.token_type_ids={setting!r}: expected auto, True or False")


def _load_data(config, cfg, tokenizer_path) -> Data:
    from jaxft import objectives
    from jaxft.data import mixture, sft, sources, tasks
    from jaxft.errors import JaxftError
    from jaxft.models import family
    from jaxft.tokenizer import Tokenizer

    d, seq_len = config.data, config.data.seq_len
    if str(d.get("weights", "")).strip() and "+" not in str(d.name):  # else ignored: every example once per epoch
        raise JaxftError(f"data.weights={d.weights!r}: weights sample the sources of data.name='a+b', and "
                         f"data.name={d.name!r} names one source")
    declared = tasks.declared_labels(d.get("labels", ""))
    if d.name == "synthetic":
        n_labels = int(d.synthetic_labels)
        if declared:
            raise JaxftError(f"data.labels={d.labels!r}: data.name='synthetic' has the labels 0..N-1 of "
                             "data.synthetic_labels: expected data.labels empty")
        if n_labels < 0 or n_labels == 1:
            raise JaxftError(f"data.synthetic_labels={n_labels}: expected 0 (a causal LM) or at least 2 classes")
        task = "classification" if n_labels else "causal_lm"
        if d.task and d.task != task:  # synthetic ids make these two tasks only; another would be ignored
            raise JaxftError(f"data.task={d.task!r}: data.name='synthetic' with data.synthetic_labels={n_labels} "
                             f"is {task} (expected data.task={task!r} or empty)")
        make = lambda n, s: tasks.synthetic(n, seq_len, cfg.vocab_size, s, n_labels)  # noqa: E731
        train = make(int(d.synthetic_examples), config.train.seed)
        ev = make(max(int(d.synthetic_examples) // 8, config.train.batch_size), config.train.seed + 1)
        return Data(train, ev, task, list(range(n_labels)) or None, None)
    if not tokenizer_path:
        raise JaxftError("model.tokenizer is empty: a model built from model.init needs a tokenizer for real data")
    tok = Tokenizer(tokenizer_path)
    if tok.vocab_size > cfg.vocab_size:
        raise JaxftError(f"tokenizer {tokenizer_path}: {tok.vocab_size} tokens, more than the model's {cfg.vocab_size}")
    first, *extra = str(d.name).split("+")

    def source_records(name):  # (train, eval or None, text field, label field) of a source, data.max_*_examples applied
        train_rec, eval_rec, *fields = sources.resolve(d, name)
        # data.eval_holdout before data.max_train_examples: the eval records do not depend on the training cut
        train_rec, eval_rec = mixture.holdout(train_rec, eval_rec, int(d.eval_holdout))
        limit = lambda r, n: sources.Records(r.rows[:n], r.where[:n]) if r is not None and n else r  # noqa: E731
        return limit(train_rec, d.max_train_examples), limit(eval_rec, d.max_eval_examples), *fields

    train_rec, eval_rec, text_field, label_field = source_records(first)
    if not train_rec.rows:
        raise JaxftError(f"data.name={d.name!r}: no training examples")
    if eval_rec is not None and not eval_rec.rows:  # else a KeyError traceback at the first eval, after training
        where = f"data.eval_name={d.eval_name!r}" if d.eval_name else f"data.name={d.name!r}"
        raise JaxftError(f"{where}: no eval examples (expected at least one record, or no eval split)")
    sft_fields = sft.Fields(*sources.pair_fields(d, first))
    task = tasks.choose_task(d.task, train_rec, first, text_field, label_field, bool(d.label_field), sft_fields,
                             family.of(cfg).encoder_decoder)
    check_task(task, cfg)  # before tokenizing: a task the model has no head for is one line
    if declared and task not in ("classification", "cloze", "token_classification"):  # else ignored
        raise JaxftError(f"data.labels={d.labels!r}: declares the labels of classification, cloze or "
                         f"token_classification, but the task is {task} (expected data.labels empty)")
    if task == "token_classification":
        if extra:
            raise JaxftError(f"data.name={d.name!r}: several sources are not supported for token_classification")
        fields, declared = tasks.tagged_setup(d, first, train_rec, text_field, label_field)
        return tagged_data(train_rec, eval_rec, tok, seq_len, fields, declared, bool(d.get("label_all_tokens")))

    def every_source():  # (name, train records, eval records or None, text field); data.max_*_examples each
        return [(first, train_rec, eval_rec, text_field)] + [(name, *source_records(name)[:3]) for name in extra]

    if task in ("grpo", "ppo"):  # prompts only: the policy writes the completions (jaxft.grpo, jaxft.ppo)
        return prompt_data(config, tok, every_source(), family.of(cfg).encoder_decoder)
    if task in ("classification", "cloze") and extra:
        raise JaxftError(f"data.name={d.name!r}: several sources are supported for causal_lm, sft, dpo, reward and seq2seq only")
    template = None
    if str(config.method.get("template", "") or "") and "ptuning" in str(config.method.name).split("+"):
        from jaxft.peft.prompt import render

        if task != "classification":
            raise JaxftError(f"method.template: supported for classification data, not {task}")
        template = render(config.method.template, int(config.method.num_virtual_tokens), tok)
    if task in ("classification", "cloze"):
        labels = declared or tasks.label_vocab(train_rec, label_field)
        # Before tokenizing: a label outside data.labels (train or eval), or an eval label training never saw.
        for records in (train_rec, eval_rec) if declared else (eval_rec,):
            if records is not None:
                tasks.check_labels(records, label_field, labels, bool(declared))
        pair = sources.pair_field(d, first)
        types = token_types(d.token_type_ids, pair, cfg)
        shots = None  # cloze with data.demonstrations: LM-BFF's demonstrations, drawn from the training set
        if task == "cloze":
            shots = tasks.Demonstrations(int(d.demonstrations), train_rec, int(config.train.seed),
                                         str(d.demonstration_separator)) if int(d.demonstrations) else None
            if shots and float(d.demonstration_filter) < 1:  # LM-BFF's filter: from the examples most like each
                from jaxft.data.embeddings import embed

                encoder = str(d.demonstration_encoder) or str(config.model.path)
                if not encoder:
                    raise JaxftError(f"data.demonstration_filter={d.demonstration_filter}: data.demonstration_encoder "
                                     "and model.path are empty: expected a model directory to embed the texts with")
                fields = [text_field] + ([pair] if pair else [])
                key = "data.demonstration_encoder" if d.demonstration_encoder else "model.path"  # for its errors
                shots = dataclasses.replace(shots, keep=float(d.demonstration_filter), embed=lambda records: embed(
                    tasks.joined_texts(records, fields), encoder, seq_len,
                    "training texts" if records is train_rec else "eval texts", log, key))
                log(f"demonstrations: drawn from the {float(d.demonstration_filter):.0%} of each class's training "
                    f"examples nearest each example (data.demonstration_filter), embedded by {encoder}")
            causal = objectives.head_for(task, family.of(cfg).heads) == "causal_lm"
            encode = lambda records, draw=0, which=None: tasks.cloze(  # noqa: E731
                records, tok, seq_len, text_field, label_field, labels, d.cloze_template, d.verbalizer, pair, types,
                causal, dataclasses.replace(shots, draw=draw) if shots else None, which)
        else:
            encode = lambda records: tasks.classification(  # noqa: E731
                records, tok, seq_len, text_field, label_field, labels, pair, types, template)
        train, cut = encode(train_rec)
        present = np.unique(train["labels"])
        if len(present) < 2:  # one class: its softmax is 1 whatever the model says, so nothing would learn
            raise JaxftError(f"{train_rec.where[0]}: every training record has label {label_field!r} = "
                             f"{labels[int(present[0])]!r}: expected at least 2 classes")
        ev = encode(eval_rec)[0] if eval_rec else None
        if cut:
            log(f"note: {cut} of {len(train_rec.rows)} training examples were truncated to data.seq_len={seq_len}")
        if train["input_ids"].ndim == 3:  # cloze words of several tokens that cannot share a row
            log(f"note: label words of up to {train['verbalizer'].shape[-1]} tokens: each example is "
                f"{train['input_ids'].shape[1]} rows, one a class (compute and memory x{train['input_ids'].shape[1]})")
        split = {"train": [train_rec], "validation": [eval_rec] if eval_rec else []}
        drawn = redrawn = None
        if shots:
            drawn = lambda name, k: encode(split[name][0], k)[0]  # noqa: E731
            if d.redraw_demonstrations:  # batch `position`'s examples with draw position + 1 (draw 0: `train`)
                from jaxft.data.iterator import Reencode

                log(f"demonstrations: {shots.per_class} per class, drawn anew for each example in every batch "
                    "(data.redraw_demonstrations)")
                # Reencode: Batches encodes the whole global batch and cuts it to its longest new row's bucket
                redrawn = Reencode(lambda batch, position, first, examples: {
                    **encode(train_rec, position + 1, examples)[0], "weight": batch["weight"]})
        return Data(train, ev, task, labels, tok, records=split, transform=redrawn, demonstration_set=drawn)
    # Language modelling (causal or masked) and SFT may mix sources ('sst2+c4_demo'), sampled by data.weights.
    resolved = every_source()
    m = mixture.load(d, tok, task, resolved, log, getattr(cfg, "decoder_start_token_id", None))
    train, ev = m.train, m.eval
    transform = None
    if task == "masked_lm":  # the packed blocks; BERT's masking, new for every batch (eval: drawn once)
        transform = tasks.redraw(lambda b, rngs: tasks.mask_tokens(b, tok, rngs), config.train.seed)
        ev = tasks.mask_tokens(ev, tok, config.train.seed + 1) if ev is not None else None
    if task == "span_corruption":  # the packed blocks; T5's span corruption, as BERT's masking
        from jaxft.data.span_corruption import corrupt

        transform = tasks.redraw(lambda b, rngs: corrupt(b, tok, rngs, seq_len), config.train.seed)
        ev = corrupt(ev, tok, config.train.seed + 1, seq_len) if ev is not None else None
    records = {"train": [r[1] for r in resolved], "validation": [r[2] for r in resolved]}  # one per source
    labels = ["reward"] if task == "reward" else None  # a reward model: a classifier with one output, its score
    return Data(train, ev, task, labels, tok, m.groups, m.weights, m.names, records, transform)


def tagged_data(train_rec, eval_rec, tok, seq_len: int, fields: tuple[str, str], declared: list,
                all_tokens: bool = False) -> Data:
    """Tagged words (NER, `jaxft.data.tasks.token_classification`): every tag of both splits checked before
    anything is tokenized; the classes are the training tags (or `data.labels`). `all_tokens`
    (`data.label_all_tokens`) labels the training split's every token; the eval split keeps a label per word,
    so entity scores count words with or without it."""
    from jaxft.data import tasks
    from jaxft.errors import JaxftError

    splits = [train_rec] + ([eval_rec] if eval_rec else [])
    labels = tasks.tag_labels(splits, *fields, declared)
    if eval_rec and not declared:  # a tag training never saw: a class the model cannot predict
        known = set(tasks.tag_labels([train_rec], *fields, declared))
        for i in range(len(eval_rec.rows)):
            unseen = next((t for t in tasks.words_and_tags(eval_rec, i, *fields)[1] if t not in known), None)
            if unseen is not None:
                raise JaxftError(f"{eval_rec.where[i]}: tag {unseen!r} never occurs in the training set, whose tags "
                                 f"are {sorted(known, key=str)} (data.labels declares the tag set)")
    train, cut, empty = tasks.token_classification(train_rec, tok, seq_len, *fields, labels, all_tokens)
    ev = tasks.token_classification(eval_rec, tok, seq_len, *fields, labels)[0] if eval_rec else None
    if cut:
        log(f"note: {cut} of {len(train_rec.rows)} training sentences were cut to data.seq_len={seq_len} tokens "
            "(the words past it are neither trained nor scored)")
    if empty:
        log(f"note: {empty} training words have no token (the tokenizer drops them): their tags are not trained")
    if len(np.unique(train["labels"][train["labels"] >= 0])) < 2:
        raise JaxftError(f"{train_rec.where[0].rsplit(':', 1)[0]}: every tagged word has the same tag: expected at "
                         "least 2 classes")
    log(f"token classification: words {fields[0]!r}, tags {fields[1]!r}, {len(labels)} classes")
    return Data(train, ev, "token_classification", labels, tok,
                records={"train": [train_rec], "validation": [eval_rec] if eval_rec else []})


def prompt_data(config, tok, resolved: list, encoder_decoder: bool = False) -> Data:
    """GRPO's and PPO's prompts (`jaxft.data.prompts`) of every source (name, train records, eval
    records or None, text field), the training records' and the held-out ones', and the reward
    functions tried on the first. A mixture's sources are joined into one list of records (so reward
    functions see every record's fields), each row remembering its source for `data.weights`. An
    encoder-decoder's prompts are the sources its encoder reads."""
    from jaxft import grpo
    from jaxft.data import mixture, prompts, sft
    from jaxft.data.sources import Records, pair_fields
    from jaxft.errors import JaxftError

    d = config.data
    renderer = sft.renderer(tok, str(d.chat_template), str(d.chat_template_kwargs))
    parts = {"train": [], "validation": []}  # per split: (arrays, records, prompt values) of each source
    for name, train_rec, eval_rec, text_field in resolved:
        fields = sft.Fields(*pair_fields(d, name))
        for split, records in zip(parts, (train_rec, eval_rec)):
            if records is None:
                continue
            arrays, counts, values = prompts.encode(records, tok, renderer, d.seq_len, text_field, fields,
                                                    bool(d.skip_bad_records), encoder_decoder)
            if counts.skipped:
                log(f"note: skipped {counts.skipped} bad {split} records of {name} (data.skip_bad_records); the first: "
                    f"{counts.first_skip}")
            if counts.truncated:
                kept = "its first" if encoder_decoder else "its last"
                log(f"note: {counts.truncated} of {len(records.rows)} {split} prompts of {name} were cut to "
                    f"data.seq_len={d.seq_len} tokens (a prompt keeps {kept} tokens, a document its first)")
            parts[split].append((arrays, records, values))
    joined, groups = {}, None
    for split, sources in parts.items():
        if not sources:
            continue
        offsets = np.cumsum([0] + [len(r.rows) for _, r, _ in sources])
        arrays = {k: np.concatenate([a[k] + (o if k == "record" else 0) for (a, _, _), o in zip(sources, offsets)])
                  for k in sources[0][0]}
        records = Records([x for _, r, _ in sources for x in r.rows], [x for _, r, _ in sources for x in r.where])
        joined[split] = (arrays, records, [v for _, _, vs in sources for v in vs])
        if split == "train":
            groups = np.concatenate([np.full(len(a["record"]), i, np.int32) for i, (a, _, _) in enumerate(sources)])
    if "train" not in joined or not len(joined["train"][0]["record"]):
        raise JaxftError(f"data.name={d.name!r}: no training prompts")
    names = [name for name, *_ in resolved]
    weights = mixture.parse_weights(d.weights, len(names)) if len(names) > 1 else None
    grpo.check_rewards(grpo.settings(config.train, min_generations=1), joined["train"][1], joined["train"][2])
    ev = joined.get("validation")
    return Data(joined["train"][0], ev[0] if ev else None, str(config.data.task), None, tok,
                groups=groups if len(names) > 1 else None, weights=weights, sources=mixture.source_names(names),
                records={"train": [joined["train"][1]], "validation": [ev[1] if ev else None]},
                prompts={"train": joined["train"][2], "validation": ev[2] if ev else None},
                stop=None if encoder_decoder else sft.stop_ids(tok, str(d.chat_template),
                                                                       str(d.chat_template_kwargs)))


def init_params(model, base_root, mesh, seed: int, trainable=(r".",), weights=None):
    """Random init of what the base checkpoint lacks (sharded), and the checkpoint's weights (or
    `weights`, a parameter tree already read, e.g. an adapter folded into `base_root`'s).

    Leaves that `trainable` (the method's regexes) does not match are frozen and stored in
    `model.cfg.param_dtype`: cast inside the jitted init, or on the host before a loaded weight goes
    to its devices, so no fp32 copy of a bf16 base is ever made on device. Trainable leaves stay fp32.
    """
    import flax.linen as nn

    from jaxft import hf, sharding
    from jaxft.errors import JaxftError
    from jaxft.models import family
    from jaxft.peft.partition import ADDED_PARAMS, flat, is_trainable, unflat

    dummy = jnp.zeros((1, 2), jnp.int32)
    abstract = jax.eval_shape(lambda r: model.init(r, dummy), jax.random.PRNGKey(0))["params"]
    shard_flat = flat(sharding.param_shardings(abstract, mesh))
    shapes = flat(nn.unbox(abstract))
    frozen_dtype = jnp.dtype(model.cfg.param_dtype)
    dtypes = {p: x.dtype if is_trainable(p, trainable) else frozen_dtype for p, x in shapes.items()}
    loaded = {}
    if base_root is not None:
        loaded = flat(hf.params_from_hf(hf.read_tensors(base_root), model.cfg, where=str(base_root))) \
            if weights is None else {p: np.asarray(v) for p, v in flat(weights).items()}
        loaded = {p: v for p, v in loaded.items() if p in shapes}
        # Missing base weights are an error (a random frozen layer trains nothing useful), except the
        # classifier head that a classification run puts on a checkpoint that has none.
        new_head = (model.cfg.head in ("classification", "token_classification")
                    and hf.read_config(base_root).head != model.cfg.head)
        for path in shapes:
            if path in loaded:
                if loaded[path].shape != shapes[path].shape:
                    got, want = loaded[path].shape, shapes[path].shape
                    raise JaxftError(f"{base_root}: {path} has shape {got}, the model expects {want}")
            elif re.search(family.of(model.cfg).classifier_params, path) and new_head:
                kind = "token" if model.cfg.head == "token_classification" else "sequence"
                log(f"new classification head {path} {tuple(shapes[path].shape)}: random init, trains "
                    f"({base_root} is not a {kind} classifier)")
            elif not ADDED_PARAMS.search(path):
                hf_name = next(iter(hf.params_to_hf(unflat({path: np.zeros((1,) * len(shapes[path].shape))}),
                                                    model.cfg)), path)
                tied = " (its config.json has tie_word_embeddings=false)" if path.startswith("lm_head/") else ""
                raise JaxftError(f"{base_root}: the checkpoint has no {hf_name}{tied}: expected every base weight "
                                 "of the model")

    # Only the leaves the checkpoint lacks are initialised (XLA drops the rest of `model.init`).
    fresh = [p for p in shapes if p not in loaded]

    def init(rng):
        every = flat(nn.unbox(model.init(rng, dummy)["params"]))
        return {p: every[p].astype(dtypes[p]) for p in fresh}

    params = jax.jit(init, out_shardings={p: shard_flat[p] for p in fresh})(jax.random.PRNGKey(seed))
    for path, value in loaded.items():
        value = value.astype(dtypes[path])  # on the host: a bf16 base reaches the devices as bf16
        params[path] = jax.make_array_from_callback(value.shape, shard_flat[path], lambda i, v=value: v[i])
    return unflat(params)


def check_expert_axis(cfg, mesh):
    """A mixture's experts split evenly over the mesh's expert axis (training and `jaxft.plan` alike)."""
    from jaxft import sharding
    from jaxft.errors import JaxftError

    experts, ep = getattr(cfg, "num_experts", 0), mesh.shape[sharding.EXPERT_AXIS]
    if experts and experts % ep:
        raise JaxftError(f"mesh.expert={ep} does not divide this {cfg.model_type} model's {experts} experts: expected "
                         "a divisor of them (each device of the expert axis holds as many)")


def build_model(config, cfg, base_root, data: Data, mesh):
    """-> (method, model, trainable, frozen params): the run's model as training starts it, the base's
    weights and the method's fresh parameters; `jaxft.evaluate` rebuilds it so, then restores the
    trainable ones from a checkpoint."""
    from jaxft import objectives
    from jaxft.errors import JaxftError
    from jaxft.models import family
    from jaxft.peft import build
    from jaxft.peft.neftune import NoisyEmbeddings
    from jaxft.peft.partition import split

    want = objectives.head_for(data.task, family.of(cfg).heads)
    head = config.model.head or want
    if head != want:
        raise JaxftError(f"model.head={head!r} does not fit data.task={data.task!r}")
    check_task(data.task, cfg, head)
    check_expert_axis(cfg, mesh)
    if config.model.router_aux_loss_coef > 0 and not getattr(cfg, "num_experts", 0):
        raise JaxftError(f"model.router_aux_loss_coef={config.model.router_aux_loss_coef}: this {cfg.model_type} model "
                         "has no experts (the loss balances a mixture of experts' routers): leave it at -1")
    cfg = cfg.replace(
        head=head,
        num_labels=len(data.labels) if data.labels else cfg.num_labels,
        labels=tuple(str(v) for v in data.labels) if data.labels else cfg.labels,
        **model_settings(config, cfg),
        pad_token_id=data.tokenizer.pad_id if data.tokenizer and cfg.pad_token_id is None else cfg.pad_token_id,
    )
    method = build(config.method, cfg, tokenizer=data.tokenizer, steps=config.train.steps)
    alpha = float(config.train.get("neftune_noise_alpha", 0.0))
    noise = (NoisyEmbeddings(alpha),) if alpha > 0 else ()  # first: on the tokens' own embeddings
    model = family.build(cfg, noise + method.hooks)
    params = init_params(model, base_root, mesh, config.train.seed, method.trainable)
    sample = {k: v[:64] for k, v in data.train.items()}
    sample = data.transform(sample, 0, 0, np.arange(len(sample["weight"]))) if data.transform else sample
    for hook in method.hooks:
        params = hook.initialize(model, params, sample)
    trainable, frozen = split(params, method.trainable)
    objective = objectives.for_task(data.task, config.train, cfg, config.method)
    if objective.own_params is not None:  # e.g. PPO's value head, trained beside the method's parameters
        own, own_frozen = objectives.split_own(objective, objective.own_params(model, mesh, config.train.seed))
        trainable = {**trainable, objectives.OWN: own}
        frozen = {**frozen, objectives.OWN: own_frozen} if own_frozen else frozen
    return method, model, trainable, frozen


def quantize_base(config, cfg, frozen, own=None):
    """The frozen base stored as `model.quantization` says (QLoRA); trainable leaves keep fp32. `own`: an
    objective's own model (`objectives.OwnModel`, a LoRA critic), whose frozen weights are stored so too,
    found by its family's names; without it they stay as they are."""
    if config.model.quantization == "none":
        return frozen
    from jaxft import quant
    from jaxft.models import family
    from jaxft.objectives import OWN

    def quantized(tree, model_cfg):
        return quant.quantize_params(tree, config.model.quantization, targets=family.of(model_cfg).projections)

    out = quantized({k: v for k, v in frozen.items() if k != OWN}, cfg)
    if OWN in frozen:
        out[OWN] = {k: quantized(v, own.model.cfg) if own is not None and k == own.key else v
                    for k, v in frozen[OWN].items()}
    return out


# ---------------------------------------------------------------------------------------------
# The training loop.


class Preemption:
    """SIGTERM sets a flag; the loop saves and exits at a step where every process has seen it.

    One process reads its own flag (no device work). Several compare flags only every `sync_every`
    steps (one small blocking allgather) or where JAX's preemption service says all processes have
    reached a sync point, so ordinary steps never wait on a collective.
    """

    def __init__(self, sync_every: int):
        self.requested = False
        self.sync_every = max(sync_every, 1)
        signal.signal(signal.SIGTERM, self._handler)

    def _handler(self, signum, frame):
        self.requested = True

    def agreed(self, step: int) -> bool:
        if jax.process_count() == 1:
            return self.requested
        from jax.experimental import multihost_utils

        try:
            if multihost_utils.reached_preemption_sync_point(step):
                return True
        except RuntimeError:  # JAX's preemption service is off: our own flags decide
            pass
        if step % self.sync_every:
            return False
        return bool(np.any(multihost_utils.process_allgather(np.array([self.requested]))))


@jax.jit
def track_nonfinite(health: dict, metrics: dict, step) -> dict:
    """On the device, so no step waits for it: the first step with a NaN/Inf loss or gradient, and
    how many such steps there were."""
    bad = metrics["nonfinite"] > 0
    first = jnp.where((health["first_bad"] < 0) & bad, step, health["first_bad"]).astype(jnp.int32)
    return {"first_bad": first, "skipped": health["skipped"] + bad.astype(jnp.int32)}


def stop_if_nonfinite(health: dict, skip: bool):
    from jaxft.errors import JaxftError

    if int(health["first_bad"]) >= 0 and not skip:
        raise JaxftError(
            f"step {int(health['first_bad'])}: the loss, gradient or new parameters are not finite (NaN or Inf); "
            "nothing from this step on was saved or exported (lower optimizer.learning_rate, or set "
            "train.skip_nonfinite=True)"
        )


def check_resume(config, meta: dict, saved: dict, ckpt, cfg):
    """A checkpoint resumes only the run that made it: the same trainable parameters and run-defining
    settings (`train.resume_anyway=True` accepts others, recorded), and at most `train.steps` steps.

    A larger `train.steps` trains on. The learning-rate schedule is a function of `train.steps`, so
    the remaining steps follow the schedule of the new total (as if it had been planned from the start);
    the steps already taken are not redone."""
    from jaxft.checkpoint import changed_settings, check_layout
    from jaxft.errors import JaxftError

    where = ckpt.directory
    if saved.get("trainable") != meta["trainable"]:
        raise JaxftError(f"{where}: checkpoint trains other parameters than method {meta['method']!r}")
    check_layout(cfg, saved, where)
    position, total = int(saved["data_position"]), meta["steps"]
    if position > total:
        raise JaxftError(
            f"train.steps={total}: the checkpoint in {where} has already trained {position} steps; expected "
            f"train.steps >= {position}, or a new --workdir"
        )
    changed = changed_settings(saved.get("settings", {}), meta["settings"])
    if changed and not config.train.resume_anyway:
        key, old, new = changed[0]
        raise JaxftError(
            f"{key}={new!r}: the checkpoint in {where} was made with {key}={old!r} (train.resume_anyway=True "
            "resumes anyway; or use a new --workdir)"
        )
    if changed:
        meta["accepted"] = [f"{k}: {old!r} -> {new!r}" for k, old, new in changed]
        log(f"warning: train.resume_anyway=True: resuming with other settings ({'; '.join(meta['accepted'])})")
    if saved.get("steps", total) < total:
        log(f"train.steps raised from {saved['steps']} to {total}: training on from step {position}, the "
            f"learning-rate schedule now that of a {total}-step run")


class Profile:
    """`--profile_steps=START:END`: a jax.profiler trace of steps START..END (as logged, inclusive)
    under <workdir>/profile, which TensorBoard's profile tab reads."""

    def __init__(self, steps: tuple[int, int] | None, workdir):
        self.first, self.last = steps or (0, -1)
        self.target, self._open = workdir / "profile", None

    def before(self, step: int):
        from jaxft import storage

        if step == self.first:
            self._open = contextlib.ExitStack()
            jax.profiler.start_trace(self._open.enter_context(storage.local_dir(self.target)))

    def after(self, step: int, state):
        if self._open is not None and step >= self.last:
            jax.block_until_ready(state)
            jax.profiler.stop_trace()
            self._open.close()  # copies the trace to a remote workdir
            self._open = None
            log(f"profile of steps {self.first}..{step} written to {self.target}")


def evaluate(eval_step, state, frozen, arrays, mesh, batch_size, perplexity: bool, labels=None,
             sources=None) -> dict:
    """Loss, accuracy and (classification) per-class precision/recall/F1 named by `labels`; the loss of
    each source of a mixture, `eval/loss/<source>`."""
    from jaxft import sharding
    from jaxft.data.iterator import eval_batches
    from jaxft.metrics import summarize

    totals = {}
    rows = sharding.local_rows(mesh, batch_size)
    for local in eval_batches(arrays, batch_size, rows):
        out = jax.device_get(eval_step(state.params, frozen, sharding.to_global(mesh, local, batch_size)))
        totals = {k: totals.get(k, 0.0) + np.asarray(v, np.float64) for k, v in out.items()}
    metrics = summarize(totals, "eval", perplexity, labels)
    if "task_loss_sum" in totals:
        for name, loss_sum, n in zip(sources, totals["task_loss_sum"], totals["task_count"]):
            if n > 0:
                metrics[f"eval/loss/{name}"] = float(loss_sum / n)
    return metrics


def check_export(config, model, method, trainable):
    """Before anything is written: an adapter export must be able to hold every weight the run trains
    (base weights beside the method go in as PEFT modules_to_save copies, but not those inside a module
    the method itself changes, e.g. `full+lora`)."""
    from jaxft.objectives import without_own
    from jaxft.peft import hf_peft
    from jaxft.peft.partition import added_params

    trainable = without_own(trainable)  # an objective's own parameters (PPO's value head) are not exported
    if config.export.enabled and added_params(trainable):
        hf_peft.check_exportable(model, trainable, method.name)
    if config.export.enabled and config.export.merged:
        from jaxft.peft.methods import check_mergeable

        check_mergeable(model.hooks)


# The files of an export that loaders read to decide what it is (an adapter at the top, a composed
# method's adapters one directory down, or a whole model), and `export.merged`'s whole model.
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
EXPORT_FILES = ADAPTER_FILES + ("config.json", "model.safetensors", "model.safetensors.index.json")
MERGED = "merged"


def clear_export(out):
    """Remove an earlier export's files from `out` (an epath.Path), so that an adapter or model left by
    another run in the same `export.dir` is never loaded in place of this one. Other files stay."""
    if not out.exists():
        return
    for p in out.iterdir():
        if p.is_dir() and p.name == MERGED:  # an earlier export.merged=True run's model
            clear_export(p)
            if not any(p.iterdir()):
                p.rmdir()
        elif p.is_dir() and (p / "adapter_config.json").exists():  # a composed method's adapter
            for name in ADAPTER_FILES:
                if (p / name).exists():
                    (p / name).unlink()
            if not any(p.iterdir()):
                p.rmdir()
        elif p.name in EXPORT_FILES or re.fullmatch(r"model-\d+-of-\d+\.safetensors", p.name):
            p.unlink()


def export(config, out, model, method, trainable, frozen, tokenizer_path):
    """Into `out` (an epath.Path): written locally, then copied when `out` is remote."""
    from jaxft import hf, sharding, storage
    from jaxft.objectives import without_own
    from jaxft.peft import hf_peft, registry
    from jaxft.peft.partition import added_params, flat, merge, unflat

    trainable = sharding.gather(without_own(trainable))
    reads = registry.export_reads_regex()  # frozen leaves of the method that its export needs (PiSSA's start)
    read = sharding.gather(unflat({k: v for k, v in flat(without_own(frozen)).items() if reads.search(k)}))
    merged = config.export.merged and added_params(trainable)
    if config.export.merged and not merged:
        log("export.merged=True: this run's export is a whole model already (no adapter to fold in)")
    whole = sharding.gather(without_own(frozen)) if merged else None  # every process takes part
    if jax.process_index() != 0:
        return None
    params = merge(trainable, without_own(frozen))
    clear_export(out)
    with storage.local_dir(out) as local:
        if merged:  # the whole model with the method folded in, beside the adapter
            from jaxft.peft.methods import merge_into_base

            hf.save(*merge_into_base(model, jax.device_get(merge(trainable, whole))), Path(local) / MERGED,
                    tokenizer_dir=tokenizer_path, dtype=config.export.dtype)
        if added_params(params):  # PEFT: adapter-only weights
            hf_peft.save_adapter(model, method, merge(trainable, read), Path(local),
                                 base=hf.base_reference(config.model.path))
        else:
            hf.save(model, jax.device_get(params), local, tokenizer_dir=tokenizer_path, dtype=config.export.dtype)
    return out


def train_and_evaluate(config, workdir: str, profile_steps: tuple[int, int] | None = None) -> dict:
    """The one entry point: build everything from `config`, train, evaluate, checkpoint, export.

    `workdir` (and `export.dir`) may be local or any etils.epath URL (gs://bucket/run)."""
    with contextlib.ExitStack() as run:  # what the run sets up for its own time (the compilation cache)
        return _train_and_evaluate(config, workdir, profile_steps, run)


def _train_and_evaluate(config, workdir: str, profile_steps, run: contextlib.ExitStack) -> dict:
    from tqdm import tqdm

    from jaxft import objectives, sharding, storage
    from jaxft.checkpoint import LAYOUT, Checkpoints, run_settings
    from jaxft.config import validate
    from jaxft.data.iterator import Batches, Prefetch
    from jaxft.errors import JaxftError
    from jaxft.evaluate import generation_eval
    from jaxft.flops import Throughput, run_peak
    from jaxft.metrics import MetricWriter
    from jaxft.models import family
    from jaxft.peft.partition import count, flat, merge
    from jaxft.step import (check_lr_multipliers, dynamic_loss_scale, init_state, make_eval_step, make_optimizer,
                            make_train_step)

    validate(config)
    warmup, steps = int(config.optimizer.warmup_steps), int(config.train.steps)
    if warmup > steps:  # a config cut short for a try: it trains, but not at the rate asked for
        log(f"note: optimizer.warmup_steps={warmup} is more than train.steps={steps}: the learning rate rises to "
            f"{steps / warmup:.2g} of optimizer.learning_rate={config.optimizer.learning_rate} and never decays")
    workdir = storage.path(workdir, "workdir")
    export_dir = storage.path(config.export.dir, "export.dir") if config.export.dir else workdir / "export"
    storage.check_writable_dir(workdir, "workdir")
    storage.check_writable_dir(export_dir, "export.dir" if config.export.dir else "workdir")
    xla_cache = cache_dir(config.train.compilation_cache, workdir / "xla_cache")
    mesh = sharding.make_mesh(config.mesh)
    shards = sharding.batch_shards(mesh)
    batch, accum = config.train.batch_size, config.train.grad_accum
    eval_batch = config.eval.batch_size or batch
    if (batch // accum) % shards or eval_batch % shards:
        raise JaxftError(
            f"train.batch_size={batch} (per micro-batch {batch // accum}) and eval batch {eval_batch} must be "
            f"divisible by the {shards} data-parallel shards of {sharding.described(mesh.shape.values())}"
        )

    cfg, base_root, tokenizer_path = load_model_config(config)
    # An export first clears its directory of model and adapter files: never the base model's own.
    if config.export.enabled and base_root is not None and storage.is_local(export_dir) and \
            Path(base_root).resolve() == Path(export_dir).resolve():
        raise JaxftError(f"export.dir={export_dir}: the directory of model.path={config.model.path!r}, whose "
                         "weights the export would replace: expected another directory")
    data = load_data(config, cfg, tokenizer_path)
    method, model, trainable, frozen = build_model(config, cfg, base_root, data, mesh)
    check_export(config, model, method, trainable)
    cfg = model.cfg
    # what the step minimises: the data task's
    objective = objectives.for_task(data.task, config.train, cfg, config.method)
    # the model's parameters; an objective's own (PPO's value head or critic) are said apart
    n_train = count(objectives.without_own(trainable))
    n_own, n_total = count(trainable) - n_train, n_train + count(objectives.without_own(frozen))
    peak, peak_source, peak_measured = run_peak(config)
    packed = "segment_ids" in data.train
    impl = family.attention_impl(cfg, packed)
    log(
        f"model: {cfg.model_type} {cfg.num_layers}x{cfg.hidden_size} head={cfg.head}"
        f"{f' ({cfg.pooling} pooling)' if cfg.head == 'classification' else ''} | "
        f"{cfg.compute_dtype.name}, attention {impl}{' (auto)' if cfg.attention == 'auto' else ''}, remat {cfg.remat} | "
        f"method: {method.name}"
        f"{f' (NEFTune noise alpha {config.train.neftune_noise_alpha:g})' if config.train.neftune_noise_alpha else ''} | "
        f"trainable {n_train:,} / {n_total:,} parameters ({100 * n_train / n_total:.4f}%)"
        f"{f' + {n_own:,} of the {objective.name} objective' if n_own else ''} | "
        f"{sharding.described(mesh.shape.values())} over {jax.device_count()} devices, "
        f"{jax.process_count()} process(es) | "
        f"MFU against {peak / 1e9:,.1f} GFLOP/s per device ({peak_source})"
    )
    if n_train == 0:
        raise JaxftError(f"method.name={method.name!r} trains no parameter of this model")
    if impl != "cudnn" and packed and cfg.attention == "auto" and family.attention_impl(cfg, False) == "cudnn":
        log(f"note: packed rows (segment ids) run {impl} attention, not cuDNN's fused kernel (JAX's call takes no "
            "segment ids); data.packing=False lets model.attention=auto take the fused kernel")
    if config.model.quantization != "none":  # the frozen base only; trainable leaves keep fp32
        from jaxft import quant

        frozen = quantize_base(config, cfg, frozen, objective.own_model)
        log(f"base quantized to {config.model.quantization}: frozen weights {quant.nbytes(frozen):,} bytes")

    check_lr_multipliers(config.optimizer.lr_multipliers, trainable)
    tx, schedule = make_optimizer(config.optimizer, config.train.steps)
    if config.model.dtype == "float16":  # fp16's range needs a loss scale; it lives in the optimizer state
        tx = dynamic_loss_scale(tx)
    replicated = sharding.replicated(mesh)
    state, state_shardings = init_state(tx, trainable, config.train.seed, mesh, model.hooks)

    # The model traced once (no compile) on the data's widest rows: what only tracing finds, such as a row
    # longer than GPT-2's or BERT's position table, stops here rather than after the workdir is written.
    rows = {k: data.train[k][:1].reshape((-1, data.train[k].shape[-1])) for k in ("input_ids", "attention_mask")}
    jax.eval_shape(lambda p: model.apply({"params": p}, rows["input_ids"], rows["attention_mask"]),
                   merge(trainable, frozen))
    if objective.prepare is not None:  # what the loss needs beyond the data (DPO: the reference, from the start)
        prepared = {}
        for split in ("train", "eval"):
            arrays = getattr(data, split)
            if arrays is not None:
                with tqdm(total=len(arrays["weight"]), desc=f"{objective.name} {split}", file=sys.stdout,
                          dynamic_ncols=True, disable=jax.process_index() != 0) as progress:
                    prepared[split] = objective.prepare(model, merge(trainable, frozen), arrays, eval_batch, mesh,
                                                        progress)
        data = dataclasses.replace(data, **prepared)

    # Only now, with every input checked, does the run write anything.
    storage.make_dir(workdir, "workdir")
    run.enter_context(compilation_cache(xla_cache))
    ckpt = Checkpoints(workdir, config.checkpoint.every_steps or config.train.steps, config.checkpoint.keep)
    total = config.train.steps
    meta = {"method": method.name, "trainable": sorted(flat(trainable)), "steps": total,
            "settings": run_settings(config), "layout": LAYOUT}
    abstract = jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state
    )
    latest, restored, saved_meta = ckpt.restore_latest(
        abstract, lambda m: check_resume(config, meta, m, ckpt, model.cfg), log)
    start, skipped = 0, 0
    if latest is not None:
        state, start, skipped = restored, int(saved_meta["data_position"]), int(saved_meta.get("skipped_steps", 0))
        meta["resumed_anyway"] = saved_meta.get("resumed_anyway", []) + meta.pop("accepted", [])
        log(f"resuming from step {latest} in {ckpt.directory}")

    train_step = jax.jit(
        make_train_step(model, tx, schedule, accum, mesh, state_shardings.params, config.train.skip_nonfinite,
                        objective),
        donate_argnums=(0,),
        out_shardings=(state_shardings, replicated),
    )
    eval_step = jax.jit(make_eval_step(model, mesh, objective), out_shardings=replicated)
    buckets = ()
    if config.data.length_buckets and data.task in ("classification", "cloze", "sft", "seq2seq", "dpo", "reward") and \
            "segment_ids" not in data.train:
        seq_len = config.data.seq_len
        buckets = tuple(w for w in (16, 32, 64, 128, 256, 512, 1024) if w < seq_len) + (seq_len,)
    batches = Batches(data.train, batch, config.train.seed, buckets=buckets, groups=data.groups, weights=data.weights,
                      transform=data.transform)
    rows = sharding.local_rows(mesh, batch)
    writer = MetricWriter(workdir, resume_step=start)
    if meta.get("resumed_anyway"):
        writer.note(start, {"resumed_anyway": meta["resumed_anyway"]})
    perplexity = objectives.has_perplexity(objective, cfg.head)
    preemption = Preemption(config.train.sync_every_steps)
    # the model's trainable leaves (an objective's own, e.g. PPO's value head, do not make its base train);
    # a critic of its own is counted beside it
    own = objective.own_model
    throughput = Throughput(cfg, objectives.without_own(trainable), method, peak, measured=peak_measured, log=log,
                            own=own and (own.model.cfg, trainable[objectives.OWN][own.key], own.method))
    profile = Profile(profile_steps, workdir)
    eval_every, log_every = config.eval.every_steps, config.train.log_every_steps
    generated = generation_eval(config, data, model, workdir, objective)  # ROUGE, BLEU or rewards; samples/

    def evaluate_all(state, step):
        metrics = {}
        if objective.rollout is None:  # a rollout's eval arrays are prompts: its eval is what `generated` scores
            metrics = evaluate(eval_step, state, frozen, data.eval, mesh, eval_batch, perplexity, cfg.labels,
                               data.sources)
        return {**metrics, **generated(merge(state.params, frozen), step)} if generated else metrics

    def run_eval(state, step):
        if data.eval is None:
            return {}
        metrics = evaluate_all(state, step)
        if step > start:  # a finished run rerun evaluates again but does not log step `total` twice
            writer.write(step, metrics)
            writer.flush()
        return metrics

    def read_log_step(step, metrics, health, totals, made):
        """Step `step`'s numbers, read while the next step runs: the log line, and a stop on NaN/Inf.
        `made`: the figures of the rollout that made its batch."""
        m, h = jax.device_get((metrics, health))
        stop_if_nonfinite(h, config.train.skip_nonfinite)
        # loss_scale: fp16's dynamic scale; aux_loss: a method's own term (AdaLoRA's orthogonality), in `loss`.
        names = ("loss", *(("accuracy",) if objective.accuracy else ()), "grad_norm", "learning_rate", "loss_scale",
                 "aux_loss", *objective.train_sums)
        row = {f"train/{k}": float(m[k]) for k in names if k in m}
        row.update(made)
        row.update(throughput.report(*totals))
        if config.train.skip_nonfinite:
            row["train/skipped_steps"] = float(h["skipped"])
        writer.write(step, row)
        writer.flush()
        bar.set_postfix(loss=f"{row['train/loss']:.4f}", refresh=False)
        return row

    def save(step, state, force=False):
        """A checkpoint only once every step up to `step` is known to be finite (this blocks)."""
        h = jax.device_get(health)
        stop_if_nonfinite(h, config.train.skip_nonfinite)
        ckpt.save(step, state, {**meta, "data_position": step, "skipped_steps": int(h["skipped"])}, force=force)

    # stderr is for errors: one line. smoothing=0: the rate and ETA average the whole run, so an eval or a
    # compile does not make the next steps' estimate jump (to 50 minutes for the 8-minute main job).
    bar = tqdm(total=total, initial=start, desc="train", disable=jax.process_index() != 0, dynamic_ncols=True,
               file=sys.stdout, smoothing=0)
    t_start = time.time()
    widths, last, pending = set(), {}, None
    # Placed like the step's outputs, so track_nonfinite compiles once.
    health = jax.device_put({"first_bad": np.int32(-1), "skipped": np.int32(skipped)}, replicated)
    # The next batches are sliced and sent to the devices on a background thread while a step runs.
    put = lambda s: (local := batches.local(s, rows), sharding.to_global(mesh, local, batch))  # noqa: E731
    prefetch = Prefetch(put, start, total)
    # A rollout (GRPO) makes each batch from the policy itself, every `period` steps; checkpoints and a
    # preemption's save wait for the end of a period, so a resumed run makes the same batches.
    rollout = objective.rollout(model, trainable, data, mesh, config.train.seed) if objective.rollout else None
    period = rollout.period if rollout is not None else 1
    if config.eval.at_start and start == 0 and data.eval is not None:  # the untrained model, as step 0
        before = evaluate_all(state, 0)
        writer.write(0, before)
        writer.flush()
        log("step 0: " + " ".join(f"{k}={v:.4f}" for k, v in before.items()))
    try:
        for step in range(start, total):
            done = step + 1
            local, global_batch = prefetch.get(step)
            if rollout is not None:  # the policy's completions of this batch's prompts, scored
                local, global_batch = rollout(state.params, frozen, local, global_batch, step)
            width, t0, hits = local["input_ids"].shape[-1], time.time(), CACHE_HITS[0]
            shape = (width,) + tuple(local["labels"].shape[1:]) if "decoder_input_ids" in local else (width,)
            profile.before(done)
            state, metrics = train_step(state, frozen, global_batch)
            health = track_nonfinite(health, metrics, done)
            model_rows = batch * objective.sequences * math.prod(local["input_ids"].shape[1:-1])  # cloze: one a class
            throughput.add(model_rows, width, float(objective.tokens(local)) * jax.process_count(),
                           objective.head_width(local))
            if shape not in widths:  # each batch shape compiles once; say so, so a slow step is explained
                jax.block_until_ready(metrics)
                widths.add(shape)
                target = f" -> {shape[1]} target tokens" if len(shape) > 1 else ""
                cached = " (from the compilation cache)" if CACHE_HITS[0] > hits else ""
                log(f"compiled the train step for batch {batch} x {width}{target} in {time.time() - t0:.1f}s{cached}")
                throughput.restart()  # after this step's count: the rates leave out its tokens and time alike
            if pending:  # the previous step's numbers: on the host only now that this step is queued
                last = read_log_step(*pending)
            pending = None
            if done % log_every == 0 or done == total:
                pending = (done, metrics, health, (throughput.tokens, throughput.flops),
                           rollout.report() if rollout is not None else {})
            profile.after(done, state)
            if eval_every and done % eval_every == 0 and done != total:
                eval_metrics = run_eval(state, done)
                log(f"step {done}: " + " ".join(f"{k}={v:.4f}" for k, v in eval_metrics.items()))
            bar.update(1)
            if done % period:
                continue
            if ckpt.due(done):
                save(done, state)
            if preemption.agreed(done):
                if pending:
                    last, pending = read_log_step(*pending), None
                save(done, state, force=True)
                log(f"preempted (SIGTERM): saved step {done} to {ckpt.directory}; run the same command to resume")
                return {"preempted_at": done}
        if pending:
            last = read_log_step(*pending)
        if start < total:
            save(total, state, force=True)
        eval_metrics = run_eval(state, total)
    finally:
        prefetch.close()
        bar.close()
        ckpt.close()
        writer.close()
    exported = None
    if config.export.enabled:
        exported = export(config, export_dir, model, method, state.params, frozen, tokenizer_path)
    summary = {**last, **eval_metrics, "steps": total, "seconds": time.time() - t_start}
    log(
        f"done: {method.name} on {config.data.name}, {total} steps in {summary['seconds']:.0f}s | "
        # Per-class figures stay in metrics.jsonl / TensorBoard: with many classes they would drown the line.
        + " ".join(f"{k}={v:.4f}" for k, v in {**last, **eval_metrics}.items()
                   if "per_second" not in k and not any(f"/{m}/" in k for m in ("precision", "recall", "f1")))
        + (f" | exported to {exported}" if exported else "")
    )
    return summary


# ---------------------------------------------------------------------------------------------
# Command line.


def init_distributed():
    """Explicit flags, else auto-detection on TPU pods and SLURM; a single process otherwise."""
    if FLAGS.coordinator_address is not None:
        if jax.config.jax_platforms in (None, "", "cpu") or os.environ.get("JAX_PLATFORMS") == "cpu":
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
    elif int(os.environ.get("SLURM_NTASKS", "1")) > 1 or os.environ.get("TPU_WORKER_HOSTNAMES", "").count(",") > 0:
        jax.distributed.initialize()


def profile_steps(text: str | None) -> tuple[int, int] | None:
    if not text:
        return None
    try:
        first, last = (int(x) for x in text.split(":"))
        if 1 <= first <= last:
            return first, last
    except ValueError:
        pass
    raise ValueError(f"--profile_steps={text}: expected START:END, two step numbers with 1 <= START <= END")


def main(argv):
    from jaxft.errors import JaxftError, printable_stdout

    printable_stdout()  # the log quotes data text (a skipped record, a label)
    logging.set_verbosity(logging.WARNING)  # Orbax logs every file it writes at INFO
    init_distributed()
    workdir = FLAGS.workdir or str(Path("runs") / Path(config_flags.get_config_filename(FLAGS["config"])).stem)
    try:
        train_and_evaluate(FLAGS.config, workdir, profile_steps(FLAGS.profile_steps))
    except JaxftError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)


def parse_flags(argv):
    """absl parsing, but every usage error (a bad flag, config file or override, a stray argument) is
    one line on stderr and exit status 2, not a traceback or a usage page."""
    try:
        args = FLAGS(argv)
        if len(args) > 1:
            raise ValueError(f"unexpected arguments: {' '.join(args[1:])} (flags are --name=value)")
        if not any(a.startswith("--config=") for a in argv[1:]):
            raise ValueError("--config=configs/NAME.py is required")
        explicit = [FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id]
        if any(v is not None for v in explicit) and any(v is None for v in explicit):
            raise ValueError("--coordinator_address, --num_processes and --process_id go together")
        profile_steps(FLAGS.profile_steps)
        name = config_flags.get_config_filename(FLAGS["config"])
        if name and not Path(name.split(":")[0]).is_file():
            raise FileNotFoundError(f"--config={name}: no such config file")
        FLAGS.config  # noqa: B018  (the config file is executed lazily; fail here, not mid-run)
        return args
    except Exception as e:  # flags.Error, or what the config file / an override raised
        print(f"error: {usage_error(e, argv)}", file=sys.stderr)
        sys.exit(2)


def usage_error(e: Exception, argv) -> str:
    """One line; an override naming a key the config lacks reads `--config.a.b: no such config key ...`."""
    while e.args and isinstance(e.args[0], KeyError):  # ml_collections wraps it in an AttributeError
        e = e.args[0]
    text = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
    if isinstance(e, KeyError) and text.startswith("'"):
        key, _, hint = text[1:].partition("'")
        named = [a.split("=")[0] for a in argv if a.startswith("--config.") and a.split("=")[0].endswith(f".{key}")]
        text = f"{named[0] if named else key}: no such config key.{hint}"
    return " ".join(text.replace("\\n", " ").split())


def run():
    app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
    run()
