#!/usr/bin/env bash
# Train on a Cloud TPU VM pod slice: create the slice if needed, ship this checkout to every
# worker, install it, and start the trainer on all workers at once. jax.distributed finds the
# slice's topology by itself (TML_JAX_DISTRIBUTED=auto).
#
#   PROJECT=my-project ZONE=us-east5-a TPU_NAME=tml-v5p-64 ACCELERATOR=v5p-64 \
#   BUCKET=gs://my-bucket DETACH=1 launch/tpu_pod.sh --config=configs/interaction.py:small
#   launch/tpu_pod.sh --logs          # tail every worker's log (same PROJECT/ZONE/TPU_NAME)
# (launch/README.md has a v5p-256 run of tml_small.)
#
# Rerunning the same command resumes: the workdir has no timestamp, it is
# $BUCKET/tml_jax/$TPU_NAME/$RUN_NAME, and RUN_NAME defaults to the --config argument made
# path-safe (configs/interaction.py:tml_small -> interaction-tml_small).
#
# Environment:
#   PROJECT, ZONE, TPU_NAME   the slice (required)
#   ACCELERATOR, RUNTIME      used only to create it (default v5p-8, v2-alpha-tpuv5);
#                             CREATE_FLAGS adds flags to `create` (e.g. "--spot")
#   BUCKET                    the workdir goes under it (gs://...: every worker writes there)
#   WORKDIR                   the workdir itself (overrides BUCKET/...; or pass --workdir=)
#   RUN_NAME                  the last part of the default workdir and the log folder's name
#   DETACH=1                  start the trainers under setsid/nohup and return at once
#   FORWARD_ENV="A B"         names of variables of this shell passed on to the trainer on
#                             every worker (e.g. "LIBTPU_INIT_ARGS XLA_FLAGS"; default none)
#   REPO                      the checkout to ship (default: the one holding this script)
# For tests and special images (tests/test_launch.py uses them):
#   REMOTE_PYTHON=PATH        run the trainer with this interpreter on each worker as it is:
#                             no Python install, no venv, no pip
#   TPU_DEVICES               globs of the TPU device files to clear ("/dev/accel* /dev/vfio/*")
#   TPU_LOCKFILE              libtpu's lock file (/tmp/libtpu_lockfile)
#   CLEAR_WAIT_S              seconds an earlier holder of the TPU gets after SIGTERM (60)
#   FOLLOW=0, LOG_LINES=N, WORKER=i   for --logs: print and return, lines shown, one worker
#
# What happens on each worker (the ssh command runs this same script with --on-worker):
#   1. Processes still holding the TPU from an earlier run (a hung or detached trainer) get
#      SIGTERM (a trainer saves a checkpoint on it), then SIGKILL after CLEAR_WAIT_S:
#      `fuser -k` on the TPU device files, then libtpu's lock file is removed. Nothing there
#      is fine.
#   2. ~/tml_jax is replaced by the shipped code (its .venv is kept). Shipped: git's tracked
#      and unignored files; never runs/, .venv, .git, data/ or __pycache__.
#   3. Python >= 3.12 (setup.py requires it; TPU VM images such as tpu-ubuntu2204-base have
#      3.10): the first of python3.12, python3.13, python3.14, python3 that is >= 3.12; else
#      `uv python install 3.12` with uv from `python3 -m pip install --user uv` (primary: no
#      root, no apt lock held by unattended-upgrades on a fresh VM, the same on every image);
#      else on Ubuntu the deadsnakes PPA (add-apt-repository ppa:deadsnakes/ppa; apt-get
#      install python3.12 python3.12-venv). If neither works the worker stops and says so.
#      Then ~/tml_jax/.venv (recreated if older than 3.12) gets
#      `pip install -c constraints.txt -e ".[tf]" "jax[tpu]"`.
#   4. The trainer runs in ~/tml_jax with TML_JAX_DISTRIBUTED=auto (JAX_COORDINATOR_ADDRESS
#      and friends, if the worker's environment has them, are left alone and win). Its
#      output is appended to ~/tml_jax_logs/$RUN_NAME/worker_<id>.log on that worker
#      (~/tml_jax_logs/latest points at the newest run); <id> is $TPU_WORKER_ID, else the GCE
#      metadata agent-worker-number, else the hostname.
# Needs: an authenticated gcloud; the workers reaching PyPI (and GitHub for uv's Python, or
# Launchpad for deadsnakes, on images older than Python 3.12). The remote login shell is bash.
set -euo pipefail

die() { echo "tpu_pod.sh: $*" >&2; exit 1; }
warn() { echo "tpu_pod.sh: warning: $*" >&2; }

# ---------------------------------------------------------------- on each worker

say() { echo "[tpu_pod worker ${TML_POD_WORKER_ID:-?}] $*"; }
worker_die() { say "ERROR: $*" >&2; exit 1; }

worker_id() {
  local n
  if [ -n "${TPU_WORKER_ID:-}" ]; then echo "$TPU_WORKER_ID"; return; fi
  local url=http://metadata.google.internal/computeMetadata/v1/instance/attributes
  if n=$(curl -fsS -m 3 -H 'Metadata-Flavor: Google' "$url/agent-worker-number" 2>/dev/null) &&
     [ -n "$n" ]; then
    echo "$n"; return
  fi
  hostname
}

as_root() {
  if [ "$(id -u)" = 0 ]; then "$@"
  elif sudo -n true 2>/dev/null; then sudo -n "$@"
  else "$@"  # without root only our own processes can be seen; better than nothing
  fi
}

clear_tpu() {
  local devs=() f waited=0
  shopt -s nullglob
  # shellcheck disable=SC2086  # TML_POD_DEVICES holds globs: split and expanded on purpose
  for f in $TML_POD_DEVICES; do devs+=("$f"); done
  shopt -u nullglob
  if [ ${#devs[@]} -eq 0 ]; then
    say "no TPU device files ($TML_POD_DEVICES): nothing to clear"
  elif ! command -v fuser >/dev/null; then
    say "WARNING: fuser not found (apt-get install psmisc): earlier processes holding the TPU" \
        "are not stopped"
  elif as_root fuser -s "${devs[@]}" 2>/dev/null; then
    say "stopping processes still holding the TPU" \
        "(pids$(as_root fuser "${devs[@]}" 2>/dev/null)): SIGTERM, SIGKILL after" \
        "${TML_POD_CLEAR_WAIT_S}s"
    as_root fuser -s -k -TERM "${devs[@]}" 2>/dev/null || true
    while as_root fuser -s "${devs[@]}" 2>/dev/null; do
      if [ "$waited" -ge "$TML_POD_CLEAR_WAIT_S" ]; then
        say "still held after ${waited}s: SIGKILL"
        as_root fuser -s -k -KILL "${devs[@]}" 2>/dev/null || true
        sleep 1
        break
      fi
      sleep 1
      waited=$((waited + 1))
    done
  else
    say "no process holds the TPU"
  fi
  as_root rm -f "$TML_POD_LOCKFILE"
}

py_ok() { "$1" -c 'import sys; sys.exit(sys.version_info < (3, 12))' 2>/dev/null; }

find_python() {
  local c p
  for c in python3.12 python3.13 python3.14 python3; do
    p=$(command -v "$c" 2>/dev/null) || continue
    if py_ok "$p"; then echo "$p"; return 0; fi
  done
  return 1
}

python_from_uv() {  # primary route; progress on stderr, the interpreter's path on stdout
  local uv
  uv=$(command -v uv 2>/dev/null || true)
  if [ -z "$uv" ]; then
    say "installing uv (python3 -m pip install --user uv)" >&2
    python3 -m pip install -q --user --upgrade uv >&2 || return 1
    uv=$HOME/.local/bin/uv
  fi
  say "installing Python 3.12 with $uv python install 3.12" >&2
  "$uv" python install 3.12 >&2 || return 1
  "$uv" python find 3.12
}

python_from_deadsnakes() {  # fallback on Ubuntu images
  grep -qi '^ID=ubuntu' /etc/os-release 2>/dev/null || return 1
  local apt=(env DEBIAN_FRONTEND=noninteractive apt-get -y -q -o DPkg::Lock::Timeout=600)
  say "installing Python 3.12 from the deadsnakes PPA" >&2
  as_root "${apt[@]}" update >&2 || return 1
  as_root "${apt[@]}" install software-properties-common >&2 || return 1
  as_root add-apt-repository -y ppa:deadsnakes/ppa >&2 || return 1
  as_root "${apt[@]}" install python3.12 python3.12-venv >&2 || return 1
  command -v python3.12
}

setup_venv() {
  local code=$1 venv=$1/.venv base
  if [ -x "$venv/bin/python" ] && py_ok "$venv/bin/python"; then
    say "reusing $venv ($("$venv/bin/python" --version))"
  else
    if [ -e "$venv" ]; then
      say "replacing $venv: its Python is older than 3.12"
      rm -rf "$venv"
    fi
    base=$(find_python) || base=$(python_from_uv) || base=$(python_from_deadsnakes) ||
      worker_die "no Python >= 3.12 here, and neither uv (python3 -m pip install --user uv;" \
                 "uv python install 3.12) nor the deadsnakes PPA could install one: install" \
                 "python3.12 on the image, or pass REMOTE_PYTHON=/path/to/python with tml_jax" \
                 "and jax[tpu] installed"
    say "creating $venv with $base ($("$base" --version))"
    "$base" -m venv "$venv" || worker_die "$base -m venv $venv failed (on Ubuntu's own" \
                                          "python3.12: apt-get install python3.12-venv)"
  fi
  "$venv/bin/python" -m pip install -q --upgrade pip || worker_die "pip upgrade failed"
  (cd "$code" && "$venv/bin/python" -m pip install -q -c constraints.txt -e ".[tf]" "jax[tpu]") ||
    worker_die "pip install of tml_jax and jax[tpu] failed (its output is above)"
}

prepare_worker() {  # clear the TPU, unpack the code, install
  local code=$HOME/tml_jax
  clear_tpu
  mkdir -p "$code"
  find "$code" -mindepth 1 -maxdepth 1 ! -name .venv -exec rm -rf {} +
  tar -C "$code" -xzf "$HOME/tml_jax_src.tgz" ||
    worker_die "could not unpack ~/tml_jax_src.tgz into $code"
  if [ -n "$TML_POD_PYTHON" ]; then
    say "REMOTE_PYTHON=$TML_POD_PYTHON: no install"
  else
    setup_venv "$code"
  fi
}

run_trainer() {  # PYTHON ARGS...: the trainer in ~/tml_jax; its status is the last log line
  local py=$1 status=0
  shift
  cd "$HOME/tml_jax"
  export TML_JAX_DISTRIBUTED=auto PYTHONUNBUFFERED=1
  "$py" -m tml_jax.train "$@" || status=$?
  say "trainer exited with status $status ($(date -u +%Y-%m-%dT%H:%M:%SZ))"
  return "$status"
}

on_worker() {  # ARGS...: the trainer's arguments
  local logs=$HOME/tml_jax_logs py log
  TML_POD_WORKER_ID=$(worker_id)
  export TML_POD_WORKER_ID
  mkdir -p "$logs/$TML_POD_RUN_NAME"
  ln -sfn "$TML_POD_RUN_NAME" "$logs/latest"
  log=$logs/$TML_POD_RUN_NAME/worker_$TML_POD_WORKER_ID.log
  py=${TML_POD_PYTHON:-$HOME/tml_jax/.venv/bin/python}
  echo "=== $(date -u +%Y-%m-%dT%H:%M:%SZ) worker $TML_POD_WORKER_ID: tml_jax.train" \
       "$(printf '%q ' "$@")" >>"$log"
  prepare_worker 2>&1 | tee -a "$log"
  if [ "$TML_POD_DETACH" = 1 ]; then
    # A new session (no SIGHUP when ssh leaves) with no descriptor on ssh's channel.
    setsid nohup bash "$HOME/tml_jax_pod.sh" --run-trainer "$py" "$@" >>"$log" 2>&1 </dev/null &
    echo "$!" >"${log%.log}.pid"
    say "trainer started in the background (pid $!, its own process group); log: $log"
  else
    run_trainer "$py" "$@" 2>&1 | tee -a "$log"
  fi
}

worker_logs() {
  local dir=$HOME/tml_jax_logs/$TML_POD_RUN_NAME files=() follow=()
  shopt -s nullglob
  files=("$dir"/worker_*.log)
  shopt -u nullglob
  [ ${#files[@]} -gt 0 ] || { echo "[tpu_pod $(hostname)] no logs in $dir" >&2; exit 1; }
  [ "$TML_POD_FOLLOW" = 1 ] && follow=(-F)
  exec tail -v -n "$TML_POD_LOG_LINES" ${follow[@]+"${follow[@]}"} "${files[@]}"
}

# ---------------------------------------------------------------- on this machine

config_arg() {  # the last --config value in ARGS, or nothing
  local cfg="" prev="" a
  for a in "$@"; do
    case $a in --config=*) cfg=${a#--config=} ;; esac
    [ "$prev" = --config ] && cfg=$a
    prev=$a
  done
  echo "$cfg"
}

run_name_for() {  # configs/interaction.py:tiny,smoke -> interaction-tiny-smoke
  local file=${1%%:*} spec="" name
  case $1 in *:*) spec=${1#*:} ;; esac
  name=$(basename "$file" .py)${spec:+-$spec}
  echo "${name//[^A-Za-z0-9._-]/-}"
}

need_slice() {
  : "${PROJECT:?set PROJECT (the GCP project)}" "${ZONE:?set ZONE (e.g. us-east5-a)}"
  : "${TPU_NAME:?set TPU_NAME (the slice, e.g. tml-v5p-256)}"
  command -v gcloud >/dev/null ||
    die "gcloud not found on PATH: install the Google Cloud SDK and run gcloud auth login"
}

tpu() {  # VERB ARGS...: gcloud compute tpus tpu-vm VERB ... --zone --project
  local verb=$1
  shift
  gcloud compute tpus tpu-vm "$verb" "$@" --zone="$ZONE" --project="$PROJECT"
}

remote() {  # WORKER MODE ENV...: run this script's MODE on the workers with ENV set
  local worker=$1 mode=$2
  shift 2
  tpu ssh "$TPU_NAME" --worker="$worker" \
    --command="cd && env $(printf '%q ' "$@")bash tml_jax_pod.sh $mode"
}

ship_list() {  # NUL-separated paths (relative to REPO) worth shipping
  local f
  if git -C "$REPO" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    git -C "$REPO" ls-files -z --cached --others --exclude-standard
  else
    (cd "$REPO" && find . \( -path ./.git -o -path ./.venv -o -path ./runs -o -path ./data \
       -o -name __pycache__ \) -prune -o \( -type f -o -type l \) -print0)
  fi | while IFS= read -r -d '' f; do
    f=${f#./}
    case $f in
      runs/* | .venv/* | .git/* | data/* | __pycache__/* | */__pycache__/* | *.pyc) continue ;;
    esac
    if [ -e "$REPO/$f" ] || [ -L "$REPO/$f" ]; then printf '%s\0' "$f"; fi
  done
}

launch() {
  [ $# -gt 0 ] || die "pass the trainer's arguments, e.g. --config=configs/interaction.py:small"
  need_slice
  local args=("$@") a cfg workdir_arg="" stage name forward=()
  for a in "$@"; do case $a in --workdir=*) workdir_arg=${a#--workdir=} ;; esac; done
  cfg=$(config_arg "$@")
  [ -n "$cfg" ] || [ -n "${RUN_NAME:-}" ] ||
    die "pass --config=configs/interaction.py:VARIANT (the trainer needs it; so does RUN_NAME)"
  RUN_NAME=${RUN_NAME:-$(run_name_for "$cfg")}
  if [ -n "$workdir_arg" ]; then
    [ -z "${WORKDIR:-}" ] || [ "$WORKDIR" = "$workdir_arg" ] ||
      die "WORKDIR=$WORKDIR and --workdir=$workdir_arg disagree: give one of them"
    WORKDIR=$workdir_arg
  else
    if [ -z "${WORKDIR:-}" ]; then
      [ -n "${BUCKET:-}" ] ||
        die "set BUCKET=gs://your-bucket (the workdir is \$BUCKET/tml_jax/\$TPU_NAME/\$RUN_NAME)" \
            "or WORKDIR=gs://..."
      WORKDIR=${BUCKET%/}/tml_jax/$TPU_NAME/$RUN_NAME
    fi
    args+=("--workdir=$WORKDIR")
  fi
  case $WORKDIR in
    gs://*) ;;
    *) warn "WORKDIR=$WORKDIR is not on GCS: every worker must see the same directory" ;;
  esac

  if ! tpu describe "$TPU_NAME" >/dev/null 2>&1; then
    local create_flags=()
    read -r -a create_flags <<<"${CREATE_FLAGS:-}"
    echo "tpu_pod.sh: creating $TPU_NAME ($ACCELERATOR, runtime $RUNTIME)"
    tpu create "$TPU_NAME" --accelerator-type="$ACCELERATOR" --version="$RUNTIME" \
      ${create_flags[@]+"${create_flags[@]}"}
  fi

  stage=$(mktemp -d)
  # shellcheck disable=SC2064  # expand now: the folder is local to this function
  trap "rm -rf '$stage'" EXIT
  ship_list >"$stage/files"
  tar -C "$REPO" --null -T "$stage/files" -czf "$stage/tml_jax_src.tgz"
  cp "${BASH_SOURCE[0]}" "$stage/tml_jax_pod.sh"
  echo "tpu_pod.sh: shipping $(tr -cd '\0' <"$stage/files" | wc -c | tr -d ' ') files" \
       "($(du -h "$stage/tml_jax_src.tgz" | cut -f1)) to every worker of $TPU_NAME"
  tpu scp "$stage/tml_jax_src.tgz" "$stage/tml_jax_pod.sh" "$TPU_NAME:~/" --worker=all

  for name in ${FORWARD_ENV:-}; do
    [ -z "${!name+set}" ] || forward+=("$name=${!name}")
  done
  echo "tpu_pod.sh: run $RUN_NAME, workdir $WORKDIR; logs on each worker in" \
       "\$HOME/tml_jax_logs/$RUN_NAME/worker_<id>.log"
  if ! remote all "--on-worker $(printf '%q ' "${args[@]}")" \
      "TML_POD_RUN_NAME=$RUN_NAME" "TML_POD_DETACH=$DETACH" \
      "TML_POD_PYTHON=${REMOTE_PYTHON:-}" "TML_POD_DEVICES=$TPU_DEVICES" \
      "TML_POD_LOCKFILE=$TPU_LOCKFILE" "TML_POD_CLEAR_WAIT_S=$CLEAR_WAIT_S" \
      ${forward[@]+"${forward[@]}"}; then
    die "a worker failed (its lines are above); all logs: RUN_NAME=$RUN_NAME" \
        "launch/tpu_pod.sh --logs"
  fi
  if [ "$DETACH" = 1 ]; then
    echo "tpu_pod.sh: started in the background; follow with: RUN_NAME=$RUN_NAME" \
         "launch/tpu_pod.sh --logs"
  fi
}

show_logs() {  # [the launch's arguments]: tail the per-worker logs of that run
  need_slice
  local run=${RUN_NAME:-} cfg
  cfg=$(config_arg "$@")
  [ -n "$run" ] || { [ -n "$cfg" ] && run=$(run_name_for "$cfg"); } || run=latest
  remote "${WORKER:-all}" --worker-logs "TML_POD_RUN_NAME=$run" \
    "TML_POD_FOLLOW=${FOLLOW:-1}" "TML_POD_LOG_LINES=${LOG_LINES:-50}"
}

ACCELERATOR=${ACCELERATOR:-v5p-8}
RUNTIME=${RUNTIME:-v2-alpha-tpuv5}
REPO=${REPO:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}
DETACH=${DETACH:-0}
TPU_DEVICES=${TPU_DEVICES:-/dev/accel* /dev/vfio/*}
TPU_LOCKFILE=${TPU_LOCKFILE:-/tmp/libtpu_lockfile}
CLEAR_WAIT_S=${CLEAR_WAIT_S:-60}

# One compound command, read whole before it runs: a later launch may overwrite this file on
# the worker while this copy still runs.
{
  case ${1:-} in
    --on-worker) shift; on_worker "$@" ;;
    --run-trainer) shift; run_trainer "$@" ;;
    --worker-logs) shift; worker_logs ;;
    --logs) shift; show_logs "$@" ;;
    -h | --help) sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//' ;;
    *) launch "$@" ;;
  esac
  exit
}
