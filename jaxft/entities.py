"""Named entities in tagged words (NER's BIO tags), counted on the device as seqeval counts them.

A token-classification run whose label names are tags (`O`, `B-PER`, `I-PER`; IOB2, or IOBES with `E-`
and `S-`, or BMES, whose `M-` is IOBES's `I-`) also scores whole entities: an entity is a run of words
of one type, opened by `B-`/`S-` (or by an `I-`/`E-` that does not continue the word before it, as
seqeval's default mode reads it) and continued by `I-`/`E-` of its type after a `B-`/`I-`; a predicted
entity is right when its type, first and last word equal a true one's. Only the labelled positions count
(a word's first sub-word token); the words in between are skipped, so an entity spans the sub-words of
its words.

The eval step sums, per entity type, the true, predicted and correct entities (`entity_sums`), and
`jaxft.metrics.summarize` turns them into precision, recall and F1, micro-averaged over types as
seqeval's default report, and per type (tests/test_entities.py holds them to seqeval).
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np

O, B, I, E, S = range(5)
_TAG = re.compile(r"([BIMES])[-_](.+)")


def scheme(labels) -> tuple[np.ndarray, np.ndarray, list[str]] | None:
    """Label names -> (prefix code per class, entity type index per class (-1 for O), type names), or
    None when the names are not all tags (`O`, `B-X`, `I-X`, `M-X`, `E-X`, `S-X`): no entities to count."""
    if not labels:
        return None
    prefix, kind, types = [], [], []
    for name in map(str, labels):
        if name == "O":
            prefix.append(O)
            kind.append(-1)
            continue
        m = _TAG.fullmatch(name)
        if not m:
            return None
        if m[2] not in types:
            types.append(m[2])
        prefix.append("OBIES".index(m[1].replace("M", "I")))  # BMES's M (middle) is IOBES's I
        kind.append(types.index(m[2]))
    if not types:
        return None
    return np.array(prefix, np.int32), np.array(kind, np.int32), types


def _spans(tags, labelled, prefix, kind):
    """Per position: does an entity start there, its type and the position of its last word. tags [B, T]."""
    t = tags.shape[1]
    pos = jnp.broadcast_to(jnp.arange(t), tags.shape)
    p = jnp.where(labelled, jnp.asarray(prefix)[tags], O)
    k = jnp.asarray(kind)[tags]
    # the labelled position before each position, and after it (-1 / t where there is none)
    before = jax.lax.cummax(jnp.pad(jnp.where(labelled, pos, -1)[:, :-1], ((0, 0), (1, 0)), constant_values=-1), axis=1)
    after = jax.lax.cummin(jnp.pad(jnp.where(labelled, pos, t)[:, 1:], ((0, 0), (0, 1)), constant_values=t), axis=1,
                           reverse=True)
    at = lambda x, i: jnp.take_along_axis(x, jnp.clip(i, 0, t - 1), axis=1)  # noqa: E731
    prev_p = jnp.where(before >= 0, at(p, before), O)
    cont = ((p == I) | (p == E)) & ((prev_p == B) | (prev_p == I)) & (at(k, before) == k)
    start = (p != O) & ~cont
    last = (p != O) & ~jnp.where(after < t, at(cont, after), False)
    end = jax.lax.cummin(jnp.where(last, pos, t), axis=1, reverse=True)  # the first last word from here on
    return start, k, end


def entity_sums(logits, batch, labels) -> dict:
    """Summed per entity type: `entities/true`, `entities/predicted`, `entities/correct` [types]; {} when
    `labels` are not tags. logits [B, T, C]; `labels` [B, T], -100 where no word starts."""
    table = scheme(labels)
    if table is None:
        return {}
    prefix, kind, types = table
    gold = batch["labels"]
    labelled = gold >= 0
    w = batch["weight"] if "weight" in batch else jnp.ones(gold.shape[:1], jnp.float32)
    g_start, g_kind, g_end = _spans(jnp.maximum(gold, 0), labelled, prefix, kind)
    p_start, p_kind, p_end = _spans(jnp.argmax(logits, axis=-1), labelled, prefix, kind)
    right = g_start & p_start & (g_kind == p_kind) & (g_end == p_end)

    def per_type(flag, k):  # [types]: the rows' weights summed over the positions flagged, by type
        hot = (k[..., None] == jnp.arange(len(types))) & flag[..., None]
        return jnp.einsum("btk,b->k", hot.astype(jnp.float32), w.astype(jnp.float32))

    return {"entities/true": per_type(g_start, g_kind), "entities/predicted": per_type(p_start, p_kind),
            "entities/correct": per_type(right, g_kind)}


def scores(sums: dict, labels) -> dict[str, float]:
    """Entity precision, recall and F1 (seqeval's micro average over types) and F1 per type, from
    `entity_sums` summed over the eval set; 0 where a count is 0."""
    _, _, types = scheme(labels)
    true, predicted, correct = (np.asarray(sums[f"entities/{k}"], np.float64) for k in ("true", "predicted", "correct"))

    def prf(c, p, t):
        precision = c / p if p else 0.0
        recall = c / t if t else 0.0
        return precision, recall, 2 * precision * recall / (precision + recall) if precision + recall else 0.0

    out = dict(zip(("entity_precision", "entity_recall", "entity_f1"), prf(correct.sum(), predicted.sum(), true.sum())))
    out.update({f"entity_f1/{name}": prf(c, p, t)[2] for name, c, p, t in zip(types, correct, predicted, true)})
    return out
