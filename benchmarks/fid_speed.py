"""FID's distance step at 2048-d: the symmetric form (pivoted Cholesky + eigvalsh) against pytorch-fid's ``scipy.linalg.sqrtm``.

    python benchmarks/fid_speed.py [--dim 2048] [--samples 2000 10000] [--rounds 1]

Two synthetic feature sets (non-negative, correlated, like Inception pool3) per sample count: 2000 samples in
2048-d give a singular covariance (rank 1999), 10000 a full-rank one. Each round times both methods back to
back on the same statistics (so a drift in this shared machine's speed cancels in the ratio), and prints the
two distances and how many significant digits they share. Uses NumPy's default threads (2 on the build machine).
"""

from __future__ import annotations

import argparse
import time
import warnings

import numpy as np
from scipy import linalg

from ddguide.metrics.fid import frechet_distance


def sqrtm_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    """pytorch-fid's calculate_frechet_distance (sqrtm without the removed ``disp``): ddguide's former code."""
    diff = mu1 - mu2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        covmean = linalg.sqrtm(sigma1 @ sigma2)
        if not np.isfinite(covmean).all():
            offset = np.eye(sigma1.shape[0]) * eps
            covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError("imaginary component")
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def statistics(seed: int, n: int, d: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = np.abs(rng.normal(size=(n, d)) @ (rng.normal(size=(d, d)) / np.sqrt(d)) + rng.normal(size=d)) ** 1.5
    return x.mean(0), np.cov(x, rowvar=False)


def timed(fn, *args) -> tuple[float, float]:
    start = time.perf_counter()
    value = fn(*args)
    return value, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--samples", type=int, nargs="+", default=[2000, 10000])
    parser.add_argument("--rounds", type=int, default=1)
    args = parser.parse_args()
    print(f"{'samples':>8}{'rank':>6}{'sqrtm s':>10}{'sym. s':>9}{'speed-up':>10}"
          f"{'sqrtm distance':>24}{'symmetric distance':>24}{'digits':>8}")
    for n in args.samples:
        mu1, s1 = statistics(1, n, args.dim)
        mu2, s2 = statistics(2, n, args.dim)
        rank = min(n - 1, args.dim)
        for _ in range(args.rounds):
            old, t_old = timed(sqrtm_distance, mu1, s1, mu2, s2)
            new, t_new = timed(frechet_distance, mu1, s1, mu2, s2)
            digits = -np.log10(max(abs(new - old) / abs(old), 1e-17))
            print(f"{n:>8}{rank:>6}{t_old:>10.1f}{t_new:>9.1f}{t_old / t_new:>9.1f}x"
                  f"{old:>24.15f}{new:>24.15f}{digits:>8.1f}", flush=True)


if __name__ == "__main__":
    main()
