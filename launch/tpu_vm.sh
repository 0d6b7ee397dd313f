#!/usr/bin/env bash
# Run a dpq_jax job on a Cloud TPU VM (one host or a pod slice): create or reuse the TPU, copy this
# checkout to every worker, install the project with jax[tpu], run the same command on all workers.
#
#   launch/tpu_vm.sh --name dpq-v5e --zone us-west4-a --accelerator v5litepod-8 \
#       --workdir gs://BUCKET/runs/dit_xl_1bit --checkpoint gs://BUCKET/ckpt/dit_xl_2_256 \
#       --data-dir gs://BUCKET/tfds --vae gs://BUCKET/ckpt/sd_vae_ft_ema [--queued [--spot]] [--gcsfuse] \
#       [--dry-run] [-- --config.calibrate.steps=4000 ...]
#
# Everything the job writes (report, quantized model, checkpoints, samples) goes under --workdir, a
# gs:// path that the job gets as it is: dpq_jax reads and writes gs:// itself (etils.epath + gcsfs,
# orbax and tfds/array_record natively; only process 0 writes). --gcsfuse instead mounts every bucket
# named by the flags at /gcs/BUCKET on each worker and passes the mounted paths (plain file I/O).
# A preempted job is resumed by running the
# same command again: the TPU is reused (or re-created) and calibration resumes from its last checkpoint.
# --dry-run prints every command (prefixed with '+ ') instead of running it.
set -euo pipefail

NAME="" ZONE="" PROJECT="" ACCEL="v5litepod-8" RUNTIME="" WORKDIR="" CHECKPOINT="" DATA_DIR="" VAE=""
CONFIG="dit_xl_1bit" QUEUED=0 SPOT=0 DRY=0 FUSE=0 EXTRA=()
usage() { sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'; }
die() { echo "tpu_vm.sh: $*" >&2; exit 2; }

while [[ $# -gt 0 ]]; do
  case "$1" in
    --name) NAME="$2"; shift 2 ;;
    --zone) ZONE="$2"; shift 2 ;;
    --project) PROJECT="$2"; shift 2 ;;
    --accelerator) ACCEL="$2"; shift 2 ;;
    --runtime) RUNTIME="$2"; shift 2 ;;
    --workdir) WORKDIR="$2"; shift 2 ;;
    --checkpoint) CHECKPOINT="$2"; shift 2 ;;
    --data-dir) DATA_DIR="$2"; shift 2 ;;
    --vae) VAE="$2"; shift 2 ;;
    --config) CONFIG="$2"; shift 2 ;;
    --queued) QUEUED=1; shift ;;
    --spot) SPOT=1; shift ;;
    --dry-run) DRY=1; shift ;;
    --gcsfuse) FUSE=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; EXTRA=("$@"); break ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
done
[[ -n "$NAME" ]] || die "--name is required (the TPU VM's name)"
[[ -n "$ZONE" ]] || die "--zone is required (e.g. us-west4-a)"
[[ "$WORKDIR" == gs://* ]] || die "--workdir='$WORKDIR': expected a gs:// path (every worker writes there)"
[[ -z "$CHECKPOINT" || "$CHECKPOINT" == gs://* ]] || die "--checkpoint='$CHECKPOINT': expected a gs:// path"
if [[ -z "$RUNTIME" ]]; then
  case "$ACCEL" in
    v5litepod-*) RUNTIME="v2-alpha-tpuv5-lite" ;;
    v5p-*) RUNTIME="v2-alpha-tpuv5" ;;
    v6e-*) RUNTIME="v2-alpha-tpuv6e" ;;
    v4-*) RUNTIME="tpu-ubuntu2204-base" ;;
    *) die "--accelerator='$ACCEL': give --runtime for it (e.g. tpu-ubuntu2204-base)" ;;
  esac
fi
[[ $SPOT -eq 0 || $QUEUED -eq 1 ]] || die "--spot needs --queued (spot capacity comes through queued resources)"

GCLOUD=(gcloud)
[[ -n "$PROJECT" ]] && GCLOUD+=(--project "$PROJECT")

run() {  # prints the command; runs it unless --dry-run
  printf '+'; printf ' %q' "$@"; printf '\n'
  [[ $DRY -eq 1 ]] || "$@"
}

# 1. The TPU: reuse it when it exists, else create it (directly, or as a queued resource).
if [[ $DRY -eq 0 ]] && "${GCLOUD[@]}" compute tpus tpu-vm describe "$NAME" --zone "$ZONE" >/dev/null 2>&1; then
  echo "reusing TPU VM $NAME"
elif [[ $QUEUED -eq 1 ]]; then
  QR=(compute tpus queued-resources create "$NAME-qr" --node-id "$NAME" --zone "$ZONE"
      --accelerator-type "$ACCEL" --runtime-version "$RUNTIME")
  [[ $SPOT -eq 1 ]] && QR+=(--spot)
  run "${GCLOUD[@]}" "${QR[@]}"
  run "${GCLOUD[@]}" compute tpus queued-resources describe "$NAME-qr" --zone "$ZONE" --format 'value(state.state)'
  echo "# queued: run this script again once the state above is ACTIVE"
  [[ $DRY -eq 1 ]] || exit 0
else
  run "${GCLOUD[@]}" compute tpus tpu-vm create "$NAME" --zone "$ZONE" --accelerator-type "$ACCEL" --version "$RUNTIME"
fi

# 2. This checkout (committed files only) to every worker.
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
TARBALL="/tmp/dpq_jax-$NAME.tar.gz"
run git -C "$ROOT" archive --format=tar.gz --prefix=dpq_jax/ -o "$TARBALL" HEAD
run "${GCLOUD[@]}" compute tpus tpu-vm scp "$TARBALL" "$NAME:dpq_jax.tar.gz" --zone "$ZONE" --worker=all

# 3. Install on every worker: the project with its extras tpu (jax[tpu]) and gcs (gcsfs: gs:// for etils.epath);
#    with --gcsfuse, mount the buckets.
mounted() { [[ $FUSE -eq 1 && "$1" == gs://* ]] && echo "/gcs/${1#gs://}" || echo "$1"; }
MOUNTS=""
for path in "$WORKDIR" "$CHECKPOINT" "$DATA_DIR" "$VAE"; do
  if [[ $FUSE -eq 1 && "$path" == gs://* ]]; then
    bucket="${path#gs://}"; bucket="${bucket%%/*}"
    [[ "$MOUNTS" == *"/gcs/$bucket "* ]] || MOUNTS+="sudo mkdir -p /gcs/$bucket && sudo chmod 777 /gcs/$bucket && (mountpoint -q /gcs/$bucket || gcsfuse --implicit-dirs $bucket /gcs/$bucket) && "
  fi
done
INSTALL="${MOUNTS}rm -rf dpq_jax && tar xzf dpq_jax.tar.gz && cd dpq_jax && python3 -m pip install -q '.[tpu,gcs]'"
run "${GCLOUD[@]}" compute tpus tpu-vm ssh "$NAME" --zone "$ZONE" --worker=all --command "$INSTALL"

# 4. The job, on all workers at once (jax.distributed finds the pod's workers by itself).
JOB=(python3 -m dpq_jax.main "--config=$CONFIG" "--workdir=$(mounted "$WORKDIR")")
[[ -n "$CHECKPOINT" ]] && JOB+=("--config.model.checkpoint=$(mounted "$CHECKPOINT")")
[[ -n "$DATA_DIR" ]] && JOB+=("--config.data.data_dir=$(mounted "$DATA_DIR")")
[[ -n "$VAE" ]] && JOB+=("--config.vae.checkpoint=$(mounted "$VAE")")
JOB+=("${EXTRA[@]}")
CMD="cd dpq_jax && DPQ_DISTRIBUTED=1 $(printf '%q ' "${JOB[@]}")"
run "${GCLOUD[@]}" compute tpus tpu-vm ssh "$NAME" --zone "$ZONE" --worker=all --command "$CMD"
