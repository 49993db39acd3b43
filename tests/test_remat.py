"""Remat policies (`model.remat`) change what the backward pass keeps, never what it computes."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from jaxft.config import base_config, validate
from jaxft.errors import JaxftError
from jaxft.models.llama import REMAT, LlamaConfig, LlamaModel
from jaxft.peft import build
from jaxft.step import causal_lm_loss

TINY = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=3, num_heads=4, num_kv_heads=2)


@functools.lru_cache
def loss_and_grads(cfg, method_name="lora+ptuning_v2"):
    """Loss and gradients of every parameter (base, LoRA and prefixes) of one causal-LM batch."""
    m = ml_collections.ConfigDict(base_config().method.to_dict())
    m.name, m.num_virtual_tokens, m.targets = method_name, 3, "q_proj,v_proj,down_proj"
    method = build(m, cfg)
    model = LlamaModel(cfg, hooks=method.hooks)
    ids = jax.random.randint(jax.random.PRNGKey(1), (2, 10), 0, cfg.vocab_size)
    mask = jnp.ones_like(ids).at[1, 7:].set(0)
    params = nn.unbox(model.init(jax.random.PRNGKey(0), ids)["params"])
    # LoRA's B starts at zero, which would hide its A gradient: start from a random B.
    params = jax.tree_util.tree_map_with_path(
        lambda p, x: x + 0.1 if str(p[-1].key) == "lora_b" else x, params
    )
    batch = {"input_ids": ids, "attention_mask": mask, "weight": jnp.ones(2)}

    def loss(params):
        sums = causal_lm_loss(model.apply({"params": params}, ids, mask, return_hidden=True), batch)
        return sums["loss_sum"] / sums["count"]

    return jax.jit(jax.value_and_grad(loss))(params)


# Every policy stays in the default run, each scan setting too: full and save_dots over scanned layers (the
# default), offload over unrolled ones.
# slow: [full-False] and [save_dots-False] (unrolled layers' remat in [offload-False], each policy in its
# scanned cell), [offload-True] (offload in [offload-False], scanned remat in [full-True]/[save_dots-True]).
POLICY_CASES = [(policy, scan) for policy in REMAT if policy != "none" for scan in (True, False)]
SLOW_POLICY_CASES = {("full", False), ("save_dots", False), ("offload", True)}


@pytest.mark.parametrize("policy,scan", [
    pytest.param(*c, id=f"{c[0]}-{c[1]}", marks=[pytest.mark.slow] if c in SLOW_POLICY_CASES else [])
    for c in POLICY_CASES])
def test_every_policy_gives_the_same_loss_and_gradients(scan, policy):
    ref_loss, ref_grads = loss_and_grads(TINY.replace(scan_layers=scan))
    loss, grads = loss_and_grads(TINY.replace(scan_layers=scan, remat=policy))
    assert float(loss) == pytest.approx(float(ref_loss), rel=1e-6)
    flat_ref, flat = jax.tree_util.tree_leaves_with_path(ref_grads), jax.tree_util.tree_leaves(grads)
    assert len(flat_ref) == len(flat) and len(flat) >= 19
    for (path, want), got in zip(flat_ref, flat):
        assert float(jnp.abs(want).max()) > 0, path  # every leaf is actually differentiated
        np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-7, err_msg=jax.tree_util.keystr(path))


@functools.lru_cache  # save_dots' step is compiled once for the two tests below
def temp_bytes(remat: str, scan: bool) -> int:
    """XLA's own count of the scratch memory of a full fine-tuning step's forward and backward pass."""
    cfg = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=512, num_layers=4, num_heads=4,
                      num_kv_heads=4, scan_layers=scan, remat=remat)
    model = LlamaModel(cfg)
    ids = jnp.zeros((4, 256), jnp.int32)
    params = jax.eval_shape(lambda: nn.unbox(model.init(jax.random.PRNGKey(0), ids[:, :2])["params"]))
    batch = {"input_ids": ids, "attention_mask": jnp.ones_like(ids), "weight": jnp.ones(4)}

    def loss(params):
        return causal_lm_loss(model.apply({"params": params}, ids, batch["attention_mask"], return_hidden=True),
                              batch)["loss_sum"]

    compiled = jax.jit(jax.grad(loss)).lower(params).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def test_policies_order_the_compiled_memory():
    # Scanned layers (the default). Unrolled, XLA's CPU scheduler runs each layer's recomputation
    # early and keeps it, so none, save_dots and full all need ~114 MB there: no ordering to test.
    got = {p: temp_bytes(p, True) for p in ("none", "save_dots", "full")}
    assert got["none"] > 1.15 * got["save_dots"] and got["save_dots"] > 1.15 * got["full"], got


def test_offload_on_cpu_keeps_what_save_dots_keeps():
    # CPU device memory is host memory: the backend accepts pinned_host, and the step needs what
    # save_dots needs (documented in `remat_policy`).
    assert temp_bytes("offload", True) == temp_bytes("save_dots", True)


def test_old_boolean_setting_still_means_full_or_none():
    assert LlamaConfig(remat=True).remat == "full" and LlamaConfig(remat=False).remat == "none"
    c = base_config()
    c.model.remat = True  # what config files wrote before remat became a policy name
    validate(c)
    c.model.remat = "save_dots"
    validate(c)
    c.model.remat = "all"
    with pytest.raises(JaxftError, match="model.remat='all': expected one of"):
        validate(c)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_norms_and_activations_are_recomputed_not_kept(family, capsys):
    """Under remat none, what a bf16 layer with fp32 kernels keeps for the backward pass (jax's own list of
    residuals): the products of its matmuls and attention (the MLP's gate and up; GPT-2: c_fc's output),
    never a norm's or an activation's output nor a kernel's bf16 cast, which the backward pass recomputes
    (`jaxft.models.layers.keep_products`). Fails if any of them goes back to plain autodiff."""
    from jaxft.models import family as families

    b, t = 2, 16
    if family == "llama":
        cfg, width, hidden = TINY.replace(dtype="bfloat16", num_layers=1, scan_layers=False), 48, 32
        mlp_keeps = 2  # gate, up (not SiLU(gate) * up, the down projection's input)
    else:
        from jaxft.models.gpt2 import GPT2Config

        cfg = GPT2Config(vocab_size=64, hidden_size=32, intermediate_size=128, num_layers=1, num_heads=4,
                         max_position_embeddings=32, dtype="bfloat16")
        width, hidden, mlp_keeps = 128, 32, 1  # c_fc's output (not GELU's, c_proj's input)
    model = families.build(cfg, ())
    ids = jnp.ones((b, t), jnp.int32)
    params = nn.unbox(model.init(jax.random.PRNGKey(0), ids)["params"])
    jax.ad_checkpoint.print_saved_residuals(lambda p: model.apply({"params": p}, ids).astype(jnp.float32).sum(), params)
    kept = [line.split(" ")[0] for line in capsys.readouterr().out.splitlines() if "from the argument" not in line]
    dims = lambda k: tuple(int(n) for n in k[k.index("[") + 1 : -1].split(",") if n)  # noqa: E731  (leading: layers)
    assert sum(dims(k)[-3:] == (b, t, width) for k in kept) == mlp_keeps, kept
    assert not any(k.startswith("f32[") and dims(k)[-3:] == (b, t, hidden) for k in kept), kept
    # The layer's input and output, attention's output and its output projection's; outside the layer the
    # final norm's output (the LM head's input). Neither norm inside the layer keeps its output.
    assert sum(k.startswith("bf16[") and dims(k)[-3:] == (b, t, hidden) for k in kept) == 5, kept
    # Kernels: only the LM head's cast [hidden, vocab], outside the layers; the layer's are recomputed.
    assert all(cfg.vocab_size in dims(k) for k in kept if k.startswith("bf16[") and len(dims(k)) == 2), kept


def test_a_fused_attention_kernel_is_kept_not_run_again():
    """remat none keeps what a fused attention kernel computed (its output and row statistics) like a
    matmul's product: the backward pass runs the kernel's backward, not its forward a second time. The
    Pallas splash kernel, traced here (it runs on a TPU); cuDNN's primitives are named in the same list."""
    from jax._src.cudnn import fused_attention_stablehlo as cudnn_attention

    from jaxft.models import attention
    from jaxft.models.layers import KERNELS, keep_products

    assert {cudnn_attention._dot_product_attention_fwd_p.name,
            cudnn_attention._dot_product_attention_fwd_p_wrapper.name} <= set(KERNELS)
    q = jnp.ones((1, 256, 2, 128), jnp.bfloat16)
    k = v = jnp.ones((1, 256, 1, 128), jnp.bfloat16)
    mask = jnp.ones((1, 256), bool)
    loss = lambda q, k, v: attention.splash(q, k, v, mask).astype(jnp.float32).sum()  # noqa: E731
    kernels = lambda f: str(jax.make_jaxpr(jax.grad(f, argnums=(0, 1, 2)))(q, k, v)).count("pallas_call")  # noqa: E731
    plain = kernels(loss)
    assert kernels(jax.checkpoint(loss, policy=keep_products)) == plain
    assert kernels(jax.checkpoint(loss, policy=jax.checkpoint_policies.dots_saveable)) > plain  # what it avoids
