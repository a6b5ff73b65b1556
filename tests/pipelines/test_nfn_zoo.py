"""The model-zoo pipeline end to end on the shared local Ray: real Ray tasks, Parquet out, nets that load back."""
import pytest
import torch

from equiray.config import load_config
from equiray.data import read_split
from equiray.errors import ConfigError, EquirayError
from equiray.nfn import features_from_state_dicts, zoo_cnn
from pipelines._common import resize
from pipelines.nfn import ZooConfig, read_zoo, run_zoo

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def small(root, **over) -> ZooConfig:
    base = {"data": {"source": "digits", "dir": str(root / "digits"), "max_train": 600, "max_eval": 200,
                     "resize": 28},  # the zoo net needs 28x28 inputs (three stride-2 3x3 convs)
            "nets": 6, "nets_per_task": 2, "epochs": 1, "batch_size": 32, "cpus_per_task": 0.5,
            "space": {"activation": ["relu", "tanh"]}, "out": str(root / "zoo"), **over}
    return load_config(ZooConfig, base)


@pytest.fixture(scope="module")
def zoo(ray_session, tmp_path_factory):
    root = tmp_path_factory.mktemp("zoo")
    cfg = small(root)
    return cfg, run_zoo(cfg), root


def test_every_net_is_stored_once_with_its_hyperparameters(zoo):
    cfg, result, root = zoo
    rows, states = read_zoo(result["out"])
    assert result["nets"] == 6 and [r["net_id"] for r in rows] == list(range(6))
    assert {r["activation"] for r in rows} <= {"relu", "tanh"} and len({r["lr"] for r in rows}) == 6
    for r in rows:
        assert 0.0 <= r["test_accuracy"] <= 1.0 and cfg.space.train_fraction[0] <= r["train_fraction"] <= 1.0
    assert (root / "zoo" / "zoo.json").exists() and not list(root.glob(".zoo-*"))
    features, spec = features_from_state_dicts(states)
    assert features.batch_size == 6 and spec.num_layers == 4
    assert sum(s.numel() for s in states[0].values()) == 4970


def test_stored_weights_reproduce_the_stored_accuracy(zoo):
    cfg, result, root = zoo
    rows, states = read_zoo(result["out"])
    xt, yt = read_split(root / "digits", "test", limit=cfg.data.max_eval)
    xt = resize(xt, 28)
    for r, state in zip(rows, states):
        model = zoo_cnn(activation=r["activation"], dropout=r["dropout"])
        model.load_state_dict(state)
        with torch.no_grad():
            acc = float((model.eval()(xt).argmax(-1) == yt).float().mean())
        assert acc == pytest.approx(r["test_accuracy"], abs=1e-6)
    # the nets differ: a zoo of copies would be useless to a metanetwork
    assert len({float(s["head.weight"].sum()) for s in states}) == 6


def test_existing_zoo_and_bad_configs_are_clear_errors(zoo, tmp_path):
    cfg, result, root = zoo
    with pytest.raises(EquirayError, match="already holds a zoo"):
        run_zoo(cfg)
    with pytest.raises(ConfigError, match="space.optimizer"):
        small(tmp_path, space={"optimizer": ["lbfgs"]})
    with pytest.raises(EquirayError, match="no zoo at"):
        read_zoo(tmp_path / "nothing")
