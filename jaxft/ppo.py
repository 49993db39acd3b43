"""PPO with a learned critic (Schulman et al. 2017; for language models as in Ouyang et al. 2022 and TRL's
PPOTrainer): the policy's completions are scored by reward functions, and a value head estimates, at each
completion token, the return still to come, so each token's advantage is measured against it.

The rollouts are GRPO's (`jaxft.grpo.Rollout`: `train.grpo_*` sampling, rewards and KL settings apply,
here with any number of completions per prompt, 1 as TRL's), and so are its policies: a causal LM, or an
encoder-decoder (T5) whose decoder writes the completion. For each batch of completions:

    r_t = -beta (log pi_old(t) - log ref(t)), plus the reward at the completion's last token
    A_t = GAE(gamma, lambda) of r_t against the old values V_old(t); the value after the last token is 0
    R_t = A_t + V_old(t) (the value target); A_t whitened over every completion token of the batch

and the loss per completion token, averaged over them, is

    max(-A ratio, -A clip(ratio, 1 - eps, 1 + eps)) + vf_coef 0.5 max((V - R)^2, (V_clip - R)^2),
    V_clip = V_old + clip(V - V_old, -c, c)

(`train.ppo_value_coef` 0.1, `train.ppo_value_clip` c 0.2, `train.ppo_gamma` 1, `train.ppo_lam` 0.95;
eps `train.grpo_epsilon`, beta `train.grpo_beta`, epochs `train.grpo_iterations`). The critic V is one of:

- (default) a value head, a vector and a bias on the policy's final hidden states (a shared trunk, as
  TRL's value-head models: an encoder-decoder's decoder states, unscaled by the factor its LM head
  applies, `Family.head_scale`), starting at zero;
- `train.ppo_critic=PATH`: a model of its own (InstructGPT's, TRL's PPOTrainer's value model): a
  decoder-only HF directory read as a one-output classifier at every position, V(t) = score(final
  state t). A reward model (a `*ForSequenceClassification` directory with one output, or a
  `data.task=reward` run's export: a LoRA adapter, folded into the base it names, or a full model)
  starts with its score head; a causal LM gets a new one. It reads the policy's token ids, so it must
  share the policy's tokenizer (its vocabulary size is checked); the policy must be a decoder. Every
  weight of it trains, or with `train.ppo_critic_method` (as OpenRLHF's LoRA critic) a method of its
  own: lora, ia3, adapter, bitfit or head (each with the score head, and composable with '+'), with
  that method's `method.*` settings (rank, alpha, targets, dora, ...; not method.layers,
  method.trainable_pattern or method.template, which name the policy's weights; no dropout: its
  values are those the rollout computed). Its frozen weights are stored as the policy's frozen base
  (`model.param_dtype`, and `model.quantization`'s projections: a QLoRA critic beside a QLoRA policy).

Either is the objective's own parameters (`Objective.own_params`), trained with the method's (one
optimizer), checkpointed (a critic's frozen weights are read again from its directory), never
exported. Logged beside GRPO's rollout figures: train/kl (the rollout's mean log pi_old - log ref per
token), train/value_loss, train/clip_ratio, train/value_clip_ratio.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxft import grpo
from jaxft.errors import JaxftError
from jaxft.objectives import Objective, OwnModel

WHITEN_EPS = 1e-8
CRITIC = "train.ppo_critic"
# a critic's own methods: those that leave its positions as they are (each of its values is a token's)
# and keep no per-step state (AdaLoRA's)
CRITIC_METHODS = ("full", "head", "bitfit", "lora", "ia3", "adapter")
HIDDEN = ("PPO's value head reads the model's final hidden states, which a method that changes the LM head hides "
          "(e.g. LoRA on lm_head): leave lm_head out of method.targets")


@dataclasses.dataclass(frozen=True)
class Settings(grpo.Settings):
    PREFIX = "ppo"  # its own keys: train.ppo_*
    value_coef: float = 0.1
    value_clip: float = 0.2
    gamma: float = 1.0
    lam: float = 0.95
    critic: str = ""  # a separate critic's model directory; "": a value head on the policy
    critic_method: str = "full"  # what of the critic trains: every weight, or a method of its own


def settings(train) -> Settings:
    s = grpo.settings(train, Settings, min_generations=1)
    for name, ok, expected in (("value_coef", s.value_coef >= 0, ">= 0"), ("value_clip", s.value_clip > 0, "> 0"),
                               ("gamma", 0 < s.gamma <= 1, "0 < gamma <= 1"), ("lam", 0 <= s.lam <= 1, "0 <= lam <= 1")):
        if not ok:
            raise JaxftError(f"train.ppo_{name}={getattr(s, name)}: expected {expected}")
    return s


def value_head(model, mesh=None, seed: int = 0) -> dict:
    """The value head's parameters, zero; checked before anything is written: it needs the hidden states."""
    if any(hook.acts_on("lm_head") for hook in model.hooks):
        raise JaxftError(HIDDEN)
    size = model.cfg.hidden_size
    return {"value_head": {"kernel": jnp.zeros((size,), jnp.float32), "bias": jnp.zeros((), jnp.float32)}}


class Critic(NamedTuple):
    model: object  # a one-output classifier read at every position
    root: Path  # the directory `train.ppo_critic` names
    base: Path  # where its weights are: `root`, or the base a reward model's adapter names
    brings_head: bool  # whether its score head comes with it (a reward model's), else new
    method: object  # what of it trains (`jaxft.peft.Method`; "full": every weight)


def critic_method(name: str, method_config, cfg):
    """`train.ppo_critic_method` -> the critic's Method, built from the run's `method.*` settings (the
    config's method section; None: the defaults) less those that name the policy's weights."""
    import ml_collections

    from jaxft.peft import build

    where = f"{CRITIC}_method={name!r}"
    parts = [p.strip() for p in str(name).split("+")]
    if not all(p in CRITIC_METHODS for p in parts):
        raise JaxftError(f"{where}: expected one of {', '.join(CRITIC_METHODS)}, or several joined by '+' (a "
                         "method that adds no positions and keeps no per-step state)")
    if method_config is None:
        from jaxft.config import base_config

        method_config = base_config().method
    m = ml_collections.ConfigDict(method_config.to_dict())
    m.name, m.template, m.layers, m.trainable_pattern = "+".join(parts), "", "", ""
    try:
        return build(m, cfg)
    except JaxftError as e:
        raise JaxftError(f"{where}: {e}") from None


def critic_model(path: str, policy_cfg, method: str = "full", method_config=None) -> Critic:
    """`train.ppo_critic`'s model, built to compute as the policy does (dtype, attention, remat, scan),
    as a one-output classifier read at every position, with `method` (`train.ppo_critic_method`, its
    settings from `method_config`) hooked in. One line naming the key for a directory that cannot be the
    policy's critic."""
    from jaxft import hf
    from jaxft.errors import read_json
    from jaxft.models import family

    where = f"{CRITIC}={path!r}"
    if family.of(policy_cfg).encoder_decoder:
        raise JaxftError(f"{where}: a separate critic reads the policy's rows as one sequence; {policy_cfg.model_type} "
                         "is an encoder-decoder: expected a decoder-only policy, or no critic (the value head)")

    def resolve(name: str):
        try:
            return hf.resolve(name)
        except JaxftError as e:
            raise JaxftError(f"{where}: {str(e).split(': ', 1)[-1]}") from None

    root = base = resolve(path)
    if (root / "adapter_config.json").is_file() and not (root / "config.json").is_file():  # a reward model's adapter
        adapter = read_json(root / "adapter_config.json")
        if adapter.get("task_type") != "SEQ_CLS":
            raise JaxftError(f"{where}: an adapter with task_type={adapter.get('task_type')!r}; expected a reward "
                             "model's (SEQ_CLS) or a whole model directory")
        if not adapter.get("base_model_name_or_path"):
            raise JaxftError(f"{where}: its adapter_config.json names no base model (base_model_name_or_path)")
        base = resolve(str(adapter["base_model_name_or_path"]))
    cfg = hf.read_config(base)
    fam = family.of(cfg)
    if fam.encoder_decoder or "causal_lm" not in fam.heads or "classification" not in fam.heads:
        raise JaxftError(f"{where}: a {cfg.model_type} model; a critic's value at a token may read only the tokens "
                         "before it: expected a decoder-only model (Llama, Qwen2, Mistral, GPT-2)")
    if cfg.head == "classification" and cfg.num_labels != 1:
        raise JaxftError(f"{where}: a classifier with {cfg.num_labels} outputs; expected a reward model (one "
                         "output) or a causal LM")
    if cfg.vocab_size != policy_cfg.vocab_size:
        raise JaxftError(f"{where}: a vocabulary of {cfg.vocab_size} tokens, the policy's has "
                         f"{policy_cfg.vocab_size}: the critic reads the policy's token ids, so it must share its "
                         "tokenizer")
    brings_head = cfg.head == "classification" or base != root
    cfg = cfg.replace(head="classification", num_labels=1, pooling="every", labels=None, dtype=policy_cfg.dtype,
                      param_dtype=policy_cfg.param_dtype, scan_layers=policy_cfg.scan_layers, remat=policy_cfg.remat,
                      attention=policy_cfg.attention)
    m = critic_method(method, method_config, cfg)
    return Critic(family.build(cfg, m.hooks), root, base, brings_head, m)


def critic_params(critic: Critic):
    """own_params with a separate critic (`critic_model`'s): its weights and its method's new ones,
    sharded as the policy's; those its method trains in fp32, the rest stored as the policy's frozen base."""

    def make(model=None, mesh=None, seed: int = 0) -> dict:
        from jaxft.peft.partition import count, split
        from jaxft.train import init_params, log

        weights = None
        if critic.base != critic.root:  # a reward model's adapter, folded into its base
            from jaxft import generate
            from jaxft.peft.lora import merge_lora

            where = f"{CRITIC}={str(critic.root)!r}"
            rm, weights, _ = generate.load(str(critic.base), str(critic.root))
            if rm.cfg.head != "classification" or rm.cfg.num_labels != 1:
                raise JaxftError(f"{where}: a {rm.cfg.head} adapter with {rm.cfg.num_labels} outputs; "
                                 "expected a reward model (one output)")
            rm, weights = merge_lora(rm, weights)
            if rm.hooks:
                raise JaxftError(f"{where}: a {type(rm.hooks[0]).__name__} adapter cannot be folded into its base; "
                                 "expected a LoRA reward model or a whole model directory")
        params = init_params(critic.model, critic.base, mesh, seed, critic.method.trainable, weights=weights)
        for hook in critic.model.hooks:  # e.g. DoRA's magnitudes, from the loaded kernels
            params = hook.initialize(critic.model, params, None)
        trains = count(split(params, critic.method.trainable)[0])
        what = "every one trains" if trains == count(params) else f"{trains:,} train ({critic.method.name})"
        log(f"critic: {critic.base} ({count(params):,} parameters, {what}; "
            f"{'its score head' if critic.brings_head else 'a new score head'} gives the value at each token)")
        return {"critic": params}

    return make


def values(outputs, own, head_scale: float = 1.0, critic=None, batch=None) -> jax.Array:
    """[rows, T]: the value head on the final hidden states (position t: the state that predicts the token
    `grpo.completion_targets` names). `head_scale`: the factor the outputs' states carry (`Family.head_scale`).
    `critic` (a separate critic's model, `critic_model`): its values on the batch's rows instead."""
    if critic is not None:
        return critic.apply({"params": own["critic"]}, batch["input_ids"], batch["attention_mask"])[..., 0]
    if not isinstance(outputs, tuple):
        raise JaxftError(HIDDEN)
    head = own["value_head"]
    states = outputs[0].astype(jnp.float32)
    if head_scale != 1.0:
        states = states / head_scale
    return jnp.einsum("btd,d->bt", states, head["kernel"]) + head["bias"]


def gae(rewards, values_, mask, gamma: float, lam: float):
    """Advantages [rows, T] of the rewards at the positions where `mask` is 1 (each row's completion, in
    order), against `values_`; the value after a completion's last token is 0 (the episode ends)."""

    def back(carry, x):
        next_value, next_advantage = carry
        r, v, m = x
        a = r + gamma * next_value - v + gamma * lam * next_advantage
        return (jnp.where(m > 0, v, 0.0), jnp.where(m > 0, a, 0.0)), jnp.where(m > 0, a, 0.0)

    zeros = jnp.zeros(rewards.shape[:1], jnp.float32)
    _, out = jax.lax.scan(back, (zeros, zeros), (rewards.T, values_.T, mask.T), reverse=True)
    return out.T


def whiten(x, mask):
    """(x - mean) / std over the positions where `mask` is 1 (variance unbiased, as TRL's), 0 elsewhere."""
    n = jnp.sum(mask)
    mean = jnp.sum(x * mask) / n
    var = jnp.sum(mask * (x - mean) ** 2) / jnp.maximum(n - 1, 1)
    return jnp.where(mask > 0, (x - mean) * jax.lax.rsqrt(var + WHITEN_EPS), 0.0)


def objective(s: Settings, head_scale: float = 1.0, policy_cfg=None, method_config=None) -> Objective:
    """PPO's loss; `head_scale`: the policy family's (`Family.head_scale`), which the value head takes off
    the states it reads. `policy_cfg`: the policy's model config, which a separate critic (`s.critic`)
    is built to match (needed with one); `method_config`: the config's method section, the settings of
    the critic's own method (`s.critic_method`)."""
    critic = critic_model(s.critic, policy_cfg, s.critic_method, method_config) if s.critic else None
    value = functools.partial(values, head_scale=head_scale, critic=critic.model if critic else None)

    def loss(outputs, batch, own):
        logp = grpo.token_log_probs(outputs, batch, s.temperature)
        v = value(outputs, own, batch=batch)
        a, ret, old_v = batch["advantages"], batch["returns"], batch["old_values"]
        ratio = jnp.exp(logp - batch["old_logps"])
        pg1, pg2 = -a * ratio, -a * jnp.clip(ratio, 1 - s.epsilon, 1 + s.epsilon)
        # V itself where it moved less than c (old_v + (V - old_v) can differ from V in the last bit)
        v_clipped = jnp.where(jnp.abs(v - old_v) > s.value_clip,
                              old_v + jnp.clip(v - old_v, -s.value_clip, s.value_clip), v)
        vf1, vf2 = (v - ret) ** 2, (v_clipped - ret) ** 2
        vf = 0.5 * jnp.maximum(vf1, vf2)
        w = grpo.completion_weights(batch)
        return {"loss_sum": jnp.sum(w * (jnp.maximum(pg1, pg2) + s.value_coef * vf)), "count": jnp.sum(w),
                "correct": jnp.zeros((), jnp.float32), "value_loss": jnp.sum(w * vf),
                "clip_ratio": jnp.sum(w * (pg2 > pg1)), "value_clip_ratio": jnp.sum(w * (vf2 > vf1))}

    return Objective("ppo", loss, grpo.policy_inputs, sequences=s.generations, tokens=grpo.tokens, perplexity=False,
                     accuracy=False, train_sums=("value_loss", "clip_ratio", "value_clip_ratio"),
                     rollout=functools.partial(Rollout, s, value), new_tokens=s.max_new_tokens,
                     keeps_reference=s.beta > 0,
                     own_params=critic_params(critic) if critic else value_head,
                     own_model=OwnModel("critic", critic.model, critic.method) if critic else None)


def targets(s: Settings, batch, old_logps, old_values, ref_logps):
    """-> (whitened advantages, value targets [rows, T], the mean KL per completion token): the rewards
    r_t (the module docstring) with the completion's reward at the position that predicts its last token."""
    w = grpo.completion_weights(batch)
    kl = (old_logps - ref_logps) * w
    last = jnp.argmax(jnp.cumsum(w, axis=1), axis=1)
    score = jnp.zeros_like(w).at[jnp.arange(w.shape[0]), last].set(batch["scores"]) * w
    a = gae(score - s.beta * kl, old_values * w, w, s.gamma, s.lam)
    return whiten(a, w), a + old_values * w, jnp.sum(kl) / jnp.maximum(jnp.sum(w), 1.0)


class Rollout(grpo.Rollout):
    """GRPO's rollouts, completed with the sampler's log-probabilities and values, the reference's
    log-probabilities, and the advantages and value targets of GAE (the module docstring)."""

    def __init__(self, s: Settings, value, model, trainable, data, mesh, seed: int):
        from jaxft import sharding
        from jaxft.objectives import OWN
        from jaxft.peft.partition import merge

        super().__init__(s, model, trainable, data, mesh, seed)
        rows = sharding.batch_sharding(mesh, 2)

        def old(trainable, frozen, batch):  # the values as the loss computes them (`value`: the loss's)
            outputs = self.outputs(trainable, frozen, batch)
            with sharding.axis_rules(mesh):
                v = value(outputs, merge(trainable, frozen)[OWN], batch=batch)
            return grpo.token_log_probs(outputs, batch, s.temperature), v

        self._old = jax.jit(old, out_shardings=(rows, rows))
        self._targets = jax.jit(functools.partial(targets, s), out_shardings=(rows, rows, sharding.replicated(mesh)))

    def complete(self, exp, rewards, trainable, frozen, n_global):
        from jaxft import sharding

        exp["scores"] = np.asarray(rewards, np.float32)
        batch = sharding.to_global(self.mesh, exp, n_global)
        batch["old_logps"], batch["old_values"] = self._old(trainable, frozen, batch)
        ref = self._logps(self.reference, frozen, batch) if self.s.beta else batch["old_logps"]
        batch["advantages"], batch["returns"], kl = self._targets(batch, batch["old_logps"], batch["old_values"], ref)
        return batch, {"train/kl": float(kl)}
