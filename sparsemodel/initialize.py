"""A model's parameters on a mesh: abstract (for sizing and restore targets) or born sharded.

Parameters are never materialised whole on one device: `init_params` runs the initializer
inside `jax.jit` with `out_shardings` from the logical-axis table, so each device creates
only its own shards.

The state a model holds (MODEL_STATE) is its parameters and, with moe.bias_rate > 0, the
routers' bias: non-trainable, so it is left out of the optimizer (`trainable`), and saved,
restored and merged into the model with the parameters (it changes which experts run).
"""

from __future__ import annotations

import jax
from flax import nnx
from jax.sharding import Mesh

from sparsemodel import sharding
from sparsemodel.config import Config
from sparsemodel.model import Transformer
from sparsemodel.moe import RouterBias

MODEL_STATE = (nnx.Param, RouterBias)  # every Variable a model holds


def abstract_params(cfg: Config, mesh: Mesh, seed: int = 0):
    """(graphdef, State of ShapeDtypeStructs carrying their NamedShardings); allocates nothing."""
    # jax.eval_shape rather than nnx.eval_shape: the latter turns our logical axis names
    # into mesh shardings itself, which fails under a mesh whose axes have other names.
    graphdef, state = jax.eval_shape(
        lambda: nnx.split(Transformer(cfg, rngs=nnx.Rngs(seed)), MODEL_STATE)
    )
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
        return nnx.split(Transformer(cfg, rngs=nnx.Rngs(seed)), MODEL_STATE)[1]

    return graphdef, jax.jit(init, out_shardings=shardings)()


def trainable(state: nnx.State) -> nnx.State:
    """The parameters of a model's state: what the optimizer updates (not the router bias)."""
    return nnx.filter_state(state, nnx.Param)


def count(state) -> int:
    """Parameters in a model's state (arrays or ShapeDtypeStructs)."""
    return sum(x.size for x in jax.tree.leaves(trainable(state)))


def init_opt_state(tx, params, mesh: Mesh):
    """Optimizer state born sharded like the parameters it mirrors (Adam's mu and nu);
    scalars such as the step count are replicated. params: a model's state, of which the
    trainable parameters count."""
    params = trainable(params)
    param_shardings = jax.tree.map(lambda x: x.sharding, params)
    param_tree = jax.tree.structure(params)
    mirrors_params = lambda x: jax.tree.structure(x) == param_tree  # noqa: E731
    shardings = jax.tree.map(
        lambda x: param_shardings if mirrors_params(x) else sharding.replicated(mesh),
        jax.eval_shape(tx.init, params),
        is_leaf=mirrors_params,
    )
    return jax.jit(tx.init, out_shardings=shardings)(params)
