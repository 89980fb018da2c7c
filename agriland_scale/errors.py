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
    "IgnoredRegion",
    "CorruptInput",
    "EmptyRegion",
    "LabelError",
    "LeaseLost",
    "MissingDependency",
    "ModelMismatch",
    "NoItemsFound",
    "OutputError",
    "OutputExists",
    "RunLocked",
    "RegionError",
    "STACServerError",
    "SchedulerError",
    "StageNotBuilt",
    "Terminated",
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
    """The output folder holds another run's products, or files that are not a run's."""


class OutputError(AgrilandError, OSError):
    """The output folder cannot be used: it is a file, read-only, or its run record is damaged."""


class RunLocked(AgrilandError, BlockingIOError):
    """Another process (named in the message) is writing to the same output folder."""


class LeaseLost(RunLocked):
    """Another run took over an object-storage output after this run's lease was not refreshed.

    The run stops at once; what it had put on the store before is kept.
    """


class ModelMismatch(AgrilandError, ValueError):
    """A model file is not the kind of model a stage needs (task, output shape, patch size)."""


class LabelError(AgrilandError, ValueError):
    """Training labels cannot train a model: no positive or no negative pixel, wrong grid."""


class BlockFailed(AgrilandError, RuntimeError):
    """One block (chunk row, patch batch) of a stage failed; the blocks written are kept."""


class MissingDependency(AgrilandError, ImportError):
    """An optional package a stage needs (TensorFlow, s2cloudless...) is not installed."""


class StageNotBuilt(AgrilandError, NotImplementedError):
    """A requested option exists in the design but is not implemented yet."""


class Terminated(KeyboardInterrupt):
    """The process received SIGTERM: handled like Ctrl-C.

    The stage is recorded as interrupted, finished work is kept, and the command exits
    with 143.
    """


class AgrilandWarning(UserWarning):
    """Base class of warnings users can filter with ``warnings.filterwarnings``."""


class IgnoredRegion(AgrilandWarning):
    """A VIA region whose shape cannot hold an area (polyline, point) was skipped."""
