"""``agriland SUBCOMMAND --help`` explains the subcommand, every argument and shows examples
(as rio and stac-client do); shell completion when argcomplete is installed; ``-v`` shows
each line once and ``-q`` leaves errors only on stderr, results on stdout."""

from __future__ import annotations

import argparse
import logging
import sys
import types
import warnings

import numpy as np
import pytest
import xarray as xr

from agriland_scale import cli
from agriland_scale.cli_parser import build_parser
from agriland_scale.terminal import Display

from .conftest import DEMO_YAML


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(sub.choices)


SUBCOMMANDS = sorted(_subparsers(build_parser()))


def test_the_parser_has_every_subcommand():
    assert set(SUBCOMMANDS) == {
        "demo",
        "run",
        "plan",
        "train-cae",
        "train-unet",
        "search",
        "validate",
        "inspect",
        "export",
        "report",
        "export-labels",
        "import-labels",
        "cluster",
    }


@pytest.mark.parametrize("name", SUBCOMMANDS)
def test_every_argument_of_every_subcommand_is_explained(name):
    parser = _subparsers(build_parser())[name]
    assert parser.description and len(parser.description) > 60, name
    assert parser.epilog and parser.epilog.startswith("examples:") and f"agriland {name}" in parser.epilog
    assert parser.formatter_class is argparse.RawDescriptionHelpFormatter  # examples keep their lines
    for action in parser._actions:
        assert action.help and action.help is not argparse.SUPPRESS, (name, action.dest)


@pytest.mark.parametrize("name", SUBCOMMANDS)
def test_subcommand_help_shows_description_arguments_and_examples(name, capsys):
    with pytest.raises(SystemExit) as stop:
        cli.main([name, "--help"])
    assert stop.value.code == 0
    out = capsys.readouterr().out
    parser = _subparsers(build_parser())[name]
    assert parser.description.splitlines()[0] in out
    assert "examples:\n  agriland " + name in out
    for action in parser._actions:
        for option in action.option_strings or [action.metavar or action.dest]:
            assert option in out, (name, option)
        assert action.help.split()[0] in out, (name, action.dest)


def test_top_level_help_lists_subcommands_and_how_to_enable_completion(capsys):
    with pytest.raises(SystemExit) as stop:
        cli.main(["--help"])
    assert stop.value.code == 0
    out = capsys.readouterr().out
    assert 'eval "$(register-python-argcomplete agriland)"' in out
    assert all(name in out for name in SUBCOMMANDS) and "examples:" in out


def test_shell_completion_uses_argcomplete_when_installed(monkeypatch):
    seen = []
    fake = types.ModuleType("argcomplete")
    fake.autocomplete = seen.append  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "argcomplete", fake)
    monkeypatch.setenv("_ARGCOMPLETE", "1")
    with pytest.raises(SystemExit):  # the real argcomplete exits after completing; no arguments here
        cli.main([])
    assert len(seen) == 1 and isinstance(seen[0], argparse.ArgumentParser) and seen[0].prog == "agriland"


def test_shell_completion_is_optional(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "argcomplete", None)  # not installed: import fails
    monkeypatch.setenv("_ARGCOMPLETE", "1")
    assert cli.main(["validate", str(DEMO_YAML)]) == 0
    assert "valid" in capsys.readouterr().out


@pytest.fixture
def stderr_log():
    """Put a handler on (captured) stderr on the root logger, as ``logging.basicConfig`` does.

    Call it in the test, once capsys captures; the logging settings ``main`` changes are restored after.
    """
    root, pkg = logging.getLogger(), logging.getLogger("agriland_scale")
    levels, raise_exceptions, added = (root.level, pkg.level), logging.raiseExceptions, []

    def install() -> logging.Handler:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        root.addHandler(handler)
        added.append(handler)
        return handler

    yield install
    for handler in added:
        root.removeHandler(handler)
    root.setLevel(levels[0])
    pkg.setLevel(levels[1])
    logging.raiseExceptions = raise_exceptions


def test_verbose_shows_each_run_log_line_once(stderr_log, capsys):
    stderr_log()
    assert cli.main(["-v", "validate", str(DEMO_YAML)]) == 0
    capsys.readouterr()
    line = "[cube] 4 block(s) of 256 px written"
    logging.getLogger("agriland_scale.run").info(line)  # what the runner's report does: log it ...
    Display(False).line(line)  # ... and pass it to the Display (report=show.line)
    logging.getLogger("agriland_scale.cube.load").info("read 3 assets")  # other loggers still show
    err = capsys.readouterr().err
    assert err.count(line) == 1, err
    assert "INFO agriland_scale.cube.load: read 3 assets" in err


def test_quiet_leaves_errors_only_on_stderr(stderr_log, capsys, monkeypatch):
    def command(args):  # a command that warns and logs, in place of validate's
        with warnings.catch_warnings():
            warnings.simplefilter("always" if args.quiet else "ignore")
            warnings.warn("a Python warning -q leaves out", UserWarning, stacklevel=1)
        logging.getLogger("agriland_scale.cube").warning("a logged warning -q leaves out")
        logging.getLogger("agriland_scale.cube").error("an error -q shows")
        return 0

    stderr_log()
    monkeypatch.setattr(cli, "_dispatch", command)
    logged: list[logging.LogRecord] = []
    to_list = logging.Handler()
    to_list.emit = logged.append  # type: ignore[method-assign]
    logging.getLogger("py.warnings").addHandler(to_list)  # where a run's log file gets warnings
    try:
        assert cli.main(["validate", str(DEMO_YAML), "-q"]) == 0
    finally:
        logging.getLogger("py.warnings").removeHandler(to_list)
    out, err = capsys.readouterr()
    assert out == "" and "leaves out" not in err and "an error -q shows" in err, err
    assert ["a Python warning -q leaves out" in r.getMessage() for r in logged] == [True]  # to logging
    assert cli.main(["validate", str(DEMO_YAML)]) == 0  # without -q: the logged warning too
    assert "WARNING agriland_scale.cube: a logged warning -q leaves out" in capsys.readouterr().err


def test_quiet_validate_prints_nothing(capsys):
    assert cli.main(["validate", str(DEMO_YAML), "-q"]) == 0
    assert capsys.readouterr() == ("", "")


def test_quiet_and_verbose_exclude_each_other(capsys):
    with pytest.raises(SystemExit) as stop:
        cli.main(["-q", "validate", str(DEMO_YAML), "-v"])
    assert stop.value.code == 2 and "exclude each other" in capsys.readouterr().err


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A run folder whose store holds one small georeferenced group."""
    from agriland_scale.store import write_georef
    from agriland_scale.store.resume import Products

    run = tmp_path_factory.mktemp("cli") / "run"
    y, x = 4174335.0 - 10 * np.arange(8), 438295.0 + 10 * np.arange(8)
    ds = xr.Dataset({"mask": (("y", "x"), np.ones((8, 8), "uint8"))}, coords={"y": y, "x": x})
    ds["mask"].attrs.update(long_name="agricultural land mask")
    Products(run).write(write_georef(ds, 32618), "utm18n/segmentation")
    return run


@pytest.mark.parametrize("quiet", [False, True])
def test_export_quiet_prints_the_result_only(tiny_run, tmp_path, capsys, quiet):
    dest = tmp_path / "copy.zarr"
    assert cli.main(["export", str(tiny_run), "--zarr", str(dest), *(["-q"] if quiet else [])]) == 0
    out, err = capsys.readouterr()
    assert out == f"{dest}\n"  # the result, on stdout either way
    assert (err == "") if quiet else ("1 group(s) copied" in err)
