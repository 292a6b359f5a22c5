#!/usr/bin/env bash
# Starts a config on every worker (in the background, so a dropped connection does not stop it),
# then streams worker 0's log unless --detach 1. Arguments after -- go to the trainer.
#   launch.sh --name NAME --zone ZONE --type TYPE --config CONFIG [--workdir DIR] [--detach 1] [--dry-run] [-- ARGS]
CONFIG=""
WORKDIR="workdirs/run"
DETACH=0
EXTRA_FLAGS="config:CONFIG workdir:WORKDIR detach:DETACH"
USAGE_EXTRA="--config CONFIG [--workdir DIR] [--detach 1] [-- TRAINER_ARGS]"
# shellcheck source=tpu_scripts/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
parse_flags "$@"
[[ -n "$CONFIG" ]] || usage

trainer="python -m experiments.train --config=$CONFIG --workdir=$WORKDIR"
if ((${#EXTRA_ARGS[@]})); then
  printf -v extra ' %q' "${EXTRA_ARGS[@]}"
  trainer+="$extra"
fi
log="$WORKDIR/train.log"
on_all_workers "cd $REMOTE_DIR && mkdir -p $WORKDIR && nohup $trainer > $log 2>&1 < /dev/null &"
if [[ "$DETACH" != 1 ]]; then
  tpu_vm ssh --worker=0 --command="tail -n +1 -F $REMOTE_DIR/$log"
fi
