"""Soft prompts: virtual tokens put in front of the input embeddings (the `embeddings` hook point).

Prompt tuning (Lester et al. 2021) learns the virtual tokens' embeddings themselves, started at
random, from sampled vocabulary embeddings, or from the embeddings of a text (PEFT's
PromptTuningInit RANDOM / SAMPLE_VOCAB / TEXT). P-Tuning (Liu et al. 2021, v1) produces them with a
prompt encoder, an MLP or a bidirectional LSTM + MLP over learned embeddings, laid out as PEFT's
`PromptEncoder` so its weights map one to one. Both put every virtual token in front of the input
(PEFT's placement; P-Tuning's placement anywhere inside a template is not implemented). The model
drops the virtual positions again from per-token outputs; a classifier's "last" pooling reads the
last real token, which with virtual tokens in front is what PEFT's classifiers read on unpadded rows.

HF PEFT stores both as `prompt_embeddings` [tokens, hidden], the encoder's output (the encoder does
not ship), so an adapter loaded from PEFT has plain embeddings whatever trained it.
"""

from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxft.models.layers import param_with_axes
from jaxft.peft.hook import Hook
from jaxft.peft.lora import dropout

MODULE = {"prompt_tuning": "prompt_embeddings", "ptuning": "prompt_encoder"}  # kind -> its parameters' module
ENCODERS = ("none", "mlp", "lstm")
INITS = ("random", "vocab", "text")


def _torch_uniform(fan_in: int):
    """torch.nn.Linear / LSTM's default: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(fan_in)
    return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)


class PromptEncoder(nn.Module):
    """-> the virtual tokens' embeddings [tokens, dim]. `encoder` "none": the embeddings themselves
    (prompt tuning); "mlp": Linear-ReLU-Linear-ReLU-Linear (PEFT's `mlp_head`, every layer `hidden`
    wide but the last); "lstm": a bidirectional `layers`-layer LSTM of width `hidden`, then
    Linear(2h, 2h)-ReLU-Linear(2h, dim)."""

    num_tokens: int
    dim: int
    encoder: str = "none"
    hidden: int = 0
    layers: int = 2
    dropout: float = 0.0
    init_std: float = 1.0

    @nn.compact
    def __call__(self):
        e = param_with_axes(self, "embedding", nn.initializers.normal(self.init_std), (self.num_tokens, self.dim),
                            (None, None))
        if self.encoder == "none":
            return e
        h = self.hidden or self.dim
        dense = lambda n, fan_in, name: nn.Dense(n, kernel_init=_torch_uniform(fan_in),  # noqa: E731
                                                 bias_init=_torch_uniform(fan_in), name=name)
        if self.encoder == "mlp":
            x = nn.relu(dense(h, self.dim, "mlp_head_0")(e))
            x = nn.relu(dense(h, h, "mlp_head_2")(x))
            return dense(self.dim, h, "mlp_head_4")(x)
        x = e
        for layer in range(self.layers):
            if layer:  # torch's LSTM dropout: on every layer's output but the last
                x = dropout(self, x, self.dropout)
            fwd = self.lstm(x, h, f"lstm_l{layer}")
            bwd = self.lstm(x[::-1], h, f"lstm_l{layer}_reverse")[::-1]
            x = jnp.concatenate([fwd, bwd], axis=-1)
        x = nn.relu(dense(2 * h, 2 * h, "mlp_head_0")(x))
        return dense(self.dim, 2 * h, "mlp_head_2")(x)

    def lstm(self, x, h: int, name: str):
        """One direction of one LSTM layer over x [T, in], torch's gate order (i, f, g, o)."""
        init = _torch_uniform(h)
        w_ih = self.param(f"{name}_w_ih", init, (x.shape[-1], 4 * h))
        w_hh = self.param(f"{name}_w_hh", init, (h, 4 * h))
        b = self.param(f"{name}_b_ih", init, (4 * h,)) + self.param(f"{name}_b_hh", init, (4 * h,))
        gates_x = x @ w_ih + b

        def step(carry, gx):
            hid, cell = carry
            i, f, g, o = jnp.split(gx + hid @ w_hh, 4)
            cell = jax.nn.sigmoid(f) * cell + jax.nn.sigmoid(i) * jnp.tanh(g)
            hid = jax.nn.sigmoid(o) * jnp.tanh(cell)
            return (hid, cell), hid

        zeros = jnp.zeros((h,), x.dtype)
        return jax.lax.scan(step, (zeros, zeros), gates_x)[1]


class _CaptureEmbeddings(Hook):
    """Records the input embeddings the model computes (nothing else runs past them that matters)."""

    def embeddings(self, model, h, attention_mask):
        model.sow("intermediates", "input_embeddings", h)
        return h, attention_mask


def token_embeddings(model_cfg, base, ids) -> np.ndarray:
    """The base model's own input embeddings of token ids [n] -> [n, hidden], read at the embeddings
    hook point, so no family's parameter name is needed."""
    from jaxft.models import family

    model = family.build(model_cfg, (_CaptureEmbeddings(),))
    _, state = model.apply({"params": base}, jnp.asarray(ids)[None], mutable=["intermediates"])
    return np.asarray(state["intermediates"]["input_embeddings"][0][0], np.float32)


def repeat_to(ids, n: int) -> list[int]:
    """PEFT's TEXT init: the first n ids, or the ids repeated until there are n."""
    ids = list(ids)
    if not ids:
        return []
    return (ids * math.ceil(n / len(ids)))[:n]


@dataclasses.dataclass(frozen=True)
class PromptHook(Hook):
    num_virtual_tokens: int = 20
    kind: str = "prompt_tuning"  # or "ptuning"
    encoder: str = "none"  # none (the embeddings themselves) | mlp | lstm
    encoder_hidden: int = 0  # 0: the model's hidden size
    encoder_layers: int = 2
    encoder_dropout: float = 0.0
    init: str = "random"  # random | vocab | text: where the embeddings start (encoder "none")
    init_ids: tuple[int, ...] = ()  # init "text": the text's token ids
    init_text: str = ""  # init "text": the text itself (recorded in the export)
    init_std: float = 1.0  # init "random": the normal's standard deviation (PEFT: nn.Embedding's 1.0)

    def module(self, cfg, dropout: float | None = None) -> PromptEncoder:
        return PromptEncoder(self.num_virtual_tokens, cfg.hidden_size, self.encoder, self.encoder_hidden,
                             self.encoder_layers, self.encoder_dropout if dropout is None else dropout,
                             self.init_std, name=MODULE[self.kind])

    def embeddings(self, model, h, attention_mask):
        p = self.module(model.cfg)().astype(h.dtype)  # [P, D]
        b, attention_mask = h.shape[0], jnp.asarray(attention_mask)
        h = jnp.concatenate([jnp.broadcast_to(p[None], (b,) + p.shape), h], axis=1)
        ones = jnp.ones((b, self.num_virtual_tokens), attention_mask.dtype)
        return h, jnp.concatenate([ones, attention_mask], axis=1)

    def start_ids(self, vocab_size: int) -> list[int] | None:
        if self.init == "vocab":  # PEFT's SAMPLE_VOCAB: ids drawn uniformly from the vocabulary
            return np.random.RandomState(0).randint(0, vocab_size, self.num_virtual_tokens).tolist()
        if self.init == "text":
            return repeat_to(self.init_ids, self.num_virtual_tokens)
        return None

    def initialize(self, model, params, sample):
        ids = self.start_ids(model.cfg.vocab_size)
        if ids is None:
            return params
        from jaxft.peft.partition import base_params

        emb = token_embeddings(model.cfg, base_params(params), ids)
        name = MODULE[self.kind]
        old = params[name]["embedding"]
        new = jax.make_array_from_callback(old.shape, old.sharding, lambda i: emb[i].astype(old.dtype))
        return {**params, name: {**params[name], "embedding": new}}

    def prompt_embeddings(self, cfg, params: dict) -> np.ndarray:
        """What PEFT stores: the encoder's output [tokens, hidden] (no dropout)."""
        return np.asarray(self.module(cfg, dropout=0.0).apply({"params": params}), np.float32)
