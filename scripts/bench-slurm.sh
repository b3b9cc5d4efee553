#!/usr/bin/env bash
# Slurm benchmark (issue 9): the paper-shaped sweep DAG through `snakemake --executor slurm`
# and through `camflow run --executor slurm`, back to back on the same cluster, from a cold
# start (fresh folder and cache) to the end of the run. Prints one JSON line per tool, variant
# and shape: stages, sbatch calls (a counting shim first on PATH), wall seconds.
#   usage: scripts/bench-slurm.sh [SHAPE...]      SHAPE = A,T,M (default: 2,9,4 10,20,4)
# Environment:
#   TOOLS      which sides to run (default "snakemake camflow")
#   SNAKEMAKE  the snakemake executable (default: snakemake on PATH), with
#              snakemake-executor-plugin-slurm installed beside it, e.g.
#                python3 -m venv /tmp/smk-venv
#                /tmp/smk-venv/bin/pip install snakemake snakemake-executor-plugin-slurm
#   CAMFLOW    the camflow binary (default: target/release/camflow)
#   WORKDIR    where the projects go (default: a new temporary folder; jobs must see it)
#   MAX_JOBS   jobs in flight for both tools (default 100)
#   LIMIT_S    give up on a run after this many seconds (its JSON line says "timeout" and
#              how many stages finished); default: no limit
#   SMK_VARIANTS, CAMFLOW_VARIANTS  which variants (default "default arrays", "default
#              on-controller"; snakemake also has "fastpoll": status checks every second)
# Needs a running Slurm (scripts/slurm-cluster.sh start).
#
# The DAG: train[a], gradcam[a], threshold[a,t], score_seg[a,t], filter[a,m], retrain[a,m],
# score_cls[a,m] (2,9,4: 64 stages; 10,20,4: 540). Snakemake gets the Snakefile of
# /work/shared/bench/orch_peers.sh (trivial shell commands); camflow the pipeline of
# `camflow bench orch` (src/cli/bench.rs: real stage kinds at the smallest size, 16 images of
# 8x8, zero epochs, plus the one data instance).
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
TOOLS=${TOOLS:-snakemake camflow}
SNAKEMAKE=${SNAKEMAKE:-snakemake}
CAMFLOW=${CAMFLOW:-$REPO/target/release/camflow}
MAX_JOBS=${MAX_JOBS:-100}
W=${WORKDIR:-$(mktemp -d /tmp/bench-slurm.XXXXXX)}
mkdir -p "$W"
SHAPES=("$@")
[ ${#SHAPES[@]} -gt 0 ] || SHAPES=(2,9,4 10,20,4)

sinfo >/dev/null 2>&1 || { echo "bench-slurm: Slurm does not answer (sinfo); start it: scripts/slurm-cluster.sh start" >&2; exit 1; }
REAL_SBATCH=$(command -v sbatch)

# A counting shim in $1/shim: every sbatch call is logged (one line: its answer, the job id
# with --parsable, then its arguments) to $1/sbatch.log.
make_shim() {
  mkdir -p "$1/shim"
  cat > "$1/shim/sbatch" <<EOF
#!/bin/sh
out=\$('$REAL_SBATCH' "\$@")
rc=\$?
printf '%s\\t%s\\n' "\$out" "\$*" >> '$1/sbatch.log'
[ -n "\$out" ] && printf '%s\\n' "\$out"
exit \$rc
EOF
  chmod +x "$1/shim/sbatch"
  : > "$1/sbatch.log"
}

# Wall seconds of a command (stdout and stderr to $LOG), failing loudly with its log. With
# LIMIT_S set, a command still running after that many seconds gets SIGINT (both tools then
# cancel their jobs), the jobs of $SHIMLOG are cancelled too, and "timeout" is printed.
timed() {
  local t0 t1 rc=0
  t0=$(date +%s.%N)
  if [ -n "${LIMIT_S:-}" ]; then
    timeout --signal=INT --kill-after=60 "$LIMIT_S" "$@" > "$LOG" 2>&1 || rc=$?
  else
    "$@" > "$LOG" 2>&1 || rc=$?
  fi
  t1=$(date +%s.%N)
  if [ $rc -eq 124 ] && [ -n "${LIMIT_S:-}" ]; then
    cut -f1 "$SHIMLOG" | cut -d';' -f1 | grep -E '^[0-9]+$' | xargs -r scancel 2>/dev/null || true
    echo timeout
    return 0
  fi
  if [ $rc -ne 0 ]; then
    echo "bench-slurm: failed ($rc): $* (log: $LOG)" >&2
    tail -n 30 "$LOG" >&2
    exit 1
  fi
  python3 -c "print(round($t1 - $t0, 2))"
}

# No job of this measurement may still be queued when the next starts (jobs of $1/sbatch.log).
wait_jobs_gone() {
  local ids i
  ids=$(cut -f1 "$1/sbatch.log" | cut -d';' -f1 | grep -E '^[0-9]+$' | paste -sd, -)
  [ -n "$ids" ] || return 0
  for i in $(seq 1 1200); do
    [ -z "$(squeue -h -j "$ids" -t PENDING,RUNNING,COMPLETING 2>/dev/null)" ] && return 0
    sleep 0.5
  done
  echo "bench-slurm: jobs of $1 still queued after 10 minutes" >&2
  exit 1
}

json() { python3 -c 'import json,sys
def val(v):
    try: return json.loads(v)
    except ValueError: return v
a=sys.argv[1:]; print(json.dumps({k: val(v) for k, v in zip(a[::2], a[1::2])}))' "$@"; }

snakemake_side() {
  local a=$1 t=$2 m=$3 variant=$4 d archs thr modes stages extra=() wall calls
  d=$W/smk-a$a-t$t-m$m-$variant
  rm -rf "$d"; mkdir -p "$d"
  archs=$(seq -s, 1 "$a" | sed 's/[0-9]\+/a&/g'); thr=$(seq -s, 1 "$t" | sed 's/[0-9]\+/t&/g'); modes=$(seq -s, 1 "$m" | sed 's/[0-9]\+/m&/g')
  stages=$((a * 2 + a * t * 2 + a * m * 3))
  # The Snakefile of /work/shared/bench/orch_peers.sh.
  cat > "$d/Snakefile" <<SMK
A = "$archs".split(","); T = "$thr".split(","); M = "$modes".split(",")
rule all:
    input: expand("seg_{a}_{t}", a=A, t=T), expand("cls_{a}_{m}", a=A, m=M)
rule train:
    output: "train_{a}"
    shell: "echo {wildcards.a} > {output}"
rule gradcam:
    input: "train_{a}"
    output: "cam_{a}"
    shell: "cat {input} > {output}"
rule threshold:
    input: "cam_{a}"
    output: "thr_{a}_{t}"
    shell: "cat {input} > {output}; echo {wildcards.t} >> {output}"
rule score_seg:
    input: "thr_{a}_{t}"
    output: "seg_{a}_{t}"
    shell: "cat {input} > {output}"
rule filter:
    input: "cam_{a}"
    output: "fil_{a}_{m}"
    shell: "cat {input} > {output}; echo {wildcards.m} >> {output}"
rule retrain:
    input: "fil_{a}_{m}"
    output: "re_{a}_{m}"
    shell: "cat {input} > {output}"
rule score_cls:
    input: "re_{a}_{m}"
    output: "cls_{a}_{m}"
    shell: "cat {input} > {output}"
SMK
  make_shim "$d"
  # No accounting database on the test cluster: job states from squeue, no account lookup.
  # Every job asks for 1 CPU and 100 MB so jobs run side by side (as camflow's do).
  case $variant in
    default) ;;
    arrays) extra=(--slurm-array-jobs=all) ;;
    # Status checks as often as camflow's poll (the defaults wait 40 s before the first check
    # and 10 s between checks).
    fastpoll) extra=(--slurm-init-seconds-before-status-checks=1 --seconds-between-status-checks=1) ;;
  esac
  LOG=$d/run.log SHIMLOG=$d/sbatch.log
  wall=$(cd "$d" && PATH="$d/shim:$PATH" timed "$SNAKEMAKE" --executor slurm --jobs "$MAX_JOBS" \
    --slurm-status-command squeue --slurm-no-account \
    --default-resources slurm_partition=debug mem_mb=100 cpus_per_task=1 runtime=10 \
    "${extra[@]}" -q)
  calls=$(wc -l < "$d/sbatch.log")
  # Stages finished: their output files (a timed-out run reports how far it got).
  done_stages=$(cd "$d" && ls | grep -cE '^(train|cam|thr|seg|fil|re|cls)_' || true)
  if [ "$wall" != timeout ] && [ "$done_stages" -ne "$stages" ]; then
    echo "bench-slurm: snakemake finished with $done_stages of $stages outputs ($d)" >&2
    exit 1
  fi
  json tool "snakemake $("$SNAKEMAKE" --version) --executor slurm" variant "$variant" shape "$a,$t,$m" stages "$stages" stages_done "$done_stages" sbatch_calls "$calls" wall_s "$wall" ${LIMIT_S:+limit_s "$LIMIT_S"}
  wait_jobs_gone "$d"
}

# The pipeline of `camflow bench orch` (src/cli/bench.rs, sweep_yaml).
camflow_yaml() {
  local a=$1 t=$2 m=$3 seeds thr modes
  seeds=$(seq -s ', ' 1 "$a")
  thr=$(python3 -c "import sys; t=int(sys.argv[1]); print(', '.join(repr(i/(t+1)) for i in range(1,t+1)))" "$t")
  modes=$(echo "multiply, inverse, mask, inverse-mask" | cut -d, -f1-"$m")
  cat <<EOF
name: bench
seed: 1
stages:
  data:
    kind: data
    params: {source: synthetic, count: 16, image_size: 8, slices_per_patient: 1}
  train:
    kind: train
    inputs: {data: data}
    params: {epochs: 0, batch_size: 16}
    resources: {cpu: 1}
    sweep:
      grid:
        seed: [$seeds]
  gradcam:
    kind: gradcam
    inputs: {model: train, data: data}
    resources: {cpu: 1}
  threshold:
    kind: threshold
    inputs: {heatmaps: gradcam}
    sweep:
      grid:
        value: [$thr]
  score_seg:
    kind: score
    inputs: {data: data, masks: threshold}
  filter:
    kind: filter
    inputs: {data: data, heatmaps: gradcam}
    sweep:
      grid:
        mode: [$modes]
  retrain:
    kind: retrain
    inputs: {data: filter}
    params: {epochs: 0, batch_size: 16}
    resources: {cpu: 1}
  score_cls:
    kind: score
    inputs: {data: filter, model: retrain}
EOF
}

camflow_side() {
  local a=$1 t=$2 m=$3 variant=$4 d stages wall calls jobs summary
  d=$W/camflow-a$a-t$t-m$m-$variant
  rm -rf "$d"; mkdir -p "$d"
  stages=$((a * 2 + a * t * 2 + a * m * 3))
  camflow_yaml "$a" "$t" "$m" > "$d/sweep.yaml"
  {
    echo "executor:"
    echo "  kind: slurm"
    echo "  max_jobs: $MAX_JOBS"
    case $variant in
      default) ;;
      # Cheap kinds on the controller: only train, gradcam and retrain become jobs.
      on-controller) echo "  on_controller: [threshold, score, filter]" ;;
    esac
  } > "$d/profile.yaml"
  make_shim "$d"
  LOG=$d/run.log SHIMLOG=$d/sbatch.log
  wall=$(cd "$d" && PATH="$d/shim:$PATH" timed "$CAMFLOW" run sweep.yaml --executor slurm --profile profile.yaml --cache-dir cache)
  calls=$(wc -l < "$d/sbatch.log")
  summary=$(grep '^summary:' "$LOG" | tail -n 1)
  jobs=$(echo "$summary" | grep -o 'jobs=[0-9]*' | cut -d= -f2)
  [ "$wall" = timeout ] && jobs=null
  [ -n "$jobs" ] || { echo "bench-slurm: no jobs= in camflow's summary: $summary" >&2; exit 1; }
  json tool "camflow $("$CAMFLOW" --version | awk '{print $2}') --executor slurm" variant "$variant" shape "$a,$t,$m" stages "$stages" instances "$((stages + 1))" sbatch_calls "$calls" jobs "$jobs" wall_s "$wall"
  wait_jobs_gone "$d"
}

for shape in "${SHAPES[@]}"; do
  IFS=, read -r a t m <<< "$shape"
  for tool in $TOOLS; do
    case $tool in
      snakemake) for v in ${SMK_VARIANTS:-default arrays}; do snakemake_side "$a" "$t" "$m" "$v"; done ;;
      camflow) for v in ${CAMFLOW_VARIANTS:-default on-controller}; do camflow_side "$a" "$t" "$m" "$v"; done ;;
      *) echo "bench-slurm: unknown tool $tool (snakemake, camflow)" >&2; exit 2 ;;
    esac
  done
done
