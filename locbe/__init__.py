"""locbe: a reproducibility harness for LOC-BE weakly-supervised semantic segmentation."""

__version__ = "0.1.0"

__all__ = ["build_model", "load_checkpoint", "__version__"]


def __getattr__(name):  # lazy: `import locbe` must not pull in torch/timm for the CLI's help
    if name == "build_model":
        from locbe.models import build_model

        return build_model
    if name == "load_checkpoint":
        from locbe.models import load_checkpoint

        return load_checkpoint
    raise AttributeError(f"module 'locbe' has no attribute {name!r}")
