"""The registry of methods. A method is data: which leaves train, and which hooks the model runs.

Nothing downstream (train step, optimizer, checkpoint, sharding) looks at a method's name.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

from jaxft.errors import JaxftError
from jaxft.peft.lora import LoraHook, parse_targets
from jaxft.peft.ptuning_v2 import PrefixHook


@dataclasses.dataclass(frozen=True)
class Method:
    name: str
    trainable: tuple[str, ...]  # regexes searched in "a/b/c" parameter paths
    hooks: tuple[Any, ...] = ()


HEAD = r"^(score|lm_head)/"


def _full(m, cfg) -> Method:
    return Method("full", (r".",))


def _head(m, cfg) -> Method:
    if cfg.head == "causal_lm" and cfg.tie_word_embeddings:
        raise JaxftError("method.name='head' on a causal LM with tied embeddings would train the embeddings too")
    return Method("head", (HEAD,))


def _lora(m, cfg) -> Method:
    if m.rank <= 0:
        raise JaxftError(f"method.rank={m.rank}: expected a positive integer")
    try:
        parse_targets(m.targets)
    except Exception as e:
        raise JaxftError(f"method.targets={m.targets!r}: not a module-name list or a valid regex ({e})") from None
    hook = LoraHook(m.rank, float(m.alpha), float(m.dropout), m.targets, bool(m.get("rslora", False)))
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


def build(method_config, model_cfg) -> Method:
    """config.method -> Method. Several methods compose: `method.name='lora+ptuning_v2'`."""
    parts = [n.strip() for n in str(method_config.name).split("+")]
    for n in parts:
        if n not in METHODS:
            raise JaxftError(f"method.name={n!r}: unknown method (expected one of {', '.join(METHODS)})")
    built = [METHODS[n](method_config, model_cfg) for n in parts]
    trainable = tuple(p for m in built for p in m.trainable)
    if model_cfg.head == "classification":  # a new classifier head always trains
        trainable += (r"^score/",)
    return Method("+".join(parts), tuple(dict.fromkeys(trainable)), tuple(h for m in built for h in m.hooks))
