"""Self-describing safetensors artifacts: kind, schema, version, config and model fingerprint.

Every file ddguide writes is a safetensors file whose string metadata holds

    ddguide.kind         model | features | head | samples | fid-stats | report | checkpoint
    ddguide.schema       integer, bumped when the layout of a kind changes
    ddguide.version      the package version that wrote it
    ddguide.config       the full config as JSON
    ddguide.fingerprint  content hash of the model the artifact came from (a model's own hash)

Loaders check kind and schema, consumers check the fingerprint, and writes are atomic:
the bytes go to a temporary file in the destination folder which is then renamed over the target.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterable, Protocol

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file as st_load_file
from safetensors.torch import save as st_save_bytes

from ddguide import __version__
from ddguide.core.errors import UserError

SCHEMA = 1
KINDS = ("model", "features", "head", "samples", "fid-stats", "report", "checkpoint")
_PREFIX = "ddguide."


@dataclass
class Artifact:
    """A loaded artifact: its tensors plus what the metadata says about them."""

    path: Path
    kind: str
    config: dict[str, Any]
    fingerprint: str
    tensors: dict[str, torch.Tensor]
    schema: int = SCHEMA
    version: str = ""
    extra: dict[str, str] = field(default_factory=dict)


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` on a temporary file beside ``path`` and rename it into place.

    A killed process leaves at most a ``.tmp-*`` file, never a half-written ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".tmp-{path.name}.", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; give the usual permissions
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_bytes(data))


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def fingerprint(tensors: dict[str, torch.Tensor]) -> str:
    """Content hash of a set of named tensors (names, dtypes, shapes and bytes), 16 hex digits."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous().reshape(-1)  # 0-dim tensors cannot be viewed as bytes
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(tensors[name].shape)).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def save(
    path: str | os.PathLike,
    tensors: dict[str, torch.Tensor],
    *,
    kind: str | None = None,
    config: "dict[str, Any] | ArtifactMeta",
    fingerprint: str,
    extra: dict[str, str] | None = None,
) -> Path:
    """Write a safetensors artifact atomically. ``config`` is a JSON object or a typed ``*Meta`` (whose kind is
    then the default); ``extra`` holds further string metadata."""
    kind, config = _kind_and_config(kind, config)
    meta = _metadata(kind, config, fingerprint, extra)
    flat = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    data = st_save_bytes(flat, metadata=meta)
    return atomic_write_bytes(path, data)


def _kind_and_config(kind: str | None, config: "dict[str, Any] | ArtifactMeta") -> tuple[str, dict[str, Any]]:
    """A typed config gives its own kind (which an explicit ``kind`` must agree with) and JSON object."""
    if isinstance(config, dict):
        if kind is None:
            raise ValueError("an untyped config needs its artifact kind")
        return kind, config
    if kind is not None and kind != config.KIND:
        raise ValueError(f"a {type(config).__name__} is a {config.KIND!r} config, not {kind!r}")
    return config.KIND, config.to_metadata()


def _metadata(kind: str, config: dict[str, Any], fingerprint: str, extra: dict[str, str] | None) -> dict[str, str]:
    """The string metadata of an artifact: the ``ddguide.*`` envelope around ``config`` plus ``extra``."""
    if kind not in KINDS:
        raise ValueError(f"unknown artifact kind {kind!r}")
    meta = {
        _PREFIX + "kind": kind,
        _PREFIX + "schema": str(SCHEMA),
        _PREFIX + "version": __version__,
        _PREFIX + "config": json.dumps(config, sort_keys=True),
        _PREFIX + "fingerprint": fingerprint,
    }
    meta.update({_PREFIX + key: str(value) for key, value in (extra or {}).items()})
    return meta


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The metadata of a safetensors file, without reading its tensors (the header is checked first)."""
    return dict(read_header(path)[0])


HEADER_LIMIT = 100_000_000  # bytes of JSON header a file may claim


def read_header(path: str | os.PathLike) -> tuple[dict[str, str], dict[str, dict[str, Any]]]:
    """(metadata, tensor entries) of a safetensors file, every field type-checked: the metadata a map of
    strings, each entry a known dtype, a shape of whole numbers and data offsets that fit the file."""
    path = Path(path)
    _require_file(path)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            header_len = int.from_bytes(f.read(8), "little")
            if header_len <= 0 or header_len > min(HEADER_LIMIT, size - 8):
                raise ValueError
            header = json.loads(f.read(header_len))
    except (ValueError, OSError, UnicodeDecodeError, RecursionError):
        raise UserError(f"{path}: not a safetensors file") from None
    if not isinstance(header, dict):
        raise UserError(f"{path}: not a safetensors file (its header is not a JSON object)")
    meta = header.pop("__metadata__", None)
    if meta is None:
        meta = {}
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise UserError(f"{path}: malformed safetensors metadata (expected a map of strings)")
    data = size - 8 - header_len
    for name, entry in header.items():
        _check_entry(path, name, entry, data)
    return meta, header


_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4,
             "U16": 2, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


def _check_entry(path: Path, name: str, entry: Any, data: int) -> None:
    ok = (isinstance(entry, dict) and entry.get("dtype") in _ITEMSIZE and isinstance(entry.get("shape"), list)
          and all(type(s) is int and s >= 0 for s in entry["shape"]) and isinstance(entry.get("data_offsets"), list)
          and len(entry["data_offsets"]) == 2 and all(type(o) is int for o in entry["data_offsets"]))
    if ok:
        lo, hi = entry["data_offsets"]
        ok = 0 <= lo <= hi <= data and hi - lo == _numel(entry["shape"]) * _ITEMSIZE[entry["dtype"]]
    if not ok:
        raise UserError(f"{path}: malformed safetensors entry for tensor {name[:80]!r} (truncated or corrupt file)")


def _typed_metadata(path: Path, meta: dict[str, str]) -> tuple[int, dict[str, Any]]:
    """ddguide.schema as an integer and ddguide.config as a JSON object, or one line saying which is broken."""
    text = meta.get(_PREFIX + "schema", "0")
    if not text.isascii() or not text.isdigit() or len(text) > 9:
        raise UserError(f"{path}: ddguide.schema is not a whole number ({text[:40]!r})")
    try:
        config = json.loads(meta.get(_PREFIX + "config", "{}"))
    except (ValueError, RecursionError):
        raise UserError(f"{path}: ddguide.config is not valid JSON") from None
    if not isinstance(config, dict):
        raise UserError(f"{path}: ddguide.config is not a JSON object")
    return int(text), config


@dataclass(frozen=True)
class Description:
    """What an artifact's metadata says, read without its tensors."""

    path: Path
    kind: str
    schema: int
    version: str
    fingerprint: str
    config: dict[str, Any]
    extra: dict[str, str] = field(default_factory=dict)

    def envelope(self) -> dict[str, str]:
        """kind, schema, version and fingerprint as the strings stored in the file."""
        return {"kind": self.kind, "schema": str(self.schema), "version": self.version,
                "fingerprint": self.fingerprint}

    def typed(self) -> "ArtifactMeta | None":
        """The config as its kind's ``*Meta`` (validated), or None for a kind without one."""
        meta_type = META_TYPES.get(self.kind)
        return meta_type.from_metadata(self.config, self.path) if meta_type else None


_ENVELOPE = ("kind", "schema", "version", "config", "fingerprint")


def describe(path: str | os.PathLike, kind: str | Iterable[str] | None = None) -> Description:
    """An artifact's metadata, without its tensors, after the same checks as :func:`load` (of ``kind`` when
    given): a ddguide artifact of a known kind and of this schema, whose config is a JSON object."""
    path = Path(path)
    meta, _ = read_header(path)
    found = meta.get(_PREFIX + "kind")
    if not found:
        raise UserError(f"{path}: a safetensors file but not a ddguide artifact (no ddguide.kind metadata)")
    wanted = (kind,) if isinstance(kind, str) else tuple(kind or ())
    if wanted and found not in wanted:
        raise UserError(f"{path}: is a {found!r} artifact, expected {' or '.join(map(repr, wanted))}")
    if found not in KINDS:
        raise UserError(f"{path}: unknown artifact kind {found[:40]!r} ({', '.join(KINDS)})")
    schema, config = _typed_metadata(path, meta)
    if schema != SCHEMA:
        raise UserError(f"{path}: artifact schema {schema} is not supported (this ddguide reads schema {SCHEMA})")
    extra = {k[len(_PREFIX):]: v for k, v in meta.items()
             if k.startswith(_PREFIX) and k[len(_PREFIX):] not in _ENVELOPE}
    return Description(path, found, schema, meta.get(_PREFIX + "version", ""), meta.get(_PREFIX + "fingerprint", ""),
                       config, extra)


def check_finite(path: str | os.PathLike, tensors: dict[str, torch.Tensor]) -> None:
    """Refuse NaN or infinite values in floating tensors (broken weights give black images, not an error)."""
    for name, value in tensors.items():
        if value.is_floating_point() and value.numel() and not bool(torch.isfinite(value).all()):
            raise UserError(f"{path}: tensor {name} holds NaN or infinite values (the file's weights are broken)")


def load(
    path: str | os.PathLike,
    kind: str | Iterable[str] | None = None,
    *,
    device: str | torch.device = "cpu",
) -> Artifact:
    """Load an artifact, refusing files of another kind or of an unknown schema."""
    d = describe(path, kind)
    try:
        tensors = st_load_file(d.path)  # one private mapping of the file: a 2.2 GB model costs 2.2 GB, not twice
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise UserError(f"{d.path}: unreadable safetensors data ({str(e)[:200]})") from None
    check_finite(d.path, tensors)
    if str(device) != "cpu":
        tensors = {k: v.to(device) for k, v in tensors.items()}
    return Artifact(path=d.path, kind=d.kind, config=d.config, fingerprint=d.fingerprint, tensors=tensors,
                    schema=d.schema, version=d.version, extra=d.extra)


def check_fields(cls: type, data: Any, where: str) -> dict[str, Any]:
    """``data`` checked against dataclass ``cls``: a JSON object with no unknown or missing fields, each of its
    annotated type (int, float, bool, str, lists, tuples, dicts, ``X | None``); returns it unchanged."""
    import dataclasses
    import typing

    if not isinstance(data, dict):
        raise UserError(f"{where}: expected a JSON object, found {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise UserError(f"{where}: unknown field(s) {', '.join(map(str, unknown))[:120]}")
    missing = [n for n, f in fields.items() if n not in data and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]  # type: ignore[misc]
    if missing:
        raise UserError(f"{where}: missing field(s) {', '.join(missing)}")
    for name, value in data.items():
        if not _fits(value, hints[name]):
            raise UserError(f"{where}: field {name} should be {_type_name(hints[name])}, found {str(value)[:40]!r}")
    return data


def _fits(value: Any, tp: Any) -> bool:
    import math
    import types
    import typing

    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, a) for a in args)
    if tp is type(None):
        return value is None
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if tp is str:
        return isinstance(value, str)
    if origin in (list, tuple):
        item = args[0] if args else Any
        return isinstance(value, (list, tuple)) and all(_fits(v, item) for v in value)
    if origin is dict or tp is dict:
        return isinstance(value, dict) and all(isinstance(k, str) for k in value)
    return True


def _type_name(tp: Any) -> str:
    return str(tp).replace("typing.", "").replace("<class '", "").replace("'>", "")


def check_fingerprint(expected: str, actual: str, *, consumer: str | os.PathLike, source: str | os.PathLike) -> None:
    """Refuse to combine artifacts that came from different models."""
    if expected != actual:
        raise UserError(
            f"{consumer} was made from model {expected} but {source} is model {actual}; "
            "heads and features only work with the model they were made from"
        )


# ------------------------------------------------------------------------------------------ typed configs
#
# One frozen dataclass per kind: ``to_metadata()`` gives the JSON object stored as ``ddguide.config`` and
# ``from_metadata(config, path)`` reads it back, refusing a malformed one in one line naming ``path``. The
# stage that owns a kind adds its deeper checks (a model's architecture, a head's kind, a feature spec).


class ArtifactMeta(Protocol):
    """What every typed config offers."""

    KIND: ClassVar[str]

    def to_metadata(self) -> dict[str, Any]: ...

    @classmethod
    def from_metadata(cls, config: dict[str, Any], path: str | os.PathLike) -> "ArtifactMeta": ...


META_TYPES: dict[str, type] = {}  # artifact kind -> its typed config


def typed_config(kind: str) -> Callable[[type], type]:
    """Class decorator: ``cls`` is the typed config of artifact ``kind`` (``cls.KIND``, :data:`META_TYPES`)."""
    if kind not in KINDS:
        raise ValueError(f"unknown artifact kind {kind!r}")

    def register(cls: type) -> type:
        cls.KIND = kind  # type: ignore[attr-defined]
        META_TYPES[kind] = cls
        return cls

    return register


def _optional(data: dict[str, Any], names: Iterable[str]) -> dict[str, Any]:
    """``data`` without the fields among ``names`` that are None (writers leave those out of the file)."""
    names = set(names)
    return {k: v for k, v in data.items() if k not in names or v is not None}


def _fields_of(meta: Any) -> dict[str, Any]:
    """A dataclass's fields as a shallow dict (``dataclasses.asdict`` would copy every nested list)."""
    import dataclasses

    return {f.name: getattr(meta, f.name) for f in dataclasses.fields(meta)}


NETWORKS = ("diffusers",)  # networks a model artifact may name besides ddguide's own ADM U-Net


@typed_config("model")
@dataclass(frozen=True)
class ModelMeta:
    """A model's config: its U-Net and diffusion sections, its class names (None: unconditional), whether its
    last class-embedding row is a null class (``null_class``: true for ``finetune``'s models, false for converted
    class-conditional checkpoints; None where the file does not say), which network the ``unet`` section
    describes (``network``: None for ddguide's ADM U-Net, ``diffusers`` for a diffusers ``UNet2DModel`` config)
    and whatever its writer records about where it came from (``preset``, ``train``, ``finetune``,
    ``trained_steps``, ``finetuned_from``, ``converted_from`` ...), all stored side by side in one JSON object."""

    KIND: ClassVar[str]
    unet: dict[str, Any]
    diffusion: dict[str, Any]
    classes: list[str] | None = None
    null_class: bool | None = None
    network: str | None = None
    info: dict[str, Any] = field(default_factory=dict)

    SECTIONS: ClassVar[tuple[str, ...]] = ("unet", "diffusion", "classes", "null_class", "network")
    OPTIONAL: ClassVar[tuple[str, ...]] = ("null_class", "network")  # left out of the file when None

    def __post_init__(self) -> None:
        clash = sorted(set(self.info) & set(self.SECTIONS))
        if clash:
            raise ValueError(f"model info may not hold {', '.join(clash)}")

    def to_metadata(self) -> dict[str, Any]:
        sections = {"unet": self.unet, "diffusion": self.diffusion, "classes": self.classes,
                    "null_class": self.null_class, "network": self.network}
        return {**_optional(sections, self.OPTIONAL), **self.info}

    @classmethod
    def from_metadata(cls, config: dict[str, Any], path: str | os.PathLike) -> "ModelMeta":
        for section in ("unet", "diffusion"):
            if not isinstance(config.get(section), dict):
                raise UserError(f"{path}: a model config without its {section!r} section")
        classes = config.get("classes")
        if classes is not None and not (isinstance(classes, list) and all(isinstance(c, str) for c in classes)):
            raise UserError(f"{path}: the model config's classes should be a list of names")
        sections = {k: config[k] for k in cls.SECTIONS if k in config}
        check_fields(cls, sections, f"{path}: model config")
        if sections.get("network") not in (None, *NETWORKS):
            raise UserError(f"{path}: unknown network {str(sections['network'])[:40]!r} (this ddguide builds "
                            f"ADM U-Nets and {', '.join(NETWORKS)})")
        return cls(info={k: v for k, v in config.items() if k not in cls.SECTIONS}, **sections)


@typed_config("features")
@dataclass(frozen=True)
class FeaturesMeta:
    """A features artifact's config: the feature spec (blocks, timesteps, noise, seed), the image size and
    count, which model and which images (a hash of their paths and sizes) the taps came from, their storage
    dtype, and the targets: ``label`` (an attribute, ``class``, ``mask`` or None) with the class names or the
    number of mask ids."""

    KIND: ClassVar[str]
    spec: dict[str, Any]
    image_size: int
    model: str = ""
    count: int = 0
    images_hash: str = ""
    storage: str = "fp32"
    label: str | None = None
    classes: list[str] | None = None  # attribute and class-folder targets
    mask_classes: int | None = None  # mask targets

    OPTIONAL: ClassVar[tuple[str, ...]] = ("classes", "mask_classes")  # left out of the file when None

    def to_metadata(self) -> dict[str, Any]:
        return _optional(_fields_of(self), self.OPTIONAL)

    @classmethod
    def from_metadata(cls, config: dict[str, Any], path: str | os.PathLike) -> "FeaturesMeta":
        if not isinstance(config.get("spec"), dict) or not isinstance(config.get("image_size"), int):
            raise UserError(f"{path}: features config without its spec or image_size")
        meta = cls(**check_fields(cls, config, f"{path}: features config"))
        if not 1 <= meta.image_size <= 4096 or meta.count < 0 or (meta.mask_classes is not None
                                                                    and not 1 <= meta.mask_classes <= 256):
            raise UserError(f"{path}: features config out of range (image_size {meta.image_size}, count "
                            f"{meta.count}, mask_classes {meta.mask_classes})")
        return meta


@typed_config("head")
@dataclass(frozen=True)
class HeadMeta:
    """A head's config: its kind (classifier, segmentation, rejection, pixel), class names, the feature spec
    of the taps it reads (None for pixel heads), input channels and image size, whether inputs are
    L2-normalised and predictions per pixel, the calibrated temperature, the label it predicts, its held-out
    metrics and its training settings."""

    KIND: ClassVar[str]
    kind: str
    classes: list[str]
    spec: dict[str, Any] | None
    in_channels: int
    image_size: int
    normalize: bool = False
    dense: bool = False  # per-pixel predictions (masks) rather than one per image
    temperature: float = 1.0
    label: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    train: dict[str, Any] = field(default_factory=dict)

    def to_metadata(self) -> dict[str, Any]:
        return _fields_of(self)

    @classmethod
    def from_metadata(cls, config: dict[str, Any], path: str | os.PathLike) -> "HeadMeta":
        meta = cls(**check_fields(cls, config, f"{path}: head config"))
        if not 1 <= len(meta.classes) <= 100_000 or not 1 <= meta.in_channels <= 1 << 16 \
                or not 1 <= meta.image_size <= 4096:
            raise UserError(f"{path}: head config out of range (classes {len(meta.classes)}, in_channels "
                            f"{meta.in_channels}, image_size {meta.image_size})")
        if not meta.temperature > 0:
            raise UserError(f"{path}: head temperature must be > 0, found {meta.temperature}")
        return meta


@typed_config("fid-stats")
@dataclass(frozen=True)
class FidStatsMeta:
    """The config of FID statistics: the feature space's name and dimension, how many images they summarise,
    the feature settings (network, layer or block and timestep) and the image set they came from."""

    KIND: ClassVar[str]
    feature_space: str = ""
    dim: int | None = None
    n: int = 0
    features: dict[str, Any] = field(default_factory=dict)
    source: str = ""
    part: str | None = None  # "i/n": shard i's part (tensors count, sum and outer, not yet mu and sigma)

    def to_metadata(self) -> dict[str, Any]:
        return _optional(_fields_of(self), ("part",))

    @classmethod
    def from_metadata(cls, config: dict[str, Any], path: str | os.PathLike) -> "FidStatsMeta":
        meta = cls(**check_fields(cls, config, f"{path}: fid-stats config"))
        if meta.n < 0 or (meta.dim is not None and meta.dim < 1):
            raise UserError(f"{path}: fid-stats config out of range (n {meta.n}, dim {meta.dim})")
        return meta


def _require_file(path: Path) -> None:
    if not path.exists():
        raise UserError(f"{path}: no such file")
    if path.is_dir():
        raise UserError(f"{path}: is a folder, expected a file")


_ST_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.int64: "I64",
              torch.int32: "I32", torch.uint8: "U8", torch.bool: "BOOL", torch.float64: "F64"}


class StreamingWriter:
    """Write a safetensors artifact whose tensors arrive in slices along their first axis.

    All shapes are known up front, so the header is written first and each slice lands at its byte offset:
    peak memory is one slice, however many images there are. The file appears under its name only on
    :meth:`commit` (atomic rename); an exception or a kill leaves no artifact.
    """

    def __init__(self, path: str | os.PathLike, layout: dict[str, tuple[tuple[int, ...], torch.dtype]], *,
                 kind: str | None = None, config: "dict[str, Any] | ArtifactMeta", fingerprint: str,
                 extra: dict[str, str] | None = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        header: dict[str, Any] = {"__metadata__": _metadata(*_kind_and_config(kind, config), fingerprint, extra)}
        self.layout, offset = {}, 0
        for name in sorted(layout):  # safetensors readers expect data in header order; sorted keeps it simple
            shape, dtype = layout[name]
            size = int(torch.tensor([], dtype=dtype).element_size() * _numel(shape))
            header[name] = {"dtype": _ST_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
            self.layout[name] = (shape, dtype, offset)
            offset += size
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # align the data section to 8 bytes
        fd, tmp = tempfile.mkstemp(prefix=f".tmp-{self.path.name}.", dir=self.path.parent)
        self.tmp = Path(tmp)
        self.file = os.fdopen(fd, "w+b")
        try:
            self.file.write(len(raw).to_bytes(8, "little") + raw)
            self.data_start = 8 + len(raw)
            self.file.truncate(self.data_start + offset)
        except BaseException:  # a full disk (or a file-size limit) before the first slice: no file is left
            self.abort()
            raise

    def write(self, name: str, start: int, values: torch.Tensor) -> None:
        """Store ``values`` as rows ``start : start + len(values)`` of tensor ``name``."""
        shape, dtype, offset = self.layout[name]
        row = int(torch.tensor([], dtype=dtype).element_size() * _numel(shape[1:]))
        if tuple(values.shape[1:]) != tuple(shape[1:]) or start + len(values) > shape[0]:
            raise ValueError(f"{name}: rows {start}+{len(values)} of shape {tuple(values.shape)} do not fit {shape}")
        data = values.detach().to("cpu", dtype).contiguous()
        self.file.seek(self.data_start + offset + start * row)
        self.file.write(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")

    def commit(self) -> Path:
        """Publish the file under its name; a failure here (or an interrupt) removes the temporary."""
        try:
            self.file.close()
            os.chmod(self.tmp, 0o666 & ~_umask())
            os.replace(self.tmp, self.path)
        except BaseException:
            self.abort()
            raise
        return self.path

    def abort(self) -> None:
        try:
            self.file.close()  # flushing may fail again on a full disk
        except OSError:
            pass
        finally:
            self.tmp.unlink(missing_ok=True)

    def __enter__(self) -> "StreamingWriter":
        return self

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()


def _numel(shape: Iterable[int]) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def join_row_parts(path: str | os.PathLike, parts: list[Path], *, kind: str | None = None,
                   config: "dict[str, Any] | ArtifactMeta", fingerprint: str, chunk: int = 256) -> Path:
    """Concatenate artifacts whose tensors are consecutive row ranges of one tensor each (the shards of a
    ``torchrun`` job) into one artifact at ``path``, copying ``chunk`` rows at a time."""
    from safetensors import safe_open

    handles = [safe_open(str(p), framework="pt") for p in parts]
    layout: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
    for name in handles[0].keys():
        shapes = [h.get_slice(name).get_shape() for h in handles]
        dtype = handles[0].get_slice(name)[:0].dtype
        layout[name] = ((sum(s[0] for s in shapes), *shapes[0][1:]), dtype)
    with StreamingWriter(path, layout, kind=kind, config=config, fingerprint=fingerprint) as writer:
        for name in layout:
            row = 0
            for h in handles:
                part = h.get_slice(name)
                rows = part.get_shape()[0]
                for a in range(0, rows, chunk):
                    writer.write(name, row + a, part[a:min(a + chunk, rows)])
                row += rows
    return Path(path)
