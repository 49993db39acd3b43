"""Cross-entropy over a vocabulary, fused with the output projection.

A causal LM's logits are the largest tensor of a step: [batch, length, vocab] in fp32, 262 MB for
8 x 256 tokens and a 32k vocabulary, 8 GB for 8 x 2048 tokens and Llama 3's 128k. Plain autodiff
writes them, reads them back for the softmax, writes their gradient and reads it again. Here the
projection, softmax, loss and both gradients are computed chunk by chunk along the sequence, inside
one forward pass (as in Liger's fused linear cross-entropy and Apple's cut cross-entropy): logits
never exist beyond one chunk, and the backward pass only scales gradients already computed. On 2
CPU cores the LM head + loss of `tools/benchmark.py` take 337 ms instead of 533 (BENCHMARKS.md).

Chunks run along the length axis with the whole batch in each, so a batch sharded over devices
stays sharded. The gradient of the output embedding is only computed when it is trained.

Chunks are as large as 512 MiB of fp32 logits allows (4,096 tokens of a 32k vocabulary, 1,024 of
128k): each chunk adds the [V, D] embedding gradient to a running sum and launches its own kernels,
so on a GPU many small chunks cost time. One 1.1B Llama step (8 x 2048 tokens, 32k vocabulary) on an
H100 took 299 ms in chunks of 512 tokens and 292 ms in one chunk (BENCHMARKS.md); on 2 CPU cores
larger chunks neither gained nor lost.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

# Positions per chunk: at least 64 (per-device chunks stay big when the batch is sharded over many
# devices); tokens per chunk: at least 512, or as many as 512 MiB of fp32 logits hold.
MIN_CHUNK_LENGTH, CHUNK_TOKENS, CHUNK_LOGITS_BYTES = 64, 512, 2**29


def chunk_length(batch: int, length: int, vocab: int) -> int:
    """Positions per chunk for `batch` rows of `length` tokens: the chunks split the length evenly,
    so the last one pads as little as the count of chunks allows."""
    tokens = max(CHUNK_TOKENS, CHUNK_LOGITS_BYTES // (4 * max(vocab, 1)))
    per_row = max(1, min(length, max(MIN_CHUNK_LENGTH, tokens // max(batch, 1))))
    chunks = -(-length // per_row)
    return max(1, -(-length // max(chunks, 1)))


def _softmax_nll(logits, targets):
    """fp32 logits [..., V] -> NLL and correct [...], and the softmax as numerators p / denominator s.
    Correct here means the target has the highest logit, ties counting: the fused LM loss's token
    accuracy, where an argmax pass over the vocabulary would cost as much as the softmax (and a (value,
    index) reduction needs an int32 [tokens, V] buffer and cannot be split over a vocabulary sharded by
    tensor parallelism); exact ties of fp32 logits over a vocabulary are rare. `token_stats` (classification,
    cloze) counts the argmax."""
    m = jnp.max(logits, axis=-1, keepdims=True)
    p = jnp.exp(logits - m)
    s = jnp.sum(p, axis=-1, keepdims=True)
    target = jnp.take_along_axis(logits, targets[..., None], axis=-1)
    return (jnp.log(s) + m - target)[..., 0], (target >= m)[..., 0].astype(jnp.float32), p, s


def argmax_is(logits, targets):
    """[...]: 1.0 where `targets` is the argmax of logits [..., V], the first of equal highest logits as
    `jnp.argmax` and `np.argmax` take it (so accuracy agrees with the confusion matrix, and classes whose
    logits round to one bf16 value are not all counted right). Plain max and min reductions, which
    tensor parallelism splits over a sharded last axis."""
    m = jnp.max(logits, axis=-1, keepdims=True)
    index = jax.lax.broadcasted_iota(jnp.int32, logits.shape, logits.ndim - 1)
    first = jnp.min(jnp.where(logits == m, index, logits.shape[-1]), axis=-1)
    return (first == targets).astype(jnp.float32)


def token_stats(logits, targets, weights):
    """Sums of NLL, weight and correct predictions (the argmax's: `argmax_is`) from fp32 logits [..., V]."""
    nll = _softmax_nll(logits, targets)[0]
    correct = argmax_is(logits, targets)
    return {"loss_sum": jnp.sum(nll * weights), "count": jnp.sum(weights), "correct": jnp.sum(correct * weights)}


def softcap(logits, cap: float | None):
    """Gemma 2's soft cap of scores or logits, cap * tanh(logits / cap); as they are without one."""
    return cap * jnp.tanh(logits / cap) if cap else logits


def hidden_outputs(outputs: tuple):
    """A causal LM's `return_hidden` outputs -> (final states, output embedding, logit cap or None): a model
    whose logits are capped (Gemma 2's final_logit_softcapping) returns its cap as a third element."""
    return (*outputs, None)[:3]


def fused_cross_entropy(hidden, embedding, targets, weights, dtype=jnp.float32, cap: float | None = None):
    """Sums of NLL, weight and correct predictions of `hidden @ embedding.T` against `targets`.

    hidden [B, T, D]; embedding [V, D] (the output embedding, tied or not); targets [B, T] int;
    weights [B, T] float (0 drops a token). The projection runs in `dtype` and the softmax in fp32,
    as the unfused `logits.astype(float32)` path does. Differentiable in hidden and embedding. `cap`:
    the logits are `softcap`ped first.
    """
    b, t, _ = hidden.shape
    length = chunk_length(b, t, embedding.shape[0])  # t = 0: no targets, sums of 0
    sums = _fused(hidden, embedding, targets, weights.astype(jnp.float32), length, jnp.dtype(dtype), cap)
    return {"loss_sum": sums[0], "count": jnp.sum(weights), "correct": sums[1]}


def row_sums(logits, targets, weights):
    """fp32 logits [B, T, V] -> [B]: each row's sum of weights * log p(target)."""
    return jnp.sum(log_probs(logits, targets) * weights, axis=1)


def row_log_likelihood(hidden, embedding, targets, weights, dtype=jnp.float32, cap: float | None = None):
    """[B]: each row's sum of weights * log p(target) under `hidden @ embedding.T` (DPO's sequence
    log-likelihoods), from `token_log_probs`."""
    log_p = token_log_probs(hidden, embedding, targets, dtype, cap)
    return jnp.sum(log_p * weights.astype(jnp.float32), axis=1)


def token_log_probs(hidden, embedding, targets, dtype=jnp.float32, cap: float | None = None,
                    temperature: float = 1.0):
    """[B, T]: log p(target) of every position under `hidden @ embedding.T`, `softcap`ped by `cap`, over
    `temperature` (GRPO's per-token ratios). Chunked along the sequence as `fused_cross_entropy`, but
    differentiated by plain autodiff: each chunk's logits are recomputed in the backward pass
    (`jax.checkpoint`) instead of kept, since a per-token output cannot fold its gradient into the
    forward pass as a single sum does."""
    b, t, _ = hidden.shape
    length = chunk_length(b, t, embedding.shape[0])
    e = embedding.astype(dtype)

    @jax.checkpoint
    def chunk(_, xs):
        h, y = xs  # [B, length, ...]
        logits = softcap(jnp.einsum("bld,vd->blv", h.astype(dtype), e, preferred_element_type=jnp.float32), cap)
        if temperature != 1.0:
            logits = logits / temperature
        return None, -_softmax_nll(logits, y)[0]

    xs = (_chunks(hidden, length), _chunks(targets, length))
    return _unchunk(jax.lax.scan(chunk, None, xs)[1], t)


def log_probs(logits, targets):
    """fp32 logits [B, T, V] -> [B, T]: log p(target) of every position."""
    return -_softmax_nll(logits, targets)[0]


def _chunks(x, length: int):
    """[B, T, ...] -> [T / length, B, length, ...], padding T with zeros (weight 0)."""
    b, t = x.shape[:2]
    pad = -t % length
    x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
    return jnp.moveaxis(x.reshape((b, (t + pad) // length, length) + x.shape[2:]), 1, 0)


def _unchunk(x, t: int):
    x = jnp.moveaxis(x, 0, 1)
    return x.reshape((x.shape[0], -1) + x.shape[3:])[:, :t]


def _forward(hidden, embedding, targets, weights, length, dtype, cap, hidden_grad: bool, embedding_grad: bool):
    """Loss sums, and the gradients of the NLL sum (for a cotangent of 1) asked for, in one pass."""
    e = embedding.astype(dtype)

    def chunk(grad_e, xs):
        h, y, w = (x.reshape((-1,) + x.shape[2:]) for x in xs)  # [B * length, ...]: plain 2-D matmuls
        logits = jnp.einsum("nd,vd->nv", h.astype(dtype), e, preferred_element_type=jnp.float32)
        tanh = jnp.tanh(logits / cap) if cap else None
        nll, correct, p, s = _softmax_nll(logits if tanh is None else cap * tanh, y)
        sums = (jnp.sum(nll * w), jnp.sum(correct * w))
        if not (hidden_grad or embedding_grad):
            return grad_e, (sums, None)
        d_logits = (p / s - jax.nn.one_hot(y, logits.shape[-1], dtype=jnp.float32)) * w[..., None]
        if tanh is not None:  # through the cap: d(c tanh(z / c)) / dz = 1 - tanh^2
            d_logits = d_logits * (1 - tanh * tanh)
        d_logits = d_logits.astype(dtype)
        d_h = jnp.einsum("nv,vd->nd", d_logits, e).reshape(xs[0].shape) if hidden_grad else None
        if embedding_grad:
            grad_e = grad_e + jnp.einsum("nv,nd->vd", d_logits, h.astype(dtype), preferred_element_type=jnp.float32)
        return grad_e, (sums, d_h)

    grad_e = jnp.zeros(embedding.shape, jnp.float32) if embedding_grad else None
    xs = (_chunks(hidden, length), _chunks(targets, length), _chunks(weights, length))
    grad_e, ((nll, correct), d_h) = jax.lax.scan(chunk, grad_e, xs)
    d_h = None if d_h is None else _unchunk(d_h, hidden.shape[1]).astype(hidden.dtype)
    grad_e = None if grad_e is None else grad_e.astype(embedding.dtype)
    return (jnp.sum(nll), jnp.sum(correct)), (d_h, grad_e)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _fused(hidden, embedding, targets, weights, length, dtype, cap):
    return _forward(hidden, embedding, targets, weights, length, dtype, cap, False, False)[0]


def _fused_fwd(hidden, embedding, targets, weights, length, dtype, cap):
    # With symbolic zeros, each primal says whether it is differentiated: a frozen embedding
    # (LoRA, P-Tuning v2, head-only) costs no [V, D] gradient matmul.
    h, e, y, w = hidden.value, embedding.value, targets.value, weights.value
    return _forward(h, e, y, w, length, dtype, cap, hidden.perturbed, embedding.perturbed)


def _fused_bwd(length, dtype, cap, residuals, cotangents):
    d_h, grad_e = residuals
    g = cotangents[0]  # d(loss) / d(NLL sum); the count of correct predictions has no gradient
    if isinstance(g, jax.custom_derivatives.SymbolicZero):
        return None, None, None, None
    scale = lambda x: None if x is None else (g * x).astype(x.dtype)  # noqa: E731
    return scale(d_h), scale(grad_e), None, None


_fused.defvjp(_fused_fwd, _fused_bwd, symbolic_zeros=True)
