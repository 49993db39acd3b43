"""The collectives in the compiled train step, held to what each mesh layout requires.

The real step (tiny Llama, scanned layers; full fine-tuning and LoRA) is compiled for 8 fake CPU devices
and XLA's optimized HLO is read: every all-reduce, all-gather, reduce-scatter, all-to-all and
collective-permute with its result shapes and the op_name JAX recorded. Ops whose op_name has
`/layers/` sit in the scanned layer body, which the HLO holds once however many layers there are.

Dimensions are picked so that shapes say what moves: the sequence length T = 7 is prime and divides
no parameter dimension, so an activation is any operand with a dimension that 7 divides; hidden 64,
heads x head_dim 128, MLP 96 and vocabulary 128 tell activations apart by their last dimension.
"""

import collections
import dataclasses
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxft import sharding
from jaxft.config import base_config
from jaxft.models import family
from jaxft.models.gpt2 import GPT2Config
from jaxft.models.llama import LlamaConfig
from jaxft.peft import build
from jaxft.peft.partition import flat, split
from jaxft.step import init_state, make_optimizer, make_train_step
from jaxft.train import init_params

B, T = 16, 7
HIDDEN, HEADS_X_DIM, MLP, RANK = 64, 128, 96, 4
CFG = LlamaConfig(vocab_size=128, hidden_size=HIDDEN, intermediate_size=MLP, num_layers=2, num_heads=16,
                  num_kv_heads=8, head_dim=8, head="causal_lm")
OPS = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
DATA, FSDP, TENSOR, FSDP_TENSOR = (8, 1, 1), (1, 8, 1), (1, 1, 8), (1, 2, 4)


@dataclasses.dataclass
class Collective:
    op: str
    shapes: list  # result shapes (several for a combined collective)
    in_layer: bool
    where: str


@dataclasses.dataclass
class Step:
    collectives: list
    trainable: dict  # path -> shape, per layer for the scanned leaves
    gathered: collections.Counter  # per-layer / global shapes a FSDP all-gather may produce, with multiplicity
    mesh: dict


def parse(hlo: str) -> list[Collective]:
    found = []
    for line in hlo.splitlines():
        m = re.search(r"=\s*(.+?)\s(" + "|".join(OPS) + r")(?:-start)?\(", line)
        if not m:
            continue
        shapes = [tuple(int(d) for d in dims.split(",") if d) for dims in re.findall(r"\w+\[([\d,]*)\]", m.group(1))]
        where = re.search(r'op_name="([^"]*)"', line)
        where = where.group(1) if where else ""
        found.append(Collective(m.group(2), shapes, "/layers/" in where, where))
    return found


def is_activation(shape) -> bool:
    return any(d % T == 0 for d in shape)


def compile_step(mesh_sizes, method="full", grad_accum=1, batch_size=B, cfg=CFG) -> Step:
    c = base_config()
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = mesh_sizes[:3]
    c.mesh.expert = mesh_sizes[3] if len(mesh_sizes) > 3 else 1
    c.method.name, c.method.rank = method, RANK
    mesh = sharding.make_mesh(c.mesh)
    m = build(c.method, cfg)
    model = family.of(cfg).model(cfg, hooks=m.hooks)
    params = init_params(model, None, mesh, 0)
    trainable, frozen = split(params, m.trainable)
    tx, schedule = make_optimizer(c.optimizer, 10)
    state, shardings = init_state(tx, trainable, 0, mesh)
    batch = {"input_ids": np.ones((batch_size, T), np.int32), "attention_mask": np.ones((batch_size, T), np.int32),
             "weight": np.ones((batch_size,), np.float32)}
    batch = {k: jax.device_put(v, sharding.batch_sharding(mesh, v.ndim)) for k, v in batch.items()}
    step = jax.jit(make_train_step(model, tx, schedule, grad_accum, mesh, shardings.params),
                   out_shardings=(shardings, sharding.replicated(mesh)))
    hlo = step.lower(state, frozen, batch).compile().as_text()

    def per_layer(path, shape):
        return shape[1:] if path.startswith("layers/") else shape

    def tensor_local(x):  # the shape a FSDP all-gather rebuilds: split over tensor only
        spec = tuple(x.sharding.spec) + (None,) * (x.ndim - len(x.sharding.spec))
        axes = [(a,) if isinstance(a, str) else tuple(a or ()) for a in spec]
        return tuple(d // (mesh.shape["tensor"] if "tensor" in ax else 1) for d, ax in zip(x.shape, axes)), axes

    gathered = collections.Counter()
    for path, x in flat(params).items():
        shape, axes = tensor_local(x)
        if any("fsdp" in ax for ax in axes):
            gathered[per_layer(path, shape)] += 1
    train_shapes = {p: per_layer(p, tensor_local(x)[0]) for p, x in flat(trainable).items()}
    return Step(parse(hlo), train_shapes, gathered, dict(mesh.shape))


def ops(step: Step, op: str, in_layer=None):
    return [c for c in step.collectives if c.op == op and (in_layer is None or c.in_layer == in_layer)]


def operands(collectives):
    return [s for c in collectives for s in c.shapes]


def describe(step: Step) -> str:
    return "\n".join(f"{c.op} {c.shapes} {'[layer]' if c.in_layer else ''} {c.where[-160:]}" for c in step.collectives)


def assert_gradients_reduced_once(step: Step):
    """Each trainable leaf's gradient is summed over the batch shards exactly once (per micro-batch):
    its shape (per layer inside the layer body) appears once among the reduced parameter-shaped operands.
    Dimensions are compared as a set: XLA may reduce a gradient before transposing it to its layout."""
    reduced = collections.Counter(
        (c.in_layer, tuple(sorted(s))) for c in ops(step, "all-reduce") for s in c.shapes if s and not is_activation(s)
    )
    expected = collections.Counter((p.startswith("layers/"), tuple(sorted(s))) for p, s in step.trainable.items())
    assert reduced == expected, describe(step)


def assert_gathers_only_parameters(step: Step):
    """FSDP gathers parameters (each sharded weight at most twice: the forward, and the backward which
    re-gathers it rather than keep every layer's full weight alive), never an activation."""
    got = collections.Counter(s for c in ops(step, "all-gather") for s in c.shapes)
    for shape, n in got.items():
        assert not is_activation(shape), f"activation {shape} all-gathered:\n{describe(step)}"
        assert n <= 2 * step.gathered[shape], f"{shape} gathered {n} times:\n{describe(step)}"


CASES = [(mesh, method) for mesh in (DATA, FSDP, TENSOR, FSDP_TENSOR) for method in ("full", "lora")]
# Every mesh and both methods stay in the default run: lora-8x1x1, full-1x8x1, lora-1x1x8 and both on 1x2x4
# (LoRA's rank-wide activations and its one permute exception). The slow cells repeat a layout's checks with
# the other method:
# slow: full-8x1x1 (the data layout's checks in lora-8x1x1; full fine-tuning's gradients reduced once on it in
# test_grad_accumulation_moves_no_batch[data]); lora-1x8x1 (the FSDP checks in full-1x8x1, LoRA under FSDP in
# lora-1x2x4); full-1x1x8 (the tensor-parallel checks in lora-1x1x8 and full-1x2x4).
SLOW_CASES = {(DATA, "full"), (FSDP, "lora"), (TENSOR, "full")}


@pytest.fixture(scope="module", params=[
    pytest.param(c, id=f"{c[1]}-{'x'.join(map(str, c[0]))}", marks=[pytest.mark.slow] if c in SLOW_CASES else [])
    for c in CASES])
def compiled(request):
    mesh, method = request.param
    return mesh, method, compile_step(mesh, method)


def test_no_all_to_all_or_permute(compiled):
    """No layout here needs to exchange pieces of a tensor point to point. One exception XLA takes on
    its own: under FSDP x tensor it moves shards of LoRA's A factor ([embed, rank], a few KB) between
    devices to contract it split, rather than gather it; nothing else."""
    mesh, method, step = compiled
    assert not ops(step, "all-to-all"), describe(step)
    permuted = operands(ops(step, "collective-permute"))
    if mesh == FSDP_TENSOR and method == "lora":
        permuted = [s for s in permuted if RANK not in s or is_activation(s)]
    assert not permuted, describe(step)


def test_layout_collectives(compiled):
    mesh, method, step = compiled
    if mesh == DATA:
        # Replicated parameters, split batch: only gradient (and loss-sum) all-reduces.
        assert not ops(step, "all-gather") and not ops(step, "reduce-scatter"), describe(step)
        assert not [s for s in operands(ops(step, "all-reduce")) if is_activation(s)], describe(step)
        assert_gradients_reduced_once(step)
    elif mesh == FSDP:
        # Parameters split over fsdp: all-gathered where used; gradients reduced (all-reduce on CPU, a
        # reduce-scatter where XLA chooses one); activations stay on their batch shard.
        assert_gathers_only_parameters(step)
        assert not [s for c in step.collectives for s in c.shapes if is_activation(s)], describe(step)
        assert ops(step, "all-gather", in_layer=True), describe(step)
        if not ops(step, "reduce-scatter"):
            assert_gradients_reduced_once(step)
    else:
        # Tensor parallel (Megatron): heads and MLP units stay split from the column-parallel projections
        # (q/k/v, gate/up) to the row-parallel ones (o_proj, down_proj); nothing is all-gathered but
        # FSDP's parameters.
        assert_gathers_only_parameters(step)
        if mesh == TENSOR:
            assert not ops(step, "all-gather"), describe(step)
        # No collective at all moves the heads' activations ([.., heads x head_dim] or [.., heads, head_dim])
        # or the MLP's hidden units ([.., mlp]): they stay split between the two projections.
        acts = [s for s in operands(step.collectives) if is_activation(s)]
        assert not [s for s in acts if s[-1] in (HEADS_X_DIM, MLP) or len(s) == 4], describe(step)
        acts = collections.Counter(s for s in operands(ops(step, "all-reduce", in_layer=True)) if is_activation(s))
        rows = B // (mesh[0] * mesh[1])
        # The activations reduced in a layer are the residual stream [rows, T, hidden] and, with LoRA,
        # the rank-wide [rows, T, rank]: never the heads' [.., heads x head_dim] nor the MLP's [.., mlp].
        assert set(acts) <= {(rows, T, HIDDEN), (rows, T, RANK)}, describe(step)
        # Forward: the partial sums of o_proj and down_proj (2). Backward: the input gradients of the
        # column-parallel q, k, v, gate and up projections (at most 5; XLA may add them up first).
        assert 2 <= acts[(rows, T, HIDDEN)] <= 7, describe(step)
        # LoRA on q_proj and v_proj: B's rows are split over tensor, so the gradient into B x A sums
        # over devices (one per target); XLA may also contract A split in the forward (one more).
        assert acts[(rows, T, RANK)] <= (4 if method == "lora" else 0), describe(step)


@pytest.mark.parametrize("fused", ["gate_up", "qkv"])
def test_fused_projections_move_no_activation(fused):
    """GLM-4's and Phi-3's one gate_up_proj, and Phi-3's one qkv_proj, on a tensor mesh: stored in blocks of
    gate and up units (`llama.gate_up_order`) and in kv-head groups of queries, key and value
    (`llama.qkv_order`), each device holds what it multiplies. In HF's order (gate's units, then up's; every
    query, then the keys, then the values) every layer permuted and all-to-all'ed activations between
    devices, forward and backward."""
    step = compile_step(TENSOR, "full", cfg=dataclasses.replace(CFG, **{f"fused_{fused}": True}))
    assert not ops(step, "all-to-all") and not ops(step, "collective-permute"), describe(step)
    acts = [s for s in operands(step.collectives) if is_activation(s)]
    assert not [s for s in acts if s[-1] in (MLP, 2 * MLP, HEADS_X_DIM) or len(s) > 3], describe(step)


def test_gpt2_c_attn_moves_no_activation():
    """GPT-2's fused c_attn on a tensor mesh: stored in head groups of query, key and value
    (`family.qkv_order`), each device holds its heads' three (in HF's order, queries then keys then values, a
    device's keys and values lay on others, and every layer moved activations between them)."""
    cfg = GPT2Config(vocab_size=128, hidden_size=HIDDEN, intermediate_size=MLP, num_layers=2, num_heads=16,
                     max_position_embeddings=T, head="causal_lm")
    step = compile_step(TENSOR, "full", cfg=cfg)
    assert not ops(step, "all-to-all") and not ops(step, "collective-permute"), describe(step)
    acts = [s for s in operands(step.collectives) if is_activation(s)]
    assert not [s for s in acts if s[-1] in (MLP, 3 * HIDDEN) or len(s) > 3], describe(step)


@pytest.mark.parametrize("mesh", [DATA, FSDP], ids=["data", "fsdp"])
def test_grad_accumulation_moves_no_batch(mesh):
    """Micro-batches are strided rows, so each already lies on every batch shard: the accumulation
    loop slices locally. (Contiguous micro-batches sit on a quarter of the shards and were all-gathered
    or permuted between devices.)"""
    step = compile_step(mesh, "full", grad_accum=4, batch_size=4 * 8)  # micro-batches of 8 rows, 1 per shard
    assert not ops(step, "all-to-all") and not ops(step, "collective-permute"), describe(step)
    assert not [s for c in step.collectives for s in c.shapes if is_activation(s)], describe(step)
    assert not [c for c in ops(step, "all-gather") if "dynamic_slice" in c.where or "input_ids" in c.where]
    assert_gradients_reduced_once(step)


MOE = dataclasses.replace(CFG, num_experts=4, experts_per_token=2, moe_intermediate_size=24, norm_topk_prob=True)


@pytest.mark.parametrize("mesh", [DATA, FSDP, TENSOR, FSDP_TENSOR], ids=["data", "fsdp", "tensor", "fsdp-tensor"])
def test_experts_route_each_shards_own_tokens(mesh):
    """A mixture of experts over a split batch: each device routes, sorts and multiplies its own tokens, and no
    activation moves. (Left to XLA, the global sort gathered the router's probabilities [B, T, E] onto every
    device, and each device ran all B x T x k token copies through the experts.) Under tensor parallelism each
    device holds its share of every expert's units: the experts' output is summed once per layer, after each
    token's k copies are combined, and the backward pass sums the tokens' and routing weights' gradients once.
    (Left to XLA, the product's partial sums were all-reduced tile by tile, and the fused gate/up weight's
    halves moved between devices.)"""
    step = compile_step(mesh, "full", cfg=MOE)
    experts = [c for c in step.collectives if "/experts/" in c.where]
    assert not [c for c in experts if c.op in ("all-to-all", "collective-permute")], describe(step)
    # nothing inside the grouped matmuls' loop over tiles (the stacked weights' gradients were once summed
    # over the batch shards there, tile by tile)
    assert not [c for c in experts if "dispatch/while/" in c.where], describe(step)
    if mesh[2] == 1:
        assert not [s for c in step.collectives for s in c.shapes if is_activation(s)], describe(step)
        if mesh == DATA:  # each layer's gradients summed over the batch shards once (the experts' gate and up
            # together, as they meet the rows in one grouped product)
            assert not ops(step, "all-gather"), describe(step)
            reduced = sum(math.prod(s) for c in ops(step, "all-reduce", in_layer=True) for s in c.shapes)
            assert reduced == sum(math.prod(s) for p, s in step.trainable.items() if p.startswith("layers/"))
        else:
            assert_gathers_only_parameters(step)
        return
    rows = B // (mesh[0] * mesh[1])
    summed = collections.Counter(s for c in experts for s in c.shapes if is_activation(s))
    assert set(summed) == {(rows * T, HIDDEN), (rows, T, HIDDEN), (rows, T, MOE.experts_per_token)}, describe(step)
    assert max(summed.values()) <= 2, describe(step)  # a forward pass recomputed in the backward may repeat one
    assert {c.op for c in experts} <= {"all-reduce", "all-gather"}, describe(step)
    assert_gathers_only_parameters(step)


def test_experts_split_over_the_expert_axis():
    """Expert parallelism (mesh.expert=4 beside data=2; 4 experts, one per device of the expert axis): only
    tokens move. Each layer gathers its shards' tokens with their routing over the expert axis and scatters
    the summed outputs back (and the backward pass the reverse); an expert's weights never move, and their
    gradients are summed over the data axis alone, once per layer, at their local size."""
    step = compile_step((2, 1, 1, 4), "full", cfg=MOE)
    experts = [c for c in step.collectives if "/experts/" in c.where]
    assert not [c for c in experts if c.op in ("all-to-all", "collective-permute")], describe(step)
    rows, k = B // 8, MOE.experts_per_token
    moved = {(c.op, math.prod(s)) for c in experts for s in c.shapes if is_activation(s)}  # (op, elements)
    assert moved == {("all-gather", 4 * rows * T * HIDDEN), ("all-gather", 4 * rows * T * k),
                     ("reduce-scatter", rows * T * HIDDEN), ("reduce-scatter", rows * T * k)}, describe(step)
    stacked = {s for p, s in step.trainable.items() if "/experts/" in p}
    assert stacked and not [s for c in step.collectives for s in c.shapes if s[-3:] in stacked], describe(step)
    local = collections.Counter(s for c in ops(step, "all-reduce", in_layer=True) for s in c.shapes
                                if s in {(1,) + w[1:] for w in stacked} | {(1, HIDDEN, 2 * MOE.moe_intermediate_size)})
    assert sorted(local) == [(1, MOE.moe_intermediate_size, HIDDEN), (1, HIDDEN, 2 * MOE.moe_intermediate_size)]
    assert max(local.values()) == 1, describe(step)


# slow: the same dispatch beside FSDP and tensor shards (test_sharding's qlora run holds its losses to one device's)
@pytest.mark.parametrize("mesh, rows", [((2, 1, 1, 4), 16), pytest.param((1, 2, 2, 2), 16, marks=pytest.mark.slow),
                                        ((2, 1, 1, 4), 6)], ids=["data-expert", "fsdp-tensor-expert", "tokens-whole"])
def test_expert_parallel_gradients_match_one_device(mesh, rows):
    """Expert parallelism is exact: the loss and every gradient as on one device, with each shard's tokens
    gathered over the expert axis, beside FSDP and tensor shards, or (6 rows: the expert axis does not split
    them) with every token already on each shard of it."""
    model = family.of(MOE).model(MOE)
    ids = np.random.default_rng(0).integers(0, MOE.vocab_size, (rows, T)).astype(np.int32)

    def loss(params, ids):
        logits = model.apply({"params": params}, ids, jnp.ones_like(ids))[0]
        return jnp.mean(jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1))

    one = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
    want = jax.jit(jax.value_and_grad(loss))(init_params(model, None, one, 0), ids)
    c = base_config()
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor, c.mesh.expert = mesh
    mesh = sharding.make_mesh(c.mesh)
    params = init_params(model, None, mesh, 0)
    assert params["layers"]["mlp"]["experts"]["gate_proj"].sharding.spec[1] == "expert"
    rows_on = sharding.batch_sharding(mesh) if rows % sharding.batch_shards(mesh) == 0 else sharding.replicated(mesh)
    with sharding.axis_rules(mesh):
        got = jax.jit(jax.value_and_grad(loss))(params, jax.device_put(ids, rows_on))
    np.testing.assert_allclose(got[0], want[0], rtol=1e-6)
    for path, g in flat(got[1]).items():
        np.testing.assert_allclose(np.asarray(g), np.asarray(flat(want[1])[path]), atol=1e-6, err_msg=path)


@pytest.mark.parametrize("rows", [16, 4, 3])
def test_on_batch_shards_splits_over_the_axes_that_divide(rows):
    """16 rows on a 2 x 4 batch mesh split over both axes, 4 over data alone, 3 run whole: the same values as
    without a mesh, and each shard sees only its rows (the work counts them)."""
    c = base_config()
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 2, 4, 1
    mesh = sharding.make_mesh(c.mesh)
    x = jax.device_put(jnp.arange(rows * 3, dtype=jnp.float32).reshape(rows, 3), sharding.replicated(mesh))
    w = jax.device_put(jnp.arange(3, dtype=jnp.float32), sharding.replicated(mesh))
    seen = []

    def fn(x, w):
        seen.append(x.shape[0])
        return x * w + x.shape[0]

    with sharding.axis_rules(mesh):
        got = jax.jit(lambda x, w: sharding.on_batch_shards(fn, (True, False), x, w))(x, w)
    local = {16: 2, 4: 2, 3: 3}[rows]
    assert seen == [local]
    np.testing.assert_array_equal(got, x * w + local)


def test_moe_bench_prints_its_tables(capsys):
    """tools/moe_bench.py (the figures in BENCHMARKS) runs: one grouped matmul against ragged_dot, and the
    train step on a data x tensor mesh."""
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).parent.parent / "tools" / "moe_bench.py"
    spec = importlib.util.spec_from_file_location("moe_bench", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    bench.main(["grouped", "--rows", "96", "--dim", "16", "--out", "8", "--experts", "4", "--steps", "1"])
    bench.main(["step", "--meshes", "2x1x2", "--batch", "4", "--seq", "8", "--steps", "1"])
    rows = [line.split("|")[1:-1] for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    got = {r[0].strip(): [float(x.replace(",", "")) for x in r[-2:]] for r in rows
           if r[-1].strip()[0].isdigit()}  # not the headers and rules
    assert set(got) == {"grouped_matmul", "ragged_dot", "2x1x2"}, got
    assert all(ms > 0 and temp >= 0 for ms, temp in got.values()), got
