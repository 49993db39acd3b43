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
from jaxft.peft.lora import LoraHook
from jaxft.peft.partition import flat, merge, unflat
from jaxft.peft.ptuning_v2 import PrefixEncoder, PrefixHook

LORA_KEY = re.compile(r"base_model\.model\.(.+)\.lora_([AB])\.weight")


def _lora_modules(trainable) -> dict[str, dict[str, np.ndarray]]:
    """our dotted module path (no layer index) -> {"a": [L?, in, r], "b": [L?, r, out]}."""
    out = {}
    for path, value in flat(trainable).items():
        parts = path.split("/")
        if parts[-1] in ("lora_a", "lora_b"):
            out.setdefault(".".join(parts[:-1]), {})[parts[-1][-1]] = np.asarray(value, np.float32)
    return out


def _in_stack(cfg, path: str):
    """Our dotted module path -> (stack, block index or None when scanned, path inside the block), or
    None outside the family's stacks of blocks (`layers.x` scanned, `layers_3.x` not; T5: `encoder.block`)."""
    for stack in family.of(cfg).layer_stacks(cfg):
        if path.startswith(stack + "."):
            return stack, None, path[len(stack) + 1:]
        m = re.fullmatch(re.escape(stack) + r"_(\d+)\.(.+)", path)
        if m:
            return stack, int(m[1]), m[2]
    return None


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
    task = {"classification": "SEQ_CLS", "seq2seq_lm": "SEQ_2_SEQ_LM"}.get(cfg.head, "CAUSAL_LM")
    params = flat(trainable)
    score = params.get("score/kernel")
    hooks = [h for h in method.hooks if isinstance(h, (LoraHook, PrefixHook))]
    for hook in hooks:
        target = out / type(hook).__name__.replace("Hook", "").lower() if len(hooks) > 1 else out
        target.mkdir(parents=True, exist_ok=True)
        common = {"base_model_name_or_path": base or None, "task_type": task, "inference_mode": True,
                  "revision": None, "modules_to_save": ["score"] if score is not None else None,
                  **(pooling_entry(cfg) if score is not None else {}),
                  **(label_entries(cfg) if score is not None and named_labels(cfg) else {})}
        tensors = {}
        if isinstance(hook, LoraHook):
            modules = _lora_modules(trainable)
            patterns = []
            hf_module = family.of(cfg).hf_module
            for path, ab in modules.items():
                where = _in_stack(cfg, path)
                if where is None:
                    patterns.append(re.escape(hf_module(path)))
                    per_layer = [(path, ab["a"], ab["b"])]
                else:
                    stack, index, rest = where
                    indices = range(ab["a"].shape[0]) if index is None else [index]
                    pick = (lambda x, i: x[i]) if index is None else (lambda x, i: x)  # noqa: E731
                    per_layer = [(f"{stack}.{i}.{rest}", pick(ab["a"], i), pick(ab["b"], i)) for i in indices]
                    # PEFT matches target_modules against full module names: one pattern per stacked path.
                    i = indices[0]
                    patterns.append(re.escape(hf_module(f"{stack}.{i}.{rest}")).replace(f"\\.{i}\\.", r"\.\d+\.", 1))
                for name, a, b in per_layer:
                    name = hf_module(name)
                    tensors[f"base_model.model.{name}.lora_A.weight"] = a.T
                    tensors[f"base_model.model.{name}.lora_B.weight"] = b.T
            regex = "|".join(sorted(set(patterns)))
            config = {**common, "peft_type": "LORA", "r": hook.rank, "lora_alpha": hook.alpha,
                      "lora_dropout": hook.dropout, "use_rslora": hook.rslora, "target_modules": regex,
                      "bias": "none", "fan_in_fan_out": False, "init_lora_weights": True, "use_dora": False}
            if score is not None:
                tensors["base_model.model.score.weight"] = np.asarray(score, np.float32).T
        else:
            prefix = {k[len("prefix_encoder/"):]: v for k, v in params.items() if k.startswith("prefix_encoder/")}
            emb = _prefix_embeddings(model, hook, unflat(prefix))
            layers, kv_heads, head_dim = family.of(cfg).kv_layout(cfg)
            # Encoder-decoders: PEFT's seq2seq default (two submodules); T5 reads the prefix in the
            # decoder's self-attention only (see jaxft/models/t5.py).
            submodules = 2 if family.of(cfg).encoder_decoder else 1
            tensors["prompt_embeddings"] = emb
            config = {**common, "peft_type": "PREFIX_TUNING", "num_virtual_tokens": hook.num_virtual_tokens,
                      "token_dim": kv_heads * head_dim, "num_layers": layers,
                      "num_attention_heads": kv_heads, "encoder_hidden_size": cfg.hidden_size,
                      "prefix_projection": False, "num_transformer_submodules": submodules}
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
            where = None
            for stack in family.of(cfg).layer_stacks(cfg):
                m2 = re.fullmatch(re.escape(stack) + r"\.(\d+)\.(.+)", name)
                if m2:
                    where = (stack, int(m2[1]), m2[2])
            path = name if where is None else f"{where[0]}.{where[2]}"
            per_module.setdefault(path, {}).setdefault(m[2], {})[None if where is None else where[1]] = value.T
        stacks = family.of(cfg).layer_stacks(cfg)
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
                if sorted(per_layer) != list(range(n)):
                    raise JaxftError(f"{root}: LoRA on {path} covers only some layers (not supported)")
                if cfg.scan_layers:
                    new[path.replace(".", "/") + "/" + leaf] = np.stack([per_layer[i] for i in range(n)])
                else:
                    for i, v in per_layer.items():
                        new[f"{stack.replace('.', '/')}_{i}/" + rest.replace(".", "/") + "/" + leaf] = v
        targets = "|".join(sorted(patterns))
        hook = LoraHook(int(config["r"]), float(config["lora_alpha"]), 0.0, targets, bool(config.get("use_rslora")))
    elif kind == "PREFIX_TUNING":
        emb = tensors["prompt_embeddings"]
        emb = emb[: int(config.get("num_virtual_tokens") or emb.shape[0])]  # the rows PEFT reads
        hook = PrefixHook(emb.shape[0], projection=False)
        layers, kv_heads, head_dim = family.of(cfg).kv_layout(cfg)
        width = layers * 2 * kv_heads * head_dim
        if emb.shape[1] != width:
            raise JaxftError(f"{root}: prompt_embeddings width {emb.shape[1]} does not fit this model ({width})")
        new["prefix_encoder/embedding"] = emb
    else:
        raise JaxftError(f"{root}/adapter_config.json: peft_type {kind!r} is not supported (LORA, PREFIX_TUNING)")
    import jax.numpy as jnp

    added = unflat({k: jnp.asarray(v) for k, v in new.items()})
    return family.build(cfg, tuple(model.hooks) + (hook,)), merge(params, added)
