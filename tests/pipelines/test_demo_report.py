"""The demo's tables, without Ray: what a person reads at the end of `make demo`."""
import torch

from equiray_pipelines.demo.serving import _answers_table


def _answer(label, p, **extras):
    return {"label": label, "probabilities": {label: p}, **extras}


def test_the_served_answers_table_shows_every_extra_the_model_gives():
    """A mixture answers with both its members' disagreement and its canonicalized member's pose: both columns; a
    plain model: neither."""
    mixed = {d: [_answer("Trouser", 0.97, disagreement=0.5 if d == 90 else 0.0, pose_deg=float(d) or 359.6)]
             for d in (0, 90, 180, 270)}
    table = _answers_table(mixed, torch.tensor([1]), ["Top", "Trouser"])
    head, _, row = table.splitlines()
    assert head.endswith("| disagreement (0 / 90 / 180 / 270) | pose_deg (0 / 90 / 180 / 270) |")
    assert row == ("| test 0 | Trouser | Trouser (97%) | Trouser (97%) | Trouser (97%) | Trouser (97%) | "
                   "0.00 / 0.50 / 0.00 / 0.00 | 0 / 90 / 180 / 270 |")
    plain = {d: [_answer("Top", 0.6)] for d in (0, 90)}
    assert _answers_table(plain, torch.tensor([0]), ["Top"]).splitlines()[0] == "| image | true label | 0 deg | 90 deg |"
