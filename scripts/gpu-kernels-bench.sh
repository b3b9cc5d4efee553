#!/usr/bin/env bash
# Fixed against tuned GPU kernels (README, "Which GPU kernels"): the same small workloads in
# processes of each build, with its kernel cache empty and then warm, and bench ml's steps.
# Figures in BENCHMARKS.md ("Fixed or tuned GPU kernels").
#   scripts/gpu-kernels-bench.sh FIXED_BIN TUNED_BIN [BACKEND (wgpu)] [ROUNDS (2)]
# Build the two binaries with `--features wgpu` and `--features wgpu,gpu-tuned` (or cuda).
set -uo pipefail
FIXED=${1:?fixed-kernel camflow binary}; TUNED=${2:?tuned camflow binary}
BACKEND=${3:-wgpu}; ROUNDS=${4:-2}
WORK=$(mktemp -d); trap 'rm -rf "$WORK"' EXIT
export XDG_RUNTIME_DIR=${XDG_RUNTIME_DIR:-$WORK/xdg}; mkdir -p "$XDG_RUNTIME_DIR"
# A small study: one training (100 images, 16x16, 3 epochs), Grad-CAM, a threshold, a score.
cat > "$WORK/p.yaml" <<'YAML'
name: kernels-bench
seed: 7
stages:
  data: {kind: data, params: {source: synthetic, count: 100, image_size: 16, contrast: 0.8, slices_per_patient: 4}}
  train: {kind: train, inputs: {data: data}, params: {epochs: 3, batch_size: 16}}
  cams: {kind: gradcam, inputs: {model: train, data: data}}
  masks: {kind: threshold, inputs: {heatmaps: cams}}
  seg: {kind: score, inputs: {data: data, masks: masks}}
YAML
# Wall seconds of one command (its output kept in $WORK/last.out).
wall() {
  local s e rc
  s=$(date +%s.%N); "$@" > "$WORK/last.out" 2>&1; rc=$?; e=$(date +%s.%N)
  awk -v a="$s" -v b="$e" -v rc="$rc" 'BEGIN {printf "%.2fs%s", b - a, (rc ? " (exit " rc ")" : "")}'
}
field() { grep -o "\"$1\":[0-9.]*" "$WORK/last.out" | head -n 1; }
for round in $(seq "$ROUNDS"); do
  for build in fixed tuned; do
    bin=$FIXED; [ "$build" = tuned ] && bin=$TUNED
    for cache in cold warm; do
      # cold: camflow's kernel cache and the driver's shader caches (Mesa's, NVIDIA's) empty,
      # folders no earlier process used; warm: the same folders again. (A fixed wgpu build
      # keeps nothing in camflow's cache: no autotune results, no compiled wgpu kernels.)
      for work in fuse study; do
        dir="$WORK/$build-$work-$round"
        export CAMFLOW_KERNEL_CACHE="$dir/kernels" MESA_SHADER_CACHE_DIR="$dir/mesa" CUDA_CACHE_PATH="$dir/nv"
        if [ "$work" = fuse ]; then
          echo "round $round $build bench-fuse-k1 $cache: $(wall "$bin" bench fuse --backend "$BACKEND" --k 1 --size 16 --images 64) $(field warmup_s)"
        else
          echo "round $round $build study $cache: $(wall "$bin" run "$WORK/p.yaml" --backend "$BACKEND" --cache-dir "$WORK/cache-$build-$cache-$round")"
        fi
      done
    done
  done
done
# Steps (once per build, after the rounds): bench ml's own warm-up precedes its timings.
for build in fixed tuned; do
  bin=$FIXED; [ "$build" = tuned ] && bin=$TUNED
  export CAMFLOW_KERNEL_CACHE="$WORK/$build-ml/kernels" MESA_SHADER_CACHE_DIR="$WORK/$build-ml/mesa" CUDA_CACHE_PATH="$WORK/$build-ml/nv"
  echo "$build bench-ml-32: $(wall "$bin" bench ml --backend "$BACKEND" --size 32 --reps 10) $(field train_step_ms) $(field infer_images_per_s) $(field gradcam_heatmaps_per_s) $(field warmup_s)"
done
