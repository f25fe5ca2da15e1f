#!/usr/bin/env bash
# A CI job: the attributes pipeline with every stage run with --json (one JSON line on stdout), every stage's exit
# code checked, and the job failing when a figure read from the JSON is below its threshold:
#   the head's held-out accuracy (train-head: metrics.val_accuracy) >= MIN_ACC       (default 0.8)
#   the number of guided samples written (sample: images)           >= SAMPLES
#   the oracle's share of demo samples with the attribute (demo: guided) >= MIN_GUIDED (default 0.5; DEMO=0 skips it)
# Exit codes: 0 passed; 1 a figure below its threshold (one line names the figure and the threshold);
# a failed stage's own exit code (1 runtime failure, 2 bad input: its error is printed); 2 a missing dependency.
#
# Writes into $WORK (default ./runs/example-ci-pipeline), which must be new or empty:
#   json/<stage>.json   each stage's JSON line (keep them as CI artifacts)
#   data/, feats.safetensors, heads/has_circle.safetensors, guided/, demo/   the stages' outputs
# Time on a laptop CPU (2 cores, measured): full (400 images, then the demo) about 5 min; QUICK=1 (16 images,
# 10 head steps, 2 samples of 2 steps, no demo, thresholds 0: it checks the plumbing, not the figures) about 8 s.
#
# Usage: bash examples/ci-pipeline.sh      QUICK=1 bash examples/ci-pipeline.sh      MIN_ACC=0.9 bash examples/ci-pipeline.sh
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/_common.sh"
need ddguide python3

if [ "${QUICK:-0}" = 1 ]; then
    IMAGES=16; HEAD_STEPS=10; SAMPLES=2; STEPS=2
    MIN_ACC=${MIN_ACC:-0}; MIN_GUIDED=${MIN_GUIDED:-0}; DEMO=${DEMO:-0}
else
    IMAGES=400; HEAD_STEPS=500; SAMPLES=16; STEPS=50
    MIN_ACC=${MIN_ACC:-0.8}; MIN_GUIDED=${MIN_GUIDED:-0.5}; DEMO=${DEMO:-1}
fi
start_work ci-pipeline
mkdir -p json

# stage NAME COMMAND...: run COMMAND --json, its JSON line into json/NAME.json; stop the job if it fails
stage() {
    local name=$1 rc=0
    shift
    "$@" --json > "json/$name.json" || rc=$?
    if [ "$rc" -ne 0 ]; then
        echo "ci-pipeline.sh: stage $name failed (exit $rc); its JSON: $(cat "json/$name.json")" >&2
        exit "$rc"
    fi
}

# figure NAME KEY...: a value from json/NAME.json, e.g. `figure head metrics val_accuracy`
figure() {
    python3 -c 'import json, sys
value = json.load(open(f"json/{sys.argv[1]}.json"))
for key in sys.argv[2:]:
    value = value[key]
print(value)' "$@"
}

# at_least LABEL VALUE THRESHOLD: fail the job (exit 1, one line) when VALUE < THRESHOLD
at_least() {
    if python3 -c 'import sys; sys.exit(float(sys.argv[1]) < float(sys.argv[2]))' "$2" "$3"; then
        echo "ci-pipeline.sh: $1 = $(printf %.4g "$2") (threshold $3): ok" >&2
    else
        echo "ci-pipeline.sh: FAILED: $1 = $(printf %.4g "$2") is below the threshold $3" >&2
        exit 1
    fi
}

stage data ddguide data shapes data -n "$IMAGES" --split val
# taps given explicitly (the paper's attribute taps, as `ddguide demo` uses), so a change of extract's defaults
# cannot move the gated figure
stage extract ddguide extract data/images --labels data/attributes.csv --label has_circle \
    --blocks mid out.5 --timesteps 300 --out feats.safetensors
stage head ddguide train-head feats.safetensors --kind classifier --steps "$HEAD_STEPS" \
    --out heads/has_circle.safetensors
at_least "train-head val_accuracy (MIN_ACC)" "$(figure head metrics val_accuracy)" "$MIN_ACC"

stage sample ddguide sample --guide heads/has_circle.safetensors --lambda 1 -n "$SAMPLES" --steps "$STEPS" --out guided/
at_least "sample images" "$(figure sample images)" "$SAMPLES"

if [ "$DEMO" = 1 ]; then
    stage demo ddguide demo --out demo
    echo "ci-pipeline.sh: demo: unguided $(figure demo unguided), guided $(figure demo guided), head accuracy $(figure demo head_accuracy)" >&2
    at_least "demo guided share (MIN_GUIDED)" "$(figure demo guided)" "$MIN_GUIDED"
fi

echo "ci-pipeline.sh: passed; each stage's JSON in $PWD/json/" >&2
