#!/usr/bin/env bash
# Runs the trainer as a multi-host job on this machine: N processes on CPU, D simulated devices each, joined by
# jax.distributed (a coordinator on a free localhost port, gloo collectives), as the hosts of a pod would be.
#   local.sh --num_processes N [--devices_per_process D] --config CONFIG --workdir DIR [--heartbeat_timeout S]
#            [--grace S] [--dry-run] [TRAINER_ARGS, e.g. --config.num_steps=100] [-- TRAINER_ARGS]
# Process 0's output streams here; process i's is appended to DIR/process_i.log. Exit status: 0 when every process
# finished, else the first non-zero status (the other processes are then sent SIGTERM, and SIGKILL after --grace
# seconds). SIGTERM or Ctrl-C here reaches every process: the run saves a checkpoint and stops; rerun to resume.
# A process that dies makes the others stop within --heartbeat_timeout seconds (the jax coordination service's).
set -euo pipefail

NUM_PROCESSES=""
DEVICES=1
CONFIG=""
WORKDIR=""
HEARTBEAT=10
GRACE=""
DRY_RUN=0
TRAINER_ARGS=()
REPO_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python}"

usage() {
  echo "usage: $(basename "$0") --num_processes N [--devices_per_process D] --config CONFIG --workdir DIR" \
    "[--heartbeat_timeout SECONDS] [--grace SECONDS] [--dry-run] [TRAINER_ARGS] [-- TRAINER_ARGS]" >&2
  exit 2
}

positive() {
  [[ "$2" =~ ^[1-9][0-9]*$ ]] || { echo "$1 $2: expected a positive integer" >&2; usage; }
}

while (($#)); do
  case "$1" in
    --num_processes|--devices_per_process|--config|--workdir|--heartbeat_timeout|--grace)
      (($# >= 2)) || usage
      case "$1" in
        --num_processes) NUM_PROCESSES="$2" ;;
        --devices_per_process) DEVICES="$2" ;;
        --config) CONFIG="$2" ;;
        --workdir) WORKDIR="$2" ;;
        --heartbeat_timeout) HEARTBEAT="$2" ;;
        --grace) GRACE="$2" ;;
      esac
      shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    --) shift; TRAINER_ARGS+=("$@"); break ;;
    -h|--help) usage ;;
    --*) TRAINER_ARGS+=("$1"); shift ;;
    *) echo "unexpected argument: $1" >&2; usage ;;
  esac
done
[[ -n "$NUM_PROCESSES" && -n "$CONFIG" && -n "$WORKDIR" ]] || usage
positive --num_processes "$NUM_PROCESSES"
positive --devices_per_process "$DEVICES"
positive --heartbeat_timeout "$HEARTBEAT"
GRACE="${GRACE:-$((HEARTBEAT + 20))}"
positive --grace "$GRACE"

# A free TCP port on localhost for the coordination service (process 0 binds it).
free_port() {
  "$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# XLA_FLAGS with this job's device count in place of any given.
xla_flags() {
  local flag kept=""
  for flag in ${XLA_FLAGS:-}; do
    [[ "$flag" == --xla_force_host_platform_device_count=* ]] || kept+="$flag "
  done
  echo "${kept}--xla_force_host_platform_device_count=$DEVICES"
}

# The environment of process $1 as NAME=VALUE words.
process_env() {
  local -a env=("PYTHONPATH=$REPO_DIR${PYTHONPATH:+:$PYTHONPATH}" "JAX_PLATFORMS=cpu" "XLA_FLAGS=$(xla_flags)")
  if ((NUM_PROCESSES > 1)); then
    env+=("JAX_CPU_COLLECTIVES_IMPLEMENTATION=gloo" "MIXERS_COORDINATOR=127.0.0.1:$PORT"
          "MIXERS_NUM_PROCESSES=$NUM_PROCESSES" "MIXERS_PROCESS_ID=$1" "MIXERS_HEARTBEAT_TIMEOUT=$HEARTBEAT"
          "MIXERS_SHUTDOWN_TIMEOUT=$GRACE")
  fi
  printf '%s\n' "${env[@]}"
}

PORT="$(free_port)"
TRAINER=("$PYTHON" -m experiments.train "--config=$CONFIG" "--workdir=$WORKDIR" "${TRAINER_ARGS[@]}")
log_of() { echo "$WORKDIR/process_$1.log"; }

if ((DRY_RUN)); then
  for ((i = 0; i < NUM_PROCESSES; i++)); do
    mapfile -t env < <(process_env "$i")
    line="$(printf '%q ' env "${env[@]}" "${TRAINER[@]}")"
    if ((i > 0)); then line+=">> $(printf '%q' "$(log_of "$i")") 2>&1"; fi
    echo "${line% }"
  done
  exit 0
fi

mkdir -p "$WORKDIR"
PIDS=()
for ((i = 0; i < NUM_PROCESSES; i++)); do
  mapfile -t env < <(process_env "$i")
  if ((i == 0)); then
    env "${env[@]}" "${TRAINER[@]}" < /dev/null &
  else
    echo "=== local.sh: process $i of $NUM_PROCESSES, started $(date '+%F %T')" >> "$(log_of "$i")"
    env "${env[@]}" "${TRAINER[@]}" < /dev/null >> "$(log_of "$i")" 2>&1 &
  fi
  PIDS+=("$!")
done

# Signals to this script reach every process as SIGTERM (a preemption: the run saves a checkpoint and stops).
forward() {
  echo "local.sh: passing SIGTERM to the $NUM_PROCESSES processes" >&2
  kill -TERM "${PIDS[@]}" 2> /dev/null || true
}
trap forward TERM INT

# Stops the processes still running: SIGTERM, then SIGKILL after GRACE seconds.
stop_others() {
  local pid deadline=$((SECONDS + GRACE))
  kill -TERM "${PIDS[@]}" 2> /dev/null || true
  for pid in "${PIDS[@]}"; do
    while kill -0 "$pid" 2> /dev/null && ((SECONDS < deadline)); do sleep 0.2; done
  done
  kill -KILL "${PIDS[@]}" 2> /dev/null || true
}

# Polls the processes; of those found ended together, one killed by a signal (status > 128) is named first.
running=$NUM_PROCESSES
declare -A ended=()
while ((running > 0)); do
  failed="" failed_status=0
  for i in "${!PIDS[@]}"; do
    pid="${PIDS[$i]}"
    [[ -z "${ended[$pid]:-}" ]] || continue
    kill -0 "$pid" 2> /dev/null && continue
    status=0
    wait "$pid" || status=$?
    ended[$pid]=1
    running=$((running - 1))
    if ((status != 0)) && { [[ -z "$failed" ]] || ((status > 128 && failed_status <= 128)); }; then
      failed=$i failed_status=$status
    fi
  done
  if [[ -n "$failed" ]]; then
    echo "local.sh: process $failed exited with status $failed_status; stopping the others" \
      "(logs: $WORKDIR/process_*.log)" >&2
    stop_others
    exit "$failed_status"
  fi
  sleep 0.2
done
