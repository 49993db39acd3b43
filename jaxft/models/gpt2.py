"""The GPT-2 family as one functional Flax decoder: learned positions, fused `c_attn`, LayerNorm.

Module names follow Hugging Face (`attn.c_attn`, `attn.c_proj`, `mlp.c_fc`, `mlp.c_proj`, `ln_1`,
`ln_2`, `ln_f`), so checkpoint and PEFT keys map one to one; HF's Conv1D already stores its weight
as [in, out], our `Linear` layout. `c_attn` stays one fused projection of width 3 x hidden, as PEFT's
default LoRA target names it, its outputs stored per head (that head's query, key, value: `hf_rows`)
so that a tensor-parallel shard holds its heads' three; HF's order (every query, then the keys, then
the values) is restored at the HF and PEFT boundary.

Positions: without `position_ids` a token's position is its count of real tokens before it (after
any P-Tuning v2 prefix, as after PEFT's prefix cache), so left padding does not shift the learned
position embeddings, as in transformers' `generate`. transformers' own forward uses 0..T-1 unless
given positions: the same for right padding; pass `position_ids` to reproduce it for left padding.

Generation: `init_cache` and `model.apply(..., cache=, cache_index=)` follow the KV-cache
convention of `jaxft.models.family` (keys and values of every layer, preallocated to the final
length; a P-Tuning v2 prefix is prepended to the cached keys at every step, always visible).
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from jaxft.errors import JaxftError
from jaxft.models.attention import attention
from jaxft.models.family import Blocks, Family, Settings, hf_order, params_from_keys, qkv_order, unstack_layers
from jaxft.models.layers import (
    LayerNorm, Linear, block_output, param_with_axes, pool, recomputed, remat, segment_positions,
)
from jaxft.sharding import constrain

HEADS = ("causal_lm", "classification", "token_classification")

_tanh_gelu = lambda x: jax.nn.gelu(x, approximate=True)  # noqa: E731
# config.json's activation_function -> the function transformers' ACT2FN gives it.
ACTIVATIONS = {
    "gelu_new": _tanh_gelu,
    "gelu_pytorch_tanh": _tanh_gelu,
    "gelu_fast": _tanh_gelu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "tanh": jnp.tanh,
}


@dataclasses.dataclass(frozen=True)
class GPT2Config(Settings):
    vocab_size: int = 50257
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_layers: int = 12
    num_heads: int = 12
    max_position_embeddings: int = 1024
    layer_norm_epsilon: float = 1e-5
    activation_function: str = "gelu_new"
    scale_attn_weights: bool = True  # scores / sqrt(head_dim); False: unscaled
    scale_attn_by_inverse_layer_idx: bool = False  # scores / (layer index + 1) as well
    reorder_and_upcast_attn: bool = False  # fp32 scores: what jaxft's attention always computes
    tie_word_embeddings: bool = True
    model_type: str = "gpt2"
    bos_token_id: int | None = 50256
    eos_token_id: int | None = 50256
    pad_token_id: int | None = None

    @property
    def num_kv_heads(self) -> int:
        return self.num_heads

    @property
    def dim_per_head(self) -> int:
        return self.hidden_size // self.num_heads


def cached_attention(q, k, v, mask, cache_index, num_prefix: int, dtype):
    """Attention of t new queries over a KV cache of S slots (dense, fp32 scores): query i sees slot j
    iff j <= cache_index + i and mask[j]; the first `num_prefix` key columns (a prefix) always.
    q [B, t, H, D]; k, v [B, P+S, H, D]; mask [B, S] -> [B, t, H*D]."""
    b, t, h, d = q.shape
    s = mask.shape[1]
    allowed = (jnp.arange(s)[None, :] <= cache_index + jnp.arange(t)[:, None])[None] & mask[:, None, :].astype(bool)
    if num_prefix:
        allowed = jnp.concatenate([jnp.ones((b, t, num_prefix), bool), allowed], axis=-1)
    q, k, v = (x.astype(dtype) for x in (q, k, v))
    scores = jnp.einsum("bthd,bshd->bhts", q, k, preferred_element_type=jnp.float32) / math.sqrt(d)
    scores = jnp.where(allowed[:, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bhts,bshd->bthd", probs, v, preferred_element_type=jnp.float32)
    return out.astype(dtype).reshape(b, t, h * d)


class Attention(nn.Module):
    cfg: GPT2Config
    hooks: Sequence[Any] = ()

    @nn.compact
    def __call__(self, x, mask, prefix, layer_index, cache, cache_index, segment_ids=None):
        """mask: [B, T] padding mask, or [B, S] over the cache's slots when `cache` (keys, values
        [B, S, H, D]) is given; returns (output, updated cache or None). `segment_ids`: packed rows."""
        cfg, dt = self.cfg, self.cfg.compute_dtype
        h, d = cfg.num_heads, cfg.dim_per_head
        b, t, _ = x.shape
        qkv = Linear(3 * cfg.hidden_size, ("embed", "heads"), True, dt, self.hooks, name="c_attn")(x)
        qkv = qkv.reshape(b, t, h, 3, d)  # per head: query, key, value (`hf_rows`)
        q, k, v = qkv[..., 0, :], qkv[..., 1, :], qkv[..., 2, :]
        # attention() divides the scores by sqrt(d); other scalings go into the queries.
        factor = 1.0 if cfg.scale_attn_weights else math.sqrt(d)
        if cfg.scale_attn_by_inverse_layer_idx:
            factor = factor / (layer_index + 1).astype(jnp.float32)
        if cfg.scale_attn_by_inverse_layer_idx or not cfg.scale_attn_weights:
            q = (q.astype(jnp.float32) * factor).astype(q.dtype)
        self.sow("intermediates", "keys_values", (k, v))  # stored only when asked for (e.g. prefix init)
        if cache is not None:
            k = jax.lax.dynamic_update_slice_in_dim(cache[0], k.astype(cache[0].dtype), cache_index, axis=1)
            v = jax.lax.dynamic_update_slice_in_dim(cache[1], v.astype(cache[1].dtype), cache_index, axis=1)
            cache = (k, v)
        num_prefix = 0
        if prefix is not None:
            num_prefix = prefix[0].shape[1]
            k = jnp.concatenate([prefix[0].astype(k.dtype), k], axis=1)
            v = jnp.concatenate([prefix[1].astype(v.dtype), v], axis=1)
        q = constrain(q, ("batch", "length", "act_heads", None))
        k, v = (constrain(a, ("batch", "length", "act_kv_heads", None)) for a in (k, v))
        if cache is None:
            out = attention(q, k, v, mask, num_prefix, None, dt, cfg.attention, segment_ids)
        else:
            out = cached_attention(q, k, v, mask, cache_index, num_prefix, dt)
        out = constrain(out, ("batch", "length", "act_heads"))
        return Linear(cfg.hidden_size, ("heads", "embed"), True, dt, self.hooks, name="c_proj")(out), cache


class MLP(nn.Module):
    cfg: GPT2Config
    hooks: Sequence[Any] = ()

    @nn.compact
    def __call__(self, x):
        cfg, dt = self.cfg, self.cfg.compute_dtype
        hidden = Linear(cfg.intermediate_size, ("embed", "mlp"), True, dt, self.hooks, name="c_fc")(x)
        hidden = constrain(recomputed(ACTIVATIONS[cfg.activation_function])(hidden), ("batch", "length", "act_mlp"))
        return Linear(cfg.hidden_size, ("mlp", "embed"), True, dt, self.hooks, name="c_proj")(hidden)


class Block(nn.Module):
    cfg: GPT2Config
    hooks: Sequence[Any] = ()

    @nn.compact
    def __call__(self, h, mask, prefix, layer_index, cache, cache_index, segment_ids=None):
        cfg, dt = self.cfg, self.cfg.compute_dtype
        x = LayerNorm(cfg.layer_norm_epsilon, dt, name="ln_1")(h)
        a, cache = Attention(cfg, self.hooks, name="attn")(x, mask, prefix, layer_index, cache, cache_index,
                                                           segment_ids)
        h = h + block_output(self, a, "attention")
        x = LayerNorm(cfg.layer_norm_epsilon, dt, name="ln_2")(h)
        h = h + block_output(self, MLP(cfg, self.hooks, name="mlp")(x), "mlp")
        h = nn.with_logical_constraint(h, ("batch", "length", "act_embed"))
        return h, cache


class GPT2Model(nn.Module):
    """`apply({"params": p}, input_ids, attention_mask)` -> logits [B, T, V], [B, num_labels] or
    [B, T, num_labels]; with `cache=` (see `init_cache`) and `cache_index=`: (logits, cache)."""

    cfg: GPT2Config
    hooks: Sequence[Any] = ()

    @nn.compact
    def __call__(self, input_ids, attention_mask=None, position_ids=None, return_hidden: bool = False,
                 cache=None, cache_index=None, segment_ids=None, label_positions=None):
        """`return_hidden` (causal LM): (final hidden states [B, T, D], output embedding [V, D]) instead of
        logits, for a loss that fuses the vocabulary projection; logits where a hook acts on the head.
        `label_positions` [B, K] (causal LM): the outputs at those positions only (a cloze answer's).
        `segment_ids` [B, T] (packed rows): attention stays within each example, positions restart."""
        cfg, dt = self.cfg, self.cfg.compute_dtype
        if attention_mask is None:
            attention_mask = jnp.ones_like(input_ids)
        wte = param_with_axes(self, "wte", nn.initializers.normal(0.02), (cfg.vocab_size, cfg.hidden_size),
                              ("vocab", "embed"))
        wpe = param_with_axes(self, "wpe", nn.initializers.normal(0.01),
                              (cfg.max_position_embeddings, cfg.hidden_size), (None, "embed"))
        h = jnp.take(constrain(wte, ("vocab", None)), input_ids, axis=0).astype(dt)
        h = nn.with_logical_constraint(h, ("batch", "length", "act_embed"))
        length = input_ids.shape[1]
        for hook in self.hooks:  # prompt tuning puts virtual tokens in front (positions added after, as PEFT)
            h, attention_mask = hook.embeddings(self, h, attention_mask, input_ids)
        added = h.shape[1] - length
        if segment_ids is not None and (added or cache is not None):
            raise JaxftError("packed rows (segment ids) with virtual tokens or a KV cache: set data.packing=False")

        prefixes = [p for p in (hook.prefix(self, input_ids.shape[0]) for hook in self.hooks) if p is not None]
        prefix = None
        if prefixes:  # each: (keys, values) of shape [layers, B, P, H, D]
            prefix = tuple(jnp.concatenate([p[i] for p in prefixes], axis=2) for i in (0, 1))
        num_prefix = prefix[0].shape[2] if prefix is not None else 0
        span = num_prefix + attention_mask.shape[1]
        if span > cfg.max_position_embeddings:
            raise JaxftError(f"{span} positions ({num_prefix} prefix + {attention_mask.shape[1]} tokens) exceed "
                             f"the model's n_positions={cfg.max_position_embeddings}")
        counted = jnp.maximum(jnp.cumsum(attention_mask, axis=-1) - 1, 0) + num_prefix
        if cache is not None:
            if added:
                raise JaxftError("virtual tokens in front of the input (prompt tuning) do not work with a KV cache")
            if position_ids is None:
                position_ids = jax.lax.dynamic_slice_in_dim(counted, cache_index, length, axis=1)
        elif position_ids is None and segment_ids is not None:
            position_ids = segment_positions(segment_ids) + num_prefix
        elif position_ids is None:
            position_ids = counted
        elif added:  # given positions are the real tokens'; virtual tokens come first
            virtual = jnp.broadcast_to(jnp.arange(added) + num_prefix, (h.shape[0], added))
            position_ids = jnp.concatenate([virtual, position_ids + added], axis=1)
        h = h + jnp.take(wpe, position_ids, axis=0).astype(dt)

        layer = remat(Block, cfg)
        layer_index = jnp.arange(cfg.num_layers)
        kv = None if cache is None else (cache["keys"], cache["values"])
        if cfg.scan_layers:
            stack = nn.scan(
                layer,
                variable_axes={"params": 0, "intermediates": 0},
                split_rngs={"params": True, "dropout": True},
                in_axes=(nn.broadcast, 0, 0, 0, nn.broadcast, nn.broadcast),
                length=cfg.num_layers,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )
            h, kv = stack(cfg, self.hooks, name="layers")(h, attention_mask, prefix, layer_index, kv, cache_index,
                                                           segment_ids)
        else:
            per_layer = []
            for i in range(cfg.num_layers):
                p = None if prefix is None else (prefix[0][i], prefix[1][i])
                c = None if kv is None else (kv[0][i], kv[1][i])
                h, c = layer(cfg, self.hooks, name=f"layers_{i}")(h, attention_mask, p, layer_index[i], c, cache_index,
                                                                  segment_ids)
                per_layer.append(c)
            if kv is not None:
                kv = tuple(jnp.stack([c[j] for c in per_layer]) for j in (0, 1))
        h = LayerNorm(cfg.layer_norm_epsilon, dt, name="ln_f")(h)
        out = self._head(h, wte, input_ids, attention_mask, length, return_hidden, label_positions)
        return out if cache is None else (out, {"keys": kv[0], "values": kv[1]})

    def _head(self, h, wte, input_ids, attention_mask, length, return_hidden, label_positions=None):
        cfg, dt = self.cfg, self.cfg.compute_dtype
        head = lambda n, bias: Linear(cfg.num_labels, ("embed", None), bias, dt, self.hooks,  # noqa: E731
                                      preferred_element_type=jnp.float32, name=n)
        if cfg.head == "classification":
            keep = attention_mask
            if cfg.pooling == "last" and cfg.pad_token_id is not None:
                # As transformers: the last token that is not the pad token (GPT-2 pads with its EOS,
                # which ends every example: the head reads the last word).
                real = (input_ids != cfg.pad_token_id).astype(keep.dtype)
                keep = keep * jnp.pad(real, ((0, 0), (keep.shape[1] - length, 0)), constant_values=1)
            return head("score", False)(pool(h, keep, cfg.pooling)).astype(jnp.float32)
        h = h[:, h.shape[1] - length:]  # per-token outputs: not for virtual tokens
        if cfg.head == "token_classification":
            return head("classifier", True)(h).astype(jnp.float32)
        if label_positions is not None:
            h = jnp.take_along_axis(h, label_positions[..., None], axis=1)
        if cfg.tie_word_embeddings:
            return (h, wte) if return_hidden else jnp.dot(h, wte.astype(dt).T, preferred_element_type=jnp.float32)
        lm_head = Linear(cfg.vocab_size, ("embed", "vocab"), False, dt, self.hooks, preferred_element_type=jnp.float32,
                         name="lm_head")
        if return_hidden and not any(hook.acts_on("lm_head") for hook in self.hooks):
            return h, lm_head(h, kernel_only=True).T
        return lm_head(h).astype(jnp.float32)


def init_cache(cfg: GPT2Config, batch: int, max_length: int, dtype=jnp.float32) -> dict:
    """Zero keys and values of every layer, [layers, batch, max_length, heads, head_dim] each."""
    shape = (cfg.num_layers, batch, max_length, cfg.num_heads, cfg.dim_per_head)
    return {"keys": jnp.zeros(shape, dtype), "values": jnp.zeros(shape, dtype)}


# ---------------------------------------------------------------------------------------------
# Hugging Face: config.json and weight names, both ways.

ARCHITECTURES = {"causal_lm": "GPT2LMHeadModel", "classification": "GPT2ForSequenceClassification",
                 "token_classification": "GPT2ForTokenClassification"}


def config_from_hf(c: dict, file: str) -> GPT2Config:
    """A HF GPT-2 config dict (as in config.json) -> GPT2Config (hf.py adds head and labels)."""
    get = lambda *names, default=None: next((c[n] for n in names if c.get(n) is not None), default)  # noqa: E731
    hidden, layers = get("n_embd", "hidden_size"), get("n_layer", "num_hidden_layers")
    heads = get("n_head", "num_attention_heads")
    missing = [n for n, v in (("vocab_size", c.get("vocab_size")), ("n_embd", hidden), ("n_layer", layers),
                              ("n_head", heads)) if v is None]
    if missing:
        raise JaxftError(f"{file}: missing {', '.join(missing)}")
    if hidden % heads:
        raise JaxftError(f"{file}: n_embd={hidden} is not a multiple of n_head={heads}")
    act = c.get("activation_function", "gelu_new")
    if act not in ACTIVATIONS:
        raise JaxftError(f"{file}: activation_function={act!r} is not supported (expected one of "
                         f"{', '.join(ACTIVATIONS)})")
    if c.get("add_cross_attention"):
        raise JaxftError(f"{file}: add_cross_attention=true (GPT-2 as a decoder with cross-attention) is not supported")
    eos = c.get("eos_token_id", 50256)
    return GPT2Config(
        vocab_size=c["vocab_size"],
        hidden_size=hidden,
        intermediate_size=get("n_inner", "intermediate_size", default=4 * hidden),
        num_layers=layers,
        num_heads=heads,
        max_position_embeddings=get("n_positions", "max_position_embeddings", default=1024),
        layer_norm_epsilon=c.get("layer_norm_epsilon", 1e-5),
        activation_function=act,
        scale_attn_weights=bool(c.get("scale_attn_weights", True)),
        scale_attn_by_inverse_layer_idx=bool(c.get("scale_attn_by_inverse_layer_idx", False)),
        reorder_and_upcast_attn=bool(c.get("reorder_and_upcast_attn", False)),
        tie_word_embeddings=bool(c.get("tie_word_embeddings", True)),
        bos_token_id=c.get("bos_token_id", 50256),
        eos_token_id=eos[0] if isinstance(eos, list) else eos,
        pad_token_id=c.get("pad_token_id"),
    )


def config_to_hf(cfg: GPT2Config) -> dict:
    return {
        "model_type": "gpt2",
        "vocab_size": cfg.vocab_size,
        "n_embd": cfg.hidden_size,
        "n_inner": cfg.intermediate_size,
        "n_layer": cfg.num_layers,
        "n_head": cfg.num_heads,
        "n_positions": cfg.max_position_embeddings,
        "layer_norm_epsilon": cfg.layer_norm_epsilon,
        "activation_function": cfg.activation_function,
        "scale_attn_weights": cfg.scale_attn_weights,
        "scale_attn_by_inverse_layer_idx": cfg.scale_attn_by_inverse_layer_idx,
        "reorder_and_upcast_attn": cfg.reorder_and_upcast_attn,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": cfg.eos_token_id,
        "pad_token_id": cfg.pad_token_id,
    }


def architecture(cfg: GPT2Config) -> str:
    return ARCHITECTURES[cfg.head]


HEAD_MODULES = ("lm_head", "score", "classifier")
LAYER_MODULES = ("ln_1", "ln_2", "attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
# Checkpoints of GPT2Model alone have no `transformer.` prefix; the attention mask buffers (`attn.bias`,
# `attn.masked_bias`) of old checkpoints are not weights and are skipped.
_LAYER = re.compile(r"(?:transformer\.)?h\.(\d+)\.(" + "|".join(map(re.escape, LAYER_MODULES)) + r")\.(weight|bias)")
_TOP = re.compile(r"(?:transformer\.)?(wte|wpe|ln_f)\.(weight|bias)")


def _from_hf_key(key: str):
    """HF key -> (our path, layer index or None, transpose?). None for keys we do not use."""
    m = _TOP.fullmatch(key)
    if m:
        return ((m[1],) if m[1] in ("wte", "wpe") else (m[1], m[2])), None, False
    head, _, leaf = key.partition(".")
    if head in HEAD_MODULES and leaf in ("weight", "bias"):
        return (head, "kernel" if leaf == "weight" else "bias"), None, leaf == "weight"  # nn.Linear: [out, in]
    m = _LAYER.fullmatch(key)
    if not m:
        return None
    mods = tuple(m[2].split("."))
    is_linear = not mods[-1].startswith("ln_")
    return mods + ("kernel" if is_linear and m[3] == "weight" else m[3],), int(m[1]), False  # Conv1D: [in, out]


def hf_rows(cfg: GPT2Config, name: str) -> np.ndarray | None:
    """HF module `name`'s output units as we store them (`Family.hf_rows`): c_attn's per head."""
    if _C_ATTN.fullmatch(name):
        return qkv_order(cfg.num_heads, cfg.num_heads, cfg.dim_per_head)
    return None


_C_ATTN = re.compile(r"(transformer\.)?h\.\d+\.attn\.c_attn")


def params_from_hf(tensors: dict[str, np.ndarray], cfg: GPT2Config, where: str = "checkpoint") -> dict:
    # Conv1D's weight is [in, out]: its outputs are the last axis (the bias's only one).
    tensors = {k: hf_order(cfg, k.rsplit(".", 1)[0], v, to_hf=False, axis=-1) for k, v in tensors.items()}
    flat = params_from_keys(tensors, cfg, where, _from_hf_key)
    if cfg.tie_word_embeddings:
        flat.pop(("lm_head", "kernel"), None)
    return traverse_util.unflatten_dict(flat)


def params_to_hf(params: dict, cfg: GPT2Config) -> dict[str, np.ndarray]:
    out = {}
    for path, value in traverse_util.flatten_dict(params).items():
        value = np.asarray(value, dtype=np.float32)
        per_layer = unstack_layers(path, value)
        if path[0] in ("wte", "wpe"):
            out[f"transformer.{path[0]}.weight"] = value
        elif path[0] == "ln_f":
            out[f"transformer.ln_f.{path[1]}"] = value
        elif path[0] in HEAD_MODULES:
            out[f"{path[0]}.{'weight' if path[1] == 'kernel' else 'bias'}"] = value.T if path[1] == "kernel" else value
        elif per_layer is not None:
            for i, (*mods, leaf), v in per_layer:
                out[f"transformer.h.{i}.{'.'.join(mods)}.{'bias' if leaf == 'bias' else 'weight'}"] = v
        else:
            raise ValueError(f"no Hugging Face name for parameter {'/'.join(path)}")
    return {k: np.ascontiguousarray(hf_order(cfg, k.rsplit(".", 1)[0], v, axis=-1)) for k, v in out.items()}


def hf_module(path: str, cfg=None) -> str:
    """'layers.3.attn.c_attn' -> 'transformer.h.3.attn.c_attn'; the heads keep their names."""
    head, _, rest = path.partition(".")
    if head in HEAD_MODULES:
        return path
    return "transformer." + ("h." + rest if head == "layers" else path)


def our_module(name: str) -> str | None:
    """HF's module name (with or without GPT2Model's `transformer.` prefix) -> ours; None if not ours."""
    if name.split(".")[0] in HEAD_MODULES:
        return name
    name = name[len("transformer."):] if name.startswith("transformer.") else name
    if name.startswith("h."):
        return "layers." + name[2:]
    return name if name.split(".")[0] in ("wte", "wpe", "ln_f") else None


def matmul_weights(cfg: GPT2Config) -> int:
    """Weights in a matmul for every token: c_attn, c_proj, c_fc, mlp.c_proj per layer, plus the output
    head (the tied vocabulary projection, or a classifier's). wte and wpe are lookups: 0 FLOPs."""
    d = cfg.hidden_size
    per_layer = 3 * d * d + d * d + 2 * d * cfg.intermediate_size
    return cfg.num_layers * per_layer + head_weights(cfg)


def head_weights(cfg: GPT2Config) -> int:
    """The output head's matmul weights: the tied vocabulary projection, or a classifier's."""
    return cfg.hidden_size * (cfg.vocab_size if cfg.head == "causal_lm" else cfg.num_labels)


def activation_blocks(cfg: GPT2Config) -> tuple[Blocks, ...]:
    """What `jaxft.plan` counts: pre-LayerNorm blocks, one fused q/k/v projection, a GELU MLP (measured
    against XLA's memory analysis: tests/test_plan.py)."""
    d, f = cfg.hidden_size, cfg.intermediate_size
    return (Blocks("layers", cfg.num_layers, d, cfg.num_heads, cfg.num_heads, cfg.dim_per_head, f, mlp_tensors=MLP_TENSORS, recompute=1.0,
                   projections=(("c_attn", "attn_in", d, 3 * d), ("attn/c_proj", "attn_out", d, d),
                                ("c_fc", "mlp_in", d, f), ("mlp/c_proj", "mlp_act", f, d))),)


MLP_TENSORS = 1  # F-wide tensors a GELU MLP keeps for the backward: its input (the activation is recomputed)


FAMILY = Family(
    name="gpt2",
    model=GPT2Model,
    heads=HEADS,
    config_from_hf=config_from_hf,
    config_to_hf=config_to_hf,
    architecture=architecture,
    params_from_hf=params_from_hf,
    params_to_hf=params_to_hf,
    hf_module=hf_module,
    our_module=our_module,
    hf_rows=hf_rows,
    lora_targets="c_attn",
    ia3_targets="c_attn,mlp.c_proj",  # PEFT's IA3 defaults for gpt2
    ia3_feedforward="mlp.c_proj",
    head_params=r"^(score|classifier|lm_head)/",
    classifier_params=r"^(score|classifier)/",
    kv_layout=lambda cfg: (cfg.num_layers, cfg.num_heads, cfg.dim_per_head),
    matmul_weights=matmul_weights,
    head_weights=head_weights,
    activation_blocks=activation_blocks,
    init_cache=init_cache,
    tied_embedding=("wte", ("lm_head.weight",)),
    fan_in_fan_out=True,
    projections=r"^layers(_\d+)?/(attn/(c_attn|c_proj)|mlp/(c_fc|c_proj))/kernel$",
)
