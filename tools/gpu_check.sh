#!/usr/bin/env bash
# The CUDA check in one go (about 8 minutes on one H200), every figure as JSON lines in $GPU_CHECK_DIR:
# 1. figures.jsonl: `adamae-bench step` alone on the device, micro-batch 32, bf16, 16x224² clips, one rank: the
#    default, decoder masking, each cheaper sampler, +preset=fast (alone, with the pooled sampler and without its
#    key/value pooling), with and without train.compile, ViT-B and ViT-L;
#    compare_random=true times random masking in the same run (like for like: with the row's decoder masking).
#    One object per line: {"row": NAME, "result": {...}} or {"row": NAME, "error": "..."}.
# 2. parity.jsonl: `adamae-bench parity` (make demo per option, 3 seeds each), one line per option, while
#    test_gpu.log gets `make test-gpu`'s tests (the script's exit status is theirs).
#
#   tools/gpu_check.sh                       # with .venv/bin/python (make setup) or $PYTHON
#   GPU_CHECK_SMOKE=1 tools/gpu_check.sh     # tiny models, clips and runs: checks the script itself on a CPU
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
DIR=${GPU_CHECK_DIR:-runs/gpu_check}
mkdir -p "$DIR"
: > "$DIR/figures.jsonl"
: > "$DIR/parity.jsonl"
MICRO=32
TIMING=(steps=8 warmup=3 baseline=false)
BASE=(model=vit_base)
LARGE=(model=vit_large)
PARITY=(seeds=3 parallel=3 data.render_threads=1)
if [ -n "${GPU_CHECK_SMOKE:-}" ]; then
  MICRO=2
  TIMING=(steps=1 warmup=1 baseline=false)
  SMALL=(model.depth=2 model.decoder_depth=1 model.num_frames=4 "model.img_size=[32,32]" model.patch_size=8)
  BASE=(model=vit_tiny "${SMALL[@]}")
  LARGE=(model=vit_small "${SMALL[@]}")
  PARITY=(seeds=1 parallel=1 train.steps=3 eval.focus_batches=1)
fi

row() {  # row NAME OVERRIDES...: one adamae-bench step, its JSON tagged with NAME
  local name=$1 out err
  shift
  err=$(mktemp)
  out=$("$PYTHON" -m adamae_scale.bench step "${TIMING[@]}" precision=bf16 train.micro_batch_size=$MICRO "$@" 2>"$err")
  if [ -n "$out" ]; then
    echo "{\"row\": \"$name\", \"result\": $out}" | tee -a "$DIR/figures.jsonl"
  else
    "$PYTHON" -c 'import json, sys; print(json.dumps({"row": sys.argv[1], "error": open(sys.argv[2]).read()[-1500:]}))' \
      "$name" "$err" | tee -a "$DIR/figures.jsonl"
  fi
  rm -f "$err"
}

row vit_base/default "${BASE[@]}" compare_random=true
row vit_base/decoder_ratio_0.5 "${BASE[@]}" masking.decoder_ratio=0.5 compare_random=true
row vit_base/sampler_width_0.5 "${BASE[@]}" model.sampler_width_ratio=0.5
row vit_base/sampler_pool_2 "${BASE[@]}" model.sampler_pool=2
row vit_base/sampler_bf16 "${BASE[@]}" model.sampler_precision=bf16
row vit_base/preset_fast "${BASE[@]}" +preset=fast compare_random=true
row vit_base/preset_fast+sampler_pool_2 "${BASE[@]}" +preset=fast model.sampler_pool=2 model.sampler_kv_pool=1 compare_random=true breakdown=false
row vit_base/preset_fast-sampler_kv_pool "${BASE[@]}" +preset=fast model.sampler_kv_pool=1 compare_random=true breakdown=false
row vit_base/default/compile "${BASE[@]}" train.compile=true compare_random=true breakdown=false
row vit_base/preset_fast/compile "${BASE[@]}" +preset=fast train.compile=true compare_random=true breakdown=false
row vit_large/default "${LARGE[@]}" compare_random=true breakdown=false
row vit_large/preset_fast "${LARGE[@]}" +preset=fast compare_random=true breakdown=false

# Parity (figures independent of timing) and the CUDA tests share the device now that nothing is timed.
for variant in default decoder_cell sampler_half sampler_pool sampler_bf16 fast fast_pool; do
  (OMP_NUM_THREADS=1 "$PYTHON" -m adamae_scale.bench parity variants=$variant "${PARITY[@]}" >> "$DIR/parity.jsonl" 2>> "$DIR/parity.err") &
done
"$PYTHON" -m pytest -q -m gpu tests/test_gpu.py -p no:cacheprovider > "$DIR/test_gpu.log" 2>&1
status=$?
wait
tail -5 "$DIR/test_gpu.log"
exit $status
