"""Files that are not Zarr (JSON, CSV, PNG, HTML, GeoParquet, COG): never half-written.

Each is built under a temporary name beside its destination (``NAME.tmp``, which the run's
file bookkeeping ignores) and renamed over it only when complete, so a reader or a rerun
sees the old file or the new one, never a part.
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

__all__ = ["OBJECT_SCHEMES", "TMP_SUFFIX", "atomic_path", "is_object_url", "object_store", "probe_location",
           "s3_settings", "write_json", "write_text"]

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
        "secret_access_key": o.get("secret_access_key") or o.get("secret") or env.get("AWS_SECRET_ACCESS_KEY"),
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
        raise OutputError(f"{text}: '{m.group(1)}://' is not a supported location; use a local folder, "
                          "s3://BUCKET/PREFIX, gs://BUCKET/PREFIX or az://CONTAINER/PREFIX")
    client = {"timeout": "60s", "connect_timeout": "5s"}
    if kind == "s3":
        s = s3_settings(storage_options)
        config: dict[str, Any] = {"region": s["region"],
                                  "virtual_hosted_style_request": not s["force_path_style"]}
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


def _why(err: Exception) -> str:
    """Return the part of an object store's error that says what went wrong (one line)."""
    text = str(err)
    if "error sending request" in text:
        return "the connection failed"
    code = re.search(r"<Code>([^<]+)</Code>", text)
    status = re.search(r"status code: (\d{3}[^:<]*)", text)
    if code or status:
        return " ".join(x for x in ((status.group(1).strip() if status else ""), (code.group(1) if code else "")) if x)
    return text.splitlines()[0][:200]


def probe_location(location: str, storage_options: dict[str, Any] | None = None, *, write: bool = True) -> None:
    """Check that an object-storage location answers, and takes writes, before any compute.

    Lists the prefix, then (``write=True``) puts a small object and deletes it.

    Raises
    ------
    OutputError
        Naming ``location`` and what to do: the endpoint cannot be reached, the bucket does
        not exist, the credentials are refused, or they may read but not write.
    """
    import uuid

    import obstore

    store = object_store(location, storage_options)
    endpoint = s3_settings(storage_options)["endpoint_url"] if str(location).startswith("s3://") else None
    where = f"{location}" + (f" (endpoint {endpoint})" if endpoint else "")
    bucket = urlparse(str(location)).netloc

    def fail(err: Exception, doing: str) -> OutputError:
        why = _why(err)
        text = str(err)
        if "error sending request" in text or "Connection refused" in text or "dns error" in text \
                or "timed out" in text.lower():
            fix = ("the endpoint cannot be reached: check that the server runs and that AWS_ENDPOINT_URL "
                   "(or output.storage_options.endpoint_url) names it")
        elif "NoSuchBucket" in text or ("500" in why and "PUT" in text) or "404" in why:
            fix = (f"does the bucket '{bucket}' exist? Create it first (e.g. `aws s3 mb s3://{bucket}`) or "
                   "correct the URL")
        elif "InvalidAccessKeyId" in text or "SignatureDoesNotMatch" in text or "InvalidToken" in text \
                or "ExpiredToken" in text:
            fix = ("the credentials were refused: check AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY (or "
                   "output.storage_options)")
        elif "AccessDenied" in text or "403" in why:
            fix = (f"these credentials may not {doing} there: use credentials with write permission on "
                   "the bucket, or another --out" if doing == "write" else
                   "these credentials may not list the bucket: use credentials with read permission")
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
