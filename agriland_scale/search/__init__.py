"""Search: Sentinel-2 items on a STAC API, made uniform before loading."""
