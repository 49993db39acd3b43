"""The Llama family as one functional Flax decoder: Llama 2/3, Qwen2, Qwen3, Mistral, GLM-4 (`glm`:
glm-4-9b-chat-hf; `glm4`: GLM-4-0414, GLM-Z1), Phi-3 (`phi3`: Phi-3, Phi-3.5 and Phi-4-mini).

Differences between the variants are data in `LlamaConfig` (q/k/v bias, explicit head_dim, rope
scaling, tied embeddings, sliding window, Qwen3's per-head RMSNorm of queries and keys; GLM's rotary on
half of each head over adjacent pairs, its fused gate/up projection, GLM-4-0414's norms on the
attention and MLP outputs; Phi-3's fused q/k/v and gate/up projections), not subclasses. Module names
follow Hugging Face (`self_attn.q_proj`, `mlp.gate_proj`, GLM's and Phi-3's `mlp.gate_up_proj`, Phi-3's
`self_attn.qkv_proj`, ...) so checkpoint and PEFT keys map one to one.

Methods hook in at named points: every `Linear` (see `layers.py`), the embeddings, each block's
attention and MLP outputs, and `prefix`, which returns per-layer key/value prefixes (P-Tuning v2)
that attention prepends to its keys and values. The end of the file maps config.json and the
weights to and from Hugging Face, and declares the family (`FAMILY`, see `jaxft.models.family`).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from jaxft.errors import JaxftError
from jaxft.models.attention import attention, cached
from jaxft.models.family import (  # noqa: F401 (REMAT, POOLING: re-exported)
    POOLING, REMAT, Blocks, Family, Settings, params_from_keys, unstack_layers,
)
from jaxft.models.layers import (  # noqa: F401 (last_token: re-exported)
    ROPE_TYPES, Linear, RMSNorm, block_output, gated, last_token, param_with_axes, pool, remat, rope,
    segment_positions,
)
from jaxft.sharding import constrain

HEADS = ("causal_lm", "classification")


@dataclasses.dataclass(frozen=True)
class LlamaConfig(Settings):
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_layers: int = 32
    num_heads: int = 32
    num_kv_heads: int = 32
    head_dim: int = 0  # 0: hidden_size // num_heads
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: tuple | None = None  # sorted (key, value) pairs of HF's rope parameters
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    sliding_window: int | None = None
    qk_norm: bool = False  # Qwen3: RMSNorm over each head's queries and keys, before rotary
    rotary_dim: int = 0  # GLM: rotary on the first rotary_dim features of each head (partial_rotary_factor); 0: all
    rope_interleaved: bool = False  # GLM: rotary over adjacent pairs (2i, 2i + 1), not the two halves
    fused_gate_up: bool = False  # GLM, Phi-3: one gate_up_proj [D, 2F] (gate, then up) for gate_proj and up_proj
    fused_qkv: bool = False  # Phi-3: one qkv_proj [D, (H + 2 KV) d] (queries, keys, values) for q/k/v_proj
    sandwich_norms: bool = False  # GLM-4-0414: RMSNorm on the attention and MLP outputs before each residual
    model_type: str = "llama"
    bos_token_id: int | None = 1
    eos_token_id: int | None = 2
    pad_token_id: int | None = None
    @property
    def dim_per_head(self) -> int:
        return self.head_dim or self.hidden_size // self.num_heads


class Attention(nn.Module):
    cfg: LlamaConfig
    hooks: Sequence[Any] = ()

    @nn.compact
    def __call__(self, x, mask, positions, prefix, segment_ids=None, cache=None, cache_index=None, layer=None):
        """mask: the [B, T] padding mask; each implementation builds causality, window and prefix from it
        (and from `segment_ids`, packed rows, where given). With a `cache` (generation, see `init_cache`):
        mask covers its S slots, the new keys and values are written at `cache_index`, and this returns
        (output, cache)."""
        cfg, dt = self.cfg, self.cfg.compute_dtype
        h, kv, d = cfg.num_heads, cfg.num_kv_heads, cfg.dim_per_head
        b, t, _ = x.shape
        proj = lambda n, f, ax, bias: Linear(f, ax, bias, dt, self.hooks, name=n)  # noqa: E731
        if cfg.fused_qkv:
            qkv = proj("qkv_proj", (h + 2 * kv) * d, ("embed", "heads"), cfg.qkv_bias)(x)
            q, k, v = jnp.split(qkv, [h * d, (h + kv) * d], axis=-1)
            q, k, v = q.reshape(b, t, h, d), k.reshape(b, t, kv, d), v.reshape(b, t, kv, d)
        else:
            q = proj("q_proj", h * d, ("embed", "heads"), cfg.qkv_bias)(x).reshape(b, t, h, d)
            k = proj("k_proj", kv * d, ("embed", "kv_heads"), cfg.qkv_bias)(x).reshape(b, t, kv, d)
            v = proj("v_proj", kv * d, ("embed", "kv_heads"), cfg.qkv_bias)(x).reshape(b, t, kv, d)
        if cfg.qk_norm:  # one weight of head_dim, shared by every head
            q = RMSNorm(cfg.rms_norm_eps, dt, name="q_norm")(q)
            k = RMSNorm(cfg.rms_norm_eps, dt, name="k_norm")(k)
        q, k = rope(q, k, positions, cfg.rotary_dim or d, cfg.rope_theta, cfg.rope_scaling, cfg.max_position_embeddings,
                    cfg.rope_interleaved)
        self.sow("intermediates", "keys_values", (k, v))  # stored only when asked for (e.g. prefix init)
        num_prefix = 0
        o_proj = proj("o_proj", cfg.hidden_size, ("heads", "embed"), cfg.o_bias)
        if cache is not None:
            cache, keys, values = write_cache(cache, k, v, cache_index, layer)
            p = None if prefix is None else (prefix[0].astype(keys.dtype), prefix[1].astype(keys.dtype))
            out = cached(q, keys, values, mask, cache_index, p, cfg.sliding_window)
            return o_proj(out.astype(dt)), cache
        if prefix is not None:  # learned keys/values, no rotary: they are not at a position
            num_prefix = prefix[0].shape[1]
            k = jnp.concatenate([prefix[0].astype(dt), k], axis=1)
            v = jnp.concatenate([prefix[1].astype(dt), v], axis=1)
        q = constrain(q, ("batch", "length", "act_heads", None))  # heads stay split (tensor parallel)
        k, v = (constrain(a, ("batch", "length", "act_kv_heads", None)) for a in (k, v))
        out = attention(q, k, v, mask, num_prefix, cfg.sliding_window, dt, cfg.attention, segment_ids)
        out = constrain(out, ("batch", "length", "act_heads"))
        return o_proj(out)


class MLP(nn.Module):
    cfg: LlamaConfig
    hooks: Sequence[Any] = ()

    @nn.compact
    def __call__(self, x):
        cfg, dt = self.cfg, self.cfg.compute_dtype
        proj = lambda n, f, ax: Linear(f, ax, cfg.mlp_bias, dt, self.hooks, name=n)  # noqa: E731
        if cfg.fused_gate_up:
            gate, up = jnp.split(proj("gate_up_proj", 2 * cfg.intermediate_size, ("embed", "mlp"))(x), 2, axis=-1)
        else:
            gate = proj("gate_proj", cfg.intermediate_size, ("embed", "mlp"))(x)
            up = proj("up_proj", cfg.intermediate_size, ("embed", "mlp"))(x)
        hidden = constrain(gated(nn.silu, gate, up), ("batch", "length", "act_mlp"))  # split like gate/up's outputs
        return proj("down_proj", cfg.hidden_size, ("mlp", "embed"))(hidden)


class DecoderLayer(nn.Module):
    cfg: LlamaConfig
    hooks: Sequence[Any] = ()

    @nn.compact
    def __call__(self, carry, mask, positions, prefix, segment_ids=None, cache_index=None):
        """carry: h, or in generation (h, cache, layer): the cache travels with the hidden states (through
        the scan, with the layer index that says where in the stacked cache this layer writes)."""
        cfg = self.cfg
        h, cache, layer = carry if isinstance(carry, tuple) else (carry, None, None)
        x = RMSNorm(cfg.rms_norm_eps, cfg.compute_dtype, name="input_layernorm")(h)
        a = Attention(cfg, self.hooks, name="self_attn")(x, mask, positions, prefix, segment_ids, cache, cache_index,
                                                         layer)
        if cache is not None:
            a, cache = a
        if cfg.sandwich_norms:
            a = RMSNorm(cfg.rms_norm_eps, cfg.compute_dtype, name="post_self_attn_layernorm")(a)
        h = h + block_output(self, a, "attention")
        x = RMSNorm(cfg.rms_norm_eps, cfg.compute_dtype, name="post_attention_layernorm")(h)
        m = MLP(cfg, self.hooks, name="mlp")(x)
        if cfg.sandwich_norms:
            m = RMSNorm(cfg.rms_norm_eps, cfg.compute_dtype, name="post_mlp_layernorm")(m)
        h = h + block_output(self, m, "mlp")
        h = nn.with_logical_constraint(h, ("batch", "length", "act_embed"))
        if cache is None:
            return h, None
        return (h, cache, None if layer is None else layer + 1), None


def init_cache(cfg: LlamaConfig, batch: int, max_length: int, dtype=None) -> dict:
    """Zero keys and values for `max_length` slots, laid out as the layers' params: one stack under
    `layers` when the model scans its layers, else one entry per `layers_{i}`."""
    shape = (batch, max_length, cfg.num_kv_heads, cfg.dim_per_head)
    dtype = jnp.dtype(dtype or cfg.compute_dtype)
    if cfg.scan_layers:
        shape = (cfg.num_layers,) + shape
        return {"layers": {"keys": jnp.zeros(shape, dtype), "values": jnp.zeros(shape, dtype)}}
    return {f"layers_{i}": {"keys": jnp.zeros(shape, dtype), "values": jnp.zeros(shape, dtype)}
            for i in range(cfg.num_layers)}


def write_cache(cache: dict, k, v, index, layer=None):
    """k, v [B, t, KV, D] written at slot `index` (of layer `layer` in a stacked cache) ->
    (cache, this layer's keys, values [B, S, KV, D])."""
    if layer is None:
        at = (0, index, 0, 0)
        keys = jax.lax.dynamic_update_slice(cache["keys"], k.astype(cache["keys"].dtype), at)
        values = jax.lax.dynamic_update_slice(cache["values"], v.astype(cache["values"].dtype), at)
        return {"keys": keys, "values": values}, keys, values
    at = (layer, 0, index, 0, 0)
    keys = jax.lax.dynamic_update_slice(cache["keys"], k[None].astype(cache["keys"].dtype), at)
    values = jax.lax.dynamic_update_slice(cache["values"], v[None].astype(cache["values"].dtype), at)
    pick = lambda x: jax.lax.dynamic_index_in_dim(x, layer, axis=0, keepdims=False)  # noqa: E731
    return {"keys": keys, "values": values}, pick(keys), pick(values)


class LlamaModel(nn.Module):
    """`apply({"params": p}, input_ids, attention_mask)` -> logits [B, T, V] or [B, num_labels]."""

    cfg: LlamaConfig
    hooks: Sequence[Any] = ()

    @nn.compact
    def __call__(self, input_ids, attention_mask=None, position_ids=None, return_hidden: bool = False,
                 segment_ids=None, cache=None, cache_index=None, label_positions=None):
        """`return_hidden` (causal LM): return (final hidden states [B, T, D], output embedding [V, D])
        instead of logits, for a loss that fuses the vocabulary projection (`jaxft.cross_entropy`).
        Logits come back as usual where a method hooks the LM head, and for classification.
        `label_positions` [B, K] (causal LM): the outputs at those positions only (a cloze question's
        answer is the next token after one position: the vocabulary projection runs there alone).
        `segment_ids` [B, T] (packed rows, 1, 2, ... per example): attention stays within each example
        and positions restart at 0 with each one (unless `position_ids` are given).

        `cache` (generation, from `init_cache`; causal LM only): the new tokens' keys and values go to
        slots [cache_index, cache_index + T), attention_mask [B, S] covers every slot, and this returns
        (logits, cache). Positions default to the count of real slots before each token, as without a
        cache. P-Tuning v2 prefixes are not cache slots: they join every step's attention in front."""
        cfg, dt = self.cfg, self.cfg.compute_dtype
        if cache is not None and cfg.head != "causal_lm":
            raise JaxftError(f"a KV cache is for generation with the causal_lm head, not {cfg.head!r}")
        if attention_mask is None:
            attention_mask = jnp.ones_like(input_ids) if cache is None else None
        if attention_mask is None:
            raise JaxftError("generation with a KV cache needs the attention_mask of all its slots")
        embed = param_with_axes(
            self, "embed_tokens", nn.initializers.normal(0.02), (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed")
        )
        # FSDP gathers the table like every other weight, rather than swapping looked-up rows all-to-all.
        h = jnp.take(constrain(embed, ("vocab", None)), input_ids, axis=0).astype(dt)
        h = nn.with_logical_constraint(h, ("batch", "length", "act_embed"))
        length = input_ids.shape[1]
        for hook in self.hooks:  # prompt tuning puts virtual tokens in front
            h, attention_mask = hook.embeddings(self, h, attention_mask, input_ids)
        if cache is not None and h.shape[1] != length:
            raise JaxftError("generation with a KV cache does not support methods that add virtual tokens")
        if segment_ids is not None and h.shape[1] != length:
            raise JaxftError("packed rows (segment ids) with a method that adds virtual tokens: set data.packing=False")

        prefixes = [p for p in (hook.prefix(self, input_ids.shape[0]) for hook in self.hooks) if p is not None]
        prefix = None
        if prefixes:  # each: (keys, values) of shape [layers, B, P, KV, D]
            prefix = tuple(jnp.concatenate([p[i] for p in prefixes], axis=2) for i in (0, 1))
        num_prefix = prefix[0].shape[2] if prefix is not None else 0
        mask = attention_mask  # [B, T]: attention derives causality, window and prefix from it, no dense mask
        if position_ids is None and segment_ids is not None:
            position_ids = segment_positions(segment_ids) + num_prefix
        if position_ids is None:  # real tokens count from 0 after the prefix, as they do after a KV cache
            position_ids = jnp.maximum(jnp.cumsum(attention_mask, axis=-1) - 1, 0) + num_prefix
            if cache is not None:
                position_ids = jax.lax.dynamic_slice_in_dim(position_ids, cache_index, length, axis=1)

        layer = remat(DecoderLayer, cfg)
        if cfg.scan_layers:
            stack = nn.scan(
                layer,
                variable_axes={"params": 0, "intermediates": 0},
                split_rngs={"params": True, "dropout": True},
                in_axes=(nn.broadcast, nn.broadcast, 0, nn.broadcast, nn.broadcast),
                length=cfg.num_layers,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )
            layers = stack(cfg, self.hooks, name="layers")
            if cache is None:
                h, _ = layers(h, mask, position_ids, prefix, segment_ids, None)
            else:  # the stacked cache is carried, each layer writing its own slice in place
                (h, new, _), _ = layers((h, cache["layers"], jnp.int32(0)), mask, position_ids, prefix, segment_ids,
                                        cache_index)
                cache = {"layers": new}
        else:
            new = {}
            for i in range(cfg.num_layers):
                p = None if prefix is None else (prefix[0][i], prefix[1][i])
                mod = layer(cfg, self.hooks, name=f"layers_{i}")
                if cache is None:
                    h, _ = mod(h, mask, position_ids, p, segment_ids)
                else:
                    (h, new[f"layers_{i}"], _), _ = mod((h, cache[f"layers_{i}"], None), mask, position_ids, p,
                                                        segment_ids, cache_index)
            cache = new if cache is not None else None
        h = RMSNorm(cfg.rms_norm_eps, dt, name="norm")(h)

        if cfg.head == "classification":
            pooled = pool(h, attention_mask, cfg.pooling)
            score = Linear(cfg.num_labels, ("embed", None), False, dt, self.hooks, preferred_element_type=jnp.float32,
                           name="score")
            return score(pooled).astype(jnp.float32)
        h = h[:, h.shape[1] - length:]  # per-token outputs: not for virtual tokens
        if label_positions is not None:
            h = jnp.take_along_axis(h, label_positions[..., None], axis=1)
        if cache is not None:  # generation: logits, and the cache to carry on with
            return self.output_logits(h, embed), cache
        return self.output_logits(h, embed, return_hidden)

    def output_logits(self, h, embed, return_hidden: bool = False):
        """Final states -> logits [B, T, V] (or, with `return_hidden`, the states and output embedding)."""
        cfg, dt = self.cfg, self.cfg.compute_dtype
        if cfg.tie_word_embeddings:
            return (h, embed) if return_hidden else jnp.dot(h, embed.astype(dt).T, preferred_element_type=jnp.float32)
        lm_head = Linear(cfg.vocab_size, ("embed", "vocab"), False, dt, self.hooks, preferred_element_type=jnp.float32,
                         name="lm_head")
        if return_hidden and not any(hook.acts_on("lm_head") for hook in self.hooks):
            return h, lm_head(h, kernel_only=True).T
        return lm_head(h).astype(jnp.float32)


# ---------------------------------------------------------------------------------------------
# Hugging Face: config.json and weight names, both ways.

ARCH = {"llama": "Llama", "qwen2": "Qwen2", "qwen3": "Qwen3", "mistral": "Mistral", "glm": "Glm", "glm4": "Glm4",
        "phi3": "Phi3"}
GLM = ("glm", "glm4")
PARTIAL_ROTARY = GLM + ("phi3",)  # the model types whose rotary may cover part of each head


def config_from_hf(c: dict, file: str) -> LlamaConfig:
    """A HF config dict (as in config.json) -> LlamaConfig (the architecture; hf.py adds head and labels)."""
    mtype = c.get("model_type")
    rope = dict(c.get("rope_parameters") or c.get("rope_scaling") or {})
    theta = rope.pop("rope_theta", c.get("rope_theta", 10000.0))
    # the rotated share of each head: GLM's 0.5 (in rope_parameters, or at the top level before transformers 5)
    partial = float(rope.pop("partial_rotary_factor", None) or c.get("partial_rotary_factor") or 1.0)
    if partial != 1.0 and mtype not in PARTIAL_ROTARY:
        raise JaxftError(f"{file}: partial_rotary_factor={partial} is not supported for {mtype} (expected 1.0)")
    rope = _rope_scaling(rope, c, file)
    window = c.get("sliding_window")
    if mtype in ("qwen2", "qwen3"):
        window = window if c.get("use_sliding_window") else None
        if window is not None:  # as transformers: layer_types, else sliding from max_window_layers on
            n, first = c["num_hidden_layers"], c.get("max_window_layers", 28)
            default = ["sliding_attention" if i >= first else "full_attention" for i in range(n)]
            types = set(c.get("layer_types") or default)
            if types == {"full_attention"}:
                window = None
            elif types != {"sliding_attention"}:
                raise JaxftError(f"{file}: {ARCH[mtype]} with mixed sliding/full attention layers is not supported")
    missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                           "num_attention_heads") if k not in c]
    if missing:
        raise JaxftError(f"{file}: missing {', '.join(missing)}")
    heads, kv_heads = c["num_attention_heads"], c.get("num_key_value_heads") or c["num_attention_heads"]
    if not (isinstance(heads, int) and isinstance(kv_heads, int) and 0 < kv_heads <= heads and heads % kv_heads == 0):
        raise JaxftError(f"{file}: num_attention_heads={heads}, num_key_value_heads={kv_heads}: expected positive "
                         "integers, the query heads a multiple of the key/value heads")
    if not c.get("head_dim") and c["hidden_size"] % heads:
        raise JaxftError(f"{file}: hidden_size={c['hidden_size']} is not divisible by num_attention_heads={heads} "
                         "(and no head_dim is given)")
    head_dim = c.get("head_dim") or c["hidden_size"] // heads
    rotary = int(head_dim * partial)
    if not 0 < rotary <= head_dim or rotary % 2:
        raise JaxftError(f"{file}: partial_rotary_factor={partial} of head_dim {head_dim} rotates {rotary} "
                         "features: expected an even number from 2 to head_dim")
    if rope.get("rope_type") == "longrope" and {len(rope["long_factor"]), len(rope["short_factor"])} != {rotary // 2}:
        raise JaxftError(f"{file}: rope_type 'longrope': long_factor and short_factor have {len(rope['long_factor'])} "
                         f"and {len(rope['short_factor'])} values: expected {rotary // 2}, one per rotated frequency")
    glm = mtype in GLM  # q/k/v biases by default (attention_bias), none on o_proj
    return LlamaConfig(
        vocab_size=c["vocab_size"],
        hidden_size=c["hidden_size"],
        intermediate_size=c["intermediate_size"],
        num_layers=c["num_hidden_layers"],
        num_heads=c["num_attention_heads"],
        num_kv_heads=c.get("num_key_value_heads") or c["num_attention_heads"],
        head_dim=c.get("head_dim") or 0,
        rms_norm_eps=c.get("rms_norm_eps", 1e-6),
        rope_theta=float(theta),
        rope_scaling=tuple(sorted(rope.items())) or None,
        max_position_embeddings=c.get("max_position_embeddings", 2048),
        tie_word_embeddings=bool(c.get("tie_word_embeddings", False)),
        qkv_bias=mtype == "qwen2" or bool(c.get("attention_bias", glm)),
        o_bias=mtype != "qwen2" and not glm and bool(c.get("attention_bias", False)),
        mlp_bias=bool(c.get("mlp_bias", False)),
        sliding_window=window,
        qk_norm=mtype == "qwen3",
        rotary_dim=rotary if rotary != head_dim else 0,
        rope_interleaved=glm,
        fused_gate_up=glm or mtype == "phi3",
        fused_qkv=mtype == "phi3",
        sandwich_norms=mtype == "glm4",
        model_type=mtype,
        bos_token_id=c.get("bos_token_id"),
        eos_token_id=c.get("eos_token_id") if not isinstance(c.get("eos_token_id"), list) else c["eos_token_id"][0],
        pad_token_id=c.get("pad_token_id"),
    )


ROPE_KEYS = {"linear": ("factor",), "dynamic": ("factor",), "yarn": ("factor",),
             "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
             "longrope": ("long_factor", "short_factor", "original_max_position_embeddings")}


def _rope_scaling(rope: dict, c: dict, file: str) -> dict:
    """config.json's rope parameters -> what `rope_inv_freq` reads; unsupported types are an error here,
    not a traceback mid-trace."""
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind == "default":
        return {}
    if kind not in ROPE_TYPES:
        raise JaxftError(f"{file}: rope_type {kind!r} is not supported (expected one of {', '.join(ROPE_TYPES)})")
    rope = {**rope, "rope_type": kind}
    rope.pop("type", None)
    if kind in ("yarn", "longrope"):  # transformers' defaults, made explicit
        rope.setdefault("original_max_position_embeddings", c.get("original_max_position_embeddings")
                        or c.get("max_position_embeddings", 2048))
        if rope.get("factor") is None:
            rope["factor"] = c.get("max_position_embeddings", 2048) / rope["original_max_position_embeddings"]
    if kind == "longrope":  # one factor per rotated frequency, kept as tuples (the config is hashed)
        for key in ("long_factor", "short_factor"):
            value = rope.get(key)
            if not isinstance(value, (list, tuple)) or not all(isinstance(v, (int, float)) for v in value):
                raise JaxftError(f"{file}: rope_type 'longrope' needs {key} as a list of numbers, not {value!r}")
            rope[key] = tuple(float(v) for v in value)
    missing = [k for k in ROPE_KEYS[kind] if rope.get(k) is None]
    if missing:
        raise JaxftError(f"{file}: rope_type {kind!r} needs {', '.join(missing)} in rope_parameters")
    return rope


def config_to_hf(cfg: LlamaConfig) -> dict:
    rope = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    rope.update(dict(cfg.rope_scaling or {}))
    if cfg.rotary_dim:
        rope["partial_rotary_factor"] = cfg.rotary_dim / cfg.dim_per_head
    c = {
        "model_type": cfg.model_type,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.dim_per_head,
        "hidden_act": "silu",
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_parameters": rope,
        "max_position_embeddings": cfg.max_position_embeddings,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": cfg.eos_token_id,
        "pad_token_id": cfg.pad_token_id,
    }
    if cfg.rope_scaling:
        c["rope_scaling"] = rope
    if cfg.model_type in ("qwen2", "qwen3"):
        sliding = cfg.sliding_window is not None
        c.update(
            use_sliding_window=sliding,
            sliding_window=cfg.sliding_window,
            max_window_layers=0 if sliding else cfg.num_layers,  # every layer slides, or none
            layer_types=[("sliding_attention" if sliding else "full_attention")] * cfg.num_layers,
        )
        if cfg.model_type == "qwen3":  # Qwen3's q/k/v/o biases follow attention_bias, as Llama's
            c.update(attention_bias=cfg.qkv_bias)
    elif cfg.model_type in PARTIAL_ROTARY:  # transformers before 5 read the factor at the top level
        c.update(partial_rotary_factor=cfg.rotary_dim / cfg.dim_per_head if cfg.rotary_dim else 1.0)
        if cfg.model_type == "phi3":
            c["sliding_window"] = cfg.sliding_window
        else:
            c["attention_bias"] = cfg.qkv_bias
    else:
        c.update(attention_bias=cfg.qkv_bias, mlp_bias=cfg.mlp_bias)
        if cfg.model_type == "mistral":
            c["sliding_window"] = cfg.sliding_window
    return c


def architecture(cfg: LlamaConfig) -> str:
    return ARCH[cfg.model_type] + ("ForSequenceClassification" if cfg.head == "classification" else "ForCausalLM")


_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)\.(weight|bias)")


def _from_hf_key(key: str):
    """HF key -> (our path, layer index or None, transpose?). None for keys we do not use."""
    if key == "model.embed_tokens.weight":
        return ("embed_tokens",), None, False
    if key == "model.norm.weight":
        return ("norm", "weight"), None, False
    if key in ("lm_head.weight", "score.weight"):
        return (key.split(".")[0], "kernel"), None, True
    m = _LAYER.fullmatch(key)
    if not m:
        return None
    mods = tuple(m[2].split("."))
    if m[3] == "bias":
        return mods + ("bias",), int(m[1]), False
    is_linear = mods[-1].endswith("_proj")
    return mods + ("kernel" if is_linear else "weight",), int(m[1]), is_linear


def params_from_hf(tensors: dict[str, np.ndarray], cfg: LlamaConfig, where: str = "checkpoint") -> dict:
    flat = params_from_keys(tensors, cfg, where, _from_hf_key)
    if cfg.tie_word_embeddings:
        flat.pop(("lm_head", "kernel"), None)
    return traverse_util.unflatten_dict(flat)


def params_to_hf(params: dict, cfg: LlamaConfig) -> dict[str, np.ndarray]:
    out = {}
    for path, value in traverse_util.flatten_dict(params).items():
        value = np.asarray(value, dtype=np.float32)
        per_layer = unstack_layers(path, value)
        if path[0] == "embed_tokens":
            out["model.embed_tokens.weight"] = value
        elif path[0] == "norm":
            out["model.norm.weight"] = value
        elif path[0] in ("lm_head", "score"):
            out[f"{path[0]}.weight"] = value.T
        elif per_layer is not None:
            for i, (*mods, leaf), v in per_layer:
                name = "bias" if leaf == "bias" else "weight"
                out[f"model.layers.{i}.{'.'.join(mods)}.{name}"] = v.T if leaf == "kernel" else v
        else:
            raise ValueError(f"no Hugging Face name for parameter {'/'.join(path)}")
    return {k: np.ascontiguousarray(v) for k, v in out.items()}


def hf_module(path: str, cfg=None) -> str:
    """'layers.3.self_attn.q_proj' -> 'model.layers.3.self_attn.q_proj'; the heads keep their names."""
    return path if path.split(".")[0] in ("lm_head", "score") else "model." + path


def our_module(name: str) -> str | None:
    if name.split(".")[0] in ("lm_head", "score"):
        return name
    return name[len("model."):] if name.startswith("model.") else None


def matmul_weights(cfg: LlamaConfig) -> int:
    """Weights that take part in a matmul for every token: q, k, v, o, gate, up, down per layer, plus
    the output head (the vocabulary projection, or the classifier's tiny one). The input embedding is a
    lookup: 0 FLOPs."""
    d = cfg.dim_per_head
    q, kv = cfg.num_heads * d, cfg.num_kv_heads * d
    per_layer = cfg.hidden_size * (q + 2 * kv) + q * cfg.hidden_size + 3 * cfg.hidden_size * cfg.intermediate_size
    return cfg.num_layers * per_layer + head_weights(cfg)


def head_weights(cfg: LlamaConfig) -> int:
    """The output head's matmul weights: the vocabulary projection, or the classifier's tiny one."""
    return cfg.hidden_size * (cfg.num_labels if cfg.head == "classification" else cfg.vocab_size)


def activation_blocks(cfg: LlamaConfig) -> tuple[Blocks, ...]:
    """What `jaxft.plan` counts: one stack of pre-norm blocks, RMSNorms (GLM-4-0414: two more, on the
    attention and MLP outputs), gated SiLU MLP."""
    d, hd = cfg.hidden_size, cfg.dim_per_head
    q, kv, f = cfg.num_heads * hd, cfg.num_kv_heads * hd, cfg.intermediate_size
    return (Blocks("layers", cfg.num_layers, d, cfg.num_heads, cfg.num_kv_heads, hd, f,
                   norms=4 if cfg.sandwich_norms else 2, projections=(
        *((("qkv_proj", "attn_in", d, q + 2 * kv),) if cfg.fused_qkv else
          (("q_proj", "attn_in", d, q), ("k_proj", "attn_in", d, kv), ("v_proj", "attn_in", d, kv))),
        ("o_proj", "attn_out", q, d),
        *((("gate_up_proj", "mlp_in", d, 2 * f),) if cfg.fused_gate_up else
          (("gate_proj", "mlp_in", d, f), ("up_proj", "mlp_in", d, f))),
        ("down_proj", "mlp_act", f, d))),)


FAMILY = Family(
    name="llama",
    model=LlamaModel,
    heads=HEADS,
    config_from_hf=config_from_hf,
    config_to_hf=config_to_hf,
    architecture=architecture,
    params_from_hf=params_from_hf,
    params_to_hf=params_to_hf,
    hf_module=hf_module,
    our_module=our_module,
    lora_targets=lambda cfg: "qkv_proj" if cfg.fused_qkv else "q_proj,v_proj",  # PEFT has no Phi-3 default
    # PEFT's IA3 defaults: keys for Llama and Mistral, queries for Qwen
    ia3_targets=lambda cfg: "qkv_proj,down_proj" if cfg.fused_qkv else (
        "q_proj" if cfg.model_type.startswith("qwen") else "k_proj") + ",v_proj,down_proj",
    ia3_feedforward="down_proj",
    head_params=r"^(score|lm_head)/",
    classifier_params=r"^score/",
    kv_layout=lambda cfg: (cfg.num_layers, cfg.num_kv_heads, cfg.dim_per_head),
    matmul_weights=matmul_weights,
    head_weights=head_weights,
    activation_blocks=activation_blocks,
    init_cache=init_cache,
    tied_embedding=("embed_tokens", ("lm_head.weight",)),
)
