#!/usr/bin/env bash
# Runs a vlm_jax config on every worker of a Cloud TPU VM pod slice (one process per worker host).
#
#   TPU=my-v4-128 ZONE=us-central2-b WORKDIR=/mnt/shared/runs/llava15_7b_stage1 \
#       launch/tpu_pod.sh --config=configs/llava15_7b_stage1.py [--config.key=value ...]
#
# Variables:
#   TPU       name of the TPU VM (pod slice)                                   (required)
#   ZONE      its zone                                                         (required)
#   WORKDIR   run directory on a file system that EVERY worker mounts (Filestore/NFS, or a gcsfuse
#             mount of a bucket): checkpoints, metrics and the config go there, and the run resumes
#             from it. A worker-local path breaks multi-host checkpoints.      (required)
#   PROJECT   GCP project                                                      (default: gcloud's)
#   REMOTE    where the code is copied to on each worker                       (default: ~/vlm_jax)
#   PYTHON    python on the workers, with this project and jax[tpu] installed  (default: python3)
#   SETUP     command run first on each worker, e.g. "pip install -e ~/vlm_jax"  (default: none)
#   PORT      jax.distributed coordinator port on worker 0                     (default: 8476)
#
# What it does: (1) copies this checkout (without .venv/.git) to $REMOTE on all workers with
# `gcloud compute tpus tpu-vm scp --worker=all`; (2) starts `python -m launch.main ARGS
# --workdir=$WORKDIR` on all workers at once with `... ssh --worker=all`, with
# JAX_COORDINATOR_ADDRESS set to worker 0 (so launch.main starts jax.distributed; JAX reads the
# process count and this worker's index from the TPU metadata). Each worker's output is prefixed
# by gcloud. The run lives as long as this command: start it inside tmux or screen. Run it
# again to resume. Simulate the memory first:
#   python -m launch.simulate --config=... --devices=<chips in the slice>
#
# Step (1) deletes $REMOTE on every worker: empty, `/`, a top-level directory, a home directory
# (`~`, /home/NAME, /root), `..` and anything but plain path characters are refused first
# (`source launch/tpu_pod.sh` defines the checks alone, for tests).

# Fails, saying why, unless $1 is safe to `rm -rf` on every worker.
check_remote() {
  local r="$1"
  while [[ "$r" == */ ]]; do r="${r%/}"; done
  local why=""
  if [[ -z "$r" ]]; then why="it is empty or /"
  elif [[ ! "$r" =~ ^[A-Za-z0-9._/~+@-]+$ ]]; then why="only letters, digits and ._/~+@- are allowed"
  elif [[ "$r" =~ ^~[^/]*$ || "$r" =~ ^/(home|Users)/[^/]+$ || "$r" == /root ]]; then why="it is a home directory"
  elif [[ "$r" == "~"* && "$r" != "~/"* ]]; then why="only a leading ~/ is expanded on the workers"
  elif [[ "$r" =~ ^/[^/]+$ ]]; then why="it is a top-level directory"
  elif [[ "$r" =~ (^|/)\.\.?(/|$) || "$r" == -* ]]; then why="no . or .. components or leading -"
  fi
  if [[ -n "$why" ]]; then
    echo "tpu_pod.sh: refusing REMOTE='$1' (the code sync runs rm -rf on it on every worker): $why" >&2
    return 1
  fi
}

# $1 as a word of the workers' shell: a leading ~/ becomes "$HOME"/ (expanded there), the rest quoted.
remote_word() {
  if [[ "$1" == "~/"* ]]; then printf '"$HOME"/%q' "${1#\~/}"; else printf '%q' "$1"; fi
}

[[ "${BASH_SOURCE[0]}" != "$0" ]] && return 0  # sourced: the checks only

set -euo pipefail

: "${TPU:?set TPU to the TPU VM name}" "${ZONE:?set ZONE}" "${WORKDIR:?set WORKDIR (shared by all workers)}"
REMOTE="${REMOTE:-~/vlm_jax}"  # the ~ is expanded on the workers
check_remote "$REMOTE" || exit 2
DEST="$(remote_word "$REMOTE")"
PYTHON="${PYTHON:-python3}"
SETUP="${SETUP:-true}"
WHERE=(--zone="$ZONE" ${PROJECT:+--project="$PROJECT"})
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

# 1. Sync the code: a tarball of the checkout, unpacked fresh on every worker.
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT
tar -C "$ROOT" --exclude=./.venv --exclude=./.git --exclude='__pycache__' -czf "$TMP/vlm_jax.tgz" .
gcloud compute tpus tpu-vm scp "$TMP/vlm_jax.tgz" "$TPU:/tmp/vlm_jax.tgz" --worker=all "${WHERE[@]}"
gcloud compute tpus tpu-vm ssh "$TPU" --worker=all "${WHERE[@]}" \
  --command="rm -rf -- $DEST && mkdir -p -- $DEST && tar -xzf /tmp/vlm_jax.tgz -C $DEST"

# 2. Run on all workers at once; worker 0 coordinates. Arguments are quoted for the remote shell.
IP="$(gcloud compute tpus tpu-vm describe "$TPU" "${WHERE[@]}" --format='value(networkEndpoints[0].ipAddress)')"
ARGS="$(printf '%q ' "$@")"
gcloud compute tpus tpu-vm ssh "$TPU" --worker=all "${WHERE[@]}" --command="cd $DEST && $SETUP && \
  JAX_COORDINATOR_ADDRESS=$IP:${PORT:-8476} $PYTHON -m launch.main $ARGS --workdir=$(printf '%q' "$WORKDIR")"
