"""DoRA (LoRA(dora=True)): the formula, the detached norm, merge/unmerge, and PEFT parity both ways."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

import deltatune as dt
from deltatune.methods.lora.dora import DoRAConv1D, DoRAEmbedding, DoRALinear
from tests.conftest import BUILDERS, adam_losses, batch, logits

peft = pytest.importorskip("peft")



def randomize(delta, seed: int = 0) -> None:
    """Random A and B, magnitudes moved 20% around their start: a trained-looking DoRA."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, p in delta.parameters().items():
            noise = torch.randn(p.shape, generator=g)
            p.mul_(1 + 0.2 * noise) if key.endswith("magnitude") else p.copy_(0.3 * noise)


def dora_weight(w: torch.Tensor, wrapper) -> torch.Tensor:
    """m * (W + s B A) / ||W + s B A|| per output row, W as (out, in)."""
    combined = w + wrapper.scale * wrapper.lora_B @ wrapper.lora_A
    return wrapper.magnitude.view(-1, 1) * combined / combined.norm(dim=1, keepdim=True)


@pytest.mark.parametrize("layer", [nn.Linear(6, 5), Conv1D(5, 6)])
def test_identity_magnitude_init_and_formula(layer):
    model = nn.Sequential(layer)
    x = torch.randn(4, 6)
    before = model(x).detach()
    delta = dt.attach(model, dt.LoRA(r=2, alpha=4, targets=["0"], dora=True), train_modules=None)
    wrapper = model[0]
    assert isinstance(wrapper, DoRAConv1D if isinstance(layer, Conv1D) else DoRALinear)
    w = layer.weight.detach().T if isinstance(layer, Conv1D) else layer.weight.detach()
    assert wrapper.magnitude.shape == (5,) and torch.allclose(wrapper.magnitude, w.norm(dim=1))
    assert torch.equal(model(x), before)
    randomize(delta)
    assert torch.allclose(model(x), F.linear(x, dora_weight(w, wrapper), layer.bias), atol=1e-5)


def test_norm_is_detached_as_in_the_paper_and_peft():
    layer = nn.Linear(6, 5)
    model = nn.Sequential(layer)
    delta = dt.attach(model, dt.LoRA(r=2, alpha=4, targets=["0"], dora=True), train_modules=None)
    randomize(delta)
    wrapper, x = model[0], torch.randn(4, 6)
    model(x).pow(2).sum().backward()
    ours = [p.grad.clone() for p in (wrapper.lora_A, wrapper.lora_B, wrapper.magnitude)]
    params = [p.detach().clone().requires_grad_(True) for p in (wrapper.lora_A, wrapper.lora_B, wrapper.magnitude)]
    a, b, m = params
    combined = layer.weight + wrapper.scale * b @ a
    weight = m.view(-1, 1) * combined / combined.norm(dim=1, keepdim=True).detach()  # n is a constant
    F.linear(x, weight, layer.bias).pow(2).sum().backward()
    assert all(torch.allclose(g, p.grad, atol=1e-5) for g, p in zip(ours, params, strict=True))


@pytest.mark.parametrize("layer", [nn.Linear(6, 5), nn.Linear(6, 5, bias=False), Conv1D(5, 6)])
@pytest.mark.parametrize("tokens", [2, 8])
def test_fused_path_equals_the_formula_with_gradients(monkeypatch, layer, tokens):
    """The plain-layer path (LoRA's fused product, then m/n * . + b): outputs and the gradients of A, B, m and
    x as autograd gives them on the formula; 8 tokens take the folded products (8 x 11 > 6 x 5), 2 do not."""
    torch.manual_seed(0)
    model = nn.Sequential(layer)
    delta = dt.attach(model, dt.LoRA(r=2, alpha=4, targets=["0"], dora=True), train_modules=None)
    randomize(delta)
    calls = []
    fused = dt.methods.lora.layers.FusedLoRALinear.apply
    # a[7]: fold
    monkeypatch.setattr(dt.methods.lora.layers.FusedLoRALinear, "apply", lambda *a: calls.append(a[7]) or fused(*a))
    wrapper, x = model[0], torch.randn(tokens, 6, requires_grad=True)
    model(x).pow(2).sum().backward()
    assert calls == [tokens == 8]  # the fused Function ran, folding only for 8 tokens
    ours = [p.grad.clone() for p in (wrapper.lora_A, wrapper.lora_B, wrapper.magnitude, x)]
    a, b, m, x2 = [p.detach().clone().requires_grad_(True) for p in (wrapper.lora_A, wrapper.lora_B,
                                                                      wrapper.magnitude, x)]
    w = layer.weight.T if isinstance(layer, Conv1D) else layer.weight
    combined = w + wrapper.scale * b @ a
    weight = m.view(-1, 1) * combined / combined.norm(dim=1, keepdim=True).detach()
    expected = F.linear(x2, weight, layer.bias)
    expected.pow(2).sum().backward()
    assert torch.allclose(model(x), expected, atol=1e-5)
    assert all(torch.allclose(g, p.grad, atol=1e-5) for g, p in zip(ours, (a, b, m, x2), strict=True))
    with torch.no_grad():  # inference: one product with the DoRA weight where folding pays
        assert torch.allclose(model(x), expected, atol=1e-5)


def test_identity_at_attach_on_every_path(arch):
    """Bitwise the base model at attach, with and without autograd, on enough tokens to fold (m/n is exactly 1
    and B zero: the DoRA change is computed as (m/n - 1) W + (m/n) s B A, exactly 0, not m/n (W + sBA) - W)."""
    model = BUILDERS[arch]().eval()
    ids = batch(size=4, length=30)
    before = logits(model, ids)
    dt.attach(model, dt.LoRA(r=4, targets="all-linear", dora=True))
    assert torch.equal(logits(model, ids), before)
    assert torch.equal(model(input_ids=ids).logits, before)  # autograd on: the training path


def test_embedding_dora_matches_formula_and_merges():
    emb = nn.Embedding(20, 6, padding_idx=0)
    model = nn.Sequential(emb)
    delta = dt.attach(model, dt.LoRA(r=2, alpha=2, targets=["0"], dora=True), train_modules=None)
    wrapper = model[0]
    assert isinstance(wrapper, DoRAEmbedding) and wrapper.magnitude.shape == (6,)
    ids = torch.tensor([[0, 3, 7, 19]])
    assert torch.equal(model(ids), emb(ids))
    randomize(delta)
    combined = emb.weight + (wrapper.lora_B @ wrapper.lora_A).T * wrapper.scale
    expected = wrapper.magnitude * combined / combined.norm(dim=0)
    assert torch.allclose(model(ids), expected[ids], atol=1e-6)
    weight = emb.weight.detach().clone()
    assert torch.allclose(weight + wrapper.delta_weight(), expected, atol=1e-6)
    tuned = model(ids).detach()
    delta.merge()
    assert torch.allclose(emb.weight, expected, atol=1e-6) and torch.allclose(model(ids), tuned, atol=1e-6)
    delta.unmerge()
    assert torch.allclose(emb.weight, weight, atol=1e-6)


@pytest.mark.parametrize("layer", [nn.Linear(6, 5), Conv1D(5, 6)])
def test_merged_weight_is_the_dora_weight_and_unmerge_restores(layer):
    model = nn.Sequential(layer)
    weight = layer.weight.detach().clone()
    delta = dt.attach(model, dt.LoRA(r=2, alpha=4, targets=["0"], dora=True), train_modules=None)
    randomize(delta)
    w = weight.T if isinstance(layer, Conv1D) else weight
    expected = dora_weight(w, model[0]).detach()
    change = model[0].delta_weight()  # the true additive change W' - W, in the layer's own layout
    assert torch.allclose(weight + change, expected.T if isinstance(layer, Conv1D) else expected, atol=1e-6)
    delta.merge()
    merged = layer.weight.T if isinstance(layer, Conv1D) else layer.weight
    assert torch.allclose(merged, expected, atol=1e-6)
    assert torch.allclose(model[0].delta_weight(), change, atol=1e-6)  # the same while merged
    delta.unmerge()
    assert torch.allclose(layer.weight, weight, atol=1e-6)


def test_dropout_feeds_both_terms_like_peft():
    """With dropout active PEFT computes (m/n - 1) W drop(x) + m/n s B A drop(x); same RNG, same output."""
    base = nn.Sequential(nn.Linear(8, 8))
    ours = nn.Sequential(nn.Linear(8, 8))
    ours.load_state_dict(base.state_dict())
    pm = peft.get_peft_model(base, peft.LoraConfig(r=2, lora_alpha=4, lora_dropout=0.5, target_modules=["0"],
                                                   use_dora=True, init_lora_weights=False))
    delta = dt.attach(ours, dt.LoRA(r=2, alpha=4, dropout=0.5, targets=["0"], dora=True), train_modules=None)
    layer = pm.base_model.model[0]
    with torch.no_grad():
        ours[0].lora_A.copy_(layer.lora_A["default"].weight)
        ours[0].lora_B.copy_(layer.lora_B["default"].weight)
        ours[0].magnitude.copy_(layer.lora_magnitude_vector["default"].weight)
    x = torch.randn(5, 8)
    pm.train(), ours.train()
    torch.manual_seed(11)
    ref = pm(x)
    torch.manual_seed(11)
    assert torch.allclose(ours(x), ref, atol=1e-6)
    assert delta.num_trainable() == 2 * 8 * 2 + 8


@pytest.mark.parametrize("arch,targets", [
    ("bert", ["query", "value", "output.dense"]),
    ("llama", "all-linear"),
    ("gpt2", ["c_attn", "c_fc"]),
    ("llama", ["embed_tokens", "q_proj"]),
])
def test_export_loads_in_peft_with_same_outputs(tmp_path, arch, targets):
    model = BUILDERS[arch]()
    delta = dt.attach(model, dt.LoRA(r=4, alpha=8, targets=targets, dora=True), train_modules=None)
    randomize(delta)
    ours = logits(model)
    dt.export_peft(delta, tmp_path / "p")
    loaded = peft.PeftModel.from_pretrained(BUILDERS[arch](), tmp_path / "p").eval()
    assert loaded.peft_config["default"].use_dora
    assert torch.allclose(logits(loaded), ours, atol=1e-5)


@pytest.mark.parametrize("arch,kwargs", [
    ("bert", dict(target_modules=["query", "value"])),
    ("llama", dict(target_modules="all-linear")),
    ("gpt2", dict(target_modules=["c_attn", "c_proj"], fan_in_fan_out=True)),
    ("llama", dict(target_modules=["embed_tokens", "o_proj"])),
])
def test_import_gives_peft_outputs_and_merge_matches(tmp_path, arch, kwargs):
    torch.manual_seed(3)
    pm = peft.get_peft_model(BUILDERS[arch](), peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                                               use_dora=True, **kwargs))
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(1.0 + 0.3 * torch.rand_like(p))  # a trained magnitude, not the initial norm
    reference = logits(pm.eval())
    assert not torch.allclose(reference, logits(BUILDERS[arch]()), atol=1e-4)
    pm.save_pretrained(tmp_path / "p")
    model = BUILDERS[arch]()
    delta = dt.import_peft(model, tmp_path / "p")
    assert delta.configs[0].dora
    assert torch.allclose(logits(model), reference, atol=1e-5)
    delta.merge()
    assert torch.allclose(logits(model), logits(pm.merge_and_unload()), atol=1e-5)


def test_training_follows_peft_step_for_step(tmp_path):
    model = BUILDERS["llama"]()
    delta = dt.attach(model, dt.LoRA(r=4, alpha=8, targets=["q_proj", "v_proj", "down_proj"], dora=True),
            train_modules=None)
    dt.export_peft(delta, tmp_path / "p")
    pm = peft.PeftModel.from_pretrained(BUILDERS["llama"](), tmp_path / "p", is_trainable=True)
    ids = batch()
    curves = [adam_losses(m, [p for p in m.parameters() if p.requires_grad], 4, 1e-2, input_ids=ids, labels=ids)
              for m in (model, pm)]
    assert curves[0][-1] < curves[0][0]
    assert all(abs(a - b) < 1e-5 for a, b in zip(*curves, strict=True)), curves
