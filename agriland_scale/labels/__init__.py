"""Labels on the cube grid: label values, rasterised polygons and rasters, VIA import/export."""
