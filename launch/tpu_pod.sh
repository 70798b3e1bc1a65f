#!/usr/bin/env bash
# Train on a Cloud TPU slice: create it (a TPU VM, or a queued resource) unless it exists,
# copy this working tree to every host, install, and run the same `mirage-jax train
# --distributed` on all hosts (--worker=all; one process per host, jax.distributed finds
# the others from the TPU metadata). Logs stream here and to logs/TPU_NAME-<time>.log.
#
#   TPU_NAME=mirage ZONE=us-east5-a ACCELERATOR_TYPE=v5p-256 \
#     launch/tpu_pod.sh configs/mirage_10b.py gs://bucket/runs/run1 [--config.x=y ...]
#
# Env: TPU_NAME, ZONE (required); PROJECT (default: gcloud's); ACCELERATOR_TYPE (default
# v5p-64) and RUNTIME_VERSION (default v2-alpha-tpuv5) when creating; QUEUED=1 creates a
# queued resource and waits for it (SPOT=1 asks for spot capacity); REMOTE_DIR (default
# mirage_jax) on the hosts. The workdir must be a bucket path every host can write (Orbax
# checkpoints); the run resumes from its latest checkpoint if there is one.
set -euo pipefail
if [ $# -lt 2 ] || [ -z "${TPU_NAME:-}" ] || [ -z "${ZONE:-}" ]; then
  echo "usage: TPU_NAME=... ZONE=... $0 CONFIG WORKDIR [--config.x=y ...]" >&2
  exit 2
fi
CONFIG=$1 WORKDIR=$2
shift 2
ACCELERATOR_TYPE=${ACCELERATOR_TYPE:-v5p-64}
RUNTIME_VERSION=${RUNTIME_VERSION:-v2-alpha-tpuv5}
REMOTE_DIR=${REMOTE_DIR:-mirage_jax}
GC=(gcloud compute tpus)
WHERE=(--zone "$ZONE")
if [ -n "${PROJECT:-}" ]; then WHERE+=(--project "$PROJECT"); fi

if ! "${GC[@]}" tpu-vm describe "$TPU_NAME" "${WHERE[@]}" > /dev/null 2>&1; then
  if [ "${QUEUED:-0}" = 1 ]; then
    extra=()
    if [ "${SPOT:-0}" = 1 ]; then extra+=(--spot); fi
    "${GC[@]}" queued-resources create "$TPU_NAME" --node-id "$TPU_NAME" "${WHERE[@]}" \
      --accelerator-type "$ACCELERATOR_TYPE" --runtime-version "$RUNTIME_VERSION" "${extra[@]}"
    while true; do
      state=$("${GC[@]}" queued-resources describe "$TPU_NAME" "${WHERE[@]}" \
        --format='value(state.state)')
      echo "queued resource $TPU_NAME: $state"
      case "$state" in
        ACTIVE) break ;;
        FAILED|SUSPENDED) exit 1 ;;
      esac
      sleep 60
    done
  else
    "${GC[@]}" tpu-vm create "$TPU_NAME" "${WHERE[@]}" \
      --accelerator-type "$ACCELERATOR_TYPE" --version "$RUNTIME_VERSION"
  fi
fi

# The working tree as it is (uncommitted edits included), without the venv, data and runs.
cd "$(dirname "$0")/.."
archive=$(mktemp --suffix=.tar.gz)
trap 'rm -f "$archive"' EXIT
tar czf "$archive" --exclude=.git --exclude=.venv --exclude=data_dir --exclude=runs \
  --exclude=demo_out --exclude=logs --exclude='*.egg-info' .
"${GC[@]}" tpu-vm scp "$archive" "$TPU_NAME:mirage_code.tar.gz" "${WHERE[@]}" --worker=all

mkdir -p logs
log="logs/$TPU_NAME-$(date +%Y%m%d-%H%M%S).log"
overrides=$(printf ' %q' "$@")
"${GC[@]}" tpu-vm ssh "$TPU_NAME" "${WHERE[@]}" --worker=all --command "
  set -e
  mkdir -p $REMOTE_DIR && tar xzf mirage_code.tar.gz -C $REMOTE_DIR && cd $REMOTE_DIR
  test -x .venv/bin/mirage-jax || python3 -m venv .venv
  .venv/bin/pip install -q -e '.[tpu]'
  .venv/bin/mirage-jax train --distributed --config $(printf '%q' "$CONFIG") \
    --workdir $(printf '%q' "$WORKDIR") --resume $overrides
" 2>&1 | tee "$log"
