#!/usr/bin/env bash
# Copies a run's directory (checkpoints, metrics, logs) from worker 0 to a local folder.
#   copy.sh --name NAME --zone ZONE --type TYPE [--workdir DIR] [--dest LOCAL_DIR] [--dry-run]
WORKDIR="workdirs/run"
DEST="results"
EXTRA_FLAGS="workdir:WORKDIR dest:DEST"
USAGE_EXTRA="[--workdir DIR] [--dest LOCAL_DIR]"
# shellcheck source=tpu_scripts/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
parse_flags "$@"

run mkdir -p "$DEST"
tpu_scp --recurse "$NAME:$REMOTE_DIR/$WORKDIR" "$DEST/" --worker=0
