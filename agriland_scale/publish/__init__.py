"""Publishing a run: COGs, field polygons, output STAC, figures, report and run inspection."""
