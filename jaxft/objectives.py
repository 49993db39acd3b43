"""Objectives: what a run minimises, as a function of the model's outputs and the batch.

The train and eval steps take an `Objective` as an argument and never ask which one runs: its
`inputs` say which batch fields the model is called with, `loss` turns the outputs into sums and
counts (so micro-batches and devices add up exactly), and `eval_sums` adds what evaluation reports
beyond the loss. Later objectives (seq2seq, SFT, reward models, DPO) are new entries here.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax.numpy as jnp

from jaxft.cross_entropy import fused_cross_entropy, token_stats


def model_inputs(batch) -> dict:
    """The batch fields a model is called with: token ids and padding mask."""
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


@dataclasses.dataclass(frozen=True)
class Objective:
    name: str
    loss: Callable  # (outputs, batch) -> {"loss_sum", "count", "correct"}
    inputs: Callable = model_inputs  # batch -> keyword arguments of `model.apply`
    eval_sums: Callable | None = None  # (outputs, batch, model config) -> extra sums for evaluation


def classification_loss(logits, batch):
    return token_stats(logits, batch["labels"], batch["weight"])


def confusion(logits, batch, cfg):
    """Weights of (true, predicted) pairs, for per-class precision, recall and F1."""
    c = cfg.num_labels
    pred = jnp.argmax(logits, axis=-1)
    return {"confusion": jnp.zeros((c, c), jnp.float32).at[batch["labels"], pred].add(batch["weight"])}


def causal_lm_loss(outputs, batch):
    """outputs: logits [B, T, V], or (hidden, output embedding) to fuse the projection with the loss.

    Position t predicts token t + 1. The targets are shifted instead of the outputs, and the last
    position gets weight 0, so the [B, T, ...] outputs are used whole rather than copied as a slice.
    `loss_mask` (where given) keeps the loss to some tokens, e.g. the responses of SFT.
    """
    shift = lambda x: jnp.pad(x[:, 1:], ((0, 0), (0, 1)))  # noqa: E731
    keep = batch["attention_mask"] * batch.get("loss_mask", batch["attention_mask"])
    w = shift(keep).astype(jnp.float32) * batch["weight"][:, None]
    targets = shift(batch["input_ids"])
    if isinstance(outputs, tuple):
        hidden, embedding = outputs
        return fused_cross_entropy(hidden, embedding, targets, w, hidden.dtype)
    return token_stats(outputs, targets, w)


def shift_labels(labels, decoder_start_token_id: int, pad_token_id: int):
    """Labels [B, T] -> decoder inputs, as transformers' `_shift_right`: the start token first, then
    the labels up to the last but one, -100 read as padding. A seq2seq task builds its batches with it."""
    shifted = jnp.concatenate([jnp.full_like(labels[:, :1], decoder_start_token_id), labels[:, :-1]], axis=1)
    return jnp.where(shifted == -100, pad_token_id, shifted)


def seq2seq_inputs(batch) -> dict:
    """Encoder ids and mask, and the decoder inputs (the labels shifted right, `shift_labels`)."""
    out = {**model_inputs(batch), "decoder_input_ids": batch["decoder_input_ids"]}
    if "decoder_attention_mask" in batch:
        out["decoder_attention_mask"] = batch["decoder_attention_mask"]
    return out


def seq2seq_loss(outputs, batch):
    """outputs: logits [B, T_dec, V] (or hidden, output embedding); decoder position t predicts
    labels[:, t]. Labels of -100 (transformers' ignore index), and those a `labels_mask` zeroes, do not count."""
    labels = batch["labels"]
    keep = labels != -100
    if "labels_mask" in batch:
        keep = keep & (batch["labels_mask"] != 0)
    weight = batch["weight"][:, None] if "weight" in batch else 1.0
    w = keep.astype(jnp.float32) * weight
    targets = jnp.where(keep, labels, 0)
    if isinstance(outputs, tuple):
        hidden, embedding = outputs
        return fused_cross_entropy(hidden, embedding, targets, w, hidden.dtype)
    return token_stats(outputs, targets, w)


OBJECTIVES: dict[str, Objective] = {
    "classification": Objective("classification", classification_loss, eval_sums=confusion),
    "causal_lm": Objective("causal_lm", causal_lm_loss),
    "seq2seq_lm": Objective("seq2seq_lm", seq2seq_loss, seq2seq_inputs),
}


def for_head(head: str) -> Objective:
    """The objective that trains a model's head: a run's default."""
    if head not in OBJECTIVES:
        from jaxft.errors import JaxftError

        raise JaxftError(f"model.head={head!r}: no objective trains it yet (expected one of {', '.join(OBJECTIVES)})")
    return OBJECTIVES[head]
