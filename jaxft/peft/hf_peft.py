"""HF PEFT adapter format (adapter_config.json + adapter_model.safetensors), both ways.

LoRA maps to PEFT's `LORA` (lora_A [r, in], lora_B [out, r] per layer); P-Tuning v2 maps to PEFT's
`PREFIX_TUNING` (`prompt_embeddings` [tokens, layers * 2 * kv_width], written after any
reparameterisation, so the adapter serves without it). A classifier head goes in as PEFT's
`modules_to_save` copy of its modules (Llama's `score`; BERT's `pooler` and `classifier`), named as the
family names them in HF.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from jaxft.errors import JaxftError
from jaxft.models import family
from jaxft.hf import label_entries, pooling_entry, read_labels, read_pooling
from jaxft.peft.lora import LoraHook
from jaxft.peft.partition import flat, merge, unflat
from jaxft.peft.ptuning_v2 import PrefixEncoder, PrefixHook

TASK_TYPES = {"classification": "SEQ_CLS", "token_classification": "TOKEN_CLS", "causal_lm": "CAUSAL_LM"}
TASK_HEADS = ("classification", "token_classification")
HEAD_OF_TASK = {"SEQ_CLS": "classification", "TOKEN_CLS": "token_classification"}
LORA_KEY = re.compile(r"base_model\.model\.(.+)\.lora_([AB])\.weight")


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
    fam = family.of(cfg)
    out = Path(out_dir)
    task = TASK_TYPES.get(cfg.head)  # None (PEFT's plain PeftModel) for a masked LM
    params = flat(trainable)
    head = {k: v for k, v in params.items() if re.search(fam.classifier_params, k)} if cfg.head in TASK_HEADS else {}
    head_tensors = fam.params_to_hf(unflat(head), cfg) if head else {}
    head_modules = sorted({fam.hf_module(k.split("/")[0]).split(".")[-1] for k in head}) or None
    hooks = [h for h in method.hooks if isinstance(h, (LoraHook, PrefixHook))]
    for hook in hooks:
        target = out / type(hook).__name__.replace("Hook", "").lower() if len(hooks) > 1 else out
        target.mkdir(parents=True, exist_ok=True)
        common = {"base_model_name_or_path": base or None, "task_type": task, "inference_mode": True,
                  "revision": None, "modules_to_save": head_modules,
                  **(pooling_entry(cfg) if head and cfg.head == "classification" else {}),
                  **(label_entries(cfg) if head and named_labels(cfg) else {})}
        tensors = {}
        if isinstance(hook, LoraHook):
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
                      "bias": "none", "fan_in_fan_out": False, "init_lora_weights": True, "use_dora": False}
            tensors.update({f"base_model.model.{k}": v for k, v in head_tensors.items()})
        else:
            prefix = {k[len("prefix_encoder/"):]: v for k, v in params.items() if k.startswith("prefix_encoder/")}
            tensors["prompt_embeddings"] = _prefix_embeddings(model, hook, unflat(prefix))
            config = {**common, "peft_type": "PREFIX_TUNING", "num_virtual_tokens": hook.num_virtual_tokens,
                      "token_dim": cfg.num_kv_heads * cfg.dim_per_head, "num_layers": cfg.num_layers,
                      "num_attention_heads": cfg.num_kv_heads, "encoder_hidden_size": cfg.hidden_size,
                      "prefix_projection": False, "num_transformer_submodules": 1}
            tensors.update({f"base_model.{k}": v for k, v in head_tensors.items()})
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
    fam = family.of(cfg)
    kind = config.get("peft_type")
    new = {}
    # The classifier's own weights (PEFT's modules_to_save copies), under their HF names.
    head_tensors = {re.sub(r"^base_model\.(model\.)?", "", k): v for k, v in tensors.items()
                    if not LORA_KEY.fullmatch(k) and k != "prompt_embeddings"}
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
    if kind == "LORA":
        if config.get("use_dora") or config.get("bias", "none") != "none":
            raise JaxftError(f"{root}/adapter_config.json: DoRA and LoRA biases are not supported yet")
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
        hook = LoraHook(int(config["r"]), float(config["lora_alpha"]), 0.0, targets, bool(config.get("use_rslora")))
    elif kind == "PREFIX_TUNING":
        emb = tensors["prompt_embeddings"]
        hook = PrefixHook(emb.shape[0], projection=False)
        width = int(np.prod(fam.kv_layout(cfg))) * 2
        if emb.shape[1] != width:
            raise JaxftError(f"{root}: prompt_embeddings width {emb.shape[1]} does not fit this model ({width})")
        new["prefix_encoder/embedding"] = emb
    else:
        raise JaxftError(f"{root}/adapter_config.json: peft_type {kind!r} is not supported (LORA, PREFIX_TUNING)")
    import jax.numpy as jnp

    added = unflat({k: jnp.asarray(v) for k, v in new.items()})
    return family.build(cfg, tuple(model.hooks) + (hook,)), merge(params, added)
