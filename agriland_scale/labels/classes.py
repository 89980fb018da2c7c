"""The values of a label raster (uint8, on the cube grid)."""

__all__ = ["AGRICULTURAL", "IGNORE", "OTHER"]

OTHER = 0  # labelled, not agricultural land
AGRICULTURAL = 1  # labelled agricultural land (one of segment.positive_classes)
IGNORE = 255  # not labelled: no loss, no metric
