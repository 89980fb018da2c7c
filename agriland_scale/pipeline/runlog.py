"""The run's log file and its Dask performance report.

``OUT/logs/run-TIME.log`` receives this package's INFO lines and warnings while a run goes
(:func:`log_file` / :func:`close_log`); ``OUT/logs/dask-performance-TIME.html`` keeps the
dashboard's task stream, profiles and worker memory of the run (:func:`performance_report`).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from pathlib import Path

from agriland_scale.files import short_error
from agriland_scale.layout import LOGS_DIR
from agriland_scale.pipeline.context import Report

__all__ = ["RUN_LOG", "close_log", "log_file", "performance_report", "say_and_log"]

log = logging.getLogger(__name__)


# the run's own lines (what the user is told, progress), in its log file
RUN_LOG = logging.getLogger("agriland_scale.run")


@contextlib.contextmanager
def performance_report(path: Path) -> Iterator[None]:
    """Write a ``distributed.performance_report`` into ``path``, with BokehJS inline.

    Skipped when the run is interrupted (collecting it then would delay the exit), and
    never failing the run.
    """
    from distributed import performance_report

    # BokehJS inline (about 1 MB): the page opens offline, not only where its CDN answers
    rep = performance_report(filename=str(path), mode="inline")
    try:
        rep.__enter__()
    except Exception as e:  # noqa: BLE001 - e.g. a scheduler that refuses run_on_scheduler
        log.warning("no Dask performance report for this run: %s", e)
        yield
        return
    interrupted = False
    try:
        yield
    except KeyboardInterrupt:
        interrupted = True
        raise
    finally:
        if not interrupted:
            try:
                rep.__exit__(None, None, None)
            except Exception as e:  # noqa: BLE001 - a report problem must never hide the run's own result
                log.warning("could not write the Dask performance report %s: %s", path, short_error(e))


def say_and_log(report: Report | None) -> Report:
    """Return ``say(message)``: the line into the run's log, and to ``report`` when given."""

    def say(msg: str) -> None:
        RUN_LOG.info(msg)
        if report is not None:
            report(msg)

    return say


def log_file(out: Path) -> logging.FileHandler:
    """Send this package's INFO (and warnings) for this run to ``OUT/logs/run-TIME.log``."""
    logs = out / LOGS_DIR
    logs.mkdir(exist_ok=True)
    h = logging.FileHandler(logs / f"run-{time.strftime('%Y%m%d-%H%M%S')}.log")
    h.setLevel(logging.INFO)
    h.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    pkg = logging.getLogger("agriland_scale")
    h._agriland_level = pkg.level  # type: ignore[attr-defined]
    if pkg.getEffectiveLevel() > logging.INFO:
        pkg.setLevel(logging.INFO)
    pkg.addHandler(h)
    logging.getLogger("py.warnings").addHandler(h)
    logging.captureWarnings(True)
    return h


def close_log(h: logging.FileHandler) -> None:
    """Stop sending the package's log to the run's file ``h`` (:func:`log_file`), as it was before."""
    pkg = logging.getLogger("agriland_scale")
    pkg.removeHandler(h)
    pkg.setLevel(h._agriland_level)  # type: ignore[attr-defined]
    logging.getLogger("py.warnings").removeHandler(h)
    logging.captureWarnings(False)
    h.close()
