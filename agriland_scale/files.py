"""Files that are not Zarr (JSON, CSV, PNG, HTML, GeoParquet, COG, models): never half-written.

On local disk each is built under a temporary name beside its destination (``NAME.tmp``,
which the run's file bookkeeping ignores) and renamed over it only when complete. On object
storage (``s3://``, ``gs://``, ``az://``) a file is built locally, then put as one object
(one PUT): a reader or a rerun sees the old file or the new one, never a part. Objects read
back (models, a run's files) are cached per machine (:func:`cache_dir`).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from agriland_scale.errors import OutputError

__all__ = [
    "OBJECT_SCHEMES",
    "TMP_SUFFIX",
    "atomic_path",
    "cache_dir",
    "delete_object",
    "delete_prefix",
    "download",
    "is_object_url",
    "check_object_url",
    "join_url",
    "short_error",
    "run_storage_options",
    "use_storage_options",
    "list_objects",
    "local_copy",
    "object_store",
    "object_version",
    "probe_location",
    "s3_settings",
    "upload_file",
    "write_json",
    "write_json_anyhow",
    "write_text",
]

TMP_SUFFIX = ".tmp"


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Give a temporary path beside ``path`` to write; rename it to ``path`` when the block ends.

    Parameters
    ----------
    path : str or Path
        The destination. Its folder is created if missing.

    Yields
    ------
    Path
        ``path`` with ``.tmp`` appended. On an exception it is removed and ``path`` is left
        as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + TMP_SUFFIX)
    try:
        yield tmp
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(text: str, path: str | Path) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(obj: Any, path: str | Path, *, indent: int | None = 1) -> None:
    """Write ``obj`` as JSON to ``path`` atomically; values JSON cannot hold are written as ``str``."""
    write_text(json.dumps(obj, indent=indent, default=str), path)


def write_json_anyhow(obj: Any, path: str | Path) -> bool:
    """Write ``obj`` to ``path`` atomically, or else in place; return whether it was written.

    For recording a failure when the folder itself is the problem (full, turned read-only):
    a rename beside the file may fail where rewriting the existing file still works (a folder
    made read-only by its permissions; a full disk, whose file's own blocks are freed first).
    Never raises.
    """
    try:
        write_json(obj, path)
        return True
    except OSError:
        pass
    # in place: compact (it must fit in the blocks the old record frees), and never left half
    # written: if the new record does not fit, the old one goes back
    try:
        old = Path(path).read_bytes()
    except OSError:
        return False
    new = json.dumps(obj, separators=(",", ":"), default=str).encode()
    for data, ok in ((new, True), (old, False)):
        try:
            with open(path, "r+b") as f:
                f.truncate(0)
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            return ok
        except OSError:
            continue
    return False


# --- object storage: one layer (obstore) for every file that is not Zarr ---------------------
# obstore drives the same Rust ``object_store`` crate as the Icechunk engine of the product
# store, so both read credentials from the same places (AWS_*, GOOGLE_*, AZURE_* variables),
# a file is one PUT (a reader sees the old object or the new one, never a part), and nothing
# needs an event loop of its own on a Dask worker.

_URL = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://(.*)")
OBJECT_SCHEMES = {"s3": "s3", "gs": "gcs", "gcs": "gcs", "az": "azure", "abfs": "azure", "abfss": "azure"}


def is_object_url(location: str | Path) -> bool:
    """Tell whether ``location`` is an object-storage URL (``s3://``, ``gs://``, ``az://``, ...)."""
    m = _URL.match(str(location))
    return m is not None and m.group(1).lower() in OBJECT_SCHEMES


def check_object_url(location: str) -> str:
    """Return the object-storage URL ``location``, refused if a segment of its key is ``.`` or ``..``.

    Object stores take such keys literally (``s3://b/../x`` is the key ``../x`` of bucket
    ``b``), while a reader of the same URL as a path resolves them somewhere else: a run
    would be written where nothing finds it, or over another prefix's objects.

    Raises
    ------
    OutputError
        ``location`` names no bucket, or has a ``.``/``..`` segment, an empty segment
        (``//``) or a control character.
    """
    text = str(location)
    m = _URL.match(text)
    if not m or m.group(1).lower() not in OBJECT_SCHEMES:
        return text
    bucket, _, key = m.group(2).partition("/")
    segments = key.rstrip("/").split("/") if key.rstrip("/") else []
    bad = [s for s in segments if s in (".", "..", "")]
    if not bucket or bucket in (".", "..") or bad or any(ord(c) < 32 or c == "\x7f" for c in text):
        why = (
            "names no bucket"
            if not bucket or bucket in (".", "..")
            else "has a control character"
            if not bad
            else f"has the key segment {bad[0]!r}"
            if bad[0]
            else "has an empty key segment ('//')"
        )
        raise OutputError(
            f"{text[:200]} is not a valid location: it {why}. Object stores take such keys "
            f"literally, so the run would not be where the URL seems to point; write it as "
            f"{m.group(1)}://BUCKET/PREFIX with plain names, e.g. {m.group(1)}://my-bucket/runs/virginia"
        )
    return text


# output.storage_options of the run this process (or worker) serves, by store kind ("s3",
# "gcs", "azure"): used wherever a URL of that kind is opened with no options of its own
_RUN_OPTIONS: dict[str, dict[str, Any]] = {}


def use_storage_options(location: str | Path, storage_options: dict[str, Any] | None) -> None:
    """Make ``storage_options`` this process's credentials for URLs of ``location``'s kind.

    A run on object storage calls it with its ``output.storage_options`` (and so do its
    workers, through :class:`~agriland_scale.pipeline.plugins.StorageOptions`): every part of
    the run that opens a URL of the same kind (``s3://``, ``gs://``, ``az://``) without options
    of its own, the publish stage, a model given as a URL, a worker's block writes, uses them,
    not the environment or the cloud metadata address. Empty options forget them.
    """
    m = _URL.match(str(location))
    kind = OBJECT_SCHEMES.get(m.group(1).lower()) if m else None
    if kind is None:
        return
    if storage_options:
        _RUN_OPTIONS[kind] = dict(storage_options)
    else:
        _RUN_OPTIONS.pop(kind, None)


def run_storage_options(
    location: str | Path, storage_options: dict[str, Any] | None = None
) -> dict[str, Any] | None:
    """Return ``storage_options`` if given, else the run's for ``location``'s kind (:func:`use_storage_options`)."""
    if storage_options:
        return storage_options
    m = _URL.match(str(location))
    kind = OBJECT_SCHEMES.get(m.group(1).lower()) if m else None
    return _RUN_OPTIONS.get(kind or "", storage_options)


def s3_settings(storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Return the S3 settings of a run: ``storage_options`` first, then the usual variables.

    Keys: ``endpoint_url`` (``AWS_ENDPOINT_URL_S3``/``AWS_ENDPOINT_URL``), ``region``
    (``AWS_REGION``/``AWS_DEFAULT_REGION``, else ``us-east-1``), ``access_key_id``,
    ``secret_access_key``, ``session_token`` (``AWS_*`` of the same names), ``allow_http``
    (true for an ``http://`` endpoint), ``force_path_style`` (true with an endpoint: S3-compatible
    servers), ``anonymous``.
    """
    o = dict(storage_options or {})
    env = os.environ
    endpoint = o.get("endpoint_url") or env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL")
    return {
        "endpoint_url": endpoint,
        "region": o.get("region") or env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or "us-east-1",
        "access_key_id": o.get("access_key_id") or o.get("key") or env.get("AWS_ACCESS_KEY_ID"),
        "secret_access_key": o.get("secret_access_key")
        or o.get("secret")
        or env.get("AWS_SECRET_ACCESS_KEY"),
        "session_token": o.get("session_token") or env.get("AWS_SESSION_TOKEN"),
        "allow_http": bool(o.get("allow_http", bool(endpoint and str(endpoint).startswith("http://")))),
        "force_path_style": bool(o.get("force_path_style", bool(endpoint))),
        "anonymous": bool(o.get("anonymous", False)),
    }


def object_store(location: str | Path, storage_options: dict[str, Any] | None = None) -> Any:
    """Return an obstore store rooted at ``location`` (an object-storage URL or a folder).

    Raises
    ------
    OutputError
        An unsupported URL scheme.
    """
    import obstore.store

    obs: Any = obstore.store  # from_url's typed overloads cannot follow a config built at run time
    text = str(location)
    m = _URL.match(text)
    if not m or m.group(1).lower() == "file":
        folder = Path(m.group(2) if m else text).expanduser().resolve()
        folder.mkdir(parents=True, exist_ok=True)
        return obs.LocalStore(str(folder))
    kind = OBJECT_SCHEMES.get(m.group(1).lower())
    if kind is None:
        raise OutputError(
            f"{text}: '{m.group(1)}://' is not a supported location; use a local folder, "
            "s3://BUCKET/PREFIX, gs://BUCKET/PREFIX or az://CONTAINER/PREFIX"
        )
    check_object_url(text)
    storage_options = run_storage_options(text, storage_options)
    client = {"timeout": "60s", "connect_timeout": "5s"}
    if kind == "s3":
        s = s3_settings(storage_options)
        config: dict[str, Any] = {
            "region": s["region"],
            "virtual_hosted_style_request": not s["force_path_style"],
        }
        if s["endpoint_url"]:
            config["endpoint"] = s["endpoint_url"]
        if s["access_key_id"] and s["secret_access_key"]:
            config |= {"access_key_id": s["access_key_id"], "secret_access_key": s["secret_access_key"]}
            if s["session_token"]:
                config["session_token"] = s["session_token"]
        if s["anonymous"]:
            config["skip_signature"] = True
        return obs.from_url(text, config=config, client_options=client | {"allow_http": s["allow_http"]})
    return obs.from_url(text, config=dict(storage_options or {}), client_options=client)


def short_error(err: BaseException) -> str:
    """Return the part of an object store's error that says what went wrong (one line).

    The Rust engines' errors (obstore, Icechunk) run to a hundred lines of debug output.
    """
    text = str(err)
    if "error sending request" in text:
        return "the connection failed"
    code = re.search(r"<Code>([^<]+)</Code>", text)
    status = re.search(r"status code: (\d{3}[^:<]*)", text)
    if code or status:
        return " ".join(
            x for x in ((status.group(1).strip() if status else ""), (code.group(1) if code else "")) if x
        )
    return text.splitlines()[0][:200]


def probe_location(
    location: str, storage_options: dict[str, Any] | None = None, *, write: bool = True
) -> None:
    """Check that an object-storage location answers, and takes writes, before any compute.

    Lists the prefix, then (``write=True``) puts a small object and deletes it.

    Raises
    ------
    OutputError
        Naming ``location`` and what to do: the endpoint cannot be reached, the bucket does
        not exist, the credentials are refused, or they may read but not write.
    """
    storage_options = run_storage_options(location, storage_options)
    import uuid

    import obstore

    store = object_store(location, storage_options)
    endpoint = s3_settings(storage_options)["endpoint_url"] if str(location).startswith("s3://") else None
    where = f"{location}" + (f" (endpoint {endpoint})" if endpoint else "")
    bucket = urlparse(str(location)).netloc

    def fail(err: Exception, doing: str) -> OutputError:
        why = short_error(err)
        text = str(err)
        if (
            "error sending request" in text
            or "Connection refused" in text
            or "dns error" in text
            or "timed out" in text.lower()
        ):
            fix = (
                "the endpoint cannot be reached: check that the server runs and that AWS_ENDPOINT_URL "
                "(or output.storage_options.endpoint_url) names it"
            )
        elif "NoSuchBucket" in text or ("500" in why and "PUT" in text) or "404" in why:
            fix = (
                f"does the bucket '{bucket}' exist? Create it first (e.g. `aws s3 mb s3://{bucket}`) or "
                "correct the URL"
            )
        elif (
            "InvalidAccessKeyId" in text
            or "SignatureDoesNotMatch" in text
            or "InvalidToken" in text
            or "ExpiredToken" in text
        ):
            fix = (
                "the credentials were refused: check AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY (or "
                "output.storage_options)"
            )
        elif "AccessDenied" in text or "403" in why:
            fix = (
                f"these credentials may not {doing} there: use credentials with write permission on "
                "the bucket, or another --out"
                if doing == "write"
                else "these credentials may not list the bucket: use credentials with read permission"
            )
        else:
            fix = "check the URL, the endpoint and the credentials"
        return OutputError(f"cannot {doing} {where}: {why}; {fix}")

    try:
        obstore.list(store, prefix=None, chunk_size=1).collect()
    except Exception as e:  # noqa: BLE001 - every store error becomes one actionable message
        raise fail(e, "list") from None
    if write:
        name = f".agriland-probe-{uuid.uuid4().hex}"
        try:
            obstore.put(store, name, b"agriland write probe")
            obstore.delete(store, name)
        except Exception as e:  # noqa: BLE001
            raise fail(e, "write") from None


def _not_found() -> tuple[type[BaseException], ...]:
    """Return the exceptions meaning "no such object" (the object store's and Python's)."""
    from obstore.exceptions import NotFoundError

    return (FileNotFoundError, NotFoundError)


def join_url(base: str, rel: str) -> str:
    """Join ``base`` (an object URL or a folder) and the relative path ``rel`` (``/``-separated)."""
    return f"{str(base).rstrip('/')}/{rel.lstrip('/')}"


def cache_dir() -> Path:
    """Return this machine's cache folder for agriland (``$AGRILAND_CACHE``, else ``~/.cache/agriland``).

    What lies there can always be fetched again: copies of models and of runs' files on object
    storage. Deleting it loses nothing.
    """
    root = os.environ.get("AGRILAND_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "agriland"
    )
    return Path(root)


def _split(url: str) -> tuple[str, str]:
    """``s3://b/p/name`` -> (``s3://b/p``, ``name``)."""
    parent, _, name = str(url).rstrip("/").rpartition("/")
    return parent, name


def upload_file(local: str | Path, url: str, storage_options: dict[str, Any] | None = None) -> None:
    """Put the local file ``local`` at ``url`` as one object (one PUT: never visible half-written)."""
    import obstore

    parent, name = _split(url)
    obstore.put(object_store(parent, storage_options), name, Path(local))


def delete_object(url: str, storage_options: dict[str, Any] | None = None) -> None:
    """Delete the object at ``url`` (missing is fine)."""
    import obstore

    parent, name = _split(url)
    try:
        obstore.delete(object_store(parent, storage_options), name)
    except _not_found():
        pass


def delete_prefix(url: str, storage_options: dict[str, Any] | None = None) -> int:
    """Delete every object under the prefix ``url``; returns how many."""
    import obstore

    store = object_store(url, storage_options)
    paths = [str(m["path"]) for batch in obstore.list(store) for m in batch]
    for i in range(0, len(paths), 1000):
        obstore.delete(store, paths[i : i + 1000])
    return len(paths)


def list_objects(url: str, storage_options: dict[str, Any] | None = None) -> dict[str, int]:
    """Return ``{path relative to url: size in bytes}`` of every object under the prefix ``url``."""
    import obstore

    found: dict[str, int] = {}
    for batch in obstore.list(object_store(url, storage_options)):
        for meta in batch:
            found[str(meta["path"])] = int(meta["size"])
    return found


def download(url: str, local: str | Path, storage_options: dict[str, Any] | None = None) -> Path:
    """Copy the object at ``url`` to the local file ``local`` (atomically); returns ``local``.

    Raises
    ------
    FileNotFoundError
        No object at ``url``.
    """
    import obstore

    parent, name = _split(url)
    try:
        data = obstore.get(object_store(parent, storage_options), name).bytes()
    except _not_found():
        raise FileNotFoundError(f"no object at {url}") from None
    with atomic_path(local) as tmp:
        tmp.write_bytes(bytes(data))
    return Path(local)


def object_version(url: str, storage_options: dict[str, Any] | None = None) -> str | None:
    """Return an object's version tag (its e-tag, or size and time), or None when it does not exist."""
    import obstore

    parent, name = _split(url)
    try:
        meta = obstore.head(object_store(parent, storage_options), name)
    except _not_found():
        return None
    return str(meta.get("e_tag") or f"{meta['size']}-{meta['last_modified']}")


def local_copy(
    location: str | Path, storage_options: dict[str, Any] | None = None, *, with_sidecar: bool = False
) -> Path:
    """Return a local path for ``location``: itself for a path, a cached copy for an object URL.

    An object is downloaded once per machine and version (:func:`cache_dir`/``objects``);
    ``with_sidecar`` also fetches ``LOCATION.json`` (a model's metadata) when it exists.

    Raises
    ------
    FileNotFoundError
        No object at ``location``.
    """
    import hashlib

    text = str(location)
    if not is_object_url(text):
        m = _URL.match(text)
        return Path(m.group(2) if m and m.group(1).lower() == "file" else text)
    version = object_version(text, storage_options)
    if version is None:
        raise FileNotFoundError(f"no object at {text}")
    key = hashlib.sha256(f"{text}\n{version}".encode()).hexdigest()[:24]
    local = cache_dir() / "objects" / key / _split(text)[1]
    if not local.is_file():
        download(text, local, storage_options)
    if with_sidecar:
        side = Path(str(local) + ".json")
        if not side.is_file():
            try:
                download(text + ".json", side, storage_options)
            except FileNotFoundError:
                pass
    return local
