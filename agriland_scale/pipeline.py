"""The pipeline: search -> cube -> patches -> cae -> embeddings -> clusters -> unet ->
segmentation -> publish, resumable.

:func:`run` composes the stage modules over one output folder::

    OUT/agriland.zarr   groups cube, patches, embeddings, clusters, segmentation (one UTM zone);
                        utm18n/cube, utm33n/cube, ... per zone when the region spans several,
                        plus ``mosaic`` (probability in cube.mosaic_crs) when asked
    OUT/cog/            cluster_map.tif, probability.tif, mask.tif (Cloud-Optimized GeoTIFF)
    OUT/models/         cae.keras, encoder.keras, unet.keras (+ .json metadata sidecars)
    OUT/items.json      the exact STAC items the run used
    OUT/run.json        config, inputs, versions, timings, dashboard link, stage status
    OUT/report.html     one self-contained page: config, items, quicklooks, clusters, training
    OUT/stac/           STAC Collection + Items of the products (COG and Zarr assets)
    OUT/clusters/       gallery.png, embedding_map.png, stats.csv (per zone when several)
    OUT/logs/           one log file per invocation
    OUT/.partial/       products being written and their block journals (see :mod:`.resume`)

Resume: ``run.json`` records each finished stage; a product is built block by block in
``.partial`` and moved into the store only when complete. Running again on the same folder
skips finished stages, writes only the blocks an interrupted stage had not finished, and
reuses the recorded search results (a search is not repeated). ``force`` redoes stages and
everything that depends on them; a config that changed in a section a finished stage used
is refused until that stage is forced.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pystac
import xarray as xr

from . import cube as cube_mod
from . import embed as embed_mod
from . import outdir, publish, segment, stac
from . import patches as patches_mod
from ._worker import PROGRESS_TOPIC
from .cluster import NOT_CLUSTERED, cluster_map
from .cluster_report import write_cluster_products
from .cluster_stream import fit_clusters_streaming
from .config import RunConfig, check_input_files, resolve_path
from .errors import AgrilandWarning, ConfigError, EmptyRegion, NoItemsFound, OutputExists
from .items import normalize_items
from .labels import IGNORE, load_labels
from .report import write_report
from .resume import Products
from .runtime import dask_client, gpu_resources
from .stac_out import write_stac
from .train import train_cae, train_unet, training_windows

__all__ = ["DEPENDS", "STAGES", "run", "stages_needed"]

log = logging.getLogger(__name__)

STAGES = ("search", "cube", "patches", "cae", "embeddings", "clusters", "unet", "segmentation", "publish")
# what each stage reads
DEPENDS: dict[str, tuple[str, ...]] = {
    "search": (), "cube": ("search",), "patches": ("cube",), "cae": ("patches",),
    "embeddings": ("cae",), "clusters": ("embeddings",), "unet": ("cube",), "segmentation": ("unet",),
    "publish": ("clusters", "segmentation"),
}
# config keys (or sections) whose values a stage's outputs depend on
_CAE_KEYS = ("embed.model", "embed.bands", "embed.weights", "embed.head", "embed.embedding_dim",
             "embed.dense_units", "embed.reflectance_max", "embed.train", "patches.size", "seed")
_UNET_KEYS = ("segment.model", "segment.encoder", "segment.weights", "segment.bands", "segment.reflectance_max",
              "segment.labels", "segment.positive_classes", "segment.window", "segment.train", "seed")
_SECTIONS: dict[str, tuple[str, ...]] = {
    "search": ("search",), "cube": ("cube",), "patches": ("patches",), "cae": _CAE_KEYS,
    "embeddings": ("embed",), "clusters": ("cluster", "seed"), "unet": _UNET_KEYS,
    "segmentation": ("segment",), "publish": (),
}
# what a product or file a stage leaves behind is called (per zone for the groups)
_GROUPS = {"cube": "cube", "patches": "patches", "embeddings": "embeddings", "clusters": "clusters",
           "segmentation": "segmentation"}

Report = Callable[[str], None]
# progress(label, done, total, info): blocks of a stage, or steps of a training ("info": epoch,
# loss and metrics); a display may take the first three arguments only
Progress = Callable[..., None]


def stages_needed(until: str | None) -> list[str]:
    """Stages to run to produce ``until`` (all when ``None``), in pipeline order."""
    if until is None:
        return list(STAGES)
    if until not in STAGES:
        raise ConfigError(f"unknown stage '{until}': choose one of {', '.join(STAGES)}")
    need, todo = set(), [until]
    while todo:
        s = todo.pop()
        if s not in need:
            need.add(s)
            todo.extend(DEPENDS[s])
    return [s for s in STAGES if s in need]


def dependents(stages: Iterable[str]) -> set[str]:
    """``stages`` and every stage that reads their outputs, directly or not."""
    out = set(stages)
    for s in stages:
        if s not in STAGES:
            raise ConfigError(f"unknown stage '{s}' for --force: choose one of {', '.join(STAGES)}")
    changed = True
    while changed:
        changed = False
        for s, deps in DEPENDS.items():
            if s not in out and out & set(deps):
                out.add(s)
                changed = True
    return out


def _changed_keys(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    keys = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            keys += _changed_keys(a, b, f"{prefix}{k}.")
        elif a != b:
            keys.append(f"{prefix}{k}")
    return keys


def _prepare_output(out: Path, cfg: RunConfig, overwrite: bool, force: Iterable[str]) -> dict[str, Any] | None:
    """Check ``out`` (locked by the caller) and return the earlier run's record to resume or
    to overwrite (``None``: a fresh run). Changes nothing on disk.

    Raises
    ------
    OutputExists
        ``out`` holds files of no agriland run (refused also with ``overwrite``: they are not
        ours to delete), another run without ``overwrite``, or a run whose finished stages
        used a config section that changed (without ``force`` of that stage).
    OutputError
        ``run.json`` is damaged.
    """
    old = outdir.read_record(out)
    if old is None:
        foreign = outdir.foreign_entries(out)
        if foreign:
            shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
            raise OutputExists(
                f"{out} already holds files that no agriland run wrote ({shown}). agriland writes a "
                "new run only into an empty or new folder, and never deletes files it did not "
                "write: choose an empty or new --out folder")
        return None
    if overwrite:
        if "files" not in old:
            raise OutputExists(
                f"the run in {out} was written by an older agriland-scale that did not record its "
                "files, so --overwrite cannot tell them from yours: delete that folder yourself if "
                "you no longer need it, or choose another --out folder")
        return old
    old_cfg = old.get("config") or {}
    if old_cfg.get("name") != cfg.name:
        raise OutputExists(f"{out} holds another run (run.json with a different config "
                           f"'{str(old_cfg.get('name', '?'))[:80]}'): choose another --out, or pass "
                           "--overwrite to replace it (only the files that run wrote are deleted)")
    new_cfg = json.loads(cfg.model_dump_json())
    changed = [k for k in _changed_keys(old_cfg, new_cfg) if not k.startswith("runtime.")]
    forced = dependents(force)
    stale = []
    for stage in STAGES:
        if old.get("stages", {}).get(stage) != "done" or stage in forced:
            continue
        keys = [k for k in changed if any(k == p or k.startswith(p + ".") for p in _SECTIONS[stage])]
        if keys:
            stale.append((stage, keys))
    if stale:
        stage, keys = stale[0]
        raise OutputExists(
            f"the config differs from the run in {out} in {', '.join(keys)}, which its finished "
            f"stage '{stage}' used: pass --force {stage} to redo it and what depends on it, or "
            "--overwrite to start over (or choose another --out)")
    return old


def _remove_run(out: Path, old: dict[str, Any]) -> None:
    """Delete what the run recorded in ``old`` wrote (``--overwrite``), nothing else."""
    files = [f for fs in (old.get("files") or {}).values() for f in fs]
    for name in outdir.OWNED_DIRS:
        shutil.rmtree(out / name, ignore_errors=True)
    outdir.remove_files(out, files)
    (out / "run.json").unlink(missing_ok=True)
    log.info("--overwrite: removed the earlier run's store and %d file(s)", len(files))


def _preflight(cfg: RunConfig, wanted: list[str], old: dict[str, Any] | None, forced: set[str],
               scheduler: str | None) -> None:
    """Checks of the inputs the stages to run will read, before anything is changed or started:
    local files named in the config (only those that a stage still to run reads), labels
    when a U-Net must be trained, models given as ``embed.model``/``segment.model``, and that
    a given Dask scheduler answers."""
    done = (old or {}).get("stages") or {}

    def to_run(stage: str) -> bool:
        return stage in wanted and (done.get(stage) != "done" or stage in forced)

    check_input_files(cfg, {s for s in STAGES if to_run(s)})
    if to_run("unet") and not cfg.segment.model and not cfg.segment.labels:
        raise ConfigError("segment.labels is not set: the U-Net needs labels (GeoJSON polygons with "
                          "a 'class' property, a raster mask or a VIA project), or set segment.model "
                          "to a U-Net trained before; see the README")
    address = scheduler or cfg.runtime.scheduler
    if address and any(to_run(s) for s in STAGES):
        _probe_scheduler(address)

    valid = ((old or {}).get("patches") or {}).get("valid")
    if to_run("clusters") and not to_run("patches") and valid is not None and valid < cfg.cluster.k:
        raise ConfigError(f"cluster.k is {cfg.cluster.k} but the run's region has only {valid} valid "
                          f"patch(es): set cluster.k to at most {valid}" if valid >= 2 else
                          f"the run's region has only {valid} valid patch(es), too few to cluster: "
                          "enlarge the region")
    if cfg.embed.model and (to_run("cae") or to_run("embeddings")):
        embed_mod.check_model(cfg.embed.model, "embedding", cfg.embed.bands, cfg.embed.reflectance_max,
                              cfg.patches.size, key="embed.model")
    if cfg.segment.model and (to_run("unet") or to_run("segmentation")):
        embed_mod.check_model(cfg.segment.model, "segmentation", cfg.segment.bands,
                              cfg.segment.reflectance_max, cfg.segment.window, key="segment.model")


def _probe_scheduler(address: str, timeout: float = 10.0) -> None:
    """Refuse a scheduler address nothing listens on (a TCP connect, no Dask handshake)."""
    import socket
    from urllib.parse import urlsplit

    from .errors import SchedulerError

    parts = urlsplit(address if "://" in address else f"tcp://{address}")
    if parts.scheme not in ("tcp", "tls") or not parts.hostname or not parts.port:
        return  # ucx://, inproc:// ...: left to the Dask client
    try:
        socket.create_connection((parts.hostname, parts.port), timeout=timeout).close()
    except OSError as e:
        raise SchedulerError(f"no Dask scheduler answers at {address} ({e.strerror or e}): start one "
                             "(`dask scheduler`) or fix runtime.scheduler / --scheduler") from None


def _protected_inputs(cfg: RunConfig) -> list[Path]:
    """Local files the config reads as inputs (models and their sidecars, labels, weights):
    ``--force`` and ``--overwrite`` must not delete them, even when a run of ours wrote them."""
    paths = []
    for value in (cfg.embed.model, cfg.segment.model):
        if value and "://" not in value:
            paths += [Path(value), Path(value + ".json")]
    for value in (cfg.segment.labels, cfg.embed.weights, cfg.segment.weights):
        if value and value not in ("imagenet", "none") and "://" not in value:
            paths.append(Path(value))
    return [p.expanduser().resolve() for p in paths]


def _refuse_deleting_inputs(out: Path, cfg: RunConfig, rels: Iterable[str], what: str) -> None:
    doomed = {(out / r).resolve() for r in rels}
    hit = [p for p in _protected_inputs(cfg) if p in doomed]
    if hit:
        raise OutputExists(f"{what} would delete {hit[0]}, which the pipeline reads as an input: copy it "
                           "out of the run folder first and point the config at the copy, or run into "
                           "another --out folder")


def run(cfg: RunConfig, out: str | Path, *, scheduler: str | None = None, overwrite: bool = False,
        report: Report | None = None, progress: Progress | None = None, until: str | None = None,
        force: Iterable[str] = (), command: str = "agriland run") -> dict[str, Any]:
    """Run the stages of ``cfg`` into the folder ``out``; returns the run record (run.json).

    ``scheduler`` (or ``cfg.runtime.scheduler``) connects to an existing Dask cluster;
    otherwise a LocalCluster is started and closed. ``report`` receives progress lines and
    ``progress(label, done, total)`` block counts. ``until`` stops after that stage (and runs
    only what it needs: ``"cae"`` trains the autoencoder, ``"unet"`` the U-Net). On a folder
    holding an unfinished or finished run of the same config, finished work is kept (see the
    module doc); ``force`` names stages to redo with their dependents (their products, COGs,
    gallery and STAC files are removed before they are redone). ``overwrite`` replaces
    another run, deleting only the files that run recorded as its own.

    The folder is locked for the whole call (:class:`~agriland_scale.outdir.RunLock`,
    ``command`` names this process in the lock); every check of the folder, the config's
    files and given models happens before anything in it changes.

    Raises
    ------
    RunLocked
        Another process writes to ``out``.
    OutputExists, OutputError
        ``out`` cannot take this run (see :func:`_prepare_output`).
    """
    out = Path(out).expanduser().resolve()
    force = list(force)
    wanted = stages_needed(until)
    forced = dependents(force)
    say = _say(report)
    with outdir.locked(out, command, notice=say):
        old = _prepare_output(out, cfg, overwrite, force)
        _preflight(cfg, wanted, None if overwrite else old, forced, scheduler)
        if overwrite and old is not None:
            _refuse_deleting_inputs(out, cfg, [f for fs in (old.get("files") or {}).values() for f in fs],
                                    "--overwrite")
            _remove_run(out, old)
            old = None
        elif force and old is not None:
            _refuse_deleting_inputs(out, cfg, [f for s in dependents(force) | {"report"}
                                               for f in (old.get("files") or {}).get(s, [])],
                                    f"--force {' '.join(force)}")
        return _run_locked(cfg, out, old, wanted, force, scheduler, say, progress, until)


def _run_locked(cfg: RunConfig, out: Path, old: dict[str, Any] | None, wanted: list[str], force: list[str],
                scheduler: str | None, say: Report, progress: Progress | None, until: str | None
                ) -> dict[str, Any]:
    (out / "models").mkdir(exist_ok=True)
    record: dict[str, Any] = {
        "config": json.loads(cfg.model_dump_json()), "versions": publish.package_versions(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "timings_s": {}, "stages": {}, "files": {},
    }
    if old:
        kept = {k: v for k, v in old.items() if k not in record or k in ("timings_s", "stages", "files")}
        record |= kept
        record["stages"] = dict(old.get("stages") or {})
        record["files"] = {k: list(v) for k, v in (old.get("files") or {}).items()}
        record["timings_s"] = {k: v for k, v in (old.get("timings_s") or {}).items() if k != "total"}
        record.setdefault("attempts", 1)
        record["attempts"] += 1
    products = Products(out)
    if force:
        # what the forced stages made goes before they are redone: no reader may open a
        # product, COG, gallery or STAC file that is no longer current. The record says so
        # first, so that an interrupted deletion is redone by the next run, not taken as done.
        doomed: list[str] = []
        for stage in sorted(dependents(force), key=STAGES.index):
            if record["stages"].pop(stage, None):
                record["timings_s"].pop(stage, None)
            doomed += record["files"].pop(stage, [])
        doomed += record["files"].pop("report", [])
        for key in ("products", "performance_report"):
            record.pop(key, None)
        record.setdefault("pending_removal", []).extend(doomed)
        publish.write_json(record, out / "run.json")
        for stage in sorted(dependents(force), key=STAGES.index):
            for zone in (record.get("zones") or {}).values():
                if stage in _GROUPS:
                    products.discard(zone.get("prefix", "") + _GROUPS[stage])
                if stage == "unet":  # the label raster it trained on
                    products.discard(zone.get("prefix", "") + "labels")
            if stage == "publish":
                products.discard("mosaic")
    if record.get("pending_removal"):  # this run's --force, or an earlier one cut short
        outdir.remove_files(out, record.pop("pending_removal"))
    publish.write_json(record, out / "run.json")  # a record from the start: a killed run is ours too
    handler = _log_file(out)
    say(f"log: {handler.baseFilename}")
    t_run = time.perf_counter()
    try:
        _Run(cfg, out, record, products, say, progress).run(wanted, scheduler)
    finally:
        record["timings_s"]["total"] = time.perf_counter() - t_run
        record["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        for stage, status in record["stages"].items():  # stopped where no handler could say so
            if status == "running":
                record["stages"][stage] = "interrupted"
        publish.write_json(record, out / "run.json")
        if until is None or until == "publish":
            before = outdir.snapshot(out)
            try:  # also for a failed run: the report shows what exists and where it stopped
                write_report(out)
            except Exception as e:  # noqa: BLE001 - a report problem must never hide the run's own error
                log.warning("could not write %s: %s", out / "report.html", e)
            record["files"]["report"] = sorted(set(record["files"].get("report", []))
                                               | set(outdir.changed_since(out, before)))
            publish.write_json(record, out / "run.json")
        say(f"done in {record['timings_s']['total']:.0f} s: {out}")
        _close_log(handler)
    return record


_RUN_LOG = logging.getLogger("agriland_scale.run")


@contextlib.contextmanager
def _performance_report(path: Path) -> Iterator[None]:
    """``distributed.performance_report`` into ``path``; skipped when the run is interrupted
    (collecting it then would delay the exit), and never failing the run."""
    from distributed import performance_report

    rep = performance_report(filename=str(path))
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
                log.warning("could not write the Dask performance report %s: %s", path, e)


def _say(report: Report | None) -> Report:
    def say(msg: str) -> None:
        _RUN_LOG.info(msg)
        if report is not None:
            report(msg)
    return say


def _log_file(out: Path) -> logging.FileHandler:
    """Send this package's INFO (and warnings) for this run to ``OUT/logs/run-TIME.log``."""
    logs = out / "logs"
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


def _close_log(h: logging.FileHandler) -> None:
    pkg = logging.getLogger("agriland_scale")
    pkg.removeHandler(h)
    pkg.setLevel(h._agriland_level)  # type: ignore[attr-defined]
    logging.getLogger("py.warnings").removeHandler(h)
    logging.captureWarnings(False)
    h.close()


def zone_name(epsg: int) -> str:
    """``32618`` -> ``utm18n``, ``32733`` -> ``utm33s``, others ``epsgNNNN``."""
    if 32601 <= epsg <= 32660:
        return f"utm{epsg - 32600:02d}n"
    if 32701 <= epsg <= 32760:
        return f"utm{epsg - 32700:02d}s"
    return f"epsg{epsg}"


class _Rows:
    """Row-concatenation of several ``(patch, dim)`` Zarr arrays, read a slice at a time."""

    def __init__(self, arrays: list):
        self.arrays = arrays
        self.starts = np.concatenate([[0], np.cumsum([a.shape[0] for a in arrays])]).astype(int)
        self.shape = (int(self.starts[-1]), int(arrays[0].shape[1]))

    def __getitem__(self, sl: slice) -> np.ndarray:
        start, stop = sl.start or 0, min(sl.stop, self.shape[0])
        parts = []
        for a, s0, s1 in zip(self.arrays, self.starts[:-1], self.starts[1:]):
            lo, hi = max(start, s0), min(stop, s1)
            if hi > lo:
                parts.append(np.asarray(a[lo - s0:hi - s0]))
        return np.concatenate(parts) if parts else np.empty((0, self.shape[1]), dtype="float32")


def _fit_clusters_task(store: str, groups: list[str], valid: np.ndarray, cfg, seed: int, out: str,
                       sample_size: int) -> dict[str, Any]:
    """Streaming k-means + DEC over the embeddings of every zone (runs on a worker)."""
    import zarr

    root = zarr.open_group(store, mode="r")
    emb = _Rows([root[g]["embedding"] for g in groups])
    return fit_clusters_streaming(emb, valid, cfg, seed, out=out, sample_size=sample_size)


class _Run:
    """The stages of one run; state lives in ``record`` (run.json) and the output folder."""

    def __init__(self, cfg: RunConfig, out: Path, record: dict[str, Any], products: Products,
                 say: Report, progress: Progress | None):
        self.cfg, self.out, self.record, self.products = cfg, out, record, products
        self.say, self.store, self.models = say, str(out / "agriland.zarr"), out / "models"

        def prog(label: str, done: int, total: int, info: str = "", milestone: bool = False) -> None:
            if progress:
                progress(label, done, total, info) if info else progress(label, done, total)
            if info:  # training: a line a finished epoch in the run log
                if milestone:
                    _RUN_LOG.info("%s: step %d/%d, %s", label, done, total, info)
                return
            step = max(1, total // 10)
            if done == total or done % step == 0:
                _RUN_LOG.info("%s: %d/%d blocks", label, done, total)
        self.progress = prog

    # -- bookkeeping ---------------------------------------------------------------------------
    def _settings(self, stage: str) -> dict[str, Any]:
        """The config values ``stage``'s outputs depend on (its sections, ``runtime`` aside),
        plus the models it applies: a resumed stage reuses blocks only of the same settings."""
        cfg = json.loads(self.cfg.model_dump_json())
        out: dict[str, Any] = {}
        for key in _SECTIONS[stage]:
            node: Any = cfg
            for part in key.split("."):
                node = node.get(part) if isinstance(node, dict) else None
            out[key] = node
        for name, field in (("cae", "encoder_path"), ("unet", "model_path")):
            path = (self.record.get(name) or {}).get(field)
            if path and stage in ("embeddings", "segmentation") and Path(path).exists():
                out[f"{name}_model"] = [path, Path(path).stat().st_mtime_ns]
        return out

    def _zones(self) -> dict[str, dict[str, Any]]:
        return {n: z for n, z in (self.record.get("zones") or {}).items() if not z.get("empty")}

    def _finished(self, stage: str) -> bool:
        if self.record["stages"].get(stage) != "done":
            return False
        zones = self._zones()
        if stage == "search":
            return (self.out / "items.json").exists()
        if stage in _GROUPS:
            return bool(zones) and all(self.products.exists(z["prefix"] + _GROUPS[stage]) for z in zones.values())
        if stage == "cae":
            return Path((self.record.get("cae") or {}).get("encoder_path", "/nonexistent")).exists()
        if stage == "unet":
            return Path((self.record.get("unet") or {}).get("model_path", "/nonexistent")).exists()
        return (self.out / "run.json").exists() and (self.out / "report.html").exists()

    def run(self, wanted: list[str], scheduler: str | None) -> None:
        rec = self.record
        self.wanted = wanted
        worker_log = self.out / "logs" / f"workers-{time.strftime('%Y%m%d-%H%M%S')}.log"
        with dask_client(self.cfg.runtime, scheduler, worker_log=str(worker_log)) as client:
            self.client = client
            rec["dashboard"] = client.dashboard_link
            rec["scheduler"] = client.scheduler.address
            self.say(f"Dask dashboard: {client.dashboard_link}")
            self.res = gpu_resources(client)
            # training tasks relay their progress (epoch, step, loss) as events of this run
            self.tag = f"{self.out}:{os.getpid()}:{time.time()}"

            def on_event(event: tuple) -> None:
                msg = event[1] if isinstance(event, tuple) and len(event) == 2 else event
                if isinstance(msg, dict) and msg.get("tag") == self.tag:
                    self.progress(msg["label"], msg["done"], msg["total"], msg["info"] or " ", msg["milestone"])

            client.subscribe_topic(PROGRESS_TOPIC, on_event)
            rec["gpu"] = bool(self.res)
            publish.write_json(rec, self.out / "run.json")
            todo = [s for s in wanted if not self._finished(s)]
            # the dashboard dies with a LocalCluster: its task stream, profiles and worker
            # memory of this run are kept as one HTML page beside the run's log
            perf = self.out / "logs" / f"dask-performance-{time.strftime('%Y%m%d-%H%M%S')}.html"
            try:
                with _performance_report(perf) if todo else contextlib.nullcontext():
                    self._stages(wanted, todo)
            finally:  # also for a failed run: where its time went is worth seeing
                if perf.exists():
                    rec["performance_report"] = str(perf.relative_to(self.out))
        shutil.rmtree(self.out / ".partial", ignore_errors=True) if wanted[-1] == "publish" else None

    def _stages(self, wanted: list[str], todo: list[str]) -> None:
        """Run the stages of ``todo`` in pipeline order, recording each one's status, time and
        files in the run record (``run.json`` after every change)."""
        rec = self.record
        for stage in wanted:
            if stage not in todo:
                self.say(f"[{stage}] finished earlier: kept")
                continue
            t0 = time.perf_counter()
            rec["stages"][stage] = "running"
            publish.write_json(rec, self.out / "run.json")
            before = outdir.snapshot(self.out)
            try:
                getattr(self, "_" + stage)()
            except KeyboardInterrupt:  # Ctrl-C, or SIGTERM (see cli)
                rec["stages"][stage] = "interrupted"
                rec["error"] = f"{stage}: interrupted"
                publish.write_json(rec, self.out / "run.json")  # at once: the cluster may take a while to close
                raise
            except BaseException as e:
                rec["stages"][stage] = "failed"
                rec["error"] = f"{stage}: {e}"
                publish.write_json(rec, self.out / "run.json")
                raise
            finally:
                rec["timings_s"][stage] = time.perf_counter() - t0
                # what the stage wrote is the run's to replace or delete later, nothing else
                rec["files"][stage] = sorted(set(rec["files"].get(stage, []))
                                             | set(outdir.changed_since(self.out, before)))
            rec["stages"][stage] = "done"
            rec.pop("error", None)
            publish.write_json(rec, self.out / "run.json")
            self.say(f"[{stage}] {rec['timings_s'][stage]:.1f} s")

    # -- stages --------------------------------------------------------------------------------
    def _items(self) -> list[pystac.Item]:
        fc = json.loads((self.out / "items.json").read_text())
        return [pystac.Item.from_dict(f) for f in fc["features"]]

    def _search(self) -> None:
        cfg = self.cfg
        region = stac.region_of(cfg.search)
        with stac.api_url(cfg.search) as url:
            items = stac.search_items(cfg.search, url)
        publish.write_json({"type": "FeatureCollection", "features": [i.to_dict() for i in items]},
                           self.out / "items.json")
        self.record["inputs"] = {"api": cfg.search.api, "region_bbox": list(region.bbox), "items": [
            {"id": i.id, "datetime": str(i.datetime or i.properties.get("start_datetime")),
             "cloud_cover": i.properties.get("eo:cloud_cover")} for i in items]}
        self.say(f"search: {len(items)} item(s)")

    def _cube(self) -> None:
        # one entry per UTM zone: {name: prefix of its groups in the store}; a single zone
        # keeps the plain layout (cube, patches, ...), several use utm18n/cube, ...
        cfg, rec = self.cfg, self.record
        region = stac.region_of(cfg.search)
        items = self._items()
        bands = cube_mod.load_bands(items, cfg.cube)
        items = normalize_items(items, bands)
        if cfg.cube.check_assets:
            items, bad = cube_mod.check_assets(items, bands, cfg.cube.on_bad_asset)
            rec["inputs"]["skipped_assets"] = bad
            if not items:
                b = bad[0]
                raise NoItemsFound(
                    f"every found item has a bad asset and cube.on_bad_asset is 'skip', so none is left: "
                    f"e.g. item {b['item']}, asset '{b['asset']}' ({b['href']}): {str(b['error'])[:300]}. "
                    "Fix or download the assets again, or widen the search")
        cubes = cube_mod.load_zone_cubes(items, cfg.cube, region, normalized=True)
        multi = len(cubes) > 1
        zones, empty = {}, []
        for epsg, cube in cubes.items():
            name = zone_name(epsg)
            prefix = f"{name}/" if multi else ""
            stats = self.products.write_blocks(cube, prefix + "cube", "y", self.client,
                                               settings=self._settings("cube"),
                                               label=f"cube {name}", progress=self.progress)
            cube = cube_mod.open_cube(self.store, prefix + "cube")
            chunks = cube_mod.chunk_valid_fraction(cube, cfg.cube.chunk)
            info = {"epsg": epsg, "prefix": prefix, "shape": {d: cube.sizes[d] for d in ("band", "y", "x")},
                    "crs": str(cube.rio.crs),
                    "transform": list(cube.rio.transform())[:6], "bounds": list(cube.rio.bounds()),
                    "items": list(cube.attrs["items"]), "chunks": int(chunks.size),
                    "empty_chunks": int((chunks == 0).sum()), "blocks_reused": stats["reused"]}
            if not (chunks > 0).any():
                empty.append(name)
                info["empty"] = True
            zones[name] = info
            self.say(f"cube {name}: {dict(cube.sizes)} in {cube.rio.crs}, "
                     f"{info['empty_chunks']}/{info['chunks']} chunks without clear pixels")
        rec["zones"] = zones
        if len(empty) == len(zones):
            raise EmptyRegion(
                "every pixel of the region is nodata or masked (clouds, shadows): choose "
                "another search.datetime or raise search.max_cloud_cover")
        if empty:
            warnings.warn(f"zone(s) {empty} have no clear pixel and are left out", AgrilandWarning,
                          stacklevel=1)
        first = next(iter(self._zones().values()))
        rec["cube"] = {k: first[k] for k in ("shape", "crs", "transform", "bounds")}

    def _index(self, zone: dict[str, Any]) -> tuple[xr.Dataset, np.ndarray]:
        index = publish.open_product(self.store, zone["prefix"] + "patches").load()
        return index, index["valid_fraction"].values >= self.cfg.patches.min_valid_fraction

    def _patches(self) -> None:
        p = self.cfg.patches
        for name, z in self._zones().items():
            cube = cube_mod.open_cube(self.store, z["prefix"] + "cube")
            index = patches_mod.patch_index(cube, p.size, p.stride)
            self.products.write(index, z["prefix"] + "patches")
            valid = index["valid_fraction"].values >= p.min_valid_fraction
            z["patches"] = {"count": int(index.sizes["patch"]), "valid": int(valid.sum()),
                            "grid": [index.attrs["n_rows"], index.attrs["n_cols"]]}
        zones = self._zones()
        self.record["patches"] = {k: sum(z["patches"][k] for z in zones.values()) for k in ("count", "valid")}
        if len(self.record["zones"]) == 1:
            self.record["patches"]["grid"] = next(iter(zones.values()))["patches"]["grid"]
        self.say(f"patches: {self.record['patches']['count']} ({self.record['patches']['valid']} valid)")
        valid, k = self.record["patches"]["valid"], self.cfg.cluster.k
        if valid < k and "clusters" in self.wanted:  # refused here, not after hours of CAE training
            fix = f"set cluster.k to at most {valid}, or " if valid >= 2 else ""
            raise ConfigError(
                f"cluster.k is {k} but the region has only {valid} valid patch(es) (of "
                f"{self.record['patches']['count']}; a patch is valid with at least "
                f"{self.cfg.patches.min_valid_fraction:.0%} clear pixels): {fix}enlarge the region, "
                "lower patches.stride or lower patches.min_valid_fraction")

    def _cae(self) -> None:
        e, cfg = self.cfg.embed, self.cfg
        if e.model:  # a CAE encoder trained before (agriland train-cae), maybe on another region
            meta = embed_mod.check_model(e.model, "embedding", e.bands, e.reflectance_max, cfg.patches.size,
                                         key="embed.model")
            self.record["cae"] = {"encoder_path": e.model, "given": True,
                                  "training_region": meta.get("training_region")}
            self.say(f"CAE: using the encoder {e.model} (trained on '{meta.get('training_region')}')")
            return
        # the CAE learns from the zone with the most valid patches; every zone is embedded
        zones = self._zones()
        idx = {n: self._index(z) for n, z in zones.items()}
        train_zone = max(zones, key=lambda n: idx[n][1].sum())
        ix, valid = idx[train_zone]
        sel = np.flatnonzero(valid)
        fut = self.client.submit(train_cae, self.store, ix["y0"].values[sel], ix["x0"].values[sel], e,
                                 cfg.patches.size, str(self.models / "cae.keras"), seed=cfg.seed,
                                 region=cfg.name, group=zones[train_zone]["prefix"] + "cube",
                                 progress_tag=self.tag, resources=self.res, pure=False)
        meta = fut.result()
        self.record["cae"] = {k: v for k, v in meta.items() if k != "history"} | {
            "final_loss": (meta["history"].get("loss") or [None])[-1], "zone": train_zone}
        self.say(f"CAE trained on {train_zone}: {e.train.epochs} epoch(s) x {e.train.steps_per_epoch} "
                 f"steps in {meta['seconds']:.0f} s")

    def _embeddings(self) -> None:
        e, p = self.cfg.embed, self.cfg.patches
        for name, z in self._zones().items():
            index, _ = self._index(z)
            emb = embed_mod.embed_patches(self.record["cae"]["encoder_path"], self.store, index, e.bands,
                                          e.reflectance_max, batch_size=e.batch_size,
                                          min_valid_fraction=p.min_valid_fraction, resources=self.res,
                                          group=z["prefix"] + "cube",
                                          precision="mixed_float16" if e.mixed_precision and self.res
                                          else "float32")
            stats = self.products.write_blocks(emb, z["prefix"] + "embeddings", "patch", self.client,
                                               settings=self._settings("embeddings"),
                                               label=f"embeddings {name}", progress=self.progress)
            z["embeddings_blocks"] = stats

    def _clusters(self) -> None:
        # one clustering over every zone's embeddings, so cluster ids mean the same everywhere;
        # k-means and DEC stream the stored embeddings on a worker (memory: one chunk + sample)
        c, zones = self.cfg.cluster, self._zones()
        idx = {n: self._index(z) for n, z in zones.items()}
        valid_all = np.concatenate([idx[n][1] for n in zones])
        fit_dir = self.products.staged("clusters_fit")
        fut = self.client.submit(_fit_clusters_task, self.store, [z["prefix"] + "embeddings" for z in zones.values()],
                                 valid_all, c, self.cfg.seed, str(fit_dir), c.sample_size, pure=False)
        info = fut.result()
        fit = xr.open_zarr(fit_dir, consolidated=False)
        start = 0
        for name, z in zones.items():
            index, _ = idx[name]
            n = index.sizes["patch"]
            cube = cube_mod.open_cube(self.store, z["prefix"] + "cube")
            cl = fit.drop_vars("centroids").isel(patch=slice(start, start + n)).assign_coords(
                patch=index["patch"].values, cluster=np.arange(c.k))
            cl["centroids"] = fit["centroids"].assign_coords(cluster=np.arange(c.k))
            start += n
            for v in ("labels", "kmeans_labels"):  # CF: -1 is the declared fill (not clustered)
                cl[v].encoding["_FillValue"] = np.int16(-1)
            cl["labels"].attrs.update(long_name="DEC cluster", comment=NOT_CLUSTERED)
            cl["kmeans_labels"].attrs.update(long_name="k-means cluster", comment=NOT_CLUSTERED)
            cl["cluster_map"] = cluster_map(cl["labels"].values, index, cube)
            cl = cube_mod.write_georef(cl, cube.rio.crs)
            self.products.write(cl, z["prefix"] + "clusters")
        shutil.rmtree(fit_dir, ignore_errors=True)
        self.record["clusters"] = info
        self.say(f"clusters: k={c.k}, DEC {info['dec_iterations']} iterations on {info['n_sample']} "
                 f"patches, {info['n_clustered']} patches assigned")

    def _labels(self) -> dict[str, xr.DataArray]:
        s = self.cfg.segment
        label_path = str(resolve_path(s.labels, Path.cwd()))
        labels, why = {}, []
        for name, z in self._zones().items():
            try:
                labels[name] = load_labels(label_path, cube_mod.open_cube(self.store, z["prefix"] + "cube"),
                                           s.positive_classes)
            except EmptyRegion as err:
                why.append(f"{name}: {err}")
        if not labels:
            raise EmptyRegion("; ".join(why))
        return labels

    def _unet(self) -> None:
        s, cfg = self.cfg.segment, self.cfg
        if s.model:  # a U-Net trained before (agriland train-unet), maybe on another region
            meta = embed_mod.check_model(s.model, "segmentation", s.bands, s.reflectance_max, s.window,
                                         key="segment.model")
            self.record["unet"] = {"model_path": s.model, "given": True,
                                   "training_region": meta.get("training_region"),
                                   "validation_metrics": meta.get("validation_metrics")}
            self.say(f"U-Net: using {s.model} (trained on '{meta.get('training_region')}')")
            return
        labels = self._labels()
        # the U-Net learns in the zone with the most labelled pixels, then maps every zone
        train_zone = max(labels, key=lambda n: int((labels[n].values != IGNORE).sum()))
        # labels that cannot train (no positive or no negative pixel) stop here, not after training
        training_windows(np.asarray(labels[train_zone].values), s,
                         f"the labels {resolve_path(s.labels, Path.cwd())} (zone {train_zone})")
        path = str(self.models / "unet.keras")
        # the training task reads the label raster from the store (a full tile's is 120 MB:
        # not something to send through the scheduler)
        prefix = self._zones()[train_zone]["prefix"]
        crs = cube_mod.open_cube(self.store, prefix + "cube").rio.crs
        lab = cube_mod.write_georef(xr.Dataset({"label": labels[train_zone]}), crs)
        lab["label"].attrs.update(long_name="U-Net training label", flag_values=[0, 1, IGNORE],
                                  flag_meanings="other agricultural ignored")
        lab["label"].encoding.update(chunks=(2048, 2048), _FillValue=None)
        publish.write_group(lab, self.store, prefix + "labels")
        fut = self.client.submit(train_unet, self.store, prefix + "labels", s, path, seed=cfg.seed,
                                 label_source=str(resolve_path(s.labels, Path.cwd())), region=cfg.name,
                                 group=prefix + "cube", progress_tag=self.tag, resources=self.res, pure=False)
        meta = fut.result()
        self.record["unet"] = {k: v for k, v in meta.items() if k != "per_epoch"} | {
            "zone": train_zone, "model_path": path}
        self.say(f"U-Net ({s.encoder}) trained on {train_zone} in {meta['seconds']:.0f} s, "
                 f"validation IoU {meta['validation_metrics']['iou']:.3f}")

    def _segmentation(self) -> None:
        s = self.cfg.segment
        labels = self._labels() if s.labels else {}
        for name, z in self._zones().items():
            cube = cube_mod.open_cube(self.store, z["prefix"] + "cube")
            seg = segment.segment_region(self.record["unet"]["model_path"], self.store, cube, s.bands,
                                         window=s.window, overlap=s.overlap, reflectance_max=s.reflectance_max,
                                         threshold=s.threshold, batch_size=s.batch_size, resources=self.res,
                                         group=z["prefix"] + "cube")
            if name in labels:
                chunks = dict(zip(("y", "x"), seg["probability"].chunks))
                seg["training_label"] = labels[name].chunk(chunks)
                seg["training_label"].encoding.update(_FillValue=None)
            seg = cube_mod.write_georef(seg, cube.rio.crs)
            stats = self.products.write_blocks(seg, z["prefix"] + "segmentation", "y", self.client,
                                               settings=self._settings("segmentation"),
                                               label=f"segmentation {name}", progress=self.progress)
            z["segmentation_blocks"] = stats

    def _publish(self) -> None:
        cfg, out, store = self.cfg, self.out, self.store
        zones = self._zones()
        multi = len(self.record["zones"]) > 1
        cogs = out / "cog"
        groups, seg_by_zone = [], {}
        for name, z in zones.items():
            pre, tag = z["prefix"], (f"{name}_" if multi else "")
            cube = cube_mod.open_cube(store, pre + "cube")
            cl = publish.open_product(store, pre + "clusters")
            seg = publish.open_product(store, pre + "segmentation")
            seg_by_zone[name] = seg
            publish.write_cluster_cog(cl["cluster_map"], cogs / f"{tag}cluster_map.tif", k=cfg.cluster.k)
            publish.write_cog(seg["probability"], cogs / f"{tag}probability.tif", nodata=255, scale=1 / 254,
                              description="agricultural land probability", units="1")
            publish.write_cog(seg["mask"].fillna(255).astype("uint8"), cogs / f"{tag}mask.tif", nodata=255,
                              description="agricultural land mask", colormap=publish.MASK_COLORMAP)
            publish.write_quicklook(cube, cl, seg, out / f"quicklook{'_' + name if multi else ''}.png")
            if cfg.segment.vectorize:
                from .vectorize import write_fields

                n = write_fields(seg["mask"], out / "vector" / f"{tag}fields.parquet",
                                 min_area_m2=cfg.segment.min_field_area_m2)
                self.record.setdefault("vector", {})[name] = {"path": f"vector/{tag}fields.parquet", "polygons": n}
            groups += [pre + g for g in ("cube", "patches", "embeddings", "clusters", "segmentation")]
        if cfg.cube.mosaic_crs:
            mosaic = publish.mosaic_zones(seg_by_zone, cfg.cube.mosaic_crs, cfg.cube.mosaic_resolution)
            self.products.write(mosaic, "mosaic")
            publish.write_cog(mosaic["probability"], cogs / "mosaic_probability.tif", nodata=255, scale=1 / 254,
                              description="agricultural land probability, zones reprojected", units="1")
            groups.append("mosaic")
        for name in zones:  # per-cluster gallery, statistics and embedding map
            write_cluster_products(store, out, cfg.cluster.k, cfg.seed, zone=name if multi else "")
        publish.consolidate(store)
        self.record["products"] = {"zarr": store, "groups": groups,
                                   "cogs": sorted(str(x) for x in cogs.glob("*.tif")),
                                   "report": str(out / "report.html"), "stac": str(out / "stac" / "collection.json")}
        publish.write_json(self.record, out / "run.json")
        write_stac(out)
