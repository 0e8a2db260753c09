"""Evaluation and sampling from a workdir's checkpoint.

Both restore parameters only (no optimizer state) onto whatever devices are present: the
restore target carries shardings for a fresh all-data mesh, whatever mesh trained it.
The model config always comes from the workdir's config.yaml, the tokenizer from
`tokenizer.for_workdir` (bytes, or the workdir's tokenizer.json).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sparsemodel import config as config_lib
from sparsemodel import data as data_lib
from sparsemodel import hardware, sharding
from sparsemodel import tokenizer as tokenizer_lib
from sparsemodel.checkpoint import Checkpointer, CheckpointError
from sparsemodel.config import Config, ConfigError, MeshConfig
from sparsemodel.initialize import abstract_params
from sparsemodel.steps import evaluate_batches, make_eval_step


@dataclass
class Restored:
    cfg: Config
    step: int
    graphdef: nnx.GraphDef
    params: nnx.State
    mesh: jax.sharding.Mesh
    workdir: Path | None = None

    def model(self):
        return nnx.merge(self.graphdef, self.params)

    def tokenizer(self) -> tokenizer_lib.Tokenizer:
        return tokenizer_lib.for_workdir(self.cfg, self.workdir or Path("."))


def stored_config(workdir: Path, flag: str = "--workdir") -> Config:
    """A workdir's config.yaml; ConfigError naming `flag` when it is not a workdir."""
    if not workdir.is_dir():
        raise ConfigError(f"{flag} {workdir}: not a directory")
    if not (workdir / "config.yaml").is_file():
        raise ConfigError(f"{flag} {workdir}: no config.yaml (not a sparsemodel workdir)")
    return config_lib.load_stored(workdir / "config.yaml")


def restore(workdir: str | Path, step: int | None = None, flag: str = "--workdir") -> Restored:
    """Loads config.yaml and the parameters of checkpoint `step` (default: the newest);
    errors name the workdir as `flag` gave it."""
    workdir = Path(workdir)
    cfg = stored_config(workdir, flag).replace(
        {"mesh.data": -1, "mesh.fsdp": 1, "mesh.expert": 1, "mesh.tensor": 1}
    )
    ckpt = Checkpointer(workdir, async_save=False)
    if ckpt.latest_step() is None:
        raise CheckpointError(f"{flag} {workdir}: holds no checkpoint yet")
    mesh = sharding.make_mesh(MeshConfig())
    graphdef, target = abstract_params(cfg, mesh)
    step, params, _ = ckpt.read(step, target, model=cfg)
    ckpt.close()
    return Restored(cfg, step, graphdef, params, mesh, workdir)


@dataclass
class EvalResult:
    loss: float  # nats per token
    perplexity: float
    bits_per_byte: float
    tokens: int
    step: int
    source: str

    def as_dict(self):
        return dict(self.__dict__)


def evaluate(
    r: Restored,
    source: str | None = None,
    max_tokens: int | None = 262_144,
    batch_size: int | None = None,
) -> EvalResult:
    """Loss on the held-out split of the training source, or on all of `source`.

    About `max_tokens` tokens (rounded up to whole batches; None: everything), in windows
    spread evenly over the text.
    Bits per byte divide the nats by the bytes of text the evaluated tokens stand for, so
    they compare across tokenizers.
    """
    t = r.cfg.train
    tok = r.tokenizer()
    if source is None:
        raw = data_lib.load_corpus(r.cfg.data.source, r.cfg.data.val_fraction)
        tokens = data_lib.tokenize(raw, tok, r.workdir, log=_quiet).val
        name = f"{r.cfg.data.source} (validation split)"
    else:
        tokens, name = _all_tokens(source, tok, r.workdir), source
    data_lib.check_token_ids(name, r.cfg.model.vocab_size, tokens)
    div = sharding.batch_divisor(r.mesh)
    batch = batch_size or max(div, t.batch_size // div * div)
    seq = min(t.seq_len, len(tokens) - 1)
    if seq < 1:
        raise ConfigError(f"--data {name}: too short to evaluate ({len(tokens)} tokens)")
    # Short texts: shrink the batch so at least one batch of windows fits.
    batch = max(div, min(batch, data_lib.num_windows(tokens, seq) // div * div))
    data_lib.check_length(tokens, seq, batch, "evaluation", name)
    max_batches = None if max_tokens is None else max(1, max_tokens // (batch * seq))
    batches = data_lib.eval_batches(
        tokens, seq, batch, max_batches, jax.process_index(), jax.process_count()
    )
    eval_step = jax.jit(make_eval_step(r.graphdef))
    loss, n = evaluate_batches(eval_step, r.params, batches, r.mesh)
    # Every process counts the bytes of the whole global batch (not just its share).
    n_bytes = bytes_covered(data_lib.eval_batches(tokens, seq, batch, max_batches), tok)
    bytes_per_token = n_bytes / n if n_bytes else 1.0  # exactly 1.0 for bytes
    return EvalResult(
        loss=loss,
        perplexity=math.exp(loss),
        bits_per_byte=loss / math.log(2) / bytes_per_token,
        tokens=n,
        step=r.step,
        source=name,
    )


def bytes_covered(batches, tok: tokenizer_lib.Tokenizer) -> int:
    """Bytes of text that the targets (all tokens but the first) of batches [B, S+1] stand
    for; 0 when some id is outside the tokenizer (pre-tokenized data: bytes unknown)."""
    lengths = tok.byte_lengths()
    total = 0
    for b in batches:
        targets = b[:, 1:]
        if targets.size and int(targets.max()) >= len(lengths):
            return 0
        total += int(lengths[targets].sum())
    return total


def _all_tokens(source: str, tok: tokenizer_lib.Tokenizer, workdir: Path | None) -> np.ndarray:
    """Every token of a file or directory (no train/validation split)."""
    raw = data_lib.load_corpus(source, val_fraction=1e-9)
    corpus = data_lib.tokenize(raw, tok, workdir, log=_quiet)
    return np.concatenate([corpus.train, corpus.val])


def _quiet(_line: str) -> None:
    pass


# ------------------------------------------------------------------------- sampling


def generate(
    r: Restored,
    prompt: str,
    max_new_tokens: int = 200,
    temperature: float = 0.8,
    top_k: int = 0,
    seed: int = 0,
) -> str:
    """Samples a continuation of `prompt` with a KV cache; temperature 0 is greedy."""
    check_sampling_args(prompt, max_new_tokens, temperature, top_k, seed)
    vocab_size = r.cfg.model.vocab_size
    if top_k > vocab_size:
        raise ConfigError(f"--top-k: {top_k} exceeds model.vocab_size={vocab_size}")
    tok = r.tokenizer()
    ids = tok.encode_prompt(prompt)[None, :]  # [1, P]
    if ids.size == 0:
        raise ConfigError(f"--prompt: {config_lib.bounded(prompt)} encodes to no tokens")
    lm = r.model()
    _check_cache_fits(lm, ids.shape[1], max_new_tokens)
    with jax.set_mesh(r.mesh):
        out = sample(lm, jnp.asarray(ids), max_new_tokens, temperature, top_k, jax.random.key(seed))
    return tok.decode(np.asarray(out[0]))


def check_sampling_args(
    prompt: str, max_new_tokens: int, temperature: float, top_k: int, seed: int
) -> None:
    """The checks of generate's arguments that need no model (run before restoring one)."""
    if not prompt:
        raise ConfigError("--prompt: must not be empty")
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError as e:  # argv bytes that are not UTF-8 arrive as surrogates
        raise ConfigError(f"--prompt: not valid UTF-8 (at character {e.start})") from None
    if max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens: must be >= 1, got {max_new_tokens}")
    if not math.isfinite(temperature):
        raise ConfigError(f"--temperature: must be finite, got {temperature}")
    if temperature < 0:
        raise ConfigError(f"--temperature: must be >= 0, got {temperature}")
    if top_k < 0:
        raise ConfigError(f"--top-k: must be >= 0 (0 = no limit), got {top_k}")
    if not 0 <= seed <= config_lib.MAX_SEED:
        raise ConfigError(f"--seed: must be in [0, 2**32 - 1], got {seed}")


def kv_cache_bytes(lm, length: int) -> int:
    """Bytes of a batch-1 KV cache of `length` positions (it grows linearly with length)."""
    one_position = jax.eval_shape(lambda: lm.init_cache(1, 1))
    return length * sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(one_position))


def _check_cache_fits(lm, n_prompt: int, n_new: int) -> None:
    """Refuses a prompt + continuation whose KV cache alone exceeds the free memory."""
    available = hardware.device_memory_available()
    if available is None:
        return
    free, what = available
    need = kv_cache_bytes(lm, n_prompt + n_new)
    if need > free:
        raise ConfigError(
            f"--max-new-tokens: {n_prompt} prompt + {n_new} new tokens need a "
            f"{hardware.format_bytes(need)} KV cache, more than the "
            f"{hardware.format_bytes(free)} of {what}"
        )


@partial(jax.jit, static_argnames=("max_new", "top_k"))
def _sample_jit(graphdef, params, prompt, max_new, temperature, top_k, key):
    lm = nnx.merge(graphdef, params)
    b, p = prompt.shape
    cache = lm.init_cache(b, p + max_new)
    positions = jnp.broadcast_to(jnp.arange(p), (b, p))
    logits, cache = lm.decode(prompt, positions, cache)  # prefill: [B, P, V]

    def pick(logits_bv, key):
        if top_k:
            kth = jax.lax.top_k(logits_bv, top_k)[0][:, -1:]
            logits_bv = jnp.where(logits_bv < kth, -jnp.inf, logits_bv)
        sampled = jax.random.categorical(key, logits_bv / jnp.maximum(temperature, 1e-6))
        return jnp.where(temperature > 0, sampled, jnp.argmax(logits_bv, -1)).astype(jnp.int32)

    def step(carry, i):
        cache, last_logits, key = carry
        key, sub = jax.random.split(key)
        token = pick(last_logits, sub)  # [B]
        pos = jnp.full((b, 1), p + i)
        logits, cache = lm.decode(token[:, None], pos, cache)
        return (cache, logits[:, -1], key), token

    _, tokens = jax.lax.scan(step, (cache, logits[:, -1], key), jnp.arange(max_new))
    return tokens.T  # [B, max_new]


def sample(lm, prompt, max_new: int, temperature: float, top_k: int, key):
    """prompt [B, P] int32 -> new tokens [B, max_new] (one compiled loop, KV cache)."""
    graphdef, params = nnx.split(lm)
    return _sample_jit(graphdef, params, prompt, max_new, jnp.float32(temperature), top_k, key)
