"""core.inject.add_free_module + Attachment.state_paths: an added module whose usual leaf is taken by another
named delta goes to ``<leaf>_2``, but its checkpoint keys keep the usual path, so it loads onto a fresh model."""

from __future__ import annotations

import torch
from torch import nn

from deltatune.core.config import DeltaConfig
from deltatune.core.delta import undo_attachment
from deltatune.core.inject import Attachment, DeltaModule, add_free_module


class Extra(DeltaModule):
    def __init__(self, value: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.full((2,), value))


def test_taken_leaf_is_renamed_but_saved_under_the_usual_path():
    model = nn.Sequential(nn.Linear(2, 2))
    first, second = Attachment("x", DeltaConfig()), Attachment("x", DeltaConfig())
    assert add_free_module(model, first, "0.extra", Extra(1.0)) == "0.extra"
    assert add_free_module(model, second, "0.extra", Extra(2.0)) == "0.extra_2"
    assert isinstance(model[0].extra_2, Extra) and first.state_paths == {}
    assert second.state_paths == {"0.extra_2": "0.extra"}
    assert list(second.parameters()) == ["0.extra.weight"]  # the stable key, not the physical path
    assert second.state_path("0.extra_2") == "0.extra" and second.state_path("other") == "other"
    undo_attachment(model, second)
    undo_attachment(model, first)
    assert not hasattr(model[0], "extra") and not hasattr(model[0], "extra_2")
