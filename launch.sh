#!/usr/bin/env bash
# Train through the deepspeed launcher. All arguments go to the trainer (python -m train.main --help).
#   NUM_GPUS   ranks on this machine (default: all GPUs; on a CPU-only machine 2 CPU ranks)
#   HOSTFILE   DeepSpeed hostfile for multi-node runs ("host slots=N" per line)
#   MASTER_PORT rendezvous port (default 29500)
# Bad values of these, like bad flags, stop with one `error:` line and exit code 2 before any rank starts.
set -euo pipefail
cd "$(dirname "$0")"
source ./setup_env.sh

if python -c 'import torch,sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  NUM_GPUS=${NUM_GPUS:-$(python -c 'import torch; print(torch.cuda.device_count())')}
else
  # CPU fallback: DeepSpeed's CPU accelerator, gloo, one torch thread per rank.
  export DS_ACCELERATOR=cpu OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
  NUM_GPUS=${NUM_GPUS:-2}
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

fail() { echo "error: $*" >&2; exit 2; }
port=${MASTER_PORT:-29500}
[[ "$port" =~ ^[0-9]+$ ]] && [ "$port" -ge 1 ] && [ "$port" -le 65535 ] || fail "MASTER_PORT '$port' is not a port number (1-65535)"
if [ -n "${HOSTFILE:-}" ]; then
  [ -r "$HOSTFILE" ] || fail "HOSTFILE $HOSTFILE does not exist or cannot be read; pass a DeepSpeed hostfile ('host slots=N' per line)"
  world_size=$(awk '!/^[[:space:]]*(#|$)/{ if (match($0, /slots=[0-9]+/)) n += substr($0, RSTART+6, RLENGTH-6); else bad=1 }
                END{ print (bad || n == 0) ? "" : n }' "$HOSTFILE")
  [ -n "$world_size" ] || fail "HOSTFILE $HOSTFILE: every line must read 'hostname slots=N' with N >= 1"
  launcher=(deepspeed --hostfile "$HOSTFILE")
  preflight=(--world-size "$world_size")
else
  [[ "$NUM_GPUS" =~ ^[0-9]+$ ]] && [ "$NUM_GPUS" -ge 1 ] || fail "NUM_GPUS '$NUM_GPUS' must be a whole number of ranks, at least 1"
  world_size=$NUM_GPUS
  launcher=(deepspeed --num_gpus "$NUM_GPUS")
  preflight=(--world-size "$world_size" --master-port "$port")  # the rendezvous runs on this machine
fi
python -m train.preflight "${preflight[@]}" "$@"
exec "${launcher[@]}" --master_port "$port" --module train.main "$@"
