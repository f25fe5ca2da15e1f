#!/usr/bin/env bash
# A published checkpoint: an openai guided-/improved-diffusion .pt file -> `ddguide convert` -> features ->
# a classifier head -> guided sampling, all with --model converted.safetensors.
#
# No checkpoint can be downloaded here, so step 1 makes one: ddguide's U-Net has guided-diffusion's state_dict
# keys, so the shipped model's weights saved with torch.save form a file in the published layout (a plain dict
# name -> tensor). With a real checkpoint, replace step 1 by the downloaded file, e.g.
#   https://openaipublic.blob.core.windows.net/diffusion/jul-2021/256x256_diffusion_uncond.pt
# whose preset (architecture and diffusion settings) `ddguide convert` infers from the file name, so --arch and
# --diffusion can be left out; give data of the model's size (or extract --resize resize).
#
# Writes into $WORK (default ./runs/example-published-checkpoint), which must be new or empty:
#   checkpoint.pt                the checkpoint in guided-diffusion's layout
#   converted.safetensors        the ddguide model artifact (`ddguide info converted.safetensors` says where from)
#   data/, feats.safetensors     labelled images and the converted model's features
#   heads/has_circle.safetensors the classifier head
#   guided/                      guided samples, index.csv and grid.png
# Time on a laptop CPU (2 cores, measured): full (200 images) about 2 min; QUICK=1 (16 images, 10 head steps,
# 2 samples of 2 steps) about 13 s.
#
# Usage: bash examples/published-checkpoint.sh            WORK=/tmp/ckpt QUICK=1 bash examples/published-checkpoint.sh
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/_common.sh"
need ddguide python3
if ! python3 -c "import ddguide, torch" 2>/dev/null; then
    echo "$(basename "$0"): python3 cannot import ddguide and torch; activate ddguide's environment (. .venv/bin/activate)" >&2
    exit 2
fi

if [ "${QUICK:-0}" = 1 ]; then
    IMAGES=16; HEAD_STEPS=10; SAMPLES=2; STEPS=2
else
    IMAGES=200; HEAD_STEPS=500; SAMPLES=16; STEPS=50
fi
start_work published-checkpoint

# 1. a checkpoint as guided-diffusion publishes it: torch.save(model.state_dict(), "checkpoint.pt")
python3 - <<'PY'
import torch
from ddguide.core.model import load_model

torch.save(load_model().net.state_dict(), "checkpoint.pt")  # the shipped model's weights, keys as in guided-diffusion
PY

# 2. convert; a checkpoint that matches no preset needs its architecture flags and diffusion settings
#    (guided-diffusion's flag names; norm_groups is 32 in every published model, 8 in this small one)
ddguide convert checkpoint.pt \
    --arch '{"image_size": 32, "model_channels": 32, "channel_mult": [1, 2, 2, 2], "num_res_blocks": 2,
             "attention_resolutions": [8], "num_heads": 4, "norm_groups": 8}' \
    --diffusion '{"steps": 1000, "schedule": "cosine"}' \
    --out converted.safetensors

# 3. features of labelled images through the converted model, and a classifier head on them
ddguide data shapes data -n "$IMAGES" --split val
ddguide extract data/images --model converted.safetensors --labels data/attributes.csv --label has_circle \
    --timesteps 300 800 --out feats.safetensors
ddguide train-head feats.safetensors --kind classifier --steps "$HEAD_STEPS" --out heads/has_circle.safetensors

# 4. guided sampling from the converted model (the head refuses to guide any other model)
ddguide sample --model converted.safetensors --guide heads/has_circle.safetensors --lambda 1 \
    -n "$SAMPLES" --steps "$STEPS" --out guided/

echo "published-checkpoint.sh: done; samples in $PWD/guided/" >&2
