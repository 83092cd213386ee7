#!/usr/bin/env bash
# Start N efficient-train processes on this machine (CPU, gloo collectives on 127.0.0.1).
#
#   scripts/launch_local.sh N [--devices_per_process D] [efficient-train train flags...]
#
# Each process simulates D CPU devices (default 4); the mesh spans all N x D devices.
# Process 0 writes the metrics and the console; the others log to <workdir>/process_<i>.log
# when --workdir is given, else to /tmp. The script waits for all and fails if any fails.
set -euo pipefail
if [[ $# -lt 1 || ! "$1" =~ ^[0-9]+$ ]]; then
  echo "usage: $0 N [--devices_per_process D] [train flags...]" >&2
  exit 2
fi
num_processes=$1; shift
devices=4
if [[ "${1:-}" == "--devices_per_process" ]]; then devices=$2; shift 2; fi
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
logdir=/tmp
for ((i = 1; i <= $#; i++)); do
  if [[ "${!i}" == "--workdir" ]]; then j=$((i + 1)); logdir=${!j}; fi
  if [[ "${!i}" == --workdir=* ]]; then logdir=${!i#--workdir=}; fi
done
mkdir -p "$logdir"
pids=()
for ((p = 0; p < num_processes; p++)); do
  if [[ $p -eq 0 ]]; then out=/dev/stdout; else out="$logdir/process_$p.log"; fi
  JAX_PLATFORMS=cpu efficient-train train --devices "$devices" \
    --coordinator "127.0.0.1:$port" --num_processes "$num_processes" --process_id "$p" "$@" >"$out" 2>&1 &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit $status
