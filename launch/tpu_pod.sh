#!/usr/bin/env bash
# Create (if needed) a TPU VM pod slice, install tml_jax on every worker and run the trainer
# on all workers at once. jax.distributed discovers the slice's topology by itself on TPU.
#   PROJECT=my-gcp-project ZONE=us-east5-a TPU_NAME=tml-v5p-64 ACCELERATOR=v5p-64 \
#   BUCKET=gs://my-bucket launch/tpu_pod.sh --config=configs/interaction.py:small
# Needs: gcloud authenticated for PROJECT; a GCS bucket for the workdir (all workers write
# checkpoints there); the slice reaching PyPI to install the package.
set -euo pipefail
: "${PROJECT:?set PROJECT}" "${ZONE:?set ZONE}" "${TPU_NAME:?set TPU_NAME}" "${BUCKET:?set BUCKET}"
ACCELERATOR=${ACCELERATOR:-v5p-8}
RUNTIME=${RUNTIME:-v2-alpha-tpuv5}
REPO=${REPO:-$(git -C "$(dirname "$0")/.." rev-parse --show-toplevel)}
WORKDIR=${WORKDIR:-$BUCKET/tml_jax/$TPU_NAME/$(date +%Y%m%d-%H%M%S)}

if ! gcloud compute tpus tpu-vm describe "$TPU_NAME" --project "$PROJECT" --zone "$ZONE" >/dev/null 2>&1; then
  gcloud compute tpus tpu-vm create "$TPU_NAME" --project "$PROJECT" --zone "$ZONE" \
    --accelerator-type "$ACCELERATOR" --version "$RUNTIME"
fi
tar -C "$REPO" --exclude=.venv --exclude=.git -czf /tmp/tml_jax_src.tgz .
gcloud compute tpus tpu-vm scp /tmp/tml_jax_src.tgz "$TPU_NAME":/tmp/ --project "$PROJECT" \
  --zone "$ZONE" --worker=all
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --project "$PROJECT" --zone "$ZONE" --worker=all --command "
  set -e; mkdir -p ~/tml_jax && tar -C ~/tml_jax -xzf /tmp/tml_jax_src.tgz && cd ~/tml_jax &&
  python3 -m venv .venv && .venv/bin/pip install -q -U pip &&
  .venv/bin/pip install -q -e . 'jax[tpu]' &&
  TML_JAX_DISTRIBUTED=auto .venv/bin/python -m tml_jax.train $* --workdir=$WORKDIR"
