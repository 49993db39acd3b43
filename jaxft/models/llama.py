"""The Llama family as one functional Flax decoder: Llama 2/3, Qwen2, Mistral.

Differences between the variants are data in `LlamaConfig` (q/k/v bias, explicit head_dim, rope
scaling, tied embeddings, sliding window), not subclasses. Module names follow Hugging Face
(`self_attn.q_proj`, `mlp.gate_proj`, ...) so checkpoint and PEFT keys map one to one.

Methods hook in at named points: every `Linear` (see `layers.py`) and `prefix`, which returns
per-layer key/value prefixes (P-Tuning v2) that attention prepends to its keys and values.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxft.models.attention import attention
from jaxft.models.layers import PROJECTION, Linear, RMSNorm, param_with_axes, rope
from jaxft.sharding import constrain

HEADS = ("causal_lm", "classification")
POOLING = ("last", "mean")
REMAT = ("none", "full", "save_dots", "offload")


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
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
    model_type: str = "llama"
    bos_token_id: int | None = 1
    eos_token_id: int | None = 2
    pad_token_id: int | None = None
    # What jaxft adds on top of the architecture:
    head: str = "causal_lm"
    num_labels: int = 2
    pooling: str = "last"  # classification: the state the head reads (see `pool`)
    labels: tuple[str, ...] | None = None  # classification: the class names (HF id2label); None: LABEL_0, ...
    dtype: str = "float32"  # compute dtype; trainable parameters stay fp32 (master weights)
    param_dtype: str = "float32"  # storage of the frozen base (see `jaxft.train.init_params`)
    scan_layers: bool = True
    remat: str = "none"  # what the backward pass keeps of each layer: see `remat_policy`
    attention: str = "xla"  # xla | cudnn | splash | flash | auto: see `jaxft.models.attention`

    def __post_init__(self):  # the old boolean `remat` setting: True is "full"
        if isinstance(self.remat, bool):
            object.__setattr__(self, "remat", "full" if self.remat else "none")

    @property
    def dim_per_head(self) -> int:
        return self.head_dim or self.hidden_size // self.num_heads

    @property
    def compute_dtype(self):
        return jnp.dtype(self.dtype)

    def replace(self, **kw) -> "LlamaConfig":
        return dataclasses.replace(self, **kw)


class Attention(nn.Module):
    cfg: LlamaConfig
    hooks: Sequence[Any] = ()

    @nn.compact
    def __call__(self, x, mask, positions, prefix):
        """mask: the [B, T] padding mask; each implementation builds causality, window and prefix from it."""
        cfg, dt = self.cfg, self.cfg.compute_dtype
        h, kv, d = cfg.num_heads, cfg.num_kv_heads, cfg.dim_per_head
        b, t, _ = x.shape
        proj = lambda n, f, ax, bias: Linear(f, ax, bias, dt, self.hooks, name=n)  # noqa: E731
        q = proj("q_proj", h * d, ("embed", "heads"), cfg.qkv_bias)(x).reshape(b, t, h, d)
        k = proj("k_proj", kv * d, ("embed", "kv_heads"), cfg.qkv_bias)(x).reshape(b, t, kv, d)
        v = proj("v_proj", kv * d, ("embed", "kv_heads"), cfg.qkv_bias)(x).reshape(b, t, kv, d)
        q, k = rope(q, k, positions, d, cfg.rope_theta, cfg.rope_scaling, cfg.max_position_embeddings)
        self.sow("intermediates", "keys_values", (k, v))  # stored only when asked for (e.g. prefix init)
        num_prefix = 0
        if prefix is not None:  # learned keys/values, no rotary: they are not at a position
            num_prefix = prefix[0].shape[1]
            k = jnp.concatenate([prefix[0].astype(dt), k], axis=1)
            v = jnp.concatenate([prefix[1].astype(dt), v], axis=1)
        q = constrain(q, ("batch", "length", "act_heads", None))  # heads stay split (tensor parallel)
        k, v = (constrain(a, ("batch", "length", "act_kv_heads", None)) for a in (k, v))
        out = attention(q, k, v, mask, num_prefix, cfg.sliding_window, dt, cfg.attention)
        out = constrain(out, ("batch", "length", "act_heads"))
        return proj("o_proj", cfg.hidden_size, ("heads", "embed"), cfg.o_bias)(out)


class MLP(nn.Module):
    cfg: LlamaConfig
    hooks: Sequence[Any] = ()

    @nn.compact
    def __call__(self, x):
        cfg, dt = self.cfg, self.cfg.compute_dtype
        proj = lambda n, f, ax: Linear(f, ax, cfg.mlp_bias, dt, self.hooks, name=n)  # noqa: E731
        gate = proj("gate_proj", cfg.intermediate_size, ("embed", "mlp"))(x)
        up = proj("up_proj", cfg.intermediate_size, ("embed", "mlp"))(x)
        hidden = constrain(nn.silu(gate) * up, ("batch", "length", "act_mlp"))  # split like gate/up's outputs
        return proj("down_proj", cfg.hidden_size, ("mlp", "embed"))(hidden)


class DecoderLayer(nn.Module):
    cfg: LlamaConfig
    hooks: Sequence[Any] = ()

    @nn.compact
    def __call__(self, h, mask, positions, prefix):
        cfg = self.cfg
        x = RMSNorm(cfg.rms_norm_eps, cfg.compute_dtype, name="input_layernorm")(h)
        h = h + Attention(cfg, self.hooks, name="self_attn")(x, mask, positions, prefix)
        x = RMSNorm(cfg.rms_norm_eps, cfg.compute_dtype, name="post_attention_layernorm")(h)
        h = h + MLP(cfg, self.hooks, name="mlp")(x)
        h = nn.with_logical_constraint(h, ("batch", "length", "act_embed"))
        return h, None


def last_token(mask):
    """[B, T] padding mask -> index of each row's last real token, the state a classifier head reads."""
    return mask.shape[1] - 1 - jnp.argmax(mask[:, ::-1], axis=-1)


def pool(h, mask, how: str):
    """[B, T, D] final states -> [B, D], what the classifier head reads.

    "last": the last real token's state, as HF's `*ForSequenceClassification` decoders do.
    "mean": the average over real tokens. A frozen decoder's last state is trained to predict the next
    token, not to summarise the sentence; the mean lets every token's own features (and what a method
    writes into them) reach the head (P-Tuning v2 on jaxft-tiny: 0.764 against 0.672 SST-2 dev accuracy).
    """
    if how == "last":
        return h[jnp.arange(h.shape[0]), last_token(mask)]
    if how == "mean":  # summed in fp32: bf16 sums of long sequences lose the low bits
        m = mask.astype(jnp.float32)[..., None]
        return ((h.astype(jnp.float32) * m).sum(axis=1) / jnp.maximum(m.sum(axis=1), 1)).astype(h.dtype)
    raise ValueError(f"pooling={how!r}: expected one of {POOLING}")


def remat_policy(name: str):
    """`model.remat` -> the `jax.checkpoint` policy of each decoder layer (None: no remat at all).

    full: keep only the layer's input, recompute everything in the backward pass. save_dots: keep
    every projection's output (named in `Linear`), recompute norms, rotary, attention and the MLP
    activation. offload: as save_dots, but the kept tensors wait in pinned host memory. On CPU the
    device memory is host memory: offload runs and keeps exactly what save_dots keeps.
    """
    if name == "none":
        return None
    if name == "full":
        return jax.checkpoint_policies.nothing_saveable
    if name == "save_dots":
        return jax.checkpoint_policies.save_only_these_names(PROJECTION)
    if name == "offload":
        kinds = {m.kind for m in jax.local_devices()[0].addressable_memories()}
        if "pinned_host" not in kinds:
            from jaxft.errors import JaxftError

            raise JaxftError(
                f"model.remat='offload': the {jax.default_backend()} backend has no pinned host memory "
                f"(memory kinds {sorted(kinds)}); use save_dots or full"
            )
        return jax.checkpoint_policies.save_and_offload_only_these_names(
            names_which_can_be_saved=(), names_which_can_be_offloaded=(PROJECTION,),
            offload_src="device", offload_dst="pinned_host",
        )
    raise ValueError(f"remat={name!r}: expected one of {REMAT}")


class LlamaModel(nn.Module):
    """`apply({"params": p}, input_ids, attention_mask)` -> logits [B, T, V] or [B, num_labels]."""

    cfg: LlamaConfig
    hooks: Sequence[Any] = ()

    @nn.compact
    def __call__(self, input_ids, attention_mask=None, position_ids=None, return_hidden: bool = False):
        """`return_hidden` (causal LM): return (final hidden states [B, T, D], output embedding [V, D])
        instead of logits, for a loss that fuses the vocabulary projection (`jaxft.cross_entropy`).
        Logits come back as usual where a method hooks the LM head, and for classification."""
        cfg, dt = self.cfg, self.cfg.compute_dtype
        if attention_mask is None:
            attention_mask = jnp.ones_like(input_ids)
        embed = param_with_axes(
            self, "embed_tokens", nn.initializers.normal(0.02), (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed")
        )
        # FSDP gathers the table like every other weight, rather than swapping looked-up rows all-to-all.
        h = jnp.take(constrain(embed, ("vocab", None)), input_ids, axis=0).astype(dt)
        h = nn.with_logical_constraint(h, ("batch", "length", "act_embed"))

        prefixes = [p for p in (hook.prefix(self, input_ids.shape[0]) for hook in self.hooks) if p is not None]
        prefix = None
        if prefixes:  # each: (keys, values) of shape [layers, B, P, KV, D]
            prefix = tuple(jnp.concatenate([p[i] for p in prefixes], axis=2) for i in (0, 1))
        num_prefix = prefix[0].shape[2] if prefix is not None else 0
        mask = attention_mask  # [B, T]: attention derives causality, window and prefix from it, no dense mask
        if position_ids is None:  # real tokens count from 0 after the prefix, as they do after a KV cache
            position_ids = jnp.maximum(jnp.cumsum(attention_mask, axis=-1) - 1, 0) + num_prefix

        policy = remat_policy(cfg.remat)
        layer = DecoderLayer
        if policy is not None:
            layer = nn.remat(DecoderLayer, prevent_cse=not cfg.scan_layers, policy=policy)
        if cfg.scan_layers:
            stack = nn.scan(
                layer,
                variable_axes={"params": 0, "intermediates": 0},
                split_rngs={"params": True, "dropout": True},
                in_axes=(nn.broadcast, nn.broadcast, 0),
                length=cfg.num_layers,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )
            h, _ = stack(cfg, self.hooks, name="layers")(h, mask, position_ids, prefix)
        else:
            for i in range(cfg.num_layers):
                p = None if prefix is None else (prefix[0][i], prefix[1][i])
                h, _ = layer(cfg, self.hooks, name=f"layers_{i}")(h, mask, position_ids, p)
        h = RMSNorm(cfg.rms_norm_eps, dt, name="norm")(h)

        if cfg.head == "classification":
            pooled = pool(h, attention_mask, cfg.pooling)
            score = Linear(cfg.num_labels, ("embed", None), False, dt, self.hooks, preferred_element_type=jnp.float32,
                           name="score")
            return score(pooled).astype(jnp.float32)
        if cfg.tie_word_embeddings:
            return (h, embed) if return_hidden else jnp.dot(h, embed.astype(dt).T, preferred_element_type=jnp.float32)
        lm_head = Linear(cfg.vocab_size, ("embed", "vocab"), False, dt, self.hooks, preferred_element_type=jnp.float32,
                         name="lm_head")
        if return_hidden and not any(hook.acts_on("lm_head") for hook in self.hooks):
            return h, lm_head(h, kernel_only=True).T
        return lm_head(h).astype(jnp.float32)
