"""The stages of a run, each a plain function of the run's context: :data:`STAGE_FUNCTIONS`.

``STAGE_FUNCTIONS`` maps each stage name of :data:`~agriland_scale.layout.STAGES` to the
function that does its work: the data stages (:mod:`.data_stages`: search, cube, patches),
the model stages (:mod:`.model_stages`: cae, embeddings, clusters, unet, segmentation) and
publish (:mod:`.publishing`). A stage reads the products of the stages it depends on from the
store, writes its own through ``ctx.products`` (resumable, block by block) and notes what it
found in ``ctx.record``; the runner (:mod:`.runner`) owns status, timing, files and resume.
"""

from __future__ import annotations

from collections.abc import Callable

from agriland_scale.pipeline.context import RunContext
from agriland_scale.pipeline.data_stages import cube_stage, patches_stage, search_stage
from agriland_scale.pipeline.model_stages import (
    cae_stage,
    clusters_stage,
    embeddings_stage,
    segmentation_stage,
    unet_stage,
)
from agriland_scale.pipeline.publishing import publish_stage

__all__ = ["STAGE_FUNCTIONS"]


# the work of each stage, in pipeline order (agriland_scale.layout.STAGES)
STAGE_FUNCTIONS: dict[str, Callable[[RunContext], None]] = {
    "search": search_stage,
    "cube": cube_stage,
    "patches": patches_stage,
    "cae": cae_stage,
    "embeddings": embeddings_stage,
    "clusters": clusters_stage,
    "unet": unet_stage,
    "segmentation": segmentation_stage,
    "publish": publish_stage,
}
