"""A model's parameters on a mesh: abstract (for sizing and restore targets) or born sharded.

Parameters are never materialised whole on one device: `init_params` runs the initializer
inside `jax.jit` with `out_shardings` from the logical-axis table, so each device creates
only its own shards.
"""

from __future__ import annotations

import jax
from flax import nnx
from jax.sharding import Mesh

from sparsemodel import sharding
from sparsemodel.config import Config
from sparsemodel.model import Transformer


def abstract_params(cfg: Config, mesh: Mesh, seed: int = 0):
    """(graphdef, State of ShapeDtypeStructs carrying their NamedShardings); allocates nothing."""
    abstract_model = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(seed)))
    graphdef, state = nnx.split(abstract_model, nnx.Param)
    shardings = sharding.state_shardings(state, mesh)
    target = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings
    )
    return graphdef, target


def init_params(cfg: Config, mesh: Mesh, seed: int):
    """(graphdef, params State) with every array created directly in its sharding."""
    graphdef, target = abstract_params(cfg, mesh, seed)
    shardings = jax.tree.map(lambda x: x.sharding, target)

    def init():
        return nnx.split(Transformer(cfg, rngs=nnx.Rngs(seed)), nnx.Param)[1]

    return graphdef, jax.jit(init, out_shardings=shardings)()


def count(state) -> int:
    return sum(x.size for x in jax.tree.leaves(state))
