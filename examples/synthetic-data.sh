#!/usr/bin/env bash
# Synthetic training data (paper §5.3): fine-tune the unconditional model into a class-conditional one ->
# draw samples with classifier-free guidance, keeping those a rejection head on the unconditional model's
# features accepts -> Classification Accuracy Score: a classifier trained on the samples, tested on real images.
# (Tables 3-4 at their scale, 400 synthetic images per set and three seeds: benchmarks/cas_tables.py.)
#
# Writes into $WORK (default ./runs/example-synthetic-data), which must be new or empty:
#   data/                    real labelled images, 16 classes (data/images/<class>/*.png)
#   test/                    real held-out test images (the test split)
#   cond.safetensors         the class-conditional model (cond.ckpt.safetensors: its checkpoint; cond.loss.png)
#   rej.safetensors          the shipped model's mid-block features at T_f = 300 and 800 of the real images
#   heads/rejection.safetensors  the rejection head
#   synth/                   accepted samples, SAMPLES per class, with index.csv (class, reject_prob) and grid.png
#   cas.safetensors          the CAS report (top-1 accuracy on test/ is printed)
# Time on a laptop CPU (2 cores, measured): full 5 to 8 min (fine-tuning 400 steps 3 to 5 min, 64 accepted of
# 512 draws 1 min 15 s); it gave CAS top-1 0.27 on 400 real test images (chance 0.06; the same classifier on 400
# real training images: 0.82). QUICK=1 (16 images, 2 fine-tuning steps, 1 sample per class, threshold 0, 1 epoch)
# about 16 s.
#
# Usage: bash examples/synthetic-data.sh            WORK=/tmp/synth QUICK=1 bash examples/synthetic-data.sh
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/_common.sh"
need ddguide

if [ "${QUICK:-0}" = 1 ]; then
    # quick mode only checks that the stages chain: the head is untrained, so every sample is accepted
    IMAGES=16; TEST_IMAGES=16; FINETUNE_STEPS=2; BATCH=8; HEAD_STEPS=5; SAMPLES=1; STEPS=2; THRESHOLD=0; EPOCHS=1
else
    IMAGES=400; TEST_IMAGES=400; FINETUNE_STEPS=400; BATCH=64; HEAD_STEPS=300; SAMPLES=4; STEPS=25; THRESHOLD=0.2
    EPOCHS=20
fi
start_work synthetic-data

# 1. real labelled images (class sub-folders), and real test images from another split
ddguide data shapes data -n "$IMAGES" --split train
ddguide data shapes test -n "$TEST_IMAGES" --split test

# 2. class-conditional fine-tuning with label dropout (rerun the same command to resume after a stop)
ddguide finetune data/images --steps "$FINETUNE_STEPS" --batch "$BATCH" --out cond.safetensors

# 3. a rejection head on the *unconditional* model's mid-block features at T_f = 300 and 800
ddguide extract data/images --blocks mid --timesteps 300 800 --out rej.safetensors
ddguide train-head rej.safetensors --kind rejection --steps "$HEAD_STEPS" --out heads/rejection.safetensors

# 4. classifier-free guidance (w = 0.01), drawing until SAMPLES images of every class reach p(class) >= THRESHOLD
#    (or: sample without --reject, then `ddguide filter synth/ --head heads/rejection.safetensors --out kept/`)
ddguide sample --model cond.safetensors --class all --cfg 0.01 --sampler ddpm --steps "$STEPS" \
    --reject heads/rejection.safetensors --threshold "$THRESHOLD" -n "$SAMPLES" --out synth/

# 5. CAS: a ResNet-18 trained on the synthetic images only, tested on the real test images
#    (`--train data/images` instead gives the real-data baseline)
ddguide cas --train synth/ --test test/images --arch resnet18 --epochs "$EPOCHS" --milestones 15 18 --batch 16 \
    --out cas.safetensors

echo "synthetic-data.sh: done; samples in $PWD/synth/, CAS report $PWD/cas.safetensors" >&2
