"""One row a stage (``layout.STAGE_TABLE``): what the rest of the package reads is derived from it."""

from __future__ import annotations

from agriland_scale.layout import (
    DEPENDS,
    GROUPS,
    MODEL_STAGES,
    STAGE_SETTINGS,
    STAGE_TABLE,
    STAGES,
    dependents,
    stages_needed,
)
from agriland_scale.pipeline.outdir import OUTPUT_PATTERNS, is_output
from agriland_scale.pipeline.stages import STAGE_FUNCTIONS


def test_every_stage_has_one_row_a_function_and_reads_only_earlier_stages():
    assert STAGES == tuple(STAGE_FUNCTIONS) == tuple(s.name for s in STAGE_TABLE)
    for i, row in enumerate(STAGE_TABLE):
        assert set(row.reads) <= set(STAGES[:i]), row.name  # a run in table order has its inputs
        assert row.summary and row.settings
    assert len(set(GROUPS.values())) == len(GROUPS)  # one product group a stage
    assert MODEL_STAGES == {"cae", "embeddings", "unet", "segmentation"}
    assert DEPENDS["publish"] == ("clusters", "segmentation") and STAGE_SETTINGS["clusters"] == (
        "cluster",
        "seed",
    )


def test_the_derived_rules_follow_the_table():
    """--until runs what a stage reads, --force redoes what reads it, and the files a stage
    writes are the run's (a user's file beside them is not)."""
    assert stages_needed("segmentation") == ["search", "cube", "unet", "segmentation"]
    assert dependents({"cae"}) == {"cae", "embeddings", "clusters", "publish"}
    assert OUTPUT_PATTERNS == tuple(p for row in STAGE_TABLE for p in row.files)
    assert is_output("models/unet.keras") and is_output("cog/probability/probability_r000_c000.tif")
    assert not is_output("labels/my_fields.geojson") and not is_output("notes.txt")
