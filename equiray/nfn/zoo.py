"""The model zoo's networks and how they are trained: the Small CNN Zoo architecture (Unterthiner et al. 2020),
one net's recipe (:class:`ZooHyperparameters`: optimizer, learning rate, L2, dropout, init scale, training
fraction), and a vectorized trainer that trains a chunk of such nets at once (:class:`StackedZooNets`), each as
if alone with its own ``torch.optim`` optimizer. The zoo is what the metanetworks of :mod:`equiray.nfn` read.
"""
from __future__ import annotations

import dataclasses
from typing import Literal

import torch
import torch.nn as nn

from equiray.errors import EquirayError

ZOO_ACTIVATIONS: tuple[str, ...] = ("relu", "tanh")
ZOO_OPTIMIZERS: tuple[str, ...] = ("adam", "sgd", "rmsprop")  # the order is StackedZooNets' optimizer code


class ZooCNN(nn.Module):
    """The Small CNN Zoo architecture (Unterthiner et al. 2020): three 3x3 stride-2 convs with ``width`` channels,
    each followed by the activation (and dropout), global average pooling, one linear layer."""

    def __init__(self, *, activation: Literal["relu", "tanh"] = "relu", width: int = 16, in_chans: int = 1,
                 num_classes: int = 10, dropout: float = 0.0):
        super().__init__()
        acts = {"relu": nn.ReLU, "tanh": nn.Tanh}
        if activation not in acts:
            raise EquirayError(f"unknown zoo activation {activation!r}; choose one of {sorted(acts)}")
        layers: list[nn.Module] = []
        c = in_chans
        for _ in range(3):
            layers += [nn.Conv2d(c, width, 3, stride=2), acts[activation]()]
            layers += [nn.Dropout(dropout)] if dropout > 0 else []
            c = width
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean(dim=(-2, -1)))  # (B, C, H, W) -> (B, C) -> (B, classes)


def zoo_cnn(*, activation: Literal["relu", "tanh"] = "relu", width: int = 16, in_chans: int = 1,
            num_classes: int = 10, dropout: float = 0.0) -> ZooCNN:
    """The reference zoo model: Conv(1->16, 3x3, stride 2) x3, act, GAP, Linear(16->10): 4,970 parameters."""
    return ZooCNN(activation=activation, width=width, in_chans=in_chans, num_classes=num_classes, dropout=dropout)


@dataclasses.dataclass(frozen=True)
class ZooHyperparameters:
    """One zoo net's training recipe, as the Small CNN Zoo draws it per net: ``optimizer`` one of
    :data:`ZOO_OPTIMIZERS` (SGD with momentum 0.9), L2 as ``weight_decay``, weights initialised normal(0,
    ``init_std``), trained on a random ``train_fraction`` of the data."""

    activation: Literal["relu", "tanh"]
    optimizer: Literal["adam", "sgd", "rmsprop"]
    lr: float
    weight_decay: float
    dropout: float
    init_std: float
    train_fraction: float

    def __post_init__(self):
        if self.activation not in ZOO_ACTIVATIONS or self.optimizer not in ZOO_OPTIMIZERS:
            raise EquirayError(f"a zoo net's activation is one of {list(ZOO_ACTIVATIONS)} and its optimizer one of "
                               f"{list(ZOO_OPTIMIZERS)}; got {self.activation!r} and {self.optimizer!r}")
        if not 0 <= self.train_fraction <= 1 or not 0 <= self.dropout < 1:
            raise EquirayError(f"need 0 <= train_fraction <= 1 and 0 <= dropout < 1, got {self.train_fraction} and "
                               f"{self.dropout}")


def init_zoo_net(hp: ZooHyperparameters, seed: int) -> ZooCNN:
    """One zoo net as the Small CNN Zoo initialises it: weights normal(0, ``init_std``), biases zero. Seeds the
    global torch generator with ``seed`` (the module's construction draws from it)."""
    torch.manual_seed(seed)
    model = zoo_cnn(activation=hp.activation, dropout=hp.dropout)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("weight"):
                p.normal_(0.0, hp.init_std)
            else:
                p.zero_()
    return model


def zoo_batches(hp: ZooHyperparameters, n_data: int, *, epochs: int, batch_size: int,
                seed: int) -> list[torch.Tensor]:
    """A net's minibatches, all epochs in order: its ``train_fraction`` subset, reshuffled every epoch."""
    gen = torch.Generator().manual_seed(seed)
    n = max(batch_size, int(n_data * hp.train_fraction))
    subset = torch.randperm(n_data, generator=gen)[:n]
    return [idx for _ in range(epochs) for idx in subset[torch.randperm(n, generator=gen)].split(batch_size)]


class StackedZooNets:
    """M zoo nets trained at once, as one grouped computation: the members' convolutions are one ``groups=M``
    convolution, their heads one batched matmul, and their optimizers (Adam, SGD with momentum 0.9 or RMSprop,
    each net its own learning rate and L2, as ``torch.optim`` defines them) one vectorized update. Each net keeps
    its own data order, training fraction (nets with fewer steps sit out the last steps), dropout rate and
    initialization, so the result equals training the nets one by one, up to float rounding."""

    BETAS, EPS, MOMENTUM, ALPHA = (0.9, 0.999), 1e-8, 0.9, 0.99

    def __init__(self, hps: list[ZooHyperparameters], seeds: list[int], device: torch.device | str = "cpu"):
        nets = [init_zoo_net(hp, s) for hp, s in zip(hps, seeds)]
        self.templates = nets
        self.params = [torch.stack([p.detach() for p in ps]).to(device).requires_grad_()
                       for ps in zip(*(list(n.parameters()) for n in nets))]  # conv1 w, b, conv2 w, b, ..., head w, b
        col = lambda key: torch.tensor([float(getattr(hp, key)) for hp in hps], device=device)  # noqa: E731
        self.lr, self.wd, self.dropout = col("lr"), col("weight_decay"), col("dropout")
        self.kind = torch.tensor([ZOO_OPTIMIZERS.index(hp.optimizer) for hp in hps], device=device)
        acts = [hp.activation for hp in hps]
        # one activation for the chunk, or (mixed chunk) a (1, M, 1, 1, 1) mask of the nets that use ReLU
        self.act = {"relu": torch.relu, "tanh": torch.tanh}[acts[0]] if len(set(acts)) == 1 else None
        self.relu_mask = torch.tensor([a == "relu" for a in acts], device=device).view(1, -1, 1, 1, 1)
        self.m = [torch.zeros_like(p) for p in self.params]  # Adam exp_avg | SGD momentum buffer
        self.v = [torch.zeros_like(p) for p in self.params]  # Adam exp_avg_sq | RMSprop square_avg
        self.steps = torch.zeros(len(hps), device=device)
        self.size = len(hps)

    def _view(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return t.view(-1, *([1] * (like.dim() - 1)))

    def forward(self, x: torch.Tensor, *, train: bool, generator: torch.Generator | None = None) -> torch.Tensor:
        """``x`` (M, B, C, H, W), one batch per net -> logits (M, B, classes)."""
        M, B = x.shape[:2]
        h = x.transpose(0, 1).reshape(B, -1, *x.shape[-2:])  # (B, M*C, H, W)
        convs, (wh, bh) = self.params[:-2], self.params[-2:]
        for w, b in zip(convs[0::2], convs[1::2]):
            h = torch.nn.functional.conv2d(h, w.flatten(0, 1), b.flatten(), stride=2, groups=M)
            h = h.view(B, M, w.shape[1], *h.shape[-2:])
            h = self.act(h) if self.act is not None else torch.where(self.relu_mask, torch.relu(h), torch.tanh(h))
            if train and bool((self.dropout > 0).any()):
                keep = 1 - self.dropout.view(1, M, 1, 1, 1)
                mask = torch.rand(h.shape, generator=generator, device=h.device) < keep
                h = h * mask / keep
            h = h.flatten(1, 2)
        pooled = h.view(B, M, -1, *h.shape[-2:]).mean(dim=(-2, -1))  # (B, M, width)
        return torch.einsum("bmc,moc->mbo", pooled, wh) + bh[:, None]

    @torch.no_grad()
    def _update(self, active: torch.Tensor) -> None:
        """One optimizer step for the ``active`` nets, each with its own optimizer kind and hyperparameters."""
        self.steps += active.float()
        t = self.steps.clamp_min(1)
        b1, b2 = self.BETAS
        for i, p in enumerate(self.params):
            view = lambda v: self._view(v, p)  # noqa: E731
            g = p.grad + view(self.wd) * p
            on, kind = view(active), view(self.kind)
            # Adam
            m_adam = b1 * self.m[i] + (1 - b1) * g
            v_adam = b2 * self.v[i] + (1 - b2) * g * g
            denom = (v_adam.sqrt() / view(torch.sqrt(1 - b2 ** t))) + self.EPS
            p_adam = p - view(self.lr / (1 - b1 ** t)) * m_adam / denom
            # SGD, momentum 0.9 (the first step's buffer is the gradient itself)
            m_sgd = torch.where(view(self.steps == 1), g, self.MOMENTUM * self.m[i] + g)
            p_sgd = p - view(self.lr) * m_sgd
            # RMSprop
            v_rms = self.ALPHA * self.v[i] + (1 - self.ALPHA) * g * g
            p_rms = p - view(self.lr) * g / (v_rms.sqrt() + self.EPS)
            new_p = torch.where(kind == 0, p_adam, torch.where(kind == 1, p_sgd, p_rms))
            new_m = torch.where(kind == 0, m_adam, m_sgd)
            new_v = torch.where(kind == 0, v_adam, v_rms)
            p.copy_(torch.where(on, new_p, p))
            self.m[i].copy_(torch.where(on, new_m, self.m[i]))
            self.v[i].copy_(torch.where(on, new_v, self.v[i]))
            p.grad = None

    def fit(self, x: torch.Tensor, y: torch.Tensor, batches: list[list[torch.Tensor]], *, batch_size: int,
            generator: torch.Generator | None = None) -> torch.Tensor:
        """Train on each net's own list of index batches; returns every net's last training loss (M,)."""
        device = self.params[0].device
        steps = max(len(b) for b in batches)
        last = torch.full((self.size,), float("nan"), device=device)
        for step in range(steps):
            idx = torch.zeros(self.size, batch_size, dtype=torch.long)
            valid = torch.zeros(self.size, batch_size, dtype=torch.bool)
            for m, bs in enumerate(batches):
                if step < len(bs):
                    idx[m, :len(bs[step])], valid[m, :len(bs[step])] = bs[step], True
            idx, valid = idx.to(device), valid.to(device)
            active = valid.any(1)
            logits = self.forward(x[idx].to(device), train=True, generator=generator)
            ce = torch.nn.functional.cross_entropy(logits.flatten(0, 1), y[idx].to(device).flatten(),
                                                   reduction="none").view(self.size, batch_size)
            per_net = (ce * valid).sum(1) / valid.sum(1).clamp_min(1)
            per_net.sum().backward()
            self._update(active)
            last = torch.where(active, per_net.detach(), last)
        return last

    @torch.no_grad()
    def accuracy(self, x: torch.Tensor, y: torch.Tensor, *, chunk: int = 512) -> torch.Tensor:
        device = self.params[0].device
        correct = torch.zeros(self.size, device=device)
        for i in range(0, len(y), chunk):
            xb = x[i:i + chunk].to(device)
            logits = self.forward(xb.expand(self.size, *xb.shape), train=False)
            correct += (logits.argmax(-1) == y[i:i + chunk].to(device)).float().sum(1)
        return correct / len(y)

    def state_dicts(self) -> list[dict[str, torch.Tensor]]:
        """Every net's weights under its own ``zoo_cnn`` parameter names."""
        out = []
        for m, template in enumerate(self.templates):
            names = [n for n, _ in template.named_parameters()]
            out.append({n: p[m].detach().cpu().clone() for n, p in zip(names, self.params)})
        return out


@dataclasses.dataclass(frozen=True)
class TrainedZooNet:
    """One net of :func:`train_zoo_nets`: its weights under ``zoo_cnn``'s names, its test accuracy (chance for a
    net whose training diverged) and its last training loss."""

    state_dict: dict[str, torch.Tensor]
    test_accuracy: float
    train_loss: float


def train_zoo_nets(hps: list[ZooHyperparameters], seeds: list[int], x: torch.Tensor, y: torch.Tensor,
                   xt: torch.Tensor, yt: torch.Tensor, *, epochs: int, batch_size: int,
                   device: torch.device | str = "cpu") -> list[TrainedZooNet]:
    """Train a chunk of zoo nets together (:class:`StackedZooNets`) on ``(x, y)``, score them on ``(xt, yt)``.
    Net ``m`` is initialised and batched from ``seeds[m]``; dropout draws from one generator seeded with
    ``seeds[0]``. A net whose training diverged (non-finite loss or weights) is scored at chance, as in the Small
    CNN Zoo."""
    nets = StackedZooNets(hps, seeds, device=device)
    batches = [zoo_batches(hp, len(y), epochs=epochs, batch_size=batch_size, seed=s) for hp, s in zip(hps, seeds)]
    last = nets.fit(x, y, batches, batch_size=batch_size, generator=torch.Generator(device=device).manual_seed(
        seeds[0]))
    acc = nets.accuracy(xt, yt)
    finite = torch.stack([torch.isfinite(p.detach()).flatten(1).all(1) for p in nets.params]).all(0)
    chance = 1.0 / (int(y.max()) + 1)
    return [TrainedZooNet(sd, float(a) if bool(ok) and torch.isfinite(torch.tensor(float(l))) else chance, float(l))
            for sd, a, l, ok in zip(nets.state_dicts(), acc.tolist(), last.tolist(), finite.tolist())]
