"""PEFT methods as parameter partitions: each method marks what trains and hooks named model points."""

from jaxft.peft.methods import METHODS, Method, build  # noqa: F401
