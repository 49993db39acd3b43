"""Bottleneck adapters: Houlsby et al. (2019) after the attention and the feed-forward sublayer,
Pfeiffer et al. (2021) after the feed-forward only.

Each adapter maps a sublayer's output h to h + up(act(down(h))) before the block's residual add,
with a bottleneck of `size` features. `up` starts at zero, so training starts from the base model.
HF PEFT has no such adapters: they save in jaxft's own adapter format (`export` / `load`, described in
docs/adapter_format.md): `adapter_config.json` with `"peft_type": "JAXFT_BOTTLENECK"` and
`adapter_model.safetensors` with HF-style names and torch layouts.
"""

from __future__ import annotations

import dataclasses
import re

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxft.models.layers import param_with_axes
from jaxft.peft import peft_keys
from jaxft.peft.hook import Hook

PEFT_TYPE = "JAXFT_BOTTLENECK"
KINDS = {"houlsby": ("attention", "mlp"), "pfeiffer": ("mlp",)}
ACTIVATIONS = {"relu": jax.nn.relu, "gelu": lambda z: jax.nn.gelu(z, approximate=False), "silu": jax.nn.silu,
               "tanh": jnp.tanh}
TRAINABLE = r"(^|/)adapter_(attention|mlp)/"
KEY = re.compile(r"(.+)\.adapter_(attention|mlp)\.(down|up)\.(weight|bias)")


class Bottleneck(nn.Module):
    size: int
    activation: str
    init_std: float

    @nn.compact
    def __call__(self, h):
        d = h.shape[-1]
        init = nn.initializers.normal(self.init_std)
        down = param_with_axes(self, "down_kernel", init, (d, self.size), ("embed", None))
        down_b = param_with_axes(self, "down_bias", nn.initializers.zeros, (self.size,), (None,))
        up = param_with_axes(self, "up_kernel", nn.initializers.zeros, (self.size, d), (None, "embed"))
        up_b = param_with_axes(self, "up_bias", nn.initializers.zeros, (d,), ("embed",))
        z = ACTIVATIONS[self.activation](h @ down.astype(h.dtype) + down_b.astype(h.dtype))
        return h + z @ up.astype(h.dtype) + up_b.astype(h.dtype)


@dataclasses.dataclass(frozen=True)
class AdapterHook(Hook):
    size: int = 64
    style: str = "houlsby"  # houlsby | pfeiffer (`method.adapter_type`)
    kind = "adapter"  # the registered method (a class attribute, not a field)
    activation: str = "relu"
    init_std: float = 0.01

    def block_output(self, module, h, where):
        if where not in KINDS[self.style]:
            return h
        return Bottleneck(self.size, self.activation, self.init_std, name=f"adapter_{where}")(h)


def export(cfg, hook: AdapterHook, trainable) -> tuple[dict, dict]:
    """-> (adapter_config entries, tensors): `<HF block name>.adapter_<where>.<down|up>.<weight|bias>`,
    weights [out, in] as torch's Linear stores them."""
    tensors = {}
    for leaf in ("down_kernel", "down_bias", "up_kernel", "up_bias"):
        for path, layer, v in peft_keys.per_layer(trainable, leaf, cfg):
            block, where = path.rsplit(".", 1)
            proj, kind = leaf.split("_")
            name = f"{peft_keys.hf_name(cfg, block, layer)}.{where}.{proj}.{'weight' if kind == 'kernel' else 'bias'}"
            tensors[name] = v.T if kind == "kernel" else v
    config = {"peft_type": PEFT_TYPE, "adapter_type": hook.style, "adapter_size": hook.size,
              "activation": hook.activation, "format": "docs/adapter_format.md"}
    return config, tensors


def load(cfg, config: dict, tensors: dict, where: str) -> tuple[AdapterHook, dict]:
    """jaxft's bottleneck adapter files -> (hook, flat params)."""
    from jaxft.errors import JaxftError

    kind, act = config.get("adapter_type"), config.get("activation", "relu")
    if kind not in KINDS or act not in ACTIVATIONS:
        raise JaxftError(f"{where}: adapter_type={kind!r}, activation={act!r}: expected one of "
                         f"{', '.join(KINDS)} and one of {', '.join(ACTIVATIONS)}")
    values = {}
    for key, value in tensors.items():
        m = KEY.fullmatch(key)
        if key.startswith("base_model."):  # a classifier head: read by jaxft.peft.hf_peft
            continue
        if not m:
            raise JaxftError(f"{where}: unexpected tensor {key} in a {PEFT_TYPE} adapter")
        block, layer = peft_keys.our_name(cfg, m[1], where)
        leaf = f"{m[3]}_{'kernel' if m[4] == 'weight' else 'bias'}"
        values.setdefault((f"{block}.adapter_{m[2]}", leaf), {})[layer] = value.T if m[4] == "weight" else value
    size = int(config.get("adapter_size", 0))
    return AdapterHook(size, kind, act), peft_keys.to_params(values, cfg, where)
