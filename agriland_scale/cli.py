"""The ``agriland`` command: parses arguments, prints progress and one-paragraph errors."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import traceback
from pathlib import Path

from .config import load_config
from .errors import AgrilandError

DEMO = Path(__file__).parent / "data" / "demo.yaml"


def _overrides(pairs: list[str]) -> dict:
    import yaml

    out = {}
    for p in pairs or []:
        key, _, value = p.partition("=")
        out[key] = yaml.safe_load(value)
    return out


def _run(pipeline: Path, args: argparse.Namespace) -> int:
    from .pipeline import run

    cfg = load_config(pipeline, **_overrides(args.set))
    print(f"agriland: running '{cfg.name}' from {pipeline} into {args.out}", flush=True)
    rec = run(cfg, args.out, scheduler=args.scheduler, overwrite=args.overwrite,
              report=lambda line: print(line, flush=True))
    print(json.dumps({"timings_s": {k: round(v, 1) for k, v in rec["timings_s"].items()},
                      "patches": rec.get("patches"), "dashboard": rec.get("dashboard")}, indent=1))
    return 0


def _search(args: argparse.Namespace) -> int:
    from .stac import api_url, describe_search, region_of, search_items

    cfg = load_config(args.pipeline)
    with api_url(cfg.search) as url:
        items = search_items(cfg.search, url)
    info = describe_search(items, cfg.cube.bands, region_of(cfg.search), cfg.cube.resolution)
    if args.json:
        print(json.dumps(info, indent=1))
        return 0
    where = list(cfg.search.bbox) if cfg.search.bbox else cfg.search.region
    print(f"{len(items)} item(s) in {cfg.search.collections} over {where}")
    print(f"{'id':<44} {'datetime':<26} {'cloud %':>7} {'tile':<7} {'EPSG':>6}")
    for r in info["items"]:
        cc = "" if r["cloud_cover"] is None else f"{r['cloud_cover']:.1f}"
        print(f"{r['id']:<44} {r['datetime']:<26} {cc:>7} {str(r['tile'] or ''):<7} {str(r['epsg']):>6}")
    for zone, z in info["zones"].items():
        if "error" in z:
            print(f"{zone}: {z['items']} item(s); {z['error']}")
            continue
        print(f"{zone}: {z['items']} item(s), {z['dates']} date(s), grid {z['shape'][0]} x {z['shape'][1]} px "
              f"at {cfg.cube.resolution:g} m = {z['pixels']:,} px; reads ~{z['source_bytes'] / 2**20:,.0f} MiB "
              f"({len(info['bands'])} bands), composite {z['composite_bytes'] / 2**20:,.0f} MiB")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="agriland", description=__doc__)
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    sub = parser.add_subparsers(dest="command", required=True)

    def run_opts(p: argparse.ArgumentParser) -> None:
        p.add_argument("--out", required=True, type=Path, help="output folder of the run")
        p.add_argument("--scheduler", help="address of an existing Dask scheduler (tcp://host:8786)")
        p.add_argument("--overwrite", action="store_true", help="replace another run in --out")
        p.add_argument("--set", action="append", metavar="KEY=VALUE",
                       help="override a config value, e.g. --set embed.train.epochs=1")

    p_demo = sub.add_parser("demo", help="run the whole pipeline on the embedded demo region (offline)")
    run_opts(p_demo)
    p_run = sub.add_parser("run", help="run a pipeline file")
    p_run.add_argument("pipeline", type=Path)
    run_opts(p_run)
    p_search = sub.add_parser("search", help="list what a run would load, without loading pixels")
    p_search.add_argument("pipeline", type=Path)
    p_search.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p_val = sub.add_parser("validate", help="check a pipeline file and name the wrong key")
    p_val.add_argument("pipeline", type=Path)

    args = parser.parse_args(argv)
    if not args.debug:  # dask's own loggers (here and in worker processes) stay quiet
        os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "error")
        import dask

        dask.config.set({"logging.distributed": "error"})
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "demo":
            return _run(DEMO, args)
        if args.command == "run":
            return _run(args.pipeline, args)
        if args.command == "search":
            return _search(args)
        if args.command == "validate":
            cfg = load_config(args.pipeline)
            print(f"{args.pipeline}: valid ('{cfg.name}')")
            return 0
    except AgrilandError as e:
        if args.debug:
            traceback.print_exc()
        print(f"agriland: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("agriland: interrupted", file=sys.stderr)
        return 130
    return 1


if __name__ == "__main__":
    sys.exit(main())
