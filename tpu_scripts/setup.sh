#!/usr/bin/env bash
# Installs this checkout (its committed HEAD) and jax[tpu] on every worker of the slice.
#   setup.sh --name NAME --zone ZONE --type TYPE [--dry-run]
# shellcheck source=tpu_scripts/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
parse_flags "$@"

archive="/tmp/${NAME}-mixers.tar.gz"
run git -C "$REPO_DIR" archive --format=tar.gz --prefix="$REMOTE_DIR/" -o "$archive" HEAD
tpu_scp "$archive" "$NAME:mixers.tar.gz" --worker=all
on_all_workers "rm -rf $REMOTE_DIR && tar xzf mixers.tar.gz && pip install -q -U 'jax[tpu]' && pip install -q -e './${REMOTE_DIR}[experiments]'"
