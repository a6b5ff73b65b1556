"""Progress with counts, rate and time left: lines where the output is a log, bars drawn by the driver (from a
Ray worker too) where it is a terminal."""
import time

import pytest

from equiray_pipelines import progress as progress_mod
from equiray_pipelines.progress import MODE_ENV, Progress, duration, progress_mode


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


@pytest.fixture
def clock(monkeypatch):
    c = Clock()
    monkeypatch.setattr(progress_mod.time, "perf_counter", c)
    return c


def test_lines_say_count_rate_elapsed_and_time_left_at_most_every_few_seconds(clock, capsys):
    bar = Progress(10, desc="training", unit="batches", prefix="pretrain", every_s=15, mode="lines")
    for _ in range(4):  # 4 batches in 8 s: nothing yet (under 15 s since the start)
        clock.now += 2
        bar.update()
    assert capsys.readouterr().out == ""
    clock.now += 8  # the 5th at 16 s: one line, 5 left at 3.2 s each
    bar.update()
    assert capsys.readouterr().out == \
        "[pretrain] training: 5/10 batches (50%), 3.2 s each, 16 s elapsed, ~16 s left\n"
    clock.now += 1
    bar.update(4)  # 1 s later: too soon for another line
    assert capsys.readouterr().out == ""
    clock.now += 20
    bar.update()  # the last unit: no line (the work's own result line follows it)
    assert capsys.readouterr().out == "" and bar.left() == ""


def test_one_line_per_unit_with_every_s_zero_and_the_rate_in_units_per_second(clock, capsys):
    bar = Progress(3, desc="nets trained", unit="nets", prefix="nfn zoo", every_s=0, mode="lines")
    clock.now += 0.5
    bar.update(2)
    clock.now += 0.25
    bar.update()
    assert capsys.readouterr().out.splitlines() == [
        "[nfn zoo] nets trained: 2/3 nets (67%), 4.0 nets/s, 0 s elapsed, ~0 s left",
        "[nfn zoo] nets trained: 3/3 nets (100%), 4.0 nets/s, 1 s elapsed"]


def test_left_is_for_lines_of_their_own_and_off_prints_nothing(clock, capsys):
    bar = Progress(4, desc="rounds", unit="rounds", every_s=None, mode="lines")
    assert bar.left() == ""  # nothing done: no pace yet
    clock.now += 40
    bar.update()
    assert bar.left() == "~2.0 min left" and capsys.readouterr().out == ""
    quiet = Progress(2, desc="x", mode="off", every_s=0)
    quiet.update(2)
    assert capsys.readouterr().out == ""


def test_the_mode_follows_the_environment_else_the_terminal(monkeypatch):
    monkeypatch.setenv(MODE_ENV, "Bars")
    assert progress_mode() == "bars"
    monkeypatch.setenv(MODE_ENV, "nonsense")  # not a mode: decided by the output, which is not a terminal here
    assert progress_mode() == "lines"
    assert [duration(s) for s in (4.4, 150, 9000)] == ["4 s", "2.5 min", "2.5 h"]


@pytest.mark.ray
def test_a_bar_in_a_ray_worker_is_drawn_by_the_driver(ray_session, monkeypatch):
    """In bars mode a worker's bar reaches the driver's bar manager (Ray's distributed tqdm) with its description,
    total, count and end; the driver draws it, the worker prints no line of its own."""
    from ray.experimental import tqdm_ray

    seen = []
    manager = tqdm_ray.instance()
    original = manager.process_state_update
    monkeypatch.setattr(manager, "process_state_update", lambda state: (seen.append(dict(state)), original(state)))

    @ray_session.remote
    def work():
        import os

        before = os.environ.get(MODE_ENV)
        os.environ[MODE_ENV] = "bars"
        try:
            with Progress(3, desc="remote work", unit="items", prefix="test") as bar:
                for _ in range(3):
                    bar.update()
                    time.sleep(1.1)  # past tqdm_ray's flush interval: every count is sent
        finally:  # the worker process serves other tests' tasks after this one
            if before is None:
                os.environ.pop(MODE_ENV)
            else:
                os.environ[MODE_ENV] = before
        return bar.mode

    assert ray_session.get(work.remote()) == "bars"
    deadline = time.time() + 30
    while time.time() < deadline and not any(s["desc"] == "[test] remote work" and s["closed"] for s in seen):
        time.sleep(0.2)
    mine = [s for s in seen if s["desc"] == "[test] remote work"]
    assert mine and mine[-1]["closed"] and mine[-1]["total"] == 3 and mine[-1]["x"] == 3
    assert mine[0]["unit"] == "items" and mine[0]["pid"] != __import__("os").getpid()  # drawn here, counted there
