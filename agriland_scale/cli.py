"""The ``agriland`` command: parses arguments, prints progress and one-paragraph errors."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
import traceback
from pathlib import Path

from agriland_scale.cli_parser import build_parser
from agriland_scale.config.load import load_config
from agriland_scale.config.schema import RuntimeConfig
from agriland_scale.errors import AgrilandError, ConfigError, Terminated
from agriland_scale.terminal import Display, ShownByDisplay

DEMO = Path(__file__).parent / "data" / "demo.yaml"


def _overrides(pairs: list[str]) -> dict:
    import yaml

    out = {}
    for p in pairs or []:
        key, eq, value = p.partition("=")
        if not eq or not key.strip():
            raise ConfigError(f"--set {p[:100]!r} is not KEY=VALUE: write e.g. --set embed.train.epochs=1")
        try:
            out[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError as e:
            raise ConfigError(
                f"--set {key}: the value {value[:100]!r} is not valid YAML ({str(e).splitlines()[0][:100]})"
            ) from None
    return out


def _on_sigterm(signum, frame) -> None:  # noqa: ARG001 - signal handler signature
    raise Terminated()


def _run(pipeline: Path, args: argparse.Namespace, until: str | None = None) -> int:
    from agriland_scale.pipeline.launch import launch_for_run

    cfg = load_config(pipeline, **_overrides(args.set))
    # the run's own LocalCluster starts now, while this process imports the pipeline
    launch = launch_for_run(
        cfg, args.out, until, scheduler=args.scheduler, force=bool(args.force), overwrite=args.overwrite
    )
    show = Display(args.quiet)
    show.line(f"agriland: running '{cfg.name}' from {pipeline} into {args.out}")
    try:
        from agriland_scale.pipeline.runner import run

        rec = run(
            cfg,
            args.out,
            scheduler=args.scheduler,
            overwrite=args.overwrite,
            force=args.force or (),
            until=until,
            report=show.line,
            progress=show,
            command=f"agriland {args.command}",
            launch=launch,
        )
    finally:
        show.close()
        if launch is not None:
            launch.close()
    result: dict = {
        "out": str(args.out),
        "name": cfg.name,
        "stages": rec.get("stages"),
        "timings_s": {k: round(v, 1) for k, v in rec["timings_s"].items()},
        "patches": rec.get("patches"),
        "dashboard": rec.get("dashboard"),
    }
    if until == "cae":
        enc = result["encoder"] = rec["cae"]["encoder_path"]
        show.line(
            f"CAE encoder: {enc} (sidecar {enc}.json); embed other regions with it by setting "
            f"embed.model: {enc}"
        )
    elif until == "unet":
        path = result["unet"] = rec["unet"]["model_path"]
        result["validation_metrics"] = rec["unet"].get("validation_metrics")
        show.line(
            f"U-Net: {path} (sidecar {path}.json), validation {rec['unet'].get('validation_metrics')}; "
            f"map other regions with it by setting segment.model: {path}"
        )
    products = rec.get("products") or {}
    if products:
        result["products"] = {k: products.get(k) for k in ("zarr", "cogs", "report", "stac")}
    print(json.dumps(result, indent=1))  # the result, on stdout: `agriland run ... | jq .timings_s`
    return 0


def _search(args: argparse.Namespace) -> int:
    from agriland_scale.cube.describe import describe_search
    from agriland_scale.search.stac import api_url, region_of, search_items

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
        print(
            f"{zone}: {z['items']} item(s), {z['dates']} date(s), grid {z['shape'][0]} x {z['shape'][1]} px "
            f"at {cfg.cube.resolution:g} m = {z['pixels']:,} px; reads ~{z['source_bytes'] / 2**20:,.0f} MiB "
            f"({len(info['bands'])} bands), composite {z['composite_bytes'] / 2**20:,.0f} MiB"
        )
    return 0


def _plan(args: argparse.Namespace) -> int:
    from agriland_scale.pipeline.plan import format_plan, plan_run
    from agriland_scale.pipeline.throughput import parse_throughput

    cfg = load_config(args.pipeline, **_overrides(args.set))
    plan = plan_run(
        cfg,
        workers=args.workers,
        throughput=parse_throughput(args.throughput),
        measured=args.measured or (),
        scheduler=args.scheduler,
    )
    print(json.dumps(plan, indent=1) if args.json else format_plan(plan))
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from agriland_scale.pipeline.remote import run_folder
    from agriland_scale.publish.inspect import format_summary, summarise_run

    if args.history:
        from agriland_scale.store import history

        versions = history(args.run)
        if args.json:
            print(json.dumps(versions, indent=1, default=str))
            return 0
        print(
            f"{len(versions)} version(s) of the products of {args.run}, newest first; open one with "
            "agriland_scale.open_run(RUN, version=...)"
        )
        for v in versions:
            tags = f" [{', '.join(v['tags'])}]" if v["tags"] else ""
            print(f"{v['version']}  {v['time']}  {v['message']}{tags}")
        return 0
    with run_folder(args.run) as folder:
        summary = summarise_run(folder)
    print(json.dumps(summary, indent=1, default=str) if args.json else format_summary(summary))
    return 0


def _export(args: argparse.Namespace) -> int:
    from agriland_scale.store import export_zarr

    groups = export_zarr(args.run, args.zarr, version=args.version, zarr_format=args.zarr_format)
    print(args.zarr)
    _message(
        args,
        f"{len(groups)} group(s) copied to the plain Zarr v{args.zarr_format} store {args.zarr}: "
        f"{', '.join(groups)}; open one with xarray.open_zarr(DEST, group=G, decode_coords='all')",
    )
    # an export into a local run folder that has a STAC collection: its items get the export
    # as an asset (the collection lists OUT/*.zarr), so the catalog is refreshed now
    run, dest = args.run, Path(str(args.zarr))
    if (
        isinstance(run, Path)
        and (run / "stac" / "collection.json").is_file()
        and dest.parent.resolve() == run.resolve()
    ):
        from agriland_scale.publish.stac import write_stac

        _message(args, f"STAC: {write_stac(run)} lists the export")
    return 0


def _report(args: argparse.Namespace) -> int:
    from agriland_scale.pipeline.remote import run_folder
    from agriland_scale.publish.report import write_report
    from agriland_scale.publish.stac import write_stac

    with run_folder(args.run, "agriland report") as folder:
        report, stac = str(write_report(folder)), str(write_stac(folder))
    if isinstance(args.run, str):  # put back on the object store
        report, stac = f"{args.run}/report.html", f"{args.run}/stac/collection.json"
    print(f"report: {report}")
    print(f"STAC:   {stac}")
    return 0


def _local_out(args: argparse.Namespace, default: str) -> Path:
    """``--out`` of a labels command, or its default in the run folder (a local folder is needed)."""
    from agriland_scale.errors import OutputError

    if args.out is not None:
        return args.out
    if isinstance(args.run, str):
        raise OutputError(
            f"{args.run} is on object storage: give --out, a local path for the {default} "
            "(it is drawn or used on this machine)"
        )
    return args.run / default


def _export_labels(args: argparse.Namespace) -> int:
    from agriland_scale.labels.via import export_via
    from agriland_scale.pipeline.remote import run_folder

    clusters = args.clusters
    out = _local_out(args, "labels/via")
    with run_folder(args.run, "agriland export-labels") as folder:
        project = export_via(folder, out, clusters, overwrite=args.overwrite)
    print(project)  # the result on stdout, the how-to on stderr
    _message(
        args,
        f"VIA project: {project}\nopen it in VGG Image Annotator 2 (via.html), draw polygons with "
        f"the region attribute 'class' = arable / other, save the project, then run:\n"
        f"  agriland import-labels {project} {args.run}",
    )
    return 0


def _import_labels(args: argparse.Namespace) -> int:
    from agriland_scale.labels.via import import_via
    from agriland_scale.pipeline.remote import run_folder
    from agriland_scale.publish.cog import write_cog
    from agriland_scale.store import open_cube

    out = _local_out(args, "labels/via_mask.tif")
    with run_folder(args.run, "agriland import-labels") as folder:
        cube = open_cube(folder)
        mask = import_via(args.via_json, cube)
        out.parent.mkdir(parents=True, exist_ok=True)
        write_cog(mask, out, nodata=255)
    n1, n0 = int((mask.values == 1).sum()), int((mask.values == 0).sum())
    print(out)
    _message(
        args,
        f"label mask {out}: {n1:,} agricultural and {n0:,} other pixels on the cube grid "
        f"({cube.rio.crs}); train on it with segment.labels: {out}",
    )
    return 0


def _message(args: argparse.Namespace, text: str) -> None:
    """Print a message (not a result) on stderr, unless ``-q``."""
    if not args.quiet:
        print(text, file=sys.stderr)


def _log_to_stderr(args: argparse.Namespace) -> bool:
    """Log on stderr: warnings; errors only with ``-q``, the run log with ``-v``, debug with ``--debug``.

    The run log's own lines (``agriland_scale.run``) never reach stderr through logging: a
    run's :class:`~agriland_scale.terminal.Display` prints each of them already, so ``-v``
    shows every line once. With ``-q`` the stderr handler takes errors only and Python's
    warnings go through logging (to the run's log file, not to stderr) until :func:`main`
    returns: the function returns True then.
    """
    # a log file on a disk that filled up or turned read-only must not print a traceback of
    # its own ("--- Logging error ---"): the run's error says what happened
    logging.raiseExceptions = bool(args.debug)
    level = logging.DEBUG if args.debug else logging.INFO if args.verbose else logging.WARNING
    shown = logging.ERROR if args.quiet and not args.debug else level
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    for h in logging.getLogger().handlers:  # the run's INFO lines go to its log file, not here
        h.setLevel(shown)
        terminal = type(h) is logging.StreamHandler  # basicConfig's, on stderr (not a file's, not pytest's)
        if terminal and not any(isinstance(f, ShownByDisplay) for f in h.filters):
            h.addFilter(ShownByDisplay())
    if args.verbose:
        logging.getLogger("agriland_scale").setLevel(logging.INFO)
    if shown == logging.ERROR:
        logging.captureWarnings(True)
        return True
    return False


def main(argv: list[str] | None = None) -> int:
    """Run the ``agriland`` command line.

    Parameters
    ----------
    argv : list of str, optional
        The arguments after the program name; ``sys.argv[1:]`` when None.

    Returns
    -------
    int
        The process exit status (0 on success).
    """
    parser = build_parser()
    if "_ARGCOMPLETE" in os.environ:  # shell completion (eval "$(register-python-argcomplete agriland)")
        try:
            import argcomplete
        except ImportError:  # optional: completion needs `pip install argcomplete`
            pass
        else:
            argcomplete.autocomplete(parser)
    args = parser.parse_args(argv)
    if args.quiet and args.verbose:
        parser.error(
            "-q/--quiet (errors only) and -v/--verbose (the run log too) exclude each other: give one"
        )
    if not args.debug:  # dask's own loggers (here and in worker processes) stay quiet: a failing
        # task reaches the user as one paragraph below, not as a worker's "Compute Failed" traceback
        os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "critical")
        import dask

        dask.config.set({"logging.distributed": os.environ["DASK_LOGGING__DISTRIBUTED"]})
    warnings_logged = _log_to_stderr(args)
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if main_thread else None  # like Ctrl-C, exit 143
    try:
        return _dispatch(args)
    except BrokenPipeError:
        # the reader of stdout went away (`agriland inspect DIR --json | head -1`): quietly, with
        # the code a shell gives a command killed by SIGPIPE; stdout to devnull so that
        # Python's own flush at exit does not complain again
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE
    finally:
        if warnings_logged:
            logging.captureWarnings(False)
        if main_thread:
            signal.signal(signal.SIGTERM, previous)


def _dispatch(args: argparse.Namespace) -> int:
    """Run the parsed command; errors become one paragraph on stderr and an exit code."""
    try:
        if args.command == "demo":
            return _run(DEMO, args)
        if args.command == "run":
            return _run(args.pipeline, args, until=args.until)
        if args.command in ("train-cae", "train-unet"):
            return _run(args.pipeline, args, until=args.command.removeprefix("train-"))
        if args.command == "search":
            return _search(args)
        if args.command == "cluster":
            from agriland_scale.pipeline.serve import given_models, serve_cluster

            cfg = load_config(args.pipeline) if args.pipeline else None
            serve_cluster(
                cfg.runtime if cfg else RuntimeConfig(),
                args.port,
                models=given_models(cfg) if cfg else None,
                report=lambda line: print(line, flush=True),
            )
            return 0
        handlers = {
            "inspect": _inspect,
            "plan": _plan,
            "export": _export,
            "report": _report,
            "export-labels": _export_labels,
            "import-labels": _import_labels,
        }
        if args.command in handlers:
            return handlers[args.command](args)
        if args.command == "validate":
            from agriland_scale.config.files import check_input_files

            cfg = load_config(args.pipeline)
            check_input_files(cfg)
            if not args.quiet:  # -q: the exit status says it
                print(f"{args.pipeline}: valid ('{cfg.name}')")
            return 0
    except AgrilandError as e:
        if args.debug:
            traceback.print_exc()
        print(f"agriland: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        raise
    except KeyboardInterrupt as e:
        term = isinstance(e, Terminated)
        print(
            f"agriland: {'terminated (SIGTERM)' if term else 'interrupted'}: finished work is kept; "
            "rerunning the same command continues where it stopped",
            file=sys.stderr,
        )
        return 143 if term else 130
    except Exception as e:  # noqa: BLE001 - an unexpected failure: one paragraph, not a traceback
        if args.debug:
            traceback.print_exc()
            return 1
        from agriland_scale.faults import storage_fault

        fault = storage_fault(e, getattr(args, "out", None) or getattr(args, "run", None))
        if fault is not None:  # a full disk, a folder turned read-only, a lost object store
            print(f"agriland: error: {fault}", file=sys.stderr)
            return 2
        where = ""
        tb = traceback.extract_tb(e.__traceback__)
        if tb:
            where = f" (in {Path(tb[-1].filename).name}:{tb[-1].lineno}, {tb[-1].name})"
        log_hint = ""
        out = getattr(args, "out", None)
        if out is not None and (Path(out) / "logs").is_dir():
            log_hint = f"; the run's log is in {Path(out) / 'logs'}"
        msg = str(e) if len(str(e)) <= 400 else str(e)[:400] + " ..."
        print(
            f"agriland: unexpected error: {type(e).__name__}: {msg}{where}. Nothing finished is lost: "
            f"rerunning the same command continues where it stopped. Rerun with --debug for the "
            f"traceback{log_hint}, and report it if it persists.",
            file=sys.stderr,
        )
        return 1
    return 1


if __name__ == "__main__":  # python -m agriland_scale.cli; the console script is agriland_scale.__main__
    sys.exit(main())
