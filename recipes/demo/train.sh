#!/usr/bin/env bash
# The demo cascade shipped in the package: trained on the built-in shapes data on a 2-core
# CPU, exported to an FP32 ONNX bundle and copied into runtime/demo/.
#   bash recipes/demo/train.sh [RUN_DIR] [STEPS]
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
run=${1:-runs/demo}
steps=${2:-3000}
imagen-train --dataset shapes --out "$run" \
  --unet "$here/unet_base.json" --unet "$here/unet_super.json" --image-sizes 32,64 \
  --timesteps 250 --batch-size 16 --steps "$steps" --lr 3e-4 --ema-decay 0.995 \
  --cond-drop-prob 0.1 --guidance 3.0 --max-length 64 --text-encoder tiny \
  --val-every 250 --checkpoint-every 250 --sample-every 0 --seed 0 --force
imagen-export --ckpt "$run" --out "$run/bundle" --weights ema --max-batch 8 --force
