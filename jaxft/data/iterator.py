"""A deterministic, stateless batch order: batch `s` is a pure function of (seed, s).

So the data position is just the number of batches consumed: it is checkpointed with the step and
a resumed run sees exactly the batches an uninterrupted one would. Each process materialises only
its own rows of every global batch.
"""

from __future__ import annotations

import queue
import threading

import numpy as np


class Batches:
    """Global batch number `position` -> example indices, and this process's rows of it.

    With `buckets` (ascending widths), each epoch groups examples of similar length (sorted within
    chunks of 64 batches, then the batches shuffled), and a batch is cut to the smallest bucket that
    holds its longest example: a handful of shapes, each compiled once, and little padding. Encoder-decoder
    arrays (with `decoder_input_ids`) cut their decoder side (`labels`, `decoder_*`) to the bucket of the
    batch's longest target too (the buckets below the target length, and the target length).

    With `groups` (each example's source, 0..K-1) and `weights` (K sampling weights), an epoch of as
    many examples as there are draws about weight_k of them from source k (largest remainders): each
    source is read in its own shuffled passes, continued across epochs, and the sources interleaved
    at random. Still a pure function of (seed, position).

    `transform(rows, position, first, examples)` (optional) maps this process's rows of each batch, the
    first being global row `first`, examples `examples` of `arrays`, to what the step reads: MLM masks and
    T5 spans, redrawn every batch. A `Reencode` transform (LM-BFF's demonstrations, redrawn for each
    example as it comes) makes new rows of new lengths: it gets the whole global batch, whose longest new
    row picks the bucket, so every process cuts to the same width without a word to the others.
    """

    def __init__(self, arrays: dict[str, np.ndarray], global_batch: int, seed: int, shuffle: bool = True,
                 buckets: tuple[int, ...] = (), groups: np.ndarray | None = None, weights=None, transform=None):
        self.arrays, self.global_batch, self.seed, self.shuffle = arrays, global_batch, seed, shuffle
        self.transform = transform
        self.size = len(next(iter(arrays.values())))
        self.members = None
        if weights is not None:
            w = np.asarray(weights, np.float64) / np.sum(weights)
            self.members = [np.flatnonzero(groups == k) for k in range(len(w))]
            exact = w * self.size
            counts = np.floor(exact).astype(np.int64)
            counts[np.argsort(-(exact - counts), kind="stable")[: self.size - counts.sum()]] += 1
            self.counts = counts
        # A row's length: the longest of its masks (a preference pair's two answers share the row's width).
        self.lengths, self.target_lengths = _lengths(arrays)
        self.buckets = tuple(sorted(buckets)) if self.size >= global_batch else ()
        self._epoch, self._perm = None, None

    def _order(self, epoch: int) -> np.ndarray:
        if self._epoch != epoch:
            self._epoch = epoch
            rng = np.random.default_rng([self.seed, epoch])
            if self.members is not None:
                perm = self._mixture(epoch, rng)
            else:
                perm = rng.permutation(self.size) if self.shuffle else np.arange(self.size)
            if self.buckets:
                n = self.size // self.global_batch * self.global_batch  # whole batches per epoch
                chunk = self.global_batch * 64
                key = self.lengths
                if self.target_lengths is not None:  # by source length, then target length
                    key = self.lengths * (int(self.target_lengths.max()) + 1) + self.target_lengths
                perm = np.concatenate([
                    perm[i : min(i + chunk, n)][np.argsort(key[perm[i : min(i + chunk, n)]], kind="stable")]
                    for i in range(0, n, chunk)
                ])
                batches = perm.reshape(-1, self.global_batch)
                perm = batches[rng.permutation(len(batches))].reshape(-1)
            self._perm = perm
        return self._perm

    def _mixture(self, epoch: int, rng) -> np.ndarray:
        """One epoch's example indices drawn from the sources by weight (see the class docstring)."""
        sources = rng.permutation(np.repeat(np.arange(len(self.counts)), self.counts))
        perm = np.empty(self.size, np.int64)
        for k, (members, n) in enumerate(zip(self.members, self.counts)):
            j = np.arange(epoch * n, (epoch + 1) * n)  # positions in source k's endless stream
            passes, within = j // len(members), j % len(members)
            picked = np.empty(n, np.int64)
            for p in np.unique(passes):
                order = np.random.default_rng([self.seed, 1 + k, int(p)]).permutation(len(members))
                picked[passes == p] = members[order[within[passes == p]]]
            perm[sources == k] = picked
        return perm

    def indices(self, position: int) -> np.ndarray:
        """Example indices of global batch number `position` (epochs wrap with a fresh shuffle)."""
        if self.buckets:
            per_epoch = self.size // self.global_batch
            epoch, i = divmod(position, per_epoch)
            return self._order(epoch)[i * self.global_batch : (i + 1) * self.global_batch]
        flat = np.arange(position * self.global_batch, (position + 1) * self.global_batch)
        epochs, within = flat // self.size, flat % self.size
        return np.concatenate([self._order(e)[within[epochs == e]] for e in np.unique(epochs)])

    def local(self, position: int, rows: tuple[int, int]) -> dict[str, np.ndarray]:
        idx = self.indices(position)
        if isinstance(self.transform, Reencode):  # new rows: the global batch's own lengths pick the width
            whole = self.transform({k: v[idx] for k, v in self.arrays.items()}, position, 0, idx)
            batch = {k: v[rows[0] : rows[1]] for k, v in whole.items()}
            return self._cut(batch, *_lengths(whole)) if self.buckets else batch
        batch = {k: v[idx[rows[0] : rows[1]]] for k, v in self.arrays.items()}
        if self.buckets:  # the width is decided on the global batch, so all processes agree
            batch = self._cut(batch, self.lengths[idx],
                              None if self.target_lengths is None else self.target_lengths[idx])
        return self.transform(batch, position, rows[0], idx[rows[0] : rows[1]]) if self.transform else batch

    def _cut(self, batch: dict, lengths: np.ndarray, target_lengths: np.ndarray | None) -> dict:
        """`batch` cut to the bucket of the longest of `lengths` (the global batch's rows), an encoder-decoder's
        decoder side to the bucket of the longest of `target_lengths`."""
        width = _bucket(self.buckets, int(lengths.max()))
        widths = {k: width for k, v in batch.items() if v.ndim >= 2 and k.endswith(TOKEN_FIELDS)}
        if target_lengths is not None:
            full = batch["labels"].shape[1]
            target = _bucket(tuple(b for b in self.buckets if b < full) + (full,), int(target_lengths.max()))
            widths.update({k: target for k in widths if k == "labels" or k.startswith("decoder_")})
        return {k: v[..., : widths[k]] if k in widths else v for k, v in batch.items()}


class Reencode:
    """A `Batches` transform that encodes a batch's examples anew (`fn(batch, position, first, examples)`,
    the same arguments), so their lengths change: Batches hands it the whole global batch and keeps this
    process's rows of the result, cut to the bucket of the longest row of all. Every process thus encodes
    every row of the batch (LM-BFF's redrawn demonstrations, one per class of SST-2: about 0.25 ms a row
    on a CPU core). An epoch still groups examples by the lengths of `arrays` (their first encoding),
    which the new rows' lengths follow only roughly."""

    def __init__(self, fn):
        self.fn = fn

    def __call__(self, batch: dict, position: int, first: int, examples: np.ndarray) -> dict:
        return self.fn(batch, position, first, examples)


def _lengths(arrays: dict) -> tuple[np.ndarray | None, np.ndarray | None]:
    """-> (each row's length, its target's length or None): a row's length is the longest of its masks (a
    preference pair's two answers share the row's width); an encoder-decoder row's target length counts its
    `labels` that are not -100 (padding)."""
    masks = [v for k, v in arrays.items() if k.endswith("attention_mask") and not k.startswith("decoder_")]
    lengths = np.max([m.sum(axis=-1).reshape(len(m), -1).max(axis=1) for m in masks], axis=0) if masks else None
    targets = (arrays["labels"] >= 0).sum(axis=1) if "decoder_input_ids" in arrays and "labels" in arrays else None
    return lengths, targets


# Arrays with a value per token (also as `rejected_...`, `decoder_...`), cut to a batch's width; the
# others, such as a cloze question's `mlm_positions` and `verbalizer`, are not.
TOKEN_FIELDS = ("input_ids", "attention_mask", "token_type_ids", "segment_ids", "position_ids", "labels", "loss_mask",
                "mlm_labels")


def _bucket(buckets: tuple[int, ...], longest: int) -> int:
    """The smallest of the ascending `buckets` that holds `longest`, else the largest."""
    return next((b for b in buckets if b >= longest), buckets[-1])


class Prefetch:
    """`make(position)` for positions first, first + 1, ..., last - 1, run on a background thread up to
    `depth` ahead of the consumer, so host slicing and the copy to the devices overlap the step.

    The order is fixed (one producer, a FIFO queue) and `get` checks it, so resume stays exact. An
    error in `make` is raised by the `get` that would have returned its result.
    """

    def __init__(self, make, first: int, last: int, depth: int = 2):
        self._queue = queue.Queue(maxsize=max(depth, 1))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._produce, args=(make, first, last), daemon=True,
                                        name="jaxft-prefetch")
        self._thread.start()

    def _produce(self, make, first, last):
        for position in range(first, last):
            try:
                item = (position, make(position), None)
            except BaseException as e:  # noqa: BLE001  (handed to the consumer, raised there)
                item = (position, None, e)
            while not self._stop.is_set():
                try:
                    self._queue.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if self._stop.is_set() or item[2] is not None:
                return

    def get(self, position: int):
        got, value, error = self._queue.get()
        if error is not None:
            raise error
        assert got == position, f"prefetch out of order: got batch {got}, expected {position}"
        return value

    def close(self):
        self._stop.set()
        self._thread.join()


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
