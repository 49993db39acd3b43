"""jaxft: fine-tuning language models with JAX/Flax, methods written as parameter partitions."""

__version__ = "0.1.0"
