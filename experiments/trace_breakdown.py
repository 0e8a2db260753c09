"""Where a train step's time goes: the bench's MoE and dense twin at one size, traced.

    python experiments/trace_breakdown.py [--d-model 64] [--steps 3] [--out DIR]

Each step of the pair is traced with jax.profiler (perfetto JSON); every XLA op's self time
(its time less that of the ops nested in it, e.g. a while loop's body) is summed per step,
by kind of op and by the part of the model it belongs to (the op_name metadata of the
compiled HLO: attention, experts, router and dispatch, dense MLP, optimizer, ...). Under
load the absolute times stretch; the shares are what this is for.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import re
import sys
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
import bench  # noqa: E402

from sparsemodel import initialize, optim, sharding, steps  # noqa: E402

KINDS = (  # (kind, pattern on the op's name), first match wins
    ("matmul", r"ynn_fusion|dot|convolution"),
    ("loop and cond control", r"^(while|conditional|call)\b"),
    ("write rows (dynamic-update-slice)", r"dynamic-update-slice"),
    ("gather, slice, select", r"dynamic-slice|gather|select|scatter"),
    ("fill buffers (broadcast)", r"broadcast"),
    ("copy, transpose", r"copy|transpose"),
    ("sort", r"sort"),
)
PARTS = (  # (part, pattern on the op's op_name metadata), first match wins
    ("attention", r"attention"),
    ("experts", r"expert|swiglu|grouped"),
    ("router, dispatch, combine", r"moe|rout|dispatch|combine|gather_rows|argsort|top_k"),
    ("dense MLP", r"/mlp"),
    ("norms", r"/norm"),
    ("optimizer", r"adam|optax|update"),
    ("loss, embedding", r"log_softmax|take_along_axis|embed|logits"),
    ("scan buffers (no op_name)", r"^$"),
)


def compiled_step(cfg):
    """The train step of cfg, compiled, and its arguments (fresh parameters, zero tokens)."""
    mesh = sharding.make_mesh(cfg.mesh)
    with jax.set_mesh(mesh):
        graphdef, params = initialize.init_params(cfg, mesh, 0)
        tx = optim.make_optimizer(cfg.train)
        opt_state = initialize.init_opt_state(tx, params, mesh)
        batch = np.zeros((cfg.train.batch_size, cfg.train.seq_len + 1), np.int32)
        batch = sharding.put_batch(batch, mesh)
        step = jax.jit(steps.make_train_step(graphdef, cfg, tx), donate_argnums=(0, 1))
        compiled = step.lower(params, opt_state, batch, jnp.int32(1)).compile()
        return compiled, (params, opt_state, batch)


def trace(cfg, n_steps: int, out: Path) -> tuple[list[dict], str]:
    """The trace's op events of n_steps steps (after two untraced), and the compiled HLO."""
    compiled, (params, opt_state, batch) = compiled_step(cfg)
    for _ in range(2):
        params, opt_state, _ = jax.block_until_ready(compiled(params, opt_state, batch, 1))
    with jax.profiler.trace(str(out), create_perfetto_trace=True):
        for _ in range(n_steps):
            params, opt_state, _ = jax.block_until_ready(compiled(params, opt_state, batch, 1))
    path = next(out.rglob("perfetto_trace.json.gz"))
    with gzip.open(path) as f:
        events = json.load(f)
    events = events["traceEvents"] if isinstance(events, dict) else events
    skip = ("$", "ThunkExecutor", "PjitFunction")
    ops = [e for e in events if e.get("ph") == "X" and not e["name"].startswith(skip)]
    return ops, compiled.as_text()


def self_times(ops: list[dict]) -> collections.Counter:
    """Microseconds of each op name less the time of the ops nested in it (per thread)."""
    by_thread = collections.defaultdict(list)
    for e in ops:
        by_thread[(e["pid"], e["tid"])].append(e)
    own = collections.Counter()
    for events in by_thread.values():
        events.sort(key=lambda e: (e["ts"], -e["dur"]))
        open_ = []
        for e in events:
            while open_ and open_[-1]["ts"] + open_[-1]["dur"] <= e["ts"]:
                open_.pop()
            if open_:
                own[open_[-1]["name"]] -= e["dur"]
            own[e["name"]] += e["dur"]
            open_.append(e)
    return own


def op_names(hlo: str) -> dict[str, str]:
    """Each HLO instruction's op_name metadata ('' when it has none)."""
    names = {}
    for m in re.finditer(r"^\s*(?:ROOT )?%?([\w.\-]+) = .*$", hlo, re.M):
        meta = re.search(r'op_name="([^"]+)"', m.group(0))
        names[m.group(1)] = meta.group(1) if meta else ""
    return names


def first_match(table, text: str, default: str) -> str:
    return next((name for name, pattern in table if re.search(pattern, text)), default)


def breakdown(own: collections.Counter, names: dict[str, str], n_steps: int):
    """ms per step by kind of op and by (pass, part of the model)."""
    kinds, parts = collections.Counter(), collections.Counter()
    for op, us in own.items():
        ms = us / 1e3 / n_steps
        kinds[first_match(KINDS, op, "other fusions")] += ms
        op_name = names.get(op, "")
        phase = "backward" if "transpose(" in op_name else "forward"
        parts[(phase, first_match(PARTS, op_name, "other"))] += ms
    return kinds, parts


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--d-model", type=int, default=64, choices=(64, 128, 256))
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--out", help="keep the traces here (default: a temporary directory)")
    args = ap.parse_args(argv)
    out = Path(args.out or tempfile.mkdtemp(prefix="trace-breakdown-"))
    for name, cfg in bench.size_configs(args.d_model).items():
        ops, hlo = trace(cfg, args.steps, out / name)
        kinds, parts = breakdown(self_times(ops), op_names(hlo), args.steps)
        total = sum(kinds.values())
        print(f"\n{name} at d_model {args.d_model}: {total:.1f} ms of op time per step")
        for kind, ms in kinds.most_common():
            print(f"  {kind:38s} {ms:7.1f} ms {ms / total:6.1%}")
        print("  by part:")
        for (phase, part), ms in sorted(parts.items(), key=lambda kv: -kv[1]):
            print(f"  {phase:9s}{part:29s} {ms:7.1f} ms {ms / total:6.1%}")
    print(f"\ntraces: {out} (ui.perfetto.dev)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
