#!/bin/bash
# Pretrain the 770M RDT on a Slurm cluster: one task per GPU, NCCL, DeepSpeed ZeRO.
#
#   sbatch slurm/pretrain_770m.sh                                 # defaults below
#   sbatch --nodes=8 slurm/pretrain_770m.sh data.sources='[{path: /data/mine}]'
#   CONFIG=configs/tiny_cpu.yaml sbatch --gpus-per-node=0 slurm/pretrain_770m.sh
#
# Run launch/gpu_smoke.sh on one GPU node first (10 steps, a save and a resume, tokens/s, MFU,
# peak memory).
#
# Preemption and time limits: Slurm signals USR1 five minutes before the end (and TERM on
# preemption); every rank finishes its step, saves a checkpoint and exits with status 75,
# on which this script requeues the job; the requeued job resumes from that checkpoint.
#
# Placement: one task per GPU; every task sees all of its node's GPUs and uses GPU LOCAL_RANK
# (= SLURM_LOCALID), as DeepSpeed binds it, so do not add --gpus-per-task or --gpu-bind.  srun is
# given --cpus-per-task explicitly: since Slurm 22.05 it no longer inherits it from sbatch, and
# without it every task's threads would share one CPU.  A collective that hangs fails after
# parallel.timeout_minutes; NCCL's flight recorder (on by default, see mythos_scale/parallel/distributed.py)
# then dumps each rank's last collectives to nccl_traces/<job id>/rank_<rank>.
#SBATCH --job-name=mythos-770m
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=12
#SBATCH --time=24:00:00
#SBATCH --signal=B:USR1@300
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out
set -uo pipefail

CONFIG=${CONFIG:-configs/mythos_770m.yaml}
EXIT_PREEMPTED=75
export MASTER_ADDR=${MASTER_ADDR:-$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)}
# Below the ephemeral port range, from the job id (slurm/master_port.sh says why).
if [ -z "${MASTER_PORT:-}" ]; then
  MASTER_PORT=$(bash slurm/master_port.sh "$SLURM_JOB_ID") || exit 2
fi
export MASTER_PORT
# Network interfaces: on nodes with several NICs, NCCL and gloo may pick one the other nodes
# cannot reach (a docker or management bridge) and hang at the first collective.  Name the
# fabric's interface at submission (sbatch passes the environment on), e.g.
#   NCCL_SOCKET_IFNAME=ib0 GLOO_SOCKET_IFNAME=ib0 sbatch slurm/pretrain_770m.sh   (or =^docker,lo)
# unset, each library chooses.  NCCL_DEBUG=INFO prints the chosen transport (IB/RoCE vs sockets)
# at start: worth one look on a new cluster, WARN otherwise.
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
# The caching allocator grows segments in place instead of fragmenting across the loop's
# varying activation sizes (T and k change from step to step).
export PYTORCH_ALLOC_CONF=${PYTORCH_ALLOC_CONF:-expandable_segments:True}
export SRUN_CPUS_PER_TASK=${SLURM_CPUS_PER_TASK:-1}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$SRUN_CPUS_PER_TASK}
# Expandable segments: the allocator grows segments instead of caching fixed blocks, so the varying
# activation sizes of a varying loop count T fragment less (fewer alloc retries, see mem/*).
export PYTORCH_ALLOC_CONF=${PYTORCH_ALLOC_CONF:-expandable_segments:True}
export TORCH_FR_DUMP_TEMP_FILE=${TORCH_FR_DUMP_TEMP_FILE:-$PWD/nccl_traces/$SLURM_JOB_ID/rank_}
mkdir -p "$(dirname "$TORCH_FR_DUMP_TEMP_FILE")"
echo "job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on $SLURM_JOB_NUM_NODES node(s), master $MASTER_ADDR:$MASTER_PORT"
echo "srun: $SLURM_NTASKS tasks, $SRUN_CPUS_PER_TASK CPUs and $OMP_NUM_THREADS OpenMP threads each"

# The batch shell gets the pre-timeout signal; hand it to every training task.
preempted=0
forward_signal() {
  preempted=1
  echo "got $1: asking every rank to save and stop"
  kill -s "$1" "$SRUN_PID" 2>/dev/null
}
trap 'forward_signal USR1' USR1
trap 'forward_signal TERM' TERM

srun --kill-on-bad-exit=1 --cpus-per-task="$SRUN_CPUS_PER_TASK" python -m mythos_scale.train --config "$CONFIG" "$@" &
SRUN_PID=$!
# `wait` returns early when a trapped signal arrives; keep waiting for srun itself.
while true; do
  wait "$SRUN_PID"
  status=$?
  kill -0 "$SRUN_PID" 2>/dev/null || break
done

# Ranks leave one by one after the collective save, and srun (--kill-on-bad-exit) may end
# the last ones with a signal: after a forwarded stop, any non-zero status means "saved, stopped".
if [ "$status" -eq "$EXIT_PREEMPTED" ] || { [ "$preempted" -eq 1 ] && [ "$status" -ne 0 ]; }; then
  echo "training saved and stopped (status $status): requeueing job $SLURM_JOB_ID"
  scontrol requeue "$SLURM_JOB_ID"
  exit 0
fi
exit "$status"
