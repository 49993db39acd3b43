"""IA3 (Liu et al. 2022, "(IA)^3"): learned vectors that rescale activations, as HF PEFT defines it.

A target module's output is multiplied by a vector `ia3_l` [out] (keys and values), a feed-forward
module's input by a vector [in] (`down_proj`'s, the feed-forward's inner activation). The vectors
start at 1, so training starts from the base model; they take no weight decay (see jaxft.step).
HF PEFT's `IA3` adapter format both ways: `export_peft` / `import_peft`.
"""

from __future__ import annotations

import dataclasses
import re
from typing import ClassVar

import flax.linen as nn
import numpy as np

from jaxft.models import family
from jaxft.models.layers import param_with_axes
from jaxft.peft import peft_keys
from jaxft.peft.hook import Hook
from jaxft.peft.lora import module_path, parse_targets

TRAINABLE = r"/ia3_l$"
KEY = re.compile(r"base_model\.model\.(.+)\.ia3_l")


@dataclasses.dataclass(frozen=True)
class IA3Hook(Hook):
    kind = "ia3"  # the registered method (a class attribute, not a field)
    targets: str = "k_proj,v_proj,down_proj"  # module names or a regex on the dotted path, as LoRA's
    feedforward: str = "down_proj"  # those of the targets whose input is scaled
    targets_key: ClassVar[str] = "method.ia3_targets"

    def acts_on(self, path: str) -> bool:
        return parse_targets(self.targets)(path)

    def _feedforward(self, path: str) -> bool:
        return bool(self.feedforward.strip()) and parse_targets(self.feedforward)(path)

    def linear_input(self, module, x):
        path = module_path(module)
        if not (self.acts_on(path) and self._feedforward(path)):
            return x
        scale = param_with_axes(module, "ia3_l", nn.initializers.ones, (x.shape[-1],), (module.axes[0],))
        return x * scale.astype(x.dtype)

    def linear(self, module, x, y, kernel):
        path = module_path(module)
        if not self.acts_on(path) or self._feedforward(path):
            return y
        scale = param_with_axes(module, "ia3_l", nn.initializers.ones, (y.shape[-1],), (module.axes[1],))
        return y * scale.astype(y.dtype)

    merges = True

    def merge(self, params):
        """A feed-forward module's kernel rows times its input scales; any other target's columns (and
        bias, which it scales with the output) times its output scales, as PEFT's IA3 merge."""
        from jaxft.peft.partition import flat, unflat

        f = flat(params)
        for path in [p for p in f if p.endswith("/ia3_l")]:
            mod, scale = path[: -len("ia3_l")], np.asarray(f[path], np.float32)
            kernel = np.asarray(f[mod + "kernel"], np.float32)
            if self._feedforward(mod.rstrip("/").replace("/", ".")):
                f[mod + "kernel"] = (kernel * scale[..., :, None]).astype(f[mod + "kernel"].dtype)
                continue
            f[mod + "kernel"] = (kernel * scale[..., None, :]).astype(f[mod + "kernel"].dtype)
            if mod + "bias" in f:
                f[mod + "bias"] = (np.asarray(f[mod + "bias"], np.float32) * scale).astype(f[mod + "bias"].dtype)
        return unflat(f)


def export_peft(cfg, hook: IA3Hook, trainable) -> tuple[dict, dict]:
    """-> (adapter_config entries, tensors) of PEFT's IA3: `ia3_l` [out, 1], or [1, in] for a
    feed-forward module."""
    tensors, names, ff = {}, set(), set()
    for path, layer, v in peft_keys.per_layer(trainable, "ia3_l", cfg):
        name = peft_keys.hf_name(cfg, path, layer)
        is_ff = hook._feedforward(path)
        tensors[f"base_model.model.{name}.ia3_l"] = v[None, :] if is_ff else family.hf_order(cfg, name, v)[:, None]
        (ff if is_ff else names).add(peft_keys.pattern(cfg, path, layer))
    # Regexes on the full HF module names, as PEFT matches a string (not a list) of target_modules.
    config = {"peft_type": "IA3", "target_modules": "|".join(sorted(names | ff)),
              "feedforward_modules": "|".join(sorted(ff)) or None, "fan_in_fan_out": False,
              "init_ia3_weights": True}
    return config, tensors


def import_peft(cfg, config: dict, tensors: dict, where: str) -> tuple[IA3Hook, dict]:
    """PEFT's IA3 tensors -> (hook, flat params). A [1, in] vector scales its module's input."""
    values, ff = {}, set()
    for key, value in tensors.items():
        m = KEY.fullmatch(key)
        if not m:
            continue
        path, layer = peft_keys.our_name(cfg, m[1], where)
        if value.ndim == 2 and value.shape[0] == 1 and value.shape[1] != 1:
            ff.add(path)
        else:  # the module's output scales
            value = family.hf_order(cfg, m[1], value, False)
        values.setdefault((path, "ia3_l"), {})[layer] = value.reshape(-1)
    paths = sorted({p for p, _ in values})
    hook = IA3Hook("|".join(map(re.escape, paths)), "|".join(map(re.escape, sorted(ff))))
    # Layers the adapter leaves out (a target regex naming some layers) scale by one: no change, as in PEFT.
    return hook, peft_keys.to_params(values, cfg, where, fill=lambda shape: np.ones(shape, np.float32))
