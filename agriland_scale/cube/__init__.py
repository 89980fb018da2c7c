"""The Sentinel-2 cube: asset reading, cloud masks, compositing and lazy loading to Zarr."""
