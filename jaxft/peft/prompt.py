"""Soft prompts: virtual tokens put in front of the input embeddings (the `embeddings` hook point).

Prompt tuning (Lester et al. 2021) learns the virtual tokens' embeddings themselves, started at
random, from sampled vocabulary embeddings, or from the embeddings of a text (PEFT's
PromptTuningInit RANDOM / SAMPLE_VOCAB / TEXT). P-Tuning (Liu et al. 2021, v1) produces them with a
prompt encoder, an MLP or a bidirectional LSTM + MLP over learned embeddings, laid out as PEFT's
`PromptEncoder` so its weights map one to one. Both put every virtual token in front of the input
(PEFT's placement). The model drops the virtual positions again from per-token outputs; a
classifier's "last" pooling reads the last real token, which with virtual tokens in front is what
PEFT's classifiers read on unpadded rows.

P-Tuning may instead place its virtual tokens anywhere in a template (`method.template`, e.g.
"[P][P] {text} [P] It was", as in the paper's "[P] Capital of [X] is [P]"): the data rendered
through it carries the id `PLACEHOLDER` at each `[P]`, and the k-th placeholder of each row takes
the prompt encoder's k-th output, as the original P-Tuning code replaces its pseudo tokens. Nothing
is added in front then: the input keeps its length, and generation feeds placeholders in the prompt.

HF PEFT stores both as `prompt_embeddings` [tokens, hidden], the encoder's output (the encoder does
not ship), so an adapter loaded from PEFT has plain embeddings whatever trained it.
"""

from __future__ import annotations

import dataclasses
import math
import re

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
PLACEHOLDER = -1  # the input id of a template's [P] slot (never a real token)
MARK, TEXT = "[P]", "{text}"


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

    def embeddings(self, model, h, attention_mask, input_ids=None):
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
    template: str = ""  # P-Tuning: where the virtual tokens go ("[P][P] {text} [P] It was"); "": in front

    @property
    def virtual_tokens(self) -> int:  # in front of the input ("" template), else none: they are placed
        return 0 if self.template else self.num_virtual_tokens

    def module(self, cfg, dropout: float | None = None) -> PromptEncoder:
        return PromptEncoder(self.num_virtual_tokens, cfg.hidden_size, self.encoder, self.encoder_hidden,
                             self.encoder_layers, self.encoder_dropout if dropout is None else dropout,
                             self.init_std, name=MODULE[self.kind])

    def embeddings(self, model, h, attention_mask, input_ids=None):
        p = self.module(model.cfg)().astype(h.dtype)  # [P, D]
        b, attention_mask = h.shape[0], jnp.asarray(attention_mask)
        if self.template:  # the k-th placeholder of each row takes the k-th virtual token
            if input_ids is None:
                raise ValueError("a P-Tuning template needs the model to pass input_ids to the embeddings hook")
            slot = input_ids == PLACEHOLDER
            k = jnp.clip(jnp.cumsum(slot, axis=1) - 1, 0, self.num_virtual_tokens - 1)
            return jnp.where(slot[..., None], p[k], h), attention_mask
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


def parse_template(template: str, num_virtual_tokens: int) -> tuple[list, list]:
    """"[P][P] {text} [P] It was" -> the pieces before and after {text}: literal strings and MARK,
    checked: one {text}, and as many [P] as virtual tokens."""
    from jaxft.errors import JaxftError

    if template.count(TEXT) != 1:
        raise JaxftError(f"method.template={template!r}: expected {TEXT} exactly once (where the example's text goes)")
    marks = template.count(MARK)
    if marks != num_virtual_tokens:
        raise JaxftError(f"method.template={template!r}: {marks} {MARK} marks, expected method.num_virtual_tokens="
                         f"{num_virtual_tokens}")
    split = lambda part: [x for x in re.split(r"(\[P\])", part) if x.strip()]  # noqa: E731 (spaces between marks go)
    before, after = template.split(TEXT)
    return split(before), split(after)


def render(template: str, num_virtual_tokens: int, tok) -> tuple[list[int], list[int]]:
    """A template -> the ids that go before and after an example's text ids, BOS and EOS included:
    PLACEHOLDER at each [P], the tokenizer's ids of the literal text. [P] marks at the very start go
    before BOS, where PEFT's virtual tokens sit, so "[P][P] {text}" is PEFT's layout."""
    before, after = parse_template(template, num_virtual_tokens)
    ids = lambda parts: [i for x in parts for i in ([PLACEHOLDER] if x == MARK else tok.encode(x))]  # noqa: E731
    lead = 0
    while lead < len(before) and before[lead] == MARK:
        lead += 1
    return [PLACEHOLDER] * lead + list(tok.bos) + ids(before[lead:]), ids(after) + list(tok.eos)
