"""Per-sample routing: a mixed batch equals each sample run through its own delta alone."""

from __future__ import annotations

import pytest
import torch

import deltatune as dt
from deltatune.core.inject import broadcast_scale
from tests.conftest import BUILDERS, batch, logits, perturb

IDS = batch(size=5)


def three_deltas(arch: str):
    model = BUILDERS[arch]()
    outs = {None: logits(model, IDS)}
    for i, (name, cfg) in enumerate([("x", dt.LoRA(r=4, targets="all-linear")),
                                     ("y", dt.LoRA(r=2, targets="all-linear", rslora=True)),
                                     ("z", dt.LoRA(r=3, targets="all-linear", dora=True))]):
        perturb(dt.attach(model, cfg, name=name, train_modules=None), seed=i + 1)
    for name in ("x", "y", "z"):
        with dt.active(model, name):
            outs[name] = logits(model, IDS)
    return model, outs


def test_mixed_batch_equals_each_delta_alone(arch):
    model, outs = three_deltas(arch)
    names = ["x", "y", None, "z", "x"]
    with dt.route(model, names):
        mixed = logits(model, IDS)
    for i, name in enumerate(names):
        # alone, LoRA may build W + sBA for the call; routed, it runs the low-rank path: equal up to rounding
        assert torch.allclose(mixed[i], outs[name][i], atol=1e-5, rtol=0), (i, name)
    assert not torch.allclose(outs["x"], outs["y"])


def test_route_persists_until_activate_and_context_restores():
    model, outs = three_deltas("bert")
    dt.activate(model, "y")
    with dt.route(model, ["z"] * 5) as routing:
        assert routing.names == ["z"] * 5
        assert torch.allclose(logits(model, IDS), outs["z"], atol=1e-6)
    assert torch.equal(logits(model, IDS), outs["y"])  # back to what it was
    dt.route(model, ["x", "x", "x", "x", "x"])
    assert torch.allclose(logits(model, IDS), outs["x"], atol=1e-6)
    dt.activate(model, "y")  # ends routing
    assert all(m.sample_scale is None for d in dt.deltas(model).values() for m in d.modules())
    assert torch.equal(logits(model, IDS), outs["y"])


def test_batch_size_mismatch_is_a_clear_error():
    model, _ = three_deltas("bert")
    dt.route(model, ["x", "y"])
    with pytest.raises(dt.StateError, match="batch of 2.*batch of 5"):
        logits(model, IDS)


def test_route_rejects_bad_requests():
    model, _ = three_deltas("bert")
    with pytest.raises(dt.StateError, match="one delta name"):
        dt.route(model, "x")
    with pytest.raises(dt.StateError, match="one delta name"):
        dt.route(model, [])
    with pytest.raises(dt.StateError, match=r"'nope'.*\['x', 'y', 'z'\]"):
        dt.route(model, ["x", "nope"])


def test_route_refuses_methods_that_cannot_be_routed():
    from deltatune.core.inject import DeltaModule

    class Unroutable(DeltaModule):
        pass

    model, _ = three_deltas("bert")
    delta = dt.deltas(model)["x"]
    module = Unroutable()
    delta.attachments[0].modules["fake.path"] = module  # as a prefix-style method would record it
    with pytest.raises(dt.StateError, match="per-sample routing is not supported for lora"):
        dt.route(model, ["x", "y"])
    del delta.attachments[0].modules["fake.path"]


def test_routing_trains_each_delta_only_on_its_samples():
    model, _ = three_deltas("bert")
    x, y = dt.deltas(model)["x"], dt.deltas(model)["y"]
    for p in [*x.parameters().values(), *y.parameters().values()]:
        p.requires_grad_(True)
    dt.route(model, ["x", "x", "x", "x", "x"])
    model(input_ids=IDS).logits.sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for k, p in x.parameters().items() if "lora_A" in k)
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in y.parameters().values())


def test_broadcast_scale_shapes():
    out = torch.ones(2, 3, 4)
    assert broadcast_scale(torch.tensor([0.0, 1.0]), out).shape == (2, 1, 1)
    per_token = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    assert torch.equal(broadcast_scale(per_token, out)[:, :, 0], per_token)
    # no token axis in the output (e.g. prefix key/values): the per-sample mean is used
    assert torch.equal(broadcast_scale(per_token, torch.ones(2, 4, 5, 6)).flatten(), torch.tensor([2.0, 5.0]))
    with pytest.raises(dt.StateError, match="batch of 2"):
        broadcast_scale(per_token, torch.ones(3, 3, 4))


@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_routing_mixes_method_families(arch):
    model = BUILDERS[arch]()
    outs = {None: logits(model, IDS)}
    configs = {"lora": [dt.LoRA(r=2, targets="all-linear")], "adapter": [dt.Adapter(kind="parallel", bottleneck=8)],
               "ia3": [dt.IA3()], "union": [dt.LoRA(r=2, targets="all-linear"), dt.Adapter(bottleneck=8)]}
    for i, (name, cfgs) in enumerate(configs.items()):
        perturb(dt.attach(model, *cfgs, name=name, train_modules=None), seed=i + 3)
    for name in configs:
        with dt.active(model, name):
            outs[name] = logits(model, IDS)
    names = ["ia3", "union", None, "adapter", "lora"]
    with dt.route(model, names):
        mixed = logits(model, IDS)
    for i, name in enumerate(names):
        assert torch.allclose(mixed[i], outs[name][i], atol=1e-6), (i, name)


def test_deltas_that_cannot_be_switched_per_sample_are_refused():
    """BitFit trains the base's own biases in place: no sample can be given the base without them. (Prefix and
    prompt deltas are routable: test_routing_prefix_prompt.py.)"""
    model = BUILDERS["bert"]()
    dt.attach(model, dt.LoRA(r=2, targets=["query"]), name="lora", train_modules=None)
    dt.attach(model, dt.BitFit(), name="bias", train_modules=None)
    with pytest.raises(dt.StateError, match=r"not supported for bitfit .*dt.active\(model, 'bias'\)"):
        dt.route(model, ["lora", "bias"])
    with dt.route(model, ["lora", None]):  # the others are simply switched off
        assert torch.allclose(logits(model, IDS[:2])[1], logits(BUILDERS["bert"](), IDS[:2])[1], atol=1e-6)
