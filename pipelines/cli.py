"""The ``equiray`` command line: one front for the library's data tools and every Ray pipeline.

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

from equiray.errors import EquirayError

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
  equiray tune ftp --config configs/ftp.yaml [--resume]
  equiray nfn zoo --config configs/nfn_zoo.yaml
  equiray nfn train --config configs/nfn_train.yaml
  equiray serve run --model models:/equiray-ensemble@champion   # HTTP endpoint (Ray Serve), Ctrl+C stops
  equiray models list
  equiray submit jobs/pretrain.yaml --follow       # a job spec to the cluster at RAY_ADDRESS (or --address)
  equiray jobs list | status ID | logs ID [--follow] | stop ID

Ray: a local instance is started unless RAY_ADDRESS names a cluster.
MLflow: sqlite:///./mlflow.db unless MLFLOW_TRACKING_URI is set; browse with
  mlflow ui --backend-store-uri sqlite:///mlflow.db
"""

# command -> (module, config class name, function); each function takes (cfg, *, report_dir=..., ...)
PIPELINES = {
    "pretrain": ("pipelines.pretrain", "PretrainConfig", "run"),
    "demo": ("pipelines.demo", "DemoConfig", "run"),
    "ensemble train": ("pipelines.ensemble", "EnsembleConfig", "run_train"),
    "ensemble eval": ("pipelines.ensemble", "EnsembleConfig", "run_eval"),
    "distill": ("pipelines.distill", "DistillConfig", "run"),
    "canon sweep": ("pipelines.canon", "CanonConfig", "run_sweep"),
    "tune ftp": ("pipelines.ftp", "FTPConfig", "run_tune"),
    "nfn zoo": ("pipelines.nfn", "ZooConfig", "run_zoo"),
    "nfn train": ("pipelines.nfn", "NFNTrainConfig", "run_train"),
    "serve run": ("pipelines.serve", "ServeConfig", "run"),
}


def _add_config_args(p: argparse.ArgumentParser, default: str | None = None) -> None:
    p.add_argument("--config", "-c", default=default, metavar="FILE",
                   help="YAML config; unknown keys are rejected" + (f" (default: {default})" if default else
                                                                    " (default: built-in defaults)"))
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config value, e.g. --set train.epochs=2 (repeatable)")
    p.add_argument("--report-dir", default="reports", help="where plots and the report go (default: reports)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="equiray", description="Make pretrained image models robust to rotations, reflections and "
        "distribution shift, at cluster scale (Ray + MLflow).", epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"equiray {_version()}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    demo = sub.add_parser("demo", help="run every stage at demo scale and write a report",
                          description="Prepare Fashion-MNIST, then run every stage at demo scale: pretrain a "
                          "backbone with Ray Train; augmentation ensembles and their invariance vs size; distil them "
                          "into one student; canonicalization variants as Ray Tune trials; a robust fine-tuning search "
                          "(FTP, TPGM, L2-SP); Monomial-NFN metanetworks over a zoo of small CNNs and over the ensemble's "
                          "members; finally serve the ensemble with Ray Serve and send it upright and rotated "
                          "images over HTTP. Every model lands in the MLflow registry; tables and plots go to a "
                          "Markdown report. Choose stages with --set 'stages=[pretrain,canon]'.")
    _add_config_args(demo)
    demo.add_argument("--fresh", action="store_true",
                      help="redo every stage even where the registry already holds its result for this config")

    pre = sub.add_parser("pretrain", help="pretrain a backbone on upright data (Ray Train) and register it",
                         description="Train a backbone (equiray or timm model) on upright data with Ray Train, "
                         "log to MLflow and register it as equiray-backbone@pretrained.")
    _add_config_args(pre)

    ens = sub.add_parser("ensemble", help="augmentation ensembles: train members on Ray Train, measure invariance")
    esub = ens.add_subparsers(dest="ensemble_command", metavar="ACTION")
    etrain = esub.add_parser("train", help="train every setting's members, fanned out over Ray Train workers",
                             description="Train augmentation-ensemble members (Nordenfors & Flinth) in vectorized "
                             "member groups on Ray Train workers, checkpointed every round; log member groups to "
                             "MLflow and register the champion setting's ensemble mean as equiray-ensemble@champion.")
    _add_config_args(etrain)
    eeval = esub.add_parser("eval", help="OSP and symmetric KL vs ensemble size, in and off distribution",
                            description="Measure the members of an `ensemble train` run: OSP, symmetric KL and "
                            "accuracy of the ensemble mean for bootstrapped ensemble sizes, on the test set and on "
                            "another dataset; writes a plot and a table and logs both to the run.")
    _add_config_args(eeval)
    eeval.add_argument("--run-id", help="the `ensemble train` run (default: the latest finished one)")
    eeval.add_argument("--select-by", choices=("none", "nfn"), help="nfn: leave out the members a registered "
                       "metanetwork (eval.nfn_model, default models:/equiray-nfn-members@champion, trained on a zoo of members) predicts weakest "
                       "(eval.drop_fraction) and compare with all members and with random subsets")

    dist = sub.add_parser("distill", help="distil the registered ensemble into one student and register it",
                          description="Train a student (a member architecture or a timm model) to match the "
                          "ensemble mean on group-transformed inputs; report its accuracy, OSP, KL and ms/image next "
                          "to the ensemble's; register it as equiray-student@champion.")
    _add_config_args(dist)

    can = sub.add_parser("canon", help="canonicalization adapters: a grid of variants as Ray Tune trials")
    csub = can.add_subparsers(dest="canon_command", metavar="ACTION")
    sweep = csub.add_parser("sweep", help="train every canonicalizer variant and baseline, register the best",
                            description="Start from the registered backbone and train a grid of canonicalization "
                            "variants (kind x group x prior weight x frozen/fine-tuned backbone) plus the baselines "
                            "(plain fine-tuning, fine-tuning with group augmentation), one Ray Tune trial and one "
                            "MLflow run each; time every model, write a table and a plot, register the best as "
                            "equiray-canon@champion.")
    _add_config_args(sweep)

    tun = sub.add_parser("tune", help="Ray Tune searches: robust fine-tuning (FTP and its baselines)")
    tsub = tun.add_subparsers(dest="tune_command", metavar="SEARCH")
    ftp = tsub.add_parser("ftp", help="search FTP / TPGM / L2-SP / fine-tuning constraints with ASHA + Optuna",
                          description="Fine-tune the registered backbone on a small shifted target set with FTP, "
                          "TPGM, L2-SP or plain fine-tuning; Ray Tune searches the method and its constraints "
                          "(Optuna TPE, or random search without optuna; ASHA early stopping), selecting on ID "
                          "validation accuracy only and reporting OOD accuracy on shifted views. Every trial is "
                          "an MLflow run; the best model is registered as equiray-ftp@champion.")
    _add_config_args(ftp)
    ftp.add_argument("--resume", action="store_true",
                     help="continue the interrupted search of this config (finished trials are not re-run)")

    nfn = sub.add_parser("nfn", help="metanetworks on weights: a model zoo, then Monomial-NFN on it")
    nsub = nfn.add_subparsers(dest="nfn_command", metavar="ACTION")
    zoo = nsub.add_parser("zoo", help="train a zoo of small CNNs with varied hyperparameters on Ray tasks",
                          description="Train many copies of the Small CNN Zoo network (4,970 parameters), each with "
                          "its own optimizer, learning rate, L2, dropout, init scale and training fraction, as Ray "
                          "tasks; write their weights, hyperparameters and test accuracy to Parquet under `out`.")
    _add_config_args(zoo)
    ntrain = nsub.add_parser("train", help="predict each zoo net's accuracy from its weights; Kendall tau",
                             description="Fit metanetworks (Monomial-NFN, STATNN) that predict a zoo net's test "
                             "accuracy from its weights, on the plain zoo and on the zoo with every net's hidden "
                             "units randomly rescaled (same functions); one Ray task per (metanetwork, zoo). Reports "
                             "Kendall tau on held-out nets, logs curves and a predicted-vs-true plot to MLflow and "
                             "registers the champion as equiray-nfn@champion.")
    _add_config_args(ntrain)

    srv = sub.add_parser("serve", help="online serving: a registered model behind an HTTP API (Ray Serve)")
    ssub = srv.add_subparsers(dest="serve_command", metavar="ACTION")
    srun = ssub.add_parser(
        "run", help="serve a registered model over HTTP until Ctrl+C",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Start Ray Serve with a registered equiray model (models:/NAME@ALIAS or models:/NAME/VERSION): "
        "POST /v1/predict takes a PNG/JPEG body, multipart/form-data files or JSON {\"instances\": [...]} and "
        "answers {\"predictions\": [...]} (label, probabilities; an ensemble's member disagreement; a "
        "canonicalizer's group element); GET /v1/model, GET /healthz, /docs. Requests are batched dynamically "
        "(batch.*). Replicas, autoscaling and GPU fractions come from a Serve config file (--serve-config, the "
        "format `serve deploy` takes). Binds 127.0.0.1 unless --host says otherwise. Blocks until Ctrl+C; running "
        "it again (on the cluster at RAY_ADDRESS) or `kill -HUP` on it after promoting another version to the alias "
        "swaps the model in place, without dropping requests.",
        epilog="examples:\n"
        "  equiray serve run --model models:/equiray-ensemble@champion\n"
        "  equiray serve run --model models:/equiray-student@champion --port 8001 --set batch.max_batch_size=64\n"
        "  equiray serve run --config configs/serve.yaml --serve-config configs/serve_app.yaml\n"
        "  curl -s -H 'Content-Type: image/png' --data-binary @image.png http://127.0.0.1:8000/v1/predict")
    _add_config_args(srun)
    srun.add_argument("--model", help="registry URI, e.g. models:/equiray-ensemble@champion (config key `model`)")
    srun.add_argument("--host", help="interface to bind (default 127.0.0.1; 0.0.0.0 exposes it to the network)")
    srun.add_argument("--port", type=int, help="HTTP port (default 8000; 0 picks a free one)")
    srun.add_argument("--serve-config", metavar="FILE",
                      help="Serve config YAML (as for `serve deploy`): replicas, autoscaling, ray_actor_options of "
                      "the EquirayModel deployment")
    srun.add_argument("--no-batching", action="store_true", help="run every request on its own (batch.enabled=false)")
    srun.add_argument("--detach", action="store_true",
                      help="deploy and return, leaving the endpoint on the cluster at RAY_ADDRESS")
    sstop = ssub.add_parser("stop", help="delete a detached endpoint on the cluster at RAY_ADDRESS",
                            description="Delete the Serve application (default: equiray) from the Ray cluster at "
                            "RAY_ADDRESS; with --all, shut Serve down there.")
    sstop.add_argument("--app", default="equiray", help="application name (default: equiray)")
    sstop.add_argument("--all", action="store_true", help="shut down Serve entirely")

    data = sub.add_parser("data", help="prepare and inspect datasets (Parquet shards)")
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

    sub_ = sub.add_parser("submit", help="submit a job spec (jobs/*.yaml) to a Ray cluster",
                          description="Submit a job spec to the Ray cluster at --address (default: RAY_ADDRESS, "
                          "else http://127.0.0.1:8265, where `ray dashboard cluster.yaml` forwards the head's "
                          "dashboard) through Ray's Job Submission API. The working directory is uploaded with "
                          "the job; the spec's config files are checked before anything is sent. Prints the job "
                          "id and how to follow it.")
    sub_.add_argument("spec", help="a job spec, e.g. jobs/ensemble.yaml")
    _add_address(sub_)
    sub_.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                      help="set an environment variable of the job (repeatable; wins over the spec's env_vars)")
    sub_.add_argument("--follow", "--wait", dest="follow", action="store_true",
                      help="print the job's log until it ends; exit 1 if it did not succeed")

    jobs = sub.add_parser("jobs", help="the jobs on a Ray cluster: list, status, logs, stop")
    jsub = jobs.add_subparsers(dest="jobs_command", metavar="ACTION")
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

    models = sub.add_parser("models", help="list model names")
    msub = models.add_subparsers(dest="models_command", metavar="ACTION")
    ml = msub.add_parser("list", help="equiray's own models (and timm's with --timm PATTERN)")
    ml.add_argument("--timm", metavar="PATTERN", help="also list timm models matching PATTERN, e.g. 'resnet*'")
    return parser


def _add_address(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", metavar="URL",
                   help="the cluster's dashboard (default: RAY_ADDRESS, else http://127.0.0.1:8265)")


def _version() -> str:
    from equiray import __version__

    return __version__


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(message)s", stream=sys.stderr)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    for noisy in ("alembic", "mlflow", "urllib3", "filelock", "ray", "timm", "matplotlib", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    logging.getLogger("mlflow.pytorch").setLevel(logging.ERROR)  # the pickle-format notice: chosen on purpose


def _load_pipeline(name: str, config: str | None, overrides: list[str]):
    import importlib

    from equiray.config import load_config

    module_name, cls_name, fn_name = PIPELINES[name]
    module = importlib.import_module(module_name)
    cfg = load_config(getattr(module, cls_name), config, overrides=overrides)
    return getattr(module, fn_name), cfg


def _cmd_pipeline(name: str, args) -> int:
    overrides = list(args.overrides) + (["reuse=false"] if getattr(args, "fresh", False) else [])
    overrides += ["resume=true"] if getattr(args, "resume", False) else []
    overrides += [f"eval.select_by={args.select_by}"] if getattr(args, "select_by", None) else []
    if name == "serve run":
        overrides += [f"{key}={value}" for key, value in (("model", args.model), ("host", args.host),
                      ("port", args.port), ("serve_config", args.serve_config)) if value is not None]
        overrides += ["batch.enabled=false"] if args.no_batching else []
    fn, cfg = _load_pipeline(name, args.config, overrides)
    kwargs = {"run_id": args.run_id} if getattr(args, "run_id", None) else {}
    kwargs.update({"detach": True} if getattr(args, "detach", False) else {})
    result = fn(cfg, report_dir=args.report_dir, **kwargs)
    if name in ("demo", "serve run"):
        return 0
    if "table" in result:
        print(result["table"])
        print("\n".join(result.get("verdict", [])))
        if result.get("plot"):
            print(f"plot: {result['plot']}")
    shown = {k: v for k, v in result.items()
             if k not in ("epochs", "ensembles", "rows", "table", "verdict", "group_members", "group_nodes")}
    print(json.dumps(shown, indent=2, default=str))
    return 0


def _cmd_data(args) -> int:
    from equiray.data import SourceOptions, prepare, read_meta, split_files

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
        print(json.dumps(meta, indent=2))
        print(pq.read_schema(split_files(args.dir, "train")[0]).to_string(show_schema_metadata=False))
        return 0
    raise EquirayError("choose an action: equiray data prepare | info (see equiray data --help)")


def _cmd_models(args) -> int:
    from equiray.models import list_models

    names = list_models()
    if args.timm:
        import timm

        names += timm.list_models(args.timm)
    print("\n".join(names))
    return 0


def _follow(job_id: str, address: str | None) -> int:
    """Print the job's log until it ends; 0 if it succeeded, 1 otherwise."""
    from pipelines import jobs

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
    from pipelines import jobs

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
    from pipelines import jobs

    if args.jobs_command == "list":
        rows = jobs.list_jobs(address=args.address)
        if not rows:
            print(f"no jobs on {jobs.resolve_address(args.address)}")
            return 0
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
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 2
    _setup_logging(args.verbose)
    try:
        if args.command in PIPELINES:
            return _cmd_pipeline(args.command, args)
        if args.command == "ensemble":
            if not args.ensemble_command:
                raise EquirayError("choose an action: equiray ensemble train | eval (see equiray ensemble --help)")
            return _cmd_pipeline(f"ensemble {args.ensemble_command}", args)
        if args.command == "tune":
            if not args.tune_command:
                raise EquirayError("choose a search: equiray tune ftp (see equiray tune --help)")
            return _cmd_pipeline(f"tune {args.tune_command}", args)
        if args.command == "nfn":
            if not args.nfn_command:
                raise EquirayError("choose an action: equiray nfn zoo | train (see equiray nfn --help)")
            return _cmd_pipeline(f"nfn {args.nfn_command}", args)
        if args.command == "canon":
            if not args.canon_command:
                raise EquirayError("choose an action: equiray canon sweep (see equiray canon --help)")
            return _cmd_pipeline(f"canon {args.canon_command}", args)
        if args.command == "serve":
            if args.serve_command == "stop":
                from pipelines.serve import stop

                stop(None if args.all else args.app)
                return 0
            if not args.serve_command:
                raise EquirayError("choose an action: equiray serve run | stop (see equiray serve --help)")
            return _cmd_pipeline(f"serve {args.serve_command}", args)
        if args.command == "data":
            return _cmd_data(args)
        if args.command == "submit":
            return _cmd_submit(args)
        if args.command == "jobs":
            return _cmd_jobs(args)
        if args.command == "models":
            if not args.models_command:
                raise EquirayError("choose an action: equiray models list")
            return _cmd_models(args)
    except EquirayError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    parser.error(f"unknown command {args.command}")
    return 2


def run_pipeline_main(name: str, argv: list[str] | None = None) -> int:
    """``python -m pipelines.NAME [ACTION] --config F [--set k=v]``: the entry ``ray job submit`` runs; the same
    as ``equiray NAME [ACTION] ...``."""
    return main([*name.split(), *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
