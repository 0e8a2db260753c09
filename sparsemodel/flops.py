"""What a config holds and what each token costs, from the config alone (no arrays).

Conventions (MaxText / PaLM): model FLOPs of a training step are 6 x active matmul
parameters per token (forward 2, backward 4; the router and the unembedding count, the
embedding lookup does not) plus causal attention 6 * L * S * H * d_head per token (half of
the full S x S score and value matmuls). A forward pass (eval) is a third of that.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from sparsemodel.config import Config


@dataclass(frozen=True)
class ParamCounts:
    total: int  # parameters as if no layer were shared (a global expert pool counts once)
    unique: int  # parameters actually stored (after model.share_layers)
    embedding: int  # token embedding (+ unembedding when untied)
    active_per_token: int  # used by one token: everything but unchosen experts and the lookup
    breakdown: dict[str, int]  # stored parameters by component (unique)

    def as_dict(self):
        return asdict(self)


# Per-layer parts that are not multiplied by activations: they count as parameters, not
# as FLOPs (matmul_params_per_token).
NOT_MATMUL = ("norms", "attention_biases")


def _layer_params(cfg: Config, kind: str) -> dict[str, int]:
    m, e = cfg.model, cfg.moe
    d, dh, h, kv = m.d_model, m.d_head, m.n_heads, m.n_kv_heads
    qk_norm_scales = {"none": 0, "head": 2 * dh, "full": (h + kv) * dh}[m.qk_norm]
    out = {
        "attention": d * dh * (2 * h + 2 * kv),
        "attention_biases": (h + 2 * kv) * dh if m.qkv_bias else 0,
        "norms": 2 * d + qk_norm_scales,
    }
    if kind == "dense":
        out["dense_mlp"] = 3 * d * m.d_ff
    else:
        out["router"] = d * e.num_experts
        out["experts"] = 3 * d * e.d_expert * e.num_experts if e.pool == "layer" else 0
        out["shared_experts"] = 3 * d * e.shared_width + (d if e.shared_gate else 0)
    return out


def param_counts(cfg: Config) -> ParamCounts:
    m, e = cfg.model, cfg.moe
    kinds = cfg.layer_plan().kinds()
    per_layer = [_layer_params(cfg, k) for k in kinds]
    embed = m.vocab_size * m.d_model * (1 if m.tie_embeddings else 2)

    def add(layers):
        acc: dict[str, int] = {}
        for layer in layers:
            for k, v in layer.items():
                acc[k] = acc.get(k, 0) + v
        return acc

    total_parts = add(per_layer)
    # With sharing, the g unique layers are the first g of the (identical-kind) cycle.
    g = m.share_layers or len(kinds)
    unique_parts = add(per_layer[:g])
    for parts in (total_parts, unique_parts):
        parts["norms"] = parts.get("norms", 0) + m.d_model  # final norm
        parts["embeddings"] = embed
        if cfg.is_moe and e.pool == "global":  # one pool, stored once, used by every layer
            parts["experts"] = 3 * m.d_model * e.d_expert * e.num_experts
    active = 0
    for kind, layer in zip(kinds, per_layer, strict=True):
        active += layer["attention"] + sum(layer[part] for part in NOT_MATMUL)
        if kind == "dense":
            active += layer["dense_mlp"]
        else:
            active += (
                layer["router"] + layer["shared_experts"] + 3 * m.d_model * e.d_expert * e.top_k
            )
    active += m.d_model + m.vocab_size * m.d_model  # final norm, unembedding (not the lookup)
    return ParamCounts(
        total=sum(total_parts.values()),
        unique=sum(unique_parts.values()),
        embedding=embed,
        active_per_token=active,
        breakdown=unique_parts,
    )


def matmul_params_per_token(cfg: Config) -> int:
    """Active parameters that multiply a token's activations (norm scales and biases
    excluded)."""
    layers = [_layer_params(cfg, kind) for kind in cfg.layer_plan().kinds()]
    not_matmul = sum(layer[part] for layer in layers for part in NOT_MATMUL)
    return param_counts(cfg).active_per_token - not_matmul - cfg.model.d_model  # final norm


def attention_flops_per_token(cfg: Config, seq_len: int | None = None) -> float:
    """Training FLOPs of the causal score and value matmuls, per token."""
    m = cfg.model
    s = seq_len or cfg.train.seq_len
    # forward: 2*S*H*dh for q.k and as much for p.v, halved by the causal mask; x3 to train
    return 6.0 * m.n_layers * s * m.n_heads * m.d_head


def model_flops_per_token(cfg: Config, seq_len: int | None = None) -> float:
    """Training (forward + backward) model FLOPs per token."""
    return 6.0 * matmul_params_per_token(cfg) + attention_flops_per_token(cfg, seq_len)
