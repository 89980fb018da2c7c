"""Bad input through the real command line: exit code 2, one paragraph naming the input, and
the output folder's existing products unchanged byte for byte.

Each case runs `agriland` in-process (``cli.main``) against a real earlier run (search, cube
and patches of the demo region, on the session's two-worker cluster) or a fresh folder.
``pytest tests/test_bad_input.py -rA -s`` prints the message every case gives.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import re
import shutil
from pathlib import Path

import pytest
import yaml

from agriland_scale import cli
from agriland_scale.config.files import DATA
from agriland_scale.pipeline.outdir import RunLock

from .conftest import DEMO_YAML

# the products of a run: everything but the record (run.json), the logs and the lock
_NOT_PRODUCTS = re.compile(r"^(run\.json|logs/.*|\.agriland\.lock)$")


def _products(out: Path) -> dict[str, str]:
    if not out.is_dir():
        return {}
    return {
        str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(out.rglob("*"))
        if p.is_file() and not _NOT_PRODUCTS.match(str(p.relative_to(out)))
    }


@pytest.fixture(scope="module")
def prior_run(tmp_path_factory, external_cluster) -> Path:
    from agriland_scale import load_config
    from agriland_scale.pipeline.runner import run

    out = tmp_path_factory.mktemp("prior") / "run"
    run(load_config(DEMO_YAML), out, scheduler=external_cluster, until="patches")
    return out


def _demo() -> dict:
    return yaml.safe_load(DEMO_YAML.read_text())


def _write_pipeline(tmp: Path, doc: dict | str | bytes, name: str = "pipeline.yaml") -> Path:
    p = tmp / name
    if isinstance(doc, bytes):
        p.write_bytes(doc)
    else:
        p.write_text(doc if isinstance(doc, str) else yaml.safe_dump(doc))
    return p


def _edit(**changes) -> dict:
    doc = _demo()
    for dotted, value in changes.items():
        node = doc
        *parents, leaf = dotted.split(".")
        for k in parents:
            node = node.setdefault(k, {})
        if value is _DROP:
            node.pop(leaf, None)
        else:
            node[leaf] = value
    return doc


_DROP = object()
_BOMB = (
    "\n".join(
        ["a: &a [x, x, x, x, x, x, x, x, x]"]
        + [f"{chr(98 + i)}: &{chr(98 + i)} [" + ", ".join([f"*{chr(97 + i)}"] * 9) + "]" for i in range(8)]
    )
    + "\n"
)


def _catalog(tmp: Path, edit_item=None, edit_tif=None) -> Path:
    """A copy of the embedded catalogue with its item (dict) or one COG changed."""
    cat = tmp / "catalog"
    shutil.copytree(DATA / "virginia", cat)
    item = json.loads((cat / "item.json").read_text())
    if edit_item:
        edit_item(item)
    (cat / "item.json").write_text(json.dumps(item))
    if edit_tif:
        edit_tif(cat)
    return cat


def _no_datetime(item):
    item["properties"].pop("datetime", None)
    item["properties"].pop("start_datetime", None)
    item["properties"].pop("end_datetime", None)
    item["properties"]["datetime"] = None


def _shift(item):
    for a in item["assets"].values():
        if "proj:transform" in a:
            a["proj:transform"][2] += 5000
    if "proj:transform" in item["properties"]:
        item["properties"]["proj:transform"][2] += 5000


def _corrupt_tile(cat: Path):
    data = bytearray((cat / "B04.tif").read_bytes())
    mid = len(data) // 3
    data[mid : mid + 20000] = b"\xff" * 20000
    (cat / "B04.tif").write_bytes(bytes(data))


def _hold_lock(out: str, ready, release) -> None:
    lock = RunLock(out, "agriland run (another terminal)").acquire()
    ready.set()
    release.wait(120)
    lock.release()


# (id, argv after "agriland", setup(tmp) -> dict of extra placeholders, target folder, message regex)
# placeholders: {P} the pipeline file written by setup (default: the demo), {OUT} the target
# folder, {TMP} the test's folder. target: "prior" (the earlier run) or "fresh" (new folder).
CASES = [
    # -- the pipeline file ------------------------------------------------------------------
    (
        "pipeline-missing",
        ["validate", "{TMP}/nope.yaml"],
        None,
        "fresh",
        r"pipeline file .*nope\.yaml does not exist",
    ),
    (
        "pipeline-binary",
        ["run", "{P}", "--out", "{OUT}"],
        lambda t: {"P": _write_pipeline(t, bytes(range(256)) * 8)},
        "prior",
        r"pipeline\.yaml .*not a text",
    ),
    ("pipeline-folder", ["validate", "{TMP}"], None, "fresh", r"is a folder|is a directory|not a file"),
    (
        "pipeline-yaml-syntax",
        ["validate", "{P}"],
        lambda t: {"P": _write_pipeline(t, "search: [unclosed\n")},
        "fresh",
        r"pipeline\.yaml is not valid YAML",
    ),
    (
        "pipeline-yaml-bomb",
        ["validate", "{P}"],
        lambda t: {"P": _write_pipeline(t, _BOMB)},
        "fresh",
        r"pipeline\.yaml.*alias",
    ),
    (
        "pipeline-too-large",
        ["validate", "{P}"],
        lambda t: {"P": _write_pipeline(t, "# x\n" * 400_000)},
        "fresh",
        r"pipeline\.yaml.*MiB",
    ),
    (
        "pipeline-not-mapping",
        ["validate", "{P}"],
        lambda t: {"P": _write_pipeline(t, "- a\n- b\n")},
        "fresh",
        r"pipeline\.yaml holds a list, not a mapping",
    ),
    (
        "unknown-key",
        ["run", "{P}", "--out", "{OUT}"],
        lambda t: {"P": _write_pipeline(t, _edit(**{"cube.bandz": ["red"]}))},
        "prior",
        r"unknown key 'cube\.bandz'",
    ),
    (
        "missing-search",
        ["validate", "{P}"],
        lambda t: {"P": _write_pipeline(t, _edit(search=_DROP))},
        "fresh",
        r"search: .*missing",
    ),
    (
        "missing-collections",
        ["validate", "{P}"],
        lambda t: {"P": _write_pipeline(t, _edit(**{"search.collections": _DROP}))},
        "fresh",
        r"search\.collections",
    ),
    (
        "wrong-type",
        ["validate", "{P}"],
        lambda t: {"P": _write_pipeline(t, _edit(**{"cube.resolution": "ten"}))},
        "fresh",
        r"cube\.resolution",
    ),
    (
        "bbox-swapped",
        ["run", "{P}", "--out", "{OUT}"],
        lambda t: {"P": _write_pipeline(t, _edit(**{"search.bbox": [-75.58, 37.62, -75.70, 37.71]}))},
        "prior",
        r"search\.bbox.*min >= max.*Did you mean",
    ),
    (
        "bbox-metres",
        ["validate", "{P}"],
        lambda t: {"P": _write_pipeline(t, _edit(**{"search.bbox": [438290, 4164100, 448530, 4174340]}))},
        "fresh",
        r"search\.bbox.*-180\.\.180",
    ),
    (
        "bbox-antimeridian",
        ["validate", "{P}"],
        lambda t: {"P": _write_pipeline(t, _edit(**{"search.bbox": [179, 10, -179, 11]}))},
        "fresh",
        r"antimeridian.*\[179(\.0)?, 10(\.0)?, 180(\.0)?, 11(\.0)?\]",
    ),
    (
        "bbox-three-numbers",
        ["validate", "{P}"],
        lambda t: {"P": _write_pipeline(t, _edit(**{"search.bbox": [1, 2, 3]}))},
        "fresh",
        r"search\.bbox: bbox must have 4 numbers",
    ),
    (
        "bbox-and-region",
        ["validate", "{P}"],
        lambda t: {"P": _write_pipeline(t, _edit(**{"search.region": "r.geojson"}))},
        "fresh",
        r"exactly one of search\.bbox .* and search\.region",
    ),
    (
        "region-missing",
        ["validate", "{P}"],
        lambda t: {
            "P": _write_pipeline(t, _edit(**{"search.bbox": _DROP, "search.region": "nowhere.geojson"}))
        },
        "fresh",
        r"nowhere\.geojson",
    ),
    (
        "region-junk",
        ["validate", "{P}"],
        lambda t: {"P": _write_pipeline(t, _edit(**{"search.bbox": _DROP, "search.region": str(_junk(t))}))},
        "fresh",
        r"junk\.geojson",
    ),
    (
        "region-points",
        ["validate", "{P}"],
        lambda t: {
            "P": _write_pipeline(t, _edit(**{"search.bbox": _DROP, "search.region": str(_points(t))}))
        },
        "fresh",
        r"points\.geojson holds no polygons",
    ),
    (
        "bands-not-in-cube",
        ["validate", "{P}"],
        lambda t: {"P": _write_pipeline(t, _edit(**{"embed.bands": ["red", "swir16"]}))},
        "fresh",
        r"embed\.bands \['swir16'\] are not in cube\.bands",
    ),
    (
        "chunk-vs-stride",
        ["validate", "{P}"],
        lambda t: {"P": _write_pipeline(t, _edit(**{"cube.chunk": 320}))},
        "fresh",
        r"cube\.chunk \(320\) must be a multiple of patches\.stride",
    ),
    (
        "overlap-too-large",
        ["validate", "{P}"],
        lambda t: {"P": _write_pipeline(t, _edit(**{"segment.overlap": 200}))},
        "fresh",
        r"segment\.overlap",
    ),
    (
        "catalog-missing",
        ["validate", "{P}"],
        lambda t: {"P": _write_pipeline(t, _edit(**{"search.catalog": "no-such-catalog"}))},
        "fresh",
        r"search\.catalog.*no-such-catalog",
    ),
    (
        "labels-missing",
        ["run", "{P}", "--out", "{OUT}"],
        lambda t: {"P": _write_pipeline(t, _edit(**{"segment.labels": "missing-labels.geojson"}))},
        "prior",
        r"segment\.labels.*missing-labels\.geojson",
    ),
    # -- command-line arguments -------------------------------------------------------------
    (
        "set-without-equals",
        ["run", "{P}", "--out", "{OUT}", "--set", "seed"],
        None,
        "prior",
        r"--set 'seed' is not KEY=VALUE",
    ),
    (
        "set-unknown-key",
        ["run", "{P}", "--out", "{OUT}", "--set", "embed.trian.epochs=1"],
        None,
        "prior",
        r"embed\.trian",
    ),
    (
        "set-invalid-value",
        ["run", "{P}", "--out", "{OUT}", "--set", "embed.train.epochs=-1"],
        None,
        "prior",
        r"embed\.train\.epochs",
    ),
    (
        "force-unknown-stage",
        ["run", "{P}", "--out", "{OUT}", "--force", "clusterz"],
        None,
        "prior",
        r"--force: invalid choice: 'clusterz'",
    ),
    (
        "export-clusters-not-numbers",
        ["export-labels", "{OUT}", "--clusters", "a,b"],
        None,
        "prior",
        r"--clusters: 'a,b' is not a list of cluster ids",
    ),
    (
        "export-labels-not-a-run",
        ["export-labels", "{TMP}", "--clusters", "1"],
        None,
        "prior",
        r"holds no run\.json",
    ),
    ("inspect-not-a-folder", ["inspect", "{TMP}/nothing"], None, "prior", r"nothing is not a folder"),
    ("report-not-a-run", ["report", "{TMP}"], None, "prior", r"holds no run\.json"),
    (
        "import-labels-missing-file",
        ["import-labels", "{TMP}/drawn.json", "{OUT}"],
        None,
        "prior",
        r"drawn\.json",
    ),
    (
        "scheduler-dashboard-url",
        ["run", "{P}", "--out", "{OUT}", "--scheduler", "http://127.0.0.1:8787"],
        None,
        "fresh",
        r"--scheduler: 'http://127\.0\.0\.1:8787' is a web address .*tcp://127\.0\.0\.1:8786",
    ),
    (
        "scheduler-not-an-address",
        ["run", "{P}", "--out", "{OUT}", "--scheduler", "not a url"],
        None,
        "fresh",
        r"--scheduler: 'not a url' is not a scheduler address.*tcp://HOST:8786",
    ),
    (
        "scheduler-in-pipeline",
        ["run", "{P}", "--out", "{OUT}"],
        lambda t: {
            "P": _write_pipeline(t, _edit(**{"runtime.scheduler": "https://dask.example.org/status"}))
        },
        "fresh",
        r"runtime\.scheduler.*web address.*tcp://dask\.example\.org:8786",
    ),
    # -- the output folder ------------------------------------------------------------------
    (
        "out-s3-dot-dot",
        ["run", "{P}", "--out", "s3://bucket/../x"],
        None,
        "fresh",
        r"s3://bucket/\.\./x is not a valid location: it has the key segment '\.\.'",
    ),
    (
        "out-s3-empty-segment",
        ["inspect", "s3://bucket/runs//x"],
        None,
        "fresh",
        r"s3://bucket/runs//x is not a valid location: it has an empty key segment",
    ),
    (
        "out-is-a-file",
        ["run", "{P}", "--out", "{TMP}/results.txt"],
        lambda t: (t / "results.txt").write_text("mine") and {},
        "prior",
        r"results\.txt is a file, not a folder",
    ),
    (
        "out-read-only",
        ["run", "{P}", "--out", "/proc/sys/agriland-run"],
        None,
        "prior",
        r"cannot write into /proc/sys",
    ),
    (
        "out-foreign-files",
        ["run", "{P}", "--out", "{TMP}/mine"],
        lambda t: _foreign(t) and {},
        "prior",
        r"mine already holds files that no agriland run wrote \(models\)",
    ),
    (
        "out-foreign-overwrite",
        ["run", "{P}", "--out", "{TMP}/mine", "--overwrite"],
        lambda t: _foreign(t) and {},
        "prior",
        r"no agriland run wrote.*never deletes files it did not write",
    ),
    (
        "out-damaged-run-json",
        ["run", "{P}", "--out", "{TMP}/damaged"],
        lambda t: _damaged(t) and {},
        "prior",
        r"damaged/run\.json is damaged",
    ),
    (
        "inspect-damaged-run-json",
        ["inspect", "{TMP}/damaged"],
        lambda t: _damaged(t) and {},
        "prior",
        r"damaged/run\.json is damaged",
    ),
    (
        "out-another-run",
        ["run", "{P}", "--out", "{OUT}"],
        lambda t: {"P": _write_pipeline(t, _edit(name="another"))},
        "prior",
        r"holds another run",
    ),
    (
        "out-config-changed",
        ["run", "{P}", "--out", "{OUT}"],
        lambda t: {"P": _write_pipeline(t, _edit(**{"cube.composite": "mean"}))},
        "prior",
        r"differs .* in cube\.composite.*--force cube",
    ),
    (
        "out-locked",
        ["run", "{P}", "--out", "{OUT}"],
        "lock",
        "prior",
        r"in use by 'agriland run \(another terminal\)'",
    ),
    # -- models, labels and clusters, checked before anything changes ------------------------
    (
        "embed-model-missing",
        ["run", "{P}", "--out", "{OUT}", "--set", "embed.model={TMP}/enc.keras"],
        None,
        "prior",
        r"embed\.model.*enc\.keras",
    ),
    (
        "segment-model-junk",
        ["run", "{P}", "--out", "{OUT}", "--set", "segment.model={TMP}/junk.keras"],
        lambda t: _junk_model(t) and {},
        "prior",
        r"segment\.model = .*junk\.keras is not a Keras model file",
    ),
    (
        "embed-model-no-sidecar",
        ["run", "{P}", "--out", "{OUT}", "--set", "embed.model={TMP}/bare.keras"],
        lambda t: _bare_model(t) and {},
        "prior",
        r"bare\.keras has no metadata sidecar",
    ),
    (
        "cluster-k-too-large",
        ["run", "{P}", "--out", "{OUT}", "--set", "cluster.k=60"],
        None,
        "prior",
        r"cluster\.k is 60 but the run's region has only 49 valid",
    ),
    # -- items and assets (a copy of the embedded catalogue) ----------------------------------
    (
        "empty-search",
        ["run", "{P}", "--out", "{OUT}"],
        lambda t: {"P": _write_pipeline(t, _edit(**{"search.datetime": "2030-01-01/2030-02-01"}))},
        "fresh",
        r"no items in .*2030-01-01/2030-02-01",
    ),
    (
        "unknown-collection",
        ["run", "{P}", "--out", "{OUT}"],
        lambda t: {"P": _write_pipeline(t, _edit(**{"search.collections": ["sentinel-2-l9z"]}))},
        "fresh",
        r"sentinel-2-l9z",
    ),
    (
        "missing-band",
        ["run", "{P}", "--out", "{OUT}"],
        lambda t: {
            "P": _write_pipeline(t, _edit(**{"cube.bands": ["red", "green", "blue", "nir", "rededge1"]}))
        },
        "fresh",
        r"has no asset for band\(s\) \['rededge1'\]",
    ),
    (
        "item-without-datetime",
        ["run", "{P}", "--out", "{OUT}"],
        lambda t: {"P": _write_pipeline(t, _edit(**{"search.catalog": str(_catalog(t, _no_datetime))}))},
        "fresh",
        r"S2.*datetime",
    ),
    (
        "asset-shifted",
        ["run", "{P}", "--out", "{OUT}"],
        lambda t: {"P": _write_pipeline(t, _edit(**{"search.catalog": str(_catalog(t, _shift))}))},
        "fresh",
        r"asset '(red|green|blue|nir)'.*transform",
    ),
    (
        "resolution-centimetres",
        ["run", "{P}", "--out", "{OUT}"],
        lambda t: {"P": _write_pipeline(t, _edit(**{"cube.resolution": 0.01}))},
        "fresh",
        r"cube\.resolution 0\.01 m makes a grid of [\d,]+ x [\d,]+ px .*more than cube\.max_pixels",
    ),
    (
        "asset-corrupt-tile",
        ["run", "{P}", "--out", "{OUT}"],
        lambda t: {
            "P": _write_pipeline(t, _edit(**{"search.catalog": str(_catalog(t, edit_tif=_corrupt_tile))}))
        },
        "fresh",
        r"asset 'red'.*B04\.tif",
    ),
]


def _junk(t: Path) -> Path:
    (t / "junk.geojson").write_text("hello, not GeoJSON")
    return t / "junk.geojson"


def _points(t: Path) -> Path:
    (t / "points.geojson").write_text(
        json.dumps(
            {
                "type": "FeatureCollection",
                "features": [
                    {
                        "type": "Feature",
                        "properties": {},
                        "geometry": {"type": "Point", "coordinates": [-75.6, 37.65]},
                    }
                ],
            }
        )
    )
    return t / "points.geojson"


def _foreign(t: Path) -> bool:
    (t / "mine" / "models").mkdir(parents=True)
    (t / "mine" / "models" / "my_model.h5").write_text("p")
    return True


def _damaged(t: Path) -> bool:
    (t / "damaged").mkdir()
    (t / "damaged" / "run.json").write_text('{"config": {"na')
    (t / "damaged" / "cog").mkdir()
    (t / "damaged" / "cog" / "probability.tif").write_bytes(b"II*\x00 earlier product")
    return True


def _junk_model(t: Path) -> bool:
    (t / "junk.keras").write_bytes(b"\x00" * 1000)
    (t / "junk.keras.json").write_text(json.dumps({"task": "segmentation"}))
    return True


def _bare_model(t: Path) -> bool:
    import zipfile

    with zipfile.ZipFile(t / "bare.keras", "w") as z:
        z.writestr("config.json", "{}")
        z.writestr("model.weights.h5", b"")
    return True


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input(case, prior_run, external_cluster, tmp_path, capsys):
    name, argv, setup, target, expect = case
    places = {"TMP": str(tmp_path), "P": str(DEMO_YAML)}
    holder = None
    if setup == "lock":
        ctx = mp.get_context("spawn")
        ready, release = ctx.Event(), ctx.Event()
        holder = ctx.Process(target=_hold_lock, args=(str(prior_run), ready, release))
        holder.start()
        assert ready.wait(60)
    elif setup is not None:
        places.update({k: str(v) for k, v in (setup(tmp_path) or {}).items()})
    out = prior_run if target == "prior" else tmp_path / "fresh-out"
    places["OUT"] = str(out)
    args = [a.format(**places) for a in argv]
    if (
        args[0] in ("run", "train-cae", "train-unet", "demo")
        and "--scheduler" not in args
        and not name.startswith("scheduler-")
    ):
        args += ["--scheduler", external_cluster]
    watched = [out] + [Path(places["TMP"]) / d for d in ("damaged", "mine")]
    before = {str(w): _products(w) for w in watched}
    try:
        try:
            code = cli.main(args)
        except SystemExit as e:  # argparse's own usage errors exit 2 too
            code = e.code
    finally:
        if holder is not None:
            release.set()
            holder.join(60)
    err = capsys.readouterr().err
    print(f"\n[{name}] exit {code}: {err.strip()}")
    assert code == 2, err
    assert re.search(expect, err, re.S), err
    assert "Traceback" not in err and "unexpected error" not in err, err
    assert "done in" not in err, err  # a failed run is not "done"
    assert len(err) < 3000, err
    if name.startswith(("scheduler-", "out-s3-")):  # refused before anything is written
        assert not out.exists(), sorted(p.name for p in out.iterdir())
    for w in watched:  # what existed is unchanged; only a fresh folder may gain the failed run's report
        after = _products(w)
        assert {k: after.get(k) for k in before[str(w)]} == before[str(w)], f"{w}: existing products changed"
        if w != out or target == "prior":
            assert after == before[str(w)], f"{w}: gained {sorted(set(after) - set(before[str(w)]))}"


def test_the_table_is_large_enough():
    assert len(CASES) >= 40
