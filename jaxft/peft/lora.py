"""LoRA (Hu et al. 2021) and rsLoRA (Kalajdzievski 2023) as a hook on named linear layers.

y = W x + scale * B(A x), never materialising W + BA (as in levanter). A is Kaiming-uniform like
PEFT's default, B starts at zero so training starts from the base model exactly.
scale = alpha / rank, or alpha / sqrt(rank) with rsLoRA.
"""

from __future__ import annotations

import dataclasses
import math
import re

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxft.models.layers import param_with_axes
from jaxft.peft.hook import Hook


def target_names(targets: str) -> frozenset[str] | None:
    """The module names of a 'q_proj,v_proj' list; None for a regex."""
    targets = targets.strip()
    if re.fullmatch(r"[\w\s,]+", targets):
        return frozenset(t.strip() for t in targets.split(",") if t.strip())
    return None


def parse_targets(targets: str):
    """'q_proj,v_proj' -> module names matched exactly; anything else is a regex on the dotted path."""
    names = target_names(targets)
    if names is not None:
        return lambda path: path.split(".")[-1] in names
    targets = targets.strip()
    rx = re.compile(targets)
    return lambda path: rx.fullmatch(path) is not None


def dropout(module: nn.Module, x, rate: float):
    """Inverted dropout, active only when the caller passed a 'dropout' rng (training)."""
    if rate <= 0 or not module.has_rng("dropout"):
        return x
    keep = jax.random.bernoulli(module.make_rng("dropout"), 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


def module_path(module: nn.Module) -> str:
    """Dotted path of a module in the model, without the scan's per-layer index (`layers_3` -> `layers`)."""
    return ".".join(module.path)


@dataclasses.dataclass(frozen=True)
class LoraHook(Hook):
    kind = "lora"  # the registered method (a class attribute, not a field)
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: str = "q_proj,v_proj"
    rslora: bool = False

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)

    def acts_on(self, path: str) -> bool:
        return parse_targets(self.targets)(path)

    def linear(self, module, x, y, kernel):
        if not self.acts_on(module_path(module)):
            return y
        d_in, d_out = kernel.shape[-2], kernel.shape[-1]
        init_a = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")
        a = param_with_axes(module, "lora_a", init_a, (d_in, self.rank), (module.axes[0], None))
        b = param_with_axes(module, "lora_b", nn.initializers.zeros, (self.rank, d_out), (None, module.axes[1]))
        h = dropout(module, x, self.dropout).astype(y.dtype)
        return y + (h @ a.astype(y.dtype) @ b.astype(y.dtype)) * self.scale


def merge_lora(model, params):
    """(model with LoRA hooks, params) -> (model without them, params with W + scale * A B in each kernel):
    the same function at a plain model's cost, e.g. for generation. A quantized kernel stays as it is
    stored, so merging into one is an error (generate with the hook instead)."""
    from jaxft.errors import JaxftError
    from jaxft.models import family
    from jaxft.peft.partition import flat, unflat
    from jaxft.quant import Quantized

    hooks = [h for h in model.hooks if isinstance(h, LoraHook)]
    if not hooks:
        return model, params
    if len(hooks) > 1:
        raise JaxftError("merging needs a single LoRA hook, this model has several")
    scale, out = hooks[0].scale, flat(params)
    for path in [p for p in out if p.endswith("/lora_a")]:
        module = path[: -len("/lora_a")]
        a, b, kernel = out.pop(path), out.pop(module + "/lora_b"), out[module + "/kernel"]
        if isinstance(kernel, Quantized):
            raise JaxftError(f"{module}: LoRA cannot be merged into a quantized kernel (keep it unmerged)")
        delta = jnp.einsum("...ir,...ro->...io", a.astype(jnp.float32), b.astype(jnp.float32)) * scale
        out[module + "/kernel"] = (kernel.astype(jnp.float32) + delta).astype(kernel.dtype)
    rest = tuple(h for h in model.hooks if not isinstance(h, LoraHook))
    return family.build(model.cfg, rest), unflat(out)
