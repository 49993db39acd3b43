"""The fused LM-head cross-entropy against PyTorch: values, gradients, and the train step's loss."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from transformers import LlamaConfig as HFLlamaConfig
from transformers import LlamaForCausalLM

from jaxft import cross_entropy, hf
from jaxft.models.llama import LlamaModel
from jaxft.peft import build
from jaxft.peft.partition import split
from jaxft.step import TrainState, make_eval_step, make_train_step
from test_peft import method_cfg

B, T, D, V = 3, 37, 16, 50


@pytest.fixture
def small_chunks(monkeypatch):
    # 37 positions in chunks of 8: several chunks and a padded last one.
    monkeypatch.setattr(cross_entropy, "MIN_CHUNK_LENGTH", 8)
    monkeypatch.setattr(cross_entropy, "CHUNK_TOKENS", 8)


def inputs(seed=0):
    rng = np.random.RandomState(seed)
    h = rng.randn(B, T, D).astype(np.float32)
    e = rng.randn(V, D).astype(np.float32) * 0.5
    y = rng.randint(0, V, (B, T)).astype(np.int32)
    w = (rng.rand(B, T) > 0.3).astype(np.float32) * rng.choice([1.0, 2.0], (B, T)).astype(np.float32)
    return h, e, y, w


def torch_oracle(h, e, y, w, cap=None):
    th, te = torch.tensor(h, requires_grad=True), torch.tensor(e, requires_grad=True)
    logits = th @ te.T
    if cap:  # Gemma 2's final_logit_softcapping, as transformers applies it
        logits = torch.tanh(logits / cap) * cap
    nll = torch.nn.functional.cross_entropy(logits.reshape(-1, V), torch.tensor(y).reshape(-1).long(), reduction="none")
    loss = (nll * torch.tensor(w).reshape(-1)).sum()
    loss.backward()
    correct = ((logits.argmax(-1) == torch.tensor(y).long()).float() * torch.tensor(w)).sum()
    return loss.item(), correct.item(), th.grad.numpy(), te.grad.numpy()


@pytest.mark.parametrize("cap", [None, 2.0])
def test_values_and_gradients_match_torch(small_chunks, cap):
    """Also with capped logits (cap 2: most of these logits are past it), the cap's derivative folded in."""
    h, e, y, w = inputs()
    loss, correct, dh, de = torch_oracle(h, e, y, w, cap)
    if cap:
        assert abs(loss - torch_oracle(h, e, y, w)[0]) > 0.1 * loss

    def f(h, e):
        sums = cross_entropy.fused_cross_entropy(h, e, y, w, cap=cap)
        return sums["loss_sum"], sums

    (gh, ge), sums = jax.jit(jax.grad(f, argnums=(0, 1), has_aux=True))(h, e)
    np.testing.assert_allclose(sums["loss_sum"], loss, rtol=1e-5)
    assert sums["correct"] == correct and sums["count"] == w.sum()
    np.testing.assert_allclose(gh, dh, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(ge, de, rtol=1e-4, atol=1e-6)


def test_token_log_probs_cap_then_temperature(small_chunks):
    """GRPO's per-token log-probabilities of a capped model (Gemma 2): the temperature divides the capped
    logits, as transformers' sampling does."""
    h, e, y, _ = inputs()
    got = cross_entropy.token_log_probs(h, e, y, cap=2.0, temperature=0.7)
    logits = torch.tanh(torch.tensor(h) @ torch.tensor(e).T / 2.0) * 2.0 / 0.7
    ref = torch.log_softmax(logits, -1).gather(-1, torch.tensor(y).long()[..., None])[..., 0]
    np.testing.assert_allclose(got, ref.numpy(), rtol=1e-5, atol=1e-5)


def test_accuracy_is_the_argmax_on_equal_logits(small_chunks):
    """Equal highest logits (a repeated output row; two logits rounded to one bf16 value): `token_stats`
    (classification, cloze) takes the first as the prediction, as torch's and numpy's argmax do, not
    every one of them; the fused LM loss's token accuracy counts ties (documented: no argmax pass)."""
    h, e, _, w = inputs(1)
    e[7] = e[3] = e[11] * 1.5  # rows 3 and 7 tie; 1.5x row 11 wins wherever h . e[11] > 0
    logits = h @ e.T
    top = logits.argmax(-1)
    assert set(top.ravel()) >= {3}  # ties exist
    y = np.where(top == 3, np.where(np.arange(T) % 2 == 0, 3, 7), top).astype(np.int32)  # half the tied targets are 7
    _, correct, _, _ = torch_oracle(h, e, y, w)
    fused = jax.jit(cross_entropy.fused_cross_entropy)(h, e, y, w)
    plain = cross_entropy.token_stats(jnp.asarray(logits), y, w)
    tied = float(((logits.max(-1) == np.take_along_axis(logits, y[..., None], -1)[..., 0]) * w).sum())
    assert plain["correct"] == correct == float(((top == y) * w).sum()) < tied
    assert fused["correct"] == tied


def test_frozen_embedding_costs_no_embedding_gradient(small_chunks):
    h, e, y, w = inputs(1)
    _, _, dh, _ = torch_oracle(h, e, y, w)

    def loss_h(h):
        return cross_entropy.fused_cross_entropy(h, e, y, w)["loss_sum"]

    np.testing.assert_allclose(jax.jit(jax.grad(loss_h))(h), dh, rtol=1e-4, atol=1e-6)
    # One [V, D]-shaped product fewer per chunk: logits and d_hidden only.
    hlo = jax.jit(jax.grad(loss_h)).lower(h).as_text()
    both = jax.jit(jax.grad(lambda h, e: cross_entropy.fused_cross_entropy(h, e, y, w)["loss_sum"], (0, 1)))
    assert hlo.count("dot_general") == 2 and both.lower(h, e).as_text().count("dot_general") == 3


def test_bfloat16_matches_unfused_projection(small_chunks):
    h, e, y, w = inputs(2)
    hb = jnp.asarray(h, jnp.bfloat16)
    ref = cross_entropy.token_stats(jnp.dot(hb, jnp.asarray(e, jnp.bfloat16).T).astype(jnp.float32), y, w)
    got = cross_entropy.fused_cross_entropy(hb, e, y, w, jnp.bfloat16)
    np.testing.assert_allclose(got["loss_sum"], ref["loss_sum"], rtol=2e-3)  # bf16 logits: 8-bit mantissa
    grad = jax.grad(lambda h: cross_entropy.fused_cross_entropy(h, e, y, w, jnp.bfloat16)["loss_sum"])(hb)
    assert grad.dtype == jnp.bfloat16


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    torch.manual_seed(0)
    out = {}
    for tied in (True, False):
        cfg = HFLlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, pad_token_id=0, tie_word_embeddings=tied)
        m = LlamaForCausalLM(cfg).eval()
        d = tmp_path_factory.mktemp(f"tied{tied}")
        m.save_pretrained(d)
        out[tied] = (m, d)
    return out


@pytest.mark.parametrize("tied", [True, False])
def test_return_hidden_gives_what_logits_are_made_of(tiny_dirs, tied):
    model, params = hf.load(tiny_dirs[tied][1])
    ids = np.random.RandomState(0).randint(1, V, (2, 7))
    logits = model.apply({"params": params}, ids)
    h, emb = model.apply({"params": params}, ids, return_hidden=True)
    np.testing.assert_allclose(jnp.einsum("btd,vd->btv", h, emb), logits, rtol=1e-5, atol=1e-6)
    # Gemma 2's capped logits: the cap comes with the states, and the loss of both forms agrees
    capped = model.clone(cfg=model.cfg.replace(final_softcap=0.5))
    h, emb, cap = capped.apply({"params": params}, ids, return_hidden=True)
    assert cap == 0.5
    logits = capped.apply({"params": params}, ids)
    np.testing.assert_allclose(cross_entropy.softcap(jnp.einsum("btd,vd->btv", h, emb), cap), logits, rtol=1e-5,
                               atol=1e-6)
    y, w = jnp.asarray(ids), jnp.ones(ids.shape)
    np.testing.assert_allclose(cross_entropy.fused_cross_entropy(h, emb, y, w, cap=cap)["loss_sum"],
                               cross_entropy.token_stats(logits, y, w)["loss_sum"], rtol=1e-5)


def test_hooked_lm_head_returns_logits(tiny_dirs):
    model, params = hf.load(tiny_dirs[False][1])
    m = build(method_cfg(name="lora", targets="lm_head,q_proj"), model.cfg)
    hooked = LlamaModel(model.cfg, hooks=m.hooks)
    ids = np.random.RandomState(0).randint(1, V, (2, 7))
    p = nn.unbox(hooked.init(jax.random.PRNGKey(0), ids)["params"])
    p = jax.tree_util.tree_map(lambda x: x + 0.1, p)  # LoRA B != 0, so the hook changes the logits
    out = hooked.apply({"params": p}, ids, return_hidden=True)
    assert not isinstance(out, tuple)
    np.testing.assert_array_equal(out, hooked.apply({"params": p}, ids))


@pytest.mark.parametrize("tied", [True, False])
def test_step_loss_and_update_match_transformers(tiny_dirs, tied):
    torch_model, d = tiny_dirs[tied]
    model, params = hf.load(d)
    ids = np.random.RandomState(1).randint(1, V, (3, 11)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, 8:] = 0
    batch = {"input_ids": ids, "attention_mask": mask, "weight": np.ones(3, np.float32)}
    labels = torch.tensor(np.where(mask == 1, ids, -100)).long()
    out = torch_model(input_ids=torch.tensor(ids).long(), attention_mask=torch.tensor(mask), labels=labels)
    out.loss.backward()

    m = build(method_cfg(name="full"), model.cfg)
    trainable, frozen = split(params, m.trainable)
    sums = jax.jit(make_eval_step(model))(trainable, frozen, batch)
    np.testing.assert_allclose(sums["loss_sum"] / sums["count"], out.loss.item(), rtol=1e-5)

    # One SGD step with lr 1: the embedding moves by minus its gradient (lookup and output projection).
    tx, schedule = optax.sgd(1.0), optax.constant_schedule(1.0)
    state = TrainState(step=jnp.zeros((), jnp.int32), params=trainable, opt_state=tx.init(trainable),
                       rng=jax.random.PRNGKey(0))
    new, _ = jax.jit(make_train_step(model, tx, schedule, grad_accum=1))(state, frozen, batch)
    grad = np.asarray(trainable["embed_tokens"] - new.params["embed_tokens"])
    np.testing.assert_allclose(grad, torch_model.model.embed_tokens.weight.grad.numpy(), rtol=1e-4, atol=1e-6)
    if not tied:
        grad = np.asarray(trainable["lm_head"]["kernel"] - new.params["lm_head"]["kernel"])
        np.testing.assert_allclose(grad, torch_model.lm_head.weight.grad.numpy().T, rtol=1e-4, atol=1e-6)
