"""Bad inputs, as a hostile or careless user gives them, across every subcommand (issue 20, "Hardening").

Every case must be refused cleanly: exit code 2, exactly one line of output, no traceback, and nothing new or
changed on disk (the whole fixture folder is compared, names, sizes and modification times, before and after).
The fixtures (a tiny model, a small shapes dataset, features, heads, samples and hostile files) are built once
for the module; each case only runs the command line in this process (``ddguide.cli.main``, the real exit path).
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import shapes_data
from ddguide.core import artifacts

ESC = "\x1b"


# ------------------------------------------------------------------------------------------------ fixtures


def raw_safetensors(path: Path, header, data: bytes = b"") -> Path:
    """A file in safetensors' layout (8-byte little-endian length, JSON header, data) with any header."""
    raw = json.dumps(header).encode() if not isinstance(header, bytes) else header
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


def rewrite(src: Path, dst: Path, *, meta=None, config=None, tensors=None, drop=()) -> Path:
    """A copy of artifact ``src`` with its metadata, config or tensors changed (not through ddguide's checks)."""
    from safetensors.torch import save

    art = artifacts.load(src)
    t = dict(tensors if tensors is not None else art.tensors)
    for k in drop:
        t.pop(k, None)
    m = {"ddguide.kind": art.kind, "ddguide.schema": "1", "ddguide.version": "0",
         "ddguide.config": json.dumps(config if config is not None else art.config),
         "ddguide.fingerprint": art.fingerprint}
    m.update(meta or {})
    dst.write_bytes(save({k: v.contiguous() for k, v in t.items()}, metadata=m))
    return dst


def png(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def bomb_png(path: Path, side: int = 20000) -> Path:
    """A 1-bit PNG of side x side pixels: a few KB on disk, side**2 pixels once decoded."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("1", (side, side)).save(path, optimize=True)
    return path


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_model_path):
    """Every file a case needs, built once; ``W[name]`` is its path as a string."""
    from ddguide.stages.extract import ExtractConfig, extract
    from ddguide.stages.train_head import TrainHeadConfig, train_head
    root = tmp_path_factory.mktemp("bad")
    W: dict[str, str] = {"root": str(root)}
    model = root / "model.safetensors"
    shutil.copyfile(tiny_model_path, model)
    W["model"] = str(model)
    data = shapes_data(root)
    W["data"], W["images"], W["attrs"], W["masks"] = str(data), str(data / "images"), str(data / "attributes.csv"), \
        str(data / "masks")

    feats = extract(ExtractConfig(data=str(data / "images"), out=str(root / "feats.safetensors"), model=str(model),
                                  blocks=("mid",), timesteps=(10, 20), labels=str(data / "attributes.csv"),
                                  label="has_circle", device="cpu"))
    head = train_head(TrainHeadConfig(features=str(feats), out=str(root / "head.safetensors"), steps=2))
    cfeats = extract(ExtractConfig(data=str(data / "images"), out=str(root / "cfeats.safetensors"), model=str(model),
                                   blocks=("mid",), timesteps=(10, 20), device="cpu"))
    rhead = train_head(TrainHeadConfig(features=str(cfeats), out=str(root / "rhead.safetensors"), kind="rejection",
                                       steps=2))
    sfeats = extract(ExtractConfig(data=str(data / "images"), out=str(root / "sfeats.safetensors"), model=str(model),
                                   blocks=("mid",), timesteps=(10,), masks=str(data / "masks"), device="cpu"))
    shead = train_head(TrainHeadConfig(features=str(sfeats), out=str(root / "shead.safetensors"),
                                       kind="segmentation", steps=2))
    W.update(feats=str(feats), head=str(head), rhead=str(rhead), shead=str(shead), cfeats=str(cfeats))
    mask = root / "mask.png"
    png(mask, np.zeros((16, 16), np.uint8))
    W["mask"] = str(mask)

    # a samples folder with a class column (copies of the data's images, named by the rejection head's classes)
    from ddguide.method.heads import load_head

    classes = load_head(rhead).cfg.classes
    samples = root / "samples"
    samples.mkdir()
    files = sorted((data / "images").rglob("*.png"))
    rows = ["file,class"]
    for i, f in enumerate(files[:4]):
        shutil.copyfile(f, samples / f"{i:06d}.png")
        rows.append(f"{i:06d}.png,{classes[i % len(classes)]}")
    (samples / "index.csv").write_text("\n".join(rows) + "\n")
    W["samples"] = str(samples)
    shutil.copyfile(files[0], root / "escape.png")  # a file outside the samples folders, for `..` rows

    def samples_with(name: str, rows: list[str], header: str = "file,class") -> str:
        folder = root / name
        folder.mkdir()
        for f in sorted(samples.glob("*.png")):
            shutil.copyfile(f, folder / f.name)
        (folder / "index.csv").write_text("\n".join([header, *rows]) + "\n")
        return str(folder)

    c0 = classes[0]
    W["idx_dotdot"] = samples_with("idx_dotdot", [f"../escape.png,{c0}", f"000001.png,{classes[1 % len(classes)]}"])
    W["idx_abs"] = samples_with("idx_abs", [f"{root / 'escape.png'},{c0}", f"000001.png,{classes[1 % len(classes)]}"])
    W["idx_missing"] = samples_with("idx_missing", [f"nope.png,{c0}"])
    W["idx_noclass"] = samples_with("idx_noclass", ["000000.png"], header="file")
    W["idx_unknown_class"] = samples_with("idx_unknown_class", ["000000.png,no_such_class"])
    W["idx_badimage"] = samples_with("idx_badimage", [f"junk.png,{c0}"])
    (root / "idx_badimage" / "junk.png").write_bytes(b"not a png")
    W["idx_bomb"] = samples_with("idx_bomb", [f"bomb.png,{c0}"])
    bomb_png(root / "idx_bomb" / "bomb.png")

    # image folders: class folders (for cas, finetune) and flat ones with one hostile file each
    def image_folder(name: str, extra: dict[str, bytes | np.ndarray | str] | None = None,
                     classes_: tuple[str, ...] = ("a", "b")) -> str:
        folder = root / name
        rng = np.random.default_rng(0)
        for c in classes_:
            for i in range(3):
                png(folder / c / f"{c}{i}.png", rng.integers(0, 255, (16, 16, 3), dtype=np.uint8))
        for rel, content in (extra or {}).items():
            target = folder / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(content, bytes):
                target.write_bytes(content)
            elif isinstance(content, np.ndarray):
                png(target, content)
            elif content == "bomb":
                bomb_png(target)
        return str(folder)

    W["classes"] = image_folder("classes")
    W["img_junk"] = image_folder("img_junk", {"a/junk.png": b"\x89PNG\r\n\x1a\n garbage"})
    W["img_empty"] = image_folder("img_empty", {"a/empty.png": b""})
    W["img_bomb"] = image_folder("img_bomb", {"a/bomb.png": "bomb"})
    W["img_size"] = image_folder("img_size", {"a/big.png": np.zeros((20, 16, 3), np.uint8)})
    W["img_markup"] = image_folder("img_markup", {"a/a[/]x.png": b"junk", "a/[bold]b.png": b"junk"})
    W["img_escape"] = image_folder("img_escape", {f"a/{ESC}[31mred.png": b"junk"})
    W["img_newline"] = image_folder("img_newline", {"a/two\nlines.png": b"junk"})
    trunc = root / "trunc_src.png"
    png(trunc, np.random.default_rng(1).integers(0, 255, (16, 16, 3), dtype=np.uint8))
    W["img_trunc"] = image_folder("img_trunc", {"a/trunc.png": trunc.read_bytes()[:60]})
    trunc.unlink()
    W["noimages"] = str(root / "noimages")
    (root / "noimages").mkdir()
    (root / "noimages" / "readme.txt").write_text("hi")
    W["oneclass"] = image_folder("oneclass", classes_=("a",))

    # label files
    labels = root / "labels"
    labels.mkdir()
    names = [p.relative_to(data / "images").as_posix() for p in files]

    def table(name: str, lines: list[str]) -> str:
        (labels / name).write_text("\n".join(lines) + "\n")
        return str(labels / name)

    W["lab_two"] = table("two.csv", ["file,has_circle", *[f"{n},{2 if i == 0 else i % 2}" for i, n in enumerate(names)]])
    W["lab_text"] = table("text.csv", ["file,has_circle", *[f"{n},{'yes' if i == 0 else i % 2}" for i, n in enumerate(names)]])
    # a table may label a subset of the folder, but not name a file the folder lacks
    W["lab_missing"] = table("missing.csv", ["file,has_circle", *[f"{n},{i % 2}" for i, n in enumerate(names)],
                                             "not_there.png,1"])
    W["lab_columns"] = table("columns.csv", ["file,has_circle", *[f"{n},{i % 2},1" for i, n in enumerate(names)]])
    W["lab_empty"] = table("empty.csv", [""])
    W["lab_header"] = table("header.csv", ["file,has_circle"])
    W["lab_nan"] = table("nan.csv", ["file,has_circle", *[f"{n},{'nan' if i == 0 else i % 2}" for i, n in enumerate(names)]])
    W["lab_same"] = table("same.csv", ["file,has_circle", *[f"{n},1" for n in names]])
    W["lab_celeba_bad"] = table("celeba.txt", ["12", "has_circle", *[f"{n} {3 if i == 0 else 1}" for i, n in enumerate(names)]])
    (labels / "binary.csv").write_bytes(b"file,has_circle\n\xff\xfe\x00junk,1\n")
    W["lab_binary"] = str(labels / "binary.csv")

    # mask folders
    def mask_folder(name: str, stem_arrays: dict[str, np.ndarray | str]) -> str:
        folder = root / name
        folder.mkdir()
        for f in files:
            np.save(folder / f"{f.stem}.npy", np.zeros((16, 16), np.int64))
        for stem, arr in stem_arrays.items():
            target = folder / f"{stem}.npy"
            if isinstance(arr, str) and arr == "bomb":
                target.unlink()
                bomb_png(folder / f"{stem}.png")
            elif isinstance(arr, str) and arr == "hugeheader":
                header = "{'descr': '<i8', 'fortran_order': False, 'shape': (100000, 100000), }"
                header += " " * (118 - len(header)) + "\n"
                target.write_bytes(b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header.encode())
            elif isinstance(arr, str) and arr == "pickle":
                np.save(target, np.array([{"a": 1}], dtype=object), allow_pickle=True)
            elif isinstance(arr, str) and arr == "missing":
                target.unlink()
            else:
                np.save(target, arr)
        return str(folder)

    s0 = files[0].stem
    W["m_size"] = mask_folder("m_size", {s0: np.zeros((8, 8), np.int64)})
    W["m_float"] = mask_folder("m_float", {s0: np.full((16, 16), 0.5)})
    W["m_nan"] = mask_folder("m_nan", {s0: np.full((16, 16), np.nan)})
    W["m_3d"] = mask_folder("m_3d", {s0: np.zeros((16, 16, 3), np.int64)})
    W["m_neg"] = mask_folder("m_neg", {s0: np.full((16, 16), -1, np.int64)})
    W["m_big"] = mask_folder("m_big", {s0: np.full((16, 16), 300, np.int64)})
    W["m_pickle"] = mask_folder("m_pickle", {s0: "pickle"})
    W["m_huge"] = mask_folder("m_huge", {s0: "hugeheader"})
    W["m_bomb"] = mask_folder("m_bomb", {s0: "bomb"})
    W["m_missing"] = mask_folder("m_missing", {s0: "missing"})
    W["mask_ids"] = str(png(root / "mask_ids.png", np.full((16, 16), 9, np.uint8)))
    W["mask_size"] = str(png(root / "mask_size.png", np.zeros((8, 8), np.uint8)))
    W["mask_junk"] = str(root / "mask_junk.png")
    (root / "mask_junk.png").write_bytes(b"junk")
    W["mask_bomb"] = str(bomb_png(root / "mask_bomb.png"))
    np.save(root / "mask_float.npy", np.full((16, 16), 0.5))
    W["mask_float"] = str(root / "mask_float.npy")

    # hostile artifacts: malformed headers and metadata (the same set is given to every artifact reader)
    bad = root / "bad"
    bad.mkdir()
    good_meta = artifacts.read_metadata(model)
    W["h_list"] = str(raw_safetensors(bad / "list.safetensors", [1, 2, 3]))
    W["h_metastr"] = str(raw_safetensors(bad / "metastr.safetensors", {"__metadata__": "abc"}))
    W["h_metanum"] = str(raw_safetensors(bad / "metanum.safetensors", {"__metadata__": {**good_meta, "ddguide.kind": 5}}))
    W["h_metanull"] = str(raw_safetensors(bad / "metanull.safetensors", {"__metadata__": None, "x": 1}))
    W["h_huge"] = str(raw_safetensors(bad / "huge.safetensors", b"{}"))
    with open(bad / "huge.safetensors", "r+b") as f:
        f.write(struct.pack("<Q", 10**12))
    W["h_notjson"] = str(raw_safetensors(bad / "notjson.safetensors", b"{nope"))
    W["h_empty"] = str(bad / "empty.safetensors")
    (bad / "empty.safetensors").write_bytes(b"")
    W["h_random"] = str(bad / "random.safetensors")
    (bad / "random.safetensors").write_bytes(np.random.default_rng(0).integers(0, 255, 4096, dtype=np.uint8).tobytes())
    W["h_trunc"] = str(bad / "trunc.safetensors")
    (bad / "trunc.safetensors").write_bytes(model.read_bytes()[: model.stat().st_size // 2])
    W["h_entry"] = str(raw_safetensors(bad / "entry.safetensors", {"__metadata__": good_meta,
                                                                     "w": {"dtype": "F32", "shape": "x",
                                                                           "data_offsets": [0, 4]}}, b"\0" * 8))
    W["h_offsets"] = str(raw_safetensors(bad / "offsets.safetensors", {"__metadata__": good_meta,
                                                                         "w": {"dtype": "F32", "shape": [1000],
                                                                               "data_offsets": [0, 4000]}}, b"\0" * 8))
    W["h_dtype"] = str(raw_safetensors(bad / "dtype.safetensors", {"__metadata__": good_meta,
                                                                     "w": {"dtype": "Q77", "shape": [1],
                                                                           "data_offsets": [0, 4]}}, b"\0" * 8))
    W["h_schema"] = str(rewrite(model, bad / "schema.safetensors", meta={"ddguide.schema": "one"}))
    W["h_schema2"] = str(rewrite(model, bad / "schema2.safetensors", meta={"ddguide.schema": "2"}))
    W["h_config"] = str(rewrite(model, bad / "config.safetensors", meta={"ddguide.config": "{not json"}))
    W["h_configlist"] = str(rewrite(model, bad / "configlist.safetensors", meta={"ddguide.config": "[1, 2]"}))
    W["h_nokind"] = str(rewrite(model, bad / "nokind.safetensors", meta={"ddguide.kind": ""}))
    W["h_kindmarkup"] = str(rewrite(model, bad / "kindmarkup.safetensors",
                                    meta={"ddguide.kind": f"[bold]x{ESC}[31m"}))

    # hostile models
    mcfg = artifacts.load(model).config
    mt = artifacts.load(model).tensors
    W["m_nounet"] = str(rewrite(model, bad / "nounet.safetensors", config={k: v for k, v in mcfg.items() if k != "unet"}))
    W["m_nodiff"] = str(rewrite(model, bad / "nodiff.safetensors",
                                config={k: v for k, v in mcfg.items() if k != "diffusion"}))
    W["m_unettype"] = str(rewrite(model, bad / "unettype.safetensors",
                                  config={**mcfg, "unet": {**mcfg["unet"], "model_channels": "8x"}}))
    W["m_unetlist"] = str(rewrite(model, bad / "unetlist.safetensors", config={**mcfg, "unet": [8]}))
    W["m_unetunknown"] = str(rewrite(model, bad / "unetunknown.safetensors",
                                     config={**mcfg, "unet": {**mcfg["unet"], "wings": 2}}))
    W["m_channels"] = str(rewrite(model, bad / "channels.safetensors",
                                  config={**mcfg, "unet": {**mcfg["unet"], "model_channels": 4096}}))
    W["m_resblocks"] = str(rewrite(model, bad / "resblocks.safetensors",
                                   config={**mcfg, "unet": {**mcfg["unet"], "num_res_blocks": 10**6}}))
    W["m_negchan"] = str(rewrite(model, bad / "negchan.safetensors",
                                 config={**mcfg, "unet": {**mcfg["unet"], "model_channels": -8}}))
    W["m_steps"] = str(rewrite(model, bad / "steps.safetensors",
                               config={**mcfg, "diffusion": {**mcfg["diffusion"], "steps": "many"}}))
    W["m_schedule"] = str(rewrite(model, bad / "schedule.safetensors",
                                  config={**mcfg, "diffusion": {**mcfg["diffusion"], "schedule": "wavy"}}))
    W["m_classes"] = str(rewrite(model, bad / "mclasses.safetensors", config={**mcfg, "classes": "abc"}))
    first = sorted(mt)[0]
    W["m_nan"] = str(rewrite(model, bad / "mnan.safetensors",
                             tensors={**mt, first: torch.full_like(mt[first], float("nan"))}))
    W["m_inf"] = str(rewrite(model, bad / "minf.safetensors",
                             tensors={**mt, first: torch.full_like(mt[first], float("inf"))}))
    W["m_drop"] = str(rewrite(model, bad / "mdrop.safetensors", drop=[first]))
    W["m_shape"] = str(rewrite(model, bad / "mshape.safetensors", tensors={**mt, first: torch.zeros(3, 3)}))
    W["m_int"] = str(rewrite(model, bad / "mint.safetensors", tensors={**mt, first: mt[first].long()}))

    # hostile heads
    hart = artifacts.load(head)
    hcfg, ht = hart.config, hart.tensors
    hfirst = sorted(ht)[0]
    W["hd_nofield"] = str(rewrite(head, bad / "hnofield.safetensors",
                                  config={k: v for k, v in hcfg.items() if k != "in_channels"}))
    W["hd_unknown"] = str(rewrite(head, bad / "hunknown.safetensors", config={**hcfg, "wings": 1}))
    W["hd_bigin"] = str(rewrite(head, bad / "hbigin.safetensors", config={**hcfg, "in_channels": 2**24}))
    W["hd_classes"] = str(rewrite(head, bad / "hclasses.safetensors", config={**hcfg, "classes": "ab"}))
    W["hd_kind"] = str(rewrite(head, bad / "hkind.safetensors", config={**hcfg, "kind": "oracle"}))
    W["hd_temp"] = str(rewrite(head, bad / "htemp.safetensors", config={**hcfg, "temperature": -1}))
    W["hd_tempstr"] = str(rewrite(head, bad / "htempstr.safetensors", config={**hcfg, "temperature": "hot"}))
    W["hd_spec"] = str(rewrite(head, bad / "hspec.safetensors", config={**hcfg, "spec": {"blocks": "mid"}}))
    W["hd_nan"] = str(rewrite(head, bad / "hnan.safetensors",
                              tensors={**ht, hfirst: torch.full_like(ht[hfirst], float("nan"))}))
    W["hd_drop"] = str(rewrite(head, bad / "hdrop.safetensors", drop=[hfirst]))
    W["hd_size"] = str(rewrite(head, bad / "hsize.safetensors", config={**hcfg, "image_size": 10**9}))

    # hostile features
    fart = artifacts.load(feats)
    W["f_noimages"] = str(rewrite(feats, bad / "fnoimages.safetensors", drop=["images"]))
    W["f_nospec"] = str(rewrite(feats, bad / "fnospec.safetensors",
                                config={k: v for k, v in fart.config.items() if k != "spec"}))
    W["f_labels"] = str(rewrite(feats, bad / "flabels.safetensors",
                                tensors={**fart.tensors, "labels": torch.full_like(fart.tensors["labels"], -3)}))
    W["f_rows"] = str(rewrite(feats, bad / "frows.safetensors",
                              tensors={**fart.tensors, "labels": fart.tensors["labels"][:3]}))
    fk = next(k for k in fart.tensors if k.startswith("feat."))
    W["f_nan"] = str(rewrite(feats, bad / "fnan.safetensors",
                             tensors={**fart.tensors, fk: torch.full_like(fart.tensors[fk], float("nan"))}))

    # a fid-stats artifact with mismatched shapes
    from ddguide.core.artifacts import save

    W["stats_bad"] = str(save(bad / "stats.safetensors", {"mu": torch.zeros(4), "sigma": torch.zeros(3, 3)},
                              kind="fid-stats", config={"features": {"kind": "denoiser"}, "n": 5}, fingerprint=""))
    W["stats_nan"] = str(save(bad / "statsnan.safetensors", {"mu": torch.full((4,), float("nan")),
                                                             "sigma": torch.eye(4)},
                              kind="fid-stats", config={"features": {"kind": "denoiser"}, "n": 5}, fingerprint=""))

    # a training checkpoint without its loss history (a run of `train` resumes from it)
    from ddguide.core.checkpoint import checkpoint_path
    from ddguide.stages.train import TrainConfig, train, train_recipe

    tdir = root / "trained"
    cfg = TrainConfig(data=str(data / "images"), out=str(tdir / "m.safetensors"), preset="tiny", device="cpu",
                      recipe=train_recipe(steps=1, batch=2, precision="fp32", checkpoint_every=1))
    train(cfg)
    ck = checkpoint_path(cfg.out)
    nolosses = root / "nolosses"
    nolosses.mkdir()
    rewrite(ck, nolosses / "m.ckpt.safetensors", drop=["losses"])
    norng = root / "norng"
    norng.mkdir()
    rewrite(ck, norng / "m.ckpt.safetensors", drop=["rng"])
    nostep = root / "nostep"
    nostep.mkdir()
    rewrite(ck, nostep / "m.ckpt.safetensors", config={"identity": artifacts.load(ck).config["identity"]})
    W.update(nolosses=str(nolosses / "m.safetensors"), norng=str(norng / "m.safetensors"),
             nostep=str(nostep / "m.safetensors"), tdata=str(data / "images"))
    (tdir / "m.safetensors").unlink()  # so the cases below do not find a finished model

    # outputs: a user's folder, a regular file, and places that cannot hold an output
    user = root / "userdir"
    user.mkdir()
    png(user / "000000.png", np.full((16, 16, 3), 7, np.uint8))
    W["userdir"] = str(user)
    W["file"] = str(root / "regular.txt")
    (root / "regular.txt").write_text("a file\n")
    W["underfile"] = str(root / "regular.txt" / "out")
    W["unwritable"] = "/proc/ddguide-cannot-write-here/out"
    W["longname"] = str(root / ("x" * 300))
    W["existingdir"] = str(root / "existingdir")
    (root / "existingdir").mkdir()
    W["new"] = str(root / "new")  # never created by a refused case

    # a plain pickle (not written by torch.save)
    import pickle

    with open(root / "plain.pt", "wb") as f:
        pickle.dump({"a": [1, 2, 3]}, f)
    W["plain_pt"] = str(root / "plain.pt")
    W["tensor_list_pt"] = str(root / "tensor_list.pt")
    torch.save([torch.zeros(2)], root / "tensor_list.pt")
    W["cwd"] = str(root / "cwd")
    (root / "cwd").mkdir()
    return W


# ------------------------------------------------------------------------------------------------ the cases

S = ["sample", "--model", "{model}", "-n", "1", "--steps", "2", "--device", "cpu", "--out", "{new}"]
T = ["train", "{tdata}", "--preset", "tiny", "--steps", "2", "--batch", "2", "--device", "cpu",
     "--precision", "fp32", "--out", "{new}/m.safetensors"]
X = ["extract", "{images}", "--model", "{model}", "--blocks", "mid", "--timesteps", "10", "--device", "cpu",
     "--out", "{new}/f.safetensors"]
H = ["train-head", "{feats}", "--steps", "2", "--out", "{new}/h.safetensors"]
FT = ["finetune", "{classes}", "--model", "{model}", "--steps", "1", "--batch", "2", "--device", "cpu",
      "--precision", "fp32", "--out", "{new}/c.safetensors"]
C = ["cas", "--train", "{classes}", "--test", "{classes}", "--epochs", "1", "--batch", "4", "--device", "cpu",
     "--out", "{new}/r.safetensors"]
FID = ["fid", "{classes}", "{classes}", "--features", "denoiser", "--model", "{model}", "--device", "cpu",
       "--resize", "resize"]
FL = ["filter", "{samples}", "--head", "{rhead}", "--model", "{model}", "--device", "cpu", "--out", "{new}"]
D = ["data", "shapes", "{new}", "-n", "2", "--size", "16"]
DEMO = ["demo", "--model", "{model}", "--out", "{new}", "-n", "1", "--steps", "2", "--labels", "2",
        "--device", "cpu"]
CV = ["convert", "{model}", "--preset", "tiny", "--out", "{new}/m.safetensors"]


def with_(base: list[str], *args: str, drop: tuple[str, ...] = ()) -> list[str]:
    """``base`` with options replaced: a later ``--opt v`` overrides the same option in ``base``."""
    out = list(base)
    for opt in drop:
        i = out.index(opt)
        del out[i:i + 2]
    i = 0
    extra = list(args)
    while i < len(extra):
        if extra[i].startswith("-") and extra[i] in out and extra[i] not in ("--train",):
            j = out.index(extra[i])
            k = j + 1
            while k < len(out) and not out[k].startswith("-"):
                k += 1
            del out[j:k]
        i += 1
    return out + extra


ARTIFACT_HEADERS = ["h_list", "h_metastr", "h_metanum", "h_metanull", "h_huge", "h_notjson", "h_empty", "h_random",
                    "h_trunc", "h_entry", "h_offsets", "h_dtype", "h_schema", "h_schema2", "h_config",
                    "h_configlist", "h_nokind", "h_kindmarkup"]

CASES: list[tuple[str, str, list[str]]] = []


def case(kind: str, name: str, argv: list[str]) -> None:
    CASES.append((kind, name, argv))


# artifacts: every malformed header at every kind of reader
for h in ARTIFACT_HEADERS:
    case("artifact", f"info-{h}", ["info", "{%s}" % h])
    case("artifact", f"sample-model-{h}", with_(S, "--model", "{%s}" % h))
    case("artifact", f"sample-guide-{h}", with_(S, "--guide", "{%s}" % h))
    case("artifact", f"train-head-{h}", with_(H, drop=()) [:1] + ["{%s}" % h] + H[2:])
for h in ("h_list", "h_metastr", "h_config", "h_schema", "h_trunc"):
    case("artifact", f"extract-model-{h}", with_(X, "--model", "{%s}" % h))
    case("artifact", f"filter-head-{h}", with_(FL, "--head", "{%s}" % h))
    case("artifact", f"fid-stats-{h}", ["fid", "{%s}" % h, "{classes}"])
    if h in ("h_list", "h_metastr", "h_trunc"):  # convert reads the tensors of a safetensors file, not its metadata
        case("artifact", f"convert-{h}", with_(CV)[:1] + ["{%s}" % h] + CV[2:])
    case("artifact", f"train-init-{h}", with_(T, "--init", "{%s}" % h))
    case("artifact", f"finetune-model-{h}", with_(FT, "--model", "{%s}" % h))

# configs checked against tensors, before any network is built
for m in ("m_nounet", "m_nodiff", "m_unettype", "m_unetlist", "m_unetunknown", "m_channels", "m_resblocks",
          "m_negchan", "m_steps", "m_schedule", "m_classes", "m_drop", "m_shape", "m_int"):
    case("model", f"sample-{m}", with_(S, "--model", "{%s}" % m))
for m in ("m_nounet", "m_channels", "m_nan"):
    case("model", f"extract-{m}", with_(X, "--model", "{%s}" % m))
    case("model", f"fid-{m}", with_(FID, "--model", "{%s}" % m))
case("model", "finetune-m_channels", with_(FT, "--model", "{m_channels}"))
case("model", "sample-ddpm-m_nounet", with_(S, "--model", "{m_nounet}", "--sampler", "ddpm"))
for hd in ("hd_nofield", "hd_unknown", "hd_bigin", "hd_classes", "hd_kind", "hd_temp", "hd_tempstr", "hd_spec",
           "hd_drop", "hd_size"):
    case("head", f"sample-guide-{hd}", with_(S, "--guide", "{%s}" % hd))
case("head", "filter-hd_bigin", with_(FL, "--head", "{hd_bigin}"))
for f in ("f_noimages", "f_nospec", "f_labels", "f_rows", "f_nan"):
    case("features", f"train-head-{f}", ["train-head", "{%s}" % f] + H[2:])
case("features", "fid-stats-shapes", ["fid", "{stats_bad}", "{classes}"])
case("features", "fid-stats-nan", ["fid", "{stats_nan}", "{classes}"])
for ck in ("nolosses", "norng", "nostep"):
    case("checkpoint", f"train-resume-{ck}", with_(T, "--out", "{%s}" % ck))

# non-finite weights
case("nonfinite", "sample-model-nan", with_(S, "--model", "{m_nan}"))
case("nonfinite", "sample-model-inf", with_(S, "--model", "{m_inf}"))
case("nonfinite", "sample-head-nan", with_(S, "--guide", "{hd_nan}"))
case("nonfinite", "filter-head-nan", with_(FL, "--head", "{hd_nan}"))
case("nonfinite", "train-init-nan", with_(T, "--init", "{m_nan}"))
case("nonfinite", "finetune-model-nan", with_(FT, "--model", "{m_nan}"))
case("nonfinite", "convert-nan", ["convert", "{m_nan}", "--preset", "tiny", "--out", "{new}/m.safetensors"])

# numeric options: finite and in range
OPTION_CASES = [
    (S, ["--lambda", "nan", "--guide", "{head}"]), (S, ["--lambda", "inf", "--guide", "{head}"]),
    (S, ["--lambda", "-1", "--guide", "{head}"]), (S, ["--guide", "{head}:nan"]), (S, ["--guide", "{head}:inf"]),
    (S, ["--guide", "{head}:-inf"]), (S, ["--cfg", "nan"]), (S, ["--eta", "nan"]), (S, ["--eta", "2"]),
    (S, ["--guide-window", "10", "20", "--guide", "{head}"]), (S, ["--guide-window", "-1", "-5", "--guide", "{head}"]),
    (S, ["--guide-window", "20", "10"]),
    (S, ["--steps", "0"]), (S, ["--steps", "5000"]), (S, ["-n", "0"]), (S, ["-n", "-3"]), (S, ["--batch", "0"]),
    (S, ["--precision", "fp64"]), (S, ["--sampler", "euler"]), (S, ["--threshold", "nan", "--reject", "{rhead}"]),
    (S, ["--device", "tpu"]), (S, ["--guide-grad", "half", "--guide", "{head}"]), (S, ["--seed", "-1"]),
    (T, ["--lr", "inf"]), (T, ["--lr", "nan"]), (T, ["--lr", "0"]), (T, ["--ema", "2"]), (T, ["--ema", "-0.5"]),
    (T, ["--ema", "nan"]), (T, ["--grad-clip", "-1"]), (T, ["--grad-clip", "nan"]), (T, ["--p2-gamma", "nan"]),
    (T, ["--p2-gamma", "-1"]), (T, ["--p2-k", "0"]), (T, ["--lr-final", "nan"]), (T, ["--steps", "0"]),
    (T, ["--batch", "0"]), (T, ["--checkpoint-every", "0"]), (T, ["--threads", "0"]), (T, ["--resize", "stretch"]),
    (T, ["--preset", "nope"]), (T, ["--schedule", "wavy"]),
    (H, ["--steps", "-5"]), (H, ["--steps", "0"]), (H, ["--lr", "nan"]), (H, ["--lr", "-1"]),
    (H, ["--val-fraction", "1"]), (H, ["--val-fraction", "nan"]), (H, ["--batch", "0"]), (H, ["--kind", "oracle"]),
    (H, ["--blocks", "out.99"]), (H, ["--timesteps", "999"]),
    (FT, ["--lr", "nan"]), (FT, ["--ema", "2"]), (FT, ["--label-dropout", "1"]), (FT, ["--grad-clip", "-1"]),
    (FT, ["--steps", "0"]),
    (C, ["--lr", "nan"]), (C, ["--epochs", "0"]), (C, ["--mixup-cutmix", "2"]), (C, ["--milestones", "-1", "5"]),
    (C, ["--milestones", "5", "2"]), (C, ["--batch", "1"]), (C, ["--image-size", "0"]), (C, ["--arch", "vgg"]),
    (FID, ["--timestep", "-1"]), (FID, ["--timestep", "5000"]), (FID, ["--batch", "0"]), (FID, ["--features", "clip"]),
    (X, ["--batch", "0"]), (X, ["--timesteps", "-1"]), (X, ["--timesteps", "5000"]), (X, ["--noise", "loud"]),
    (X, ["--storage", "fp8"]), (X, ["--blocks", "in.99"]),
    (D, ["-n", "0"]), (D, ["--size", "3"]), (D, ["--split", "holdout"]), (D, ["--seed", "-2"]),
    (DEMO, ["--lambda", "nan"]), (DEMO, ["-n", "0"]), (DEMO, ["--labels", "0"]), (DEMO, ["--attribute", "has_wings"]),
    (FL, ["--threshold", "nan"]), (FL, ["--threshold", "1.5"]), (FL, ["--batch", "0"]),
    (X, ["--threads", "0"]), (FID, ["--threads", "0"]), (FL, ["--threads", "0"]), (DEMO, ["--threads", "0"]),
    (FID, ["--precision", "fp64"]), (FL, ["--precision", "fp64"]),
    (T, ["--arch", "[1]"]), (T, ["--arch", '{{"wings": 1}}']), (T, ["--arch", '{{"channel_mult": "x"}}']),
    (CV, ["--arch", "[1]"]), (CV, ["--arch", "{{nope"]), (CV, ["--preset", "nope"]),
]
for base, extra in OPTION_CASES:
    case("option", f"{base[0] if base[0] != 'data' else 'shapes'}-{'_'.join(extra).replace('{', '').replace('}', '')}",
         with_(base, *extra))

# images
for img in ("img_junk", "img_empty", "img_bomb", "img_size", "img_trunc"):
    case("image", f"extract-{img}", with_(X, "--resize", "refuse")[:1] + ["{%s}" % img] + X[2:])
    case("image", f"cas-{img}", with_(C, "--train", "{%s}" % img, drop=("--train",)))
for img in ("img_junk", "img_bomb"):
    case("image", f"train-{img}", ["train", "{%s}" % img] + T[2:])
    case("image", f"fid-{img}", ["fid", "{%s}" % img] + FID[2:])
    case("image", f"finetune-{img}", ["finetune", "{%s}" % img] + FT[2:])
case("image", "extract-noimages", ["extract", "{noimages}"] + X[2:])
case("image", "filter-badimage", with_(FL)[:1] + ["{idx_badimage}"] + FL[2:])
case("image", "filter-bomb", with_(FL)[:1] + ["{idx_bomb}"] + FL[2:])
case("image", "finetune-oneclass", ["finetune", "{oneclass}"] + FT[2:])

# label files
for lab in ("lab_two", "lab_text", "lab_missing", "lab_columns", "lab_empty", "lab_header", "lab_nan",
            "lab_celeba_bad", "lab_binary"):
    case("labels", f"extract-{lab}", with_(X, "--labels", "{%s}" % lab, "--label", "has_circle"))
case("labels", "extract-no-such-column", with_(X, "--labels", "{attrs}", "--label", "has_wings"))
case("labels", "extract-labels-folder", with_(X, "--labels", "{data}", "--label", "has_circle"))
case("labels", "extract-label-without-file", with_(X, "--label", "has_circle"))
case("labels", "filter-unknown-class", with_(FL)[:1] + ["{idx_unknown_class}"] + FL[2:])
case("labels", "filter-no-class-column", with_(FL)[:1] + ["{idx_noclass}"] + FL[2:])
case("labels", "filter-missing-file", with_(FL)[:1] + ["{idx_missing}"] + FL[2:])

# masks
for m in ("m_size", "m_float", "m_nan", "m_3d", "m_neg", "m_big", "m_pickle", "m_huge", "m_bomb", "m_missing"):
    case("mask", f"extract-{m}", with_(X, "--masks", "{%s}" % m))
for m in ("mask_ids", "mask_size", "mask_junk", "mask_bomb", "mask_float"):
    case("mask", f"sample-{m}", with_(S, "--guide", "{shead}", "--mask", "{%s}" % m))
case("mask", "sample-mask-without-guide", with_(S, "--mask", "{mask}"))

# outputs
for base, flag, name in ((S, "--out", "sample"), (FL, "--out", "filter")):
    case("output", f"{name}-user-folder", with_(base, flag, "{userdir}"))
    case("output", f"{name}-regular-file", with_(base, flag, "{file}"))
    case("output", f"{name}-under-file", with_(base, flag, "{underfile}"))
    case("output", f"{name}-unwritable", with_(base, flag, "{unwritable}"))
    case("output", f"{name}-long-name", with_(base, flag, "{longname}"))
for base, name in ((X, "extract"), (H, "train-head"), (T, "train"), (FT, "finetune"), (C, "cas"), (CV, "convert")):
    case("output", f"{name}-existing-folder", with_(base, "--out", "{existingdir}"))
    case("output", f"{name}-under-file", with_(base, "--out", "{underfile}"))
    case("output", f"{name}-unwritable", with_(base, "--out", "{unwritable}"))
    case("output", f"{name}-long-name", with_(base, "--out", "{longname}.safetensors"))
case("output", "fid-save-stats-folder", with_(FID, "--save-stats", "{existingdir}"))
case("output", "fid-save-stats-under-file", with_(FID, "--save-stats", "{underfile}"))
case("output", "shapes-regular-file", ["data", "shapes", "{file}", "-n", "2", "--size", "16"])
case("output", "shapes-user-folder", ["data", "shapes", "{userdir}", "-n", "2", "--size", "16"])
case("output", "shapes-under-file", ["data", "shapes", "{underfile}", "-n", "2", "--size", "16"])
case("output", "shapes-long-name", ["data", "shapes", "{longname}", "-n", "2", "--size", "16"])
case("output", "demo-regular-file", with_(DEMO, "--out", "{file}"))
case("output", "demo-under-file", with_(DEMO, "--out", "{underfile}"))
case("output", "sample-precision-leaves-nothing", with_(S, "--precision", "fp64"))

# paths named in files stay inside their folder
case("path", "filter-dotdot", with_(FL)[:1] + ["{idx_dotdot}"] + FL[2:])
case("path", "filter-absolute", with_(FL)[:1] + ["{idx_abs}"] + FL[2:])
case("path", "fid-dotdot", ["fid", "{idx_dotdot}"] + FID[2:])
case("path", "fid-absolute", ["fid", "{idx_abs}/index.csv"] + FID[2:])
case("path", "cas-dotdot", with_(C, "--train", "{idx_dotdot}", drop=("--train",)))
case("path", "cas-absolute", with_(C, "--train", "{idx_abs}", drop=("--train",)))
case("path", "finetune-dotdot", ["finetune", "{idx_dotdot}"] + FT[2:])
case("path", "finetune-absolute", ["finetune", "{idx_abs}"] + FT[2:])

# terminal strings: markup and escapes from files are shown literally
case("terminal", "extract-markup-names", ["extract", "{img_markup}"] + X[2:])
case("terminal", "extract-escape-names", ["extract", "{img_escape}"] + X[2:])
case("terminal", "extract-newline-names", ["extract", "{img_newline}"] + X[2:])
case("terminal", "sample-kind-markup", with_(S, "--model", "{h_kindmarkup}"))
case("terminal", "info-kind-markup", ["info", "{h_kindmarkup}"])

# hostile sizes
case("size", "sample-model-4096-channels", with_(S, "--model", "{m_channels}"))
case("size", "sample-head-2**24-inputs", with_(S, "--guide", "{hd_bigin}"))
case("size", "extract-bomb", ["extract", "{img_bomb}"] + X[2:])
case("size", "cas-bomb", with_(C, "--train", "{img_bomb}", drop=("--train",)))
case("size", "extract-mask-huge-npy", with_(X, "--masks", "{m_huge}"))
case("size", "shapes-huge-n", ["data", "shapes", "{new}", "-n", str(10**13), "--size", "16"])
case("size", "shapes-huge-size", ["data", "shapes", "{new}", "-n", "1", "--size", str(2**20)])
case("size", "sample-huge-batch", with_(S, "--batch", str(10**12)))


def _ids(c):
    return f"{c[0]}:{c[1]}"


def _snapshot(root: Path) -> dict[str, tuple]:
    """Every file (size, modification time) and folder (its name) under ``root``: a folder's own time changes
    when a lock file comes and goes beside an output, which leaves nothing behind."""
    found: dict[str, tuple] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames:
            found[str((Path(dirpath) / name).relative_to(root))] = ("folder",)
        for name in filenames:
            p = Path(dirpath) / name
            st = p.lstat()
            found[str(p.relative_to(root))] = (st.st_size, st.st_mtime_ns)
    return found


class CaseTimeout(BaseException):
    """Raised by the alarm when a case runs too long (a BaseException, so no handler swallows it)."""


CASE_SECONDS = 30
MEMORY_LIMIT = 6 * 2**30  # address space a case may grow to beyond what the tests already use


def run_main(argv: list[str], monkeypatch, capsys) -> tuple[int, str]:
    """``ddguide ARGV`` through ``main()`` under a time limit and a memory cap: (exit code, output)."""
    import resource
    import signal

    from ddguide.cli import main

    def alarm(*_):
        raise CaseTimeout()

    monkeypatch.setattr("sys.argv", ["ddguide", *argv])
    code = 0
    old = signal.signal(signal.SIGALRM, alarm)
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    used = int(open("/proc/self/statm").read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    resource.setrlimit(resource.RLIMIT_AS, (used + MEMORY_LIMIT, hard))
    signal.alarm(CASE_SECONDS)
    try:
        main()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    except CaseTimeout:
        code = -1
    except MemoryError:
        code = -2
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def test_there_are_enough_cases():
    assert len(CASES) >= 120
    assert len({_ids(c) for c in CASES}) == len(CASES)
    kinds = {c[0] for c in CASES}
    assert {"artifact", "model", "head", "image", "labels", "mask", "option", "output", "path", "terminal",
            "size", "nonfinite"} <= kinds
    commands = {c[2][0] for c in CASES}
    assert commands >= {"convert", "sample", "train", "data", "extract", "train-head", "demo", "filter", "info",
                        "fid", "finetune", "cas"}


@pytest.mark.parametrize("kind, name, argv", CASES, ids=[_ids(c) for c in CASES])
def test_bad_input_is_refused_cleanly(kind, name, argv, world, monkeypatch, capsys):
    root = Path(world["root"])
    monkeypatch.chdir(world["cwd"])  # outputs with a default path would land here
    monkeypatch.setenv("DDGUIDE_PROGRESS_SECONDS", "1000")
    args = [a.format_map(world) for a in argv]
    before = _snapshot(root)
    try:
        code, output = run_main(args, monkeypatch, capsys)
        after = _snapshot(root)
    finally:  # a case that wrongly succeeds must not change what the next cases see
        shutil.rmtree(world["new"], ignore_errors=True)
        for p in Path(world["cwd"]).iterdir():
            shutil.rmtree(p) if p.is_dir() else p.unlink()
    text = output.strip()
    assert code == 2, f"exit {code}: {text}"
    assert "Traceback" not in text and len(text.splitlines()) == 1, text
    assert ESC not in text, repr(text)
    assert before == after, {k: (before.get(k), after.get(k)) for k in set(before) | set(after)
                             if before.get(k) != after.get(k)}
    if kind == "terminal" and "markup" in name:
        assert "[/]" in text or "[bold]" in text, text
