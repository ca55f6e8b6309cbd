#!/usr/bin/env bash
# Train through the deepspeed launcher. All arguments go to the trainer (python -m train.main --help).
#   NUM_GPUS   ranks on this machine (default: all GPUs; on a CPU-only machine 2 CPU ranks)
#   HOSTFILE   DeepSpeed hostfile for multi-node runs ("host slots=N" per line)
#   MASTER_PORT rendezvous port (default 29500)
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

if [ -n "${HOSTFILE:-}" ]; then
  world_size=$(awk '/slots=/{split($2,a,"="); n+=a[2]} END{print n}' "$HOSTFILE")
  launcher=(deepspeed --hostfile "$HOSTFILE")
else
  world_size=$NUM_GPUS
  launcher=(deepspeed --num_gpus "$NUM_GPUS")
fi
python -m train.preflight --world-size "$world_size" "$@"
exec "${launcher[@]}" --master_port "${MASTER_PORT:-29500}" --module train.main "$@"
