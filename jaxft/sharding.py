"""The device mesh and the logical-axis rules that lay parameters and batches out on it.

Models name their axes (`embed`, `heads`, `mlp`, ...); this table alone maps them to mesh axes, so
changing the parallelism is changing the table or `config.mesh`, never the model (as in MaxText).
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxft.errors import JaxftError

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

RULES = (
    ("batch", BATCH_AXES),
    ("length", None),
    ("act_embed", None),
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("layers", None),
    ("norm", None),
)


def mesh_shape(mesh_cfg, num_devices: int) -> tuple[int, int, int]:
    sizes = [int(mesh_cfg[a]) for a in MESH_AXES]
    if sum(s == -1 for s in sizes) > 1:
        raise JaxftError(f"mesh {dict(zip(MESH_AXES, sizes))}: at most one axis may be -1")
    for a, s in zip(MESH_AXES, sizes):
        if s == 0 or s < -1:
            raise JaxftError(f"mesh.{a}={s}: expected a positive size or -1 (the remaining devices)")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if num_devices % known:
            raise JaxftError(f"mesh {dict(zip(MESH_AXES, sizes))}: {known} does not divide the {num_devices} devices")
        sizes[sizes.index(-1)] = num_devices // known
    if math.prod(sizes) != num_devices:
        raise JaxftError(
            f"mesh {dict(zip(MESH_AXES, sizes))} has {math.prod(sizes)} devices but {num_devices} are available"
        )
    return tuple(sizes)


def make_mesh(mesh_cfg, devices=None) -> Mesh:
    devices = jax.devices() if devices is None else devices
    shape = mesh_shape(mesh_cfg, len(devices))
    try:
        grid = mesh_utils.create_device_mesh(shape, devices=devices)
    except (AssertionError, ValueError, NotImplementedError):
        grid = np.asarray(devices).reshape(shape)
    return Mesh(grid, MESH_AXES)


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
