"""P-Tuning v2 (Liu et al. 2022) and prefix tuning (Li & Liang 2021): learned key/value prefixes
at every layer. The two are one hook: prefix tuning is the reparameterised form.

The prefix is laid out as PEFT's prefix encoder does, [tokens, layers, 2, kv_heads, head_dim]
flattened, so an export maps one to one. With `projection` the prefix is reparameterised by an MLP
(embedding -> Linear -> tanh -> Linear to layers*2*kv_width), as in PEFT's PREFIX_TUNING with
`prefix_projection=True` (Li & Liang's reparameterisation); there the embedding is `embed_dim` wide
(PEFT: the key/value width, `token_dim`; P-Tuning v2's default: the model's hidden size).

Random prefixes can start "dead" on a small frozen model: if its queries put (almost) no attention
on random keys, the prefix gets no gradient. `init_from_tokens` starts instead from the keys and
values the frozen model computes for real tokens of the training data, the initialisation Li & Liang
(2021) found to matter for prefix tuning.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from jaxft.models.layers import param_with_axes
from jaxft.peft.hook import Hook
from jaxft.peft.lora import dropout


class PrefixEncoder(nn.Module):
    num_tokens: int
    num_layers: int
    kv_heads: int
    head_dim: int
    hidden: int  # embedding width when projecting
    projection: bool
    projection_hidden: int
    dropout: float
    init_std: float

    @nn.compact
    def __call__(self, batch_size: int):
        width = self.num_layers * 2 * self.kv_heads * self.head_dim
        if self.projection:
            e = param_with_axes(self, "embedding", nn.initializers.normal(1.0), (self.num_tokens, self.hidden), (None, None))
            h = nn.Dense(self.projection_hidden, name="transform_0")(e)
            p = nn.Dense(width, name="transform_2")(jnp.tanh(h))
        else:
            init = nn.initializers.normal(self.init_std)
            p = param_with_axes(self, "embedding", init, (self.num_tokens, width), (None, None))
        p = dropout(self, p, self.dropout)
        p = p.reshape(self.num_tokens, self.num_layers, 2, self.kv_heads, self.head_dim).transpose(1, 2, 0, 3, 4)
        p = jnp.broadcast_to(p[:, :, None], (self.num_layers, 2, batch_size) + p.shape[2:])
        return p[:, 0], p[:, 1]  # keys, values: [layers, B, P, KV, D]


@dataclasses.dataclass(frozen=True)
class PrefixHook(Hook):
    num_virtual_tokens: int = 16
    projection: bool = False
    projection_hidden: int = 512
    dropout: float = 0.0
    init_std: float = 1.0
    init_from_tokens: bool = False
    embed_dim: int = 0  # with projection: the embedding's width (0: the model's hidden size)
    kind: str = "ptuning_v2"  # or "prefix_tuning": the registered method it exports as

    def encoder(self, cfg, dropout: float | None = None, name: str | None = "prefix_encoder") -> PrefixEncoder:
        from jaxft.models import family

        return PrefixEncoder(
            self.num_virtual_tokens,
            *family.of(cfg).kv_layout(cfg),
            self.embed_dim or cfg.hidden_size,
            self.projection,
            self.projection_hidden,
            self.dropout if dropout is None else dropout,
            self.init_std,
            name=name,
        )

    def initialize(self, model, params, sample):
        if not self.init_from_tokens:
            return params
        from jaxft.models import family
        from jaxft.peft.partition import base_params

        tokens = np.asarray(sample["input_ids"])[np.asarray(sample["attention_mask"]) == 1]
        tokens = np.resize(tokens, self.num_virtual_tokens)[None]  # the first real tokens, repeated if few
        base = family.build(model.cfg)
        _, state = base.apply({"params": base_params(params)}, tokens, mutable=["intermediates"])
        k, v = sown_keys_values(state["intermediates"], model.cfg)
        kv = jnp.stack([k[:, 0], v[:, 0]], axis=1)  # [L, 2, P, KV, D]
        emb = np.asarray(kv.transpose(2, 0, 1, 3, 4).reshape(self.num_virtual_tokens, -1), np.float32)
        old = params["prefix_encoder"]["embedding"]
        new = jax.make_array_from_callback(old.shape, old.sharding, lambda i: emb[i])
        return {**params, "prefix_encoder": {**params["prefix_encoder"], "embedding": new}}

    def prefix(self, model, batch_size):
        return self.encoder(model.cfg)(batch_size)


def sown_keys_values(intermediates, cfg):
    """The keys and values every layer's attention sowed as "keys_values" in a forward pass ->
    (keys, values) [layers, B, T, kv_heads, head_dim], wherever the family's modules sit."""
    from jaxft.models import family

    fam = family.of(cfg)
    if fam.prefix_keys_values is not None:  # the family says where its prefixed attention keeps them
        return fam.prefix_keys_values(intermediates, cfg)
    sown = {p: v for p, v in traverse_util.flatten_dict(intermediates).items() if p[-1] == "keys_values"}
    scanned = [v for p, v in sown.items() if p[0] == "layers"]
    if scanned:  # scanned: one entry with a leading layer axis
        return scanned[0][0]
    kv = [next(v for p, v in sown.items() if p[0] == f"layers_{i}")[0] for i in range(cfg.num_layers)]
    return jnp.stack([x[0] for x in kv]), jnp.stack([x[1] for x in kv])
