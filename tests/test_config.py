from dataclasses import dataclass, field
from typing import Literal

import pytest

from equiray.config import apply_overrides, flatten, from_dict, load_config, to_dict
from equiray.errors import ConfigError


@dataclass(frozen=True)
class Inner:
    epochs: int = 3
    lr: float = 0.1
    kind: Literal["a", "b"] = "a"
    tags: tuple[str, ...] = ()


@dataclass(frozen=True)
class Outer:
    name: str = "x"
    inner: Inner = Inner()
    limit: int | None = None
    extra: dict[str, int] = field(default_factory=dict)


def test_defaults_and_nested_values():
    cfg = from_dict(Outer, {"inner": {"epochs": 5, "lr": 1, "tags": ["p", "q"]}, "limit": 10})
    assert cfg.inner == Inner(epochs=5, lr=1.0, tags=("p", "q")) and cfg.limit == 10 and cfg.name == "x"
    assert isinstance(cfg.inner.lr, float)


def test_unknown_key_is_named_with_its_path_and_a_suggestion():
    with pytest.raises(ConfigError, match=r"unknown config key 'inner\.epoch'.*did you mean 'epochs'"):
        from_dict(Outer, {"inner": {"epoch": 5}})
    with pytest.raises(ConfigError, match="unknown config key 'nmae'"):
        from_dict(Outer, {"nmae": "y"})


@pytest.mark.parametrize("data, message", [
    ({"inner": {"epochs": "five"}}, "inner.epochs: expected an integer"),
    ({"inner": {"epochs": True}}, "inner.epochs: expected an integer"),
    ({"inner": {"kind": "c"}}, "inner.kind: 'c' is not one of"),
    ({"inner": 3}, "inner: expected a mapping"),
    ({"extra": {"a": "b"}}, "extra.a: expected an integer"),
    ({"inner": {"tags": "p"}}, "inner.tags: expected a list"),
])
def test_wrong_types_are_rejected(data, message):
    with pytest.raises(ConfigError, match=message):
        from_dict(Outer, data)


def test_yaml_files_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("name: run\ninner:\n  epochs: 2\n")
    cfg = load_config(Outer, path, overrides=["inner.lr=0.5", "limit=7", "inner.tags=[a, b]"])
    assert cfg == Outer(name="run", inner=Inner(epochs=2, lr=0.5, tags=("a", "b")), limit=7)
    with pytest.raises(ConfigError, match="not found"):
        load_config(Outer, tmp_path / "missing.yaml")
    path.write_text("- a list\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(Outer, path)
    path.write_text("name: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(Outer, path)
    with pytest.raises(ConfigError, match="key=value"):
        apply_overrides({}, ["inner.lr"])


def test_flatten_and_round_trip():
    cfg = Outer(inner=Inner(tags=("t",)), extra={"k": 1})
    assert flatten(cfg)["inner.epochs"] == 3 and flatten(cfg)["extra.k"] == 1
    assert from_dict(Outer, to_dict(cfg)) == cfg


def test_pipeline_configs_load_and_validate():
    from equiray_pipelines.demo import DemoConfig
    from equiray_pipelines.pretrain import PretrainConfig

    from equiray_pipelines.nfn import NFNTrainConfig, ZooConfig

    for path, cls in (("configs/pretrain.yaml", PretrainConfig), ("configs/demo.yaml", DemoConfig),
                      ("configs/nfn_zoo.yaml", ZooConfig), ("configs/nfn_train.yaml", NFNTrainConfig),
                      ("configs/nfn_train_members.yaml", NFNTrainConfig), ("configs/nfn_zoo_large.yaml", ZooConfig)):
        assert isinstance(load_config(cls, path), cls)
    # the FTP search's example config compares SPD too; a search that is not told compares the paper's four
    from equiray_pipelines.ftp import FTPConfig
    assert load_config(FTPConfig, "configs/ftp.yaml").space.methods == ("finetune", "l2sp", "ftp", "tpgm", "spd")
    assert FTPConfig().space.methods == ("finetune", "l2sp", "ftp", "tpgm")
    # the demo's defaults live in its dataclasses alone: configs/demo.yaml only overrides (here: nothing)
    assert load_config(DemoConfig, "configs/demo.yaml") == DemoConfig()
    # the any-angle recipe the demo trains is the one its config file gives `equiray canon sweep`
    from equiray_pipelines.canon import ANY_ANGLE, CanonConfig
    assert load_config(CanonConfig, "configs/canon_any_angle_fast.yaml") == ANY_ANGLE
    # strong members: copies of the registered backbone (BatchNorm folded), trained at random angles; their student
    from equiray_pipelines.distill import DistillConfig
    from equiray_pipelines.ensemble import EnsembleConfig
    strong = load_config(EnsembleConfig, "configs/ensemble_strong.yaml")
    assert strong.member.init_from == "models:/equiray-backbone@pretrained" and strong.member.frozen_bn
    assert [s.rotations for s in strong.settings] == ["so2"]
    assert load_config(DistillConfig, "configs/distill_strong.yaml").teacher == "models:/equiray-ensemble-strong@champion"
    with pytest.raises(ConfigError, match="set augment: false"):
        load_config(EnsembleConfig, {"settings": [{"name": "s", "rotations": "so2"}]})
    with pytest.raises(ConfigError, match="rotations: choose one of none, so2, o2, not 'so3'"):
        load_config(DistillConfig, {"rotations": "so3"})
    # configs/robust.yaml says it holds the built-in defaults
    from equiray_pipelines.robust import RobustConfig
    assert load_config(RobustConfig, "configs/robust.yaml") == RobustConfig()
    with pytest.raises(ConfigError, match="model.name: unknown model 'resnet-9000'"):
        load_config(PretrainConfig, {"model": {"name": "resnet-9000"}})
    with pytest.raises(ConfigError, match="unknown group"):
        load_config(PretrainConfig, {"train": {"augment": "Q4"}})


def test_partial_sections_keep_the_parents_defaults():
    """A section given in part fills its gaps from the parent config's default for that section (the distill
    stage's registry name must not fall back to the backbone's), at any depth; plain dicts are replaced."""
    from equiray_pipelines.demo import DemoConfig
    from equiray_pipelines.distill import DistillConfig

    cfg = load_config(DistillConfig, {"tracking": {"experiment": "mine"}, "student": {"kwargs": {"width": 8}}})
    assert cfg.tracking.experiment == "mine" and cfg.tracking.registered_model == "equiray-student"
    assert cfg.data.max_train == 4000  # DistillConfig's own default data section
    assert cfg.student.kwargs == {"width": 8}  # replaced, not merged with the default kwargs
    demo = load_config(DemoConfig, {"pretrain": {"train": {"lr": 0.01}}})
    assert demo.pretrain.train.epochs == 3 and demo.pretrain.train.lr == 0.01
