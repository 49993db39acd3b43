"""The registry of methods. A method is data: which leaves train, and which hooks the model runs.

Nothing downstream (train step, optimizer, checkpoint, sharding) looks at a method's name.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

from jaxft.errors import JaxftError
from jaxft.models import family
from jaxft.peft.hook import Hook, acts_on_linear
from jaxft.peft.lora import LoraHook, module_path, parse_targets, target_names
from jaxft.peft.ptuning_v2 import PrefixHook


@dataclasses.dataclass(frozen=True)
class Method:
    name: str
    trainable: tuple[str, ...]  # regexes searched in "a/b/c" parameter paths
    hooks: tuple[Any, ...] = ()
    # A method that needs more than hooks (AdaLoRA): a loss on the trainable tree added to the mean
    # loss, and a wrapper of the optimizer, (tx, total steps) -> tx, that keeps per-step state in the
    # optimizer state (so it is checkpointed and resumed with it). The train step calls both generically.
    aux_loss: Callable | None = None
    optimizer: Callable | None = None


def _full(m, cfg) -> Method:
    return Method("full", (r".",))


def _head(m, cfg) -> Method:
    if cfg.head == "causal_lm" and getattr(cfg, "tie_word_embeddings", False):
        raise JaxftError("method.name='head' on a causal LM with tied embeddings would train the embeddings too")
    return Method("head", (family.of(cfg).head_params,))


def _lora(m, cfg) -> Method:
    if m.rank <= 0:
        raise JaxftError(f"method.rank={m.rank}: expected a positive integer")
    try:
        parse_targets(m.targets)
    except Exception as e:
        raise JaxftError(f"method.targets={m.targets!r}: not a module-name list or a valid regex ({e})") from None
    hook = LoraHook(m.rank, float(m.alpha), float(m.dropout), m.targets, bool(m.get("rslora", False)),
                    bool(m.get("dora", False)))
    return Method("lora", (r"/lora_[ab]$", r"/lora_magnitude$") if hook.dora else (r"/lora_[ab]$",), (hook,))


def _ptuning_v2(m, cfg) -> Method:
    if m.num_virtual_tokens <= 0:
        raise JaxftError(f"method.num_virtual_tokens={m.num_virtual_tokens}: expected a positive integer")
    if m.get("init_from_tokens", False) and m.get("projection", False):
        # The MLP's output is shared weights, not per-token values a real token's keys could seed.
        raise JaxftError("method.init_from_tokens=True needs method.projection=False")
    hook = PrefixHook(
        m.num_virtual_tokens,
        bool(m.get("projection", False)),
        int(m.get("projection_hidden", 512)),
        float(m.get("prompt_dropout", 0.0)),
        float(m.get("init_std", 1.0)),
        bool(m.get("init_from_tokens", False)),
    )
    return Method("ptuning_v2", (r"^prefix_encoder/",), (hook,))


# --- adapters, IA3, AdaLoRA (branch adapters; each method's code is in its own module) ---
def _adapter(m, cfg) -> Method:
    from jaxft.peft import adapter

    kind, act = m.get("adapter_type", "houlsby"), m.get("adapter_activation", "relu")
    size = m.get("adapter_size", 64)
    if kind not in adapter.KINDS or act not in adapter.ACTIVATIONS or int(size) <= 0:
        raise JaxftError(f"method.adapter_type={kind!r}, method.adapter_activation={act!r}, method.adapter_size="
                         f"{size}: expected one of {', '.join(adapter.KINDS)}, one of "
                         f"{', '.join(adapter.ACTIVATIONS)}, and a positive size")
    return Method("adapter", (adapter.TRAINABLE,), (adapter.AdapterHook(int(size), kind, act),))


def _ia3(m, cfg) -> Method:
    from jaxft.peft import ia3

    fam = family.of(cfg)
    targets = m.get("ia3_targets", "") or fam.ia3_targets
    ff = m.get("feedforward_modules", "") or (fam.ia3_feedforward if not m.get("ia3_targets", "") else "")
    for key, value in (("method.ia3_targets", targets), ("method.feedforward_modules", ff)):
        try:
            parse_targets(value)
        except Exception as e:
            raise JaxftError(f"{key}={value!r}: not a module-name list or a valid regex ({e})") from None
    return Method("ia3", (ia3.TRAINABLE,), (ia3.IA3Hook(targets, ff),))


def _adalora(m, cfg) -> Method:
    from jaxft.peft import adalora

    hook = adalora.AdaLoraHook(
        int(m.get("init_r", 12)), int(m.get("target_r", 8)), float(m.alpha), float(m.dropout), m.targets,
        int(m.get("tinit", 0)), int(m.get("tfinal", 0)), int(m.get("delta_t", 1)), float(m.get("beta1", 0.85)),
        float(m.get("beta2", 0.85)), float(m.get("orth_reg_weight", 0.5)), int(m.get("total_step", 0)))
    if not 0 < hook.target_r <= hook.init_r or hook.delta_t <= 0 or hook.orth_reg_weight < 0:
        raise JaxftError(f"method.init_r={hook.init_r}, method.target_r={hook.target_r}, method.delta_t={hook.delta_t},"
                         f" method.orth_reg_weight={hook.orth_reg_weight}: expected 0 < target_r <= init_r, "
                         "delta_t > 0, orth_reg_weight >= 0")
    aux = (lambda p: hook.orth_reg_weight * adalora.orth_loss(p)) if hook.orth_reg_weight else None  # noqa: E731

    def optimizer(tx, total):
        total = hook.total_step or total
        if hook.tinit >= total - hook.tfinal:
            raise JaxftError(f"method.tinit={hook.tinit}, method.tfinal={hook.tfinal}: expected tinit < "
                             f"total steps ({total}) - tfinal")
        return adalora.allocator(tx, hook, total)

    return Method("adalora", (adalora.TRAINABLE,), (hook,), aux, optimizer)


METHODS: dict[str, Callable] = {"full": _full, "head": _head, "lora": _lora, "ptuning_v2": _ptuning_v2,
                                "adapter": _adapter, "ia3": _ia3, "adalora": _adalora}


class _Recorder(Hook):
    """Notes the path of every Linear the model calls, and changes nothing."""

    def __init__(self):
        self.paths = []

    def linear(self, module, x, y, kernel):
        self.paths.append(module_path(module))
        return y


def linear_paths(model_cfg) -> list[str]:
    """Dotted paths of this model's Linear layers, as hooks see them (traced, not run)."""
    import jax
    import jax.numpy as jnp

    recorder = _Recorder()
    model = family.build(model_cfg, (recorder,))
    jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 2), jnp.int32)))
    return list(dict.fromkeys(recorder.paths))


def check_hooks(method: Method, model_cfg) -> None:
    """Every hook that acts on Linear layers must act on at least one, and each name of a
    `method.targets` list must name a module: a typo would otherwise quietly train less (with none
    left, only the classifier head) and export a full model."""
    linear_hooks = [h for h in method.hooks if acts_on_linear(h)]
    if not linear_hooks:
        return
    paths = linear_paths(model_cfg)
    names = sorted({p.split(".")[-1] for p in paths})
    known = f"module names: {', '.join(names)}; full paths such as {paths[0]!r} for a regex"
    for hook in linear_hooks:
        key = getattr(hook, "targets_key", "method.targets")
        what = f"{key}={hook.targets!r}" if hasattr(hook, "targets") else type(hook).__name__
        if not any(hook.acts_on(p) for p in paths):
            raise JaxftError(f"{what} matches no module of this model ({known})")
        unknown = sorted((target_names(hook.targets) or set()) - set(names)) if hasattr(hook, "targets") else []
        if unknown:
            raise JaxftError(f"{what}: {', '.join(map(repr, unknown))} names no module of this model ({known})")


def build(method_config, model_cfg) -> Method:
    """config.method -> Method. Several methods compose: `method.name='lora+ptuning_v2'`."""
    parts = [n.strip() for n in str(method_config.name).split("+")]
    for n in parts:
        if n not in METHODS:
            raise JaxftError(f"method.name={n!r}: unknown method (expected one of {', '.join(METHODS)})")
    built = [METHODS[n](method_config, model_cfg) for n in parts]
    trainable = tuple(p for m in built for p in m.trainable)
    if model_cfg.head in ("classification", "token_classification"):  # a new classifier head always trains
        trainable += (family.of(model_cfg).classifier_params,)
    aux = [m.aux_loss for m in built if m.aux_loss]
    wraps = [m.optimizer for m in built if m.optimizer]
    aux_loss = (lambda p: sum(f(p) for f in aux)) if aux else None  # noqa: E731
    def chained(tx, total):
        for wrap in wraps:
            tx = wrap(tx, total)
        return tx

    method = Method("+".join(parts), tuple(dict.fromkeys(trainable)), tuple(h for m in built for h in m.hooks),
                    aux_loss, chained if wraps else None)
    check_hooks(method, model_cfg)
    return method
