"""Hard routing at inference by folded products per group of samples (core/routed_fold.py): a routed batch
equals each sample run alone through its own delta, and the fast path is taken only where it is exact."""

from __future__ import annotations

import gc

import pytest
import torch

import deltatune as dt
from deltatune.core import routed_fold
from deltatune.core.inject import DeltaWrapper
from deltatune.methods.lora import layers as lora_layers
from tests.conftest import BUILDERS, batch, perturb

# 6 samples x 40 tokens: every routed group has enough tokens for a fold to pay on the tiny models' 32 x 64 layers
IDS = batch(size=6, length=40)
ROUTES = ["x", None, "y", "x", "z", None]


@pytest.fixture
def paths(monkeypatch) -> list[str]:
    """Records, for every routed LoRA layer call over all tokens, which path ran: "fold" (one folded product per
    group of samples), "low-rank" (the base product, then each group's own low-rank paths) or "masked" (every
    delta over every sample, masked). (BERT's pooler reads one token per sample and is not recorded.)"""
    calls: list[str] = []
    taken: list[str] = []
    for function, path in (("folded_per_group", "fold"), ("low_rank_per_group", "low-rank")):
        def spy(*args, _original=getattr(routed_fold, function), _path=path):
            taken.append(_path)
            return _original(*args)

        monkeypatch.setattr(routed_fold, function, spy)
    original = lora_layers.routed_forward

    def routed_spy(wrapper, x):
        taken.clear()
        out = original(wrapper, x)
        if x.dim() == 3:
            calls.append("masked" if out is None else taken[0])
        return out

    monkeypatch.setattr(lora_layers, "routed_forward", routed_spy)
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
def test_routed_batch_equals_each_sample_alone(arch, paths):
    model = lora_deltas(arch)
    mixed = routed(model, ROUTES, input_ids=IDS)
    assert paths and set(paths) == {"fold"}  # every LoRA layer took the folded path
    for name in dict.fromkeys(ROUTES):
        single = alone(model, name, input_ids=IDS)
        for i, route in enumerate(ROUTES):
            if route == name:
                assert torch.allclose(mixed[i], single[i], atol=1e-5, rtol=0), (i, name)
    assert not torch.allclose(mixed[0], mixed[2], atol=1e-3)  # the deltas do differ


@pytest.mark.parametrize("arch", ["bert", "gpt2"])  # gpt2: Conv1D's (in, out) weight written through mm's out=
def test_consecutive_groups_are_read_as_views_and_written_in_place(arch, paths, monkeypatch):
    """A batch sorted by route (the router sorts it: compose/batch_order.py): no rows gathered or scattered."""
    routes = sorted(ROUTES, key=lambda r: r or "")
    gathers = []
    monkeypatch.setattr(torch.Tensor, "index_select", lambda *a, **k: gathers.append(1))
    monkeypatch.setattr(torch.Tensor, "index_copy_", lambda *a, **k: gathers.append(1))
    model = lora_deltas(arch)
    mixed = routed(model, routes, input_ids=IDS)
    monkeypatch.undo()
    assert paths and set(paths) == {"fold"} and not gathers
    for name in dict.fromkeys(routes):
        rows = [i for i, r in enumerate(routes) if r == name]
        assert torch.allclose(mixed[rows], alone(model, name, input_ids=IDS)[rows], atol=1e-5, rtol=0), name


def test_padding_and_all_samples_on_one_delta(paths):
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
    assert paths and set(paths) == {"fold"}


@pytest.mark.parametrize("dora", ["x", "z"])  # attached first: under the LoRAs; last: over them
def test_chains_with_a_method_that_cannot_fold_stay_exact(dora, paths):
    """DoRA's output is not x (W + s B A)^T: a chain holding it is not folded from above (LoRAs stacked under a
    DoRA still fold: the DoRA adds its own masked path to their output)."""
    configs = {"x": dt.LoRA(r=4, targets="all-linear"), "y": dt.LoRA(r=2, targets="all-linear"),
               "z": dt.LoRA(r=3, targets="all-linear")}
    configs[dora] = dt.LoRA(r=3, targets="all-linear", dora=True)
    model = lora_deltas("bert", configs)
    mixed = routed(model, ROUTES, input_ids=IDS)
    assert paths and ("fold" in paths) == (dora == "z")
    for name in dict.fromkeys(ROUTES):
        single = alone(model, name, input_ids=IDS)
        rows = [i for i, r in enumerate(ROUTES) if r == name]
        assert torch.allclose(mixed[rows], single[rows], atol=1e-5, rtol=0), name


def test_training_and_soft_weights_keep_the_masked_path(paths):
    model = lora_deltas("bert")
    for p in dt.deltas(model)["x"].parameters().values():
        p.requires_grad_(True)
    with dt.route(model, ROUTES):
        model(input_ids=IDS).logits.sum().backward()  # autograd on: the masked path, which trains each delta
    assert paths and set(paths) == {"masked"}
    x_grads = [p.grad for k, p in dt.deltas(model)["x"].parameters().items() if "lora_A" in k]
    assert all(g is not None and g.abs().sum() > 0 for g in x_grads)
    paths.clear()
    for delta in dt.deltas(model).values():  # a soft mix (not made by hard_mask) is never folded per group
        delta.set_active(True)
        for module in delta.modules():
            module.sample_scale = torch.full((6,), 0.5)
    with torch.no_grad():
        model(input_ids=IDS)
    assert paths and set(paths) == {"masked"}


@pytest.mark.parametrize("arch", ["bert", "llama", "gpt2"])
def test_few_tokens_per_group_add_each_groups_own_low_rank_paths(arch, paths, monkeypatch):
    """Short inputs (a decoding step, a short sentence): a weight-sized fold per group costs more than the
    low-rank paths, so the base product runs once and each group gets its own deltas' low-rank paths on its
    rows: views written in place when the batch is sorted by route (nothing gathered), gathered and added back
    when it is not. Both equal each sample alone; the gathered rows do not outlive the forward."""
    model = lora_deltas(arch)
    ids = IDS[:, :2]
    routes = sorted(ROUTES, key=lambda r: r or "")  # the base's rows first: a group with no delta to add
    gathers = []
    with monkeypatch.context() as patch:  # undoes only this patch (the fixture's spies stay)
        patch.setattr(torch.Tensor, "index_select", lambda *a, **k: gathers.append(1))
        sorted_out = routed(model, routes, input_ids=ids)
    assert paths and set(paths) == {"low-rank"} and not gathers
    paths.clear()
    scattered_out = routed(model, ROUTES, input_ids=ids)
    assert paths and set(paths) == {"low-rank"}
    gc.collect()
    assert routed_fold._GATHERED[0]() is None and routed_fold._GATHERED[2] is None
    for name in dict.fromkeys(ROUTES):
        single = alone(model, name, input_ids=ids)
        rows = [i for i, r in enumerate(routes) if r == name]
        assert torch.allclose(sorted_out[rows], single[rows], atol=1e-5, rtol=0), name
        rows = [i for i, r in enumerate(ROUTES) if r == name]
        assert torch.allclose(scattered_out[rows], single[rows], atol=1e-5, rtol=0), name
    assert not torch.allclose(sorted_out[2], sorted_out[4], atol=1e-3)  # rows 2-3 on "x", 4 on "y": they differ
    paths.clear()
    one = routed(model, ["y"] * 6, input_ids=ids)  # one group, the whole batch (Llama's small GQA key / value
    assert "low-rank" in paths and "masked" not in paths  # projections fold: 12 tokens pay for their 32 x 16 fold)
    assert torch.allclose(one, alone(model, "y", input_ids=ids), atol=1e-5, rtol=0)


def test_half_precision_keeps_the_masked_path(paths):
    """bf16: a fold would round the delta away and a group's low-rank path would round twice (rows several bf16
    steps from the delta alone), so routed layers keep the masked path; rows then agree with each sample alone
    within bf16 rounding of a batched vs a single product (tiny Llama logits are ~0.4)."""
    model = lora_deltas("llama").to(torch.bfloat16)
    ids = IDS[:, :8]
    mixed = routed(model, ROUTES, input_ids=ids)
    assert paths and set(paths) == {"masked"}
    for name in dict.fromkeys(ROUTES):
        rows = [i for i, r in enumerate(ROUTES) if r == name]
        assert torch.allclose(mixed[rows].float(), alone(model, name, input_ids=ids)[rows].float(), atol=2e-2), name


@pytest.mark.parametrize("arch", ["bert", "gpt2"])  # nn.Linear's (out, in) and Conv1D's (in, out) delta_weight
def test_the_default_add_delta_into_reads_the_weight_layout(arch):
    """A method that folds per group and has no low-rank factors adds x delta_weight^T (Linear) or x delta_weight
    (Conv1D): the default must give what LoRA's factors give."""
    model = lora_deltas(arch, {"x": dt.LoRA(r=4, targets="all-linear")})
    wrappers = [m for m in model.modules() if isinstance(m, lora_layers.LoRALinear)]
    assert {type(w.base_layer()).__name__ for w in wrappers} == {"Linear" if arch == "bert" else "Conv1D"}
    for wrapper in wrappers:
        fan_in, fan_out = wrapper.features(wrapper.base_layer())
        x = torch.randn(5, fan_in)
        own = torch.randn(5, fan_out)
        default = own.clone()
        wrapper.add_delta_into(own, x)
        DeltaWrapper.add_delta_into(wrapper, default, x)
        assert torch.allclose(own, default, atol=1e-5, rtol=0)


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


def test_no_gathered_rows_outlive_the_forward(paths):
    """Layers reading one input (query, key, value) share its gathered rows; they go with the input."""
    model = lora_deltas("llama")
    routed(model, ROUTES, input_ids=IDS)
    assert paths and set(paths) == {"fold"}
    gc.collect()
    assert routed_fold._GATHERED[0]() is None and routed_fold._GATHERED[2] is None
