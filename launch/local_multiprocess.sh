#!/usr/bin/env bash
# Run a multi-process jaxft training job on this machine, on CPU.
#
# Simulates a multi-host run: NUM_PROCESSES processes, each with
# DEVICES_PER_PROCESS fake CPU devices, joined through a JAX coordinator on
# localhost. Use it to exercise the multi-host code paths (per-process data
# loading, sharded checkpoints, mesh config) without a cluster.
#
# Usage:
#   launch/local_multiprocess.sh NUM_PROCESSES DEVICES_PER_PROCESS CONFIG WORKDIR [extra args...]
#
# Example:
#   launch/local_multiprocess.sh 2 2 configs/lora.py /tmp/run --config.train.steps=30
#
# Environment variables:
#   PORT          coordinator port on localhost (default 12355)
#   PYTHON        Python interpreter (default python3)
#   LOG_DIR       where the per-process logs go (default WORKDIR/logs)
#   KILL_TIMEOUT  seconds between SIGTERM and SIGKILL when stopping (default 30)
#
# Behaviour:
#   - Process i logs to LOG_DIR/process_i.log (appended to); process 0 is also
#     shown on the terminal.
#   - If a process fails, the others get SIGTERM (then SIGKILL after
#     KILL_TIMEOUT seconds) and the script exits with the failed process's status.
#   - SIGINT (Ctrl-C) and SIGTERM are passed on to every process; a second
#     signal kills them outright. The script then exits with 130 or 143.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: launch/local_multiprocess.sh NUM_PROCESSES DEVICES_PER_PROCESS CONFIG WORKDIR [extra args...]

Starts NUM_PROCESSES local CPU processes of `python -m jaxft.train`, each with
DEVICES_PER_PROCESS fake CPU devices, coordinated through localhost:$PORT.

  NUM_PROCESSES        number of JAX processes (simulated hosts), e.g. 2
  DEVICES_PER_PROCESS  CPU devices per process, e.g. 2
  CONFIG               config file, e.g. configs/lora.py
  WORKDIR              output directory (logs go to WORKDIR/logs)
  extra args           passed on to jaxft.train, e.g. --config.train.steps=30

Environment: PORT (default 12355), PYTHON (default python3),
             LOG_DIR (default WORKDIR/logs), KILL_TIMEOUT (default 30).

Example:
  launch/local_multiprocess.sh 2 2 configs/lora.py /tmp/run --config.train.steps=30
EOF
}

log() { echo "[launch] $*" >&2; }
die() { log "error: $*"; exit 1; }
usage_error() { echo "error: $*" >&2; echo >&2; usage >&2; exit 2; }

# shellcheck source=launch/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

is_positive_int() { [[ $1 =~ ^[1-9][0-9]*$ ]]; }

# --- Arguments ---------------------------------------------------------------

if (( $# < 4 )); then
  usage >&2
  exit 2
fi
num_processes=$1
devices_per_process=$2
config=$3
workdir=$4
shift 4  # "$@" now holds the extra args for jaxft.train

is_positive_int "$num_processes" ||
  usage_error "NUM_PROCESSES must be a positive integer, got '$num_processes'"
is_positive_int "$devices_per_process" ||
  usage_error "DEVICES_PER_PROCESS must be a positive integer, got '$devices_per_process'"

PORT=${PORT:-12355}
PYTHON=${PYTHON:-python3}
KILL_TIMEOUT=${KILL_TIMEOUT:-30}
if ! is_positive_int "$PORT" || (( PORT > 65535 )); then
  die "PORT must be a port number, got '$PORT'"
fi
is_positive_int "$KILL_TIMEOUT" || die "KILL_TIMEOUT must be a positive integer, got '$KILL_TIMEOUT'"

if [[ -z ${LOG_DIR:-} && $workdir == *://* ]]; then
  die "WORKDIR '$workdir' is not a local path; set LOG_DIR to a local directory for the logs"
fi
LOG_DIR=${LOG_DIR:-$workdir/logs}

command -v "$PYTHON" >/dev/null || die "Python interpreter '$PYTHON' not found (set PYTHON)"
[[ -f ${config%%:*} ]] || die "config file '${config%%:*}' not found"

# --- Environment shared by all processes --------------------------------------

repo_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

export JAX_PLATFORMS=cpu
export XLA_FLAGS="${XLA_FLAGS:+$XLA_FLAGS }--xla_force_host_platform_device_count=$devices_per_process"
# Cross-process collectives on CPU need an implementation; older jax has none by default.
export JAX_CPU_COLLECTIVES_IMPLEMENTATION=${JAX_CPU_COLLECTIVES_IMPLEMENTATION:-gloo}
# Use this checkout's jaxft even when it is not pip-installed.
export PYTHONPATH="$repo_root${PYTHONPATH:+:$PYTHONPATH}"
# Let logs reach the files and the terminal as they are written.
export PYTHONUNBUFFERED=1

# A coordinator already on this port leads to confusing hangs, so check first.
"$PYTHON" - "$PORT" <<'EOF' 2>/dev/null || die "port $PORT is already in use; pick another with PORT=..."
import socket, sys
with socket.socket() as s:
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("", int(sys.argv[1])))
EOF

mkdir -p "$LOG_DIR"
tmp_dir=$(mktemp -d "${TMPDIR:-/tmp}/jaxft-launch.XXXXXX")

log "$num_processes processes x $devices_per_process CPU devices, coordinator localhost:$PORT"
log "env: JAX_PLATFORMS=$JAX_PLATFORMS XLA_FLAGS='$XLA_FLAGS'" \
  "JAX_CPU_COLLECTIVES_IMPLEMENTATION=$JAX_CPU_COLLECTIVES_IMPLEMENTATION"
log "logs: $LOG_DIR/process_<i>.log"

# --- Process management -------------------------------------------------------

running=()          # running[i] = pid of process i, unset once it has exited
tee_pid=""          # copies process 0's output to the terminal and its log
received_signal=""  # INT or TERM once we were asked to stop
exit_status=0       # status of the first process that failed
stopping=false      # true once we have asked the processes to stop
kill_deadline=0     # SECONDS value at which survivors get SIGKILL (0: none)

signal_all() {
  local pid
  (( ${#running[@]} > 0 )) || return 0
  for pid in "${running[@]}"; do
    kill -s "$1" "$pid" 2>/dev/null || true
  done
}

stop_all() {
  stopping=true
  signal_all "$1"
  kill_deadline=$(( SECONDS + KILL_TIMEOUT ))
}

on_signal() {
  if [[ -n $received_signal ]]; then
    log "received SIG$1 again: killing all processes"
    signal_all KILL
  else
    received_signal=$1
    log "received SIG$1: forwarding it to all processes (send it again to kill them)"
    stop_all "$1"
  fi
}

cleanup() {
  # Reached on every exit; only does something if we exit unexpectedly early.
  signal_all TERM
  if [[ -n $tee_pid ]]; then kill "$tee_pid" 2>/dev/null || true; fi
  rm -rf "$tmp_dir"
}

trap 'on_signal INT' INT
trap 'on_signal TERM' TERM
trap cleanup EXIT

# --- Start the processes ------------------------------------------------------

for (( i = 0; i < num_processes; i++ )); do
  log_file="$LOG_DIR/process_$i.log"
  cmd=("$PYTHON" -m jaxft.train
       --config="$config" --workdir="$workdir"
       --coordinator_address="localhost:$PORT"
       --num_processes="$num_processes" --process_id="$i"
       "$@")
  log "process $i: $(quote_cmd "${cmd[@]}")"
  echo "===== $(date '+%F %T') process $i: $(quote_cmd "${cmd[@]}")" >>"$log_file"

  output=$log_file
  if (( i == 0 )); then
    # Process 0 writes into a FIFO that tee copies to the terminal and the log.
    output="$tmp_dir/process_0.fifo"
    mkfifo "$output"
    tee -a "$log_file" <"$output" &
    tee_pid=$!
  fi

  # With setsid each process runs in its own session, so a Ctrl-C on the
  # terminal reaches only this script, which forwards it once (see on_signal).
  # setsid keeps the pid, as the subshell is not a process group leader.
  if command -v setsid >/dev/null; then
    cmd=(setsid "${cmd[@]}")
  fi
  # Background commands of a script ignore SIGINT; `trap - INT` undoes that
  # so that a forwarded Ctrl-C reaches Python as KeyboardInterrupt.
  ( trap - INT TERM; exec "${cmd[@]}" ) >>"$output" 2>&1 </dev/null &
  running[i]=$!
done

# --- Wait for them ------------------------------------------------------------

while (( ${#running[@]} > 0 )); do
  for i in "${!running[@]}"; do
    pid=${running[i]}
    if kill -0 "$pid" 2>/dev/null; then
      continue
    fi
    status=0
    wait "$pid" || status=$?
    unset 'running[i]'

    if (( status == 0 )); then
      log "process $i finished"
    elif $stopping; then
      log "process $i stopped (status $status)"
    else
      log "process $i failed with status $status (log: $LOG_DIR/process_$i.log)"
      if (( exit_status == 0 )); then
        exit_status=$status
        if (( ${#running[@]} > 0 )); then
          log "stopping the other processes"
          stop_all TERM
        fi
      fi
    fi
  done

  if (( kill_deadline > 0 && SECONDS >= kill_deadline && ${#running[@]} > 0 )); then
    log "processes still running ${KILL_TIMEOUT}s after being asked to stop: sending SIGKILL"
    signal_all KILL
    kill_deadline=0
  fi
  sleep 1 || true  # `|| true`: Ctrl-C also interrupts sleep; that must not end the script
done

# Let tee print the rest of process 0's output (give up after a few seconds,
# e.g. if a killed process left a child holding the FIFO open).
for _ in 1 2 3 4 5; do
  kill -0 "$tee_pid" 2>/dev/null || break
  sleep 1 || true
done
kill "$tee_pid" 2>/dev/null || true
wait "$tee_pid" 2>/dev/null || true
tee_pid=""

case $received_signal in
  INT) log "interrupted"; exit 130 ;;
  TERM) log "terminated"; exit 143 ;;
esac
if (( exit_status != 0 )); then
  log "FAILED (status $exit_status); logs in $LOG_DIR"
  exit "$exit_status"
fi
log "all $num_processes processes finished successfully; logs in $LOG_DIR"
