"""Hard routing at inference by folded products per group of samples (core/routed_fold.py): a routed batch
equals each sample run alone through its own delta, and the fast path is taken only where it is exact."""

from __future__ import annotations

import gc

import pytest
import torch

import deltatune as dt
from deltatune.core import routed_fold
from deltatune.methods.lora import layers as lora_layers
from tests.conftest import BUILDERS, batch, perturb

# 6 samples x 40 tokens: every routed group has enough tokens for a fold to pay on the tiny models' 32 x 64 layers
IDS = batch(size=6, length=40)
ROUTES = ["x", None, "y", "x", "z", None]


@pytest.fixture
def fold_calls(monkeypatch) -> list[bool]:
    """Records, for every routed LoRA layer call over all tokens, whether the folded path ran. (BERT's pooler
    reads one token per sample: too few for a fold to pay, it keeps the masked path and is not recorded.)"""
    calls: list[bool] = []
    original = lora_layers.routed_forward

    def spy(wrapper, x):
        out = original(wrapper, x)
        if x.dim() == 3:
            calls.append(out is not None)
        return out

    monkeypatch.setattr(lora_layers, "routed_forward", spy)
    return calls


def lora_deltas(arch: str, configs: dict | None = None):
    model = BUILDERS[arch]()
    configs = configs or {"x": dt.LoRA(r=4, targets="all-linear"), "y": dt.LoRA(r=2, targets="all-linear", rslora=True),
                          "z": dt.LoRA(r=3, targets="all-linear")}
    for i, (name, cfg) in enumerate(configs.items()):
        perturb(dt.attach(model, cfg, name=name, train_modules=None), seed=i + 1)
    return model


def alone(model, name: str | None, **inputs) -> torch.Tensor:
    """Each sample as a batch of one, with only its delta on (None: the base model)."""
    rows = []
    with torch.no_grad(), dt.active(model, name):
        for i in range(inputs["input_ids"].shape[0]):
            rows.append(model(**{k: v[i:i + 1] for k, v in inputs.items()}).logits[0])
    return torch.stack(rows)


def routed(model, routes, **inputs) -> torch.Tensor:
    with torch.no_grad(), dt.route(model, routes):
        return model(**inputs).logits


@pytest.mark.parametrize("arch", ["bert", "llama", "gpt2"])  # gpt2: Conv1D's transposed weights
def test_routed_batch_equals_each_sample_alone(arch, fold_calls):
    model = lora_deltas(arch)
    mixed = routed(model, ROUTES, input_ids=IDS)
    assert fold_calls and all(fold_calls)  # every LoRA layer took the folded path
    for name in dict.fromkeys(ROUTES):
        single = alone(model, name, input_ids=IDS)
        for i, route in enumerate(ROUTES):
            if route == name:
                assert torch.allclose(mixed[i], single[i], atol=1e-5, rtol=0), (i, name)
    assert not torch.allclose(mixed[0], mixed[2], atol=1e-3)  # the deltas do differ


@pytest.mark.parametrize("arch", ["bert", "gpt2"])  # gpt2: Conv1D's (in, out) weight written through mm's out=
def test_consecutive_groups_are_read_as_views_and_written_in_place(arch, fold_calls, monkeypatch):
    """A batch sorted by route (the router sorts it: compose/batch_order.py): no rows gathered or scattered."""
    routes = sorted(ROUTES, key=lambda r: r or "")
    gathers = []
    monkeypatch.setattr(torch.Tensor, "index_select", lambda *a, **k: gathers.append(1))
    monkeypatch.setattr(torch.Tensor, "index_copy_", lambda *a, **k: gathers.append(1))
    model = lora_deltas(arch)
    mixed = routed(model, routes, input_ids=IDS)
    monkeypatch.undo()
    assert fold_calls and all(fold_calls) and not gathers
    for name in dict.fromkeys(routes):
        rows = [i for i, r in enumerate(routes) if r == name]
        assert torch.allclose(mixed[rows], alone(model, name, input_ids=IDS)[rows], atol=1e-5, rtol=0), name


def test_padding_and_all_samples_on_one_delta(fold_calls):
    model = lora_deltas("bert")
    mask = torch.ones_like(IDS)
    mask[1, 25:], mask[4, 10:] = 0, 0
    mixed = routed(model, ROUTES, input_ids=IDS, attention_mask=mask)
    for name in dict.fromkeys(ROUTES):
        single = alone(model, name, input_ids=IDS, attention_mask=mask)
        rows = [i for i, r in enumerate(ROUTES) if r == name]
        assert torch.allclose(mixed[rows], single[rows], atol=1e-5, rtol=0), name
    same = routed(model, ["y"] * 6, input_ids=IDS)  # one group: no gather, one folded product
    assert torch.allclose(same, alone(model, "y", input_ids=IDS), atol=1e-5, rtol=0)
    assert all(fold_calls)


@pytest.mark.parametrize("dora", ["x", "z"])  # attached first: under the LoRAs; last: over them
def test_chains_with_a_method_that_cannot_fold_stay_exact(dora, fold_calls):
    """DoRA's output is not x (W + s B A)^T: a chain holding it is not folded from above (LoRAs stacked under a
    DoRA still fold: the DoRA adds its own masked path to their output)."""
    configs = {"x": dt.LoRA(r=4, targets="all-linear"), "y": dt.LoRA(r=2, targets="all-linear"),
               "z": dt.LoRA(r=3, targets="all-linear")}
    configs[dora] = dt.LoRA(r=3, targets="all-linear", dora=True)
    model = lora_deltas("bert", configs)
    mixed = routed(model, ROUTES, input_ids=IDS)
    assert fold_calls and any(fold_calls) == (dora == "z")
    for name in dict.fromkeys(ROUTES):
        single = alone(model, name, input_ids=IDS)
        rows = [i for i, r in enumerate(ROUTES) if r == name]
        assert torch.allclose(mixed[rows], single[rows], atol=1e-5, rtol=0), name


def test_training_and_soft_weights_keep_the_masked_path(fold_calls):
    model = lora_deltas("bert")
    for p in dt.deltas(model)["x"].parameters().values():
        p.requires_grad_(True)
    with dt.route(model, ROUTES):
        model(input_ids=IDS).logits.sum().backward()  # autograd on: the masked path, which trains each delta
    assert fold_calls and not any(fold_calls)
    x_grads = [p.grad for k, p in dt.deltas(model)["x"].parameters().items() if "lora_A" in k]
    assert all(g is not None and g.abs().sum() > 0 for g in x_grads)
    fold_calls.clear()
    for delta in dt.deltas(model).values():  # a soft mix (not made by hard_mask) is never folded per group
        delta.set_active(True)
        for module in delta.modules():
            module.sample_scale = torch.full((6,), 0.5)
    with torch.no_grad():
        model(input_ids=IDS)
    assert fold_calls and not any(fold_calls)


def test_few_tokens_per_group_keep_the_masked_path(fold_calls):
    """Decoding a token at a time: a weight-sized fold per group costs more than the low-rank paths."""
    model = lora_deltas("llama")
    ids = IDS[:, :2]
    mixed = routed(model, ROUTES, input_ids=ids)
    assert fold_calls and not any(fold_calls)
    single = alone(model, "x", input_ids=ids)
    assert torch.allclose(mixed[[0, 3]], single[[0, 3]], atol=1e-5, rtol=0)


def test_hard_masks_are_known_by_identity_and_forgotten_when_freed():
    mask = routed_fold.hard_mask([True, False, True], torch.device("cpu"))
    assert torch.equal(mask, torch.tensor([1.0, 0.0, 1.0]))
    assert routed_fold.selection(mask) == (True, False, True)
    assert routed_fold.selection(mask.clone()) is None  # same values, not a routing mask
    key = id(mask)
    routed_fold._LAST[:] = [(), None]
    del mask
    gc.collect()
    assert key not in routed_fold._HARD


def test_no_gathered_rows_outlive_the_forward(fold_calls):
    """Layers reading one input (query, key, value) share its gathered rows; they go with the input."""
    model = lora_deltas("llama")
    routed(model, ROUTES, input_ids=IDS)
    assert all(fold_calls)
    gc.collect()
    assert routed_fold._GATHERED[0]() is None and routed_fold._GATHERED[2] is None
