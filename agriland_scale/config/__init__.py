"""What the user specifies: the pipeline file (typed), the region, band names and input files.

The public names are re-exported here: ``from agriland_scale.config import load_config, RunConfig``.
"""

from agriland_scale.config.files import check_input_files, resolve_path
from agriland_scale.config.load import load_config
from agriland_scale.config.schema import (
    CAETrainConfig,
    ClusterConfig,
    CubeConfig,
    DECConfig,
    EmbedConfig,
    OutputConfig,
    PatchConfig,
    RunConfig,
    RuntimeConfig,
    SearchConfig,
    SegmentConfig,
    UNetTrainConfig,
    check_bbox,
)

__all__ = [
    "CAETrainConfig",
    "ClusterConfig",
    "CubeConfig",
    "DECConfig",
    "EmbedConfig",
    "OutputConfig",
    "PatchConfig",
    "RunConfig",
    "RuntimeConfig",
    "SearchConfig",
    "SegmentConfig",
    "UNetTrainConfig",
    "check_bbox",
    "check_input_files",
    "load_config",
    "resolve_path",
]
