"""Keras 3 models of the method: CAE encoder, DEC clustering layer, U-Nets."""

from __future__ import annotations

import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

__all__ = ["backbone"]
