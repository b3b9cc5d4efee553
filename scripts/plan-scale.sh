#!/usr/bin/env bash
# Time and peak memory of `camflow plan` on a generated study of 100,001 instances
# (10,000 trainings x 1 Grad-CAM x 8 thresholds), and the refusal of a 10-axis x 10-value
# grid. Nothing is trained: `plan` only expands, keys and looks up.
#   scripts/plan-scale.sh [path/to/camflow]      (default: target/release/camflow)
set -euo pipefail
bin="${1:-target/release/camflow}"
dir="$(mktemp -d)"
trap 'rm -rf "$dir"' EXIT
vals() { seq -s ', ' "$@"; }
cat > "$dir/scale.yaml" <<EOF
name: scale
stages:
  data:
    kind: data
    params: {source: synthetic, count: 16, image_size: 16}
  train:
    kind: train
    inputs: {data: data}
    sweep:
      grid:
        lr: [$(vals 0.001 0.001 0.010)]
        epochs: [$(vals 1 10)]
        seed: [$(vals 1 10)]
        weight_decay: [$(vals 0 0.0001 0.0009)]
  cams:
    kind: gradcam
    inputs: {model: train, data: data}
  masks:
    kind: threshold
    inputs: {heatmaps: cams}
    sweep:
      grid:
        value: [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8]
EOF
measure() {
  local label="$1"; shift
  # Bounded: a camflow without the instance limit would plan 10^10 instances until memory ends.
  /usr/bin/time -v timeout 20 "$bin" "$@" --cache-dir "$dir/cache" >"$dir/out" 2>"$dir/time" || true
  local wall rss
  wall=$(grep 'Elapsed (wall clock)' "$dir/time" | awk '{print $NF}')
  rss=$(grep 'Maximum resident set size' "$dir/time" | awk '{print $NF}')
  printf '%-34s wall %s  max RSS %s MB  (%s)\n' "$label" "$wall" "$((rss / 1024))" "$(tail -n 1 "$dir/out" | cut -c1-80)"
}
measure "plan (text), 100,001 instances" plan "$dir/scale.yaml"
measure "plan --json, 100,001 instances" plan "$dir/scale.yaml" --json
measure "run --dry-run, 100,001 instances" run "$dir/scale.yaml" --dry-run

# 10 axes x 10 values (6 on train, 3 on cams, 1 on masks): 10^10 instances, refused
# before anything is expanded.
ten() { local f="$1" out="" i; for i in 1 2 3 4 5 6 7 8 9 10; do out+="${out:+, }$(printf "$f" "$i")"; done; echo "[$out]"; }
cat > "$dir/huge.yaml" <<EOF
name: huge
stages:
  data:
    kind: data
    params: {source: synthetic, count: 16, image_size: 16}
  train:
    kind: train
    inputs: {data: data}
    sweep:
      grid:
        lr: $(ten '0.%03d')
        weight_decay: $(ten '0.%04d')
        momentum: $(ten '0.%02d')
        epochs: $(ten '%d')
        batch_size: $(ten '%d')
        seed: $(ten '%d')
  cams:
    kind: gradcam
    inputs: {model: train, data: data}
    sweep:
      grid:
        layer: $(ten '%d')
        batch_size: $(ten '%d')
        target: $(ten 'c%d')
  masks:
    kind: threshold
    inputs: {heatmaps: cams}
    sweep:
      grid:
        value: $(ten '0.%02d')
EOF
measure "plan, 10-axis x 10-value grid" plan "$dir/huge.yaml"
grep -m1 '^error' "$dir/time" | cut -c1-400 || true
