"""The Llama family as one functional Flax decoder: Llama 2/3, Qwen2, Qwen3, Mistral, GLM-4 (`glm`:
glm-4-9b-chat-hf; `glm4`: GLM-4-0414, GLM-Z1), Phi-3 (`phi3`: Phi-3, Phi-3.5 and Phi-4-mini), Gemma
(`gemma`, `gemma2`, `gemma3_text`), and the mixtures of experts Mixtral, Qwen2-MoE and Qwen3-MoE.

Differences between the variants are data in `LlamaConfig` (q/k/v bias, explicit head_dim, rope
scaling, tied embeddings, sliding window, Qwen3's per-head RMSNorm of queries and keys; GLM's rotary on
half of each head over adjacent pairs, its fused gate/up projection, GLM-4-0414's norms on the
attention and MLP outputs; Phi-3's fused q/k/v and gate/up projections; Gemma's 1 + weight norms,
scaled embeddings and GELU gate, Gemma 2's capped scores and logits; layers of mixed kinds, sliding or
full, with Gemma 3's own rotary base for the sliding ones; a mixture's routed experts in place of the
MLP), not subclasses. Module names
follow Hugging Face (`self_attn.q_proj`, `mlp.gate_proj`, GLM's and Phi-3's `mlp.gate_up_proj`, Phi-3's
`self_attn.qkv_proj`, ...) so checkpoint and PEFT keys map one to one.

Methods hook in at named points: every `Linear` (see `layers.py`), the embeddings, each block's
attention and MLP outputs, and `prefix`, which returns per-layer key/value prefixes (P-Tuning v2)
that attention prepends to its keys and values. The end of the file maps config.json and the
weights to and from Hugging Face, and declares the family (`FAMILY`, see `jaxft.models.family`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from jax.ad_checkpoint import checkpoint_name

from jaxft.cross_entropy import softcap
from jaxft.errors import JaxftError
from jaxft.models.attention import attention, cached
from jaxft.models.family import (  # noqa: F401 (REMAT, POOLING: re-exported)
    POOLING, REMAT, Blocks, Family, Settings, hf_order, params_from_keys, qkv_order, unstack_layers,
)
from jaxft.models.layers import (  # noqa: F401 (last_token: re-exported)
    PROJECTION, ROPE_TYPES, Linear, RMSNorm, block_output, gated, grouped_matmul, last_token, param_with_axes, pool,
    remat, rope, rope_switch_length, segment_positions, varying, varying_axes,
)
from jaxft.quant import Quantized, dequantize
from jaxft.sharding import constrain, on_batch_shards

HEADS = ("causal_lm", "classification", "token_classification")


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
    score_bias: bool = True  # a token classifier's (`token_classification_bias`; a sequence classifier's has none)
    sliding_window: int | None = None
    qk_norm: bool = False  # Qwen3: RMSNorm over each head's queries and keys, before rotary
    rotary_dim: int = 0  # GLM: rotary on the first rotary_dim features of each head (partial_rotary_factor); 0: all
    rope_interleaved: bool = False  # GLM: rotary over adjacent pairs (2i, 2i + 1), not the two halves
    fused_gate_up: bool = False  # GLM, Phi-3: one gate_up_proj [D, 2F] (gate, then up) for gate_proj and up_proj
    fused_qkv: bool = False  # Phi-3: one qkv_proj [D, (H + 2 KV) d] (queries, keys, values) for q/k/v_proj
    sandwich_norms: bool = False  # GLM-4-0414, Gemma 2/3: RMSNorm on the attention and MLP outputs before each residual
    norm_offset: bool = False  # Gemma: RMSNorm scales by 1 + weight (weights start at 0), in fp32
    hidden_act: str = "silu"  # the MLP gate's activation: silu, or gelu_tanh (Gemma's gelu_pytorch_tanh)
    embed_scale: bool = False  # Gemma: token embeddings times sqrt(hidden_size), in the table's dtype
    query_pre_attn_scalar: float = 0.0  # Gemma 2/3: scores scaled by its -1/2 power, not head_dim's; 0: head_dim
    attn_softcap: float | None = None  # Gemma 2: scores -> cap * tanh(scores / cap) before the mask
    final_softcap: float | None = None  # Gemma 2: the same on the logits
    # Per layer "sliding_attention" or "full_attention" where layers differ (Gemma 2/3, Qwen2's
    # max_window_layers): only the sliding ones use `sliding_window`. None: every layer does.
    layer_types: tuple[str, ...] | None = None
    rope_local_theta: float | None = None  # Gemma 3: the sliding layers' rotary base (no rope scaling on them)
    # Mixture of experts (Mixtral, Qwen2-MoE, Qwen3-MoE): every layer's MLP routes each token to its top
    # `experts_per_token` of `num_experts` gated MLPs `moe_intermediate_size` wide (0 experts: one dense MLP)
    num_experts: int = 0
    experts_per_token: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = False  # the chosen experts' weights renormalised to sum to 1 (Mixtral: always)
    shared_expert_size: int = 0  # Qwen2-MoE: a dense MLP every token also takes, gated by a sigmoid
    # transformers' load-balancing loss (output_router_logits), this times it added to the training loss; 0: none
    router_aux_loss_coef: float = 0.0
    model_type: str = "llama"
    bos_token_id: int | None = 1
    eos_token_id: int | None = 2
    pad_token_id: int | None = None
    @property
    def dim_per_head(self) -> int:
        return self.head_dim or self.hidden_size // self.num_heads

    @property
    def layer_windows(self) -> tuple[int | None, ...]:
        """Each layer's sliding window (None: full attention)."""
        if self.layer_types is None:
            return (self.sliding_window,) * self.num_layers
        return tuple(self.sliding_window if t == "sliding_attention" else None for t in self.layer_types)

    @property
    def mixed_layers(self) -> bool:
        """Whether layers differ in their attention (window, Gemma 3's rotary base): each gets its kind."""
        return len(set(self.layer_windows)) > 1

    @property
    def norm_names(self) -> tuple[str, str, str]:
        """The norms on the attention output, before the MLP and on the MLP output, as HF names them."""
        if self.model_type.startswith("gemma"):
            return "post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm"
        return "post_self_attn_layernorm", "post_attention_layernorm", "post_mlp_layernorm"


class Attention(nn.Module):
    cfg: LlamaConfig
    hooks: Sequence[Any] = ()

    @nn.compact
    def __call__(self, x, mask, positions, prefix, segment_ids=None, cache=None, cache_index=None, layer=None,
                 sliding=None):
        """mask: the [B, T] padding mask; each implementation builds causality, window and prefix from it
        (and from `segment_ids`, packed rows, where given). With a `cache` (generation, see `init_cache`):
        mask covers its S slots, the new keys and values are written at `cache_index`, and this returns
        (output, cache). `sliding` (layers of mixed kinds): whether this layer slides, a traced bool under
        the layer scan."""
        cfg, dt = self.cfg, self.cfg.compute_dtype
        h, kv, d = cfg.num_heads, cfg.num_kv_heads, cfg.dim_per_head
        b, t, _ = x.shape
        proj = lambda n, f, ax, bias: Linear(f, ax, bias, dt, self.hooks, name=n)  # noqa: E731
        if cfg.fused_qkv:  # stored per kv head: its group's queries, its key, its value (`qkv_order`)
            g = h // kv
            qkv = proj("qkv_proj", (h + 2 * kv) * d, ("embed", "heads"), cfg.qkv_bias)(x).reshape(b, t, kv, g + 2, d)
            q, k, v = qkv[..., :g, :].reshape(b, t, h, d), qkv[..., g, :], qkv[..., g + 1, :]
        else:
            q = proj("q_proj", h * d, ("embed", "heads"), cfg.qkv_bias)(x).reshape(b, t, h, d)
            k = proj("k_proj", kv * d, ("embed", "kv_heads"), cfg.qkv_bias)(x).reshape(b, t, kv, d)
            v = proj("v_proj", kv * d, ("embed", "kv_heads"), cfg.qkv_bias)(x).reshape(b, t, kv, d)
        if cfg.qk_norm:  # one weight of head_dim, shared by every head
            q = RMSNorm(cfg.rms_norm_eps, dt, cfg.norm_offset, name="q_norm")(q)
            k = RMSNorm(cfg.rms_norm_eps, dt, cfg.norm_offset, name="k_norm")(k)
        if sliding is None:  # every layer alike
            sliding = cfg.layer_windows[0] is not None
        rotate = lambda theta, scaling: rope(q, k, positions, cfg.rotary_dim or d, theta, scaling,  # noqa: E731
                                             cfg.max_position_embeddings, cfg.rope_interleaved)
        if cfg.rope_local_theta is None:
            q, k = rotate(cfg.rope_theta, cfg.rope_scaling)
        else:  # Gemma 3: the sliding layers turn at their own base, unscaled
            q, k = by_kind(sliding, lambda slides: rotate(cfg.rope_local_theta, None) if slides
                           else rotate(cfg.rope_theta, cfg.rope_scaling))
        if cfg.query_pre_attn_scalar:  # the kernels divide by sqrt(head_dim): scores / sqrt(scalar) instead
            q = q * jnp.asarray(math.sqrt(d / cfg.query_pre_attn_scalar), q.dtype)
        self.sow("intermediates", "keys_values", (k, v))  # stored only when asked for (e.g. prefix init)
        num_prefix = 0
        o_proj = proj("o_proj", cfg.hidden_size, ("heads", "embed"), cfg.o_bias)
        window = lambda slides: cfg.sliding_window if slides else None  # noqa: E731
        if cache is not None:
            cache, keys, values = write_cache(cache, k, v, cache_index, layer)
            p = None if prefix is None else (prefix[0].astype(keys.dtype), prefix[1].astype(keys.dtype))
            out = by_kind(sliding, lambda slides: cached(q, keys, values, mask, cache_index, p, window(slides),
                                                         cfg.attn_softcap))
            return o_proj(out.astype(dt)), cache
        if prefix is not None:  # learned keys/values, no rotary: they are not at a position
            num_prefix = prefix[0].shape[1]
            k = jnp.concatenate([prefix[0].astype(dt), k], axis=1)
            v = jnp.concatenate([prefix[1].astype(dt), v], axis=1)
        q = constrain(q, ("batch", "length", "act_heads", None))  # heads stay split (tensor parallel)
        k, v = (constrain(a, ("batch", "length", "act_kv_heads", None)) for a in (k, v))
        out = by_kind(sliding, lambda slides: attention(q, k, v, mask, num_prefix, window(slides), dt, cfg.attention,
                                                        segment_ids, softcap=cfg.attn_softcap))
        out = constrain(out, ("batch", "length", "act_heads"))
        return o_proj(out)


def by_kind(sliding, fn):
    """fn(slides) for this layer's kind: `sliding` a Python bool, or traced under the layer scan, where
    both kinds are compiled and the layer's runs (`lax.cond`)."""
    if isinstance(sliding, bool):
        return fn(sliding)
    return jax.lax.cond(sliding, lambda: fn(True), lambda: fn(False))


def gelu_tanh(x):
    """HF's gelu_pytorch_tanh (Gemma's MLP)."""
    return nn.gelu(x, approximate=True)


ACTIVATIONS = {"silu": nn.silu, "gelu_tanh": gelu_tanh}


class MLP(nn.Module):
    cfg: LlamaConfig
    hooks: Sequence[Any] = ()
    features: int = 0  # its width; 0: intermediate_size

    @nn.compact
    def __call__(self, x):
        cfg, dt, width = self.cfg, self.cfg.compute_dtype, self.features or self.cfg.intermediate_size
        proj = lambda n, f, ax: Linear(f, ax, cfg.mlp_bias, dt, self.hooks, name=n)  # noqa: E731
        if cfg.fused_gate_up:  # stored in blocks, gate's and up's alternating (`gate_up_order`)
            n = gate_up_blocks(width)
            y = proj("gate_up_proj", 2 * width, ("embed", "mlp"))(x).reshape(x.shape[:-1] + (n, 2, width // n))
            gate, up = (y[..., i, :].reshape(x.shape[:-1] + (width,)) for i in (0, 1))
        else:
            gate = proj("gate_proj", width, ("embed", "mlp"))(x)
            up = proj("up_proj", width, ("embed", "mlp"))(x)
        hidden = gated(ACTIVATIONS[cfg.hidden_act], gate, up)
        hidden = constrain(hidden, ("batch", "length", "act_mlp"))  # split like gate/up's outputs
        return proj("down_proj", cfg.hidden_size, ("mlp", "embed"))(hidden)


def gate_up_blocks(width: int) -> int:
    """Blocks per half of a fused gate_up_proj as stored: the largest power of two up to 64 that divides the
    MLP's width."""
    n = 1
    while n < 64 and width % (2 * n) == 0:
        n *= 2
    return n


def gate_up_order(width: int) -> np.ndarray:
    """Our gate_up_proj's output unit j is HF's unit order[j]. HF stacks gate's units, then up's; we store
    them in `gate_up_blocks` blocks, each gate block followed by up's same units. A tensor-parallel shard of
    the outputs (the tensor axis dividing the blocks) then holds matching gate and up units, which the MLP
    multiplies on the device where they are: with HF's order one device held the gates and another the ups,
    and every layer moved activations between them (collective-permutes and all-to-alls)."""
    n = gate_up_blocks(width)
    g = width // n
    return np.concatenate([np.r_[i * g:(i + 1) * g, width + i * g:width + (i + 1) * g] for i in range(n)])


_FUSED_PROJ = re.compile(r"(model\.)?layers\.\d+\.(mlp\.gate_up_proj|self_attn\.qkv_proj)")


def hf_rows(cfg, name: str) -> np.ndarray | None:
    """HF module `name`'s output units as we store them (`Family.hf_rows`): a fused gate_up_proj's blocks
    (`gate_up_order`), a fused qkv_proj's kv-head groups (`qkv_order`)."""
    m = _FUSED_PROJ.fullmatch(name)
    if m and m[2].endswith("gate_up_proj") and cfg.fused_gate_up:
        return gate_up_order(cfg.intermediate_size)
    if m and m[2].endswith("qkv_proj") and cfg.fused_qkv:
        return qkv_order(cfg.num_heads, cfg.num_kv_heads, cfg.dim_per_head)
    return None


class Experts(nn.Module):
    """The routed experts of a mixture-of-experts MLP, stacked: gate, up [E, D, F], down [E, F, D]. The
    token copies are sorted by the expert they go to and each expert's rows meet its own weights in a
    grouped matmul, exact and dropless: `jax.lax.ragged_dot` on TPUs, which run it as such, and
    `layers.grouped_matmul` (tiles of rows) elsewhere, where XLA would expand `ragged_dot` into a masked
    dense product over every expert."""

    cfg: LlamaConfig

    @nn.compact
    def __call__(self, x, weights, chosen):
        """x [B, T, D]; weights, chosen [B, T, k]: each token's experts and their router weights -> [B, T, D].
        Each batch shard sorts and multiplies its own tokens (`on_batch_shards`): over the global batch, XLA
        gathers every token onto every device and each repeats the whole mixture's work. Under tensor
        parallelism each shard holds its slice of every expert's units and the experts' output is summed over
        the tensor axis once, after each token's k copies are combined. Under expert parallelism each shard
        of the expert axis holds E / that many experts (`dispatch`)."""
        cfg = self.cfg
        e, f, d = cfg.num_experts, cfg.moe_intermediate_size, x.shape[-1]
        gate = self.weights("gate_proj", (e, d, f), ("expert", "embed", "mlp"))
        up = self.weights("up_proj", (e, d, f), ("expert", "embed", "mlp"))
        down = self.weights("down_proj", (e, f, d), ("expert", "mlp", "embed"))
        return on_batch_shards(self.dispatch, (True, True, True, False, False, False), x, weights, chosen, gate, up,
                               down, tensor=(None, None, None, 2, 2, 1), expert=(None, None, None, 0, 0, 0))

    def dispatch(self, x, weights, chosen, gate, up, down, tensor_axis=None, expert_axis=None, expert_tokens=False):
        """One shard's tokens through its experts. Under expert parallelism (`expert_axis`: gate, up, down hold
        this shard's E / n experts) the shards' tokens are gathered over the axis (`expert_tokens`: else each
        shard holds them all already), each shard multiplies the copies routed to its own experts, and the
        partial outputs are summed back onto each token's shard: Megatron's all-gather dispatcher, exact and
        dropless. The routed rows have room for the worst case, each token's min(k, E / n) copies routed here.
        The gathered tokens go through one source shard's at a time (a `jax.checkpoint`ed loop): under remat
        "full" a shard then holds one source shard's rows at a time, as without expert parallelism, not n
        times that, and under "save_dots" too (each chunk's products recomputed); "none" keeps every chunk's
        products, as it keeps a layer's."""
        dt, (k, local) = self.cfg.compute_dtype, (chosen.shape[-1], gate.shape[0])
        # varying over the tensor (and, whole on each, expert) shards from here: their gradients are summed here
        spread = tuple(a for a in (tensor_axis, None if expert_tokens else expert_axis) if a)
        if spread:
            x, weights = jax.lax.pcast((x, weights), spread, to="varying")
        rows = lambda a: a.reshape(-1, a.shape[-1])  # noqa: E731
        if expert_axis and expert_tokens:  # every shard's tokens [n, B, T, .] (the backward sums their gradients back)
            x, weights, chosen = (jax.lax.all_gather(a, expert_axis) for a in (x, weights, chosen))
        if expert_axis:  # this shard's experts by their index here; the others' copies sort last, past `local`
            chosen = chosen - jax.lax.axis_index(expert_axis) * local
            chosen = jnp.where((chosen >= 0) & (chosen < local), chosen, local)
        gate_up = jnp.concatenate([gate.astype(dt), up.astype(dt)], axis=-1)  # one grouped product for both
        # whole on each batch shard: marked varying once here, not in every chunk (their gradients summed once)
        gate_up, down = (varying(w, varying_axes(x) - varying_axes(w)) for w in (gate_up, down.astype(dt)))
        multiply = functools.partial(self.multiply, gate_up=gate_up, down=down, per_token=min(k, local))
        if expert_axis and expert_tokens:
            chunks = (a.reshape(a.shape[0], -1, a.shape[-1]) for a in (x, weights, chosen))
            # remat save_dots / offload would keep every chunk's named products: unnamed, they are recomputed
            named = self.cfg.remat == "none"
            out = jax.lax.map(jax.checkpoint(lambda a: multiply(*a, named=named)), tuple(chunks))  # [n, B * T, D]
        else:
            out = multiply(rows(x), rows(weights), rows(chosen))
        if tensor_axis:  # each shard's units' share of every token's output
            out = jax.lax.psum(out, tensor_axis)
        if expert_axis and expert_tokens:  # each shard's experts' share of its own tokens' outputs
            return jax.lax.psum_scatter(out, expert_axis).reshape(x.shape[1:])
        if expert_axis:
            out = jax.lax.psum(out, expert_axis)
        return out.reshape(x.shape)

    def multiply(self, x, weights, chosen, gate_up, down, per_token: int, named: bool = True):
        """Tokens x [N, D], their experts `chosen` [N, k] (this shard's; `len(gate_up)`: another's) and router
        weights -> the weighted sum of their experts' outputs [N, D]. The copies are sorted by expert into the
        grouped matmuls, with room for `per_token` copies of each token. `named`: the products are named as
        `Linear` names its outputs, so that remat "none" and "save_dots" keep them (XLA's dots_saveable knows
        dot_general, not ragged_dot)."""
        cfg, dt, k = self.cfg, self.cfg.compute_dtype, chosen.shape[-1]
        local, flat = gate_up.shape[0], chosen.reshape(-1)
        order = jnp.argsort(flat, stable=True)[:x.shape[0] * per_token]
        token = order // k  # the token each sorted row copies
        sizes = jnp.bincount(flat, length=local + 1)[:local].astype(jnp.int32)
        grouped = jax.lax.ragged_dot if jax.default_backend() == "tpu" else grouped_matmul
        name = (lambda y: checkpoint_name(y, PROJECTION)) if named else (lambda y: y)  # noqa: E731
        product = lambda a, w: name(grouped(a, w, sizes))  # noqa: E731
        gate, up = jnp.split(product(x[token].astype(dt), gate_up), 2, axis=-1)
        y = product(gated(ACTIVATIONS[cfg.hidden_act], gate, up), down)
        routed = jnp.arange(len(order)) < jnp.sum(sizes)  # the rows past the routed ones go to other shards' experts
        y = jnp.where(routed[:, None], y * weights.reshape(-1)[order][:, None].astype(y.dtype), 0)
        return jnp.zeros(x.shape, y.dtype).at[token].add(y)

    def weights(self, name: str, shape, axes):
        """A stacked weight, or its int8 / NF4 form under `model.quantization` (QLoRA), dequantized here."""
        stored = self.get_variable("params", name) if self.has_variable("params", name) else None
        if isinstance(stored, Quantized):
            return dequantize(stored, self.cfg.compute_dtype)
        return param_with_axes(self, name, nn.initializers.normal(0.02), shape, axes)


class SparseMoE(nn.Module):
    """Mixtral's and Qwen2/3-MoE's MLP: a router (`gate`, a hookable projection) picks each token's top k
    experts by softmax probability (renormalised over the k where `norm_topk_prob`), and their outputs are
    summed by those weights; Qwen2-MoE adds a shared dense MLP gated per token by a sigmoid."""

    cfg: LlamaConfig
    hooks: Sequence[Any] = ()

    @nn.compact
    def __call__(self, x, mask=None):
        """-> (output, router statistics for the load-balancing loss, or None: see `balance_loss`). `mask`
        [B, T]: the tokens the statistics count (transformers' attention mask); None: no statistics."""
        cfg, dt = self.cfg, self.cfg.compute_dtype
        logits = Linear(cfg.num_experts, ("embed", None), False, dt, self.hooks, name="gate")(x)
        probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
        # per batch shard: XLA gathers the global batch's probabilities onto every device for `top_k`
        weights, chosen = on_batch_shards(self.route, (True,), probs)
        out = Experts(cfg, name="experts")(x, weights.astype(logits.dtype), chosen)
        if cfg.shared_expert_size:
            shared = MLP(cfg, self.hooks, cfg.shared_expert_size, name="shared_expert")(x)
            share = Linear(1, ("embed", None), False, dt, self.hooks, name="shared_expert_gate")(x)
            out = out + jax.nn.sigmoid(share) * shared
        stats = None
        if cfg.router_aux_loss_coef and mask is not None:  # per expert: tokens routed to it (by rank), probability
            real = mask.astype(jnp.float32)
            picked = jax.nn.one_hot(chosen, cfg.num_experts, dtype=jnp.float32)  # [B, T, k, E]
            stats = (jnp.einsum("bt,btke->ke", real, picked), jnp.einsum("bt,bte->e", real, probs), jnp.sum(real))
        return out, stats

    def route(self, probs):
        """Each token's top k experts and their weights (renormalised over the k where `norm_topk_prob`)."""
        weights, chosen = jax.lax.top_k(probs, self.cfg.experts_per_token)
        if self.cfg.norm_topk_prob:
            weights = weights / weights.sum(axis=-1, keepdims=True)
        return weights, chosen


def balance_loss(cfg: LlamaConfig, stats) -> jax.Array:
    """transformers' load-balancing loss from every layer's router statistics (summed over layers, as it
    concatenates their logits): E * sum over ranks and experts of (share of tokens routed there) x (mean
    router probability), over the real tokens."""
    routed, probs, tokens = stats
    return cfg.num_experts * jnp.sum(routed / tokens * (probs / tokens)[None])


class DecoderLayer(nn.Module):
    cfg: LlamaConfig
    hooks: Sequence[Any] = ()

    @nn.compact
    def __call__(self, carry, mask, positions, prefix, segment_ids=None, cache_index=None, sliding=None):
        """carry: h, or in generation (h, cache, layer): the cache travels with the hidden states (through
        the scan, with the layer index that says where in the stacked cache this layer writes)."""
        cfg = self.cfg
        h, cache, layer = carry if isinstance(carry, tuple) else (carry, None, None)
        norm = lambda name: RMSNorm(cfg.rms_norm_eps, cfg.compute_dtype, cfg.norm_offset, name=name)  # noqa: E731
        post_attention, pre_mlp, post_mlp = cfg.norm_names if cfg.sandwich_norms else (None, "post_attention_layernorm",
                                                                                       None)
        a = Attention(cfg, self.hooks, name="self_attn")(norm("input_layernorm")(h), mask, positions, prefix,
                                                         segment_ids, cache, cache_index, layer, sliding)
        if cache is not None:
            a, cache = a
        if post_attention:
            a = norm(post_attention)(a)
        h = h + block_output(self, a, "attention")
        if cfg.num_experts:  # router statistics while training (a mask of the layer's tokens), not from a cache
            m, stats = SparseMoE(cfg, self.hooks, name="mlp")(norm(pre_mlp)(h), mask if cache is None else None)
        else:
            m, stats = MLP(cfg, self.hooks, name="mlp")(norm(pre_mlp)(h)), None
        if post_mlp:
            m = norm(post_mlp)(m)
        h = h + block_output(self, m, "mlp")
        h = nn.with_logical_constraint(h, ("batch", "length", "act_embed"))
        if cache is None:
            return h, stats
        return (h, cache, None if layer is None else layer + 1), stats


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
        h = jnp.take(constrain(embed, ("vocab", None)), input_ids, axis=0)
        if cfg.embed_scale:  # Gemma, as HF: the scale rounded to the table's dtype, before any virtual token joins
            h = h * jnp.asarray(math.sqrt(cfg.hidden_size), h.dtype)
        h = h.astype(dt)
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
        slides = [w is not None for w in cfg.layer_windows] if cfg.mixed_layers else None  # each layer's kind
        if cfg.scan_layers:
            stack = nn.scan(
                layer,
                variable_axes={"params": 0, "intermediates": 0},
                split_rngs={"params": True, "dropout": True},
                in_axes=(nn.broadcast, nn.broadcast, 0, nn.broadcast, nn.broadcast, 0),
                length=cfg.num_layers,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )
            layers = stack(cfg, self.hooks, name="layers")
            kinds = None if slides is None else jnp.asarray(slides)
            if cache is None:
                h, stats = layers(h, mask, position_ids, prefix, segment_ids, None, kinds)
            else:  # the stacked cache is carried, each layer writing its own slice in place
                (h, new, _), stats = layers((h, cache["layers"], jnp.int32(0)), mask, position_ids, prefix,
                                            segment_ids, cache_index, kinds)
                cache = {"layers": new}
        else:
            new, per_layer = {}, []
            for i in range(cfg.num_layers):
                p = None if prefix is None else (prefix[0][i], prefix[1][i])
                mod = layer(cfg, self.hooks, name=f"layers_{i}")
                kind = None if slides is None else slides[i]
                if cache is None:
                    h, layer_stats = mod(h, mask, position_ids, p, segment_ids, None, kind)
                    per_layer.append(layer_stats)
                else:
                    (h, new[f"layers_{i}"], _), _ = mod((h, cache[f"layers_{i}"], None), mask, position_ids, p,
                                                        segment_ids, cache_index, kind)
            cache = new if cache is not None else None
            stats = None if cache is not None or per_layer[0] is None else jax.tree_util.tree_map(
                lambda *xs: jnp.stack(xs), *per_layer)
        if cache is None and stats is not None:  # the routers' load-balancing loss, for a caller that collects it
            self.sow("losses", "router_balance", cfg.router_aux_loss_coef * balance_loss(
                cfg, jax.tree_util.tree_map(lambda x: jnp.sum(x, axis=0), stats)))
        h = RMSNorm(cfg.rms_norm_eps, dt, cfg.norm_offset, name="norm")(h)

        if cfg.head == "classification":
            pooled = pool(h, attention_mask, cfg.pooling)
            score = Linear(cfg.num_labels, ("embed", None), False, dt, self.hooks, preferred_element_type=jnp.float32,
                           name="score")
            return score(pooled).astype(jnp.float32)
        h = h[:, h.shape[1] - length:]  # per-token outputs: not for virtual tokens
        if cfg.head == "token_classification":  # transformers' *ForTokenClassification: a biased `score`
            if text_type(cfg) == "gemma3_text":
                raise JaxftError("a token_classification head on Gemma 3: transformers has no "
                                 "Gemma3ForTokenClassification to read it (expected classification or causal_lm)")
            score = Linear(cfg.num_labels, ("embed", None), cfg.score_bias, dt, self.hooks,
                           preferred_element_type=jnp.float32, name="score")
            return score(h).astype(jnp.float32)
        if label_positions is not None:
            h = jnp.take_along_axis(h, label_positions[..., None], axis=1)
        if cache is not None:  # generation: logits, and the cache to carry on with
            return self.output_logits(h, embed), cache
        return self.output_logits(h, embed, return_hidden)

    def output_logits(self, h, embed, return_hidden: bool = False):
        """Final states -> logits [B, T, V] (or, with `return_hidden`, the states and output embedding, and
        Gemma 2's logit cap where it has one: `jaxft.cross_entropy.hidden_outputs`)."""
        cfg, dt = self.cfg, self.cfg.compute_dtype
        cap = (cfg.final_softcap,) if cfg.final_softcap else ()
        if cfg.tie_word_embeddings:
            if return_hidden:
                return (h, embed, *cap)
            logits = jnp.dot(h, embed.astype(dt).T, preferred_element_type=jnp.float32)
        else:
            lm_head = Linear(cfg.vocab_size, ("embed", "vocab"), False, dt, self.hooks,
                             preferred_element_type=jnp.float32, name="lm_head")
            if return_hidden and not any(hook.acts_on("lm_head") for hook in self.hooks):
                return (h, lm_head(h, kernel_only=True).T, *cap)
            logits = lm_head(h).astype(jnp.float32)
        return softcap(logits, cfg.final_softcap)


# ---------------------------------------------------------------------------------------------
# Hugging Face: config.json and weight names, both ways.

ARCH = {"llama": "Llama", "qwen2": "Qwen2", "qwen3": "Qwen3", "mistral": "Mistral", "glm": "Glm", "glm4": "Glm4",
        "phi3": "Phi3", "gemma": "Gemma", "gemma2": "Gemma2", "gemma3_text": "Gemma3", "qwen2_moe": "Qwen2Moe",
        "qwen3_moe": "Qwen3Moe", "mixtral": "Mixtral"}
GLM = ("glm", "glm4")
MOE = ("qwen2_moe", "qwen3_moe", "mixtral")
QWEN = ("qwen2", "qwen3", "qwen2_moe", "qwen3_moe")  # sliding windows from use_sliding_window and max_window_layers
GEMMA = ("gemma", "gemma2", "gemma3_text")
PARTIAL_ROTARY = GLM + ("phi3",)  # the model types whose rotary may cover part of each head
LAYER_TYPES = ("sliding_attention", "full_attention")
# transformers' Gemma3TextConfig defaults: a Gemma 3 with vision (`gemma3`, 4B and up) lists few text_config keys
GEMMA3_TEXT_DEFAULTS = dict(
    vocab_size=262208, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26, num_attention_heads=8,
    num_key_value_heads=4, head_dim=256, hidden_activation="gelu_pytorch_tanh", max_position_embeddings=131072,
    rms_norm_eps=1e-6, pad_token_id=0, eos_token_id=1, bos_token_id=2, tie_word_embeddings=True,
    query_pre_attn_scalar=256, sliding_window=4096, rope_theta=1e6, rope_local_base_freq=10000.0)
ACTIVATION_OF_HF = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh"}  # HF's name -> ours
HF_ACTIVATION = {"silu": "silu", "gelu_tanh": "gelu_pytorch_tanh"}


def config_from_hf(c: dict, file: str) -> LlamaConfig:
    """A HF config dict (as in config.json) -> LlamaConfig (the architecture; hf.py adds head and labels)."""
    mtype = c.get("model_type")
    if mtype == "gemma3":  # Gemma 3 with vision: its text model (the vision tower is not read)
        text = c.get("text_config") or {}
        if not isinstance(text, dict):
            raise JaxftError(f"{file}: text_config: expected an object of Gemma 3's text model keys")
        return config_from_hf({**GEMMA3_TEXT_DEFAULTS, **text, "model_type": "gemma3_text"}, file).replace(
            model_type="gemma3")
    rope = dict(c.get("rope_parameters") or c.get("rope_scaling") or {})
    local_theta = None
    if mtype == "gemma3_text":  # rope parameters per layer type (transformers 5), or rope_local_base_freq
        local = dict(rope.pop("sliding_attention", None) or {})
        rope = dict(rope.pop("full_attention", None) or rope)
        local_theta = float(local.get("rope_theta", c.get("rope_local_base_freq", 10000.0)))
        if local.get("rope_type", "default") != "default":
            raise JaxftError(f"{file}: the sliding layers' rope_type {local['rope_type']!r} is not supported "
                             "(expected 'default')")
    theta = rope.pop("rope_theta", c.get("rope_theta", 1e6 if mtype == "gemma3_text" else 10000.0))
    # the rotated share of each head: GLM's 0.5 (in rope_parameters, or at the top level before transformers 5)
    partial = float(rope.pop("partial_rotary_factor", None) or c.get("partial_rotary_factor") or 1.0)
    if partial != 1.0 and mtype not in PARTIAL_ROTARY:
        raise JaxftError(f"{file}: partial_rotary_factor={partial} is not supported for {mtype} (expected 1.0)")
    rope = _rope_scaling(rope, c, file)
    missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                           "num_attention_heads") if k not in c]
    if missing:
        raise JaxftError(f"{file}: missing {', '.join(missing)}")
    window, types = _layer_types(c, mtype, file)
    gemma = mtype in GEMMA
    if c.get("use_bidirectional_attention"):
        raise JaxftError(f"{file}: use_bidirectional_attention=true (an embedding model) is not supported: jaxft's "
                         f"{mtype} is a causal decoder")
    act = c.get("hidden_activation") or c.get("hidden_act") or ("gelu_pytorch_tanh" if gemma else "silu")
    if mtype == "gemma" and act == "gelu":  # transformers: Gemma's legacy "gelu" means the tanh approximation
        act = "gelu_pytorch_tanh"
    if act not in ACTIVATION_OF_HF:
        raise JaxftError(f"{file}: hidden activation {act!r} is not supported for {mtype} (expected "
                         f"{'gelu_pytorch_tanh' if gemma else 'silu'})")
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
    capped = mtype == "gemma2"  # Gemma 3 keeps attn_logit_softcapping in its config but does not apply it
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
        tie_word_embeddings=bool(c.get("tie_word_embeddings", gemma)),
        qkv_bias=mtype in ("qwen2", "qwen2_moe") or bool(c.get("attention_bias", glm)),
        o_bias=mtype not in ("qwen2", "qwen2_moe") and not glm and bool(c.get("attention_bias", False)),
        mlp_bias=bool(c.get("mlp_bias", False)),
        score_bias=bool(c.get("token_classification_bias", True)),
        sliding_window=window,
        qk_norm=mtype in ("qwen3", "qwen3_moe", "gemma3_text"),
        rotary_dim=rotary if rotary != head_dim else 0,
        rope_interleaved=glm,
        fused_gate_up=glm or mtype == "phi3",
        fused_qkv=mtype == "phi3",
        sandwich_norms=mtype in ("glm4", "gemma2", "gemma3_text"),
        norm_offset=gemma,
        hidden_act=ACTIVATION_OF_HF[act],
        embed_scale=gemma,
        query_pre_attn_scalar=float(c.get("query_pre_attn_scalar") or 256) if mtype in GEMMA[1:] else 0.0,
        attn_softcap=c.get("attn_logit_softcapping", 50.0) or None if capped else None,  # transformers' defaults
        final_softcap=c.get("final_logit_softcapping", 30.0 if capped else None) or None,
        layer_types=types,
        rope_local_theta=local_theta,
        **(_experts(c, mtype, file) if mtype in MOE else {}),
        model_type=mtype,
        bos_token_id=c.get("bos_token_id"),
        eos_token_id=c.get("eos_token_id") if not isinstance(c.get("eos_token_id"), list) else c["eos_token_id"][0],
        pad_token_id=c.get("pad_token_id"),
    )


def _layer_types(c: dict, mtype: str, file: str) -> tuple[int | None, tuple[str, ...] | None]:
    """config.json's window and layer kinds -> (sliding_window, layer_types): layer_types only where the
    layers differ, the window None where no layer slides. As transformers: Qwen2/3 slide from
    max_window_layers on (with use_sliding_window); Gemma 2 every other layer from the first, Gemma 3 all
    but every sliding_window_pattern-th; config.json's own layer_types first."""
    window, n = c.get("sliding_window", 4096 if mtype in GEMMA[1:] else None), c["num_hidden_layers"]
    if mtype in QWEN:
        if not c.get("use_sliding_window"):
            return None, None
        first = c.get("max_window_layers", 28)
        default = ["sliding_attention" if i >= first else "full_attention" for i in range(n)]
        if mtype == "qwen2_moe":  # transformers' Qwen2-MoE: odd-numbered layers (from 1) below max_window_layers
            default = ["sliding_attention" if (i + 1) % 2 and i < first else "full_attention" for i in range(n)]
        if mtype == "qwen3_moe":  # every layer, whatever max_window_layers says (no layer_types)
            return window, None
    elif mtype == "gemma2":
        default = ["sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(n)]
    elif mtype == "gemma3_text":
        pattern = c.get("sliding_window_pattern") or 6
        default = ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(n)]
    else:
        return window, None  # Llama's, Mistral's, Phi-3's one window (or none) for every layer
    types = c.get("layer_types") or default
    if len(types) != n or not set(types) <= set(LAYER_TYPES):
        raise JaxftError(f"{file}: layer_types {types!r}: expected {n} values, each one of {', '.join(LAYER_TYPES)}")
    if window is None or set(types) == {"full_attention"}:
        return None, None
    return window, (None if set(types) == {"sliding_attention"} else tuple(types))


def _experts(c: dict, mtype: str, file: str) -> dict:
    """config.json's mixture of experts -> LlamaConfig's fields; what jaxft does not run is an error here."""
    mixtral = mtype == "mixtral"  # transformers 5 writes num_local_experts for Qwen's too
    experts, k = c.get("num_local_experts") or c.get("num_experts"), c.get("num_experts_per_tok", 2)
    if not (isinstance(experts, int) and isinstance(k, int) and 0 < k <= experts):
        raise JaxftError(f"{file}: num_experts={experts}, num_experts_per_tok={k}: expected positive integers, no more "
                         "experts per token than experts")
    if c.get("mlp_only_layers") or c.get("decoder_sparse_step", 1) != 1:
        raise JaxftError(f"{file}: mlp_only_layers={c.get('mlp_only_layers')}, decoder_sparse_step="
                         f"{c.get('decoder_sparse_step')}: dense layers among the experts' are not supported (expected "
                         "[] and 1)")
    if c.get("router_jitter_noise"):
        raise JaxftError(f"{file}: router_jitter_noise={c['router_jitter_noise']} is not supported (expected 0)")
    coef = float(c.get("router_aux_loss_coef", 0.001)) if c.get("output_router_logits") else 0.0
    return dict(router_aux_loss_coef=coef, num_experts=experts, experts_per_token=k,
                moe_intermediate_size=c["intermediate_size"] if mixtral else c.get("moe_intermediate_size") or 0,
                norm_topk_prob=mixtral or bool(c.get("norm_topk_prob", False)),
                shared_expert_size=c.get("shared_expert_intermediate_size") or 0 if mtype == "qwen2_moe" else 0)


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


def text_type(cfg: LlamaConfig) -> str:
    """The model type jaxft writes: a Gemma 3 with vision is saved as its text model (`gemma3_text`)."""
    return "gemma3_text" if cfg.model_type == "gemma3" else cfg.model_type


def config_to_hf(cfg: LlamaConfig) -> dict:
    mtype = text_type(cfg)
    rope = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    rope.update(dict(cfg.rope_scaling or {}))
    if cfg.rotary_dim:
        rope["partial_rotary_factor"] = cfg.rotary_dim / cfg.dim_per_head
    c = {
        "model_type": mtype,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.dim_per_head,
        "hidden_act": HF_ACTIVATION[cfg.hidden_act],
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
    if not cfg.score_bias:
        c["token_classification_bias"] = False
    types = ["sliding_attention" if w else "full_attention" for w in cfg.layer_windows]
    if cfg.num_experts:
        c.update(num_experts_per_tok=cfg.experts_per_token, output_router_logits=bool(cfg.router_aux_loss_coef),
                 router_aux_loss_coef=cfg.router_aux_loss_coef or 0.001)
        if mtype == "mixtral":
            c.update(num_local_experts=cfg.num_experts, intermediate_size=cfg.moe_intermediate_size)
        else:
            c.update(num_experts=cfg.num_experts, moe_intermediate_size=cfg.moe_intermediate_size,
                     norm_topk_prob=cfg.norm_topk_prob, decoder_sparse_step=1, mlp_only_layers=[])
            if mtype == "qwen2_moe":
                c["shared_expert_intermediate_size"] = cfg.shared_expert_size
    if mtype in QWEN:
        sliding = cfg.sliding_window is not None
        c.update(
            use_sliding_window=sliding,
            sliding_window=cfg.sliding_window,
            max_window_layers=types.index("sliding_attention") if sliding else cfg.num_layers,
        )
        if mtype != "qwen3_moe":  # which has no layer_types (it slides everywhere or nowhere)
            c["layer_types"] = types
        if mtype in ("qwen3", "qwen3_moe"):  # Qwen3's q/k/v/o biases follow attention_bias, as Llama's
            c.update(attention_bias=cfg.qkv_bias)
    elif mtype in PARTIAL_ROTARY:  # transformers before 5 read the factor at the top level
        c.update(partial_rotary_factor=cfg.rotary_dim / cfg.dim_per_head if cfg.rotary_dim else 1.0)
        if mtype == "phi3":
            c["sliding_window"] = cfg.sliding_window
        else:
            c["attention_bias"] = cfg.qkv_bias
    elif mtype in GEMMA:
        c.update(hidden_activation=HF_ACTIVATION[cfg.hidden_act], attention_bias=cfg.qkv_bias)
        if mtype != "gemma":
            scalar = cfg.query_pre_attn_scalar  # an int in transformers' config
            c.update(query_pre_attn_scalar=int(scalar) if scalar == int(scalar) else scalar,
                     sliding_window=cfg.sliding_window, layer_types=types, attn_logit_softcapping=cfg.attn_softcap,
                     final_logit_softcapping=cfg.final_softcap)
        if mtype == "gemma3_text":  # rope parameters per layer type, the sliding layers' unscaled
            local = {"rope_type": "default", "rope_theta": cfg.rope_local_theta}
            c.update(rope_parameters={"full_attention": rope, "sliding_attention": local},
                     rope_local_base_freq=cfg.rope_local_theta)
            c.pop("rope_scaling", None)
    else:
        c.update(attention_bias=cfg.qkv_bias, mlp_bias=cfg.mlp_bias)
        if mtype in ("mistral", "mixtral"):
            c["sliding_window"] = cfg.sliding_window
    return c


def architecture(cfg: LlamaConfig) -> str:
    mtype = text_type(cfg)
    if cfg.head == "classification":  # Gemma 3's text-only classifier is Gemma3TextForSequenceClassification
        return ARCH[mtype] + ("Text" if mtype == "gemma3_text" else "") + "ForSequenceClassification"
    if cfg.head == "token_classification":
        return ARCH[mtype] + "ForTokenClassification"
    return ARCH[mtype] + "ForCausalLM"


_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)\.(weight|bias)")
# Gemma 3's text model inside one with vision: its files' prefix, and transformers 5's module names
TEXT_OF_VISION = re.compile(r"^(language_model\.model|model\.language_model)\.")
# One expert's projection (transformers' files: Qwen's names, Mixtral's w1 / w3 / w2), or a layer's fused experts
_EXPERT = re.compile(r"model\.layers\.(\d+)\.(?:mlp|block_sparse_moe)\.experts\.(\d+)\."
                     r"(gate_proj|up_proj|down_proj|w1|w3|w2)\.weight")
# transformers 5's in-memory experts, fused per layer
_FUSED = re.compile(r"model\.layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)")
_STACKED = re.compile(r"model\.layers\.(\d+)\.mlp\.experts\.(gate_proj|up_proj|down_proj)")  # `_stack_experts`
ROUTERS = ("gate", "shared_expert_gate")  # a mixture's projections that HF names without _proj


def _from_hf_key(key: str):
    """HF key -> (our path, layer index or None, transpose?). None for keys we do not use."""
    if key == "model.embed_tokens.weight":
        return ("embed_tokens",), None, False
    if key == "model.norm.weight":
        return ("norm", "weight"), None, False
    if key in ("lm_head.weight", "score.weight"):
        return (key.split(".")[0], "kernel"), None, True
    if key == "score.bias":  # a token classifier's
        return ("score", "bias"), None, False
    m = _STACKED.fullmatch(key)
    if m:  # the experts stacked by `_stack_experts`, [E, in, out] already
        return ("mlp", "experts", m[2]), int(m[1]), False
    m = _LAYER.fullmatch(key)
    if not m:
        return None
    mods = tuple(m[2].replace("block_sparse_moe", "mlp").split("."))
    if m[3] == "bias":
        return mods + ("bias",), int(m[1]), False
    is_linear = mods[-1].endswith("_proj") or (mods[:-1] == ("mlp",) and mods[-1] in ROUTERS)
    return mods + ("kernel" if is_linear else "weight",), int(m[1]), is_linear


def _stack_experts(tensors: dict, cfg: LlamaConfig, where: str) -> dict:
    """One key per expert and projection, as transformers saves them -> one per layer and projection:
    `mlp.experts.gate_proj` and `up_proj` [E, D, F], `down_proj` [E, F, D], as the model holds them. A fused
    file's own gate_up_proj [E, 2F, D] (gate, then up) and down_proj [E, D, F] (transformers' in-memory
    layout) is transposed and split."""
    out, per = {}, {}
    for key, value in tensors.items():
        m = _EXPERT.fullmatch(key)
        if m:
            part = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}.get(m[3], m[3])
            per.setdefault((int(m[1]), part), {})[int(m[2])] = np.asarray(value).T
        elif m := _FUSED.fullmatch(key):
            value, where_ = np.swapaxes(np.asarray(value), 1, 2), f"model.layers.{m[1]}.mlp.experts"
            parts = zip(("gate_proj", "up_proj"), np.split(value, 2, axis=-1)) if m[2] == "gate_up_proj" else [
                ("down_proj", value)]
            out.update({f"{where_}.{name}": v for name, v in parts})
        else:
            out[key] = value
    stacked = {}
    for (layer, part), experts in per.items():
        missing = sorted(set(range(cfg.num_experts)) - set(experts))
        if missing:
            raise JaxftError(f"{where}: layer {layer} has no {part} for expert {missing[0]} (expected "
                             f"{cfg.num_experts} experts)")
        stacked[layer, part] = np.stack([experts[e] for e in range(cfg.num_experts)])
    for layer in sorted({layer for layer, _ in per}):
        parts = [stacked.get((layer, p)) for p in ("gate_proj", "up_proj", "down_proj")]
        if any(p is None for p in parts):
            raise JaxftError(f"{where}: layer {layer}'s experts lack gate_proj, up_proj or down_proj (w1, w3, w2)")
        out.update({f"model.layers.{layer}.mlp.experts.{p}": v for p, v in zip(("gate_proj", "up_proj", "down_proj"),
                                                                               parts)})
    return out


def params_from_hf(tensors: dict[str, np.ndarray], cfg: LlamaConfig, where: str = "checkpoint") -> dict:
    if cfg.model_type == "gemma3":  # the text model's keys, as files (language_model.model.) or modules name them
        tensors = {TEXT_OF_VISION.sub("model.", k).replace("language_model.lm_head", "lm_head"): v
                   for k, v in tensors.items()}
    if cfg.num_experts:
        tensors = _stack_experts(tensors, cfg, where)
    tensors = {k: hf_order(cfg, k.rsplit(".", 1)[0], v, to_hf=False) for k, v in tensors.items()}  # weight, bias
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
            kernel = path[-1] == "kernel"  # a token classifier's score has a bias
            out[f"{path[0]}.{'weight' if kernel else 'bias'}"] = value.T if kernel else value
        elif per_layer is not None:
            for i, (*mods, leaf), v in per_layer:
                if mods == ["mlp", "experts"]:  # one key per expert, as transformers saves them
                    out.update(_expert_keys(i, leaf, v, cfg))
                    continue
                if cfg.model_type == "mixtral" and mods[0] == "mlp":
                    mods[0] = "block_sparse_moe"
                name = "bias" if leaf == "bias" else "weight"
                out[f"model.layers.{i}.{'.'.join(mods)}.{name}"] = v.T if leaf == "kernel" else v
        else:
            raise ValueError(f"no Hugging Face name for parameter {'/'.join(path)}")
    return {k: np.ascontiguousarray(hf_order(cfg, k.rsplit(".", 1)[0], v)) for k, v in out.items()}


def _expert_keys(layer: int, leaf: str, value, cfg: LlamaConfig) -> dict:
    """A layer's stacked experts -> transformers' key per expert and projection ([out, in])."""
    mixtral = cfg.model_type == "mixtral"
    where = f"model.layers.{layer}.{'block_sparse_moe' if mixtral else 'mlp'}.experts"
    name = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}[leaf] if mixtral else leaf
    return {f"{where}.{e}.{name}.weight": value[e].T for e in range(value.shape[0])}


def hf_module(path: str, cfg=None) -> str:
    """'layers.3.self_attn.q_proj' -> 'model.layers.3.self_attn.q_proj' (a Gemma 3 with vision:
    'model.language_model.layers.3...', as PEFT finds it there); the heads keep their names."""
    if path.split(".")[0] in ("lm_head", "score"):
        return path
    return ("model.language_model." if cfg is not None and cfg.model_type == "gemma3" else "model.") + path


def our_module(name: str) -> str | None:
    if name.split(".")[0] in ("lm_head", "score"):
        return name
    name = TEXT_OF_VISION.sub("model.", name)
    return name[len("model."):] if name.startswith("model.") else None


def matmul_weights(cfg: LlamaConfig) -> int:
    """Weights that take part in a matmul for every token: q, k, v, o, gate, up, down per layer, plus
    the output head (the vocabulary projection, or the classifier's tiny one). The input embedding is a
    lookup: 0 FLOPs."""
    d = cfg.dim_per_head
    q, kv = cfg.num_heads * d, cfg.num_kv_heads * d
    per_layer = cfg.hidden_size * (q + 2 * kv) + q * cfg.hidden_size + 3 * cfg.hidden_size * mlp_width(cfg)
    if cfg.num_experts:  # the router (and Qwen2-MoE's shared expert's gate)
        per_layer += cfg.hidden_size * (cfg.num_experts + bool(cfg.shared_expert_size))
    return cfg.num_layers * per_layer + head_weights(cfg)


def mlp_width(cfg: LlamaConfig) -> int:
    """The gated MLP width a token goes through: a mixture's chosen experts' (and shared expert's) together."""
    if cfg.num_experts:
        return cfg.experts_per_token * cfg.moe_intermediate_size + cfg.shared_expert_size
    return cfg.intermediate_size


def head_weights(cfg: LlamaConfig) -> int:
    """The output head's matmul weights: the vocabulary projection, or the classifier's tiny one."""
    classifies = cfg.head in ("classification", "token_classification")
    return cfg.hidden_size * (cfg.num_labels if classifies else cfg.vocab_size)


def activation_blocks(cfg: LlamaConfig) -> tuple[Blocks, ...]:
    """What `jaxft.plan` counts: one stack of pre-norm blocks, RMSNorms (GLM-4-0414, Gemma 2/3: two more, on
    the attention and MLP outputs), gated MLP; a mixture's router, routed experts (`Blocks.experts`) and
    Qwen2-MoE's shared expert instead."""
    d, hd = cfg.hidden_size, cfg.dim_per_head
    q, kv, f = cfg.num_heads * hd, cfg.num_kv_heads * hd, mlp_width(cfg)  # a mixture: its experts' widths together
    if cfg.num_experts:
        fs = cfg.shared_expert_size
        mlp = (("gate", "mlp_in", d, cfg.num_experts),
               *((("gate_proj", "mlp_in", d, fs), ("up_proj", "mlp_in", d, fs), ("down_proj", "mlp_act", fs, d),
                  ("shared_expert_gate", "mlp_in", d, 1)) if fs else ()))
    elif cfg.fused_gate_up:
        mlp = (("gate_up_proj", "mlp_in", d, 2 * f), ("down_proj", "mlp_act", f, d))
    else:
        mlp = (("gate_proj", "mlp_in", d, f), ("up_proj", "mlp_in", d, f), ("down_proj", "mlp_act", f, d))
    return (Blocks("layers", cfg.num_layers, d, cfg.num_heads, cfg.num_kv_heads, hd, f,
                   norms=4 if cfg.sandwich_norms else 2,
                   window=max(cfg.layer_windows, key=lambda w: w or math.inf),  # None where a layer attends to all
                   projections=(
        *((("qkv_proj", "attn_in", d, q + 2 * kv),) if cfg.fused_qkv else
          (("q_proj", "attn_in", d, q), ("k_proj", "attn_in", d, kv), ("v_proj", "attn_in", d, kv))),
        ("o_proj", "attn_out", q, d), *mlp),
        experts=("mlp/experts", cfg.num_experts, cfg.experts_per_token, cfg.moe_intermediate_size)
        if cfg.num_experts else ()),)


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
    # PEFT's IA3 defaults: keys for Llama and Mistral, queries for Qwen and Gemma
    ia3_targets=lambda cfg: "qkv_proj,down_proj" if cfg.fused_qkv else (
        "q_proj" if cfg.model_type.startswith(("qwen", "gemma")) else "k_proj") + ",v_proj" + (
        ",down_proj" if not cfg.num_experts or cfg.shared_expert_size else ""),  # experts are no projections
    ia3_feedforward="down_proj",
    head_params=r"^(score|lm_head)/",
    classifier_params=r"^score/",
    kv_layout=lambda cfg: (cfg.num_layers, cfg.num_kv_heads, cfg.dim_per_head),
    matmul_weights=matmul_weights,
    head_weights=head_weights,
    activation_blocks=activation_blocks,
    init_cache=init_cache,
    hf_rows=hf_rows,
    cache_reset=lambda cfg: rope_switch_length(cfg.rope_scaling),
    tied_embedding=("embed_tokens", ("lm_head.weight",)),
    projections=r"(^|/)(q|k|v|o|gate|up|down|gate_up|qkv)_proj/kernel$|(^|/)experts/(gate|up|down)_proj$",
)
