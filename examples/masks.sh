#!/usr/bin/env bash
# Masks (paper §5.2): 20 images with segmentation masks -> decoder features -> a per-pixel segmentation head ->
# sampling that follows a mask the head has not seen.
#
# Writes into $WORK (default ./runs/example-masks), which must be new or empty:
#   data/                  20 images with their masks (data/masks/<stem>.png, paired by file stem)
#   target/                one held-out image whose mask the samples should follow (target/masks/test_000000.png)
#   seg.safetensors        the shipped model's features at T_f = 500 (blocks out.5, out.8) with the masks
#   seg-head.safetensors   the segmentation head (its held-out mIoU is printed)
#   masked/                4 samples guided towards the target mask, index.csv and grid.png
# Time on a laptop CPU (2 cores, measured): full about 25 s; QUICK=1 (8 images, 5 head steps, 2 samples of 2 steps)
# about 8 s.
#
# Usage: bash examples/masks.sh            WORK=/tmp/masks QUICK=1 bash examples/masks.sh
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/_common.sh"
need ddguide

if [ "${QUICK:-0}" = 1 ]; then
    IMAGES=8; HEAD_STEPS=5; SAMPLES=2; STEPS=2
else
    IMAGES=20; HEAD_STEPS=400; SAMPLES=4; STEPS=50
fi
start_work masks

# 1. labelled images with masks, and one more image (another split) whose mask is the target
ddguide data shapes data -n "$IMAGES" --split val
ddguide data shapes target -n 1 --split test

# 2. decoder features of the labelled images, with their masks
ddguide extract data/images --masks data/masks --blocks out.5 out.8 --timesteps 500 --out seg.safetensors

# 3. a per-pixel segmentation head on those features
ddguide train-head seg.safetensors --kind segmentation --steps "$HEAD_STEPS" --out seg-head.safetensors

# 4. sampling guided towards the target mask (lambda scales the log-likelihood summed over pixels)
ddguide sample --guide seg-head.safetensors --mask target/masks/test_000000.png --lambda 0.5 \
    -n "$SAMPLES" --steps "$STEPS" --out masked/

echo "masks.sh: done; samples in $PWD/masked/ follow target/masks/test_000000.png" >&2
