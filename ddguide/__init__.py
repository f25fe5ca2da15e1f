"""ddguide: conditional generation from unconditional diffusion models using denoiser representations."""

__version__ = "0.1.0"

# The Python API, imported on first use so that `import ddguide` (and `ddguide --version`) stays fast.
_API = {
    "load_model": "ddguide.stages.api",
    "sample": "ddguide.stages.api",
    "extract": "ddguide.stages.api",
    "train_head": "ddguide.stages.api",
    "fid": "ddguide.stages.api",
    "SampleConfig": "ddguide.stages.sample",
    "RejectSpec": "ddguide.stages.sample",
    "ExtractConfig": "ddguide.stages.extract",
    "TrainHeadConfig": "ddguide.stages.train_head",
    "FidConfig": "ddguide.metrics.fid",
    "PluginGuide": "ddguide.method.plugins",
    "Model": "ddguide.core.model",
    "UserError": "ddguide.core.errors",
}
__all__ = ["__version__", *_API]


def __getattr__(name: str):
    if name in _API:
        import importlib

        value = getattr(importlib.import_module(_API[name]), name)
        globals()[name] = value  # later look-ups skip this function
        return value
    raise AttributeError(f"module 'ddguide' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_API))
