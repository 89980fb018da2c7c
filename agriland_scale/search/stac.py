"""Search: find Sentinel-2 items on a STAC API with pystac-client.

A ``local`` API is a real STAC API server (``rustac serve``, from PyPI) started on a free
port of 127.0.0.1 over a folder holding ``collection.json`` and item JSON files; it is
stopped when the ``with`` block ends, also on error.

Requests to a STAC API are retried with exponential backoff on connection errors and on
HTTP 429 / 5xx answers (:data:`RETRY_STATUS`, honouring ``Retry-After``), as real APIs
throttle; with ``search.sign: planetary-computer`` the client signs asset hrefs as it reads
each page (pystac-client's ``modifier``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pystac
import requests
from pystac_client import Client
from pystac_client.exceptions import APIError
from pystac_client.stac_api_io import StacApiIO
from urllib3.util.retry import Retry

from agriland_scale.config.files import resolve_path
from agriland_scale.config.region import Region, read_region_file
from agriland_scale.config.schema import SearchConfig
from agriland_scale.errors import (
    CorruptInput,
    MissingDependency,
    NoItemsFound,
    STACServerError,
    UnknownCollection,
)
from agriland_scale.search.items import acquired, item_epsg

__all__ = [
    "RETRY_STATUS",
    "api_url",
    "item_epsg",
    "local_stac_api",
    "open_api",
    "region_of",
    "retry_policy",
    "search_items",
    "sign_planetary_computer",
]

log = logging.getLogger(__name__)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _rustac_executable() -> str:
    exe = Path(sys.executable).with_name("rustac")
    found = str(exe) if exe.exists() else shutil.which("rustac")
    if not found:
        raise STACServerError(
            "the 'rustac' command is not installed: pip install rustac (it serves the local STAC API)"
        )
    return found


def _absolute_items(catalog: Path, workdir: Path) -> tuple[Path, Path]:
    """Write the collection and an items FeatureCollection with absolute ``file://`` hrefs.

    A server resolves relative hrefs against its own URL, so local assets need absolute
    URIs with a scheme.
    """
    coll_path = catalog / "collection.json"
    if not coll_path.exists():
        raise STACServerError(
            f"local catalog {catalog} has no collection.json: put the STAC "
            "Collection and its item JSON files in that folder"
        )
    items = []
    for p in sorted(catalog.glob("item*.json")):
        item = json.loads(p.read_text())
        for asset in item.get("assets", {}).values():
            href = asset["href"]
            if "://" not in href:
                asset["href"] = (p.parent / href).resolve().as_uri()
        items.append(item)
    if not items:
        raise NoItemsFound(f"local catalog {catalog} holds no item*.json files")
    items_path = workdir / "items.json"
    items_path.write_text(json.dumps({"type": "FeatureCollection", "features": items}))
    out_coll = workdir / "collection.json"
    shutil.copy(coll_path, out_coll)
    return out_coll, items_path


@contextlib.contextmanager
def local_stac_api(catalog: str | Path, *, timeout: float = 20.0) -> Iterator[str]:
    """Serve ``catalog`` (folder with collection.json + item*.json) as a STAC API.

    Yields the API root URL (``http://127.0.0.1:PORT``). The server process is terminated
    when the block exits, whatever happens inside it.
    """
    catalog = resolve_path(str(catalog), Path.cwd())
    with tempfile.TemporaryDirectory(prefix="agriland-stac-") as tmp:
        coll, items = _absolute_items(catalog, Path(tmp))
        port = _free_port()
        url = f"http://127.0.0.1:{port}"
        cmd = [_rustac_executable(), "serve", "--addr", f"127.0.0.1:{port}", str(coll), str(items)]
        proc = subprocess.Popen(
            cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=os.environ | {"RUST_LOG": "warn"}
        )
        try:
            deadline = time.monotonic() + timeout
            while True:
                if proc.poll() is not None:
                    err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
                    raise STACServerError(f"local STAC server exited with code {proc.returncode}: {err}")
                try:
                    if requests.get(url + "/", timeout=1).ok:
                        break
                except requests.ConnectionError:
                    pass
                if time.monotonic() > deadline:
                    raise STACServerError(f"local STAC server on {url} did not answer in {timeout} s")
                time.sleep(0.05)
            log.info("local STAC API serving %s on %s", catalog, url)
            yield url
        finally:
            proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@contextlib.contextmanager
def api_url(cfg: SearchConfig) -> Iterator[str]:
    """Yield the STAC API URL of a search: a local server for ``api: local`` (stopped on exit).

    Parameters
    ----------
    cfg : SearchConfig
        The search settings (``api``, ``catalog``).

    Yields
    ------
    str
        The API's URL.
    """
    if cfg.api == "local":
        with local_stac_api(cfg.catalog or "") as url:
            yield url
    else:
        yield cfg.api


# HTTP answers a STAC API request is retried on: throttled (429) and the server's errors (5xx)
RETRY_STATUS = (429, 500, 502, 503, 504)


def retry_policy(retries: int = 5, backoff_s: float = 0.5) -> Retry:
    """Return the retries of STAC API requests: :data:`RETRY_STATUS` answers, and connection errors (twice).

    Parameters
    ----------
    retries : int
        Retries of one request at most, after its first try.
    backoff_s : float
        urllib3's backoff factor, s: a retry after the first waits ``backoff_s * 2 ** (n - 1)``
        (0.5, 1, 2, 4... s), or what the answer's ``Retry-After`` asks.

    Returns
    -------
    urllib3.util.retry.Retry
        For ``StacApiIO(max_retries=...)``; GET and POST (item search) alike. After the last
        retry the last answer is returned, so that the error names its status.
    """
    return Retry(
        total=retries,
        # a refused or unreachable address is most often a wrong URL: two retries (1.5 s), not
        # the 15 s of backoff that busy servers' 429/5xx answers get
        connect=min(retries, 2),
        backoff_factor=backoff_s,
        status_forcelist=RETRY_STATUS,
        allowed_methods=None,
        respect_retry_after_header=True,
        raise_on_status=False,
    )


def _pc_signer() -> Callable[[Any], None]:
    try:
        import planetary_computer
    except ImportError:
        raise MissingDependency(
            "search.sign is 'planetary-computer' but the package is not "
            "installed: pip install 'agriland-scale[pc]'"
        ) from None
    return planetary_computer.sign_inplace  # type: ignore[no-any-return]


def open_api(
    url: str, *, sign: str = "none", retries: int = 5, backoff_s: float = 0.5, timeout: float = 30
) -> Client:
    """Open a STAC API, turning connection failures into an actionable error.

    Parameters
    ----------
    url : str
        The API's root URL.
    sign : {"none", "planetary-computer"}
        ``planetary-computer``: sign asset hrefs as results arrive (the ``planetary-computer``
        package's ``sign_inplace`` as the client's modifier).
    retries, backoff_s : int, float
        See :func:`retry_policy`.
    timeout : float
        Seconds to wait for a connection or an answer, per try.

    Returns
    -------
    pystac_client.Client
        The client.

    Raises
    ------
    STACServerError
        The API does not answer, or not with a STAC catalogue, after the retries.
    MissingDependency
        ``sign`` needs a package that is not installed.
    """
    modifier = _pc_signer() if sign == "planetary-computer" else None
    stac_io = StacApiIO(max_retries=retry_policy(retries, backoff_s), timeout=timeout)
    try:
        return Client.open(url, stac_io=stac_io, modifier=modifier)
    except (requests.RequestException, APIError, pystac.STACError, OSError) as e:
        raise STACServerError(
            f"the STAC API at {url} does not answer ({e}); check search.api and your network"
        ) from None


def _conforms(client: Client, what: str) -> bool:
    classes = client.to_dict().get("conformsTo", [])
    return any(what in c for c in classes)


def region_of(cfg: SearchConfig) -> Region:
    """Return the run's region: ``search.bbox`` or the polygons of ``search.region`` (EPSG:4326).

    Parameters
    ----------
    cfg : SearchConfig
        The search settings; a relative ``region`` path is resolved from the working folder.

    Returns
    -------
    Region
        The region in EPSG:4326.
    """
    if cfg.region:
        return read_region_file(resolve_path(cfg.region, Path.cwd()))
    return Region.from_bbox(cfg.bbox)


def search_items(cfg: SearchConfig, api_url: str) -> list[pystac.Item]:
    """Search ``api_url`` for items of ``cfg.collections`` over the region and ``cfg.datetime``.

    A bbox region is searched with ``bbox``, a polygon region with ``intersects``. The
    cloud-cover limit is sent to the server when it supports the Query extension and is
    applied on the client otherwise (a server that ignores an unsupported filter can answer
    with zero items and HTTP 200). With ``sign: planetary-computer`` asset hrefs are signed.
    Items are sorted by datetime and id. An item the server returns without any datetime
    (no ``datetime``, no ``start_datetime``) or that pystac cannot parse raises
    :class:`CorruptInput` naming it. Requests are retried as :func:`open_api` says.
    """
    region = region_of(cfg)
    client = open_api(api_url, sign=cfg.sign)
    offered = {c.id for c in client.get_collections()}
    unknown = [c for c in cfg.collections if c not in offered]
    if unknown:
        raise UnknownCollection(
            f"collection(s) {unknown} not offered by {api_url}; it offers "
            f"{sorted(offered)}: fix search.collections"
        )
    kwargs: dict[str, Any] = {"collections": cfg.collections, "datetime": cfg.datetime, "limit": cfg.limit}
    if region.is_box:
        kwargs["bbox"] = list(region.bbox)
    else:
        kwargs["intersects"] = region.geojson()
    server_filter = cfg.max_cloud_cover is not None and _conforms(client, "item-search#query")
    if server_filter:
        kwargs["query"] = {"eo:cloud_cover": {"lte": cfg.max_cloud_cover}}
    try:
        items = [_parse_item(d, client, api_url) for d in client.search(**kwargs).items_as_dicts()]
    except (APIError, requests.RequestException) as e:
        raise STACServerError(
            f"search on {api_url} failed ({type(e).__name__}: {e}, after retries); "
            "try again later, or check search.api"
        ) from None
    if cfg.max_cloud_cover is not None and not server_filter:
        items = [i for i in items if i.properties.get("eo:cloud_cover", 0.0) <= cfg.max_cloud_cover]
    if not items:
        where = f"bbox {list(cfg.bbox)}" if cfg.bbox else f"region {cfg.region}"
        raise NoItemsFound(
            f"no items in {cfg.collections} over {where} for datetime "
            f"{cfg.datetime!r} with cloud cover <= {cfg.max_cloud_cover}: widen search.bbox, "
            "search.datetime or search.max_cloud_cover"
        )
    items.sort(key=lambda i: (str(i.datetime or acquired(i)), i.id))
    log.info("search found %d item(s)", len(items))
    return items


def _parse_item(d: dict[str, Any], client: Client, api_url: str) -> pystac.Item:
    """Parse one item of a search answer, raising :class:`CorruptInput` naming it when refused.

    Refused are items pystac refuses, and items without ``datetime`` and without
    ``start_datetime``/``end_datetime`` (a server such as rustac returns them for every
    datetime range, since it cannot place them in time).
    """
    props = d.get("properties") or {}
    item_id = d.get("id", "<without id>")
    if not props.get("datetime") and not props.get("start_datetime"):
        raise CorruptInput(
            f"item {item_id} (collection {d.get('collection')}, from {api_url}) has no datetime and no "
            "start_datetime: a Sentinel-2 item must say when it was acquired. Fix the item (set "
            "properties.datetime, or start_datetime and end_datetime) or drop it from the catalog"
        )
    try:
        return pystac.Item.from_dict(d, root=client, preserve_dict=False)
    except (pystac.STACError, ValueError, KeyError, TypeError) as e:
        raise CorruptInput(
            f"item {item_id} (collection {d.get('collection')}, from {api_url}) is not a valid STAC item "
            f"({type(e).__name__}: {e}): fix the item or drop it from the catalog"
        ) from None


def sign_planetary_computer(items: list[pystac.Item]) -> list[pystac.Item]:
    """Sign Planetary Computer asset hrefs (short-lived SAS tokens) with its own package.

    :func:`search_items` signs as it reads (the client's modifier); this signs items again,
    e.g. items read back from a run's record whose tokens have expired.
    """
    sign = _pc_signer()
    for i in items:
        sign(i)
    return items


_TILE_IN_ID = re.compile(r"(?:^|_)T?(\d{2}[C-HJ-NP-X][A-HJ-NP-Z]{2})(?:_|$)")


def item_tile(item: pystac.Item) -> str | None:
    """Return the Sentinel-2 MGRS tile (e.g. ``29RKH``) of an item, from whichever field its API uses.

    In order: ``s2:mgrs_tile`` (Planetary Computer), ``grid:code`` (``MGRS-29RKH``, Earth
    Search v1), ``mgrs:utm_zone`` + ``mgrs:latitude_band`` + ``mgrs:grid_square`` (Earth Search
    v1), ``sentinel:utm_zone`` + ``sentinel:latitude_band`` + ``sentinel:grid_square`` (Earth
    Search v0), else a tile code in the item id (``S2B_29RKH_20230101_0_L2A``,
    ``S2A_MSIL2A_..._T29RKH_...``). ``None`` when none says.
    """
    p = item.properties
    if p.get("s2:mgrs_tile"):
        return str(p["s2:mgrs_tile"]).removeprefix("T")
    if p.get("grid:code"):
        return str(p["grid:code"]).removeprefix("MGRS-")
    for prefix in ("mgrs", "sentinel"):
        if p.get(f"{prefix}:utm_zone"):
            return (
                f"{int(p[f'{prefix}:utm_zone']):02d}{p.get(f'{prefix}:latitude_band', '')}"
                f"{p.get(f'{prefix}:grid_square', '')}"
            )
    m = _TILE_IN_ID.search(item.id)
    return m.group(1) if m else None
