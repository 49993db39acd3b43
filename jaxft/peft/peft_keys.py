"""Module names between jaxft and HF PEFT adapter files, for the methods that save per-module tensors.

jaxft's module paths have no layer index under a scanned stack (`layers.self_attn.q_proj`, the layer
is the leading axis of each leaf) or one per unscanned layer (`layers_3.self_attn.q_proj`); HF's
carry it (`model.layers.3.self_attn.q_proj`).
"""

from __future__ import annotations

import re

import numpy as np

from jaxft.errors import JaxftError
from jaxft.models import family
from jaxft.peft.partition import flat


def per_layer(trainable, leaf: str):
    """-> [(our module path without layer index, layer index or None, value)] for each `leaf` param."""
    out = []
    for path, value in flat(trainable).items():
        parts = path.split("/")
        if parts[-1] != leaf:
            continue
        head, mod = parts[0], ".".join(parts[:-1])
        value = np.asarray(value, np.float32)
        if head == "layers":
            out += [(mod, i, value[i]) for i in range(value.shape[0])]
        elif head.startswith("layers_") and head[7:].isdigit():
            out.append(("layers." + ".".join(parts[1:-1]), int(head[7:]), value))
        else:
            out.append((mod, None, value))
    return out


def hf_module(cfg, path: str) -> str:
    """The family's HF module name of our dotted path, given the config where the family's mapping
    takes it (T5's classifier puts its stacks under `transformer.`)."""
    import inspect

    fn = family.of(cfg).hf_module
    return fn(path, cfg) if len(inspect.signature(fn).parameters) > 1 else fn(path)


def hf_name(cfg, path: str, layer: int | None) -> str:
    """Our module path (without layer index) and its layer -> HF's module name."""
    head, *rest = path.split(".")
    if head == "layers" and layer is not None:
        path = ".".join(["layers", str(layer)] + rest)
    return hf_module(cfg, path)


def pattern(cfg, path: str, layer: int | None) -> str:
    """A regex on HF module names matching this module in every layer (PEFT's target_modules)."""
    name = re.escape(hf_name(cfg, path, layer))
    return name.replace(f"\\.{layer}\\.", r"\.\d+\.", 1) if layer is not None else name


def our_name(cfg, name: str, where: str) -> tuple[str, int | None]:
    """HF module name -> (our module path without layer index, layer index or None)."""
    ours = family.of(cfg).our_module(name)
    if ours is None:
        raise JaxftError(f"{where}: {name} names a module this {cfg.model_type} model does not have")
    m = re.fullmatch(r"layers\.(\d+)(\..+)?", ours)
    return (f"layers{m[2] or ''}", int(m[1])) if m else (ours, None)


def to_params(values: dict, cfg, where: str, fill=None) -> dict:
    """{(our module path, leaf): {layer or None: array}} -> flat params ("a/b/leaf": array), stacked along
    a leading axis when the model scans its layers. `fill(shape)` supplies a layer the adapter leaves
    out (None: that is an error)."""
    out = {}
    for (path, leaf), per in values.items():
        key = path.replace(".", "/") + "/" + leaf
        if not path.startswith("layers."):
            out[key] = per[None]
            continue
        missing = sorted(set(range(cfg.num_layers)) - set(per))
        if missing and fill is None:
            raise JaxftError(f"{where}: {path} has an adapter in some layers only (none in layer {missing[0]})")
        shape = next(iter(per.values())).shape
        full = [per[i] if i in per else fill(shape) for i in range(cfg.num_layers)]
        if cfg.scan_layers:
            out[key] = np.stack(full)
        else:
            for i, v in enumerate(full):
                out[f"layers_{i}/" + key[len("layers/"):]] = v
    return out
