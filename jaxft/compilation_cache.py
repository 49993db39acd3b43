"""XLA's persistent compilation cache around a run: a rerun (after a crash or a preemption), another
checkpoint's evaluation or another generate call with the same shapes loads its compiled programs instead
of compiling them again, minutes for a large model on a pod."""

from __future__ import annotations

import contextlib

import jax

# How many compiles this process loaded from the cache (JAX's own event): the compile lines say so.
CACHE_HITS = [0]


def _count_hits(event: str, **_):
    if event == "/jax/compilation_cache/cache_hits":
        CACHE_HITS[0] += 1


jax.monitoring.register_event_listener(_count_hits)


def cache_dir(setting: str, default, key: str = "train.compilation_cache"):
    """A compilation cache setting ("": `default`, "none", a directory or URL) -> the cache's directory, or
    None: "none", or "" where the user gave JAX a cache of their own (JAX_COMPILATION_CACHE_DIR)."""
    from jaxft import storage

    if setting == "none" or (not setting and jax.config.jax_compilation_cache_dir):
        return None
    if not setting:
        return default
    directory = storage.path(setting, key)
    storage.check_writable_dir(directory, key)
    return directory


@contextlib.contextmanager
def compilation_cache(directory):
    """The cache in `directory` (None: as it was) for the `with` block. JAX caches compiles of a second or
    more; process 0 writes, every process reads. JAX's own setting is restored afterwards, so runs in one
    process (tests, a notebook) keep apart."""
    from jax.experimental.compilation_cache import compilation_cache as cc

    if directory is None:
        yield
        return
    before = jax.config.jax_compilation_cache_dir
    cc.reset_cache()
    cc.set_cache_dir(str(directory))
    try:
        yield
    finally:
        cc.reset_cache()
        cc.set_cache_dir(before)
