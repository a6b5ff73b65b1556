"""Starting or joining Ray: ``RAY_ADDRESS`` (or an explicit address) joins a cluster; otherwise a local instance
is started by the pipeline itself (``address="local"``: a pipeline never joins a stray ``ray start`` cluster on
the same machine by accident). A Ray job's entrypoint has ``RAY_ADDRESS`` set by Ray to its cluster's address,
so a pipeline submitted with ``equiray submit`` runs on the cluster it was submitted to."""
from __future__ import annotations

import logging
import os
import sys

from equiray.errors import EquirayError

log = logging.getLogger(__name__)

# What Ray Serve reads from the environment when a local Ray starts (its controller and replicas inherit it):
# direct ingress (a replica takes HTTP on its own port; the proxy hop caps a 2-core machine near 250 req/s), no
# drain period on stop (it gives an external load balancer time to deregister a replica; a local endpoint has none)
# and no quarantine of a stopped replica's port (the same: only HAProxy needs it). A value already in the
# environment wins; a cluster that RAY_ADDRESS names serves the way it was started (cluster.yaml sets the same).
SERVE_ENV = {"RAY_SERVE_ENABLE_DIRECT_INGRESS": "1", "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "0",
             "RAY_SERVE_PORT_QUARANTINE_S": "0"}


def local_ray_env() -> None:
    """Set :data:`SERVE_ENV` in this process's environment, where not set already, before a local Ray starts."""
    for key, value in SERVE_ENV.items():
        os.environ.setdefault(key, value)


def init_ray(address: str | None = None, *, num_cpus: int | None = None, num_gpus: int | None = None) -> None:
    """Connect to ``address`` / ``RAY_ADDRESS`` or start a local Ray; a no-op when Ray is already up."""
    import ray

    if ray.is_initialized():
        quiet_data_progress()
        return
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
        ray.init(address=address, logging_level=logging.WARNING, configure_logging=True, **kwargs)
    except ConnectionError as exc:
        raise EquirayError(f"no Ray cluster answers at {address!r} ({exc}); start one (`ray start --head`) or "
                           "unset RAY_ADDRESS to run locally") from None
    quiet_data_progress()


def quiet_data_progress() -> None:
    """Ray Data's per-operator progress bars flood non-interactive logs; the pipelines print their own."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.enable_operator_progress_bars = False


def cluster_summary() -> str:
    import ray

    res = ray.cluster_resources()
    return f"{int(res.get('CPU', 0))} CPUs, {res.get('GPU', 0):g} GPUs on {len(ray.nodes())} node(s)"


def say(message: str) -> None:
    """The user's progress channel: one line to standard output, from the driver or from inside a Ray worker
    (every pipeline reports progress through it; ``logging`` is for diagnostics, results go to the CLI). In a
    worker, Ray Train V2 re-routes ``print`` through its logger, which shows every line twice on the driver;
    writing to the stream directly shows it once."""
    sys.stdout.write(message + "\n")
    sys.stdout.flush()


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
