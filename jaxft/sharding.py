"""The device mesh and the logical-axis rules that lay parameters and batches out on it.

Models name their axes (`embed`, `heads`, `mlp`, ...); this table alone maps them to mesh axes, so
changing the parallelism is changing the table or `config.mesh`, never the model (as in MaxText).
Parameters are laid out by `param_shardings`; activations by `constrain`, active while a step is
traced under `axis_rules(mesh)`.
"""

from __future__ import annotations

import contextlib
import functools
import math

import flax.linen as nn
import jax
import numpy as np
import optax
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxft.errors import JaxftError

MESH_AXES = ("data", "fsdp", "expert", "tensor")
# A mixture's experts are split over `expert`; elsewhere in the model it is one more batch axis.
BATCH_AXES = ("data", "fsdp", "expert")
EXPERT_AXIS = "expert"
TENSOR_AXIS = "tensor"

RULES = (
    ("batch", BATCH_AXES),
    ("length", None),
    ("act_embed", None),
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("expert", "expert"),  # a mixture's stacked experts: each device of the expert axis holds its share of them
    ("layers", None),
    ("norm", None),
    # Activations: attention heads and the MLP's hidden units stay split over the tensor axis between
    # the column-parallel projections that make them and the row-parallel ones that consume them.
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_mlp", "tensor"),
)


def mesh_shape(mesh_cfg, num_devices: int) -> tuple[int, ...]:
    """The sizes of MESH_AXES from `mesh.*` (`expert` may be left out: 1)."""
    sizes = [int(mesh_cfg.get(a, 1)) for a in MESH_AXES]
    if sum(s == -1 for s in sizes) > 1:
        raise JaxftError(f"{described(sizes)}: at most one axis may be -1")
    for a, s in zip(MESH_AXES, sizes):
        if s == 0 or s < -1:
            raise JaxftError(f"mesh.{a}={s}: expected a positive size or -1 (the remaining devices)")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if num_devices % known:
            raise JaxftError(f"{described(sizes)}: {known} does not divide the {num_devices} devices")
        sizes[sizes.index(-1)] = num_devices // known
    if math.prod(sizes) != num_devices:
        raise JaxftError(f"{described(sizes)} has {math.prod(sizes)} devices but {num_devices} are available")
    return tuple(sizes)


def described(sizes) -> str:
    """'mesh {...}' with the axes' sizes; the expert axis only where it is used."""
    return f"mesh {({a: s for a, s in zip(MESH_AXES, sizes) if a != EXPERT_AXIS or s != 1})}"


def device_grid(mesh_cfg, devices) -> np.ndarray:
    """Devices laid out as the (data, fsdp, expert, tensor) mesh; one-line JaxftError if that cannot be built.

    `mesh.data/fsdp/tensor` are sizes within a slice (ICI); `mesh.dcn_data` / `mesh.dcn_fsdp` > 1
    make a multi-slice mesh whose data / fsdp axes also span that many slices (DCN); expert and tensor never do.
    """
    dcn = (int(mesh_cfg.get("dcn_data", 1)), int(mesh_cfg.get("dcn_fsdp", 1)), 1, 1)
    if min(dcn) < 1:
        raise JaxftError(f"mesh.dcn_data={dcn[0]}, mesh.dcn_fsdp={dcn[1]}: expected positive numbers of slices")
    slices = math.prod(dcn)
    if len(devices) % slices:
        raise JaxftError(f"mesh.dcn_data x mesh.dcn_fsdp = {slices} slices do not divide the {len(devices)} devices")
    shape = mesh_shape(mesh_cfg, len(devices) // slices)
    found = {getattr(d, "slice_index", 0) for d in devices}
    if slices == 1 and devices[0].platform == "tpu" and len(found) > 1:  # a multi-slice mesh laid out as one
        raise JaxftError(f"the {len(devices)} devices span {len(found)} slices: set mesh.dcn_data and mesh.dcn_fsdp "
                         f"so that their product is {len(found)}")
    what = described(shape) + (f" x dcn {dict(zip(BATCH_AXES[:2], dcn))}" if slices > 1 else "")
    try:
        if slices == 1:
            return mesh_utils.create_device_mesh(shape, devices=devices)
        return mesh_utils.create_hybrid_device_mesh(shape, dcn, devices=devices)
    except (AssertionError, ValueError, NotImplementedError, AttributeError, KeyError) as e:
        reason = " ".join(str(e).split())[:300] or type(e).__name__
        kind = devices[0].device_kind
        raise JaxftError(f"{what}: cannot be laid out on {len(devices)} {kind} devices ({reason})") from None


def make_mesh(mesh_cfg, devices=None) -> Mesh:
    return Mesh(device_grid(mesh_cfg, jax.devices() if devices is None else devices), MESH_AXES)


def _fit(spec: P, shape, mesh: Mesh) -> P:
    """Drop mesh axes that do not divide a dimension (e.g. 3 labels on 2-way tensor parallelism)."""
    out = []
    for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        names = (axes,) if isinstance(axes, str) else tuple(axes or ())
        size = math.prod(mesh.shape[n] for n in names)
        out.append(axes if size and dim % size == 0 else None)
    return P(*out)


def param_shardings(abstract_variables, mesh: Mesh):
    """Boxed (logically annotated) abstract variables -> NamedSharding for every unboxed leaf."""
    logical = nn.get_partition_spec(abstract_variables)
    unboxed = nn.unbox(abstract_variables)

    def one(spec, leaf):
        mesh_spec = nn.logical_to_mesh_axes(tuple(spec), RULES) if spec is not None else P()
        return NamedSharding(mesh, _fit(mesh_spec, leaf.shape, mesh))

    return jax.tree_util.tree_map(one, logical, unboxed, is_leaf=lambda x: isinstance(x, P))


def opt_state_shardings(tx: optax.GradientTransformation, params, shardings, mesh: Mesh):
    """The optimizer state's shardings: each moment like its parameter, the rest (counts) replicated."""
    abstract = jax.eval_shape(tx.init, params)
    return optax.tree_map_params(
        tx, lambda _, s: s, abstract, shardings, transform_non_params=lambda _: replicated(mesh)
    )


@contextlib.contextmanager
def axis_rules(mesh: Mesh | None):
    """While a step is traced: logical activation constraints (`constrain`) act on `mesh`.

    Without a mesh (a single-device tool, a unit test) every constraint is a no-op.
    """
    if mesh is None:
        yield
        return
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), nn.logical_axis_rules(RULES):
        yield


def constrain(x, logical: tuple):
    """Constrain an activation to its logical axes, dropping mesh axes that do not divide a dimension
    (e.g. 2 key/value heads on 4-way tensor parallelism), which XLA would otherwise pad."""
    mesh = jax.sharding.get_abstract_mesh()
    rules = nn.get_logical_axis_rules()
    if mesh.empty or not rules:
        return x
    spec = _fit(nn.logical_to_mesh_axes(logical, rules), x.shape, mesh)
    return jax.lax.with_sharding_constraint(x, spec)


def on_batch_shards(fn, batched, *args, tensor=None, expert=None):
    """fn(*args) once per batch shard: a `shard_map` over the batch axes of the mesh in use (as `constrain`
    reads it; the other axes stay XLA's), the args flagged in `batched` split on their leading axis and the
    rest whole on each shard; fn's output is batched.

    For work that must stay on each device's own rows, where XLA would gather every row of the global batch
    onto each device first (a sort over all tokens: a mixture of experts' dispatch). Batch axes that do not
    divide the rows are left out; with none left (no mesh, one device, a batch of one), fn(*args).

    `tensor`, per arg, the dimension split over the tensor axis (or None): when the axis divides each, it is
    manual too and fn is called with `tensor_axis=` its name, to sum its partial results; else with None.
    `expert` likewise for the expert axis (fn's `expert_axis=`), where it splits a mixture's stacked experts:
    fn is also told whether the batched args are split over it (`expert_tokens=`: each shard then holds its
    own tokens, which must meet every shard's experts) or whole on each shard."""
    mesh = jax.sharding.get_abstract_mesh()
    axes = batch_axes_dividing(mesh, next(a for a, split in zip(args, batched) if split).shape[0])
    dims = {TENSOR_AXIS: tensor or (None,) * len(args), EXPERT_AXIS: expert or (None,) * len(args)}
    manual = [name for name, asked in ((TENSOR_AXIS, tensor), (EXPERT_AXIS, expert)) if asked is not None
              and not mesh.empty and name in mesh.axis_names and mesh.shape[name] > 1
              and all(d is None or x.shape[d] % mesh.shape[name] == 0 for x, d in zip(args, dims[name]))]
    if tensor is not None:
        fn = functools.partial(fn, tensor_axis=TENSOR_AXIS if TENSOR_AXIS in manual else None)
    if expert is not None:
        fn = functools.partial(fn, expert_axis=EXPERT_AXIS if EXPERT_AXIS in manual else None,
                               expert_tokens=EXPERT_AXIS in axes)
    if not axes and not manual:
        return fn(*args)

    def spec(x, split, i):
        out = [tuple(axes) if split and axes else None] + [None] * (x.ndim - 1)
        for name in manual:
            if dims[name][i] is not None:
                out[dims[name][i]] = name
        return P(*out)

    specs = tuple(spec(x, split, i) for i, (x, split) in enumerate(zip(args, batched)))
    return shard_map_over(fn, mesh, args, specs, P(tuple(axes) or None), axis_names=set(axes) | set(manual))


def batch_shards(mesh) -> int:
    """Into how many shards the mesh splits a batch: its batch axes' devices."""
    return math.prod(mesh.shape[a] for a in BATCH_AXES if a in mesh.axis_names)


def batch_axes_dividing(mesh, rows: int) -> list[str]:
    """The mesh's batch axes (of more than one device) over which `rows` split evenly: the innermost are left
    out first. [] without a mesh."""
    axes = [] if mesh.empty else [a for a in BATCH_AXES if a in mesh.axis_names and mesh.shape[a] > 1]
    while axes and rows % math.prod(mesh.shape[a] for a in axes):
        axes.pop()
    return axes


def shard_map_over(fn, mesh, args, in_specs, out_specs, **kwargs):
    """`jax.shard_map` of fn over `mesh` called on args; on a mesh with explicit axes the args are laid out as
    `in_specs` first (shard_map takes them only so)."""
    if not mesh.are_all_axes_auto:
        args = tuple(jax.sharding.reshard(x, s) for x, s in zip(args, in_specs))
    return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs, **kwargs)(*args)


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def local_rows(mesh: Mesh, global_batch: int) -> tuple[int, int]:
    """The rows of each global batch that this process's devices hold: it loads only those."""
    idx = batch_sharding(mesh).addressable_devices_indices_map((global_batch, 1))
    rows = sorted({(s[0].start or 0, global_batch if s[0].stop is None else s[0].stop) for s in idx.values()})
    start, stop = rows[0][0], max(r[1] for r in rows)
    return start, stop


def to_global(mesh: Mesh, local: dict, global_batch: int) -> dict:
    """Host-local rows of a batch -> global jax arrays sharded over the batch axes."""
    return {
        k: jax.make_array_from_process_local_data(
            batch_sharding(mesh, v.ndim), v, (global_batch,) + tuple(v.shape[1:])
        )
        for k, v in local.items()
    }


def gather(tree):
    """Host numpy copies of (possibly multi-host sharded) arrays: every process gets all of them."""
    from jax.experimental import multihost_utils

    if jax.process_count() == 1:
        return jax.device_get(tree)
    return multihost_utils.process_allgather(tree, tiled=True)
