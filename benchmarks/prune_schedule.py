"""How `--search prune`'s default schedule was chosen: record, then replay.

1. Record: per attribute, n unguided DDIM samples of the shipped model (seed 50000: none of guidance.py's seeds)
   with the head of `benchmarks/guidance.py` (50 + 50 labels, default taps) scoring every step's x0_hat, as the
   pruned search's verifier does (``Sampling.reward``), and the oracle's verdict on the final image. Printed: the
   AUC of each step's score against the verdict (how early the attribute is decided).
2. Replay: with DDIM eta 0 a trajectory depends only on its starting noise, so a pruned search over N candidates
   is exactly a choice among recorded trajectories. Every schedule of one pruning (keep 1-3) or two (keep 2-6,
   then 1) whose cost is within ``--budget`` unguided samples (forwards + ``--feature-cost`` x feature passes) is
   replayed ``--trials`` times on random N-subsets; printed are the schedules with the largest smallest share over
   the attributes, and what the default schedule (``PRUNE_DEFAULT``) replays to.

    python benchmarks/prune_schedule.py --n 512 --threads 1
Scores are cached in --work; a rerun only replays.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from lambda_curve import head_for  # noqa: E402

from ddguide.core.model import load_model  # noqa: E402
from ddguide.method.particles import prune_schedule  # noqa: E402
from ddguide.shapes import oracles  # noqa: E402
from ddguide.stages.sample import SampleConfig, draw, prepare  # noqa: E402


def record(work: Path, attribute: str, n: int, seed: int, steps: int) -> dict[str, np.ndarray]:
    """scores (steps, n) of every step's x0_hat, the final image's score (n,) and the oracle's verdict (n,)."""
    cache = work / f"{attribute}-n{n}-s{seed}-{steps}.npz"
    if cache.exists():
        return dict(np.load(cache))
    head = head_for(work.parent / "guidance", attribute, tuple(load_model().net.default_taps()), (300,), 0)
    cfg = SampleConfig(out=str(work / "unused"), n=n, steps=steps, sampler="ddim", seed=seed, device="cpu",
                       precision="auto", guides=[str(head)], lam=0.0, search="best-of-n", candidates=2)
    sampling = prepare(cfg)
    scores, finals, images = [], [], []
    with torch.no_grad():
        for first in range(0, n, 64):
            idx = list(range(first, min(first + 64, n)))
            per_step: list[np.ndarray] = []

            def hook(i: int, t: int, t_prev: int, chain, idx=idx, per_step=per_step) -> None:
                per_step.append(sampling.reward(chain.x0.clamp(-1, 1), idx).double().cpu().numpy())

            x = draw(sampling.model, sampling.denoiser_for(None, idx), idx, seed, sampling.steps, "ddim", 0.0,
                     after_step=hook)
            scores.append(np.stack(per_step))
            finals.append(sampling.reward(x.clamp(-1, 1), idx).double().cpu().numpy())
            images.append(((x.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy())
    verdict = oracles.predict_attributes(np.concatenate(images))[attribute].astype(np.int64)
    out = {"scores": np.concatenate(scores, axis=1), "final": np.concatenate(finals), "y": verdict}
    np.savez(cache, **out)
    return out


def auc(score: np.ndarray, y: np.ndarray) -> float:
    """Probability that a random positive outscores a random negative (ties count half)."""
    pos, neg = score[y == 1], score[y == 0]
    if not len(pos) or not len(neg):
        return float("nan")
    greater = (pos[:, None] > neg[None, :]).mean()
    return float(greater + 0.5 * (pos[:, None] == neg[None, :]).mean())


def replay(data: dict[str, np.ndarray], n: int, schedule: list[tuple[int, int]], trials: int, seed: int) -> float:
    """The oracle's share of the images a pruned search with this schedule keeps, over random N-subsets."""
    scores, final, y = data["scores"], data["final"], data["y"]
    rng = np.random.default_rng(seed)
    hits = 0
    for _ in range(trials):
        alive = rng.choice(len(final), n, replace=False)
        for step, keep in schedule:
            alive = alive[np.argsort(-scores[step, alive], kind="stable")[:keep]]
        hits += y[alive[np.argmax(final[alive])]]
    return hits / trials


def cost(n: int, schedule: list[tuple[int, int]], steps: int, feature_cost: float) -> float:
    """Forwards + feature_cost x feature passes of a pruned search, over an unguided sample's forwards."""
    alive, forwards, features, done = n, 0, 0, 0
    for step, keep in schedule:
        forwards += alive * (step + 1 - done)
        features += alive
        done, alive = step + 1, keep
    forwards += alive * (steps - done)
    return (forwards + feature_cost * (features + alive)) / steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--attributes", nargs="+", default=["has_red", "multiple_objects", "has_circle", "main_left"])
    ap.add_argument("--n", type=int, default=512)
    ap.add_argument("--seed", type=int, default=50000)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--budget", type=float, default=4.0, help="in unguided samples")
    ap.add_argument("--feature-cost", type=float, default=0.6, help=(
        "a feature pass in forwards (0.72 on the shipped model at bf16: `benchmarks/guided_step.py --preset shipped "
        "--batch 16 --threads 1 --rounds 20`, 0.53x against 0.74x an fp32 forward; at 0.72 the default schedule's "
        "N = 8 costs 4.03x)"))
    ap.add_argument("--trials", type=int, default=200, help="random subsets per schedule in the search")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--work", type=Path, default=Path("runs/prune-schedule"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)
    data = {a: record(args.work, a, args.n, args.seed, args.steps) for a in args.attributes}
    for a, d in data.items():
        aucs = " ".join(f"{auc(s, d['y']):.2f}" for s in d["scores"])
        print(f"{a}: share {d['y'].mean():.3f}; AUC of the step-s x0_hat score: {aucs}; "
              f"final {auc(d['final'], d['y']):.3f}")
    found = []
    for n in (4, 5, 6, 8, 10, 12, 16):
        schedules = [[(s, k)] for s in range(args.steps - 3) for k in (1, 2, 3) if k < n]
        schedules += [[(s1, k1), (s2, 1)] for s1 in range(args.steps // 2 + 1) for s2 in range(s1 + 1, args.steps - 3)
                      for k1 in (2, 3, 4, 6) if k1 < n]
        for schedule in schedules:
            if cost(n, schedule, args.steps, args.feature_cost) > args.budget:
                continue
            shares = [replay(d, n, schedule, args.trials, 0) for d in data.values()]
            found.append((min(shares), n, schedule))
    found.sort(key=lambda r: -r[0])
    print(f"\nbest schedules within {args.budget}x (smallest share over the attributes; replayed again with 2000 "
          f"trials, other subsets):")
    for _, n, schedule in found[:10]:
        shares = " ".join(f"{replay(d, n, schedule, 2000, 1):.3f}" for d in data.values())
        print(f"  N={n:<3d} prune after steps {[s + 1 for s, _ in schedule]} keeping {[k for _, k in schedule]}: "
              f"{shares}  ({cost(n, schedule, args.steps, args.feature_cost):.2f}x)")
    kept = list(range(0, 1000, 1000 // args.steps))[:args.steps]
    for n in (4, 8, 16):
        schedule = prune_schedule([], kept, n)
        shares = " ".join(f"{replay(d, n, schedule, 2000, 1):.3f}" for d in data.values())
        print(f"default, N={n}: prune after steps {[s + 1 for s, _ in schedule]} keeping {[k for _, k in schedule]}: "
              f"{shares}  ({cost(n, schedule, args.steps, args.feature_cost):.2f}x)")


if __name__ == "__main__":
    main()
