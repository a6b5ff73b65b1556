"""Monomial-NFN over an ensemble's own members, end to end on the shared local Ray: members read back as a zoo,
a sign-flip metanetwork fitted and registered, and `ensemble eval --select-by nfn` leaving out the weakest."""
import dataclasses

import pytest
import torch

from equiray.config import load_config
from equiray.errors import EquirayError
from equiray_pipelines.ensemble import (EnsembleConfig, load_members, member_state_dicts, run_eval, run_train,
                                        select_by_nfn)
from equiray_pipelines.nfn import NFNTrainConfig, ZooConfig, read_zoo, run_train as run_nfn_train, run_zoo

pytestmark = [pytest.mark.ray, pytest.mark.slow]


@pytest.fixture(scope="module")
def members(ray_session, tmp_path_factory):
    root = tmp_path_factory.mktemp("select")
    mp = pytest.MonkeyPatch()
    mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
    cfg = load_config(EnsembleConfig, {
        "data": {"source": "digits", "dir": str(root / "digits"), "max_train": None, "resize": None},
        "member": {"kwargs": {"width": 4}}, "members": 8, "members_per_group": 8, "train": {"epochs": 1},
        "settings": [{"name": "sym+aug"}, {"name": "asym, no aug", "support": "asymmetric", "augment": False}],
        "scaling": {"num_workers": 1, "cpus_per_worker": 1}, "tracking": {"experiment": "test-select"},
        "eval": {"max_eval": 120, "max_off_manifold": 30, "repeats": 2, "drop_fraction": 0.25},
        "storage_path": str(root / "runs")})
    trained = run_train(cfg)
    zoo = run_zoo(load_config(ZooConfig, {"from_ensemble": "latest", "ensemble_experiment": "test-select",
                                          "out": str(root / "member-zoo")}))
    nfn = run_nfn_train(load_config(NFNTrainConfig, {
        "zoo": zoo.out, "zoos": ["plain"], "epochs": 3, "batch_size": 4, "cpus_per_task": 0.5,
        "metanetworks": {"monomial-nfn": {"hidden_channels": 4, "mlp_hidden": [8]}},
        "tracking": {"experiment": "test-select", "registered_model": "members-nfn", "alias": "champion"}}))
    yield cfg, trained, zoo, nfn, root
    mp.undo()


def test_members_become_a_zoo_with_validation_accuracy(members):
    cfg, trained, zoo, nfn, root = members
    rows, states = read_zoo(zoo.out)
    assert zoo.nets == 16 and [r["net_id"] for r in rows] == list(range(16))
    assert {r["setting"] for r in rows} == {"sym+aug", "asym, no aug"} and {r["accuracy_split"] for r in rows} == {"val"}
    ensembles, _ = load_members(trained.run_id)
    first = member_state_dicts(ensembles["sym+aug"])[0]
    for k, v in first.items():  # member 0 stored as it was trained
        torch.testing.assert_close(states[0][k], v)
    assert nfn.champion == "monomial-nfn" and -1 <= nfn.tau["monomial-nfn/plain"] <= 1


def test_select_by_nfn_keeps_the_members_predicted_strongest(members):
    from equiray.groups import get_group
    from equiray.metrics import invariance, orbit_logits
    from equiray.nfn import features_from_normalized_cnns, predict
    from equiray_pipelines.tracking import load_model

    cfg, trained, zoo, nfn, root = members
    cfg = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, select_by="nfn", nfn_model=nfn.registered))
    result = run_eval(cfg, run_id=trained.run_id, report_dir=root / "report")
    rows = result.selection
    assert [r["members"] for r in rows] == ["all 8", "nfn top 6", "random 6"] * 2
    assert "nfn top 6" in result.table and (root / "report" / "ensemble_selection.md").exists()
    # the "nfn top 6" row is the mean of exactly the 6 members the registered metanetwork ranks highest
    metanet, _ = load_model(nfn.registered)
    ens = load_members(trained.run_id)[0]["sym+aug"]
    top = torch.argsort(predict(metanet, features_from_normalized_cnns(member_state_dicts(ens))[0]),
                        descending=True)[:6]
    from equiray.data import read_split

    x, y = read_split(root / "digits", "test", limit=cfg.eval.max_eval)
    expected = invariance(orbit_logits(ens.eval().member_logits, x, get_group(cfg.group))[top].mean(0), y)
    assert rows[1]["accuracy"] == pytest.approx(expected["accuracy"]) and rows[1]["kl"] == pytest.approx(expected["kl"])


def test_select_by_a_metanetwork_of_other_nets_is_a_clear_error(members):
    from equiray_pipelines.tracking import load_model

    cfg, trained, zoo, nfn, root = members
    metanet, spec = load_model(nfn.registered)
    ensembles, _ = load_members(trained.run_id)
    with pytest.raises(EquirayError, match="was not trained on members like these"):
        select_by_nfn(ensembles, metanet, {**spec, "network_spec": [[16, 1, [3, 3]]]}, torch.zeros(2, 1, 8, 8),
                      torch.zeros(2, dtype=torch.long), "C4", drop_fraction=0.25)
    with pytest.raises(EquirayError, match="cannot load"):
        run_eval(dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, select_by="nfn",
                                                                   nfn_model="models:/nothing@champion")))
