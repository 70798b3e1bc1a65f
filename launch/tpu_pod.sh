#!/usr/bin/env bash
# Train on a Cloud TPU pod slice: the same command runs on every host (one process per host);
# jax.distributed finds the other hosts from the TPU metadata.
#
#   launch/tpu_pod.sh TPU_NAME ZONE configs/mirage_1b.py gs://bucket/run1 [--config.x=y ...]
#
# The workdir should be a bucket path every host can write (Orbax writes checkpoints there).
set -euo pipefail
if [ $# -lt 4 ]; then
  echo "usage: $0 TPU_NAME ZONE CONFIG WORKDIR [overrides...]" >&2
  exit 2
fi
TPU_NAME=$1 ZONE=$2 CONFIG=$3 WORKDIR=$4
shift 4
REPO_URL=${REPO_URL:-$(git remote get-url origin)}
BRANCH=${BRANCH:-$(git rev-parse --abbrev-ref HEAD)}
OVERRIDES=$(printf ' %q' "$@")

gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=all --command "
  set -e
  test -d mirage_jax || git clone --branch $BRANCH $REPO_URL mirage_jax
  cd mirage_jax && git fetch -q && git checkout -q $BRANCH && git pull -q
  python3 -m venv .venv && .venv/bin/pip install -q -e '.[tpu]'
  .venv/bin/mirage-jax train --distributed --config $CONFIG --workdir $WORKDIR --resume $OVERRIDES
"
