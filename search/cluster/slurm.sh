#!/bin/bash
# A fika search on a SLURM allocation: Ray head on the first node, Ray workers on the others, one driver.
#   sbatch search/cluster/slurm.sh search/specs/grid.yaml storage=/shared/fika-runs
# Adjust the resources below; each trial takes `resources.gpu` GPUs (1 in grid.yaml). The storage path
# must be on a filesystem every node sees.
#SBATCH --job-name=fika-search
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=4
#SBATCH --cpus-per-task=32
#SBATCH --time=04:00:00
set -euo pipefail
cd "${SLURM_SUBMIT_DIR}"
source .venv/bin/activate

nodes=($(scontrol show hostnames "$SLURM_JOB_NODELIST"))
head=${nodes[0]}
head_ip=$(srun --nodes=1 --ntasks=1 -w "$head" hostname --ip-address | awk '{print $1}')
port=6379

srun --nodes=1 --ntasks=1 -w "$head" \
  ray start --head --node-ip-address="$head_ip" --port=$port --dashboard-host=127.0.0.1 \
  --num-cpus="$SLURM_CPUS_PER_TASK" --num-gpus="$SLURM_GPUS_PER_NODE" --block &
sleep 15
for node in "${nodes[@]:1}"; do
  srun --nodes=1 --ntasks=1 -w "$node" \
    ray start --address="$head_ip:$port" \
    --num-cpus="$SLURM_CPUS_PER_TASK" --num-gpus="$SLURM_GPUS_PER_NODE" --block &
done
sleep 15

fika search "$@" --address "$head_ip:$port"
