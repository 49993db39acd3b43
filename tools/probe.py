"""Linear probes on a frozen model: how much of a classification task its features already carry.

Methods that freeze the base (P-Tuning v2, prompt tuning, LoRA at low rank) can only steer
features the model has. Before tuning one, probe the base: a logistic regression on the frozen
hidden states of each layer, pooled at the last real token (what the classification head reads)
and as the mean over real tokens, next to a bag-of-words baseline on the same token ids.

    python tools/probe.py --model=jaxft-tiny --data=sst2 --max_train=20000

Data as in `jaxft.train`: a bundled name, or a local file with --eval_data (and --text_field /
--label_field). Prints one table of train and eval accuracy per feature.
"""

from __future__ import annotations

import argparse
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="jaxft-tiny", help="HF model directory or bundled name")
    p.add_argument("--data", default="sst2", help="bundled name or a local file with labels")
    p.add_argument("--eval_data", default="", help="eval file for local --data")
    p.add_argument("--text_field", default="")
    p.add_argument("--label_field", default="")
    p.add_argument("--seq_len", type=int, default=64)
    p.add_argument("--max_train", type=int, default=20000, help="training examples, a seeded random subset")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--steps", type=int, default=500, help="full-batch Adam steps of each probe")
    p.add_argument("--weight_decay", type=float, default=1e-4)
    return p.parse_args(argv)


def load(args):
    """-> (model with unrolled layers, params, train arrays, eval arrays), via the trainer's data path."""
    from jaxft import hf
    from jaxft.config import base_config
    from jaxft.errors import JaxftError
    from jaxft.train import load_data

    config = base_config()
    config.data.name, config.data.eval_name = args.data, args.eval_data
    config.data.text_field, config.data.label_field = args.text_field, args.label_field
    config.data.task, config.data.seq_len = "classification", args.seq_len
    model, params = hf.load(args.model, scan_layers=False)  # (the jitted features leave the LM head's logits unused)
    data = load_data(config, model.cfg, str(hf.resolve(args.model)))
    if data.eval is None:
        raise JaxftError(f"--data={args.data}: no eval split; pass --eval_data")
    train = data.train
    if args.max_train and len(train["labels"]) > args.max_train:
        keep = np.random.RandomState(0).permutation(len(train["labels"]))[: args.max_train]
        train = {k: v[keep] for k, v in train.items()}
    return model, params, train, data.eval


def features(model, params, arrays, batch: int):
    """-> {name: [N, D]}: each layer's output (and the final norm, where the model has one) at the token
    the model's classifier reads (the last real token, BERT's first) and averaged."""
    from tqdm import tqdm

    from jaxft.models.llama import pool

    num_layers = model.cfg.num_layers
    how = "first" if model.cfg.pooling == "first" else "last"

    @jax.jit
    def run(params, ids, mask):
        _, state = model.apply({"params": params}, ids, mask, capture_intermediates=True)
        inter = state["intermediates"]
        hs = [inter[f"layers_{i}"]["__call__"][0][0] for i in range(num_layers)]
        hs += [inter["norm"]["__call__"][0]] if "norm" in inter else []  # post-LN encoders (BERT) have none
        return [(pool(h, mask, how), pool(h, mask, "mean")) for h in hs]

    out = {}
    for i in tqdm(range(0, len(arrays["labels"]), batch), desc="features", unit="batch", leave=False):
        hs = run(params, arrays["input_ids"][i : i + batch], arrays["attention_mask"][i : i + batch])
        for layer, (last, mean) in enumerate(hs):
            name = "final norm" if layer == num_layers else f"layer {layer}"
            out.setdefault(f"{name}, {how} token", []).append(np.asarray(last))
            out.setdefault(f"{name}, mean", []).append(np.asarray(mean))
    return {k: np.concatenate(v) for k, v in out.items()}


def bag_of_words(arrays, vocab_size: int):
    counts = np.zeros((len(arrays["labels"]), vocab_size), np.float32)
    rows = np.repeat(np.arange(counts.shape[0]), arrays["input_ids"].shape[1])
    np.add.at(counts, (rows, arrays["input_ids"].ravel()), arrays["attention_mask"].ravel().astype(np.float32))
    return counts


def probe(x, y, x_eval, y_eval, num_labels: int, steps: int, weight_decay: float):
    """Standardised logistic regression, full-batch Adam -> (train accuracy, eval accuracy)."""
    mu, sd = x.mean(0), x.std(0) + 1e-6
    x, x_eval = jnp.asarray((x - mu) / sd), jnp.asarray((x_eval - mu) / sd)
    w = jnp.zeros((x.shape[1], num_labels))
    b = jnp.zeros((num_labels,))
    opt = optax.adam(1e-2)

    def loss(wb):
        logits = x @ wb[0] + wb[1]
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean() + weight_decay * (wb[0] ** 2).sum()

    @jax.jit
    def fit(wb):
        def step(carry, _):
            wb, s = carry
            u, s = opt.update(jax.grad(loss)(wb), s)
            return (optax.apply_updates(wb, u), s), None

        return jax.lax.scan(step, (wb, opt.init(wb)), None, length=steps)[0][0]

    w, b = fit((w, b))
    acc = lambda a, t: float(((a @ w + b).argmax(-1) == t).mean())  # noqa: E731
    return acc(x, y), acc(x_eval, y_eval)


def main(argv=None):
    from jaxft.errors import JaxftError

    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        model, params, train, ev = load(args)
    except JaxftError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    y, y_eval = jnp.asarray(train["labels"]), jnp.asarray(ev["labels"])
    num_labels = int(max(train["labels"].max(), ev["labels"].max())) + 1
    print(f"{args.model} on {args.data}: {len(y)} train, {len(y_eval)} eval examples, {num_labels} labels")
    rows = {"bag of words (token counts)": (bag_of_words(train, model.cfg.vocab_size), bag_of_words(ev, model.cfg.vocab_size))}
    f_train, f_eval = features(model, params, train, args.batch), features(model, params, ev, args.batch)
    rows.update({k: (f_train[k], f_eval[k]) for k in f_train})
    means = [k for k in f_train if k.endswith("mean")]
    rows["all layers, mean (concatenated)"] = tuple(np.concatenate([f[k] for k in means], 1) for f in (f_train, f_eval))
    results = {}
    print(f"{'features':<34} {'train':>6} {'eval':>6}")
    for name, (x, x_eval) in rows.items():
        results[name] = probe(x, y, x_eval, y_eval, num_labels, args.steps, args.weight_decay)
        print(f"{name:<34} {results[name][0]:6.3f} {results[name][1]:6.3f}", flush=True)
    return results


if __name__ == "__main__":
    out = main()
    sys.exit(out if isinstance(out, int) else 0)
