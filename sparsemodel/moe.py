"""Mixture-of-Experts layer: float32 router, index-based dispatch, SwiGLU experts.

    route    x[T, D] -> scores s[T, E], choices e[T, k], weights w[T, k]         (float32)
    dispatch (token, choice) assignments -> rows of an expert-major buffer      (by index)
    experts  SwiGLU on each expert's rows                                       (stacked weights)
    combine  y[t] = sum_j w[t, j] * expert_out[row of (t, j)]                   (by index)

Dispatch strategies (`moe.dispatch`), same maths:
  capacity  each expert takes at most C assignments of a group, the rest are dropped
            (contribute zero; the residual stream carries the token). `moe.capacity_group`:
            sequence  each sequence is a group, with C = ceil(k*train.seq_len/E *
                      capacity_factor) whatever the call's length, filled in position order
                      (all of token t's choices beat token t+1's): a token's fate depends
                      only on earlier tokens of its own sequence, so the layer is causal,
                      each sequence's output is independent of the batch, and cached
                      decoding (which carries each sequence's per-expert counts) gives the
                      full forward's outputs exactly.
            batch     the T tokens of the call (of the expert group, under a mesh) are one
                      group with C = ceil(k*T/E * capacity_factor), in token-major order
                      over the flattened batch: a sequence's drops depend on the other
                      sequences and on later positions, and decoding one token at a time
                      sees other groups than the full forward (it is not exact).
  dropless  every assignment is computed: rows sorted by expert and run through a grouped
            matmul (`moe.grouped_matmul`, chosen by kernels.py; grouped_matmul.py).
            `jax.lax.ragged_dot` is one on TPU, but XLA computes every expert on every row
            on CPU (E/k times the FLOPs). So on CPU each expert's rows go through its
            weights in a loop over blocks of up to `moe.block_size` rows ('blocks'), and
            on GPU all blocks of `block_size` rows run as one batched matmul ('batched').
            'tokamax' (an optional extra) runs tokamax's ragged_dot: Pallas kernels on
            GPU/TPU, XLA's ragged_dot on CPU.
Routing (token choice). Scores are the softmax over the experts or, with `moe.score=sigmoid`,
one sigmoid affinity per expert (DeepSeek-V3). A token takes the top-k experts by score, within
its best `moe.topk_groups` of `moe.groups` expert groups (group-limited routing: groups ranked
by the sum of their top-2 scores). Its combine weights are the chosen scores, renormalised over
the k (`moe.renormalize`, k > 1: at k = 1 the raw score, so the router gets gradient), times
`moe.route_scale`. Auxiliary-loss-free balancing (`moe.bias_rate` > 0): a per-expert bias,
non-trainable state of the layer (`RouterBias`), is added to the scores for the choice only,
and the train step moves it by bias_rate * sign(mean load - load) (`balanced_bias`).

Expert choice (`moe.router = "expert_choice"`): each expert picks its top-C tokens of the
group. It looks at the whole group at once, so it is NOT causal: a token's output can
depend on later tokens. Use it for encoders or experiments, not for generation.

Distribution. Under a mesh the layer runs in `shard_map`: each device routes its own
tokens; with `mesh.expert = n` the n devices of an expert group all-gather their tokens,
each runs only its E/n experts on the tokens routed to them, and a reduce-scatter returns
every token's sum to its owner (dropless stays exact: no capacity is involved).
FSDP-sharded weights are all-gathered per layer; tensor-sharded expert width gives partial
sums that are added over `tensor`. The batch is split by whole sequences, so per-sequence
capacity gives the single-device result on any mesh. Batch-group capacity and expert
choice see the tokens of one expert group: the same group on one device as on many only
when mesh.expert covers all batch shards.

Statistics and auxiliary losses are returned explicitly as `MoEStats`, computed from sums
over all devices' tokens, so they equal the single-device numbers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from sparsemodel import dispatch, kernels, sharding
from sparsemodel.config import Config
from sparsemodel.grouped_matmul import (
    StackedExperts,
    batched_swiglu,
    expert_rows,
    loop_swiglu,
    scan_swiglu,
    smallest_block,
)
from sparsemodel.layers import param, swiglu

# Logical axes of the layer's weights: used to create them and to shard_map over them.
AXES = {
    "router": ("embed", None),
    "router_bias": (None,),  # tiny, and every device routes its own tokens: replicated
    # gate then up on a middle axis of 2, so one unit's gate and up columns share a
    # `tensor` shard and run as one [D, 2F] matmul
    "gate_up": ("exp", "embed", None, "mlp"),
    "down": ("exp", "mlp", "embed"),
    "shared_gate": ("embed", "mlp"),
    "shared_up": ("embed", "mlp"),
    "shared_down": ("mlp", "embed"),
    "shared_sigmoid": ("embed", None),
}


class RouterBias(nnx.Variable):
    """The per-expert bias of auxiliary-loss-free balancing [E] (float32): model state, not a
    parameter, so the optimizer, its weight decay and the gradient never see it."""


class MoEStats(NamedTuple):
    """Per-layer router losses and load statistics (all float32)."""

    lb_loss: jax.Array  # [] Switch load balance, 1.0 when perfectly balanced
    z_loss: jax.Array  # [] mean squared log-partition of the router logits
    load: jax.Array  # [E] fraction of assignments routed to each expert (sums to 1)
    dropped: jax.Array  # [] fraction of assignments dropped (capacity) / tokens unserved (EC)
    entropy: jax.Array  # [] mean router entropy in nats
    max_load: jax.Array  # [] max over experts of load * E (1.0 when balanced)


class MoEOut(NamedTuple):
    """What one MoE layer call returns."""

    y: jax.Array  # [T, D] the layer's output, in x's dtype
    stats: MoEStats
    # [N, E] int32: each sequence's kept assignments, this call's added (capacity per
    # sequence when decoding with a cache, see `counts_per_sequence`), else None.
    expert_counts: jax.Array | None
    # The layer scan's stacked expert weights with this layer's gradient sink (when the
    # scan handed them in, kernels.Kernels.experts_in_place), else None.
    experts: StackedExperts | None


class Routing(NamedTuple):
    experts: jax.Array  # [T, k] int32 chosen expert per assignment; E marks "none"
    weights: jax.Array  # [T, k] float32 combine weights


class Served(NamedTuple):
    """What this device's experts did for the group's assignments (summed over devices by
    router_stats)."""

    y: jax.Array  # [T, D] outputs of this device's tokens (before the tensor-axis sum)
    load: jax.Array  # [E] float32 assignments routed to each expert
    dropped: jax.Array  # [] assignments (tokens, expert choice) that no expert served
    assigned: jax.Array  # [] assignments (tokens, expert choice) made
    # [N, E] float32 assignments routed to each expert in each of this device's sequences
    # (moe.lb_scope=sequence), else None
    seq_load: jax.Array | None = None


def counts_per_sequence(cfg: Config) -> bool:
    """Whether the layer keeps per-sequence expert counts: capacity dispatch of token choice
    with capacity_group=sequence (cached decoding carries them from call to call)."""
    moe_cfg = cfg.moe
    return (
        moe_cfg.dispatch == "capacity"
        and moe_cfg.router == "topk"
        and moe_cfg.capacity_group == "sequence"
    )


def _init_std(cfg: Config) -> tuple[float, float]:
    """(std of the input projections, std of the output projections)."""
    m = cfg.model
    return m.init_std, m.init_std / (2 * m.n_layers) ** 0.5


def expert_params(cfg: Config, rngs: nnx.Rngs) -> tuple[nnx.Param, nnx.Param]:
    """The routed experts' w_gate_up [E, D, 2, F] and w_down [E, F, D]."""
    std, out_std = _init_std(cfg)
    n, d, f = cfg.moe.num_experts, cfg.model.d_model, cfg.moe.d_expert
    return (
        param(rngs, (n, d, 2, f), AXES["gate_up"], std),
        param(rngs, (n, f, d), AXES["down"], out_std),
    )


class ExpertPool(nnx.Module):
    """moe.pool=global: the routed experts that every MoE layer routes into, held once by
    the Transformer (each layer keeps its own router) and handed to each layer's call."""

    def __init__(self, cfg: Config, *, rngs: nnx.Rngs):
        self.w_gate_up, self.w_down = expert_params(cfg, rngs)

    def weights(self) -> dict[str, jax.Array]:
        return {"gate_up": self.w_gate_up[...], "down": self.w_down[...]}


class MoE(nnx.Module):
    def __init__(self, cfg: Config, *, rngs: nnx.Rngs):
        m, moe_cfg = cfg.model, cfg.moe
        self.cfg = cfg
        std, out_std = _init_std(cfg)
        n, d = moe_cfg.num_experts, m.d_model
        fs = moe_cfg.shared_width
        self.w_router = param(rngs, (d, n), AXES["router"], std)
        if moe_cfg.bias_rate > 0:
            zeros = jnp.zeros((n,), jnp.float32)
            self.router_bias = RouterBias(
                zeros, out_sharding=AXES["router_bias"], eager_sharding=False
            )
        if moe_cfg.pool == "layer":  # else the Transformer's ExpertPool holds them
            self.w_gate_up, self.w_down = expert_params(cfg, rngs)
        if fs:  # shared experts: one always-on SwiGLU of width num_shared * d_shared
            self.w_shared_gate = param(rngs, (d, fs), AXES["shared_gate"], std)
            self.w_shared_up = param(rngs, (d, fs), AXES["shared_up"], std)
            self.w_shared_down = param(rngs, (fs, d), AXES["shared_down"], out_std)
        if moe_cfg.shared_gate:  # [D, 1]: each token's weight of the shared output
            self.w_shared_sigmoid = param(rngs, (d, 1), AXES["shared_sigmoid"], std)

    def weights(self) -> dict[str, jax.Array]:
        names = ["router"]
        if self.cfg.moe.pool == "layer":
            names += ["gate_up", "down"]
        if self.cfg.moe.num_shared:
            names += ["shared_gate", "shared_up", "shared_down"]
        if self.cfg.moe.shared_gate:
            names.append("shared_sigmoid")
        w = {n: getattr(self, f"w_{n}")[...] for n in names}
        if self.cfg.moe.bias_rate > 0:
            w["router_bias"] = self.router_bias[...]
        return w

    def __call__(
        self,
        x_td,
        mask_t=None,
        key=None,
        *,
        seq_len=None,
        expert_counts=None,
        experts=None,
        pool=None,
    ) -> MoEOut:
        """x_td [T, D] (compute dtype): N = T / seq_len sequences of seq_len tokens one after
        another (seq_len None: one sequence); mask_t [T] bool or None; key: jitter PRNG key or
        None; expert_counts [N, E] int32: the assignments each sequence's experts kept in
        earlier calls (cached decoding, see `counts_per_sequence`) or None; experts: the
        layer scan's StackedExperts, to read this layer's expert weights from, or None;
        pool: with moe.pool=global, the pool's weights {"gate_up", "down"} (ExpertPool),
        which this layer routes into; None with moe.pool=layer.
        """
        if (pool is None) != (self.cfg.moe.pool == "layer"):
            raise ValueError("moe.pool=global layers, and only they, take the pool's weights")
        if mask_t is None:
            mask_t = jnp.ones(x_td.shape[:1], bool)
        seq_len = x_td.shape[0] if seq_len is None else seq_len
        w = {**self.weights(), **(pool or {})}
        mesh = jax.sharding.get_abstract_mesh()
        fn = partial(moe_forward, self.cfg, kernels.choose(self.cfg), seq_len=seq_len)
        if mesh.empty or mesh.size == 1:
            # Outside any mesh, or on one device: the same function without shard_map, whose
            # backward would all-reduce every weight gradient over one device (a full copy).
            return fn(Collectives(), w, x_td, mask_t, key, expert_counts, experts)
        if experts is not None:
            raise ValueError("stacked expert weights are read in place on one device only")
        n_seqs, shards = x_td.shape[0] // seq_len, sharding.batch_divisor(mesh)
        if counts_per_sequence(self.cfg) and n_seqs % shards:
            raise ValueError(
                f"capacity per sequence needs whole sequences on each device: {n_seqs} "
                f"sequences on {shards} batch shards"
            )
        specs = {
            n: sharding.fit_spec(sharding.logical_to_spec(AXES[n]), w[n].shape, mesh) for n in w
        }
        batch = P(sharding.BATCH_AXES)
        counts_spec = None if expert_counts is None else batch

        def on_device(coll, w, x_td, mask_t, key, expert_counts):
            out = fn(coll, w, x_td, mask_t, key, expert_counts)
            return out.y, out.stats, out.expert_counts

        # check_vma=False: the block loop's lax.cond and scan carries would otherwise need
        # every branch and carry cast to the same varying axes; equality of sharded and
        # single-device training (tests/test_sharding.py) checks the result instead.
        y, stats, expert_counts = jax.shard_map(
            partial(on_device, Collectives.for_mesh(mesh, specs)),
            mesh=mesh,
            in_specs=(specs, batch, batch, None if key is None else P(), counts_spec),
            out_specs=(batch, P(), counts_spec),
            check_vma=False,
        )(w, x_td, mask_t, key, expert_counts)
        return MoEOut(y, stats, expert_counts, None)


# ------------------------------------------------------------------- collectives


@dataclass(frozen=True)
class Collectives:
    """The collectives of one MoE layer under shard_map; the defaults (no mesh) are no-ops."""

    specs: tuple[tuple[str, P], ...] = ()  # weight name -> PartitionSpec
    expert_size: int = 1  # devices per expert group
    batch_axes: tuple[str, ...] = ()  # axes over which tokens differ
    fsdp_size: int = 1  # devices that share each weight

    @classmethod
    def for_mesh(cls, mesh, specs: dict[str, P]) -> Collectives:
        return cls(
            tuple(specs.items()),
            mesh.shape["expert"],
            tuple(a for a in sharding.BATCH_AXES if mesh.shape[a] > 1),
            mesh.shape["fsdp"],
        )

    def spec(self, name: str) -> P:
        return dict(self.specs).get(name, P())

    def gather_weight(self, name: str, w):
        """FSDP: all-gather the dimensions sharded over `fsdp` (per layer, freed after).
        On one fsdp device XLA would still copy the whole weight (and its gradient)."""
        if self.fsdp_size == 1:
            return w
        for dim, axes in enumerate(self.spec(name)):
            if axes is not None and "fsdp" in ((axes,) if isinstance(axes, str) else axes):
                w = jax.lax.all_gather(w, "fsdp", axis=dim, tiled=True)
        return w

    def tensor_sharded(self, name: str) -> bool:
        return "tensor" in jax.tree.leaves(tuple(self.spec(name)))

    def sum_tensor(self, name: str, y):
        """Sum the partial outputs of weight `name`'s tensor-sharded width."""
        return jax.lax.psum(y, "tensor") if self.tensor_sharded(name) else y

    def device_key(self, key):
        """A key of this device's own, so that each device's tokens get their own noise."""
        if key is None or not self.batch_axes:
            return key
        return jax.random.fold_in(key, jax.lax.axis_index(self.batch_axes))

    def sum_batch(self, x):
        """Sum over every device's tokens (for statistics)."""
        return jax.lax.psum(x, self.batch_axes) if self.batch_axes else x

    def expert_offset(self, n_local: int):
        return jax.lax.axis_index("expert") * n_local if self.expert_size > 1 else 0

    def gather_tokens(self, x):
        """The expert group's tokens, in device order: [T, ...] -> [n * T, ...]."""
        if self.expert_size == 1:
            return x
        return jax.lax.all_gather(x, "expert", axis=0, tiled=True)

    def scatter_tokens(self, y):
        """Sum each token's partial outputs over the expert group, back to its owner."""
        if self.expert_size == 1:
            return y
        return jax.lax.psum_scatter(y, "expert", scatter_dimension=0, tiled=True)


# ------------------------------------------------------------------- the layer maths


def moe_forward(
    cfg: Config,
    kern: kernels.Kernels,
    coll: Collectives,
    w,
    x_td,
    mask_t,
    key=None,
    expert_counts=None,
    experts: StackedExperts | None = None,
    *,
    seq_len: int,
) -> MoEOut:
    """The MoE layer on this device's tokens, N = T / seq_len whole sequences (see
    MoE.__call__ for the arguments)."""
    w = {n: coll.gather_weight(n, v) for n, v in w.items()}
    with jax.named_scope("router"):
        logits, scores = route(cfg, w["router"], x_td, coll.device_key(key))  # [T, E] f32
    if cfg.moe.router == "expert_choice":
        served = expert_choice_layer(cfg, coll, w, x_td, scores, mask_t)
    else:
        served, expert_counts, experts = token_choice_layer(
            cfg, kern, coll, w, x_td, scores, mask_t, seq_len, expert_counts, experts
        )
    y = coll.sum_tensor("gate_up", served.y)
    if "shared_gate" in w:
        y = y + shared_experts(coll, w, x_td)
    stats = router_stats(logits, probabilities(cfg, scores), mask_t, served, coll.sum_batch)
    return MoEOut(y.astype(x_td.dtype), stats, expert_counts, experts)


def shared_experts(coll: Collectives, w, x_td):
    """The always-on shared experts' output [T, D], times sigmoid(x w_shared_sigmoid) [T, 1]
    when moe.shared_gate (Qwen2-MoE)."""
    y_shared = swiglu(x_td, w["shared_gate"], w["shared_up"], w["shared_down"])
    y_shared = coll.sum_tensor("shared_gate", y_shared)
    if "shared_sigmoid" in w:
        y_shared = y_shared * jax.nn.sigmoid(x_td @ w["shared_sigmoid"].astype(x_td.dtype))
    return y_shared


def token_choice_layer(
    cfg: Config, kern, coll: Collectives, w, x_td, scores, mask_t, seq_len, expert_counts, experts
):
    """Top-k routing of this device's tokens, run by the expert group's devices, each on its
    own experts: -> (Served, expert_counts, experts)."""
    moe_cfg = cfg.moe
    n_local = w["gate_up"].shape[0]  # experts held here: E / mesh.expert
    offset = coll.expert_offset(n_local)
    routing = top_k_routing(
        scores,
        mask_t,
        moe_cfg.top_k,
        moe_cfg.renormalize,
        bias=w.get("router_bias"),
        groups=moe_cfg.groups,
        topk_groups=moe_cfg.topk_groups,
        scale=moe_cfg.route_scale,
    )
    load = jnp.zeros((moe_cfg.num_experts + 1,), jnp.float32).at[routing.experts].add(1.0)
    group = Routing(coll.gather_tokens(routing.experts), coll.gather_tokens(routing.weights))
    local_e = group.experts - offset
    here = (local_e >= 0) & (local_e < n_local)
    group = group._replace(experts=jnp.where(here, local_e, n_local))  # n_local: elsewhere
    counts_g = None if expert_counts is None else coll.gather_tokens(expert_counts)
    local_counts = (  # [N_g, E_l]: the expert group's sequences, this device's experts
        None if counts_g is None else jax.lax.dynamic_slice_in_dim(counts_g, offset, n_local, 1)
    )
    x_g = coll.gather_tokens(x_td)  # the expert group's tokens
    y_g, kept, local_counts, experts = token_choice(
        cfg, kern, w, x_g, group, n_local, seq_len, local_counts, experts
    )
    if expert_counts is not None:
        # Each device fills its own experts' columns: summed over the group, each
        # sequence's row goes back to the device that holds the sequence.
        filled = jax.lax.dynamic_update_slice_in_dim(
            jnp.zeros_like(counts_g), local_counts, offset, axis=1
        )
        expert_counts = coll.scatter_tokens(filled)  # [N, E]
    # Each assignment is handled by exactly one device of the group: sum the kept ones.
    kept_n = jnp.sum(kept) if coll.expert_size == 1 else jax.lax.psum(jnp.sum(kept), "expert")
    assigned = jnp.sum(routing.experts < moe_cfg.num_experts)
    served = Served(
        y=coll.scatter_tokens(y_g),
        load=load[: moe_cfg.num_experts],
        dropped=assigned - kept_n / coll.expert_size,
        assigned=assigned,
        seq_load=(
            sequence_load(routing.experts, seq_len, moe_cfg.num_experts)
            if moe_cfg.lb_scope == "sequence"
            else None
        ),
    )
    return served, expert_counts, experts


def expert_choice_layer(cfg: Config, coll: Collectives, w, x_td, probs, mask_t) -> Served:
    """Each expert of the group takes its top-C tokens of the expert group's tokens."""
    n_local = w["gate_up"].shape[0]
    offset = coll.expert_offset(n_local)
    x_g, mask_g, probs_g = (coll.gather_tokens(a) for a in (x_td, mask_t, probs))
    y_g, served_g, chosen_e = expert_choice(cfg, w, x_g, probs_g, mask_g, offset)
    served = coll.scatter_tokens(served_g) > 0  # [T] served by any expert of the group
    load = jnp.zeros((cfg.moe.num_experts,), jnp.float32).at[offset + jnp.arange(n_local)]
    load = load.set(chosen_e)
    load = load if coll.expert_size == 1 else jax.lax.psum(load, "expert")
    return Served(
        y=coll.scatter_tokens(y_g),
        load=load / coll.expert_size,  # router_stats' sum over the batch axes counts it n times
        dropped=jnp.sum(~served & mask_t),
        assigned=jnp.sum(mask_t),
    )


def route(cfg: Config, w_router, x_td, key=None):
    """Router logits and scores in float32, [T, E] each: the softmax over the experts, or
    each expert's sigmoid affinity (moe.score=sigmoid)."""
    x32 = x_td.astype(jnp.float32)
    if key is not None and cfg.moe.jitter > 0:
        eps = cfg.moe.jitter
        x32 = x32 * jax.random.uniform(key, x32.shape, jnp.float32, 1 - eps, 1 + eps)
    logits = x32 @ w_router.astype(jnp.float32)
    if cfg.moe.score == "sigmoid":
        return logits, jax.nn.sigmoid(logits)
    return logits, jax.nn.softmax(logits, axis=-1)


def probabilities(cfg: Config, scores):
    """Each token's distribution over experts [T, E]: the softmax itself, or the sigmoid
    affinities normalised to sum 1 (DeepSeek-V3's s'), for the balance loss and entropy."""
    if cfg.moe.score == "sigmoid":
        return scores / jnp.sum(scores, axis=-1, keepdims=True)
    return scores


def top_k_routing(
    scores,
    mask_t,
    k: int,
    renormalize: bool,
    *,
    bias=None,
    groups: int = 1,
    topk_groups: int = 1,
    scale: float = 1.0,
) -> Routing:
    """Each token's top-k experts and their combine weights, from scores [T, E].

    The choice ranks scores + bias [E] (None: no bias) among the experts of the token's
    best topk_groups of `groups` groups; the weights are the chosen scores (never the bias),
    renormalised to sum 1 when `renormalize` and k > 1, times `scale`. At k = 1 the weight
    stays the raw score, as Switch keeps the softmax probability: a renormalised weight
    would be 1.0 and give the router no gradient from the LM loss.
    """
    choice = jax.lax.stop_gradient(scores if bias is None else scores + bias)  # [T, E]
    if groups > 1:
        choice = within_best_groups(choice, groups, topk_groups)
    _, top_e = jax.lax.top_k(choice, k)  # [T, k]
    top_w = jnp.take_along_axis(scores, top_e, axis=-1)
    if renormalize and k > 1:
        top_w = top_w / jnp.sum(top_w, axis=-1, keepdims=True)
    if scale != 1:
        top_w = top_w * scale
    n_experts = scores.shape[-1]
    top_e = jnp.where(mask_t[:, None], top_e, n_experts)  # padding tokens route nowhere
    return Routing(experts=top_e.astype(jnp.int32), weights=top_w)


def within_best_groups(choice, groups: int, topk_groups: int):
    """choice [T, E] with the experts outside each token's best topk_groups groups at -inf.

    Experts e = g * E/G + i form group g; a group ranks by the sum of its two best scores
    (DeepSeek-V3; its one score for groups of one expert)."""
    t, n_experts = choice.shape
    grouped = choice.reshape(t, groups, n_experts // groups)  # [T, G, E/G]
    top_in_group = jax.lax.top_k(grouped, min(2, n_experts // groups))[0]  # [T, G, 2]
    _, best = jax.lax.top_k(jnp.sum(top_in_group, axis=-1), topk_groups)  # [T, topk_groups]
    chosen = jnp.any(best[:, :, None] == jnp.arange(groups), axis=1)  # [T, G]
    return jnp.where(chosen[:, :, None], grouped, -jnp.inf).reshape(t, n_experts)


def sequence_load(experts_tk, seq_len: int, n_experts: int):
    """[N, E] float32 assignments to each expert in each sequence of seq_len tokens, from
    the choices [T, k] (n_experts marks none)."""
    per_seq = experts_tk.reshape(experts_tk.shape[0] // seq_len, -1)  # [N, S * k]
    rows = jnp.arange(per_seq.shape[0])[:, None]
    counts = jnp.zeros((per_seq.shape[0], n_experts + 1), jnp.float32).at[rows, per_seq].add(1.0)
    return counts[:, :n_experts]


def router_stats(logits, probs, mask_t, served: Served, reduce=lambda x: x) -> MoEStats:
    """Load-balance loss, ST-MoE z-loss and load statistics over non-padding tokens.

    The balance loss is E * sum_e f_e * P_e, f_e the fraction of assignments routed to
    expert e and P_e the mean of probs [T, E] (`probabilities`) over tokens, so a perfectly
    balanced router scores 1.0: over all tokens (Switch; lb_scope=batch) or per sequence and
    averaged over sequences, when served.seq_load holds each sequence's assignments
    (DeepSeek-V3's sequence-wise loss, normalised the same way; lb_scope=sequence).
    Every mean is a global sum divided by a global count (`reduce` sums over devices), so
    sharded runs report the single-device numbers."""
    n_experts = probs.shape[-1]
    valid = mask_t.astype(jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)
    entropy = -jnp.sum(probs * jnp.log(jnp.maximum(probs, 1e-20)), axis=-1)
    local = {
        "tokens": valid.sum(),
        "load": served.load,
        "prob": (probs * valid[:, None]).sum(0),
        "z": jnp.sum(valid * lse**2),
        "entropy": jnp.sum(valid * entropy),
        "dropped": jnp.asarray(served.dropped, jnp.float32),
        "assigned": jnp.asarray(served.assigned, jnp.float32),
    }
    if served.seq_load is not None:
        local["seq_lb"], local["seqs"] = sequence_balance_sums(probs, valid, served.seq_load)
    sums = reduce(local)
    n_tokens = jnp.maximum(sums["tokens"], 1.0)
    load = sums["load"] / jnp.maximum(sums["load"].sum(), 1.0)  # f_e
    mean_prob = sums["prob"] / n_tokens  # P_e
    if served.seq_load is None:
        lb_loss = n_experts * jnp.sum(load * mean_prob)
    else:
        lb_loss = sums["seq_lb"] / jnp.maximum(sums["seqs"], 1.0)
    return MoEStats(
        lb_loss=lb_loss,
        z_loss=sums["z"] / n_tokens,
        load=load,
        dropped=sums["dropped"] / jnp.maximum(sums["assigned"], 1.0),
        entropy=sums["entropy"] / n_tokens,
        max_load=n_experts * jnp.max(load),
    )


def sequence_balance_sums(probs, valid, seq_load):
    """(sum over sequences of E * sum_e f_e * P_e, number of sequences), over the sequences
    with a real token: probs [T, E], valid [T] float32, seq_load [N, E]."""
    n_seqs, n_experts = seq_load.shape
    valid_ns = valid.reshape(n_seqs, -1)  # [N, S]
    tokens_n = valid_ns.sum(-1)
    prob_ne = (probs.reshape(n_seqs, -1, n_experts) * valid_ns[..., None]).sum(1)  # [N, E]
    prob_ne = prob_ne / jnp.maximum(tokens_n, 1.0)[:, None]  # P_e per sequence
    frac_ne = seq_load / jnp.maximum(seq_load.sum(-1, keepdims=True), 1.0)  # f_e per sequence
    loss_n = n_experts * jnp.sum(frac_ne * prob_ne, axis=-1)
    has_tokens = tokens_n > 0
    return jnp.sum(jnp.where(has_tokens, loss_n, 0.0)), jnp.sum(has_tokens.astype(jnp.float32))


def balanced_bias(bias_ue, load_le, rate: float):
    """DeepSeek-V3's auxiliary-loss-free update: bias + rate * sign(mean load - load).

    bias_ue [U, E]: one row per unique MoE layer; load_le [L, E]: each applied MoE layer's
    fraction of the global batch's assignments (MoEStats.load), L = repeats * U with
    model.share_layers, whose repeats of a layer share its bias and pool their loads. The
    mean load is 1/E of the assignments: the sign needs no count, and a fraction equal to
    1/E (balanced) leaves the bias as it is."""
    n_units, n_experts = bias_ue.shape
    load_ue = load_le.reshape(-1, n_units, n_experts).mean(0)
    return bias_ue + rate * jnp.sign(1.0 / n_experts - load_ue)


def expert_capacity(n_tokens: int, k: int, n_experts: int, factor: float) -> int:
    return max(1, math.ceil(k * n_tokens / n_experts * factor))


def batched_experts(w, xb_ecd):
    """SwiGLU of each expert on its own buffer: [E, C, D] -> [E, C, D]."""
    dtype = xb_ecd.dtype
    e, d, _, f = w["gate_up"].shape
    # [E, D, 2F]: one batched matmul over both halves (an einsum keeping the pair axis
    # ran twice as slow on XLA:CPU)
    gate_up = w["gate_up"].astype(dtype).reshape(e, d, 2 * f)
    h = jnp.einsum("ecd,edf->ecf", xb_ecd, gate_up)  # [E, C, 2F]
    return jnp.einsum("ecf,efd->ecd", jax.nn.silu(h[..., :f]) * h[..., f:], w["down"].astype(dtype))


# ------------------------------------------------------------------ token choice


def token_choice(
    cfg: Config, kern, w, x_td, routing: Routing, n_experts: int, seq_len: int, counts, experts
):
    """Runs each assignment through its expert and combines: -> (y [T, D], kept [T, k],
    counts [N, n_experts] or None, experts).

    routing.experts index this device's n_experts experts; n_experts marks assignments
    handled elsewhere (or padding). x_td holds N = T / seq_len sequences; counts [N,
    n_experts] (or None): what their experts kept in earlier calls (capacity per sequence).
    """
    kept = routing.experts < n_experts
    if cfg.moe.dispatch == "capacity":
        y_rd, layout, kept, counts = capacity_experts(
            cfg, w, x_td, routing, n_experts, seq_len, counts
        )
    elif kern.grouped_matmul == "ragged_dot":
        y_rd, layout = dropless_ragged(w, x_td, routing, n_experts)
    elif kern.grouped_matmul == "tokamax":
        y_rd, layout = dropless_tokamax(w, x_td, routing, n_experts)
    else:
        y_rd, layout, experts = dropless_blocks(w, x_td, routing, n_experts, cfg, kern, experts)
    with jax.named_scope("combine"):
        y = dispatch.combine(y_rd, jnp.where(kept, routing.weights, 0.0), layout)
    return y, kept, counts, experts


def capacity_experts(cfg: Config, w, x_td, routing: Routing, n_experts: int, seq_len, counts):
    """Each expert's kept assignments through it, one batched matmul over the expert-major
    buffer: -> (y [R, D], layout, kept [T, k], counts [N, n_experts] or None)."""
    moe_cfg = cfg.moe
    factor = moe_cfg.capacity_factor
    if moe_cfg.capacity_group == "sequence":  # the training length's capacity, in every call
        capacity = expert_capacity(cfg.train.seq_len, moe_cfg.top_k, moe_cfg.num_experts, factor)
        placed = dispatch.capacity_rows(routing.experts, n_experts, capacity, seq_len, counts)
        counts = None if counts is None else placed.counts
    else:  # all tokens of the group share each expert's capacity; no counts to carry
        capacity = expert_capacity(x_td.shape[0], moe_cfg.top_k, moe_cfg.num_experts, factor)
        placed = dispatch.capacity_rows(routing.experts, n_experts, capacity)
    layout = dispatch.layout_from_rows(placed.rows, placed.n_rows)
    with jax.named_scope("dispatch"):
        xb = dispatch.gather_rows(x_td, layout)  # [R, D], R = E * N * S
    with jax.named_scope("experts"):
        yb = batched_experts(w, xb.reshape(n_experts, -1, xb.shape[-1]))  # [E, N * S, D]
    return yb.reshape(placed.n_rows, -1), layout, placed.keep, counts


def dropless_blocks(w, x_td, routing: Routing, n_experts: int, cfg: Config, kern, experts):
    """Each expert's rows through its weights in blocks: -> (y [R, D], layout, experts).

    'blocks' pads each expert to a multiple of smallest_block(block) rows and loops (CPU),
    reading `experts` (the layer scan's stack) when given, this layer's weights otherwise;
    'block_scan' is its FLOP-countable form; 'batched' pads to whole blocks and runs them
    all in one batched matmul (GPU).
    """
    block, kind = cfg.moe.block_size, kern.grouped_matmul
    unit = block if kind == "batched" else smallest_block(block)
    rows = expert_rows(routing.experts, n_experts, unit)
    n_rows = rows.block_expert.shape[0] * unit
    layout = dispatch.layout_from_rows(rows.rows, n_rows)
    with jax.named_scope("dispatch"):
        xr = dispatch.gather_rows(x_td, layout)  # [R, D]
    with jax.named_scope("experts"):
        if kind == "batched":
            x_nbd = xr.reshape(-1, unit, xr.shape[-1])  # [R/B, B, D]
            y_nbd = batched_swiglu(x_nbd, rows.block_expert, w["gate_up"], w["down"])
            yr = y_nbd.reshape(xr.shape)
        elif kind == "block_scan":
            yr = scan_swiglu(xr, rows, block, w["gate_up"], w["down"])
        else:
            stack = experts or StackedExperts.single(w["gate_up"], w["down"])
            yr, stack = loop_swiglu(xr, rows, block, stack, kern.recompute_gate_up)
            experts = None if experts is None else stack
    return yr, layout, experts


def dropless_ragged(w, x_td, routing: Routing, n_experts: int, ragged_dot=jax.lax.ragged_dot):
    """Rows sorted by expert through `ragged_dot` (jax.lax's: GPU/TPU): -> (y [T*k, D], layout).

    ragged_dot needs every row in a group: rows for no local expert ride in the last group
    and get weight zero in the combine.
    """
    dtype = x_td.dtype
    flat_e = routing.experts.reshape(-1)  # [A]; n_experts marks "not here"
    layout = dispatch.layout_from_order(jnp.argsort(flat_e, stable=True), routing.experts.shape[1])
    group_sizes = jnp.bincount(jnp.minimum(flat_e, n_experts - 1), length=n_experts)
    with jax.named_scope("dispatch"):
        xs = dispatch.gather_rows(x_td, layout)  # [A, D] rows sorted by expert
    e, d, _, f = w["gate_up"].shape
    with jax.named_scope("experts"):
        gate_up = w["gate_up"].astype(dtype).reshape(e, d, 2 * f)
        h = ragged_dot(xs, gate_up, group_sizes)  # [A, 2F]
        ys = ragged_dot(jax.nn.silu(h[:, :f]) * h[:, f:], w["down"].astype(dtype), group_sizes)
    return ys, layout


def dropless_tokamax(w, x_td, routing: Routing, n_experts: int):
    """`dropless_ragged` through tokamax's ragged_dot: -> (y [T*k, D], layout).

    tokamax picks its implementation per call: the first of its Pallas kernels (Mosaic,
    then Triton) that supports the device and shapes, with its autotuned configuration
    where its cache has one and its heuristics otherwise, and its XLA implementation
    (jax.lax.ragged_dot) where none does, as on CPU.
    """
    return dropless_ragged(w, x_td, routing, n_experts, _tokamax().ragged_dot)


def _tokamax():
    """The tokamax package (the optional `tokamax` extra; config.validate checks it is there).

    tokamax reads its options from absl flags and, on the first read, parses sys.argv as
    absl flags unless something parsed them before: the `sparsemodel` command's arguments
    would fail that parse, so the flags are marked parsed, at their defaults.
    """
    import tokamax
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
    return tokamax


# ----------------------------------------------------------------- expert choice


def expert_choice(cfg: Config, w, x_td, probs, mask_t, offset):
    """Each of this device's experts takes its top-C tokens of the group by probability.

    Returns y [T, D], served [T] (experts here that took each token) and per-expert counts.
    """
    moe_cfg = cfg.moe
    n_local = w["gate_up"].shape[0]
    t = x_td.shape[0]
    capacity = expert_capacity(t, moe_cfg.top_k, moe_cfg.num_experts, moe_cfg.capacity_factor)
    capacity = min(t, capacity)
    with jax.named_scope("dispatch"):
        local_p = jax.lax.dynamic_slice_in_dim(probs, offset, n_local, axis=1)  # [T, E_l]
        scores = jnp.where(mask_t[:, None], local_p, -1.0).T  # [E_l, T]
        weight_ec, token_ec = jax.lax.top_k(scores, capacity)  # [E_l, C]
        taken = weight_ec >= 0
        weight_ec = jnp.where(taken, weight_ec, 0.0)
        xb = x_td[token_ec]  # [E_l, C, D]
    with jax.named_scope("experts"):
        yb = batched_experts(w, xb)
    with jax.named_scope("combine"):
        contrib = (yb * weight_ec[..., None].astype(yb.dtype)).reshape(-1, x_td.shape[1])
        y = jnp.zeros_like(x_td).at[token_ec.reshape(-1)].add(contrib)
    served = jnp.zeros((t,), jnp.float32).at[token_ec.reshape(-1)].add(taken.reshape(-1))
    return y, served, taken.sum(-1).astype(jnp.float32)
