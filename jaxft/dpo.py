"""DPO (Rafailov et al. 2023): a causal LM taught to prefer the chosen answer of each pair to the rejected one.

    x = (log pi(chosen) - log ref(chosen)) - (log pi(rejected) - log ref(rejected))
    loss = -log sigmoid(beta * x)                                       (`sigmoid`, the paper's)
         = -(1 - e) log sigmoid(beta * x) - e log sigmoid(-beta * x)    (with label smoothing e: cDPO)
    or (x - 1 / (2 beta))^2 (`ipo`, Azar et al. 2023), or max(0, 1 - beta * x) (`hinge`, SLiC), as TRL's
    DPOTrainer names them (`train.dpo_loss`, `train.dpo_label_smoothing`).

log pi(answer) sums the log-probabilities of the answer's tokens (the prompt does not count) under the
model being trained; log ref(answer) is the same under the reference policy, which is the run's
starting point: the base model for LoRA, QLoRA, IA3 and full fine-tuning (whose added parameters
start as the identity), the base with the method's initial prompts for the prompt methods. The
reference log-likelihoods are computed once, before training (`with_reference`, as TRL's
`precompute_ref_log_probs` and Tunix's DPO do), and travel with the batch as `reference_logps`: the
train step runs one model, on the chosen and rejected rows of every pair at once, and does not know
it is DPO. At step 0 x is 0: the sigmoid loss is log 2 for every pair.

Reported (train and eval): `loss`, and `accuracy`, the share of pairs whose chosen answer gains more
than the rejected one (TRL's rewards/accuracies); in eval also the mean implicit rewards
beta * (log pi - log ref) of both answers and their margin (`eval/rewards_chosen`,
`eval/rewards_rejected`, `eval/reward_margin`).

Two losses need no reference model (no pass over the data before training, no reference in memory); both
read each answer's mean token log-probability m = log pi(answer) / its tokens, as TRL computes them:
- `simpo` (Meng et al. 2024; TRL's CPOTrainer with loss_type="simpo" and cpo_alpha=0): -log sigmoid(
  beta * (m_chosen - m_rejected) - gamma), gamma = `train.simpo_gamma` (label smoothing as in `sigmoid`);
- `orpo` (Hong et al. 2024; TRL's ORPOTrainer): the chosen answer's mean token NLL -m_chosen, minus beta
  times log sigmoid of the log odds ratio log(p_c / (1 - p_c)) - log(p_r / (1 - p_r)), p = exp(m). The NLL is
  each pair's own, averaged over pairs (TRL averages it over a batch's chosen tokens: equal where the
  answers are equally long). Logged apart: `train/nll`, `train/log_odds_ratio`.
Their rewards (eval) are beta * m, as TRL's.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxft.cross_entropy import hidden_outputs, row_log_likelihood, row_sums
from jaxft.objectives import Objective, both_answers, next_token, pair_inputs, pair_means, pair_tokens

REFERENCE = "reference_logps"  # [pairs, 2]: the chosen and the rejected answer's log-likelihood under the reference


def answer_weights(batch) -> jax.Array:
    """[2B, T]: 1 at the positions that predict an answer token (chosen rows, then rejected rows)."""
    return next_token(both_answers(batch, "attention_mask") * both_answers(batch, "loss_mask")).astype(jnp.float32)


def log_likelihoods(outputs, batch) -> jax.Array:
    """[pairs, 2]: the sum of log p over each answer's tokens (`loss_mask`), chosen then rejected.

    outputs: logits [2B, T, V], or (hidden, output embedding), whose projection runs chunk by chunk."""
    weights = answer_weights(batch)
    targets = next_token(both_answers(batch, "input_ids"))
    if isinstance(outputs, tuple):
        hidden, embedding, cap = hidden_outputs(outputs)
        ll = row_log_likelihood(hidden, embedding, targets, weights, hidden.dtype, cap)
    else:
        ll = row_sums(outputs.astype(jnp.float32), targets, weights)
    return ll.reshape(2, -1).T


def mean_log_likelihoods(outputs, batch) -> jax.Array:
    """[pairs, 2]: each answer's mean token log-probability (SimPO's and ORPO's, TRL's average_log_prob)."""
    return log_likelihoods(outputs, batch) / jnp.maximum(answer_weights(batch).sum(-1).reshape(2, -1).T, 1.0)


def log1mexp(x):
    """log(1 - exp(x)) for x < 0, accurate at both ends (Maechler 2012)."""
    return jnp.where(x > -0.6931472, jnp.log(-jnp.expm1(x)), jnp.log1p(-jnp.exp(x)))


def pair_losses(x, beta: float, kind: str = "sigmoid", label_smoothing: float = 0.0):
    """Each pair's loss from x, its chosen answer's log-ratio minus its rejected answer's (the docstring)."""
    if kind == "ipo":
        return (x - 1 / (2 * beta)) ** 2
    if kind == "hinge":
        return jax.nn.relu(1 - beta * x)
    return (1 - label_smoothing) * jax.nn.softplus(-beta * x) + label_smoothing * jax.nn.softplus(beta * x)


REFERENCE_FREE = ("simpo", "orpo")


def objective(beta: float, kind: str = "sigmoid", label_smoothing: float = 0.0, gamma: float = 0.5) -> Objective:
    if kind in REFERENCE_FREE:
        return _reference_free(beta, kind, label_smoothing, gamma)

    def log_ratios(outputs, batch):  # [pairs, 2]: log pi - log ref of both answers
        return log_likelihoods(outputs, batch) - batch[REFERENCE]

    def loss(outputs, batch):
        r, w = log_ratios(outputs, batch), batch["weight"]
        x = r[:, 0] - r[:, 1]
        return {"loss_sum": jnp.sum(w * pair_losses(x, beta, kind, label_smoothing)), "count": jnp.sum(w),
                "correct": jnp.sum(w * (x > 0))}

    def eval_sums(outputs, batch, cfg):  # the implicit rewards beta * (log pi - log ref)
        r = beta * log_ratios(outputs, batch)
        return pair_means(r[:, 0], r[:, 1], batch["weight"])

    return Objective("dpo", loss, pair_inputs, eval_sums=eval_sums, sequences=2, tokens=pair_tokens, perplexity=False,
                     prepare=with_reference)


def _reference_free(beta: float, kind: str, label_smoothing: float, gamma: float) -> Objective:
    """SimPO's and ORPO's losses (the module docstring), from the answers' mean token log-probabilities."""
    def loss(outputs, batch):
        m, w = mean_log_likelihoods(outputs, batch), batch["weight"]
        x = m[:, 0] - m[:, 1]
        if kind == "simpo":
            z = beta * x - gamma
            per_pair = (1 - label_smoothing) * jax.nn.softplus(-z) + label_smoothing * jax.nn.softplus(z)
            extra = {}
        else:
            log_odds = x - (log1mexp(m[:, 0]) - log1mexp(m[:, 1]))
            per_pair = -m[:, 0] - beta * jax.nn.log_sigmoid(log_odds)
            extra = {"nll": jnp.sum(w * -m[:, 0]), "log_odds_ratio": jnp.sum(w * log_odds)}
        return {"loss_sum": jnp.sum(w * per_pair), "count": jnp.sum(w), "correct": jnp.sum(w * (x > 0)), **extra}

    def eval_sums(outputs, batch, cfg):  # TRL's rewards: beta * the mean token log-probability
        m = beta * mean_log_likelihoods(outputs, batch)
        return pair_means(m[:, 0], m[:, 1], batch["weight"])

    return Objective(kind, loss, pair_inputs, eval_sums=eval_sums, sequences=2, tokens=pair_tokens, perplexity=False,
                     train_sums=("nll", "log_odds_ratio") if kind == "orpo" else ())


def with_reference(model, params, arrays: dict, batch_size: int, mesh, progress=None) -> dict:
    """`arrays` with `reference_logps` added: both answers' log-likelihoods under `params`, no dropout.

    Every process computes every row's (each feeding its own rows of each batch), so all hold the same
    arrays, as they hold the same data."""
    from jaxft import sharding
    from jaxft.data.iterator import eval_batches

    def run(p, batch):
        with sharding.axis_rules(mesh):
            return log_likelihoods(model.apply({"params": p}, **pair_inputs(batch), return_hidden=True), batch)

    step = jax.jit(run, out_shardings=sharding.replicated(mesh))
    n, out = len(arrays["weight"]), []
    rows = sharding.local_rows(mesh, batch_size)
    for local in eval_batches(arrays, batch_size, rows):
        out.append(np.asarray(jax.device_get(step(params, sharding.to_global(mesh, local, batch_size)))))
        if progress is not None:
            progress.update(min(batch_size, n - progress.n))
    return {**arrays, REFERENCE: np.concatenate(out)[:n].astype(np.float32)}
