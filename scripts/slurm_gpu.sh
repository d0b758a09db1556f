#!/usr/bin/env bash
# Train tinyllm-jax on several GPU nodes of a SLURM cluster: writes a batch script and
# submits it with sbatch. Inside the job, `srun` starts the processes with
# TINYLLM_DISTRIBUTED=1; jax.distributed.initialize() reads SLURM's variables (the first
# node is the coordinator, SLURM_PROCID the process id) and the mesh spans every GPU.
#
# Needs: sbatch/srun on the submitting host; this checkout and an environment with
# `pip install -e ".[gpu]"` on every node (the job inherits the submitting shell's
# environment, so activate the venv first, or set TINYLLM=/path/to/venv/bin/tinyllm);
# a run_dir on a file system every node mounts at the same path (NFS, Lustre, GPFS):
# Orbax writes each checkpoint once, cooperatively, from all processes; process 0 writes
# the logs.
#
#   scripts/slurm_gpu.sh --nodes 4 --gpus-per-node 8 --partition gpu --time 24:00:00 \
#       train configs/tinyllm_obqa.yaml run_dir=/shared/runs/obqa model.init=google/flan-t5-xl
#   scripts/slurm_gpu.sh resume tinyllm-obqa     # submit the same job again: it resumes from run_dir
#   scripts/slurm_gpu.sh --dry-run ...           # print the batch script and the sbatch command only
#
# Options (before the command):
#   --nodes N            nodes (default 1)
#   --gpus-per-node G    GPUs a node (default 8)
#   --per gpu|node       one process per GPU (default; JAX takes GPU SLURM_LOCALID) or one
#                        process per node driving all its GPUs (JAX_LOCAL_DEVICE_IDS=0..G-1)
#   --partition P, --account A, --time T, --cpus-per-task C, --job-name NAME
#                        passed to #SBATCH (job name default: tinyllm-<config name>)
#
# Preemption and time limits: the job asks for SIGTERM 120 s before its time limit
# (--signal=TERM@120) and may be requeued (--requeue). On SIGTERM every process saves the
# same step (JAX's preemption service) and exits; a requeued job, or `resume` (sbatch
# --dependency=singleton: after the old job ends), resumes exactly from run_dir.
# Batch scripts and logs go to $SLURM_DIR (default ./slurm).
set -euo pipefail

DRY_RUN=0 NODES=1 GPUS=8 PER=gpu PARTITION= ACCOUNT= TIME= CPUS= NAME=
usage="usage: slurm_gpu.sh [--dry-run] [--nodes N] [--gpus-per-node G] [--per gpu|node] [--partition P] [--account A] [--time T] [--cpus-per-task C] [--job-name NAME] train CONFIG [key=value ...] | resume JOB_NAME"
while [[ ${1:-} == --* ]]; do
  case "$1" in
    --dry-run) DRY_RUN=1; shift ;;
    --nodes) NODES=${2:?$usage}; shift 2 ;;
    --gpus-per-node) GPUS=${2:?$usage}; shift 2 ;;
    --per) PER=${2:?$usage}; shift 2 ;;
    --partition) PARTITION=${2:?$usage}; shift 2 ;;
    --account) ACCOUNT=${2:?$usage}; shift 2 ;;
    --time) TIME=${2:?$usage}; shift 2 ;;
    --cpus-per-task) CPUS=${2:?$usage}; shift 2 ;;
    --job-name) NAME=${2:?$usage}; shift 2 ;;
    *) echo "slurm_gpu.sh: unknown option $1; $usage" >&2; exit 2 ;;
  esac
done
cmd=${1:?$usage}
shift
for v in NODES GPUS; do
  [[ ${!v} =~ ^[1-9][0-9]*$ ]] || { echo "slurm_gpu.sh: --${v,,} must be a positive integer, found '${!v}'" >&2; exit 2; }
done
[[ $PER == gpu || $PER == node ]] || { echo "slurm_gpu.sh: --per must be gpu or node, found '$PER'" >&2; exit 2; }
SLURM_DIR=${SLURM_DIR:-slurm}
ROOT=$(cd "$(dirname "$0")/.." && pwd)

run() {
  if ((DRY_RUN)); then printf '%q ' "$@" | sed 's/ $//'; echo; else "$@"; fi
}

batch_script() {  # CONFIG [key=value ...] -> the batch script on stdout
  local tasks=$GPUS
  [[ $PER == node ]] && tasks=1
  echo "#!/bin/bash"
  echo "#SBATCH --job-name=$NAME"
  echo "#SBATCH --nodes=$NODES"
  echo "#SBATCH --ntasks-per-node=$tasks"
  echo "#SBATCH --gpus-per-node=$GPUS"
  [[ -n $CPUS ]] && echo "#SBATCH --cpus-per-task=$CPUS"
  [[ -n $TIME ]] && echo "#SBATCH --time=$TIME"
  [[ -n $PARTITION ]] && echo "#SBATCH --partition=$PARTITION"
  [[ -n $ACCOUNT ]] && echo "#SBATCH --account=$ACCOUNT"
  echo "#SBATCH --signal=TERM@120"
  echo "#SBATCH --requeue"
  echo "#SBATCH --open-mode=append"
  echo "#SBATCH --output=$SLURM_DIR/%x-%j.out"
  echo "# $NODES node(s) x $GPUS GPUs, one process per $PER: $((NODES * tasks)) processes"
  echo "set -euo pipefail"
  echo "cd $(printf '%q' "$ROOT")"
  echo "export TINYLLM_DISTRIBUTED=1"
  if [[ $PER == node ]]; then
    echo "export JAX_LOCAL_DEVICE_IDS=$(seq -s, 0 $((GPUS - 1)))  # every GPU of the node to its one process"
  fi
  echo "srun --kill-on-bad-exit=1 $(printf '%q' "${TINYLLM:-tinyllm}") train$(printf ' %q' "$@")"
}

case "$cmd" in
  train)
    (($# > 0)) || { echo "slurm_gpu.sh: train needs CONFIG [key=value ...]" >&2; exit 2; }
    [[ -n $NAME ]] || NAME="tinyllm-$(basename "${1%.*}")"
    config=$1; shift
    # the job runs in this checkout: a config given relative to here must still be found
    [[ -f $config ]] && config="$(cd "$(dirname "$config")" && pwd)/$(basename "$config")"
    set -- "$config" "$@"
    mkdir -p "$SLURM_DIR"
    script="$SLURM_DIR/$NAME.sbatch"
    batch_script "$@" > "$script"
    if ((DRY_RUN)); then cat "$script"; fi
    run sbatch "$script" ;;
  resume)
    NAME=${1:?usage: slurm_gpu.sh resume JOB_NAME}
    script="$SLURM_DIR/$NAME.sbatch"
    [[ -f $script ]] || { echo "slurm_gpu.sh: no $script; submit with train first" >&2; exit 2; }
    run sbatch --dependency=singleton "$script" ;;
  *) echo "slurm_gpu.sh: unknown command $cmd; $usage" >&2; exit 2 ;;
esac
