"""Several named adapters on one base model: load them, switch between them, run several at once,
train one while the others stay frozen, save each on its own.

The base's weights are held once: each adapter keeps only what it adds (and its classifier head),
and `use(name)` returns a model and a parameter tree whose base leaves are the very same arrays.
`use(["a", "b"])` activates several at once, as PEFT's `base_model.set_adapter(["a", "b"])`: each
adapter's hooks run in turn (in the order named), so two LoRA adapters add both their updates to a
projection's output, and LoRA "a" + IA3 "b" scales (W x + s B A x) by b's vector. Where two active
adapters are of one method, their leaves would share names: each adapter's leaves then carry its name
(`lora_a@b`), and `put_joint` reads them back. Only hooks on the linear layers (LoRA, DoRA, IA3) can
be renamed; two soft prompts or prefixes of one method at once are refused.

Training one while the others stay frozen: `use` the set, train the leaves `trainable(name, set)`
matches (`jaxft.peft.partition.split`), then `put_joint` the result back; or `use` it alone, train its
method's leaves, and `put` it back.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Sequence

from jaxft.errors import JaxftError
from jaxft.models import family
from jaxft.peft.hook import Hook, acts_on_linear
from jaxft.peft.partition import flat, merge, unflat

SEP = "@"  # leaf "lora_a" of adapter "b" in a joint tree: "lora_a@b"


class _Renamed:
    """A module as a hook sees it, whose parameters get `@name` appended (all else as the module's)."""

    def __init__(self, module, suffix: str):
        self._module, self._suffix = module, suffix

    def param(self, name, *args, **kwargs):
        return self._module.param(f"{name}{SEP}{self._suffix}", *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._module, name)


@dataclasses.dataclass(frozen=True)
class Named(Hook):
    """One adapter's hook on the linear layers, its parameters named after the adapter."""

    hook: Any = None
    name: str = ""

    @property
    def kind(self):  # noqa: D401 (the wrapped method's; export unwraps it first anyway)
        return self.hook.kind

    def acts_on(self, path):
        return self.hook.acts_on(path)

    def linear_input(self, module, x):
        return self.hook.linear_input(_Renamed(module, self.name), x)

    def linear_product(self, module, x, y, kernel):
        return self.hook.linear_product(_Renamed(module, self.name), x, y, kernel)

    def linear(self, module, x, y, kernel):
        return self.hook.linear(_Renamed(module, self.name), x, y, kernel)


class Adapters:
    def __init__(self, base_model, base_params: dict):
        self.base_model, self.base_params = base_model, base_params
        self._adapters: dict[str, tuple] = {}  # name -> (config, hooks, the adapter's own leaves)
        self.active: str | list[str] | None = None

    @property
    def names(self) -> list[str]:
        return list(self._adapters)

    def load(self, name: str, adapter_dir) -> Adapters:
        """Read a HF PEFT adapter (or a composed export's directory) under `name`."""
        from jaxft.peft.hf_peft import load_adapter

        if SEP in name:
            raise JaxftError(f"adapter name {name!r}: must not contain {SEP!r}")
        model, params = load_adapter(self.base_model, self.base_params, adapter_dir)
        return self.put(name, model, params)

    def put(self, name: str, model, params: dict) -> Adapters:
        """Keep (or replace) adapter `name`: a hooked model over this base and its parameters."""
        base = set(flat(self.base_params))
        own = {k: v for k, v in flat(params).items() if k not in base}  # what the adapter adds
        head = family.of(model.cfg).classifier_params if model.cfg.head == "classification" else None
        if head:  # its classifier head is its own, even where the base has one
            own.update({k: v for k, v in flat(params).items() if re.search(head, k)})
        extra = tuple(model.hooks[len(self.base_model.hooks):])
        self._adapters[name] = (model.cfg, extra, unflat(own))
        if self.active is None:
            self.active = name
        return self

    def _get(self, name: str):
        if name not in self._adapters:
            raise JaxftError(f"adapter {name!r}: not loaded (loaded: {', '.join(self._adapters) or 'none'})")
        return self._adapters[name]

    def use(self, name: str | Sequence[str]):
        """-> (model, params) with adapter `name` active, or several at once (a list of names); they
        stay active for `save` and `active`."""
        if not isinstance(name, str):
            return self._use_joint(list(name))
        cfg, hooks, own = self._get(name)
        self.active = name
        return family.build(cfg, tuple(self.base_model.hooks) + hooks), merge(self.base_params, own)

    def _renamed(self, names: list[str]) -> set[str]:
        """Those of `names` whose leaves carry their name in the joint tree: adapters sharing a method."""
        kinds = [h.kind for n in names for h in self._get(n)[1]]
        shared = {k for k in kinds if kinds.count(k) > 1}
        out = set()
        for n in names:
            for h in self._get(n)[1]:
                if h.kind in shared:
                    if not acts_on_linear(h):
                        raise JaxftError(f"adapters {', '.join(names)}: two {h.kind!r} adapters cannot be active at "
                                         "once (only methods on the linear layers, such as LoRA and IA3, can)")
                    out.add(n)
        return out

    def _use_joint(self, names: list[str]):
        if not names or len(set(names)) < len(names):
            raise JaxftError(f"adapters {names}: expected distinct names of loaded adapters")
        renamed = self._renamed(names)
        heads = [n for n in names if self._get(n)[0].head != self.base_model.cfg.head]
        cfgs = {self._get(n)[0] for n in names}
        if len(heads) > 1 or (len(cfgs) > 1 and not heads):
            raise JaxftError(f"adapters {', '.join(names)}: at most one may bring a classifier head")
        cfg = self._get(heads[0] if heads else names[0])[0]
        hooks, params = tuple(self.base_model.hooks), self.base_params
        for n in names:
            _, extra, own = self._get(n)
            if n in renamed:
                extra = tuple(Named(h, n) for h in extra)
                own = unflat({_rename(k, n, self.base_params): v for k, v in flat(own).items()})
            hooks += extra
            params = merge(params, own)
        self.active = list(names)
        return family.build(cfg, hooks), params

    def trainable(self, name: str, active: Sequence[str]) -> tuple[str, ...]:
        """Regexes (`jaxft.peft.partition.split`) of adapter `name`'s leaves in `use(active)`'s tree."""
        renamed = name in self._renamed(list(active))
        keys = [_rename(k, name, self.base_params) if renamed else k for k in flat(self.own_params(name))]
        return tuple("^" + re.escape(k) + "$" for k in keys)

    def put_joint(self, params: dict, active: Sequence[str]) -> Adapters:
        """Take each active adapter's leaves back from a `use(active)` tree (after training one)."""
        tree = flat(params)
        renamed = self._renamed(list(active))
        for n in active:
            cfg, hooks, own = self._get(n)
            pick = lambda k: tree[_rename(k, n, self.base_params) if n in renamed else k]  # noqa: E731
            self._adapters[n] = (cfg, hooks, unflat({k: pick(k) for k in flat(own)}))
        return self

    def own_params(self, name: str) -> dict:
        return self._get(name)[2]

    def save(self, name: str, out_dir, base: str = ""):
        """Write adapter `name` alone as HF PEFT adapter(s)."""
        from jaxft.hf import save_adapter

        return save_adapter(*self.use(name), out_dir, base=base)


def _rename(key: str, name: str, base: dict) -> str:
    """An adapter's leaf path -> its name in a joint tree; a classifier head (a base leaf too) keeps its own."""
    return key if key in flat(base) else f"{key}{SEP}{name}"
