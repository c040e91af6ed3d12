#!/usr/bin/env bash
# The demo cascade shipped in the package (runtime/demo/): trained on the built-in shapes data
# on a 2-core CPU (about 65 minutes), exported to an FP32 ONNX bundle whose default sampler is
# ancestral DDPM at 20 steps (chosen by measurement, docs/benchmarks.md), with this recipe copied beside it. From the repository root:
#   bash recipes/demo/train.sh [RUN_DIR]
# Low-res augmentation is drawn below 0.3 T (MinImagen's spans the whole schedule, which
# teaches the small super-resolution Unet to ignore its low-res input). Even so, started
# from pure noise that Unet redraws colours, so the bundle's default sr_strength 0.25 starts
# it from the noised upsampled base image for the last quarter of its steps.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
run=${1:-runs/demo}
imagen-train --dataset shapes --out "$run" \
  --unet "$here/unet_base.json" --unet "$here/unet_super.json" --image-sizes 32,64 \
  --timesteps 250 --batch-size 16 --lr 3e-4 --ema-decay 0.995 --steps 4000 --lowres-max-noise 0.3 \
  --cond-drop-prob 0.1 --guidance 3.0 --max-length 64 --text-encoder tiny \
  --val-every 250 --checkpoint-every 250 --sample-every 0 --seed 0 --resume
imagen-export --ckpt "$run" --out runtime/demo --weights ema --max-batch 8 \
  --sampler ddpm --steps 20 --sr-strength 0.25 --force
mkdir -p runtime/demo/recipe
cp "$here/train.sh" "$here/unet_base.json" "$here/unet_super.json" runtime/demo/recipe/
imagen-eval --prompts train --n 16 --seed 0 --grid docs/demo_grid.png --force --quiet
