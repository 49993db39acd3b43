"""HF PEFT adapter format (adapter_config.json + adapter_model.safetensors), both ways.

LoRA maps to PEFT's `LORA` (lora_A [r, in], lora_B [out, r] per layer); P-Tuning v2 maps to PEFT's
`PREFIX_TUNING` (`prompt_embeddings` [tokens, layers * 2 * kv_width], written after any
reparameterisation, so the adapter serves without it). A classifier head goes in as PEFT's
`modules_to_save` copy of `score`.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from jaxft.errors import JaxftError
from jaxft.models import family
from jaxft.hf import label_entries, pooling_entry, read_labels, read_pooling
from jaxft.peft import adalora, adapter, ia3, peft_keys
from jaxft.peft.lora import LoraHook
from jaxft.peft.partition import flat, merge, unflat
from jaxft.peft.ptuning_v2 import PrefixEncoder, PrefixHook

LORA_KEY = re.compile(r"base_model\.model\.(.+)\.lora_([AB])\.weight")

# --- adapters, IA3, AdaLoRA (branch adapters): hook type -> export, peft_type -> import ---
OWN_EXPORT = {
    adapter.AdapterHook: adapter.export,
    ia3.IA3Hook: ia3.export_peft,
    adalora.AdaLoraHook: lambda cfg, hook, trainable: adalora.export_peft(cfg, hook, trainable, 0),
}
OWN_IMPORT = {adapter.PEFT_TYPE: adapter.load, "IA3": ia3.import_peft, "ADALORA": adalora.import_peft}


def _lora_modules(trainable) -> dict[str, dict[str, np.ndarray]]:
    """our dotted module path (no layer index) -> {"a": [L?, in, r], "b": [L?, r, out]}."""
    out = {}
    for path, value in flat(trainable).items():
        parts = path.split("/")
        if parts[-1] in ("lora_a", "lora_b"):
            out.setdefault(".".join(parts[:-1]), {})[parts[-1][-1]] = np.asarray(value, np.float32)
    return out


def _peft_module(cfg, path: str, layer: int | None) -> str:
    """Our module path (scanned `layers.x`, with its layer index, or `layers_3.x`) -> HF's module name."""
    head, *rest = path.split(".")
    if head == "layers" and layer is not None:
        path = ".".join(["layers", str(layer)] + rest)
    elif head.startswith("layers_"):
        path = ".".join(["layers", head[7:]] + rest)
    return family.of(cfg).hf_module(path)


def _prefix_embeddings(model, hook: PrefixHook, prefix_params) -> np.ndarray:
    cfg = model.cfg
    enc = PrefixEncoder(hook.num_virtual_tokens, *family.of(cfg).kv_layout(cfg),
                        cfg.hidden_size, hook.projection, hook.projection_hidden, 0.0, hook.init_std)
    k, v = enc.apply({"params": prefix_params}, 1)
    kv = np.stack([np.asarray(k[:, 0]), np.asarray(v[:, 0])], axis=1)  # [L, 2, P, KV, D]
    return kv.transpose(2, 0, 1, 3, 4).reshape(hook.num_virtual_tokens, -1)


def named_labels(cfg) -> bool:
    """Whether the classes have names worth writing: PEFT ignores (and warns about) keys it does not
    know, so integer classes 0..C-1 (nothing to say beyond their index) are not written."""
    return cfg.labels is not None and cfg.labels != tuple(str(i) for i in range(cfg.num_labels))


def save_adapter(model, method, trainable, out_dir, base: str = "") -> Path:
    """Write each of the method's hooks as a HF PEFT adapter (one subdirectory each if several)."""
    from safetensors.numpy import save_file

    cfg = model.cfg
    out = Path(out_dir)
    task = "SEQ_CLS" if cfg.head == "classification" else "CAUSAL_LM"
    params = flat(trainable)
    score = params.get("score/kernel")
    hooks = [h for h in method.hooks if isinstance(h, (LoraHook, PrefixHook)) or type(h) in OWN_EXPORT]
    for hook in hooks:
        target = out / type(hook).__name__.replace("Hook", "").lower() if len(hooks) > 1 else out
        target.mkdir(parents=True, exist_ok=True)
        common = {"base_model_name_or_path": base or None, "task_type": task, "inference_mode": True,
                  "revision": None, "modules_to_save": ["score"] if score is not None else None,
                  **(pooling_entry(cfg) if score is not None else {}),
                  **(label_entries(cfg) if score is not None and named_labels(cfg) else {})}
        tensors = {}
        if type(hook) in OWN_EXPORT:  # adapters, IA3, AdaLoRA: each module writes its own tensors
            entries, tensors = OWN_EXPORT[type(hook)](cfg, hook, trainable)
            config = {**common, **entries}
            if score is not None:
                tensors["base_model.model.score.weight"] = np.asarray(score, np.float32).T
        elif isinstance(hook, LoraHook):
            modules = _lora_modules(trainable)
            patterns = []
            for path, ab in modules.items():
                in_stack = path.startswith("layers.")
                for i in range(ab["a"].shape[0]) if in_stack else [None]:
                    a, b = (ab["a"][i], ab["b"][i]) if i is not None else (ab["a"], ab["b"])
                    name = _peft_module(cfg, path, i)
                    # PEFT matches target_modules against full module names: one pattern per stacked path.
                    patterns.append(re.escape(name).replace(f"\\.{i}\\.", r"\.\d+\.", 1) if in_stack else re.escape(name))
                    tensors[f"base_model.model.{name}.lora_A.weight"] = a.T
                    tensors[f"base_model.model.{name}.lora_B.weight"] = b.T
            regex = "|".join(sorted(set(patterns)))
            config = {**common, "peft_type": "LORA", "r": hook.rank, "lora_alpha": hook.alpha,
                      "lora_dropout": hook.dropout, "use_rslora": hook.rslora, "target_modules": regex,
                      "bias": "none", "fan_in_fan_out": False, "init_lora_weights": True, "use_dora": hook.dora}
            for path, i, m in peft_keys.per_layer(trainable, "lora_magnitude"):  # DoRA
                tensors[f"base_model.model.{peft_keys.hf_name(cfg, path, i)}.lora_magnitude_vector"] = m
            if score is not None:
                tensors["base_model.model.score.weight"] = np.asarray(score, np.float32).T
        else:
            prefix = {k[len("prefix_encoder/"):]: v for k, v in params.items() if k.startswith("prefix_encoder/")}
            tensors["prompt_embeddings"] = _prefix_embeddings(model, hook, unflat(prefix))
            config = {**common, "peft_type": "PREFIX_TUNING", "num_virtual_tokens": hook.num_virtual_tokens,
                      "token_dim": cfg.num_kv_heads * cfg.dim_per_head, "num_layers": cfg.num_layers,
                      "num_attention_heads": cfg.num_kv_heads, "encoder_hidden_size": cfg.hidden_size,
                      "prefix_projection": False, "num_transformer_submodules": 1}
            if score is not None:
                tensors["base_model.score.weight"] = np.asarray(score, np.float32).T
        save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(target / "adapter_model.safetensors"))
        (target / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out


def load_adapter(model, params: dict, adapter_dir):
    """(base model, base params) + a HF PEFT adapter directory -> (hooked model, params)."""
    from safetensors.numpy import load_file

    root = Path(adapter_dir)
    try:
        config = json.loads((root / "adapter_config.json").read_text())
        tensors = load_file(str(root / "adapter_model.safetensors"))
    except (OSError, json.JSONDecodeError) as e:
        raise JaxftError(f"{root}: not a HF PEFT adapter directory ({e})") from None
    cfg = model.cfg
    kind = config.get("peft_type")
    new = {}
    score = tensors.get("base_model.model.score.weight", tensors.get("base_model.score.weight"))
    if score is not None:
        pooling = read_pooling(config, f"{root}/adapter_config.json", default=cfg.pooling)
        labels = read_labels(config, f"{root}/adapter_config.json")
        if labels is not None and len(labels) != score.shape[0]:
            raise JaxftError(f"{root}/adapter_config.json: {len(labels)} labels in id2label, "
                             f"the score head has {score.shape[0]}")
        cfg = cfg.replace(head="classification", num_labels=score.shape[0], pooling=pooling, labels=labels)
        new["score/kernel"] = score.T
    if kind == "LORA":
        if config.get("bias", "none") != "none":
            raise JaxftError(f"{root}/adapter_config.json: LoRA biases are not supported yet")
        magnitudes = {}  # DoRA
        for key, value in tensors.items():
            if m := re.fullmatch(r"base_model\.model\.(.+)\.lora_magnitude_vector", key):
                path, layer = peft_keys.our_name(cfg, m[1], str(root))
                magnitudes.setdefault((path, "lora_magnitude"), {})[layer] = value
        new.update(peft_keys.to_params(magnitudes, cfg, str(root)))
        per_module = {}
        for key, value in tensors.items():
            m = LORA_KEY.fullmatch(key)
            if not m:
                continue
            name = family.of(cfg).our_module(m[1])
            if name is None:
                raise JaxftError(f"{root}: {key} names a module this {cfg.model_type} model does not have")
            layer = re.match(r"layers\.(\d+)\.(.+)", name)
            path = f"layers.{layer[2]}" if layer else name
            per_module.setdefault(path, {}).setdefault(m[2], {})[int(layer[1]) if layer else None] = value.T
        prefix = "layers" if cfg.scan_layers else None
        for path, ab in per_module.items():
            for which, per_layer in ab.items():
                leaf = "lora_a" if which == "A" else "lora_b"
                if path.startswith("layers.") and prefix:
                    if sorted(per_layer) != list(range(cfg.num_layers)):
                        raise JaxftError(f"{root}: LoRA on {path} covers only some layers (not supported)")
                    new[path.replace(".", "/") + "/" + leaf] = np.stack([per_layer[i] for i in range(cfg.num_layers)])
                elif path.startswith("layers."):
                    for i, v in per_layer.items():
                        new[f"layers_{i}/" + path[7:].replace(".", "/") + "/" + leaf] = v
                else:
                    new[path.replace(".", "/") + "/" + leaf] = per_layer[None]
        targets = "|".join(re.escape(p) for p in sorted(per_module))
        hook = LoraHook(int(config["r"]), float(config["lora_alpha"]), 0.0, targets, bool(config.get("use_rslora")),
                        bool(config.get("use_dora")))
    elif kind == "PREFIX_TUNING":
        emb = tensors["prompt_embeddings"]
        hook = PrefixHook(emb.shape[0], projection=False)
        width = cfg.num_layers * 2 * cfg.num_kv_heads * cfg.dim_per_head
        if emb.shape[1] != width:
            raise JaxftError(f"{root}: prompt_embeddings width {emb.shape[1]} does not fit this model ({width})")
        new["prefix_encoder/embedding"] = emb
    elif kind in OWN_IMPORT:  # adapters, IA3, AdaLoRA
        hook, added = OWN_IMPORT[kind](cfg, config, tensors, str(root))
        new.update(added)
    else:
        raise JaxftError(f"{root}/adapter_config.json: peft_type {kind!r} is not supported "
                         f"({', '.join(['LORA', 'PREFIX_TUNING', *OWN_IMPORT])})")
    import jax.numpy as jnp

    added = unflat({k: jnp.asarray(v) for k, v in new.items()})
    return family.build(cfg, tuple(model.hooks) + (hook,)), merge(params, added)
