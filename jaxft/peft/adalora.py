"""AdaLoRA (Zhang et al. 2023), as HF PEFT defines it: LoRA in SVD form with a rank budget.

Each target gets y = W x + s * P diag(Λ) Q x, s = alpha / init_r (PEFT's `scaling / ranknum`), P
(`adalora_b`) and Q (`adalora_a`) pushed towards orthogonality by an auxiliary loss (`orth_loss`,
weight `orth_reg_weight`, as PEFT adds it to the model's loss). Each step `update` smooths every
entry's importance |p * grad| (sensitivity, EMA with beta1) and its uncertainty (EMA with beta2); a
singular triplet scores the sum of its Λ entry's and the means of its Q row's and P column's
sensitivity * uncertainty. After `tinit` warm-up steps the total budget falls from init_r to target_r
per module on a cubic schedule until `total_step - tfinal`; every `deltaT` steps the lowest-scoring Λ
entries are set to zero until the budget holds (they keep training and may come back at the next
allocation), and from `total_step - tfinal` on the final pattern is enforced every step.

The per-step state is the hook's (`init_state` / `update`, in the train state), so it is
checkpointed and resumed with the run; the train step knows nothing of AdaLoRA. Export: PEFT's `ADALORA`
with the `rank_pattern` (the triplets whose Λ is nonzero) and only those triplets' tensors.
"""

from __future__ import annotations

import dataclasses
import re


import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxft.models import family
from jaxft.models.layers import param_with_axes
from jaxft.peft import peft_keys
from jaxft.peft.hook import Hook
from jaxft.peft.lora import dropout, module_path, parse_targets
from jaxft.peft.partition import flat, unflat

TRAINABLE = r"/adalora_[abe]$"
KEY = re.compile(r"base_model\.model\.(.+)\.lora_([ABE])")


@dataclasses.dataclass(frozen=True)
class AdaLoraHook(Hook):
    init_r: int = 12
    target_r: int = 8
    alpha: float = 8.0
    dropout: float = 0.0
    targets: str = "q_proj,v_proj"
    tinit: int = 0
    tfinal: int = 0
    delta_t: int = 1
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg_weight: float = 0.5
    total_step: int = 0  # the schedule's length (`methods.build` sets it from train.steps when 0)
    kind = "adalora"  # the registered method (a class attribute, not a field)

    # The train step's generic extras (`Hook.aux_loss`, `init_state`, `update`): the orthogonality
    # penalty, and the rank allocator's state (importance EMAs, kept ranks), checkpointed with the run.
    def aux_loss(self, params):
        return self.orth_reg_weight * orth_loss(params) if self.orth_reg_weight else None

    def init_state(self, params):
        zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
        return {"ipt": zeros, "unc": zeros, "keep": jax.tree_util.tree_map(jnp.ones_like, params)}

    def update(self, state, params, grads, step):
        # `step` counts from 1; PEFT's global_step of this allocation is the steps taken before it.
        new, masked = update(state, params, grads, step - 1, self, self.total_step)
        return new, masked

    @property
    def scale(self) -> float:
        return (self.alpha if self.alpha > 0 else float(self.init_r)) / (self.init_r + 1e-5)

    def acts_on(self, path: str) -> bool:
        return parse_targets(self.targets)(path)

    def linear(self, module, x, y, kernel):
        if not self.acts_on(module_path(module)):
            return y
        d_in, d_out, r = kernel.shape[-2], kernel.shape[-1], self.init_r
        a = param_with_axes(module, "adalora_a", nn.initializers.normal(0.02), (d_in, r), (module.axes[0], None))
        e = param_with_axes(module, "adalora_e", nn.initializers.zeros, (r,), (None,))
        b = param_with_axes(module, "adalora_b", nn.initializers.normal(0.02), (r, d_out), (None, module.axes[1]))
        h = dropout(module, x, self.dropout).astype(y.dtype)
        return y + (h @ (a * e).astype(y.dtype) @ b.astype(y.dtype)) * self.scale

    merges = True

    def merge(self, params):
        """W + s Q^T diag(Λ) P^T in our [in, out] layout: (a * e) @ b, as PEFT's AdaLoRA merge."""
        f = flat(params)
        for path in [p for p in f if p.endswith("/adalora_a")]:
            mod = path[: -len("adalora_a")]
            delta = np.asarray(f[path] * f[mod + "adalora_e"][..., None, :], np.float32) @ np.asarray(
                f[mod + "adalora_b"], np.float32)
            f[mod + "kernel"] = (np.asarray(f[mod + "kernel"], np.float32) + self.scale * delta).astype(
                f[mod + "kernel"].dtype)
        return unflat(f)


def orth_loss(params) -> jax.Array:
    """PEFT's orthogonal regularisation: the mean over every Q and P (each layer's its own) of
    ||Q Q^T - I||_F and ||P^T P - I||_F (Q: [r, in], P: [out, r] as PEFT stores them)."""
    total, n = 0.0, 0
    for path, v in flat(params).items():
        if path.endswith("/adalora_a"):
            cov = jnp.swapaxes(v, -1, -2) @ v  # Q Q^T, [.., r, r]
        elif path.endswith("/adalora_b"):
            cov = v @ jnp.swapaxes(v, -1, -2)  # P^T P
        else:
            continue
        diff = cov - jnp.eye(cov.shape[-1], dtype=cov.dtype)
        norms = jnp.sqrt(jnp.sum(diff * diff, axis=(-2, -1)))
        total, n = total + jnp.sum(norms), n + norms.size
    return total / max(n, 1)


# ---------------------------------------------------------------------------------------------
# The rank allocator.


def schedule(hook: AdaLoraHook, total: int, modules: int) -> tuple[np.ndarray, np.ndarray]:
    """(budget, allocate?) for steps 0..total, exactly as PEFT's `budget_schedule` and
    `update_and_allocate` compute them (in Python floats, so the cubic rounds as there)."""
    init_bgt, target_bgt = hook.init_r * modules, hook.target_r * modules
    final = total - hook.tfinal
    budget, allocate = np.zeros(total + 1, np.int32), np.zeros(total + 1, bool)
    for step in range(total + 1):
        if step <= hook.tinit:
            budget[step] = init_bgt
        elif step > final:
            budget[step] = target_bgt
        else:
            coeff = 1 - (step - hook.tinit) / (final - hook.tinit)
            budget[step] = int((init_bgt - target_bgt) * coeff**3 + target_bgt)
            allocate[step] = step % hook.delta_t == 0 or step == final
    return budget, allocate


def update(state: dict, params: dict, grads: dict, step, hook: AdaLoraHook, total: int):
    """One step of PEFT's `update_and_allocate(step)`, after the optimizer's update of `params`.

    `state`: {"ipt", "unc", "keep"}, trees like `params` (sensitivity and uncertainty EMAs; 1/0 per
    rank of each Λ, the last allocation). -> (state, params with the masked Λ entries set to zero)."""
    fp, fg = flat(params), flat(grads)
    ipt, unc, keep = (flat(state[k]) for k in ("ipt", "unc", "keep"))
    names = [p for p in fp if re.search(TRAINABLE, p)]
    final = total - hook.tfinal
    learning = step < final
    for p in names:  # sensitivity and uncertainty, smoothed
        s = jnp.abs(fp[p] * fg[p])
        new_ipt = hook.beta1 * ipt[p] + (1 - hook.beta1) * s
        new_unc = hook.beta2 * unc[p] + (1 - hook.beta2) * jnp.abs(s - new_ipt)
        ipt[p], unc[p] = jnp.where(learning, new_ipt, ipt[p]), jnp.where(learning, new_unc, unc[p])
    e_names = [p for p in names if p.endswith("/adalora_e")]
    modules = sum(int(np.prod(fp[p].shape[:-1])) for p in e_names)
    budgets, allocates = schedule(hook, total, modules)
    at = jnp.clip(step, 0, total)
    budget, allocate = jnp.asarray(budgets)[at], jnp.asarray(allocates)[at]
    score = lambda p: ipt[p] * unc[p]  # noqa: E731
    triplets = {}
    for p in e_names:
        mod = p[: -len("adalora_e")]
        triplets[p] = (score(p) + jnp.mean(score(mod + "adalora_a"), axis=-2)
                       + jnp.mean(score(mod + "adalora_b"), axis=-1))
    if triplets:
        every = jnp.sort(jnp.concatenate([t.reshape(-1) for t in triplets.values()]))
        k = hook.init_r * modules - budget  # mask the k lowest (and any tied with the k-th)
        threshold = jnp.where(k > 0, every[jnp.clip(k - 1, 0, every.size - 1)], -jnp.inf)
    for p in e_names:
        new_keep = jnp.where(allocate, (triplets[p] > threshold).astype(keep[p].dtype), keep[p])
        keep[p] = new_keep
        mask = allocate | (step > final)  # between allocations the masked entries train on
        fp[p] = jnp.where(mask & (new_keep == 0), jnp.zeros_like(fp[p]), fp[p])
    if hook.tfinal:  # PEFT resets the importance once the final pattern is set
        reset = step == final
        for p in names:
            ipt[p], unc[p] = (jnp.where(reset, 0.0, x[p]) for x in (ipt, unc))
    return {"ipt": unflat(ipt), "unc": unflat(unc), "keep": unflat(keep)}, unflat(fp)


def rank_count(params) -> int:
    """Nonzero Λ entries: the ranks in use."""
    return int(sum(np.count_nonzero(np.asarray(v)) for p, v in flat(params).items() if p.endswith("/adalora_e")))


# ---------------------------------------------------------------------------------------------
# HF PEFT's ADALORA format.


def export_peft(cfg, hook: AdaLoraHook, trainable, total: int) -> tuple[dict, dict]:
    """-> (adapter_config entries, tensors): only the triplets whose Λ is nonzero, as PEFT saves an
    adapter after budget allocation, with the `rank_pattern` saying which of the init_r they are."""
    tensors, rank_pattern, patterns = {}, {}, set()
    a_of = {(p, i): v for p, i, v in peft_keys.per_layer(trainable, "adalora_a", cfg)}
    b_of = {(p, i): v for p, i, v in peft_keys.per_layer(trainable, "adalora_b", cfg)}
    for path, layer, e in peft_keys.per_layer(trainable, "adalora_e", cfg):
        keep = e != 0
        name = peft_keys.hf_name(cfg, path, layer)
        tensors[f"base_model.model.{name}.lora_A"] = a_of[path, layer][:, keep].T
        tensors[f"base_model.model.{name}.lora_B"] = family.hf_order(cfg, name, b_of[path, layer][keep, :].T)
        tensors[f"base_model.model.{name}.lora_E"] = e[keep][:, None]
        rank_pattern[f"{name}.lora_E"] = keep.tolist()
        patterns.add(peft_keys.pattern(cfg, path, layer))
    config = {"peft_type": "ADALORA", "target_modules": "|".join(sorted(patterns)), "init_r": hook.init_r,
              "target_r": hook.target_r, "tinit": hook.tinit, "tfinal": hook.tfinal, "deltaT": hook.delta_t,
              "beta1": hook.beta1, "beta2": hook.beta2, "orth_reg_weight": hook.orth_reg_weight,
              # PEFT needs total_step > tinit + tfinal; it matters only to train on.
              "total_step": hook.total_step or total or hook.tinit + hook.tfinal + 1,
              "rank_pattern": rank_pattern, "lora_alpha": hook.alpha,
              "lora_dropout": hook.dropout, "bias": "none", "fan_in_fan_out": False, "init_lora_weights": True}
    return config, tensors


def import_peft(cfg, config: dict, tensors: dict, where: str) -> tuple[AdaLoraHook, dict]:
    """PEFT's ADALORA tensors (resized by their rank pattern) -> (hook, flat params at init_r, the
    dropped triplets zero)."""
    from jaxft.errors import JaxftError

    init_r = int(config.get("init_r", 12))
    pattern = config.get("rank_pattern") or {}
    values = {}
    for key, value in tensors.items():
        m = KEY.fullmatch(key)
        if not m:
            continue
        path, layer = peft_keys.our_name(cfg, m[1], where)
        keep = np.asarray(pattern.get(f"{m[1]}.lora_E", [True] * init_r), bool)
        if len(keep) != init_r or keep.sum() != (value.shape[1] if m[2] == "B" else value.shape[0]):
            raise JaxftError(f"{where}: {key} of shape {tuple(value.shape)} does not fit init_r={init_r} and its "
                             f"rank_pattern ({int(keep.sum())} kept)")
        if m[2] == "B":
            value = family.hf_order(cfg, m[1], value, False)
        ours = value.T if m[2] in "AB" else value.reshape(-1)  # A: [in, k], B: [k, out], E: [k]
        full = np.zeros((init_r,) + ours.shape[1:] if m[2] != "A" else (ours.shape[0], init_r), np.float32)
        if m[2] == "A":
            full[:, keep] = ours
        else:
            full[keep] = ours
        values.setdefault((path, f"adalora_{m[2].lower()}"), {})[layer] = full
    paths = sorted({p for p, _ in values})
    total = int(config.get("total_step") or 0)
    hook = AdaLoraHook(init_r, int(config.get("target_r", 8)), float(config.get("lora_alpha", 8)), 0.0,
                       "|".join(map(re.escape, paths)), int(config.get("tinit", 0)), int(config.get("tfinal", 0)),
                       int(config.get("deltaT", 1)), float(config.get("beta1", 0.85)),
                       float(config.get("beta2", 0.85)),
                       float(config.get("orth_reg_weight", 0.5)), total)
    return hook, peft_keys.to_params(values, cfg, where)
