"""Starting or joining Ray: ``RAY_ADDRESS`` (or an explicit address) joins a cluster; otherwise a local instance
is started by the pipeline itself (``address="local"``: a pipeline never joins a stray ``ray start`` cluster on
the same machine by accident). A Ray job's entrypoint has ``RAY_ADDRESS`` set by Ray to its cluster's address,
so a pipeline submitted with ``equiray submit`` runs on the cluster it was submitted to."""
from __future__ import annotations

import logging
import os
import sys

from equiray.errors import EquirayError
from equiray_pipelines.progress import progress_env, write_line

log = logging.getLogger(__name__)

# What Ray Serve reads from the environment when a local Ray starts (its controller and replicas inherit it):
# direct ingress (a replica takes HTTP on its own port; the proxy hop caps a 2-core machine near 250 req/s), no
# drain period on stop (it gives an external load balancer time to deregister a replica; a local endpoint has none)
# and no quarantine of a stopped replica's port (the same: only HAProxy needs it). A value already in the
# environment wins; a cluster that RAY_ADDRESS names serves the way it was started (cluster.yaml sets the same).
SERVE_ENV = {"RAY_SERVE_ENABLE_DIRECT_INGRESS": "1", "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "0",
             "RAY_SERVE_PORT_QUARANTINE_S": "0"}


# A local Ray runs on one machine, which no cloud preempts: Ray Train's preemption watcher (an actor per run, and a
# core-worker error line about its restart policy) has nothing to watch there. Clusters keep it.
LOCAL_ENV = {**SERVE_ENV, "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}


def local_ray_env() -> None:
    """Set :data:`LOCAL_ENV` in this process's environment, where not set already, before a local Ray starts."""
    for key, value in LOCAL_ENV.items():
        os.environ.setdefault(key, value)


# The libraries' loggers that print progress of their own at INFO (Ray Train's checkpoints and reports, the
# Train controller's worker-group lines, Ray Data's datasets, Tune, Serve's controller and proxy): at WARNING
# unless -v. "" is the root logger: Ray Train V2 logs its reports under a logger named by its file's path.
QUIET_LOGGERS = ("", "ray", "ray.data", "ray.train", "ray.tune", "ray.serve", "mlflow", "urllib3", "filelock")


def verbose() -> bool:
    """Whether the user asked for the libraries' own lines (``equiray -v``: debug logging)."""
    return logging.getLogger("equiray_pipelines").isEnabledFor(logging.DEBUG)


def quiet_logging(*, root: bool = False) -> None:
    """The libraries' INFO lines off in this process (the driver's, when not verbose); ``root``: the root logger
    too (a worker, where equiray's own progress goes through :func:`say`, not logging)."""
    os.environ.setdefault("RAY_DATA_LOG_LEVEL", "WARNING")  # read when ray.data configures its logger on import
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # Tune's new console output prints tables at any verbosity
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # read when mlflow configures its logger on import
    for name in QUIET_LOGGERS:
        if name or root:
            logging.getLogger(name).setLevel(logging.WARNING)
    # a local Ray announces that it turned token authentication on, at every start; the warning Ray prints when
    # authentication is off (anyone on the network could run code) is left alone
    # (addFilter adds a function once, however often this runs)
    logging.getLogger("ray._private.authentication.authentication_token_setup").addFilter(_not_auth_enabled_notice)


def _not_auth_enabled_notice(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("Token authentication is enabled")


def quiet_worker() -> None:
    """The job's ``worker_process_setup_hook``: every Ray worker process of a pipeline (Train workers and
    controller, Tune trials, Data coordinators, Serve actors) runs it before anything else."""
    import importlib.util

    quiet_logging(root=True)
    # Ray Train V2 logs each report under a logger named by its module's file path, below its own configuration
    spec = importlib.util.find_spec("ray.train.v2._internal.execution.context")
    if spec is not None and spec.origin:
        logging.getLogger(spec.origin).setLevel(logging.WARNING)
    # Ray Data warns that its progress bars are off, which the pipelines chose (they print their own progress)
    logging.getLogger("ray.data._internal.progress").addFilter(
        lambda record: "Progress bars disabled" not in record.getMessage())
    # Ray Train's controller tells the autoscaler what it needs; on a busy 2-core machine the first request can time
    # out, and Ray logs it with a 20-line traceback and "safe to ignore if transient": one line is enough
    logging.getLogger("ray.train.v2._internal.execution.scaling_policy.autoscaling_coordinator_client").addFilter(
        _without_traceback)
    # Ray stops idle workers with SIGTERM; its handler raises SystemExit, and when that lands inside a garbage
    # collector callback Python prints it as an "Exception ignored in ..." traceback: the worker was meant to exit
    sys.unraisablehook = _quiet_exit_hook(sys.unraisablehook)


def _quiet_exit_hook(previous):
    """An unraisable-exception hook that stays silent on SystemExit (a worker told to exit) and passes anything
    else to ``previous``."""
    def hook(unraisable):
        if isinstance(unraisable.exc_value, SystemExit):
            return
        previous(unraisable)

    return hook


def _without_traceback(record: logging.LogRecord) -> bool:
    """A logging filter that keeps the record and drops its traceback (the message alone is printed)."""
    record.exc_info, record.exc_text = None, None
    return True


_STARTED_HERE: list[bool] = []  # True once this process has started a local Ray of its own


def started_local_ray() -> bool:
    """Whether the Ray this process is on is a local instance it started (it stops when the process exits)."""
    import ray

    return bool(_STARTED_HERE) and ray.is_initialized()


def init_ray(address: str | None = None, *, num_cpus: int | None = None, num_gpus: int | None = None) -> None:
    """Connect to ``address`` / ``RAY_ADDRESS`` or start a local Ray; a no-op when Ray is already up. Unless
    verbose, the libraries' INFO lines are silenced here and in the job's workers (:func:`quiet_logging`)."""
    import ray

    if ray.is_initialized():
        quiet_data_progress()
        return
    quiet = not verbose()
    if quiet:
        quiet_logging()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address and address.startswith(("http://", "https://")):
        raise EquirayError(f"RAY_ADDRESS={address} is a dashboard (Job API) address, which `equiray submit` uses; "
                           "to run this pipeline on that cluster submit its job spec (equiray submit jobs/...yaml), "
                           "or unset RAY_ADDRESS to run it locally")
    kwargs = {}
    if address is None:
        # "local", never None: ray.init(address=None) would join any `ray start` cluster on this machine
        address = "local"
        local_ray_env()
        # The dashboard also serves the State API that Ray Train's controller polls: keep it on.
        kwargs = {"num_cpus": num_cpus, "num_gpus": num_gpus, "dashboard_host": "127.0.0.1"}
        log.info("starting a local Ray instance (set RAY_ADDRESS to use a cluster)")
    else:
        log.info("connecting to the Ray cluster at %s", address)  # inside a Ray job: the job's own cluster
    try:
        # the workers show progress the way this driver's output can (equiray_pipelines.progress: bars or lines)
        runtime_env = {"env_vars": progress_env(), **({"worker_process_setup_hook": quiet_worker} if quiet else {})}
        ray.init(address=address, logging_level=logging.WARNING, configure_logging=True, runtime_env=runtime_env,
                 **kwargs)
    except ConnectionError as exc:
        raise EquirayError(f"no Ray cluster answers at {address!r} ({exc}); start one (`ray start --head`) or "
                           "unset RAY_ADDRESS to run locally") from None
    if address == "local":
        _STARTED_HERE.append(True)
    quiet_data_progress()


def quiet_data_progress() -> None:
    """Ray Data's per-operator progress bars flood non-interactive logs; the pipelines print their own."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.enable_operator_progress_bars = False


_CLUSTER_LOGGED: set[str] = set()


def log_cluster_once() -> None:
    """``Ray: 2 CPUs, ...`` in the log, once per cluster this process runs on (a demo's stages share one)."""
    import ray

    key = ray.get_runtime_context().gcs_address if ray.is_initialized() else ""
    if key not in _CLUSTER_LOGGED:
        _CLUSTER_LOGGED.add(key)
        log.info("Ray: %s", cluster_summary())


def cluster_summary() -> str:
    import ray

    res = ray.cluster_resources()
    return f"{int(res.get('CPU', 0))} CPUs, {res.get('GPU', 0):g} GPUs on {len(ray.nodes())} node(s)"


def say(message: str) -> None:
    """The user's progress channel: one line to standard output, from the driver or from inside a Ray worker
    (every pipeline reports progress through it; ``logging`` is for diagnostics, results go to the CLI). In a
    worker, Ray Train V2 re-routes ``print`` through its logger, which shows every line twice on the driver;
    writing to the stream directly shows it once. On a terminal the line goes above the progress bars
    (:mod:`equiray_pipelines.progress`)."""
    write_line(message)


def fit_noting_interrupts(tuner):
    """``tuner.fit()``, or None when Ctrl+C (SIGINT) interrupted it. Tune catches the first SIGINT itself, marks the
    running trials TERMINATED like finished ones and returns normally; what tells the two apart is that its handler
    puts the previous SIGINT handler back only when it fired."""
    import signal
    import threading

    catches = threading.current_thread() is threading.main_thread() and os.getenv("TUNE_DISABLE_SIGINT_HANDLER",
                                                                                    "0") == "0"
    before = signal.getsignal(signal.SIGINT)
    try:
        grid = tuner.fit()
    except KeyboardInterrupt:
        return None
    return None if catches and signal.getsignal(signal.SIGINT) is before else grid


def leave_ray() -> None:
    """Before the one line that ends a failed or interrupted command: leave Ray (what exit would do anyway), so
    that a worker's output still on its way to this driver is printed before that line, not after it (seen: a Tune
    trial's last epoch line arriving after "interrupted: ...")."""
    ray = sys.modules.get("ray")
    try:
        if ray is not None and ray.is_initialized():
            ray.shutdown()
    except BaseException:  # noqa: BLE001 - a second Ctrl+C or a dead cluster: the line matters more
        pass
    sys.stdout.flush()
