"""Orbax checkpoints under <workdir>/checkpoints: train state (trainable params, optimizer, step, rng)
plus a small JSON of run facts (data position, parameter names). Saves are atomic: a run killed
mid-save leaves only a temporary directory, which the next run ignores.
"""

from __future__ import annotations

from pathlib import Path

import orbax.checkpoint as ocp

from jaxft.errors import JaxftError


class Checkpoints:
    def __init__(self, workdir: str | Path, every_steps: int, keep: int):
        self.directory = Path(workdir).absolute() / "checkpoints"
        self.every = max(every_steps, 1)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep if keep > 0 else None,
            create=True,
            enable_async_checkpointing=True,
        )
        self._mngr = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "meta"))

    def latest_step(self) -> int | None:
        return self._mngr.latest_step()

    def save(self, step: int, state, meta: dict, force: bool = False) -> bool:
        """Save if `step` is on the interval (or `force`), unless this step is already saved."""
        if (not force and step % self.every) or step == self._mngr.latest_step():
            return False
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
        return self._mngr.save(step, args=args, force=True)

    def restore(self, step: int, abstract_state):
        args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore())
        try:
            out = self._mngr.restore(step, args=args)
        except Exception as e:  # corrupt, or written by a run with other trainable parameters
            raise JaxftError(
                f"{self.directory / str(step)}: cannot restore this checkpoint ({type(e).__name__}: "
                f"{str(e).splitlines()[0][:300]}); use a new --workdir or delete the checkpoint"
            ) from None
        return out["state"], out["meta"]

    def wait(self):
        self._mngr.wait_until_finished()

    def close(self):
        self._mngr.wait_until_finished()
        self._mngr.close()
