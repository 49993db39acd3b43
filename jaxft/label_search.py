"""LM-BFF's automatic label words (Gao et al. 2021, section 5.1): which word per class a cloze template
should read, found with the untrained model before any fine-tuning.

  python -m jaxft.label_search --config=configs/pet_bert.py [--config.KEY=VALUE ...] [--candidates=100]
      [--top=10] [--examples=512] [--json]

1. Up to `--examples` training examples (a fixed-seed sample) are put into `data.cloze_template`, and the
   base model (the run's, before its method trains anything) gives log P(token | example) at the mask,
   for every token of the vocabulary.
2. Each class's candidates: the `--candidates` words with the largest sum of log-probabilities over the
   class's examples. A word is a token that stands as one word in place of the mask (it reads back as
   that token in the template, `jaxft.data.tasks.label_words`), not a special token, not a piece of a
   word, nothing with a comma (`data.verbalizer` separates words with commas).
3. Every assignment of distinct candidates to the classes is scored by its zero-shot accuracy on those
   examples (the class is the one whose word the model ranks highest at the mask); where the product of
   the candidate lists passes 200,000 assignments, fewer candidates per class are tried (said so). The
   `--top` best are printed beside the config's own `data.verbalizer`, with their zero-shot accuracy
   on the dev split where the data has one.

LM-BFF then fine-tunes with each of the top assignments and keeps the best on dev: `python -m
jaxft.compare` over configs that set them does that. The template needs `data.verbalizer` set to
one-token words (any: the search reads one mask); demonstrations are left out of the search.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools

import jax
import numpy as np

from jaxft.errors import JaxftError, one_line_errors

MAX_ASSIGNMENTS = 200_000
CHUNK = 2048  # assignments scored at once: [examples, CHUNK, classes] gathered log-probabilities


def word_of(tok, i: int, template: str) -> str | None:
    """Token `i` as a label word for `template` (see the module docstring), or None if it is none."""
    from jaxft.data import tasks

    if tok.is_special(i):
        return None
    word = tok.decode([i]).strip()
    if not word or "," in word or any(ch.isspace() for ch in word) or not any(ch.isalnum() for ch in word):
        return None
    try:
        return word if tasks.label_words(tok, [word], template) == [[i]] else None
    except JaxftError:  # e.g. it reads back with the unknown token
        return None


def candidates(logp: np.ndarray, labels: np.ndarray, num_classes: int, k: int, tok, template: str) -> list[list]:
    """Each class's `k` words (token id, word) by the summed log-probability of its examples, best first."""
    words: dict[int, str | None] = {}
    out = []
    for c in range(num_classes):
        total = logp[labels == c].sum(axis=0)
        chosen = []
        for i in np.argsort(-total, kind="stable").tolist():
            if i not in words:
                words[i] = word_of(tok, i, template)
            if words[i] is not None:
                chosen.append((i, words[i]))
                if len(chosen) == k:
                    break
        out.append(chosen)
    return out


def accuracy(logp: np.ndarray, labels: np.ndarray, assignments: np.ndarray) -> np.ndarray:
    """[A] zero-shot accuracy of each assignment ([A, C] token ids, one word per class) on the examples:
    the class whose word has the highest log-probability (the first such class on a tie)."""
    out = np.empty(len(assignments))
    for start in range(0, len(assignments), CHUNK):
        chunk = assignments[start:start + CHUNK]
        predicted = np.argmax(logp[:, chunk], axis=-1)  # [N, A]
        out[start:start + CHUNK] = (predicted == labels[:, None]).mean(axis=0)
    return out


def search(logp, labels, num_classes: int, k: int, tok, template: str, log=print):
    """-> (the candidate lists, assignments [A, C] of distinct tokens best first, their accuracies)."""
    if num_classes < 2:
        raise JaxftError("jaxft.label_search: the training examples have one class; expected at least 2")
    per_class = max(1, min(k, int(MAX_ASSIGNMENTS ** (1 / num_classes))))
    if per_class < k:
        log(f"note: {k} candidates for each of {num_classes} classes make {k ** num_classes:,} assignments; "
            f"trying the first {per_class} of each ({per_class ** num_classes:,})")
    lists = candidates(logp, labels, num_classes, k, tok, template)
    for c, chosen in enumerate(lists):
        if not chosen:
            raise JaxftError(f"jaxft.label_search: no token of the vocabulary reads as one word in place of the mask "
                             f"for class {c}")
    ids = [np.asarray([i for i, _ in chosen[:per_class]]) for chosen in lists]
    ranks = np.asarray(list(itertools.product(*[range(len(x)) for x in ids])))  # [A, C]
    assignments = np.stack([ids[c][ranks[:, c]] for c in range(num_classes)], axis=1)
    distinct = np.asarray([len(set(row)) == num_classes for row in assignments.tolist()])
    assignments, ranks = assignments[distinct], ranks[distinct]
    acc = accuracy(logp, labels, assignments)
    order = np.lexsort((ranks.sum(axis=1), -acc))  # the most accurate; on a tie, the better-ranked words
    return lists, assignments[order], acc[order]


def sampled_rows(size: int, n: int, seed: int) -> np.ndarray:
    """The first `n` of a fixed-seed permutation of `size` examples, ascending (all of them where there are
    fewer, or n is 0)."""
    return np.sort(np.random.default_rng(seed).permutation(size)[:n]) if n and n < size else np.arange(size)


def sample(arrays: dict, n: int, seed: int) -> dict:
    """The arrays' rows `sampled_rows` picks."""
    keep = sampled_rows(len(arrays["labels"]), n, seed)
    return {k: v[keep] for k, v in arrays.items()}


@dataclasses.dataclass
class ZeroShot:
    """A cloze config's untrained model, ready to score: `arrays(template)` encodes the data in another
    template, `log_probs(arrays)` reads the mask."""

    config: object  # the config as scored: method full, no demonstrations
    data: object  # `jaxft.train.Data` in the config's own template
    model: object
    params: dict
    mesh: object
    batch: int
    tool: str

    def log_probs(self, arrays: dict) -> np.ndarray:
        """[N, V] fp32: log P(token | example) at each cloze row's mask (`mlm_positions`)."""
        from jaxft import sharding
        from jaxft.data.iterator import eval_batches

        fields = {k: v for k, v in arrays.items() if k != "verbalizer"}
        out = []
        for local in eval_batches(fields, self.batch, (0, self.batch)):
            real = local["weight"] > 0  # the last batch's padding rows
            logp = self._at_mask(self.params, sharding.to_global(self.mesh, local, self.batch))
            out.append(np.asarray(jax.device_get(logp))[real])
        return np.concatenate(out)

    @functools.cached_property
    def _at_mask(self):  # compiled once per shape, whatever the template
        import jax.numpy as jnp

        from jaxft import sharding
        from jaxft.objectives import cloze_inputs

        def at_mask(params, batch):
            with sharding.axis_rules(self.mesh):
                logits = self.model.apply({"params": params}, **cloze_inputs(batch))
            return jax.nn.log_softmax(logits[:, 0].astype(jnp.float32), axis=-1)

        return jax.jit(at_mask)

    def arrays(self, template: str):
        """The data (training, dev or None) encoded in `template` (`jaxft.train.load_data`)."""
        from jaxft.train import load_data, load_model_config

        config = self.config.copy_and_resolve_references()
        config.data.cloze_template = template
        cfg, _, tokenizer_path = load_model_config(config)
        data = load_data(config, cfg, tokenizer_path)
        return data.train, data.eval


def zero_shot(config, tool: str, log=print) -> ZeroShot:
    """A cloze config's base model (every method starts from it) and data, checked: one line naming the
    key where the config is no cloze question of one-token words. `tool`: the CLI, for the messages."""
    from jaxft import sharding
    from jaxft.config import validate
    from jaxft.peft.partition import merge
    from jaxft.train import build_model, load_data, load_model_config

    if jax.process_count() > 1:
        raise JaxftError(f"{tool} runs in one process (it reads every log-probability on the host)")
    config = config.copy_and_resolve_references()
    validate(config)
    if config.data.task != "cloze":
        raise JaxftError(f"data.task={config.data.task!r}: {tool} works on a cloze question: expected "
                         "data.task='cloze' with data.cloze_template and data.verbalizer")
    if int(config.data.demonstrations):
        log(f"note: data.demonstrations={config.data.demonstrations} is left out: {tool} reads the template alone")
        config.data.demonstrations, config.data.redraw_demonstrations = 0, False
        config.data.demonstration_filter = 1.0  # it filters demonstrations: none left to filter
    config.method.name = "full"  # the base model, as every method starts from it
    cfg, base_root, tokenizer_path = load_model_config(config)
    data = load_data(config, cfg, tokenizer_path)
    if data.train["verbalizer"].ndim != 2:
        raise JaxftError(f"data.verbalizer={config.data.verbalizer!r}: a word of several tokens; {tool} reads one "
                         "mask: expected one-token words (any, e.g. a first guess such as 'bad,good')")
    mesh = sharding.make_mesh(config.mesh)
    _, model, trainable, frozen = build_model(config, cfg, base_root, data, mesh)
    shards = sharding.batch_shards(mesh)
    batch = -(-(config.eval.batch_size or config.train.batch_size) // shards) * shards
    return ZeroShot(config, data, model, merge(trainable, frozen), mesh, batch, tool)


def check_counts(**counts) -> None:
    for name, value in counts.items():
        if value < (0 if name == "examples" else 1):
            raise JaxftError(f"--{name}={value}: expected a positive integer"
                             + (" (or 0: every example)" if name == "examples" else ""))


def label_search(config, candidates: int = 100, top: int = 10, examples: int = 512, log=print) -> dict:
    """The search (module docstring) for a cloze config -> {"examples", "dev_examples", "labels",
    "candidates" (each label's words, best first), "assignments" (the `top` best: "verbalizer",
    "train_accuracy", "dev_accuracy"), "config_verbalizer" (the config's own, scored the same)}."""
    check_counts(candidates=candidates, top=top, examples=examples)
    z = zero_shot(config, "jaxft.label_search", log)
    config, data = z.config, z.data
    template, labels, tok = str(config.data.cloze_template), [str(x) for x in data.labels], data.tokenizer
    train = sample(data.train, examples, int(config.train.seed))
    log(f"label search: {len(train['labels'])} training examples of {config.data.name} in {template!r}, "
        f"{len(labels)} classes, {candidates} candidates each")
    missing = [labels[c] for c in range(len(labels)) if not np.any(train["labels"] == c)]
    if missing:  # its candidates would be ranked by nothing
        raise JaxftError(f"--examples={examples}: no sampled training example has label {missing[0]!r}; expected "
                         "every class among them (more examples, or 0: all)")
    logp = z.log_probs(train)
    lists, assignments, _ = search(logp, train["labels"], len(labels), candidates, tok, template, log)
    dev = dev_logp = None
    if data.eval is not None:
        dev = sample(data.eval, examples, int(config.train.seed))
        dev_logp = z.log_probs(dev)

    def scored(rows) -> list[dict]:
        dev_acc = accuracy(dev_logp, dev["labels"], rows) if dev is not None else [None] * len(rows)
        return [{"verbalizer": ",".join(tok.decode([int(i)]).strip() for i in row),
                 "train_accuracy": float(a), "dev_accuracy": None if d is None else float(d)}
                for row, a, d in zip(rows, accuracy(logp, train["labels"], rows), dev_acc)]

    own = scored(data.train["verbalizer"][:1])[0] | {"verbalizer": str(config.data.verbalizer)}
    return {"examples": len(train["labels"]), "dev_examples": len(dev["labels"]) if dev is not None else 0,
            "labels": labels, "candidates": {label: [w for _, w in chosen] for label, chosen in zip(labels, lists)},
            "assignments": scored(assignments[:top]), "config_verbalizer": own}


def main(argv):
    import json

    from absl import logging

    from jaxft.train import FLAGS, log

    if len(argv) > 1:
        raise JaxftError(f"unexpected arguments: {' '.join(argv[1:])}")
    logging.set_verbosity(logging.WARNING)
    result = label_search(FLAGS.config, FLAGS.candidates, FLAGS.top, FLAGS.examples, log)
    if FLAGS.json:
        print(json.dumps(result, ensure_ascii=False))
        return
    figure = lambda x: "-" if x is None else f"{x:.3f}"  # noqa: E731
    print(f"{'rank':<6}{'train':>7}{'dev':>7}   --config.data.verbalizer=")
    for rank, row in enumerate(result["assignments"], 1):
        print(f"{rank:<6}{figure(row['train_accuracy']):>7}{figure(row['dev_accuracy']):>7}   {row['verbalizer']}")
    own = result["config_verbalizer"]
    print(f"{'yours':<6}{figure(own['train_accuracy']):>7}{figure(own['dev_accuracy']):>7}   {own['verbalizer']}")
    for label, words in result["candidates"].items():
        print(f"candidates for {label!r}: {' '.join(words[:10])}{' ...' if len(words) > 10 else ''}")


def run():
    from absl import app, flags

    from jaxft.train import parse_flags

    flags.DEFINE_integer("candidates", 100, "Words tried per class (LM-BFF's k).")
    flags.DEFINE_integer("top", 10, "Assignments printed, best first.")
    flags.DEFINE_integer("examples", 512, "Training (and dev) examples scored; 0: all of them.")
    flags.DEFINE_bool("json", False, "Print one JSON object instead of a table.")

    app.run(one_line_errors(main), flags_parser=parse_flags)


if __name__ == "__main__":
    run()
