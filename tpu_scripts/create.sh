#!/usr/bin/env bash
# Creates a TPU VM or pod slice (e.g. --type v4-32: 4 hosts with 4 chips each).
#   create.sh --name NAME --zone ZONE --type TYPE [--version RUNTIME] [--spot 1] [--dry-run]
SPOT=0
EXTRA_FLAGS="spot:SPOT"
USAGE_EXTRA="[--spot 1]"
# shellcheck source=tpu_scripts/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
parse_flags "$@"

args=("--accelerator-type=$TYPE" "--version=$VERSION")
if [[ "$SPOT" == 1 ]]; then args+=("--spot"); fi
tpu_vm create "${args[@]}"
