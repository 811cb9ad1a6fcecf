#!/usr/bin/env bash
# Run N trainer processes on this machine that train together through jax.distributed
# (CPU: one device per process, collectives over gloo).
#   launch/local.sh 2 --config=configs/interaction.py:tiny,smoke --workdir=runs/mp
# Extra arguments go to `python -m tml_jax.train`. Logs: <workdir>/process_<i>.log.
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:?usage: launch/local.sh NUM_PROCESSES --config=... --workdir=...}
shift
PY=${PYTHON:-.venv/bin/python}
workdir=$(printf '%s\n' "$@" | sed -n 's/^--workdir=//p' | tail -n 1)
[ -n "$workdir" ] || { echo "launch/local.sh: pass --workdir=DIR" >&2; exit 2; }
mkdir -p "$workdir"
port=${JAX_PORT:-$((20000 + RANDOM % 20000))}
pids=()
for ((i = 0; i < N; i++)); do
  JAX_COORDINATOR_ADDRESS="127.0.0.1:$port" JAX_NUM_PROCESSES="$N" JAX_PROCESS_ID="$i" \
  JAX_PLATFORMS=cpu XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=${DEVICES_PER_PROCESS:-1}" \
    "$PY" -m tml_jax.train "$@" >"$workdir/process_$i.log" 2>&1 &
  pids+=($!)
done
trap 'kill "${pids[@]}" 2>/dev/null || true' INT TERM
status=0
for i in "${!pids[@]}"; do
  if ! wait "${pids[$i]}"; then
    status=1
    echo "launch/local.sh: process $i failed; last lines of $workdir/process_$i.log:" >&2
    tail -n 20 "$workdir/process_$i.log" >&2
  fi
done
[ $status -eq 0 ] && tail -n 3 "$workdir/process_0.log"
exit $status
