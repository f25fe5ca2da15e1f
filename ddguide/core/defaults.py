"""Defaults chosen by measurement, shared by the library and the command line (no imports: the CLI starts fast).

Each value names the benchmark that chose it; README gives the figures.
"""

# Feature taps of `extract` (benchmarks/taps.py on the shipped model; README, "Choosing taps"). The blocks depend
# on the model's layout, so their default is a rule: `mid` and the two finest upsampling blocks
# (UNetModel.default_taps: `mid out.5 out.8` on the shipped model).
DEFAULT_BLOCKS_RULE = "mid and the two finest upsampling blocks (mid out.5 out.8 on the shipped model)"
DEFAULT_TIMESTEPS = (300,)

# `ddguide demo`'s guidance (benchmarks/lambda_curve.py on the demo's head; README, "What lambda does").
DEMO_LAMBDA = 3.0
DEMO_GRAD = "x0"

# `sample`'s Eq. 13 guides while t >= GUIDE_FLOOR * T unless --guide-window says otherwise (benchmarks/guidance.py
# and mask_guidance.py, benchmarks/real_digits.py, 3 seeds x 64 samples each; README, "Selecting instead of
# pushing"): guiding only while t >= 200 of 1000 kept the share of guiding at every step on has_circle
# (0.79 / 0.79) and multiple_objects (0.67 / 0.67), the masks' mIoU (0.49 / 0.49) and the real digits' share of 3s
# (0.78 / 0.78), with 20 instead of 25 backward passes at DDIM 25. `--guide-window 999 0` guides at every step, as
# the paper does. (The library's head_guidance(window=None) still guides at every step.)
GUIDE_FLOOR = 0.2
