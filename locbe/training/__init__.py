"""Pieces of the training loop in ``locbe/train.py``, one concern per module (no torch at import here)."""
