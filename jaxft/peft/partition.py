"""Split a parameter tree into the leaves that train and the frozen rest, by name.

Built once from the method's regexes; the same split drives the gradient (taken with respect to the
trainable tree only), the optimizer state, the checkpoint and the parameter counts.
"""

from __future__ import annotations

import re
from typing import Iterable

import jax
import numpy as np
from flax import traverse_util

# Leaves that methods add to a base model; everything else is the base model's own.
ADDED_PARAMS = re.compile(r"(^|/)(lora_a|lora_b|prefix_encoder"
                          r"|lora_magnitude|lora_merged_norm|ia3_l|adalora_[abe]|adapter_attention|adapter_mlp)(/|$)")


def flat(params) -> dict[str, object]:
    return {"/".join(k): v for k, v in traverse_util.flatten_dict(params).items()}


def unflat(d: dict[str, object]) -> dict:
    return traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in d.items()})


def is_trainable(path: str, patterns: Iterable[str]) -> bool:
    return any(re.search(p, path) for p in patterns)


def split(params, patterns: Iterable[str]) -> tuple[dict, dict]:
    """-> (trainable, frozen): two disjoint nested dicts whose union is `params`."""
    patterns = tuple(patterns)
    f = flat(params)
    train = {k: v for k, v in f.items() if is_trainable(k, patterns)}
    frozen = {k: v for k, v in f.items() if k not in train}
    return unflat(train), unflat(frozen)


def merge(*trees) -> dict:
    out = {}
    for t in trees:
        out.update(flat(t))
    return unflat(out)


def base_params(params) -> dict:
    """The base model's leaves: what a HF checkpoint holds, without method-added parameters."""
    return unflat({k: v for k, v in flat(params).items() if not ADDED_PARAMS.search(k)})


def added_params(params) -> dict:
    return unflat({k: v for k, v in flat(params).items() if ADDED_PARAMS.search(k)})


def count(params) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(params)))
