"""The registry of methods. A method is data: which leaves train, and which hooks the model runs.

Nothing downstream (train step, optimizer, checkpoint, sharding) looks at a method's name.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

from jaxft.errors import JaxftError
from jaxft.models import family
from jaxft.peft.hook import Hook
from jaxft.peft.lora import LoraHook, module_path, parse_targets, target_names
from jaxft.peft.ptuning_v2 import PrefixHook


@dataclasses.dataclass(frozen=True)
class Method:
    name: str
    trainable: tuple[str, ...]  # regexes searched in "a/b/c" parameter paths
    hooks: tuple[Any, ...] = ()


def _full(m, cfg) -> Method:
    return Method("full", (r".",))


def _head(m, cfg) -> Method:
    if cfg.head == "causal_lm" and getattr(cfg, "tie_word_embeddings", False):
        raise JaxftError("method.name='head' on a causal LM with tied embeddings would train the embeddings too")
    return Method("head", (family.of(cfg).head_params,))


def _lora(m, cfg) -> Method:
    if m.rank <= 0:
        raise JaxftError(f"method.rank={m.rank}: expected a positive integer")
    targets = m.targets or family.of(cfg).lora_targets
    try:
        parse_targets(targets)
    except Exception as e:
        raise JaxftError(f"method.targets={targets!r}: not a module-name list or a valid regex ({e})") from None
    hook = LoraHook(m.rank, float(m.alpha), float(m.dropout), targets, bool(m.get("rslora", False)))
    return Method("lora", (r"/lora_[ab]$",), (hook,))


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


METHODS: dict[str, Callable] = {"full": _full, "head": _head, "lora": _lora, "ptuning_v2": _ptuning_v2}


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
    linear_hooks = [h for h in method.hooks if type(h).linear is not Hook.linear]
    if not linear_hooks:
        return
    paths = linear_paths(model_cfg)
    names = sorted({p.split(".")[-1] for p in paths})
    known = f"module names: {', '.join(names)}; full paths such as {paths[0]!r} for a regex"
    for hook in linear_hooks:
        what = f"method.targets={hook.targets!r}" if isinstance(hook, LoraHook) else type(hook).__name__
        if not any(hook.acts_on(p) for p in paths):
            raise JaxftError(f"{what} matches no module of this model ({known})")
        unknown = sorted((target_names(hook.targets) or set()) - set(names)) if isinstance(hook, LoraHook) else []
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
    method = Method("+".join(parts), tuple(dict.fromkeys(trainable)), tuple(h for m in built for h in m.hooks))
    check_hooks(method, model_cfg)
    return method
