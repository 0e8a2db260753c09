"""Checkpoint formats: what each version stored, and how an older one becomes today's.

    1  before the record: meta holds no format, model, shapes or checksums
    2  the record (checkpoint.py): format, model, shapes, a checksum per array
    3  each MoE layer's gate and up expert weights fused into one w_gate_up [..., E, D, 2, F]
       (gate first), where 1 and 2 stored w_gate and w_up [..., E, D, F] apart

A checkpoint of an older format is restored into a target of its own layout (`stored`),
checked against its own record, then converted (`upgrade`): it is never refused for being
old. Only the MoE layers' weights changed layout, in the parameters and in every optimizer
tree that mirrors them (AdamW's moments); they are the nodes that hold a router.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

FORMAT = 3
FUSED_GATE_UP = 3  # the first format that stores w_gate_up


def _is_moe(node) -> bool:
    # An nnx.State flattens into plain dicts: the layer's node is whichever mapping it is.
    return isinstance(node, Mapping) and "w_router" in node


def _map_moe(tree, fn):
    """tree with fn applied to every MoE layer's State node (parameters and moments)."""
    return jax.tree.map(lambda n: fn(n) if _is_moe(n) else n, tree, is_leaf=_is_moe)


def stored(version: int, target):
    """The restore target of a checkpoint of format `version` for today's `target` (arrays
    or ShapeDtypeStructs, with their shardings): the same tree in that format's layout."""
    if target is None or version >= FUSED_GATE_UP:
        return target
    return _map_moe(target, _split_gate_up)


def upgrade(version: int, tree):
    """A tree restored from format `version`, in today's layout (its arrays' shardings
    follow from the stored ones)."""
    if tree is None or version >= FUSED_GATE_UP:
        return tree
    return _map_moe(tree, _fuse_gate_up)


def _split_gate_up(ffn: Mapping) -> Mapping:
    """w_gate_up [..., D, 2, F] -> w_gate, w_up [..., D, F] as ShapeDtypeStructs."""
    fused = ffn["w_gate_up"]
    value = fused.get_value()
    sds = jax.ShapeDtypeStruct(
        value.shape[:-2] + value.shape[-1:], value.dtype, sharding=_without_pair_axis(value)
    )
    out = {k: v for k, v in ffn.items() if k != "w_gate_up"}
    out["w_gate"], out["w_up"] = fused.replace(sds), fused.replace(sds)
    return type(ffn)(out)


def _without_pair_axis(value):
    """The sharding of value [..., D, 2, F] without its pair axis (never sharded)."""
    sharding = getattr(value, "sharding", None)
    if not isinstance(sharding, NamedSharding):
        return sharding
    spec = tuple(sharding.spec) + (None,) * (value.ndim - len(sharding.spec))
    return NamedSharding(sharding.mesh, PartitionSpec(*spec[:-2], spec[-1]))


def _fuse_gate_up(ffn: Mapping) -> Mapping:
    gate, up = ffn["w_gate"], ffn["w_up"]
    out = {k: v for k, v in ffn.items() if k not in ("w_gate", "w_up")}
    out["w_gate_up"] = gate.replace(_stack_pair(gate.get_value(), up.get_value()))
    return type(ffn)(out)


def _stack_pair(gate, up):
    """[..., D, F] twice -> [..., D, 2, F], sharded as the halves are (jit keeps it so)."""
    sharding = getattr(gate, "sharding", None)
    if isinstance(sharding, NamedSharding):
        spec = tuple(sharding.spec) + (None,) * (gate.ndim - len(sharding.spec))
        out = NamedSharding(sharding.mesh, PartitionSpec(*spec[:-1], None, spec[-1]))
        return jax.jit(lambda g, u: jnp.stack([g, u], axis=-2), out_shardings=out)(gate, up)
    return jnp.stack([gate, up], axis=-2)


def stored_leaves(version: int, path: tuple) -> list[tuple]:
    """The stored parameter paths that today's parameter `path` is made of."""
    if version < FUSED_GATE_UP and path[-1] == "w_gate_up":
        return [path[:-1] + ("w_gate",), path[:-1] + ("w_up",)]
    return [path]


def combine_leaves(version: int, path: tuple, arrays: list[np.ndarray]) -> np.ndarray:
    """Today's parameter `path` from the host arrays of its stored_leaves."""
    if version < FUSED_GATE_UP and path[-1] == "w_gate_up":
        return np.stack(arrays, axis=-2)
    (array,) = arrays
    return array
