"""Peak memory of `sparsemodel import-hf` on a ~1 GB checkpoint of each MoE family.

For each of Qwen3-MoE, OLMoE, Qwen2-MoE (and Mixtral, the family imported before them)
it writes a random bfloat16 checkpoint of about 1.1 GB in 256 MB safetensors shards with
an index, tensor by tensor (no model in memory: the names and shapes come from
`hf.slots`, config.json from transformers' config class), runs `sparsemodel import-hf`
on it in a subprocess and reports the subprocess's peak resident memory (ru_maxrss,
which also counts the pages of the memory-mapped arrays it fills, file-backed and
reclaimable) and its peak anonymous memory (RssAnon, sampled every 20 ms): the memory
the import needs whatever the checkpoint's size. The import writes a float32 copy (2x
the bf16 bytes) into memmaps and then the checkpoint, so each family needs ~6 GB of
free disk; everything is deleted after its measurement.

Adds its rows to results/hf_import_memory.json (one per family and size).

    python experiments/hf_import_memory.py [--families qwen3_moe olmoe] [--layers 12]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import ml_dtypes
import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

from sparsemodel import hf, hf_families  # noqa: E402

SHARD_BYTES = 256 * 2**20
COMMON = dict(vocab_size=32000, hidden_size=1024, num_attention_heads=16, eos_token_id=None)
# model_type: (transformers config class, settings): ~550M parameters each.
FAMILIES = {
    "qwen3_moe": (
        "Qwen3MoeConfig",
        dict(
            num_key_value_heads=4,
            head_dim=128,  # not 1024 / 16, as in Qwen3-30B-A3B
            num_experts=32,
            num_experts_per_tok=4,
            moe_intermediate_size=768,
            intermediate_size=2048,
            norm_topk_prob=True,
        ),
    ),
    "olmoe": (
        "OlmoeConfig",
        dict(num_experts=32, num_experts_per_tok=4, intermediate_size=768),
    ),
    "qwen2_moe": (
        "Qwen2MoeConfig",
        dict(
            num_experts=30,
            num_experts_per_tok=4,
            moe_intermediate_size=768,
            shared_expert_intermediate_size=2048,
            intermediate_size=2048,
        ),
    ),
    "mixtral": (
        "MixtralConfig",
        dict(
            num_key_value_heads=4,
            num_local_experts=32,
            num_experts_per_tok=2,
            intermediate_size=768,
        ),
    ),
}


def write_checkpoint(family: str, src: Path, layers: int, seed: int = 0) -> tuple[int, int]:
    """A random bf16 checkpoint of the family in src (shards + index): (bytes, shards)."""
    import transformers

    config_class, settings = FAMILIES[family]
    hf_cfg = getattr(transformers, config_class)(**COMMON, **settings, num_hidden_layers=layers)
    hf_json = json.loads(hf_cfg.to_json_string())
    src.mkdir(parents=True)
    (src / "config.json").write_text(json.dumps(hf_json, indent=2))
    cfg = hf_families.config_from_hf(hf_json, "config.json")
    rng = np.random.default_rng(seed)
    shard, size, files, weight_map, total = {}, 0, [], {}, 0

    def flush():
        name = f"model-{len(files) + 1:05d}.safetensors"
        from safetensors.numpy import save_file

        save_file(shard, src / name)
        files.append(name)
        weight_map.update(dict.fromkeys(shard, name))

    for slot in hf.slots(cfg, hf_families.FAMILIES[family]):
        tensor = (0.02 * rng.standard_normal(slot.shape, np.float32)).astype(ml_dtypes.bfloat16)
        if shard and size + tensor.nbytes > SHARD_BYTES:
            flush()
            shard, size = {}, 0
        shard[slot.hf] = tensor
        size += tensor.nbytes
        total += tensor.nbytes
    flush()
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    return total, len(files)


def measure_import(src: Path, workdir: Path) -> dict:
    """Runs import-hf in a subprocess: wall time, peak RSS and peak anonymous memory."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    code = "import sys; from sparsemodel import cli; sys.exit(cli.main(sys.argv[1:]))"
    argv = [sys.executable, "-c", code, "import-hf", str(src), "--workdir", str(workdir)]
    start = time.perf_counter()
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    peak_anon = [0]
    done = threading.Event()

    def sample():  # RssAnon in kB, until the process is gone
        status = Path(f"/proc/{proc.pid}/status")
        while not done.is_set():
            try:
                for line in status.read_text().splitlines():
                    if line.startswith("RssAnon:"):
                        peak_anon[0] = max(peak_anon[0], int(line.split()[1]))
            except OSError:
                return
            time.sleep(0.02)

    sampler = threading.Thread(target=sample)
    sampler.start()
    output = proc.stdout.read().decode()
    _, status, usage = os.wait4(proc.pid, 0)
    done.set()
    sampler.join()
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"import-hf failed ({proc.returncode}):\n{output[-3000:]}")
    return {
        "seconds": round(time.perf_counter() - start, 1),
        "peak_rss_mib": round(usage.ru_maxrss / 1024),  # ru_maxrss is in kB on Linux
        "peak_anon_mib": round(peak_anon[0] / 1024),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--families", nargs="+", default=list(FAMILIES), choices=list(FAMILIES))
    ap.add_argument("--layers", type=int, default=6, help="6: ~1.1 GB; memory should not grow")
    ap.add_argument("--dir", help="scratch directory (default: a new one in $TMPDIR)")
    args = ap.parse_args(argv)
    scratch = Path(args.dir or tempfile.mkdtemp(prefix="hf-import-memory-"))
    rows = {}
    for family in args.families:
        src, workdir = scratch / f"{family}-hf", scratch / f"{family}-wd"
        shutil.rmtree(src, ignore_errors=True)
        shutil.rmtree(workdir, ignore_errors=True)
        checkpoint_bytes, shards = write_checkpoint(family, src, args.layers)
        row = {"checkpoint_mib": round(checkpoint_bytes / 2**20), "dtype": "bfloat16"}
        row |= {"layers": args.layers, "shards": shards}
        row |= measure_import(src, workdir)
        rows[f"{family}-{args.layers}-layers"] = row
        print(family, row, flush=True)
        shutil.rmtree(src)
        shutil.rmtree(workdir)
    out = HERE / "results" / "hf_import_memory.json"
    kept = json.loads(out.read_text()) if out.is_file() else {}  # other families and sizes
    out.write_text(json.dumps(kept | rows, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
