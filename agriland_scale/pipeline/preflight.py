"""Before a run changes anything: check that the output folder is ours and the run can work.

:func:`prepare_output` decides what an existing folder means for this run (resume, refuse,
replace); :func:`preflight` checks the config's files, given models, the scheduler and what
the stages to run need, so that a mistake fails in seconds with nothing changed.
"""

from __future__ import annotations

import json
import logging
import shutil
import socket
from collections.abc import Iterable
from pathlib import Path
from typing import Any, cast
from urllib.parse import urlsplit

from agriland_scale.config.files import check_input_files
from agriland_scale.config.schema import RunConfig
from agriland_scale.errors import ConfigError, OutputExists, SchedulerError
from agriland_scale.layout import RECORD, STAGE_SETTINGS, STAGES, dependents, read_record
from agriland_scale.models.embed import check_model
from agriland_scale.models.segment import choose_inference_window
from agriland_scale.pipeline import outdir

__all__ = ["prepare_output", "preflight", "probe_scheduler", "refuse_deleting_inputs", "remove_run"]

log = logging.getLogger(__name__)


def changed_keys(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """Return the dotted config keys whose values differ between a recorded and a new config.

    A key the recorded config lacks (a setting added by a later agriland-scale, such as
    ``cube.storage``) is not a change: the finished stage ran with what was then the only
    behaviour, and its products stay readable.
    """
    keys = []
    for k in sorted(set(old) | set(new)):
        if k not in old:
            continue
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            keys += changed_keys(a, b, f"{prefix}{k}.")
        elif a != b:
            keys.append(f"{prefix}{k}")
    return keys


def prepare_output(out: Path, cfg: RunConfig, overwrite: bool, force: Iterable[str]) -> dict[str, Any] | None:
    """Check ``out`` (locked by the caller) and return the earlier run's record.

    The record is that of the run to resume or to overwrite (``None``: a fresh run).
    Changes nothing on disk.

    Parameters
    ----------
    out : Path
        The run's output folder.
    cfg : RunConfig
        This run's configuration.
    overwrite : bool
        Replace an earlier run (``--overwrite``).
    force : iterable of str
        Stages to run again even when done (``--force``).

    Returns
    -------
    dict or None
        The earlier run's ``run.json``, or ``None`` for a fresh run.

    Raises
    ------
    OutputExists
        ``out`` holds files of no agriland run (refused also with ``overwrite``: they are not
        ours to delete), another run without ``overwrite``, or a run whose finished stages
        used a config section that changed (without ``force`` of that stage).
    OutputError
        ``run.json`` is damaged.
    """
    # handed to the runner, which extends the record as a plain dict
    old = cast("dict[str, Any] | None", read_record(out))
    if old is None:
        foreign = outdir.foreign_entries(out)
        if foreign:
            shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
            raise OutputExists(
                f"{out} already holds files that no agriland run wrote ({shown}). agriland writes a "
                "new run only into an empty or new folder, and never deletes files it did not "
                "write: choose an empty or new --out folder"
            )
        return None
    if overwrite:
        if "files" not in old:
            raise OutputExists(
                f"the run in {out} was written by an older agriland-scale that did not record its "
                "files, so --overwrite cannot tell them from yours: delete that folder yourself if "
                "you no longer need it, or choose another --out folder"
            )
        return old
    old_cfg = old.get("config") or {}
    if old_cfg.get("name") != cfg.name:
        raise OutputExists(
            f"{out} holds another run (run.json with a different config "
            f"'{str(old_cfg.get('name', '?'))[:80]}'): choose another --out, or pass "
            "--overwrite to replace it (only the files that run wrote are deleted)"
        )
    new_cfg = json.loads(cfg.model_dump_json())
    changed = [k for k in changed_keys(old_cfg, new_cfg) if not k.startswith("runtime.")]
    forced = dependents(force)
    stale = []
    for stage in STAGES:
        if old.get("stages", {}).get(stage) != "done" or stage in forced:
            continue
        keys = [k for k in changed if any(k == p or k.startswith(p + ".") for p in STAGE_SETTINGS[stage])]
        if keys:
            stale.append((stage, keys))
    if stale:
        stage, keys = stale[0]
        raise OutputExists(
            f"the config differs from the run in {out} in {', '.join(keys)}, which its finished "
            f"stage '{stage}' used: pass --force {stage} to redo it and what depends on it, or "
            "--overwrite to start over (or choose another --out)"
        )
    return old


def remove_run(out: Path, old: dict[str, Any]) -> None:
    """Delete what the run recorded in ``old`` wrote (``--overwrite``), nothing else."""
    files = [f for fs in (old.get("files") or {}).values() for f in fs]
    for name in outdir.OWNED_DIRS:
        shutil.rmtree(out / name, ignore_errors=True)
    outdir.remove_files(out, files)
    (out / RECORD).unlink(missing_ok=True)
    log.info("--overwrite: removed the earlier run's store and %d file(s)", len(files))


def preflight(
    cfg: RunConfig, wanted: list[str], old: dict[str, Any] | None, forced: set[str], scheduler: str | None
) -> None:
    """Check the inputs the stages to run will read, before anything is changed or started.

    Checked: local files named in the config (only those that a stage still to run reads),
    labels when a U-Net must be trained, models given as ``embed.model``/``segment.model``,
    and that a given Dask scheduler answers.

    Parameters
    ----------
    cfg : RunConfig
        This run's configuration.
    wanted : list of str
        The stages asked for.
    old : dict or None
        The earlier run's record (stages already done are not checked again).
    forced : set of str
        Stages to run again even when done.
    scheduler : str or None
        A Dask scheduler address given on the command line (else ``runtime.scheduler``).

    Raises
    ------
    ConfigError
        Missing labels for the U-Net, or ``cluster.k`` above the valid patches.
    SchedulerError
        When nothing listens at the scheduler's address.

    The errors of :func:`~agriland_scale.config.files.check_input_files` and
    :func:`~agriland_scale.models.embed.check_model` pass through.
    """
    done = (old or {}).get("stages") or {}

    def to_run(stage: str) -> bool:
        return stage in wanted and (done.get(stage) != "done" or stage in forced)

    check_input_files(cfg, {s for s in STAGES if to_run(s)})
    if to_run("unet") and not cfg.segment.model and not cfg.segment.labels:
        raise ConfigError(
            "segment.labels is not set: the U-Net needs labels (GeoJSON polygons with "
            "a 'class' property, a raster mask or a VIA project), or set segment.model "
            "to a U-Net trained before; see the README"
        )
    address = scheduler or cfg.runtime.scheduler
    if address and any(to_run(s) for s in STAGES):
        probe_scheduler(address)

    valid = ((old or {}).get("patches") or {}).get("valid")
    if to_run("clusters") and not to_run("patches") and valid is not None and valid < cfg.cluster.k:
        raise ConfigError(
            f"cluster.k is {cfg.cluster.k} but the run's region has only {valid} valid "
            f"patch(es): set cluster.k to at most {valid}"
            if valid >= 2
            else f"the run's region has only {valid} valid patch(es), too few to cluster: enlarge the region"
        )
    if cfg.embed.model and (to_run("cae") or to_run("embeddings")):
        check_model(
            cfg.embed.model,
            "embedding",
            cfg.embed.bands,
            cfg.embed.reflectance_max,
            cfg.patches.size,
            key="embed.model",
        )
    if cfg.segment.model and (to_run("unet") or to_run("segmentation")):
        meta = check_model(
            cfg.segment.model,
            "segmentation",
            cfg.segment.bands,
            cfg.segment.reflectance_max,
            cfg.segment.window,
            key="segment.model",
        )
        s = cfg.segment  # a fixed inference window this model cannot take: refused now
        choose_inference_window(
            s.inference_window, s.window, s.overlap, s.window, s.window, meta.get("encoder")
        )


def probe_scheduler(address: str, timeout: float = 10.0) -> None:
    """Refuse a scheduler address nothing listens on (a TCP connect, no Dask handshake)."""
    parts = urlsplit(address if "://" in address else f"tcp://{address}")
    if parts.scheme not in ("tcp", "tls") or not parts.hostname or not parts.port:
        return  # ucx://, inproc:// ...: left to the Dask client
    try:
        socket.create_connection((parts.hostname, parts.port), timeout=timeout).close()
    except OSError as e:
        raise SchedulerError(
            f"no Dask scheduler answers at {address} ({e.strerror or e}): start one "
            "(`dask scheduler`) or fix runtime.scheduler / --scheduler"
        ) from None


def protected_inputs(cfg: RunConfig) -> list[Path]:
    """List the local files the config reads as inputs (models and their sidecars, labels, weights).

    ``--force`` and ``--overwrite`` must not delete them, even when a run of ours wrote them.
    """
    paths = []
    for value in (cfg.embed.model, cfg.segment.model):
        if value and "://" not in value:
            paths += [Path(value), Path(value + ".json")]
    for value in (cfg.segment.labels, cfg.embed.weights, cfg.segment.weights):
        if value and value not in ("imagenet", "none") and "://" not in value:
            paths.append(Path(value))
    return [p.expanduser().resolve() for p in paths]


def refuse_deleting_inputs(out: Path, cfg: RunConfig, rels: Iterable[str], what: str) -> None:
    """Refuse to delete files (``rels``, relative to ``out``) the config reads as inputs.

    Parameters
    ----------
    out : Path
        The run's output folder.
    cfg : RunConfig
        This run's configuration (see :func:`protected_inputs`).
    rels : iterable of str
        The paths about to be deleted, relative to ``out``.
    what : str
        What would delete them (e.g. ``--overwrite``), named in the message.

    Raises
    ------
    OutputExists
        When one of them is an input of the run.
    """
    doomed = {(out / r).resolve() for r in rels}
    hit = [p for p in protected_inputs(cfg) if p in doomed]
    if hit:
        raise OutputExists(
            f"{what} would delete {hit[0]}, which the pipeline reads as an input: copy it "
            "out of the run folder first and point the config at the copy, or run into "
            "another --out folder"
        )
