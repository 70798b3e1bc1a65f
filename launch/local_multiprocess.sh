#!/usr/bin/env bash
# N processes on this machine, each with its own CPU devices, joined by jax.distributed over
# gloo: the multi-host code path without a cluster.
#
#   launch/local_multiprocess.sh 2 configs/tiny.py /tmp/run [--config.x=y ...]
set -euo pipefail
N=$1 CONFIG=$2 WORKDIR=$3
shift 3
PORT=${PORT:-$((20000 + RANDOM % 20000))}
BIN=${BIN:-.venv/bin/mirage-jax}  # may be a command with arguments
pids=()
for i in $(seq 0 $((N - 1))); do
  JAX_PLATFORMS=cpu $BIN train --coordinator "localhost:$PORT" --num-processes "$N" \
    --process-id "$i" --config "$CONFIG" --workdir "$WORKDIR" "$@" &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit $status
