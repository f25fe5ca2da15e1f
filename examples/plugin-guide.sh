#!/usr/bin/env bash
# Plug-in guides: guide sampling with Python code of your own instead of a trained head. plugin_guide.py holds a
# hand-written pixel classifier, redness(x0_hat) -> log p(red) per image; `--guide FILE.py:FUNCTION` makes it one
# expert of Eq. 13, differentiated through x0_hat like a head. --normalize-grad rescales the gradient to unit RMS
# per image, so --lambda is a step size whatever the function's scale.
#
# Writes into $WORK (default ./runs/example-plugin-guide), which must be new or empty:
#   plugin_guide.py   the guide (a copy of examples/plugin_guide.py: edit it to try your own)
#   plain/            unguided samples of the shipped model (index.csv, grid.png)
#   red/              the same seeds guided towards red images (index.csv with guide_logp, grid.png)
# and prints the mean p(red) of both folders.
# Time on a laptop CPU (2 cores, measured, with other jobs on them): full (16 images of 50 steps, unguided then
# guided) about 7 min, most of it the guided pass's backward through the U-Net; QUICK=1 (2 images of 3 steps)
# about 9 s. At --lambda 0.05 the shapes turn red and the backgrounds stay grey (mean p(red) 0.96 on 4 images);
# from 0.15 on, the background turns red too.
#
# Usage: bash examples/plugin-guide.sh            WORK=/tmp/plugin QUICK=1 bash examples/plugin-guide.sh
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
. "$HERE/_common.sh"
need ddguide python3

if [ "${QUICK:-0}" = 1 ]; then
    SAMPLES=2; STEPS=3
else
    SAMPLES=16; STEPS=50
fi
start_work plugin-guide
cat "$HERE/plugin_guide.py" > plugin_guide.py

# 1. unguided samples, for comparison
ddguide sample -n "$SAMPLES" --steps "$STEPS" --out plain/

# 2. the same seeds, guided by the Python function (a file path, or an importable module:function)
ddguide sample --guide plugin_guide.py:redness --lambda 0.05 --normalize-grad -n "$SAMPLES" --steps "$STEPS" --out red/

# 3. how red the two sets are, by the same function
python3 plugin_guide.py plain red

echo "plugin-guide.sh: done; compare $PWD/plain/grid.png with $PWD/red/grid.png" >&2
