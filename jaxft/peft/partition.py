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

from jaxft.peft import registry


class _Added:
    """Leaves that methods add to a base model; everything else is the base model's own. Derived
    from the registered methods (`registry.Kind.added`), so it follows every `register` call."""

    def search(self, path: str):
        return registry.added_regex().search(path)

    @property
    def pattern(self) -> str:
        return registry.added_regex().pattern


ADDED_PARAMS = _Added()


def flat(params) -> dict[str, object]:
    return {"/".join(k): v for k, v in traverse_util.flatten_dict(params).items()}


def unflat(d: dict[str, object]) -> dict:
    return traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in d.items()})


def is_trainable(path: str, patterns: Iterable[str]) -> bool:
    """Whether a leaf trains: some pattern matches its path, and no pattern written "!regex" (an
    exclusion, e.g. the layers `method.layers` leaves frozen) does."""
    patterns = tuple(patterns)
    include = [p for p in patterns if not p.startswith("!")]
    exclude = [p[1:] for p in patterns if p.startswith("!")]
    return any(re.search(p, path) for p in include) and not any(re.search(p, path) for p in exclude)


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
