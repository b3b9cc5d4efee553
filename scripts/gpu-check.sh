#!/usr/bin/env bash
# GPU check: runs the synthetic paper pipeline on the CUDA backend and prints per-stage times
# and the vgg-small train-step figure beside the CPU's.
#
# Build the binary on a machine with a Rust toolchain (the GPU machine may have none):
#   CUDARC_CUDA_VERSION=13000 cargo build --release --features cuda
#   mkdir -p dist && cp target/release/camflow dist/camflow-cuda
# then on the GPU machine (driver 580 / CUDA 13.0), from the project root:
#   scripts/gpu-check.sh [dist/camflow-cuda] [--with-cpu]
set -euo pipefail
BIN=${1:-dist/camflow-cuda}
WITH_CPU=${2:-}
WORK=$(mktemp -d)
echo "== device"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || echo "nvidia-smi not found"
echo "== train step, inference, Grad-CAM (vgg-small, batch 32)"
for size in 64 128; do
  "$BIN" bench ml --size "$size" --backend cpu --reps 5
  "$BIN" bench ml --size "$size" --backend cuda --reps 20
done
per_stage() {
  # "done    stage[...]  1.23s" lines -> total seconds per stage
  awk '/^done /{l=$2; sub(/\[.*/, "", l); t=$NF; sub(/s$/, "", t); s[l]+=t; n[l]++} END {for (k in s) printf "  %-14s %4d instances %8.2fs\n", k, n[k], s[k]}' | sort
}
echo "== paper pipeline, CUDA backend"
start=$(date +%s.%N)
"$BIN" run pipelines/paper.yaml --backend cuda --cache-dir "$WORK/cuda" > "$WORK/cuda.log"
end=$(date +%s.%N)
per_stage < "$WORK/cuda.log"
grep '^summary:' "$WORK/cuda.log"
echo "  wall: $(echo "$end - $start" | bc)s"
"$BIN" show pipelines/paper.yaml --backend cuda --cache-dir "$WORK/cuda" --stage original
if [ "$WITH_CPU" = "--with-cpu" ]; then
  echo "== paper pipeline, CPU backend"
  "$BIN" run pipelines/paper.yaml --backend cpu --cache-dir "$WORK/cpu" > "$WORK/cpu.log"
  per_stage < "$WORK/cpu.log"
  grep '^summary:' "$WORK/cpu.log"
fi
rm -rf "$WORK"
