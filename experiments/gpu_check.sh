#!/usr/bin/env bash
# The one-GPU check in one command (under ten minutes on one H200): what a ~1B MoE costs on
# a GPU next to its dense twin of equal active parameters, and the tests on the GPU backend:
#   1. `profile` of gpu-1b (bf16, ~1.04B parameters, 16 experts top-2) and its dense twin
#      gpu-1b-dense: step time, MFU, compiled/model FLOPs (the compiled matmuls), memory;
#      gpu-1b twice: with the GPU default grouped matmul (batched) and with tokamax's;
#   2. optionally the MoE with the other grouped matmuls (ragged_dot, blocks);
#   3. the test suite on the GPU backend (float32 matmuls at full precision, not TF32).
# It runs under the machine's own JAX (CUDA build). Packages it lacks travel as wheels in
# .whl/ (see experiments/README.md), tokamax's among them: the machine's image has jaxtyping,
# absl-py, tqdm and flax but not tokamax==0.0.12, einshape, qwix, typeguard==2.13.3,
# immutabledict, pydantic, pydantic-core (a cp312 wheel), annotated-types,
# typing-inspection or typing-extensions>=4.16 (pydantic's floor). Without them the
# moe_tokamax profile is refused in one line. Writes JSON and logs to $OUT.
set -u
OUT=${OUT:-experiments/results/gpu}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
start=$SECONDS
{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  python3 -c "import jax, flax, optax, orbax.checkpoint, grain; print('jax', jax.__version__, \
'flax', flax.__version__, 'optax', optax.__version__, jax.devices())"
  # Which ragged_dot implementations tokamax could import: without its Pallas ones it
  # would run XLA's ragged_dot (a dense fallback on GPU).
  python3 -c "import tokamax; from tokamax._src.ops.ragged_dot import api; \
print('tokamax', tokamax.__version__, 'ragged_dot:', *api.IMPLEMENTATIONS)"
} 2>&1 | tee "$OUT/env.txt"

summary() {  # one line per profile: step time, tokens/s, MFU, FLOP ratio, memory
  python3 - "$1" <<'PY'
import json, sys
try:
    r = json.load(open(sys.argv[1]))
except Exception as e:
    sys.exit(f"{sys.argv[1]}: no report ({e})")
m, c, mem = r.get("measured", {}), r.get("compiled", {}), r.get("memory", {})
print(f"{sys.argv[1]}: step {m.get('step_time_s', 0) * 1e3:.1f} ms, "
      f"{m.get('tokens_per_s', 0):,.0f} tok/s, MFU {m.get('mfu', 0):.1%}, "
      f"hw/model {c.get('hw_model_flops_ratio', float('nan')):.3f} "
      f"(uncounted {c.get('uncounted_custom_calls')}), "
      f"temp {(mem.get('temp_bytes') or 0) / 2**30:.1f} GiB, params {r['params']['total']:,}")
PY
}
mfu_ratios() {  # one line: each MoE profile's MFU over the dense one's (target >= 0.6)
  python3 - "$OUT" <<'PY'
import json, pathlib, sys
mfu = {}
for f in pathlib.Path(sys.argv[1]).glob("*.json"):
    try:
        mfu[f.stem] = json.loads(f.read_text())["measured"]["mfu"]
    except Exception:
        pass
if mfu.get("dense"):
    moe = sorted(n for n in mfu if n.startswith("moe"))
    print("MoE MFU / dense MFU:", ", ".join(f"{n} {mfu[n] / mfu['dense']:.2f}" for n in moe))
PY
}
prof() {  # name, seconds, profile arguments...
  local name=$1 limit=$2
  shift 2
  echo "== $name: sparsemodel profile $* (at ${SECONDS}s)" | tee -a "$OUT/log.txt"
  # shellcheck disable=SC2086  # GPU_CHECK_SET: extra KEY=VALUE overrides (a dry run on CPU)
  timeout "$limit" python3 -m sparsemodel.cli profile --json "$@" \
    ${GPU_CHECK_SET:+--set $GPU_CHECK_SET} >"$OUT/$name.json" \
    2>>"$OUT/log.txt"
  echo "   exit $? after $((SECONDS - start))s" | tee -a "$OUT/log.txt"
  summary "$OUT/$name.json" | tee -a "$OUT/summary.txt"
}

# GPU_CHECK_PROFILES picks some of: dense moe moe_tokamax moe_ragged_dot moe_blocks.
for name in ${GPU_CHECK_PROFILES:-dense moe moe_tokamax}; do
  case $name in
    dense) prof dense 180 --config gpu-1b-dense ;;
    moe) prof moe 180 --config gpu-1b ;;  # moe.grouped_matmul=auto: 'batched' on GPU
    # Its Pallas kernels are custom calls: the FLOP count lists them as uncounted.
    moe_tokamax) prof moe_tokamax 180 --config gpu-1b --set moe.grouped_matmul=tokamax ;;
    moe_ragged_dot) prof moe_ragged_dot 150 --config gpu-1b --set moe.grouped_matmul=ragged_dot ;;
    moe_blocks) prof moe_blocks 120 --config gpu-1b --set moe.grouped_matmul=blocks --no-flop-count ;;
  esac
done
mfu_ratios | tee -a "$OUT/summary.txt"

left=$((${GPU_CHECK_SECONDS:-540} - (SECONDS - start)))
echo "== tests on the GPU backend, ${left}s left" | tee -a "$OUT/log.txt"
if [ "$left" -gt 60 ]; then
  # Full-precision float32 matmuls (not TF32) and deterministic scatter-adds (the exact
  # resume tests compare losses bit for bit; XLA:GPU's default scatter-add uses atomics).
  # shellcheck disable=SC2086  # GPU_CHECK_TESTS: test paths or node ids (default: tests)
  XLA_PYTHON_CLIENT_PREALLOCATE=false JAX_DEFAULT_MATMUL_PRECISION=highest \
    XLA_FLAGS=--xla_gpu_deterministic_ops=true \
    timeout "$left" python3 -m pytest -q -n 8 -p no:cacheprovider --durations=5 \
    ${GPU_CHECK_TESTS:-tests} >"$OUT/tests.txt" 2>&1
  echo "   exit $? after $((SECONDS - start))s" | tee -a "$OUT/log.txt"
  tail -15 "$OUT/tests.txt"
fi
cat "$OUT/summary.txt"

# ---------------------------------------------------------------------------------------
# The scaling study's headline pair on the GPU (experiments/study.py --gpu; issue 20).
# Off unless GPU_CHECK_STUDY=1 (it takes ~5 minutes). Alone:
#   GPU_CHECK_PROFILES=none GPU_CHECK_SECONDS=0 GPU_CHECK_STUDY=1 bash experiments/gpu_check.sh
# Dense and the CPU study's best MoE at ~26M active parameters (d_model 640, 4 layers,
# bfloat16, 64 x 1,024 tokens a step): step times measured alternating, then both trained
# for the steps the slower one runs in GPU_STUDY_SECONDS (default 90), so the two see
# equal tokens. Writes $OUT/results/study/gpu-<arm>.json (the study's result format); copy
# them to experiments/results/study/ and run experiments/study_report.py.
if [ "${GPU_CHECK_STUDY:-0}" = 1 ]; then
  echo "== study: headline pair on the GPU (at ${SECONDS}s)" | tee -a "$OUT/log.txt"
  timeout 295 python3 experiments/study.py --gpu "${GPU_STUDY_SECONDS:-90}" --out "$OUT" \
    >"$OUT/study.txt" 2>&1
  echo "   exit $? after $((SECONDS - start))s" | tee -a "$OUT/log.txt"
  grep -E "^(GPU step times|gpu-)" "$OUT/study.txt" | tee -a "$OUT/summary.txt"
fi
