"""The ``equiray`` command line: one front for the library's data tools and every Ray pipeline.

The pipeline commands are built from :mod:`equiray_pipelines.catalog` (config class, run function, help, options); the
data, models, submit and jobs commands and ``serve stop`` are written here. The CLI is a leaf: it imports the
pipelines, nothing but the packages' ``__main__`` entry points imports it.

User mistakes (a bad config key, a missing file, a corrupt image, no cluster at RAY_ADDRESS) print one
``error: ...`` line and exit with status 2; no traceback.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

from equiray.config import to_dict
from equiray.errors import EquirayError
from equiray_pipelines import jobs, serve
from equiray_pipelines._ray import leave_ray
from equiray_pipelines.catalog import ALIASES, CATALOG, GROUPS, PIPELINES, Option, Pipeline

EPILOG = """\
examples:
  equiray demo                                   # the whole chain at demo scale, with a report
  equiray data prepare fashion-mnist --out data/fashion-mnist
  equiray data info data/fashion-mnist
  equiray pretrain --config configs/pretrain.yaml --set train.epochs=2
  equiray ensemble train --config configs/ensemble.yaml
  equiray ensemble eval --config configs/ensemble.yaml [--select-by nfn]
  equiray distill --config configs/distill.yaml
  equiray canon sweep --config configs/canon.yaml
  equiray ftp tune --config configs/ftp.yaml [--resume]
  equiray nfn zoo --config configs/nfn_zoo.yaml
  equiray nfn train --config configs/nfn_train.yaml
  equiray serve run --model models:/equiray-ensemble@champion   # HTTP endpoint (Ray Serve), Ctrl+C stops
  equiray models list
  equiray models export --format onnx --out robust.onnx        # the robust champion for onnxruntime
  equiray submit jobs/pretrain.yaml --follow       # a job spec to the cluster at RAY_ADDRESS (or --address)
  equiray jobs list | status ID | logs ID [--follow] | stop ID

Ray: a local instance is started unless RAY_ADDRESS names a cluster.
MLflow: sqlite:///./mlflow.db unless MLFLOW_TRACKING_URI is set; browse with
  mlflow ui --backend-store-uri sqlite:///mlflow.db
"""


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", metavar="FILE",
                   help="YAML config; unknown keys are rejected (default: built-in defaults)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config value, e.g. --set train.epochs=2 (repeatable)")
    p.add_argument("--report-dir", default="reports", help="where plots and the report go (default: reports)")
    p.add_argument("--print-config", action="store_true",
                   help="print the resolved config (defaults, --config, --set and the options above) as YAML and "
                        "exit without running")


def _add_option(p: argparse.ArgumentParser, opt: Option) -> None:
    if opt.switch:
        p.add_argument(opt.flag, dest=opt.dest, action="store_true", help=opt.help)
    else:
        p.add_argument(opt.flag, dest=opt.dest, type=opt.type, choices=opt.choices, metavar=opt.metavar,
                       help=opt.help)


def _add_pipeline(sub, word: str, p: Pipeline, *, hidden: bool = False) -> None:
    """``word``'s parser under ``sub`` runs ``p``; a hidden one (an old spelling) is left out of the listing."""
    kw = {"description": p.description or p.help}
    if p.epilog:
        kw.update(epilog=p.epilog, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser = sub.add_parser(word, **kw) if hidden else sub.add_parser(word, help=p.help, **kw)
    _add_config_args(parser)
    for opt in p.options:
        _add_option(parser, opt)
    parser.set_defaults(pipeline=p)


def _add_pipelines(sub) -> dict[str, tuple[argparse.ArgumentParser, argparse._SubParsersAction]]:
    """One subcommand per catalog entry, a several-word command under its group; then the hidden old spellings.
    Returns the groups: word -> (its parser, its actions)."""
    groups: dict[str, tuple[argparse.ArgumentParser, argparse._SubParsersAction]] = {}

    def group(word: str, text: str | None):
        if word not in groups:
            gp = sub.add_parser(word, help=text) if text else sub.add_parser(word)
            groups[word] = gp, gp.add_subparsers(dest="action", metavar="ACTION")
        return groups[word][1]

    for p in CATALOG:
        *first, action = p.words
        _add_pipeline(group(first[0], GROUPS[first[0]]) if first else sub, action, p)
    for alias, command in ALIASES.items():
        *first, action = alias.split()
        _add_pipeline(group(first[0], None) if first else sub, action, PIPELINES.get(command), hidden=True)
    return groups


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="equiray", description="Make pretrained image models robust to rotations, reflections and "
        "distribution shift, at cluster scale (Ray + MLflow).", epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-V", "--version", action="version", version=f"equiray {_version()}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    groups = _add_pipelines(sub)
    _add_serve_stop(groups["serve"][1])
    for word, (gp, actions) in groups.items():
        gp.set_defaults(missing=f"choose an action: equiray {word} {' | '.join(actions.choices)} "
                        f"(see equiray {word} --help)")
    _add_data(sub)
    _add_cluster(sub)
    models = sub.add_parser("models", help="list model names")
    models.set_defaults(handler=_cmd_models)
    msub = models.add_subparsers(dest="models_command", metavar="ACTION")
    ml = msub.add_parser("list", help="equiray's own models (and timm's with --timm PATTERN)")
    ml.add_argument("--timm", metavar="PATTERN", help="also list timm models matching PATTERN, e.g. 'resnet*'")
    me = msub.add_parser(
        "export", help="a registered model as an ONNX or TorchScript file, checked against PyTorch",
        description="Trace a registered model (its logits; the registered softmax temperature, classes and input "
        "shape go with it as metadata) to ONNX (opset 17, for onnxruntime, TensorRT, ...) or TorchScript (libtorch), "
        "then run the file on test images, upright and at a random pose, beside the PyTorch model: it is kept only "
        "if their probabilities agree within the tolerance.")
    me.add_argument("--model", default="models:/equiray-robust@champion",
                    help="registry URI (default models:/equiray-robust@champion)")
    me.add_argument("--format", required=True, choices=("onnx", "torchscript"))
    me.add_argument("--out", required=True, metavar="FILE", help="where to write it, e.g. robust.onnx")
    me.add_argument("--images", type=int, default=256, help="test images checked, each upright and turned (256)")
    me.add_argument("--tolerance", type=float, default=1e-4,
                    help="largest difference of probabilities allowed (default 1e-4)")
    comp = sub.add_parser(
        "completion", help="print a shell completion script (bash, zsh, tcsh)",
        description="Print a completion script for equiray's commands, actions and options (files for --config, "
        "--out and job specs). It is static, so a TAB answers at once, not after equiray's imports.",
        epilog="examples:\n  eval \"$(equiray completion bash)\"     # this shell; add it to ~/.bashrc to keep it\n"
        "  equiray completion bash > ~/.local/share/bash-completion/completions/equiray\n"
        "  equiray completion zsh > ~/.zfunc/_equiray          # a folder on $fpath",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    comp.add_argument("shell", choices=SHELLS)
    comp.set_defaults(handler=_cmd_completion)
    return parser


SHELLS = ("bash", "zsh", "tcsh")
FILE_OPTIONS = ("--config", "--out", "--report-dir")  # options whose value is a path: completed as files


def _cmd_completion(args) -> int:
    import shtab

    parser = build_parser()
    for action in _all_actions(parser):
        if set(action.option_strings) & set(FILE_OPTIONS) or action.dest in ("spec", "dir"):
            action.complete = shtab.DIRECTORY if action.dest in ("dir", "report_dir") else shtab.FILE
    sys.stdout.write(shtab.complete(parser, shell=args.shell))
    return 0


def _all_actions(parser: argparse.ArgumentParser):
    """Every argument of ``parser`` and of its subcommands, depth first."""
    for action in parser._actions:
        yield action
        if isinstance(action, argparse._SubParsersAction):
            for child in dict.fromkeys(action.choices.values()):  # an alias maps to the same parser
                yield from _all_actions(child)


def _add_serve_stop(serve_actions) -> None:
    sstop = serve_actions.add_parser(
        "stop", help="delete a detached endpoint on the cluster at RAY_ADDRESS",
        description="Delete the Serve application (default: equiray) from the Ray cluster at RAY_ADDRESS; with "
        "--all, shut Serve down there.")
    sstop.add_argument("--app", default="equiray", help="application name (default: equiray)")
    sstop.add_argument("--all", action="store_true", help="shut down Serve entirely")
    sstop.set_defaults(handler=_cmd_serve_stop)


def _add_data(sub) -> None:
    data = sub.add_parser("data", help="prepare and inspect datasets (Parquet shards)")
    data.set_defaults(handler=_cmd_data)
    dsub = data.add_subparsers(dest="data_command", metavar="ACTION")
    prep = dsub.add_parser("prepare", help="write a source as Parquet shards",
                           description="Load SOURCE (fashion-mnist, digits, mnist, cifar10, folder:PATH) and write "
                           "train/val/test Parquet shards under --out, atomically. A second run with the same "
                           "options does nothing.")
    prep.add_argument("source", help="fashion-mnist | digits | mnist | cifar10 | folder:PATH")
    prep.add_argument("--out", required=True, help="output directory")
    prep.add_argument("--download", action="store_true", help="allow downloading the source (torchvision)")
    prep.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    prep.add_argument("--cache-dir", default=".cache/equiray", help="raw files (default: .cache/equiray)")
    prep.add_argument("--val-fraction", type=float, default=0.1, help="share of train held out for validation")
    prep.add_argument("--test-fraction", type=float, default=0.15, help="test share for sources without a test split")
    prep.add_argument("--seed", type=int, default=0, help="seed of the split permutation")
    prep.add_argument("--size", type=int, help="folder sources: resize images to SIZE x SIZE")
    prep.add_argument("--channels", type=int, choices=(1, 3), help="folder sources: 1 = grayscale, 3 = RGB")
    prep.add_argument("--max-per-split", type=int, help="keep only the first N rows of each split")
    prep.add_argument("--rows-per-shard", type=int, default=10_000, help="rows per Parquet file")
    info = dsub.add_parser("info", help="print a prepared dataset's metadata and schema")
    info.add_argument("dir")


def _add_cluster(sub) -> None:
    """``submit`` and ``jobs``: Ray's Job Submission API."""
    sub_ = sub.add_parser("submit", help="submit a job spec (jobs/*.yaml) to a Ray cluster",
                          description="Submit a job spec to the Ray cluster at --address (default: RAY_ADDRESS, "
                          "else http://127.0.0.1:8265, where `ray dashboard cluster.yaml` forwards the head's "
                          "dashboard) through Ray's Job Submission API. The working directory is uploaded with "
                          "the job; the spec's config files are checked before anything is sent. Prints the job "
                          "id and how to follow it.")
    sub_.set_defaults(handler=_cmd_submit)
    sub_.add_argument("spec", help="a job spec, e.g. jobs/ensemble.yaml")
    _add_address(sub_)
    sub_.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                      help="set an environment variable of the job (repeatable; wins over the spec's env_vars)")
    sub_.add_argument("--follow", "--wait", dest="follow", action="store_true",
                      help="print the job's log until it ends; exit 1 if it did not succeed")

    jobs_ = sub.add_parser("jobs", help="the jobs on a Ray cluster: list, status, logs, stop")
    jobs_.set_defaults(handler=_cmd_jobs)
    jsub = jobs_.add_subparsers(dest="jobs_command", metavar="ACTION")
    jl = jsub.add_parser("list", help="every job the cluster knows, newest first")
    _add_address(jl)
    for action, text in (("status", "a job's status and message"), ("logs", "a job's log"),
                         ("stop", "stop a running job")):
        jp = jsub.add_parser(action, help=text)
        jp.add_argument("job_id", metavar="ID")
        _add_address(jp)
        if action == "logs":
            jp.add_argument("--follow", "-f", action="store_true", help="keep printing until the job ends")
        if action == "stop":
            jp.add_argument("--wait", action="store_true", help="wait until the job has stopped")


def _add_address(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", metavar="URL",
                   help="the cluster's dashboard (default: RAY_ADDRESS, else http://127.0.0.1:8265)")


def _version() -> str:
    from equiray import __version__

    return __version__


def _setup_logging(verbose: bool) -> None:
    from equiray_pipelines.progress import LineHandler

    handler = LineHandler(sys.stderr)  # a log line above the progress bars on a terminal, not through them
    handler.setFormatter(logging.Formatter("%(message)s"))
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, handlers=[handler])
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "DEBUG" if verbose else "WARNING")  # mlflow reads it on import
    for noisy in ("alembic", "mlflow", "urllib3", "filelock", "ray", "timm", "matplotlib", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _cmd_pipeline(p: Pipeline, args) -> int:
    """Load ``p``'s config (``--config``, ``--set``, then its own options), run it, print its result: the table,
    the verdict, the plots, then the result's scalar fields as JSON."""
    overrides, kwargs = list(args.overrides), {}
    for opt in p.options:
        given = getattr(args, opt.dest)
        if given is None or given is False or given == "":
            continue
        value = opt.value if opt.switch else given
        if opt.sets:
            overrides.append(f"{opt.sets}={value}")
        else:
            kwargs[opt.kwarg] = value
    cfg = p.load_config(args.config, overrides)
    if args.print_config:
        import yaml

        print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
        return 0
    result = p.run(cfg, report_dir=args.report_dir, **kwargs)
    if not p.prints:
        return 0
    if result.table:
        print(result.table)
        print("\n".join(result.verdict))
    for plot in result.plots:
        print(f"plot: {plot}")
    print(json.dumps(result.summary(), indent=2, default=str))
    return 0


def _cmd_serve_stop(args) -> int:
    serve.stop(None if args.all else args.app)
    return 0


def _cmd_data(args) -> int:
    from equiray.data import SourceOptions, prepare, read_meta, split_files, split_summary

    if args.data_command == "prepare":
        opts = SourceOptions(cache_dir=Path(args.cache_dir), download=args.download, val_fraction=args.val_fraction,
                             test_fraction=args.test_fraction, seed=args.seed, size=args.size,
                             channels=args.channels, max_per_split=args.max_per_split)
        meta = prepare(args.source, args.out, options=opts, overwrite=args.overwrite,
                       rows_per_shard=args.rows_per_shard)
        print(f"{args.source} -> {args.out}: " + ", ".join(f"{s} {n}" for s, n in meta["rows"].items()) +
              f" rows of shape {tuple(meta['shape'])} (H, W, C), {meta['num_classes']} classes")
        return 0
    if args.data_command == "info":
        import pyarrow.parquet as pq

        meta = read_meta(args.dir)
        shards = split_summary(args.dir)  # every shard's footer, and the rows against the metadata
        print(json.dumps(meta, indent=2))
        for split, (rows, n) in shards.items():
            print(f"{split} {rows} rows in {n} shard{'' if n == 1 else 's'}")
        print(pq.read_schema(split_files(args.dir, "train")[0]).to_string(show_schema_metadata=False))
        return 0
    raise EquirayError("choose an action: equiray data prepare | info (see equiray data --help)")


def _cmd_models(args) -> int:
    from equiray.models import list_models

    if not args.models_command:
        raise EquirayError("choose an action: equiray models list | export")
    if args.models_command == "export":
        from equiray_pipelines.export import export

        export(args.model, args.out, format=args.format, images=args.images, tolerance=args.tolerance)
        return 0
    names = list_models()
    if args.timm:
        import timm

        names += timm.list_models(args.timm)
    print("\n".join(names))
    return 0


def _follow(job_id: str, address: str | None) -> int:
    """Print the job's log until it ends; 0 if it succeeded, 1 otherwise."""
    try:
        for chunk in jobs.follow_logs(job_id, address=address):
            sys.stdout.write(chunk)
            sys.stdout.flush()
    except KeyboardInterrupt:
        print(f"\nstopped following; the job keeps running (equiray jobs stop {job_id})", file=sys.stderr)
        return 130
    info = jobs.wait(job_id, address=address)
    status = jobs.status_name(info)
    print(f"job {job_id}: {status}" + (f" ({info.message})" if status != "SUCCEEDED" and info.message else ""),
          file=sys.stderr)
    return 0 if status == "SUCCEEDED" else 1


def _cmd_submit(args) -> int:
    env = {}
    for item in args.env:
        if "=" not in item:
            raise EquirayError(f"--env {item!r} must look like KEY=VALUE")
        key, value = item.split("=", 1)
        env[key] = value
    spec = jobs.load_job_spec(args.spec)
    job_id = jobs.submit(spec, address=args.address, env=env)
    where = f" --address {args.address}" if args.address else ""
    print(f"submitted {spec.name} as job {job_id} to {jobs.resolve_address(args.address)}")
    if not args.follow:
        print(f"follow it:  equiray jobs logs {job_id} --follow{where}\n"
              f"status:     equiray jobs status {job_id}{where}\n"
              f"stop it:    equiray jobs stop {job_id}{where}")
        return 0
    return _follow(job_id, args.address)


def _cmd_jobs(args) -> int:
    if args.jobs_command == "list":
        rows = jobs.list_jobs(address=args.address)
        where = f"{jobs.resolve_address(args.address)} ({jobs.address_origin(args.address)})"
        if not rows:
            print(f"no jobs on {where}")
            return 0
        print(f"jobs on {where}")
        print(f"{'ID':<46} {'STATUS':<10} {'STARTED':<19} ENTRYPOINT")
        for j in rows:
            started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(j.start_time / 1000)) if j.start_time else "-"
            entry = " ".join(j.entrypoint.split())
            print(f"{j.submission_id or j.job_id:<46} {jobs.status_name(j):<10} {started:<19} "
                  f"{entry[:80] + ('...' if len(entry) > 80 else '')}")
        return 0
    if args.jobs_command == "status":
        info = jobs.job_info(args.job_id, address=args.address)
        print(f"{args.job_id}: {jobs.status_name(info)}")
        if info.message:
            print(f"message: {info.message}")
        print(f"entrypoint: {' '.join(info.entrypoint.split())}")
        if info.start_time:
            end = info.end_time / 1000 if info.end_time else time.time()
            print(f"running time: {end - info.start_time / 1000:.0f} s")
        return 0
    if args.jobs_command == "logs":
        if args.follow:
            return _follow(args.job_id, args.address)
        sys.stdout.write(jobs.job_logs(args.job_id, address=args.address))
        return 0
    if args.jobs_command == "stop":
        if not jobs.stop(args.job_id, address=args.address):
            info = jobs.job_info(args.job_id, address=args.address)
            print(f"job {args.job_id} had already ended: {jobs.status_name(info)}")
            return 0
        print(f"stop requested for job {args.job_id}")
        if args.wait:
            print(f"job {args.job_id}: {jobs.status_name(jobs.wait(args.job_id, address=args.address))}")
        return 0
    raise EquirayError("choose an action: equiray jobs list | status ID | logs ID | stop ID")


def main(argv: list[str] | None = None) -> int:
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    if not args.command:
        parser.print_help()
        return 2
    _setup_logging(args.verbose)
    try:
        if getattr(args, "pipeline", None) is not None:
            return _cmd_pipeline(args.pipeline, args)
        if getattr(args, "handler", None) is not None:
            return args.handler(args)
        raise EquirayError(args.missing)
    except EquirayError as exc:
        leave_ray()
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:  # a stage may say what to do next (e.g. resume with --resume)
        leave_ray()
        print(f"interrupted: {exc}" if str(exc) else "interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
