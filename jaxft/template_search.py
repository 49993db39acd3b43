"""LM-BFF's automatic templates (Gao et al. 2021, section 5.2): T5 writes the words around the mask.

  python -m jaxft.template_search --config=configs/pet_bert.py --t5=PATH [--config.KEY=VALUE ...]
      [--examples=32] [--beams=20] [--max_tokens=16] [--top=10] [--json]

Each training example (a fixed-seed sample of `--examples`) becomes T5's input `<text> <extra_id_0>
<label word> <extra_id_1>`, its class's word from `data.verbalizer`; T5 fills the two spans. One
beam search runs for all the examples at once: a candidate continuation's score is the sum over the
examples of T5's log-probability of it (LM-BFF's wide beam search), so the templates that come out
suit every example. A finished candidate is `<extra_id_0> X <extra_id_1> Y <extra_id_2>`, and reads
as the template `{text} X {mask} Y`. They are printed best first (the mean log-probability per
example), each with the zero-shot accuracy of the config's model and words on the sampled training
examples and on the dev split (`jaxft.label_search`'s scoring). LM-BFF then fine-tunes with each and
keeps the best on dev (`python -m jaxft.compare`).

`--t5`: a T5 directory (LM-BFF used T5-3B; the bundled jaxft-tiny-t5 runs, but writes little that
reads as a template). Single texts only (LM-BFF's templates for pairs place both texts).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jaxft.errors import JaxftError, one_line_errors


@dataclasses.dataclass(frozen=True)
class Template:
    tokens: tuple[int, ...]  # what T5 wrote after <extra_id_0>, up to and with <extra_id_2>
    score: float  # the sum over the examples of T5's log-probability of `tokens`
    before: str  # X: the words between the text and the mask
    after: str  # Y: the words after the mask

    @property
    def template(self) -> str:
        return " ".join(part for part in ("{text}", self.before, "{mask}", self.after) if part)


def t5_inputs(tok, texts: list[str], words: list[str], width: int) -> tuple[np.ndarray, np.ndarray]:
    """`<text> <extra_id_0> <word> <extra_id_1>` for each example, its text cut from the end to fit `width`."""
    s0, s1 = tok.sentinels(2)
    rows = []
    for text, word in zip(texts, words):
        tail = [s0] + tok.encode(word) + [s1] + tok.eos
        rows.append(tok.encode(text)[: max(width - len(tail), 0)] + tail)
    ids = np.full((len(rows), width), tok.pad_id, np.int32)
    mask = np.zeros((len(rows), width), np.int32)
    for i, row in enumerate(rows):
        ids[i, : len(row)], mask[i, : len(row)] = row, 1
    return ids, mask


def joint_beam_search(model, params, ids, mask, tok, beams: int, max_tokens: int) -> list[Template]:
    """Continuations of `<extra_id_0>` that maximise the summed log-probability over the rows (the module
    docstring), ending `<extra_id_1> ... <extra_id_2>` within `max_tokens`; finished ones, best first."""
    s0, s1, s2 = tok.sentinels(3)
    n, width = ids.shape[0], max_tokens + 2  # decoder start, <extra_id_0>, the tokens written
    start = model.cfg.decoder_start_token_id if model.cfg.decoder_start_token_id is not None else tok.pad_id
    encode = jax.jit(lambda p, i, m: model.apply({"params": p}, i, m, method="encode"))
    encoded, encoded_mask = encode(params, ids, mask)
    other = np.array([i for i in range(model.cfg.vocab_size) if tok.is_special(i) and i not in (s1, s2)], np.int64)

    @jax.jit
    def next_log_probs(params, dec, t):  # dec [beams, width] -> [beams, V]: summed over the n examples
        rows = jnp.repeat(dec, n, axis=0)
        dmask = (jnp.arange(width)[None, :] <= t).astype(jnp.int32) * jnp.ones_like(rows)
        logits = model.apply({"params": params}, rows, dmask, jnp.tile(encoded, (len(dec), 1, 1)),
                             jnp.tile(encoded_mask, (len(dec), 1)), method="decode")
        logp = jax.nn.log_softmax(jnp.take(logits, t, axis=1).astype(jnp.float32), axis=-1)
        return logp.reshape(len(dec), n, -1).sum(axis=1)

    live = [((start, s0), 0.0)]
    finished: list[tuple[tuple, float]] = []
    for t in range(1, width - 1):  # position t predicts the token after dec[:, t]
        dec = np.full((beams, width), tok.pad_id, np.int32)
        for b, (seq, _) in enumerate(live):
            dec[b, : len(seq)] = seq
        scores = np.array(next_log_probs(params, jnp.asarray(dec), t))[: len(live)]
        scores[:, other] = -np.inf  # no EOS, padding or other sentinel inside a template
        for b, (seq, score) in enumerate(live):
            scores[b] += score
            scores[b, s1 if s1 in seq else s2] = -np.inf  # <extra_id_1> once, <extra_id_2> only after it
            if t == width - 2:  # the last token: only a finished template counts
                keep = scores[b, s2]
                scores[b, :] = -np.inf
                scores[b, s2] = keep
        extended = []
        for k in np.argsort(-scores, axis=None, kind="stable")[: 2 * beams].tolist():
            b, token = divmod(k, scores.shape[1])
            if not np.isfinite(scores[b, token]):
                break
            seq = (*live[b][0], token)
            (finished if token == s2 else extended).append((seq, float(scores[b, token])))
        live = extended[:beams]
        if not live:
            break
    finished.sort(key=lambda x: -x[1])
    out = []
    for seq, score in finished[:beams]:
        written = seq[2:]  # after the decoder start and <extra_id_0>
        cut = written.index(s1)
        out.append(Template(tuple(seq[1:]), score, tok.decode(written[:cut]).strip(),
                            tok.decode(written[cut + 1: -1]).strip()))
    return out


def template_search(config, t5: str, examples: int = 32, beams: int = 20, max_tokens: int = 16, top: int = 10,
                    log=print) -> dict:
    """The search (module docstring) -> {"examples", "dev_examples", "templates": [{"template", "score" (T5's
    mean log-probability per example), "train_accuracy", "dev_accuracy"}, ...] best first, "config_template"
    (the config's own, scored the same)}."""
    from jaxft import hf, label_search
    from jaxft.data import sources
    from jaxft.tokenizer import Tokenizer

    label_search.check_counts(examples=examples, beams=beams, max_tokens=max_tokens, top=top)
    z = label_search.zero_shot(config, "jaxft.template_search", log)
    config, data = z.config, z.data
    if sources.pair_field(config.data, str(config.data.name)):
        raise JaxftError(f"data.name={config.data.name!r}: sentence pairs; jaxft.template_search writes templates "
                         "for single texts")
    try:
        root = hf.resolve(t5)
    except JaxftError as e:
        raise JaxftError(f"--t5={t5}: {str(e).split(': ', 1)[-1]}") from None
    model, params = hf.load(str(root))
    if model.cfg.head != "seq2seq_lm" or not hasattr(model, "encode"):
        raise JaxftError(f"--t5={t5}: a {model.cfg.model_type} {model.cfg.head} model; expected T5 (an "
                         "encoder-decoder that fills <extra_id_N> spans)")
    tok = Tokenizer(root)
    tok.sentinels(3)  # one line where the tokenizer has none
    text_field = sources.resolve(config.data, str(config.data.name))[2]
    words = str(config.data.verbalizer).split(",")
    seed = int(config.train.seed)
    chosen = label_search.sampled_rows(len(data.train["labels"]), examples, seed)  # as label_search samples
    records = data.records["train"][0]
    texts = [str(records.rows[i][text_field]) for i in chosen]
    ids, mask = t5_inputs(tok, texts, [words[int(y)] for y in data.train["labels"][chosen]], int(config.data.seq_len))
    log(f"template search: T5 {root} writes {beams} beams of up to {max_tokens} tokens for {len(texts)} "
        f"examples of {config.data.name}")
    found = joint_beam_search(model, jax.device_put(params), ids, mask, tok, beams, max_tokens)
    own_words = data.train["verbalizer"][:1]

    def scored(template: str) -> dict:
        try:
            arrays, dev = z.arrays(template)
        except JaxftError as e:  # e.g. a template that leaves the text no room
            return {"template": template, "train_accuracy": None, "dev_accuracy": None, "error": str(e)}
        out = {"template": template}
        for split, a in (("train", arrays), ("dev", dev)):
            a = label_search.sample(a, examples, seed) if a is not None else None
            out[f"{split}_accuracy"] = None if a is None else float(
                label_search.accuracy(z.log_probs(a), a["labels"], own_words)[0])
        return out

    templates, seen = [], set()
    for t in found:
        if t.template in seen:  # two spellings of one template
            continue
        seen.add(t.template)
        templates.append({**scored(t.template), "score": t.score / len(texts)})
        if len(templates) == top:
            break
    dev = 0 if data.eval is None else len(label_search.sampled_rows(len(data.eval["labels"]), examples, seed))
    return {"examples": len(texts), "dev_examples": dev, "templates": templates,
            "config_template": scored(str(config.data.cloze_template))}


def main(argv):
    import json

    from absl import logging

    from jaxft.train import FLAGS, log

    if len(argv) > 1:
        raise JaxftError(f"unexpected arguments: {' '.join(argv[1:])}")
    if not FLAGS.t5:
        raise JaxftError("--t5=PATH is required (a T5 directory, e.g. jaxft-tiny-t5 or t5-large)")
    logging.set_verbosity(logging.WARNING)
    result = template_search(FLAGS.config, FLAGS.t5, FLAGS.examples, FLAGS.beams, FLAGS.max_tokens, FLAGS.top, log)
    if FLAGS.json:
        print(json.dumps(result, ensure_ascii=False))
        return
    figure = lambda x: "-" if x is None else f"{x:.3f}"  # noqa: E731
    print(f"{'rank':<6}{'T5':>8}{'train':>7}{'dev':>7}   --config.data.cloze_template=")
    for rank, row in enumerate(result["templates"], 1):
        print(f"{rank:<6}{row['score']:>8.2f}{figure(row['train_accuracy']):>7}{figure(row['dev_accuracy']):>7}   "
              f"{row['template']!r}")
    own = result["config_template"]
    print(f"{'yours':<6}{'':>8}{figure(own['train_accuracy']):>7}{figure(own['dev_accuracy']):>7}   "
          f"{own['template']!r}")


def run():
    from absl import app, flags

    from jaxft.train import parse_flags

    flags.DEFINE_string("t5", None, "A T5 directory that writes the templates (e.g. jaxft-tiny-t5, t5-large).")
    flags.DEFINE_integer("examples", 32, "Training examples T5 reads (and scored, with as many dev ones); 0: all.")
    flags.DEFINE_integer("beams", 20, "Beam width of the joint search (LM-BFF: 100).")
    flags.DEFINE_integer("max_tokens", 16, "The longest continuation T5 may write.")
    flags.DEFINE_integer("top", 10, "Templates printed, best first.")
    flags.DEFINE_bool("json", False, "Print one JSON object instead of a table.")
    app.run(one_line_errors(main), flags_parser=parse_flags)


if __name__ == "__main__":
    run()
