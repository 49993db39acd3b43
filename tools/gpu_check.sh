#!/usr/bin/env bash
# The GPU check: one script, under 8 minutes on one H100/H200 (and never past DEADLINE), that
#   1. records the machine (nvidia-smi, library versions),
#   2. runs the attention kernels' tests on the GPU (tests/test_attention.py: cuDNN against XLA),
#   3. times each attention implementation (tools/attention_bench.py),
#   4. runs tools/benchmark.py on a ~1.1B Llama (TinyLlama's shape: 22 x 2048, 32/4 heads, MLP 5632,
#      32k vocab) in bf16, batch 8 x 2048 tokens: jaxft full / LoRA / P-Tuning v2 against HF PEFT +
#      PyTorch (CUDA, bf16 autocast, SDPA) on the same GPU, then profiles PROFILE_STEPS more steps of
#      each: device time per step by kernel kind (matmul, attention, other = the memory-bound work
#      between them), jaxft's and PyTorch's side by side (tools/trace_summary.py),
#   4b. times full fine-tuning once more with XLA's dynamic-slice fusion (GEMMs reading a layer scan's
#      stacked buffers in place),
#   4c. once more at twice the batch (the optimizer's and the loss's fixed cost per step shared by twice the
#      tokens; PEFT's full fine-tuning does not fit an H100 there, so jaxft alone),
#   4d. and once more with the layers unrolled (model.scan_layers=False: its compile time and speed),
#   5. runs the main job (configs/ptuning_v2.py) on the GPU as configured (fp32) and in bf16,
#   6. times a mixture of experts' grouped matmul, jaxft's tiles against `ragged_dot` (tools/moe_bench.py;
#      last, so it never takes the time of the steps before),
# and writes its figures to OUT/gpu_check.json, and the logs, the profiles (`*.trace.json.gz`) and the compiled
# train steps (`*.hlo.gz`) to OUT/raw.tgz. BENCHMARKS.md holds the results.
#
#   tools/gpu_check.sh [OUT]          # OUT defaults to $OUT, else ./gpu_check_out
#
# Settings (environment): STEPS (timed steps, 10), WARMUP (2), METHODS (full,lora,ptuning_v2),
# ATTENTION (jaxft model.attention, auto), REMAT (none), BATCH (8), SEQ (2048), PARAM_DTYPE (float32),
# PROFILE_STEPS (2; 0: no profile), DEADLINE (540: seconds after which no step starts, and each step's
# time limit is cut to what is left, so the summary and the archive are written inside one 600 s call).
# Wheels for packages the machine lacks (an offline GPU box) may be put in .whl/; they are installed
# into /tmp/site first.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-${OUT:-gpu_check_out}}
mkdir -p "$OUT/raw"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
STEPS=${STEPS:-10} WARMUP=${WARMUP:-2} METHODS=${METHODS:-full,lora,ptuning_v2}
ATTENTION=${ATTENTION:-auto} REMAT=${REMAT:-none} BATCH=${BATCH:-8} SEQ=${SEQ:-2048} PARAM_DTYPE=${PARAM_DTYPE:-float32} PROFILE_STEPS=${PROFILE_STEPS:-2}
DEADLINE=${DEADLINE:-540}
t0=$SECONDS
# `limit N`: N seconds, or what is left before DEADLINE if less (false, and a note, when under 20 s remain).
limit() {
  local left=$((DEADLINE - (SECONDS - t0)))
  if [ "$left" -lt 20 ]; then echo "skipped: ${left} s left before DEADLINE=$DEADLINE" >&2; return 1; fi
  echo $(( $1 < left ? $1 : left ))
}

echo "== 1. machine"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv | tee "$OUT/nvidia_smi.csv"
python3 - <<'EOF' | tee "$OUT/versions.txt"
import importlib
for m in ("jax", "jaxlib", "flax", "optax", "orbax.checkpoint", "torch", "transformers", "peft"):
    try:
        print(m, importlib.import_module(m).__version__)
    except Exception as e:  # noqa: BLE001
        print(m, "missing:", type(e).__name__, e)
import jax
print("devices", jax.devices())
EOF

echo "== 2. attention tests on the GPU ($((SECONDS - t0)) s)"
attn_rc=-1
if [ -f tests/test_attention.py ] && t=$(limit 150); then
  JAX_PLATFORMS=cuda timeout "$t" python3 -m pytest -q -p no:cacheprovider tests/test_attention.py -rs 2>&1 \
    | tee "$OUT/test_attention.log" | tail -25
  attn_rc=${PIPESTATUS[0]}
fi

echo "== 3. attention micro-benchmark ($((SECONDS - t0)) s)"
if [ -f tools/attention_bench.py ]; then
  rm -f "$OUT/attention.jsonl"
  for extra in "" "--left_pad 512 --prefix 16" "--window 1024"; do  # plain causal; padding + prefix; window
    t=$(limit 60) || break
    timeout "$t" python3 tools/attention_bench.py --kv_heads 4 $extra --json "$OUT/attention.jsonl" 2>&1 \
      | tee -a "$OUT/attention_bench.log" | tail -6
  done
fi

echo "== 4. training throughput, jaxft vs PEFT ($((SECONDS - t0)) s)"
# A seconds-long run of the same code path first: if the fused attention cannot train here, measure
# with XLA's attention (and the full remat it needs to fit) rather than lose the table.
if t=$(limit 90) && ! timeout "$t" python3 tools/benchmark.py --layers 2 --hidden 512 --heads 8 --kv_heads 4 \
    --intermediate 1024 --vocab 1000 --batch 2 --seq 256 --steps 1 --warmup 0 --dtype bfloat16 --methods ptuning_v2 \
    --frameworks jaxft --peak_n 1024 --peak_reps 1 --attention "$ATTENTION" --remat "$REMAT" 2>&1 | tail -3 \
    | grep -q "^jaxft .*ptuning_v2 .*[0-9]$"; then
  echo "warning: jaxft with attention=$ATTENTION failed the preflight; measuring with attention=xla, remat=full"
  ATTENTION=xla REMAT=full
fi
# The 1.1B model and the run's settings, shared by steps 4 to 4d.
BENCH=(--layers 22 --hidden 2048 --heads 32 --kv_heads 4 --intermediate 5632 --vocab 32000 --batch "$BATCH"
       --seq "$SEQ" --steps "$STEPS" --warmup "$WARMUP" --dtype bfloat16 --attention "$ATTENTION" --remat "$REMAT"
       --param_dtype "$PARAM_DTYPE")
t=$(limit 360) && timeout "$t" python3 tools/benchmark.py "${BENCH[@]}" --methods "$METHODS" --frameworks jaxft,peft \
  --num_virtual_tokens 16 --peak_n 8192 --peak_reps 5 --profile_steps "$PROFILE_STEPS" \
  --keep_trace "$OUT/raw/trace_{method}.json.gz" --hlo "$OUT/raw/step_{method}.hlo.gz" --json "$OUT/benchmark.json" 2>&1 \
  | tee "$OUT/benchmark.log" | grep -v "^running "

echo "== 4b. full fine-tuning again, GEMMs reading the layer scan's slices in place ($((SECONDS - t0)) s)"
# The H200 profile's 18 ms of copies per step (BENCHMARKS.md) are the scan slicing each layer out of its
# stacked buffers; XLA's dynamic-slice fusion lets the GEMMs read them where they are.
t=$(limit 120) && XLA_FLAGS="${XLA_FLAGS:+$XLA_FLAGS }--xla_gpu_enable_dynamic_slice_fusion=true" timeout "$t" \
  python3 tools/benchmark.py "${BENCH[@]}" --methods full --frameworks jaxft --peak_n 4096 --peak_reps 1 \
  --json "$OUT/benchmark_dynamic_slice.json" 2>&1 \
  | tee "$OUT/benchmark_dynamic_slice.log" | grep -v "^running " | tail -4

echo "== 4c. full fine-tuning again, twice the batch ($((SECONDS - t0)) s)"
# AdamW over 1.1B fp32 parameters reads and writes ~35 GB a step whatever the batch; `jaxft.plan` puts
# this step at 46 GB (31 GB at batch 8).
t=$(limit 120) && timeout "$t" python3 tools/benchmark.py "${BENCH[@]}" --batch $((2 * BATCH)) --methods full \
  --frameworks jaxft --peak_n 4096 --peak_reps 1 --json "$OUT/benchmark_batch2x.json" 2>&1 \
  | tee "$OUT/benchmark_batch2x.log" | grep -v "^running " | tail -4

echo "== 4d. full fine-tuning again, layers unrolled (no stacked buffers to copy or zero) ($((SECONDS - t0)) s)"
# What the layer scan still costs once remat none keeps only products: compile time against step time.
t=$(limit 240) && timeout "$t" python3 tools/benchmark.py "${BENCH[@]}" --scan_layers 0 --methods full \
  --frameworks jaxft --peak_n 4096 --peak_reps 1 --json "$OUT/benchmark_unrolled.json" 2>&1 \
  | tee "$OUT/benchmark_unrolled.log" | grep -v "^running " | tail -4

echo "== 5. the main job on the GPU ($((SECONDS - t0)) s)"
for dtype in float32 bfloat16; do  # as configured (XLA attention), then bf16 compute (cuDNN attention)
  rm -rf "/tmp/gpu_check_main_$dtype"
  t=$(limit 150) || break
  timeout "$t" python3 -m jaxft.train --config=configs/ptuning_v2.py --workdir="/tmp/gpu_check_main_$dtype" \
    --config.model.dtype=$dtype 2>&1 | tr "\r" "\n" | grep -v "^train:" | tail -3 | tee -a "$OUT/main_job.log"
done

echo "== 6. a mixture's grouped matmul: jaxft's tiles against ragged_dot ($((SECONDS - t0)) s)"
if [ -f tools/moe_bench.py ]; then  # 8 experts; Qwen3-30B-A3B's expert shapes (2048 -> 768, 16k routed rows)
  for shape in "--experts 8 --rows 4096" "--experts 128 --rows 16384 --dim 2048 --out 768"; do
    t=$(limit 60) || break
    timeout "$t" python3 tools/moe_bench.py grouped $shape --dtype bfloat16 --steps 5 2>&1 \
      | tee -a "$OUT/moe_bench.log" | tail -3
  done
fi

python3 - "$OUT" "$attn_rc" "$((SECONDS - t0))" <<'EOF'
import json, os, sys
out, attn_rc, seconds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
def read(name):
    path = os.path.join(out, name)
    if not os.path.exists(path):
        return None
    if name.endswith(".jsonl"):
        return [json.loads(line) for line in open(path)]
    return json.load(open(path))
summary = {"seconds": seconds, "attention_tests_exit_status": None if attn_rc < 0 else attn_rc,
           "versions": open(os.path.join(out, "versions.txt")).read().splitlines(),
           "nvidia_smi": open(os.path.join(out, "nvidia_smi.csv")).read().splitlines(),
           "attention_bench": read("attention.jsonl"), "benchmark": read("benchmark.json"),
           "benchmark_dynamic_slice_fusion": read("benchmark_dynamic_slice.json"),
           "benchmark_batch2x": read("benchmark_batch2x.json"),
           "benchmark_unrolled_layers": read("benchmark_unrolled.json"),
           "logs": {name: open(os.path.join(out, name)).read()[-6000:] for name in
                    ("test_attention.log", "attention_bench.log", "main_job.log", "moe_bench.log")
                    if os.path.exists(os.path.join(out, name))}}
json.dump(summary, open(os.path.join(out, "gpu_check.json"), "w"), indent=2)
print(f"wrote {out}/gpu_check.json ({seconds} s)")
EOF
# Two files come back from a device call: the summary, and the rest (logs, profiles, compiled steps) in one
# archive, which `tools/trace_summary.py` and an HLO reader take apart offline.
(cd "$OUT" && for f in *; do [ "$f" = gpu_check.json ] || [ "$f" = raw ] || mv "$f" raw/; done \
  && tar czf raw.tgz raw && rm -rf raw) && echo "wrote $OUT/raw.tgz"
