#!/usr/bin/env bash
# Multi-node pre-training with the DeepSpeed launcher (run on node 0 only; it starts the others over ssh).
#   HOSTFILE     lines "hostname slots=N" (see hostfile.example)   (default tools/launch/hostfile)
#   MASTER_ADDR  address of the first host                          (default: first line of HOSTFILE)
#   MASTER_PORT  a free TCP port                                    (default 29500)
# Single node without a hostfile: NUM_GPUS=8 tools/launch/deepspeed.sh model=vit_large ...
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
: "${MASTER_PORT:=29500}"
if [ -n "${NUM_GPUS:-}" ]; then
  exec deepspeed --num_gpus "$NUM_GPUS" --master_port "$MASTER_PORT" --module adamae_scale.pretrain "$@"
fi
HOSTFILE="${HOSTFILE:-$here/hostfile}"
[ -f "$HOSTFILE" ] || { echo "deepspeed.sh: hostfile $HOSTFILE not found (copy hostfile.example)" >&2; exit 2; }
: "${MASTER_ADDR:=$(grep -v '^#' "$HOSTFILE" | awk 'NF {print $1; exit}')}"
exec deepspeed --hostfile "$HOSTFILE" --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" \
  --module adamae_scale.pretrain "$@"
