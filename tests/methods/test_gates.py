"""Gates (UniPELT): identity at init, exact scaling of each method's path, training, save/load, errors."""

from __future__ import annotations

import logging

import pytest
import torch

import deltatune as dt
from deltatune.methods.gates import Gate
from tests.conftest import BUILDERS, batch, logits, perturb


def lora_params(delta):
    return {k: p for k, p in delta.parameters().items() if k.startswith("lora:")}


def gates_of(delta) -> list[Gate]:
    return [m for m in delta.modules() if isinstance(m, Gate)]


def test_identity_at_init_and_gates_in_inspect(arch):
    model = BUILDERS[arch]()
    base = logits(model)
    delta = dt.attach(model, dt.LoRA(r=4, targets="all-linear"), dt.Adapter(kind="houlsby", bottleneck=8), gates=True,
            train_modules=None)
    assert torch.equal(logits(model), base)
    slots = sorted({g.slot for g in gates_of(delta)})
    assert slots == ["adapter", "lora"] and len(gates_of(delta)) == 2 * 2  # 2 layers x 2 methods
    text = dt.inspect(model)
    assert "gates adds Gate(32) sigmoid gate on lora" in text and "sigmoid gate on adapter" in text
    # the tree lists each layer's modules together (rows are sorted by path, layer numbers numerically)
    lines = [line.strip() for line in text.splitlines()]
    first, second = lines.index("0"), lines.index("1")
    gate_rows = [i for i, line in enumerate(lines) if "gates adds" in line]
    assert len(gate_rows) == 4 and all(first < i < second for i in gate_rows[:2]) and min(gate_rows[2:]) > second


def test_constant_gate_scales_the_method_path_exactly():
    """With w = 0 the gate is the constant ``init``: gated LoRA == ungated LoRA with B * init."""
    gated_model, plain_model = BUILDERS["llama"](), BUILDERS["llama"]()
    gated = dt.attach(gated_model, dt.LoRA(r=4, targets="all-linear"), gates=dt.Gates(init=0.25), train_modules=None)
    perturb(gated)
    with torch.no_grad():
        for g in gates_of(gated):
            g.weight.zero_()  # perturb() gave the gates random values too: back to the constant 0.25
            g.bias.fill_(torch.logit(torch.tensor(0.25)).item())
    plain = dt.attach(plain_model, dt.LoRA(r=4, targets="all-linear"), train_modules=None)
    state = {k: (v * 0.25 if "lora_B" in k else v) for k, v in gated.state_dict().items() if k.startswith("lora:")}
    plain.load_state_dict(state)
    assert torch.allclose(logits(gated_model), logits(plain_model), atol=1e-6)


def test_gates_depend_on_the_input_and_train():
    model = BUILDERS["bert"]()
    frozen = {n: p.detach().clone() for n, p in model.named_parameters()}
    delta = dt.attach(model, dt.LoRA(r=4, targets=["query", "value"]), dt.Adapter(kind="pfeiffer", bottleneck=8),
                      gates=True, train_modules=["classifier"])
    perturb(delta, std=0.3)
    gate = gates_of(delta)[0]
    hidden = torch.randn(2, 5, 32)
    values = gate(hidden)
    assert values.shape == (2, 5) and values.std() > 0 and ((values > 0) & (values < 1)).all()
    ids, labels = batch(size=4), torch.tensor([0, 1, 1, 0])
    model.train()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(8):
        opt.zero_grad()
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        assert all(g.weight.grad is not None and g.weight.grad.abs().sum() > 0 for g in gates_of(delta))
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    for name, param in model.named_parameters():
        if name in frozen and not param.requires_grad:
            assert torch.equal(param, frozen[name]), name
    assert all(m.gate_scale is None for m in delta.modules())  # cleared after each forward


def test_gated_delta_saves_loads_and_two_gated_deltas_share_a_model(tmp_path):
    model = BUILDERS["bert"]()
    first = dt.attach(model, dt.LoRA(r=2, targets=["query"]), gates=True, name="first", train_modules=None)
    perturb(first, seed=1)
    second = dt.attach(model, dt.LoRA(r=2, targets=["query"]), dt.Adapter(kind="parallel", bottleneck=8),
                       gates=True, name="second", train_modules=None)
    perturb(second, seed=2)
    out_second = logits(model)
    assert any(path.endswith("gate_lora_2") for a in second.attachments for path in a.modules)
    second.save(tmp_path / "second")
    fresh = BUILDERS["bert"]()
    loaded = dt.load(fresh, tmp_path / "second")
    assert torch.equal(logits(fresh), out_second)
    assert sorted(loaded.state_dict()) == sorted(second.state_dict())  # keys independent of the other delta
    with dt.active(model, "first"):
        out_first = logits(model)
    with dt.route(model, ["second", "first", "second"]):
        mixed = logits(model)
    assert torch.allclose(mixed[0], out_second[0], atol=1e-6) and torch.allclose(mixed[1], out_first[1], atol=1e-6)


def test_detach_removes_gates_and_hooks():
    model = BUILDERS["gpt2"]()
    modules = dict(model.named_modules())
    base = logits(model)
    delta = dt.attach(model, dt.LoRA(r=2, targets=["c_attn"]), gates=True, train_modules=None)
    perturb(delta)
    delta.detach()
    assert dict(model.named_modules()) == modules
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in model.modules())
    assert torch.equal(logits(model), base)


def test_methods_that_cannot_be_gated_are_reported(caplog):
    model = BUILDERS["bert"]()
    with caplog.at_level(logging.WARNING):
        delta = dt.attach(model, dt.LoRA(r=2, targets=["query"]), dt.PrefixTuning(num_tokens=2), gates=True,
                train_modules=None)
    assert "prefix" in caplog.text and "not gated" in caplog.text
    assert {g.slot for g in gates_of(delta)} == {"lora"}


@pytest.mark.parametrize("call,error,words", [
    (lambda m: dt.attach(m, dt.Gates(), train_modules=None), dt.ConfigError, "Gates alone"),
    (lambda m: dt.attach(m, dt.LoRA(targets=["query"]), gates="yes",
            train_modules=None), dt.ConfigError, "gates must be"),
    (lambda m: dt.attach(m, dt.LoRA(targets=["query"]), dt.Gates(), gates=True,
            train_modules=None), dt.ConfigError, "at most one"),
    (lambda m: dt.Gates(init=1.0), dt.ConfigError, "gates.init"),
    (lambda m: dt.attach(m, dt.LoRA(targets=["query"]), gates=dt.Gates(methods=["adapter"]),
            train_modules=None), dt.ConfigError,
     "['lora']"),
    (lambda m: dt.attach(m, dt.LoRA(targets=["classifier"]), gates=True,
            train_modules=None), dt.AttachError, "transformer layer"),
])
def test_errors_leave_the_model_untouched(call, error, words):
    model = BUILDERS["bert"]()
    modules = dict(model.named_modules())
    with pytest.raises(error) as info:
        call(model)
    assert words in str(info.value)
    assert dict(model.named_modules()) == modules and dt.deltas(model) == {}
