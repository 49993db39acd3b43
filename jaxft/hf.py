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

from jaxft.config import SAVE_DTYPES
from jaxft.errors import JaxftError, read_json
from jaxft.models import family
from jaxft.models.family import POOLING

ASSETS = Path(__file__).parent / "assets"
# Made by jaxft from bundled text (each directory's README.md says how): a Llama decoder, a BERT
# masked-LM encoder and a T5 encoder-decoder, so that configs of every kind run offline.
BUNDLED_MODELS = {name: ASSETS / name for name in ("jaxft-tiny", "jaxft-tiny-bert", "jaxft-tiny-t5")}
SUPPORTED = tuple(family.REGISTRY)
POOLING_KEY = "classifier_pooling"  # the config.json key (ModernBERT's name for the same choice)
TOKENIZER_FILES = ("tokenizer.model", "spiece.model", "tokenizer.json", "tokenizer_config.json",
                   "special_tokens_map.json", "vocab.txt", "vocab.json", "merges.txt")
# spiece.model: T5's SentencePiece file; the last three: WordPiece (BERT), BPE (RoBERTa)


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

            patterns = ["*.json", "*.safetensors", "tokenizer.model", "spiece.model", "vocab.txt"]
            return Path(snapshot_download(path, allow_patterns=patterns, local_files_only=offline is not None))
        except Exception as e:  # unknown repo, gated, not cached while offline, ...
            if offline:
                raise JaxftError(f"model.path {path!r}: no such directory, not in the Hugging Face cache, and the hub "
                                 f"cannot be reached ({offline})") from None
            reason = first_line(e)
            raise JaxftError(f"model.path {path!r}: no such directory and the hub download failed ({reason})") from None
    raise JaxftError(f"model.path {path!r}: no such directory (expected a HF model directory or one of "
                     f"{', '.join(BUNDLED_MODELS)})")


def base_reference(path: str) -> str:
    """What an adapter names as its base (`base_model_name_or_path`): something PEFT and transformers
    load with `from_pretrained`: a hub name as given, else the absolute directory (the installed one
    for the bundled jaxft-tiny)."""
    if not path:
        return ""
    if path not in BUNDLED_MODELS and is_hub_name(path):
        return path
    return str(resolve(path).resolve())


def read_config(path: Path, **overrides):
    """config.json of a HF directory (or the file itself) -> its family's config."""
    file = path if path.suffix == ".json" else path / "config.json"
    try:
        c = read_json(file)
    except FileNotFoundError:
        raise JaxftError(f"{file}: missing (expected a Hugging Face config.json)") from None
    cfg = config_from_dict(c, str(file), **overrides)
    fam = family.of(cfg)
    names = tensor_names(file.parent)
    if fam.config_from_weights is not None and names is not None:
        cfg = fam.config_from_weights(cfg, names)
    return cfg


def tensor_names(path: Path) -> set[str] | None:
    """The tensor names of a HF directory's safetensors file(s) (headers only); None without any."""
    index = path / "model.safetensors.index.json"
    if index.exists():
        return set(weight_map(index))
    if not (path / "model.safetensors").exists():
        return None
    from safetensors import safe_open

    try:
        with safe_open(str(path / "model.safetensors"), framework="numpy") as f:
            return set(f.keys())
    except Exception as e:  # truncated, corrupt or not safetensors at all
        raise JaxftError(f"{path / 'model.safetensors'}: unreadable safetensors file ({e})") from None


def read_pooling(c: dict, file: str, default: str = "last") -> str:
    """The classifier pooling a config.json or adapter_config.json records."""
    pooling = c.get(POOLING_KEY, default)
    if pooling not in POOLING:
        raise JaxftError(f"{file}: {POOLING_KEY}={pooling!r}: expected one of {', '.join(map(repr, POOLING))}")
    return pooling


def pooling_entry(cfg) -> dict:
    """What config.json / adapter_config.json record of the pooling: nothing for HF's own (the family's).
    transformers and PEFT ignore the key and pool as they always do (PEFT warns): see README."""
    return {POOLING_KEY: cfg.pooling} if cfg.pooling != family.of(cfg).pooling else {}


def label_entries(cfg) -> dict:
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


# The sizes of config.json (every family's names) that must be whole numbers: a string or a float there
# was a traceback from inside the model's init. head_dim may be 0 (Llama: hidden_size / heads).
SIZE_KEYS = {k: 1 for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                            "num_attention_heads", "num_key_value_heads", "max_position_embeddings", "n_embd",
                            "n_layer", "n_head", "n_inner", "n_positions", "d_model", "d_kv", "d_ff", "num_layers",
                            "num_decoder_layers", "num_heads", "type_vocab_size", "relative_attention_num_buckets",
                            "relative_attention_max_distance")}
SIZE_KEYS["head_dim"] = 0


def config_from_dict(c: dict, file: str = "config", **overrides):
    """A HF config dict (as in config.json) -> its family's config; unknown architectures are an error."""
    if not isinstance(c, dict):
        raise JaxftError(f"{file}: expected a JSON object of config keys, got a {type(c).__name__}")
    for key, least in SIZE_KEYS.items():
        value = c.get(key)
        if value is not None and (type(value) is not int or value < least):
            raise JaxftError(f"{file}: {key}={value!r}: expected an integer >= {least}")
    fam = family.get(c.get("model_type"), file)
    cfg = fam.config_from_hf(c, file)
    head = family.head_of(c.get("architectures"), fam)
    cfg = cfg.replace(head=head, pooling=read_pooling(c, file, fam.pooling), labels=read_labels(c, file),
                      num_labels=len(c.get("id2label") or {0: 0, 1: 1}))
    return cfg.replace(**overrides)


def read_tensors(path: Path) -> dict[str, np.ndarray]:
    """All tensors of a HF directory's safetensors file(s), as fp32 numpy arrays."""
    from safetensors import safe_open

    index = path / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(weight_map(index).values()))
    elif (path / "model.safetensors").exists():
        files = ["model.safetensors"]
    else:
        raise JaxftError(f"{path}: no model.safetensors or model.safetensors.index.json (only safetensors are read)")
    out = {}
    for name in files:
        try:
            with safe_open(str(path / name), framework="flax") as f:
                keys = list(f.keys())
                for key in keys:
                    out[key] = np.asarray(f.get_tensor(key), dtype=np.float32)
        except Exception as e:  # truncated, corrupt or not safetensors at all
            raise JaxftError(f"{path / name}: unreadable safetensors file ({e})") from None
        # A NaN or Inf weight would only show as a non-finite loss at step 1, blamed on the learning rate.
        bad = next((k for k in keys if not np.isfinite(out[k]).all()), None)
        if bad is not None:
            raise JaxftError(f"{path / name}: tensor {bad} holds NaN or Inf values (expected finite weights)")
    return out


def weight_map(index: Path) -> dict:
    """model.safetensors.index.json's {tensor name: shard file}."""
    try:
        return dict(json.loads(index.read_text())["weight_map"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise JaxftError(f"{index}: expected JSON with a \"weight_map\" of tensor name -> shard file ({e!r})") from None


def params_from_hf(tensors: dict[str, np.ndarray], cfg, where: str = "checkpoint") -> dict:
    """HF weight names -> our parameter tree, through the config's family."""
    return family.of(cfg).params_from_hf(tensors, cfg, where)


def params_to_hf(params: dict, cfg) -> dict[str, np.ndarray]:
    return family.of(cfg).params_to_hf(params, cfg)


def hf_config_dict(cfg, dtype: str = "float32") -> dict:
    """The config.json of a model: the family's architecture keys, the class, labels and pooling."""
    c = {"architectures": [family.of(cfg).architecture(cfg)], **family.of(cfg).config_to_hf(cfg),
         "torch_dtype": dtype}
    if cfg.head in ("classification", "token_classification"):
        c.update(label_entries(cfg))
    if cfg.head == "classification":
        c.update(pooling_entry(cfg))
    return c


def load(path: str, adapter: str | dict | None = None, active: str | None = None, **overrides):
    """Read a HF model directory -> (model, params). `adapter`: a HF PEFT adapter directory, or
    {name: directory} of several on the one base, of which `active` (default: the first) is applied;
    `load_adapters` keeps them all for switching.

    `overrides` replace config fields (e.g. dtype="bfloat16", scan_layers=False).
    """
    if isinstance(adapter, dict):
        adapters = load_adapters(path, adapter, **overrides)
        return adapters.use(active or adapters.names[0])
    root = resolve(str(path))
    cfg = read_config(root, **overrides)
    model = family.build(cfg)
    params = complete(model, params_from_hf(read_tensors(root), cfg, where=str(root)), root)
    if adapter is not None:
        from jaxft.peft.hf_peft import load_adapter

        model, params = load_adapter(model, params, adapter)
    return model, params


def load_adapters(path: str, adapters: dict, **overrides):
    """One base and several named HF PEFT adapters -> `jaxft.peft.multi.Adapters` (`use(name)` ->
    (model, params) with that one active; the base's weights are held once)."""
    from jaxft.peft.multi import Adapters

    if not adapters:
        raise JaxftError("adapter={}: expected {name: adapter directory, ...}")
    out = Adapters(*load(path, **overrides))
    for name, directory in adapters.items():
        out.load(name, directory)
    return out


def save_adapter(model, params: dict, out_dir: str, base: str = "") -> Path:
    """Write the adapter of a hooked model (e.g. one `load(base, adapter=...)` built, or a trained one)
    as HF PEFT adapter(s) that `peft.PeftModel.from_pretrained` loads: the leaves its methods add,
    and a classifier head. `base`: what the adapter names as its base model (`base_reference`)."""
    from jaxft.peft.hf_peft import save_adapter as write
    from jaxft.peft.methods import of_hooks
    from jaxft.peft.partition import added_params, flat, merge, unflat

    head = family.of(model.cfg).classifier_params if model.cfg.head in ("classification", "token_classification") \
        else None
    score = unflat({k: v for k, v in flat(params).items() if head and re.search(head, k)})
    return write(model, of_hooks(model.hooks), merge(added_params(params), score), out_dir, base=base)
def complete(model, params: dict, root) -> dict:
    """The checkpoint's weights that the model has; one it lacks is an error naming the HF weight
    (e.g. a bare encoder directory read with a head it does not hold)."""
    import jax
    import jax.numpy as jnp
    from flax import linen as nn

    from jaxft.peft.partition import flat, unflat

    shapes = flat(nn.unbox(jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 2), jnp.int32)))
                           ["params"]))
    got = flat(params)
    for path, shape in shapes.items():
        if path not in got:
            name = next(iter(params_to_hf(unflat({path: np.zeros((1,) * len(shape.shape))}), model.cfg)), path)
            raise JaxftError(f"{root}: the checkpoint has no {name} (expected every weight of "
                             f"{family.of(model.cfg).architecture(model.cfg)}; model.head={model.cfg.head!r})")
        if got[path].shape != shape.shape:  # else a traceback from inside the first forward
            raise JaxftError(f"{root}: {path} has shape {got[path].shape}, the model expects {shape.shape}")
    return unflat({p: v for p, v in got.items() if p in shapes})


def save(model, params: dict, out_dir: str, tokenizer_dir: str | os.PathLike | None = None,
         dtype: str = "float32") -> Path:
    """Write a directory that `transformers` loads (config.json + model.safetensors), its weights in `dtype`
    (float32, or bfloat16 / float16: half the bytes, as checkpoints on the hub are mostly stored)."""
    import ml_dtypes
    from safetensors.numpy import save_file

    from jaxft.peft.partition import base_params
    from jaxft.quant import dequantize_params

    if dtype not in SAVE_DTYPES:
        raise JaxftError(f"dtype={dtype!r}: expected one of {', '.join(SAVE_DTYPES)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = model.cfg
    tensors = params_to_hf(base_params(dequantize_params(params)), cfg)
    if dtype != "float32":
        to = ml_dtypes.bfloat16 if dtype == "bfloat16" else np.float16
        tensors = {k: v.astype(to) for k, v in tensors.items()}
    tmp = out / "model.safetensors.tmp"
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    os.chmod(tmp, 0o644)
    os.replace(tmp, out / "model.safetensors")
    (out / "config.json").write_text(json.dumps(hf_config_dict(cfg, dtype), indent=2) + "\n")
    if tokenizer_dir is not None:
        for name in TOKENIZER_FILES:
            src = Path(tokenizer_dir) / name
            if src.exists() and src.resolve() != (out / name).resolve():
                shutil.copy(src, out / name)
    return out
