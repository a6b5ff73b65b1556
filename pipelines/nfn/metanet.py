"""One metanetwork fitted on one zoo, as a Ray task (:func:`fit_task`), and what it returns
(:class:`MetanetworkFit`); the champion among the fits and its model rebuilt for the registry."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from equiray_pipelines.nfn.config import NFNTrainConfig


@dataclass(frozen=True)
class MetanetworkFit:
    """Metanetwork ``name`` fitted on the ``zoo`` ("plain" or "scaled"): its constructor ``options``, parameter
    count, per-epoch ``history`` (epoch, train_loss, val_tau), the kept epoch, Kendall tau on validation and held-out
    nets, the target scaling (``mean``, ``std``) and the held-out nets' predicted and true accuracies. ``state``
    (its weights) is dropped once the champion is registered (the run's ``nfn_results.json`` is the rest)."""

    name: str
    zoo: str
    options: dict[str, Any]
    params: int
    history: list[dict]
    best_epoch: int
    val_tau: float
    test_tau: float
    seconds: float
    mean: float
    std: float
    pred: list[float]
    true: list[float]
    state: dict[str, torch.Tensor] | None = None

    def record(self) -> dict[str, Any]:
        """As JSON-able data, without the weights (one entry of ``nfn_results.json``)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "state"}

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> MetanetworkFit:
        return cls(**record)


def fit_task(name: str, zoo: str, feats, spec, group: str, targets: torch.Tensor, splits,
             cfg: NFNTrainConfig) -> MetanetworkFit:
    """A Ray task: fit metanetwork ``name`` (options from ``cfg.metanetworks``) on one zoo's features; return its
    weights, curves and held-out predictions."""
    import ray

    from equiray.nfn import count_parameters, create_metanetwork, fit_metanetwork, kendall_tau, predict

    torch.set_num_threads(max(1, int(cfg.cpus_per_task)))
    device = "cuda" if ray.get_gpu_ids() and torch.cuda.is_available() else "cpu"
    torch.manual_seed(cfg.seed)
    opts = {**cfg.metanetworks.options(name), "in_channels": feats.weights[0].shape[1]}
    if name == "monomial-nfn":
        opts.setdefault("group", group)
    model = create_metanetwork(name, spec, **opts).to(device)
    feats = feats.to(device)
    train_idx, val_idx, test_idx = splits
    fit = fit_metanetwork(model, feats, targets, train_idx=train_idx, val_idx=val_idx, epochs=cfg.epochs,
                          batch_size=cfg.batch_size, lr=cfg.lr, weight_decay=cfg.weight_decay, seed=cfg.seed)
    pred = (predict(model, feats[test_idx.to(device)]) * fit.std + fit.mean).cpu()
    return MetanetworkFit(name=name, zoo=zoo, options=opts, params=count_parameters(model),
                          history=fit.history, best_epoch=fit.best_epoch,
                          val_tau=fit.history[fit.best_epoch - 1]["val_tau"],
                          test_tau=kendall_tau(pred, targets[test_idx]), seconds=fit.seconds, mean=fit.mean,
                          std=fit.std, pred=pred.tolist(), true=targets[test_idx].tolist(),
                          state={k: v.cpu() for k, v in model.state_dict().items()})


def champion(fits: list[MetanetworkFit]) -> MetanetworkFit:
    """The metanetwork whose worst validation tau over the zoos is highest (a model that holds under rescaling),
    as trained on the plain zoo (the nets as they were trained)."""
    names = {f.name for f in fits}
    worst = {n: min(f.val_tau for f in fits if f.name == n) for n in names}
    best = max(sorted(names), key=lambda n: worst[n])
    return next(f for f in sorted(fits, key=lambda f: f.zoo != "plain") if f.name == best)


def rebuild(fit: MetanetworkFit, spec) -> torch.nn.Module:
    """The fitted metanetwork as a module, in eval mode."""
    from equiray.nfn import create_metanetwork

    model = create_metanetwork(fit.name, spec, **fit.options)
    model.load_state_dict(fit.state)
    return model.eval()
