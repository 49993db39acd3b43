"""Module names between jaxft and HF PEFT adapter files, for the methods that save per-module tensors.

jaxft's module paths have no block index under a scanned stack of blocks (`layers.self_attn.q_proj`,
the block is the leading axis of each leaf) or one per unscanned block (`layers_3.self_attn.q_proj`);
HF's carry it (`model.layers.3.self_attn.q_proj`). The stacks are the family's (`Family.layer_stacks`:
`layers`, or T5's `encoder.block` and `decoder.block`).
"""

from __future__ import annotations

import re

import numpy as np

from jaxft.errors import JaxftError
from jaxft.models import family
from jaxft.peft.partition import flat


def stack_of(cfg, path: str):
    """Our dotted module path -> (stack, block index or None when scanned, path inside the block), or None
    outside the family's stacks of blocks (`layers.x` scanned, `layers_3.x` not; T5: `encoder.block`)."""
    for stack in family.of(cfg).layer_stacks(cfg):
        if path == stack or path.startswith(stack + "."):
            return stack, None, path[len(stack) + 1:]
        m = re.fullmatch(re.escape(stack) + r"_(\d+)(?:\.(.+))?", path)
        if m:
            return stack, int(m[1]), m[2] or ""
    return None


def join(*parts) -> str:
    return ".".join(p for p in parts if p)


def per_layer(trainable, leaf: str, cfg):
    """-> [(our module path without block index, block index or None, value)] for each `leaf` param."""
    out = []
    for path, value in flat(trainable).items():
        parts = path.split("/")
        if parts[-1] != leaf:
            continue
        value = np.asarray(value, np.float32)
        where = stack_of(cfg, ".".join(parts[:-1]))
        if where is None:
            out.append((".".join(parts[:-1]), None, value))
            continue
        stack, index, rest = where
        if index is None:
            out += [(join(stack, rest), i, value[i]) for i in range(value.shape[0])]
        else:
            out.append((join(stack, rest), index, value))
    return out


def hf_module(cfg, path: str) -> str:
    """The family's HF module name of our dotted path, given the config where the family's mapping
    takes it (T5's classifier puts its stacks under `transformer.`)."""
    return family.of(cfg).hf_module(path, cfg)


def hf_name(cfg, path: str, layer: int | None) -> str:
    """Our module path (without block index) and its block -> HF's module name."""
    where = stack_of(cfg, path) if layer is not None else None
    if where is not None:
        stack, _, rest = where
        path = join(stack, str(layer), rest)
    return hf_module(cfg, path)


def pattern(cfg, path: str, layer: int | None) -> str:
    """A regex on HF module names matching this module in every block (PEFT's target_modules)."""
    name = re.escape(hf_name(cfg, path, layer))
    return name.replace(f"\\.{layer}\\.", r"\.\d+\.", 1) if layer is not None else name


def our_name(cfg, name: str, where: str) -> tuple[str, int | None]:
    """HF module name -> (our module path without block index, block index or None)."""
    ours = family.of(cfg).our_module(name)
    if ours is None:
        raise JaxftError(f"{where}: {name} names a module this {cfg.model_type} model does not have")
    for stack in family.of(cfg).layer_stacks(cfg):
        m = re.fullmatch(re.escape(stack) + r"\.(\d+)(?:\.(.+))?", ours)
        if m:
            return join(stack, m[2]), int(m[1])
    return ours, None


def to_params(values: dict, cfg, where: str, fill=None) -> dict:
    """{(our module path, leaf): {block or None: array}} -> flat params ("a/b/leaf": array), stacked along
    a leading axis when the model scans its blocks. `fill(shape)` supplies a block the adapter leaves
    out (None: that is an error)."""
    stacks = family.of(cfg).layer_stacks(cfg)
    out = {}
    for (path, leaf), per in values.items():
        hit = stack_of(cfg, path) if None not in per else None
        if hit is None:
            out[path.replace(".", "/") + "/" + leaf] = per[None]
            continue
        stack, _, rest = hit
        n = stacks[stack]
        missing = sorted(set(range(n)) - set(per))
        if missing and fill is None:
            raise JaxftError(f"{where}: {path} has an adapter in some layers only (none in layer {missing[0]})")
        shape = next(iter(per.values())).shape
        full = [per[i] if i in per else fill(shape) for i in range(n)]
        inner = "/".join(p for p in (rest.replace(".", "/"), leaf) if p)
        if cfg.scan_layers:
            out[stack.replace(".", "/") + "/" + inner] = np.stack(full)
        else:
            for i, v in enumerate(full):
                out[f"{stack.replace('.', '/')}_{i}/" + inner] = v
    return out
