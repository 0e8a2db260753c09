"""`sparsemodel` command: thin argument parsing over the library.

Every user error surfaces as one line `sparsemodel: error: ...` and exit status 2.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import signal
import sys
import threading
from pathlib import Path

from sparsemodel import config, host_heap


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sparsemodel", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    for add_command in (_add_train, _add_eval, _add_profile, _add_generate, _add_hf, _add_upcycle):
        add_command(sub)
    return p


def _config_help(default: str) -> str:
    """--config's help, naming the presets the presets directory holds now."""
    return f"preset name ({', '.join(config.preset_names())}) or a YAML/TOML file ({default})"


def _add_distributed(sp) -> None:
    g = sp.add_argument_group("multi-process (arguments of jax.distributed.initialize)")
    g.add_argument("--coordinator-address", metavar="HOST:PORT")
    g.add_argument("--num-processes", type=int)
    g.add_argument("--process-id", type=int)


def _add_train(sub) -> None:
    t = sub.add_parser("train", help="train (resumes from the newest checkpoint in --workdir)")
    t.add_argument("--config", help=_config_help("default: the workdir's config.yaml, else small"))
    t.add_argument("--workdir", default=None, help="default: runs/<config name>")
    t.add_argument(
        "--set",
        dest="overrides",
        action="extend",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="override config keys, e.g. moe.top_k=1",
    )
    t.add_argument(
        "--stop-after",
        type=int,
        metavar="STEPS",
        help="stop (with a checkpoint) after this many steps of this invocation",
    )
    _add_distributed(t)


def _add_eval(sub) -> None:
    e = sub.add_parser("eval", help="loss, perplexity and bits per byte of a checkpoint")
    e.add_argument("--workdir", required=True)
    e.add_argument("--step", type=int, help="checkpoint step (default: newest)")
    e.add_argument("--data", help="a text file or directory (default: the validation split)")
    e.add_argument(
        "--max-tokens", type=int, default=262_144, help="rounded up to whole batches; 0 = all"
    )
    e.add_argument("--json", action="store_true", help="print one JSON object")
    _add_distributed(e)


def _add_profile(sub) -> None:
    pr = sub.add_parser("profile", help="parameters, FLOPs, memory, MFU and routing")
    pr.add_argument("--config", help=_config_help("default: small"))
    pr.add_argument("--workdir", help="profile a trained workdir (its config and weights)")
    pr.add_argument(
        "--set", dest="overrides", action="extend", nargs="+", default=[], metavar="KEY=VALUE"
    )
    pr.add_argument("--steps", type=int, default=5, help="timed steps after one warm-up")
    pr.add_argument(
        "--abstract",
        action="store_true",
        help="size the config on its stated mesh without allocating anything",
    )
    pr.add_argument(
        "--no-flop-count",
        action="store_true",
        help="skip the unrolled compilation that counts XLA's FLOPs (slow for large models)",
    )
    pr.add_argument("--trace", metavar="DIR", help="write a jax.profiler trace of 3 steps")
    pr.add_argument("--plot", metavar="FILE.png", help="heat map of per-layer expert load")
    pr.add_argument("--json", action="store_true", help="print one JSON object")


def _add_generate(sub) -> None:
    g = sub.add_parser("generate", help="sample text from a checkpoint with a KV cache")
    g.add_argument("--workdir", required=True)
    g.add_argument("--step", type=int)
    g.add_argument("--prompt", required=True)
    g.add_argument("--max-new-tokens", type=int, default=200)
    g.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    g.add_argument("--top-k", type=int, default=0, help="0 = no limit")
    g.add_argument("--seed", type=int, default=0)


def _add_hf(sub) -> None:
    families = "Mixtral, Qwen3-MoE, Qwen2-MoE, OLMoE, Llama, Mistral, Qwen2, Qwen3"
    i = sub.add_parser("import-hf", help=f"a Hugging Face checkpoint ({families}) -> a workdir")
    i.add_argument("src", help="directory with config.json and *.safetensors")
    i.add_argument("--workdir", required=True)

    x = sub.add_parser("export-hf", help="a workdir's checkpoint -> a Hugging Face directory")
    x.add_argument("out", help="output directory (config.json, *.safetensors)")
    x.add_argument("--workdir", required=True)
    x.add_argument("--step", type=int, help="checkpoint step (default: newest)")
    x.add_argument(
        "--model-type",
        help="the transformers model_type to write (default: the one imported from, else the "
        "first that can express the model: mixtral, qwen3_moe, qwen2_moe, olmoe; llama, "
        "mistral, qwen2, qwen3)",
    )
    x.add_argument(
        "--max-shard-size",
        default="5GiB",
        help="largest safetensors file, e.g. 500MB or 2GiB (default 5GiB; a larger tensor "
        "gets a file of its own)",
    )


def _add_upcycle(sub) -> None:
    u = sub.add_parser("upcycle", help="an MoE workdir (step 0) from a dense workdir's checkpoint")
    u.add_argument("--from", dest="src", required=True, metavar="DENSE_WORKDIR")
    u.add_argument("--workdir", required=True, help="the new workdir (must not exist yet)")
    u.add_argument(
        "--method",
        choices=["copy", "granular", "drop"],
        default="copy",
        help="copy: every expert is the dense MLP; granular: experts are slices of it "
        "(--set moe.d_expert=...); drop: copy, then re-draw a fraction of each expert's units",
    )
    u.add_argument(
        "--set", dest="overrides", action="extend", nargs="+", default=[], metavar="KEY=VALUE"
    )
    u.add_argument("--drop", type=float, help="drop: fraction of units re-drawn (default 0.5)")
    u.add_argument("--router-std", type=float, help="routers' init std (default model.init_std)")
    u.add_argument("--seed", type=int, help="of the routers and re-drawn units (train.seed)")
    u.add_argument("--step", type=int, help="the dense checkpoint's step (default: newest)")
    u.add_argument("--max-tokens", type=int, default=65_536, help="eval tokens per model; 0 = all")


def _init_distributed(args) -> None:
    if args.num_processes is None and args.coordinator_address is None:
        return
    import jax

    if args.num_processes is None or args.process_id is None or not args.coordinator_address:
        raise _UsageError("--coordinator-address, --num-processes and --process-id go together")
    if not 0 <= args.process_id < args.num_processes:
        raise _UsageError(f"--process-id {args.process_id}: must be in [0, {args.num_processes})")
    # On CPU, cross-process collectives need an implementation: gloo ships with jaxlib.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        args.coordinator_address,
        args.num_processes,
        args.process_id,
        heartbeat_timeout_seconds=PEER_TIMEOUT_S,
    )


# A process that stops answering for this long is declared dead; the survivors then exit
# with an error instead of waiting forever in a collective.
PEER_TIMEOUT_S = 20


class _UsageError(ValueError):
    pass


def _train(args) -> int:
    from sparsemodel import train

    if args.stop_after is not None and args.stop_after < 1:
        raise _UsageError(f"--stop-after: must be >= 1, got {args.stop_after}")
    overrides = config.parse_overrides(args.overrides)
    name = args.config or "small"
    workdir = Path(args.workdir) if args.workdir else None
    if args.config is None and workdir is not None and (workdir / "config.yaml").is_file():
        cfg = config.load_stored(workdir / "config.yaml", overrides)  # resume with its own
    else:
        cfg = config.load(name, overrides)
    if workdir is None:
        workdir = Path("runs") / Path(name).stem
    _init_distributed(args)
    result = train.run(cfg, workdir, stop_after=args.stop_after)
    val = f"{result.val_loss:.4f}" if result.val_loss is not None else "n/a"
    loss = "n/a" if math.isnan(result.train_loss) else f"{result.train_loss:.4f}"  # no step ran
    print(
        f"trained to step {result.step} in {result.wall_s:.0f}s: train loss {loss}, "
        f"validation loss {val}, "
        f"{result.tokens_per_s:,.0f} tokens/s; workdir {workdir}"
    )
    print(
        f"unigram entropy of the validation split: {result.unigram_entropy:.4f} nats/token "
        "(the loss of a model that ignores context)"
    )
    return 0


def _eval(args) -> int:
    from sparsemodel import evaluate

    if args.max_tokens < 0:
        raise _UsageError(f"--max-tokens: must be >= 0 (0 = all), got {args.max_tokens}")
    _init_distributed(args)
    r = evaluate.restore(args.workdir, args.step)
    res = evaluate.evaluate(r, args.data, max_tokens=args.max_tokens or None)
    if args.json:
        print(json.dumps(res.as_dict()))
    else:
        print(
            f"step {res.step} on {res.source}: loss {res.loss:.4f} nats/token, perplexity "
            f"{res.perplexity:.3f}, {res.bits_per_byte:.4f} bits/byte, {res.tokens:,} tokens"
        )
    return 0


def _generate(args) -> int:
    from sparsemodel import evaluate

    evaluate.check_sampling_args(
        args.prompt, args.max_new_tokens, args.temperature, args.top_k, args.seed
    )
    r = evaluate.restore(args.workdir, args.step)
    text = evaluate.generate(
        r, args.prompt, args.max_new_tokens, args.temperature, args.top_k, args.seed
    )
    print(args.prompt + text)
    return 0


def _profile(args) -> int:
    from sparsemodel import evaluate, profile

    overrides = config.parse_overrides(args.overrides)
    if args.steps < 1:
        raise _UsageError(f"--steps: must be >= 1, got {args.steps}")
    if args.trace:
        _check_writable_dir("--trace", Path(args.trace), Path(args.trace))
    if args.plot:
        _check_writable_file("--plot", Path(args.plot))
    param_state = None
    if args.workdir:
        if args.config:
            raise _UsageError("--config and --workdir: give one (a workdir has its config)")
        restored = evaluate.restore(args.workdir)
        cfg = restored.cfg.replace(overrides) if overrides else restored.cfg
        param_state = restored.params
    else:
        cfg = config.load(args.config or "small", overrides)
    log = (lambda s: None) if args.json else (lambda s: print(s, file=sys.stderr))
    report = profile.profile(
        cfg,
        param_state=param_state,
        steps=args.steps,
        trace_dir=args.trace,
        plot=args.plot,
        abstract=args.abstract,
        count_flops=not args.no_flop_count,
        workdir=args.workdir,
        log=log,
    )
    print(json.dumps(report) if args.json else profile.format_report(report))
    return 0


def _check_writable_dir(flag: str, given: Path, directory: Path) -> None:
    """Creates `directory` and writes a file into it, or raises naming the flag's value."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        # mkdir(exist_ok=True) of an existing regular file raises FileExistsError
        reason = "Not a directory" if isinstance(e, FileExistsError) else e.strerror
        raise _UsageError(f"{flag} {given}: not writable ({reason})") from None


def _check_writable_file(flag: str, path: Path) -> None:
    """A file can be written at `path` later (its directory is created now)."""
    if path.is_dir():
        raise _UsageError(f"{flag} {path}: is a directory")
    _check_writable_dir(flag, path, path.parent)


def _import_hf(args) -> int:
    from sparsemodel import hf

    cfg = hf.import_hf(args.src, args.workdir)
    m, e = cfg.model, cfg.moe
    ffn = f"{e.num_experts} experts (top {e.top_k})" if cfg.is_moe else f"dense (d_ff {m.d_ff})"
    print(
        f"imported {args.src}: {m.n_layers} layers, d_model {m.d_model}, {ffn}, "
        f"vocab {m.vocab_size}; workdir {args.workdir} (checkpoint step 0)"
    )
    return 0


def _export_hf(args) -> int:
    from sparsemodel import hf

    max_shard_bytes = hf.parse_size(args.max_shard_size)
    files = hf.export_hf(args.workdir, args.out, args.step, max_shard_bytes, args.model_type)
    print(f"exported {args.workdir} to {args.out}: {', '.join(f.name for f in files)}")
    return 0


def _upcycle(args) -> int:
    from sparsemodel import upcycle

    if args.max_tokens < 0:
        raise _UsageError(f"--max-tokens: must be >= 0 (0 = all), got {args.max_tokens}")
    u = upcycle.upcycle(
        args.src,
        args.workdir,
        args.method,
        config.parse_overrides(args.overrides),
        drop=args.drop,
        router_std=args.router_std,
        seed=args.seed,
        step=args.step,
        max_tokens=args.max_tokens or None,
    )
    e, recipe = u.cfg.moe, u.recipe
    how = {
        "copy": "every expert the dense MLP",
        "granular": f"{upcycle.slices(u.cfg)} slices of the dense MLP, "
        f"{e.num_experts // upcycle.slices(u.cfg)} copies each",
        "drop": f"the dense MLP with {recipe.drop:.0%} of its units re-drawn per expert",
    }[recipe.method]
    print(
        f"upcycled {args.src} (step {u.dense_step}) by {recipe.method} into {args.workdir} "
        f"(checkpoint step 0): {e.num_experts} experts of width {e.d_expert}, top-{e.top_k}, "
        f"{how}; routers N(0, {recipe.router_std:g}^2), seed {recipe.seed}"
    )
    d, m = u.dense, u.upcycled
    print(
        f"step-0 eval loss on {d.source}, {d.tokens:,} tokens: dense {d.loss:.4f}, "
        f"upcycled {m.loss:.4f} (difference {m.loss - d.loss:+.2e})"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command in ("train", "profile"):  # commands that run many steps
        host_heap.keep_freed_heap()  # before JAX starts its threads
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, _exit_on_interrupt)
    from sparsemodel.checkpoint import CheckpointError
    from sparsemodel.config import ConfigError
    from sparsemodel.data import DataError
    from sparsemodel.files import StorageError
    from sparsemodel.train import TrainingError

    try:
        return {
            "train": _train,
            "eval": _eval,
            "generate": _generate,
            "profile": _profile,
            "import-hf": _import_hf,
            "export-hf": _export_hf,
            "upcycle": _upcycle,
        }[args.command](args)
    except (ConfigError, DataError, CheckpointError, _UsageError) as e:
        return _exit(2, f"sparsemodel: error: {e}")
    except TrainingError as e:
        return _exit(1, f"sparsemodel: training stopped: {e}")
    except StorageError as e:
        return _exit(1, f"sparsemodel: error: {e}")


def _exit_on_interrupt(_signum, _frame):
    """Ctrl-C outside the training loop (which turns it into a checkpoint and a clean exit
    of its own): one line, then leave at once. Raising KeyboardInterrupt instead could land
    in a garbage-collection callback that swallows it (and the run went on), and unwinding
    while XLA's and Orbax's threads run printed their tracebacks. Nothing here is
    half-written: every file a command writes is written atomically or built aside."""
    with contextlib.suppress(Exception):  # the main thread may be inside a print
        sys.stdout.flush()
    os.write(2, b"sparsemodel: interrupted\n")
    os._exit(130)


def _exit(code: int, message: str) -> int:
    print(message, file=sys.stderr, flush=True)
    if "jax" in sys.modules and sys.modules["jax"].process_count() > 1:
        # A clean exit would wait in jax.distributed's shutdown barrier for peers that are
        # themselves waiting in a collective for us: leave now, so they see this process
        # gone (heartbeat timeout) and stop too.
        sys.stdout.flush()
        os._exit(code)
    return code


if __name__ == "__main__":
    sys.exit(main())
