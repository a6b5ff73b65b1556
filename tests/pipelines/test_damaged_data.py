"""A damaged shard, in every stage that reads one (issue 20): the stage names the file in one `error:` line, exits
with status 2, leaves no run RUNNING, registers nothing and writes nothing. Each stage runs as its own driver, the
way a user's command runs, on the session's shared Ray."""
import subprocess
import sys

import mlflow
import numpy as np
import pytest

from equiray.data import prepare
from equiray_pipelines.tracking import END_REASON

from drivers import ROOT, driver_env

sys.path.insert(0, str(ROOT / "tests" / "data"))
from test_parquet import damage  # noqa: E402 - the same damage as the data layer's own tests

pytestmark = [pytest.mark.ray]

# each stage's command; data.dir and data.source come from the test (the stages that need an upstream model check
# the data first, so none is registered here)
STAGES = {
    "pretrain": ["equiray_pipelines.pretrain"],
    "ensemble": ["equiray_pipelines.ensemble", "train"],
    "distill": ["equiray_pipelines.distill"],
    "canon": ["equiray_pipelines.canon", "sweep"],
    "ftp": ["equiray_pipelines.ftp", "tune"],
    "robust": ["equiray_pipelines.robust"],
    "nfn zoo": ["equiray_pipelines.nfn", "zoo", "--set", "out=zoo"],
}


@pytest.fixture
def damaged_digits(tmp_path):
    """Digits prepared as a stage prepares them, one training shard's pages damaged behind an intact footer."""
    prepare("digits", tmp_path / "digits", rows_per_shard=400)
    shard = tmp_path / "digits" / "train" / "part-00001.parquet"
    damage(shard)
    return shard


def run_stage(args, tmp_path, ray_session, uri):
    return subprocess.run([sys.executable, "-m", *args, "--report-dir", "report"], cwd=tmp_path,
                          env=driver_env(ray_session, uri), capture_output=True, text=True, timeout=600)


def assert_nothing_left(tmp_path, uri):
    client = mlflow.MlflowClient(uri)
    runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
    assert not [r for r in runs if r.info.status == "RUNNING"]
    assert not client.search_registered_models()
    assert not any(tmp_path.glob("report/*")) and not list(tmp_path.glob(".*partial*"))
    return runs


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_a_damaged_shard_is_named_before_the_stage_starts(stage, damaged_digits, ray_session, tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    proc = run_stage([*STAGES[stage], "--set", "data.source=digits", "--set", f"data.dir={tmp_path / 'digits'}"],
                     tmp_path, ray_session, uri)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"error: {damaged_digits} is not a readable Parquet shard "
        f"({proc.stderr.split('(', 1)[1].split(')')[0]}); prepare the dataset again with --overwrite"], proc.stderr
    assert "Ray" not in proc.stdout + proc.stderr  # caught before Ray was joined (it says `connecting to ...`)
    assert assert_nothing_left(tmp_path, uri) == []
    assert not (tmp_path / "zoo").exists()


def test_a_damaged_zoo_shard_is_named(ray_session, tmp_path):
    from equiray_pipelines.nfn.zoo import write_zoo

    rng = np.random.default_rng(0)
    rows = [{"net_id": i, "weights": rng.bytes(2000), "layout": "[]", "test_accuracy": 0.5} for i in range(300)]
    write_zoo(rows, tmp_path / "zoo", {"nets": 300})
    damage(tmp_path / "zoo" / "part-00000.parquet", column=1)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    proc = run_stage(["equiray_pipelines.nfn", "train", "--set", f"zoo={tmp_path / 'zoo'}"], tmp_path, ray_session,
                     uri)
    assert proc.returncode == 2, proc.stderr
    [line] = proc.stderr.strip().splitlines()
    assert line.startswith(f"error: {tmp_path / 'zoo' / 'part-00000.parquet'} is not a readable Parquet shard")
    assert line.endswith(f"build the zoo again with `equiray nfn zoo --set out={tmp_path / 'zoo'} "
                         "--set overwrite=true`")
    assert assert_nothing_left(tmp_path, uri) == []


@pytest.mark.slow
def test_a_shard_damaged_where_only_the_read_notices_ends_the_run_failed_and_named(ray_session, tmp_path):
    """``data.verify: footers`` (what a dataset over a GiB gets): the footers pass, a Train worker's Ray Data read
    fails on the damaged page header, and the stage reads the shards through to name the one that failed. The run
    ends FAILED with that line as its reason; nothing is registered."""
    prepare("digits", tmp_path / "digits", rows_per_shard=400)
    shard = tmp_path / "digits" / "train" / "part-00001.parquet"
    damage(shard, where="header")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    proc = run_stage(["equiray_pipelines.pretrain", "--set", "data.source=digits",
                      "--set", f"data.dir={tmp_path / 'digits'}", "--set", "data.verify=footers",
                      "--set", "model.kwargs={width: 8}", "--set", "train.epochs=1",
                      "--set", "scaling.cpus_per_worker=0.5", "--set", "train.batch_size=64", "--set", f"storage_path={tmp_path / 'runs'}",
                      "--set", "tracking.experiment=test-damaged"], tmp_path, ray_session, uri)
    assert proc.returncode == 2, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: {shard} is not a readable Parquet shard"), proc.stderr[-3000:]
    [run] = assert_nothing_left(tmp_path, uri)
    assert run.info.status == "FAILED" and run.data.tags[END_REASON] == f"DataError: {last.removeprefix('error: ')}"
