"""The peer for `hf_mixtral_speedup`: Hugging Face transformers' Mixtral, trained on CPU.

Both sides train the same model (PEER below): vocab 256, d_model 256, 4 layers, 4 heads,
8 experts top-2 of width 512, sequence 256, batch 16, AdamW, float32, router load-balance
loss on (coefficient 0.01). Needs the `hf` extra (torch CPU + transformers): without it
`missing_extra` names what is missing and `train_step_runner` returns None.
"""

from __future__ import annotations

import importlib.util
import time

PEER = {  # our config keys; the transformers side is built from the same numbers
    "model.vocab_size": 256,
    "model.d_model": 256,
    "model.n_layers": 4,
    "model.n_heads": 4,
    "model.n_kv_heads": 4,
    "moe.num_experts": 8,
    "moe.top_k": 2,
    "moe.d_expert": 512,
    "moe.lb_coef": 0.01,
    "moe.z_coef": 0.0,  # Mixtral has no z-loss
    "train.seq_len": 256,
    "train.batch_size": 16,
    "train.dtype": "float32",
}


def missing_extra() -> str | None:
    """One line naming the peer's packages that are not installed and how to get them, or
    None when both are."""
    missing = [name for name in ("torch", "transformers") if importlib.util.find_spec(name) is None]
    if not missing:
        return None
    return (
        f"bench: the transformers peer needs the `hf` extra ({' and '.join(missing)} not "
        "installed): pip install -e '.[hf]', or make bench"
    )


def train_step_runner(experts_implementation: str = "eager", lr: float = 3e-3):
    """A zero-argument callable timing one transformers Mixtral train step, or None.

    experts_implementation: transformers' expert kernels, "eager" (a loop over the experts
    that received tokens), "grouped_mm" or "batched_mm".
    """
    try:
        import torch
        from transformers import MixtralConfig, MixtralForCausalLM
    except ImportError:
        return None
    torch.manual_seed(0)
    config = MixtralConfig(
        vocab_size=PEER["model.vocab_size"],
        hidden_size=PEER["model.d_model"],
        intermediate_size=PEER["moe.d_expert"],
        num_hidden_layers=PEER["model.n_layers"],
        num_attention_heads=PEER["model.n_heads"],
        num_key_value_heads=PEER["model.n_kv_heads"],
        num_local_experts=PEER["moe.num_experts"],
        num_experts_per_tok=PEER["moe.top_k"],
        max_position_embeddings=PEER["train.seq_len"],
        output_router_logits=True,  # adds router_aux_loss_coef * load-balance loss to .loss
        router_aux_loss_coef=PEER["moe.lb_coef"],
        tie_word_embeddings=False,
        experts_implementation=experts_implementation,
    )
    model = MixtralForCausalLM(config).float().train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    gen = torch.Generator().manual_seed(0)
    shape = (PEER["train.batch_size"], PEER["train.seq_len"] + 1)
    batch = torch.randint(0, PEER["model.vocab_size"], shape, generator=gen)
    inputs, labels = batch[:, :-1], batch[:, 1:]

    def step():
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        out = model(input_ids=inputs)  # labels are pre-shifted, so the loss is ours to take
        logits = out.logits.reshape(-1, config.vocab_size)
        loss = torch.nn.functional.cross_entropy(logits, labels.reshape(-1))
        loss = loss + config.router_aux_loss_coef * out.aux_loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        return time.perf_counter() - t0

    step()  # warm-up
    return step


def matmul_runner(m: int, k: int, n: int, calls: int = 20):
    """A zero-argument callable timing `calls` float32 [m, k] @ [k, n] in torch (oneDNN),
    or None: the peer's matmul speed, to hold against XLA's on the same shapes."""
    try:
        import torch
    except ImportError:
        return None
    a, b = torch.ones(m, k), torch.ones(k, n)

    def run():
        t0 = time.perf_counter()
        for _ in range(calls):
            torch.mm(a, b)
        return time.perf_counter() - t0

    run()  # warm-up
    return run
