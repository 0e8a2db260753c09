"""The device mesh and the one table that maps logical axis names to mesh axes.

Modules name the axes of their parameters (`embed`, `mlp`, `exp`, ...); this table decides
where each goes. Changing the parallelism is changing `mesh.*` in the config, never model
code. A single device is simply a mesh whose axes all have size 1.
"""

from __future__ import annotations

import math

import jax
import numpy as np
from flax import nnx
from jax.sharding import AbstractMesh, Mesh, NamedSharding, PartitionSpec

from sparsemodel.config import ConfigError, MeshConfig

MESH_AXES = ("data", "fsdp", "expert", "tensor")

# The batch is split over every axis that does not split the model's width, so each
# device sees its own tokens; expert-parallel devices also hold different tokens.
BATCH_AXES = ("data", "fsdp", "expert")

LOGICAL_RULES: dict[str, str | tuple[str, ...] | None] = {
    "batch": BATCH_AXES,
    "layers": None,  # the scanned depth axis stays whole on every device
    "embed": "fsdp",  # FSDP: parameters split along d_model, gathered per layer
    "vocab": "tensor",
    "heads": "tensor",  # tensor parallelism: attention heads ...
    "kv": None,
    "mlp": "tensor",  # ... and MLP width
    "exp": "expert",  # expert parallelism: each device holds E / mesh.expert experts
}


def mesh_shape(mesh_cfg: MeshConfig, n_devices: int) -> tuple[int, ...]:
    """Sizes of (data, fsdp, expert, tensor); a -1 takes the devices the others leave."""
    sizes = [getattr(mesh_cfg, a) for a in MESH_AXES]
    if -1 in sizes:
        i = sizes.index(-1)
        rest = math.prod(s for s in sizes if s != -1)
        if n_devices % rest:
            raise ConfigError(
                f"mesh.{MESH_AXES[i]}: -1 cannot fill the mesh: {n_devices} devices are not "
                f"divisible by the other axes' product {rest}"
            )
        sizes[i] = n_devices // rest
    if math.prod(sizes) != n_devices:
        desc = " x ".join(f"{a}={s}" for a, s in zip(MESH_AXES, sizes, strict=True))
        raise ConfigError(f"mesh: {desc} = {math.prod(sizes)} devices, but {n_devices} are present")
    return tuple(sizes)


def make_mesh(mesh_cfg: MeshConfig, devices=None) -> Mesh:
    devices = jax.devices() if devices is None else devices
    shape = mesh_shape(mesh_cfg, len(devices))
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES)


def abstract_mesh(mesh_cfg: MeshConfig) -> AbstractMesh:
    """A mesh of the stated sizes without devices (a -1 counts as 1): for sizing only."""
    sizes = tuple(max(1, getattr(mesh_cfg, a)) for a in MESH_AXES)
    return AbstractMesh(sizes, MESH_AXES)


def logical_to_spec(names: tuple[str | None, ...] | None) -> PartitionSpec:
    """Logical axis names -> PartitionSpec; a mesh axis is used at most once per array."""
    if not names:
        return PartitionSpec()
    used: set[str] = set()
    out = []
    for name in names:
        target = LOGICAL_RULES.get(name) if name is not None else None
        axes = (target,) if isinstance(target, str) else tuple(target or ())
        axes = tuple(a for a in axes if a not in used)
        used.update(axes)
        out.append(axes[0] if len(axes) == 1 else (axes or None))
    return PartitionSpec(*out)


def fit_spec(spec: PartitionSpec, shape: tuple[int, ...], mesh: Mesh) -> PartitionSpec:
    """Drops mesh axes that do not divide their dimension (e.g. a 256-entry vocab on 3
    tensor shards): that dimension is then replicated instead of failing to compile."""
    out = []
    for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec)), strict=True):
        axes_t = (axes,) if isinstance(axes, str) else tuple(axes or ())
        kept = []
        for a in axes_t:
            if dim % (math.prod(mesh.shape[k] for k in kept) * mesh.shape[a]) == 0:
                kept.append(a)
        out.append(kept[0] if len(kept) == 1 else (tuple(kept) or None))
    return PartitionSpec(*out)


def state_shardings(state: nnx.State, mesh: Mesh) -> nnx.State:
    """A NamedSharding for every Variable of an (abstract) state, from its logical names."""

    def one(var):
        names = var.get_metadata().get("out_sharding")
        spec = fit_spec(logical_to_spec(names), var.shape, mesh)
        return var.replace(NamedSharding(mesh, spec))

    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    """Batch dimension over the batch-carrying axes, the rest replicated."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES, *(None,) * (ndim - 1)))


def batch_divisor(mesh: Mesh) -> int:
    return math.prod(mesh.shape[a] for a in BATCH_AXES)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def put_batch(local_batch: np.ndarray, mesh: Mesh) -> jax.Array:
    """This process's rows of the global batch -> one global array sharded over the batch
    axes (each process passes only its own slice)."""
    return jax.make_array_from_process_local_data(
        batch_sharding(mesh, local_batch.ndim), local_batch
    )


def bytes_per_device(tree) -> int:
    """Bytes of a tree of (possibly abstract) sharded arrays held by the busiest device."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        sharding = getattr(leaf, "sharding", None)
        shard_shape = sharding.shard_shape(leaf.shape) if sharding is not None else leaf.shape
        total += math.prod(shard_shape) * np.dtype(leaf.dtype).itemsize
    return total
