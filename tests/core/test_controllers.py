"""Delta.step / Delta.finalize: the general hook through which controllers (e.g. a rank budget) advance."""

from __future__ import annotations

import pytest
import torch

import deltatune as dt
from tests.conftest import BUILDERS, logits


class Recorder:
    def __init__(self) -> None:
        self.calls: list = []

    def step(self, step):
        self.calls.append(("step", step))

    def finalize(self):
        self.calls.append(("finalize",))


def test_step_and_finalize_reach_every_controller_and_are_noops_otherwise():
    model = BUILDERS["bert"]()
    delta = dt.attach(model, dt.LoRA(r=2, targets=["query"]), dt.LoRA(r=2, targets=["value"]), train_modules=None)
    before = logits(model)
    delta.step()
    delta.step(3)
    delta.finalize()  # plain methods: nothing happens
    assert [a.controllers for a in delta.attachments] == [[], []]
    assert delta.is_active and torch.equal(logits(model), before)
    recorders = [Recorder(), Recorder()]
    for att, rec in zip(delta.attachments, recorders):
        att.controllers.append(rec)
    delta.step(5)
    delta.step()
    delta.finalize()
    assert all(r.calls == [("step", 5), ("step", None), ("finalize",)] for r in recorders)
    delta.detach()
    with pytest.raises(dt.StateError, match="cannot step delta 'default': it was detached"):
        delta.step()
