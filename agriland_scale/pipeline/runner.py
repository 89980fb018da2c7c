"""The pipeline: every stage of a run over one output folder, resumable.

The stages: search -> cube -> patches -> cae -> embeddings -> clusters -> unet ->
segmentation -> publish.

:func:`run` composes the stage modules over one output folder::

    OUT/agriland.icechunk  the products (an Icechunk repository of Zarr v3 groups, versioned):
                        cube, patches, embeddings, clusters, segmentation (one UTM zone);
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

Resume: ``run.json`` records each finished stage; a product is built block by block on the
store's ``wip`` branch and becomes visible (branch ``main``) only when complete (see
:mod:`.resume`). Running again on the same folder
skips finished stages, writes only the blocks an interrupted stage had not finished, and
reuses the recorded search results (a search is not repeated). ``force`` redoes stages and
everything that depends on them; a config that changed in a section a finished stage used
is refused until that stage is forced.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import dask

from agriland_scale.config.schema import RunConfig
from agriland_scale.faults import storage_fault
from agriland_scale.files import (
    delete_prefix,
    join_url,
    short_error,
)
from agriland_scale.layout import (
    GROUPS,
    ITEMS,
    LOGS_DIR,
    MODELS_DIR,
    RECORD,
    STORE,
    dependents,
    stages_needed,
)
from agriland_scale.models.worker import PROGRESS_TOPIC
from agriland_scale.pipeline import outdir
from agriland_scale.pipeline.context import Progress, Report, RunContext, model_version, zones_with_data
from agriland_scale.pipeline.folder import InFolder, RunFolder, open_folder
from agriland_scale.pipeline.launch import tensorflow_needed
from agriland_scale.pipeline.plugins import StorageOptions
from agriland_scale.pipeline.preflight import preflight, prepare_output, refuse_deleting_inputs, remove_run
from agriland_scale.pipeline.runlog import RUN_LOG as _RUN_LOG
from agriland_scale.pipeline.runlog import close_log as _close_log
from agriland_scale.pipeline.runlog import log_file as _log_file
from agriland_scale.pipeline.runlog import performance_report as _performance_report
from agriland_scale.pipeline.runlog import say_and_log as _say
from agriland_scale.pipeline.runtime import (
    dask_client,
    gpu_resources,
    inference_precision,
    scheduler_address,
)
from agriland_scale.pipeline.stages import STAGE_FUNCTIONS
from agriland_scale.publish.report import write_report
from agriland_scale.store.resume import Products

if TYPE_CHECKING:
    from agriland_scale.pipeline.launch import ClusterLaunch

__all__ = ["run"]

log = logging.getLogger(__name__)


def run(
    cfg: RunConfig,
    out: str | Path,
    *,
    scheduler: str | None = None,
    overwrite: bool = False,
    report: Report | None = None,
    progress: Progress | None = None,
    until: str | None = None,
    force: Iterable[str] = (),
    command: str = "agriland run",
    launch: ClusterLaunch | None = None,
) -> dict[str, Any]:
    """Run the stages of ``cfg`` into the folder ``out``; returns the run record (run.json).

    ``scheduler`` (or ``cfg.runtime.scheduler``, or Dask's ``scheduler-address`` such as
    ``DASK_SCHEDULER_ADDRESS``) connects to an existing Dask cluster; otherwise a LocalCluster is started and closed. ``report`` receives progress lines and
    ``progress(label, done, total)`` block counts. ``until`` stops after that stage (and runs
    only what it needs: ``"cae"`` trains the autoencoder, ``"unet"`` the U-Net). On a folder
    holding an unfinished or finished run of the same config, finished work is kept (see the
    module doc); ``force`` names stages to redo with their dependents (their products, COGs,
    gallery and STAC files are removed before they are redone). ``overwrite`` replaces
    another run, deleting only the files that run recorded as its own. ``launch``: the
    LocalCluster the CLI started ahead of this call (:class:`~.launch.ClusterLaunch`), used
    instead of starting one; the caller closes it if the run does not take it.

    The folder is locked for the whole call (:class:`~agriland_scale.pipeline.outdir.RunLock`,
    ``command`` names this process in the lock); every check of the folder, the config's
    files and given models happens before anything in it changes.

    Raises
    ------
    RunLocked
        Another process writes to ``out``.
    OutputExists, OutputError
        ``out`` cannot take this run (see :func:`prepare_output`).
    """
    scheduler = scheduler_address(cfg.runtime, scheduler)  # --scheduler > runtime.scheduler > Dask's config
    force = list(force)
    wanted = stages_needed(until)
    forced = dependents(force)
    say = _say(report)
    with open_folder(cfg, out, command, say) as folder:
        out, location, mirror = folder.path, folder.location, folder.mirror
        with outdir.locked(out, command, notice=say):
            old = prepare_output(out, cfg, overwrite, force)
            preflight(cfg, wanted, None if overwrite else old, forced, scheduler)
            if overwrite and old is not None:
                refuse_deleting_inputs(
                    out, cfg, [f for fs in (old.get("files") or {}).values() for f in fs], "--overwrite"
                )
                remove_run(out, old)
                if mirror is not None:  # the products on the object store go too
                    delete_prefix(join_url(location, STORE), cfg.output.storage_options)
                old = None
            elif force and old is not None:
                refuse_deleting_inputs(
                    out,
                    cfg,
                    [f for s in dependents(force) | {"report"} for f in (old.get("files") or {}).get(s, [])],
                    f"--force {' '.join(force)}",
                )
            return _run_locked(cfg, folder, old, wanted, force, scheduler, say, progress, until, launch)


def _run_locked(
    cfg: RunConfig,
    folder: RunFolder,
    old: dict[str, Any] | None,
    wanted: list[str],
    force: list[str],
    scheduler: str | None,
    say: Report,
    progress: Progress | None,
    until: str | None,
    launch: ClusterLaunch | None,
) -> dict[str, Any]:
    out = folder.path
    (out / MODELS_DIR).mkdir(exist_ok=True)
    record: dict[str, Any] = folder.start(cfg, old)  # type: ignore[assignment]
    products = Products(
        folder.location, cfg.output.storage_options, commit_every_s=cfg.runtime.commit_every_s
    )
    if force:
        folder.forget(force, products)
    folder.remove_pending()
    folder.save()  # a record from the start: a killed run is ours too
    handler = _log_file(out)
    say(f"log: {handler.baseFilename}")
    t_run = time.perf_counter()
    closing: list[threading.Thread] = []  # the LocalCluster stops while the report is written
    figures: dict[str, list[str]] = {}  # the report's product maps, drawn by the publish stage
    finished = False
    try:
        _Runner(cfg, folder, products, say, progress).run(wanted, scheduler, closing, figures, launch)
        finished = True
    finally:
        record["timings_s"]["total"] = time.perf_counter() - t_run
        record["store"] = {
            "location": products.location,
            "commits": products.commits,
            "commit_seconds": round(products.commit_seconds, 3),
        }
        record["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        for stage, status in record["stages"].items():  # stopped where no handler could say so
            if status == "running":
                record["stages"][stage] = "interrupted"

        def save() -> None:
            """Write the record; after a failure, as well as the folder allows (its error goes on)."""
            if finished:
                folder.save()
            elif not folder.save_anyhow():
                log.warning("could not record the end of the run in %s", folder.record_path)

        save()
        if until is None or until == "publish":
            before = outdir.snapshot(out)
            try:  # also for a failed run: the report shows what exists and where it stopped
                write_report(out, product_figures=figures)
            except Exception as e:  # noqa: BLE001 - a report problem must never hide the run's own error
                # after a failed run (its error follows) in the run's log only
                (log.warning if finished else log.info)(
                    "could not write %s: %s", out / "report.html", short_error(e)
                )
            record["files"]["report"] = sorted(
                set(record["files"].get("report", [])) | set(outdir.changed_since(out, before))
            )
            save()
        for thread in closing:
            thread.join()
        if finished:
            say(f"done in {record['timings_s']['total']:.0f} s: {out}")
        else:  # the error itself follows on the terminal (the CLI), and in this log
            _RUN_LOG.info(
                "stopped after %.0f s: %s", record["timings_s"]["total"], record.get("error", "interrupted")
            )
        _close_log(handler)
    return record


class _Runner(InFolder):
    """Runs the stages of one run: status, timing, files and resume in ``record`` (run.json)."""

    def __init__(
        self,
        cfg: RunConfig,
        folder: RunFolder,
        products: Products,
        say: Report,
        progress: Progress | None,
    ):
        self.cfg, self.folder, self.products, self.say = cfg, folder, products, say

        def prog(label: str, done: int, total: int, info: str = "", milestone: bool = False) -> None:
            if progress:  # a milestone (a training's phase or finished epoch) says so
                if milestone:
                    progress(label, done, total, info, True)
                elif info:
                    progress(label, done, total, info)
                else:
                    progress(label, done, total)
            if info:  # training: a line a phase and a finished epoch in the run log
                if milestone and done > 0:
                    _RUN_LOG.info("%s: step %d/%d, %s", label, done, total, info)
                elif milestone:
                    _RUN_LOG.info("%s: %s", label, info.strip())
                return
            step = max(1, total // 10)
            if done == total or done % step == 0:
                _RUN_LOG.info("%s: %d/%d blocks", label, done, total)

        self.progress = prog

    def _finished(self, stage: str) -> bool:
        if self.record["stages"].get(stage) != "done":
            return False
        zones = zones_with_data(self.record)
        if stage == "search":
            return (self.out / ITEMS).exists()
        if stage in GROUPS:
            return bool(zones) and all(
                self.products.exists(z["prefix"] + GROUPS[stage]) for z in zones.values()
            )
        if stage == "cae":
            return (
                model_version((self.record.get("cae") or {}).get("encoder_path", "/nonexistent")) is not None
            )
        if stage == "unet":
            return (
                model_version((self.record.get("unet") or {}).get("model_path", "/nonexistent")) is not None
            )
        return (self.out / RECORD).exists() and (self.out / "report.html").exists()

    def run(
        self,
        wanted: list[str],
        scheduler: str | None,
        closing: list[threading.Thread] | None = None,
        figures: dict[str, list[str]] | None = None,
        launch: ClusterLaunch | None = None,
    ) -> None:
        """Start or join the Dask cluster, then run the unfinished stages of ``wanted``.

        ``closing``: see :func:`~.runtime.dask_client` (the caller joins the thread).
        ``figures``: receives the report's product maps if the publish stage draws them
        (:attr:`.RunContext.report_figures`). ``launch``: see :func:`run`.
        """
        rec = self.record
        stamp = time.strftime("%Y%m%d-%H%M%S")
        worker_log = self.out / LOGS_DIR / f"workers-{stamp}.log"
        if scheduler or self.cfg.runtime.scheduler:
            launch = None  # an existing cluster: the launched one is closed by its owner
        with dask_client(
            self.cfg.runtime, scheduler, worker_log=str(worker_log), closing=closing, launch=launch
        ) as client:
            if self.mirror is not None and self.cfg.output.storage_options:
                client.register_plugin(StorageOptions(self.location, self.cfg.output.storage_options))
            rec["dashboard"] = client.dashboard_link
            rec["scheduler"] = client.scheduler.address
            self.say(f"Dask dashboard: {client.dashboard_link}")
            res = gpu_resources(client)
            rec["precision"] = inference_precision(client, self.cfg.runtime.inference_precision, bool(res))
            # training tasks relay their progress (epoch, step, loss) as events of this run
            ctx = RunContext(
                cfg=self.cfg,
                folder=self.folder,
                products=self.products,
                client=client,
                res=res,
                tag=f"{self.out}:{os.getpid()}:{time.time()}",
                say=self.say,
                progress=self.progress,
                wanted=tuple(wanted),
                report_figures=figures if figures is not None else {},
                own_cluster=not (scheduler or self.cfg.runtime.scheduler),
                worker_log=str(worker_log),
            )

            def on_event(event: tuple) -> None:
                msg = event[1] if isinstance(event, tuple) and len(event) == 2 else event
                if isinstance(msg, dict) and msg.get("tag") == ctx.tag:
                    self.progress(
                        msg["label"], msg["done"], msg["total"], msg["info"] or " ", msg["milestone"]
                    )

            client.subscribe_topic(PROGRESS_TOPIC, on_event)
            rec["gpu"] = bool(res)
            self.folder.save()
            todo = [s for s in wanted if not self._finished(s)]
            # TensorFlow's import and a given encoder's load and trace overlap search and cube
            # (the import may have started with the launched cluster)
            ctx.warming.extend((future, (), w) for future, w in (launch.imports if launch else []))
            e = self.cfg.embed
            ctx.warm_up(
                [(e.model, self.cfg.patches.size, len(e.bands), True)]
                if "embeddings" in todo and e.model and not (e.mixed_precision and res)
                else [],
                only_tensorflow=not ctx.warming and tensorflow_needed(self.cfg, todo),
            )
            # the dashboard dies with a LocalCluster: its task stream, profiles and worker
            # memory of this run are kept as one HTML page beside the run's log
            perf = self.out / LOGS_DIR / f"dask-performance-{stamp}.html"
            try:
                with _performance_report(perf) if todo else contextlib.nullcontext():
                    self._stages(ctx, todo)
            finally:  # also for a failed run: where its time went is worth seeing
                if perf.exists():
                    rec["performance_report"] = str(perf.relative_to(self.out))
                client.cancel([future for future, _, _ in ctx.warming])
                if self.mirror is not None and self.cfg.output.storage_options:  # an existing cluster keeps
                    with contextlib.suppress(Exception):  # no credentials of a finished run
                        client.unregister_worker_plugin(StorageOptions.name)
        if wanted[-1] == "publish":  # a finished run: its products' version gets a name
            self.products.tag_run(rec.get("attempts", 1))

    def _stages(self, ctx: RunContext, todo: list[str]) -> None:
        """Run the stages of ``todo`` in pipeline order, recording each one in the run record.

        Each stage's status, time and files are recorded (``run.json`` written after every
        change).
        """
        rec = self.record
        for stage in ctx.wanted:
            if stage not in todo:
                self.say(f"[{stage}] finished earlier: kept")
                continue
            model = {
                "embeddings": (rec.get("cae") or {}).get("encoder_path"),
                "segmentation": (rec.get("unet") or {}).get("model_path"),
            }.get(stage)
            if model:  # the workers' TensorFlow import and model load, apart from the stage's work
                waited = ctx.wait_for_warm_up(model)
                if waited >= 0.05:
                    rec["timings_s"]["warm_up_wait"] = rec["timings_s"].get("warm_up_wait", 0.0) + waited
                    self.say(f"{stage}: waited {waited:.1f} s for the workers' TensorFlow and model warm-up")
            t0 = time.perf_counter()
            rec["stages"][stage] = "running"
            self.folder.save(push=True)  # readers of an object store see the stage running
            before = outdir.snapshot(self.out)
            try:
                # what a stage computes implicitly (reading its inputs back from the store:
                # valid fractions, the patch index, labels, the COGs' pixels) runs on this
                # process's threads, not on a worker busy with the stage's own tasks or a
                # model's warm-up; the stages' block tasks go through the client explicitly
                with dask.config.set(scheduler="threads"):
                    STAGE_FUNCTIONS[stage](ctx)
            except KeyboardInterrupt:  # Ctrl-C, or SIGTERM (see cli)
                rec["stages"][stage] = "interrupted"
                rec["error"] = f"{stage}: interrupted"
                self.folder.save_anyhow()  # at once: the cluster may take a while to close
                raise
            except BaseException as e:
                # a full disk, a folder turned read-only, a lost object store: said as such
                fault = storage_fault(e, self.location) if isinstance(e, Exception) else None
                rec["stages"][stage] = "failed"
                rec["error"] = f"{stage}: {fault or e}"
                self.folder.save_anyhow()  # also where the folder is the problem
                if fault is not None:
                    raise fault from e
                raise
            finally:
                rec["timings_s"][stage] = time.perf_counter() - t0
                # what the stage wrote is the run's to replace or delete later, nothing else
                rec["files"][stage] = sorted(
                    set(rec["files"].get(stage, [])) | set(outdir.changed_since(self.out, before))
                )
                if self.mirror is not None:  # the stage's files on the object store, one object each
                    try:
                        self.folder.save(push=True)
                    except Exception as e:
                        if rec["stages"][stage] == "running":  # the stage itself went well
                            raise
                        # the stage's own error follows; the log keeps this one
                        log.info("could not put the run's files on %s: %s", self.location, short_error(e))
            rec["stages"][stage] = "done"
            rec.pop("error", None)
            self.folder.save()
            self.say(f"[{stage}] {rec['timings_s'][stage]:.1f} s")
