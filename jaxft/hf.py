"""Hugging Face checkpoint I/O: config.json + safetensors (single file or sharded) <-> our params.

Weights are read with safetensors only (no pickle). Our parameter names mirror HF's module names,
so the mapping is mechanical: drop the `model.` prefix, stack per-layer tensors along a leading
`layers` axis when the model scans its layers, and store linear kernels as [in, out].
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
from flax import traverse_util

from jaxft.errors import JaxftError
from jaxft.models.layers import ROPE_TYPES
from jaxft.models.llama import POOLING, LlamaConfig, LlamaModel

ASSETS = Path(__file__).parent / "assets"
BUNDLED_MODELS = {"jaxft-tiny": ASSETS / "jaxft-tiny"}
SUPPORTED = ("llama", "qwen2", "mistral")
POOLING_KEY = "classifier_pooling"  # the config.json key (ModernBERT's name for the same choice)
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def offline_reason(timeout: float = 2.0) -> str | None:
    """Why the Hugging Face hub cannot be reached (HF_HUB_OFFLINE, no network), or None.

    One quick connection, so that an offline run fails at once with one line instead of after half
    a minute of retries that log a warning each."""
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        if os.environ.get(var, "").strip().lower() in ("1", "true", "yes", "on"):
            return f"{var}={os.environ[var]}"
    from urllib.parse import urlparse

    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    host, port = url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443)
    import socket

    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as e:
        return f"{host}:{port} unreachable: {e.strerror or e}"
    return None


def first_line(e: Exception) -> str:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return lines[0] if lines else type(e).__name__


def is_hub_name(name: str) -> bool:
    return re.fullmatch(r"[\w.-]+/[\w.-]+", name) is not None and not Path(name).expanduser().exists()


def resolve(path: str) -> Path:
    """A bundled name, a local directory, or a hub name: from the HF cache, downloaded when online."""
    if path in BUNDLED_MODELS:
        return BUNDLED_MODELS[path]
    p = Path(path).expanduser()
    if p.is_dir():
        return p
    if is_hub_name(path):
        offline = offline_reason()
        try:
            from huggingface_hub import snapshot_download

            patterns = ["*.json", "*.safetensors", "tokenizer.model"]
            return Path(snapshot_download(path, allow_patterns=patterns, local_files_only=offline is not None))
        except Exception as e:  # unknown repo, gated, not cached while offline, ...
            if offline:
                raise JaxftError(f"model.path {path!r}: no such directory, not in the Hugging Face cache, and the hub "
                                 f"cannot be reached ({offline})") from None
            reason = first_line(e)
            raise JaxftError(f"model.path {path!r}: no such directory and the hub download failed ({reason})") from None
    raise JaxftError(f"model.path {path!r}: no such directory (expected a HF model directory or 'jaxft-tiny')")


def base_reference(path: str) -> str:
    """What an adapter names as its base (`base_model_name_or_path`): something PEFT and transformers
    load with `from_pretrained`: a hub name as given, else the absolute directory (the installed one
    for the bundled jaxft-tiny)."""
    if not path:
        return ""
    if path not in BUNDLED_MODELS and is_hub_name(path):
        return path
    return str(resolve(path).resolve())


def read_config(path: Path, **overrides) -> LlamaConfig:
    """config.json of a HF directory (or the file itself) -> LlamaConfig."""
    file = path if path.suffix == ".json" else path / "config.json"
    try:
        c = json.loads(file.read_text())
    except FileNotFoundError:
        raise JaxftError(f"{file}: missing (expected a Hugging Face config.json)") from None
    except json.JSONDecodeError as e:
        raise JaxftError(f"{file}: invalid JSON at line {e.lineno}: {e.msg}") from None
    return config_from_dict(c, str(file), **overrides)


def read_pooling(c: dict, file: str, default: str = "last") -> str:
    """The classifier pooling a config.json or adapter_config.json records."""
    pooling = c.get(POOLING_KEY, default)
    if pooling not in POOLING:
        raise JaxftError(f"{file}: {POOLING_KEY}={pooling!r}: expected one of {', '.join(map(repr, POOLING))}")
    return pooling


def pooling_entry(cfg: LlamaConfig) -> dict:
    """What config.json / adapter_config.json record of the pooling: nothing for HF's own (last token).
    transformers and PEFT ignore the key and pool the last token (PEFT warns): see README."""
    return {POOLING_KEY: cfg.pooling} if cfg.pooling != "last" else {}


def label_entries(cfg: LlamaConfig) -> dict:
    """id2label / label2id as transformers reads them: the class names the run trained on."""
    names = list(cfg.labels or [f"LABEL_{i}" for i in range(cfg.num_labels)])
    return {"id2label": {str(i): n for i, n in enumerate(names)}, "label2id": {n: i for i, n in enumerate(names)}}


def read_labels(c: dict, file: str) -> tuple[str, ...] | None:
    """The class names of a config's id2label; None for transformers' defaults (LABEL_0, ...)."""
    id2label = c.get("id2label")
    if not id2label:
        return None
    try:
        names = tuple(str(id2label[str(i)]) for i in range(len(id2label)))
    except KeyError:
        raise JaxftError(f"{file}: id2label keys are not 0..{len(id2label) - 1}") from None
    return None if names == tuple(f"LABEL_{i}" for i in range(len(names))) else names


def config_from_dict(c: dict, file: str = "config", **overrides) -> LlamaConfig:
    """A HF config dict (as in config.json) -> LlamaConfig; unknown architectures are an error."""
    mtype = c.get("model_type")
    if mtype not in SUPPORTED:
        raise JaxftError(f"{file}: model_type {mtype!r} is not supported (expected one of {', '.join(SUPPORTED)})")
    rope = dict(c.get("rope_parameters") or c.get("rope_scaling") or {})
    theta = rope.pop("rope_theta", c.get("rope_theta", 10000.0))
    rope = _rope_scaling(rope, c, file)
    window = c.get("sliding_window")
    if mtype == "qwen2":
        window = window if c.get("use_sliding_window") else None
        if window is not None:  # as transformers: layer_types, else sliding from max_window_layers on
            n, first = c["num_hidden_layers"], c.get("max_window_layers", 28)
            default = ["sliding_attention" if i >= first else "full_attention" for i in range(n)]
            types = set(c.get("layer_types") or default)
            if types == {"full_attention"}:
                window = None
            elif types != {"sliding_attention"}:
                raise JaxftError(f"{file}: Qwen2 with mixed sliding/full attention layers is not supported")
    archs = c.get("architectures") or []
    classify = any(a.endswith("ForSequenceClassification") for a in archs)
    pooling = read_pooling(c, file)
    missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                           "num_attention_heads") if k not in c]
    if missing:
        raise JaxftError(f"{file}: missing {', '.join(missing)}")
    cfg = LlamaConfig(
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
        qkv_bias=mtype == "qwen2" or bool(c.get("attention_bias", False)),
        o_bias=mtype != "qwen2" and bool(c.get("attention_bias", False)),
        mlp_bias=bool(c.get("mlp_bias", False)),
        sliding_window=window,
        model_type=mtype,
        bos_token_id=c.get("bos_token_id"),
        eos_token_id=c.get("eos_token_id") if not isinstance(c.get("eos_token_id"), list) else c["eos_token_id"][0],
        pad_token_id=c.get("pad_token_id"),
        head="classification" if classify else "causal_lm",
        num_labels=len(c.get("id2label") or {0: 0, 1: 1}),
        labels=read_labels(c, file),
        pooling=pooling,
    )
    return cfg.replace(**overrides)


ROPE_KEYS = {"linear": ("factor",), "dynamic": ("factor",), "yarn": ("factor",),
             "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")}


def _rope_scaling(rope: dict, c: dict, file: str) -> dict:
    """config.json's rope parameters -> what `rope_inv_freq` reads; unsupported types are an error here,
    not a traceback mid-trace."""
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind == "default":
        return {}
    if kind not in ROPE_TYPES:
        raise JaxftError(f"{file}: rope_type {kind!r} is not supported (expected one of {', '.join(ROPE_TYPES)})")
    if float(rope.get("partial_rotary_factor", 1.0)) != 1.0:
        raise JaxftError(f"{file}: partial_rotary_factor={rope['partial_rotary_factor']} is not supported "
                         "(expected 1.0)")
    rope = {**rope, "rope_type": kind}
    rope.pop("type", None)
    if kind == "yarn":  # transformers' defaults, made explicit
        rope.setdefault("original_max_position_embeddings", c.get("original_max_position_embeddings")
                        or c.get("max_position_embeddings", 2048))
        if rope.get("factor") is None:
            rope["factor"] = c.get("max_position_embeddings", 2048) / rope["original_max_position_embeddings"]
    missing = [k for k in ROPE_KEYS[kind] if rope.get(k) is None]
    if missing:
        raise JaxftError(f"{file}: rope_type {kind!r} needs {', '.join(missing)} in rope_parameters")
    return rope


def read_tensors(path: Path) -> dict[str, np.ndarray]:
    """All tensors of a HF directory's safetensors file(s), as fp32 numpy arrays."""
    from safetensors import safe_open

    index = path / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (path / "model.safetensors").exists():
        files = ["model.safetensors"]
    else:
        raise JaxftError(f"{path}: no model.safetensors or model.safetensors.index.json (only safetensors are read)")
    out = {}
    for name in files:
        try:
            with safe_open(str(path / name), framework="flax") as f:
                for key in f.keys():
                    out[key] = np.asarray(f.get_tensor(key), dtype=np.float32)
        except Exception as e:  # truncated, corrupt or not safetensors at all
            raise JaxftError(f"{path / name}: unreadable safetensors file ({e})") from None
    return out


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
    flat, layers = {}, {}
    for key, value in tensors.items():
        hit = _from_hf_key(key)
        if hit is None:
            continue
        path, layer, transpose = hit
        value = value.T if transpose else value
        if layer is None:
            flat[path] = value
        else:
            layers.setdefault(path, {})[layer] = value
    for path, per_layer in layers.items():
        missing = set(range(cfg.num_layers)) - set(per_layer)
        if missing:
            raise JaxftError(f"{where}: layer {min(missing)} has no {'.'.join(path)}")
        if cfg.scan_layers:
            flat[("layers",) + path] = np.stack([per_layer[i] for i in range(cfg.num_layers)])
        else:
            for i in range(cfg.num_layers):
                flat[(f"layers_{i}",) + path] = per_layer[i]
    if cfg.tie_word_embeddings:
        flat.pop(("lm_head", "kernel"), None)
    return traverse_util.unflatten_dict(flat)


def params_to_hf(params: dict, cfg: LlamaConfig) -> dict[str, np.ndarray]:
    out = {}
    for path, value in traverse_util.flatten_dict(params).items():
        value = np.asarray(value, dtype=np.float32)
        if path[0] == "embed_tokens":
            out["model.embed_tokens.weight"] = value
        elif path[0] == "norm":
            out["model.norm.weight"] = value
        elif path[0] in ("lm_head", "score"):
            out[f"{path[0]}.weight"] = value.T
        elif path[0] == "layers" or path[0].startswith("layers_"):
            per_layer = enumerate(value) if path[0] == "layers" else [(int(path[0][7:]), value)]
            *mods, leaf = path[1:]
            for i, v in per_layer:
                name = "bias" if leaf == "bias" else "weight"
                out[f"model.layers.{i}.{'.'.join(mods)}.{name}"] = v.T if leaf == "kernel" else v
        else:
            raise ValueError(f"no Hugging Face name for parameter {'/'.join(path)}")
    return {k: np.ascontiguousarray(v) for k, v in out.items()}


def hf_config_dict(cfg: LlamaConfig) -> dict:
    arch = {"llama": "Llama", "qwen2": "Qwen2", "mistral": "Mistral"}[cfg.model_type]
    classify = cfg.head == "classification"
    rope = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    rope.update(dict(cfg.rope_scaling or {}))
    c = {
        "architectures": [f"{arch}{'ForSequenceClassification' if classify else 'ForCausalLM'}"],
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
        "torch_dtype": "float32",
    }
    if cfg.rope_scaling:
        c["rope_scaling"] = rope
    if cfg.model_type == "qwen2":
        sliding = cfg.sliding_window is not None
        c.update(
            use_sliding_window=sliding,
            sliding_window=cfg.sliding_window,
            max_window_layers=0 if sliding else cfg.num_layers,  # every layer slides, or none
            layer_types=[("sliding_attention" if sliding else "full_attention")] * cfg.num_layers,
        )
    else:
        c.update(attention_bias=cfg.qkv_bias, mlp_bias=cfg.mlp_bias)
        if cfg.model_type == "mistral":
            c["sliding_window"] = cfg.sliding_window
    if classify:
        c.update(label_entries(cfg))
        c.update(pooling_entry(cfg))
    return c


def load(path: str, adapter: str | None = None, **overrides):
    """Read a HF model directory -> (LlamaModel, params). `adapter`: a HF PEFT adapter directory.

    `overrides` replace LlamaConfig fields (e.g. dtype="bfloat16", scan_layers=False).
    """
    root = resolve(str(path))
    cfg = read_config(root, **overrides)
    params = params_from_hf(read_tensors(root), cfg, where=str(root))
    model = LlamaModel(cfg)
    if adapter is not None:
        from jaxft.peft.hf_peft import load_adapter

        model, params = load_adapter(model, params, adapter)
    return model, params


def save(model: LlamaModel, params: dict, out_dir: str, tokenizer_dir: str | os.PathLike | None = None) -> Path:
    """Write a directory that `transformers` loads (config.json + model.safetensors)."""
    from safetensors.numpy import save_file

    from jaxft.peft.partition import base_params
    from jaxft.quant import dequantize_params

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = model.cfg
    tensors = params_to_hf(base_params(dequantize_params(params)), cfg)
    tmp = out / "model.safetensors.tmp"
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    os.chmod(tmp, 0o644)
    os.replace(tmp, out / "model.safetensors")
    (out / "config.json").write_text(json.dumps(hf_config_dict(cfg), indent=2) + "\n")
    if tokenizer_dir is not None:
        for name in TOKENIZER_FILES:
            src = Path(tokenizer_dir) / name
            if src.exists() and src.resolve() != (out / name).resolve():
                shutil.copy(src, out / name)
    return out
