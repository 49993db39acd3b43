"""Module names between jaxft and HF PEFT adapter files, for the methods that save per-module tensors.

jaxft's module paths have no layer index under a scanned stack (`layers.self_attn.q_proj`, the layer
is the leading axis of each leaf) or one per unscanned layer (`layers_3.self_attn.q_proj`); HF's
carry it (`model.layers.3.self_attn.q_proj`). The stacks are the family's `layer_stacks` (`layers`;
T5's `encoder.block` and `decoder.block`).
"""

from __future__ import annotations

import re

import numpy as np

from jaxft.errors import JaxftError
from jaxft.models import family
from jaxft.peft.partition import flat


def _stacks(cfg) -> dict[str, int]:
    """{dotted stack path: number of blocks}; without a config, decoder-only's single `layers`."""
    return family.of(cfg).layer_stacks(cfg) if cfg is not None else {"layers": 0}


def per_layer(trainable, leaf: str, cfg=None):
    """-> [(our module path without layer index, layer index or None, value)] for each `leaf` param."""
    out = []
    for path, value in flat(trainable).items():
        parts = path.split("/")
        if parts[-1] != leaf:
            continue
        mod = ".".join(parts[:-1])
        value = np.asarray(value, np.float32)
        for stack in _stacks(cfg):
            s = stack.split(".")
            k = len(s)
            if parts[:k] == s:  # scanned: the layer is the leading axis
                out += [(mod, i, value[i]) for i in range(value.shape[0])]
                break
            m = re.fullmatch(re.escape(s[-1]) + r"_(\d+)", parts[k - 1]) if len(parts) > k else None
            if m and parts[: k - 1] == s[:-1]:  # unscanned: `layers_3`, `encoder/block_3`
                out.append((".".join([stack] + parts[k:-1]), int(m[1]), value))
                break
        else:
            out.append((mod, None, value))
    return out


def _split(cfg, path: str):
    """Our module path without layer index -> (its stack, the path inside a block: "" for the block
    itself), or None outside the stacks."""
    return next(((stack, path[len(stack) + 1:]) for stack in _stacks(cfg)
                 if path == stack or path.startswith(stack + ".")), None)


def hf_name(cfg, path: str, layer: int | None) -> str:
    """Our module path (without layer index) and its layer -> HF's module name."""
    where = _split(cfg, path)
    if where is not None and layer is not None:
        path = ".".join([where[0], str(layer)] + ([where[1]] if where[1] else []))
    return family.of(cfg).hf_module(path)


def pattern(cfg, path: str, layer: int | None) -> str:
    """A regex on HF module names matching this module in every layer (PEFT's target_modules)."""
    name = re.escape(hf_name(cfg, path, layer))
    return name.replace(f"\\.{layer}\\.", r"\.\d+\.", 1) if layer is not None else name


def our_name(cfg, name: str, where: str) -> tuple[str, int | None]:
    """HF module name -> (our module path without layer index, layer index or None)."""
    ours = family.of(cfg).our_module(name)
    if ours is None:
        raise JaxftError(f"{where}: {name} names a module this {cfg.model_type} model does not have")
    for stack in _stacks(cfg):
        m = re.fullmatch(re.escape(stack) + r"\.(\d+)(\..+)?", ours)
        if m:
            return f"{stack}{m[2] or ''}", int(m[1])
    return ours, None


def to_params(values: dict, cfg, where: str, fill=None) -> dict:
    """{(our module path, leaf): {layer or None: array}} -> flat params ("a/b/leaf": array), stacked along
    a leading axis when the model scans its layers. `fill(shape)` supplies a layer the adapter leaves
    out (None: that is an error)."""
    out = {}
    for (path, leaf), per in values.items():
        key = path.replace(".", "/") + "/" + leaf
        split = _split(cfg, path)
        if split is None:
            out[key] = per[None]
            continue
        stack, rest = split
        n = _stacks(cfg)[stack]
        missing = sorted(set(range(n)) - set(per))
        if missing and fill is None:
            raise JaxftError(f"{where}: {path} has an adapter in some layers only (none in layer {missing[0]})")
        shape = next(iter(per.values())).shape
        full = [per[i] if i in per else fill(shape) for i in range(n)]
        if cfg.scan_layers:
            out[key] = np.stack(full)
        else:
            for i, v in enumerate(full):
                inside = [rest.replace(".", "/")] if rest else []
                out["/".join([f"{stack.replace('.', '/')}_{i}"] + inside + [leaf])] = v
    return out
