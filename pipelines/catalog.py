"""Every pipeline the ``equiray`` command runs, as data: its command words, config class, run function, help and
command-specific options. The CLI builds its subcommands from this table and ``equiray_pipelines.jobs`` reads it to find
the configs a job spec runs; nothing here parses arguments.

A command's words name its module and its function: ``equiray ftp tune`` is ``equiray_pipelines.ftp.run_tune`` with
``equiray_pipelines.ftp.FTPConfig``, and ``python -m equiray_pipelines.ftp tune ...`` is the same as
``equiray ftp tune ...``
(a one-word command such as ``pretrain`` is ``equiray_pipelines.pretrain.run``). Add a pipeline by adding a
:class:`Pipeline` to ``CATALOG``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from equiray.config import load_config
from equiray.registry import Registry
from equiray_pipelines import canon, demo, distill, ensemble, ftp, nfn, pretrain, robust, serve


@dataclass(frozen=True)
class Option:
    """A command-specific option. It either overrides a config key (``sets``, like ``--set KEY=VALUE``) or is
    a keyword argument of the run function (``kwarg``). With ``value`` it is a switch (no argument) that applies
    that value; otherwise it takes one argument (``type``, ``choices``, ``metavar``)."""

    flag: str
    help: str
    sets: str | None = None
    kwarg: str | None = None
    value: Any = None
    choices: tuple[str, ...] | None = None
    type: Callable[[str], Any] = str
    metavar: str | None = None

    def __post_init__(self):
        if (self.sets is None) == (self.kwarg is None):
            raise ValueError(f"option {self.flag}: give exactly one of sets= and kwarg=")

    @property
    def dest(self) -> str:
        return self.flag.lstrip("-").replace("-", "_")

    @property
    def switch(self) -> bool:
        return self.value is not None


@dataclass(frozen=True)
class Pipeline:
    """One command: ``run(config, report_dir=..., **kwargs)`` returns the stage's result (``prints=False``: the
    command prints its own output, the CLI adds nothing). ``example_config`` is the shipped config of this
    command (the tests load it); without ``--config`` the command runs the config class's defaults."""

    command: str
    config: type
    run: Callable[..., Any]
    help: str
    description: str = ""
    example_config: str | None = None
    options: tuple[Option, ...] = ()
    epilog: str = ""
    prints: bool = True

    @property
    def words(self) -> tuple[str, ...]:
        return tuple(self.command.split())

    def load_config(self, path: str | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Any:
        """The config from ``path`` (or the defaults) with ``KEY=VALUE`` overrides; unknown keys are errors."""
        return load_config(self.config, path, overrides=overrides)


# command groups (the first word of a several-word command) and their one-line help
GROUPS = {
    "ensemble": "augmentation ensembles: train members on Ray Train, measure invariance",
    "canon": "canonicalization adapters: a grid of variants as Ray Tune trials",
    "ftp": "robust fine-tuning: a Ray Tune search over FTP and its baselines",
    "nfn": "metanetworks on weights: a model zoo, then Monomial-NFN on it",
    "serve": "online serving: a registered model behind an HTTP API (Ray Serve)",
}

# old spellings still accepted (hidden from the help): alias -> command
ALIASES = {"tune ftp": "ftp tune"}

SERVE_EPILOG = """\
examples:
  equiray serve run                      # models:/equiray-robust@champion
  equiray serve run --model models:/equiray-ensemble@champion
  equiray serve run --model models:/equiray-student@champion --port 8001 --set batch.max_batch_size=64
  equiray serve run --config configs/serve.yaml --serve-config configs/serve_app.yaml
  curl -s -H 'Content-Type: image/png' --data-binary @image.png http://127.0.0.1:8000/v1/predict"""


CATALOG = (
    Pipeline(
        "demo", demo.DemoConfig, demo.run, "run every stage at demo scale and write a report", prints=False,
        example_config="configs/demo.yaml",
        description="Prepare Fashion-MNIST, then run every stage at demo scale: pretrain a backbone with Ray Train; "
        "augmentation ensembles and their invariance vs size; distil them into one student; canonicalization "
        "variants as Ray Tune trials (the papers' C8 protocol); a canonicalizer with a continuous pose trained for "
        "any angle and a mirror; a robust fine-tuning search (FTP, TPGM, L2-SP); Monomial-NFN metanetworks over a "
        "zoo of small CNNs and over the ensemble's members; judge every candidate upright, at any angle and "
        "mirrored, and register the robust champion; finally serve it with Ray Serve and send it upright and "
        "rotated images over HTTP. Every model lands in the MLflow registry; tables and plots "
        "go to a Markdown report. Choose stages with --set 'stages=[pretrain,canon]'.",
        options=(Option("--fresh", "redo every stage even where the registry already holds its result for this "
                        "config", sets="reuse", value="false"),)),
    Pipeline(
        "pretrain", pretrain.PretrainConfig, pretrain.run,
        "pretrain a backbone on upright data (Ray Train) and register it", example_config="configs/pretrain.yaml",
        description="Train a backbone (equiray or timm model) on upright data with Ray Train, log to MLflow and "
        "register it as equiray-backbone@pretrained."),
    Pipeline(
        "ensemble train", ensemble.EnsembleConfig, ensemble.run_train,
        "train every setting's members, fanned out over Ray Train workers", example_config="configs/ensemble.yaml",
        description="Train augmentation-ensemble members (Nordenfors & Flinth) in vectorized member groups on Ray "
        "Train workers, checkpointed once per pass over a worker's groups (checkpoint_every); log member groups to "
        "MLflow and register the champion setting's ensemble mean as equiray-ensemble@champion."),
    Pipeline(
        "ensemble eval", ensemble.EnsembleConfig, ensemble.run_eval,
        "OSP and symmetric KL vs ensemble size, in and off distribution", example_config="configs/ensemble.yaml",
        description="Measure the members of an `ensemble train` run: OSP, symmetric KL and accuracy of the "
        "ensemble mean for bootstrapped ensemble sizes, on the test set and on another dataset; writes a plot and "
        "a table and logs both to the run.",
        options=(Option("--run-id", "the `ensemble train` run (default: the latest finished one)", kwarg="run_id"),
                 Option("--select-by", "nfn: leave out the members a registered metanetwork (eval.nfn_model, default "
                        "models:/equiray-nfn-members@champion, trained on a zoo of members) predicts weakest "
                        "(eval.drop_fraction) and compare with all members and with random subsets",
                        sets="eval.select_by", choices=("none", "nfn")))),
    Pipeline(
        "distill", distill.DistillConfig, distill.run,
        "distil the registered ensemble into one student and register it", example_config="configs/distill.yaml",
        description="Train a student (a member architecture or a timm model) to match the ensemble mean on "
        "group-transformed inputs; report its accuracy, OSP, KL and ms/image next to the ensemble's; register it "
        "as equiray-student@champion."),
    Pipeline(
        "canon sweep", canon.CanonConfig, canon.run_sweep,
        "train every canonicalizer variant and baseline, register the best", example_config="configs/canon.yaml",
        description="Start from the registered backbone and train a grid of canonicalization variants (kind x "
        "group x prior weight x frozen/fine-tuned backbone x pose (group element or continuous angle) x training "
        "inputs (upright or randomly turned)) plus the baselines (plain fine-tuning; with group, SO(2) or O(2) "
        "augmentation), one Ray Tune trial and one MLflow run each; judge them upright, on the group's rotations "
        "(Cn-avg), at random angles (SO(2)-avg, O(2)-avg with mirrors) and along an accuracy-vs-angle curve; time "
        "every model, write a table and plots, register the best (`select`) as equiray-canon@champion. A "
        "canonicalizer reads `canonicalizers.<kind>.input_size` pixels: `auto` (when a config leaves it unset) is "
        "the image itself up to 64 px and the image averaged down below 64 px above that (224 -> 56), so it stays "
        "a few percent of a large backbone's cost; `full` or a side in pixels otherwise (configs/canon.yaml reads "
        "Fashion-MNIST's 28 px at 9 and 7)."),
    Pipeline(
        "ftp tune", ftp.FTPConfig, ftp.run_tune,
        "search FTP / TPGM / SPD / L2-SP / fine-tuning constraints with ASHA + Optuna",
        example_config="configs/ftp.yaml",
        description="Fine-tune the registered backbone on a small shifted target set with FTP, TPGM, L2-SP or "
        "plain fine-tuning (SPD too when space.methods names it: configs/ftp.yaml does); Ray Tune searches the "
        "method and its constraints (Optuna TPE, or random search without optuna; ASHA early stopping), selecting on ID validation accuracy only and reporting OOD "
        "accuracy on shifted views. Every trial is an MLflow run; the best model is registered as "
        "equiray-ftp@champion.",
        options=(Option("--resume", "continue the interrupted search of this config (finished trials are not "
                        "re-run)", sets="resume", value="true"),)),
    Pipeline(
        "nfn zoo", nfn.ZooConfig, nfn.run_zoo,
        "train a zoo of small CNNs with varied hyperparameters on Ray tasks", example_config="configs/nfn_zoo.yaml",
        description="Train many copies of the Small CNN Zoo network (4,970 parameters), each with its own "
        "optimizer, learning rate, L2, dropout, init scale and training fraction, as Ray tasks; write their "
        "weights, hyperparameters and test accuracy to Parquet under `out`."),
    Pipeline(
        "nfn train", nfn.NFNTrainConfig, nfn.run_train,
        "predict each zoo net's accuracy from its weights; Kendall tau", example_config="configs/nfn_train.yaml",
        description="Fit metanetworks (Monomial-NFN, STATNN) that predict a zoo net's test accuracy from its "
        "weights, on the plain zoo and on the zoo with every net's hidden units randomly rescaled (same "
        "functions); one Ray task per (metanetwork, zoo). Reports Kendall tau on held-out nets, logs curves and a "
        "predicted-vs-true plot to MLflow and registers the champion as equiray-nfn@champion."),
    Pipeline(
        "robust", robust.RobustConfig, robust.run,
        "judge every robust candidate at any angle and mirrored, register the champion",
        example_config="configs/robust.yaml",
        description="Judge the candidate models (every variant of the canon sweep behind equiray-canon@champion, "
        "equiray-ensemble@champion, equiray-student@champion, or any registered model in `candidates`) the same "
        "way, one Ray task each, on the full test set: upright, mirrored, at a uniformly random angle per image "
        "(SO(2)), after a random mirror too (O(2)), on the C8 grid, and along an accuracy-vs-angle curve; time "
        "each next to the backbone. The champion is the best SO(2) accuracy among the candidates within "
        "`upright_tolerance` points (1) of the backbone's upright accuracy (else the best SO(2) of all, said so); "
        "it is registered as equiray-robust@champion, which `equiray serve run` serves by default."),
    Pipeline(
        "serve run", serve.ServeConfig, serve.run, "serve a registered model over HTTP until Ctrl+C", prints=False,
        example_config="configs/serve.yaml", epilog=SERVE_EPILOG,
        description="Start Ray Serve with a registered equiray model (models:/NAME@ALIAS or models:/NAME/VERSION): "
        "POST /v1/predict takes a PNG/JPEG body, multipart/form-data files or JSON {\"instances\": [...]} and "
        "answers {\"predictions\": [...]} (label, probabilities; an ensemble's member disagreement; a "
        "canonicalizer's group element); GET /v1/model, GET /healthz, /docs. Requests are batched dynamically "
        "(batch.*). Replicas, autoscaling and GPU fractions come from a Serve config file (--serve-config, the "
        "format `serve deploy` takes). Binds 127.0.0.1 unless --host says otherwise. Blocks until Ctrl+C; running "
        "it again (on the cluster at RAY_ADDRESS) or `kill -HUP` on it after promoting another version to the "
        "alias swaps the model in place, without dropping requests.",
        options=(Option("--model", "registry URI (config key `model`; default models:/equiray-robust@champion, "
                        "registered by `equiray robust`)",
                        sets="model"),
                 Option("--host", "interface to bind (default 127.0.0.1; 0.0.0.0 exposes it to the network)",
                        sets="host"),
                 Option("--port", "HTTP port (default 8000; 0 picks a free one)", sets="port", type=int),
                 Option("--ingress", "direct (default): the replica answers on --port itself, Serve's proxy beside "
                        "it on proxy_port; proxy: every request through Serve's proxy on --port (several replicas "
                        "behind one address)", sets="ingress", choices=("direct", "proxy")),
                 Option("--serve-config", "Serve config YAML (as for `serve deploy`): replicas, autoscaling, "
                        "ray_actor_options of the EquirayModel deployment", sets="serve_config", metavar="FILE"),
                 Option("--no-batching", "run every request on its own (batch.enabled=false)", sets="batch.enabled",
                        value="false"),
                 Option("--detach", "deploy and return, leaving the endpoint on the cluster at RAY_ADDRESS",
                        kwarg="detach", value=True))),
)


PIPELINES: Registry[Pipeline] = Registry("pipeline")
for _p in CATALOG:
    PIPELINES.register(_p, name=_p.command)
del _p

