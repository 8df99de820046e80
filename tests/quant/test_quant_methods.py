"""Every method on quantized bases (bitsandbytes nf4, fp4 + double quant, int8; torchao int8), on a tiny random
Llama: LoRA and its variants, IA3, adapters, prefix, prompt, VeRA, LoHa, LoKr, OFT, SparseFT, combinations.

Per row: outputs unchanged at attach, gradients only on the delta (the quantized weights stay integers and
frozen), a few steps lower the loss, save -> load onto a fresh quantized base gives the same outputs, and
generation with the KV cache equals generation without it.
"""

from __future__ import annotations

import pytest
import torch

import deltatune as dt
from deltatune.core import quant
from deltatune.core.inject import named_base_parameters
from tests.quant.conftest import ids, logits

# name -> (config factory, whether outputs are unchanged at attach, learning rate)
METHODS = {
    "lora": (lambda: dt.LoRA(r=4, alpha=8, targets="all-linear"), True, 1e-2),
    "rslora": (lambda: dt.LoRA(r=4, alpha=8, targets="all-linear", rslora=True), True, 1e-2),
    "rank_pattern": (lambda: dt.LoRA(r=4, alpha=8, targets=["q_proj", "v_proj", "down_proj"],
                                     rank_pattern={"down_proj": 2}), True, 1e-2),
    "dora": (lambda: dt.LoRA(r=4, alpha=8, targets="all-linear", dora=True), True, 1e-2),
    "ia3": (lambda: dt.IA3(), True, 0.1),
    "adapter": (lambda: dt.Adapter(kind="houlsby", bottleneck=8), True, 1e-2),
    "prefix": (lambda: dt.PrefixTuning(num_tokens=4), False, 1e-2),
    "prompt": (lambda: dt.PromptTuning(num_tokens=4), False, 3e-2),
    "lora+ia3": (lambda: [dt.LoRA(r=4, alpha=8, targets=["q_proj", "v_proj"]), dt.IA3()], True, 1e-2),
    "vera": (lambda: dt.VeRA(r=16), True, 3e-2),
    "loha": (lambda: dt.LoHa(r=4), True, 1e-2),
    "lokr": (lambda: dt.LoKr(r=4), True, 1e-2),
    "oft": (lambda: dt.OFT(block_size=16), True, 1e-2),
    "sparse": (lambda: dt.SparseFT(density=0.1), True, 1e-2),
    "lora+vera": (lambda: [dt.LoRA(r=4, alpha=8, targets=["q_proj", "v_proj"]), dt.VeRA(r=16)], True, 1e-2),
}


@pytest.fixture(params=sorted(METHODS))
def method(request) -> str:
    return request.param


def configs(method: str) -> list:
    """The method's configs; seeds torch first, so the random init the attach makes is the same every run."""
    torch.manual_seed(0)
    made = METHODS[method][0]()
    return made if isinstance(made, list) else [made]


def train(model, delta, lr: float, steps: int = 12) -> list[float]:
    model.train()
    opt = torch.optim.Adam(delta.parameters().values(), lr=lr)
    x = ids()
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        losses.append(loss.item())
    model.eval()
    return losses


def test_attach_identity_and_only_the_delta_trains(loader, scheme, method):
    model = loader(scheme)
    before = logits(model)
    delta = dt.attach(model, *configs(method))
    if METHODS[method][1]:
        assert torch.allclose(logits(model), before, atol=1e-5, rtol=0)
    assert any(quant.is_quantized(m) for m in model.modules()), "the base is not quantized"
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in delta.parameters().values()}
    assert all(p.is_floating_point() and p.dtype == torch.float32 for p in delta.parameters().values())


def plain(p: torch.Tensor) -> torch.Tensor:
    """A comparable copy of a base tensor (torchao's weight subclass implements no torch.equal)."""
    return p.dequantize() if quant.kind_of(p) == "torchao" else p.detach().clone()


def test_training_lowers_the_loss_and_leaves_the_base_alone(loader, scheme, method):
    model = loader(scheme)
    logits(model)  # an eval forward first: bitsandbytes may repack 4-bit weights for CPU inference
    delta = dt.attach(model, *configs(method))
    frozen = {n: plain(p) for n, p in named_base_parameters(model)}
    losses = train(model, delta, METHODS[method][2])
    assert losses[-1] < 0.9 * losses[0], losses
    for name, p in named_base_parameters(model):
        assert torch.equal(plain(p), frozen[name]) and p.grad is None, name
    grads = [p for p in delta.parameters().values() if p.grad is not None and p.grad.abs().sum() > 0]
    assert len(grads) == len(delta.parameters()), "some delta tensors got no gradient"


def test_save_load_onto_a_fresh_quantized_base(loader, scheme, method, tmp_path):
    model = loader(scheme)
    delta = dt.attach(model, *configs(method))
    train(model, delta, METHODS[method][2], steps=3)
    tuned = logits(model)
    delta.save(tmp_path / "ck")
    fresh = loader(scheme)
    dt.load(fresh, tmp_path / "ck")
    assert torch.equal(logits(fresh), tuned)


def test_cached_generation_equals_uncached(loader, method):
    model = loader("nf4")
    delta = dt.attach(model, *configs(method))
    train(model, delta, METHODS[method][2], steps=3)
    prompt = ids(size=1, length=5)
    args = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad():
        cached = model.generate(prompt, use_cache=True, **args)
        uncached = model.generate(prompt, use_cache=False, **args)
    assert torch.equal(cached, uncached)


def test_named_deltas_and_routing_on_nf4(loader):
    model = loader("nf4")
    base = logits(model)
    first = dt.attach(model, dt.LoRA(r=4, alpha=8, targets="all-linear"), name="a")
    second = dt.attach(model, dt.LoRA(r=4, alpha=8, targets="all-linear"), name="b")
    for delta, seed in ((first, 3), (second, 4)):
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in delta.parameters().values():
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    dt.activate(model, "a")
    only_a = logits(model)
    dt.activate(model, "b")
    only_b = logits(model)
    assert not torch.allclose(only_a, only_b, atol=1e-3)
    with dt.route(model, ["a", None]):
        mixed = logits(model)
    assert torch.allclose(mixed[0], only_a[0], atol=1e-5) and torch.allclose(mixed[1], base[1], atol=1e-5)


def test_inspect_names_the_quantization(loader, scheme):
    model = loader(scheme)
    dt.attach(model, dt.LoRA(r=4, targets="all-linear"))
    text = dt.inspect(model)
    expected = {"nf4": "Linear4bit(64x64) nf4", "fp4-dq": "Linear4bit(64x64) fp4 double-quant",
                "int8": "Linear8bitLt(64x64) int8", "torchao-int8": "Linear(64x64) torchao Int8Tensor"}[scheme]
    assert expected in text, text
    full = sum(p.numel() for p in loader(None).parameters())
    assert f"{full / 1e6:.2f}M base parameters" in text or f"{full:,} base parameters" in text  # logical count


def test_detach_restores_the_quantized_model(loader):
    model = loader("nf4")
    before = logits(model)
    delta = dt.attach(model, dt.LoRA(r=4, targets="all-linear"), dt.IA3())
    delta.detach()
    assert not any(m._forward_hooks for m in model.modules())
    assert torch.equal(logits(model), before)


def test_gradients_through_repacked_layers_match_the_unpacked_ones(loader):
    """bitsandbytes repacks a 4-bit layer for CPU inference on its first eval forward, after which its own
    backward gives the input no gradient (core/quant.py); deltatune's hook supplies g @ W instead. The
    gradient of a prompt (below every layer) must then match the one through never-repacked layers."""
    grads = []
    for evaluate_first in (False, True):
        model = loader("nf4")
        if evaluate_first:
            logits(model)
        torch.manual_seed(0)  # the same prompt init in both runs
        delta = dt.attach(model, dt.PromptTuning(num_tokens=4))
        model.train()
        x = ids()
        model(input_ids=x, labels=x).loss.backward()
        grads.append(next(iter(delta.parameters().values())).grad.clone())
    packed = [m for m in model.modules() if quant.kind(m) == "bnb4"]
    if not any(getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in packed):
        pytest.skip("this CPU has no AVX512-BF16: bitsandbytes does not repack here")
    # the repacked kernel computes in bf16 (bitsandbytes 0.50.2): equal within bf16 precision
    # (without the hook the repacked layers pass no gradient and this relative error is ~0.95)
    assert (grads[1] - grads[0]).norm() < 0.05 * grads[0].norm()


def test_activation_checkpointing_gives_the_same_gradients(loader):
    from deltatune.train.jobs import enable_activation_checkpointing

    grads = []
    for checkpointing in (False, True):
        model = loader("nf4")
        if checkpointing:
            enable_activation_checkpointing(model)
        delta = dt.attach(model, *configs("lora"))
        model.train()
        x = ids()
        model(input_ids=x, labels=x).loss.backward()
        grads.append({k: p.grad.clone() for k, p in delta.parameters().items() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    assert all(torch.allclose(grads[0][k], grads[1][k], atol=1e-6) for k in grads[0])


def test_a_method_that_trains_the_layer_itself_is_refused_clearly(loader):
    """TrainModules trains a copy of the layer's own weight, which on a quantized layer is integers: a clear
    AttachError naming the layer, not torch's 'Only Tensors of floating point ... can require gradients', and
    the model is left as it was."""
    model = loader("nf4")
    before = logits(model)
    modules = dict(model.named_modules())
    with pytest.raises(dt.AttachError, match=r"cannot train on the quantized layer Linear4bit nf4.*full precision"):
        dt.attach(model, dt.TrainModules(modules=["q_proj"]))
    assert dict(model.named_modules()).keys() == modules.keys() and not dt.deltas(model)
    assert torch.equal(logits(model), before)
