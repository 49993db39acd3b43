"""The jitted train and eval steps, and what they need: state, optimizer, losses.

The step differentiates with respect to the trainable tree only; the frozen tree enters as a plain
input, so no gradient or optimizer buffer ever exists for a frozen base. Nothing here knows which
PEFT method is running.
"""

from __future__ import annotations

import re
from typing import Any, NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
import optax

from jaxft import sharding
from jaxft.objectives import Objective, causal_lm_loss, for_head, loss_of  # noqa: F401 (causal_lm_loss: re-exported)
from jaxft.peft import registry
from jaxft.peft.methods import aux_loss, init_method_state, update_method_state
from jaxft.peft.partition import merge

# Base-model leaves that take no weight decay: norms and biases (and every "*layernorm" module, and
# the input embeddings). Method-added leaves without decay are declared by each method
# (`registry.Kind.no_decay`, e.g. prompts and prefixes): `no_decay(path)` asks both.
NO_DECAY = ("norm", "bias")


def no_decay(path: str) -> bool:
    """Whether the leaf at "a/b/c" takes no weight decay."""
    names = path.lower().split("/")
    return (any(n in NO_DECAY or n.endswith("layernorm") for n in names) or names[-1] == "embed_tokens"
            or registry.no_decay_regex().search(path) is not None)


class TrainState(flax.struct.PyTreeNode):
    step: jax.Array
    params: Any  # the trainable leaves only
    opt_state: Any
    rng: jax.Array
    method_state: Any = flax.struct.field(default_factory=dict)  # what hooks keep per step (`Hook.init_state`)


def init_state(tx: optax.GradientTransformation, params, seed: int, mesh, hooks=()) -> tuple[TrainState, TrainState]:
    """-> (state, its shardings), created directly in that layout: the optimizer's moments split like
    their parameters (under FSDP, 2x the trainable parameters in fp32 never sit on one device), the
    step counter and rng replicated. Parameters not yet on `mesh` are replicated onto it. `hooks`:
    the model's, whose `init_state` gives the method state."""
    rep = sharding.replicated(mesh)
    on_mesh = lambda x: x.sharding if getattr(x.sharding, "mesh", None) == mesh else rep  # noqa: E731
    param_shardings = jax.tree_util.tree_map(on_mesh, params)
    params = jax.device_put(params, param_shardings)
    method_state = jax.jit(lambda p: init_method_state(hooks, p))(params)
    method_state = jax.device_put(method_state, jax.tree_util.tree_map(on_mesh, method_state))
    shardings = TrainState(
        step=rep, params=param_shardings, rng=rep,
        opt_state=sharding.opt_state_shardings(tx, params, param_shardings, mesh),
        method_state=jax.tree_util.tree_map(lambda x: x.sharding, method_state),
    )
    opt_state = jax.jit(tx.init, out_shardings=shardings.opt_state)(params)
    step, rng = jax.jit(lambda: (jnp.zeros((), jnp.int32), jax.random.PRNGKey(seed)), out_shardings=rep)()
    return TrainState(step=step, params=params, opt_state=opt_state, rng=rng, method_state=method_state), shardings


# ---------------------------------------------------------------------------------------------
# Optimizer section.


def make_schedule(opt_cfg, total_steps: int) -> optax.Schedule:
    lr, warmup = float(opt_cfg.learning_rate), int(opt_cfg.warmup_steps)
    decay_steps = max(total_steps - warmup, 1)
    end = lr * float(opt_cfg.get("end_lr_fraction", 0.0))
    if opt_cfg.schedule == "cosine":
        decay = optax.cosine_decay_schedule(lr, decay_steps, alpha=end / lr if lr else 0.0)
    elif opt_cfg.schedule == "linear":
        decay = optax.linear_schedule(lr, end, decay_steps)
    else:  # constant
        decay = optax.constant_schedule(lr)
    if warmup == 0:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), decay], [warmup])


def make_optimizer(opt_cfg, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    schedule = make_schedule(opt_cfg, total_steps)

    def decay_mask(params):
        def keep(path, _):
            return not no_decay(path_name(path))

        return jax.tree_util.tree_map_with_path(keep, params)

    parts = [
        optax.clip_by_global_norm(float(opt_cfg.grad_clip)) if opt_cfg.grad_clip else optax.identity(),
        optax.adamw(schedule, b1=opt_cfg.b1, b2=opt_cfg.b2, eps=opt_cfg.eps,
                    weight_decay=float(opt_cfg.weight_decay), mask=decay_mask,
                    mu_dtype=opt_cfg.get("mu_dtype") or None),  # bfloat16 halves the first moment
    ]
    rules = lr_multipliers(opt_cfg.get("lr_multipliers", ""))
    if rules:  # only then: the optimizer state of a run without them keeps its layout (and its checkpoints)
        parts.append(scale_by_path(rules))
    return optax.chain(*parts), schedule


def lr_multipliers(spec: str) -> list[tuple[re.Pattern, float]]:
    """`optimizer.lr_multipliers`, "regex=factor,..." -> [(regex, factor)]: a trainable leaf whose path
    ("layers/self_attn/q_proj/lora_b") the first regex matches trains at factor x the learning rate (its
    weight decay too, as a PyTorch parameter group's lr scales both). "lora_b=16" is LoRA+ (Hayou et al.
    2024, PEFT's `create_loraplus_optimizer`)."""
    from jaxft.errors import JaxftError

    rules = []
    for item in filter(None, (x.strip() for x in str(spec).split(","))):
        pattern, _, factor = item.rpartition("=")
        where = f"optimizer.lr_multipliers={spec!r}: {item!r}"
        try:
            value = float(factor)
            regex = re.compile(pattern)
        except (ValueError, re.error) as e:
            raise JaxftError(f"{where}: expected regex=factor, e.g. 'lora_b=16' ({e})") from None
        if not pattern or not 0 < value < float("inf"):
            raise JaxftError(f"{where}: expected regex=factor with a regex and a positive factor, e.g. 'lora_b=16'")
        rules.append((regex, value))
    return rules


def path_name(path) -> str:
    return "/".join(str(getattr(k, "key", k)) for k in path)


def scale_by_path(rules) -> optax.GradientTransformation:
    """The updates of leaves that a rule's regex matches (`lr_multipliers`), times its factor."""

    def factor(path) -> float:
        name = path_name(path)
        return next((f for regex, f in rules if regex.search(name)), 1.0)

    def scaled(path, u):
        f = factor(path)
        return u if f == 1.0 else u * f

    def update(updates, state, params=None):
        return jax.tree_util.tree_map_with_path(scaled, updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def check_lr_multipliers(spec: str, trainable) -> None:
    """Each rule must match a trainable leaf: a typo would otherwise train everything at the plain rate."""
    from jaxft.errors import JaxftError
    from jaxft.peft.partition import flat

    names = list(flat(trainable))
    for regex, _ in lr_multipliers(spec):
        if not any(regex.search(n) for n in names):
            raise JaxftError(f"optimizer.lr_multipliers: {regex.pattern!r} matches no trainable parameter (they are "
                             f"e.g. {', '.join(names[:3])})")


def all_finite(tree) -> jax.Array:
    """Whether every element of every leaf is finite (no NaN, no Inf)."""
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(tree)]))


class LossScaleState(NamedTuple):
    scale: jax.Array
    good_steps: jax.Array
    inner: Any


def dynamic_loss_scale(inner: optax.GradientTransformation, init_scale: float = 2.0**15, period: int = 2000,
                       factor: float = 2.0) -> optax.GradientTransformation:
    """fp16 training: the step multiplies the loss by `scale` and divides the gradients by it. A step
    whose gradients overflowed is skipped (no update, the inner state kept) and halves the scale;
    `period` finite steps in a row double it. The scale lives in the optimizer state, so it is
    checkpointed and resumed with it."""

    def init(params):
        return LossScaleState(jnp.float32(init_scale), jnp.int32(0), inner.init(params))

    def update(grads, state, params=None):
        finite = all_finite(grads)
        grads = jax.tree_util.tree_map(lambda g: jnp.where(finite, g, 0.0), grads)
        updates, new_inner = inner.update(grads, state.inner, params)
        keep = lambda new, old: jnp.where(finite, new, old)  # noqa: E731
        new_inner = jax.tree_util.tree_map(keep, new_inner, state.inner)
        updates = jax.tree_util.tree_map(lambda u: jnp.where(finite, u, 0.0), updates)
        grow = finite & (state.good_steps + 1 >= period)
        scale = jnp.where(grow, state.scale * factor, state.scale)
        scale = jnp.where(finite, scale, jnp.maximum(state.scale / factor, 1.0))
        return updates, LossScaleState(scale, jnp.where(finite & ~grow, state.good_steps + 1, 0), new_inner)

    return optax.GradientTransformation(init, update)


# ---------------------------------------------------------------------------------------------
# Primary training / eval step functions.


def make_train_step(model, tx: optax.GradientTransformation, schedule, grad_accum: int, mesh=None,
                    param_shardings=None, skip_nonfinite: bool = False, objective: Objective | None = None):
    """`mesh` turns on the model's activation constraints and keeps every micro-batch spread over the
    data/FSDP shards; `param_shardings` holds the gradient carry to the parameters' layout. With
    `skip_nonfinite`, a step whose loss or gradient is NaN/Inf leaves params and optimizer state as
    they were; either way metrics["nonfinite"] says whether it was. `objective` (default: the one
    of the model's head) says what the model is called with and what the loss is. The model's hooks
    may add an auxiliary loss (`Hook.aux_loss`, reported as metrics["aux_loss"] and included in
    "loss") and update their per-step state in `state.method_state` after each optimizer step."""
    objective = objective or for_head(model.cfg.head)
    hooks = tuple(getattr(model, "hooks", ()))  # a method's aux loss and per-step state come through them

    def forward(trainable, frozen, batch, rng, loss_scale):
        params = {"params": merge(trainable, frozen)}
        outputs, extra = model.apply(params, **objective.inputs(batch), return_hidden=True, rngs={"dropout": rng},
                                     mutable=["losses"])
        sums = loss_of(objective, outputs, batch, params["params"])
        for term in jax.tree_util.tree_leaves(extra.get("losses", {})):  # the model's own (a mixture's routers')
            sums = {**sums, "loss_sum": sums["loss_sum"] + term * sums["count"]}
        return sums["loss_sum"] * loss_scale, sums

    def like_params(grads):
        return grads if param_shardings is None else jax.lax.with_sharding_constraint(grads, param_shardings)

    def micro_batches(x):
        # Micro-batch i takes rows i, i + grad_accum, ...: each device's rows split evenly between the
        # micro-batches, so every micro-batch stays on all data/FSDP shards and nothing moves.
        x = x.reshape((-1, grad_accum) + x.shape[1:]).swapaxes(0, 1)
        return sharding.constrain(x, (None, "batch") + (None,) * (x.ndim - 2))

    def train_step(state: TrainState, frozen, batch):
        with sharding.axis_rules(mesh):
            return _train_step(state, frozen, batch)

    def _train_step(state: TrainState, frozen, batch):
        scaled = isinstance(state.opt_state, LossScaleState)  # fp16 (see `dynamic_loss_scale`)
        loss_scale = state.opt_state.scale if scaled else 1.0
        rng, step_rng = jax.random.split(state.rng)
        micro = jax.tree_util.tree_map(micro_batches, batch)
        grad_fn = jax.grad(forward, has_aux=True)

        def accumulate(carry, xs):
            grads, sums = carry
            mb, i = xs
            g, s = grad_fn(state.params, frozen, mb, jax.random.fold_in(step_rng, i), loss_scale)
            grads = like_params(jax.tree_util.tree_map(jnp.add, grads, g))
            return (grads, jax.tree_util.tree_map(jnp.add, sums, s)), None

        zeros = like_params(jax.tree_util.tree_map(jnp.zeros_like, state.params))
        zero_sums = {"loss_sum": 0.0, "count": 0.0, "correct": 0.0, **{k: 0.0 for k in objective.train_sums}}
        (grads, sums), _ = jax.lax.scan(accumulate, (zeros, zero_sums), (micro, jnp.arange(grad_accum)))
        count = jnp.maximum(sums["count"], 1.0)
        grads = jax.tree_util.tree_map(lambda g: g / (count * loss_scale), grads)  # mean over every token/example
        aux = None
        if aux_loss(hooks, state.params) is not None:  # a method's own loss term, once per step (not per micro-batch)
            aux, aux_grads = jax.value_and_grad(lambda p: aux_loss(hooks, p))(state.params)
            grads = jax.tree_util.tree_map(jnp.add, grads, like_params(aux_grads))

        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        method_state = state.method_state
        if method_state:  # e.g. AdaLoRA's importance scores and rank budget
            method_state, params = update_method_state(hooks, method_state, params, grads, state.step + 1)
        grad_norm = optax.global_norm(grads)
        # The new parameters too: finite gradients can still step them to Inf (a huge learning rate).
        # Under a loss scale an overflowing gradient is expected: the scale skips that update itself.
        finite = jnp.isfinite(sums["loss_sum"]) & (scaled | jnp.isfinite(grad_norm)) & all_finite(params)
        if skip_nonfinite:
            keep = lambda new, old: jax.tree_util.tree_map(lambda n, o: jnp.where(finite, n, o), new, old)  # noqa: E731
            params, opt_state = keep(params, state.params), keep(opt_state, state.opt_state)
            method_state = keep(method_state, state.method_state)
        metrics = {
            "loss": sums["loss_sum"] / count + (aux if aux is not None else 0.0),
            "accuracy": sums["correct"] / count,
            "grad_norm": grad_norm,
            "nonfinite": 1.0 - finite.astype(jnp.float32),
            "learning_rate": schedule(state.step),
            "tokens": jnp.sum(batch["attention_mask"]).astype(jnp.float32),
        }
        metrics.update({k: sums[k] / count for k in objective.train_sums})  # e.g. GRPO's KL and clip ratio
        if scaled:
            metrics["loss_scale"] = opt_state.scale
        if aux is not None:
            metrics["aux_loss"] = aux
        new = state.replace(step=state.step + 1, params=params, opt_state=opt_state, rng=rng, method_state=method_state)
        return new, metrics

    return train_step


def make_eval_step(model, mesh=None, objective: Objective | None = None):
    objective = objective or for_head(model.cfg.head)

    def eval_step(trainable, frozen, batch):
        params = {"params": merge(trainable, frozen)}
        with sharding.axis_rules(mesh):
            outputs = model.apply(params, **objective.inputs(batch), return_hidden=True)
        sums = loss_of(objective, outputs, batch, params["params"])
        if objective.eval_sums is not None:
            sums.update(objective.eval_sums(outputs, batch, model.cfg))
        return sums

    return eval_step
