"""Train and evaluate: `python -m jaxft.train --config=configs/NAME.py [--config.KEY=VALUE] [--workdir=DIR]`.

Running the same command again resumes from the newest checkpoint in the workdir. SIGTERM
(preemption) saves a checkpoint and exits cleanly. Bad input stops with a one-line error before
anything is written.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

flags.DEFINE_string("workdir", None, "Where checkpoints, TensorBoard events and exports go (default: runs/<config>).")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0, for multi-host runs.")
flags.DEFINE_integer("num_processes", None, "Number of processes in a multi-host run.")
flags.DEFINE_integer("process_id", None, "This process's index in a multi-host run.")
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


def load_model_config(config):
    """-> (LlamaConfig, base parameters or None, tokenizer path or None)."""
    from jaxft import hf

    if config.model.path:
        root = hf.resolve(config.model.path)
        cfg = hf.read_config(root)
        return cfg, root, config.model.tokenizer or str(root)
    return hf.config_from_dict(config.model.init.to_dict(), "model.init"), None, config.model.tokenizer or None


def load_data(config, cfg, tokenizer_path) -> Data:
    from jaxft.errors import JaxftError

    data = _load_data(config, cfg, tokenizer_path)
    if data.task == "causal_lm" and config.data.seq_len < 2:
        raise JaxftError(f"data.seq_len={config.data.seq_len}: a causal LM needs at least 2 tokens per sequence")
    return data


def _load_data(config, cfg, tokenizer_path) -> Data:
    from jaxft.data import sources, tasks
    from jaxft.errors import JaxftError
    from jaxft.tokenizer import Tokenizer

    d, seq_len = config.data, config.data.seq_len
    if d.name == "synthetic":
        n_labels = int(d.synthetic_labels)
        make = lambda n, s: tasks.synthetic(n, seq_len, cfg.vocab_size, s, n_labels)  # noqa: E731
        train = make(int(d.synthetic_examples), config.train.seed)
        ev = make(max(int(d.synthetic_examples) // 8, config.train.batch_size), config.train.seed + 1)
        return Data(train, ev, "classification" if n_labels else "causal_lm", list(range(n_labels)) or None, None)
    if not tokenizer_path:
        raise JaxftError("model.tokenizer is empty: a model built from model.init needs a tokenizer for real data")
    tok = Tokenizer(tokenizer_path)
    if tok.vocab_size > cfg.vocab_size:
        raise JaxftError(f"tokenizer {tokenizer_path}: {tok.vocab_size} tokens, more than the model's {cfg.vocab_size}")
    first, *extra = str(d.name).split("+")
    train_rec, eval_rec, text_field, label_field = sources.resolve(d, first)
    if d.max_train_examples:
        train_rec = sources.Records(train_rec.rows[: d.max_train_examples], train_rec.where[: d.max_train_examples])
    if eval_rec is not None and d.max_eval_examples:
        eval_rec = sources.Records(eval_rec.rows[: d.max_eval_examples], eval_rec.where[: d.max_eval_examples])
    if not train_rec.rows:
        raise JaxftError(f"data.name={d.name!r}: no training examples")
    task = tasks.choose_task(d.task, train_rec, first, text_field, label_field, bool(d.label_field))
    if task == "classification" and extra:
        raise JaxftError(f"data.name={d.name!r}: several sources are supported for causal_lm only")
    if task == "classification":
        labels = tasks.label_vocab(train_rec, label_field)
        train, cut = tasks.classification(train_rec, tok, seq_len, text_field, label_field, labels)
        ev = tasks.classification(eval_rec, tok, seq_len, text_field, label_field, labels)[0] if eval_rec else None
        if cut:
            log(f"note: {cut} of {len(train_rec.rows)} training examples were truncated to data.seq_len={seq_len}")
        return Data(train, ev, task, labels, tok)
    # Language modelling may mix sources ('sst2+c4_demo'): each is packed, then the blocks are pooled.
    resolved = [(train_rec, eval_rec, text_field)] + [sources.resolve(d, name)[:3] for name in extra]
    pack = lambda records, field: tasks.causal_lm(records, tok, seq_len, field)[0]  # noqa: E731
    parts = [pack(records, field) for records, _, field in resolved]
    evals = [pack(records, field) for _, records, field in resolved if records]
    join = lambda arrays: {k: np.concatenate([a[k] for a in arrays]) for k in arrays[0]}  # noqa: E731
    return Data(join(parts), join(evals) if evals else None, task, None, tok)


def init_params(model, base_root, mesh, seed: int):
    """Random init of everything (sharded), then the base checkpoint's weights where they fit."""
    import flax.linen as nn

    from jaxft import hf, sharding
    from jaxft.errors import JaxftError
    from jaxft.peft.partition import ADDED_PARAMS, flat, unflat

    dummy = jnp.zeros((1, 2), jnp.int32)
    abstract = jax.eval_shape(lambda r: model.init(r, dummy), jax.random.PRNGKey(0))["params"]
    shardings = sharding.param_shardings(abstract, mesh)
    init = jax.jit(lambda r: nn.unbox(model.init(r, dummy)["params"]), out_shardings=shardings)
    params = init(jax.random.PRNGKey(seed))
    if base_root is None:
        return params
    loaded = flat(hf.params_from_hf(hf.read_tensors(base_root), model.cfg, where=str(base_root)))
    target, shard_flat = flat(params), flat(shardings)
    # Missing base weights are an error (a random frozen layer trains nothing useful), except the
    # classifier head that a classification run puts on a checkpoint that has none.
    new_head = model.cfg.head == "classification" and hf.read_config(base_root).head != "classification"
    for path in target:
        if path in loaded:
            value = loaded[path]
            if value.shape != target[path].shape:
                raise JaxftError(f"{base_root}: {path} has shape {value.shape}, the model expects {target[path].shape}")
            target[path] = jax.make_array_from_callback(value.shape, shard_flat[path], lambda i, v=value: v[i])
        elif path.startswith("score/") and new_head:
            log(f"new classification head {path} {tuple(target[path].shape)}: random init, trains "
                f"({base_root} is not a sequence classifier)")
        elif not ADDED_PARAMS.search(path):
            hf_name = next(iter(hf.params_to_hf(unflat({path: np.zeros((1,) * target[path].ndim)}), model.cfg)), path)
            tied = " (its config.json has tie_word_embeddings=false)" if path.startswith("lm_head/") else ""
            raise JaxftError(f"{base_root}: the checkpoint has no {hf_name}{tied}: expected every base weight "
                             "of the model")
    return unflat(target)


# ---------------------------------------------------------------------------------------------
# The training loop.


class Preemption:
    """SIGTERM sets a flag; the loop saves and exits at the next step boundary (all processes agree)."""

    def __init__(self):
        self.requested = False
        signal.signal(signal.SIGTERM, self._handler)

    def _handler(self, signum, frame):
        self.requested = True

    def agreed(self) -> bool:
        if jax.process_count() == 1:
            return self.requested
        from jax.experimental import multihost_utils

        return bool(np.any(multihost_utils.process_allgather(np.array([self.requested]))))


def evaluate(eval_step, state, frozen, arrays, mesh, batch_size, perplexity: bool, labels=None) -> dict:
    """Loss, accuracy and (classification) per-class precision/recall/F1 named by `labels`."""
    from jaxft import sharding
    from jaxft.data.iterator import eval_batches
    from jaxft.metrics import summarize

    totals = {}
    rows = sharding.local_rows(mesh, batch_size)
    for local in eval_batches(arrays, batch_size, rows):
        out = jax.device_get(eval_step(state.params, frozen, sharding.to_global(mesh, local, batch_size)))
        totals = {k: totals.get(k, 0.0) + np.asarray(v, np.float64) for k, v in out.items()}
    return summarize(totals, "eval", perplexity, labels)


def gather(tree):
    """Host numpy copies of (possibly multi-host sharded) arrays."""
    from jax.experimental import multihost_utils

    if jax.process_count() == 1:
        return jax.device_get(tree)
    return multihost_utils.process_allgather(tree, tiled=True)


def export(config, workdir, model, method, trainable, frozen, tokenizer_path):
    from jaxft import hf
    from jaxft.peft import hf_peft
    from jaxft.peft.partition import added_params, merge

    trainable = gather(trainable)
    if jax.process_index() != 0:
        return None
    out = Path(config.export.dir or Path(workdir) / "export")
    params = merge(trainable, frozen)
    if added_params(params):  # PEFT: adapter-only weights
        return hf_peft.save_adapter(model, method, trainable, out, base=hf.base_reference(config.model.path))
    return hf.save(model, jax.device_get(params), str(out), tokenizer_dir=tokenizer_path)


def train_and_evaluate(config, workdir: str) -> dict:
    """The one entry point: build everything from `config`, train, evaluate, checkpoint, export."""
    from tqdm import tqdm

    from jaxft import sharding
    from jaxft.checkpoint import Checkpoints
    from jaxft.config import validate
    from jaxft.data.iterator import Batches
    from jaxft.errors import JaxftError
    from jaxft.metrics import MetricWriter
    from jaxft.models.llama import LlamaModel
    from jaxft.peft import build
    from jaxft.peft.partition import count, flat, split
    from jaxft.step import TrainState, dynamic_loss_scale, make_eval_step, make_optimizer, make_train_step

    validate(config)
    mesh = sharding.make_mesh(config.mesh)
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    batch, accum = config.train.batch_size, config.train.grad_accum
    eval_batch = config.eval.batch_size or batch
    if (batch // accum) % shards or eval_batch % shards:
        raise JaxftError(
            f"train.batch_size={batch} (per micro-batch {batch // accum}) and eval batch {eval_batch} must be "
            f"divisible by the {shards} data-parallel shards of mesh {dict(mesh.shape)}"
        )

    cfg, base_root, tokenizer_path = load_model_config(config)
    data = load_data(config, cfg, tokenizer_path)
    head = config.model.head or data.task
    if head != data.task:
        raise JaxftError(f"model.head={head!r} does not fit data.task={data.task!r}")
    cfg = cfg.replace(
        head=head,
        num_labels=len(data.labels) if data.labels else cfg.num_labels,
        labels=tuple(str(v) for v in data.labels) if data.labels else cfg.labels,
        pooling=config.model.pooling or cfg.pooling,
        dtype=config.model.dtype,
        scan_layers=config.model.scan_layers,
        remat=config.model.remat,
        pad_token_id=data.tokenizer.pad_id if data.tokenizer and cfg.pad_token_id is None else cfg.pad_token_id,
    )
    method = build(config.method, cfg)
    model = LlamaModel(cfg, hooks=method.hooks)

    params = init_params(model, base_root, mesh, config.train.seed)
    sample = {k: v[:64] for k, v in data.train.items()}
    for hook in method.hooks:
        params = hook.initialize(model, params, sample)
    trainable, frozen = split(params, method.trainable)
    del params
    n_train, n_total = count(trainable), count(trainable) + count(frozen)
    log(
        f"model: {cfg.model_type} {cfg.num_layers}x{cfg.hidden_size} head={cfg.head}"
        f"{f' ({cfg.pooling} pooling)' if cfg.head == 'classification' else ''} | method: {method.name} | "
        f"trainable {n_train:,} / {n_total:,} parameters ({100 * n_train / n_total:.4f}%) | "
        f"mesh {dict(mesh.shape)} over {jax.device_count()} devices, {jax.process_count()} process(es)"
    )
    if n_train == 0:
        raise JaxftError(f"method.name={method.name!r} trains no parameter of this model")
    if config.model.quantization != "none":  # the frozen base only; trainable leaves keep fp32
        from jaxft import quant

        frozen = quant.quantize_params(frozen, config.model.quantization)
        log(f"base quantized to {config.model.quantization}: frozen weights {quant.nbytes(frozen):,} bytes")

    tx, schedule = make_optimizer(config.optimizer, config.train.steps)
    if config.model.dtype == "float16":  # fp16's range needs a loss scale; it lives in the optimizer state
        tx = dynamic_loss_scale(tx)
    replicated = sharding.replicated(mesh)
    step0, rng0 = jax.jit(
        lambda: (jnp.zeros((), jnp.int32), jax.random.PRNGKey(config.train.seed)), out_shardings=replicated
    )()
    state = TrainState(step=step0, params=trainable, opt_state=jax.jit(tx.init)(trainable), rng=rng0)
    # Optimizer buffers follow their parameters; anything else (counters) is replicated on the mesh.
    state_shardings = jax.tree_util.tree_map(
        lambda x: x.sharding if getattr(x.sharding, "mesh", None) == mesh else replicated, state
    )
    state = jax.jit(lambda s: s, out_shardings=state_shardings)(state)

    # Only now, with every input checked, does the run write anything.
    Path(workdir).mkdir(parents=True, exist_ok=True)
    ckpt = Checkpoints(workdir, config.checkpoint.every_steps or config.train.steps, config.checkpoint.keep)
    meta = {"method": method.name, "trainable": sorted(flat(trainable))}
    start = 0
    latest = ckpt.latest_step()
    if latest is not None:
        abstract = jax.tree_util.tree_map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state
        )
        state, saved_meta = ckpt.restore(latest, abstract)
        if saved_meta.get("trainable") != meta["trainable"]:
            raise JaxftError(f"{ckpt.directory}: checkpoint trains other parameters than method {method.name!r}")
        start = int(saved_meta["data_position"])
        log(f"resuming from step {latest} in {ckpt.directory}")

    train_step = jax.jit(
        make_train_step(model, tx, schedule, accum),
        donate_argnums=(0,),
        out_shardings=(state_shardings, replicated),
    )
    eval_step = jax.jit(make_eval_step(model), out_shardings=replicated)
    buckets = ()
    if config.data.length_buckets and data.task == "classification":
        buckets = tuple(w for w in (16, 32, 64, 128, 256, 512, 1024) if w < config.data.seq_len) + (config.data.seq_len,)
    batches = Batches(data.train, batch, config.train.seed, buckets=buckets)
    rows = sharding.local_rows(mesh, batch)
    writer = MetricWriter(workdir)
    perplexity = cfg.head == "causal_lm"
    preemption = Preemption()
    eval_every, log_every = config.eval.every_steps, config.train.log_every_steps

    def run_eval(state, step):
        if data.eval is None:
            return {}
        metrics = evaluate(eval_step, state, frozen, data.eval, mesh, eval_batch, perplexity, cfg.labels)
        writer.write(step, metrics)
        writer.flush()
        return metrics

    total = config.train.steps
    bar = tqdm(total=total, initial=start, desc="train", disable=jax.process_index() != 0, dynamic_ncols=True)
    t_start = time.time()
    t_log, tokens, shapes = time.time(), 0.0, set()
    last = {}
    for step in range(start, total):
        local = batches.local(step, rows)
        width, t0 = local["input_ids"].shape[1], time.time()
        state, metrics = train_step(state, frozen, sharding.to_global(mesh, local, batch))
        if width not in shapes:  # each batch shape compiles once; say so, so a slow step is explained
            jax.block_until_ready(metrics)
            shapes.add(width)
            log(f"compiled the train step for batch {batch} x {width} in {time.time() - t0:.1f}s")
            t_log, tokens = time.time(), 0.0
        tokens += float(local["attention_mask"].sum()) * jax.process_count()
        done = step + 1
        if done % log_every == 0 or done == total:
            m = jax.device_get(metrics)
            now = time.time()
            last = {f"train/{k}": float(m[k]) for k in ("loss", "accuracy", "grad_norm", "learning_rate")}
            last["train/tokens_per_second"] = tokens / max(now - t_log, 1e-9)
            t_log, tokens = now, 0.0
            writer.write(done, last)
            writer.flush()
            bar.set_postfix(loss=f"{last['train/loss']:.4f}", refresh=False)
        if eval_every and done % eval_every == 0 and done != total:
            eval_metrics = run_eval(state, done)
            log(f"step {done}: " + " ".join(f"{k}={v:.4f}" for k, v in eval_metrics.items()))
        bar.update(1)
        ckpt.save(done, state, {**meta, "data_position": done})
        if preemption.agreed():
            ckpt.save(done, state, {**meta, "data_position": done}, force=True)
            ckpt.close()
            bar.close()
            log(f"preempted (SIGTERM): saved step {done} to {ckpt.directory}; run the same command to resume")
            writer.close()
            return {"preempted_at": done}
    bar.close()
    if start < total:
        ckpt.save(total, state, {**meta, "data_position": total}, force=True)
    eval_metrics = run_eval(state, total)
    ckpt.close()
    writer.close()
    exported = None
    if config.export.enabled:
        exported = export(config, workdir, model, method, state.params, frozen, tokenizer_path)
    summary = {**last, **eval_metrics, "steps": total, "seconds": time.time() - t_start}
    log(
        f"done: {method.name} on {config.data.name}, {total} steps in {summary['seconds']:.0f}s | "
        + " ".join(f"{k}={v:.4f}" for k, v in {**last, **eval_metrics}.items() if not k.endswith("per_second"))
        + (f" | exported to {exported}" if exported else "")
    )
    return summary


# ---------------------------------------------------------------------------------------------
# Command line.


def init_distributed():
    """Explicit flags, else auto-detection on TPU pods and SLURM; a single process otherwise."""
    explicit = [FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id]
    if any(v is not None for v in explicit):
        if any(v is None for v in explicit):
            raise SystemExit("error: --coordinator_address, --num_processes and --process_id go together")
        if jax.config.jax_platforms in (None, "", "cpu") or os.environ.get("JAX_PLATFORMS") == "cpu":
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
    elif int(os.environ.get("SLURM_NTASKS", "1")) > 1 or os.environ.get("TPU_WORKER_HOSTNAMES", "").count(",") > 0:
        jax.distributed.initialize()


def main(argv):
    from jaxft.errors import JaxftError

    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    logging.set_verbosity(logging.WARNING)  # Orbax logs every file it writes at INFO
    init_distributed()
    workdir = FLAGS.workdir or str(Path("runs") / Path(config_flags.get_config_filename(FLAGS["config"])).stem)
    try:
        train_and_evaluate(FLAGS.config, workdir)
    except JaxftError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)


def parse_flags(argv):
    """absl parsing, but a bad config file or override is one line and exit status 2, not a traceback."""
    try:
        args = FLAGS(argv)
        if not any(a.startswith("--config=") for a in argv[1:]):
            raise ValueError("--config=configs/NAME.py is required")
        name = config_flags.get_config_filename(FLAGS["config"])
        if name and not Path(name.split(":")[0]).is_file():
            raise FileNotFoundError(f"--config={name}: no such config file")
        FLAGS.config  # noqa: B018  (the config file is executed lazily; fail here, not mid-run)
        return args
    except Exception as e:  # flags.Error, or what the config file / an override raised
        detail = " ".join(str(e).replace("\\n", " ").split())
        print(f"error: {detail}", file=sys.stderr)
        sys.exit(2)


def run():
    app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
    run()
