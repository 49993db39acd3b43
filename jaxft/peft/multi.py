"""Several named adapters on one base model: load them, switch between them, save each on its own.

The base's weights are held once: each adapter keeps only what it adds (and its classifier head),
and `use(name)` returns a model and a parameter tree whose base leaves are the very same arrays.
Training one adapter never touches another (only the active one is in the model), so "train one
while the others stay frozen" is: `use` it, train its method's leaves, `put` the result back.
Adapters are used one at a time; running several at once in one forward is the composition
`method.name='a+b'` of different methods, not of two adapters of one method (their parameter
names would collide).
"""

from __future__ import annotations

from jaxft.errors import JaxftError
from jaxft.models import family
from jaxft.peft.partition import flat, merge, unflat


class Adapters:
    def __init__(self, base_model, base_params: dict):
        self.base_model, self.base_params = base_model, base_params
        self._adapters: dict[str, tuple] = {}  # name -> (config, hooks, the adapter's own leaves)
        self.active: str | None = None

    @property
    def names(self) -> list[str]:
        return list(self._adapters)

    def load(self, name: str, adapter_dir) -> Adapters:
        """Read a HF PEFT adapter (or a composed export's directory) under `name`."""
        from jaxft.peft.hf_peft import load_adapter

        model, params = load_adapter(self.base_model, self.base_params, adapter_dir)
        return self.put(name, model, params)

    def put(self, name: str, model, params: dict) -> Adapters:
        """Keep (or replace) adapter `name`: a hooked model over this base and its parameters."""
        base = set(flat(self.base_params))
        own = {k: v for k, v in flat(params).items() if k not in base}  # what the adapter adds
        head = family.of(model.cfg).classifier_params if model.cfg.head == "classification" else None
        if head:  # its classifier head is its own, even where the base has one
            import re

            own.update({k: v for k, v in flat(params).items() if re.search(head, k)})
        extra = tuple(model.hooks[len(self.base_model.hooks):])
        self._adapters[name] = (model.cfg, extra, unflat(own))
        if self.active is None:
            self.active = name
        return self

    def use(self, name: str):
        """-> (model, params) with adapter `name` active; it stays active for `save` and `active`."""
        if name not in self._adapters:
            raise JaxftError(f"adapter {name!r}: not loaded (loaded: {', '.join(self._adapters) or 'none'})")
        cfg, hooks, own = self._adapters[name]
        self.active = name
        return family.build(cfg, tuple(self.base_model.hooks) + hooks), merge(self.base_params, own)

    def own_params(self, name: str) -> dict:
        return self._adapters[name][2]

    def save(self, name: str, out_dir, base: str = ""):
        """Write adapter `name` alone as HF PEFT adapter(s)."""
        from jaxft.hf import save_adapter

        return save_adapter(*self.use(name), out_dir, base=base)
