#!/usr/bin/env bash
# Train tinyllm-jax on a Cloud TPU VM or pod slice: every worker runs the same
# `tinyllm train` with TINYLLM_DISTRIBUTED=1, jax.distributed.initialize() finds the
# workers from the TPU metadata, and the mesh spans all chips of the slice.
#
# Needs: the gcloud CLI, authenticated, with a project set (gcloud config set project P)
# and TPU quota in ZONE; a run_dir that every worker sees at the same path (a GCS bucket
# mounted with gcsfuse, or Filestore): Orbax writes each checkpoint once, cooperatively,
# from all workers, and process 0 writes the logs.
#
#   export TPU_NAME=distill-v4-32 ZONE=us-central2-b ACCELERATOR=v4-32 RUNTIME=tpu-ubuntu2204-base
#   scripts/tpu_pod.sh create          # on-demand TPU VM; SPOT=1: spot capacity;
#                                      # QUEUED=1: a queued resource (waits for capacity)
#   scripts/tpu_pod.sh setup           # copy this checkout to all workers, pip install
#   scripts/tpu_pod.sh train configs/tinyllm_obqa.yaml run_dir=/mnt/shared/runs/obqa model.init=google/flan-t5-large
#   scripts/tpu_pod.sh status          # the VM's (or queued resource's) state, the log's last lines
#   scripts/tpu_pod.sh resume          # after a preemption: recreate, setup, the same `train` again
#   scripts/tpu_pod.sh ssh "tail -f /mnt/shared/runs/obqa/metrics.jsonl"
#   scripts/tpu_pod.sh delete
#   scripts/tpu_pod.sh --dry-run COMMAND ...   # print the commands instead of running them
#
# Preemption: spot and queued spot capacity can be taken back at any time. The VM's
# shutdown sends SIGTERM; JAX's preemption service tells every worker, and all save the
# same step and exit. `resume` then creates the resource again (unless it is still there),
# sets it up and reruns the last `train` (its arguments are kept in $STATE_DIR), which
# resumes exactly from the run_dir. Run it from cron or a loop to resume unattended:
#   while sleep 600; do scripts/tpu_pod.sh resume; done
# `resume` does nothing while training runs on worker 0 or after it finished (exit status 0
# without a SIGTERM save in its log); on a live VM whose training stopped it restarts it.
#
# In --dry-run, state queries are printed too (on stderr) and answered by $DRY_RUN_STATE
# (default READY, or ACTIVE for a queued resource; empty: it does not exist) and
# $DRY_RUN_TRAINING (running, finished or stopped; default stopped); waiting is one query.
set -euo pipefail

DRY_RUN=0
if [[ ${1:-} == --dry-run ]]; then DRY_RUN=1; shift; fi
cmd=${1:?usage: tpu_pod.sh [--dry-run] create|setup|train CONFIG [key=value ...]|status|resume|ssh COMMAND|delete}
shift
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}"
ACCELERATOR=${ACCELERATOR:-v4-8}
RUNTIME=${RUNTIME:-tpu-ubuntu2204-base}
REMOTE_DIR=${REMOTE_DIR:-tinyllm-jax}
QUEUED=${QUEUED:-0}
SPOT=${SPOT:-0}
QR_NAME=${QR_NAME:-$TPU_NAME-qr}
STATE_DIR=${STATE_DIR:-${XDG_STATE_HOME:-$HOME/.local/state}/tinyllm-tpu}
ARGS_FILE="$STATE_DIR/$TPU_NAME.train"
TARBALL=${TARBALL:-/tmp/tinyllm-jax-$TPU_NAME.tgz}

run() {  # a command, or with --dry-run its shell-quoted text
  if ((DRY_RUN)); then printf '%q ' "$@" | sed 's/ $//'; echo; else "$@"; fi
}
query() {  # a command whose output is needed; in --dry-run printed and answered by $2
  local answer=$1; shift
  if ((DRY_RUN)); then printf '%q ' "$@" | sed 's/ $//' >&2; echo >&2; echo "$answer"; else "$@" 2>/dev/null || true; fi
}
tpu() { run gcloud compute tpus tpu-vm "$@" --zone="$ZONE"; }
on_all() { tpu ssh "$TPU_NAME" --worker=all --command="$1"; }
spot_flag() { if ((SPOT)); then echo --spot; fi; }

state() {  # READY/ACTIVE (usable), PROVISIONING/WAITING_FOR_RESOURCES, PREEMPTED/SUSPENDED/FAILED, or MISSING
  local s
  if ((QUEUED)); then
    s=$(query "${DRY_RUN_STATE-ACTIVE}" gcloud compute tpus queued-resources describe "$QR_NAME" --zone="$ZONE" --format='value(state.state)')
  else
    s=$(query "${DRY_RUN_STATE-READY}" gcloud compute tpus tpu-vm describe "$TPU_NAME" --zone="$ZONE" --format='value(state)')
  fi
  echo "${s:-MISSING}"
}

create() {
  if ((QUEUED)); then
    # shellcheck disable=SC2046
    run gcloud compute tpus queued-resources create "$QR_NAME" --node-id="$TPU_NAME" --zone="$ZONE" \
      --accelerator-type="$ACCELERATOR" --runtime-version="$RUNTIME" $(spot_flag)
  else
    # shellcheck disable=SC2046
    tpu create "$TPU_NAME" --accelerator-type="$ACCELERATOR" --version="$RUNTIME" $(spot_flag)
  fi
}

wait_usable() {
  local s
  if ((DRY_RUN)); then state > /dev/null; return 0; fi
  for _ in $(seq 1 720); do  # up to 6 hours in the queue
    s=$(state)
    case "$s" in
      READY|ACTIVE) return 0 ;;
      FAILED|PREEMPTED|SUSPENDED|MISSING) echo "tpu_pod.sh: $TPU_NAME is $s" >&2; return 1 ;;
    esac
    sleep 30
  done
  echo "tpu_pod.sh: $TPU_NAME still not ready" >&2; return 1
}

delete() {
  if ((QUEUED)); then
    run gcloud compute tpus queued-resources delete "$QR_NAME" --zone="$ZONE" --force --quiet
  else
    tpu delete "$TPU_NAME" --quiet
  fi
}

setup() {
  local root
  root=$(cd "$(dirname "$0")/.." && pwd)
  run tar -C "$root" --exclude=.git --exclude=runs --exclude='.venv*' -czf "$TARBALL" .
  tpu scp "$TARBALL" "$TPU_NAME":/tmp/tinyllm-jax.tgz --worker=all
  on_all "mkdir -p $REMOTE_DIR && tar -xzf /tmp/tinyllm-jax.tgz -C $REMOTE_DIR && cd $REMOTE_DIR && pip install -q -e '.[tpu]'"
}

train() {
  (($# > 0)) || { echo "tpu_pod.sh: train needs CONFIG [key=value ...]" >&2; exit 2; }
  mkdir -p "$STATE_DIR"
  printf '%s\0' "$@" > "$ARGS_FILE"  # for `resume`, NUL-separated
  # the job's shell (not the login shell) expands $HOME and $?: its text is quoted once more
  # the job's shell keeps its pid in train.pid: the check asks after this job, not any `tinyllm train`
  local job="echo \$\$ > train.pid; TINYLLM_DISTRIBUTED=1 \"\$HOME\"/.local/bin/tinyllm train$(printf ' %q' "$@") > train.log 2>&1; echo \$? > train.exit"
  # only the job goes to the background, its output away from ssh: ssh returns at once
  on_all "cd $REMOTE_DIR && rm -f train.exit && { nohup bash -c $(printf '%q' "$job") < /dev/null > /dev/null 2>&1 & }"
}

training() {  # running, finished or stopped: the job `train` started on worker 0
  local check="cd $REMOTE_DIR 2>/dev/null || { echo stopped; exit; };"
  # running: the job's shell is alive and still that job (a pid reused after a reboot is not)
  check+=" pid=\$(cat train.pid 2>/dev/null);"
  check+=" if [ -n \"\$pid\" ] && tr '\\0' ' ' < /proc/\$pid/cmdline 2>/dev/null | grep -q 'tinyllm train'; then echo running;"
  check+=" elif [ \"\$(cat train.exit 2>/dev/null)\" = 0 ] && ! tail -n 20 train.log | grep -q 'SIGTERM: saved step'; then echo finished;"
  check+=" else echo stopped; fi"
  query "${DRY_RUN_TRAINING:-stopped}" gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --worker=0 --command="$check"
}

resume() {
  [[ -f $ARGS_FILE ]] || { echo "tpu_pod.sh: no earlier train for $TPU_NAME ($ARGS_FILE); run train first" >&2; exit 2; }
  local s
  s=$(state)
  case "$s" in
    READY|ACTIVE)
      local t
      t=$(training)
      if [[ $t == running || $t == finished ]]; then echo "tpu_pod.sh: $TPU_NAME is $s and training $t: nothing to do"; return 0; fi
      echo "tpu_pod.sh: $TPU_NAME is $s, training stopped: restarting it" ;;
    PROVISIONING|WAITING_FOR_RESOURCES|CREATING)
      echo "tpu_pod.sh: $TPU_NAME is $s; waiting"; wait_usable; setup ;;
    *)
      echo "tpu_pod.sh: $TPU_NAME is $s: creating it again"
      [[ $s == MISSING ]] || delete
      create; wait_usable; setup ;;
  esac
  local args
  mapfile -d '' -t args < "$ARGS_FILE"
  train "${args[@]}"
}

case "$cmd" in
  create) create ;;
  setup) setup ;;
  train) train "$@" ;;
  status)
    echo "$TPU_NAME: $(state)"
    ((DRY_RUN)) || on_all "tail -n 3 $REMOTE_DIR/train.log 2>/dev/null || true" ;;
  resume) resume ;;
  ssh) on_all "$*" ;;
  delete) delete ;;
  *) echo "tpu_pod.sh: unknown command $cmd" >&2; exit 2 ;;
esac
