"""A trained member group on disk: safetensors (stacked weights) + JSON (spec and provenance)."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from equiray.errors import EquirayError

from equiray.ensembles.stacked import MemberSpec, StackedEnsemble

__all__ = ["load_group", "save_group"]


def save_group(ens: StackedEnsemble, path: str | Path, *, meta: dict) -> Path:
    """One member group as ``path`` (safetensors, stacked weights) + ``path.json`` (spec and provenance);
    loadable on its own with :func:`load_group`."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in ens.state_dict().items()}, str(path))
    info = {"spec": dataclasses.asdict(ens.spec), "num_members": ens.num_members, **meta}
    path.with_suffix(".json").write_text(json.dumps(info, indent=2))
    return path


def load_group(path: str | Path) -> tuple[StackedEnsemble, dict]:
    """A member group saved by :func:`save_group` -> ``(ensemble, its metadata)``."""
    from safetensors.torch import load_file

    path = Path(path)
    meta_path = path.with_suffix(".json")
    if not path.is_file() or not meta_path.is_file():
        raise EquirayError(f"{path} (and {meta_path.name}) not found: not a saved member group")
    meta = json.loads(meta_path.read_text())
    spec = MemberSpec(**meta["spec"])
    ens = StackedEnsemble(spec, meta["num_members"])
    ens.load_state_dict(load_file(str(path)))
    return ens, meta
