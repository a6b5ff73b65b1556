"""Training member groups: the vectorized epoch, and a member group's whole training state.

Condition (d) of the theorem asks for plain SGD with a uniformly random group element per sample. Every member
gets its own data order and its own elements, drawn from its own :class:`torch.Generator`, so a member's
training depends on its seed alone, whichever group or worker trains it. :class:`MemberGroup` is everything
needed to go on where training stopped (weights, optimizer state, generator states, epochs done): saved after
an epoch and loaded back, it continues bit for bit as if it had never stopped.
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Literal, Sequence

import torch
import torch.nn.functional as F

from equiray.errors import EquirayError
from equiray.groups import Group
from equiray.registry import Registry
from equiray.train import EpochStats

from equiray.ensembles.build import Init, build_members
from equiray.ensembles.stacked import MemberSpec, StackedEnsemble

__all__ = ["MEMBER_OPTIMIZERS", "ROTATIONS", "MemberGroup", "member_batches", "train_members_epoch"]

Rotations = Literal["none", "so2", "o2"]
ROTATIONS: tuple[Rotations, ...] = ("none", "so2", "o2")

# Only elementwise optimizers keep stacked members independent (one optimizer over the stacked tensors is then
# N optimizers); Adam also commutes with the group's permutation of filter entries, so the theorem's symmetry
# argument holds for it too.
MEMBER_OPTIMIZERS: Registry[type[torch.optim.Optimizer]] = Registry("member optimizer")
MEMBER_OPTIMIZERS.register(torch.optim.SGD, name="sgd")
MEMBER_OPTIMIZERS.register(torch.optim.Adam, name="adam")


def member_batches(x: torch.Tensor, y: torch.Tensor, num_members: int, batch_size: int,
                   generators: Sequence[torch.Generator]):
    """Per-member SGD batches: every member its own shuffled order of the data. Yields ``(idx (N, B))``."""
    n = len(y)
    perms = torch.stack([torch.randperm(n, generator=g) for g in generators])  # (N, n)
    for start in range(0, n - batch_size + 1, batch_size):
        yield perms[:, start:start + batch_size]  # (N, B)


def train_members_epoch(ens: StackedEnsemble, x: torch.Tensor, y: torch.Tensor, opt: torch.optim.Optimizer, *,
                        batch_size: int, group: Group | None, generators: Sequence[torch.Generator],
                        device: torch.device | str = "cpu", vectorize: Literal["auto", "vmap"] = "auto",
                        rotations: Rotations = "none") -> dict:
    """One epoch for every member at once: each member its own data order and, with ``group``, its own
    uniformly random group element per sample (condition (d)), or with ``rotations`` its own uniformly random
    angle per sample (``so2``; ``o2``: after a random mirror too; pad with zeros, rotate bilinearly, crop), drawn
    from its own generator after its batch order; the loss is the sum of the members' mean cross-entropies, so
    each member gets exactly its own gradient. Returns mean ``loss``, ``accuracy`` and ``member_samples``
    (samples seen, summed over members)."""
    if rotations not in ROTATIONS:
        raise EquirayError(f"rotations: choose one of {', '.join(ROTATIONS)}, not {rotations!r}")
    if group is not None and rotations != "none":
        raise EquirayError("choose group augmentation or random rotations, not both")
    turns = None
    if rotations != "none":
        from equiray.canon.train import RandomRotations

        turns = [RandomRotations(g, mirror=rotations == "o2") for g in generators]
    ens.train()
    n_members = ens.num_members
    total, correct, count = 0.0, 0, 0
    for idx in member_batches(x, y, n_members, batch_size, generators):
        xb = x[idx].to(device)  # (N, B, C, H, W)
        yb = y[idx].to(device)  # (N, B)
        if group is not None:
            flat = xb.flatten(0, 1)  # (N*B, C, H, W)
            el = torch.cat([group.sample(batch_size, generator=g) for g in generators]).to(device)
            xb = group.act(flat, el).view_as(xb)
        elif turns is not None:
            xb = torch.stack([turn(xb[m])[0] for m, turn in enumerate(turns)])
        logits = ens.member_logits(xb, vectorize=vectorize)  # (N, B, K)
        loss = F.cross_entropy(logits.flatten(0, 1), yb.flatten(), reduction="sum") / batch_size
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        total += float(loss.detach())
        correct += int((logits.argmax(-1) == yb).sum())
        count += yb.numel()
    if count == 0:
        raise EquirayError(f"no full batch of {batch_size} in {len(y)} training samples")
    return {"loss": total / (count / batch_size), "accuracy": correct / count, "member_samples": count}


@dataclasses.dataclass(eq=False)
class MemberGroup:
    """One member group in training: the stacked members, their optimizer, one generator per member (data order
    and group elements), the epochs done and the nodes each epoch ran on. Build it with :meth:`new`, train it
    with :meth:`train_epoch`, keep it with :meth:`save` / :meth:`load`."""

    ensemble: StackedEnsemble
    optimizer: torch.optim.Optimizer
    generators: list[torch.Generator]
    seeds: tuple[int, ...]
    optimizer_name: str  # its name in MEMBER_OPTIMIZERS
    epochs_done: int = 0
    nodes: list[str] = dataclasses.field(default_factory=list)  # one per epoch: where it ran (e.g. a Ray node id)

    @classmethod
    def new(cls, spec: MemberSpec, seeds: Sequence[int], *, init: Init = "default", group: Group | str | None = None,
            optimizer: str = "sgd", lr: float = 0.01, device: torch.device | str = "cpu",
            pretrained: torch.nn.Module | None = None) -> "MemberGroup":
        """Members initialised from ``seeds`` (:func:`~equiray.ensembles.build_members`; ``group`` is what
        ``init="invariant"`` makes the initial distribution invariant to, ``pretrained`` the model every member
        copies with ``init="pretrained"``), member ``i``'s generator seeded ``seeds[i] + 1``, and the optimizer
        ``optimizer`` (``"sgd"`` or ``"adam"``) over the members on ``device``."""
        seeds = tuple(int(s) for s in seeds)
        ens = build_members(spec, seeds, init=init, group=group, pretrained=pretrained)
        gens = [torch.Generator().manual_seed(s + 1) for s in seeds]
        ens = ens.to(device)
        opt = MEMBER_OPTIMIZERS.create(optimizer, ens.parameters(), lr=lr)
        return cls(ens, opt, gens, seeds, optimizer)

    @property
    def device(self) -> torch.device:
        return next(self.ensemble.parameters()).device

    def train_epoch(self, x: torch.Tensor, y: torch.Tensor, *, batch_size: int, group: Group | None,
                    device: torch.device | str | None = None, node: str | None = None,
                    rotations: Rotations = "none") -> EpochStats:
        """One epoch of every member (:func:`train_members_epoch`; ``group=None`` and ``rotations="none"``: no
        augmentation), on ``device`` (default: the members'). ``node`` names where it ran, kept in
        :attr:`nodes`. ``samples`` of the result counts every member's samples."""
        start = time.perf_counter()
        stats = train_members_epoch(self.ensemble, x, y, self.optimizer, batch_size=batch_size, group=group,
                                    generators=self.generators, device=device or self.device, rotations=rotations)
        self.epochs_done += 1
        if node is not None:
            self.nodes.append(node)
        return EpochStats(stats["loss"], stats["accuracy"], stats["member_samples"], time.perf_counter() - start)

    def save(self, path: str | Path) -> Path:
        """Everything :meth:`load` needs to continue bit for bit, in one ``torch.save`` file."""
        path = Path(path)
        torch.save({"model": self.ensemble.state_dict(), "optimizer": self.optimizer.state_dict(),
                    "generators": [g.get_state() for g in self.generators], "epochs_done": self.epochs_done,
                    "nodes": list(self.nodes), "seeds": list(self.seeds), "spec": dataclasses.asdict(self.ensemble.spec),
                    "optimizer_name": self.optimizer_name}, path)
        return path

    @classmethod
    def load(cls, path: str | Path, *, device: torch.device | str = "cpu") -> "MemberGroup":
        """A group saved by :meth:`save`, its members on ``device``. The modules are built afresh (their own
        initialisation is overwritten by the saved weights), so loading does not re-seed the global generator."""
        state = torch.load(Path(path), weights_only=True, map_location="cpu")
        seeds = tuple(state["seeds"])
        ens = StackedEnsemble(MemberSpec(**state["spec"]), len(seeds)).to(device)
        ens.load_state_dict(state["model"])
        opt = MEMBER_OPTIMIZERS.create(state["optimizer_name"], ens.parameters(),
                                       lr=state["optimizer"]["param_groups"][0]["lr"])
        opt.load_state_dict(state["optimizer"])
        gens = []
        for st in state["generators"]:
            gen = torch.Generator()
            gen.set_state(st)
            gens.append(gen)
        return cls(ens, opt, gens, seeds, state["optimizer_name"], state["epochs_done"], list(state["nodes"]))

    @staticmethod
    def saved_epochs(path: str | Path) -> int:
        """The epochs done by the group saved in ``path`` (without building it)."""
        return int(torch.load(Path(path), weights_only=True, map_location="cpu")["epochs_done"])
