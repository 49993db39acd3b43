"""LoRA (Hu et al. 2021) and rsLoRA (Kalajdzievski 2023) as a hook on named linear layers.

y = W x + scale * B(A x), never materialising W + BA (as in levanter). A is Kaiming-uniform like
PEFT's default, B starts at zero so training starts from the base model exactly.
scale = alpha / rank, or alpha / sqrt(rank) with rsLoRA.

DoRA (Liu et al. 2024, `dora=True`, PEFT's `use_dora`) replaces the product instead: y = m * (W + s BA) x
/ ||W + s BA||_col, with a learned magnitude m per output (`lora_magnitude`, starting at ||W||_col, so
training starts from the base) and the column norm treated as a constant, as the paper (section 4.3)
and PEFT do. `merge` / `unmerge` fold an adapter into the base kernels and take it out again.
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
    """The module names of a 'q_proj,v_proj' (or 'c_attn,mlp.c_proj') list; None for a regex."""
    targets = targets.strip()
    if re.fullmatch(r"[\w\s,.]+", targets) and not re.search(r"(^|[,\s])\.|\.($|[,\s])|\.\.", targets):
        return frozenset(t.strip() for t in targets.split(",") if t.strip())
    return None


def names_match(name: str, path: str) -> bool:
    """Whether a module name of a target list names this dotted path: its last part ('c_proj'), or
    its last parts ('mlp.c_proj', as PEFT matches a name: the whole path or a suffix after a dot)."""
    return path == name or path.endswith("." + name)


def parse_targets(targets: str):
    """'q_proj,v_proj' -> module names matched as PEFT does (`names_match`); anything else is a regex
    on the dotted path."""
    names = target_names(targets)
    if names is not None:
        return lambda path: any(names_match(n, path) for n in names)
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
    dora: bool = False

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)

    def acts_on(self, path: str) -> bool:
        return parse_targets(self.targets)(path)

    def _factors(self, module, kernel):
        d_in, d_out = kernel.shape[-2], kernel.shape[-1]
        init_a = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")
        a = param_with_axes(module, "lora_a", init_a, (d_in, self.rank), (module.axes[0], None))
        b = param_with_axes(module, "lora_b", nn.initializers.zeros, (self.rank, d_out), (None, module.axes[1]))
        return a, b

    def linear_product(self, module, x, y, kernel):
        if not self.dora or not self.acts_on(module_path(module)):
            return y
        a, b = self._factors(module, kernel)
        # Starts at the column norms of the kernel the model was initialised with; `initialize` resets
        # it to those of the loaded base weights.
        init_m = lambda rng, shape, dtype=jnp.float32: column_norm(kernel).astype(dtype)  # noqa: E731
        m = param_with_axes(module, "lora_magnitude", init_m, (kernel.shape[-1],), (module.axes[1],))
        norm = jax.lax.stop_gradient(column_norm(kernel, jax.lax.stop_gradient(a @ b) * self.scale))
        ratio = (m / norm).astype(y.dtype)
        h = dropout(module, x, self.dropout).astype(y.dtype)
        base = y if h is x else h @ kernel.astype(y.dtype)  # with dropout, PEFT rescales W on the dropped input
        return y + (ratio - 1) * base + ratio * (h @ a.astype(y.dtype) @ b.astype(y.dtype)) * self.scale

    def linear(self, module, x, y, kernel):
        if self.dora or not self.acts_on(module_path(module)):
            return y
        a, b = self._factors(module, kernel)
        h = dropout(module, x, self.dropout).astype(y.dtype)
        return y + (h @ a.astype(y.dtype) @ b.astype(y.dtype)) * self.scale

    def initialize(self, model, params, sample):
        """DoRA: each magnitude starts at the column norms of the loaded kernel plus the initial BA."""
        if not self.dora:
            return params
        from jaxft.peft.partition import flat, unflat

        f = flat(params)
        for path in [p for p in f if p.endswith("/lora_magnitude")]:
            mod = path[: -len("lora_magnitude")]
            norm = column_norm(f[mod + "kernel"], jnp.matmul(f[mod + "lora_a"], f[mod + "lora_b"]) * self.scale)
            f[path] = jax.device_put(norm.astype(f[path].dtype), f[path].sharding)
        return unflat(f)


def column_norm(kernel, delta=None):
    """||W (+ delta)|| over the input axis of [..., in, out] kernels, in fp32: one norm per output."""
    w = jnp.asarray(kernel, jnp.float32)
    if delta is not None:
        w = w + jnp.asarray(delta, jnp.float32)
    return jnp.sqrt(jnp.sum(w * w, axis=-2))


# ---------------------------------------------------------------------------------------------
# Merging into and out of the base weights.

MERGED_NORM = "lora_merged_norm"  # DoRA: ||W + s BA||_col at merge time, which unmerge needs back


def _adapted(params, hook: LoraHook):
    from jaxft.errors import JaxftError
    from jaxft.peft.partition import flat
    from jaxft.quant import Quantized

    f = flat(params)
    for path in [p for p in f if p.endswith("/lora_a")]:
        mod = path[: -len("lora_a")]
        if isinstance(f.get(mod + "kernel"), Quantized):
            raise JaxftError(f"{mod}kernel: a quantized base cannot take a merged adapter exactly "
                             "(dequantize it first: jaxft.quant.dequantize_params)")
        delta = jnp.matmul(jnp.asarray(f[path], jnp.float32), jnp.asarray(f[mod + "lora_b"], jnp.float32)) * hook.scale
        yield f, mod, delta


def merge(params, hook: LoraHook) -> dict:
    """Fold the adapter into the base kernels: W + s AB (DoRA: m (W + s AB) / ||W + s AB||_col).

    The adapter's leaves stay (so `unmerge` can take it out again); run the merged parameters with a
    model built without this hook. Exact up to fp32 rounding."""
    from jaxft.peft.partition import unflat

    out = None
    for f, mod, delta in _adapted(params, hook):
        out = f if out is None else out
        w = jnp.asarray(f[mod + "kernel"], jnp.float32) + delta
        if hook.dora:
            norm = column_norm(w)
            out[mod + MERGED_NORM] = norm
            w = w * (jnp.asarray(f[mod + "lora_magnitude"], jnp.float32) / norm)[..., None, :]
        out[mod + "kernel"] = w.astype(f[mod + "kernel"].dtype)
    return params if out is None else unflat(out)


def unmerge(params, hook: LoraHook) -> dict:
    """Take a merged adapter out of the base kernels again: the inverse of `merge`."""
    from jaxft.peft.partition import unflat

    out = None
    for f, mod, delta in _adapted(params, hook):
        out = f if out is None else out
        w = jnp.asarray(f[mod + "kernel"], jnp.float32)
        if hook.dora:
            norm = out.pop(mod + MERGED_NORM)
            w = w * (norm / jnp.asarray(f[mod + "lora_magnitude"], jnp.float32))[..., None, :]
        out[mod + "kernel"] = (w - delta).astype(f[mod + "kernel"].dtype)
    return params if out is None else unflat(out)


def merge_lora(model, params):
    """(model with a LoRA hook, params) -> (model without it, params with the adapter folded into each
    kernel and its leaves dropped): the same function at a plain model's cost, e.g. for generation.
    A quantized kernel cannot take it exactly: an error (generate with the hook instead)."""
    from jaxft.errors import JaxftError
    from jaxft.models import family
    from jaxft.peft.partition import flat, unflat

    hooks = [h for h in model.hooks if isinstance(h, LoraHook)]
    if not hooks:
        return model, params
    if len(hooks) > 1:
        raise JaxftError("merging needs a single LoRA hook, this model has several")
    merged = flat(merge(params, hooks[0]))
    leaves = ("lora_a", "lora_b", "lora_magnitude", MERGED_NORM)
    kept = unflat({k: v for k, v in merged.items() if k.split("/")[-1] not in leaves})
    return family.build(model.cfg, tuple(h for h in model.hooks if not isinstance(h, LoraHook))), kept
