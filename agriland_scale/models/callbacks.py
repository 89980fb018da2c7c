"""Keras callbacks of the training tasks: progress sent to the client, and timed checkpoints.

Both run inside a training task on a Dask worker (:mod:`agriland_scale.models.train`).
Keras is imported only when a callback is made.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from agriland_scale.models import worker as _worker

__all__ = [
    "CAE_LABEL",
    "UNET_LABEL",
    "WAITING_FOR_TENSORFLOW",
    "CHECKPOINT_EVERY_S",
    "phase",
    "relay_callback",
    "timed_checkpoint",
]

CAE_LABEL, UNET_LABEL = "CAE training", "U-Net training"
WAITING_FOR_TENSORFLOW = "waiting for the worker's TensorFlow…"
# the least time between two checkpoints of a training (s): an epoch's end saves one only when
# this long has passed since the training began or the last one was saved. A checkpoint of the
# demo's CAE (ResNet-50 + decoder, 3 epochs of about 20 s) took 1.2-1.4 s, 5 % of its
# training in bfloat16; a crash loses at most this much training plus an epoch.
CHECKPOINT_EVERY_S = 60.0


def phase(tag: str | None, label: str, text: str, done: int = 0, total: int = 0) -> None:
    """Tell the client that started the task which phase a training is in (before its steps).

    A milestone of :func:`agriland_scale.models.worker.report_progress` with no step done
    (``total`` 0: not counted yet); the first one, at the task's start, starts the training's
    clock on the client.
    """
    _worker.report_progress(tag, label, done, total, text, True)


def relay_callback(label: str, epochs: int, steps: int, tag: str | None):
    """Make a Keras callback sending training progress to the client that started the task.

    Progress (epoch, step, loss and metrics) goes through
    :func:`agriland_scale.models.worker.report_progress`: at most every half second, and at every
    epoch's end (with the validation metrics).
    """
    import keras

    class Relay(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.epoch, self.last = 0, 0.0

        def _send(self, step: int, logs: dict | None, end: bool) -> None:
            vals = ", ".join(f"{k} {float(v):.4g}" for k, v in (logs or {}).items())
            info = f"epoch {self.epoch + 1}/{epochs}" + (f", {vals}" if vals else "")
            _worker.report_progress(tag, label, self.epoch * steps + step, epochs * steps, info, end)

        def on_epoch_begin(self, epoch, logs=None):
            self.epoch = epoch

        def on_train_batch_end(self, batch, logs=None):
            now = time.monotonic()
            if now - self.last >= 0.5:
                self.last = now
                self._send(batch + 1, logs, False)

        def on_epoch_end(self, epoch, logs=None):
            self._send(steps, logs, True)

    return Relay()


def timed_checkpoint(
    path: str | Path, every_s: float = CHECKPOINT_EVERY_S, clock: Callable[[], float] = time.monotonic
) -> Any:
    """Make a Keras callback that saves the model to ``path`` at an epoch's end, at most every ``every_s`` s.

    The first save comes at the first epoch's end after ``every_s`` seconds of training; then
    one after each further ``every_s``. Short trainings (the demo's) save none: the model saved
    at their end is the only file. ``path`` ends in ``.keras``; ``clock`` gives seconds.
    """
    import keras

    class TimedCheckpoint(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.last = clock()
            self.saved = 0

        def on_train_begin(self, logs=None):
            self.last = clock()

        def on_epoch_end(self, epoch, logs=None):
            if clock() - self.last >= every_s:
                Path(path).parent.mkdir(parents=True, exist_ok=True)  # as Keras's ModelCheckpoint
                self.model.save(str(path))
                self.last, self.saved = clock(), self.saved + 1

    return TimedCheckpoint()
