"""Render a run's ``report.html`` to ``report.png`` with headless Chromium, for review.

Needs Debian's Chromium (``apt-get install chromium``: ``/usr/bin/chromium``). The page is
drawn in a window ``--width`` px wide and ``--height`` px tall (the whole report fits in the
default height; the rest of the window stays white), with the network flags that keep
Chromium from reaching out on a closed machine.

Run: ``python scripts/screenshot_report.py OUT [--width 1280] [--height 9000]``
(writes ``OUT/report.png``; writes ``OUT/report.html`` first when it is missing).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
]


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    sys.exit("no Chromium found: apt-get install chromium")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path, help="output folder of a run")
    ap.add_argument("--width", type=int, default=1280)
    ap.add_argument("--height", type=int, default=9000)
    args = ap.parse_args()
    page = args.out.resolve() / "report.html"
    if not page.is_file():
        from agriland_scale.publish.report import write_report

        write_report(args.out)
    png = args.out.resolve() / "report.png"
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run(
            [
                chromium(),
                *FLAGS,
                f"--user-data-dir={profile}",
                f"--screenshot={png}",
                f"--window-size={args.width},{args.height}",
                page.as_uri(),
            ],
            check=True,
            capture_output=True,
            timeout=120,
        )
    print(png)


if __name__ == "__main__":
    main()
