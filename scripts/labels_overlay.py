"""Draw the hand-digitised demo labels over the true-colour composite, for review.

Reads ``agriland_scale/data/virginia/labels.geojson`` (WGS84 lon/lat polygons, property
``class`` = "arable" | "other") and the B04/B03/B02 bands of the same directory, builds a
2-98 percentile stretched RGB composite, and draws every polygon on it: arable in yellow,
other in cyan, each with its ``id``. With ``--nir`` the background is the NIR false colour
composite (B08, B04, B03) instead, which separates crops/grass (bright red) from forest
(dark red). ``--scale N`` upsamples by N (nearest neighbour) and ``--window COL ROW SIZE``
crops a square window in pixel coordinates first, for zoomed checks.

Run: ``python scripts/labels_overlay.py /tmp/labels_overlay.png [--scale 2] [--nir]
[--window 0 0 512]``
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import rasterio
from PIL import Image, ImageDraw
from pyproj import Transformer

DATA = Path(__file__).resolve().parents[1] / "agriland_scale" / "data" / "virginia"
COLOURS = {"arable": (255, 255, 0), "other": (0, 255, 255)}


def stretch(band: np.ndarray) -> np.ndarray:
    valid = band[band > 0]
    lo, hi = np.percentile(valid, [2, 98])
    return np.clip((band.astype(np.float64) - lo) / (hi - lo) * 255, 0, 255).astype(np.uint8)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", help="output PNG path")
    ap.add_argument("--labels", default=str(DATA / "labels.geojson"))
    ap.add_argument("--scale", type=int, default=1, help="integer upsampling factor")
    ap.add_argument("--nir", action="store_true", help="NIR false colour background")
    ap.add_argument("--window", type=int, nargs=3, metavar=("COL", "ROW", "SIZE"))
    ap.add_argument("--grid", type=int, default=0, help="draw a pixel grid every N px (0: none)")
    args = ap.parse_args()

    names = ("B08", "B04", "B03") if args.nir else ("B04", "B03", "B02")
    bands = []
    for name in names:
        with rasterio.open(DATA / f"{name}.tif") as ds:
            bands.append(ds.read(1))
            inv = ~ds.transform
            crs = ds.crs
    img = np.dstack([stretch(b) for b in bands])
    height, width = img.shape[:2]
    col0, row0, size_c, size_r = 0, 0, width, height
    if args.window:
        col0, row0, size = args.window
        size_c, size_r = size, size
        img = img[row0 : row0 + size, col0 : col0 + size]
    s = args.scale
    pil = Image.fromarray(img).resize((img.shape[1] * s, img.shape[0] * s), Image.NEAREST)
    draw = ImageDraw.Draw(pil)

    if args.grid:
        g = args.grid
        for v in range(-(-col0 // g) * g, col0 + size_c + 1, g):
            x = (v - col0) * s
            draw.line([(x, 0), (x, pil.height)], fill=(128, 128, 128))
            draw.text((x + 2, 2), str(v), fill=(255, 255, 0))
        for v in range(-(-row0 // g) * g, row0 + size_r + 1, g):
            y = (v - row0) * s
            draw.line([(0, y), (pil.width, y)], fill=(128, 128, 128))
            draw.text((2, y + 2), str(v), fill=(255, 255, 0))

    to_utm = Transformer.from_crs("EPSG:4326", crs, always_xy=True)
    features = json.loads(Path(args.labels).read_text())["features"]
    counts: dict[str, int] = {}
    for feat in features:
        cls = feat["properties"]["class"]
        counts[cls] = counts.get(cls, 0) + 1
        ring = feat["geometry"]["coordinates"][0]
        pts = []
        for lon, lat in ring:
            x, y = to_utm.transform(lon, lat)
            c, r = inv * (x, y)
            pts.append(((c - col0) * s, (r - row0) * s))
        draw.polygon(pts, outline=COLOURS.get(cls, (255, 0, 255)))
        cx = sum(p[0] for p in pts[:-1]) / (len(pts) - 1)
        cy = sum(p[1] for p in pts[:-1]) / (len(pts) - 1)
        if 0 <= cx < pil.width and 0 <= cy < pil.height:
            draw.text((cx, cy), str(feat["properties"]["id"]), fill=COLOURS.get(cls))
    pil.save(args.out)
    print(f"wrote {args.out} ({pil.width}x{pil.height}); polygons: {counts}")


if __name__ == "__main__":
    main()
