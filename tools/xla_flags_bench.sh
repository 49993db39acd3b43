#!/usr/bin/env bash
# jaxft's training throughput under several XLA_FLAGS settings, on TinyLlama's shape (as tools/gpu_check.sh
# step 4), to find which compiler settings a GPU run should use. One line of flags per variant:
#
#   VARIANTS=$'\n--xla_gpu_enable_triton_gemm=false' tools/xla_flags_bench.sh [OUT]
#
# (the empty first line is XLA's defaults). Settings: METHODS (full,lora), STEPS (6), WARMUP (1),
# PEFT_METHODS (lora: PEFT's figure on the same GPU, for the ratio; empty to skip).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-${OUT:-xla_flags_out}}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
METHODS=${METHODS:-full,lora} STEPS=${STEPS:-6} WARMUP=${WARMUP:-1} PEFT_METHODS=${PEFT_METHODS-lora}
# Default: XLA's defaults, and GEMMs that read their operands in place from a layer scan's stacked buffers
# (the copies an H200 profile showed: 18 ms of a 253 ms full fine-tuning step, BENCHMARKS.md).
VARIANTS=${VARIANTS-$'\n--xla_gpu_enable_dynamic_slice_fusion=true'}
nvidia-smi --query-gpu=name --format=csv,noheader | tee "$OUT/gpu.txt"
bench() {  # frameworks methods json
  timeout 300 python3 tools/benchmark.py --layers 22 --hidden 2048 --heads 32 --kv_heads 4 --intermediate 5632 \
    --vocab 32000 --batch 8 --seq 2048 --steps "$STEPS" --warmup "$WARMUP" --dtype bfloat16 --methods "$2" \
    --frameworks "$1" --peak_n 8192 --peak_reps 3 --attention auto --json "$3" 2>&1 | grep -v "^running "
}
i=0
while IFS= read -r flags; do
  echo "== XLA_FLAGS='$flags'"
  XLA_FLAGS="$flags" bench jaxft "$METHODS" "$OUT/jaxft_$i.json" | tee "$OUT/jaxft_$i.log"
  echo "$flags" > "$OUT/jaxft_$i.flags"
  i=$((i + 1))
done <<< "$VARIANTS"
if [ -n "$PEFT_METHODS" ]; then
  echo "== PEFT"
  bench peft "$PEFT_METHODS" "$OUT/peft.json" | tee "$OUT/peft.log"
fi
