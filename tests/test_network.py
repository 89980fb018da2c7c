"""Network habits (issue 35, items 13 and 15): STAC API retries against a real local HTTP
server, GDAL's cloud-read settings, Planetary Computer signing as the client's modifier, and
Dask's own ``scheduler-address`` configuration."""

import json
import sys
import threading
import types
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import dask.config
import pytest
import requests

from agriland_scale.config.schema import RuntimeConfig
from agriland_scale.errors import ConfigError, MissingDependency, STACServerError
from agriland_scale.search.stac import local_stac_api, open_api, search_items


@contextmanager
def flaky_proxy(upstream: str, fail: dict[str, list[int]]):
    """A real HTTP server on 127.0.0.1 in front of ``upstream`` (the local STAC API).

    ``fail``: for a path, the statuses of its first answers (e.g. ``{"/search": [429, 503]}``);
    later calls are forwarded, with the upstream's URLs rewritten to the proxy's. Yields
    ``(url, seen)``: ``seen`` lists ``(method, path, status)`` of every call.
    """
    seen: list[tuple[str, str, int]] = []
    lock = threading.Lock()
    pending = {k: list(v) for k, v in fail.items()}

    class Handler(BaseHTTPRequestHandler):
        def _answer(self) -> None:
            path = self.path.split("?")[0]
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            with lock:
                status = pending[path].pop(0) if pending.get(path) else None
            if status is not None:
                seen.append((self.command, path, status))
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            r = requests.request(
                self.command,
                upstream + self.path,
                data=body or None,
                timeout=10,
                headers={"Content-Type": self.headers.get("Content-Type", "application/json")},
            )
            out = r.content.replace(upstream.encode(), self.server.url.encode())  # type: ignore[attr-defined]
            seen.append((self.command, path, r.status_code))
            self.send_response(r.status_code)
            self.send_header("Content-Type", r.headers.get("Content-Type", "application/json"))
            self.send_header("Content-Length", str(len(out)))
            self.end_headers()
            self.wfile.write(out)

        do_GET = do_POST = _answer

        def log_message(self, *args) -> None:  # quiet
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.url = f"http://127.0.0.1:{server.server_address[1]}"  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.url, seen  # type: ignore[attr-defined]
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def demo_api(demo_cfg):
    with local_stac_api(demo_cfg.search.catalog) as url:
        yield url


def test_search_retries_throttled_and_failing_answers(demo_cfg, demo_api):
    """429 then 503 on the item search: the search retries (with backoff) and finds the items."""
    direct = search_items(demo_cfg.search, demo_api)
    with flaky_proxy(demo_api, {"/search": [429, 503]}) as (url, seen):
        items = search_items(demo_cfg.search, url)
    assert [i.id for i in items] == [i.id for i in direct] and items
    searches = [s for _, p, s in seen if p == "/search"]
    assert searches[:3] == [429, 503, 200], seen


def test_open_api_gives_up_after_the_retries(demo_api):
    """A root that answers 503 every time: a clear error after 1 + retries calls, not a hang."""
    with flaky_proxy(demo_api, {"/": [503] * 10}) as (url, seen):
        with pytest.raises(STACServerError, match="does not answer"):
            open_api(url, retries=2, backoff_s=0)
    assert [s for _, p, s in seen if p == "/"] == [503, 503, 503]


def test_planetary_computer_signs_as_the_client_reads(demo_cfg, demo_api, monkeypatch):
    """``sign: planetary-computer`` installs the package's ``sign_inplace`` as the modifier.

    A stand-in module (the real package would call the internet) records what it signs.
    """
    signed: list[str] = []

    def sign_inplace(obj):
        if isinstance(obj, dict):
            for feature in obj.get("features", []):
                signed.append(feature["id"])
                for asset in feature["assets"].values():
                    asset["href"] += "?sig=test"

    monkeypatch.setitem(sys.modules, "planetary_computer", types.SimpleNamespace(sign_inplace=sign_inplace))
    cfg = demo_cfg.search.model_copy(update={"sign": "planetary-computer"})
    items = search_items(cfg, demo_api)
    assert sorted(signed) == sorted(i.id for i in items)
    assert all(a.href.endswith("?sig=test") for i in items for a in i.assets.values())


def test_planetary_computer_signing_without_the_package(demo_cfg, demo_api, monkeypatch):
    monkeypatch.setitem(sys.modules, "planetary_computer", None)  # import fails as if not installed
    cfg = demo_cfg.search.model_copy(update={"sign": "planetary-computer"})
    with pytest.raises(MissingDependency, match=r"pip install 'agriland-scale\[pc\]'"):
        search_items(cfg, demo_api)


def test_cube_reads_with_gdal_cloud_settings():
    """The settings odc-stac copies into every load's tasks (the workers' reads) are ours."""
    from odc.loader import RioDriver

    from agriland_scale.cube.assets import GDAL_CLOUD_OPTIONS, configure_rio

    configure_rio()
    env = RioDriver().capture_env()
    assert {k: env.get(k) for k in GDAL_CLOUD_OPTIONS} == GDAL_CLOUD_OPTIONS


# --- Dask's own configuration of the scheduler address (item 13) -------------------------------


def test_scheduler_address_precedence():
    from agriland_scale.pipeline.runtime import scheduler_address

    own, dask_cfg = RuntimeConfig(scheduler="tcp://10.0.0.1:8786"), "tcp://10.0.0.2:8786"
    with dask.config.set({"scheduler-address": dask_cfg}):
        assert scheduler_address(RuntimeConfig(), "tcp://10.0.0.3:8786") == "tcp://10.0.0.3:8786"
        assert scheduler_address(own) == "tcp://10.0.0.1:8786"
        assert scheduler_address(RuntimeConfig()) == dask_cfg
    with dask.config.set({"scheduler_address": None}):
        assert scheduler_address(RuntimeConfig()) is None  # own LocalCluster
    # dask.config.set, not the environment and refresh(): refresh() rewrites the process's
    # global configuration, which the tests after this one would inherit
    with dask.config.set({"scheduler-address": "http://example.org:8787"}):  # the dashboard's
        with pytest.raises(ConfigError, match=r"DASK_SCHEDULER_ADDRESS.*tcp://example.org:8786"):
            scheduler_address(RuntimeConfig())


def test_dask_scheduler_address_from_the_environment(external_cluster):
    """A new process reads DASK_SCHEDULER_ADDRESS (Dask's own variable) as its scheduler."""
    import os
    import subprocess
    import sys

    code = (
        "from agriland_scale.config.schema import RuntimeConfig\n"
        "from agriland_scale.pipeline.runtime import scheduler_address\n"
        "print(scheduler_address(RuntimeConfig()))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        env=os.environ | {"DASK_SCHEDULER_ADDRESS": external_cluster},
    )
    assert done.returncode == 0 and done.stdout.strip() == external_cluster, done.stderr


def test_dask_config_scheduler_used_by_a_run(demo_cfg, external_cluster, tmp_path):
    """Dask's scheduler-address names the cluster: no LocalCluster starts, run.json records it."""
    from agriland_scale.pipeline.launch import launch_for_run
    from agriland_scale.pipeline.runner import run

    out = tmp_path / "run"
    with dask.config.set({"scheduler-address": external_cluster}):
        assert launch_for_run(demo_cfg, out, "search", scheduler=None, force=False, overwrite=False) is None
        rec = run(demo_cfg, out, until="search")
    assert rec["scheduler"] == external_cluster
    assert json.loads((out / "run.json").read_text())["scheduler"] == external_cluster
    assert dask.config.get("scheduler-address", None) is None  # nothing left for the next test
