#!/bin/bash
# Train on every host of a Cloud TPU pod slice: copy this checkout to all workers and start
# the same command on each (`--worker=all`); JAX detects the slice itself (--distributed-auto).
#
#   TPU_NAME=my-v5p-32 ZONE=us-east5-a RUN_DIR=/mnt/shared/run1 \
#     scripts/launch/tpu_pod.sh configs/gpt2_124m.yaml [key=value ...]
#
# RUN_DIR must be a directory every worker sees at the same path (NFS, or a gcsfuse-mounted
# bucket): all hosts write the checkpoint together. PROJECT is optional (gcloud's default).
# JAX for TPU and this project's dependencies must already be installed on every worker.
set -euo pipefail

: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}" "${RUN_DIR:?set RUN_DIR (shared by all workers)}"
config=${1:?usage: tpu_pod.sh CONFIG [key=value ...]}
shift
gcloud_flags=(--zone="${ZONE}" --worker=all)
if [[ -n "${PROJECT:-}" ]]; then gcloud_flags+=(--project="${PROJECT}"); fi

archive=$(mktemp --suffix=.tgz)
trap 'rm -f "${archive}"' EXIT
tar czf "${archive}" --exclude=.git --exclude=runs .
gcloud compute tpus tpu-vm scp "${archive}" "${TPU_NAME}:meshpilot.tgz" "${gcloud_flags[@]}"

remote="rm -rf meshpilot && mkdir meshpilot && tar xzf meshpilot.tgz -C meshpilot && cd meshpilot && "
remote+="python3 scripts/train.py --distributed-auto --config $(printf '%q' "${config}") "
remote+="--run-dir $(printf '%q' "${RUN_DIR}")"
if (( $# )); then remote+=" $(printf '%q ' "$@")"; fi
gcloud compute tpus tpu-vm ssh "${TPU_NAME}" "${gcloud_flags[@]}" --command="${remote}"
