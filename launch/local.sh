#!/usr/bin/env bash
# N training processes on this machine, each with its own CPU devices, joined by
# jax.distributed over gloo: the multi-host code path (per-host data shards, global arrays,
# process-0-only metrics and checkpoint coordination) without a cluster.
#
#   launch/local.sh 2 configs/tiny.py /tmp/run [--resume] [--config.x=y ...]
#   DEVICES=4 launch/local.sh 2 configs/tiny.py /tmp/run     # 2 processes x 4 fake devices
#
# Env: PORT (coordinator port, default random), BIN (the mirage-jax command, default
# .venv/bin/mirage-jax; may have arguments), DEVICES (fake CPU devices per process; unset
# keeps XLA_FLAGS as it is), LD_PRELOAD (default: tcmalloc if the machine has it,
# launch/tcmalloc.sh). Each process's output is prefixed with [i]; if one fails, the
# others are stopped.
set -euo pipefail
if [ $# -lt 3 ]; then
  echo "usage: $0 N CONFIG WORKDIR [--resume] [--config.x=y ...]" >&2
  exit 2
fi
N=$1 CONFIG=$2 WORKDIR=$3
shift 3
PORT=${PORT:-$((20000 + RANDOM % 20000))}
BIN=${BIN:-.venv/bin/mirage-jax}
if [ -n "${DEVICES:-}" ]; then
  export XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=$DEVICES"
fi
export JAX_PLATFORMS=cpu
LD_PRELOAD=${LD_PRELOAD:-$("$(dirname "$0")/tcmalloc.sh")}
export LD_PRELOAD
pids=()
for i in $(seq 0 $((N - 1))); do
  # shellcheck disable=SC2086 # BIN may be "python -m mirage_jax.cli"
  $BIN train --coordinator "localhost:$PORT" --num-processes "$N" --process-id "$i" \
    --config "$CONFIG" --workdir "$WORKDIR" "$@" \
    > >(sed -u "s/^/[$i] /") 2> >(sed -u "s/^/[$i] /" >&2) &
  pids+=($!)
done
status=0
for _ in "${pids[@]}"; do
  if ! wait -n; then
    status=1
    kill "${pids[@]}" 2>/dev/null || true  # a peer left alone would wait for its timeout
  fi
done
exit $status
