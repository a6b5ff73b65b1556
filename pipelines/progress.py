"""Progress of long work (batches, rounds, trials, candidates, the demo's stages): counts, rate and time left, shown
the way the driver's output can show it.

On a terminal the driver draws bars redrawn in place, from a Ray worker as from the driver: through Ray's
distributed tqdm (``ray.experimental.tqdm_ray``), a worker prints its bar's state and the driver's log monitor
draws it, below the lines the workers print. Anywhere else (a log file, CI, a Ray job's log) a redrawn bar is a
stream of carriage returns, so the same progress is a line every ``every_s`` seconds::

    [pretrain] epoch 1/3: 231/422 batches (55%), 15.4 batches/s, 15 s elapsed, ~12 s left

The driver picks the mode once (``EQUIRAY_PROGRESS=bars|lines|off`` overrides: bars on a terminal, lines
elsewhere) and hands it to every worker of the run through the environment (:func:`progress_env`).
"""
from __future__ import annotations

import logging
import os
import sys
import time
from typing import Iterable, Iterator, TypeVar

__all__ = ["MODE_ENV", "LineHandler", "Progress", "duration", "progress_env", "progress_mode", "track", "trial_progress", "write_line"]

MODE_ENV = "EQUIRAY_PROGRESS"
MODES = ("bars", "lines", "off")

T = TypeVar("T")
_OPEN: set[int] = set()  # the positions (lines) of this process's open bars


def progress_mode() -> str:
    """``bars``, ``lines`` or ``off``: :data:`MODE_ENV` when set (the driver's choice, in a worker), else bars when
    this process writes to a terminal."""
    mode = os.environ.get(MODE_ENV, "").strip().lower()
    if mode in MODES:
        return mode
    try:
        return "bars" if sys.stdout.isatty() else "lines"
    except (AttributeError, ValueError):  # a replaced or closed stdout
        return "lines"


def progress_env() -> dict[str, str]:
    """What the driver puts in its Ray workers' environment (``runtime_env``'s ``env_vars``) so they show progress
    the way it can: the mode it resolved for its own output."""
    return {MODE_ENV: progress_mode()}


def write_line(message: str, stream=None) -> None:
    """``message`` as one line on ``stream`` (standard output); with bars on, above them (they are redrawn below
    it)."""
    stream = stream or sys.stdout
    if progress_mode() == "bars":
        from tqdm import tqdm

        tqdm.write(message, file=stream)
    else:
        stream.write(message + "\n")
    stream.flush()


class LineHandler(logging.StreamHandler):
    """A logging handler whose records go through :func:`write_line` (so a log line does not break a bar)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            write_line(self.format(record), self.stream)
        except Exception:  # noqa: BLE001 - logging's own contract: a failing handler reports, never raises
            self.handleError(record)


def duration(seconds: float) -> str:
    """``"45 s"``, ``"3.2 min"``, ``"1.5 h"``."""
    seconds = max(0.0, seconds)
    if seconds < 100:
        return f"{seconds:.0f} s"
    if seconds < 6000:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


class Progress:
    """``total`` units of work (``unit``: batches, rounds, trials, ...) under a ``desc``ription; :meth:`update` as
    they finish. A bar in ``bars`` mode; in ``lines`` mode a line at most every ``every_s`` seconds (none for work
    that ends sooner; ``every_s=0``: one per unit, the last too; ``every_s=None``: never, for work that prints a line
    per unit of its own and appends :meth:`left` to it), through :func:`write_line`; nothing in ``off`` mode. ``prefix`` names the stage
    (``[pretrain]``). Use as a context manager, or call :meth:`close`."""

    def __init__(self, total: int | None, *, desc: str, unit: str = "it", prefix: str = "",
                 every_s: float | None = 15.0, mode: str | None = None):
        self.total, self.desc, self.unit, self.every_s = total, desc, unit, every_s
        self.label = f"[{prefix}] {desc}" if prefix else desc
        self.mode = mode or progress_mode()
        self.n = 0
        self.started = self._last = time.perf_counter()
        self._bar = None
        if self.mode == "bars":  # each open bar of this process on a line of its own
            self._position = min(set(range(len(_OPEN) + 1)) - _OPEN)
            _OPEN.add(self._position)
            # tqdm_ray sends a bar's state at most once a second, on an update: work counted in few, slow units
            # (rounds, trials, stages: every_s 0 or None) sends every update, or the bar would show the one before
            self._bar = _ray_bar()(desc=self.label, total=total, unit=unit, position=self._position,
                                   flush_interval_s=0.0 if not every_s else None)
            self._bar.update(0)  # drawn from the start, at 0

    def update(self, n: int = 1) -> None:
        self.n += n
        if self._bar is not None:
            self._bar.update(n)
            return
        now = time.perf_counter()
        if (self.mode == "lines" and self.every_s is not None and now - self._last >= self.every_s
                and (self.total is None or self.n < self.total or self.every_s == 0)):
            self._last = now
            write_line(self.line(now))

    def line(self, now: float | None = None) -> str:
        """The progress as one line: count (and share), rate, elapsed and (with a total) time left."""
        elapsed = (now or time.perf_counter()) - self.started
        rate = self.n / elapsed if elapsed > 0 else 0.0
        count = f"{self.n}/{self.total} {self.unit} ({100 * self.n / self.total:.0f}%)" if self.total else \
            f"{self.n} {self.unit}"
        if not self.n:
            speed = "starting"
        elif rate >= 1:
            speed = f"{rate:.1f} {self.unit}/s"
        else:
            speed = f"{elapsed / self.n:.1f} s each"
        left = self.left(now)
        return f"{self.label}: {count}, {speed}, {duration(elapsed)} elapsed" + (f", {left}" if left else "")

    def left(self, now: float | None = None) -> str:
        """``"~12 s left"`` at the pace so far; empty without a total, before the first unit and after the last."""
        elapsed = (now or time.perf_counter()) - self.started
        if not self.total or not self.n or self.n >= self.total or elapsed <= 0:
            return ""
        return f"~{duration((self.total - self.n) * elapsed / self.n)} left"

    def wrap(self, iterable: Iterable[T]) -> Iterator[T]:
        """Yield from ``iterable``, one unit per item."""
        for item in iterable:
            yield item
            self.update()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
            _OPEN.discard(self._position)

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def track(iterable: Iterable[T], *, total: int, desc: str, unit: str = "it", prefix: str = "",
          every_s: float | None = 15.0) -> Iterator[T]:
    """Yield from ``iterable`` with a :class:`Progress` over it (one unit per item)."""
    with Progress(total, desc=desc, unit=unit, prefix=prefix, every_s=every_s) as bar:
        yield from bar.wrap(iterable)


def _ray_bar():
    """Ray's distributed tqdm bar, its state written to the worker's stdout directly: Ray Train V2 routes a
    worker's ``print`` through the root logger (at INFO, which equiray's workers keep quiet), so the driver would
    never see the state tqdm_ray prints."""
    import json

    import ray
    from ray.experimental import tqdm_ray

    class RayBar(tqdm_ray.tqdm):
        def _dump_state(self, force_flush: bool = False) -> None:
            if ray._private.worker.global_worker.mode != ray.WORKER_MODE:
                return super()._dump_state(force_flush)  # the driver: drawn here
            now = time.time()
            if not force_flush and now - self._last_flush_time < self._flush_interval_s:
                return
            self._last_flush_time = now
            sys.stdout.write(json.dumps(self._get_state()) + "\n")
            sys.stdout.flush()

    return RayBar


def trial_progress(total: int, *, prefix: str):
    """A Ray Tune callback (the driver's) that counts finished trials, early-stopped and failed ones included:
    a bar, or a line per trial with the time left at the pace so far."""
    from ray import tune

    class TrialProgress(tune.Callback):
        def __init__(self):
            self.bar: Progress | None = None

        def setup(self, **info) -> None:
            self.bar = Progress(total, desc="trials", unit="trials", prefix=prefix, every_s=0)

        def on_trial_complete(self, iteration, trials, trial, **info) -> None:
            if self.bar is not None:
                self.bar.update()

        on_trial_error = on_trial_complete

        def on_experiment_end(self, trials, **info) -> None:
            if self.bar is not None:
                self.bar.close()

    return TrialProgress()
