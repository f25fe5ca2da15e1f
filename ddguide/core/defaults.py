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
