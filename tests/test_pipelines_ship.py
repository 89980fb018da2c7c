"""Every pipeline shipped under pipelines/ validates as shipped (issue 35, item 14)."""

from pathlib import Path

import pytest

from agriland_scale.cli import main
from agriland_scale.config.files import check_input_files
from agriland_scale.config.load import load_config

PIPELINES = sorted((Path(__file__).resolve().parents[1] / "pipelines").glob("*.yaml"))


def test_pipelines_are_shipped():
    assert PIPELINES, "no pipelines/*.yaml found: the parametrized checks below would run nothing"


@pytest.mark.parametrize("path", PIPELINES, ids=[p.name for p in PIPELINES])
def test_shipped_pipeline_validates(path, capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # nothing may depend on the folder it is run from
    assert main(["validate", str(path)]) == 0, capsys.readouterr().err
    assert "valid" in capsys.readouterr().out
    cfg = load_config(path)
    check_input_files(cfg)  # every file it names exists and reads
    if not (cfg.segment.labels or cfg.segment.model):
        # a pipeline that needs the user's labels says how to make them
        text = path.read_text()
        assert "export-labels" in text and "import-labels" in text and "--until clusters" in text
