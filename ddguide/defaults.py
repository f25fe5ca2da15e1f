"""Defaults chosen by measurement, shared by the library and the command line (no imports: the CLI starts fast).

Each value names the benchmark that chose it; README gives the figures.
"""

# Feature taps of `extract` (benchmarks/taps.py on the shipped model; README, "Choosing taps").
DEFAULT_BLOCKS = ("mid", "out.2")
DEFAULT_TIMESTEPS = (300, 800)

# `ddguide demo`'s guidance (benchmarks/lambda_curve.py on the demo's head; README, "What lambda does").
DEMO_LAMBDA = 10.0
DEMO_GRAD = "x0"
