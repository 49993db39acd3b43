"""PEFT methods as parameter partitions: each method marks what trains and hooks named model points.

A method declares itself once (`registry.Kind`, registered by name; the built-in ones in `methods`),
and its HF PEFT format once (`hf_peft.Format`, keyed by PEFT's `peft_type`)."""

from jaxft.peft.methods import METHODS, Method, build  # noqa: F401
from jaxft.peft.registry import Kind, register  # noqa: F401
