"""`sparsemodel upcycle`: an MoE model started from a dense checkpoint (sparse upcycling).

    dense workdir (config.yaml, a checkpoint)  ->  new workdir, parameters-only step 0

The MoE config is the dense one, then the method's defaults, then --set overrides; the
model's shape (model.*) stays the dense one's. Attention, norms, embeddings and the MLPs of
layers that stay dense are copied. Each MoE layer's experts are made from the dense
layer's SwiGLU MLP (w_gate, w_up [D, F], w_down [F, D]):

  copy      every expert is the MLP (d_expert = d_ff). With dropless dispatch, top-k >= 2
            and renormalised weights (they sum to 1), the layer's output is the MLP's
            whatever the router chooses: the logits are the dense model's.
  granular  the MLP's F intermediate units split into G = d_ff / d_expert slices, each
            copied c times (E = G * c; expert e is slice e mod G), top_k = G, w_down scaled
            by G: a token routed to one copy of every slice, each with weight 1/G, gets the
            MLP's output exactly; the router's unequal weights (and a token choosing two
            copies of one slice) make the step-0 loss differ a little.
  drop      copy, then in every expert a fraction R of the F intermediate units (their
            gate and up columns and down rows; a new draw per expert) re-drawn from
            N(mean, std^2) of the dense weight they replace: Drop-Upcycling (Nakamura et
            al., ICLR 2025), so that identical experts do not stay alike.
Routers start at N(0, router_std^2). The optimizer starts fresh (the step holds parameters
only). The new workdir is built beside its final name and renamed when complete, after
both models' step-0 eval losses are measured: a refusal or failure leaves nothing.
"""

from __future__ import annotations

import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx

from sparsemodel import config as config_lib
from sparsemodel import evaluate, sharding
from sparsemodel.checkpoint import Checkpointer
from sparsemodel.config import Config, ConfigError
from sparsemodel.initialize import abstract_params
from sparsemodel.workdir import built_beside, refuse_existing

METHODS = ("copy", "granular", "drop")
COPIES = 8  # experts per slice of the MLP unless moe.num_experts says otherwise
DEFAULT_DROP = 0.5  # the paper's best ratio
# What stays the dense model's: its shape, and the tokenizer its ids mean.
KEPT = [k for k in config_lib.SHAPE_FIELDS if k.startswith("model.")] + ["data.tokenizer"]


@dataclass(frozen=True)
class Recipe:
    """How the experts are made (the module docstring says what each method does)."""

    method: str
    router_std: float
    drop: float  # fraction of each expert's intermediate units re-drawn ('drop'; else 0)
    seed: int  # of the routers' and the re-drawn units' values


@dataclass
class Upcycled:
    cfg: Config  # the MoE model's
    recipe: Recipe
    dense_step: int
    dense: evaluate.EvalResult  # step-0 losses of the two, on the same tokens
    upcycled: evaluate.EvalResult


# ------------------------------------------------------------------------- the config


def slices(cfg: Config) -> int:
    """G: the slices of the dense MLP's width that the experts are made of."""
    return cfg.model.d_ff // cfg.moe.d_expert


def upcycled_config(dense: Config, method: str, overrides: dict[str, Any], where: str) -> Config:
    """The MoE config for upcycling `dense` (read from `where`) by `method`, or ConfigError."""
    if method not in METHODS:
        raise ConfigError(f"--method {method}: not one of {', '.join(METHODS)}")
    if dense.is_moe:
        raise ConfigError(
            f"{where}: holds an MoE model (moe.num_experts={dense.moe.num_experts}); "
            "upcycle starts from a dense one"
        )
    d_ff = dense.model.d_ff
    if method == "granular":
        if "moe.d_expert" not in overrides:
            raise ConfigError(
                f"--method granular: give the slice width, a divisor of model.d_ff={d_ff}, "
                "e.g. --set moe.d_expert=" + str(d_ff // 4)
            )
        width = dense.replace(overrides).moe.d_expert  # typed, checked once experts exist
        if width <= 0 or d_ff % width:
            raise ConfigError(
                f"moe.d_expert: {width} does not divide model.d_ff={d_ff} (granular splits "
                "the dense MLP into d_ff / d_expert slices)"
            )
        defaults = {"moe.top_k": d_ff // width, "moe.num_experts": COPIES * d_ff // width}
    else:
        defaults = {"moe.d_expert": d_ff, "moe.num_experts": COPIES}
    cfg = dense.replace({**defaults, **overrides})
    _check_upcyclable(dense, cfg, method)
    return cfg


def _check_upcyclable(dense: Config, cfg: Config, method: str) -> None:
    """ConfigError (one line) for an MoE config the dense model's weights cannot make."""
    e, d_ff = cfg.moe, cfg.model.d_ff
    ours, theirs = config_lib.model_record(cfg), config_lib.model_record(dense)
    for key in KEPT:
        if ours[key] != theirs[key]:
            raise ConfigError(
                f"{key}: {ours[key]}, but upcycling keeps the dense model's {theirs[key]}"
            )
    if not cfg.is_moe:
        raise ConfigError("moe.num_experts: must be >= 1 to upcycle")
    if e.num_shared:
        raise ConfigError(
            f"moe.num_shared: {e.num_shared}, but upcycling makes routed experts only "
            "(a shared expert has no dense weights to start from)"
        )
    if e.pool == "global":
        raise ConfigError(
            "moe.pool: global, but upcycling makes each layer's experts from that layer's "
            "MLP (use moe.pool=layer)"
        )
    if method != "granular" and e.d_expert != d_ff:
        raise ConfigError(
            f"moe.d_expert: {e.d_expert}, but --method {method} makes every expert the dense "
            f"MLP (d_expert = model.d_ff = {d_ff}); --method granular splits it"
        )
    g = slices(cfg)
    if method == "granular" and e.top_k != g:
        raise ConfigError(
            f"moe.top_k: {e.top_k}, but granular routes each token to one copy of each of "
            f"the {g} slices (top_k = d_ff / d_expert = {g})"
        )
    if method == "granular" and e.num_experts % g:
        raise ConfigError(
            f"moe.num_experts: {e.num_experts} is not a multiple of the {g} slices "
            "(granular copies every slice alike: E = slices x copies)"
        )


def make_recipe(
    cfg: Config, method: str, drop: float | None, router_std: float | None, seed: int | None
) -> Recipe:
    """The recipe, its defaults filled in (router_std: model.init_std; seed: train.seed;
    drop: DEFAULT_DROP), or ConfigError naming the flag."""
    if drop is not None and method != "drop":
        raise ConfigError(f"--drop: only --method drop re-initialises units (not {method})")
    drop = (DEFAULT_DROP if drop is None else drop) if method == "drop" else 0.0
    f = cfg.moe.d_expert
    if method == "drop" and not (0 < drop <= 1 and math.isfinite(drop)):
        raise ConfigError(f"--drop: must be in (0, 1], got {drop}")
    if method == "drop" and round(drop * f) == 0:
        raise ConfigError(f"--drop: {drop} re-initialises none of the {f} intermediate units")
    router_std = cfg.model.init_std if router_std is None else router_std
    if not (math.isfinite(router_std) and router_std >= 0):
        raise ConfigError(f"--router-std: must be finite and >= 0, got {router_std}")
    seed = cfg.train.seed if seed is None else seed
    if not 0 <= seed <= config_lib.MAX_SEED:
        raise ConfigError(f"--seed: must be in [0, 2**32 - 1], got {seed}")
    return Recipe(method, float(router_std), float(drop), seed)


# ---------------------------------------------------------------------- the weights


def upcycle_params(cfg: Config, dense: dict, recipe: Recipe) -> dict:
    """The MoE model's parameters (a pure dict of float32 numpy arrays, as nnx.to_pure_dict
    gives) from the dense model's (the same, with numpy leaves)."""
    rng = np.random.default_rng(recipe.seed)
    plan = cfg.layer_plan()
    dense_block = dense["units"]["blocks"][0]  # [layers, ...]: one block per stacked layer
    out = {k: v for k, v in dense.items() if k not in ("prefix", "units")}
    if plan.prefix:
        prefix = _block(dense_block, np.arange(plan.prefix), "dense", cfg, recipe, rng)
        out["prefix"] = {"blocks": {0: prefix}}
    blocks = {}
    for b, kind in enumerate(plan.unit):
        # Unit u's block b is layer prefix + u * len(unit) + b (the dense model stores
        # shared layers once, as the MoE model does: model.share_layers stays the same).
        layers = plan.prefix + np.arange(plan.unique_units) * len(plan.unit) + b
        blocks[b] = _block(dense_block, layers, kind, cfg, recipe, rng)
    out["units"] = {"blocks": blocks}
    return out


def _block(dense_block: dict, layers, kind: str, cfg: Config, recipe: Recipe, rng) -> dict:
    """One stacked block of the MoE model: the dense block's weights of `layers`, with its
    MLP made into experts when kind is 'moe'."""
    out = {name: jax.tree.map(lambda w: w[layers], part) for name, part in dense_block.items()}
    if kind == "moe":
        out["ffn"] = _experts(out["ffn"], cfg, recipe, rng)
    return out


def _experts(mlp: dict, cfg: Config, recipe: Recipe, rng: np.random.Generator) -> dict:
    """An MoE layer's weights from the dense MLP's w_gate, w_up [n, D, F], w_down [n, F, D]
    (n stacked layers)."""
    n, d, _ = mlp["w_gate"].shape
    g = slices(cfg)
    gate_up, down = slice_experts(mlp, g, cfg.moe.num_experts // g)
    if recipe.drop:
        redraw_units(gate_up, down, mlp, recipe.drop, rng)
    router = rng.normal(0.0, recipe.router_std, (n, d, cfg.moe.num_experts))
    return {"w_router": router.astype(np.float32), "w_gate_up": gate_up, "w_down": down}


def slice_experts(mlp: dict, n_slices: int, copies: int):
    """Experts made of slices of the MLP: w_gate_up [n, E, D, 2, F/G], w_down [n, E, F/G, D]
    with E = G * copies; expert e is slice e mod G (units [s F/G, (s+1) F/G)), its w_down
    scaled by G, so that the mean of one copy of every slice is the MLP."""
    n, d, f = mlp["w_gate"].shape
    width = f // n_slices
    gate_up = np.stack([mlp["w_gate"], mlp["w_up"]], axis=-2)  # [n, D, 2, F]
    gate_up = gate_up.reshape(n, d, 2, n_slices, width).transpose(0, 3, 1, 2, 4)  # [n,G,D,2,W]
    down = mlp["w_down"].reshape(n, n_slices, width, d) * n_slices  # [n, G, W, D]
    tile = lambda w: np.tile(w, (1, copies) + (1,) * (w.ndim - 2))  # noqa: E731 - [n, G*c, ...]
    return tile(gate_up).astype(np.float32), tile(down).astype(np.float32)


def redraw_units(gate_up, down, mlp: dict, fraction: float, rng: np.random.Generator) -> None:
    """In place: in every layer and expert, round(fraction * F) intermediate units, drawn anew
    for each expert, get gate and up columns and a down row from N(mean, std^2) of the
    layer's dense w_gate, w_up and w_down respectively (Drop-Upcycling)."""
    n, n_experts, d, _, f = gate_up.shape
    k = round(fraction * f)
    for i in range(n):
        stats = [(w[i].mean(), w[i].std()) for w in (mlp["w_gate"], mlp["w_up"], mlp["w_down"])]
        for e in range(n_experts):
            units = rng.choice(f, size=k, replace=False)
            for j in (0, 1):  # gate, up
                gate_up[i, e, :, j][:, units] = rng.normal(*stats[j], (d, k))
            down[i, e][units] = rng.normal(*stats[2], (k, d))


# ------------------------------------------------------------------------ the command


def upcycle(
    src: str | Path,
    workdir: str | Path,
    method: str = "copy",
    overrides: dict[str, Any] | None = None,
    *,
    drop: float | None = None,
    router_std: float | None = None,
    seed: int | None = None,
    step: int | None = None,
    max_tokens: int | None = 65_536,
) -> Upcycled:
    """Writes an MoE workdir upcycled from the dense workdir src (its checkpoint `step`,
    default the newest) and measures both models' step-0 eval loss on the same tokens.

    Every check runs before anything is written; a refusal or a failure leaves nothing.
    """
    src, workdir = Path(src), Path(workdir)
    dense_cfg = evaluate.stored_config(src, "--from")
    cfg = upcycled_config(dense_cfg, method, overrides or {}, f"--from {src}")
    recipe = make_recipe(cfg, method, drop, router_std, seed)
    refuse_existing(workdir, f"--workdir {workdir}")
    dense = evaluate.restore(src, step, flag="--from")
    dense_eval = evaluate.evaluate(dense, max_tokens=max_tokens)
    host = jax.tree.map(np.asarray, nnx.to_pure_dict(dense.params))
    _, state = abstract_params(cfg, sharding.make_mesh(config_lib.MeshConfig()))
    nnx.replace_by_pure_dict(state, upcycle_params(cfg, host, recipe))
    with built_beside(workdir, f"--workdir {workdir}") as build:
        if (src / "tokenizer.json").is_file():
            shutil.copyfile(src / "tokenizer.json", build / "tokenizer.json")
        config_lib.dump(cfg, build / "config.yaml")
        ckpt = Checkpointer(build, async_save=False)
        source = f"upcycle --method {method} of {src} step {dense.step}"
        meta = {"step": 0, "seed": cfg.train.seed, "source": source}
        ckpt.save_host_params(0, state, meta | {"model": config_lib.model_record(cfg)})
        ckpt.close()
        upcycled_eval = evaluate.evaluate(evaluate.restore(build), max_tokens=max_tokens)
    return Upcycled(cfg, recipe, dense.step, dense_eval, upcycled_eval)
