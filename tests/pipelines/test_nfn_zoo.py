"""The model-zoo pipelines end to end on the shared local Ray: real Ray tasks, Parquet out, nets that load back;
vectorized zoo training equal to training the nets one by one; metanetworks fitted, logged and registered."""
import dataclasses

import pytest
import torch
import torch.nn.functional as F

from equiray.config import load_config
from equiray.data import read_split
from equiray.errors import ConfigError, EquirayError
from equiray.nfn import (ZooHyperparameters, features_from_state_dicts, init_zoo_net, list_metanetworks,
                         train_zoo_nets, zoo_batches, zoo_cnn)
from equiray.data import resize
from equiray_pipelines.nfn import (Metanetworks, MonomialNFNOptions, NFNTrainConfig, ZooConfig, read_zoo, run_train,
                                   run_zoo, scaled_zoo, zoo_features)


def small(root, **over) -> ZooConfig:
    base = {"data": {"source": "digits", "dir": str(root / "digits"), "max_train": 600, "max_eval": 200,
                     "resize": 28},  # the zoo net needs 28x28 inputs (three stride-2 3x3 convs)
            "nets": 6, "nets_per_task": 2, "epochs": 1, "batch_size": 32, "cpus_per_task": 0.5,
            "space": {"activation": ["relu", "tanh"]}, "out": str(root / "zoo"), **over}
    return load_config(ZooConfig, base)


def _one_by_one(hp, seed, x, y, *, epochs, batch_size):
    """The reference: one net, torch.optim, its own batches."""
    model = init_zoo_net(hp, seed)
    params, lr, wd = model.parameters(), hp.lr, hp.weight_decay
    opt = {"adam": lambda: torch.optim.Adam(params, lr=lr, weight_decay=wd),
           "sgd": lambda: torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=wd),
           "rmsprop": lambda: torch.optim.RMSprop(params, lr=lr, weight_decay=wd)}[hp.optimizer]()
    for idx in zoo_batches(hp, len(y), epochs=epochs, batch_size=batch_size, seed=seed):
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval(), float(loss.detach())


HPS = [ZooHyperparameters(activation=a, optimizer=o, lr=lr, weight_decay=wd, dropout=0.0, init_std=s, train_fraction=f)
       for a, o, lr, wd, s, f in [("relu", "adam", 3e-3, 1e-4, 0.1, 1.0), ("relu", "sgd", 1e-2, 1e-3, 0.2, 0.5),
                                  ("relu", "rmsprop", 1e-3, 0.0, 0.05, 0.3), ("tanh", "adam", 1e-3, 1e-2, 0.3, 0.7)]]


def test_vectorized_zoo_training_equals_training_each_net_alone(gen):
    x, y = torch.randn(300, 1, 28, 28, generator=gen), torch.randint(0, 10, (300,), generator=gen)
    xt, yt = torch.randn(200, 1, 28, 28, generator=gen), torch.randint(0, 10, (200,), generator=gen)
    seeds = [11, 12, 13, 14]  # mixed optimizers, activations, learning rates, L2 and training fractions
    out = train_zoo_nets(HPS, seeds, x, y, xt, yt, epochs=2, batch_size=64)
    for hp, seed, net in zip(HPS, seeds, out):
        ref, loss = _one_by_one(hp, seed, x, y, epochs=2, batch_size=64)
        assert net.state_dict.keys() == ref.state_dict().keys()
        for k, v in ref.state_dict().items():
            torch.testing.assert_close(net.state_dict[k], v, atol=2e-5, rtol=1e-4)
        assert net.train_loss == pytest.approx(loss, rel=1e-4)
        assert net.test_accuracy == pytest.approx(float((ref(xt).argmax(-1) == yt).float().mean()), abs=0.011)
    # sensitivity: the same nets trained alone with another net's learning rate no longer match
    other, _ = _one_by_one(dataclasses.replace(HPS[0], lr=1e-2), seeds[0], x, y, epochs=2, batch_size=64)
    assert not torch.allclose(out[0].state_dict["head.weight"], other.state_dict()["head.weight"], atol=1e-3)


def test_vectorized_dropout_is_per_net(gen):
    x, y = torch.randn(256, 1, 28, 28, generator=gen), torch.randint(0, 10, (256,), generator=gen)
    hps = [dataclasses.replace(HPS[0], dropout=0.0), dataclasses.replace(HPS[0], dropout=0.5)]
    plain, dropped = (net.state_dict for net in train_zoo_nets(hps, [5, 5], x, y, x[:64], y[:64], epochs=1,
                                                                batch_size=64))
    ref, _ = _one_by_one(HPS[0], 5, x, y, epochs=1, batch_size=64)
    torch.testing.assert_close(plain["head.weight"], ref.state_dict()["head.weight"], atol=2e-5, rtol=1e-4)
    assert not torch.allclose(dropped["head.weight"], plain["head.weight"], atol=1e-4)  # same init, other updates


@pytest.fixture(scope="module")
def zoo(ray_session, tmp_path_factory):
    root = tmp_path_factory.mktemp("zoo")
    cfg = small(root)
    return cfg, run_zoo(cfg), root


@pytest.mark.ray
@pytest.mark.slow
def test_every_net_is_stored_once_with_its_hyperparameters(zoo):
    cfg, result, root = zoo
    rows, states = read_zoo(result.out)
    assert result.nets == 6 and [r["net_id"] for r in rows] == list(range(6))
    assert {r["activation"] for r in rows} <= {"relu", "tanh"} and len({r["lr"] for r in rows}) == 6
    for r in rows:
        assert 0.0 <= r["test_accuracy"] <= 1.0 and cfg.space.train_fraction[0] <= r["train_fraction"] <= 1.0
    assert (root / "zoo" / "zoo.json").exists() and not list(root.glob(".zoo-*"))
    features, spec = features_from_state_dicts(states)
    assert features.batch_size == 6 and spec.num_layers == 4
    assert sum(s.numel() for s in states[0].values()) == 4970


@pytest.mark.ray
@pytest.mark.slow
def test_stored_weights_reproduce_the_stored_accuracy(zoo):
    cfg, result, root = zoo
    rows, states = read_zoo(result.out)
    xt, yt = read_split(root / "digits", "test", limit=cfg.data.max_eval)
    xt = resize(xt, 28)
    for r, state in zip(rows, states):
        model = zoo_cnn(activation=r["activation"], dropout=r["dropout"])
        model.load_state_dict(state)
        with torch.no_grad():
            acc = float((model.eval()(xt).argmax(-1) == yt).float().mean())
        # stored accuracy comes from the grouped forward pass: float rounding may flip at most one borderline image
        assert acc == pytest.approx(r["test_accuracy"], abs=1.01 / len(yt))
    # the nets differ: a zoo of copies would be useless to a metanetwork
    assert len({float(s["head.weight"].sum()) for s in states}) == 6


@pytest.mark.ray
@pytest.mark.slow
def test_existing_zoo_and_bad_configs_are_clear_errors(zoo, tmp_path):
    cfg, result, root = zoo
    with pytest.raises(EquirayError, match="already holds a zoo"):
        run_zoo(cfg)
    with pytest.raises(ConfigError, match="space.optimizer"):
        small(tmp_path, space={"optimizer": ["lbfgs"]})
    with pytest.raises(EquirayError, match="no zoo at"):
        read_zoo(tmp_path / "nothing")


@pytest.fixture(scope="module")
def relu_zoo(ray_session, tmp_path_factory):
    root = tmp_path_factory.mktemp("relu-zoo")
    cfg = small(root, nets=16, nets_per_task=8, space={"activation": ["relu"]})
    run_zoo(cfg)
    return cfg


def train_cfg(zoo_dir, **over) -> NFNTrainConfig:
    return load_config(NFNTrainConfig, {"zoo": str(zoo_dir), "epochs": 4, "batch_size": 8, "cpus_per_task": 0.5,
                                        "metanetworks": {"monomial-nfn": {"hidden_channels": 4, "mlp_hidden": [8]},
                                                         "statnn": {"mlp_hidden": [8]}}, **over})


@pytest.mark.ray
@pytest.mark.slow
def test_nfn_train_scores_logs_and_registers_an_invariant_champion(relu_zoo, mlflow_store, tmp_path):
    import mlflow

    from equiray_pipelines.tracking import load_model

    cfg = train_cfg(relu_zoo.out)
    result = run_train(cfg, report_dir=tmp_path)
    assert set(result.tau) == {f"{m}/{z}" for m in ("monomial-nfn", "statnn") for z in ("plain", "scaled")}
    assert all(-1.0 <= t <= 1.0 for t in result.tau.values())
    assert "| monomial-nfn |" in result.table and (tmp_path / "nfn_scatter.png").stat().st_size > 0
    client = mlflow.MlflowClient()
    children = client.search_runs([client.get_run(result.run_id).info.experiment_id],
                                  f"tags.mlflow.parentRunId = '{result.run_id}'")
    assert len(children) == 4
    assert all(len(client.get_metric_history(c.info.run_id, "val_tau")) == cfg.epochs for c in children)
    # the registered champion rebuilds from safetensors; a Monomial-NFN reads a rescaled zoo exactly as the plain one
    model, spec = load_model(result.registered)
    assert spec["name"] == result.champion and spec["builder"] == "metanetwork"
    assert result.calibration == {}  # a metanetwork predicts a number: no softmax temperature
    rows, states = read_zoo(relu_zoo.out)
    feats, net_spec, group = zoo_features(states, rows)
    with torch.no_grad():
        plain = model(feats)
        scaled = model(scaled_zoo(feats, net_spec, group=group, max_scale=1e3, seed=3))
    if spec["name"] == "monomial-nfn":
        torch.testing.assert_close(plain, scaled, atol=1e-3, rtol=1e-3)
    # a second run of the same config with reuse reports the registered result without training
    again = run_train(cfg, report_dir=tmp_path / "again", reuse=True)
    assert again.reused and again.run_id == result.run_id and again.tau == result.tau


@pytest.mark.ray
@pytest.mark.slow
def test_nfn_train_refuses_unfit_zoos_and_configs(zoo, tmp_path, mlflow_store):
    with pytest.raises(EquirayError, match="mixes activations"):
        run_train(train_cfg(zoo[0].out))  # the relu + tanh zoo
    with pytest.raises(ConfigError, match="activation: choose from"):
        train_cfg(zoo[0].out, activation="gelu")
    with pytest.raises(EquirayError, match="no zoo at"):
        run_train(train_cfg(tmp_path / "none"))
    with pytest.raises(ConfigError, match="unknown"):
        train_cfg(tmp_path, metanetworks={"np": {}})
    with pytest.raises(ConfigError, match="zoos"):
        train_cfg(tmp_path, zoos=["rotated"])


def test_metanetwork_options_are_typed_and_named_as_registered(tmp_path):
    """One field per registered metanetwork; YAML names them as registered; unknown options fail at load."""
    assert {Metanetworks.registered_name(f.name) for f in dataclasses.fields(Metanetworks)} == set(list_metanetworks())
    cfg = train_cfg(tmp_path)
    assert cfg.metanetworks.names() == ("monomial-nfn", "statnn")
    assert cfg.metanetworks.monomial_nfn == MonomialNFNOptions(hidden_channels=4, mlp_hidden=(8,))
    # given options only, as plain data: what the constructor gets (its defaults for the rest) and MLflow logs
    assert cfg.metanetworks.options("monomial-nfn") == {"hidden_channels": 4, "mlp_hidden": [8]}
    assert train_cfg(tmp_path, metanetworks={"monomial_nfn": {"hidden_channels": 4}}).metanetworks.names() == (
        "monomial-nfn",)
    with pytest.raises(ConfigError, match="metanetworks.monomial_nfn.hidden_chanels"):
        train_cfg(tmp_path, metanetworks={"monomial-nfn": {"hidden_chanels": 4}})
    with pytest.raises(ConfigError, match="expected an integer"):
        train_cfg(tmp_path, metanetworks={"statnn": {"mlp_hidden": ["wide"]}})
    with pytest.raises(ConfigError, match="at least one"):
        train_cfg(tmp_path, metanetworks={})


@pytest.mark.ray
@pytest.mark.slow
def test_ctrl_c_while_the_zoo_trains_leaves_no_zoo_and_no_temporary_folder(ray_session, tmp_path):
    """SIGINT to `equiray nfn zoo` once its Ray tasks have trained a first chunk: one `interrupted` line, no
    traceback, exit 130; neither the zoo folder nor its temporary sibling is left (issue 20)."""
    import yaml

    from drivers import driver_env, interrupt_after_line, start

    cfg = small(tmp_path, nets=400, nets_per_task=2, epochs=3)
    (tmp_path / "zoo.yaml").write_text(yaml.safe_dump(to_plain(cfg)))
    proc = start(["equiray_pipelines.nfn", "zoo", "--config", "zoo.yaml"], cwd=tmp_path,
                 env=driver_env(ray_session, f"sqlite:///{tmp_path / 'mlflow.db'}"), merged=True)
    err = interrupt_after_line(proc, "nets trained")
    assert proc.returncode == 130, err
    assert err.strip().splitlines()[-1].startswith("interrupted") and "Traceback" not in err, err
    assert not (tmp_path / "zoo").exists() and not list(tmp_path.glob(".zoo-*"))


@pytest.mark.ray
@pytest.mark.slow
def test_ctrl_c_while_metanetworks_train_ends_every_run_and_registers_nothing(relu_zoo, ray_session, tmp_path):
    """SIGINT to `equiray nfn train` while its Ray tasks fit the metanetworks: one `interrupted` line, exit 130,
    the stage's MLflow run KILLED (none RUNNING), nothing registered, nothing in the report folder (issue 20)."""
    import mlflow
    import yaml

    from drivers import driver_env, interrupt_once_running, start

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = train_cfg(relu_zoo.out, epochs=5000, tracking={"experiment": "test-nfn-int",
                                                         "registered_model": "test-nfn-int"})
    (tmp_path / "train.yaml").write_text(yaml.safe_dump(to_plain(cfg)))
    proc = start(["equiray_pipelines.nfn", "train", "--config", "train.yaml", "--report-dir", "report"], cwd=tmp_path,
                 env=driver_env(ray_session, uri))
    err = interrupt_once_running(proc, uri, "test-nfn-int")  # the fits out on Ray tasks by then
    assert proc.returncode == 130, err
    assert err.strip().splitlines()[-1].startswith("interrupted") and "Traceback" not in err, err
    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name("test-nfn-int")
    assert exp and {r.info.status for r in client.search_runs([exp.experiment_id])} == {"KILLED"}
    assert not client.search_registered_models()
    assert not any(tmp_path.glob("report/*"))


def test_the_scatter_keeps_its_axes_on_the_true_accuracies_when_a_metanetwork_explodes(tmp_path, monkeypatch):
    """A panel's axes span the true accuracies (in %), not an unfit metanetwork's 1e7 predictions (which left the
    scaled STATNN panel empty to the eye, issue 20); the points off the chart are counted on the panel."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from equiray_pipelines.nfn.metanet import MetanetworkFit
    from equiray_pipelines.nfn.report import panel_range, scatter

    true = [0.2, 0.35, 0.5, 0.62]
    fit = MetanetworkFit(name="statnn", zoo="scaled", options={}, params=1, history=[], best_epoch=0, val_tau=0.1,
                         test_tau=0.1, seconds=1.0, mean=0.0, std=1.0, pred=[0.3, 1.2e5, -4e4, 0.6], true=true)
    lo, hi = panel_range([100 * t for t in true])
    assert lo == pytest.approx(20 - 2.1) and hi == pytest.approx(62 + 2.1)
    shown = []
    real_savefig = plt.Figure.savefig

    def keep(fig, *a, **k):
        shown.extend((ax.get_ylim(), [t.get_text() for t in ax.texts]) for ax in fig.axes)
        return real_savefig(fig, *a, **k)

    monkeypatch.setattr(plt.Figure, "savefig", keep)
    assert scatter([fit], tmp_path).stat().st_size > 0
    (ylim, texts), = shown
    assert ylim == pytest.approx((lo, hi)) and texts and texts[0].startswith("2 of 4 predictions off the chart")


def to_plain(cfg):
    from equiray.config import to_dict

    return to_dict(cfg)
