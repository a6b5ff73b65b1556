"""The canonicalization sweep end to end: variants as real Ray Tune trials on the shared local Ray, nested MLflow
runs in a real SQLite store, the champion registered and loaded back without unpickling."""
import mlflow
import pytest
import torch

from equiray.canon import CanonicalizedModel
from equiray.config import load_config
from equiray.data import read_split
from equiray.errors import ConfigError
from equiray.groups import get_group
from equiray.models import create_model
from equiray.train import train_epoch
from equiray_pipelines import tracking
from equiray_pipelines.canon import CanonConfig, run_sweep
from equiray_pipelines.cli import main

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def register_backbone(data_dir, uri):
    """A real small backbone trained in-process on upright digits and registered as the sweep's starting point."""
    from equiray.data import prepare

    meta = prepare("digits", data_dir)
    x, y = read_split(data_dir, "train")
    torch.manual_seed(0)
    model = create_model("small_cnn", width=8)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(3):
        train_epoch(model, ((x[i:i + 64], y[i:i + 64]) for i in range(0, len(y), 64)), opt)
    mlflow.set_tracking_uri(uri)
    tracking.setup("test-backbone", uri)
    with mlflow.start_run():
        model_uri = tracking.log_model(model, {"name": "small_cnn", "in_chans": 1, "num_classes": 10,
                                                "kwargs": {"width": 8}, "classes": meta["classes"]})
    tracking.register(model_uri, "test-backbone", "pretrained")


def small_config(root, **over) -> CanonConfig:
    base = {
        "backbone": "models:/test-backbone@pretrained",
        "data": {"source": "digits", "dir": str(root / "digits"), "max_train": 800, "max_eval": 200},
        "grid": {"kind": ["equivariant", "optimized"], "group": ["C4"], "prior_weight": [0, 100],
                 "backbone": ["finetune"]},
        "canonicalizers": {"equivariant": {"channels": 4, "kernel_size": 3},
                           "optimized": {"network": "small_cnn", "network_kwargs": {"width": 4}, "embed_dim": 8}},
        "train": {"epochs": 2, "batch_size": 64, "prior_beta": 10.0},  # a sharper prior for so short a run
        "eval_group": "C4",
        "curve_step": 45.0,
        "resources": {"cpus_per_trial": 0.5},
        "tracking": {"experiment": "test-canon"},
        "storage_path": str(root / "runs"),
        **over,
    }
    return load_config(CanonConfig, base)


@pytest.fixture(scope="module")
def swept(ray_session, tmp_path_factory):
    root = tmp_path_factory.mktemp("canon")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    mp = pytest.MonkeyPatch()
    mp.setenv("MLFLOW_TRACKING_URI", uri)
    register_backbone(root / "digits", uri)
    cfg = small_config(root)
    result = run_sweep(cfg, report_dir=root / "report")
    yield cfg, result, uri, root
    mp.undo()


def test_every_variant_is_a_nested_mlflow_run(swept):
    cfg, result, uri, root = swept
    names = [v.name for v in cfg.variants()]
    assert len(names) == 6 and [r["name"] for r in result.rows] == names
    client = mlflow.MlflowClient(uri)
    children = client.search_runs([client.get_experiment_by_name("test-canon").experiment_id],
                                  f"tags.mlflow.parentRunId = '{result.run_id}'")
    assert sorted(r.info.run_name for r in children) == sorted(names)
    for run in children:
        assert run.info.status == "FINISHED"
        m = run.data.metrics
        assert {"upright_accuracy", "cn_avg_accuracy", "so2_accuracy", "o2_accuracy", "train_loss",
                "ms_per_image"} <= set(m)
        assert 0.0 <= m["cn_avg_accuracy"] <= 1.0 and 0.0 <= m["so2_accuracy"] <= 1.0
        if run.data.params["variant.kind"] != "none":
            assert "identity_rate" in m and "train_prior_loss" in m
    for r in result.rows:
        assert r["ms_per_image"] > 0 and r["backbone_ms_per_image"] > 0
    assert (root / "report" / "canon_variants.png").stat().st_size > 10_000
    assert (root / "report" / "canon_angles.png").stat().st_size > 10_000
    assert str(root / "report" / "canon_angles.png") in result.plots
    assert "| variant | upright acc | C4-avg acc | SO(2)-avg acc | O(2)-avg acc | identity rate |" in result.table


def test_canonicalized_variants_are_invariant_and_the_plain_fine_tune_is_not(swept):
    """What the sweep measured: every canonicalized variant's C4-avg accuracy equals its upright accuracy
    (exact invariance on the pixel grid), while plain fine-tuning loses accuracy on rotated inputs."""
    cfg, result, uri, root = swept
    rows = {r["name"]: r for r in result.rows}
    for name, r in rows.items():
        rot = [r[f"accuracy_rot_{e}"] for e in range(4)]
        curve = [r[f"accuracy_angle_{d}"] for d in range(0, 360, 45)]
        assert curve[0] == pytest.approx(r["upright_accuracy"], abs=1e-6), name  # its 0 is the upright test set
        if r["kind"] != "none":
            assert max(rot) - min(rot) < 1e-9, name
            assert curve[0] == curve[2] == curve[4] == curve[6], name  # quarter turns: exact invariance
    plain = rows["fine-tune"]
    assert plain["cn_avg_accuracy"] < plain["upright_accuracy"] - 0.2
    # the prior keeps upright inputs upright: far more of them map to the identity than without it
    for kind in ("equivariant", "optimized"):
        with_prior = rows[f"{kind} C4, prior 100, finetune"]["identity_rate"]
        without = rows[f"{kind} C4, no prior, finetune"]["identity_rate"]
        # relative, not absolute: at this test's scale (digits, 2 epochs) the level depends on the backbone the
        # fixture pretrains (0.40-0.9 seen with the prior); the gap to the no-prior variant has held
        assert with_prior > without + 0.15, (kind, with_prior, without)


def test_champion_is_registered_and_loads_back_invariant(swept):
    cfg, result, uri, root = swept
    mlflow.set_tracking_uri(uri)
    best = max(result.rows, key=lambda r: (r["cn_avg_accuracy"], r["upright_accuracy"]))
    assert result.champion == best["name"]
    assert result.registered == "models:/equiray-canon@champion" and result.plots[0] == result.plot
    mv = mlflow.MlflowClient(uri).get_model_version_by_alias("equiray-canon", "champion")
    assert str(mv.version) == result.version and mv.source == result.model_uri == best["model_uri"]
    assert mv.tags["variant"] == best["name"] and mv.tags["run_id"] == best["run_id"]
    assert mv.tags["sweep_run_id"] == result.run_id and mv.tags["cn_avg_accuracy"] == f"{best['cn_avg_accuracy']:.4f}"
    model, spec = tracking.load_model("models:/equiray-canon@champion")
    x, y = read_split(root / "digits", "test", limit=cfg.data.max_eval)
    g = get_group("C4")
    with torch.no_grad():
        acc = [float((model(g.act(x, e)).argmax(-1) == y).float().mean()) for e in g.elements()]
    assert sum(acc) / 4 == pytest.approx(best["cn_avg_accuracy"], abs=1e-6)
    if isinstance(model, CanonicalizedModel):
        assert spec["name"] == "canonicalized"
        with torch.no_grad():
            elements = model.canonicalize(x[:16]).element
            assert torch.equal(model.canonicalize(g.act(x[:16], 1)).element, g.compose(torch.tensor(1), elements))


def test_same_config_reuses_the_champion(swept):
    cfg, result, uri, root = swept
    again = run_sweep(cfg, report_dir=root / "report2", reuse=True)
    assert again.reused and again.version == result.version and again.table == result.table
    assert again.rows == result.rows and again.champion == result.champion and again.run_id == result.run_id
    assert (root / "report2" / "canon_variants.png").exists()


def test_robust_champion_judges_every_variant_the_same_way_and_is_what_serve_loads(swept, capsys):
    """`equiray robust` on the sweep: every variant and the backbone judged on the same views (a candidate that is
    not registered is left out with a line), the champion chosen by the rule, registered as
    equiray-robust@champion (serve's default model), and the same config reused."""
    from equiray_pipelines.robust import RobustConfig, run as run_robust
    from equiray_pipelines.robust.report import champion
    from equiray_pipelines.serve import ServeConfig

    cfg, result, uri, root = swept
    mlflow.set_tracking_uri(uri)
    rcfg = load_config(RobustConfig, {
        "backbone": "models:/test-backbone@pretrained",
        "candidates": ["canon", "tta:C4", "models:/equiray-student@champion"],
        "data": {"source": "digits", "dir": str(root / "digits"), "max_eval": 200}, "cn_group": "C4",
        "curve_step": 45.0, "curve_images": 100, "latency_batch": 32})
    robust = run_robust(rcfg, report_dir=root / "robust")
    assert "left out: models:/equiray-student@champion is not registered" in capsys.readouterr().out
    assert [r["name"] for r in robust.rows] == [f"canon: {r['name']}" for r in result.rows] + [
        "backbone + C4 test-time averaging"]
    tta = robust.rows[-1]  # the backbone averaged over C4: invariant to quarter turns, as the canonicalizers
    assert tta["accuracy_angle_90"] == tta["accuracy_angle_0"]
    best, met = champion(robust.rows, robust.backbone["upright_accuracy"], 1.0, level=rcfg.so2_level)
    assert robust.champion == best["name"] and robust.rule_met == met
    x, y = read_split(root / "digits", "test", limit=200)
    for r in robust.rows[:-1]:  # the same upright test set the sweep judged on: the same upright accuracy
        swept_row = next(s for s in result.rows if f"canon: {s['name']}" == r["name"])
        assert r["upright_accuracy"] == pytest.approx(swept_row["upright_accuracy"], abs=1e-6), r["name"]
        if swept_row["kind"] != "none":  # exactly C4-invariant: the grid's mean is the upright accuracy (100 images)
            assert r["accuracy_angle_90"] == r["accuracy_angle_0"], r["name"]
            assert r["cn_avg_accuracy"] == pytest.approx(r["accuracy_angle_0"], abs=1e-6), r["name"]
    assert ServeConfig().model == robust.registered == "models:/equiray-robust@champion"
    mv = mlflow.MlflowClient(uri).get_model_version_by_alias("equiray-robust", "champion")
    assert mv.source == best["uri"] and mv.tags["candidate"] == best["name"]
    assert mv.tags["rule_met"] == str(met).lower() and (root / "robust" / "robust_angles.png").exists()
    # calibrated: a temperature fitted on the validation split, stored with the version, that lowers the NLL at
    # any angle on the test split (what the endpoint's probabilities are divided by)
    t = float(mv.tags["equiray.temperature"])
    assert t > 0 and t != 1.0
    assert float(mv.tags["calibration.so2_nll_after"]) <= float(mv.tags["calibration.so2_nll_before"])
    assert any(line.startswith("calibration: temperature") for line in robust.verdict)
    # the test logits its judge computed are the ones calibration would compute: the same numbers anew
    from equiray_pipelines.calibration import calibrate_model

    anew = calibrate_model(best["uri"], read_split(root / "digits", "val", limit=200), (x, y), fit_view="o2",
                           seed=rcfg.seed, batch_size=rcfg.batch_size)
    assert mv.tags["calibration.view"] == "o2" and robust.calibration["temperature"] == pytest.approx(t)
    assert t == pytest.approx(anew["temperature"], rel=1e-5)
    for k in ("upright_ece_after", "so2_ece_after", "so2_nll_before"):
        assert float(mv.tags[f"calibration.{k}"]) == pytest.approx(anew[k], abs=1e-4), k
    model, _ = tracking.load_model("models:/equiray-robust@champion")
    with torch.no_grad():
        acc = float((model(x).argmax(-1) == y).float().mean())
    assert acc == pytest.approx(best["upright_accuracy"], abs=1e-6)
    again = run_robust(rcfg, report_dir=root / "robust2", reuse=True)
    assert again.reused and again.version == robust.version and again.rows == robust.rows
    assert again.table == robust.table and (root / "robust2" / "robust_angles.png").exists()


def test_gpu_fractions_and_bad_configs(tmp_path):
    cfg = small_config(tmp_path, resources={"cpus_per_trial": 1, "gpus_per_trial": 0.25})
    assert cfg.resources.gpus_per_trial == 0.25
    with pytest.raises(ConfigError, match="grid.kind"):
        small_config(tmp_path, grid={"kind": ["magic"]})
    with pytest.raises(ConfigError, match="baselines"):
        small_config(tmp_path, baselines=["nope"])
    with pytest.raises(ConfigError):
        small_config(tmp_path, gird={})
    with pytest.raises(ConfigError, match="train.lr_schedule: one of constant, one_cycle, not 'cosine'"):
        small_config(tmp_path, train={"lr_schedule": "cosine"})
    with pytest.raises(ConfigError, match="mix: true mixes the best canonicalized variant with the best baseline"):
        small_config(tmp_path, baselines=[], mix=True)
    with pytest.raises(ConfigError, match="mix_weight"):
        small_config(tmp_path, mix=True, mix_weight=1.0)
    with pytest.raises(ConfigError, match="mix_tta: two entries"):
        small_config(tmp_path, baselines=["o2"], mix=True, mix_tta=["D1"])
    with pytest.raises(ConfigError, match="C3 is not a subgroup of C8"):
        small_config(tmp_path, baselines=["o2"], mix=True, mix_tta=["C8/C3", ""])
    with pytest.raises(ConfigError, match="unknown group 'X2'"):
        small_config(tmp_path, baselines=["o2"], mix=True, mix_tta=["", "X2"])
    with pytest.raises(ConfigError, match="set mix: true"):
        small_config(tmp_path, baselines=["o2"], mix_tta=["", "D1"])
    from equiray_pipelines.robust import RobustConfig

    with pytest.raises(ConfigError, match="canon:models:/NAME@ALIAS"):
        load_config(RobustConfig, {"candidates": ["canon:equiray-canon"]})
    assert load_config(RobustConfig, {"candidates": ["canon:models:/x@y"]}).candidates == ("canon:models:/x@y",)
    with pytest.raises(ConfigError, match="baseline_epochs >= 1"):
        small_config(tmp_path, train={"baseline_epochs": 0})


def test_a_mixture_of_the_best_canonicalized_variant_and_the_best_baseline(ray_session, tmp_path, monkeypatch):
    """`mix: true`: the sweep also judges the probability mixture of its best canonicalized variant and its best
    baseline, as a run of its own nested under the sweep's with the model logged; loaded back it is that
    mixture of the two members' models, each averaged at test time as `mix_tta` says (the C4-canonicalized one
    also at 45 degrees, the baseline also mirrored); the baseline trains its own `baseline_epochs`."""
    from equiray.models import Mixture, OrbitAveraged

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    register_backbone(tmp_path / "digits", uri)
    cfg = small_config(tmp_path, baselines=["o2"], grid={"kind": ["equivariant"], "group": ["C4"],
                                                         "prior_weight": [100], "backbone": ["finetune"]},
                       train={"epochs": 1, "batch_size": 64, "baseline_epochs": 2, "upright_share": 0.3},
                       mix=True, mix_weight=0.7, mix_tta=["C8/C4", "D1"], curve_step=0.0, select="so2_accuracy",
                       tracking={"experiment": "test-canon-mix", "registered_model": "test-canon-mix"})
    result = run_sweep(cfg, report_dir=tmp_path / "report")
    baseline, canon, mix = result.rows
    assert mix["kind"] == "mixture" and mix["name"] == (f"mixture: {canon['name']} (0.7, averaged over C8/C4) + "
                                                        f"{baseline['name']} (0.3, averaged over D1)")
    assert mix["ms_per_image"] > 0 and 0.0 <= mix["so2_accuracy"] <= 1.0
    client = mlflow.MlflowClient(uri)
    run = client.get_run(mix["run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["mlflow.parentRunId"] == result.run_id
    assert run.data.tags["member_0_model_uri"] == canon["model_uri"]
    assert run.data.tags["member_1_model_uri"] == baseline["model_uri"]
    assert len(client.get_metric_history(baseline["run_id"], "train_loss")) == 2  # baseline_epochs
    assert len(client.get_metric_history(canon["run_id"], "train_loss")) == 1
    mlflow.set_tracking_uri(uri)
    model, spec = tracking.load_model(mix["model_uri"])
    members = [tracking.load_model(r["model_uri"])[0] for r in (canon, baseline)]
    assert isinstance(model, Mixture) and spec["name"] == "mixture" and spec["kwargs"]["weights"] == pytest.approx([0.7, 0.3])
    x, y = read_split(tmp_path / "digits", "test", limit=cfg.data.max_eval)
    assert [type(m) for m in model.members] == [OrbitAveraged, OrbitAveraged]
    with torch.no_grad():
        at_45 = get_group("C8").act(x, 1, padding="zeros")
        canon_avg = (members[0](x).softmax(-1) + members[0](at_45).softmax(-1)) / 2
        base_avg = (members[1](x).softmax(-1) + members[1](x.flip(-1)).softmax(-1)) / 2
        by_hand = 0.7 * canon_avg + 0.3 * base_avg
        torch.testing.assert_close(model(x).exp(), by_hand)
        assert float((model(x).argmax(-1) == y).float().mean()) == pytest.approx(mix["upright_accuracy"], abs=1e-6)
    best = max(result.rows, key=lambda r: (r["so2_accuracy"], r["upright_accuracy"]))
    assert result.champion == best["name"]
    # its temperature is fitted on what the champion was trained on: the O(2)-turned images for the baseline,
    # upright ones for the canonicalized variant (its grid trains upright) and so for the mixture led by it
    trained_on = {"o2": "o2"}.get(best.get("rotations"), "upright")
    mv = client.get_model_version_by_alias("test-canon-mix", "champion")
    assert mv.tags["calibration.view"] == result.calibration["view"] == trained_on
    assert float(mv.tags["equiray.temperature"]) == pytest.approx(result.calibration["temperature"])
    assert result.calibration["temperature"] > 0
    # `equiray robust` with canon:URI judges every row of the sweep behind URI, the mixture among them, the same way
    from equiray_pipelines.robust import RobustConfig, run as run_robust

    rcfg = load_config(RobustConfig, {
        "backbone": "models:/test-backbone@pretrained", "candidates": ["canon:models:/test-canon-mix@champion"],
        "data": {"source": "digits", "dir": str(tmp_path / "digits"), "max_eval": 200}, "cn_group": "C4",
        "curve_step": 0.0, "curve_images": 100, "latency_batch": 32,
        "tracking": {"experiment": "test-robust-mix", "registered_model": "test-robust-mix"}})
    robust = run_robust(rcfg, report_dir=tmp_path / "robust")
    assert [r["name"] for r in robust.rows] == [f"test-canon-mix: {r['name']}" for r in result.rows]
    for judged, swept_row in zip(robust.rows, result.rows):  # the same upright test images: the same accuracy
        assert judged["upright_accuracy"] == pytest.approx(swept_row["upright_accuracy"], abs=1e-6)


def test_cli_missing_backbone_is_one_clear_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'empty.db'}")
    code = main(["canon", "sweep", "--set", "backbone=models:/nothing-here@pretrained",
                 "--set", f"data.dir={tmp_path / 'digits'}", "--set", "data.source=digits",
                 "--report-dir", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert code == 2 and "error: cannot load models:/nothing-here@pretrained" in err and "Traceback" not in err
    assert not (tmp_path / "r").exists()


def test_ctrl_c_stops_the_sweep_with_one_line_and_ends_its_run(ray_session, tmp_path):
    """SIGINT to a sweep running as its own driver on the shared Ray, once a trial is training: Tune stops the
    trials, the command prints `interrupted` (no traceback), exits 130 and leaves no MLflow run RUNNING (the
    sweep's, and every started trial's, KILLED)."""
    import yaml

    from drivers import driver_env, interrupt_once_training, start

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    register_backbone(tmp_path / "digits", uri)
    raw = to_plain(small_config(tmp_path, train={"epochs": 50, "batch_size": 16}, grid={
        "kind": ["equivariant"], "group": ["C4"], "prior_weight": [0], "backbone": ["finetune"]}))
    (tmp_path / "canon.yaml").write_text(yaml.safe_dump(raw))
    proc = start(["equiray_pipelines.canon", "sweep", "--config", str(tmp_path / "canon.yaml")], cwd=tmp_path,
                 env=driver_env(ray_session, uri))
    err = interrupt_once_training(proc, uri, "test-canon")
    client = mlflow.MlflowClient(uri)
    assert proc.returncode == 130, err
    assert err.strip().splitlines()[-1] == "interrupted" and "Traceback" not in err, err
    exp = client.get_experiment_by_name("test-canon")
    runs = client.search_runs([exp.experiment_id])
    statuses = {r.info.run_name: r.info.status for r in runs}
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1 and len(runs) > 1, statuses  # the sweep's run and the trials that had started
    assert set(statuses.values()) == {"KILLED"}, statuses
    assert all(r.data.tags[tracking.END_REASON].startswith("interrupted") for r in runs)  # each says why


def test_ctrl_c_in_the_robust_selection_ends_its_run_and_registers_nothing(ray_session, tmp_path):
    """SIGINT to `equiray robust` while its Ray tasks judge the candidates (the backbone and its test-time averages,
    read along a 1-degree curve so the judging lasts): one `interrupted` line and no traceback, exit 130, its MLflow
    run KILLED, no champion registered, nothing in the report folder (issue 20)."""
    import yaml

    from drivers import driver_env, interrupt_once_running, start

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    register_backbone(tmp_path / "digits", uri)
    (tmp_path / "robust.yaml").write_text(yaml.safe_dump({
        "backbone": "models:/test-backbone@pretrained", "candidates": ["tta:C8", "tta:D8", "tta:D16"],
        "data": {"source": "digits", "dir": str(tmp_path / "digits")}, "cn_group": "C4", "curve_step": 1.0,
        "curve_images": 360, "tracking": {"experiment": "test-robust-int", "registered_model": "test-robust-int"}}))
    proc = start(["equiray_pipelines.robust", "--config", "robust.yaml", "--report-dir", "report"], cwd=tmp_path,
                 env=driver_env(ray_session, uri))
    err = interrupt_once_running(proc, uri, "test-robust-int")
    client = mlflow.MlflowClient(uri)
    assert proc.returncode == 130, err
    assert err.strip().splitlines()[-1].startswith("interrupted") and "Traceback" not in err, err
    exp = client.get_experiment_by_name("test-robust-int")
    assert {r.info.status for r in client.search_runs([exp.experiment_id])} == {"KILLED"}
    assert not [m for m in client.search_registered_models() if m.name == "test-robust-int"]
    assert not any(tmp_path.glob("report/*"))  # no plot, no table


def to_plain(cfg):
    from equiray.config import to_dict

    return to_dict(cfg)


@pytest.mark.long
def test_a_run_prints_equirays_lines_not_the_libraries(ray_session, tmp_path):
    """Ray Train (pretrain: its workers, controller, Ray Data) and Tune (a sweep: trials, tables) as a user runs
    them: fewer than 5% of the lines they print are the libraries' own (issue 20; the demo's log read 44%)."""
    import subprocess
    import sys

    import yaml

    from drivers import driver_env
    from logfilter import library_lines

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    register_backbone(tmp_path / "digits", uri)
    sweep = to_plain(small_config(tmp_path, train={"epochs": 1, "batch_size": 64}, grid={
        "kind": ["equivariant"], "group": ["C4"], "prior_weight": [0, 100], "backbone": ["finetune"]}))
    (tmp_path / "canon.yaml").write_text(yaml.safe_dump(sweep))
    (tmp_path / "pretrain.yaml").write_text(yaml.safe_dump({
        "data": {"source": "digits", "dir": str(tmp_path / "digits")},
        "model": {"name": "small_cnn", "kwargs": {"width": 8}}, "train": {"epochs": 2, "batch_size": 64},
        "scaling": {"cpus_per_worker": 0.5}, "tracking": {"experiment": "test-quiet"},
        "storage_path": str(tmp_path / "runs")}))
    env = driver_env(ray_session, uri)
    printed = ""
    for args in (["equiray_pipelines.pretrain", "--config", "pretrain.yaml"],
                 ["equiray_pipelines.canon", "sweep", "--config", "canon.yaml"]):
        res = subprocess.run([sys.executable, "-m", *args], cwd=tmp_path, env=env, capture_output=True, text=True,
                             timeout=600)
        assert res.returncode == 0, res.stderr[-3000:]
        printed += res.stdout + res.stderr
    found, total = library_lines(printed)
    assert total > 20  # the runs said what they did: epochs, tables, what was registered
    # and how far they were: the sweep counts its trials with the time left (a line each: not a terminal)
    assert "[canon] trials: 1/4 trials (25%), " in printed and " left\n" in printed  # two variants, two baselines
    assert "[canon] trials: 4/4 trials (100%), " in printed
    assert len(found) < 0.05 * total, f"{len(found)} of {total} lines are the libraries':\n" + "\n".join(found)
