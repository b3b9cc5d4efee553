#!/bin/bash
# The controller's CPU time to submit a 10,000-instance threshold sweep to Slurm (BENCHMARKS.md,
# "Slurm submission (issue 9)"). Needs a running cluster (scripts/slurm-cluster.sh start).
# Every job is submitted held (`sbatch: [--hold]`) and the controller is stopped with SIGINT as
# soon as its last `submit` line appears, so it cancels them all: nothing runs on the cluster.
# Usage: scripts/slurm-submit-bench.sh [CAMFLOW_BINARY] [WORK_DIR]
set -euo pipefail
B=$(realpath "${1:-target/release/camflow}")
W=${2:-$(mktemp -d)}
mkdir -p "$W" && cd "$W"
python3 - <<'PY'
pre = """name: sweep10k
seed: 7
stages:
  data:
    kind: data
    params: {source: synthetic, count: 48, image_size: 16, contrast: 0.8, slices_per_patient: 4}
  train:
    kind: train
    inputs: {data: data}
    params: {epochs: 1, batch_size: 16}
  cams:
    kind: gradcam
    inputs: {model: train, data: data}
"""
open("pre.yaml", "w").write(pre)
vals = ", ".join("%.6f" % ((i + 1) / 10001) for i in range(10000))
open("sweep10k.yaml", "w").write(pre + "  masks:\n    kind: threshold\n    inputs: {heatmaps: cams}\n    sweep:\n      grid:\n        value: [%s]\n" % vals)
base = "executor:\n  kind: slurm\n  max_jobs: 100000\n  sbatch: [--hold]\n  poll: {min_s: 5, max_s: 15}\n"
for name, extra in [("batched", ""), ("one", "  batch: {threshold: 1}\n"), ("noarrays", "  arrays: false\n")]:
    open("held-%s.yaml" % name, "w").write(base + extra)
PY
# The upstream stages locally (same keys): only the 10,000 thresholds go to Slurm.
"$B" run pre.yaml --cache-dir cache > /dev/null
for cfg in batched:1 one:1 noarrays:200; do
  name=${cfg%%:*}; want=${cfg##*:}
  /usr/bin/time -f "%U %S %e" -o "time-$name.txt" "$B" run sweep10k.yaml --cache-dir cache --profile "held-$name.yaml" > "out-$name.txt" 2>&1 &
  T=$!
  sleep 0.5; C=$(pgrep -P $T)
  for _ in $(seq 1 2400); do
    [ "$(grep -c '^submit' "out-$name.txt" || true)" -ge "$want" ] && break
    sleep 0.25
  done
  kill -INT "$C"; wait $T || true
  echo "$name: sbatch calls=$(grep -c '^submit' "out-$name.txt") user sys wall=$(tail -1 "time-$name.txt")"
done
