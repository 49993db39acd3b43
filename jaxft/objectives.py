"""Objectives: what a run minimises, as a function of the model's outputs and the batch.

The train and eval steps take an `Objective` as an argument and never ask which one runs: its
`inputs` say which batch fields the model is called with, `loss` turns the outputs into sums and
counts (so micro-batches and devices add up exactly), and `eval_sums` adds what evaluation reports
beyond the loss. An objective that needs more than the data, such as DPO's reference log-likelihoods
(`jaxft.dpo`), adds it to the arrays once, before training (`prepare`); one that learns from its own
completions (`jaxft.grpo`, `jaxft.ppo`) makes each step's batch itself (`rollout`); one that trains
parameters of its own beside the model's (PPO's value head) declares them (`own_params`).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from jaxft.cross_entropy import fused_cross_entropy, hidden_outputs, softcap, token_stats
from jaxft.data.preference import REJECTED


def model_inputs(batch) -> dict:
    """The batch fields a model is called with: token ids and padding mask, and the token types of
    sentence pairs where the batch has them (BERT-style encoders)."""
    kw = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    if "token_type_ids" in batch:
        kw["token_type_ids"] = batch["token_type_ids"]
    return kw


def packed_inputs(batch) -> dict:
    """Token ids, padding mask and, for packed rows, the segment ids (attention stays within each
    example, positions restart with each). Which fields a batch has is fixed when the step is traced."""
    if "segment_ids" not in batch:
        return model_inputs(batch)
    return {**model_inputs(batch), "segment_ids": batch["segment_ids"]}


@dataclasses.dataclass(frozen=True)
class Objective:
    name: str
    loss: Callable  # (outputs, batch) -> {"loss_sum", "count", "correct"}
    inputs: Callable = model_inputs  # batch -> keyword arguments of `model.apply`
    eval_sums: Callable | None = None  # (outputs, batch, model config) -> extra sums for evaluation
    head_width: Callable = lambda batch: None  # batch -> positions per row the head runs at, if not all (FLOPs)
    # (outputs, batch) -> class logits [B, C], for objectives that classify (jaxft.evaluate's predictions)
    class_logits: Callable | None = None
    sequences: int = 1  # model rows per example (DPO: the chosen and the rejected answer), for FLOPs
    tokens: Callable = lambda batch: batch["attention_mask"].sum()  # real tokens of a batch, for tokens/s
    perplexity: bool | None = None  # whether exp(loss) means anything; None: where the head is a language model's
    # (model, params, arrays, batch size, mesh) -> arrays, once before training, with what the loss needs
    # beyond the data (DPO: the reference log-likelihoods, computed with the starting parameters)
    prepare: Callable | None = None
    accuracy: bool = True  # whether `correct` / `count` means anything (train/accuracy)
    train_sums: tuple[str, ...] = ()  # more sums `loss` returns, logged as train/<name> = sum / count
    # (model, trainable, data, mesh, seed) -> a callable that makes each step's batch from the policy
    # itself, (trainable, frozen, prompt rows, prompt batch, step) -> (local rows, global batch), with
    # `period` (steps per batch it makes) and `report()` (its figures for the log); None: the data's batch
    rollout: Callable | None = None
    new_tokens: int = 0  # tokens a rollout adds to each row after the data's (GRPO's completions), for jaxft.plan
    keeps_reference: bool = False  # a rollout keeps a copy of the starting trainable parameters (for jaxft.plan)
    # (model, mesh, seed) -> parameters the objective trains beside the model's (PPO's value head or
    # critic), sharded over the mesh as the model's are: they sit under OWN in the trainable tree (and,
    # for an `own_model`'s frozen leaves, the frozen one), the loss is called as loss(outputs, batch, own
    # parameters), and exports leave them out (they are no part of the model)
    own_params: Callable | None = None
    own_model: "OwnModel | None" = None


class OwnModel(NamedTuple):
    """A model of its own that an objective's loss runs on the model's rows (PPO's separate critic): its
    parameters are `own_params()[key]`, and `method` (a `jaxft.peft.Method`) says which of them train;
    the rest are frozen, with the model's frozen base. jaxft.plan and train/mfu count it."""
    key: str
    model: object
    method: object


OWN = "objective"  # where an objective's own parameters sit in the trainable (and frozen) tree


def has_perplexity(objective: Objective, head: str) -> bool:
    """Whether exp(loss) means anything: as the objective says, else where the head is a language model's."""
    return head in ("causal_lm", "seq2seq_lm") if objective.perplexity is None else objective.perplexity


def loss_of(objective: Objective, outputs, batch, params) -> dict:
    """The objective's sums, given its own parameters where it has them (`params`: the trainable and
    frozen trees merged)."""
    if objective.own_params is None:
        return objective.loss(outputs, batch)
    return objective.loss(outputs, batch, params[OWN])


def split_own(objective: Objective, own: dict) -> tuple[dict, dict]:
    """An objective's own parameters -> (trainable, frozen): every one trains, except the leaves of an
    `own_model` its method leaves frozen."""
    if objective.own_model is None:
        return own, {}
    from jaxft.peft.partition import split

    key = objective.own_model.key
    trains, frozen = split(own[key], objective.own_model.method.trainable)
    return {**own, key: trains}, ({key: frozen} if frozen else {})


def without_own(tree: dict) -> dict:
    """A trainable tree without an objective's own parameters: the model's (for exports)."""
    return {k: v for k, v in tree.items() if k != OWN}


def classification_loss(logits, batch):
    return token_stats(logits, batch["labels"], batch["weight"])


def confusion(logits, batch, cfg):
    """Weights of (true, predicted) pairs, for per-class precision, recall and F1."""
    c = cfg.num_labels
    pred = jnp.argmax(logits, axis=-1)
    return {"confusion": jnp.zeros((c, c), jnp.float32).at[batch["labels"], pred].add(batch["weight"])}


def next_token(x):
    """[B, T, ...] -> position t holds x[t + 1] (position t predicts token t + 1), the last position 0."""
    return jnp.pad(x[:, 1:], ((0, 0), (0, 1)) + ((0, 0),) * (x.ndim - 2))


def causal_lm_loss(outputs, batch):
    """outputs: logits [B, T, V], or (hidden, output embedding) to fuse the projection with the loss.

    Position t predicts token t + 1. The targets are shifted instead of the outputs, and the last
    position gets weight 0, so the [B, T, ...] outputs are used whole rather than copied as a slice.
    `loss_mask` (where given) keeps the loss to some tokens, e.g. the responses of SFT; with
    `segment_ids` (packed rows), no position predicts the first token of the next example.
    """
    keep = next_token(batch["attention_mask"] * batch.get("loss_mask", batch["attention_mask"]))
    if "segment_ids" in batch:  # the target t + 1 is in position t's example
        keep = keep * (next_token(batch["segment_ids"]) == batch["segment_ids"])
    w = keep.astype(jnp.float32) * batch["weight"][:, None]
    targets = next_token(batch["input_ids"])
    if isinstance(outputs, tuple):
        hidden, embedding, cap = hidden_outputs(outputs)
        return fused_cross_entropy(hidden, embedding, targets, w, hidden.dtype, cap)
    return token_stats(outputs, targets, w)


def per_task_of(loss: Callable) -> Callable:
    """eval_sums: the sums and counts of `loss` per source of a mixture (`task_weight` [B, K]: row b is
    from source k), for eval/loss/<source>; nothing for a single source."""

    def sums_per_task(outputs, batch, cfg):
        if "task_weight" not in batch:
            return {}
        sums = [loss(outputs, {**batch, "weight": batch["weight"] * batch["task_weight"][:, k]})
                for k in range(batch["task_weight"].shape[1])]
        return {"task_loss_sum": jnp.stack([s["loss_sum"] for s in sums]),
                "task_count": jnp.stack([s["count"] for s in sums])}

    return sums_per_task


per_task = per_task_of(causal_lm_loss)


IGNORE = -100  # transformers' label of a position that has no target


def per_token_weights(labels, batch):
    """Weight of each labelled position: a real token (attention mask), a label >= 0 (not -100), and
    the example's weight (0 for eval padding rows)."""
    keep = (labels >= 0) & (batch["attention_mask"] > 0)
    return keep.astype(jnp.float32) * batch["weight"][:, None]


def masked_lm_inputs(batch) -> dict:
    """With `mlm_positions` [B, K] (the targets' positions, -1 padding), the head computes logits at
    those K positions only (`label_positions`): most of an MLM's FLOPs are its vocabulary projection."""
    kw = model_inputs(batch)
    if "mlm_positions" in batch:
        kw["label_positions"] = jnp.maximum(batch["mlm_positions"], 0)
    return kw


def masked_lm_loss(outputs, batch):
    """outputs: logits [B, T, V], or [B, K, V] at `mlm_positions`. `mlm_labels` [B, T]: the original
    token where the input was masked (replaced, kept or randomised, as BERT does), -100 elsewhere;
    only those positions count."""
    labels = batch["mlm_labels"]
    if "mlm_positions" not in batch:
        return token_stats(outputs, jnp.maximum(labels, 0), per_token_weights(labels, batch))
    where = batch["mlm_positions"]
    labels = jnp.where(where >= 0, jnp.take_along_axis(labels, jnp.maximum(where, 0), axis=1), -100)
    weights = (labels >= 0).astype(jnp.float32) * batch["weight"][:, None]
    return token_stats(outputs, jnp.maximum(labels, 0), weights)


def cloze_inputs(batch) -> dict:
    """A masked LM's inputs; rows of one class each ([B, C, L], multi-token label words) go as B*C rows."""
    return {k: v.reshape((-1, v.shape[-1])) for k, v in masked_lm_inputs(batch).items()}


def cloze_logits(outputs, batch):
    """PET: the LM's outputs at `mlm_positions` -> the class logits [B, C]. One-token label words
    (`verbalizer` [B, C]): their logits at the mask ([B, 1, V]); a causal LM's fused form, (final states
    [B, 1, D], output embedding [V, D]), projects onto the C words alone. Longer words (`verbalizer`
    [B, C, K], -1 after a word's end): the sum of their tokens' log-probabilities, read from outputs
    [B * R, K, V] (R = 1 row shared by every class, or C rows, one each; see `jaxft.data.tasks.cloze`)."""
    words = batch["verbalizer"]
    if isinstance(outputs, tuple):
        h, embed, cap = hidden_outputs(outputs)
        if words.ndim == 2:
            picked = jnp.take(embed, words, axis=0).astype(h.dtype)  # [B, C, D]
            return softcap(jnp.einsum("bd,bcd->bc", h[:, 0], picked, preferred_element_type=jnp.float32), cap)
        outputs = softcap(jnp.einsum("bkd,vd->bkv", h, embed.astype(h.dtype), preferred_element_type=jnp.float32), cap)
    if words.ndim == 2:
        return jnp.take_along_axis(outputs[:, 0, :], words, axis=-1)
    b, _, k = words.shape
    logp = jax.nn.log_softmax(outputs.astype(jnp.float32), -1).reshape((b, -1, k, outputs.shape[-1]))
    logp = jnp.broadcast_to(logp, words.shape + logp.shape[-1:])  # a shared row serves every class
    picked = jnp.take_along_axis(logp, jnp.maximum(words, 0)[..., None], axis=-1)[..., 0]
    return jnp.sum(jnp.where(words >= 0, picked, 0.0), -1)


def cloze_loss(outputs, batch):
    return classification_loss(cloze_logits(outputs, batch), batch)


def cloze_confusion(outputs, batch, cfg):
    return confusion(cloze_logits(outputs, batch), batch, cfg)


def token_classification_loss(logits, batch):
    """logits [B, T, C]; `labels` [B, T], -100 (sub-word continuations, special tokens) ignored."""
    labels = batch["labels"]
    return token_stats(logits, jnp.maximum(labels, 0), per_token_weights(labels, batch))


def token_confusion(logits, batch, cfg):
    """Weights of (true, predicted) pairs over the labelled tokens; with tag names (`B-PER`, ...) the
    entities too (`jaxft.entities`)."""
    from jaxft.entities import entity_sums

    c, labels = cfg.num_labels, batch["labels"]
    pred = jnp.argmax(logits, axis=-1)
    w = per_token_weights(labels, batch)
    return {"confusion": jnp.zeros((c, c), jnp.float32).at[jnp.maximum(labels, 0), pred].add(w),
            **entity_sums(logits, batch, getattr(cfg, "labels", None))}


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
        hidden, embedding, cap = hidden_outputs(outputs)
        return fused_cross_entropy(hidden, embedding, targets, w, hidden.dtype, cap)
    return token_stats(outputs, targets, w)


# ---------------------------------------------------------------------------------------------
# Preference pairs (`jaxft.data.preference`): a chosen and a rejected answer to one prompt.


def both_answers(batch, key: str):
    """Field `key` of the chosen rows, then of the rejected rows: [2B, ...]."""
    return jnp.concatenate([batch[key], batch[REJECTED + key]], axis=0)


def pair_inputs(batch) -> dict:
    """Both answers of every pair in one model call of twice the batch."""
    return {"input_ids": both_answers(batch, "input_ids"), "attention_mask": both_answers(batch, "attention_mask")}


def pair_tokens(batch):
    return batch["attention_mask"].sum() + batch[REJECTED + "attention_mask"].sum()


def pair_loss(chosen, rejected, weight) -> dict:
    """-log sigmoid(chosen - rejected) per pair, from the scores (rewards) of both answers [pairs]; correct:
    the chosen answer scores higher."""
    margin = chosen - rejected
    return {"loss_sum": jnp.sum(weight * jax.nn.softplus(-margin)), "count": jnp.sum(weight),
            "correct": jnp.sum(weight * (margin > 0))}


def pair_means(chosen, rejected, weight) -> dict:
    """eval_sums: the mean scores of both answers and their margin (eval/rewards_chosen, ...)."""
    return {"mean/rewards_chosen": jnp.sum(weight * chosen), "mean/rewards_rejected": jnp.sum(weight * rejected),
            "mean/reward_margin": jnp.sum(weight * (chosen - rejected))}


def rewards(logits):
    """A reward model's [2B, 1] outputs -> (chosen, rejected) rewards, [B] each, in fp32."""
    r = logits[:, 0].astype(jnp.float32).reshape(2, -1)
    return r[0], r[1]


def reward_loss(logits, batch):
    """A reward model (Bradley-Terry, as TRL's RewardTrainer): a one-output sequence classifier trained so
    that r(chosen) > r(rejected)."""
    return pair_loss(*rewards(logits), batch["weight"])


OBJECTIVES: dict[str, Objective] = {
    "classification": Objective("classification", classification_loss, eval_sums=confusion,
                                class_logits=lambda outputs, batch: outputs),
    "causal_lm": Objective("causal_lm", causal_lm_loss, inputs=packed_inputs, eval_sums=per_task),
    # Instruction tuning: the causal LM loss over the responses only (`loss_mask`), packed or padded rows.
    "sft": Objective("sft", causal_lm_loss, inputs=packed_inputs, eval_sums=per_task),
    "masked_lm": Objective("masked_lm", masked_lm_loss, masked_lm_inputs,
                           head_width=lambda batch: batch["mlm_positions"].shape[1] if "mlm_positions" in batch else None),
    "token_classification": Objective("token_classification", token_classification_loss, eval_sums=token_confusion),
    # PET's hard prompts: classification read from a masked LM's words at the template's mask.
    "cloze": Objective("cloze", cloze_loss, cloze_inputs, eval_sums=cloze_confusion,
                       head_width=lambda batch: batch["mlm_positions"].shape[-1],
                       class_logits=cloze_logits, perplexity=False),
    "seq2seq_lm": Objective("seq2seq_lm", seq2seq_loss, seq2seq_inputs),
    # Encoder-decoder data (`jaxft.data.seq2seq`): the same loss, and per source of a mixture.
    "seq2seq": Objective("seq2seq", seq2seq_loss, seq2seq_inputs, eval_sums=per_task_of(seq2seq_loss)),
    "reward": Objective("reward", reward_loss, pair_inputs, sequences=2, tokens=pair_tokens,
                        eval_sums=lambda logits, batch, cfg: pair_means(*rewards(logits), batch["weight"])),
}
OBJECTIVES["span_corruption"] = OBJECTIVES["seq2seq_lm"]  # T5's pretraining: seq2seq on corrupted blocks
# The model head each data task trains.
HEADS = {"classification": "classification", "causal_lm": "causal_lm", "sft": "causal_lm", "masked_lm": "masked_lm",
         "token_classification": "token_classification", "span_corruption": "seq2seq_lm", "seq2seq": "seq2seq_lm",
         "dpo": "causal_lm", "reward": "classification"}
# Tasks a model may answer with one of several heads: the first one it has. A cloze question goes to
# a masked LM's mask (PET), or to a causal LM's next word after the template (its mask ends it). A
# policy that learns from its own completions (GRPO, PPO) is a decoder's LM head or an encoder-decoder's.
POLICY_HEADS = ("causal_lm", "seq2seq_lm")
HEAD_CHOICES = {"cloze": ("masked_lm", "causal_lm"), "grpo": POLICY_HEADS, "ppo": POLICY_HEADS}


def head_for(task: str, heads=()) -> str:
    """The head a data task trains on a model with these `heads` (its family's); None for an unknown task."""
    choices = HEAD_CHOICES.get(task)
    if choices:
        return next((h for h in choices if h in heads), choices[0])
    return HEADS.get(task)


def _dpo(train, cfg=None, method=None) -> Objective:
    from jaxft import dpo

    return dpo.objective(float(train.dpo_beta), str(train.get("dpo_loss", "sigmoid")),
                         float(train.get("dpo_label_smoothing", 0.0)), float(train.get("simpo_gamma", 0.5)))


def _grpo(train, cfg=None, method=None) -> Objective:
    from jaxft import grpo

    return grpo.objective(grpo.settings(train))


def _ppo(train, cfg=None, method=None) -> Objective:
    from jaxft import ppo
    from jaxft.models import family

    # the value head reads the final hidden states, which a family's LM head may scale first (T5); a
    # separate critic is built to compute as the policy does, with its method's settings from `method`
    return ppo.objective(ppo.settings(train), family.of(cfg).head_scale(cfg) if cfg is not None else 1.0, cfg,
                         method)


# objectives with settings: (the config's train section, the model's config or None, the config's method
# section or None) -> Objective
MADE = {"dpo": _dpo, "grpo": _grpo, "ppo": _ppo}


def for_task(task: str, train=None, cfg=None, method=None) -> Objective:
    """The objective of a data task (`data.task`, or what the data says); `train`: the config's train
    section, for the objectives that take settings (DPO's `train.dpo_beta`; its default without it);
    `cfg`: the model's config, for what its family changes (PPO's value head on T5's states); `method`:
    the config's method section, whose settings a PPO critic's own method takes."""
    from jaxft.errors import JaxftError

    if task in MADE:
        if train is None:
            from jaxft.config import base_config

            train = base_config().train
        return MADE[task](train, cfg, method)
    if task not in OBJECTIVES:
        raise JaxftError(f"data.task={task!r}: no objective for it (expected one of {', '.join([*OBJECTIVES, *MADE])})")
    return OBJECTIVES[task]


def for_head(head: str) -> Objective:
    """The objective that trains a model's head: a run's default."""
    if head not in OBJECTIVES:
        from jaxft.errors import JaxftError

        raise JaxftError(f"model.head={head!r}: no objective trains it yet (expected one of {', '.join(OBJECTIVES)})")
    return OBJECTIVES[head]
