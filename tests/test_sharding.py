"""Same losses whatever the layout: 1 vs 8 devices (data, FSDP, tensor parallel), 1 vs 2 processes; the
optimizer state's layout, gradient accumulation, and meshes over one or several TPU slices."""

import dataclasses
import itertools
import os
import socket
import subprocess

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.experimental import mesh_utils

from test_train import ROOT, TINY, cli, losses

RUN = ("--config.method.name=full", "--config.train.steps=4", "--config.train.log_every_steps=1",
       "--config.train.batch_size=8")


@pytest.fixture(scope="module")
def single_device(tmp_path_factory):
    wd = tmp_path_factory.mktemp("one")
    r = cli(wd, *RUN, "--config.mesh.data=1")
    assert r.returncode == 0, r.stderr
    return losses(wd)


# slow: (2, 2, 2); 8 devices on a 2 x 2 x 2 mesh end with one device's losses in
# test_mean_pooling_classifier_eight_devices_match_one, and every other axis size is in a default mesh here.
@pytest.mark.parametrize("mesh", [(8, 1, 1), pytest.param((2, 2, 2), marks=pytest.mark.slow), (1, 4, 2), (1, 2, 4)])
def test_eight_devices_match_one(single_device, tmp_path, mesh):
    d, f, t = mesh
    r = cli(tmp_path, *RUN, f"--config.mesh.data={d}", f"--config.mesh.fsdp={f}", f"--config.mesh.tensor={t}",
            devices=8)
    assert r.returncode == 0, r.stderr
    assert f"mesh {{'data': {d}, 'fsdp': {f}, 'tensor': {t}}} over 8 devices" in r.stdout
    got = losses(tmp_path)
    assert got.keys() == single_device.keys() == {1, 2, 3, 4}
    np.testing.assert_allclose([got[s] for s in got], [single_device[s] for s in single_device], rtol=2e-5)


def test_mean_pooling_classifier_eight_devices_match_one(tmp_path):
    """Deep prompts and a mean-pooling head: the pooled sum runs over a batch split across devices."""
    run = (*RUN[1:], "--config.method.name=ptuning_v2", "--config.data.synthetic_labels=2",
           "--config.model.pooling=mean")
    one, eight = tmp_path / "one", tmp_path / "eight"
    r = cli(one, *run, "--config.mesh.data=1")
    assert r.returncode == 0, r.stderr
    assert "head=classification (mean pooling) | float32, attention xla" in r.stdout and "| method: ptuning_v2 |" in r.stdout
    r = cli(eight, *run, "--config.mesh.data=2", "--config.mesh.fsdp=2", "--config.mesh.tensor=2", devices=8)
    assert r.returncode == 0, r.stderr
    ref, got = losses(one), losses(eight)
    assert got.keys() == ref.keys() == {1, 2, 3, 4}
    np.testing.assert_allclose([got[s] for s in got], [ref[s] for s in ref], rtol=2e-5)


def tiny_moe(root):
    """A tiny random Qwen3-MoE saved by transformers: 4 experts, 2 per token."""
    transformers = pytest.importorskip("transformers")
    import torch

    torch.manual_seed(0)
    config = transformers.Qwen3MoeConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_experts=4,
                                         num_experts_per_tok=2, moe_intermediate_size=16, norm_topk_prob=True)
    transformers.Qwen3MoeForCausalLM(config).save_pretrained(root)
    return root


# slow: full repeats qlora's sharded experts' module and grouped matmuls, with their gradients as well
# (test_collectives.test_expert_parallel_gradients_match_one_device checks those without the CLI).
@pytest.mark.parametrize("method, mesh", [pytest.param("full", (1, 2, 1, 4), marks=pytest.mark.slow),
                                          ("qlora", (1, 2, 2, 2))])
def test_experts_sharded_match_one_device(tmp_path, method, mesh):
    """A Qwen3-MoE (stacked experts, grouped matmuls over tokens sorted by expert) over FSDP x 4 tensor shards,
    or FSDP x 2 expert x 2 tensor shards: the same losses as one device, training every expert (full) or LoRA
    over NF4 experts (qlora)."""
    run = (*RUN, f"--config.model.path={tiny_moe(tmp_path / 'moe')}")
    if method == "qlora":
        run += ("--config.method.name=lora", "--config.model.quantization=nf4")
    one, eight = tmp_path / "one", tmp_path / "eight"
    r = cli(one, *run, "--config.mesh.data=1")
    assert r.returncode == 0, r.stderr
    assert "model: qwen3_moe 2x32" in r.stdout
    r = cli(eight, *run, *(f"--config.mesh.{a}={n}" for a, n in zip(("data", "fsdp", "expert", "tensor"), mesh)),
            devices=8)
    assert r.returncode == 0, r.stderr
    ref, got = losses(one), losses(eight)
    assert got.keys() == ref.keys() == {1, 2, 3, 4}
    np.testing.assert_allclose([got[s] for s in got], [ref[s] for s in ref], rtol=2e-5)


def test_router_balance_loss_setting(tmp_path):
    """`model.router_aux_loss_coef` turns on a mixture's load-balancing loss without editing config.json: near
    balance it is about experts-per-token (2) times the weight; asked of a dense model, it is one line, as is
    an expert axis that does not divide the experts."""
    run = (*RUN, f"--config.model.path={tiny_moe(tmp_path / 'moe')}", "--config.train.steps=1")
    plain, balanced = tmp_path / "plain", tmp_path / "balanced"
    assert cli(plain, *run).returncode == 0
    r = cli(balanced, *run, "--config.model.router_aux_loss_coef=0.5")
    assert r.returncode == 0, r.stderr
    assert 0.5 * 1.5 < losses(balanced)[1] - losses(plain)[1] < 0.5 * 4
    r = cli(tmp_path / "eight", *run, "--config.mesh.expert=8", devices=8)  # 4 experts
    assert r.returncode != 0 and "mesh.expert=8 does not divide this qwen3_moe model's 4 experts" in r.stderr
    assert not (tmp_path / "eight" / "checkpoints").exists()
    r = cli(tmp_path / "dense", *RUN, "--config.model.router_aux_loss_coef=0.5")
    assert r.returncode != 0 and "model.router_aux_loss_coef=0.5: this llama model has no experts" in r.stderr
    assert not (tmp_path / "dense" / "checkpoints").exists()


@pytest.mark.parametrize("model_type", ["glm4", "phi3", "gemma2"])
def test_tensor_parallel_matches_one_device(tmp_path, model_type):
    """GLM-4-0414 (`model.init.model_type=glm4`: rotary over adjacent pairs, output norms) with its fused
    gate_up_proj split over 4 tensor shards, each holding its blocks of gate and up units; Phi-3 with its
    fused qkv_proj too, one kv head's queries, key and value on each shard; Gemma 2 (its layers' kinds a
    `lax.cond` in the layer scan, capped scores and logits): the same losses as one device."""
    run = (*RUN, f"--config.model.init.model_type={model_type}",
           *(("--config.model.init.num_key_value_heads=4",) if model_type == "phi3" else ()))
    one, eight = tmp_path / "one", tmp_path / "eight"
    r = cli(one, *run, "--config.mesh.data=1")
    assert r.returncode == 0, r.stderr
    assert f"model: {model_type} 2x32" in r.stdout
    r = cli(eight, *run, "--config.mesh.fsdp=2", "--config.mesh.tensor=4", devices=8)
    assert r.returncode == 0, r.stderr
    ref, got = losses(one), losses(eight)
    assert got.keys() == ref.keys() == {1, 2, 3, 4}
    np.testing.assert_allclose([got[s] for s in got], [ref[s] for s in ref], rtol=2e-5)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("method", [(), ("--config.method.name=lora", "--config.model.quantization=nf4")],
                         ids=["full", "qlora"])
def test_two_processes_match_one(single_device, tmp_path, method):
    """Two processes of 2 devices end with one process's losses. Full fine-tuning starts them with
    launch/local_multiprocess.sh (a log per process) and compares with the module's one-device run (the same
    RUN); QLoRA passes the process flags itself, the NF4 base's packed leaves are sharded over FSDP across the
    two processes, and its reference is one 4-device process."""
    run = (*RUN, *method, "--config.mesh.data=2", "--config.mesh.fsdp=2")
    if method:
        ref = tmp_path / "one"
        r = cli(ref, *run, devices=4)
        assert r.returncode == 0, r.stderr

    wd, port = tmp_path / "two", free_port()
    if not method:
        r = subprocess.run(["launch/local_multiprocess.sh", "2", "2", TINY, str(wd), *run], cwd=ROOT,
                           env={**os.environ, "PORT": str(port)}, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
        outs = [r.stdout, (wd / "logs" / "process_1.log").read_text()]
    else:
        procs = [
            cli(wd, *run, f"--coordinator_address=localhost:{port}", "--num_processes=2", f"--process_id={i}",
                devices=2, wait=False)
            for i in range(2)
        ]
        outs = [p.communicate(timeout=300) for p in procs]
        for p, (out, err) in zip(procs, outs):
            assert p.returncode == 0, err.decode()[-3000:]
        outs = [out.decode() for out, _ in outs]
    assert "over 4 devices, 2 process(es)" in outs[0]
    assert "done:" in outs[0] and outs[1].count("done:") == 0  # only process 0 reports
    one, two = (losses(ref) if method else single_device), losses(wd)
    assert one.keys() == two.keys() == {1, 2, 3, 4}
    np.testing.assert_allclose([two[s] for s in two], [one[s] for s in one], rtol=2e-5)
    assert (wd / "checkpoints" / "4").is_dir()


# ---------------------------------------------------------------------------------------------
# Optimizer state layout.


def adam_moments(state):
    from jaxft.peft.partition import flat

    (adam,) = [s for s in jax.tree_util.tree_leaves(state.opt_state, is_leaf=lambda x: hasattr(x, "mu"))
               if hasattr(s, "mu")]
    return {"mu": flat(adam.mu), "nu": flat(adam.nu)}


def assert_moments_like_params(state, mesh):
    from jaxft.peft.partition import flat

    params = flat(state.params)
    split = 0
    for name, moments in adam_moments(state).items():
        assert moments.keys() == params.keys()
        for path, m in moments.items():
            p = params[path]
            assert m.sharding.mesh == mesh and m.sharding.spec == p.sharding.spec, (name, path, m.sharding, p.sharding)
            assert m.addressable_shards[0].data.shape == p.addressable_shards[0].data.shape, (name, path)
            split += "fsdp" in jax.tree_util.tree_leaves(tuple(p.sharding.spec))
    assert split >= 2 * 9  # every kernel and embedding is really split 8 ways, moments with it


def test_optimizer_state_sharded_like_params_and_restored_so(tmp_path):
    """mesh.fsdp=8: every Adam moment has its parameter's PartitionSpec (1/8 of it per device), when
    created and after a run's checkpoint is restored the way train.py resumes."""
    from jaxft import sharding
    from jaxft.checkpoint import Checkpoints
    from jaxft.models.llama import LlamaModel
    from jaxft.step import init_state, make_optimizer
    from jaxft.train import init_params, load_model_config, train_and_evaluate
    from configs.tiny_test import get_config

    config = get_config()  # hidden 32, MLP 64, vocab 128: all divide 8
    config.method.name, config.mesh.data, config.mesh.fsdp = "full", 1, 8
    config.train.steps, config.checkpoint.every_steps, config.export.enabled = 2, 2, False
    train_and_evaluate(config, str(tmp_path))

    mesh = sharding.make_mesh(config.mesh)
    model = LlamaModel(load_model_config(config)[0])
    tx, _ = make_optimizer(config.optimizer, config.train.steps)
    state, shardings = init_state(tx, init_params(model, None, mesh, 0), 0, mesh)
    assert_moments_like_params(state, mesh)
    assert jax.tree_util.tree_map(lambda x: x.sharding, state) == shardings

    abstract = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
    ckpt = Checkpoints(tmp_path, 2, 2)
    step, restored, meta = ckpt.restore_latest(abstract, lambda meta: None, print)
    ckpt.close()
    assert step == 2
    assert int(restored.step) == 2 and meta["data_position"] == 2
    assert_moments_like_params(restored, mesh)
    nu = adam_moments(restored)["nu"]["layers/mlp/up_proj/kernel"]
    assert float(jnp.max(nu)) > 0  # the trained moments, not fresh zeros


# ---------------------------------------------------------------------------------------------
# Gradient accumulation.


def test_grad_accumulation_same_loss_and_gradient():
    """grad_accum=4 over strided micro-batches = one full batch: same loss sums and updated parameters
    (to fp rounding), on a FSDP x data mesh with uneven padding across rows."""
    from jaxft import sharding
    from jaxft.config import base_config
    from jaxft.models.llama import LlamaConfig, LlamaModel
    from jaxft.step import init_state, make_optimizer, make_train_step
    from jaxft.train import init_params

    c = base_config()
    c.mesh.data, c.mesh.fsdp = 2, 4
    c.optimizer.grad_clip = 0.0
    # Adam's first update is lr g / (|g| + eps): with eps 1e-8 a gradient near 1e-6, a sum of terms that
    # cancel, moves by a whole fraction of a step under rounding alone (one element in 4096 did, at 3e-5
    # relative, after the norms began recomputing in the backward pass). A larger eps keeps the update
    # proportional to the gradient there, so the comparison below tests the accumulation, not rounding.
    c.optimizer.eps = 1e-3
    mesh = sharding.make_mesh(c.mesh)
    model = LlamaModel(LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                                   num_kv_heads=2))
    tx, schedule = make_optimizer(c.optimizer, 10)
    rng = np.random.default_rng(0)
    lengths = rng.integers(3, 13, 32)
    mask = (np.arange(12)[None] < lengths[:, None]).astype(np.int32)
    host = {"input_ids": rng.integers(0, 128, (32, 12)).astype(np.int32) * mask, "attention_mask": mask,
            "weight": np.ones(32, np.float32)}
    batch = {k: jax.device_put(v, sharding.batch_sharding(mesh, v.ndim)) for k, v in host.items()}
    out = {}
    for accum in (1, 4):
        state, shardings = init_state(tx, init_params(model, None, mesh, 0), 0, mesh)
        step = jax.jit(make_train_step(model, tx, schedule, accum, mesh, shardings.params),
                       out_shardings=(shardings, sharding.replicated(mesh)))
        out[accum] = jax.device_get(step(state, {}, batch))
    (s1, m1), (s4, m4) = out[1], out[4]
    np.testing.assert_allclose(m4["loss"], m1["loss"], rtol=1e-6)
    np.testing.assert_allclose(m4["grad_norm"], m1["grad_norm"], rtol=1e-5)
    for a, b in zip(jax.tree_util.tree_leaves(s4.params), jax.tree_util.tree_leaves(s1.params)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------------------------------------
# Meshes: one slice, several slices (DCN), and the ones that cannot be built.


@dataclasses.dataclass(frozen=True)
class FakeTpu:
    """What mesh_utils reads of a TPU device."""
    id: int
    slice_index: int
    coords: tuple
    core_on_chip: int = 0
    process_index: int = 0
    platform: str = "tpu"
    device_kind: str = "TPU v4"


def tpu_slices(n: int, chips=(2, 2, 1)) -> list:
    devices = []
    for s in range(n):
        for xyz in itertools.product(*(range(k) for k in chips[::-1])):
            devices.append(FakeTpu(id=len(devices), slice_index=s, coords=xyz[::-1], process_index=s))
    return devices


def mesh_cfg(**kw):
    c = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1, dcn_data=1, dcn_fsdp=1))
    c.update(kw)
    return c


def slice_of(grid):
    return np.vectorize(lambda d: d.slice_index)(grid)


def test_dcn_data_spans_slices():
    from jaxft.sharding import device_grid

    grid = device_grid(mesh_cfg(data=1, fsdp=4, dcn_data=2), tpu_slices(2))
    assert grid.shape == (2, 4, 1, 1)
    assert (slice_of(grid)[0] == 0).all() and (slice_of(grid)[1] == 1).all()  # the data axis crosses DCN
    assert sorted(d.id for d in grid.flat) == list(range(8))
    # -1 takes the remaining devices of one slice; the dcn factor multiplies it.
    assert device_grid(mesh_cfg(data=-1, dcn_data=2), tpu_slices(2)).shape == (8, 1, 1, 1)


def test_dcn_fsdp_spans_slices():
    from jaxft.sharding import device_grid

    grid = device_grid(mesh_cfg(data=2, fsdp=2, dcn_fsdp=2), tpu_slices(2))
    assert grid.shape == (2, 4, 1, 1)
    assert (slice_of(grid)[:, :2] == 0).all() and (slice_of(grid)[:, 2:] == 1).all()
    # Within a slice the ICI layout is mesh_utils' own (a 2x2 chip grid), not the devices' list order.
    np.testing.assert_array_equal(grid[:, :2, 0, 0], mesh_utils.create_device_mesh((2, 2), tpu_slices(1)))


def test_make_mesh_on_cpu_devices():
    from jaxft.sharding import make_mesh

    mesh = make_mesh(mesh_cfg(data=2, fsdp=2, tensor=2))
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "expert": 1, "tensor": 2}
    assert sorted(d.id for d in mesh.devices.flat) == list(range(8))


@pytest.mark.parametrize("cfg, devices, message", [
    (dict(dcn_data=3), "tpu", "3 slices do not divide the 8 devices"),
    (dict(dcn_data=4), "tpu", "Number of slices 2 must equal"),
    (dict(dcn_data=0), "tpu", "mesh.dcn_data=0"),
    (dict(dcn_data=2), "cpu", "does not have attribute slice_index"),
    (dict(), "tpu", "the 8 devices span 2 slices: set mesh.dcn_data and mesh.dcn_fsdp"),
    (dict(data=1, fsdp=2, tensor=4), "line", "cannot be laid out on 8 TPU v4 devices (Failed to find assignment"),
    (dict(data=3, dcn_data=2), "tpu", "has 3 devices but 4 are available"),
])
def test_mesh_that_cannot_be_built_is_an_error(cfg, devices, message):
    """No silent fallback to another device order: a mesh mesh_utils cannot lay out is one line."""
    from jaxft.errors import JaxftError
    from jaxft.sharding import device_grid

    devs = {"tpu": tpu_slices(2), "cpu": jax.devices(), "line": tpu_slices(1, chips=(8, 1, 1))}[devices]
    with pytest.raises(JaxftError) as e:
        device_grid(mesh_cfg(**cfg), devs)
    assert message in str(e.value) and "\n" not in str(e.value) and len(str(e.value)) < 400


def test_dcn_keys_are_validated():
    from jaxft.config import base_config, validate
    from jaxft.errors import JaxftError

    c = base_config()
    c.mesh.dcn_fsdp = 0
    with pytest.raises(JaxftError, match=r"mesh.dcn_fsdp=0: expected a positive integer"):
        validate(c)
