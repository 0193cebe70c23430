"""Metrics, dense CRF and evaluation."""

from locbe.eval.metrics import ConfusionMatrix, multilabel_f1

__all__ = ["ConfusionMatrix", "multilabel_f1"]
