"""`ddguide merge OUT`: join the parts that the shards of a ``--shard i/n`` job wrote into what one process writes.

Every sharded stage writes its part beside (or inside) its output and the last shard to finish joins the parts
itself; ``merge`` is for when that could not happen (a shard failed and was rerun elsewhere, or the shards ran
where they could not see each other's files until they were copied together). What a part is, and how parts
join, belongs to the stage that wrote it: index parts of a samples or filter folder (``index.partIofN.csv``,
:func:`ddguide.core.samples.merge_shards`), features (``feats.partIofN.safetensors``,
:func:`ddguide.stages.extract.join_features`), FID statistics (:func:`ddguide.metrics.fid.merge_parts`) and CAS
reports (:func:`ddguide.stages.cas.join_report`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from ddguide.core import artifacts
from ddguide.core.errors import UserError
from ddguide.core.samples import INDEX, merge_shards, read_samples
from ddguide.metrics.fid import merge_parts
from ddguide.stages.cas import join_report
from ddguide.stages.extract import join_features


@dataclass
class MergeResult:
    out: Path
    kind: str  # samples, features, fid-stats or report
    parts: int
    images: int


def merge(out: str | Path) -> MergeResult:
    """Join the parts of ``out`` (a folder of index parts, or the parts of an artifact beside it)."""
    out = Path(out)
    if out.is_dir():
        world = shard_count(out / INDEX)
        merge_shards(out, world)
        return MergeResult(out, "samples", world, len(read_samples(out)))
    world = shard_count(out)
    kind = artifacts.describe(out.with_name(f"{out.stem}.part0of{world}{out.suffix}")).kind
    if kind == "features":
        join_features(out, world)
        return MergeResult(out, kind, world, int(artifacts.describe(out, "features").config.get("count", 0)))
    if kind == "fid-stats":
        return MergeResult(out, kind, world, merge_parts(out, world).n)
    if kind == "report":  # the test images' predictions of a cas classifier
        return MergeResult(out, kind, world, join_report(out, world).n_test)
    raise UserError(f"{out}: its parts are {kind} artifacts, which no sharded stage writes")


def shard_count(path: Path) -> int:
    """N of the parts ``STEM.partIofN.SUFFIX`` beside ``path``, once all N are there."""
    pattern = re.compile(rf"{re.escape(path.stem)}\.part(\d+)of(\d+){re.escape(path.suffix)}")
    found: dict[int, set[int]] = {}
    for p in path.parent.glob(f"{path.stem}.part*of*{path.suffix}") if path.parent.is_dir() else []:
        m = pattern.fullmatch(p.name)
        if m:
            found.setdefault(int(m.group(2)), set()).add(int(m.group(1)))
    where = path.parent if path.name == INDEX else path
    if not found:
        raise UserError(f"{where}: no shard parts ({path.stem}.partIofN{path.suffix}) to join: already joined, or "
                        "no --shard run wrote them")
    if len(found) > 1:
        raise UserError(f"{where}: parts of {' and '.join(map(str, sorted(found)))} shards lie together; remove "
                        "those of the other runs")
    world, ranks = next(iter(found.items()))
    missing = sorted(set(range(world)) - ranks)
    if missing:
        shown = ", ".join(f"{r}/{world}" for r in missing[:8]) + (" ..." if len(missing) > 8 else "")
        raise UserError(f"{where}: {len(missing)} of {world} parts missing; run --shard {shown}")
    return world
