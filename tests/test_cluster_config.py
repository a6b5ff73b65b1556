"""cluster.yaml passes Ray's own cluster-config validation (the launcher's schema), and keeps its promises: GPU
worker types with resources and bounds, setup that installs equiray and its data, nothing open to the world."""
import copy
from pathlib import Path

import pytest
import yaml

CLUSTER = Path(__file__).resolve().parents[1] / "cluster.yaml"


def _validate(cfg: dict) -> dict:
    from ray.autoscaler._private.util import prepare_config, validate_config  # private: Ray has no public one

    cfg = prepare_config(copy.deepcopy(cfg))
    validate_config(cfg)
    return cfg


@pytest.fixture(scope="module")
def cluster() -> dict:
    return yaml.safe_load(CLUSTER.read_text())


def test_ray_validates_cluster_yaml(cluster):
    cfg = _validate(cluster)
    assert cfg["head_node_type"] == "head"


def test_validation_catches_a_typo(cluster):
    import jsonschema

    bad = copy.deepcopy(cluster)
    bad["available_node_types"]["gpu_1x"]["min_wrokers"] = 1
    with pytest.raises(jsonschema.ValidationError, match="min_wrokers"):
        _validate(bad)


def test_gpu_workers_and_setup(cluster):
    types = cluster["available_node_types"]
    gpu = {name: t for name, t in types.items() if t["resources"].get("GPU", 0) > 0}
    assert gpu and all("min_workers" in t and t["max_workers"] >= 1 for t in gpu.values())
    assert sum(t["max_workers"] for t in gpu.values()) <= cluster["max_workers"]
    assert types[cluster["head_node_type"]]["resources"].get("GPU", 0) == 0
    setup = " ".join(cluster["setup_commands"] + cluster["head_setup_commands"])
    assert "pip install" in setup and "equiray" in setup and "equiray data prepare fashion-mnist" in setup


def test_nothing_is_open_to_the_world(cluster):
    text = CLUSTER.read_text()
    assert "0.0.0.0/0" not in text.replace("never 0.0.0.0/0", "")
    ranges = [r["CidrIp"] for p in cluster["provider"]["security_group"]["IpPermissions"] for r in p["IpRanges"]]
    assert ranges and all(not r.startswith("0.0.0.0") for r in ranges)
    assert {p["FromPort"] for p in cluster["provider"]["security_group"]["IpPermissions"]} == {22}  # SSH only
    head = " ".join(cluster["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head and "RAY_AUTH_MODE=token" in head
    # every Ray process on every node knows the head's MLflow server (so job specs need not)
    for cmds in (cluster["head_start_ray_commands"], cluster["worker_start_ray_commands"]):
        assert "MLFLOW_TRACKING_URI=http://" in " ".join(cmds)
