"""IA3: default placement per architecture, the rescaling formulas, exact merge/unmerge, explicit targets."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

import deltatune as dt
from deltatune.core.merge_on_the_fly import linear_forward
from deltatune.methods.ia3 import IA3Linear
from tests.conftest import BUILDERS, logits

# block 0: path suffix -> (scales input?, vector length)
DEFAULTS = {
    "bert": {"attention.self.key": (False, 32), "attention.self.value": (False, 32), "output.dense": (True, 64)},
    "llama": {"self_attn.k_proj": (False, 16), "self_attn.v_proj": (False, 16), "mlp.down_proj": (True, 64)},
    "gpt2": {"attn.c_attn": (False, 96), "mlp.c_proj": (True, 128)},  # fused q/k/v: one vector over all of it
}
PREFIX = {"bert": "bert.encoder.layer.0.", "llama": "model.layers.0.", "gpt2": "transformer.h.0."}


def test_default_placement_and_vector_sizes(arch):
    delta = dt.attach(BUILDERS[arch](), dt.IA3(), train_modules=None)
    modules = delta.attachments[0].modules
    block0 = {p.removeprefix(PREFIX[arch]): (m.on_input, m.l.numel()) for p, m in modules.items()
              if p.startswith(PREFIX[arch])}
    assert block0 == DEFAULTS[arch]
    assert len(modules) == 2 * len(DEFAULTS[arch])
    assert delta.num_trainable() == 2 * sum(n for _, n in DEFAULTS[arch].values())
    assert all(torch.equal(m.l, torch.ones_like(m.l)) for m in modules.values())


def random_scales(delta, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in delta.parameters().values():
            p.copy_(torch.rand(p.shape, generator=g) + 0.5)  # in [0.5, 1.5): away from 0, so merge is allowed


@pytest.mark.parametrize("layer", [nn.Linear(6, 5), Conv1D(5, 6)])
def test_formulas_output_and_input_scaling(layer):
    x = torch.randn(3, 6)
    out_model = nn.Sequential(layer)
    delta = dt.attach(out_model, dt.IA3(targets=["0"]), train_modules=None)
    random_scales(delta)
    l_out = out_model[0].l
    assert torch.allclose(out_model(x), l_out * layer(x), atol=1e-6)
    delta.detach()
    delta = dt.attach(out_model, dt.IA3(targets=["0"], feedforward=["0"]), train_modules=None)
    random_scales(delta)
    l_in = out_model[0].l
    assert l_in.shape == (6,) and torch.allclose(out_model(x), layer(l_in * x), atol=1e-6)


@pytest.mark.parametrize("on_input", [False, True])
@pytest.mark.parametrize("layer", [nn.Linear(6, 5), Conv1D(5, 6)])
def test_merge_scales_rows_or_columns_and_unmerge_restores(layer, on_input):
    weight, bias = layer.weight.detach().clone(), layer.bias.detach().clone()
    model = nn.Sequential(layer)
    delta = dt.attach(model, dt.IA3(targets=["0"], feedforward=["0"] if on_input else None), train_modules=None)
    random_scales(delta)
    scales = model[0].l.detach()
    x = torch.randn(3, 6)
    tuned = model(x)
    delta.merge()
    conv = isinstance(layer, Conv1D)  # weight stored (in, out)
    if on_input:
        expected_w, expected_b = weight * (scales.view(-1, 1) if conv else scales.view(1, -1)), bias
    else:
        expected_w, expected_b = weight * (scales.view(1, -1) if conv else scales.view(-1, 1)), bias * scales
    assert torch.allclose(layer.weight, expected_w, atol=1e-7) and torch.allclose(layer.bias, expected_b, atol=1e-7)
    assert torch.allclose(model(x), tuned, atol=1e-6)
    delta.unmerge()
    assert torch.allclose(layer.weight, weight, atol=1e-7) and torch.allclose(layer.bias, bias, atol=1e-7)


def test_merge_refuses_a_scale_near_zero_and_changes_nothing():
    model = BUILDERS["llama"]()
    delta = dt.attach(model, dt.IA3(), train_modules=None)
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.l[3] = 0.0
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    tuned = logits(model)
    with pytest.raises(dt.StateError, match="ia3.*unmerged"):
        delta.merge()
    # earlier wrappers were merged before the failing one: merge takes them back out before raising
    assert not delta.is_merged
    assert torch.allclose(logits(model), tuned, atol=1e-6)
    for n, p in model.named_parameters():
        assert torch.allclose(p, weights[n], atol=1e-6), n


def test_explicit_targets_and_feedforward():
    model = BUILDERS["bert"]()
    delta = dt.attach(model, dt.IA3(targets=["query", "intermediate.dense"], feedforward=["intermediate.dense"],
                                    layers=[1]), train_modules=None)
    modules = delta.attachments[0].modules
    assert {p: m.on_input for p, m in modules.items()} == {"bert.encoder.layer.1.attention.self.query": False,
                                                          "bert.encoder.layer.1.intermediate.dense": True}


def test_config_errors():
    with pytest.raises(dt.ConfigError, match="ia3.feedforward must be None unless targets"):
        dt.IA3(feedforward=["down_proj"])
    with pytest.raises(dt.ConfigError, match="subset of targets"):
        dt.attach(BUILDERS["llama"](), dt.IA3(targets=["k_proj"], feedforward=["down_proj"]), train_modules=None)
    with pytest.raises(dt.TargetError, match="k_prj.*k_proj"):
        dt.attach(BUILDERS["llama"](), dt.IA3(targets=["k_prj"]), train_modules=None)


def test_stacks_on_lora_and_merges_in_order():
    """IA3 over a LoRA on the same layer: merging folds LoRA first, then scales W + BA (and back)."""
    model = BUILDERS["llama"]()
    delta = dt.attach(model, dt.LoRA(r=2, targets=["k_proj", "down_proj"]), dt.IA3(), train_modules=None)
    random_scales(delta)
    wrapper = model.model.layers[0].self_attn.k_proj
    assert isinstance(wrapper, IA3Linear) and wrapper.base_layer() is wrapper.base.base
    tuned = logits(model)
    delta.merge()
    assert torch.allclose(logits(model), tuned, atol=1e-5)
    delta.unmerge()
    assert torch.allclose(logits(model), tuned, atol=1e-5)


def test_inspect_says_which_side_is_scaled():
    model = BUILDERS["gpt2"]()
    dt.attach(model, dt.IA3(), train_modules=None)
    text = dt.inspect(model)
    assert "c_attn: ia3 wraps Conv1D(32x96) scales output  [96 params]" in text
    assert "c_proj: ia3 wraps Conv1D(128x32) scales input (FFN activations)  [128 params]" in text


@pytest.mark.parametrize("on_input", [False, True])
@pytest.mark.parametrize("layer_type", [nn.Linear, Conv1D])
def test_inference_over_many_tokens_scales_the_weight_instead(monkeypatch, layer_type, on_input):
    """Without autograd and over many tokens IA3 multiplies by the rescaled weight (core/merge_on_the_fly.py):
    bitwise the base while l = 1, the formula after training, the activation path for short inputs."""
    import deltatune.methods.ia3 as ia3_module

    torch.manual_seed(0)
    layer = nn.Linear(16, 12) if layer_type is nn.Linear else Conv1D(12, 16)
    model = nn.Sequential(layer)
    targets = dict(targets=["0"], feedforward=["0"] if on_input else None)
    delta = dt.attach(model, dt.IA3(**targets))
    calls = []
    monkeypatch.setattr(ia3_module, "linear_forward", lambda *a: calls.append(1) or linear_forward(*a))
    long_x, short_x = torch.randn(2, 20, 16), torch.randn(1, 2, 16)
    with torch.no_grad():
        assert torch.equal(model(long_x), layer(long_x)) and len(calls) == 1
        w = delta.wrappers()[0]
        w.l.uniform_(0.5, 1.5)
        for x in (long_x, short_x):
            expected = layer(x * w.l) if on_input else layer(x) * w.l
            assert torch.allclose(model(x), expected, atol=1e-6)
    assert len(calls) == 2  # the short input scaled its activations
