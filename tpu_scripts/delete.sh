#!/usr/bin/env bash
# Deletes the TPU VM or pod slice (no prompt).
#   delete.sh --name NAME --zone ZONE --type TYPE [--dry-run]
# shellcheck source=tpu_scripts/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
parse_flags "$@"

tpu_vm delete --quiet
