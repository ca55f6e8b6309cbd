#!/usr/bin/env bash
# Train through the deepspeed launcher. All arguments go to the trainer (python -m train.main --help).
#   NUM_GPUS     ranks on this machine (default: all GPUs; on a CPU-only machine, or with DS_ACCELERATOR=cpu, 2 CPU ranks)
#   MASTER_PORT  rendezvous port (default 29500)
#   PIPEGPT_MODULE  train.main (default: train) or train.evaluate (evaluate without training; the same flags)
# Several nodes, one of two ways:
#   HOSTFILE     DeepSpeed hostfile ("host slots=N" per line): started once, on the first node; DeepSpeed
#                reaches the others over passwordless ssh (pdsh)
#   NODE_RANK    no ssh (SLURM, Kubernetes): start launch.sh once on every node with its NODE_RANK (0..n-1),
#                the same MASTER_ADDR (node 0's address) and either NNODES (NUM_GPUS ranks on each) or HOSTFILE
# Bad values of these, like bad flags, stop with one `error:` line and exit code 2 before any rank starts.
# SIGTERM or SIGINT to launch.sh reaches every rank of this node: they finish the current step, save it and
# exit with code 143 (train/distributed/preemption.py).
set -euo pipefail
cd "$(dirname "$0")"
source ./setup_env.sh

# DS_ACCELERATOR=cpu asks for CPU ranks: no need to ask torch (2-3 s) whether there is a GPU.
if [ "${DS_ACCELERATOR:-}" != cpu ] && python -c 'import torch,sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  NUM_GPUS=${NUM_GPUS:-$(python -c 'import torch; print(torch.cuda.device_count())')}
else
  # CPU fallback: DeepSpeed's CPU accelerator, gloo, one torch thread per rank.
  export DS_ACCELERATOR=cpu OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
  NUM_GPUS=${NUM_GPUS:-2}
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
for arg in "$@"; do  # the flags' help once, not once more per rank
  if [ "$arg" = --help ] || [ "$arg" = -h ]; then exec python -m train.main --help; fi
done

fail() { echo "error: $*" >&2; exit 2; }
whole() { [[ "$2" =~ ^[0-9]+$ ]] && [ "$2" -ge "$3" ] || fail "$1 '$2' must be a whole number, at least $3"; }
module=${PIPEGPT_MODULE:-train.main}
[[ "$module" =~ ^train\.(main|evaluate)$ ]] || fail "PIPEGPT_MODULE '$module': use train.main or train.evaluate"
port=${MASTER_PORT:-29500}
[[ "$port" =~ ^[0-9]+$ ]] && [ "$port" -ge 1 ] && [ "$port" -le 65535 ] || fail "MASTER_PORT '$port' is not a port number (1-65535)"
slots_in() {  # the world size a hostfile declares, or nothing when a line is malformed
  awk '!/^[[:space:]]*(#|$)/{ if (match($0, /slots=[0-9]+/)) n += substr($0, RSTART+6, RLENGTH-6); else bad=1 }
       END{ print (bad || n == 0) ? "" : n }' "$1"
}
if [ -n "${NODE_RANK:-}" ]; then
  mode=no-ssh
  whole NODE_RANK "$NODE_RANK" 0
  [ -n "${MASTER_ADDR:-}" ] || fail "NODE_RANK is set but MASTER_ADDR is not: set it to node 0's address on every node"
  if [ -z "${HOSTFILE:-}" ]; then
    [ -n "${NNODES:-}" ] || fail "NODE_RANK is set: give NNODES (nodes of NUM_GPUS ranks each) or a HOSTFILE"
    whole NNODES "$NNODES" 1
    whole NUM_GPUS "$NUM_GPUS" 1
    HOSTFILE=$(mktemp "${TMPDIR:-/tmp}/pipegpt_hosts.XXXXXX")
    for ((n = 0; n < NNODES; n++)); do echo "node$n slots=$NUM_GPUS"; done > "$HOSTFILE"
  fi
fi
if [ -n "${HOSTFILE:-}" ]; then
  [ -r "$HOSTFILE" ] || fail "HOSTFILE $HOSTFILE does not exist or cannot be read; pass a DeepSpeed hostfile ('host slots=N' per line)"
  world_size=$(slots_in "$HOSTFILE")
  [ -n "$world_size" ] || fail "HOSTFILE $HOSTFILE: every line must read 'hostname slots=N' with N >= 1"
  nodes=$(grep -cvE '^[[:space:]]*(#|$)' "$HOSTFILE")
  launcher=(deepspeed --hostfile "$HOSTFILE" ${MASTER_ADDR:+--master_addr "$MASTER_ADDR"})
  preflight=(--world-size "$world_size")
  if [ "${mode:-}" = no-ssh ]; then
    [ "$NODE_RANK" -lt "$nodes" ] || fail "NODE_RANK $NODE_RANK: the hostfile has $nodes nodes (0..$((nodes - 1)))"
    launcher+=(--no_ssh --node_rank "$NODE_RANK")
    # Node 0 hosts the rendezvous; the others would find its port taken by a run already starting.
    [ "$NODE_RANK" -eq 0 ] && preflight+=(--master-port "$port")
  else
    mode=ssh
  fi
else
  mode=single
  whole NUM_GPUS "$NUM_GPUS" 1
  # One node: DeepSpeed's per-node launcher directly, with the world its runner would hand it (deepspeed 0.19.8
  # runner.py, the local path: {"localhost": [0..N-1]}, master 127.0.0.1). The runner would only add its own
  # Python start-up, ~3-4 s a launch.
  world=$(printf '{"localhost": [%s]}' "$(seq -s ', ' 0 $((NUM_GPUS - 1)))" | base64 -w0 | tr '+/' '-_')
  launcher=(python -u -m deepspeed.launcher.launch "--world_info=$world" --master_addr 127.0.0.1)
  preflight=(--world-size "$NUM_GPUS" --master-port "$port")  # the rendezvous runs on this machine
fi
# PIPEGPT_SKIP_PREFLIGHT=1: no one-process check first (~8 s of imports); the ranks make the same checks, so bad
# input then costs a rank start-up. For relaunches of a command known to be good (the test suite's training runs).
# The preflight ends with this script (kill -9 included) and with one line on Ctrl-C (train/distributed/lifeline.py).
[ "${PIPEGPT_SKIP_PREFLIGHT:-0}" = 1 ] || python -m train.distributed.lifeline train.preflight "${preflight[@]}" "$@"
# The ranks watch this script's pid (they stop, saving, when it is gone: kill -9 of launch.sh) and local rank 0
# leaves its exit code here: DeepSpeed's runner exits 0 when its launcher ends on a signal.
export PIPEGPT_LAUNCHER_PID=$$ PIPEGPT_LAUNCHER_HOST="$(uname -n)"
PIPEGPT_STATUS_FILE=$(mktemp "${TMPDIR:-/tmp}/pipegpt_status.XXXXXX")
export PIPEGPT_STATUS_FILE

# DeepSpeed's runner dies at once on SIGTERM and leaves its per-node launcher and the ranks running, orphaned:
# the runner (or, on one node, the launcher) starts with the signals ignored, and launch.sh passes them on to the
# ranks themselves (over ssh, DeepSpeed's runner forwards them its own way: it kills the remote ranks).
( trap '' TERM INT; exec "${launcher[@]}" --master_port "$port" --module "$module" "$@" ) &
runner=$!
forward() {
  signalled=1
  if [ "$mode" = ssh ]; then
    kill -TERM "$runner" 2>/dev/null || true
  elif [ "$mode" = single ]; then
    pkill -TERM -P "$runner" || true  # the launcher's children are the ranks
  else
    for node_launcher in $(pgrep -P "$runner" || true); do pkill -TERM -P "$node_launcher" || true; done
  fi
}
trap forward TERM INT
set +e
while true; do
  wait "$runner"
  status=$?
  kill -0 "$runner" 2>/dev/null || break  # wait returns early (status > 128) when a trapped signal arrives
done
trainer=$(cat "$PIPEGPT_STATUS_FILE" 2>/dev/null || true)
rm -f "$PIPEGPT_STATUS_FILE"
if [[ "$trainer" =~ ^[0-9]+$ ]]; then
  status=$trainer  # what the ranks of this node said: 0 finished, 2 error, 143 stopped after saving, ...
elif [ "$status" -eq 0 ] && [ -n "${signalled:-}" ]; then
  status=1  # stopped by a signal without a word from the ranks: not a finished run
fi
exit "$status"
