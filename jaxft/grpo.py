"""GRPO (Shao et al. 2024, DeepSeekMath): reinforcement learning of a policy from rewards of its own completions.

The policy is a causal LM, which continues its prompt, or an encoder-decoder (T5; RL4LMs' seq2seq
policies), whose encoder reads the prompt and whose decoder writes the completion from its start token.

Every step the policy completes each of the batch's prompts G times (`train.grpo_generations`), by
sampling; reward functions score the completions (`jaxft.rewards`, TRL's calling convention); each
completion's advantage is its reward against its group's: A = (r - mean) / (std + 1e-4) (std of the G
rewards, unbiased, as torch's; `train.grpo_scale_rewards=False` leaves out the division). The loss is
PPO's clipped surrogate per completion token, with a KL penalty towards the reference policy (the run's
starting point, as in DPO):

    ratio = pi(token) / pi_old(token)
    loss  = -min(ratio * A, clip(ratio, 1 - eps, 1 + eps) * A) + beta * (ref / pi - log(ref / pi) - 1)

summed over every completion token of the batch and divided by their count (TRL's `loss_type="dapo"`),
as every jaxft loss is a sum and a count; `train.grpo_loss_type=grpo` averages each completion's tokens
first (the paper's), `dr_grpo` divides by completions x max_new_tokens (Dr. GRPO).
`train.grpo_mask_truncated` leaves completions that reach max_new_tokens without an EOS out of the loss.
pi_old is the policy that sampled: each batch of completions trains `train.grpo_iterations` optimizer
steps (TRL's num_iterations); with one, pi_old is pi itself and the ratio is 1 (its gradient is the
policy gradient's). Log-probabilities are of logits / temperature,
as sampled (TRL's). What makes this PPO without a learned critic is the group baseline.

The batch a step trains on is made by the policy itself, so the loop asks the objective's `rollout`
for it instead of the data: `train.batch_size` prompts -> batch_size x G rows of prompt + completion
(`attention_mask` up to and including the completion's first EOS, `loss_mask` on the completion),
`advantages`, and the reference's (`ref_logps`) and, with several iterations, the sampler's (`old_logps`)
log-probabilities of every token. An encoder-decoder's rows keep the prompt as `input_ids` (the
encoder's) and the completion as `labels` (-100 after its EOS) with `decoder_input_ids` the start token
and the completion shifted right (as `jaxft.data.seq2seq`'s pairs), `loss_mask` on the completion: one
seq2seq forward pass gives every completion token's log-probability (`completion_targets` says which
position predicts which token, in both layouts). The train step does not know it is GRPO, nor which
kind of policy trains. The completions are drawn with a key of (train.seed, step), so a resumed run
draws the same ones.

Logged: train/reward (the weighted sum's mean) and each function's (train/reward/<name>), train/reward_std
(mean within groups), train/completion_length, train/clipped_completions (no EOS before
`grpo_max_new_tokens`), train/kl, train/clip_ratio. Eval generates greedily for the held-out prompts and
reports eval/reward and eval/reward/<name>; the completions go to samples/step_N.jsonl.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxft import cross_entropy
from jaxft.errors import JaxftError
from jaxft.objectives import Objective, model_inputs, next_token, seq2seq_inputs, without_own

EPS_STD = 1e-4  # TRL's: a group whose rewards are all equal gets advantage 0, not 0 / 0
LOSS_TYPES = ("dapo", "grpo", "dr_grpo")


@dataclasses.dataclass(frozen=True)
class Settings:
    generations: int = 4
    max_new_tokens: int = 32
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    beta: float = 0.04
    epsilon: float = 0.2
    iterations: int = 1
    scale_rewards: bool = True
    rewards: str = ""
    reward_weights: str = ""
    loss_type: str = "dapo"  # how the token losses are averaged: dapo | grpo | dr_grpo (TRL's names)
    mask_truncated: bool = False  # completions without an EOS count nothing in the loss (DAPO's overlong filter)


def settings(train, kind=Settings, min_generations: int = 2):
    """The config's `train.grpo_*` keys (and, for a subclass of Settings, its own `train.<prefix>_*`
    keys), checked (one line naming the key)."""
    prefix = lambda name: "grpo" if name in Settings.__dataclass_fields__ else kind.PREFIX  # noqa: E731
    s = kind(**{f.name: type(f.default)(train.get(f"{prefix(f.name)}_{f.name}", f.default))
                for f in dataclasses.fields(kind)})
    group = "an integer >= 2 (a group needs two rewards to compare)" if min_generations > 1 else "a positive integer"
    for name, ok, expected in (("generations", s.generations >= min_generations, group),
                               ("max_new_tokens", s.max_new_tokens >= 1, "a positive integer"),
                               ("temperature", s.temperature > 0, "> 0 (GRPO samples its completions)"),
                               ("top_k", s.top_k >= 0, ">= 0 (0 keeps every token)"),
                               ("top_p", 0 < s.top_p <= 1, "0 < top_p <= 1"),
                               ("beta", s.beta >= 0, ">= 0 (0: no KL penalty, no reference pass)"),
                               ("epsilon", 0 < s.epsilon < 1, "0 < epsilon < 1"),
                               ("iterations", s.iterations >= 1, "a positive integer"),
                               ("loss_type", s.loss_type in LOSS_TYPES, "one of " + ", ".join(map(repr, LOSS_TYPES)))):
        if not ok:  # NaN fails these comparisons too
            raise JaxftError(f"train.grpo_{name}={getattr(s, name)}: expected {expected}")
    return s


# ---------------------------------------------------------------------------------------------
# The loss.


def policy_inputs(batch) -> dict:
    """The policy's inputs: rows of prompt + completion (a decoder), or the prompt to the encoder and the
    start token + completion to the decoder (an encoder-decoder's rows: they have `decoder_input_ids`)."""
    return seq2seq_inputs(batch) if "decoder_input_ids" in batch else model_inputs(batch)


def completion_targets(batch):
    """-> (the token each output position predicts [rows, T], 1 where it is a completion's token). A
    decoder's position t predicts token t + 1 of its row; an encoder-decoder's decoder position t predicts
    completion token t (`labels`, -100 after the completion)."""
    if "labels" in batch:
        return jnp.maximum(batch["labels"], 0), batch["loss_mask"]
    return next_token(batch["input_ids"]), next_token(batch["attention_mask"] * batch["loss_mask"])


def tokens(batch):
    """The real tokens of a batch of rows, prompts and completions (an encoder-decoder's in both streams)."""
    return batch["attention_mask"].sum() + (batch["loss_mask"].sum() if "labels" in batch else 0)


def token_log_probs(outputs, batch, temperature: float = 1.0):
    """[rows, T]: position t holds log p(the token it predicts, `completion_targets`) under logits /
    temperature. outputs: logits, or (hidden, output embedding), projected chunk by chunk."""
    targets = completion_targets(batch)[0]
    if isinstance(outputs, tuple):
        hidden, embedding, cap = cross_entropy.hidden_outputs(outputs)
        if cap:  # the temperature divides the capped logits
            return cross_entropy.token_log_probs(hidden, embedding, targets, hidden.dtype, cap, temperature)
        scaled = hidden if temperature == 1.0 else (hidden.astype(jnp.float32) / temperature).astype(hidden.dtype)
        return cross_entropy.token_log_probs(scaled, embedding, targets, hidden.dtype)
    return cross_entropy.log_probs(outputs.astype(jnp.float32) / temperature, targets)


def completion_weights(batch):
    """[rows, T]: the row's weight where position t predicts a completion token (`completion_targets`), else 0."""
    return completion_targets(batch)[1].astype(jnp.float32) * batch["weight"][:, None]


def per_token(logp, old, ref, advantages, beta: float, epsilon: float):
    """-> (loss, KL, clipped) per token [rows, T] (the module docstring); `ref` None: no KL."""
    ratio = jnp.exp(logp - old)
    a = advantages[:, None]
    loss = -jnp.minimum(ratio * a, jnp.clip(ratio, 1 - epsilon, 1 + epsilon) * a)
    kl = jnp.zeros_like(logp) if ref is None else jnp.exp(ref - logp) - (ref - logp) - 1  # Schulman's k3
    clipped = ((ratio < 1 - epsilon) & (a < 0)) | ((ratio > 1 + epsilon) & (a > 0))
    return loss + beta * kl, kl, clipped.astype(jnp.float32)


def token_weights(batch, loss_type: str, max_new_tokens: int):
    """-> (weight of each token's loss [rows, T], the count the summed loss is divided by), so that
    sum / count over the whole batch is TRL's loss of that type: dapo, the mean over every completion
    token; grpo (the paper's), the mean over completions of each one's token mean; dr_grpo (Dr. GRPO), the
    token sum over completions x max_new_tokens."""
    w = completion_weights(batch)
    rows = batch["weight"] * (jnp.sum(w, axis=1) > 0)
    if loss_type == "grpo":
        return w / jnp.maximum(jnp.sum(w, axis=1, keepdims=True), 1.0), jnp.sum(rows)
    if loss_type == "dr_grpo":
        return w, jnp.sum(batch["weight"]) * max_new_tokens
    return w, jnp.sum(w)


def objective(s: Settings) -> Objective:
    def loss(outputs, batch):
        logp = token_log_probs(outputs, batch, s.temperature)
        old = batch["old_logps"] if "old_logps" in batch else jax.lax.stop_gradient(logp)
        per, kl, clipped = per_token(logp, old, batch.get("ref_logps"), batch["advantages"], s.beta, s.epsilon)
        w, count = token_weights(batch, s.loss_type, s.max_new_tokens)  # kl and clip_ratio: averaged as the loss
        return {"loss_sum": jnp.sum(w * per), "count": count, "correct": jnp.zeros((), jnp.float32),
                "kl": jnp.sum(w * kl), "clip_ratio": jnp.sum(w * clipped)}

    return Objective("grpo", loss, policy_inputs, sequences=s.generations, tokens=tokens, perplexity=False,
                     accuracy=False, train_sums=("kl", "clip_ratio"), rollout=functools.partial(Rollout, s),
                     new_tokens=s.max_new_tokens, keeps_reference=s.beta > 0)


def advantages(rewards, generations: int, scale: bool = True) -> np.ndarray:
    """Rewards [n] in groups of `generations` consecutive rows -> each row's advantage in its group."""
    r = np.asarray(rewards, np.float64).reshape(-1, generations)
    a = r - r.mean(axis=1, keepdims=True)
    if scale:
        a = a / (r.std(axis=1, ddof=1, keepdims=True) + EPS_STD)
    return a.reshape(-1).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Rollouts: the policy's completions, scored.


def completion_mask(new, eos) -> np.ndarray:
    """New tokens [n, N] -> 1 up to and including each row's first EOS (all N where none)."""
    is_eos = np.isin(new, eos)
    first = np.where(is_eos.any(axis=1), is_eos.argmax(axis=1), new.shape[1] - 1)
    return (np.arange(new.shape[1])[None] <= first[:, None]).astype(np.int32)


def completion_texts(tok, new, mask, eos=()) -> list[str]:
    """The completions' texts, without the stop tokens (`eos`) they end with."""
    eos = set(np.asarray(eos).tolist()) | set(tok.eos or ())
    return [tok.decode([t for t, m in zip(row, keep) if m and t not in eos]).strip() for row, keep in zip(new, mask)]


def reward_inputs(records, index, prompt_values, completions) -> tuple[list, list, dict]:
    """(prompts, completions, columns) as reward functions take them: a conversational prompt's
    completion is an assistant turn; every other field of the records is a column (TRL's)."""
    rows = [records.rows[i] for i in index]
    prompts = [prompt_values[int(i)] for i in index]
    completions = [[{"role": "assistant", "content": c}] if isinstance(p, list) else c
                   for p, c in zip(prompts, completions)]
    keys = list(dict.fromkeys(k for r in rows if isinstance(r, dict) for k in r if k != "prompt"))
    return prompts, completions, {k: [r.get(k) if isinstance(r, dict) else None for r in rows] for k in keys}


def score_completions(functions, tok, new, eos, records, index, prompt_values):
    """New tokens [n, N] of the prompts of records `index` -> (total reward [n], each function's [k, n],
    completion mask [n, N], prompts and completion texts as the reward functions got them)."""
    from jaxft import rewards

    mask = completion_mask(new, eos)
    texts = completion_texts(tok, new, mask, eos)
    prompts, completions, columns = reward_inputs(records, index, prompt_values, texts)
    total, each = rewards.score(functions, prompts, completions, [list(r[m > 0]) for r, m in zip(new, mask)], columns)
    return total, each, mask, prompts, texts


def per_function(split: str, functions, each) -> dict[str, float]:
    """<split>/reward/<name>: each reward function's mean (None skipped), where there are several."""
    if len(functions) < 2:
        return {}
    return {f"{split}/reward/{name}": float(np.nanmean(v)) for (name, _, _), v in zip(functions, each)}


def check_rewards(s: Settings, records, prompt_values) -> None:
    """Before anything is written: each reward function called once, on the first prompt and an empty
    completion, so a function that does not take TRL's arguments is one line, not a failure at step 1."""
    from jaxft import rewards

    first = next(i for i, v in enumerate(prompt_values) if v is not None)
    prompts, completions, columns = reward_inputs(records, [first], prompt_values, [""])
    for name, fn, weight in rewards.load(s.rewards, s.reward_weights):
        try:
            rewards.score([(name, fn, weight)], prompts, completions, [[]], columns)
        except JaxftError:
            raise
        except Exception as e:  # the user's code: its own message, with where it was called
            raise JaxftError(f"train.grpo_rewards: reward function {name!r} failed when called with the prompt of "
                             f"{records.where[first]} and an empty completion: {type(e).__name__}: {e}") from None


def policy_rows(prompt: dict, new, mask, pad: int, decoder_start: int | None = None) -> dict:
    """Prompts (`input_ids`, `attention_mask`) and their completions (new tokens [n, N], `mask` 1 up to the
    first EOS) -> the rows the policy reads (the module docstring): a decoder's prompt + completion, or with
    a `decoder_start` token an encoder-decoder's prompt for the encoder and completion for the decoder."""
    if decoder_start is None:
        return {"input_ids": np.concatenate([prompt["input_ids"], np.where(mask > 0, new, pad)], axis=1),
                "attention_mask": np.concatenate([prompt["attention_mask"], mask], axis=1),
                "loss_mask": np.concatenate([np.zeros_like(prompt["attention_mask"]), mask], axis=1)}
    from jaxft.data import seq2seq

    labels = np.where(mask > 0, new, seq2seq.IGNORE).astype(np.int32)
    return {"input_ids": prompt["input_ids"], "attention_mask": prompt["attention_mask"], "labels": labels,
            "decoder_input_ids": seq2seq.decoder_inputs(labels, decoder_start, pad), "loss_mask": mask}


class Rollout:
    """The loop's source of batches for GRPO: `(trainable, frozen, prompt batch, step) -> (local rows,
    global batch)` of prompts + completions (module docstring); a new one every `period` steps."""

    def __init__(self, s: Settings, model, trainable, data, mesh, seed: int):
        from jaxft import generate, rewards, sharding
        from jaxft.models import family
        from jaxft.peft.partition import merge

        self.s, self.model, self.mesh, self.seed, self.data = s, model, mesh, seed, data
        self.period = s.iterations
        self.functions = rewards.load(s.rewards, s.reward_weights)
        tok = data.tokenizer
        # where completions end: EOS, and a chat template's end of answer (`Data.stop`)
        self.eos = np.asarray(data.stop or tok.eos or ([model.cfg.eos_token_id] if model.cfg.eos_token_id is not None
                                                        else [-1]))
        self.pad = tok.pad_id if tok.pad_id is not None else int(self.eos[0])
        # an encoder-decoder's rows start the decoder as generation does (None: a decoder's rows)
        start = getattr(model.cfg, "decoder_start_token_id", None)
        start = start if start is not None else self.pad
        self.decoder_start = start if family.of(model.cfg).encoder_decoder else None
        # the reference policy: the starting point, copied (the state's parameters are donated each step);
        # the model's alone, not an objective's own parameters (PPO's critic)
        self.reference = jax.tree_util.tree_map(jnp.copy, without_own(trainable)) if s.beta else None
        self._generate = generate.compiled(model, generate.Settings(s.max_new_tokens, s.temperature, s.top_k, s.top_p,
                                                                    num_eos=len(self.eos)))

        def logps(trainable, frozen, batch):
            return token_log_probs(self.outputs(trainable, frozen, batch), batch, s.temperature)

        self._logps = jax.jit(logps, out_shardings=sharding.batch_sharding(mesh, 2))
        self._merge = merge
        self.cached, self.stats = None, {}

    def outputs(self, trainable, frozen, batch):
        """The policy's (final hidden states, output embedding) on rows of prompt + completion."""
        from jaxft import sharding

        with sharding.axis_rules(self.mesh):
            return self.model.apply({"params": self._merge(trainable, frozen)}, **policy_inputs(batch),
                                    return_hidden=True)

    def __call__(self, trainable, frozen, local, global_batch, step: int):
        from jaxft import sharding

        if step % self.period and self.cached is not None:
            return self.cached
        s, g, mesh = self.s, self.s.generations, self.mesh
        n_global = global_batch["input_ids"].shape[0] * g
        prompt = {k: np.repeat(local[k], g, axis=0) for k in ("input_ids", "attention_mask", "weight", "record")}
        ids = sharding.to_global(mesh, {k: prompt[k] for k in ("input_ids", "attention_mask")}, n_global)
        key = jax.random.fold_in(jax.random.PRNGKey(self.seed), step)
        new = self._generate(self._merge(trainable, frozen), ids["input_ids"], ids["attention_mask"],
                             jnp.asarray(self.eos, jnp.int32), jnp.int32(self.pad), key)
        start, stop = sharding.local_rows(mesh, n_global)
        new = np.asarray(sharding.gather(new))[start:stop]
        total, each, mask, _, _ = score_completions(self.functions, self.data.tokenizer, new, self.eos,
                                                    self.data.records["train"][0], prompt["record"],
                                                    self.data.prompts["train"])
        truncated = ~np.isin(new, self.eos).any(axis=1)  # no EOS within max_new_tokens
        exp = {**policy_rows(prompt, new, mask, self.pad, self.decoder_start),
               "weight": prompt["weight"] * (~truncated if s.mask_truncated else 1)}
        batch, figures = self.complete(exp, total, trainable, frozen, n_global)
        self.stats = {**self._stats(*sharding.gather((total, each.T, mask.sum(axis=1), truncated))), **figures}
        self.cached = exp, batch
        return self.cached

    def complete(self, exp: dict, rewards, trainable, frozen, n_global: int) -> tuple[dict, dict]:
        """The local rows of prompts + completions, and their rewards -> (the global batch the loss reads,
        more figures for the log). GRPO: each completion's advantage in its group, the reference's and (with
        several iterations) the sampler's log-probabilities."""
        from jaxft import sharding

        exp["advantages"] = advantages(rewards, self.s.generations, self.s.scale_rewards)
        batch = sharding.to_global(self.mesh, exp, n_global)
        if self.s.beta:
            batch["ref_logps"] = self._logps(self.reference, frozen, batch)
        if self.period > 1:
            batch["old_logps"] = self._logps(trainable, frozen, batch)
        return batch, {}

    def _stats(self, total, each, lengths, clipped) -> dict[str, float]:
        each = each.T  # [functions, rows]
        g = self.s.generations
        spread = np.std(total.reshape(-1, g), axis=1, ddof=1).mean() if g > 1 else np.std(total)
        out = {"train/reward": float(np.mean(total)), "train/reward_std": float(spread),
               "train/completion_length": float(np.mean(lengths)), "train/clipped_completions": float(np.mean(clipped))}
        return {**out, **per_function("train", self.functions, each)}

    def report(self) -> dict[str, float]:
        """The newest rollout's figures, for the log line."""
        return dict(self.stats)


# ---------------------------------------------------------------------------------------------
# Evaluation: greedy completions of held-out prompts, scored.


def reward_eval(config, data, model, workdir=None):
    """Training's eval: a function of (merged parameters, step) -> {"eval/reward", ...} (`reward_scores`
    of the held-out prompts), the completions to `samples/step_N.jsonl` in `workdir`; None without any."""
    from jaxft.evaluate import write_jsonl

    if data.eval is None:
        return None

    def run(params, step: int) -> dict[str, float]:
        scores, rows = reward_scores(config, data, model, params, "validation", int(config.eval.generate_examples))
        if workdir is not None and jax.process_index() == 0:
            (workdir / "samples").mkdir(parents=True, exist_ok=True)
            write_jsonl(workdir / "samples" / f"step_{step}.jsonl", rows)
        return scores

    return run


def reward_scores(config, data, model, params, split: str = "validation", limit: int = 0):
    """-> ({"eval/reward", "eval/reward/<name>" (several functions), "eval/completion_length"}, rows of
    {"prompt", "completion", "reward"}): greedy completions (`eval.max_new_tokens`,
    `eval.repetition_penalty`) of the first `limit` prompts of a split (all when 0), scored."""
    from jaxft import rewards
    from jaxft.generate import generate

    arrays = data.eval if split == "validation" else data.train
    records, values = data.records[split][0], data.prompts[split]
    s = settings(config.train, min_generations=1)  # GRPO's or PPO's: their rewards
    functions = rewards.load(s.rewards, s.reward_weights)
    n = min(int(limit) or len(arrays["record"]), len(arrays["record"]))
    tok, batch = data.tokenizer, config.eval.batch_size or config.train.batch_size
    eos = data.stop or tok.eos or [model.cfg.eos_token_id]
    new = []
    for i in range(0, n, batch):  # every batch full (the last one repeats rows): one compile
        ids, mask = (np.resize(arrays[k][i:min(i + batch, n)], (batch, arrays[k].shape[1]))
                     for k in ("input_ids", "attention_mask"))
        out = generate(model, params, ids, mask, max_new_tokens=config.eval.max_new_tokens,
                       repetition_penalty=float(config.eval.repetition_penalty), eos_token_id=eos,
                       pad_token_id=tok.pad_id)
        new.append(out[: min(batch, n - i)])
    total, each, mask, prompts, texts = score_completions(functions, tok, np.concatenate(new), np.asarray(eos), records,
                                                         arrays["record"][:n], values)
    scores = {"eval/reward": float(np.mean(total)), "eval/completion_length": float(np.mean(mask.sum(axis=1))),
              **per_function("eval", functions, each)}
    rows = [{"prompt": p, "completion": t, "reward": float(r)} for p, t, r in zip(prompts, texts, total)]
    return scores, rows
