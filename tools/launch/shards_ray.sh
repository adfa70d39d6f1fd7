#!/usr/bin/env bash
# adamae-shards on a Ray cluster: one Ray task per shard, on every node that joined the cluster. Run it on the
# head node; SRC and OUT_DIR must be reachable from every node (a shared file system, or s3:// / gs://).
#
#   head:    ray start --head --port=6379 --num-cpus=$(nproc)
#   others:  ray start --address=HEAD_IP:6379 --num-cpus=$(nproc)
#   then:    tools/launch/shards_ray.sh k400/train.csv s3://bucket/k400-shards --root s3://bucket/k400/videos
#
# A worker that dies (a node lost, a process killed) has its task run again; a shard that could not be made
# is reported, and running the same command again makes only what is missing (--resume).
set -euo pipefail
export OMP_NUM_THREADS=1
exec "${PYTHON:-python}" -m adamae_scale.data.shards_cli "$@" --distributor ray --ray-address "${RAY_ADDRESS:-auto}" --resume
