"""The run's product store as a repository: where it is, how to open it, its versions.

A run's products are one Icechunk repository (transactional Zarr v3): ``OUT/agriland.icechunk``
on local disk, or a prefix of a bucket (``s3://``, ``gs://``, ``az://``). The branch ``main``
holds only complete products; every change to it is a commit (a version), so a reader opens a
consistent snapshot and earlier versions stay readable (:func:`history`, :func:`reader`).
:mod:`agriland_scale.store` reads groups from it; :mod:`agriland_scale.pipeline.resume`
writes it.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import icechunk

from agriland_scale.errors import CorruptInput, OutputError
from agriland_scale.files import OBJECT_SCHEMES, check_object_url, is_object_url, probe_location, s3_settings
from agriland_scale.layout import RECORD, STORE, local_folder

__all__ = ["ICECHUNK_MEDIA_TYPE", "history", "is_repo", "open_repo", "reader", "repo_storage", "store_location"]

# the engine warns that its local-disk backend is not safe for concurrent commits: one
# process commits to a run at a time (the run lock), so the warning says nothing to our users
icechunk.set_logs_filter(os.environ.get("ICECHUNK_LOG", "error"))

# what the STAC items call the store (an Icechunk repository of Zarr v3 groups)
ICECHUNK_MEDIA_TYPE = "application/vnd.zarr+icechunk"

_URL = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://(.*)")


def store_location(out: str | Path) -> str:
    """Return the location of a run's product store: ``OUT/agriland.icechunk`` (path or URL).

    ``out`` may already name the store (it ends in ``agriland.icechunk``).
    """
    text = str(out).rstrip("/")
    if text.endswith(STORE):
        return text if _URL.match(text) else str(local_folder(text))
    if _URL.match(text) and not text.lower().startswith("file://"):
        return f"{text}/{STORE}"
    folder = local_folder(text)
    if not (folder / STORE).exists():  # the working copy of a run on object storage
        location = _recorded_location(folder)
        if location and is_object_url(location):
            return f"{location}/{STORE}"
    return str(folder / STORE)


def _recorded_location(folder: Path) -> str | None:
    """Return the ``location`` that a run folder's ``run.json`` names (an object-storage URL)."""
    try:
        rec = json.loads((folder / RECORD).read_text())
    except (OSError, ValueError):
        return None
    loc = rec.get("location") if isinstance(rec, dict) else None
    return str(loc).rstrip("/") if loc else None


def repo_storage(location: str | Path, storage_options: dict[str, Any] | None = None) -> icechunk.Storage:
    """Return the Icechunk storage of ``location``: a local folder or an object-storage URL.

    Parameters
    ----------
    location : str or Path
        A folder (or ``file://`` URL), or ``s3://BUCKET/PREFIX``, ``gs://BUCKET/PREFIX``,
        ``az://CONTAINER/PREFIX`` (``abfs://`` too).
    storage_options : dict, optional
        For S3: ``endpoint_url``, ``region``, ``access_key_id``, ``secret_access_key``,
        ``session_token``, ``allow_http``, ``anonymous``. Without them credentials come from
        the usual places: ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``, ``AWS_ENDPOINT_URL``
        (an S3-compatible server: path-style requests, plain HTTP allowed when it says
        ``http://``), ``AWS_REGION``. For GCS and Azure, the options are passed to
        ``icechunk.gcs_storage``/``azure_storage`` (``account`` is required for Azure).

    Raises
    ------
    OutputError
        An unsupported URL scheme, or a URL without a bucket.
    """
    opts = dict(storage_options or {})
    text = str(location)
    m = _URL.match(text)
    if not m or m.group(1).lower() == "file":
        return icechunk.local_filesystem_storage(str(local_folder(text)))
    scheme = m.group(1).lower()
    kind = OBJECT_SCHEMES.get(scheme)
    parsed = urlparse(text)
    bucket, prefix = parsed.netloc, parsed.path.strip("/")
    if kind is None:
        raise OutputError(f"{text}: '{scheme}://' is not a supported location; use a local folder, "
                          "s3://BUCKET/PREFIX, gs://BUCKET/PREFIX or az://CONTAINER/PREFIX")
    if not bucket:
        raise OutputError(f"{text}: the URL names no bucket; write it as {scheme}://BUCKET/PREFIX")
    check_object_url(text)
    if kind == "s3":
        st = s3_settings(opts)
        kw: dict[str, Any] = {"bucket": bucket, "prefix": prefix or None, "region": st["region"],
                              "endpoint_url": st["endpoint_url"], "allow_http": st["allow_http"],
                              "force_path_style": st["force_path_style"]}
        if st["access_key_id"] and st["secret_access_key"]:
            kw |= {"access_key_id": st["access_key_id"], "secret_access_key": st["secret_access_key"],
                   "session_token": st["session_token"]}
        elif st["anonymous"]:
            kw["anonymous"] = True
        else:
            kw["from_env"] = True
        return icechunk.s3_storage(**kw)
    if kind == "gcs":
        return icechunk.gcs_storage(bucket=bucket, prefix=prefix or None,
                                    **({"from_env": True} if not opts else opts))
    account = opts.pop("account", None) or os.environ.get("AZURE_STORAGE_ACCOUNT_NAME")
    if not account:
        raise OutputError(f"{text}: Azure needs a storage account: set AZURE_STORAGE_ACCOUNT_NAME or "
                          "output.storage_options.account")
    return icechunk.azure_storage(account=account, container=bucket, prefix=prefix,
                                  **({"from_env": True} if not opts else opts))


def is_repo(location: str | Path, storage_options: dict[str, Any] | None = None) -> bool:
    """Tell whether ``location`` (a path or URL) holds an Icechunk repository."""
    text = str(location)
    m = _URL.match(text)
    if not m or m.group(1).lower() == "file":
        if not (local_folder(text) / "refs").is_dir():  # cheap: no engine call for a plain folder
            return False
    return bool(icechunk.Repository.exists(repo_storage(text, storage_options)))


def open_repo(location: str | Path, *, create: bool = False,
              storage_options: dict[str, Any] | None = None) -> icechunk.Repository:
    """Open the Icechunk repository at ``location`` (a store location, see :func:`store_location`).

    ``create=True`` creates it when missing (an empty repository with a ``main`` branch).

    Raises
    ------
    CorruptInput
        No repository there and ``create`` is False.
    """
    if is_object_url(location):  # a clear error before the engine's own, for a location that fails
        probe_location(str(location), storage_options, write=create)
    storage = repo_storage(location, storage_options)
    if is_repo(location, storage_options):
        return icechunk.Repository.open(storage)
    if not create:
        raise CorruptInput(f"{location} holds no agriland product store: pass the --out folder (or URL) "
                           "of an agriland run")
    return icechunk.Repository.create(storage)


def reader(out: str | Path, version: str | None = None,
           storage_options: dict[str, Any] | None = None) -> Any:
    """Return a read-only Zarr store of a run's products (Icechunk), at ``version`` or the latest.

    Parameters
    ----------
    out : str or Path
        The run's ``--out`` (folder or URL), or its store ``OUT/agriland.icechunk``.
    version : str, optional
        A snapshot id or a tag (``agriland inspect OUT --history`` lists them); the
        latest complete products by default (branch ``main``).

    Returns
    -------
    icechunk.IcechunkStore
        Opens with ``xarray.open_zarr(store, group=..., consolidated=False)``; it pickles,
        so Dask tasks can read from it.
    """
    repo = open_repo(store_location(out), storage_options=storage_options)
    if version is None:
        return repo.readonly_session(branch="main").store
    if version in repo.list_tags():
        return repo.readonly_session(tag=version).store
    try:
        return repo.readonly_session(snapshot_id=version).store
    except Exception:  # noqa: BLE001 - the engine's error does not name the run
        raise CorruptInput(f"{out} has no version '{version}': `agriland inspect {out} --history` lists "
                           "the versions (snapshot ids and tags)") from None


def history(out: str | Path, storage_options: dict[str, Any] | None = None, *,
            every_commit: bool = False) -> list[dict[str, Any]]:
    """List the versions of a run's products, newest first.

    A version is a snapshot readers could see: one where a product was completed or removed
    (the commits of a product's blocks in between are listed with ``every_commit=True``).

    Returns
    -------
    list of dict
        ``{"version": snapshot id, "time": ISO 8601 UTC, "message": str, "metadata": dict,
        "tags": [str]}`` for the commits of the branch ``main``.
    """
    repo = open_repo(store_location(out), storage_options=storage_options)
    tags: dict[str, list[str]] = {}
    for t in repo.list_tags():
        tags.setdefault(repo.lookup_tag(t), []).append(t)
    return [{"version": c.id, "time": c.written_at.isoformat(timespec="seconds"), "message": c.message,
             "metadata": dict(c.metadata), "tags": sorted(tags.get(c.id, []))}
            for c in repo.ancestry(branch="main")
            if every_commit or c.metadata.get("complete") or c.metadata.get("__root") or c.id in tags]
