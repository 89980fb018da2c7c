"""The base of every section of the run configuration: a frozen pydantic model refusing unknown keys."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

__all__ = ["StrictModel"]


class StrictModel(BaseModel):
    """A config section: unknown keys are refused (a typo is an error, not a default) and it is frozen."""

    model_config = ConfigDict(extra="forbid", frozen=True)
