"""What a run shows while it works: training phases, elapsed time, lines without a terminal.

Training tasks relay their progress as Dask events (:func:`agriland_scale.models.worker.report_progress`);
the runner hands them to the display the way its event handler does. These tests feed the
display the same calls, with a stream that is not a terminal (``io.StringIO``).
"""

from __future__ import annotations

import io
import re
from pathlib import Path

import numpy as np
import pytest

from agriland_scale.models import callbacks, train
from agriland_scale.pipeline.folder import RunFolder
from agriland_scale.pipeline.runner import _Runner
from agriland_scale.terminal import Display


class _Clock:
    """A ``time.monotonic`` the test moves on by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch):
    c = _Clock()
    monkeypatch.setattr("agriland_scale.terminal.time.monotonic", c)
    return c


def _runner_progress(display: Display):
    """The runner's progress function, as training events and block stages call it."""
    runner = _Runner(None, RunFolder(Path(".")), None, lambda _: None, display)  # type: ignore[arg-type]

    def relay(msg: dict) -> None:  # what the runner's on_event does with a training task's event
        runner.progress(msg["label"], msg["done"], msg["total"], msg["info"] or " ", msg["milestone"])

    return runner.progress, relay


def _messages(monkeypatch, forward=None) -> list[dict]:
    """Collect what training code sends through report_progress (as the worker would); ``forward`` each."""
    sent: list[dict] = []

    def report(tag, label, done, total, info="", milestone=False):
        sent.append(
            {"tag": tag, "label": label, "done": done, "total": total, "info": info, "milestone": milestone}
        )
        if forward is not None:
            forward(sent[-1])

    monkeypatch.setattr(train._worker, "report_progress", report)
    return sent


def test_training_without_a_terminal_prints_phases_and_epochs(monkeypatch, clock):
    """No TTY: a plain line a phase and a finished epoch (from the real Keras relay), no bars."""
    pytest.importorskip("keras")
    stream = io.StringIO()
    display = Display(False, file=stream)
    assert not display.bars
    progress, relay = _runner_progress(display)
    _messages(monkeypatch, forward=relay)  # sent by the task, relayed to the display at once

    # what the training task sends: its phases, then the Keras callback's steps and epochs
    epochs, steps = 3, 4
    callbacks.phase("t", callbacks.CAE_LABEL, callbacks.WAITING_FOR_TENSORFLOW, total=epochs * steps)
    clock.now += 60
    callbacks.phase("t", callbacks.CAE_LABEL, "building the model…", total=epochs * steps)
    clock.now += 30
    callbacks.phase("t", callbacks.CAE_LABEL, "tracing the first step…", total=epochs * steps)
    cb = callbacks.relay_callback(callbacks.CAE_LABEL, epochs, steps, "t")
    for epoch in range(epochs):
        cb.on_epoch_begin(epoch)
        for batch in range(steps):
            clock.now += 10
            cb.last = 0.0  # not throttled: every step is sent
            cb.on_train_batch_end(batch, {"loss": 0.5 / (batch + 1)})
        cb.on_epoch_end(epoch, {"loss": 0.1 * (epoch + 1)})
    # a block stage between, for the plain lines of blocks
    for done in range(1, 101):
        progress("patches", done, 100)
    display.close()

    text = stream.getvalue()
    assert "\r" not in text and "\x1b" not in text  # no bars, no cursor moves
    lines = text.splitlines()
    training = [x for x in lines if "CAE training" in x]
    assert training[0] == "  CAE training: waiting for the worker's TensorFlow… (0:00:00)"
    assert training[1] == "  CAE training: building the model… (0:01:00)"
    assert training[2] == "  CAE training: tracing the first step… (0:01:30)"
    epoch_lines = [x for x in training if "epoch" in x]
    assert len(epoch_lines) == epochs  # one a finished epoch, none a step
    # the clock started with the task (its first phase), not with the first step
    assert epoch_lines[0] == "  CAE training: epoch 1/3, loss 0.1 (4/12 steps, 0:02:10)"
    assert epoch_lines[-1] == "  CAE training: epoch 3/3, loss 0.3 (12/12 steps, 0:03:30)"
    blocks = [x for x in lines if x.startswith("  patches:")]
    assert [x.split()[1] for x in blocks] == [f"{n}/100" for n in range(10, 101, 10)]


def test_quiet_shows_no_progress(clock):
    stream = io.StringIO()
    display = Display(True, file=stream)
    progress, relay = _runner_progress(display)
    relay(
        {"label": "U-Net training", "done": 0, "total": 0, "info": "building the model…", "milestone": True}
    )
    progress("cube", 5, 5)
    display.close()
    assert stream.getvalue() == ""


def test_a_bar_starts_with_the_first_phase_and_shows_it(clock):
    """On a terminal the bar exists from the task's first phase (its clock starts there), total unknown."""
    display = Display(False, file=io.StringIO())
    display.bars = True  # as on a terminal
    _, relay = _runner_progress(display)
    relay(
        {
            "label": "U-Net training",
            "done": 0,
            "total": 0,
            "info": callbacks.WAITING_FOR_TENSORFLOW,
            "milestone": True,
        }
    )
    assert display._progress is not None
    task = display._progress.tasks[0]
    assert task.total is None and task.fields["info"] == callbacks.WAITING_FOR_TENSORFLOW
    started = task.start_time
    relay(
        {"label": "U-Net training", "done": 3, "total": 40, "info": "epoch 1/2, loss 0.4", "milestone": False}
    )
    task = display._progress.tasks[0]
    assert task.start_time == started and task.total == 40 and task.completed == 3
    display.close()


@pytest.mark.parametrize("which", ["cae", "unet"])
def test_training_says_its_first_phase_before_tensorflow(monkeypatch, which):
    """The task's first event (which starts its clock) comes before TensorFlow's import."""
    sent = _messages(monkeypatch)

    class Stop(Exception):
        pass

    def no_tensorflow():
        raise Stop

    monkeypatch.setattr(train._worker, "configure_tensorflow", no_tensorflow)
    with pytest.raises(Stop):
        if which == "cae":
            cfg = type("Cfg", (), {"train": type("T", (), {"epochs": 2, "steps_per_epoch": 5})()})()
            train._train_cae(
                "store",
                np.zeros(3, int),
                np.zeros(3, int),
                cfg,
                256,
                "x.keras",  # type: ignore[arg-type]
                progress_tag="t",
            )
        else:
            train._train_unet("store", np.zeros((2, 2), "uint8"), None, "x.keras", progress_tag="t")  # type: ignore[arg-type]
    assert len(sent) == 1
    msg = sent[0]
    assert msg["done"] == 0 and msg["milestone"] and msg["tag"] == "t"
    assert re.search("TensorFlow", msg["info"])
    assert msg["total"] == (10 if which == "cae" else 0)


def test_performance_report_opens_offline(tmp_path):
    """The Dask performance report carries BokehJS inline: no script from cdn.bokeh.org."""
    from distributed import Client, LocalCluster

    from agriland_scale.pipeline.runlog import performance_report as _performance_report

    path = tmp_path / "perf.html"
    with (
        LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=":0") as cluster,
        Client(cluster) as client,
    ):
        with _performance_report(path):
            assert client.submit(sum, [1, 2, 3]).result() == 6
    page = path.read_text()
    scripts = re.findall(r"<script[^>]*\bsrc=[\"']([^\"']*)", page)
    assert not [s for s in scripts if "cdn.bokeh.org" in s or s.startswith("http")], scripts
    assert "cdn.bokeh.org/bokeh" not in page
    assert "Bokeh.set_log_level" in page or "root.Bokeh" in page  # BokehJS itself, inline
    assert len(page) > 500_000


def test_training_checkpoints_come_at_most_once_a_period(tmp_path, monkeypatch):
    """An epoch's end saves the model only once ``every_s`` has passed since the training began
    or the last save: a short training (the demo's) writes no checkpoint at all, a long one
    keeps one from at most a period plus an epoch ago."""
    import keras

    monkeypatch.setenv("TF_NUM_INTRAOP_THREADS", "1")
    x = np.zeros((4, 2), "float32")

    def fit(every_s: float, clock: list[float]) -> tuple[int, bool]:
        model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
        model.compile(optimizer="sgd", loss="mse")
        path = tmp_path / f"run-{len(list(tmp_path.iterdir()))}" / "ckpt.keras"  # a folder a training, made
        cb = callbacks.timed_checkpoint(
            path, every_s, clock=lambda: clock.pop(0) if len(clock) > 1 else clock[0]
        )
        model.fit(x, x[:, :1], epochs=3, verbose=0, callbacks=[cb])
        return cb.saved, path.exists()

    # clock: made, train begins at 0, epoch ends at 20, 40, 60 s (after each save: the same again)
    assert fit(60.0, [0.0, 0.0, 20.0, 40.0, 60.0, 60.0]) == (1, True)
    assert fit(60.0, [0.0, 0.0, 20.0, 40.0, 59.0]) == (0, False)  # nothing written
    assert fit(10.0, [0.0, 0.0, 20.0, 20.0, 40.0, 40.0, 60.0, 60.0]) == (3, True)
