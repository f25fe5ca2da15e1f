"""Fréchet Inception Distance, pytorch-fid compatible, plus a feature space that needs no download.

FID (Heusel et al. 2017) fits a Gaussian to the features of each image set and measures

    d^2 = |mu_1 - mu_2|^2 + Tr(S_1 + S_2 - 2 (S_1 S_2)^(1/2))

Two feature spaces:

- ``inception``: pool3 of the TensorFlow FID Inception (:mod:`ddguide.metrics.inception`), the standard FID.
  Numbers are comparable with pytorch-fid and published tables.
- ``denoiser``: global-average-pooled ``mid``-block features of a ddguide U-Net at feature timestep T_f,
  computed from the clean image (no noise). Offline, but only comparable with itself, same model and T_f.

Each input is an image folder, a samples folder/``index.csv``, a ``fid-stats`` artifact written by
:func:`save_stats`, or a pytorch-fid ``.npz`` (``mu``, ``sigma``). Statistics stream over batches with
constant memory (a running mean and scatter matrix).
"""

from __future__ import annotations

import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from scipy import linalg
from scipy.linalg import lapack

from ddguide.core import artifacts, runtime
from ddguide.core.data import list_images, load_image, to_tensor
from ddguide.core.errors import UserError
from ddguide.core.model import load_model
from ddguide.core.samples import INDEX, read_samples
from ddguide.metrics import inception

INCEPTION_SPACE = "inception-v3-pool3"
DEFAULT_FEATURE_TIMESTEP = 100
Progress = Callable[[str, int, int], None]  # (label, done, total)


# --- the distance ---------------------------------------------------------------------------------

def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                     eps: float = 1e-6) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2), in float64.

    Agrees with pytorch-fid's ``calculate_frechet_distance`` (to 8+ significant digits, full-rank or
    singular covariances) but needs only the trace of the square root, which for symmetric positive
    semi-definite covariances is that of the symmetric product: with ``sigma1 = B B^T`` (pivoted Cholesky),
    ``Tr (sigma1 sigma2)^(1/2) = sum sqrt(eig(B^T sigma2 B))``, one Cholesky and one ``eigvalsh`` instead
    of ``scipy.linalg.sqrtm`` (see benchmarks/fid_speed.py). pytorch-fid's semantics are kept: when that trace is
    not finite, ``eps`` is added to both diagonals and it is tried again. Inputs that are not symmetric
    positive semi-definite covariances go through pytorch-fid's own steps (``sqrtm`` without the ``disp``
    argument that SciPy 1.18 removed, the ``eps`` retry, and an error for a non-negligible imaginary
    diagonal).
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
        raise ValueError(f"mismatched statistics: mu {mu1.shape} vs {mu2.shape}, "
                         f"sigma {sigma1.shape} vs {sigma2.shape}")
    diff = mu1 - mu2
    tr_covmean = _trace_sqrt_product(sigma1, sigma2)
    if tr_covmean is not None and not np.isfinite(tr_covmean):
        offset = np.eye(sigma1.shape[0]) * eps
        tr_covmean = _trace_sqrt_product(sigma1 + offset, sigma2 + offset)
    if tr_covmean is not None and np.isfinite(tr_covmean):
        return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)
    covmean = _sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        # The product is (numerically) singular: regularise both covariances.
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = _sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"FID: matrix square root has an imaginary component "
                             f"{np.max(np.abs(covmean.imag)):.3g}; the statistics are degenerate")
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def _is_covariance(sigma: np.ndarray) -> bool:
    """Symmetric (to rounding) with finite entries, as a covariance is."""
    if not np.isfinite(sigma).all():
        return False
    scale = np.abs(sigma).max(initial=0.0)
    return bool(np.abs(sigma - sigma.T).max(initial=0.0) <= 1e-10 * scale)


def _trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float | None:
    """Tr (sigma1 sigma2)^(1/2) for symmetric PSD matrices, via sigma1 = B B^T and eig(B^T sigma2 B).

    ``B`` comes from LAPACK's pivoted Cholesky (``dpstrf``), which stops at sigma1's numerical rank (pivots
    below D * eps * max diag), so a covariance of n < D samples gets an exactly null null space. The eigenvalues
    of B^T sigma2 B (symmetric PSD) are those of sigma2 B B^T = sigma2 sigma1, so the trace of the square root
    is the sum of their square roots; eigenvalues within rounding of zero count as zero. This is exact to
    ~1e-14 on rank-deficient covariances, where ``sqrtm`` is off by ~1e-8.
    None when the symmetric form does not apply (an input that is not symmetric, or not positive
    semi-definite): the caller then takes pytorch-fid's general ``sqrtm`` steps.
    """
    if not (_is_covariance(sigma1) and _is_covariance(sigma2)):
        return None
    with np.errstate(all="ignore"):
        factor, piv, rank, info = lapack.dpstrf(sigma1, lower=1)
        if info < 0:
            return None
        b = np.zeros((sigma1.shape[0], rank))
        b[piv - 1] = np.tril(factor)[:, :rank]  # sigma1 = b @ b.T (to rounding, if sigma1 is PSD)
        # Indefinite sigma1: the factorisation stops at a non-positive pivot and leaves a large remainder.
        if np.abs(sigma1 - b @ b.T).max(initial=0.0) > _rounding(np.diagonal(sigma1)):
            return None
        m = b.T @ sigma2 @ b
        if not np.isfinite(m).all():
            return float("nan")  # overflow: the caller regularises and retries, as for a non-finite sqrtm
        w = np.linalg.eigvalsh((m + m.T) / 2)
        if w.min(initial=0.0) < -_rounding(w):
            return None
        tiny = np.finfo(np.float64).eps * np.abs(w).max(initial=0.0)
        return float(np.sqrt(np.where(w > tiny, w, 0.0)).sum())


def _rounding(eigenvalues: np.ndarray) -> float:
    """How far below zero an eigenvalue of a PSD matrix may fall by rounding alone."""
    return eigenvalues.shape[0] * np.finfo(np.float64).eps * 1e3 * max(np.abs(eigenvalues).max(initial=0.0), 1e-300)


def _sqrtm(a: np.ndarray) -> np.ndarray:
    """scipy's matrix square root, quiet about singular input (the caller checks finiteness)."""
    if a.shape == (1, 1):  # scipy special-cases 1x1; keep the general meaning
        return np.emath.sqrt(a)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        warnings.simplefilter("ignore", RuntimeWarning)
        return linalg.sqrtm(a)


# --- statistics -----------------------------------------------------------------------------------

@dataclass
class FidStats:
    """A Gaussian fitted to ``n`` feature vectors of one image set, and the feature space they live in.

    ``fingerprint`` identifies the network that made the features (Inception weights or ddguide model);
    ``features`` holds that space's settings (timestep, blocks, ...).
    """

    mu: np.ndarray  # (D,) float64
    sigma: np.ndarray  # (D, D) float64
    n: int
    feature_space: str
    fingerprint: str = ""
    features: dict[str, Any] = field(default_factory=dict)
    source: str = ""

    @property
    def dim(self) -> int:
        return int(self.mu.shape[0])


class Moments:
    """What a Gaussian fit needs of a set of feature vectors x_i, in float64: the count n, the sum of x_i and the
    sum of the outer products x_i x_i^T. Sums add up, so the moments of shards (of any split of the images)
    merge exactly into those of the whole set; then mu = sum / n and Sigma = (outer - n mu mu^T) / (n - 1)."""

    def __init__(self, n: int = 0, total: np.ndarray | None = None, outer: np.ndarray | None = None) -> None:
        self.n, self.total, self.outer = n, total, outer

    def update(self, feats: np.ndarray) -> None:
        feats = np.asarray(feats, np.float64)  # (B, D)
        if feats.shape[0] == 0:
            return
        if self.total is None:
            self.total, self.outer = np.zeros(feats.shape[1]), np.zeros((feats.shape[1],) * 2)
        self.n += feats.shape[0]
        self.total += feats.sum(0)
        self.outer += feats.T @ feats

    @classmethod
    def merged(cls, parts: Sequence["Moments"]) -> "Moments":
        """The moments of the union of the parts' sets, summed in the parts' order."""
        whole = cls()
        for part in parts:
            if part.n:
                whole.n += part.n
                whole.total = part.total.copy() if whole.total is None else whole.total + part.total
                whole.outer = part.outer.copy() if whole.outer is None else whole.outer + part.outer
        return whole

    def mean(self) -> np.ndarray:
        return self.total / self.n

    def covariance(self) -> np.ndarray:
        # Unbiased (ddof=1), as numpy.cov and pytorch-fid; symmetrised against rounding.
        mu = self.mean()
        cov = (self.outer - self.n * np.outer(mu, mu)) / (self.n - 1)
        return (cov + cov.T) / 2

    def stats(self, extractor: "FeatureExtractor", label: str = "") -> FidStats:
        """The Gaussian fit (at least 2 vectors), labelled with the extractor's feature space."""
        if self.n < 2:
            raise UserError(f"{label or 'input'}: FID needs at least 2 images to estimate a covariance, got {self.n}")
        return FidStats(mu=self.mean(), sigma=self.covariance(), n=self.n, feature_space=extractor.name,
                        fingerprint=extractor.fingerprint, features=dict(extractor.config), source=label)


def compute_stats(
    images: Sequence[str | os.PathLike] | torch.Tensor,
    extractor: "FeatureExtractor",
    batch: int = 50,
    device: str | torch.device | None = None,
    progress: Progress | None = None,
    *,
    size: int | None = None,
    resize: str = "refuse",
    label: str = "",
    precision: str = "fp32",
) -> FidStats:
    """Feature statistics of image files (or a float tensor (N, 3, H, W) in [-1, 1]), ``batch`` at a time.

    Files are read at their own size unless ``size`` is given (then ``resize`` is the policy of
    :func:`ddguide.core.data.load_image`). Memory stays constant in the number of images. ``precision`` is
    the feature network's (:func:`ddguide.core.runtime.autocast`); statistics are always accumulated in fp64.
    """
    n = len(images)
    if n < 2:
        what = label or "input"
        raise UserError(f"{what}: FID needs at least 2 images to estimate a covariance, got {n}")
    moments = compute_moments(images, extractor, batch, device, progress, size=size, resize=resize, label=label,
                              precision=precision)
    return moments.stats(extractor, label)


def compute_moments(
    images: Sequence[str | os.PathLike] | torch.Tensor,
    extractor: "FeatureExtractor",
    batch: int = 50,
    device: str | torch.device | None = None,
    progress: Progress | None = None,
    *,
    size: int | None = None,
    resize: str = "refuse",
    label: str = "",
    precision: str = "fp32",
) -> Moments:
    """The :class:`Moments` of the features of any number of images (a shard's part too), as
    :func:`compute_stats` reads them."""
    n = len(images)
    if batch < 1:
        raise UserError(f"batch size must be positive, got {batch}")
    device = torch.device(device) if device is not None else getattr(extractor, "device", torch.device("cpu"))
    moments = Moments()
    starts = list(range(0, n, batch))
    with ThreadPoolExecutor(max_workers=1) as reader:  # decode the next batch while this one runs
        channels = extractor.channels  # grey files are read as RGB for Inception, as grey for a 1-channel model
        pending = reader.submit(_load_batch, images, 0, min(batch, n), size, resize, channels)
        for start in starts:
            groups = pending.result()
            if start + batch < n:
                pending = reader.submit(_load_batch, images, start + batch, min(start + 2 * batch, n), size, resize,
                                        channels)
            for x in groups:
                with torch.inference_mode(), runtime.autocast(device, precision):
                    feats = extractor(x.to(device))  # (B, D)
                moments.update(feats.detach().to("cpu", torch.float64).numpy())
            if progress is not None:
                progress(label, min(start + batch, n), n)
    return moments


def _load_batch(images, start: int, stop: int, size: int | None, resize: str,
                channels: int = 3) -> list[torch.Tensor]:
    """One batch as float tensors (B, channels, H, W) in [-1, 1]; images of different sizes come back as separate
    groups."""
    if isinstance(images, torch.Tensor):
        return [images[start:stop].float()]
    arrays = [load_image(p, size, resize, channels) for p in images[start:stop]]
    groups: dict[tuple[int, ...], list[np.ndarray]] = {}
    for a in arrays:
        groups.setdefault(a.shape, []).append(a)
    return [to_tensor(np.stack(group)) for group in groups.values()]


def save_stats(path: str | os.PathLike, stats: FidStats) -> Path:
    """Write ``stats`` as a ``fid-stats`` artifact (float64 mu and sigma; config names the feature space)."""
    meta = artifacts.FidStatsMeta(feature_space=stats.feature_space, dim=stats.dim, n=stats.n,
                                  features=stats.features, source=stats.source)
    tensors = {"mu": torch.from_numpy(np.ascontiguousarray(stats.mu, np.float64)),
               "sigma": torch.from_numpy(np.ascontiguousarray(stats.sigma, np.float64))}
    return artifacts.save(path, tensors, config=meta, fingerprint=stats.fingerprint)


def save_part(path: str | os.PathLike, moments: Moments, extractor: "FeatureExtractor", label: str,
              shard: runtime.Shard) -> Path:
    """Write a shard's :class:`Moments` as a ``fid-stats`` part (count, sum and outer, float64)."""
    dim = len(moments.total) if moments.total is not None else extractor.dim
    meta = artifacts.FidStatsMeta(feature_space=extractor.name, dim=dim, n=moments.n,
                                  features=dict(extractor.config), source=label, part=str(shard))
    tensors = {"count": torch.tensor([moments.n], dtype=torch.int64),
               "sum": torch.from_numpy(moments.total if moments.n else np.zeros(dim)),
               "outer": torch.from_numpy(moments.outer if moments.n else np.zeros((dim, dim)))}
    return artifacts.save(path, tensors, config=meta, fingerprint=extractor.fingerprint)


def merge_parts(path: str | os.PathLike, world: int) -> FidStats:
    """Join the ``world`` parts of ``path`` (``fid --shard i/n --save-stats PATH``) into the statistics one
    process writes, and remove the parts."""
    parts = [runtime.part_path(path, r, world) for r in range(world)]
    moments, first = [], None
    for r, part in enumerate(parts):
        art = artifacts.load(part, "fid-stats")
        meta = artifacts.FidStatsMeta.from_metadata(art.config, part)
        if meta.part != f"{r}/{world}" or not {"count", "sum", "outer"} <= set(art.tensors):
            raise UserError(f"{part}: not part {r}/{world} of fid statistics")
        key = (meta.feature_space, meta.dim, meta.features, meta.source, art.fingerprint)
        if first is not None and key != first[0]:
            raise UserError(f"{part} and {parts[0]} come from different fid runs (other images or features); "
                            "rerun every shard with the same options")
        first = first or (key, meta)
        moments.append(Moments(int(art.tensors["count"][0]), art.tensors["sum"].double().numpy(),
                               art.tensors["outer"].double().numpy()))
    (space, _, features, source, fingerprint), _ = first  # type: ignore[misc]
    whole = Moments.merged(moments)
    if whole.n < 2:
        raise UserError(f"{path}: FID needs at least 2 images to estimate a covariance, the parts hold {whole.n}")
    stats = FidStats(mu=whole.mean(), sigma=whole.covariance(), n=whole.n, feature_space=space,
                     fingerprint=fingerprint, features=dict(features), source=source)
    save_stats(path, stats)
    for part in parts:
        part.unlink(missing_ok=True)
    return stats


def load_stats(path: str | os.PathLike) -> FidStats:
    """Read statistics from a ``fid-stats`` artifact or a pytorch-fid ``.npz`` (Inception pool3)."""
    path = Path(path)
    if path.suffix == ".npz":
        return _load_npz(path)
    art = artifacts.load(path, "fid-stats")
    meta = artifacts.FidStatsMeta.from_metadata(art.config, path)
    if meta.part is not None:
        raise UserError(f"{path}: shard {meta.part} of fid statistics, not the whole set's; `ddguide merge` joins "
                        "the parts once every shard has written its own")
    try:
        mu, sigma = art.tensors["mu"].double().numpy(), art.tensors["sigma"].double().numpy()
    except KeyError as e:
        raise UserError(f"{path}: fid-stats artifact without {e.args[0]!r}") from None
    stats = FidStats(mu=mu, sigma=sigma, n=meta.n, feature_space=meta.feature_space, fingerprint=art.fingerprint,
                     features=dict(meta.features), source=str(path))
    _check_shapes(stats, path)
    if meta.dim is not None and meta.dim != stats.dim:
        raise UserError(f"{path}: its config says {meta.dim}-d statistics, its mu is {stats.dim}-d")
    return stats


def _load_npz(path: Path) -> FidStats:
    try:
        with np.load(path, allow_pickle=False) as f:
            mu, sigma = f["mu"].astype(np.float64), f["sigma"].astype(np.float64)
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"{path}: not a pytorch-fid statistics file with 'mu' and 'sigma' ({e})") from None
    stats = FidStats(mu=mu, sigma=sigma, n=0, feature_space=INCEPTION_SPACE if mu.shape == (2048,) else "",
                     source=str(path))
    if not stats.feature_space:
        raise UserError(f"{path}: pytorch-fid statistics of dimension {mu.shape}; only 2048-d pool3 is supported")
    _check_shapes(stats, path)
    return stats


def _check_shapes(stats: FidStats, path: Path) -> None:
    d = stats.mu.shape
    if stats.mu.ndim != 1 or stats.sigma.shape != d * 2:
        raise UserError(f"{path}: inconsistent statistics (mu {d}, sigma {stats.sigma.shape})")


def check_comparable(a: FidStats, b: FidStats) -> None:
    """Refuse to compare statistics from different feature spaces (or different feature networks)."""
    if a.feature_space != b.feature_space or a.dim != b.dim:
        raise UserError(f"cannot compare {a.source or 'A'} ({a.feature_space}, {a.dim}-d) with "
                        f"{b.source or 'B'} ({b.feature_space}, {b.dim}-d): different feature spaces")
    if a.fingerprint and b.fingerprint and a.fingerprint != b.fingerprint:
        raise UserError(f"cannot compare {a.source or 'A'} with {b.source or 'B'}: features from different "
                        f"networks ({a.fingerprint} vs {b.fingerprint})")


# --- feature extractors ---------------------------------------------------------------------------

class FeatureExtractor:
    """What :func:`compute_stats` needs: ``name``, ``dim``, ``fingerprint``, ``config``, ``input_size`` and
    ``__call__(x)`` mapping images (N, channels, H, W) in [-1, 1] to features (N, dim)."""

    name: str
    dim: int
    channels: int = 3  # the image channels it reads (files are read with as many)
    fingerprint: str = ""
    config: dict[str, Any] = {}
    input_size: int | None = None  # images must have this side (None: any size)
    device: torch.device = torch.device("cpu")

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class InceptionFeatures(FeatureExtractor):
    """pool3 of the FID Inception: the standard FID feature space."""

    name = INCEPTION_SPACE
    dim = 2048

    def __init__(self, weights_path: str | os.PathLike | None = None, device: str | torch.device = "cpu",
                 network: torch.nn.Module | None = None) -> None:
        """Weights from ``weights_path`` (None: searched as :func:`ddguide.metrics.inception.find_weights` does), or an
        already built ``network``."""
        self.device = torch.device(device)
        if network is None:
            network = inception.load_inception(inception.require_weights(weights_path), self.device)
        self.net = network.to(self.device).eval()
        # BatchNorm's step counters (0-dim, unused in eval) are left out of the network's identity.
        self.fingerprint = artifacts.fingerprint({k: v for k, v in self.net.state_dict().items()
                                                  if v.is_floating_point()})
        self.config = {"network": "inception-v3 (TF 2015-12-05, pytorch-fid weights)", "layer": "pool3",
                       "resize": "bilinear 299x299"}

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] == 1:  # grey images, as RGB with R = G = B
            x = x.expand(-1, 3, -1, -1)
        return self.net(x.float())  # (N, 2048)


class DenoiserFeatures(FeatureExtractor):
    """Denoiser representations (Graikos et al.): the ``mid`` block of a ddguide model at feature timestep T_f,
    applied to the clean image (no noise), averaged over space.

    ``model`` is a :class:`ddguide.core.model.Model` or anything with ``features(x, t, blocks) -> {name: (N, C, h, w)}``
    taking schedule indices ``t``.
    """

    def __init__(self, model: torch.nn.Module, device: str | torch.device = "cpu", *,
                 timestep: int = DEFAULT_FEATURE_TIMESTEP, fingerprint: str | None = None,
                 image_size: int | None = None, block: str = "mid") -> None:
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.timestep, self.block = int(timestep), block
        self.input_size = image_size or getattr(model, "image_size", None)
        cfg = getattr(getattr(model, "net", None), "cfg", None)
        self.channels = int(getattr(cfg, "in_channels", 3))  # a 1-channel model is fed grey images
        self.fingerprint = fingerprint if fingerprint is not None else getattr(model, "fingerprint", "")
        self.name = f"denoiser-{block}-t{self.timestep}"
        self.config = {"block": block, "timestep": self.timestep, "noise": "none", "pool": "spatial mean"}
        self.dim = self._probe_dim()

    def _probe_dim(self) -> int:
        net = getattr(self.model, "net", None)
        if hasattr(net, "block_channels"):
            return int(net.block_channels(self.block))
        side = self.input_size or 32
        with torch.inference_mode():
            return int(self(torch.zeros(1, self.channels, side, side, device=self.device)).shape[1])

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        t = torch.full((x.shape[0],), self.timestep, dtype=torch.long, device=x.device)  # T_f for every image
        h = self.model.features(x, t, blocks=[self.block])[self.block]  # (N, C, h, w)
        return h.float().mean(dim=(2, 3))  # (N, C)


# --- inputs ---------------------------------------------------------------------------------------

@dataclass
class Source:
    """One side of the comparison: image files, or precomputed statistics."""

    label: str
    files: list[Path] | None = None
    stats: FidStats | None = None


def resolve_source(path: str | os.PathLike) -> Source:
    """An image folder, a samples folder (with ``index.csv``), an ``index.csv``, or a statistics file."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"{p}: no such file or folder")
    if p.is_dir():
        index = p / INDEX
        if not index.is_file() and any(p.glob("index.part*of*.csv")):
            raise UserError(f"{p}: a sharded samples folder whose parts are not joined yet (no {INDEX}); wait for "
                            f"every shard, or `ddguide merge {p}`")
        files = read_index(index) if index.is_file() else list_images(p)
        return Source(str(p), files=files)
    if p.suffix.lower() == ".csv":
        return Source(str(p), files=read_index(p))
    if p.suffix.lower() in (".safetensors", ".npz"):
        return Source(str(p), stats=load_stats(p))
    raise UserError(f"{p}: expected an image folder, a samples index.csv, a fid-stats .safetensors "
                    "or a pytorch-fid .npz")


def read_index(index: Path) -> list[Path]:
    """The images a sample index lists (its ``file`` column, relative to the index's folder)."""
    return [row.path for row in read_samples(index)]


# --- the stage ------------------------------------------------------------------------------------

@dataclass
class FidConfig:
    """``ddguide fid A [B]``: the FID between A and B, and/or A's statistics saved for reuse."""

    a: str
    b: str | None = None
    features: str = "auto"  # inception | denoiser | auto (inception when its weights are found)
    inception_weights: str | None = None
    model: str | None = None  # ddguide model for denoiser features (None: the shipped default)
    timestep: int = DEFAULT_FEATURE_TIMESTEP  # T_f for denoiser features
    batch: int = 50
    device: str = "auto"  # auto (CUDA when present), cpu, cuda, cuda:N
    precision: str = "fp32"  # of the feature network; fp32 keeps statistics comparable across machines
    save_stats: str | None = None  # write A's statistics here
    shard: str | None = None  # "i/n": A's statistics over the i-th of n slices of its images, as a part of save_stats
    size: int | None = None  # resize images to this side (None: inception reads any size, denoiser needs its own)
    resize: str = "refuse"  # refuse | resize | center-crop, when an image's size differs from the required one


@dataclass
class FidResult:
    fid: float | None
    a: FidStats
    b: FidStats | None
    feature_space: str
    note: str  # which features were used and why
    saved: Path | None = None
    joined: bool = True  # with --shard: whether ``saved`` is the whole set's statistics (else this shard's part)


def run_fid(cfg: FidConfig, progress: Progress | None = None) -> FidResult:
    """Resolve both inputs, build the feature extractor only if some input is images, compute and compare."""
    if cfg.features not in ("inception", "denoiser", "auto"):
        raise UserError(f"unknown feature space {cfg.features!r} (inception, denoiser, auto)")
    if cfg.b is None and cfg.save_stats is None:
        raise UserError("give a second input B to compare with, or --save-stats PATH to save A's statistics")
    shard = runtime.resolve_shard(cfg.shard)
    if shard.world > 1 and not shard.linked and (cfg.b is not None or cfg.save_stats is None):
        raise UserError("--shard computes a part of A's statistics: give --save-stats PATH and no B (the parts "
                        "join into PATH, which any later fid compares)")
    sources = [resolve_source(cfg.a)] + ([resolve_source(cfg.b)] if cfg.b is not None else [])
    if shard.world > 1 and not shard.linked and sources[0].files is None:
        raise UserError(f"{cfg.a}: already statistics; --shard splits the images of a folder")
    for s in sources:
        if s.files is not None and len(s.files) < 2:
            raise UserError(f"{s.label}: FID needs at least 2 images to estimate a covariance, got {len(s.files)}")
    given = [s.stats for s in sources if s.stats is not None]
    kind, note = _choose_features(cfg, given)
    if kind == "denoiser" and given and "timestep" in given[0].features:
        # Images compared with saved denoiser statistics must use the same T_f.
        cfg = replace(cfg, timestep=int(given[0].features["timestep"]))
    extractor = None
    if any(s.files is not None for s in sources):
        extractor = _build_extractor(kind, cfg)
    stats = []
    for s in sources:
        if s.stats is not None:
            stats.append(s.stats)
            continue
        size = cfg.size or extractor.input_size
        lo, hi = shard.bounds(len(s.files))  # a shard's consecutive slice of the images (all of them alone)
        moments = compute_moments(s.files[lo:hi], extractor, cfg.batch, progress=progress, size=size,
                                  resize=cfg.resize, label=s.label, precision=cfg.precision)
        if shard.world > 1 and not shard.linked:
            return _part_result(cfg, shard, moments, extractor, s.label, note)
        if shard.linked:  # torchrun: every rank sums the ranks' moments, in rank order
            moments = Moments.merged(runtime.all_gather(moments, extractor.device))
        stats.append(moments.stats(extractor, s.label))
    for s in stats[1:]:
        check_comparable(stats[0], s)
    saved = save_stats(cfg.save_stats, stats[0]) if cfg.save_stats and shard.rank == 0 else None
    fid = None
    if len(stats) == 2:
        try:
            fid = frechet_distance(stats[0].mu, stats[0].sigma, stats[1].mu, stats[1].sigma)
        except ValueError as e:
            raise UserError(str(e)) from None
    return FidResult(fid=fid, a=stats[0], b=stats[1] if len(stats) == 2 else None,
                     feature_space=stats[0].feature_space, note=note, saved=saved)


def _part_result(cfg: FidConfig, shard: runtime.Shard, moments: Moments, extractor: FeatureExtractor, label: str,
                 note: str) -> FidResult:
    """``--shard``: write this shard's part of A's statistics; the shard that finds every part present joins
    them into ``cfg.save_stats``."""
    from ddguide.core.outputs import join_when_complete

    out = Path(cfg.save_stats)  # type: ignore[arg-type]
    part = save_part(shard.part(out), moments, extractor, label, shard)
    merged: list[FidStats] = []
    join_when_complete(out, shard.parts(out), lambda: merged.append(merge_parts(out, shard.world)))
    if merged:
        return FidResult(fid=None, a=merged[0], b=None, feature_space=extractor.name, note=note, saved=out)
    mine = FidStats(mu=moments.mean() if moments.n else np.zeros(0), sigma=np.zeros((0, 0)), n=moments.n,
                    feature_space=extractor.name, fingerprint=extractor.fingerprint, source=label)
    return FidResult(fid=None, a=mine, b=None, feature_space=extractor.name, note=note, saved=part, joined=False)


def _choose_features(cfg: FidConfig, given: list[FidStats]) -> tuple[str, str]:
    """Which feature space to use, and a sentence saying why."""
    for s in given:
        family = "inception" if s.feature_space == INCEPTION_SPACE else "denoiser"
        if cfg.features not in ("auto", family):
            raise UserError(f"{s.source} holds {s.feature_space} statistics, but --features {cfg.features} "
                            "was asked for; FIDs from different feature spaces are not comparable")
    if cfg.features != "auto":
        return cfg.features, f"{cfg.features} features (as requested)"
    if given:
        kind = "inception" if given[0].feature_space == INCEPTION_SPACE else "denoiser"
        return kind, f"{kind} features (those of the statistics in {given[0].source})"
    weights = inception.find_weights(cfg.inception_weights)
    if weights is not None:
        return "inception", f"inception features (weights {weights})"
    return "denoiser", (f"denoiser features, comparable only with FIDs of the same model and timestep: no Inception "
                        f"weights found (for the standard FID put {inception.WEIGHTS_FILE} in "
                        f"{inception.hub_weights_path().parent})")


def _build_extractor(kind: str, cfg: FidConfig) -> FeatureExtractor:
    device = runtime.resolve_device(cfg.device)
    if kind == "inception":
        return InceptionFeatures(cfg.inception_weights, device)
    return _denoiser_extractor(cfg, device)


def _denoiser_extractor(cfg: FidConfig, device: torch.device) -> DenoiserFeatures:
    model = load_model(cfg.model, device)
    if not 0 <= cfg.timestep < model.diffusion.steps:
        raise UserError(f"--timestep {cfg.timestep} is outside the model's 0..{model.diffusion.steps - 1}")
    return DenoiserFeatures(model, device, timestep=cfg.timestep)
