"""Shared by the method tests: a method config from keywords, and a base model from disk with a
method's hooks and randomised added parameters (so that they change the logits)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from jaxft import hf
from jaxft.config import base_config
from jaxft.models import family
from jaxft.peft import build
from jaxft.peft.partition import added_params, flat, merge, unflat


def method_cfg(**kw) -> ml_collections.ConfigDict:
    m = base_config().method
    for k, v in kw.items():
        m[k] = v
    return m


def hooked(base_dir, method_kw, seed=1, **overrides):
    """Base weights from disk + the method's parameters, randomised so that they matter."""
    model, params = hf.load(base_dir, **overrides)
    method = build(method_cfg(**method_kw), model.cfg)
    model = family.build(model.cfg, method.hooks)
    fresh = nn.unbox(model.init(jax.random.PRNGKey(seed), jnp.zeros((1, 4), jnp.int32))["params"])
    added = {k: 0.3 * jax.random.normal(jax.random.PRNGKey(i), v.shape)
             for i, (k, v) in enumerate(flat(added_params(fresh)).items())}
    return model, method, merge(params, unflat(added))
