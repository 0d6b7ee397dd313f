#!/usr/bin/env bash
# Run a dpq_jax job on several GPU hosts through JAX's multi-controller runtime: one process per host,
# each seeing all its local GPUs; jax.distributed.initialize() joins them (dpq_jax calls it when
# JAX_COORDINATOR_ADDRESS is set).
#
# Under SLURM (one task per node):
#   srun --nodes=4 --ntasks-per-node=1 --gpus-per-node=8 launch/gpu_multinode.sh --workdir /shared/runs/x [-- flags]
#   (coordinator: the first host of SLURM_JOB_NODELIST; process id: SLURM_PROCID; count: SLURM_NTASKS)
# Anywhere else, on every host:
#   launch/gpu_multinode.sh --coordinator host0:12355 --num-processes 4 --process-id I --workdir /shared/runs/x
#
# --workdir must be a filesystem every host sees (checkpoints are written by all processes together,
# reports by process 0). --dry-run prints the environment and the command instead of running them.
set -euo pipefail

COORD="" NPROC="" PID="" PORT=12355 WORKDIR="" CONFIG="dit_xl_1bit" PYTHON="${PYTHON:-python3}" DRY=0 EXTRA=()
die() { echo "gpu_multinode.sh: $*" >&2; exit 2; }
while [[ $# -gt 0 ]]; do
  case "$1" in
    --coordinator) COORD="$2"; shift 2 ;;
    --num-processes) NPROC="$2"; shift 2 ;;
    --process-id) PID="$2"; shift 2 ;;
    --port) PORT="$2"; shift 2 ;;
    --workdir) WORKDIR="$2"; shift 2 ;;
    --config) CONFIG="$2"; shift 2 ;;
    --dry-run) DRY=1; shift ;;
    -h|--help) sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    --) shift; EXTRA=("$@"); break ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
done
[[ -n "$WORKDIR" ]] || die "--workdir is required (a directory every host sees)"

if [[ -z "$COORD" && -n "${SLURM_JOB_NODELIST:-}" ]]; then  # SLURM: derive all three from its variables
  first="$(scontrol show hostnames "$SLURM_JOB_NODELIST" 2>/dev/null | head -n1 || true)"
  if [[ -z "$first" ]]; then  # no scontrol: the first name of 'a,b' or 'gpu[01-04,07]'
    list="${SLURM_JOB_NODELIST%%,*}"
    if [[ "$SLURM_JOB_NODELIST" == *\[* && "${SLURM_JOB_NODELIST%%\[*}" != *,* ]]; then
      inner="${SLURM_JOB_NODELIST#*\[}"
      list="${SLURM_JOB_NODELIST%%\[*}${inner%%[],-]*}"
    fi
    first="$list"
  fi
  COORD="$first:$PORT"
  NPROC="${NPROC:-${SLURM_NTASKS:-}}"
  PID="${PID:-${SLURM_PROCID:-}}"
fi
[[ -n "$COORD" ]] || die "no coordinator: give --coordinator HOST:PORT or run under SLURM"
[[ "$COORD" == *:* ]] || die "--coordinator='$COORD': expected HOST:PORT"
[[ "$NPROC" =~ ^[1-9][0-9]*$ ]] || die "--num-processes='$NPROC': expected a positive integer"
[[ "$PID" =~ ^[0-9]+$ && "$PID" -lt "$NPROC" ]] || die "--process-id='$PID': expected 0..$((NPROC - 1))"

export JAX_COORDINATOR_ADDRESS="$COORD" JAX_NUM_PROCESSES="$NPROC" JAX_PROCESS_ID="$PID"
CMD=("$PYTHON" -m dpq_jax.main "--config=$CONFIG" "--workdir=$WORKDIR" "${EXTRA[@]}")
echo "+ JAX_COORDINATOR_ADDRESS=$COORD JAX_NUM_PROCESSES=$NPROC JAX_PROCESS_ID=$PID$(printf ' %q' "${CMD[@]}")"
[[ $DRY -eq 1 ]] && exit 0
cd "$(dirname "$0")/.."
exec "${CMD[@]}"
