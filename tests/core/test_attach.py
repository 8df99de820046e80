"""attach / detach / named state: freezing, rollback on error, detach restores the original objects."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import deltatune as dt
from deltatune.core.inject import DeltaWrapper
from tests.conftest import BUILDERS, logits, perturb


def snapshot(model: nn.Module) -> dict:
    return {"modules": {n: m for n, m in model.named_modules()},
            "params": {n: (p.detach().clone(), p.requires_grad) for n, p in model.named_parameters()}}


def assert_untouched(model: nn.Module, snap: dict) -> None:
    assert {n: m for n, m in model.named_modules()} == snap["modules"]
    params = dict(model.named_parameters())
    assert params.keys() == snap["params"].keys()
    for name, (value, flag) in snap["params"].items():
        assert torch.equal(params[name], value) and params[name].requires_grad == flag, name


def test_detach_restores_same_objects_and_flags(arch):
    model = BUILDERS[arch]()
    snap = snapshot(model)
    before = logits(model)
    delta = dt.attach(model, dt.LoRA(r=4, targets="all-linear"))
    assert any(isinstance(m, DeltaWrapper) for m in model.modules())
    perturb(delta)
    assert not torch.allclose(logits(model), before)
    delta.detach()
    assert_untouched(model, snap)
    assert torch.equal(logits(model), before)
    assert dt.inspect(model).count("delta(s) attached") == 1 and "0 delta(s)" in dt.inspect(model)


def test_detach_of_merged_delta_unmerges_first():
    model = BUILDERS["bert"]()
    before = logits(model)
    delta = dt.attach(model, dt.LoRA(r=4, targets=["query"]))
    perturb(delta)
    delta.merge()
    delta.detach()
    assert torch.allclose(logits(model), before, atol=1e-5)


@pytest.mark.parametrize("make_cfg,words", [
    (lambda: dt.LoRA(r=4, targets=["qurey"]), ["qurey", "query"]),
    (lambda: dt.LoRA(r=4, targets=["query", "nope"]), ["nope"]),
    (lambda: dt.LoRA(r=4, targets=["attention"]), ["BertAttention"]),
])
def test_failed_attach_leaves_model_untouched(make_cfg, words):
    model = BUILDERS["bert"]()
    snap = snapshot(model)
    with pytest.raises(dt.TargetError) as err:
        dt.attach(model, make_cfg())
    assert all(w in str(err.value) for w in words)
    assert_untouched(model, snap)


def test_failure_in_second_method_rolls_back_the_first():
    model = BUILDERS["bert"]()
    snap = snapshot(model)
    with pytest.raises(dt.TargetError):
        dt.attach(model, dt.LoRA(targets=["query"]), dt.LoRA(targets=["missing"]))
    assert_untouched(model, snap)


def test_bad_train_modules_untouched():
    model = BUILDERS["bert"]()
    snap = snapshot(model)
    with pytest.raises(dt.TargetError, match="classifer"):
        dt.attach(model, dt.LoRA(targets=["query"]), train_modules=["classifer"])
    assert_untouched(model, snap)


@pytest.mark.parametrize("kwargs,field", [({"r": 0}, "r"), ({"r": -2}, "r"), ({"alpha": 0}, "alpha"),
                                         ({"dropout": 1.0}, "dropout"), ({"dropout": -0.1}, "dropout"),
                                         ({"init": "xavier"}, "init"), ({"rank_pattern": {"q": 0}}, "rank_pattern")])
def test_invalid_hyperparameters(kwargs, field):
    with pytest.raises(dt.ConfigError, match=rf"lora\.{field} must be"):
        dt.LoRA(**kwargs)


def test_mutated_config_is_revalidated_at_attach():
    cfg = dt.LoRA(targets=["query"])
    cfg.r = 0
    model = BUILDERS["bert"]()
    snap = snapshot(model)
    with pytest.raises(dt.ConfigError, match="lora.r"):
        dt.attach(model, cfg)
    assert_untouched(model, snap)


def test_attach_twice_same_name_is_refused():
    model = BUILDERS["bert"]()
    dt.attach(model, dt.LoRA(targets=["query"]))
    with pytest.raises(dt.AttachError, match="name="):
        dt.attach(model, dt.LoRA(targets=["query"]))


def test_not_a_config():
    with pytest.raises(dt.ConfigError, match="LoRA"):
        dt.attach(BUILDERS["bert"](), {"method": "lora"})
    with pytest.raises(dt.ConfigError, match="at least one"):
        dt.attach(BUILDERS["bert"]())


def test_merge_state_errors():
    model = BUILDERS["bert"]()
    delta = dt.attach(model, dt.LoRA(targets=["query"]))
    with pytest.raises(dt.StateError, match="not merged"):
        delta.unmerge()
    delta.merge()
    with pytest.raises(dt.StateError, match="already merged"):
        delta.merge()
    delta.unmerge()
    delta.detach()
    with pytest.raises(dt.StateError, match="detached"):
        delta.merge()


def test_num_trainable_and_summary():
    model = BUILDERS["bert"]()
    total = sum(p.numel() for p in model.parameters())
    delta = dt.attach(model, dt.LoRA(r=4, targets=["query", "value"]), train_modules=["classifier"])
    expected = 2 * 2 * (4 * 32 + 32 * 4) + (32 * 2 + 2)
    assert delta.num_trainable() == expected
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == expected
    assert delta.num_total() == total + expected  # the head is trained as a copy owned by the delta
    assert f"{expected:,}" in delta.summary() and "%" in delta.summary()


def test_inspect_shows_attach_points_and_counts():
    model = BUILDERS["bert"]()
    dt.attach(model, dt.LoRA(r=4, targets=["query"]), train_modules=["classifier"])
    text = dt.inspect(model)
    assert "query: lora wraps Linear(32x32)  [256 params]" in text
    assert "classifier: train wraps Linear(2x32)  [66 params]" in text
    assert "delta 'default' [active]" in text


def test_requires_grad_restored_when_user_had_frozen_parts():
    model = BUILDERS["bert"]()
    model.bert.embeddings.requires_grad_(False)
    delta = dt.attach(model, dt.LoRA(targets=["query"]))
    delta.detach()
    assert not any(p.requires_grad for p in model.bert.embeddings.parameters())
    assert all(p.requires_grad for p in model.bert.encoder.parameters())


def test_works_on_plain_torch_modules_too():
    model = nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.Linear(8, 2))
    delta = dt.attach(model, dt.LoRA(r=2, targets="all-linear"))
    assert delta.num_trainable() == (2 * 4 + 8 * 2) + (2 * 8 + 2 * 2)  # A: r x in, B: out x r per layer


@pytest.mark.parametrize("training", [False, True])
def test_new_modules_take_the_models_train_or_eval_mode(training):
    """A fresh nn.Module starts in training mode: attached to a model in eval mode, a LoRA or adapter
    dropout would silently be on (and outputs random)."""
    model = BUILDERS["bert"]().train(training)
    deltas = [dt.attach(model, cfg, name=name) for name, cfg in {
        "lora": dt.LoRA(r=4, targets="all-linear", dropout=0.5),
        "adapter": dt.Adapter(bottleneck=4),
        "prefix": dt.PrefixTuning(num_tokens=3)}.items()]
    assert all(m.training == training for m in model.modules())
    if not training:
        for delta in deltas:
            perturb(delta)
        assert torch.equal(logits(model), logits(model))  # no dropout drawn
