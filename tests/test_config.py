import pytest

from agriland_scale import load_config
from agriland_scale.config.schema import check_bbox
from agriland_scale.errors import ConfigError, RegionError

from .conftest import DEMO_YAML


def _write(tmp_path, text):
    p = tmp_path / "p.yaml"
    p.write_text(DEMO_YAML.read_text() + text)
    return p


def test_demo_pipeline_is_valid(demo_cfg):
    assert demo_cfg.search.collections == ["agriland-demo-virginia"]
    assert demo_cfg.patches.size == 256
    assert demo_cfg.search.catalog.startswith("builtin:")


def test_unknown_key_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key 'colour'"):
        load_config(_write(tmp_path, "colour: red\n"))


@pytest.mark.parametrize(
    "old, new, msg",
    [
        ("  resolution: 10\n", "  resolution: 10\n  resolutoin: 20\n", r"unknown key 'cube\.resolutoin'"),
        ("  k: 6\n", "  k: six\n", r"cluster\.k.*'six'"),
        ("  stride: 128 ", "  stride: 300 ", r"patches.stride \(300\) must be <= patches.size"),
        (
            "  bands: [red, green, blue]\n  head",
            "  bands: [red, swir16]\n  head",
            r"embed.bands \['swir16'\]",
        ),
    ],
)
def test_bad_values_name_the_key(tmp_path, old, new, msg):
    text = DEMO_YAML.read_text()
    assert old in text
    p = tmp_path / "p.yaml"
    p.write_text(text.replace(old, new, 1))
    with pytest.raises(ConfigError, match=msg):
        load_config(p)


def test_override_checks_keys(demo_cfg):
    assert demo_cfg.with_overrides(**{"cluster.k": 3}).cluster.k == 3
    with pytest.raises(ConfigError, match="no such key"):
        demo_cfg.with_overrides(**{"cluster.kk": 3})


@pytest.mark.parametrize(
    "bbox, msg",
    [
        ((-75.58, 37.62, -75.70, 37.71), "min >= max"),
        ((438290, 4164100, 448530, 4174340), "outside -180..180"),
        ((170, -10, 190, 10), "outside -180..180"),
    ],
)
def test_bad_bbox(bbox, msg):
    with pytest.raises(RegionError, match=msg):
        check_bbox(bbox)


def test_missing_file():
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("/nonexistent/pipeline.yaml")


def test_cli_validate_reports_one_paragraph(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    exe = Path(sys.executable).parent / "agriland"
    ok = subprocess.run([exe, "validate", str(DEMO_YAML)], capture_output=True, text=True)
    assert ok.returncode == 0 and "valid" in ok.stdout
    bad = subprocess.run(
        [exe, "validate", str(_write(tmp_path, "colour: red\n"))], capture_output=True, text=True
    )
    assert bad.returncode == 2 and "unknown key 'colour'" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_cli_help_lists_commands_with_descriptions():
    import subprocess
    import sys
    from pathlib import Path

    exe = Path(sys.executable).parent / "agriland"
    out = subprocess.run([exe, "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    for cmd in (
        "demo",
        "run",
        "train-cae",
        "train-unet",
        "search",
        "validate",
        "inspect",
        "report",
        "export-labels",
        "import-labels",
    ):
        lines = out.stdout.splitlines()
        at = next(i for i, ln in enumerate(lines) if ln.strip() == cmd or ln.strip().startswith(cmd + " "))
        # a description on its line, or on the next one for a long name (argparse's layout)
        text = lines[at].strip()[len(cmd) :].strip() or lines[at + 1].strip()
        assert len(text) > 15, lines[at : at + 2]


def test_unexpected_errors_are_one_paragraph_unless_debug(tmp_path, monkeypatch, capsys):
    """A failure that is not one of ours (here: a handler raising ZeroDivisionError) prints one
    paragraph naming the exception and where it happened; --debug (before or after the
    command) prints the traceback."""
    from agriland_scale import cli

    def broken(args):
        return 1 / 0

    monkeypatch.setattr(cli, "_inspect", broken)
    assert cli.main(["inspect", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert "ZeroDivisionError: division by zero" in err and "test_config.py" in err and "--debug" in err
    for argv in (["--debug", "inspect", str(tmp_path)], ["inspect", str(tmp_path), "--debug"]):
        assert cli.main(argv) == 1
        assert "Traceback (most recent call last)" in capsys.readouterr().err


def test_storage_options_survive_overrides(tmp_path):
    """``output.storage_options`` (left out of run.json) stays in the config through ``--set``,
    which may also add a key to it."""
    import json

    import yaml

    doc = yaml.safe_load(DEMO_YAML.read_text())
    opts = {"endpoint_url": "http://127.0.0.1:1", "access_key_id": "k", "secret_access_key": "s"}
    doc["output"] = {"storage_options": opts}
    p = tmp_path / "p.yaml"
    p.write_text(yaml.safe_dump(doc))
    plain = load_config(p)
    changed = load_config(p, **{"seed": 7, "output.storage_options.region": "eu-west-1"})
    assert plain.output.storage_options == opts
    assert changed.seed == 7 and changed.output.storage_options == opts | {"region": "eu-west-1"}
    assert plain.with_overrides(seed=3).output.storage_options == opts
    assert "secret" not in plain.model_dump_json() and "secret" not in json.dumps(
        changed.model_dump(mode="json")
    )
