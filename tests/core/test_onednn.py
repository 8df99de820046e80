"""Frozen linear layers' products on oneDNN (core/onednn.py): same function within float32 rounding, the
products really routed, and every case it must not touch left on the default path."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import deltatune as dt
from deltatune.core import onednn
from tests.conftest import BUILDERS, batch, perturb

pytestmark = pytest.mark.skipif(not onednn.available(), reason="this torch build has no oneDNN")


@pytest.fixture
def calls(monkeypatch) -> list[tuple[int, int, int]]:
    """Every product sent to oneDNN, as (rows, in, out)."""
    seen: list[tuple[int, int, int]] = []
    real = onednn.matmul_t

    def counting(x, weight, bias=None):
        seen.append((x.shape[0], *weight.shape[::-1]))
        return real(x, weight, bias)

    monkeypatch.setattr(onednn, "matmul_t", counting)
    return seen


def lora_model(arch: str = "bert", dropout: float = 0.0):
    model = BUILDERS[arch]()
    head = ["classifier"] if arch == "bert" else None
    delta = dt.attach(model, dt.LoRA(r=4, targets="all-linear", dropout=dropout), train_modules=head)
    perturb(delta)
    return model, delta


def loss_and_grads(model: nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids).logits
    out.pow(2).mean().backward()
    return out.detach(), [p.grad.clone() for p in model.parameters() if p.requires_grad]


def frozen_linears(model: nn.Module) -> list[nn.Linear]:
    return [m for m in model.modules() if type(m) is nn.Linear and not m.weight.requires_grad]


def test_enable_counts_frozen_linear_layers_and_disable_restores_them():
    model, _ = lora_model()
    frozen = frozen_linears(model)
    # 2 layers x 6 under LoRA (q, k, v, o, up, down), the pooler under LoRA, the classifier's frozen original
    # (train_modules trains a copy)
    assert dt.enable_onednn(model) == len(frozen) == 14
    assert all(layer.onednn and "forward" in vars(layer) for layer in frozen)
    keys = set(model.state_dict())
    assert dt.disable_onednn(model) == len(frozen)
    assert not any(hasattr(layer, "onednn") or "forward" in vars(layer) for layer in frozen)
    assert set(model.state_dict()) == keys


@pytest.mark.parametrize("arch", ["bert", "llama"])
@pytest.mark.parametrize(("dropout", "size"), [
    (0.0, 4),  # 64 rows: W' = W + s B A folded into both products (core/merge_on_the_fly.py: folding_pays)
    (0.0, 1),  # 16 rows: not folded, the LoRA term added in place, its input gradient too
    (0.5, 4),  # dropout: the LoRA path reads another input
])
def test_lora_training_matches_the_default_path(arch, dropout, size, calls):
    model, _ = lora_model(arch, dropout)
    model.train()
    ids = batch(size=size, length=onednn.MIN_TOKENS)
    torch.manual_seed(3)
    want_out, want_grads = loss_and_grads(model, ids)
    assert not calls
    dt.enable_onednn(model)
    torch.manual_seed(3)  # same dropout masks
    out, grads = loss_and_grads(model, ids)
    # the forward product of every layer with at least MIN_TOKENS rows (BERT: 12, not the pooler's rows;
    # Llama: 14 and lm_head)
    assert len(calls) == {"bert": 12, "llama": 15}[arch]
    assert torch.allclose(out, want_out, rtol=1e-5, atol=1e-5)
    assert len(grads) == len(want_grads)
    for got, want in zip(grads, want_grads, strict=True):
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-6), (got - want).abs().max()


def test_untargeted_layers_and_trainable_biases_route_with_their_gradients(calls):
    """BitFit: weights frozen, biases train: every layer routes, and dL/db is the default path's."""
    model = BUILDERS["bert"]()
    dt.attach(model, dt.BitFit())
    ids = batch(size=4, length=16)
    _, want = loss_and_grads(model, ids)
    routed = dt.enable_onednn(model)
    _, got = loss_and_grads(model, ids)
    assert routed == 14 and len(calls) == 12  # the pooler and classifier have 4 rows: under MIN_TOKENS
    assert all(torch.allclose(g, w, rtol=1e-4, atol=1e-6) for g, w in zip(got, want, strict=True))


def test_inference_folded_and_merged_still_route_and_agree(calls):
    model, delta = lora_model()
    ids = batch(size=4, length=32)  # enough tokens that inference folds W' per call
    with torch.no_grad():
        want = model(input_ids=ids).logits
        dt.enable_onednn(model)
        folded = model(input_ids=ids).logits
        assert len(calls) == 12  # not the pooler's or the classifier's 4 rows
        delta.merge()  # W changes in place: nothing cached can go stale
        merged = model(input_ids=ids).logits
        delta.unmerge()
        unmerged = model(input_ids=ids).logits
    assert len(calls) == 36
    for out in (folded, merged, unmerged):
        assert torch.allclose(out, want, rtol=1e-5, atol=1e-5)


def test_cases_it_must_not_touch_keep_the_default_path(calls):
    model, _ = lora_model()
    dt.enable_onednn(model)
    with torch.no_grad():
        model(input_ids=batch(size=1, length=onednn.MIN_TOKENS - 1))  # too few rows to pay
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(input_ids=batch(size=4, length=16))
    assert not calls
    layer = model.bert.encoder.layer[0].attention.self.query.base
    layer.weight.requires_grad_(True)  # a layer that trains after enable must get its weight gradient
    model(input_ids=batch(size=4, length=16)).logits.sum().backward()
    assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0


def test_a_deep_copy_routes_through_its_own_weights():
    model, _ = lora_model()
    dt.enable_onednn(model)
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for layer in frozen_linears(twin):
            layer.weight.zero_()
        ids = batch(size=4, length=16)
        assert not torch.allclose(twin(input_ids=ids).logits, model(input_ids=ids).logits)
    assert all(layer.forward.__self__ is layer for layer in frozen_linears(twin))


def test_training_compiles_to_one_graph_with_the_same_gradients():
    """The oneDNN call is a custom op with a fake kernel: dynamo and AOT autograd trace through it."""
    model, _ = lora_model("llama")
    dt.enable_onednn(model)
    ids = batch(size=2, length=16)
    _, eager = loss_and_grads(model, ids)
    _, compiled = loss_and_grads(torch.compile(model, fullgraph=True, backend="aot_eager"), ids)
    assert all(torch.allclose(c, e, atol=1e-6) for c, e in zip(compiled, eager, strict=True))


def test_modules_it_cannot_route_are_left_alone():
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8).to(torch.float64), nn.Linear(8, 8))
    model[0].requires_grad_(False)
    model[1].requires_grad_(False)
    assert dt.enable_onednn(model) == 1  # model[1] is float64, model[2] trains
    assert "forward" not in vars(model[1]) and "forward" not in vars(model[2])


def test_a_strided_input_gives_the_default_paths_output_and_gradients():
    torch.manual_seed(0)
    layer = nn.Linear(8, 6)
    layer.weight.requires_grad_(False)  # the bias trains
    strided = torch.randn(20, 3, 8).transpose(0, 1)  # 60 rows, not contiguous
    results = []
    for enabled in (False, True):
        if enabled:
            assert dt.enable_onednn(layer) == 1
        x = strided.clone().requires_grad_(True)  # clone keeps the strides
        out = layer(x)
        out.pow(2).sum().backward()
        results.append((out.detach(), x.grad, layer.bias.grad))
        layer.bias.grad = None
    for got, want in zip(*results, strict=True):
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-5)
