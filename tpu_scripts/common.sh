#!/usr/bin/env bash
# Flags and helpers shared by the TPU VM scripts; sourced, not run.
#   --name NAME --zone ZONE --type ACCELERATOR_TYPE [--project P] [--version RUNTIME] [--dry-run]
# Script-specific flags are declared by the caller in EXTRA_FLAGS ("flag:VARIABLE" pairs).
# shellcheck disable=SC2034  # the variables set here are read by the scripts that source this file
set -euo pipefail

NAME="${TPU_NAME:-}"
ZONE="${TPU_ZONE:-}"
TYPE="${TPU_TYPE:-}"
PROJECT="${TPU_PROJECT:-}"
VERSION="${TPU_VERSION:-tpu-ubuntu2204-base}"
DRY_RUN=0
EXTRA_ARGS=()
REPO_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
REMOTE_DIR="mixers"

usage() {
  echo "usage: $(basename "$0") --name NAME --zone ZONE --type ACCELERATOR_TYPE [--project PROJECT]" \
    "[--version RUNTIME] [--dry-run] ${USAGE_EXTRA:-}" >&2
  exit 2
}

parse_flags() {
  while (($#)); do
    case "$1" in
      --name) NAME="$2"; shift 2 ;;
      --zone) ZONE="$2"; shift 2 ;;
      --type) TYPE="$2"; shift 2 ;;
      --project) PROJECT="$2"; shift 2 ;;
      --version) VERSION="$2"; shift 2 ;;
      --dry-run) DRY_RUN=1; shift ;;
      --) shift; EXTRA_ARGS=("$@"); break ;;
      -h|--help) usage ;;
      *)
        local pair found=0
        for pair in ${EXTRA_FLAGS:-}; do
          if [[ "$1" == "--${pair%%:*}" ]]; then
            (($# >= 2)) || usage
            printf -v "${pair##*:}" '%s' "$2"
            found=1
            shift 2
            break
          fi
        done
        ((found)) || { echo "unknown flag: $1" >&2; usage; }
        ;;
    esac
  done
  [[ -n "$NAME" && -n "$ZONE" && -n "$TYPE" ]] || usage
}

# Single-quotes an argument unless it is made of plain characters.
quote() {
  if [[ "$1" =~ ^[A-Za-z0-9_./:=@,+%-]+$ ]]; then
    printf '%s' "$1"
  else
    printf "'%s'" "${1//\'/\'\\\'\'}"
  fi
}

# Prints the command (copy-pasteable) with --dry-run, runs it otherwise.
run() {
  if ((DRY_RUN)); then
    local line="" arg
    for arg in "$@"; do line+="$(quote "$arg") "; done
    echo "${line% }"
  else
    "$@"
  fi
}

# gcloud compute tpus tpu-vm SUBCOMMAND NAME --zone=ZONE [--project=P] ARGS...
tpu_vm() {
  local sub="$1"
  shift
  local -a project=()
  if [[ -n "$PROJECT" ]]; then project=("--project=$PROJECT"); fi
  run gcloud compute tpus tpu-vm "$sub" "$NAME" "--zone=$ZONE" "${project[@]}" "$@"
}

# gcloud compute tpus tpu-vm scp SOURCE... DEST --zone=ZONE [--project=P] ARGS (remote paths as NAME:path).
tpu_scp() {
  local -a project=()
  if [[ -n "$PROJECT" ]]; then project=("--project=$PROJECT"); fi
  run gcloud compute tpus tpu-vm scp "$@" "--zone=$ZONE" "${project[@]}"
}

# Runs a shell command on every worker of the slice.
on_all_workers() {
  tpu_vm ssh --worker=all --command="$1"
}
