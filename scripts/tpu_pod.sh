#!/usr/bin/env bash
# Launch tinyllm-jax on a Cloud TPU VM or pod slice (every worker runs the same command;
# JAX's distributed runtime connects them, the mesh spans all chips).
#
#   export TPU_NAME=distill-v4-32 ZONE=us-central2-b ACCELERATOR=v4-32 RUNTIME=tpu-ubuntu2204-base
#   scripts/tpu_pod.sh create                       # the TPU VM / pod slice
#   scripts/tpu_pod.sh setup                        # copy this checkout to all workers, pip install
#   scripts/tpu_pod.sh train configs/tinyllm_obqa.yaml run_dir=/mnt/shared/runs/obqa model.init=google/flan-t5-large
#   scripts/tpu_pod.sh ssh "tail -f /mnt/shared/runs/obqa/metrics.jsonl"
#   scripts/tpu_pod.sh delete
#
# run_dir must be the same shared path on every worker (a GCS bucket mounted with gcsfuse,
# or Filestore): Orbax writes one checkpoint from all hosts, process 0 writes the logs.
# SIGTERM (maintenance events, preemption of spot/queued resources) saves and exits; run
# `train` again with the same run_dir to resume exactly.
set -euo pipefail
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}"
ACCELERATOR=${ACCELERATOR:-v4-8}
RUNTIME=${RUNTIME:-tpu-ubuntu2204-base}
REMOTE_DIR=${REMOTE_DIR:-tinyllm-jax}
tpu() { gcloud compute tpus tpu-vm "$@" --zone="$ZONE"; }
on_all() { tpu ssh "$TPU_NAME" --worker=all --command="$1"; }

cmd=${1:?usage: tpu_pod.sh create|setup|train CONFIG [key=value ...]|ssh COMMAND|delete}
shift
case "$cmd" in
  create) tpu create "$TPU_NAME" --accelerator-type="$ACCELERATOR" --version="$RUNTIME" ${SPOT:+--spot} ;;
  setup)
    root=$(cd "$(dirname "$0")/.." && pwd)
    tar -C "$root" --exclude=.git --exclude=runs --exclude='.venv*' -czf /tmp/tinyllm-jax.tgz .
    tpu scp /tmp/tinyllm-jax.tgz "$TPU_NAME":/tmp/tinyllm-jax.tgz --worker=all
    on_all "mkdir -p $REMOTE_DIR && tar -xzf /tmp/tinyllm-jax.tgz -C $REMOTE_DIR && cd $REMOTE_DIR && pip install -q -e '.[tpu]'" ;;
  train)
    args=$(printf ' %q' "$@")
    on_all "cd $REMOTE_DIR && TINYLLM_DISTRIBUTED=1 nohup ~/.local/bin/tinyllm train$args > train.log 2>&1 &" ;;
  ssh) on_all "$*" ;;
  delete) tpu delete "$TPU_NAME" --quiet ;;
  *) echo "unknown command $cmd" >&2; exit 2 ;;
esac
