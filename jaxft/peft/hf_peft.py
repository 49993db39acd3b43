"""HF PEFT adapter format (adapter_config.json + adapter_model.safetensors), both ways.

Each PEFT type is a `Format` in `FORMATS`, keyed by PEFT's `peft_type`: how a hook of a method of that
type is written (its adapter_config.json keys and tensors) and how one is read back into a hook and
its parameters. A hook finds its format through its method (`hook.kind` -> `registry.Kind.peft_type`).

LoRA maps to PEFT's `LORA` (lora_A [r, in], lora_B [out, r] per layer). P-Tuning v2 and prefix
tuning map to `PREFIX_TUNING` (`prompt_embeddings` [tokens, layers * 2 * kv_width], written after any
reparameterisation, so the adapter serves without it); prompt tuning to `PROMPT_TUNING` and P-Tuning
to `P_TUNING` (`prompt_embeddings` [tokens, hidden], the prompt encoder's output). A classifier head
goes in as PEFT's `modules_to_save` copy of its modules (Llama's `score`; BERT's `pooler` and
`classifier`), named as the family names them in HF, and so does any other base weight the run trains
beside the method (`method.trainable_pattern`), by its module's whole HF name.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path
from typing import Callable

import numpy as np

from jaxft.errors import JaxftError
from jaxft.models import family
from jaxft.hf import label_entries, pooling_entry, read_labels, read_pooling
from jaxft.peft import adalora, adapter, ia3, peft_keys, registry
from jaxft.peft.lora import LoraHook, split_base
from jaxft.peft.partition import ADDED_PARAMS, flat, merge, unflat
from jaxft.peft.prompt import MODULE, PromptHook, parse_template
from jaxft.peft.ptuning_v2 import PrefixHook

TASK_TYPES = {"classification": "SEQ_CLS", "token_classification": "TOKEN_CLS", "causal_lm": "CAUSAL_LM",
              "seq2seq_lm": "SEQ_2_SEQ_LM"}
TASK_HEADS = ("classification", "token_classification")
HEAD_OF_TASK = {"SEQ_CLS": "classification", "TOKEN_CLS": "token_classification"}
LORA_KEY = re.compile(r"base_model\.model\.(.+)\.lora_([AB])\.weight")
TEMPLATE_KEY = "jaxft_template"  # a P-Tuning adapter's `method.template` (jaxft's key)

@dataclasses.dataclass(frozen=True)
class Format:
    peft_type: str
    # (model, hook, trainable params flat {"a/b": array}, base reference) -> (adapter_config keys, tensors)
    export: Callable
    # (model config, adapter_config dict, tensors, where) -> (hook, {"a/b": array} of the params it adds)
    load: Callable
    head_prefix: str = "base_model.model."  # what PEFT puts before a classifier head's HF names
    owns: Callable = lambda key: False  # keys of the adapter's own tensors beyond LoRA's and prompt_embeddings


FORMATS: dict[str, Format] = {}


def register_format(fmt: Format) -> Format:
    FORMATS[fmt.peft_type] = fmt
    return fmt


def format_of(hook) -> Format | None:
    """The PEFT format of a hook's method; None where its method has none (or it adds nothing)."""
    kind = registry.get(getattr(hook, "kind", ""))
    return FORMATS.get(kind.peft_type) if kind is not None else None


def _lora_modules(trainable) -> dict[str, dict[str, np.ndarray]]:
    """our dotted module path (no layer index) -> {"a": [L?, in, r], "b": [L?, r, out]}, and PiSSA's / OLoRA's
    starting factors "a0", "b0" where the tree holds them."""
    out = {}
    for path, value in flat(trainable).items():
        parts = path.split("/")
        if parts[-1] in ("lora_a", "lora_b", "lora_a0", "lora_b0"):
            out.setdefault(".".join(parts[:-1]), {})[parts[-1][5:]] = np.asarray(value, np.float32)
    return out


def _prefix_embeddings(model, hook: PrefixHook, prefix_params) -> np.ndarray:
    k, v = hook.encoder(model.cfg, dropout=0.0, name=None).apply({"params": prefix_params}, 1)
    kv = np.stack([np.asarray(k[:, 0]), np.asarray(v[:, 0])], axis=1)  # [L, 2, P, KV, D]
    return kv.transpose(2, 0, 1, 3, 4).reshape(hook.num_virtual_tokens, -1)


def _base_module(cfg, name: str) -> bool:
    """Whether an adapter tensor's HF name is a weight of the base model's own modules (not of a head)."""
    ours = family.of(cfg).our_module(name.rsplit(".", 1)[0])
    return ours is not None and not re.search(family.of(cfg).classifier_params, ours.replace(".", "/") + "/")


def _replace_base(cfg, params: dict, tensors: dict, where: str) -> dict:
    """{HF name: array} of base modules' trained copies -> the flat base leaves they replace. Each leaf
    they touch is written out under HF names, overwritten and read back, so the family's own mapping
    (transposes, layer stacks) applies, and a layer the adapter leaves out keeps the base's weights."""
    fam = family.of(cfg)
    wanted = {peft_keys.our_name(cfg, name.rsplit(".", 1)[0], where)[0] for name in tensors}
    leaves = {}
    for k, v in flat(params).items():
        module = k.rsplit("/", 1)[0].replace("/", ".")
        hit = peft_keys.stack_of(cfg, module)
        if (module if hit is None else peft_keys.join(hit[0], hit[2])) in wanted and not ADDED_PARAMS.search(k):
            leaves[k] = v
    current = fam.params_to_hf(unflat(leaves), cfg)
    for name, value in tensors.items():
        if name not in current:
            raise JaxftError(f"{where}: {name} is not a weight of this {cfg.model_type} model")
        if tuple(value.shape) != tuple(current[name].shape):
            raise JaxftError(f"{where}: {name} has shape {tuple(value.shape)}, the base model's "
                             f"{tuple(current[name].shape)}")
    mapped = flat(fam.params_from_hf({**current, **tensors}, cfg, where))
    return {k: mapped[k] for k in leaves}


# ---------------------------------------------------------------------------------------------
# The formats.


def _export_lora(model, hook: LoraHook, params: dict, base: str):
    cfg = model.cfg
    patterns, tensors = [], {}
    for path, ab in _lora_modules(unflat(params)).items():
        if "a" not in ab:  # a layer `method.layers` left frozen: its split adds up to the base weight again
            continue
        if hook.splits_base:  # PEFT's conversion to a plain adapter on the original base: s(BA - B0A0), rank 2r
            if "a0" not in ab:
                raise JaxftError(f"{path}: a {hook.init} adapter's export needs its starting factors (lora_a0, "
                                 "lora_b0) beside the trained ones")
            ab = {"a": np.concatenate([ab["a"], ab["a0"]], -1), "b": np.concatenate([ab["b"], -ab["b0"]], -2)}
        where = peft_keys.stack_of(cfg, path)
        if where is None:
            per_layer = [(path, None, ab["a"], ab["b"])]
        else:
            stack, index, rest = where
            indices = range(ab["a"].shape[0]) if index is None else [index]
            pick = (lambda x, i: x[i]) if index is None else (lambda x, i: x)  # noqa: E731
            path = peft_keys.join(stack, rest)
            per_layer = [(path, i, pick(ab["a"], i), pick(ab["b"], i)) for i in indices]
        # PEFT matches target_modules against full module names: one pattern per stacked path.
        patterns.append(peft_keys.pattern(cfg, path, per_layer[0][1]))
        for path, i, a, b in per_layer:
            name = peft_keys.hf_name(cfg, path, i)
            tensors[f"base_model.model.{name}.lora_A.weight"] = a.T
            tensors[f"base_model.model.{name}.lora_B.weight"] = family.hf_order(cfg, name, b.T)
    # A converted PiSSA / OLoRA adapter: twice the rank at the same scale (alpha doubled; rsLoRA's times sqrt 2).
    grow = 2 if hook.splits_base else 1
    config = {"r": grow * hook.rank, "lora_alpha": hook.alpha * (math.sqrt(grow) if hook.rslora else grow),
              "lora_dropout": hook.dropout, "use_rslora": hook.rslora,
              "target_modules": "|".join(sorted(set(patterns))), "bias": "none",
              "fan_in_fan_out": family.of(cfg).fan_in_fan_out,
              "init_lora_weights": "gaussian" if hook.init == "gaussian" else True, "use_dora": hook.dora}
    for path, i, m in peft_keys.per_layer(unflat(params), "lora_magnitude", cfg):  # DoRA
        name = peft_keys.hf_name(cfg, path, i)
        tensors[f"base_model.model.{name}.lora_magnitude_vector"] = family.hf_order(cfg, name, m)
    return config, tensors


# What PEFT's LoRA adapters may hold beyond jaxft's LoRA on linear layers: key pattern, what it is.
LORA_UNSUPPORTED = ((r"\.lora_embedding_[AB]$", "LoRA on an embedding layer"),
                    (r"\.lora_[AB]\.bias$", "a LoRA bias (lora_bias=True)"),
                    (r"\.trainable_tokens_", "trainable tokens' rows (trainable_token_indices)"))


def _load_lora(cfg, config: dict, tensors: dict, where: str):
    if config.get("bias", "none") != "none":
        raise JaxftError(f"{where}/adapter_config.json: LoRA biases are not supported yet")
    init = _lora_init(config, where)
    for key in tensors:
        what = next((w for part, w in LORA_UNSUPPORTED if re.search(part, key)), None)
        if what:
            raise JaxftError(f"{where}: {key} is {what}, not supported yet (expected LoRA on linear layers, "
                             "with modules_to_save for whole modules)")
    stacks = family.of(cfg).layer_stacks(cfg)
    per_module, magnitudes, scales = {}, {}, {}
    for key, value in tensors.items():  # DoRA
        if m := re.fullmatch(r"base_model\.model\.(.+)\.lora_magnitude_vector", key):
            path, layer = peft_keys.our_name(cfg, m[1], where)
            magnitudes.setdefault((path, "lora_magnitude"), {})[layer] = family.hf_order(cfg, m[1], value, False)
    new = peft_keys.to_params(magnitudes, cfg, where) if magnitudes else {}
    for key, value in tensors.items():
        m = LORA_KEY.fullmatch(key)
        if not m:
            continue
        name = family.of(cfg).our_module(m[1])
        if name is None:
            raise JaxftError(f"{where}: {key} names a module this {cfg.model_type} model does not have")
        block = None
        for stack in stacks:
            hit = re.fullmatch(re.escape(stack) + r"\.(\d+)\.(.+)", name)
            if hit:
                block = (stack, int(hit[1]), hit[2])
        path = name if block is None else f"{block[0]}.{block[2]}"
        layer = None if block is None else block[1]
        if m[2] == "B":
            value = family.hf_order(cfg, m[1], value, False)
        per_module.setdefault(path, {}).setdefault(m[2], {})[layer] = value.T
        scales[path, layer] = _lora_scale(config, m[1])
    # PEFT's rank_pattern / alpha_pattern give modules ranks and scales of their own; the hook has one
    # of each, so each module is padded with zeros to the largest rank and its scale folded into B.
    rank = max([int(config["r"])] + [v.shape[1] for ab in per_module.values() for v in ab.get("A", {}).values()])
    grow = rank / int(config["r"])  # the default scale kept at the larger rank
    alpha = float(config["lora_alpha"]) * (np.sqrt(grow) if config.get("use_rslora") else grow)
    hook = LoraHook(rank, float(alpha), 0.0, "", bool(config.get("use_rslora")), bool(config.get("use_dora")), init)
    for path, ab in per_module.items():
        for which, per_layer in ab.items():
            for layer, v in per_layer.items():
                if which == "B":
                    v = v * np.float32(scales[path, layer] / hook.scale)
                per_layer[layer] = np.pad(v, [(0, rank - v.shape[0]), (0, 0)] if which == "B"
                                          else [(0, 0), (0, rank - v.shape[1])])
    patterns = []
    for path, ab in per_module.items():
        stack = next((s for s in stacks if path.startswith(s + ".")), None)
        if stack is None:
            patterns.append(re.escape(path))
            for which, per_layer in ab.items():
                new[path.replace(".", "/") + "/lora_" + which.lower()] = per_layer[None]
            continue
        rest = path[len(stack) + 1:]
        patterns.append(re.escape(stack) + r"(_\d+)?\." + re.escape(rest))  # scanned or not
        n = stacks[stack]
        for which, per_layer in ab.items():
            leaf = "lora_" + which.lower()
            got = sorted(per_layer)
            if got[-1] >= n:
                raise JaxftError(f"{where}: LoRA on {path} has weights for {len(got)} layers "
                                 f"({', '.join(map(str, got[:8]))}{', ...' if len(got) > 8 else ''}), "
                                 f"the model has {n} (0-{n - 1}): expected one per layer (an adapter of another base "
                                 "model?)")
            # Layers the adapter leaves out (PEFT's layers_to_transform, a regex on some layers) get zero
            # factors: no update, as in PEFT. (DoRA's magnitudes have no such neutral value: an error above.)
            zero = np.zeros_like(per_layer[got[0]])
            full = [per_layer.get(i, zero) for i in range(n)]
            if cfg.scan_layers:
                new[path.replace(".", "/") + "/" + leaf] = np.stack(full)
            else:
                for i, v in enumerate(full):
                    new[f"{stack.replace('.', '/')}_{i}/" + rest.replace(".", "/") + "/" + leaf] = v
    return dataclasses.replace(hook, targets="|".join(sorted(patterns))), new


def _lora_init(config: dict, where: str) -> str:
    """The adapter's `init_lora_weights` as a `LoraHook.init`. PEFT loads a PiSSA / OLoRA adapter saved
    unconverted by splitting the base it is loaded on again (its factors then apply to the residual), and so
    does jaxft: exactly for "pissa" and "olora"; a randomised SVD's residual cannot be rebuilt."""
    init = config.get("init_lora_weights", True)
    if not isinstance(init, str):  # True / False: PEFT's default start, or random factors
        return ""
    if init == "gaussian":
        return init
    if init in ("pissa", "olora"):
        if config.get("rank_pattern") or config.get("alpha_pattern"):
            raise JaxftError(f"{where}/adapter_config.json: init_lora_weights={init!r} with a rank_pattern or "
                             "alpha_pattern is not supported (expected one rank and alpha for every module)")
        return init
    if init.startswith("pissa_niter_") or init in ("corda", "loftq"):
        raise JaxftError(f"{where}/adapter_config.json: init_lora_weights={init!r}: an adapter saved without "
                         "converting it belongs to a base changed by a random or data-driven split, which cannot be "
                         "rebuilt here (expected one saved with PEFT's path_initial_model_for_weight_conversion, "
                         "or init_lora_weights 'pissa' / 'olora')")
    return ""  # the other inits (eva, orthogonal, ...) only started the factors the file holds


def _check_factors(params: dict, added: dict, where: str):
    """LoRA factors fit the kernels they update ([L?, in, r] and [L?, r, out] against [L?, in, out]):
    one error for an adapter of another base model, not a shape error inside the model."""
    base = flat(params)
    for path, v in added.items():
        kernel = base.get(path.rsplit("/", 1)[0] + "/kernel") if path.endswith(("/lora_a", "/lora_b")) else None
        if kernel is None:
            continue
        ours, theirs = (v.shape[:-1], kernel.shape[:-1]) if path.endswith("a") else \
            (v.shape[:-2] + v.shape[-1:], kernel.shape[:-2] + kernel.shape[-1:])
        if tuple(ours) != tuple(theirs):
            raise JaxftError(f"{where}: LoRA on {path.rsplit('/', 1)[0]} has {path[-1].upper()} of shape "
                             f"{tuple(v.shape)}, which does not fit the base model's kernel {tuple(kernel.shape)} "
                             "(an adapter of another base model?)")


def _lora_scale(config: dict, module: str | None) -> float:
    """PEFT's LoRA scale of a module (its HF name; None: the default), after rank_pattern and
    alpha_pattern, whose keys match a name's end as PEFT matches them (`peft.utils.other.get_pattern_key`)."""
    def lookup(pattern: str, default):
        hit = next((k for k in config.get(pattern) or {} if module is not None
                    and re.match(rf"(.*\.)?({k})$", module)), None)
        return float(default if hit is None else config[pattern][hit])

    r, alpha = lookup("rank_pattern", config["r"]), lookup("alpha_pattern", config["lora_alpha"])
    return alpha / (np.sqrt(r) if config.get("use_rslora") else r)


def _export_prefix(model, hook: PrefixHook, params: dict, base: str):
    cfg = model.cfg
    prefix = {k[len("prefix_encoder/"):]: v for k, v in params.items() if k.startswith("prefix_encoder/")}
    layers, kv_heads, head_dim = family.of(cfg).kv_layout(cfg)
    config = {"num_virtual_tokens": hook.num_virtual_tokens, "token_dim": kv_heads * head_dim, "num_layers": layers,
              "num_attention_heads": kv_heads, "encoder_hidden_size": hook.projection_hidden if hook.projection
              else cfg.hidden_size, "prefix_projection": hook.projection,
              # Encoder-decoders: PEFT's seq2seq default (two submodules); T5 reads the prefix in the
              # decoder's self-attention only (see jaxft/models/t5.py).
              "num_transformer_submodules": 2 if family.of(cfg).encoder_decoder else 1}
    return config, {"prompt_embeddings": _prefix_embeddings(model, hook, unflat(prefix))}


def _load_prefix(cfg, config: dict, tensors: dict, where: str):
    emb = tensors["prompt_embeddings"]
    layers, kv_heads, head_dim = family.of(cfg).kv_layout(cfg)
    width = layers * 2 * kv_heads * head_dim
    if emb.shape[1] != width:
        raise JaxftError(f"{where}: prompt_embeddings width {emb.shape[1]} does not fit this model ({width})")
    # Trained with or without the MLP: what serves is the prefix itself.
    kind = "prefix_tuning" if config.get("prefix_projection") else "ptuning_v2"
    return PrefixHook(emb.shape[0], projection=False, kind=kind), {"prefix_encoder/embedding": emb}


def _export_prompt(model, hook: PromptHook, params: dict, base: str):
    cfg = model.cfg
    name = MODULE[hook.kind] + "/"
    own = unflat({k[len(name):]: v for k, v in params.items() if k.startswith(name)})
    layers, kv_heads, head_dim = family.of(cfg).kv_layout(cfg)
    config = {"num_virtual_tokens": hook.num_virtual_tokens, "token_dim": cfg.hidden_size, "num_layers": layers,
              "num_attention_heads": cfg.num_heads if hasattr(cfg, "num_heads") else kv_heads,
              "num_transformer_submodules": 1}
    if hook.kind == "ptuning":
        config.update(encoder_reparameterization_type="LSTM" if hook.encoder == "lstm" else "MLP",
                      encoder_hidden_size=hook.encoder_hidden or cfg.hidden_size,
                      encoder_num_layers=hook.encoder_layers, encoder_dropout=hook.encoder_dropout)
        if hook.template:  # where the virtual tokens go; PEFT ignores the key (and puts them all in front)
            config[TEMPLATE_KEY] = hook.template
    else:  # PEFT validates a TEXT init's tokenizer, which is the base model's directory
        text = hook.init == "text" and bool(base)
        config.update(prompt_tuning_init="TEXT" if text else {"vocab": "SAMPLE_VOCAB"}.get(hook.init, "RANDOM"),
                      prompt_tuning_init_text=hook.init_text if text else None,
                      tokenizer_name_or_path=base if text else None)
    return config, {"prompt_embeddings": hook.prompt_embeddings(cfg, own)}


def _load_prompt(kind: str):
    def load(cfg, config: dict, tensors: dict, where: str):
        # A seq2seq adapter with PEFT's default num_transformer_submodules=2 holds a second prompt for the
        # decoder, which PEFT's forward and generate leave out: the virtual tokens are the first rows.
        emb = tensors["prompt_embeddings"][:config.get("num_virtual_tokens")]
        if emb.ndim != 2 or emb.shape[1] != cfg.hidden_size:
            raise JaxftError(f"{where}: prompt_embeddings of shape {tuple(emb.shape)} does not fit this model "
                             f"(expected [tokens, {cfg.hidden_size}])")
        template = str(config.get(TEMPLATE_KEY) or "")
        if template:
            parse_template(template, emb.shape[0])
        return PromptHook(emb.shape[0], kind, template=template), {f"{MODULE[kind]}/embedding": emb}

    return load


PROMPT_SCORE = "base_model."  # prompt learning wraps no tuner around the base model
register_format(Format("LORA", _export_lora, _load_lora, owns=lambda k: re.search(
    "|".join([r"\.lora_magnitude_vector$"] + [part for part, _ in LORA_UNSUPPORTED]), k)))
register_format(Format("PREFIX_TUNING", _export_prefix, _load_prefix, PROMPT_SCORE))
register_format(Format("PROMPT_TUNING", _export_prompt, _load_prompt("prompt_tuning"), PROMPT_SCORE))
register_format(Format("P_TUNING", _export_prompt, _load_prompt("ptuning"), PROMPT_SCORE))
# Bottleneck adapters (jaxft's own format), IA3 and AdaLoRA write and read their tensors in their modules.
register_format(Format(adapter.PEFT_TYPE, lambda model, hook, params, base: adapter.export(model.cfg, hook, unflat(params)),
                       adapter.load, owns=lambda k: not k.startswith("base_model.")))
register_format(Format("IA3", lambda model, hook, params, base: ia3.export_peft(model.cfg, hook, unflat(params)),
                       ia3.import_peft, owns=lambda k: ".ia3_l" in k))
register_format(Format("ADALORA", lambda model, hook, params, base: adalora.export_peft(
    model.cfg, hook, unflat(params), hook.total_step), adalora.import_peft, owns=lambda k: re.search(r"\.lora_[ABE]", k)))


# ---------------------------------------------------------------------------------------------
# Whole adapters.


def named_labels(cfg) -> bool:
    """Whether the classes have names worth writing: PEFT ignores (and warns about) keys it does not
    know, so integer classes 0..C-1 (nothing to say beyond their index) are not written."""
    return cfg.labels is not None and cfg.labels != tuple(str(i) for i in range(cfg.num_labels))


def save_adapter(model, method, trainable, out_dir, base: str = "") -> Path:
    """Write each of the method's hooks as a HF PEFT adapter (one subdirectory each, named by its
    method, if several), with the base weights the run trained beside it (`trained_base`)."""
    from safetensors.numpy import save_file

    cfg = model.cfg
    out = Path(out_dir)
    task = TASK_TYPES.get(cfg.head)  # None (PEFT's plain PeftModel) for a masked LM
    check_exportable(model, trainable, method.name)
    params = {k: np.asarray(v, np.float32) for k, v in flat(trainable).items()}
    head = {k: v for k, v in params.items() if is_head(cfg, k)}
    base_tensors, modules = trained_base(model, params)
    tied = any(name in base_tensors for name in tied_names(cfg))
    hooks = [h for h in method.hooks if getattr(h, "kind", "")]
    for hook in hooks:
        if format_of(hook) is None:
            kind = registry.get(hook.kind)
            if kind is None or not kind.added:
                continue  # adds nothing to write
            raise JaxftError(f"method {hook.kind!r} has no HF PEFT format (peft_type {kind.peft_type!r} unknown)")
    hooks = [h for h in hooks if format_of(h) is not None]
    if not hooks:
        raise JaxftError(f"method {method.name!r} adds no parameters a HF PEFT adapter holds")
    for hook in hooks:
        fmt = format_of(hook)
        target = out / hook.kind if len(hooks) > 1 else out
        target.mkdir(parents=True, exist_ok=True)
        own, tensors = fmt.export(model, hook, params, base)
        config = {"base_model_name_or_path": base or None, "task_type": task, "inference_mode": True,
                  "revision": None, "modules_to_save": modules,
                  **(pooling_entry(cfg) if head and cfg.head == "classification" else {}),
                  **(label_entries(cfg) if head and named_labels(cfg) else {}),
                  "peft_type": fmt.peft_type, **own}
        if tied and fmt.peft_type == "LORA":  # PEFT then ties the copies as the base model ties its weights
            config["ensure_weight_tying"] = True
        tensors.update({fmt.head_prefix + k: v for k, v in base_tensors.items()})
        save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(target / "adapter_model.safetensors"))
        (target / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out


def is_head(cfg, path: str) -> bool:
    """Whether a leaf is a task model's classifier head (which the run adds, and which always trains)."""
    return cfg.head in TASK_HEADS and re.search(family.of(cfg).classifier_params, path) is not None


def ties_lm_head(cfg) -> bool:
    """Whether this model's LM head is its input embedding (a task head has no LM head)."""
    return cfg.tie_word_embeddings and cfg.head not in TASK_HEADS


def tied_names(cfg) -> tuple[str, ...]:
    """HF names of the LM head's weights that this model ties to its input embedding."""
    return tuple(family.of(cfg).tied_embedding[1] or ()) if ties_lm_head(cfg) else ()


def trained_base(model, params: dict) -> tuple[dict, list | None]:
    """The base weights a run trains beside its method's own parameters (a new classifier head, the
    leaves of `method.trainable_pattern`), as PEFT keeps them: their tensors under HF names, and the
    `modules_to_save` PEFT holds a trained copy of. A classifier head is named as PEFT's task models
    name it (Llama's `score`; BERT's `pooler`, `classifier`); any other module by its whole HF name
    (`model.embed_tokens`, `model.layers.3.input_layernorm`), since PEFT picks every module whose name
    ends with an entry. A trained input embedding that the LM head ties to
    is written for the head too: PEFT keeps separate copies."""
    cfg = model.cfg
    fam = family.of(cfg)
    base = {k: v for k, v in params.items() if not ADDED_PARAMS.search(k)}
    head = {k: v for k, v in base.items() if is_head(cfg, k)}
    rest = {k: v for k, v in base.items() if k not in head}
    tensors = fam.params_to_hf(unflat(head), cfg) if head else {}
    modules = {fam.hf_module(k.split("/")[0]).split(".")[-1] for k in head}
    leaf = fam.tied_embedding[0]
    more = {}
    if leaf in rest:  # converted on its own, so the LM head's tied copies take the same array
        more = fam.params_to_hf(unflat({leaf: rest.pop(leaf)}), cfg)
        (embedding,) = more.values()
        more.update({name: embedding for name in tied_names(cfg)})
    if rest:
        more.update(fam.params_to_hf(unflat(rest), cfg))
    tensors.update(more)
    modules |= {name.rsplit(".", 1)[0] for name in more}
    return tensors, sorted(modules) or None


def check_exportable(model, trainable, method_name: str):
    """A base weight trained inside a module the method itself changes (`full+lora`, LoRA with a
    `method.trainable_pattern` on its own targets, BitFit + LoRA on the same projections) has no PEFT
    form: PEFT cannot make one module both a tuner layer and a trained copy. Nor has an input embedding
    tied to the LM head where the family does not say which weights tie to it. One error, at start-up."""
    cfg = model.cfg
    names = list(flat(trainable))
    leaf, tied = family.of(cfg).tied_embedding
    if leaf in names and tied is None and ties_lm_head(cfg):
        raise JaxftError(f"method.name={method_name!r} trains {leaf}, which this {cfg.model_type} model's LM head "
                         f"ties to: its HF PEFT export is not supported (expected an untied model, the "
                         f"embedding frozen, or export.enabled=False)")
    tuned = sorted({k.rsplit("/", 1)[0] for k in names if ADDED_PARAMS.search(k)})
    for k in names:
        if ADDED_PARAMS.search(k):
            continue
        module = k.rsplit("/", 1)[0]
        clash = next((t for t in tuned if t == module or t.startswith(module + "/") or module.startswith(t + "/")),
                     None)
        if clash is not None:
            raise JaxftError(f"method.name={method_name!r} trains the base weight {k} inside {clash}, which the "
                             f"method also changes: a HF PEFT adapter cannot hold both (expected base weights "
                             f"trained outside the method's modules, or export.enabled=False)")


def adapter_dirs(root: Path) -> list[Path]:
    """An adapter directory, or the per-method subdirectories a composed method's export holds."""
    if (root / "adapter_config.json").exists() or not root.is_dir():
        return [root]
    subdirs = sorted(p for p in root.iterdir() if (p / "adapter_config.json").exists())
    return subdirs or [root]


def load_adapter(model, params: dict, adapter_dir):
    """(base model, base params) + a HF PEFT adapter directory (or a composed export's directory of
    them) -> (hooked model, params)."""
    for root in adapter_dirs(Path(adapter_dir)):
        model, params = _load_one(model, params, root)
    return model, params


def _load_one(model, params: dict, root: Path):
    from safetensors.numpy import load_file

    try:
        config = json.loads((root / "adapter_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:  # ValueError: invalid JSON, or bytes that are not UTF-8
        raise JaxftError(f"{root}: not a HF PEFT adapter directory ({e})") from None
    try:
        tensors = load_file(str(root / "adapter_model.safetensors"))
    except Exception as e:  # noqa: BLE001  (missing, truncated or not safetensors: safetensors' own error type)
        raise JaxftError(f"{root / 'adapter_model.safetensors'}: unreadable safetensors file ({e})") from None
    cfg = model.cfg
    fam = family.of(cfg)
    kind = config.get("peft_type")
    if kind not in FORMATS:
        raise JaxftError(f"{root}/adapter_config.json: peft_type {kind!r} is not supported (expected one of "
                         f"{', '.join(FORMATS)})")
    new = {}
    # Base weights the run trained beside the method (PEFT's modules_to_save copies), under their HF
    # names: a new classifier head, and any other module of the base model.
    # PEFT saves the weights of an embedding or LM head it puts LoRA on as `<module>.base_layer.weight`.
    copies = {re.sub(r"^base_model\.(model\.)?", "", k.replace(".base_layer.", ".")): v for k, v in tensors.items()
              if not LORA_KEY.fullmatch(k) and k != "prompt_embeddings" and not FORMATS[kind].owns(k)}
    head_tensors = {k: v for k, v in copies.items() if not _base_module(cfg, k)}
    if head_tensors:
        head = HEAD_OF_TASK.get(config.get("task_type"), "classification")
        mapped = flat(fam.params_from_hf(head_tensors, cfg.replace(head=head), str(root)))
        mapped = {k: v for k, v in mapped.items() if re.search(fam.classifier_params, k)}
        kernel = mapped.get(fam.classifier_kernel(cfg.replace(head=head)))
        if kernel is None:
            raise JaxftError(f"{root}: {', '.join(sorted(head_tensors))} hold no {head} head of this "
                             f"{cfg.model_type} model")
        pooling = read_pooling(config, f"{root}/adapter_config.json", default=cfg.pooling)
        labels = read_labels(config, f"{root}/adapter_config.json")
        if labels is not None and len(labels) != kernel.shape[-1]:
            raise JaxftError(f"{root}/adapter_config.json: {len(labels)} labels in id2label, "
                             f"the classifier head has {kernel.shape[-1]}")
        cfg = cfg.replace(head=head, num_labels=kernel.shape[-1], pooling=pooling, labels=labels)
        new.update(mapped)
    # The LM head's copies of a trained input embedding it ties to: this model shares one table.
    base_copies = {k: v for k, v in copies.items() if k not in head_tensors and k not in tied_names(cfg)}
    if base_copies:
        new.update(_replace_base(cfg, params, base_copies, str(root)))
    hook, added = FORMATS[kind].load(cfg, config, tensors, str(root))
    _check_factors(params, added, str(root))
    new.update(added)
    import jax.numpy as jnp

    added = unflat({k: jnp.asarray(v) for k, v in new.items()})
    params = merge(params, added)
    if getattr(hook, "splits_base", False):  # PEFT's own load of an unconverted PiSSA / OLoRA adapter
        params = split_base(params, hook, keep_factors=True)
    return family.build(cfg, tuple(model.hooks) + (hook,)), params
