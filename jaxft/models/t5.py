"""The T5 family as one functional Flax encoder-decoder: T5 v1.0, T5 v1.1 / flan-t5, mT5.

The variants differ by data in `T5Config`: the feed-forward (`relu` DenseReluDense wi/wo, or
`gated-gelu` wi_0/wi_1/wo), whether the LM head is the shared embedding (`tie_word_embeddings`) and
whether the decoder output is scaled by d_model**-0.5 before it (`scale_decoder_outputs`; v1.0 does).
As in transformers: one embedding table `shared` for encoder, decoder and (tied) head, T5's RMS layer
norm, no 1/sqrt(d) scaling of the attention scores, and a learned relative position bias: one table
per stack (bidirectional buckets in the encoder, causal ones in the decoder), which HF stores in block
0 and every block reuses. Here the table belongs to the stack (`encoder/relative_attention_bias`), so
the blocks are identical and scan. Module names follow HF (`layer_0.SelfAttention.q`,
`layer_1.DenseReluDense.wi`, `EncDecAttention`, ...) so checkpoint and PEFT keys map one to one.

Attention is computed here with an einsum (fp32 scores plus the additive bias); the fused kernels of
`jaxft.models.attention` take no bias, so `model.attention` may only be `xla` or `auto` (= xla).

Hooks: every `Linear`; `embeddings` on the encoder's input (virtual tokens stay in the encoder states,
which the decoder cross-attends to); `block_output` after each sublayer (where = "attention",
"cross_attention", "mlp"); `prefix`, P-Tuning v2, as HF PEFT applies prefix tuning to T5 (peft 0.21,
transformers 5): the prefix keys/values enter the *decoder self-attention* only (PEFT resets the
cross-attention cache and the encoder takes no cache), as if they were P earlier decoder tokens, so the
real decoder tokens' relative positions start at P; decoder layer i reads the prefix table's layer slot
2i mod layers, as PEFT's seq2seq layout hands it out (`peft_prefix_slots`).

Generation (see `jaxft.models.family`): `encode` once, then `decode` with the cache of
`init_cache(cfg, batch, max_length, dtype)`: decoder self-attention keys/values per slot; the
cross-attention keys/values are computed from the encoder states by the first `decode` call that finds
none in the cache and returned in it, so later calls (and their compiled step) reuse them.
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
from jaxft.models.family import Blocks, Family, Settings, stack_layers
from jaxft.models.layers import Linear, RMSNorm, block_output, gated, param_with_axes, pool, recomputed, remat
from jaxft.sharding import constrain

HEADS = ("seq2seq_lm", "classification", "token_classification")
TASK_HEADS = ("classification", "token_classification")  # under "transformer." in HF, beside their head module
ENCODER_ONLY = ("token_classification",)  # heads that read the encoder alone: no decoder (`family.decodes`)
HEAD_MODULES = ("lm_head", "classification_head", "classifier")
ACTIVATIONS = {
    "relu": nn.relu,
    "gelu": lambda x: nn.gelu(x, approximate=False),
    "gelu_new": lambda x: nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: nn.gelu(x, approximate=True),
    "silu": nn.silu,
    "swish": nn.silu,
}
LINEARS = ("q", "k", "v", "o", "wi", "wo", "wi_0", "wi_1")


@dataclasses.dataclass(frozen=True)
class T5Config(Settings):
    head: str = "seq2seq_lm"
    vocab_size: int = 32128
    d_model: int = 512
    d_kv: int = 64
    d_ff: int = 2048
    num_layers: int = 6
    num_decoder_layers: int = 6
    num_heads: int = 8
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    feed_forward_proj: str = "relu"  # relu (v1.0) | gated-gelu (v1.1, flan-t5, mT5) | [gated-]ACT
    tie_word_embeddings: bool = True  # the LM head is `shared` (else its own `lm_head`)
    scale_decoder_outputs: bool = True  # decoder output * d_model**-0.5 before the head (v1.0)
    dropout_rate: float = 0.1  # recorded for config.json; jaxft applies no dropout in the model
    model_type: str = "t5"
    pad_token_id: int | None = 0
    eos_token_id: int | None = 1
    decoder_start_token_id: int | None = 0

    @property
    def gated(self) -> bool:
        return self.feed_forward_proj.startswith("gated-")

    @property
    def dense_act_fn(self) -> str:
        act = self.feed_forward_proj.split("-")[-1]
        return "gelu_new" if self.feed_forward_proj == "gated-gelu" else act

    # The names the generic code (P-Tuning v2, PEFT export) reads.
    @property
    def hidden_size(self) -> int:
        return self.d_model

    @property
    def num_kv_heads(self) -> int:
        return self.num_heads

    @property
    def dim_per_head(self) -> int:
        return self.d_kv


# ---------------------------------------------------------------------------------------------
# Relative position bias and attention.


def relative_bucket(relative, bidirectional: bool, num_buckets: int, max_distance: int):
    """key position - query position -> T5's bucket (as transformers' `_relative_position_bucket`):
    exact buckets for small distances, logarithmic ones up to max_distance."""
    buckets = jnp.zeros_like(relative)
    if bidirectional:
        num_buckets //= 2
        buckets = buckets + (relative > 0).astype(relative.dtype) * num_buckets
        n = jnp.abs(relative)
    else:
        n = -jnp.minimum(relative, 0)
    max_exact = num_buckets // 2
    safe = jnp.maximum(n, 1).astype(jnp.float32)  # log(0) never reaches the result (n < max_exact there)
    large = max_exact + (jnp.log(safe / max_exact) / math.log(max_distance / max_exact)
                         * (num_buckets - max_exact)).astype(relative.dtype)
    large = jnp.minimum(large, num_buckets - 1)
    return buckets + jnp.where(n < max_exact, n, large)


def position_bias(table, query_pos, key_pos, bidirectional: bool, cfg: T5Config):
    """table [buckets, H]; query_pos [Tq], key_pos [Tk] -> the additive bias [1, H, Tq, Tk] (fp32)."""
    rel = key_pos[None, :].astype(jnp.int32) - query_pos[:, None].astype(jnp.int32)
    b = relative_bucket(rel, bidirectional, cfg.relative_attention_num_buckets, cfg.relative_attention_max_distance)
    return jnp.take(table.astype(jnp.float32), b, axis=0).transpose(2, 0, 1)[None]


def with_mask(bias, allowed):
    """bias [1|B, H, Tq, Tk] and allowed [B, Tq, Tk] -> one additive fp32 tensor [B, H, Tq, Tk]."""
    return jnp.where(allowed[:, None], bias, jnp.finfo(jnp.float32).min)


def attend(q, k, v, bias, dtype):
    """T5 attention: q [B, T, H, D], k, v [B, S, H, D], bias [B, H, T, S] -> [B, T, H*D]. No 1/sqrt(D):
    T5 folds the scale into its initialisation. Scores accumulate and softmax in fp32."""
    b, t, h, d = q.shape
    scores = jnp.einsum("bthd,bshd->bhts", q.astype(dtype), k.astype(dtype), preferred_element_type=jnp.float32)
    probs = jax.nn.softmax(scores + bias, axis=-1).astype(dtype)
    out = jnp.einsum("bhts,bshd->bthd", probs, v.astype(dtype), preferred_element_type=jnp.float32)
    return out.astype(dtype).reshape(b, t, h * d)


def check_attention(cfg: T5Config):
    if cfg.attention not in ("xla", "auto"):
        raise JaxftError(f"model.attention={cfg.attention!r}: T5 adds a relative position bias to the scores, which "
                         "the fused kernels do not take; use 'xla' (or 'auto', which is xla for T5)")


# ---------------------------------------------------------------------------------------------
# Blocks.


class Attention(nn.Module):
    """Self- or cross-attention (HF `T5Attention`). `kv_from`: the states keys and values come from."""

    cfg: T5Config
    hooks: Sequence[Any] = ()

    def project(self, name, x, features, axes):
        return Linear(features, axes, False, self.cfg.compute_dtype, self.hooks, init_std=self.init_std(name),
                      name=name)(x)

    def init_std(self, name):  # as transformers initialises T5 (factor 1)
        cfg = self.cfg
        special = {"q": (cfg.d_model * cfg.d_kv) ** -0.5, "o": (cfg.num_heads * cfg.d_kv) ** -0.5}
        return special.get(name, cfg.d_model ** -0.5)

    def keys_values(self, kv_from):
        cfg = self.cfg
        b, s, _ = kv_from.shape
        return tuple(self.project(n, kv_from, cfg.num_heads * cfg.d_kv, ("embed", "heads"))
                     .reshape(b, s, cfg.num_heads, cfg.d_kv) for n in ("k", "v"))

    @nn.compact
    def __call__(self, x, bias, kv_from=None, kv=None, prefix=None, cache=None, cache_index=None):
        """x [B, T, D]; bias [B, H, T, keys] with the mask folded in. Keys and values: `kv` if given
        (cached cross-attention), else projected from `kv_from` (or x); with `cache` (k, v [B, S, H, D])
        the new ones are written at cache_index and the whole cache is attended to. `prefix` (k, v
        [B, P, H, D]) goes in front. Returns (output [B, T, D], the keys/values to cache or None)."""
        cfg, dt = self.cfg, self.cfg.compute_dtype
        b, t, _ = x.shape
        q = self.project("q", x, cfg.num_heads * cfg.d_kv, ("embed", "heads")).reshape(b, t, cfg.num_heads, cfg.d_kv)
        if kv is None:
            kv = self.keys_values(x if kv_from is None else kv_from)
        k, v = kv
        self.sow("intermediates", "keys_values", (k, v))  # stored only when asked for (prefix init)
        new = kv
        if cache is not None:
            at = (0, cache_index, 0, 0)
            k = jax.lax.dynamic_update_slice(cache[0], k.astype(cache[0].dtype), at)
            v = jax.lax.dynamic_update_slice(cache[1], v.astype(cache[1].dtype), at)
            new = (k, v)
        if prefix is not None:
            k = jnp.concatenate([prefix[0].astype(k.dtype), k], axis=1)
            v = jnp.concatenate([prefix[1].astype(v.dtype), v], axis=1)
        q = constrain(q, ("batch", "length", "act_heads", None))
        k, v = (constrain(a, ("batch", "length", "act_heads", None)) for a in (k, v))
        out = constrain(attend(q, k, v, bias, dt), ("batch", "length", "act_heads"))
        return self.project("o", out, cfg.d_model, ("heads", "embed")), new


class FeedForward(nn.Module):
    """HF `T5DenseActDense` (wi, wo) or `T5DenseGatedActDense` (wi_0, wi_1, wo)."""

    cfg: T5Config
    hooks: Sequence[Any] = ()

    @nn.compact
    def __call__(self, x):
        cfg, dt = self.cfg, self.cfg.compute_dtype
        proj = lambda n, f, ax, std: Linear(f, ax, False, dt, self.hooks, init_std=std, name=n)  # noqa: E731
        act = ACTIVATIONS[cfg.dense_act_fn]
        if cfg.gated:
            gate = proj("wi_0", cfg.d_ff, ("embed", "mlp"), cfg.d_model ** -0.5)(x)
            h = gated(act, gate, proj("wi_1", cfg.d_ff, ("embed", "mlp"), cfg.d_model ** -0.5)(x))
        else:
            h = recomputed(act)(proj("wi", cfg.d_ff, ("embed", "mlp"), cfg.d_model ** -0.5)(x))
        h = constrain(h, ("batch", "length", "act_mlp"))
        return proj("wo", cfg.d_model, ("mlp", "embed"), cfg.d_ff ** -0.5)(h)


def norm(cfg, name):
    return RMSNorm(cfg.layer_norm_epsilon, cfg.compute_dtype, name=name)


class SelfAttentionLayer(nn.Module):  # HF T5LayerSelfAttention: layer_norm + SelfAttention
    cfg: T5Config
    hooks: Sequence[Any] = ()

    @nn.compact
    def __call__(self, h, bias, prefix=None, cache=None, cache_index=None):
        x = norm(self.cfg, "layer_norm")(h)
        out, new = Attention(self.cfg, self.hooks, name="SelfAttention")(x, bias, prefix=prefix, cache=cache,
                                                                         cache_index=cache_index)
        return out, new


class CrossAttentionLayer(nn.Module):  # HF T5LayerCrossAttention: layer_norm + EncDecAttention
    cfg: T5Config
    hooks: Sequence[Any] = ()

    @nn.compact
    def __call__(self, h, bias, encoder_states, kv):
        x = norm(self.cfg, "layer_norm")(h)
        return Attention(self.cfg, self.hooks, name="EncDecAttention")(x, bias, kv_from=encoder_states, kv=kv)


class FeedForwardLayer(nn.Module):  # HF T5LayerFF: layer_norm + DenseReluDense
    cfg: T5Config
    hooks: Sequence[Any] = ()

    @nn.compact
    def __call__(self, h):
        return FeedForward(self.cfg, self.hooks, name="DenseReluDense")(norm(self.cfg, "layer_norm")(h))


class EncoderBlock(nn.Module):
    cfg: T5Config
    hooks: Sequence[Any] = ()

    @nn.compact
    def __call__(self, h, bias, xs):  # xs: the scan's per-layer inputs (none)
        out, _ = SelfAttentionLayer(self.cfg, self.hooks, name="layer_0")(h, bias)
        h = h + block_output(self, out, "attention")
        h = h + block_output(self, FeedForwardLayer(self.cfg, self.hooks, name="layer_1")(h), "mlp")
        return nn.with_logical_constraint(h, ("batch", "length", "act_embed")), None


class DecoderBlock(nn.Module):
    cfg: T5Config
    hooks: Sequence[Any] = ()

    @nn.compact
    def __call__(self, h, self_bias, cross_bias, encoder_states, xs):
        """xs: this layer's optional "prefix_k/v", "self_k/v" (cache), "cross_k/v" (cached cross keys and
        values); returns the layer's new cache entries."""
        get = lambda a, b: (xs[a], xs[b]) if a in xs else None  # noqa: E731
        cache = get("self_k", "self_v")
        out, self_kv = SelfAttentionLayer(self.cfg, self.hooks, name="layer_0")(
            h, self_bias, get("prefix_k", "prefix_v"), cache, xs.get("cache_index"))
        h = h + block_output(self, out, "attention")
        out, cross_kv = CrossAttentionLayer(self.cfg, self.hooks, name="layer_1")(
            h, cross_bias, encoder_states, get("cross_k", "cross_v"))
        h = h + block_output(self, out, "cross_attention")
        h = h + block_output(self, FeedForwardLayer(self.cfg, self.hooks, name="layer_2")(h), "mlp")
        h = nn.with_logical_constraint(h, ("batch", "length", "act_embed"))
        new = {}
        if cache is not None:
            new = {"self_k": self_kv[0], "self_v": self_kv[1], "cross_k": cross_kv[0], "cross_v": cross_kv[1]}
        return h, new


def run_blocks(block, cfg, hooks, n: int, carry, broadcast: tuple, xs: dict):
    """Apply n blocks, scanned (params stacked under "block") or unrolled ("block_0", ...). `xs`: per-layer
    arrays with a leading layer axis. Returns (h, the blocks' stacked outputs)."""
    block = remat(block, cfg)
    if cfg.scan_layers:
        stack = nn.scan(
            block,
            variable_axes={"params": 0, "intermediates": 0},
            split_rngs={"params": True, "dropout": True},
            in_axes=(nn.broadcast,) * len(broadcast) + (0,),
            length=n,
            metadata_params={nn.PARTITION_NAME: "layers"},
        )
        return stack(cfg, hooks, name="block")(carry, *broadcast, xs)
    outs = []
    for i in range(n):
        carry, out = block(cfg, hooks, name=f"block_{i}")(carry, *broadcast, jax.tree_util.tree_map(lambda a: a[i], xs))
        outs.append(out)
    return carry, jax.tree_util.tree_map(lambda *a: jnp.stack(a), *outs) if outs and outs[0] is not None else None


class Encoder(nn.Module):
    cfg: T5Config
    hooks: Sequence[Any] = ()

    @nn.compact
    def __call__(self, h, mask):
        cfg = self.cfg
        table = param_with_axes(self, "relative_attention_bias", nn.initializers.normal(cfg.d_model ** -0.5),
                                (cfg.relative_attention_num_buckets, cfg.num_heads), (None, "heads"))
        pos = jnp.arange(h.shape[1])
        bias = with_mask(position_bias(table, pos, pos, True, cfg), jnp.broadcast_to(
            mask[:, None, :].astype(bool), (h.shape[0], h.shape[1], h.shape[1])))
        h, _ = run_blocks(EncoderBlock, cfg, self.hooks, cfg.num_layers, h, (bias,), {})
        return norm(cfg, "final_layer_norm")(h)


class Decoder(nn.Module):
    cfg: T5Config
    hooks: Sequence[Any] = ()

    @nn.compact
    def __call__(self, h, mask, encoder_states, encoder_mask, prefix=None, cache=None, cache_index=None):
        """h [B, t, D] decoder embeddings; mask [B, S] (S = t, or the cache length); prefix (k, v)
        [L, B, P, H, Dk]. Returns (states [B, t, D], new cache or None)."""
        cfg = self.cfg
        b, t, _ = h.shape
        table = param_with_axes(self, "relative_attention_bias", nn.initializers.normal(cfg.d_model ** -0.5),
                                (cfg.relative_attention_num_buckets, cfg.num_heads), (None, "heads"))
        p = 0 if prefix is None else prefix[0].shape[2]
        start = jnp.zeros((), jnp.int32) if cache is None else jnp.asarray(cache_index, jnp.int32)
        s = mask.shape[1]
        qpos, kpos = start + jnp.arange(t), jnp.arange(s)
        allowed = (kpos[None, :] <= qpos[:, None])[None] & mask[:, None, :].astype(bool)  # [B, t, S]
        # The prefix keys sit at positions 0..P-1, the decoder tokens after them (PEFT's past_key_values).
        bias = position_bias(table, p + qpos, jnp.concatenate([jnp.arange(p), p + kpos]), False, cfg)
        if p:
            allowed = jnp.concatenate([jnp.ones((b, t, p), bool), allowed], axis=-1)
        self_bias = with_mask(bias, allowed)
        cross_bias = with_mask(jnp.zeros((1, 1, 1, 1), jnp.float32),
                               jnp.broadcast_to(encoder_mask[:, None, :].astype(bool), (b, t, encoder_mask.shape[1])))
        xs = {}
        if prefix is not None:
            xs.update(prefix_k=prefix[0], prefix_v=prefix[1])
        if cache is not None:
            xs.update(self_k=cache["self_k"], self_v=cache["self_v"],
                      cache_index=jnp.broadcast_to(start, (cfg.num_decoder_layers,)))
            if "cross_k" in cache:
                xs.update(cross_k=cache["cross_k"], cross_v=cache["cross_v"])
        h, new = run_blocks(DecoderBlock, cfg, self.hooks, cfg.num_decoder_layers, h,
                            (self_bias, cross_bias, encoder_states), xs)
        return norm(cfg, "final_layer_norm")(h), (new if cache is not None else None)


def peft_prefix_slots(layers: int) -> np.ndarray:
    """Which layer slot of the prefix table each decoder layer reads, as PEFT lays it out for a seq2seq
    model: it repeats the [layers * (k, v)] list and hands layer i entries 4i..4i+3 as (self k, self v,
    cross k, cross v), so layer i's self-attention reads slot 2i mod layers (the cross-attention entries
    are then discarded). With an even number of layers, layers i and i + layers/2 share a prefix and
    the odd slots are never read: jaxft trains exactly what a PEFT adapter serves."""
    return np.array([(2 * i) % layers for i in range(layers)])


def prefix_keys_values(inter: dict, cfg: T5Config):
    """The decoder self-attention keys/values of a forward pass, per prefix slot (P-Tuning v2's
    `init_from_tokens`): slot s starts from the keys of a decoder layer that reads it."""
    dec = inter["decoder"]
    if "block" in dec:  # scanned: a leading layer axis
        k, v = dec["block"]["layer_0"]["SelfAttention"]["keys_values"][0]
    else:
        kv = [dec[f"block_{i}"]["layer_0"]["SelfAttention"]["keys_values"][0] for i in range(cfg.num_decoder_layers)]
        k, v = jnp.stack([x[0] for x in kv]), jnp.stack([x[1] for x in kv])
    reader = {}
    for i, slot in enumerate(peft_prefix_slots(cfg.num_decoder_layers)):
        reader.setdefault(int(slot), i)
    order = np.array([reader.get(s, s) for s in range(cfg.num_decoder_layers)])
    return k[order], v[order]


def shift_right(ids, start: int, pad: int):
    """Labels -> decoder inputs, as transformers' `_shift_right`: start token first, -100 -> pad."""
    shifted = jnp.concatenate([jnp.full_like(ids[:, :1], start), ids[:, :-1]], axis=1)
    return jnp.where(shifted == -100, pad, shifted)


class T5Model(nn.Module):
    """`apply({"params": p}, input_ids, attention_mask, decoder_input_ids=, decoder_attention_mask=)` ->
    logits [B, T_dec, V] (seq2seq_lm), [B, num_labels] (classification) or [B, T, num_labels]
    (token_classification: the encoder alone, as T5ForTokenClassification); `method="encode"` /
    `method="decode"` for generation (see the module docstring). Without decoder_input_ids the decoder
    reads the input shifted right (what `model.init(rng, ids)` and T5ForSequenceClassification do)."""

    cfg: T5Config
    hooks: Sequence[Any] = ()

    def __call__(self, input_ids, attention_mask=None, decoder_input_ids=None, decoder_attention_mask=None,
                 return_hidden: bool = False):
        """`return_hidden` (seq2seq_lm): (decoder states scaled as the head reads them, output embedding
        [V, D]) instead of logits, for a loss that fuses the vocabulary projection."""
        return self.run("forward", input_ids=input_ids, attention_mask=attention_mask,
                        decoder_input_ids=decoder_input_ids, decoder_attention_mask=decoder_attention_mask,
                        return_hidden=return_hidden)

    def encode(self, input_ids, attention_mask=None):
        """-> (encoder states [B, P + T, D], their mask [B, P + T]); P: virtual tokens of an embeddings hook."""
        return self.run("encode", input_ids=input_ids, attention_mask=attention_mask)

    def decode(self, decoder_input_ids, decoder_attention_mask=None, encoder_states=None, encoder_mask=None,
               position_ids=None, cache=None, cache_index=None, return_hidden: bool = False):
        """Decoder + LM head: -> logits [B, t, V], or (logits, cache) with `cache`. `encoder_states` may be
        None once the cache holds the cross-attention keys/values (`encoder_mask` is still needed). T5's
        positions are the decoder slots (as transformers computes them): `position_ids` is unused."""
        del position_ids
        return self.run("decode", decoder_input_ids=decoder_input_ids, decoder_attention_mask=decoder_attention_mask,
                        encoder_states=encoder_states, encoder_mask=encoder_mask, cache=cache,
                        cache_index=cache_index, return_hidden=return_hidden)

    @nn.compact
    def run(self, mode: str, input_ids=None, attention_mask=None, decoder_input_ids=None, decoder_attention_mask=None,
            encoder_states=None, encoder_mask=None, cache=None, cache_index=None, return_hidden=False):
        cfg, dt = self.cfg, self.cfg.compute_dtype
        check_attention(cfg)
        shared = param_with_axes(self, "shared", nn.initializers.normal(1.0), (cfg.vocab_size, cfg.d_model),
                                 ("vocab", "embed"))

        def embed(ids):  # FSDP gathers the table like every other weight, rather than moving looked-up rows
            h = jnp.take(constrain(shared, ("vocab", None)), ids, axis=0).astype(dt)
            return nn.with_logical_constraint(h, ("batch", "length", "act_embed"))

        if mode in ("encode", "forward"):
            if attention_mask is None:
                attention_mask = jnp.ones_like(input_ids)
            h, encoder_mask = embed(input_ids), attention_mask
            for hook in self.hooks:  # prompt tuning puts virtual tokens in front
                h, encoder_mask = hook.embeddings(self, h, encoder_mask, input_ids)
            encoder_states = Encoder(cfg, self.hooks, name="encoder")(h, encoder_mask)
            if mode == "encode":
                return encoder_states, encoder_mask
            if cfg.head in ENCODER_ONLY:
                return self.token_head(encoder_states[:, encoder_states.shape[1] - input_ids.shape[1]:])
            if decoder_input_ids is None:
                decoder_input_ids = shift_right(input_ids, cfg.decoder_start_token_id, cfg.pad_token_id)
        if decoder_attention_mask is None:
            decoder_attention_mask = jnp.ones_like(decoder_input_ids)
        if encoder_mask is None:
            encoder_mask = jnp.ones(encoder_states.shape[:2], jnp.int32)
        prefixes = [p for p in (hook.prefix(self, decoder_input_ids.shape[0]) for hook in self.hooks) if p is not None]
        prefix = None
        if prefixes:  # each: (keys, values) [layers, B, P, H, Dk]
            prefix = tuple(jnp.concatenate([p[i] for p in prefixes], axis=2) for i in (0, 1))
            prefix = tuple(x[peft_prefix_slots(cfg.num_decoder_layers)] for x in prefix)
        h, new_cache = Decoder(cfg, self.hooks, name="decoder")(
            embed(decoder_input_ids), decoder_attention_mask, encoder_states, encoder_mask, prefix, cache, cache_index)

        if cfg.head == "classification":
            # As T5ForSequenceClassification: the head reads the decoder state at the input's last EOS.
            if cfg.pooling == "last":
                is_eos = (input_ids == cfg.eos_token_id) & (attention_mask == 1)
                t = input_ids.shape[1]
                last_eos = t - 1 - jnp.argmax(is_eos[:, ::-1], axis=-1)
                last_real = t - 1 - jnp.argmax(attention_mask[:, ::-1], axis=-1)
                pooled = h[jnp.arange(h.shape[0]), jnp.where(is_eos.any(-1), last_eos, last_real)]
            else:
                pooled = pool(h, decoder_attention_mask, cfg.pooling)
            return ClassificationHead(cfg, self.hooks, name="classification_head")(pooled)

        if cfg.scale_decoder_outputs:
            h = h * (cfg.d_model ** -0.5)
        if cfg.tie_word_embeddings:
            out = (h, shared) if return_hidden else jnp.dot(h, shared.astype(dt).T, preferred_element_type=jnp.float32)
        else:
            lm_head = Linear(cfg.vocab_size, ("embed", "vocab"), False, dt, self.hooks, init_std=1.0,
                             preferred_element_type=jnp.float32, name="lm_head")
            if return_hidden and not any(hook.acts_on("lm_head") for hook in self.hooks):
                out = (h, lm_head(h, kernel_only=True).T)
            else:
                out = lm_head(h).astype(jnp.float32)
        return out if cache is None else (out, new_cache)

    def token_head(self, h):
        """T5ForTokenClassification's `classifier` on the encoder's states (virtual tokens left out). Its init
        std is d_model**-0.5, not transformers' 1.0: the states are RMS-normalised, so 1.0 would start the
        softmax saturated at logits of about sqrt(d_model)."""
        cfg = self.cfg
        return Linear(cfg.num_labels, ("embed", None), True, cfg.compute_dtype, self.hooks,
                      init_std=cfg.d_model ** -0.5, preferred_element_type=jnp.float32,
                      name="classifier")(h).astype(jnp.float32)


class ClassificationHead(nn.Module):  # HF T5ClassificationHead: dense -> tanh -> out_proj, with biases
    cfg: T5Config
    hooks: Sequence[Any] = ()

    @nn.compact
    def __call__(self, x):
        cfg, dt = self.cfg, self.cfg.compute_dtype
        x = jnp.tanh(Linear(cfg.d_model, ("embed", None), True, dt, self.hooks, init_std=cfg.d_model ** -0.5,
                            name="dense")(x))
        return Linear(cfg.num_labels, (None, None), True, dt, self.hooks, init_std=cfg.d_model ** -0.5,
                      preferred_element_type=jnp.float32, name="out_proj")(x).astype(jnp.float32)


def init_cache(cfg: T5Config, batch: int, max_length: int, dtype=jnp.float32) -> dict:
    """The decoder self-attention cache: keys and values [layers, B, max_length, H, Dk] of zeros. The
    first `decode` adds the cross-attention keys/values ("cross_k", "cross_v") from the encoder states."""
    shape = (cfg.num_decoder_layers, batch, max_length, cfg.num_heads, cfg.d_kv)
    return {"self_k": jnp.zeros(shape, dtype), "self_v": jnp.zeros(shape, dtype)}


# ---------------------------------------------------------------------------------------------
# Hugging Face: config.json and weight names, both ways.

ARCH = {"t5": "T5", "mt5": "MT5"}


def config_from_hf(c: dict, file: str) -> T5Config:
    missing = [k for k in ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads") if k not in c]
    if missing:
        raise JaxftError(f"{file}: missing {', '.join(missing)}")
    mtype = c.get("model_type", "t5")
    proj = c.get("feed_forward_proj", "gated-gelu" if mtype == "mt5" else "relu")
    act = proj.split("-")
    if len(act) > 2 or (len(act) == 2 and act[0] != "gated") or ("gelu_new" if proj == "gated-gelu" else act[-1]) \
            not in ACTIVATIONS:
        raise JaxftError(f"{file}: feed_forward_proj={proj!r} is not supported (expected 'relu', 'gated-gelu' or "
                         f"'[gated-]ACT' with ACT one of {', '.join(ACTIVATIONS)})")
    tie = c.get("tie_word_embeddings", True) is not False
    # transformers 5 records the scaling; older configs say it with tie_word_embeddings (mT5 never scales).
    scale = c.get("scale_decoder_outputs", tie if mtype == "t5" else False)
    eos = c.get("eos_token_id", 1)
    return T5Config(
        vocab_size=c["vocab_size"],
        d_model=c["d_model"],
        d_kv=c["d_kv"],
        d_ff=c["d_ff"],
        num_layers=c["num_layers"],
        num_decoder_layers=c.get("num_decoder_layers") or c["num_layers"],
        num_heads=c["num_heads"],
        relative_attention_num_buckets=c.get("relative_attention_num_buckets", 32),
        relative_attention_max_distance=c.get("relative_attention_max_distance", 128),
        layer_norm_epsilon=c.get("layer_norm_epsilon", 1e-6),
        feed_forward_proj=proj,
        tie_word_embeddings=tie,
        scale_decoder_outputs=bool(scale),
        dropout_rate=c.get("dropout_rate", 0.1),
        model_type=mtype,
        pad_token_id=c.get("pad_token_id", 0),
        eos_token_id=eos[0] if isinstance(eos, list) else eos,
        decoder_start_token_id=c.get("decoder_start_token_id", c.get("pad_token_id", 0)),
    )


def config_from_weights(cfg: T5Config, names: set[str]) -> T5Config:
    """A checkpoint with its own `lm_head.weight` has an untied LM head (v1.1, flan-t5, mT5), whatever
    config.json says: transformers 5 saves `tie_word_embeddings: true` for those too and unties a head
    that differs from the embedding, and saves no `lm_head.weight` for a tied one. (A tied checkpoint
    that still stores an equal copy loads untied here: the same logits.)"""
    if cfg.head != "seq2seq_lm":
        return cfg
    return cfg.replace(tie_word_embeddings="lm_head.weight" not in names)


def config_to_hf(cfg: T5Config) -> dict:
    return {
        "model_type": cfg.model_type,
        "vocab_size": cfg.vocab_size,
        "d_model": cfg.d_model,
        "d_kv": cfg.d_kv,
        "d_ff": cfg.d_ff,
        "num_layers": cfg.num_layers,
        "num_decoder_layers": cfg.num_decoder_layers,
        "num_heads": cfg.num_heads,
        "relative_attention_num_buckets": cfg.relative_attention_num_buckets,
        "relative_attention_max_distance": cfg.relative_attention_max_distance,
        "layer_norm_epsilon": cfg.layer_norm_epsilon,
        "feed_forward_proj": cfg.feed_forward_proj,
        "dense_act_fn": cfg.dense_act_fn,
        "is_gated_act": cfg.gated,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "scale_decoder_outputs": cfg.scale_decoder_outputs,
        "dropout_rate": cfg.dropout_rate,
        "is_encoder_decoder": True,
        "pad_token_id": cfg.pad_token_id,
        "eos_token_id": cfg.eos_token_id,
        "decoder_start_token_id": cfg.decoder_start_token_id,
    }


def architecture(cfg: T5Config) -> str:
    return ARCH[cfg.model_type] + {"classification": "ForSequenceClassification",
                                   "token_classification": "ForTokenClassification"}.get(cfg.head,
                                                                                         "ForConditionalGeneration")


_BLOCK = re.compile(r"(encoder|decoder)\.block\.(\d+)\.layer\.(\d+)\.(.+)\.(weight|bias)")
_HEAD = re.compile(r"(classification_head\.dense|classification_head\.out_proj|classifier)\.(weight|bias)")


def _from_hf_key(key: str):
    """HF key -> (our path, stack, layer index or None, transpose?); None for keys we do not use."""
    key = key[len("transformer."):] if key.startswith("transformer.") else key
    if key == "shared.weight":
        return ("shared",), None, None, False
    if key == "lm_head.weight":
        return ("lm_head", "kernel"), None, None, True
    m = _HEAD.fullmatch(key)
    if m:
        return (*m[1].split("."), "kernel" if m[2] == "weight" else "bias"), None, None, m[2] == "weight"
    if key in ("encoder.final_layer_norm.weight", "decoder.final_layer_norm.weight"):
        return (key.split(".")[0], "final_layer_norm", "weight"), None, None, False
    m = _BLOCK.fullmatch(key)
    if not m:
        return None  # encoder/decoder.embed_tokens: copies of shared
    mods = tuple(m[4].split("."))
    if mods[-1] == "relative_attention_bias":  # block 0's table (the decoder's cross-attention has none in use)
        return ((m[1], "relative_attention_bias"), None, None, False) if mods[0] == "SelfAttention" else None
    linear = mods[-1] in LINEARS
    return (f"layer_{m[3]}",) + mods + ("kernel" if linear else "weight",), m[1], int(m[2]), linear


def _num_layers(cfg, stack):
    return cfg.num_layers if stack == "encoder" else cfg.num_decoder_layers


def params_from_hf(tensors: dict[str, np.ndarray], cfg: T5Config, where: str = "checkpoint") -> dict:
    flat, layers = {}, {}
    for key, value in tensors.items():
        hit = _from_hf_key(key)
        if hit is None:
            continue
        path, stack, layer, transpose = hit
        value = value.T if transpose else value
        if stack is None:
            flat[path] = value
        else:
            layers.setdefault((stack, path), {})[layer] = value
    for stack in sorted({s for s, _ in layers}):
        flat.update(stack_layers({path: per for (s, path), per in layers.items() if s == stack}, cfg, where,
                                 (stack, "block"), _num_layers(cfg, stack), f"{stack} block"))
    heads_only = bool(flat) and {p[0] for p in flat} <= set(HEAD_MODULES)  # an adapter's head
    if "shared" not in {p[0] for p in flat} and not heads_only:
        raise JaxftError(f"{where}: no shared.weight (the T5 token embedding)")
    if cfg.tie_word_embeddings or cfg.head != "seq2seq_lm":
        flat.pop(("lm_head", "kernel"), None)
    return traverse_util.unflatten_dict(flat)


def params_to_hf(params: dict, cfg: T5Config) -> dict[str, np.ndarray]:
    base = "transformer." if cfg.head in TASK_HEADS else ""
    out = {}
    for path, value in traverse_util.flatten_dict(params).items():
        value = np.asarray(value, dtype=np.float32)
        if path == ("shared",):
            out[base + "shared.weight"] = value
        elif path[0] in HEAD_MODULES:
            name = ".".join(path[:-1]) + (".bias" if path[-1] == "bias" else ".weight")
            out[name] = value.T if path[-1] == "kernel" else value
        elif path[1] == "relative_attention_bias":
            out[f"{base}{path[0]}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"] = value
        elif path[1] == "final_layer_norm":
            out[f"{base}{path[0]}.final_layer_norm.weight"] = value
        elif path[1] == "block" or path[1].startswith("block_"):
            per_layer = enumerate(value) if path[1] == "block" else [(int(path[1][6:]), value)]
            sub, *mods, leaf = path[2:]
            for i, v in per_layer:
                name = f"{base}{path[0]}.block.{i}.layer.{sub[6:]}.{'.'.join(mods)}.weight"
                out[name] = v.T if leaf == "kernel" else v
        else:
            raise ValueError(f"no Hugging Face name for parameter {'/'.join(path)}")
    return {k: np.ascontiguousarray(v) for k, v in out.items()}


def hf_module(path: str, cfg: T5Config | None = None) -> str:
    """'encoder.block.3.layer_0.SelfAttention.q' -> 'encoder.block.3.layer.0.SelfAttention.q'
    (under 'transformer.' in a classifier)."""
    name = re.sub(r"\blayer_(\d+)\b", r"layer.\1", path)
    if cfg is not None and cfg.head in TASK_HEADS and name.split(".")[0] not in HEAD_MODULES:
        name = "transformer." + name
    return name


def our_module(name: str) -> str | None:
    name = name[len("transformer."):] if name.startswith("transformer.") else name
    if name.split(".")[0] in HEAD_MODULES:
        return name
    if not re.match(r"(encoder|decoder)\.block\.\d+(\.|$)", name):  # a block (an adapter's) or inside one
        return None
    return re.sub(r"\blayer\.(\d+)\b", r"layer_\1", name)


def matmul_weights(cfg: T5Config) -> int:
    """Weights in a matmul per token, counting an encoder and a decoder token as one (equal lengths):
    q, k, v, o (twice in the decoder: self and cross) and the feed-forward, plus the output head."""
    attn = 4 * cfg.d_model * cfg.num_heads * cfg.d_kv
    ff = (3 if cfg.gated else 2) * cfg.d_model * cfg.d_ff
    out = cfg.d_model * (cfg.vocab_size if cfg.head == "seq2seq_lm" else cfg.num_labels)
    decoder = 0 if cfg.head in ENCODER_ONLY else cfg.num_decoder_layers * (2 * attn + ff)
    return cfg.num_layers * (attn + ff) + decoder + out


def activation_blocks(cfg: T5Config) -> tuple[Blocks, ...]:
    """What `jaxft.plan` counts: the encoder's blocks (self-attention, MLP) over the input rows and the
    decoder's (causal self-attention, cross-attention over the encoder's states, MLP) over the target
    rows, RMS layer norms. The token head runs the encoder alone."""
    d, hd, h, f = cfg.d_model, cfg.d_kv, cfg.num_heads, cfg.d_ff
    inner = h * hd
    mlp = (("wi_0", "mlp_in", d, f), ("wi_1", "mlp_in", d, f)) if cfg.gated else (("wi", "mlp_in", d, f),)
    mlp += (("wo", "mlp_act", f, d),)
    attn = lambda name, tag: ((f"{name}/q", f"{tag}_in", d, inner), (f"{name}/k", f"{tag}_kv", d, inner),  # noqa: E731
                              (f"{name}/v", f"{tag}_kv", d, inner), (f"{name}/o", f"{tag}_out", inner, d))
    tensors = MLP_TENSORS["gated" if cfg.gated else "plain"]
    encoder = Blocks("encoder/block", cfg.num_layers, d, h, h, hd, f, mlp_tensors=tensors, takes_prefix=False,
                     recompute=1.5, fused_attention=False, projections=attn("SelfAttention", "attn") + mlp)
    if cfg.head in ENCODER_ONLY:
        return (encoder,)
    return (encoder,
            Blocks("decoder/block", cfg.num_decoder_layers, d, h, h, hd, f, attention=("self", "cross"), norms=3,
                   fused_attention=False, stream="target",
                   mlp_tensors=tensors, recompute=1.5, projections=attn("SelfAttention", "attn") + attn("EncDecAttention", "cross") + mlp))


MLP_TENSORS = {"gated": 2, "plain": 1}  # F-wide tensors the MLP keeps for the backward (the activation is recomputed)


FAMILY = Family(
    name="t5",
    model=T5Model,
    heads=HEADS,
    config_from_hf=config_from_hf,
    config_to_hf=config_to_hf,
    architecture=architecture,
    params_from_hf=params_from_hf,
    params_to_hf=params_to_hf,
    hf_module=hf_module,
    our_module=our_module,
    lora_targets="q,v",
    ia3_targets="k,v,wo",  # PEFT's IA3 defaults for t5 (mt5's name wi_1, with no feed-forward module)
    ia3_feedforward="wo",
    head_params=rf"^({'|'.join(HEAD_MODULES)})/",
    classifier_params=rf"^({'|'.join(m for m in HEAD_MODULES if m != 'lm_head')})/",
    classifier_kernel=lambda cfg: "classifier/kernel" if cfg.head == "token_classification"
    else "classification_head/out_proj/kernel",
    kv_layout=lambda cfg: (cfg.num_decoder_layers, cfg.num_heads, cfg.d_kv),
    matmul_weights=matmul_weights,
    activation_blocks=activation_blocks,
    causal=False,
    encoder_decoder=True,
    encoder_only_heads=ENCODER_ONLY,
    init_cache=init_cache,
    tied_embedding=("shared", None),
    config_from_weights=config_from_weights,
    head_scale=lambda cfg: cfg.d_model ** -0.5 if cfg.scale_decoder_outputs else 1.0,
    layer_stacks=lambda cfg: {"encoder.block": cfg.num_layers, **({} if cfg.head in ENCODER_ONLY
                                                                   else {"decoder.block": cfg.num_decoder_layers})},
    prefix_keys_values=prefix_keys_values,
    projections=r"/(SelfAttention|EncDecAttention)/(q|k|v|o)/kernel$|/DenseReluDense/(wi|wi_0|wi_1|wo)/kernel$",
)
