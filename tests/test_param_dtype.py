"""A bf16 frozen base (`model.param_dtype`) and bf16 Adam moments (`optimizer.mu_dtype`)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxft import hf, sharding
from jaxft.config import base_config
from jaxft.models.llama import LlamaModel
from jaxft.peft import build
from jaxft.peft.partition import flat, merge, split
from jaxft.step import TrainState, make_optimizer, make_train_step
from jaxft.train import init_params


def setup(method_name: str, param_dtype: str, head: str = "causal_lm"):
    config = base_config()
    config.method.name = method_name
    cfg = hf.read_config(hf.resolve("jaxft-tiny")).replace(param_dtype=param_dtype, head=head)
    method = build(config.method, cfg)
    model = LlamaModel(cfg, hooks=method.hooks)
    mesh = sharding.make_mesh(config.mesh)
    params = init_params(model, hf.resolve("jaxft-tiny"), mesh, 0, method.trainable)
    return config, model, mesh, *split(params, method.trainable)


def batch(mesh, vocab):
    ids = np.asarray(jax.random.randint(jax.random.PRNGKey(3), (8, 24), 3, vocab), np.int32)
    local = {"input_ids": ids, "attention_mask": np.ones_like(ids), "weight": np.ones(8, np.float32)}
    return sharding.to_global(mesh, local, 8)


def test_lora_on_a_bf16_base_keeps_fp32_trainables_and_trains():
    config, model, mesh, trainable, frozen = setup("lora", "bfloat16")
    assert {str(x.dtype) for x in flat(frozen).values()} == {"bfloat16"}
    assert {str(x.dtype) for x in flat(trainable).values()} == {"float32"}
    assert "embed_tokens" in flat(frozen)  # tied: the fused loss reads a bf16 output embedding too

    data = batch(mesh, model.cfg.vocab_size)
    _, model32, _, trainable32, frozen32 = setup("lora", "float32")
    for a, b in zip(jax.tree_util.tree_leaves(trainable), jax.tree_util.tree_leaves(trainable32)):
        np.testing.assert_array_equal(a, b)  # same initialisation: only the base's storage differs
    logits = np.asarray(model.apply({"params": merge(trainable, frozen)}, data["input_ids"]))
    logits32 = np.asarray(model32.apply({"params": merge(trainable32, frozen32)}, data["input_ids"]))
    err = np.abs(logits - logits32)
    assert err.max() < 0.05 * np.abs(logits32).max() and err.mean() < 0.01 * np.abs(logits32).mean(), err.max()
    assert np.mean(logits.argmax(-1) == logits32.argmax(-1)) > 0.95

    config.optimizer.learning_rate = 1e-2
    tx, schedule = make_optimizer(config.optimizer, 10)
    state = TrainState(step=jnp.zeros((), jnp.int32), params=trainable, opt_state=tx.init(trainable),
                       rng=jax.random.PRNGKey(0))
    step = jax.jit(make_train_step(model, tx, schedule, 1))
    losses = []
    for _ in range(6):
        state, metrics = step(state, frozen, data)
        losses.append(float(metrics["loss"]))
    assert losses[-1] < losses[0] - 0.1, losses
    assert {str(x.dtype) for x in jax.tree_util.tree_leaves(state.params)} == {"float32"}


def test_full_fine_tuning_ignores_param_dtype_and_head_export_upcasts_the_bf16_base(tmp_path):
    _, _, _, trainable, frozen = setup("full", "bfloat16")
    assert not frozen and {str(x.dtype) for x in flat(trainable).values()} == {"float32"}

    # A new classifier head on a bf16 base exports a whole HF directory (no adapter weights).
    _, model, _, trainable, frozen = setup("head", "bfloat16", "classification")
    assert list(flat(trainable)) == ["score/kernel"]
    params = jax.device_get(merge(trainable, frozen))
    hf.save(model, params, str(tmp_path))
    _, back = hf.load(str(tmp_path))
    for path, value in flat(params).items():
        assert flat(back)[path].dtype == np.float32
        np.testing.assert_array_equal(flat(back)[path], np.asarray(value, np.float32))  # bf16 -> fp32 is exact


@pytest.mark.parametrize("mu_dtype,want", [("", "float32"), ("bfloat16", "bfloat16")])
def test_mu_dtype_sets_the_first_moment(mu_dtype, want):
    config = base_config()
    config.optimizer.mu_dtype = mu_dtype
    tx, _ = make_optimizer(config.optimizer, 10)
    params = {"a": jnp.ones((4, 3)), "b": {"norm": jnp.ones(3)}}
    state = tx.init(params)
    adam = [s for s in jax.tree_util.tree_leaves(state, is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState))
            if isinstance(s, optax.ScaleByAdamState)]
    assert len(adam) == 1
    assert {str(x.dtype) for x in jax.tree_util.tree_leaves(adam[0].mu)} == {want}
    assert {str(x.dtype) for x in jax.tree_util.tree_leaves(adam[0].nu)} == {"float32"}
    updates, _ = tx.update(params, state, params)
    assert all(np.isfinite(x).all() for x in jax.tree_util.tree_leaves(updates))
