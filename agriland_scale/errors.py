"""Exception and warning hierarchy of agriland-scale.

Every error subclasses :class:`AgrilandError` and the matching built-in, and its message
says what was found, what was expected and what to do about it.
"""

from __future__ import annotations

__all__ = [
    "AgrilandError",
    "AgrilandWarning",
    "BandMismatch",
    "BlockFailed",
    "ConfigError",
    "CorruptInput",
    "EmptyRegion",
    "NoItemsFound",
    "OutputExists",
    "RegionError",
    "STACServerError",
    "SchedulerError",
    "StageNotBuilt",
    "UnknownCollection",
]


class AgrilandError(Exception):
    """Base class of every error raised by agriland-scale."""


class ConfigError(AgrilandError, ValueError):
    """A pipeline file is invalid: the message names the key path and the fix."""


class RegionError(AgrilandError, ValueError):
    """A region (bbox or geometry) is malformed, in the wrong order or the wrong CRS."""


class STACServerError(AgrilandError, ConnectionError):
    """A STAC API could not be started or does not answer."""


class SchedulerError(AgrilandError, ConnectionError):
    """No Dask scheduler answers at the configured address."""


class UnknownCollection(AgrilandError, LookupError):
    """A collection named in the pipeline is not offered by the STAC API."""


class NoItemsFound(AgrilandError, LookupError):
    """A search returned no items, or none of them covers the region."""


class BandMismatch(AgrilandError, ValueError):
    """Bands requested or expected by a model are missing or in another order."""


class EmptyRegion(AgrilandError, ValueError):
    """Every pixel of the region is nodata or masked (cloud, shadow...)."""


class CorruptInput(AgrilandError, OSError):
    """A file (raster, Zarr store, model, labels) cannot be read."""


class OutputExists(AgrilandError, FileExistsError):
    """The output folder holds another run's products."""


class BlockFailed(AgrilandError, RuntimeError):
    """One block (chunk row, patch batch) of a stage failed; the blocks written are kept."""


class StageNotBuilt(AgrilandError, NotImplementedError):
    """A requested option exists in the design but is not implemented yet."""


class AgrilandWarning(UserWarning):
    """Base class of warnings users can filter with ``warnings.filterwarnings``."""
