"""The BERT and RoBERTa family as one functional Flax encoder (`BertModel`, one config for both).

Word + position + token-type embeddings and their LayerNorm, post-LN encoder layers with bidirectional
attention (padding and prefix only), a pooler (dense + tanh) on the first token, and the heads of
transformers' `*ForMaskedLM`, `*ForSequenceClassification` and `*ForTokenClassification`. RoBERTa
differs in data only: its positions count the non-padding tokens from `pad_token_id + 1` (transformers'
`create_position_ids_from_input_ids`), its classifier is `classifier.dense` + `classifier.out_proj` on
`<s>` (no pooler) and its masked-LM head is `lm_head`. Module names inside a layer are HF's
(`attention.self.query`, `attention.output.dense`, `intermediate.dense`, `output.LayerNorm`, ...) so
checkpoint and PEFT keys map one to one; PEFT's default LoRA targets for both are query and value.

Methods hook in at the same points as in the decoders: every `Linear`, the word embeddings (virtual
tokens go in front before positions, token types and the LayerNorm are added), each layer's attention
and feed-forward outputs before their residual add and LayerNorm (`block_output`), and per-layer
key/value prefixes (P-Tuning v2 on an encoder is the paper's own setting). A prefix shifts the
positions of the real tokens by its length, as transformers does for a cache of that length. There is
no dropout inside the model (a method's own dropout still applies).
"""

from __future__ import annotations

import dataclasses
import functools
import re
from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from jaxft.errors import JaxftError
from jaxft.models.attention import attention
from jaxft.models.family import Blocks, Family, Settings, params_from_keys, unstack_layers
from jaxft.models.layers import LayerNorm, Linear, block_output, param_with_axes, pool, recomputed, remat
from jaxft.sharding import constrain

HEADS = ("masked_lm", "classification", "token_classification")
ACTIVATIONS = {
    "gelu": functools.partial(nn.gelu, approximate=False),
    "gelu_new": functools.partial(nn.gelu, approximate=True),
    "gelu_pytorch_tanh": functools.partial(nn.gelu, approximate=True),
    "relu": nn.relu,
}


@dataclasses.dataclass(frozen=True)
class BertConfig(Settings):
    head: str = "masked_lm"
    pooling: str = "first"  # HF's classifiers read the first token ([CLS] / <s>)
    vocab_size: int = 30522
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_layers: int = 12
    num_heads: int = 12
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_act: str = "gelu"
    tie_word_embeddings: bool = True  # the masked-LM decoder is the word embedding table
    model_type: str = "bert"  # or "roberta"
    pad_token_id: int | None = 0
    bos_token_id: int | None = None
    eos_token_id: int | None = None

    @property
    def num_kv_heads(self) -> int:
        return self.num_heads

    @property
    def dim_per_head(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def roberta(self) -> bool:
        return self.model_type == "roberta"


class Embeddings(nn.Module):
    """The three tables and their LayerNorm; `lookup` gives the word embeddings alone (hooks act there)."""

    cfg: BertConfig

    def setup(self):
        cfg, init = self.cfg, nn.initializers.normal(0.02)
        self.word_embeddings = param_with_axes(self, "word_embeddings", init, (cfg.vocab_size, cfg.hidden_size),
                                               ("vocab", "embed"))
        self.position_embeddings = param_with_axes(
            self, "position_embeddings", init, (cfg.max_position_embeddings, cfg.hidden_size), (None, "embed"))
        self.token_type_embeddings = param_with_axes(
            self, "token_type_embeddings", init, (cfg.type_vocab_size, cfg.hidden_size), (None, "embed"))
        self.LayerNorm = LayerNorm(cfg.layer_norm_eps, cfg.compute_dtype)

    def lookup(self, input_ids):
        # FSDP gathers the table like every other weight, rather than swapping looked-up rows all-to-all.
        word = constrain(self.word_embeddings, ("vocab", None))
        return jnp.take(word, input_ids, axis=0).astype(self.cfg.compute_dtype), self.word_embeddings

    def __call__(self, h, token_type_ids, position_ids):
        dt = self.cfg.compute_dtype
        h = h + jnp.take(self.token_type_embeddings, token_type_ids, axis=0).astype(dt)
        h = h + jnp.take(self.position_embeddings, position_ids, axis=0).astype(dt)
        return self.LayerNorm(h)


class SelfAttention(nn.Module):
    cfg: BertConfig
    hooks: Sequence[Any] = ()

    @nn.compact
    def __call__(self, x, mask, prefix):
        cfg, dt = self.cfg, self.cfg.compute_dtype
        h, d = cfg.num_heads, cfg.dim_per_head
        b, t, _ = x.shape
        proj = lambda n, ax: Linear(h * d, ("embed", ax), True, dt, self.hooks, name=n)  # noqa: E731
        q = proj("query", "heads")(x).reshape(b, t, h, d)
        k = proj("key", "kv_heads")(x).reshape(b, t, h, d)
        v = proj("value", "kv_heads")(x).reshape(b, t, h, d)
        self.sow("intermediates", "keys_values", (k, v))  # stored only when asked for (e.g. prefix init)
        num_prefix = 0
        if prefix is not None:
            num_prefix = prefix[0].shape[1]
            k = jnp.concatenate([prefix[0].astype(dt), k], axis=1)
            v = jnp.concatenate([prefix[1].astype(dt), v], axis=1)
        q = constrain(q, ("batch", "length", "act_heads", None))
        k, v = (constrain(a, ("batch", "length", "act_kv_heads", None)) for a in (k, v))
        out = attention(q, k, v, mask, num_prefix, None, dt, cfg.attention, causal=False)
        return constrain(out, ("batch", "length", "act_heads"))


class AddNorm(nn.Module):
    """`attention.output` / `output`: dense, the block-output hooks, then LayerNorm(h + residual)."""

    cfg: BertConfig
    axes: tuple
    where: str
    hooks: Sequence[Any] = ()

    @nn.compact
    def __call__(self, x, residual):
        cfg, dt = self.cfg, self.cfg.compute_dtype
        h = Linear(cfg.hidden_size, self.axes, True, dt, self.hooks, name="dense")(x)
        h = block_output(self, h, self.where)
        return LayerNorm(cfg.layer_norm_eps, dt, name="LayerNorm")(h + residual)


class Attention(nn.Module):
    cfg: BertConfig
    hooks: Sequence[Any] = ()

    @nn.compact
    def __call__(self, h, mask, prefix):
        ctx = SelfAttention(self.cfg, self.hooks, name="self")(h, mask, prefix)
        return AddNorm(self.cfg, ("heads", "embed"), "attention", self.hooks, name="output")(ctx, h)


class Intermediate(nn.Module):
    cfg: BertConfig
    hooks: Sequence[Any] = ()

    @nn.compact
    def __call__(self, x):
        cfg = self.cfg
        h = Linear(cfg.intermediate_size, ("embed", "mlp"), True, cfg.compute_dtype, self.hooks, name="dense")(x)
        return constrain(recomputed(ACTIVATIONS[cfg.hidden_act])(h), ("batch", "length", "act_mlp"))


class Layer(nn.Module):
    cfg: BertConfig
    hooks: Sequence[Any] = ()

    @nn.compact
    def __call__(self, h, mask, prefix):
        cfg = self.cfg
        a = Attention(cfg, self.hooks, name="attention")(h, mask, prefix)
        i = Intermediate(cfg, self.hooks, name="intermediate")(a)
        h = AddNorm(cfg, ("mlp", "embed"), "mlp", self.hooks, name="output")(i, a)
        return nn.with_logical_constraint(h, ("batch", "length", "act_embed")), None


class Dense(nn.Module):
    """A module holding one square `dense` Linear and an activation: BERT's pooler."""

    cfg: BertConfig
    hooks: Sequence[Any] = ()

    @nn.compact
    def __call__(self, x):
        dense = Linear(self.cfg.hidden_size, ("embed", None), True, self.cfg.compute_dtype, self.hooks, name="dense")
        return jnp.tanh(dense(x))


class RobertaClassifier(nn.Module):
    """`classifier.dense` + tanh + `classifier.out_proj`."""

    cfg: BertConfig
    hooks: Sequence[Any] = ()

    @nn.compact
    def __call__(self, x):
        cfg, dt = self.cfg, self.cfg.compute_dtype
        x = jnp.tanh(Linear(cfg.hidden_size, ("embed", None), True, dt, self.hooks, name="dense")(x))
        return Linear(cfg.num_labels, ("embed", None), True, dt, self.hooks, preferred_element_type=jnp.float32,
                      name="out_proj")(x)


class Transform(nn.Module):
    """dense + activation + LayerNorm: BERT's `cls.predictions.transform` (GELU, `LayerNorm`), and the
    same layers directly in RoBERTa's `lm_head` (always GELU, `layer_norm`)."""

    cfg: BertConfig
    hooks: Sequence[Any] = ()

    @nn.compact
    def __call__(self, h):
        return transform(self.cfg, self.hooks, h)


def transform(cfg: BertConfig, hooks, h):
    """The transform's layers, created in the calling compact module."""
    dt = cfg.compute_dtype
    act = ACTIVATIONS["gelu" if cfg.roberta else cfg.hidden_act]
    x = act(Linear(cfg.hidden_size, ("embed", None), True, dt, hooks, name="dense")(h))
    return LayerNorm(cfg.layer_norm_eps, dt, name="layer_norm" if cfg.roberta else "LayerNorm")(x)


class MaskedLMHead(nn.Module):
    """The transform, then the decoder (the word embeddings when tied) and its bias: BERT's
    `cls.predictions`, RoBERTa's `lm_head` (whose transform layers sit in the head itself)."""

    cfg: BertConfig
    hooks: Sequence[Any] = ()

    @nn.compact
    def __call__(self, h, embedding):
        cfg, dt = self.cfg, self.cfg.compute_dtype
        x = transform(cfg, self.hooks, h) if cfg.roberta else Transform(cfg, self.hooks, name="transform")(h)
        if not cfg.tie_word_embeddings:  # transformers' own decoder, with its own bias (the head's is unused)
            return Linear(cfg.vocab_size, ("embed", "vocab"), True, dt, self.hooks, preferred_element_type=jnp.float32,
                          name="decoder")(x).astype(jnp.float32)
        bias = param_with_axes(self, "bias", nn.initializers.zeros, (cfg.vocab_size,), ("vocab",))
        logits = jnp.dot(x, embedding.astype(dt).T, preferred_element_type=jnp.float32)
        return logits.astype(jnp.float32) + bias.astype(jnp.float32)


class Cls(nn.Module):
    """BERT's `cls` level above `predictions`."""

    cfg: BertConfig
    hooks: Sequence[Any] = ()

    @nn.compact
    def __call__(self, h, embedding):
        return MaskedLMHead(self.cfg, self.hooks, name="predictions")(h, embedding)


class BertModel(nn.Module):
    """`apply({"params": p}, input_ids, attention_mask, token_type_ids=None)` -> logits: [B, T, V]
    (masked_lm; [B, K, V] at `label_positions` [B, K] where given), [B, num_labels] (classification)
    or [B, T, num_labels] (token_classification)."""

    cfg: BertConfig
    hooks: Sequence[Any] = ()

    @nn.compact
    def __call__(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None,
                 return_hidden: bool = False, label_positions=None):
        cfg = self.cfg
        if attention_mask is None:
            attention_mask = jnp.ones_like(input_ids)
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(input_ids)
        embeddings = Embeddings(cfg, name="embeddings")
        h, word = embeddings.lookup(input_ids)
        h = nn.with_logical_constraint(h, ("batch", "length", "act_embed"))
        length = input_ids.shape[1]
        for hook in self.hooks:  # prompt tuning puts virtual tokens in front of the word embeddings
            h, attention_mask = hook.embeddings(self, h, attention_mask, input_ids)
        added = h.shape[1] - length
        prefixes = [p for p in (hook.prefix(self, input_ids.shape[0]) for hook in self.hooks) if p is not None]
        prefix = None
        if prefixes:  # each: (keys, values) of shape [layers, B, P, H, D]
            prefix = tuple(jnp.concatenate([p[i] for p in prefixes], axis=2) for i in (0, 1))
        num_prefix = prefix[0].shape[2] if prefix is not None else 0
        # A position past the table reads NaN (out-of-range gather), which showed only as a NaN loss.
        last = num_prefix + h.shape[1] - 1 + (roberta_pad(cfg) + 1 if cfg.roberta else 0)
        if last >= cfg.max_position_embeddings:
            raise JaxftError(f"{num_prefix + h.shape[1]} positions ({num_prefix} prefix + {added} virtual + {length} "
                             f"tokens) need position {last}, past the model's max_position_embeddings="
                             f"{cfg.max_position_embeddings} (lower data.seq_len)")
        if position_ids is None:
            position_ids = positions(cfg, input_ids, attention_mask, added, num_prefix)
        elif added:
            position_ids = jnp.pad(position_ids, ((0, 0), (added, 0)))
        token_type_ids = jnp.pad(token_type_ids, ((0, 0), (added, 0)))  # virtual tokens: type 0
        h = embeddings(h, token_type_ids, position_ids)

        layer = remat(Layer, cfg)
        if cfg.scan_layers:
            stack = nn.scan(
                layer,
                variable_axes={"params": 0, "intermediates": 0},
                split_rngs={"params": True, "dropout": True},
                in_axes=(nn.broadcast, 0),
                length=cfg.num_layers,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )
            h, _ = stack(cfg, self.hooks, name="layers")(h, attention_mask, prefix)
        else:
            for i in range(cfg.num_layers):
                p = None if prefix is None else (prefix[0][i], prefix[1][i])
                h, _ = layer(cfg, self.hooks, name=f"layers_{i}")(h, attention_mask, p)

        dt = cfg.compute_dtype
        if cfg.head == "classification":
            pooled = pool(h, attention_mask, cfg.pooling)
            if cfg.roberta:
                return RobertaClassifier(cfg, self.hooks, name="classifier")(pooled).astype(jnp.float32)
            pooled = Dense(cfg, self.hooks, name="pooler")(pooled)
            return Linear(cfg.num_labels, ("embed", None), True, dt, self.hooks, preferred_element_type=jnp.float32,
                          name="classifier")(pooled).astype(jnp.float32)
        h = h[:, h.shape[1] - length:]  # per-token outputs: not for virtual tokens
        if cfg.head == "token_classification":
            return Linear(cfg.num_labels, ("embed", None), True, dt, self.hooks, preferred_element_type=jnp.float32,
                          name="classifier")(h).astype(jnp.float32)
        if label_positions is not None:  # masked LM: logits at the targets [B, K] only
            h = jnp.take_along_axis(h, label_positions[..., None], axis=1)
        if cfg.roberta:
            return MaskedLMHead(cfg, self.hooks, name="lm_head")(h, word)
        return Cls(cfg, self.hooks, name="cls")(h, word)


def roberta_pad(cfg: BertConfig) -> int:
    """RoBERTa's padding index: the position padding sits at; real tokens count from the next one."""
    return cfg.pad_token_id if cfg.pad_token_id is not None else 1


def positions(cfg: BertConfig, input_ids, mask, added: int, num_prefix: int):
    """BERT: 0, 1, ... over every slot (padding included), after a prefix of `num_prefix` cached keys.
    RoBERTa: the non-padding tokens count from pad_token_id + 1 and padding sits at pad_token_id, as
    transformers' `create_position_ids_from_input_ids` (virtual tokens count as non-padding)."""
    b, t = mask.shape
    if not cfg.roberta:
        return jnp.broadcast_to(jnp.arange(t) + num_prefix, (b, t))
    pad = roberta_pad(cfg)
    real = (input_ids != pad).astype(jnp.int32)
    real = jnp.concatenate([mask[:, :added].astype(jnp.int32), real], axis=1)
    return (jnp.cumsum(real, axis=1) + num_prefix) * real + pad


# ---------------------------------------------------------------------------------------------
# Hugging Face: config.json and weight names, both ways.

ARCH = {"bert": "Bert", "roberta": "Roberta"}
HEAD_CLASS = {"masked_lm": "ForMaskedLM", "classification": "ForSequenceClassification",
              "token_classification": "ForTokenClassification"}


def config_from_hf(c: dict, file: str) -> BertConfig:
    missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                           "num_attention_heads") if k not in c]
    if missing:
        raise JaxftError(f"{file}: missing {', '.join(missing)}")
    if c.get("is_decoder"):
        raise JaxftError(f"{file}: is_decoder=true (a causal BERT) is not supported: expected an encoder")
    kind = c.get("position_embedding_type", "absolute")
    if kind != "absolute":
        raise JaxftError(f"{file}: position_embedding_type={kind!r} is not supported (expected 'absolute')")
    act = c.get("hidden_act", "gelu")
    if act not in ACTIVATIONS:
        raise JaxftError(f"{file}: hidden_act={act!r} is not supported (expected one of {', '.join(ACTIVATIONS)})")
    if c["hidden_size"] % c["num_attention_heads"]:
        raise JaxftError(f"{file}: hidden_size {c['hidden_size']} is not a multiple of num_attention_heads "
                         f"{c['num_attention_heads']}")
    mtype = c.get("model_type")
    return BertConfig(
        vocab_size=c["vocab_size"],
        hidden_size=c["hidden_size"],
        intermediate_size=c["intermediate_size"],
        num_layers=c["num_hidden_layers"],
        num_heads=c["num_attention_heads"],
        max_position_embeddings=c.get("max_position_embeddings", 512),
        type_vocab_size=c.get("type_vocab_size", 2),
        layer_norm_eps=c.get("layer_norm_eps", 1e-12),
        hidden_act=act,
        tie_word_embeddings=bool(c.get("tie_word_embeddings", True)),
        model_type=mtype,
        pad_token_id=c.get("pad_token_id", 1 if mtype == "roberta" else 0),
        bos_token_id=c.get("bos_token_id"),
        eos_token_id=c.get("eos_token_id"),
    )


def config_to_hf(cfg: BertConfig) -> dict:
    return {
        "model_type": cfg.model_type,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "max_position_embeddings": cfg.max_position_embeddings,
        "type_vocab_size": cfg.type_vocab_size,
        "layer_norm_eps": cfg.layer_norm_eps,
        "hidden_act": cfg.hidden_act,
        "position_embedding_type": "absolute",
        "is_decoder": False,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "pad_token_id": cfg.pad_token_id,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": cfg.eos_token_id,
    }


def architecture(cfg: BertConfig) -> str:
    return ARCH[cfg.model_type] + HEAD_CLASS[cfg.head]


_LAYER = re.compile(r"encoder\.layer\.(\d+)\.(.+)")
_NORMS = ("LayerNorm", "layer_norm")
_LEAF = {"weight": "weight", "bias": "bias", "gamma": "weight", "beta": "bias"}  # gamma/beta: old checkpoints
# The HF head modules of each head; anything else (another head, NSP, a bare model's pooler) is not read.
_HEAD_KEYS = {"masked_lm": ("cls.predictions.", "lm_head."), "classification": ("classifier.",),
              "token_classification": ("classifier.",)}


def _leaf(mods: tuple, leaf: str):
    """A module path and HF leaf name -> (our leaf path, transpose?)."""
    if mods[-1].endswith("_embeddings"):  # a table: the parameter itself
        return mods, False
    if mods[-1] in _NORMS:
        return mods + (_LEAF[leaf],), False
    return mods + ("kernel" if _LEAF[leaf] == "weight" else "bias",), _LEAF[leaf] == "weight"


def _from_hf_key(key: str, cfg: BertConfig):
    """HF key -> (our path, layer index or None, transpose?); None for keys this head does not use."""
    base = cfg.model_type + "."
    key = key[len(base):] if key.startswith(base) else key
    *mods, leaf = key.split(".")
    if leaf not in _LEAF or not mods:
        return None
    if key in ("cls.predictions.bias", "lm_head.bias"):  # the tied decoder's bias; unused when untied
        return (tuple(key.split(".")), None, False) if cfg.tie_word_embeddings else None
    if ".decoder." in key and cfg.tie_word_embeddings:
        return None  # a tied decoder is the word embeddings, its bias the head's `bias`
    m = _LAYER.fullmatch(".".join(mods))
    if m:
        path, transpose = _leaf(tuple(m[2].split(".")), leaf)
        return path, int(m[1]), transpose
    if (mods[0] == "embeddings" or key.startswith(_HEAD_KEYS[cfg.head])
            or (mods[0] == "pooler" and cfg.head == "classification" and not cfg.roberta)):
        path, transpose = _leaf(tuple(mods), leaf)
        return path, None, transpose
    return None


def params_from_hf(tensors: dict[str, np.ndarray], cfg: BertConfig, where: str = "checkpoint") -> dict:
    return traverse_util.unflatten_dict(params_from_keys(tensors, cfg, where, lambda key: _from_hf_key(key, cfg)))


def params_to_hf(params: dict, cfg: BertConfig) -> dict[str, np.ndarray]:
    base, out = cfg.model_type, {}
    for path, value in traverse_util.flatten_dict(params).items():
        value = np.asarray(value, dtype=np.float32)
        *mods, leaf = path
        per_layer = unstack_layers(path, value)
        if per_layer is not None:
            for i, (*m, lf), v in per_layer:
                name = "weight" if lf in ("kernel", "weight") else "bias"
                out[f"{base}.encoder.layer.{i}.{'.'.join(m)}.{name}"] = v.T if lf == "kernel" else v
            continue
        if tuple(path) in (("cls", "predictions", "bias"), ("lm_head", "bias")):
            out[".".join(path)] = value
            continue
        name = ".".join(mods) + "." + ("weight" if leaf in ("kernel", "weight") else "bias")
        if mods[0] == "embeddings" and leaf.endswith("_embeddings"):
            name = f"embeddings.{leaf}.weight"
        if mods[0] in ("embeddings", "pooler"):
            name = f"{base}.{name}"
        elif mods[0] not in ("cls", "lm_head", "classifier"):
            raise ValueError(f"no Hugging Face name for parameter {'/'.join(path)}")
        out[name] = value.T if leaf == "kernel" else value
        if mods[-1] == "decoder" and leaf == "bias":  # transformers also keeps the head's own (unused) copy
            out[".".join(mods[:-1]) + ".bias"] = value
    return {k: np.ascontiguousarray(v) for k, v in out.items()}


def hf_module(path: str, cfg=None, *, base: str) -> str:
    """'layers.3.attention.self.query' -> 'bert.encoder.layer.3.attention.self.query'; heads keep their names."""
    head, *rest = path.split(".")
    if head == "layers":
        return ".".join([base, "encoder", "layer"] + rest)
    return f"{base}.{path}" if head in ("embeddings", "pooler") else path


def our_module(name: str) -> str | None:
    for base in ("bert.", "roberta."):
        name = name[len(base):] if name.startswith(base) else name
    if name.startswith("encoder.layer."):
        return "layers." + name[len("encoder.layer."):]
    return name if name.split(".")[0] in ("embeddings", "pooler", "classifier", "cls", "lm_head") else None


def head_weights(cfg: BertConfig) -> int:
    d = cfg.hidden_size
    return {"masked_lm": d * d + d * cfg.vocab_size, "classification": d * d + d * cfg.num_labels,
            "token_classification": d * cfg.num_labels}[cfg.head]


def matmul_weights(cfg: BertConfig) -> int:
    """q, k, v, attention output, intermediate and output per layer, plus the head's matmuls."""
    d = cfg.hidden_size
    return cfg.num_layers * (4 * d * d + 2 * d * cfg.intermediate_size) + head_weights(cfg)


def classifier_kernel(cfg: BertConfig) -> str:
    return "classifier/out_proj/kernel" if cfg.roberta else "classifier/kernel"


def activation_blocks(cfg: BertConfig) -> tuple[Blocks, ...]:
    """What `jaxft.plan` counts: post-LayerNorm blocks, bidirectional attention, a GELU MLP."""
    d, f = cfg.hidden_size, cfg.intermediate_size
    return (Blocks("layers", cfg.num_layers, d, cfg.num_heads, cfg.num_heads, cfg.dim_per_head, f, mlp_tensors=MLP_TENSORS,
                   projections=(("query", "attn_in", d, d), ("key", "attn_in", d, d), ("value", "attn_in", d, d),
                                ("attention/output/dense", "attn_out", d, d), ("intermediate/dense", "mlp_in", d, f),
                                ("output/dense", "mlp_act", f, d)), causal=False),)


MLP_TENSORS = 1  # F-wide tensors a GELU MLP keeps for the backward: its input (the activation is recomputed)


FAMILY = Family(
    name="bert",
    model=BertModel,
    heads=HEADS,
    config_from_hf=config_from_hf,
    config_to_hf=config_to_hf,
    architecture=architecture,
    params_from_hf=params_from_hf,
    params_to_hf=params_to_hf,
    hf_module=functools.partial(hf_module, base="bert"),
    our_module=our_module,
    lora_targets="query,value",  # PEFT's default for bert and roberta
    ia3_targets="key,value,output.dense",  # PEFT's IA3 defaults (both output.dense: attention's and the FFN's)
    ia3_feedforward="output.dense",
    head_params=r"^(pooler|classifier|cls|lm_head)/",
    classifier_params=r"^(pooler|classifier)/",  # a BertForMaskedLM checkpoint has no pooler: it is new too
    kv_layout=lambda cfg: (cfg.num_layers, cfg.num_heads, cfg.dim_per_head),
    matmul_weights=matmul_weights,
    head_weights=head_weights,
    activation_blocks=activation_blocks,
    pooling="first",
    causal=False,
    classifier_kernel=classifier_kernel,
    tied_embedding=("embeddings/word_embeddings", None),
    projections=r"^layers(_\d+)?/.*/(query|key|value|dense)/kernel$",
)
ROBERTA = dataclasses.replace(FAMILY, name="roberta", hf_module=functools.partial(hf_module, base="roberta"))
