"""A deterministic, stateless batch order: batch `s` is a pure function of (seed, s).

So the data position is just the number of batches consumed: it is checkpointed with the step and
a resumed run sees exactly the batches an uninterrupted one would. Each process materialises only
its own rows of every global batch.
"""

from __future__ import annotations

import numpy as np


class Batches:
    def __init__(self, arrays: dict[str, np.ndarray], global_batch: int, seed: int, shuffle: bool = True):
        self.arrays, self.global_batch, self.seed, self.shuffle = arrays, global_batch, seed, shuffle
        self.size = len(next(iter(arrays.values())))
        self._epoch, self._perm = None, None

    def _order(self, epoch: int) -> np.ndarray:
        if self._epoch != epoch:
            self._epoch = epoch
            self._perm = (
                np.random.default_rng([self.seed, epoch]).permutation(self.size) if self.shuffle else np.arange(self.size)
            )
        return self._perm

    def indices(self, position: int) -> np.ndarray:
        """Example indices of global batch number `position` (epochs wrap with a fresh shuffle)."""
        flat = np.arange(position * self.global_batch, (position + 1) * self.global_batch)
        epochs, within = flat // self.size, flat % self.size
        return np.concatenate([self._order(e)[within[epochs == e]] for e in np.unique(epochs)])

    def local(self, position: int, rows: tuple[int, int]) -> dict[str, np.ndarray]:
        idx = self.indices(position)[rows[0] : rows[1]]
        return {k: v[idx] for k, v in self.arrays.items()}


def eval_batches(arrays: dict[str, np.ndarray], global_batch: int, rows: tuple[int, int]):
    """Fixed-size batches over the whole set; the last is padded with weight-0 copies of row 0."""
    n = len(arrays["weight"])
    for start in range(0, n, global_batch):
        idx = np.arange(start, start + global_batch)
        real = idx < n
        idx = np.where(real, idx, 0)[rows[0] : rows[1]]
        batch = {k: v[idx] for k, v in arrays.items()}
        batch["weight"] = batch["weight"] * real[rows[0] : rows[1]]
        yield batch
