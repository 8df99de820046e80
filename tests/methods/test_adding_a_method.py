"""docs/adding-a-method.md's example method, run as written: registered from the page's code block, it attaches,
trains, saves and loads, routes per sample and is refused by merge, with no other file touched. Removed from
the registry afterwards, so the rest of the suite never sees it."""

from __future__ import annotations

import re
import sys
import types
from pathlib import Path

import pytest
import torch

import deltatune as dt
from deltatune.core.registry import METHODS
from deltatune.train.config import RunConfig, check_methods
from tests.conftest import adam_losses, batch, logits, tiny_llama

DOC = Path(__file__).resolve().parents[2] / "docs" / "adding-a-method.md"


@pytest.fixture(scope="module")
def shift():
    code = re.search(r"```python\n(.*?)```", DOC.read_text(), re.S).group(1)
    module = types.ModuleType("doc_example_shift")
    sys.modules[module.__name__] = module  # dataclasses resolve the config's annotations through it
    try:
        exec(compile(code, str(DOC), "exec"), module.__dict__)
        yield module
    finally:
        METHODS.pop("shift", None)
        del sys.modules[module.__name__]


def test_the_documented_method_registers_and_behaves(shift, tmp_path):
    assert METHODS["shift"].config is shift.OutputShift
    model = tiny_llama()
    before = logits(model)
    delta = dt.attach(model, shift.OutputShift(targets=["q_proj", "v_proj"]))
    assert torch.equal(logits(model), before)  # starts at zero
    assert len(delta.wrappers()) == 4 and delta.num_trainable() == 2 * (32 + 16)  # q: 32 outputs, v: 2 KV heads x 8
    ids = batch()
    losses = adam_losses(model, delta.parameters().values(), 10, 0.1, input_ids=ids, labels=ids)
    assert losses[-1] < 0.99 * losses[0], losses  # measured 0.978: the tiny model's 0.02-scale head caps it
    tuned = logits(model)
    delta.save(tmp_path / "shift")
    fresh = tiny_llama()
    dt.load(fresh, tmp_path / "shift")
    assert torch.equal(logits(fresh), tuned)
    with dt.route(model, ["default", None, "default"]):
        mixed = logits(model)
    assert torch.allclose(mixed[1], before[1], atol=1e-6) and torch.allclose(mixed[0], tuned[0], atol=1e-6)
    with pytest.raises(dt.StateError, match=r"cannot be merged into weights: \['shift'\]"):
        delta.merge()


def test_the_documented_method_is_a_yaml_method(shift):
    cfg = RunConfig.model_validate({"task": "causal_lm", "delta": [{"method": "shift", "targets": "all-linear"}]})
    check_methods(cfg)
    assert isinstance(cfg.delta_configs()[0], shift.OutputShift)
    bad = RunConfig.model_validate({"task": "causal_lm", "delta": [{"method": "shift", "init": 1e4}]})
    with pytest.raises(dt.ConfigError, match=r"delta\[0\]: shift.init must be a number below 1000"):
        check_methods(bad)
