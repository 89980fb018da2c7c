"""Pins of what already held against an adversary: safe YAML, Keras safe mode, no shell."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from agriland_scale import load_config
from agriland_scale.errors import ConfigError, CorruptInput

PACKAGE = Path(__file__).resolve().parents[1] / "agriland_scale"


def test_yaml_tags_cannot_run_code(tmp_path):
    marker = tmp_path / "pwned"
    p = tmp_path / "evil.yaml"
    p.write_text(f"name: !!python/object/apply:os.system ['touch {marker}']\nsearch: {{collections: [x]}}\n")
    with pytest.raises(ConfigError, match="evil.yaml is not valid YAML"):
        load_config(p)
    assert not marker.exists()


def test_keras_models_load_in_safe_mode(tmp_path):
    """A .keras file with a Lambda layer (arbitrary Python) is refused, not run."""
    import keras

    from agriland_scale.models.worker import get_model

    marker = tmp_path / "pwned"
    inp = keras.Input((4,))
    out = keras.layers.Lambda(lambda x: x * 2)(inp)
    path = tmp_path / "lambda.keras"
    keras.Model(inp, out).save(path)
    with pytest.raises(CorruptInput, match=r"lambda\.keras.*(safe_mode|Lambda|lambda)"):
        get_model(path)
    assert not marker.exists()


def test_no_shell_strings_in_the_package():
    """No subprocess with shell=True, no os.system / os.popen, no eval / exec anywhere."""
    bad = []
    for f in PACKAGE.rglob("*.py"):
        tree = ast.parse(f.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Call):
                fn = node.func
                name = fn.attr if isinstance(fn, ast.Attribute) else getattr(fn, "id", "")
                if name in ("system", "popen", "eval", "exec"):
                    bad.append(f"{f.name}:{node.lineno} {name}()")
                for kw in node.keywords:
                    if kw.arg == "shell" and not (isinstance(kw.value, ast.Constant) and kw.value.value is False):
                        bad.append(f"{f.name}:{node.lineno} shell=")
    assert not bad, bad
