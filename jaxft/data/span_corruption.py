"""T5's span corruption (Raffel et al. 2020, `t5.data.preprocessors.span_corruption`) on packed blocks.

A block of `raw_length(seq_len)` tokens (texts joined by EOS, as `tasks.causal_lm` packs them) loses
`noise_density` of its tokens in spans of mean length `mean_span`; each span becomes one sentinel in
the input and the target lists the sentinels each followed by the span it stands for:

  tokens   a b c d e f g h i j           (noise: c d, h i j)
  input    a b <extra_id_0> e f g <extra_id_1> </s>
  target   <extra_id_0> c d <extra_id_1> h i j </s>

As T5's `random_spans_noise_mask`: the numbers of noise tokens and spans are fixed by the length
(round(L * density), round(noise / mean_span)), the span lengths are a random composition of them,
a block starts with a kept span and ends with a noise span. Training draws new masks for every batch,
a pure function of (seed, batch number, row), so resume stays exact (`tasks.redraw`). `raw_length`
picks the longest block whose corrupted input fills `seq_len` exactly (T5's `random_spans_helper`),
so there is no padding in the inputs; `target_length` is the targets' length.
"""

from __future__ import annotations

import numpy as np

from jaxft.data.tasks import row_rngs
from jaxft.errors import JaxftError

NOISE_DENSITY = 0.15
MEAN_SPAN = 3.0


def counts(length: int, density: float = NOISE_DENSITY, mean_span: float = MEAN_SPAN) -> tuple[int, int]:
    """(noise tokens, noise spans) of a block of `length` tokens, as T5 rounds them."""
    noise = min(max(int(round(length * density)), 1), length - 1)
    return noise, max(int(round(noise / mean_span)), 1)


def raw_length(seq_len: int, density: float = NOISE_DENSITY, mean_span: float = MEAN_SPAN) -> int:
    """The longest block whose corrupted input (kept tokens, a sentinel per span, EOS) is <= seq_len."""
    n = 2
    while _input_length(n + 1, density, mean_span) <= seq_len:
        n += 1
    if _input_length(n, density, mean_span) > seq_len:
        raise JaxftError(f"data.seq_len={seq_len}: too short for span corruption (expected at least 4)")
    return n


def target_length(seq_len: int, density: float = NOISE_DENSITY, mean_span: float = MEAN_SPAN) -> int:
    noise, spans = counts(raw_length(seq_len, density, mean_span), density, mean_span)
    return noise + spans + 1


def _input_length(n: int, density: float, mean_span: float) -> int:
    noise, spans = counts(n, density, mean_span)
    return n - noise + spans + 1


def _composition(rng: np.random.Generator, total: int, parts: int) -> np.ndarray:
    """`parts` positive lengths summing to `total`, uniformly over the compositions (T5's
    `_random_segmentation`: a shuffled set of parts - 1 cut points among total - 1 places)."""
    first = np.zeros(total, bool)
    first[1:][rng.permutation(total - 1) < parts - 1] = True
    return np.bincount(np.cumsum(first), minlength=parts)


def noise_mask(rng: np.random.Generator, length: int, density: float = NOISE_DENSITY,
               mean_span: float = MEAN_SPAN) -> np.ndarray:
    """A boolean mask of `length`: kept span, noise span, kept, noise, ... (T5's random_spans_noise_mask)."""
    noise, spans = counts(length, density, mean_span)
    lengths = np.stack([_composition(rng, length - noise, spans), _composition(rng, noise, spans)], 1).reshape(-1)
    return np.repeat(np.arange(2 * spans) % 2 == 1, lengths)


def corrupt(arrays: dict, tok, rngs, seq_len: int, density: float = NOISE_DENSITY,
            mean_span: float = MEAN_SPAN) -> dict:
    """Packed blocks [N, raw_length(seq_len)] -> encoder `input_ids` [N, seq_len] and `attention_mask`,
    `labels` [N, target_length] (T5's targets then EOS), `decoder_input_ids` (the labels shifted right
    behind the decoder start token, T5's pad, as transformers' `_shift_right`) and `decoder_attention_mask`.
    The decoder start token is the tokenizer's pad token, as in every T5 config. Row i's mask draws from
    `rngs[i]`, or from `row_rngs(rngs, n)` when `rngs` is a seed; training redraws every batch (`tasks.redraw`)."""
    blocks = arrays["input_ids"]
    n, length = blocks.shape
    if length != raw_length(seq_len, density, mean_span):
        expected = raw_length(seq_len, density, mean_span)
        raise JaxftError(f"span corruption: blocks of {length} tokens, expected {expected} for data.seq_len={seq_len}")
    if tok.eos_id is None:
        raise JaxftError("data.task='span_corruption': the tokenizer has no EOS token (expected T5's </s>)")
    noise, spans = counts(length, density, mean_span)
    sentinels = np.asarray(tok.sentinels(spans), np.int32)
    x_len, t_len = length - noise + spans + 1, noise + spans + 1
    inputs = np.full((n, seq_len), tok.pad_id, np.int32)
    labels = np.empty((n, t_len), np.int32)
    for i, rng in enumerate(row_rngs(rngs, n) if isinstance(rngs, int) else rngs):
        mask = noise_mask(rng, length, density, mean_span)
        inputs[i, :x_len] = np.append(replace_spans(blocks[i], mask, sentinels), tok.eos_id)
        labels[i] = np.append(replace_spans(blocks[i], ~mask, sentinels), tok.eos_id)
    dec = np.concatenate([np.full((n, 1), tok.pad_id, np.int32), labels[:, :-1]], 1)
    attention = np.zeros((n, seq_len), np.int32)
    attention[:, :x_len] = 1
    return {"input_ids": inputs, "attention_mask": attention, "labels": labels, "decoder_input_ids": dec,
            "decoder_attention_mask": np.ones_like(dec), "weight": arrays["weight"]}


def replace_spans(row: np.ndarray, mask: np.ndarray, sentinels: np.ndarray) -> np.ndarray:
    """Each run of masked tokens -> one sentinel, the k-th run the k-th sentinel (T5's
    `noise_span_to_unique_sentinel`). With the noise mask: the input; with its complement: the
    targets (a block starts with a kept run, so the k-th noise span follows the k-th sentinel)."""
    starts = mask & ~np.concatenate([[False], mask[:-1]])
    out = np.where(starts, sentinels[np.maximum(np.cumsum(starts) - 1, 0)], row)
    return out[~mask | starts]
