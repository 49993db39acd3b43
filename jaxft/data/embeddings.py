"""Sentence embeddings for LM-BFF's demonstration filter (Gao et al. 2021, section 6.2): an encoder's
final hidden states mean-pooled over the real tokens ([CLS] and [SEP] included), as SBERT's mean-token
models embed a sentence, and the top fraction of each class's training examples nearest an input.

The embeddings are stored as integers (unit vectors times 2^15, rounded) so that a cosine is an exact
integer dot product whatever order a matmul sums in: which examples are nearest, and so the
demonstrations drawn from them, do not depend on how rows are batched.
"""

from __future__ import annotations

import numpy as np

from jaxft.errors import JaxftError

SCALE = 2.0 ** 15  # a unit vector's entries as integers; D * SCALE^2 stays exact in float64 for D < 2^23
BATCH = 64  # texts per forward pass
WIDTHS = (16, 32, 64, 128, 256, 512)  # padded lengths (one compiled program each), up to the encoder's limit
HEAD_MODULES = ("cls", "lm_head", "classifier", "pooler", "score")  # never read here: zeros where a checkpoint lacks them


def encoder(path: str, key: str = "data.demonstration_encoder"):
    """A HF model directory (or hub name) -> (pooled(params, ids, mask) -> [B, D] jitted, params, its
    tokenizer, the longest row it takes or None, whether it is a causal LM). A masked LM (BERT, RoBERTa,
    a sentence-transformers BERT directory) gives its last layer's states, a causal LM its final (normed)
    states, T5 its encoder's. `key`: the setting that named the directory, for errors."""
    import jax
    import jax.numpy as jnp
    from flax import linen as nn

    from jaxft import hf
    from jaxft.models import family
    from jaxft.peft.partition import flat, unflat
    from jaxft.tokenizer import Tokenizer

    try:
        root = hf.resolve(str(path))
        cfg = hf.read_config(root)
    except JaxftError as e:  # resolve's errors name model.path: say which setting it was
        raise JaxftError(str(e).replace(f"model.path {str(path)!r}", f"{key}={str(path)!r}", 1)) from None
    fam = family.of(cfg)
    if fam.encoder_decoder:
        cfg = cfg.replace(head="seq2seq_lm")
    elif "causal_lm" in fam.heads:
        cfg = cfg.replace(head="causal_lm")
    elif "masked_lm" in fam.heads:  # states of the last layer, unrolled so that its output can be captured
        cfg = cfg.replace(head="masked_lm", scan_layers=False)
    else:
        raise JaxftError(f"{key}={str(path)!r}: a {cfg.model_type} model cannot give its final "
                         "hidden states here (expected a masked LM, a causal LM or T5)")
    model = family.build(cfg)
    params = flat(hf.params_from_hf(hf.read_tensors(root), cfg, where=str(root)))
    shapes = flat(nn.unbox(jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 2), jnp.int32)))
                           ["params"]))
    for p, leaf in shapes.items():  # an output head the checkpoint lacks (a bare encoder): never read
        if p not in params and p.split("/")[0] in HEAD_MODULES:
            params[p] = np.zeros(leaf.shape, leaf.dtype)
    params = hf.complete(model, unflat(params), root)  # anything else missing is its error
    last = f"layers_{cfg.num_layers - 1}"

    def states(p, ids, mask):
        if fam.encoder_decoder:
            return model.apply({"params": p}, ids, mask, method="encode")[0]
        if cfg.head == "causal_lm":
            return model.apply({"params": p}, ids, mask, return_hidden=True)[0]
        _, inter = model.apply({"params": p}, ids, mask, label_positions=jnp.zeros((len(ids), 1), jnp.int32),
                               capture_intermediates=lambda m, name: m.name == last and name == "__call__",
                               mutable=["intermediates"])
        return inter["intermediates"][last]["__call__"][0][0]

    def pooled(p, ids, mask):
        h = states(p, ids, mask).astype(jnp.float32)
        m = mask[..., None].astype(jnp.float32)
        return (h * m).sum(1) / jnp.maximum(m.sum(1), 1.0)

    longest = int(getattr(cfg, "max_position_embeddings", 0) or 0) - (2 if getattr(cfg, "roberta", False) else 0)
    return jax.jit(pooled), params, Tokenizer(root), longest if longest > 0 else None, cfg.head == "causal_lm"


def embed(texts: list[str], path: str, seq_len: int, what: str = "texts", log=print,
          key: str = "data.demonstration_encoder") -> np.ndarray:
    """`texts` -> their embeddings [N, D], unit vectors as integers (x 2^15, float64), computed in batches
    of similar lengths. Each text as the encoder's tokenizer frames it: [CLS] text [SEP] on BERT, text </s>
    on T5, BOS text on a causal LM (its BOS where it has one); cut to seq_len tokens."""
    pooled, params, tok, limit, causal = encoder(path, key)
    seq_len = min(seq_len, limit) if limit else seq_len
    eos = [] if causal else tok.eos
    room = seq_len - len(tok.bos) - len(eos)
    rows = [tok.bos + tok.encode(t)[:room] + eos for t in texts]
    order = np.argsort([len(r) for r in rows], kind="stable")
    out = np.zeros((len(rows), 0), np.float32)
    widths = tuple(w for w in WIDTHS if w < seq_len) + (seq_len,)
    for n, start in enumerate(range(0, len(rows), BATCH)):
        if n and n % 100 == 0:
            log(f"demonstration filter: embedded {start:,} of {len(rows):,} {what}")
        take = order[start : start + BATCH]
        width = next(w for w in widths if w >= max(len(rows[i]) for i in take))
        ids = np.full((BATCH, width), tok.pad_id, np.int32)
        mask = np.zeros((BATCH, width), np.int32)
        for r, i in enumerate(take):
            ids[r, : len(rows[i])], mask[r, : len(rows[i])] = rows[i], 1
        got = np.asarray(pooled(params, ids, mask))[: len(take)]
        if not out.shape[1]:
            out = np.zeros((len(rows), got.shape[1]), np.float32)
        out[take] = got
    norms = np.linalg.norm(out, axis=1, keepdims=True)
    return np.round(out / np.maximum(norms, 1e-12) * SCALE).astype(np.float64)


def nearest(similarity: np.ndarray, m: int) -> np.ndarray:
    """The indices (ascending) of the `m` largest of `similarity`, ties to the lower index."""
    if m >= len(similarity):
        return np.arange(len(similarity))
    v = np.partition(similarity, len(similarity) - m)[len(similarity) - m]  # the m-th largest
    above = np.flatnonzero(similarity > v)
    return np.sort(np.concatenate([above, np.flatnonzero(similarity == v)[: m - len(above)]]))
