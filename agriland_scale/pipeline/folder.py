"""The run folder: where one run lives, and the one writer of its record (``run.json``).

A run lives in a local folder, or on object storage (``s3://…``, ``gs://…``, ``az://…``)
through a working copy on this machine whose files are put back after every stage
(:mod:`.remote`). :class:`RunFolder` holds the three together (the folder the stages write
in, the run's location, the mirror that puts files back) with the run record
(:class:`~agriland_scale.layout.RunRecord`), and is the only code that writes ``run.json``:
:meth:`RunFolder.save` after every change of a stage's status, :meth:`RunFolder.save_anyhow`
where the folder itself may be what failed. :func:`open_folder` checks and locks an
object-storage location and fetches its files before anything else happens.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agriland_scale.errors import AgrilandError
from agriland_scale.faults import storage_fault
from agriland_scale.files import (
    is_object_url,
    join_url,
    probe_location,
    use_storage_options,
    write_json,
    write_json_anyhow,
)
from agriland_scale.layout import (
    GROUPS,
    MODELS_DIR,
    RECORD,
    STAGES,
    dependents,
    local_folder,
    package_versions,
)
from agriland_scale.pipeline.remote import Mirror, checked_out

if TYPE_CHECKING:
    from agriland_scale.config.schema import RunConfig
    from agriland_scale.layout import RunRecord
    from agriland_scale.store.resume import Products

__all__ = ["InFolder", "RunFolder", "open_folder"]


@dataclass
class RunFolder:
    """One run's place: its folder, location, mirror and record.

    Attributes
    ----------
    path : Path
        The folder the stages write in (absolute): the run folder itself, or the working copy
        of a run on object storage.
    location : str
        Where the run lives: ``path`` as a string, or the object-storage URL.
    mirror : Mirror or None
        Puts the working copy's files on the object store (a run on object storage).
    record : dict
        The run record (``run.json``, :class:`~agriland_scale.layout.RunRecord`): stages add
        what they found; only :meth:`save` and :meth:`save_anyhow` write it.
    """

    path: Path
    location: str = ""
    mirror: Mirror | None = None
    record: RunRecord = field(default_factory=dict)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        self.location = self.location or str(self.path)

    @property
    def record_path(self) -> Path:
        """``OUT/run.json`` (in the working copy for a run on object storage)."""
        return self.path / RECORD

    @property
    def models(self) -> Path:
        """Where trained models go, ``OUT/models``."""
        return self.path / MODELS_DIR

    def where(self, rel: str) -> str:
        """Where the run's file ``rel`` (relative to OUT) lives: a path, or a URL on object storage."""
        return join_url(self.location, rel) if is_object_url(self.location) else str(self.path / rel)

    def save(self, *, push: bool = False) -> None:
        """Write ``run.json`` (whole or not at all); ``push``: then put the folder's files on the object store."""
        write_json(self.record, self.record_path)
        if push and self.mirror is not None:
            self.mirror.push()

    def save_anyhow(self) -> bool:
        """Write ``run.json`` as well as the folder allows (after a failure: its error goes on)."""
        return write_json_anyhow(self.record, self.record_path)

    def start(self, cfg: RunConfig, old: dict[str, Any] | None) -> RunRecord:
        """Begin this invocation's record: a fresh one, or ``old``'s carried on (an attempt more).

        ``old``: the folder's record of an earlier attempt of the same run (stage status,
        timings without the total, files, what the stages found). Not yet written.
        """
        record: dict[str, Any] = {
            "config": json.loads(cfg.model_dump_json()),
            "versions": package_versions(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "timings_s": {},
            "stages": {},
            "files": {},
        }
        if old:
            kept = {k: v for k, v in old.items() if k not in record or k in ("timings_s", "stages", "files")}
            record |= kept
            record["stages"] = dict(old.get("stages") or {})
            record["files"] = {k: list(v) for k, v in (old.get("files") or {}).items()}
            record["timings_s"] = {k: v for k, v in (old.get("timings_s") or {}).items() if k != "total"}
            record.setdefault("attempts", 1)
            record["attempts"] += 1
        record["location"] = self.location
        self.record = record  # type: ignore[assignment]
        return self.record

    def forget(self, force: Iterable[str], products: Products) -> None:
        """Forget what the forced stages and their dependents made, before they are redone.

        No reader may open a product, COG, gallery or STAC file that is no longer current.
        The record says so first (``pending_removal``, written), so that an interrupted
        deletion is redone by the next run, not taken as done; then their products leave the
        store. The files go with :meth:`remove_pending`.
        """
        record: dict[str, Any] = self.record  # type: ignore[assignment]
        redo = sorted(dependents(force), key=STAGES.index)
        doomed: list[str] = []
        for stage in redo:
            if record["stages"].pop(stage, None):
                record["timings_s"].pop(stage, None)
            doomed += record["files"].pop(stage, [])
        doomed += record["files"].pop("report", [])
        for key in ("products", "performance_report"):
            record.pop(key, None)
        record.setdefault("pending_removal", []).extend(doomed)
        self.save()
        for stage in redo:
            for zone in (record.get("zones") or {}).values():
                if stage in GROUPS:
                    products.discard(zone.get("prefix", "") + GROUPS[stage])
                if stage == "unet":  # the label raster it trained on
                    products.discard(zone.get("prefix", "") + "labels")
            if stage == "publish":
                products.discard("mosaic")

    def remove_pending(self) -> None:
        """Delete the files a ``--force`` (this run's, or one cut short) left to remove."""
        from agriland_scale.pipeline import outdir

        if self.record.get("pending_removal"):
            outdir.remove_files(self.path, self.record.pop("pending_removal"))


class InFolder:
    """The parts of a :class:`RunFolder` as attributes of an object that has one (``folder``).

    For the runner and the stages' :class:`~agriland_scale.pipeline.context.RunContext`: they
    read the folder's current path, record, location and mirror, never keep copies of them.
    """

    folder: RunFolder

    @property
    def out(self) -> Path:
        """The output folder (absolute; the working copy of a run on object storage)."""
        return self.folder.path

    @property
    def record(self) -> dict[str, Any]:
        """The run record (``run.json``): stages add what they found, the runner saves it."""
        return self.folder.record  # type: ignore[return-value]

    @property
    def location(self) -> str:
        """Where the run lives: ``out`` itself, or the object-storage URL ``out`` is the working copy of."""
        return self.folder.location

    @property
    def mirror(self) -> Mirror | None:
        """Puts the working copy's files on the object store (a run on object storage), else None."""
        return self.folder.mirror


@contextlib.contextmanager
def open_folder(cfg: RunConfig, out: str | Path, command: str, say: Any) -> Iterator[RunFolder]:
    """Give the run's folder: a local one, or an object-storage location's working copy.

    A local ``out`` is the run's folder. An object-storage ``out`` is checked (reachable,
    bucket, credentials, write permission) before anything else, locked
    (:class:`~.lease.RemoteLock`), and its files are fetched into this machine's working copy
    (:func:`~.remote.working_copy`), which is put back after every stage and at the end.
    ``say(message)``: a line for the user.
    """
    if not is_object_url(out):
        yield RunFolder(local_folder(out))
        return
    location = str(out).rstrip("/")
    # the pipeline's credentials for every URL of this kind the run opens, here and on its
    # workers (the runner registers them), before the environment's
    use_storage_options(location, cfg.output.storage_options)
    try:
        probe_location(location, cfg.output.storage_options)
        with checked_out(location, command, cfg.output.storage_options, notice=say) as (local, mirror):
            say(f"run on object storage: {location} (working copy {local})")
            yield RunFolder(local, location, mirror)
    except Exception as e:
        # a store lost between stages (a push, the lock): said while its endpoint is known
        fault = None if isinstance(e, AgrilandError) else storage_fault(e, location)
        if fault is not None:
            raise fault from e
        raise
    finally:
        use_storage_options(location, None)
