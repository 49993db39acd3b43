"""What a method is, declared once, and the registry that finds one by its config name.

A `Kind` says everything the rest of jaxft needs to know about a method without naming it: how a
`method.*` config builds it, which parameters it adds to a base model, which of those take no
weight decay, and which HF PEFT `peft_type` it reads and writes (the formats themselves live in
`jaxft.peft.hf_peft.FORMATS`, keyed by that type). `partition.ADDED_PARAMS` and the optimizer's
weight-decay mask are derived from the registered kinds, so adding a method is one `register` call
(the built-in ones are in `jaxft.peft.methods`).
"""

from __future__ import annotations

import dataclasses
import functools
import re
from typing import Callable


@dataclasses.dataclass(frozen=True)
class Kind:
    name: str  # the `method.name` that selects it ('lora'); hooks carry it as `hook.kind`
    build: Callable  # (method config, model config[, tokenizer=...]) -> jaxft.peft.methods.Method
    added: str = ""  # regex on "a/b/c" parameter paths: the leaves it adds to a base model ("" none)
    no_decay: str = ""  # regex: those of its added leaves that take no weight decay ("" all decay)
    peft_type: str = ""  # HF PEFT's name for it (LORA, PROMPT_TUNING, ...); "" where PEFT has none
    # regex: those of its added leaves that stay frozen but its export reads (LoRA's starting factors under
    # PiSSA / OLoRA); "" none
    export_reads: str = ""
    description: str = ""  # one line for `--help`-like listings and error messages


KINDS: dict[str, Kind] = {}


def register(kind: Kind) -> Kind:
    """Add (or replace) a method kind; the derived patterns follow."""
    KINDS[kind.name] = kind
    _patterns.cache_clear()
    return kind


def kinds() -> dict[str, Kind]:
    """Every registered kind, the built-in ones included (registered on first use)."""
    import jaxft.peft.methods  # noqa: F401 (registers the built-in methods)

    return KINDS


def get(name: str) -> Kind | None:
    return kinds().get(name)


def by_peft_type(peft_type: str) -> list[Kind]:
    return [k for k in kinds().values() if k.peft_type == peft_type]


@functools.lru_cache(maxsize=None)
def _patterns(which: str) -> re.Pattern:
    parts = [getattr(k, which) for k in KINDS.values() if getattr(k, which)]
    return re.compile("|".join(f"(?:{p})" for p in parts) if parts else r"(?!x)x")


def added_regex() -> re.Pattern:
    """One regex matching every leaf any registered method adds to a base model."""
    kinds()
    return _patterns("added")


def export_reads_regex() -> re.Pattern:
    """One regex matching the frozen method-added leaves that an adapter export reads."""
    kinds()
    return _patterns("export_reads")


def no_decay_regex() -> re.Pattern:
    """One regex matching the method-added leaves that take no weight decay."""
    kinds()
    return _patterns("no_decay")
