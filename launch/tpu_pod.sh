#!/usr/bin/env bash
# Run jaxft training on every worker of a Cloud TPU VM (a single host or a pod slice).
#
# Usage:
#   launch/tpu_pod.sh TPU_NAME ZONE CONFIG WORKDIR [extra args...]
#
# Example:
#   launch/tpu_pod.sh my-v4-32 us-central2-b configs/lora.py gs://my-bucket/runs/lora \
#       --config.mesh.fsdp=-1
#
# Steps, each on all workers at once:
#   1. sync:    pack this checkout (files tracked by git plus untracked files
#               that are not git-ignored), copy it to every worker and unpack
#               it into ~/$REMOTE_DIR, replacing what was there;
#   2. install: pip install -e . "jax[tpu]";
#   3. train:   python3 -m jaxft.train --config=CONFIG --workdir=WORKDIR [extra args]
#               jax.distributed.initialize() finds the other workers by itself.
#
# WORKDIR must be storage that all workers share, normally a gs:// path.
# CONFIG is a path relative to the repository root.
#
# Environment variables:
#   PROJECT        GCP project (default: gcloud's configured project)
#   SKIP_SYNC=1    skip step 1 (the workers keep the code they have)
#   SKIP_INSTALL=1 skip step 2
#   DETACH=1       start training in the background on each worker and return;
#                  the output goes to ~/jaxft-train.log on each worker
#   DRY_RUN=1      print the gcloud commands without running them
#   REMOTE_DIR     checkout directory on the workers, relative to the home
#                  directory (default jaxft); replaced on every sync
#   REMOTE_PYTHON  Python on the workers (default python3)
#   JAX_TPU_SPEC   pip requirement for TPU jax (default "jax[tpu]")
#   REMOTE_ENV     extra environment for training, inserted as is, e.g.
#                  REMOTE_ENV="HF_TOKEN=hf_xxx TF_CPP_MIN_LOG_LEVEL=1"
#   GCLOUD_FLAGS   extra flags for gcloud ssh/scp, e.g. "--internal-ip" or
#                  "--tunnel-through-iap"
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: launch/tpu_pod.sh TPU_NAME ZONE CONFIG WORKDIR [extra args...]

Copies this checkout to every worker of the TPU VM, installs it and starts
`python3 -m jaxft.train` on all workers.

  TPU_NAME    name of the TPU VM, e.g. my-v4-32
  ZONE        its zone, e.g. us-central2-b
  CONFIG      config file relative to the repository root, e.g. configs/lora.py
  WORKDIR     output directory shared by all workers, e.g. gs://bucket/runs/lora
  extra args  passed on to jaxft.train, e.g. --config.mesh.fsdp=-1

Environment: PROJECT, SKIP_SYNC=1, SKIP_INSTALL=1, DETACH=1, DRY_RUN=1,
             REMOTE_DIR (default jaxft), REMOTE_PYTHON (default python3),
             JAX_TPU_SPEC (default "jax[tpu]"), REMOTE_ENV, GCLOUD_FLAGS.

Example:
  launch/tpu_pod.sh my-v4-32 us-central2-b configs/lora.py gs://my-bucket/runs/lora
EOF
}

log() { echo "[tpu_pod] $*" >&2; }
die() { log "error: $*"; exit 1; }

# shellcheck source=launch/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

# Prints a command, then runs it unless DRY_RUN=1.
run() {
  echo "+ $(quote_cmd "$@")" >&2
  if [[ ${DRY_RUN:-0} != 1 ]]; then
    "$@"
  fi
}

# --- Arguments ---------------------------------------------------------------

if (( $# < 4 )); then
  usage >&2
  exit 2
fi
tpu_name=$1
zone=$2
config=$3
workdir=$4
shift 4  # "$@" now holds the extra args for jaxft.train

repo_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

remote_dir=${REMOTE_DIR:-jaxft}
remote_dir=${remote_dir#\~/}  # "~/x" means "x": remote commands start in the home directory
remote_python=${REMOTE_PYTHON:-python3}
jax_tpu_spec=${JAX_TPU_SPEC:-jax[tpu]}
# shellcheck disable=SC2088  # the ~ is for the workers' shell to expand
remote_log='~/jaxft-train.log'
remote_tarball="/tmp/jaxft-src-${USER:-user}.tar.gz"

case $remote_dir in
  "" | / | . | .. | "~") die "REMOTE_DIR='$remote_dir' is not allowed: it is deleted and replaced on every sync" ;;
esac
if [[ $config == /* ]]; then
  die "CONFIG must be relative to the repository root (the workers run from their copy of it), got '$config'"
fi
[[ -f $repo_root/${config%%:*} ]] || die "config file '${config%%:*}' not found in $repo_root"
if [[ $workdir != gs://* ]]; then
  log "warning: WORKDIR '$workdir' is not a gs:// path; it must be storage that all workers share (e.g. NFS/Filestore), or multi-host checkpointing will fail"
fi
if [[ ${DRY_RUN:-0} != 1 ]]; then
  command -v gcloud >/dev/null || die "gcloud not found; install the Google Cloud SDK"
fi

gcloud_flags=(--zone="$zone")
if [[ -n ${PROJECT:-} ]]; then
  gcloud_flags+=(--project="$PROJECT")
fi
if [[ -n ${GCLOUD_FLAGS:-} ]]; then
  read -ra extra_gcloud_flags <<<"$GCLOUD_FLAGS"
  gcloud_flags+=("${extra_gcloud_flags[@]}")
fi

# Runs a shell command on all workers.
on_all_workers() {
  run gcloud compute tpus tpu-vm ssh "$tpu_name" "${gcloud_flags[@]}" --worker=all --command="$1"
}

# Quotes arguments for the remote shell.
q() {
  local out
  printf -v out '%q ' "$@"
  echo "${out% }"
}

log "TPU $tpu_name (zone $zone${PROJECT:+, project $PROJECT}), remote checkout ~/$remote_dir"

# --- 1. Sync ------------------------------------------------------------------

# Writes the files to ship, NUL-separated: with git, tracked files plus
# untracked files that are not ignored; otherwise everything but the usual junk.
list_files() (
  cd "$repo_root"
  if git rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    git ls-files -z --cached --others --exclude-standard
  else
    find . -name .git -prune -o -type f -print0
  fi | while IFS= read -r -d '' f; do
    [[ -f $f ]] || continue  # deleted but still tracked
    case $f in
      *__pycache__/* | *.pyc | *.egg-info/*) continue ;;
    esac
    printf '%s\0' "${f#./}"
  done
)

if [[ ${SKIP_SYNC:-0} == 1 ]]; then
  log "[1/3] sync: skipped (SKIP_SYNC=1)"
else
  log "[1/3] sync: copying $repo_root to ~/$remote_dir on all workers"
  tmp_dir=$(mktemp -d "${TMPDIR:-/tmp}/jaxft-tpu.XXXXXX")
  trap 'rm -rf "$tmp_dir"' EXIT
  tarball="$tmp_dir/jaxft-src.tar.gz"
  # COPYFILE_DISABLE keeps macOS tar from adding ._* metadata files.
  list_files | COPYFILE_DISABLE=1 tar -C "$repo_root" -czf "$tarball" --null -T -
  log "packed $(tar -tzf "$tarball" | wc -l | tr -d ' ') files ($(du -h "$tarball" | cut -f1))"

  run gcloud compute tpus tpu-vm scp "$tarball" "$tpu_name:$remote_tarball" \
    "${gcloud_flags[@]}" --worker=all
  # Unpack next to the old copy, then swap, so no stale files survive.
  on_all_workers "set -e; rm -rf $(q "$remote_dir.new"); mkdir -p $(q "$remote_dir.new"); \
tar -xzf $(q "$remote_tarball") -C $(q "$remote_dir.new"); rm -f $(q "$remote_tarball"); \
rm -rf $(q "$remote_dir"); mv $(q "$remote_dir.new") $(q "$remote_dir")"
fi

# --- 2. Install ---------------------------------------------------------------

if [[ ${SKIP_INSTALL:-0} == 1 ]]; then
  log "[2/3] install: skipped (SKIP_INSTALL=1)"
else
  log "[2/3] install: pip install -e . $jax_tpu_spec on all workers"
  on_all_workers "set -e; cd $(q "$remote_dir"); $(q "$remote_python") -m pip install --quiet -e . $(q "$jax_tpu_spec")"
fi

# --- 3. Train -----------------------------------------------------------------

train_cmd="$(q "$remote_python" -m jaxft.train --config="$config" --workdir="$workdir" "$@")"
if [[ -n ${REMOTE_ENV:-} ]]; then
  train_cmd="env $REMOTE_ENV $train_cmd"
fi

if [[ ${DETACH:-0} == 1 ]]; then
  log "[3/3] train: starting in the background on all workers (output: $remote_log on each worker)"
  on_all_workers "cd $(q "$remote_dir") && nohup $train_cmd >>$remote_log 2>&1 </dev/null &"
  log "started. Follow worker 0 with:"
  log "  gcloud compute tpus tpu-vm ssh $(quote_cmd "$tpu_name" "${gcloud_flags[@]}") --worker=0 --command='tail -f $remote_log'"
else
  log "[3/3] train: running on all workers"
  on_all_workers "cd $(q "$remote_dir") && $train_cmd"
  if [[ ${DRY_RUN:-0} != 1 ]]; then log "training finished"; fi
fi
if [[ ${DRY_RUN:-0} == 1 ]]; then
  log "dry run: the gcloud commands above were only printed"
fi
