"""One contract, every method (adapters, BitFit, IA3, DoRA) on tiny BERT, Llama (GQA) and GPT-2.

Each row is checked the same way: unchanged outputs at attach, only the delta trains and the rest of the
base stays bitwise equal, a few steps reduce the loss, save -> load onto a fresh base gives the same outputs,
detach gives back the original objects and outputs, merge/unmerge within 1e-5 where mergeable (a clear
StateError otherwise), per-sample routing / deactivation switch the effect off, inspect lists every spot.
"""

from __future__ import annotations

import pytest
import torch

import deltatune as dt
from deltatune.core.inject import DeltaWrapper, named_base_parameters
from tests.conftest import BUILDERS, batch, logits

# name -> (config factory, mergeable, learning rate for the training check)
CASES = {
    "houlsby": (lambda: dt.Adapter(kind="houlsby", bottleneck=8), False, 3e-2),
    "pfeiffer": (lambda: dt.Adapter(kind="pfeiffer", bottleneck=8), False, 3e-2),
    "parallel": (lambda: dt.Adapter(kind="parallel", bottleneck=8, scale=2.0), False, 3e-2),
    "bitfit": (lambda: dt.BitFit(), True, 3e-2),
    # IA3 moves vectors that start at 1 by ~lr per Adam step: it needs a larger step to show in 8 steps
    "ia3": (lambda: dt.IA3(), True, 0.3),
    "dora": (lambda: dt.LoRA(r=4, alpha=8, dora=True), True, 3e-2),
}
ROWS = [(c, a) for c in CASES for a in sorted(BUILDERS) if not (c == "bitfit" and a == "llama")]  # no biases
LABELS = torch.tensor([0, 1, 1])



@pytest.fixture(params=ROWS, ids=[f"{c}-{a}" for c, a in ROWS])
def row(request):
    return request.param


def attach(case: str, arch: str, model=None):
    model = model if model is not None else sharpened(arch)
    return model, dt.attach(model, CASES[case][0](), train_modules=None)


def nudge(delta, seed: int = 5, std: float = 0.1) -> None:
    """Move every trained tensor a little from its start, as training would (keeps IA3 near 1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in delta.parameters().values():
            p.add_(torch.randn(p.shape, generator=g) * std)


def loss_of(model, arch: str) -> torch.Tensor:
    ids = batch()
    return model(input_ids=ids, labels=LABELS if arch == "bert" else ids).loss


def sharpened(arch: str):
    """The tiny models' heads have 0.02-scale weights after a norm layer, which caps how far *any* method
    that leaves them frozen can move the loss; scaling the head up lets a few steps show real learning."""
    model = BUILDERS[arch]()
    with torch.no_grad():
        heads = [model.bert.pooler.dense, model.classifier] if arch == "bert" else [model.get_output_embeddings()]
        for head in heads:
            head.weight.mul_(10)
    return model


def test_identity_at_attach_and_only_delta_requires_grad(row):
    case, arch = row
    model = sharpened(arch)
    before = logits(model)
    model, delta = attach(case, arch, model)
    assert torch.equal(logits(model), before)  # bitwise: up-projections are 0, scales are exactly 1
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in delta.parameters().values()} and trainable
    assert delta.num_trainable() == sum(p.numel() for p in delta.parameters().values())


def test_training_reduces_loss_and_leaves_the_rest_bitwise(row):
    case, arch = row
    model, delta = attach(case, arch, sharpened(arch))
    mine = {id(p) for p in delta.parameters().values()}
    frozen = {n: p.detach().clone() for n, p in named_base_parameters(model) if id(p) not in mine}
    opt = torch.optim.Adam(delta.parameters().values(), lr=CASES[case][2])
    losses = []
    for _ in range(8):
        opt.zero_grad()
        loss = loss_of(model, arch)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    with torch.no_grad():
        losses.append(loss_of(model, arch).item())
    assert losses[-1] < 0.95 * losses[0], losses
    assert all(torch.equal(p, frozen[n]) for n, p in named_base_parameters(model) if n in frozen)
    assert not any(p.grad is not None for n, p in named_base_parameters(model) if n in frozen)


def test_save_load_onto_fresh_base_gives_identical_outputs(row, tmp_path):
    case, arch = row
    model, delta = attach(case, arch)
    nudge(delta)
    tuned = logits(model)
    assert not torch.allclose(tuned, logits(sharpened(arch)), atol=1e-3)  # the nudge really changes outputs
    delta.save(tmp_path / "ck")
    fresh = sharpened(arch)
    loaded = dt.load(fresh, tmp_path / "ck")
    assert torch.equal(logits(fresh), tuned)
    base_names = {n for n, _ in named_base_parameters(fresh)}
    saved = loaded.state_dict()
    assert saved.keys() == delta.state_dict().keys()
    if case != "bitfit":  # BitFit saves biases, under their own (base) names: checked in test_bitfit
        assert not any(k.split(":", 1)[1] in base_names for k in saved)


def test_detach_restores_objects_outputs_and_flags(row):
    case, arch = row
    model = sharpened(arch)
    modules = dict(model.named_modules())
    params = {n: (p.detach().clone(), p.requires_grad) for n, p in model.named_parameters()}
    before = logits(model)
    model, delta = attach(case, arch, model)
    nudge(delta)
    logits(model)
    delta.detach()
    assert dict(model.named_modules()).keys() == modules.keys()
    assert all(m is modules[n] for n, m in model.named_modules())
    for name, p in model.named_parameters():
        assert torch.equal(p, params[name][0]) and p.requires_grad == params[name][1], name
    assert torch.equal(logits(model), before)
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in model.modules())


def test_merge_unmerge_or_clear_refusal(row):
    case, arch = row
    model, delta = attach(case, arch)
    nudge(delta)
    tuned = logits(model)
    weights = {n: p.detach().clone() for n, p in named_base_parameters(model)}
    if not CASES[case][1]:
        with pytest.raises(dt.StateError, match="adapter"):
            delta.merge()
        assert not delta.is_merged and torch.equal(logits(model), tuned)
        return
    delta.merge()
    assert delta.is_merged
    assert torch.allclose(logits(model), tuned, atol=1e-5)
    if case != "bitfit":  # merged: the forward pass no longer reads the delta's own parameters
        assert not model(input_ids=batch()).logits.requires_grad
    delta.unmerge()
    assert not delta.is_merged
    assert torch.allclose(logits(model), tuned, atol=1e-5)
    for name, p in named_base_parameters(model):
        assert torch.allclose(p, weights[name], atol=1e-6), name


def test_routing_and_deactivation_switch_the_effect_off(row):
    case, arch = row
    if case == "bitfit":
        pytest.skip("BitFit trains the base biases in place: nothing to switch per sample (see test_bitfit)")
    base = logits(sharpened(arch))
    model, delta = attach(case, arch)
    nudge(delta)
    tuned = logits(model)
    for wrapper in delta.wrappers():
        assert wrapper.routable
        wrapper.sample_scale = torch.tensor([1.0, 0.0, 1.0])
    mixed = logits(model)
    assert torch.allclose(mixed[1], base[1], atol=1e-6) and torch.allclose(mixed[0], tuned[0], atol=1e-6)
    for wrapper in delta.wrappers():
        wrapper.sample_scale = None
    delta.set_active(False)
    assert torch.allclose(logits(model), base, atol=1e-6)


def test_inspect_shows_every_attach_point_with_counts(row):
    case, arch = row
    model, delta = attach(case, arch)
    text = dt.inspect(model)
    att = delta.attachments[0]
    spots = {**{p: sum(x.numel() for _, x in m.own_parameters()) for p, m in att.modules.items()},
             **{n: p.numel() for n, p in att.existing.items()}}
    assert spots
    lines = [ln.strip() for ln in text.splitlines() if ln.endswith(" params]")]
    assert len(lines) == len(spots)
    for path, count in spots.items():
        assert any(ln.startswith(path.rsplit(".", 1)[-1] + ":") and f"[{count:,} params]" in ln for ln in lines), path
    assert f"trainable {delta.num_trainable():,}" in text
    if case not in ("bitfit",):
        assert all(isinstance(m, DeltaWrapper) for m in att.modules.values())
