"""Reading a pipeline YAML file into a :class:`~agriland_scale.config.schema.RunConfig`.

The file is read with bounds (size, nesting, alias expansion) before YAML parses it, then
validated; relative paths in it are resolved against the file's folder.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from agriland_scale.config.checks import (
    MAX_PIPELINE_VALUES,
    REFERENCE,
    Cyclic,
    children_of_node,
    cut,
    expanded_size,
    format_errors,
)
from agriland_scale.config.files import is_url, resolve_path
from agriland_scale.config.schema import RunConfig, apply_overrides
from agriland_scale.errors import ConfigError

__all__ = ["MAX_PIPELINE_BYTES", "load_config"]


# a pipeline file is a few KiB of YAML: refuse what cannot be one before parsing it
MAX_PIPELINE_BYTES = 1 << 20


# flow collections ([...], {...}) nested deeper than this are refused before parsing (PyYAML's
# scanner slows down with the square of the depth); a pipeline file nests three or four
MAX_FLOW_DEPTH = 64


def _read_pipeline_text(path: Path) -> str:
    """Read the text of a pipeline file, refusing folders, huge files and binary files."""
    if path.is_dir():
        raise ConfigError(
            f"pipeline file {path} is a folder: give the path of a pipeline YAML file "
            "(e.g. pipelines/demo.yaml)"
        )
    try:
        with open(path, "rb") as f:  # bounded read: also safe on a device or a huge file
            data = f.read(MAX_PIPELINE_BYTES + 1)
            size = max(len(data), path.stat().st_size) if path.is_file() else len(data)
    except FileNotFoundError:
        raise ConfigError(
            f"pipeline file {path} does not exist: check the path "
            "(agriland_scale/data/demo.yaml is an example pipeline file)"
        ) from None
    except OSError as e:
        raise ConfigError(
            f"cannot read pipeline file {path} ({e.strerror or type(e).__name__}): check its permissions"
        ) from None
    if size > MAX_PIPELINE_BYTES:
        mb = "more than 1" if size == MAX_PIPELINE_BYTES + 1 else f"{size / 2**20:.1f}"
        raise ConfigError(
            f"pipeline file {path} is {mb} MiB: a pipeline file is a few KiB of YAML "
            f"and at most {MAX_PIPELINE_BYTES // 2**20} MiB is read; check that this is "
            "the right file"
        )
    try:
        text = data.decode("utf-8-sig")
        if "\x00" in text:
            raise ValueError("NUL byte")
    except ValueError:  # UnicodeDecodeError too
        raise ConfigError(
            f"pipeline file {path} is not a text YAML file (it holds bytes that are not "
            "UTF-8 text): give the pipeline's .yaml file, saved as UTF-8 text"
        ) from None
    return text


def _flow_depth(text: str) -> int:
    """Deepest nesting of ``[`` / ``{`` in ``text`` (an upper bound: quoted ones count too)."""
    depth = deepest = 0
    for c in re.sub(r"[^\[\]{}]+", "", text):
        depth = depth + 1 if c in "[{" else max(0, depth - 1)
        deepest = max(deepest, depth)
    return deepest


def _parse_yaml(text: str, path: Path) -> Any:
    """Safe-load YAML, refusing aliases that expand to more than ``MAX_PIPELINE_VALUES``."""
    if _flow_depth(text) > MAX_FLOW_DEPTH:
        raise ConfigError(
            f"pipeline file {path} nests [lists] or {{mappings}} more than {MAX_FLOW_DEPTH} "
            f"deep: a pipeline file has sections of keys ({REFERENCE})"
        )
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()  # composed: aliases are shared nodes, still cheap
        if node is None:
            return None
        try:
            size, distinct = expanded_size(node, children_of_node, MAX_PIPELINE_VALUES)
        except Cyclic:
            raise ConfigError(
                f"pipeline file {path} uses a YAML alias inside its own anchor (a structure "
                "that contains itself): remove that alias"
            ) from None
        if size > MAX_PIPELINE_VALUES:
            what = "uses YAML aliases that expand to" if distinct <= MAX_PIPELINE_VALUES else "holds"
            raise ConfigError(
                f"pipeline file {path} {what} more than {MAX_PIPELINE_VALUES:,} values: a "
                "pipeline needs a few dozen; write the values out, or share only small "
                "parts with anchors (&name) and aliases (*name)"
            )
        return loader.construct_document(node)
    except ConfigError:
        raise
    except yaml.YAMLError as e:
        raise ConfigError(f"pipeline file {path} is not valid YAML: {cut(str(e), 600)}") from None
    except RecursionError:
        raise ConfigError(
            f"pipeline file {path} nests lists or mappings too deeply: a pipeline "
            f"file has sections of keys ({REFERENCE})"
        ) from None
    except (ValueError, TypeError, OverflowError) as e:  # a scalar the constructor cannot build
        raise ConfigError(
            f"pipeline file {path} holds a value YAML cannot read ({cut(str(e))}): fix or quote it"
        ) from None
    finally:
        loader.dispose()


def load_config(path: str | Path, **overrides: Any) -> RunConfig:
    """Load and validate a pipeline YAML file.

    Relative paths in ``search.catalog`` and ``segment.labels`` are resolved against the
    file's folder; ``builtin:NAME`` points at data shipped inside the package. Files over
    1 MiB, binary files and YAML aliases expanding to more than 100,000 values are refused.
    """
    path = Path(path)
    raw = _parse_yaml(_read_pipeline_text(path), path)
    if not isinstance(raw, dict):
        found = "is empty" if raw is None else f"holds a {type(raw).__name__}, not a mapping"
        raise ConfigError(
            f"pipeline file {path} {found}: it must hold a mapping of sections "
            f"(search, cube, ...) ({REFERENCE}; agriland_scale/data/demo.yaml is an example)"
        )
    try:
        cfg = RunConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(format_errors(e, RunConfig, str(path))) from None
    if overrides:
        cfg = apply_overrides(cfg, overrides, f"pipeline file {path}")
    resolved = _resolved_paths(cfg, path.parent)
    return cfg.with_overrides(**resolved) if resolved else cfg


def _resolved_paths(cfg: RunConfig, base: Path) -> dict[str, str]:
    out = {}
    for key, value in (("search.catalog", cfg.search.catalog), ("search.region", cfg.search.region)):
        if value and not value.startswith("builtin:") and not is_url(value):
            r = str(resolve_path(value, base))
            if r != value:
                out[key] = r
    for key, value in (
        ("segment.labels", cfg.segment.labels),
        ("embed.weights", cfg.embed.weights),
        ("segment.weights", cfg.segment.weights),
        ("embed.model", cfg.embed.model),
        ("segment.model", cfg.segment.model),
    ):
        if (
            value
            and value not in ("imagenet", "none")
            and not value.startswith("builtin:")
            and not is_url(value)
        ):
            r = str(resolve_path(value, base))
            if r != value:
                out[key] = r
    return out
