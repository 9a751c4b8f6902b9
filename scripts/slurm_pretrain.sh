#!/usr/bin/env bash
# Pretrain on several nodes under SLURM: one torchrun per node, which starts one training process per GPU.
# Submit from the repository root, with the Python environment active (sbatch passes it on), for example
#
#   sbatch --nodes 4 --gpus-per-node 8 scripts/slurm_pretrain.sh --config configs/runs/convergence_120m.yaml \
#       --dataset_dir /shared/data/corpus --run_dir /shared/runs/llama-120m-int8 --quantize int8_mixed_precision
#
# The arguments go to llm_pretrain.py, with --resume: submitting the same command again continues the run from
# its last checkpoint (and a finished run does nothing), so the job can be resubmitted after a time limit, a
# node failure or a preemption. --run_dir and --dataset_dir must be on a filesystem that every node mounts
# at the same path (the run stops with an error otherwise). --batch_size is global: nodes x GPUs processes
# share it. The #SBATCH lines below are defaults; sbatch's own flags override them.
# Environment: RDZV_PORT (default 29500), the port on the first node where the nodes meet.
#SBATCH --job-name=qt-pretrain
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --time=24:00:00
#SBATCH --output=slurm-%x-%j.out
# Five minutes before the time limit every process gets SIGTERM: it finishes its step, saves a checkpoint
# and exits. torchrun waits TORCH_ELASTIC_SHUTDOWN_TIMEOUT seconds for that before it kills them.
#SBATCH --signal=TERM@300
set -euo pipefail
cd "${SLURM_SUBMIT_DIR:?submit this script with sbatch}"
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-240}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

first_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
gpus_per_node=${SLURM_GPUS_ON_NODE:-$(nvidia-smi --list-gpus | wc -l)}
echo "$SLURM_NNODES nodes x $gpus_per_node GPUs, meeting at $first_node:${RDZV_PORT:-29500}"

# Ranks are assigned when the nodes meet (RANK over all nodes, LOCAL_RANK within one): rank 0, which logs and
# writes the run's files, may be on any node. --kill-on-bad-exit: a failing node stops the others, which
# would otherwise wait for it.
srun --kill-on-bad-exit=1 torchrun --nnodes "$SLURM_NNODES" --nproc_per_node "$gpus_per_node" \
    --rdzv_backend c10d --rdzv_endpoint "$first_node:${RDZV_PORT:-29500}" --rdzv_id "$SLURM_JOB_ID" \
    llm_pretrain.py --resume "$@"
