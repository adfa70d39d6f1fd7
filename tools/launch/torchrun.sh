#!/usr/bin/env bash
# Multi-node pre-training with torchrun. Run this same script once on every node.
#   NNODES        number of nodes                      (default 1)
#   NODE_RANK     this node's index, 0..NNODES-1       (default 0)
#   NPROC_PER_NODE processes (GPUs) per node           (default: GPUs visible, or 1)
#   MASTER_ADDR   address of node 0, reachable by all  (default 127.0.0.1)
#   MASTER_PORT   a free TCP port on node 0            (default 29500)
# Everything after the script name is passed to adamae-pretrain as Hydra overrides, e.g.
#   NNODES=4 NODE_RANK=$i MASTER_ADDR=node0 tools/launch/torchrun.sh model=vit_huge ds=zero3 run_dir=/shared/runs/h
set -euo pipefail
: "${NNODES:=1}" "${NODE_RANK:=0}" "${MASTER_ADDR:=127.0.0.1}" "${MASTER_PORT:=29500}"
if [ -z "${NPROC_PER_NODE:-}" ]; then
  NPROC_PER_NODE=$(python -c "import torch; print(max(torch.cuda.device_count(), 1))")
fi
# One OpenMP pool per rank: split the node's cores between the ranks on it.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(( $(nproc) / NPROC_PER_NODE > 0 ? $(nproc) / NPROC_PER_NODE : 1 ))}"
exec "${PYTHON:-python}" -m torch.distributed.run \
  --nnodes "$NNODES" --node_rank "$NODE_RANK" --nproc_per_node "$NPROC_PER_NODE" \
  --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" \
  -m adamae_scale.pretrain "$@"
