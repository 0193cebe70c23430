"""Metrics, dense CRF and evaluation.

The metrics (torch) are imported on first use, so that ``locbe eval --help`` does not import torch."""

__all__ = ["ConfusionMatrix", "multilabel_f1"]


def __getattr__(name: str):
    if name in __all__:
        from locbe.eval import metrics

        return getattr(metrics, name)
    raise AttributeError(f"module 'locbe.eval' has no attribute {name!r}")
