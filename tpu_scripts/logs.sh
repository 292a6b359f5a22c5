#!/usr/bin/env bash
# Streams the training log of one worker (default 0; --worker all prints every worker's).
#   logs.sh --name NAME --zone ZONE --type TYPE [--workdir DIR] [--worker N|all] [--dry-run]
WORKDIR="workdirs/run"
WORKER=0
EXTRA_FLAGS="workdir:WORKDIR worker:WORKER"
USAGE_EXTRA="[--workdir DIR] [--worker N|all]"
# shellcheck source=tpu_scripts/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
parse_flags "$@"

tpu_vm ssh "--worker=$WORKER" --command="tail -n +1 -F $REMOTE_DIR/$WORKDIR/train.log"
