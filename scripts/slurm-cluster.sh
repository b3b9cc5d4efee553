#!/usr/bin/env bash
# A single-node Slurm cluster on this machine, from Debian's packages, for camflow's Slurm tests
# and benchmark (issue 9). Needs root (it installs packages, writes /etc/slurm and starts
# daemons).
#   usage: scripts/slurm-cluster.sh start|stop|status
# start: installs slurmctld, slurmd, slurm-client and munge if missing, makes the munge key,
#        writes /etc/slurm/slurm.conf for this host, starts munged, slurmctld and slurmd, and
#        waits (at most SLURM_START_TIMEOUT seconds, default 60) until `sinfo` shows the node
#        up. A second `start` is fine: what runs is kept, a changed configuration restarts the
#        Slurm daemons. A slurm.conf it did not write is never replaced (unless
#        SLURM_CLUSTER_FORCE=1).
# stop:  stops slurmd, slurmctld and munged (each by its pid file) and waits for them to exit.
# status: the daemons' pids, `sinfo` and `squeue`; exits 1 when the cluster is not usable.
# The configuration is measured and explained in /work/shared/SLURM-NOTES.md and README.md
# ("A test cluster on one machine").
set -euo pipefail

CONF_DIR=/etc/slurm
CONF=$CONF_DIR/slurm.conf
LOG_DIR=/var/log/slurm
CTLD_PID=/run/slurmctld.pid
SLURMD_PID=/run/slurmd.pid
MUNGE_PID=/run/munge/munged.pid
START_TIMEOUT=${SLURM_START_TIMEOUT:-60}
HOST=$(hostname)
MARKER="# Written by camflow's scripts/slurm-cluster.sh"

say() { echo "slurm-cluster: $*"; }
die() { echo "slurm-cluster: error: $*" >&2; exit 1; }

# Is the process named in pid file $1 alive, and is it program $2?
alive() {
  local pid
  [ -r "$1" ] || return 1
  pid=$(cat "$1" 2>/dev/null) || return 1
  [[ "$pid" =~ ^[0-9]+$ ]] || return 1
  [ "$(cat /proc/"$pid"/comm 2>/dev/null)" = "$2" ]
}

# Sends SIGTERM to the daemon of pid file $1 (program $2), then waits up to 10 s for it to go.
stop_daemon() {
  local pid i
  if ! alive "$1" "$2"; then rm -f "$1"; return 0; fi
  pid=$(cat "$1")
  kill "$pid" 2>/dev/null || true
  for i in $(seq 1 100); do
    [ -d /proc/"$pid" ] || { rm -f "$1"; say "stopped $2 (pid $pid)"; return 0; }
    sleep 0.1
  done
  kill -9 "$pid" 2>/dev/null || true
  rm -f "$1"
  say "killed $2 (pid $pid) after 10 s"
}

install_packages() {
  local missing=()
  command -v slurmctld >/dev/null 2>&1 || [ -x /usr/sbin/slurmctld ] || missing+=(slurmctld)
  command -v slurmd >/dev/null 2>&1 || [ -x /usr/sbin/slurmd ] || missing+=(slurmd)
  command -v sbatch >/dev/null 2>&1 || missing+=(slurm-client)
  [ -x /usr/sbin/munged ] || missing+=(munge)
  [ ${#missing[@]} -eq 0 ] && return 0
  command -v apt-get >/dev/null 2>&1 || die "missing ${missing[*]} and no apt-get to install them"
  say "installing ${missing[*]} (Debian packages, about 15 s)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq || die "apt-get update failed"
  # The packages' own service scripts would try systemd; none runs here, which is harmless.
  apt-get install -y -qq slurmctld slurmd slurm-client munge >/dev/null || die "apt-get install ${missing[*]} failed"
}

start_munge() {
  if [ ! -s /etc/munge/munge.key ]; then
    say "making the munge key"
    mkdir -p /etc/munge
    (umask 077; dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none)
  fi
  chown munge:munge /etc/munge/munge.key
  chmod 0400 /etc/munge/munge.key
  mkdir -p /run/munge /var/lib/munge /var/log/munge
  chown munge:munge /run/munge /var/lib/munge /var/log/munge
  chmod 0755 /run/munge
  if alive "$MUNGE_PID" munged && munge -n | unmunge >/dev/null 2>&1; then return 0; fi
  rm -f "$MUNGE_PID" /run/munge/munge.socket.2
  runuser -u munge -- /usr/sbin/munged || die "munged did not start (see /var/log/munge/munged.log)"
  local i
  for i in $(seq 1 50); do
    munge -n | unmunge >/dev/null 2>&1 && { say "munged up (pid $(cat "$MUNGE_PID"))"; return 0; }
    sleep 0.1
  done
  die "munged runs but \`munge -n | unmunge\` fails (see /var/log/munge/munged.log)"
}

# The configuration for this machine, on stdout.
write_conf() {
  local cpus mem_mb
  cpus=$(nproc)
  # RealMemory: what the kernel reports, less a margin for the OS and the daemons (10%, at
  # least 512 MB), so that slurmd never finds less memory than configured and drains the node.
  mem_mb=$(awk '/^MemTotal:/ { m = int($2 / 1024); r = int(m / 10); if (r < 512) r = 512; print (m - r > 256 ? m - r : 256) }' /proc/meminfo)
  cat <<EOF
$MARKER: a single-node test cluster on $HOST.
ClusterName=camflow-test
SlurmctldHost=$HOST
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=$CTLD_PID
SlurmdPidFile=$SLURMD_PID
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd.log
# No cgroups in this sandbox: processes are tracked by parent pid, no CPU binding, no
# accounting of job resources (so memory requests are bookkeeping, not enforced).
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
MpiDefault=none
MailProg=/bin/true
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
# A job that asks for no memory gets 1 GB per CPU instead of the whole node, so small jobs and
# array tasks run side by side as they would on a real cluster.
DefMemPerCPU=1024
ReturnToService=2

# --- Settings that make tests fast and failures prompt ---
# The scheduler runs when a job is submitted or ends; the periodic pass (default every 60 s)
# and the backfill pass (default 30 s) also run every 1-2 s, so no job waits a minute for a
# slot that is already free.
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=1,sched_min_interval=100000
# A job past its --time is signalled at once (no grace minutes) and SIGKILLed 2 s after its
# SIGTERM (default 30 s), so a time-limit test waits for the limit, not for the grace.
OverTimeLimit=0
KillWait=2
# A finished job stays visible to squeue/scontrol for 300 s (the default, kept explicitly): the
# controller must see the final state (COMPLETED, FAILED, TIMEOUT, CANCELLED) of a job that
# ended between two polls, and there is no accounting database (no sacct) to ask afterwards.
MinJobAge=300
# A node that stops answering is marked down after 30 s (default 300 s), so a lost node fails a
# test promptly instead of hanging it.
SlurmdTimeout=30
# No job is killed for an idle srun (there is none) and a batch job needs no login session.
InactiveLimit=0
# Ids restart from 1 after a clean state; array tasks up to 10,000 (the default is 1,001).
MaxArraySize=10001
MaxJobCount=100000

NodeName=$HOST CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
EOF
}

# The node's state as sinfo prints it (idle, mix, alloc, down*, drain...), or empty.
node_state() { sinfo -h -N -n "$HOST" -o %t 2>/dev/null | head -n 1; }

start() {
  [ "$(id -u)" -eq 0 ] || die "must run as root (installs packages, writes /etc/slurm, starts daemons)"
  install_packages
  start_munge
  mkdir -p "$CONF_DIR" "$LOG_DIR" /var/spool/slurmctld /var/spool/slurmd
  local new changed=0
  new=$(write_conf)
  # Never overwrite a configuration this script did not write (a real cluster's).
  if [ -f "$CONF" ] && ! head -n 1 "$CONF" | grep -q "^$MARKER" && [ "${SLURM_CLUSTER_FORCE:-0}" != 1 ]; then
    die "$CONF was not written by this script; set SLURM_CLUSTER_FORCE=1 to replace it"
  fi
  if [ ! -f "$CONF" ] || [ "$new" != "$(cat "$CONF")" ]; then
    printf '%s\n' "$new" > "$CONF.tmp" && mv "$CONF.tmp" "$CONF"
    changed=1
    say "wrote $CONF"
  fi
  if [ $changed -eq 1 ] && { alive "$CTLD_PID" slurmctld || alive "$SLURMD_PID" slurmd; }; then
    say "configuration changed: restarting the Slurm daemons"
    stop_daemon "$SLURMD_PID" slurmd
    stop_daemon "$CTLD_PID" slurmctld
  fi
  if ! alive "$CTLD_PID" slurmctld; then
    /usr/sbin/slurmctld || die "slurmctld did not start (see $LOG_DIR/slurmctld.log)"
    say "slurmctld started"
  fi
  if ! alive "$SLURMD_PID" slurmd; then
    /usr/sbin/slurmd || die "slurmd did not start (see $LOG_DIR/slurmd.log)"
    say "slurmd started"
  fi
  local deadline=$((SECONDS + START_TIMEOUT)) st="" resumed=0
  while :; do
    st=$(node_state)
    case "$st" in
      idle | mix | alloc | comp)
        say "node $HOST is $st ($(nproc) CPUs); partition debug is the default"
        return 0 ;;
      drain* | down* | drng*)
        # A node left drained or down by an earlier run (e.g. killed daemons): resume it once.
        if [ $resumed -eq 0 ]; then
          scontrol update nodename="$HOST" state=resume >/dev/null 2>&1 || true
          resumed=1
        fi ;;
    esac
    [ $SECONDS -lt $deadline ] || break
    sleep 0.5
  done
  echo "slurm-cluster: error: node $HOST not up after ${START_TIMEOUT} s (sinfo state: '${st:-no answer}')" >&2
  echo "--- last lines of $LOG_DIR/slurmctld.log" >&2; tail -n 15 "$LOG_DIR/slurmctld.log" >&2 2>/dev/null || true
  echo "--- last lines of $LOG_DIR/slurmd.log" >&2; tail -n 15 "$LOG_DIR/slurmd.log" >&2 2>/dev/null || true
  exit 1
}

stop() {
  [ "$(id -u)" -eq 0 ] || die "must run as root"
  stop_daemon "$SLURMD_PID" slurmd
  stop_daemon "$CTLD_PID" slurmctld
  stop_daemon "$MUNGE_PID" munged
}

status() {
  local ok=0 d
  for d in "$MUNGE_PID munged" "$CTLD_PID slurmctld" "$SLURMD_PID slurmd"; do
    set -- $d
    if alive "$1" "$2"; then echo "$2: running (pid $(cat "$1"))"; else echo "$2: not running"; ok=1; fi
  done
  if command -v sinfo >/dev/null 2>&1 && sinfo >/dev/null 2>&1; then
    sinfo
    squeue
    case "$(node_state)" in idle | mix | alloc | comp) ;; *) ok=1 ;; esac
  else
    echo "sinfo: no answer from slurmctld"
    ok=1
  fi
  return $ok
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) status ;;
  *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
