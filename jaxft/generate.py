"""Text generation with an explicit KV cache: greedy, sampling and beam search, jitted once.

`generate(model, params, input_ids, ...)` -> the new token ids [batch, max_new_tokens], padded after
EOS. The whole generation (prefill, then one token per `lax.while_loop` step) is one jitted function
per model, settings and input shape: nothing recompiles per token. The cache is preallocated to the
final length (`Family.init_cache`) and written in place; each step feeds one token per row.

Decisions follow transformers' `generate` so its outputs are the oracle:
- prompts are left-aligned (right-padded input is moved internally); positions count real tokens;
- logits processors as transformers defines them: repetition penalty (on every id of the sequence so
  far, prompt padding included), then, when sampling, temperature, top-k and top-p;
- beam search is transformers' vectorised one (length_penalty 1.0, early_stopping False): 2 * beams
  candidates per step, finished hypotheses scored by sum of log-probs / generated length.
Encoder-decoder families (`Family.encoder_decoder`) run `method="encode"` once and decode from their
decoder start token with `method="decode"`.

Soft prompts (prompt tuning, P-Tuning) put virtual tokens in front of every prompt. They see only
each other (they come first, attention is causal), so their keys and values at every layer are the
same for every row: they are computed once, at the start, and held in front of each layer's cache as
a prefix, the prompt's positions counting on after them, as PEFT's generate places them. P-Tuning v2 /
prefix tuning prefixes are such a prefix already. A sliding window leaves them behind as transformers'
does over [virtual tokens, padded prompt, answer]: by slot, padding included.

`python -m jaxft.generate --model=DIR [--adapter=DIR] --prompt="..."` (or `--prompts=FILE`, one prompt a
line) prints one completion per prompt (where stdout's encoding cannot write a character, it is `?`;
PYTHONIOENCODING=utf-8 keeps every one).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxft.errors import ArgumentParser, JaxftError, printable_stdout
from jaxft.models import family
from jaxft.peft.hook import Hook

NEG = -1.0e9  # transformers' "impossible" beam score
TRACES = collections.Counter()  # how often the model step was traced (the tests' no-recompile check)


@dataclasses.dataclass(frozen=True)
class Settings:
    max_new_tokens: int
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    num_beams: int = 1
    repetition_penalty: float = 1.0
    num_eos: int = 0  # how many EOS ids (their values and the pad id are arguments: no recompiling for them)

    @property
    def sampling(self) -> bool:
        return self.temperature > 0


def generate(model, params, input_ids, attention_mask=None, *, max_new_tokens, temperature=0.0, top_k=0, top_p=1.0,
             num_beams=1, repetition_penalty=1.0, eos_token_id=None, pad_token_id=None, seed=0):
    """New token ids [batch, max_new_tokens] (pad_token_id after EOS; pad defaults to the first EOS id,
    else 0). temperature 0 is greedy (top_k / top_p then do nothing, as in transformers); eos_token_id
    may be one id or several."""
    fam = family.of(model.cfg)
    if fam.init_cache is None:
        raise JaxftError(f"the {fam.name} family cannot generate (it has no KV cache)")
    if model.cfg.head not in ("causal_lm", "seq2seq_lm"):
        raise JaxftError(f"generation needs a language-model head, this model has {model.cfg.head!r}")
    ids = np.asarray(input_ids)
    ids = ids[None] if ids.ndim == 1 else ids
    if ids.ndim != 2 or ids.shape[1] == 0 or ids.shape[0] == 0:
        raise JaxftError(f"input_ids: expected [batch, length] token ids, got shape {np.shape(input_ids)}")
    mask = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask).reshape(ids.shape)
    eos = () if eos_token_id is None else tuple(int(e) for e in np.atleast_1d(eos_token_id))
    pad = int(pad_token_id) if pad_token_id is not None else (eos[0] if eos else 0)
    s = Settings(int(max_new_tokens), float(temperature), int(top_k), float(top_p), int(num_beams),
                 float(repetition_penalty), len(eos))
    check(s)
    empty = np.flatnonzero(mask.sum(axis=1) == 0)
    if empty.size:
        raise JaxftError(f"attention_mask: row {empty[0]} has no real token")
    if not fam.encoder_decoder:
        ids, mask = left_align(ids, mask, pad)
    out = compiled(model, s)(params, jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.int32),
                             jnp.asarray(eos or (-1,), jnp.int32), jnp.int32(pad), jax.random.PRNGKey(seed))
    return np.asarray(out)


def check(s: Settings):
    problems = [
        (s.max_new_tokens >= 1, f"max_new_tokens={s.max_new_tokens}: expected a positive integer"),
        (s.temperature >= 0, f"temperature={s.temperature}: expected >= 0 (0 is greedy)"),
        (s.top_k >= 0, f"top_k={s.top_k}: expected >= 0 (0 keeps every token)"),
        (0 < s.top_p <= 1, f"top_p={s.top_p}: expected 0 < top_p <= 1"),
        (s.num_beams >= 1, f"num_beams={s.num_beams}: expected a positive integer"),
        (s.repetition_penalty > 0, f"repetition_penalty={s.repetition_penalty}: expected > 0 (1 is none)"),
    ]
    for ok, message in problems:
        if not ok:
            raise JaxftError(message)


def left_align(ids, mask, pad: int):
    """Each row's real tokens moved to the end, in order (padding first), as decoder-only generation
    needs: the next token then follows the last column of every row."""
    order = np.argsort(mask != 0, axis=1, kind="stable")
    ids, mask = np.take_along_axis(ids, order, 1), np.take_along_axis(mask != 0, order, 1).astype(np.int32)
    return np.where(mask == 1, ids, pad), mask


@functools.lru_cache(maxsize=32)
def compiled(model, s: Settings):
    """The jitted generation of one model and settings (jit itself keys on the input shapes)."""
    return jax.jit(functools.partial(_generate, model, s))


# ---------------------------------------------------------------------------------------------
# The loop, traced once.


def _generate(model, s: Settings, params, ids, mask, eos, pad, key):
    cfg, fam = model.cfg, family.of(model.cfg)
    if not fam.encoder_decoder:  # a T5 encoder reads its virtual tokens once anyway
        model, params = soft_prompt_prefix(model, params)
    beams = s.num_beams
    ids, mask = (jnp.repeat(x, beams, axis=0) for x in (ids, mask))  # [B * beams, T]; each beam a row
    rows = ids.shape[0]
    if fam.encoder_decoder:
        # the encoder states and their mask (longer than the input by any virtual tokens of a method)
        encoded, encoded_mask = model.apply({"params": params}, ids, mask, method="encode")
        start = getattr(cfg, "decoder_start_token_id", None)
        prompt = jnp.full((rows, 1), start if start is not None else pad, jnp.int32)
        extra = dict(encoder_states=encoded, encoder_mask=encoded_mask, method="decode")
    else:
        prompt, extra = ids, {}
    length = prompt.shape[1]  # where the first new token goes
    slots = length + s.max_new_tokens
    slot_mask = jnp.zeros((rows, slots), jnp.int32).at[:, :length].set(mask if not fam.encoder_decoder else 1)
    cache = fam.init_cache(cfg, rows, slots, cfg.compute_dtype)

    def step(cache, slot_mask, tokens, index):
        TRACES["step"] += 1
        logits, cache = model.apply({"params": params}, tokens, slot_mask, cache=cache, cache_index=index, **extra)
        return logits[:, -1].astype(jnp.float32), cache

    # A rotation that changes past some length (LongRoPE's long factors): the loop step at which a sequence
    # first holds one token more than it feeds the whole sequence again, writing every slot's keys anew, as
    # transformers' Phi-3 drops its cache there. Static: the prompts' padded width decides it, as there.
    reset = None if fam.encoder_decoder else fam.cache_reset(cfg)
    reset = reset + 1 - length if reset is not None and 1 <= reset + 1 - length < s.max_new_tokens else None

    def feed(cache, slot_mask, i, token, so_far):
        """Loop step i: the previous token (`token`, at slot length + i - 1) into the cache, or at the reset
        step the prompts and all `so_far` [rows, max_new_tokens] generated before it."""
        one = lambda: step(cache, slot_mask, token[:, None], length + i - 1)  # noqa: E731
        if reset is None:
            return one()
        every = lambda: step(cache, slot_mask, jnp.concatenate([prompt, so_far[:, :reset]], 1), 0)  # noqa: E731
        return jax.lax.cond(i == reset, every, one)

    logits, cache = step(cache, slot_mask, prompt, jnp.int32(0))
    seen = None
    if s.repetition_penalty != 1.0:  # ids of the sequence so far: transformers penalises prompt padding too
        # (a P-Tuning template's placeholders are no token: out of range, dropped)
        seen = jnp.zeros(logits.shape, bool).at[jnp.arange(rows)[:, None], jnp.where(prompt < 0, logits.shape[-1],
                                                                                   prompt)].set(True)
    if beams == 1:
        return _sample_loop(s, feed, logits, cache, slot_mask, seen, length, eos, pad, key)
    axis = batch_axis(fam, cfg, cache)
    return _beam_loop(s, feed, logits, cache, slot_mask, seen, length, eos, pad, key, axis)


@dataclasses.dataclass(frozen=True)
class _SoftPromptPrefix(Hook):
    """Every layer's keys and values of a soft prompt's `tokens` virtual tokens, computed once
    (parameters `soft_prompt_keys` / `soft_prompt_values` [layers, P, kv heads, head dim]), as a prefix."""

    tokens: int = 0

    def prefix(self, model, batch_size):
        import flax.linen as nn

        layers, kv, d = family.of(model.cfg).kv_layout(model.cfg)
        shape = (layers, self.tokens, kv, d)
        k, v = (model.param(f"soft_prompt_{n}", nn.initializers.zeros, shape) for n in ("keys", "values"))
        return tuple(jnp.broadcast_to(x[:, None], (layers, batch_size) + shape[1:]) for x in (k, v))


def soft_prompt_prefix(model, params):
    """A model with soft prompts in front -> one without them that holds their keys and values as
    every layer's prefix (see the module's docstring), and its params. Unchanged without soft prompts."""
    from jaxft.peft.ptuning_v2 import sown_keys_values

    hooks = tuple(model.hooks)
    n = sum(getattr(h, "virtual_tokens", 0) for h in hooks)
    if not n:
        return model, params
    one = jnp.zeros((1, 1), jnp.int32)  # any token: the virtual tokens before it do not see it
    _, state = model.apply({"params": params}, one, one + 1, mutable=["intermediates"])
    k, v = sown_keys_values(state["intermediates"], model.cfg)  # [layers, 1, P + 1, KV, D]
    rest = tuple(h for h in hooks if not getattr(h, "virtual_tokens", 0))
    params = {**params, "soft_prompt_keys": k[:, 0, :n], "soft_prompt_values": v[:, 0, :n]}
    return family.build(model.cfg, rest + (_SoftPromptPrefix(n),)), params


def batch_axis(fam, cfg, cache=None):
    """Per cache leaf, the axis that holds the batch: the one that changes with the batch size. With
    `cache` (as the first step returned it), for its leaves: one the first step added (T5's cross-attention
    keys and values) takes the axis of a sibling leaf."""
    one, two = (jax.eval_shape(lambda b=b: fam.init_cache(cfg, b, 4, cfg.compute_dtype)) for b in (1, 2))
    axes = jax.tree.map(lambda a, b: next(i for i, (x, y) in enumerate(zip(a.shape, b.shape)) if x != y), one, two)
    if cache is None:
        return axes
    known = {path: a for path, a in jax.tree_util.tree_flatten_with_path(axes)[0]}
    sibling = lambda path: next(a for p, a in known.items() if p[:-1] == path[:-1])  # noqa: E731
    return jax.tree_util.tree_map_with_path(lambda path, _: known[path] if path in known else sibling(path),
                                            cache)


def process(s: Settings, scores, seen):
    """transformers' logits processors, in its order."""
    if seen is not None:
        p = s.repetition_penalty
        scores = jnp.where(seen, jnp.where(scores < 0, scores * p, scores / p), scores)
    if not s.sampling:
        return scores
    keep = s.num_eos + 1 if s.num_beams > 1 else 1  # beams keep a non-EOS continuation
    if s.temperature != 1.0:
        scores = scores / s.temperature
    if s.top_k:
        kth = jax.lax.top_k(scores, min(max(s.top_k, keep), scores.shape[-1]))[0][..., -1:]
        scores = jnp.where(scores < kth, -jnp.inf, scores)
    if s.top_p < 1.0:
        order = jnp.argsort(scores, axis=-1)  # ascending, as transformers sorts
        ascending = jnp.take_along_axis(scores, order, -1)
        drop = jnp.cumsum(jax.nn.softmax(ascending, axis=-1), axis=-1) <= 1 - s.top_p
        drop = drop.at[..., -keep:].set(False)
        drop = jnp.zeros_like(drop).at[jnp.arange(scores.shape[0])[:, None], order].set(drop)
        scores = jnp.where(drop, -jnp.inf, scores)
    return scores


def _sample_loop(s, feed, logits, cache, slot_mask, seen, length, eos, pad, key):
    rows = logits.shape[0]

    def choose(i, logits, out, done, seen, key):
        key, sub = jax.random.split(key)
        scores = process(s, logits, seen)
        if s.sampling:
            token = jax.random.categorical(sub, scores, axis=-1).astype(jnp.int32)
        else:
            token = jnp.argmax(scores, axis=-1).astype(jnp.int32)
        token = jnp.where(done, pad, token)
        if seen is not None:
            seen = seen.at[jnp.arange(rows), token].set(True)
        return out.at[:, i].set(token), done | jnp.isin(token, eos), seen, key, token

    out = jnp.full((rows, s.max_new_tokens), pad, jnp.int32)
    out, done, seen, key, token = choose(0, logits, out, jnp.zeros(rows, bool), seen, key)

    def cond(state):
        i, _, _, _, done, *_ = state
        return (i < s.max_new_tokens) & ~jnp.all(done)

    def body(state):
        i, cache, slot_mask, out, done, seen, key, token = state
        slot_mask = slot_mask.at[:, length + i - 1].set(1)  # the previous token's slot
        logits, cache = feed(cache, slot_mask, i, token, out)
        out, done, seen, key, token = choose(i, logits, out, done, seen, key)
        return i + 1, cache, slot_mask, out, done, seen, key, token

    state = (jnp.int32(1), cache, slot_mask, out, done, seen, key, token)
    return jax.lax.while_loop(cond, body, state)[3]


def _beam_loop(s, feed, logits, cache, slot_mask, seen, length, eos, pad, key, axis):
    """transformers' `_beam_search`, step for step (its names in comments)."""
    beams, n = s.num_beams, s.max_new_tokens
    batch, vocab = logits.shape[0] // beams, logits.shape[-1]
    k = max(2, 1 + s.num_eos) * beams  # beams_to_keep
    top_beams = jnp.arange(k) < beams  # top_num_beam_mask
    take = lambda x, idx: jnp.take_along_axis(x, idx.reshape(idx.shape + (1,) * (x.ndim - 2)), axis=1)  # noqa: E731

    def select(i, logits, st, key):
        running, run_scores, finished, scores, is_finished, unsatisfied, seen = st
        key, sub = jax.random.split(key)
        log_probs = process(s, jax.nn.log_softmax(logits, axis=-1), seen)
        acc = (log_probs.reshape(batch, beams, vocab) + run_scores[..., None]).reshape(batch, beams * vocab)
        if s.sampling:  # k draws without replacement from softmax(acc): Gumbel top-k
            idx = jax.lax.top_k(acc + jax.random.gumbel(sub, acc.shape), k)[1]
            top = jnp.take_along_axis(acc, idx, 1)
            order = jnp.argsort(-top, axis=1, stable=True)
            top, idx = jnp.take_along_axis(top, order, 1), jnp.take_along_axis(idx, order, 1)
        else:
            top, idx = jax.lax.top_k(acc, k)
        origin, token = idx // vocab, (idx % vocab).astype(jnp.int32)
        candidates = take(running, origin).at[:, :, i].set(token)  # topk_running_sequences [B, K, N]
        hits = jnp.isin(token, eos) | (i + 1 >= n)  # next_token_hits_stopping_criteria
        # _get_running_beams_for_next_iteration
        alive = top + hits * NEG
        nxt = jax.lax.top_k(alive, beams)[1]
        running, run_scores, parent = take(candidates, nxt), take(alive, nxt), take(origin, nxt)
        # _update_finished_beams
        just = hits & top_beams[None]
        final = top / (i + 1.0)  # length_penalty 1.0 over the generated length
        final = final + (~unsatisfied) * NEG + (~just) * NEG
        merged = jnp.concatenate([scores, final], 1)
        best = jax.lax.top_k(merged, beams)[1]
        finished = take(jnp.concatenate([finished, candidates], 1), best)
        scores = take(merged, best)
        is_finished = take(jnp.concatenate([is_finished, just], 1), best)
        # _check_early_stop_heuristic (early_stopping=False: the best running score at this length)
        best_running = run_scores[:, :1] / (i + 1.0)
        worst = jnp.where(is_finished, jnp.min(scores, axis=1, keepdims=True), NEG)
        unsatisfied = unsatisfied & jnp.any(best_running > worst, axis=-1, keepdims=True)
        rows = (parent + jnp.arange(batch)[:, None] * beams).reshape(-1)
        token = running[:, :, i].reshape(-1)
        if seen is not None:
            seen = seen[rows].at[jnp.arange(rows.shape[0]), token].set(True)
        go = jnp.any(unsatisfied) & ~jnp.all(hits)
        return (running, run_scores, finished, scores, is_finished, unsatisfied, seen), rows, token, go, key

    fill = jnp.full((batch, beams, n), pad, jnp.int32)
    run_scores = jnp.zeros((batch, beams)).at[:, 1:].set(NEG)
    st = (fill, run_scores, fill, jnp.full((batch, beams), NEG), jnp.zeros((batch, beams), bool),
          jnp.ones((batch, 1), bool), seen)
    st, rows, token, go, key = select(0, logits, st, key)

    def cond(state):
        i, *_, go, _ = state
        return (i < n) & go

    def body(state):
        i, cache, slot_mask, st, rows, token, _, key = state
        cache = jax.tree.map(lambda x, a: jnp.take(x, rows, axis=a), cache, axis)  # follow the surviving beams
        slot_mask = slot_mask.at[:, length + i - 1].set(1)
        logits, cache = feed(cache, slot_mask, i, token, st[0].reshape(token.shape[0], n))  # each beam's tokens
        st, rows, token, go, key = select(i, logits, st, key)
        return i + 1, cache, slot_mask, st, rows, token, go, key

    state = jax.lax.while_loop(cond, body, (jnp.int32(1), cache, slot_mask, st, rows, token, go, key))
    return state[3][2][:, 0]  # the best finished hypothesis of each prompt


def answer_text(tok, row, eos) -> str:
    """The text of one row of new tokens, up to its first EOS (`eos`: an id, several, or None). A row that
    ran out of new tokens in the middle of a character, with only its first UTF-8 bytes written
    (byte-fallback or byte-level tokens, e.g. most Chinese characters for jaxft-tiny), ends before them
    instead of in U+FFFD (as any bytes at its end that make no character): the decoded text less its
    trailing U+FFFD, or that of the row less up to 3 tokens (a tokenizer that decodes a whole run of byte
    tokens to U+FFFD), whichever keeps more. A row that ends with EOS is decoded as it is."""
    row = [int(t) for t in row]
    stop = {int(e) for e in np.atleast_1d(eos if eos is not None else []) if e is not None}
    end = next((i for i, t in enumerate(row) if t in stop), None)
    if end is not None:
        return tok.decode(row[:end])
    text = tok.decode(row)
    if not text.endswith("\ufffd"):
        return text
    kept = text.rstrip("\ufffd")
    for k in range(1, min(3, len(row)) + 1):  # a character cut short leaves at most 3 of its bytes
        shorter = tok.decode(row[:-k])
        if not shorter.endswith("\ufffd"):
            return max(kept, shorter, key=len)
    return kept


# ---------------------------------------------------------------------------------------------
# Command line.


def load(model_path: str, adapter: str | None = None, **overrides):
    """--model and --adapter -> (model, params, the directory the tokenizer comes from). The adapter is a
    HF PEFT adapter directory, or a jaxft export: that, a full model directory, or one adapter a
    subdirectory when the run composed methods."""
    from jaxft import hf
    from jaxft.peft.hf_peft import load_adapter

    root = hf.resolve(model_path)
    if adapter is None:
        return (*hf.load(model_path, **overrides), root)
    a = Path(adapter)
    if (a / "adapter_config.json").exists():
        return (*hf.load(model_path, adapter=str(a), **overrides), root)
    if (a / "config.json").exists():  # a full fine-tune's export is a model of its own
        return (*hf.load(str(a), **overrides), a if tokenizer_files(a) else root)
    parts = sorted(p for p in a.glob("*/adapter_config.json")) if a.is_dir() else []
    if not parts:
        raise JaxftError(f"--adapter={adapter}: not a HF PEFT adapter or jaxft export directory "
                         "(no adapter_config.json or config.json)")
    model, params = hf.load(model_path, **overrides)
    for part in parts:
        model, params = load_adapter(model, params, part.parent)
    return model, params, root


def tokenizer_files(d: Path) -> bool:
    from jaxft.tokenizer import VOCABULARY_FILES

    return any((d / name).exists() for name in VOCABULARY_FILES)


def parse_args(argv):
    ap = ArgumentParser(prog="python -m jaxft.generate", description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True, help="HF model directory, jaxft-tiny, or a hub name when online")
    ap.add_argument("--adapter", help="HF PEFT adapter directory or jaxft export directory")
    ap.add_argument("--tokenizer", help="tokenizer directory (default: the model's)")
    ap.add_argument("--prompt", help="one prompt")
    ap.add_argument("--prompts", help="a file of prompts, one a line (blank lines skipped)")
    ap.add_argument("--chat", action="store_true",
                    help="each prompt is the user's turn, rendered with the chat template and its generation prompt "
                         "as SFT trains on it; the answer ends where the template ends one")
    ap.add_argument("--chat_template", default="",
                    help="with --chat: a template file, or 'default' (default: the tokenizer's, else jaxft's)")
    ap.add_argument("--chat_template_kwargs", default="",
                    help="with --chat: variables the template reads, as data.chat_template_kwargs "
                         "(e.g. enable_thinking=false)")
    ap.add_argument("--system", help="with --chat: a system turn before each prompt")
    ap.add_argument("--tools", help="with --chat: a JSON file holding the list of tool schemas the template lists "
                                    "(as a record's `tools` in SFT)")
    ap.add_argument("--max_new_tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    ap.add_argument("--top_k", type=int, default=0)
    ap.add_argument("--top_p", type=float, default=1.0)
    ap.add_argument("--num_beams", type=int, default=1)
    ap.add_argument("--repetition_penalty", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    ap.add_argument("--compilation_cache", default="",
                    help="XLA's persistent compilation cache, so that the next call with these shapes loads the "
                         "compiled generation: a directory or URL, or 'none' (default: $JAXFT_CACHE/xla or "
                         "~/.cache/jaxft/xla; a cache given to JAX in JAX_COMPILATION_CACHE_DIR is kept)")
    args = ap.parse_args(argv)
    if (args.prompt is None) == (args.prompts is None):
        ap.error("give exactly one of --prompt=TEXT and --prompts=FILE")
    if not args.chat and (args.system is not None or args.chat_template or args.chat_template_kwargs or args.tools):
        ap.error("--system, --chat_template, --chat_template_kwargs and --tools are for --chat")
    return args


def read_prompts(args) -> list[str]:
    if args.prompt is not None:
        return [args.prompt]
    try:
        # utf-8-sig: a byte order mark (Windows Notepad's UTF-8) is not part of the first prompt, as in data files
        lines = Path(args.prompts).read_text(encoding="utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise JaxftError(f"--prompts={args.prompts}: cannot be read ({getattr(e, 'strerror', None) or e})") from None
    prompts = [line for line in lines if line.strip()]
    if not prompts:
        raise JaxftError(f"--prompts={args.prompts}: no prompt in the file (expected one a line)")
    return prompts


def main(argv=None):
    """Prints one completion per prompt, one a line (a newline inside a completion is written \\n)."""
    from jaxft import storage
    from jaxft.compilation_cache import cache_dir, compilation_cache

    printable_stdout()
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        check(Settings(args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.num_beams,
                       args.repetition_penalty))
        if args.temperature == 0 and (args.top_k or args.top_p != 1):  # else ignored, as transformers does
            raise JaxftError(f"--top_k={args.top_k}, --top_p={args.top_p} shape sampling, and --temperature=0 "
                             "decodes greedily: expected --temperature > 0 with them")
        prompts = read_prompts(args)
        xla = cache_dir(args.compilation_cache, storage.user_cache() / "xla", "--compilation_cache")
        model, params, root = load(args.model, args.adapter, dtype=args.dtype)
        tok_dir = Path(args.tokenizer) if args.tokenizer else root
        if not args.tokenizer and not tokenizer_files(tok_dir):
            raise JaxftError(f"{tok_dir}: no tokenizer.model, spiece.model, vocab.txt or tokenizer.json "
                             "(pass --tokenizer=DIR)")
        from jaxft.data.sft import generation_eos
        from jaxft.tokenizer import Tokenizer

        tok = Tokenizer(tok_dir)
        rows, eos = chat_rows(tok, prompts, args) if args.chat else ([tok.bos + tok.encode(p) for p in prompts], list(
            dict.fromkeys([tok.eos_id if tok.eos_id is not None else model.cfg.eos_token_id, *generation_eos(root)])))
        top = max(max(r) for r in rows)
        if top >= model.cfg.vocab_size:
            raise JaxftError(f"{tok_dir}: the tokenizer gives id {top}, beyond the model's vocab_size "
                             f"{model.cfg.vocab_size} (a tokenizer of another model?)")
        width = max(map(len, rows))
        ids = np.array([[tok.pad_id] * (width - len(r)) + r for r in rows])
        mask = np.array([[0] * (width - len(r)) + [1] * len(r) for r in rows])
        with compilation_cache(xla):
            out = generate(model, params, ids, mask, max_new_tokens=args.max_new_tokens,
                           temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, num_beams=args.num_beams,
                           repetition_penalty=args.repetition_penalty, eos_token_id=eos, pad_token_id=tok.pad_id,
                           seed=args.seed)
    except JaxftError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    for row in out:
        print(answer_text(tok, row, eos).replace("\n", "\\n"), flush=True)


def chat_rows(tok, prompts: list[str], args) -> tuple[list[list[int]], list[int]]:
    """--chat: (each prompt as a user turn after --system, rendered with the generation prompt and tokenized
    as SFT tokenizes it; the ids an answer ends at: `jaxft.data.sft.stop_ids`)."""
    from jaxft.data import sft

    renderer = sft.renderer(tok, args.chat_template, args.chat_template_kwargs)
    system = [{"role": "system", "content": args.system}] if args.system else []
    tools = None
    if args.tools:
        where = f"--tools={args.tools}"
        try:
            tools = sft.record_tools({"tools": Path(args.tools).read_text(encoding="utf-8-sig")}, where)
        except OSError as e:
            raise JaxftError(f"{where}: cannot be read ({e.strerror or e})") from None
        if tools is None:
            raise JaxftError(f"{where}: no tool in the file (expected a JSON list of tool schemas)")
    rows = []
    for p in prompts:
        turns = system + [{"role": "user", "content": p}]
        renderer.check_tools(turns, tools)  # a template without tool support would leave them out
        rows.append(sft.encode([(renderer(turns, add_generation_prompt=True, tools=tools), False)], tok)[0])
    return rows, sft.stop_ids(tok, args.chat_template, args.chat_template_kwargs)


if __name__ == "__main__":
    main()
