"""Ensemble pipeline end to end on the shared local Ray: member groups on Train workers, MLflow, registry,
evaluation, and recovery from a killed worker."""
import dataclasses
import json
import os
import signal
import threading
import time
from pathlib import Path

import mlflow
import pytest
import torch

from equiray.config import load_config
from equiray.ensembles import load_group
from equiray_pipelines import tracking
from equiray_pipelines.ensemble import EnsembleConfig, run_eval, run_train
from equiray_pipelines.tracking import END_REASON

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def small_config(root: Path, **over) -> EnsembleConfig:
    base = {
        "data": {"source": "digits", "dir": str(root / "digits"), "max_train": None, "resize": None},
        "member": {"kwargs": {"width": 6}},
        "settings": [{"name": "sym+aug"}, {"name": "sym, no aug", "augment": False},
                     {"name": "asym+aug, inv init", "support": "asymmetric", "init": "invariant"}],
        "members": 4, "members_per_group": 2, "train": {"epochs": 2},
        "scaling": {"num_workers": 2, "cpus_per_worker": 0.5},
        "tracking": {"experiment": "test-ensemble"},
        "eval": {"max_eval": 100, "max_off_manifold": 50, "repeats": 3},
        "storage_path": str(root / "runs"),
    }
    for k, v in over.items():
        base[k] = {**base[k], **v} if isinstance(v, dict) and isinstance(base.get(k), dict) else v
    return load_config(EnsembleConfig, base)


@pytest.fixture(scope="module")
def trained(ray_session, tmp_path_factory):
    root = tmp_path_factory.mktemp("ensemble")
    mp = pytest.MonkeyPatch()
    uri = f"sqlite:///{root / 'mlflow.db'}"
    mp.setenv("MLFLOW_TRACKING_URI", uri)
    cfg = small_config(root)
    result = run_train(cfg)
    yield cfg, result, uri, root
    mp.undo()


def test_every_member_trained_and_logged_per_group(trained):
    cfg, result, uri, root = trained
    assert result.members == 12 and result.groups == 6 and result.restarts == 0
    client = mlflow.MlflowClient(uri)
    files = {a.path for a in client.list_artifacts(result.run_id, "members")}
    assert {f"members/group-{g:05d}.safetensors" for g in range(6)} <= files
    local = mlflow.artifacts.download_artifacts(run_id=result.run_id, artifact_path="members/group-00003.safetensors",
                                                tracking_uri=uri, dst_path=str(root / "dl"))
    mlflow.artifacts.download_artifacts(run_id=result.run_id, artifact_path="members/group-00003.json",
                                        tracking_uri=uri, dst_path=str(root / "dl"))
    group, meta = load_group(local)  # a member group loads on its own
    assert group.num_members == 2 and meta["setting"] == "sym, no aug" and meta["members"] == [6, 7]
    # every setting's members were trained with that setting's filter support (and init)
    from equiray.ensembles import symmetric_core
    from equiray.groups import cyclic
    from equiray.models import SUPPORTS

    for name, support in (("sym+aug", "symmetric"), ("asym+aug, inv init", "asymmetric")):
        ens = result.ensembles[name]
        assert torch.equal(ens.features__0__mask[0], SUPPORTS[support]), name
    core = symmetric_core(SUPPORTS["asymmetric"], cyclic(4))
    w = result.ensembles["asym+aug, inv init"].features__0__weight.detach()  # (N, O, C, 3, 3)
    assert (w * (1 - core)).abs().sum() > 0  # training moved weights off the invariant core (condition (a) fails)


def test_registered_ensemble_is_the_mean_of_its_members(trained):
    cfg, result, uri, root = trained
    mlflow.set_tracking_uri(uri)
    model, spec = tracking.load_model("models:/equiray-ensemble@champion")
    assert spec["setting"] == "sym+aug" and spec["kwargs"]["num_members"] == 4
    x = torch.rand(5, 1, 8, 8)
    members = result.ensembles["sym+aug"]
    torch.testing.assert_close(model(x), members.member_logits(x).mean(0))
    # MLflow's own API on raw images answers what the model says (the ensemble mean's softmax)
    import io

    import pandas as pd
    from PIL import Image

    pngs = []
    for img in (x[:, 0] * 255).round().to(torch.uint8).numpy():
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, "PNG")
        pngs.append(buf.getvalue())
    # (the ensemble mean's softmax at the temperature registered with the version; params override it)
    pyfunc = mlflow.pyfunc.load_model("models:/equiray-ensemble@champion")
    answer = pyfunc.predict(pd.DataFrame({"image": pngs}))
    temperature = float(tracking.model_version("models:/equiray-ensemble@champion").tags[tracking.TEMPERATURE_TAG])
    logits = model((x * 255).round() / 255)
    expected = (logits / temperature).softmax(-1)
    names = [str(c) for c in spec.get("classes") or range(10)]
    torch.testing.assert_close(torch.tensor(answer[names].to_numpy()), expected.double(), atol=1e-5, rtol=0)
    assert answer["class_index"].tolist() == expected.argmax(-1).tolist()
    assert answer["label"].tolist() == [names[k] for k in expected.argmax(-1).tolist()]
    raw = pyfunc.predict(pd.DataFrame({"image": pngs}), params={"temperature": 1.0})
    torch.testing.assert_close(torch.tensor(raw[names].to_numpy()), logits.softmax(-1).double(), atol=1e-5, rtol=0)


def test_eval_of_a_run_that_is_not_there_is_one_clear_error(trained, tmp_path, monkeypatch):
    from equiray.errors import EquirayError

    cfg, result, uri, root = trained
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    with pytest.raises(EquirayError, match="no run 'nosuchrun'.*without --run-id"):
        run_eval(cfg, run_id="nosuchrun", report_dir=tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'elsewhere' / 'mlflow.db'}")
    with pytest.raises(EquirayError, match="no MLflow store at"):
        run_eval(cfg, report_dir=tmp_path)
    assert not (tmp_path / "elsewhere").exists()


def test_eval_curves_plot_and_table(trained, tmp_path):
    cfg, result, uri, root = trained
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        out = run_eval(cfg, report_dir=tmp_path)  # finds the latest finished train run by itself
    assert out.run_id == result.run_id
    sizes = sorted({r["size"] for r in out.rows})
    assert sizes == [1, 2, 4]
    assert {(r["setting"], r["data"]) for r in out.rows} == {
        (s, d) for s in ("sym+aug", "sym, no aug", "asym+aug, inv init") for d in ("in-distribution", "off-manifold")}
    for r in out.rows:
        assert 1 <= r["osp"] <= 4 and r["kl"] >= 0
    assert Path(out.plot).is_file() and "| sym+aug | in-distribution | 1 |" in out.table
    artifacts = {a.path for a in mlflow.MlflowClient(uri).list_artifacts(result.run_id, "eval")}
    assert "eval/ensemble_invariance.png" in artifacts


def test_the_same_training_config_reuses_the_registered_ensemble(trained):
    from equiray_pipelines.tracking import config_hash
    from equiray_pipelines.ensemble import EnsembleTrain

    cfg, result, uri, root = trained
    other_eval = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, repeats=5))  # eval is not training
    again = run_train(other_eval, reuse=True)
    assert again.reused and again.run_id == result.run_id and again.version == result.version
    assert again.ensembles is None and again.champion == "sym+aug" and again.members == 12 and again.groups == 6
    assert again.accuracy == pytest.approx(result.accuracy)
    # sensitivity: another training config is other work
    more = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, epochs=3))
    assert config_hash(EnsembleTrain(more).fingerprint()) != config_hash(EnsembleTrain(cfg).fingerprint())


def _kill_a_train_worker_when(checkpoint_root: Path, stop: threading.Event, killed: list):
    from ray.util.state import list_actors

    from simcluster import checkpointed_rounds

    while not stop.is_set():
        if checkpointed_rounds(checkpoint_root) >= 2:
            for actor in list_actors(filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")]):
                os.kill(actor.pid, signal.SIGKILL)
                killed.append(actor.pid)
                return
        time.sleep(0.1)


@pytest.mark.long
def test_a_killed_worker_resumes_from_the_checkpoint(ray_session, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    cfg = small_config(tmp_path, members=8, members_per_group=4, train={"epochs": 6},
                       scaling={"num_workers": 1, "cpus_per_worker": 1.0},
                       settings=[{"name": "sym+aug"}], tracking={"experiment": "test-ensemble-kill"})
    stop, killed = threading.Event(), []
    killer = threading.Thread(target=_kill_a_train_worker_when, args=(tmp_path / "runs", stop, killed), daemon=True)
    killer.start()
    try:
        result = run_train(cfg)
    finally:
        stop.set()
        killer.join(5)
    assert killed, "the run finished before a worker could be killed"
    assert result.restarts >= 1
    assert result.members == 8 and result.ensembles["sym+aug"].num_members == 8  # each member once
    # members resumed mid-run end where uninterrupted training would: same seeds, generators and optimizer state
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow2.db'}")
        clean = run_train(dataclasses.replace(cfg, storage_path=str(tmp_path / "runs2")))
    x = torch.rand(4, 1, 8, 8)
    torch.testing.assert_close(result.ensembles["sym+aug"].member_logits(x),
                               clean.ensembles["sym+aug"].member_logits(x))


@pytest.mark.long
def test_two_thousand_members_each_once_with_artifacts_per_group(ray_session, tmp_path, monkeypatch):
    """Thousands of members through Ray Train (issue 21): 2,000 tiny members in 8 groups on two workers come back
    each exactly once, trained, as one ensemble; what the run leaves grows with the groups, not the members (two
    MLflow files per group, at most two checkpoints of one file per group); the stage says where its time went."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    cfg = small_config(tmp_path, members=2000, members_per_group=250, data={"max_train": 256},
                       member={"kwargs": {"width": 2}}, train={"epochs": 1}, settings=[{"name": "sym+aug"}],
                       eval={"max_eval": 200}, tracking={"experiment": "test-ensemble-thousands"})
    result = run_train(cfg)
    assert result.members == 2000 and result.groups == 8 and result.restarts == 0
    ids = sorted(m for ms in result.group_members.values() for m in ms)
    assert ids == list(range(2000))  # every member once
    ens = result.ensembles["sym+aug"]
    assert ens.num_members == 2000
    w = ens.features__0__weight.detach().flatten(1)
    assert len(torch.unique(w, dim=0)) == 2000  # 2,000 distinct members, not copies of a few
    assert len({n for ns in result.group_nodes.values() for n in ns}) >= 1
    assert all(len(ns) == 1 for ns in result.group_nodes.values())  # one epoch per group, recorded once
    files = [a.path for a in mlflow.MlflowClient().list_artifacts(result.run_id, "members")]
    assert len(files) == 2 * 8 + 1, files  # a .safetensors and a .json per group, and nodes.json
    stored = [f for f in (tmp_path / "runs").rglob("group-*.pt")]
    assert 8 <= len(stored) <= 2 * 8, len(stored)  # Ray Train keeps two checkpoints, a file per group each
    assert {"fit", "worker_train", "worker_checkpoint", "collect", "log_members", "evaluate",
            "log_model"} <= set(result.phase_seconds)
    assert result.phase_seconds["worker_train"] < result.phase_seconds["fit"]
    metrics = mlflow.MlflowClient().get_run(result.run_id).data.metrics
    assert metrics["seconds/fit"] == pytest.approx(result.phase_seconds["fit"])


def test_distilled_student_is_registered_and_measured(trained, tmp_path):
    from equiray_pipelines.distill import DistillConfig, run as run_distill

    cfg, result, uri, root = trained
    dcfg = load_config(DistillConfig, {
        "data": {"source": "digits", "dir": str(root / "digits"), "max_train": None},
        "student": {"kwargs": {"width": 6}}, "train": {"epochs": 2},
        "scaling": {"cpus_per_worker": 0.5}, "max_eval": 100, "storage_path": str(root / "runs")})
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        out = run_distill(dcfg, report_dir=tmp_path)
    rows = out.rows
    assert set(rows) == {"ensemble (teacher)", "student"}
    for m in rows.values():
        assert 1 <= m["osp"] <= 4 and m["kl"] >= 0 and m["ms_per_image"] > 0 and 0 <= m["accuracy"] <= 1
    assert "| student |" in out.table and (tmp_path / "distill_table.md").is_file()
    assert out.speedup == pytest.approx(rows["ensemble (teacher)"]["ms_per_image"] / rows["student"]["ms_per_image"])
    assert out.train_seconds > 0 and out.registered == "models:/equiray-student@champion" and not out.reused
    with pytest.MonkeyPatch.context() as mp:  # the same config and teacher version: the registered student
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        again = run_distill(dcfg, reuse=True)
    assert again.reused and (again.run_id, again.version) == (out.run_id, out.version)
    for who, m in rows.items():
        assert again.rows[who] == pytest.approx(m)
    assert again.speedup == pytest.approx(out.speedup) and again.train_seconds == pytest.approx(out.train_seconds)
    mlflow.set_tracking_uri(uri)
    student, spec = tracking.load_model("models:/equiray-student@champion")
    assert spec["teacher"] == "models:/equiray-ensemble@champion" and spec["kwargs"]["width"] == 6
    assert student(torch.rand(3, 1, 8, 8)).shape == (3, 10)
    # the teacher and the student are each registered with a temperature fitted on upright validation images
    client = mlflow.MlflowClient(uri)
    for name, made in (("equiray-ensemble", result), ("equiray-student", out)):
        mv = client.get_model_version_by_alias(name, "champion")
        assert mv.tags["calibration.view"] == "upright" and float(mv.tags["equiray.temperature"]) > 0, name
        assert float(mv.tags["calibration.upright_nll_before"]) > 0, name
    assert out.calibration["temperature"] == pytest.approx(float(mv.tags["equiray.temperature"]))


def _interrupted_cleanly(proc, out: str, uri: str, experiment: str) -> list:
    """One `interrupted` line last, exit 130, no traceback; returns the experiment's runs, newest first (the stage's
    run tagged with why it ended)."""
    assert proc.returncode == 130, out[-3000:]
    assert out.strip().splitlines()[-1].startswith("interrupted") and "Traceback" not in out, out[-3000:]
    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], order_by=["attributes.start_time DESC"])
    assert runs and runs[0].data.tags[END_REASON].startswith("interrupted")
    return runs


def test_ctrl_c_in_ensemble_training_is_one_line_130_and_a_killed_run(ray_session, tmp_path):
    """SIGINT while Ray Train's workers train member groups: `interrupted`, exit 130, no traceback, the run KILLED,
    no ensemble registered."""
    import yaml

    from drivers import driver_env, interrupt_once_training, start

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = dataclasses.asdict(small_config(tmp_path, train={"epochs": 500}, settings=[{"name": "sym+aug"}],
                                          tracking={"experiment": "test-ensemble-ctrl-c"}))
    (tmp_path / "ensemble.yaml").write_text(yaml.safe_dump(json.loads(json.dumps(cfg))))  # tuples as lists
    proc = start(["equiray_pipelines.ensemble", "train", "--config", "ensemble.yaml"], cwd=tmp_path,
                 env=driver_env(ray_session, uri))
    out = interrupt_once_training(proc, uri, "test-ensemble-ctrl-c")  # a group's first epoch logged
    runs = _interrupted_cleanly(proc, out, uri, "test-ensemble-ctrl-c")
    assert [r.info.status for r in runs] == ["KILLED"]
    assert not mlflow.MlflowClient(uri).search_registered_models()


def test_ctrl_c_in_distillation_is_one_line_130_and_a_killed_run(ray_session, trained, tmp_path):
    """SIGINT while the student trains on Ray Train: `interrupted`, exit 130, no traceback, the run KILLED, no new
    student version (the teacher, registered before, stays as it was)."""
    import yaml

    from drivers import driver_env, interrupt_once_training, start

    _, _, uri, root = trained
    (tmp_path / "distill.yaml").write_text(yaml.safe_dump({
        "data": {"source": "digits", "dir": str(root / "digits"), "max_train": None},
        "student": {"kwargs": {"width": 6}}, "train": {"epochs": 500}, "scaling": {"cpus_per_worker": 0.5},
        "max_eval": 100, "storage_path": str(tmp_path / "runs"),
        "tracking": {"experiment": "test-distill-ctrl-c", "registered_model": "test-student-ctrl-c"}}))
    client = mlflow.MlflowClient(uri)
    teacher = client.get_model_version_by_alias("equiray-ensemble", "champion").version
    proc = start(["equiray_pipelines.distill", "--config", "distill.yaml"], cwd=tmp_path,
                 env=driver_env(ray_session, uri))
    out = interrupt_once_training(proc, uri, "test-distill-ctrl-c", metric="distill_loss")
    runs = _interrupted_cleanly(proc, out, uri, "test-distill-ctrl-c")
    assert [r.info.status for r in runs] == ["KILLED"]
    assert not client.search_model_versions("name='test-student-ctrl-c'")
    assert client.get_model_version_by_alias("equiray-ensemble", "champion").version == teacher


def test_strong_members_are_copies_of_the_registered_backbone_each_turned_its_own_way(ray_session, tmp_path,
                                                                                      monkeypatch):
    """member.init_from: every member starts as the registered (BatchNorm) backbone, folded, and is fine-tuned under
    its own random angles on Ray Train; the registered ensemble loads back as those members, and the run logs the
    ensemble's accuracy at a random angle. Without frozen_bn the backbone is refused before anything starts."""
    from equiray.data import prepare, read_split
    from equiray.errors import ConfigError
    from equiray.models import AffineNorm2d, create_model
    from equiray.train import train_epoch

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    meta = prepare("digits", tmp_path / "digits")
    x, y = read_split(tmp_path / "digits", "train")
    torch.manual_seed(0)
    kwargs = {"channels": [8, 8, 8, 8], "stem_width": 8}
    backbone = create_model("resnet8", **kwargs)
    opt = torch.optim.Adam(backbone.parameters(), lr=0.01)
    for _ in range(2):
        train_epoch(backbone, ((x[i:i + 64], y[i:i + 64]) for i in range(0, len(y), 64)), opt)
    backbone.eval()
    mlflow.set_tracking_uri(uri)
    tracking.setup("test-strong-backbone", uri)
    with mlflow.start_run():
        model_uri = tracking.log_model(backbone, {"name": "resnet8", "in_chans": 1, "num_classes": 10,
                                                  "kwargs": kwargs, "classes": meta["classes"]})
    tracking.register(model_uri, "test-strong-backbone", "pretrained")

    strong = {"init_from": "models:/test-strong-backbone@pretrained", "frozen_bn": True}
    over = dict(settings=[{"name": "so2", "augment": False, "rotations": "so2"}], members=2, members_per_group=2,
                train={"epochs": 1, "lr": 0.001}, scaling={"num_workers": 1, "cpus_per_worker": 1},
                tracking={"experiment": "test-strong", "registered_model": "test-strong-ensemble"})
    with pytest.raises(ConfigError, match="uses BatchNorm.*member.frozen_bn: true"):
        run_train(small_config(tmp_path, member={"init_from": strong["init_from"]}, **over))
    result = run_train(small_config(tmp_path, member=strong, **over))

    ens = result.ensembles["so2"]
    assert ens.spec.name == "resnet8" and ens.spec.kwargs == kwargs and ens.spec.frozen_bn
    loaded, spec = tracking.load_model("models:/test-strong-ensemble@champion")
    assert spec["kwargs"]["member_frozen_bn"] and any(isinstance(m, AffineNorm2d) for m in loaded._base.modules())
    xt = x[:32]
    torch.testing.assert_close(loaded(xt), ens.eval()(xt))
    members = ens.member_logits(xt)
    before = backbone(xt)
    assert not torch.allclose(members[0], before, atol=1e-4) and not torch.allclose(members[0], members[1], atol=1e-4)
    metrics = mlflow.MlflowClient(uri).get_run(result.run_id).data.metrics
    assert 0 <= metrics["test_accuracy_so2/so2"] <= 1 and "test_accuracy/so2" in metrics

    # its student learns it at any angle: the same turned images for teacher and student, measured at SO(2) too
    from equiray_pipelines.distill import DistillConfig, run as run_distill

    out = run_distill(load_config(DistillConfig, {
        "teacher": "models:/test-strong-ensemble@champion", "rotations": "so2",
        "data": {"source": "digits", "dir": str(tmp_path / "digits")}, "student": {"kwargs": {"width": 4}},
        "train": {"epochs": 1}, "scaling": {"cpus_per_worker": 1}, "max_eval": 100,
        "storage_path": str(tmp_path / "runs"),
        "tracking": {"experiment": "test-strong-distill", "registered_model": "test-strong-student"}}))
    assert "SO(2)-avg accuracy" in out.table and 0 <= out.rows["student"]["so2_accuracy"] <= 1
    assert out.rows["ensemble (teacher)"]["so2_accuracy"] == pytest.approx(metrics["test_accuracy_so2/so2"],
                                                                           abs=0.2)
