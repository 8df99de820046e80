"""Per-expert LoRA on the fused 3-D expert weights of mixture-of-experts models (methods/lora/experts.py)."""

from __future__ import annotations

import logging

import pytest
import torch

import deltatune as dt
from deltatune.core.inject import named_base_parameters
from deltatune.methods.lora import LoRAExperts
from tests.arch.models import ARCHS, inputs
from tests.conftest import adam_losses

MOE = ["mixtral", "qwen3-moe"]


def logits(model, arch):
    with torch.no_grad():
        return model(input_ids=inputs(arch)["input_ids"]).logits


@pytest.mark.parametrize("arch", MOE)
def test_identity_train_merge_save_load(arch, tmp_path):
    model = ARCHS[arch].build()
    before = logits(model, arch)
    delta = dt.attach(model, dt.LoRA(r=4, targets=["experts"]), train_modules=None)
    wrappers = [w for w in delta.wrappers() if isinstance(w, LoRAExperts)]
    assert len(wrappers) == 2 and torch.equal(logits(model, arch), before)
    bank = wrappers[0].base_layer()
    assert wrappers[0].lora_A["gate_up_proj"].shape == (4, 4, bank.gate_up_proj.shape[2])
    assert wrappers[0].lora_B["down_proj"].shape == (4, bank.down_proj.shape[1], 4)

    frozen = {n: p.detach().clone() for n, p in named_base_parameters(model)}
    losses = adam_losses(model, delta.parameters().values(), 4, 1e-2, **inputs(arch))
    assert losses[-1] < losses[0] - 1e-3, losses
    assert all(torch.equal(p, frozen[n]) and p.grad is None for n, p in named_base_parameters(model))
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in delta.parameters().values())

    tuned = logits(model, arch)
    delta.merge()
    assert torch.allclose(logits(model, arch), tuned, atol=1e-5)
    assert not torch.equal(bank.gate_up_proj, frozen["model.layers.0.mlp.experts.gate_up_proj"])
    delta.unmerge()
    assert all(torch.allclose(p, frozen[n], atol=1e-6) for n, p in named_base_parameters(model))

    delta.save(tmp_path / "ck")
    fresh = ARCHS[arch].build()
    dt.load(fresh, tmp_path / "ck")
    assert torch.equal(logits(fresh, arch), tuned)
    delta.detach()  # after merge + unmerge the weights are W within float rounding, not bitwise
    assert torch.allclose(logits(model, arch), before, atol=1e-5)


def test_per_expert_update_is_bmm_of_each_experts_factors():
    model = ARCHS["mixtral"].build()
    delta = dt.attach(model, dt.LoRA(r=2, alpha=6, targets=["experts"]), train_modules=None)
    wrapper = delta.wrappers()[0]
    with torch.no_grad():
        wrapper.lora_B["down_proj"].normal_()
    update = wrapper.delta("down_proj")
    for e in range(update.shape[0]):
        expected = 3.0 * wrapper.lora_B["down_proj"][e] @ wrapper.lora_A["down_proj"][e]
        assert torch.allclose(update[e], expected, atol=1e-6)


def test_two_named_deltas_on_one_experts_module_each_run_alone():
    """The second wrapper wraps the first: each substitutes its own W + dW through the other (``base.`` prefix)."""
    model = ARCHS["mixtral"].build()
    base = logits(model, "mixtral")
    outs = {}
    for name in ("a", "b"):
        delta = dt.attach(model, dt.LoRA(r=2, targets=["experts"]), train_modules=None, name=name)
        with torch.no_grad():
            for key, p in delta.parameters().items():
                if "lora_B" in key:
                    p.normal_(std=0.1)
        outs[name] = logits(model, "mixtral")
    dt.activate(model, "a")
    assert torch.equal(logits(model, "mixtral"), outs["a"]) and not torch.allclose(outs["a"], outs["b"], atol=1e-4)
    dt.deltas(model)["a"].set_active(False)
    assert torch.equal(logits(model, "mixtral"), base)


def test_all_linear_warns_that_experts_are_untouched_and_inspect_says_so(caplog):
    model = ARCHS["qwen3-moe"].build()
    with caplog.at_level(logging.WARNING, logger="deltatune.core.targets"):
        dt.attach(model, dt.LoRA(r=2), train_modules=None)
    assert "'experts'" in caplog.text and "model.layers.0.mlp.experts" in caplog.text
    assert "not reached: the routed experts of 2 mixture-of-experts layers" in dt.inspect(model)
    caplog.clear()
    other = ARCHS["qwen3-moe"].build()
    with caplog.at_level(logging.WARNING, logger="deltatune.core.targets"):
        dt.attach(other, dt.LoRA(r=2, targets=["all-linear", "experts"]), train_modules=None)
    assert "experts" not in caplog.text and "not reached" not in dt.inspect(other)


@pytest.mark.parametrize("option", [dict(dora=True), dict(dropout=0.1), dict(init="pissa"),
                                    dict(adaptive=dt.RankBudget(target_total=4, start=1, end=3))])
def test_options_that_need_a_2d_weight_are_refused_by_name(option):
    model = ARCHS["mixtral"].build()
    field = next(iter(option))
    with pytest.raises(dt.ConfigError, match=f"lora.{field}=.*fused expert weights"):
        dt.attach(model, dt.LoRA(r=2, targets=["experts"], **option), train_modules=None)
    assert all(p.requires_grad for p in model.parameters())  # left as it was: nothing frozen


def test_linear_only_methods_name_lora_for_the_experts():
    with pytest.raises(dt.TargetError, match="only dt.LoRA reaches"):
        dt.attach(ARCHS["mixtral"].build(), dt.VeRA(targets=["experts"]), train_modules=None)


def test_peft_export_is_refused_with_the_reason(tmp_path):
    model = ARCHS["mixtral"].build()
    delta = dt.attach(model, dt.LoRA(r=2, targets=["experts"]), train_modules=None)
    with pytest.raises(dt.StateError, match="one pair per expert"):
        dt.export_peft(delta, tmp_path / "peft")
    assert not (tmp_path / "peft").exists()
