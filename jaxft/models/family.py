"""What a model family provides, and the registry that finds one by its HF `model_type`.

Training, checkpointing, sharding, the methods and HF I/O reach a model only through a `Family`:
adding one means adding its module under `jaxft/models/` (which defines `FAMILY`) and one entry in
`REGISTRY`. The module holds everything about the architecture: its config read from and written to
HF's `config.json`, the HF weight names both ways, the Flax model and its heads, the default LoRA
targets, and the key/value layout prefix methods write into.

Every family's model is called the same way:
`model.apply({"params": p}, input_ids, attention_mask=..., [decoder_input_ids=..., decoder_attention_mask=...])`
-> the head's logits ([B, T, V] for LM heads, [B, num_labels] for classification, [B, T, num_labels]
for token classification). `return_hidden=True` may return (hidden [B, T, D], output embedding [V, D])
instead of LM logits, for a loss that fuses the vocabulary projection; a family without it ignores it.

Generation (`jaxft.generate`): a family with `init_cache` takes `cache=init_cache(cfg, B, S, dtype)` and
`cache_index=i` in `model.apply` (new keys/values written at slots [i, i + T), attention_mask [B, S] over
all slots) and returns (logits, cache); encoder-decoders add `method="encode"` / `method="decode"`.

Methods act through the hooks the model is built with (`jaxft.peft.hook.Hook`): every `Linear`
(`jaxft.models.layers`), the embeddings, the key/value prefix, and each block's outputs.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any, Callable

import jax.numpy as jnp
import numpy as np

from jaxft.errors import JaxftError

# HF model_type -> the module under jaxft/models/ that defines its FAMILY.
REGISTRY = {
    "llama": "jaxft.models.llama",
    "qwen2": "jaxft.models.llama",
    "qwen3": "jaxft.models.llama",
    "mistral": "jaxft.models.llama",
    "glm": "jaxft.models.llama",
    "glm4": "jaxft.models.llama",
    "phi3": "jaxft.models.llama",
    "qwen2_moe": "jaxft.models.llama",
    "qwen3_moe": "jaxft.models.llama",
    "mixtral": "jaxft.models.llama",
    "gemma": "jaxft.models.llama",
    "gemma2": "jaxft.models.llama",
    "gemma3": "jaxft.models.llama",
    "gemma3_text": "jaxft.models.llama",
    "gpt2": "jaxft.models.gpt2",
    "bert": "jaxft.models.bert",
    "roberta": "jaxft.models.bert:ROBERTA",  # "module:NAME": a module defining several families
    "t5": "jaxft.models.t5",
    "mt5": "jaxft.models.t5",
}

# The heads a family may offer, with the HF class-name ending that selects each in config.json.
HEADS = ("causal_lm", "masked_lm", "classification", "token_classification", "seq2seq_lm")
HEAD_OF_ARCHITECTURE = (
    ("ForSequenceClassification", "classification"),
    ("ForTokenClassification", "token_classification"),
    ("ForMaskedLM", "masked_lm"),
    ("ForConditionalGeneration", "seq2seq_lm"),
    ("ForCausalLM", "causal_lm"),
    ("LMHeadModel", "causal_lm"),
)
POOLING = ("last", "mean", "first")  # what a classifier reads: see each family's `pool`
REMAT = ("none", "full", "save_dots", "offload")


@dataclasses.dataclass(frozen=True)
class Settings:
    """What jaxft adds on top of any architecture: the head and how the model computes (`model.*` keys).
    Each family's config dataclass extends this with its architecture's fields and a `model_type`."""

    head: str = "causal_lm"
    num_labels: int = 2
    pooling: str = "last"  # classification: the state the head reads
    labels: tuple[str, ...] | None = None  # classification: the class names (HF id2label); None: LABEL_0, ...
    dtype: str = "float32"  # compute dtype; trainable parameters stay fp32 (master weights)
    param_dtype: str = "float32"  # storage of the frozen base (see `jaxft.train.init_params`)
    scan_layers: bool = True
    remat: str = "none"  # what the backward pass keeps of each layer: see `jaxft.models.layers.remat_policy`
    attention: str = "xla"  # xla | chunked | cudnn | splash | flash | auto: see `jaxft.models.attention`

    def __post_init__(self):  # the old boolean `remat` setting: True is "full"
        if isinstance(self.remat, bool):
            object.__setattr__(self, "remat", "full" if self.remat else "none")

    @property
    def compute_dtype(self):
        return jnp.dtype(self.dtype)

    def replace(self, **kw):
        return dataclasses.replace(self, **kw)


@dataclasses.dataclass(frozen=True)
class Blocks:
    """One stack of identical blocks as `jaxft.plan` counts its activations: what each block keeps per
    token for the backward pass follows from these widths (see `jaxft.plan.activation_bytes`)."""

    prefix: str  # where its parameters live: "layers", "encoder/block", ...
    count: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int  # the MLP's width
    attention: tuple[str, ...] = ("self",)  # its attention sublayers: "self" (causal or not), "cross" (encoder keys)
    mlp_tensors: float = 2  # MLP-wide tensors the backward keeps (gated: gate and up; the activation is recomputed)
    norms: int = 2  # norms, each keeping its input
    # module name -> (the input it reads: projections that share one count it once, its input width,
    # its output width): who pays for a weight gradient's saved input, and save_dots' saved outputs
    projections: tuple[tuple[str, str, int, int], ...] = ()
    takes_prefix: bool = True  # whether P-Tuning v2's prefix keys/values enter its self-attention
    causal: bool = True  # its self-attention (BERT's is bidirectional: `chunked` reads every key for each block)
    window: int | None = None  # every block's sliding window (None: some block attends to every earlier key)
    fused_attention: bool = True  # whether `model.attention` may run a fused kernel here (T5's bias: never)
    recompute: float = 1.9  # remat=full: the backward's working set over one block's kept bytes (measured)
    # the rows it runs over: "input" (input_ids) or "target" (an encoder-decoder's decoder inputs, whose
    # length is the targets' or a rollout's completions')
    stream: str = "input"
    # A mixture of experts' routed experts, stacked weights outside `projections`: (their module path inside
    # a block, experts, experts per token, each one's width); () for a dense MLP
    experts: tuple = ()


@dataclasses.dataclass(frozen=True)
class Family:
    name: str
    model: type  # model(cfg, hooks=(...)) -> a flax.linen Module called as described above
    heads: tuple[str, ...]  # the heads it offers; the first is the default for a bare base model
    config_from_hf: Callable[[dict, str], Any]  # config.json dict (and its file name, for errors) -> config
    config_to_hf: Callable[[Any], dict]  # config -> config.json dict, without the generic keys hf.py adds
    architecture: Callable[[Any], str]  # config -> HF class name (LlamaForCausalLM, ...)
    params_from_hf: Callable[[dict, Any, str], dict]  # {HF name: array}, config, where -> our param tree
    params_to_hf: Callable[[dict, Any], dict]  # our param tree, config -> {HF name: array}
    hf_module: Callable[..., str]  # (our dotted module path, layer index included, cfg=None) -> HF's module name
    our_module: Callable[[str], str | None]  # HF module name -> our dotted module path (None: not ours)
    lora_targets: str | Callable[[Any], str]  # the default `method.targets` (or cfg -> it, as `ia3_targets`)
    head_params: str  # regex on "a/b/c" parameter paths: the output head(s), what `method.name='head'` trains
    classifier_params: str  # regex: a classification head, which always trains when the run adds it
    kv_layout: Callable[[Any], tuple[int, int, int]]  # config -> (layers, kv heads, head dim) a prefix fills
    matmul_weights: Callable[[Any], int]  # config -> weights in a matmul per token (`jaxft.flops`)
    pooling: str = "last"  # what HF's own classifier of this family reads (see `jaxft.models.layers.pool`)
    causal: bool = True  # whether the attention that dominates is causal (FLOPs halve)
    # Generation (`jaxft.generate`): cfg, batch, max_length, dtype -> a KV cache of zeros, None where the
    # family cannot generate; encoder-decoders (T5) also offer `method="encode"` / `method="decode"`.
    init_cache: Callable | None = None
    # cfg -> a length past which every position's rotation changes (LongRoPE's original length: the long
    # factors from there on), or None. Generation recomputes the whole cache once, when a sequence first holds
    # one token more, as transformers' Phi-3 does: the keys cached before were rotated with the short factors.
    cache_reset: Callable[[Any], int | None] = lambda cfg: None
    # (cfg, HF module name) -> the order we store its output units in (our unit j is HF's unit order[j]), or
    # None for HF's own: the weight mapping and every adapter tensor along a module's outputs (LoRA's B,
    # DoRA's magnitudes, IA3's output scales) convert with it. Fused projections, held so that a tensor-parallel
    # shard multiplies what it holds: Llama's gate_up_proj (`gate_up_order`), Phi-3's qkv_proj and GPT-2's c_attn
    # (`qkv_order`).
    hf_rows: Callable[[Any, str], Any] = lambda cfg, name: None
    encoder_decoder: bool = False
    encoder_only_heads: tuple[str, ...] = ()  # an encoder-decoder's heads that read the encoder alone (`decodes`)
    fan_in_fan_out: bool = False  # HF stores the LoRA targets as Conv1D [in, out] (GPT-2): PEFT's flag
    # config -> the "a/b/kernel" path of the classifier's output projection (its width is num_labels)
    classifier_kernel: Callable[[Any], str] = lambda cfg: "score/kernel"
    # (cfg, the checkpoint's tensor names) -> cfg: what only the weights tell (T5: a tied LM head or not)
    config_from_weights: Callable | None = None
    # cfg -> {dotted path of a stack of blocks: its number of blocks}; hf_module / our_module take the
    # block index right after it ("layers.3.self_attn.q_proj"), our params stack them (or name "layers_3")
    layer_stacks: Callable = lambda cfg: {"layers": cfg.num_layers}
    # (intermediates of a forward pass, cfg) -> (keys, values) [layers, B, T, kv heads, head dim] the prefix
    # slots start from (`method.init_from_tokens`); None: every layer's sown "keys_values"
    prefix_keys_values: Callable | None = None
    # cfg -> the stacks of blocks `jaxft.plan` predicts activation memory from (`Blocks`); None: no plan
    activation_blocks: Callable | None = None
    # regex on "a/b/kernel" paths: the frozen projections `model.quantization` stores in 8 or 4 bits
    projections: str = r"(^|/)(q|k|v|o|gate|up|down|gate_up|qkv)_proj/kernel$"
    # the default `method.ia3_targets`, HF PEFT's for the family: a string, or cfg -> string where PEFT's
    # differ between the family's model types
    ia3_targets: str | Callable[[Any], str] = ""
    ia3_feedforward: str = ""  # the default `method.feedforward_modules`: IA3 scales their input
    # config -> the part of `matmul_weights` in the output head, for a head that runs at some positions
    # only (a masked LM at its targets: `label_positions`)
    head_weights: Callable[[Any], int] = lambda cfg: 0
    # The input embedding's "a/b" leaf, and the HF names of the LM head's weights tied to it
    # (`tie_word_embeddings`): an adapter that trains the embedding holds a copy for each, as PEFT
    # keeps one per module. None: not worked out for the family (such an export is an error).
    tied_embedding: tuple[str, tuple[str, ...] | None] = ("", None)
    # cfg -> the factor `return_hidden`'s states carry beyond the final hidden states: what the LM head
    # multiplies them by before its projection (T5 v1.0: d_model**-0.5). PPO's value head reads the states
    # themselves, as TRL's value-head models read the last hidden states.
    head_scale: Callable[[Any], float] = lambda cfg: 1.0


def decodes(cfg) -> bool:
    """Whether the model runs a decoder over rows of its own (an encoder-decoder's target rows): not a
    decoder-only model, nor an encoder-decoder's head that reads the encoder alone (T5's token head)."""
    fam = of(cfg)
    return fam.encoder_decoder and cfg.head not in fam.encoder_only_heads


def get(model_type: str, where: str = "config") -> Family:
    """The family of an HF `model_type`; an unknown one is an error naming the supported types."""
    if model_type not in REGISTRY:
        raise JaxftError(f"{where}: model_type {model_type!r} is not supported (expected one of "
                         f"{', '.join(REGISTRY)})")
    module, _, name = REGISTRY[model_type].partition(":")
    return getattr(importlib.import_module(module), name or "FAMILY")


def of(cfg) -> Family:
    return get(cfg.model_type)


def build(cfg, hooks=()):
    """The Flax model of a config, with a method's hooks."""
    return of(cfg).model(cfg, hooks=tuple(hooks))


def attention_impl(cfg, packed: bool, backend: str | None = None) -> str:
    """The attention implementation a run of `cfg` takes on this backend, or on `backend` (`model.attention`
    resolved; an implementation it cannot run is `resolve`'s error). `packed`: rows hold several examples."""
    fam = of(cfg)
    blocks = fam.activation_blocks(cfg) if fam.activation_blocks else ()
    if blocks and not blocks[0].fused_attention:  # its own einsum (T5's position bias)
        return "xla"
    from jaxft.models.attention import resolve

    head_dim = blocks[0].head_dim if blocks else cfg.hidden_size // cfg.num_heads
    return resolve(cfg.attention, cfg.compute_dtype, head_dim, packed=packed, backend=backend,
                   softcap=getattr(cfg, "attn_softcap", None))


def head_of(architectures, family: Family) -> str:
    """The head an HF config's `architectures` names; the family's default for a bare base model."""
    for arch in architectures or ():
        for ending, head in HEAD_OF_ARCHITECTURE:
            if arch.endswith(ending) and head in family.heads:
                return head
    return family.heads[0]


# ---------------------------------------------------------------------------------------------
# What the families' HF weight mappings share.


def hf_order(cfg, name: str, x, to_hf: bool = True, axis: int = 0):
    """`x`, whose `axis` is HF module `name`'s outputs, from our order to HF's (`to_hf`) or back: the
    family's `hf_rows` (fused projections); most modules keep HF's order."""
    order = of(cfg).hf_rows(cfg, name)
    if order is None:
        return x
    return np.take(np.asarray(x), np.argsort(order) if to_hf else order, axis=axis)


def qkv_order(heads: int, kv_heads: int, head_dim: int) -> np.ndarray:
    """A fused query/key/value projection's output unit j as we store it is HF's unit order[j]. HF stacks
    every query head, then the keys, then the values; we store each kv head's group: its queries, its key,
    its value. A tensor-parallel shard of kv heads then holds its queries, keys and values whole (with HF's
    order the queries of one device's heads lay on another, and every layer moved activations)."""
    g, d = heads // kv_heads, head_dim
    keys, values = heads * d, (heads + kv_heads) * d  # where HF's keys and values start
    return np.concatenate([np.r_[j * g * d:(j + 1) * g * d, keys + j * d:keys + (j + 1) * d,
                                 values + j * d:values + (j + 1) * d] for j in range(kv_heads)])


def params_from_keys(tensors: dict, cfg, where: str, from_hf_key: Callable) -> dict:
    """{HF name: array} -> our flat params {path tuple: array}, through a family's
    `from_hf_key(key)` -> (our path, layer index or None, transpose?) or None for a key it does not use;
    per-layer weights stacked as the model lays out its layers (`stack_layers`)."""
    flat, layers = {}, {}
    for key, value in tensors.items():
        hit = from_hf_key(key)
        if hit is None:
            continue
        path, layer, transpose = hit
        value = value.T if transpose else value
        if layer is None:
            flat[path] = value
        else:
            layers.setdefault(path, {})[layer] = value
    flat.update(stack_layers(layers, cfg, where))
    return flat


def stack_layers(layers: dict, cfg, where: str, stack: tuple[str, ...] = ("layers",), num: int | None = None,
                 unit: str = "layer") -> dict:
    """{path: {layer index: array}} -> flat params: stacked along a leading axis under `stack` when the
    model scans its layers, else one `{name}_{i}` subtree per layer for the last name of `stack` (T5:
    ("encoder", "block") -> encoder/block_3). `num` layers (default cfg.num_layers); `unit` names one in
    errors. A layer missing a weight, or holding it in another shape, is an error."""
    n = cfg.num_layers if num is None else num
    *outer, name = stack
    flat = {}
    for path, per_layer in layers.items():
        missing = set(range(n)) - set(per_layer)
        if missing:
            raise JaxftError(f"{where}: {unit} {min(missing)} has no {'.'.join(path)}")
        odd = [i for i in range(n) if np.shape(per_layer[i]) != np.shape(per_layer[0])]
        if odd:
            raise JaxftError(f"{where}: {'.'.join(path)} differs between {unit}s ({unit} 0: {np.shape(per_layer[0])}, "
                             f"{unit} {odd[0]}: {np.shape(per_layer[odd[0]])}); expected one shape in every {unit}")
        if cfg.scan_layers:
            flat[(*outer, name) + path] = np.stack([per_layer[i] for i in range(n)])
        else:
            for i in range(n):
                flat[(*outer, f"{name}_{i}") + path] = per_layer[i]
    return flat


def unstack_layers(path: tuple, value, stack: str = "layers"):
    """A flat param (path, value) under a layer stack -> [(layer index, path inside the layer, value)];
    None where the path is not under `stack` (scanned `layers` or unscanned `layers_3`)."""
    if path[0] == stack:
        return [(i, path[1:], v) for i, v in enumerate(value)]
    if path[0].startswith(stack + "_") and path[0][len(stack) + 1:].isdigit():
        return [(int(path[0][len(stack) + 1:]), path[1:], value)]
    return None
