"""The run's product store as a repository: where it is, how to open it, its versions.

A run's products are one Icechunk repository (transactional Zarr v3): ``OUT/agriland.icechunk``
on local disk, or a prefix of a bucket (``s3://``, ``gs://``, ``az://``). The branch ``main``
holds only complete products; every change to it is a commit (a version), so a reader opens a
consistent snapshot and earlier versions stay readable (:func:`history`, :func:`reader`).
:mod:`agriland_scale.store` reads groups from it; :mod:`agriland_scale.store.resume`
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
from agriland_scale.files import (
    OBJECT_SCHEMES,
    check_object_url,
    is_object_url,
    probe_location,
    run_storage_options,
    s3_settings,
)
from agriland_scale.layout import RECORD, STORE, local_folder

__all__ = [
    "ICECHUNK_MEDIA_TYPE",
    "check_store",
    "history",
    "is_repo",
    "main_version",
    "open_repo",
    "reader",
    "repo_storage",
    "store_location",
]

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
    text = str(location)
    opts = dict(run_storage_options(text, storage_options) or {})
    m = _URL.match(text)
    if not m or m.group(1).lower() == "file":
        return icechunk.local_filesystem_storage(str(local_folder(text)))
    scheme = m.group(1).lower()
    kind = OBJECT_SCHEMES.get(scheme)
    parsed = urlparse(text)
    bucket, prefix = parsed.netloc, parsed.path.strip("/")
    if kind is None:
        raise OutputError(
            f"{text}: '{scheme}://' is not a supported location; use a local folder, "
            "s3://BUCKET/PREFIX, gs://BUCKET/PREFIX or az://CONTAINER/PREFIX"
        )
    if not bucket:
        raise OutputError(f"{text}: the URL names no bucket; write it as {scheme}://BUCKET/PREFIX")
    check_object_url(text)
    if kind == "s3":
        st = s3_settings(opts)
        kw: dict[str, Any] = {
            "bucket": bucket,
            "prefix": prefix or None,
            "region": st["region"],
            "endpoint_url": st["endpoint_url"],
            "allow_http": st["allow_http"],
            "force_path_style": st["force_path_style"],
        }
        if st["access_key_id"] and st["secret_access_key"]:
            kw |= {
                "access_key_id": st["access_key_id"],
                "secret_access_key": st["secret_access_key"],
                "session_token": st["session_token"],
            }
        elif st["anonymous"]:
            kw["anonymous"] = True
        else:
            kw["from_env"] = True
        return icechunk.s3_storage(**kw)
    if kind == "gcs":
        return icechunk.gcs_storage(
            bucket=bucket, prefix=prefix or None, **({"from_env": True} if not opts else opts)
        )
    account = opts.pop("account", None) or os.environ.get("AZURE_STORAGE_ACCOUNT_NAME")
    if not account:
        raise OutputError(
            f"{text}: Azure needs a storage account: set AZURE_STORAGE_ACCOUNT_NAME or "
            "output.storage_options.account"
        )
    return icechunk.azure_storage(
        account=account, container=bucket, prefix=prefix, **({"from_env": True} if not opts else opts)
    )


def _cause(err: BaseException) -> str:
    """Say the engine's error in one line: what failed and its innermost cause."""
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    if not lines:
        return type(err).__name__
    head = lines[0].removeprefix("x ").strip()
    causes = [ln.lstrip("|`").removeprefix("->").strip() for ln in lines if ln.lstrip("|`").startswith("->")]
    inner = causes[-1] if causes else ""
    return head if not inner or head.endswith(inner) else f"{head}: {inner}"


def _run_of(location: str) -> str:
    """Return the run (``--out``) whose store is ``location``."""
    text = str(location).rstrip("/")
    return text[: -len(STORE) - 1] if text.endswith("/" + STORE) else text


def _versions_left(
    location: str,
    storage_options: dict[str, Any] | None,
    repo: icechunk.Repository | None,
    *,
    most: int = 3,
    tries: int = 100,
) -> list[tuple[str, str]]:
    """Versions of a damaged store that still read, newest first: ``[(snapshot id, description)]``.

    With ``repo`` (the engine opens the store, but a snapshot does not read): the newest
    complete or tagged snapshots (never the commit of some blocks of an unfinished product),
    each read by the engine (of the ``tries`` newest). Without it (``main``'s ref
    does not read, so the engine opens nothing): the tagged snapshots (a finished run's
    products) whose objects are there.
    """
    import obstore

    from agriland_scale.files import object_store

    try:
        store = object_store(location, storage_options)
        written = {
            str(m["path"]).rpartition("/")[2]: m["last_modified"]
            for batch in obstore.list(store, prefix="snapshots")
            for m in batch
        }
        tags: dict[str, list[str]] = {}
        for batch in obstore.list(store, prefix="refs"):  # a prefix of whole path segments
            for m in batch:
                path = str(m["path"])
                if not (path.startswith("refs/tag.") and path.endswith("/ref.json")):
                    continue  # a branch, or a deleted tag's marker
                try:
                    sid = json.loads(bytes(obstore.get(store, path).bytes()))["snapshot"]
                except (ValueError, KeyError, TypeError, OSError):
                    continue  # a damaged ref too
                tags.setdefault(str(sid), []).append(path.split("/")[1].removeprefix("tag."))
    except Exception:  # noqa: BLE001 - the list is advice: without it, the error still names the damage
        return []
    newest = sorted(written, key=lambda sid: written[sid].timestamp(), reverse=True)
    if repo is None:
        return [(sid, "tag " + ", ".join(sorted(tags[sid]))) for sid in newest if sid in tags][:most]
    left: list[tuple[str, str]] = []
    for sid in newest[:tries]:
        try:
            info = repo.lookup_snapshot(sid)
        except Exception:  # noqa: BLE001 - damaged or unreadable too: not a version to go back to
            continue
        if not (sid in tags or info.metadata.get("complete") or info.metadata.get("__root")):
            continue  # the commit of some blocks: never a version readers saw
        what = f"{info.written_at.strftime('%Y-%m-%dT%H:%M:%SZ')}, '{info.message}'"
        left.append((sid, what + (f", tag {', '.join(sorted(tags[sid]))}" if sid in tags else "")))
        if len(left) == most:
            break
    return left


def _damaged(
    location: str,
    problem: str,
    storage_options: dict[str, Any] | None = None,
    repo: icechunk.Repository | None = None,
) -> CorruptInput:
    """Return the error naming a damaged store: what cannot be read, what opens, how to recover."""
    run = _run_of(location)
    left = _versions_left(location, storage_options, repo)
    when = "" if repo is not None else " once 'main' names one of them"
    listed = "; ".join(f"{sid} ({what})" for sid, what in left) if left else "none found"
    text = f"the product store {location} is damaged ({problem}); versions that still open{when}: {listed}; "
    if left:
        ref = f"{location}/refs/branch.main/ref.json"
        body = '{"snapshot":"%s"}' % left[0][0]
        how = (
            f"mkdir -p {location}/refs/branch.main && printf '{body}' > {ref}"
            if not is_object_url(location)
            else f"put an object {ref} holding {body}"
        )
        text += (
            f"to recover: point its branch 'main' at one of them ({how}), then `agriland inspect {run} "
            f"--history` lists what that version holds, and rerunning the same command continues from it, "
            f"redoing the products it lacks; or run into a new --out. Until then every rerun into {run} "
            "fails the same way"
        )
    else:
        text += (
            f"no intact ref names a version to go back to: run into a new --out (every rerun into {run} "
            "fails the same way)"
        )
    return CorruptInput(text)


def main_version(
    repo: icechunk.Repository, location: str | Path, storage_options: dict[str, Any] | None = None
) -> str:
    """Return the snapshot id of ``main``'s tip, having checked that it reads.

    The engine opens a session without reading its snapshot; this reads it, so that a
    damaged store fails here, named, not in the middle of whatever reads it next.

    Raises
    ------
    CorruptInput
        ``main``'s ref or its snapshot cannot be read: the message names the store, the
        versions that still open and how to recover.
    """
    try:
        tip = repo.lookup_branch("main")
    except icechunk.IcechunkError as e:
        raise _damaged(
            str(location), f"its branch 'main' ref cannot be read: {_cause(e)}", storage_options
        ) from None
    try:
        repo.lookup_snapshot(tip)
    except icechunk.IcechunkError as e:
        raise _damaged(
            str(location),
            f"its branch 'main' names version {tip}, which cannot be read: {_cause(e)}",
            storage_options,
            repo,
        ) from None
    return str(tip)


def _engine_error(location: str, err: BaseException, storage_options: dict[str, Any] | None) -> CorruptInput:
    """Translate the engine's failure to open the store at ``location``."""
    if "ref json" in str(err):  # a ref that does not parse: the store is damaged, not out of reach
        return _damaged(location, f"its branch 'main' ref cannot be read: {_cause(err)}", storage_options)
    return CorruptInput(
        f"the product store {location} cannot be opened: {_cause(err)}; check that it is "
        "there and readable (and, on object storage, the credentials and the endpoint)"
    )


def is_repo(location: str | Path, storage_options: dict[str, Any] | None = None) -> bool:
    """Tell whether ``location`` (a path or URL) holds an Icechunk repository.

    Raises
    ------
    CorruptInput
        There is one but the engine cannot open it (its branch ``main``'s ref is damaged or
        missing, or the storage does not answer).
    """
    text = str(location)
    m = _URL.match(text)
    if not m or m.group(1).lower() == "file":
        folder = local_folder(text)
        if not (folder / "refs").is_dir() and not (folder / "snapshots").is_dir():  # cheap: no engine call
            return False
    try:
        found = bool(icechunk.Repository.exists(repo_storage(text, storage_options)))
    except icechunk.IcechunkError as e:
        raise _engine_error(text, e, storage_options) from None
    if not found and _has_snapshots(text, storage_options):  # versions, but no branch 'main' naming one
        raise _damaged(text, "its branch 'main' ref is missing", storage_options)
    return found


def check_store(out: str | Path, storage_options: dict[str, Any] | None = None) -> None:
    """Check that a run's product store, where there is one, opens at ``main``'s tip.

    Raises
    ------
    CorruptInput
        The store is damaged (see :func:`main_version`) or cannot be opened.
    """
    loc = store_location(out)
    if is_repo(loc, storage_options):
        main_version(open_repo(loc, storage_options=storage_options), loc, storage_options)


def open_repo(
    location: str | Path, *, create: bool = False, storage_options: dict[str, Any] | None = None
) -> icechunk.Repository:
    """Open the Icechunk repository at ``location`` (a store location, see :func:`store_location`).

    ``create=True`` creates it when missing (an empty repository with a ``main`` branch).

    Raises
    ------
    CorruptInput
        No repository there and ``create`` is False; or one the engine cannot open (its
        branch ``main``'s ref is damaged: never replaced by a new one).
    """
    if is_object_url(location):  # a clear error before the engine's own, for a location that fails
        probe_location(str(location), storage_options, write=create)
    storage = repo_storage(location, storage_options)
    if is_repo(location, storage_options):
        try:
            return icechunk.Repository.open(storage)
        except icechunk.IcechunkError as e:
            raise _engine_error(str(location), e, storage_options) from None
    if not create:
        raise CorruptInput(
            f"{location} holds no agriland product store: pass the --out folder (or URL) of an agriland run"
        )
    return icechunk.Repository.create(storage)


def _has_snapshots(location: str, storage_options: dict[str, Any] | None) -> bool:
    """Tell whether ``location`` holds snapshots of a repository (what is left when its refs are lost)."""
    if not is_object_url(location):
        folder = local_folder(location) / "snapshots"
        return folder.is_dir() and any(folder.iterdir())
    import obstore

    from agriland_scale.files import object_store

    try:
        return any(
            len(batch)
            for batch in obstore.list(
                object_store(location, storage_options), prefix="snapshots", chunk_size=1
            )
        )
    except Exception:  # noqa: BLE001 - out of reach: the engine's own error follows
        return False


def reader(out: str | Path, version: str | None = None, storage_options: dict[str, Any] | None = None) -> Any:
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
    loc = store_location(out)
    repo = open_repo(loc, storage_options=storage_options)
    if version is None:
        main_version(repo, loc, storage_options)  # a damaged store fails here, named
        return repo.readonly_session(branch="main").store
    try:
        if version in repo.list_tags():
            sid = repo.lookup_tag(version)
            store = repo.readonly_session(tag=version).store
        else:
            sid = version
            store = repo.readonly_session(snapshot_id=version).store
    except Exception:  # noqa: BLE001 - the engine's error does not name the run
        raise CorruptInput(
            f"{out} has no version '{version}': `agriland inspect {out} --history` lists "
            "the versions (snapshot ids and tags)"
        ) from None
    try:
        repo.lookup_snapshot(sid)
    except icechunk.IcechunkError as e:
        raise _damaged(
            loc, f"its version '{version}' ({sid}) cannot be read: {_cause(e)}", storage_options, repo
        ) from None
    return store


def history(
    out: str | Path, storage_options: dict[str, Any] | None = None, *, every_commit: bool = False
) -> list[dict[str, Any]]:
    """List the versions of a run's products, newest first.

    A version is a snapshot readers could see: one where a product was completed or removed
    (the commits of a product's blocks in between are listed with ``every_commit=True``).

    Returns
    -------
    list of dict
        ``{"version": snapshot id, "time": ISO 8601 UTC, "message": str, "metadata": dict,
        "tags": [str]}`` for the commits of the branch ``main``.

    Raises
    ------
    CorruptInput
        The store is damaged: a version of ``main`` cannot be read (the message names the
        versions that still open and how to recover).
    """
    loc = store_location(out)
    repo = open_repo(loc, storage_options=storage_options)
    tip = main_version(repo, loc, storage_options)
    tags: dict[str, list[str]] = {}
    for t in repo.list_tags():
        tags.setdefault(repo.lookup_tag(t), []).append(t)
    commits = []
    try:
        for c in repo.ancestry(snapshot_id=tip):
            commits.append(c)
    except icechunk.IcechunkError as e:  # an older version is damaged
        last = commits[-1].parent_id if commits else tip
        raise _damaged(
            loc, f"version {last} of its branch 'main' cannot be read: {_cause(e)}", storage_options, repo
        ) from None
    return [
        {
            "version": c.id,
            "time": c.written_at.isoformat(timespec="seconds"),
            "message": c.message,
            "metadata": dict(c.metadata),
            "tags": sorted(tags.get(c.id, [])),
        }
        for c in commits
        if every_commit or c.metadata.get("complete") or c.metadata.get("__root") or c.id in tags
    ]
