"""The transfer task's data (target-domain splits and OOD views), the backbone with its new head, and accuracy
on each view."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from equiray.data.views import apply_view
from equiray.errors import ConfigError
from equiray_pipelines.ftp.config import FTPConfig

Split = tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class Task:
    """Target-domain (ID) train/val/test ``(images, labels)`` and the test images under each OOD view (their
    labels are ``test[1]``)."""

    train: Split
    val: Split
    test: Split
    ood: dict[str, torch.Tensor]

    @property
    def labels(self) -> torch.Tensor:
        return self.test[1]

    def test_views(self) -> dict[str, torch.Tensor]:
        """``id_test`` and every OOD view: the images every trial is evaluated on after each epoch."""
        return {"id_test": self.test[0], **self.ood}


def load_task(cfg: FTPConfig) -> Task:
    """Target (ID) train/val/test tensors and the OOD test views, all from the prepared dataset."""
    from equiray.data import read_split

    cfg.data.prepare()
    t = cfg.task
    x, y = read_split(cfg.data.dir, "train", limit=t.train_images)
    xv, yv = read_split(cfg.data.dir, "val", limit=t.val_images)
    xt, yt = read_split(cfg.data.dir, "test", limit=t.test_images)
    return Task(train=(apply_view(x, t.target_view, seed=1), y), val=(apply_view(xv, t.target_view, seed=2), yv),
                test=(apply_view(xt, t.target_view, seed=3), yt),
                ood={v: apply_view(xt, v, seed=3) for v in t.ood_views})


def build_model(spec: dict, state: dict, *, new_head: bool, seed: int) -> torch.nn.Module:
    """The registered backbone ``create_model(**spec)`` with ``state``; ``new_head`` re-initialises its
    classifier (timm's ``get_classifier``) after ``torch.manual_seed(seed)``."""
    from equiray.models import create_model

    model = create_model(spec["name"], in_chans=spec["in_chans"], num_classes=spec["num_classes"],
                         **spec.get("kwargs", {}))
    model.load_state_dict(state)
    if new_head:
        torch.manual_seed(seed)
        head = model.get_classifier() if hasattr(model, "get_classifier") else None
        if head is None or not any(True for _ in head.parameters()):
            raise ConfigError(f"task.new_head: cannot find the classifier of {spec['name']} (timm's get_classifier)")
        for m in head.modules():
            if hasattr(m, "reset_parameters"):
                m.reset_parameters()
    return model


@torch.no_grad()
def evaluate(model: torch.nn.Module, views: dict[str, torch.Tensor], labels: torch.Tensor, *,
             batch_size: int = 512, device="cpu") -> dict[str, float]:
    """Accuracy on each (already transformed) view of the same labelled images."""
    from equiray.train import accuracy, predict

    return {name: accuracy(predict(model, x, batch_size=batch_size, device=device), labels)
            for name, x in views.items()}
