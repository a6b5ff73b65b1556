"""Pieces every pipeline shares: data and scaling config sections, reading Ray Data shards into workers."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from equiray.data import resize
from equiray.errors import ConfigError
from equiray_pipelines._ray import verbose


@dataclass(frozen=True)
class DataConfig:
    source: str = "fashion-mnist"
    dir: str = "data/fashion-mnist"  # prepared Parquet dataset; prepared from `source` if missing
    download: bool = False  # allow torchvision to download the source where it is not on disk
    cache_dir: str = ".cache/equiray"
    max_train: int | None = None  # use only the first N training rows (demo / smoke runs)
    max_eval: int | None = None  # evaluate on only the first N test rows
    # true: each worker streams its shard through Ray Data once, keeps it in memory and reshuffles it with torch
    # every epoch (fast for data that fits a worker's memory); false: stream every epoch through Ray Data with
    # a local shuffle buffer (data larger than memory)
    in_memory: bool = True
    resize: int | None = None  # resample images to resize x resize (area) after reading: cheaper demo runs
    # what is checked before a stage starts: "footers" (every shard's footer, the rows per split), "full" (every
    # page read and its checksum compared too), "auto" (full up to 1 GiB on disk, footers above)
    verify: str = "auto"

    def __post_init__(self):
        from equiray.data import VERIFY_MODES

        if self.verify not in VERIFY_MODES:
            raise ConfigError(f"data.verify: choose one of {', '.join(VERIFY_MODES)}, not {self.verify!r}")

    def prepare(self) -> dict:
        """Prepare the Parquet dataset if missing (a no-op when already prepared); returns its metadata."""
        from equiray.data import SourceOptions, prepare

        return prepare(self.source, self.dir, options=SourceOptions(cache_dir=Path(self.cache_dir),
                                                                     download=self.download))

    def check(self) -> dict:
        """:meth:`prepare`, then check the dataset as ``verify`` says (a damaged shard is named here, before a stage
        starts its run); returns its metadata."""
        from equiray.data import check_dataset

        meta = self.prepare()
        check_dataset(self.dir, verify=self.verify)
        return meta


@dataclass(frozen=True)
class TrackingConfig:
    """Where a pipeline's runs go in MLflow and under which registry name and alias its model is registered."""

    experiment: str = "equiray-pretrain"
    run_name: str | None = None
    registered_model: str = "equiray-backbone"
    alias: str = "pretrained"


@dataclass(frozen=True)
class ScalingConfig:
    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0  # leave CPUs free for Ray Data's read tasks
    gpus_per_worker: float = 1.0  # fractional values pack several workers onto one GPU (when use_gpu)
    torch_threads: int = 0  # 0: the node's cores divided among the workers
    # torch.distributed's backend between the workers: auto (Ray Train's choice: nccl with GPUs, gloo without),
    # nccl or gloo (GPU workers without NCCL: a mixed cluster, or the fake GPUs of an autoscaling simulation)
    backend: str = "auto"

    def __post_init__(self):
        if self.num_workers < 1 or self.cpus_per_worker <= 0 or self.gpus_per_worker <= 0:
            raise ConfigError("scaling: num_workers >= 1, cpus_per_worker > 0 and gpus_per_worker > 0")
        if self.backend not in ("auto", "nccl", "gloo"):
            raise ConfigError(f"scaling.backend: auto, nccl or gloo, not {self.backend!r}")

    def torch_config(self):
        """Ray Train's ``TorchConfig`` for ``backend`` (None: Ray Train's default)."""
        if self.backend == "auto":
            return None
        from ray.train.torch import TorchConfig

        return TorchConfig(backend=self.backend)

    def ray_scaling(self):
        import ray.train

        resources = {"CPU": self.cpus_per_worker}
        if self.use_gpu:
            resources["GPU"] = self.gpus_per_worker
        return ray.train.ScalingConfig(num_workers=self.num_workers, use_gpu=self.use_gpu,
                                       resources_per_worker=resources)


@dataclass(frozen=True)
class ResourcesConfig:
    """Per-trial resources of a Ray Tune experiment; fractional GPUs pack several trials onto one GPU."""

    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0
    max_concurrent: int = 0  # 0: as many as the resources allow

    def __post_init__(self):
        if self.cpus_per_trial <= 0 or self.gpus_per_trial < 0 or self.max_concurrent < 0:
            raise ConfigError("resources: cpus_per_trial > 0, gpus_per_trial >= 0, max_concurrent >= 0")


def batches_from_shard(shard, batch_size: int, shuffle_buffer: int | None):
    from equiray.data import decode_batch

    for batch in shard.iter_batches(batch_size=batch_size, batch_format="numpy",
                                    local_shuffle_buffer_size=shuffle_buffer or None):
        yield decode_batch(batch)


def load_shard(shard, *, size: int | None = None, limit: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """A worker's whole shard (or the whole dataset, when it is not split) as in-memory tensors."""
    xs, ys = zip(*batches_from_shard(shard, 4096, None))
    x, y = torch.cat(xs), torch.cat(ys)
    if limit is not None:
        x, y = x[:limit], y[:limit]
    return resize(x, size), y


def worker_threads(torch_threads: int = 0) -> None:
    """Torch threads in a Ray Train worker: ``torch_threads`` (``ScalingConfig.torch_threads``), or for 0 the
    node's cores shared by its workers (Ray sets OMP_NUM_THREADS=1 in workers otherwise)."""
    import os

    import ray.train

    local = max(1, ray.train.get_context().get_local_world_size())
    torch.set_num_threads(torch_threads or max(1, (os.cpu_count() or 1) // local))


def ingest_options():
    """Ray Train's ingest options with the blocks kept in file order: a ``data.max_train`` limit then takes the
    same rows in every run (otherwise whichever read task finishes first decides which images are trained on)."""
    import warnings

    import ray.train

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Ray's own deprecation notice about a field equiray does not set
        options = ray.train.DataConfig.default_ingest_options()
    options.preserve_order = True
    return options


def fit(train_loop, loop_cfg: dict, *, scaling: ScalingConfig, run_name: str, storage_path: str, datasets: dict,
        data_dir: str | None = None, max_failures: int = 2, split_data: bool = True, num_to_keep: int = 2):
    """Run ``train_loop`` on a ``TorchTrainer`` (Train V2) and return its result, which must hold a checkpoint.
    ``split_data=False`` gives every worker the whole of each dataset instead of a shard. ``datasets`` are splits
    of the prepared dataset ``data_dir``: when training fails, their shards are read through, and a damaged one is
    the error (named, where Ray Data's read task only says a page could not be read)."""
    import ray.train

    _pin_data_stats_here()
    trainer = _interruptible_trainer()(
        train_loop, train_loop_config=loop_cfg, scaling_config=scaling.ray_scaling(),
        torch_config=scaling.torch_config(),
        run_config=ray.train.RunConfig(
            name=run_name, storage_path=str(Path(storage_path).resolve()),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=num_to_keep),
            failure_config=ray.train.FailureConfig(max_failures=max_failures),
            # the controller's worker-group lines and the workers' checkpoint lines only with -v
            logging_config=ray.train.LoggingConfig(log_level="INFO" if verbose() else "WARNING")),
        datasets=datasets,
        # one worker reads the whole of each dataset: no split coordinator to start (a shard's first read took
        # 12-16 s through it on 2 cores, ~5 s without)
        dataset_config=ray.train.DataConfig(datasets_to_split="all" if split_data and scaling.num_workers > 1 else [],
                                            execution_options=ingest_options()),
    )
    try:
        result = _fit_interruptibly(trainer)
    except ray.train.TrainingFailedError:
        if data_dir is not None:
            from equiray.data import find_damaged_shard

            find_damaged_shard(data_dir, splits=list(datasets))  # raises the DataError naming the shard
        raise
    if result.checkpoint is None:
        raise RuntimeError(f"{run_name} ended without a checkpoint: {result.error}")
    return result


def _pin_data_stats_here() -> None:
    """Create Ray Data's one-per-cluster stats actor (detached) from this driver, so it lives on the driver's node.
    Created by the first Train worker that reads a dataset it lands on that worker's node, where it keeps the node
    busy for good: on an autoscaling cluster a GPU node that is never removed (seen on the fake multi-node cluster,
    tests/pipelines/test_autoscaling.py). Ray's function is internal: without it, nothing is done."""
    try:
        from ray.data._internal.stats import get_or_create_stats_actor
    except ImportError:
        return
    get_or_create_stats_actor()


def _interruptible_trainer():
    """``TorchTrainer`` whose ``fit`` Ctrl+C interrupts as it interrupts anything else in equiray. On the main thread
    Ray Train V2 installs a SIGINT handler of its own: it aborts the run, after which the process exits with status
    1 and prints nothing (and the handler stays installed after fit). Here the controller's handle is kept instead
    (the hook Train calls with it to install that handler), so Ctrl+C raises KeyboardInterrupt in ``fit`` and
    :func:`_fit_interruptibly` aborts the controller before passing it on: the stage ends its MLflow run KILLED,
    the CLI says `interrupted` and exits 130. (``fit`` on a helper thread, as before, kept Train's handler away
    too, but left that thread inside ``ray.get`` when the CLI shut Ray down on its way out, a race that now and
    then ended the process with a segmentation fault after its `interrupted` line.)"""
    from ray.train.torch import TorchTrainer

    class InterruptibleTorchTrainer(TorchTrainer):
        controller = None

        def _register_sigint_handler(self, controller):
            self.controller = controller

    return InterruptibleTorchTrainer


def _fit_interruptibly(trainer):
    """``trainer.fit()``; on Ctrl+C its Train controller aborts the run (its workers stop) before the
    KeyboardInterrupt goes on, so nothing of the run is left waiting on Ray when the CLI leaves it."""
    import ray

    try:
        return trainer.fit()
    except KeyboardInterrupt:
        controller = getattr(trainer, "controller", None)
        if controller is not None:
            try:
                ray.get(controller.abort.remote(), timeout=30)
            except Exception:  # noqa: BLE001 - the controller exits as it aborts; a hung one is killed
                try:
                    ray.kill(controller)
                except Exception:  # noqa: BLE001 - already gone
                    pass
        raise


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside Ray Train's DistributedDataParallel wrapper (the model itself when not wrapped)."""
    return model.module if hasattr(model, "module") else model


def resume_from_checkpoint(model: torch.nn.Module, device, **stateful) -> int:
    """Load Ray Train's latest checkpoint (``state.pt``: after a worker failure) into ``model`` and every
    ``name=object`` with a ``load_state_dict`` (optimizer, scheduler); returns the epoch to start from (0 without
    a checkpoint)."""
    import ray.train

    ckpt = ray.train.get_checkpoint()
    if not ckpt:
        return 0
    with ckpt.as_directory() as d:
        state = torch.load(Path(d) / "state.pt", map_location=device, weights_only=True)
    unwrap(model).load_state_dict(state["model"])
    for name, obj in stateful.items():
        obj.load_state_dict(state[name])
    return state["epoch"] + 1
