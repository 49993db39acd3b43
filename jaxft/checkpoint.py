"""Orbax checkpoints under <workdir>/checkpoints: train state (trainable params, optimizer, step, rng)
plus a small JSON of run facts (data position, parameter names, the settings that define the run).

Saves are atomic: a run killed mid-save leaves only a temporary directory, which the next run
ignores. A newest checkpoint that cannot be read is set aside as `<step>.unreadable` (nothing is
deleted) and the run resumes from the newest one that can.
"""

from __future__ import annotations

import logging
import sys

import jax
import orbax.checkpoint as ocp

from jaxft.errors import JaxftError

# Config keys that define a run: resuming with another value is an error (unless train.resume_anyway).
# Mesh, logging, eval, checkpoint and export keys may change between runs, and so may the ways of
# computing the same model (HOW); `train.steps` may grow.
RUN_SECTIONS = ("model", "data", "method", "optimizer")
RUN_KEYS = ("train.batch_size", "train.grad_accum", "train.seed", "train.skip_nonfinite")
HOW = ("model.remat", "model.attention", "data.cache_dir")
# How jaxft lays parameters out against HF's, recorded in every checkpoint. 2: fused projections (GLM-4's
# and Phi-3's gate_up_proj, Phi-3's qkv_proj, GPT-2's c_attn) store their outputs in the groups one tensor
# shard multiplies (`Family.hf_rows`); before, in HF's order.
LAYOUT = 2


class Unreadable(JaxftError):
    """A checkpoint whose files do not read back (truncated, corrupted)."""


def _quiet_closed_loop(args):
    """When a restore fails on a corrupt chunk, TensorStore reads still in flight post their results to
    Orbax's event loop, already closed, and Python prints each as an unraisable "RuntimeError: Event loop
    is closed" with its traceback, under the one-line error. Those, and only those, are dropped."""
    if isinstance(args.exc_value, RuntimeError) and str(args.exc_value) == "Event loop is closed":
        return
    _quiet_closed_loop.default(args)


class Checkpoints:
    def __init__(self, workdir, every_steps: int, keep: int):
        """`workdir`: an epath.Path (local or remote)."""
        self.directory = workdir / "checkpoints"
        self.every = max(every_steps, 1)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep if keep > 0 else None,
            create=True,
            enable_async_checkpointing=True,
        )
        self._mngr = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "meta"))

    def latest_step(self) -> int | None:
        return self._mngr.latest_step()

    def due(self, step: int) -> bool:
        return step % self.every == 0 and step != self._mngr.latest_step()

    def save(self, step: int, state, meta: dict, force: bool = False) -> bool:
        """Save if `step` is on the interval (or `force`), unless this step is already saved."""
        if (not force and step % self.every) or step == self._mngr.latest_step():
            return False
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
        return self._mngr.save(step, args=args, force=True)

    def _restore(self, step: int, **items):
        """Orbax restore of the named items, its failure as one line (Orbax would log a traceback)."""
        if sys.unraisablehook is not _quiet_closed_loop:
            _quiet_closed_loop.default = sys.unraisablehook
            sys.unraisablehook = _quiet_closed_loop
        quiet = logging.getLogger("absl"), logging.getLogger()
        levels = [q.level for q in quiet]
        for q in quiet:
            q.setLevel(logging.CRITICAL)
        try:
            return self._mngr.restore(step, args=ocp.args.Composite(**items))
        except Exception as e:  # noqa: BLE001  (corrupt or truncated files)
            raise Unreadable(
                f"{self.directory / str(step)}: cannot restore this checkpoint ({type(e).__name__}: "
                f"{(str(e).splitlines() or [''])[0].split(' See full TensorStore details')[0][:300]})"
            ) from None
        finally:
            for q, level in zip(quiet, levels):
                q.setLevel(level)

    def restore(self, step: int, abstract_state, check) -> tuple[object, dict]:
        """-> (state, meta) of checkpoint `step`; `check(meta)` runs before the state is read."""
        meta = self._restore(step, meta=ocp.args.JsonRestore())["meta"]
        check(meta)
        return self._restore(step, state=ocp.args.StandardRestore(abstract_state))["state"], meta

    def all_steps(self) -> list[int]:
        return list(self._mngr.all_steps())

    def restore_latest(self, abstract_state, check, log):
        """-> (step, state, meta) of the newest checkpoint that reads back, or (None, None, None).

        `check(meta)` runs before the state is read; its errors stop the run. A checkpoint that cannot
        be read is renamed `<step>.unreadable` (kept, not deleted) and the next older one is tried."""
        while (step := self.latest_step()) is not None:
            try:
                meta = self._restore(step, meta=ocp.args.JsonRestore())["meta"]
                check(meta)
                state = self._restore(step, state=ocp.args.StandardRestore(abstract_state))["state"]
                return step, state, meta
            except Unreadable as e:
                older = [s for s in self._mngr.all_steps() if s < step]
                if not older:
                    raise JaxftError(f"{e}; no older checkpoint: use a new --workdir or delete it") from None
                log(f"warning: {e}; set aside as {step}.unreadable, resuming from step {max(older)}")
                self._set_aside(step)
        return None, None, None

    def _set_aside(self, step: int):
        if jax.process_index() == 0:
            (self.directory / str(step)).rename(self.directory / f"{step}.unreadable")
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("jaxft-checkpoint-set-aside")
        self._mngr.reload()

    def wait(self):
        self._mngr.wait_until_finished()

    def close(self):
        if self._mngr is not None:
            self._mngr.wait_until_finished()
            self._mngr.close()
            self._mngr = None


def check_layout(cfg, saved: dict, where):
    """A checkpoint of an older layout whose trained parameters include a module stored differently now
    would resume silently mis-ordered: an error instead."""
    from jaxft.models import family
    from jaxft.peft import peft_keys

    if saved.get("layout", 1) >= LAYOUT:
        return
    for path in saved.get("trainable", ()):
        stack = peft_keys.stack_of(cfg, ".".join(path.split("/")[:-1]))
        if stack is None:
            continue
        name = peft_keys.hf_name(cfg, peft_keys.join(stack[0], stack[2]), 0)
        if family.of(cfg).hf_rows(cfg, name) is not None:
            raise JaxftError(
                f"{where}: written by an older jaxft that kept {name}'s outputs in HF's order (layout "
                f"{saved.get('layout', 1)}); this version groups them per tensor shard (layout {LAYOUT}): resume or "
                "export it with the jaxft that wrote it, or start a new --workdir"
            )


def run_settings(config) -> dict:
    """The settings that define a run, flat (`section.key` -> value), as stored in a checkpoint."""
    out = {}
    for section in RUN_SECTIONS:
        for key, value in _flat(config[section].to_dict(), section).items():
            if key not in HOW:
                out[key] = value
    for key in RUN_KEYS:
        section, name = key.split(".")
        if name in config[section]:
            out[key] = config[section][name]
    return out


def _flat(d: dict, prefix: str) -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}.{k}"))
        else:
            out[f"{prefix}.{k}"] = v
    return out


def changed_settings(saved: dict, current: dict) -> list[tuple[str, object, object]]:
    """(key, old, new) for every run-defining setting that differs from the checkpoint's. Keys only
    one side knows (a key added to the config since) do not count."""
    norm = lambda v: list(v) if isinstance(v, tuple) else v  # noqa: E731  (JSON has no tuples)
    return [(k, saved[k], current[k]) for k in sorted(saved.keys() & current.keys())
            if norm(saved[k]) != norm(current[k])]
