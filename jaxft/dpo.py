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
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxft.cross_entropy import hidden_outputs, row_log_likelihood, row_sums
from jaxft.objectives import Objective, both_answers, next_token, pair_inputs, pair_means, pair_tokens

REFERENCE = "reference_logps"  # [pairs, 2]: the chosen and the rejected answer's log-likelihood under the reference


def log_likelihoods(outputs, batch) -> jax.Array:
    """[pairs, 2]: the sum of log p over each answer's tokens (`loss_mask`), chosen then rejected.

    outputs: logits [2B, T, V], or (hidden, output embedding), whose projection runs chunk by chunk."""
    weights = next_token(both_answers(batch, "attention_mask") * both_answers(batch, "loss_mask")).astype(jnp.float32)
    targets = next_token(both_answers(batch, "input_ids"))
    if isinstance(outputs, tuple):
        hidden, embedding, cap = hidden_outputs(outputs)
        ll = row_log_likelihood(hidden, embedding, targets, weights, hidden.dtype, cap)
    else:
        ll = row_sums(outputs.astype(jnp.float32), targets, weights)
    return ll.reshape(2, -1).T


def pair_losses(x, beta: float, kind: str = "sigmoid", label_smoothing: float = 0.0):
    """Each pair's loss from x, its chosen answer's log-ratio minus its rejected answer's (the docstring)."""
    if kind == "ipo":
        return (x - 1 / (2 * beta)) ** 2
    if kind == "hinge":
        return jax.nn.relu(1 - beta * x)
    return (1 - label_smoothing) * jax.nn.softplus(-beta * x) + label_smoothing * jax.nn.softplus(beta * x)


def objective(beta: float, kind: str = "sigmoid", label_smoothing: float = 0.0) -> Objective:
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
