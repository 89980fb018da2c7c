"""The run folder (:class:`~agriland_scale.pipeline.folder.RunFolder`) is the one writer of
``run.json``: a resumed record carries the earlier attempt on, and a ``--force`` records what
it will delete before deleting it. A real Icechunk store on disk."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

import agriland_scale
from agriland_scale.config.schema import RunConfig
from agriland_scale.pipeline.folder import RunFolder, open_folder
from agriland_scale.store.resume import Products

CFG = RunConfig.model_validate(
    {"name": "t", "search": {"api": "local", "catalog": ".", "collections": ["c"], "bbox": [0, 0, 1, 1]}}
)


def test_nothing_but_the_run_folder_writes_run_json():
    package = Path(agriland_scale.__file__).parent
    writes = re.compile(
        r"write_json(_anyhow)?\([^)]*(RECORD|run\.json)|RECORD\)\.write_|\"run\.json\"\)\.write_"
    )
    offenders = [
        f"{p.relative_to(package)}:{n}"
        for p in package.rglob("*.py")
        if p.name != "folder.py"
        for n, line in enumerate(p.read_text().splitlines(), 1)
        if writes.search(line)
    ]
    assert offenders == []
    assert writes.search("write_json(self.record, out / RECORD)")  # the pattern finds such a write


def test_a_resumed_record_carries_the_earlier_attempt_on(tmp_path):
    old = {
        "stages": {"search": "done", "cube": "interrupted"},
        "timings_s": {"search": 0.5, "total": 9.0},
        "files": {"search": ["items.json"]},
        "zones": {"utm18n": {"prefix": ""}},
        "started": "then",
    }
    folder = RunFolder(tmp_path)
    rec = folder.start(CFG, old)
    assert rec["attempts"] == 2 and rec["stages"] == old["stages"] and rec["zones"] == old["zones"]
    assert rec["timings_s"] == {"search": 0.5}  # the total is this attempt's
    assert rec["started"] != "then" and rec["location"] == str(tmp_path)
    assert not folder.record_path.exists()  # not written until saved
    folder.save()
    assert json.loads(folder.record_path.read_text())["attempts"] == 2
    assert folder.start(CFG, None)["stages"] == {} and "attempts" not in folder.record


def test_a_forced_stage_is_recorded_for_removal_before_its_files_go(tmp_path):
    cog = tmp_path / "cog" / "probability.tif"
    cog.parent.mkdir()
    cog.write_bytes(b"old")
    mine = tmp_path / "report.html"
    mine.write_text("old")
    folder = RunFolder(tmp_path)
    folder.start(
        CFG,
        {
            "stages": {"clusters": "done", "segmentation": "done", "publish": "done"},
            "timings_s": {"segmentation": 3.0},
            "files": {"publish": ["cog/probability.tif"], "report": ["report.html"], "clusters": []},
            "products": {"zarr": "x"},
        },
    )
    folder.forget(["segmentation"], Products(tmp_path / "agriland.icechunk"))
    on_disk = json.loads(folder.record_path.read_text())  # written before anything is deleted
    assert sorted(on_disk["pending_removal"]) == ["cog/probability.tif", "report.html"]
    assert on_disk["stages"] == {"clusters": "done"} and "products" not in on_disk
    assert cog.exists() and mine.exists()
    folder.remove_pending()
    assert not cog.exists() and not mine.exists() and "pending_removal" not in folder.record


def test_a_local_folder_is_its_own_location(tmp_path):
    with open_folder(CFG, tmp_path / "out", "test", print) as folder:
        assert folder.path == (tmp_path / "out").resolve() and folder.mirror is None
        assert folder.where("cog/mask.tif") == str(folder.path / "cog" / "mask.tif")
        assert folder.models == folder.path / "models"


@pytest.mark.parametrize("url", ["s3://bucket/run", "gs://bucket/run"])
def test_a_run_on_object_storage_names_its_files_by_url(tmp_path, url):
    folder = RunFolder(tmp_path, url)
    assert folder.where("cog/mask.tif") == f"{url}/cog/mask.tif"
