"""LoRA (Hu et al. 2021) and rsLoRA (Kalajdzievski 2023) as a hook on named linear layers.

y = W x + scale * B(A x), never materialising W + BA (as in levanter). A is Kaiming-uniform like
PEFT's default, B starts at zero so training starts from the base model exactly.
scale = alpha / rank, or alpha / sqrt(rank) with rsLoRA.

DoRA (Liu et al. 2024, `dora=True`, PEFT's `use_dora`) replaces the product instead: y = m * (W + s BA) x
/ ||W + s BA||_col, with a learned magnitude m per output (`lora_magnitude`, starting at ||W||_col, so
training starts from the base) and the column norm treated as a constant, as the paper (section 4.3)
and PEFT do. `merge` / `unmerge` fold an adapter into the base kernels and take it out again.

`init` is PEFT's `init_lora_weights`: "" (its default, above), "gaussian" (A normal with std 1/rank),
or a split of each base kernel W into a residual and a product that starts the adapter: "pissa" (Meng et
al. 2024: BA = W's top-rank singular part / s, by an exact SVD; "pissa_niter_N": a randomised SVD with N
power iterations) and "olora" (Buyukakyuz 2024: B, A = the first rank columns / rows of W's QR). The
frozen kernel becomes W - s BA, so training still starts from the base model exactly, and the starting
factors stay beside the adapter (`lora_a0`, `lora_b0`, frozen) for the export, which writes PEFT's
conversion of such an adapter to a plain one on the original base: rank 2r, [A; A0] and [B, -B0].
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

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
    init: str = ""  # PEFT's init_lora_weights: "" (default) | gaussian | pissa | pissa_niter_N | olora

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)

    merges = True

    def merge(self, params):
        return merge(params, self)

    @property
    def splits_base(self) -> bool:
        """Whether the adapter starts as a part of the base kernel (PiSSA, OLoRA), not at zero."""
        return self.init == "olora" or self.init.startswith("pissa")

    def acts_on(self, path: str) -> bool:
        return parse_targets(self.targets)(path)

    def _factors(self, module, kernel):
        d_in, d_out = kernel.shape[-2], kernel.shape[-1]
        init_a = (nn.initializers.normal(1.0 / self.rank) if self.init == "gaussian"
                  else nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform"))
        a = param_with_axes(module, "lora_a", init_a, (d_in, self.rank), (module.axes[0], None))
        b = param_with_axes(module, "lora_b", nn.initializers.zeros, (self.rank, d_out), (None, module.axes[1]))
        if self.splits_base:  # the starting factors, frozen: `initialize` sets them with a and b
            param_with_axes(module, "lora_a0", nn.initializers.zeros, (d_in, self.rank), (module.axes[0], None))
            param_with_axes(module, "lora_b0", nn.initializers.zeros, (self.rank, d_out), (None, module.axes[1]))
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
        """PiSSA / OLoRA: each target kernel split into its residual and the starting factors (`split_base`).
        DoRA: each magnitude starts at the column norms of the loaded kernel plus the initial BA."""
        if self.splits_base:
            params = split_base(params, self)
        if not self.dora:
            return params
        from jaxft.peft.partition import flat, unflat

        f = flat(params)
        for path in [p for p in f if p.endswith("/lora_magnitude")]:
            mod = path[: -len("lora_magnitude")]
            norm = column_norm(f[mod + "kernel"], jnp.matmul(f[mod + "lora_a"], f[mod + "lora_b"]) * self.scale)
            f[path] = jax.device_put(norm.astype(f[path].dtype), f[path].sharding)
        return unflat(f)


def split_base(params, hook: LoraHook, keep_factors: bool = False) -> dict:
    """PiSSA / OLoRA: for every LoRA target, (kernel, a, b) -> (kernel - s ab, a, b), with a and b PEFT's
    starting factors of that kernel, copied to `lora_a0` / `lora_b0`. `keep_factors`: a and b stay as given
    (an adapter PEFT saved without converting it, whose base PEFT splits again as it loads it). One target at
    a time, in fp32, each result laid out (sharded) as the leaf it replaces; the kernel keeps its dtype, as
    PEFT casts it back."""
    from tqdm import tqdm

    from jaxft.errors import JaxftError
    from jaxft.peft.partition import flat, unflat

    f = flat(params)
    mods = sorted(p[: -len("lora_a")] for p in f if p.endswith("/lora_a"))
    weights = sum(int(np.prod(f[m + "kernel"].shape[:-2])) for m in mods)  # a scanned stack holds one per layer
    bar = tqdm(total=weights, desc=f"{hook.init}: splitting the target weights", unit="weight", leave=False,
               disable=weights < 8)  # a real model's; a toy's takes no time
    for i, mod in enumerate(mods):
        kernel = f[mod + "kernel"]
        if not hasattr(kernel, "dtype") or not jnp.issubdtype(kernel.dtype, jnp.floating):
            raise JaxftError(f"method.init_lora_weights={hook.init!r}: {mod}kernel is not a float array (PiSSA and "
                             "OLoRA split the base weights before they are quantized)")
        leaves = (mod + "kernel", mod + "lora_a", mod + "lora_b")
        like = leaves + leaves[1:]  # a0, b0 as a, b
        shardings = tuple(getattr(f[k], "sharding", None) for k in like)  # host arrays (hf.load) have none
        decompose = functools.partial(_decompose, hook.init, hook.rank, hook.scale, tuple(f[k].dtype for k in like))
        split = jax.jit(decompose, **({} if None in shardings else {"out_shardings": shardings}))
        residual, a, b, a0, b0 = split(kernel, jax.random.PRNGKey(i))
        f.update({mod + "kernel": residual, mod + "lora_a0": a0, mod + "lora_b0": b0})
        if not keep_factors:
            f.update({mod + "lora_a": a, mod + "lora_b": b})
        bar.update(int(np.prod(kernel.shape[:-2])))
    bar.close()
    return unflat(f)


def _decompose(init: str, rank: int, scale: float, dtypes, kernel, key):
    """A kernel [..., in, out] -> (residual kernel, a, b, a, b) for PEFT's `pissa_init` / `olora_init`, which
    read HF's [out, in] weight W: PiSSA's B = U_r S_r^1/2, A = S_r^1/2 V_r^T with S_r divided by s (so s BA
    is W's top-rank part); OLoRA's B, A = W's QR factors Q[:, :r], R[:r]. Ours are their transposes. A scanned
    stack [L, in, out] goes one layer at a time: a decomposition's workspace is several kernels."""
    if kernel.ndim > 2:
        keys = jax.random.split(key, kernel.shape[0])
        return jax.lax.map(lambda xs: _decompose(init, rank, scale, dtypes, *xs), (kernel, keys))
    w = jnp.swapaxes(kernel.astype(jnp.float32), -1, -2)
    if init == "olora":
        q, r = jnp.linalg.qr(w)
        b_hf, a_hf = q[..., :, :rank], r[..., :rank, :]
    else:
        niter = init.split("_niter_")
        u, sv, vh = svd_lowrank(w, rank, int(niter[1]), key) if len(niter) == 2 else \
            jnp.linalg.svd(w, full_matrices=False)
        root = jnp.sqrt(sv[..., :rank] / scale)
        b_hf, a_hf = u[..., :, :rank] * root[..., None, :], root[..., :, None] * vh[..., :rank, :]
    a, b = jnp.swapaxes(a_hf, -1, -2), jnp.swapaxes(b_hf, -1, -2)
    residual = kernel.astype(jnp.float32) - scale * jnp.matmul(a, b)
    return tuple(x.astype(dt) for x, dt in zip((residual, a, b, a, b), dtypes))


def svd_lowrank(w, rank: int, niter: int, key):
    """W [..., m, n] -> (U [..., m, rank], S [..., rank], V^T [..., rank, n]) of a randomised SVD (Halko et al.
    2011, as torch.svd_lowrank: a Gaussian sketch of `rank` columns, `niter` power iterations re-orthonormalised
    by QR). Its random draws are jax's, so its factors are near, not equal to, PEFT's."""
    wt = jnp.swapaxes(w, -1, -2)
    q = jnp.linalg.qr(w @ jax.random.normal(key, w.shape[:-2] + (w.shape[-1], rank), w.dtype))[0]
    for _ in range(niter):
        q = jnp.linalg.qr(w @ jnp.linalg.qr(wt @ q)[0])[0]
    u, sv, vh = jnp.linalg.svd(jnp.swapaxes(q, -1, -2) @ w, full_matrices=False)
    return q @ u, sv, vh


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
    leaves = ("lora_a", "lora_b", "lora_a0", "lora_b0", "lora_magnitude", MERGED_NORM)
    kept = unflat({k: v for k, v in merged.items() if k.split("/")[-1] not in leaves})
    return family.build(model.cfg, tuple(h for h in model.hooks if not isinstance(h, LoraHook))), kept
