"""LoRA: identity at attach, scaling, gradients, merge/unmerge on Linear, Conv1D and Embedding, dropout."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

import deltatune as dt
from deltatune.methods.lora import LoRAConv1D, LoRAEmbedding, LoRALinear
from tests.conftest import BUILDERS, batch, logits, perturb

TARGETS = {"bert": ["query", "value"], "llama": ["q_proj", "v_proj"], "gpt2": ["c_attn"]}


def test_identity_at_attach_every_arch(arch):
    model = BUILDERS[arch]()
    before = logits(model)
    delta = dt.attach(model, dt.LoRA(r=4, alpha=8, targets="all-linear"))
    assert torch.equal(logits(model), before)  # B = 0: bitwise the same, not just close
    assert delta.num_trainable() > 0


def test_a_random_b_zero_and_kaiming_bound():
    model = BUILDERS["bert"]()
    delta = dt.attach(model, dt.LoRA(r=4, targets=["query"]))
    wrapper = delta.wrappers()[0]
    assert torch.count_nonzero(wrapper.lora_B) == 0
    bound = 1 / math.sqrt(32)  # kaiming_uniform(a=sqrt(5)) on fan_in 32, as nn.Linear
    assert wrapper.lora_A.abs().max() <= bound and wrapper.lora_A.std() > bound / 4


def test_gaussian_init_std():
    model = nn.Sequential(nn.Linear(256, 256))
    delta = dt.attach(model, dt.LoRA(r=16, targets=["0"], init="gaussian"))
    std = delta.wrappers()[0].lora_A.std().item()
    assert abs(std - 1 / 16) < 0.01


@pytest.mark.parametrize("rslora,expected", [(False, 16 / 4), (True, 16 / 2)])
def test_scaling_alpha_over_r_and_rslora(rslora, expected):
    layer = nn.Linear(8, 6)
    model = nn.Sequential(layer)
    delta = dt.attach(model, dt.LoRA(r=4, alpha=16, rslora=rslora, targets=["0"]))
    w = delta.wrappers()[0]
    perturb(delta)
    x = torch.randn(5, 8)
    manual = layer(x) + expected * (x @ w.lora_A.T @ w.lora_B.T)
    assert torch.allclose(model(x), manual, atol=1e-6)
    assert w.scale == expected


def test_gradients_only_on_delta_and_train_modules():
    model = BUILDERS["bert"]()
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    delta = dt.attach(model, dt.LoRA(r=4, targets=["query", "value"]), train_modules=["classifier"])
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert all(".lora_" in n or n.startswith("classifier.") for n in trainable)
    assert len(trainable) == 2 * 2 * 2 + 2
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model.train()
    for _ in range(3):
        opt.zero_grad()
        model(input_ids=batch(), labels=torch.tensor([0, 1, 1])).loss.backward()
        frozen_grads = [n for n, p in model.named_parameters() if not p.requires_grad and p.grad is not None]
        assert not frozen_grads
        opt.step()
    after = dict(model.named_parameters())
    for name, value in base.items():
        live = name.replace("query.", "query.base.").replace("value.", "value.base.")
        if not name.startswith("classifier."):
            assert torch.equal(after[live], value), name
    assert any(not torch.equal(p, torch.zeros_like(p)) for k, p in delta.parameters().items() if "lora_B" in k)


def test_dropout_only_on_lora_path():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16))
    delta = dt.attach(model, dt.LoRA(r=4, dropout=0.5, targets=["0"]))
    x = torch.randn(4, 16)
    model.train()
    # B is zero: in train mode with dropout the output must still equal the frozen layer exactly
    assert torch.equal(model(x), model[0].base(x))
    perturb(delta)
    a, b = model(x), model(x)
    assert not torch.allclose(a, b)  # dropout active on the LoRA path
    model.eval()
    assert torch.equal(model(x), model(x))


@pytest.mark.parametrize("arch,targets,cls", [
    ("bert", ["query", "value", "intermediate.dense"], LoRALinear),
    ("gpt2", ["c_attn", "c_fc"], LoRAConv1D),
    ("llama", ["embed_tokens"], LoRAEmbedding),
    ("llama", "all-linear", LoRALinear),
])
def test_merge_unmerge_equivalence(arch, targets, cls):
    model = BUILDERS[arch]()
    delta = dt.attach(model, dt.LoRA(r=4, alpha=8, targets=targets), train_modules=None)
    assert all(isinstance(w, cls) for w in delta.wrappers())
    weights = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    perturb(delta)
    tuned = logits(model)
    delta.merge()
    assert delta.is_merged
    assert torch.allclose(logits(model), tuned, atol=1e-5)
    # merged: the forward pass touches no LoRA parameter (only they require grad, and the output doesn't)
    assert not model(input_ids=batch()).logits.requires_grad
    delta.unmerge()
    assert torch.allclose(logits(model), tuned, atol=1e-5)
    for name, value in weights.items():
        assert torch.allclose(dict(model.named_parameters())[name], value, atol=1e-6), name


def test_merged_weight_equals_w_plus_scaled_ba():
    layer = Conv1D(6, 8)  # GPT-2 layout: weight (in=8, out=6)
    model = nn.Sequential(layer)
    delta = dt.attach(model, dt.LoRA(r=2, alpha=4, targets=["0"]))
    perturb(delta)
    w = delta.wrappers()[0]
    expected = layer.weight.detach() + (2.0 * w.lora_B @ w.lora_A).T
    delta.merge()
    assert torch.allclose(layer.weight, expected, atol=1e-6)


def test_layers_selection():
    model = BUILDERS["bert"]()
    delta = dt.attach(model, dt.LoRA(r=2, targets=["query"], layers=[1]))
    assert list(delta.attachments[0].modules) == ["bert.encoder.layer.1.attention.self.query"]


def test_rank_and_alpha_pattern():
    model = BUILDERS["llama"]()
    cfg = dt.LoRA(r=4, alpha=8, targets=["q_proj", "v_proj"], rank_pattern={"v_proj": 2},
                  alpha_pattern={r"layers\.1\.self_attn\.q_proj": 2.0})
    delta = dt.attach(model, cfg)
    ranks = {p: (w.r, w.alpha) for p, w in delta.attachments[0].wrappers().items()}
    assert ranks["model.layers.0.self_attn.v_proj"] == (2, 8)
    assert ranks["model.layers.1.self_attn.q_proj"] == (4, 2.0)
    assert ranks["model.layers.0.self_attn.q_proj"] == (4, 8)


def test_all_linear_skips_head_and_keeps_backbone():
    model = BUILDERS["bert"]()
    delta = dt.attach(model, dt.LoRA(targets="all-linear"))
    paths = list(delta.attachments[0].modules)
    assert "classifier" not in paths and all(p.startswith("bert.") for p in paths)
    llama = BUILDERS["llama"]()
    paths = list(dt.attach(llama, dt.LoRA(targets="all-linear")).attachments[0].modules)
    assert "lm_head" not in paths and len(paths) == 2 * 7


def test_regex_and_full_name_targets():
    model = BUILDERS["bert"]()
    d = dt.attach(model, dt.LoRA(targets=[r"re:.*layer\.0\.attention\.self\.(query|key)",
                                          "bert.encoder.layer.1.output.dense"]))
    assert sorted(d.attachments[0].modules) == ["bert.encoder.layer.0.attention.self.key",
                                                "bert.encoder.layer.0.attention.self.query",
                                                "bert.encoder.layer.1.output.dense"]


def test_generate_and_compile_keep_working():
    model = BUILDERS["llama"]()
    delta = dt.attach(model, dt.LoRA(r=2, targets="all-linear"))
    perturb(delta, std=0.05)
    ids = batch(size=1, length=5)
    cached = model.generate(ids, max_new_tokens=5, do_sample=False, use_cache=True)
    uncached = model.generate(ids, max_new_tokens=5, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached) and cached.shape[1] == 10
    compiled = torch.compile(model, backend="eager")
    assert torch.allclose(compiled(input_ids=ids).logits, logits(model, ids), atol=1e-6)


def test_training_compiles_to_one_graph_with_the_same_gradients(arch):
    """fullgraph=True fails on any graph break: the fused training Function must trace, forward and backward
    (aot_eager runs AOT autograd without needing a C++ compiler). 24 tokens: the folded path for these widths."""
    model = BUILDERS[arch]().eval()  # eval: no model dropout, so eager and compiled draw nothing random
    delta = dt.attach(model, dt.LoRA(r=4, targets="all-linear", dropout=0.5))
    perturb(delta)
    ids = batch(size=2, length=12)
    params = [p for p in model.parameters() if p.requires_grad]
    grads = []
    for net in (model, torch.compile(model, fullgraph=True, backend="aot_eager")):
        net(input_ids=ids).logits.pow(2).mean().backward()
        grads.append([p.grad.clone() for p in params])
        model.zero_grad(set_to_none=True)
    assert all(torch.allclose(e, c, atol=1e-6) for e, c in zip(*grads)) and len(grads[0]) == len(params)
    model.train()  # LoRA dropout on: the unfolded path, whose LoRA input is a second tensor, must trace too
    torch.compile(model, fullgraph=True, backend="aot_eager")(input_ids=ids).logits.sum().backward()
    assert all(p.grad.isfinite().all() and p.grad.abs().sum() > 0 for p in params)


def test_in_place_fast_path_equals_the_formula_and_spares_hooked_outputs():
    torch.manual_seed(0)
    layer = nn.Linear(16, 12)
    model = nn.Sequential(layer)
    delta = dt.attach(model, dt.LoRA(r=4, alpha=8, targets=["0"]))
    perturb(delta)
    w = delta.wrappers()[0]
    x = torch.randn(3, 5, 16, requires_grad=True)
    expected = layer(x) + 2.0 * (x @ w.lora_A.T @ w.lora_B.T)
    got = model(x)
    assert torch.allclose(got, expected, atol=1e-6)
    got.sum().backward()  # gradients flow through the fused in-place update
    assert w.lora_B.grad is not None and x.grad is not None
    seen = []
    layer.register_forward_hook(lambda m, i, out: seen.append(out))
    model(x)
    assert torch.allclose(seen[0], layer(x))  # the hook's tensor was not modified in place


@pytest.mark.parametrize("layer_type", [nn.Linear, Conv1D])
@pytest.mark.parametrize("dropout", [0.0, 0.5])
@pytest.mark.parametrize("tokens", [2, 15])
def test_fused_path_gradients_equal_autograd_on_the_formula(monkeypatch, layer_type, dropout, tokens):
    """Output and every gradient as autograd computes them on y = W x + b + s B A drop(x). 15 tokens of a
    16 -> 12 layer fold the delta into the weight for the output and dx (15 x 28 > 16 x 12); 2 tokens, or
    dropout, keep the low-rank products."""
    torch.manual_seed(0)
    layer = nn.Linear(16, 12) if layer_type is nn.Linear else Conv1D(12, 16)
    model = nn.Sequential(layer)
    delta = dt.attach(model, dt.LoRA(r=4, alpha=8, dropout=dropout, targets=["0"]))
    perturb(delta)
    w = delta.wrappers()[0]
    assert w._may_fuse(torch.randn(2, 16))
    folds = []
    folded = dt.methods.lora.layers.folded
    monkeypatch.setattr(dt.methods.lora.layers, "folded", lambda *a: folds.append(1) or folded(*a))
    x = torch.randn(1, tokens, 16, requires_grad=True)
    torch.manual_seed(1)
    got = model(x)
    got.pow(2).sum().backward()
    assert len(folds) == (2 if tokens == 15 and dropout == 0 else 0)  # forward and dx
    fused = [t.grad.clone() for t in (x, w.lora_A, w.lora_B)]
    for t in (x, w.lora_A, w.lora_B):
        t.grad = None
    torch.manual_seed(1)  # the same dropout mask
    dropped = w.drop(x)
    expected = layer(x) + 2.0 * (dropped @ w.lora_A.T @ w.lora_B.T)
    expected.pow(2).sum().backward()
    assert torch.allclose(got, expected, atol=1e-6)
    for a, b in zip(fused, (x.grad, w.lora_A.grad, w.lora_B.grad), strict=True):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-5)
    assert layer.weight.grad is None  # the frozen weight got no gradient


def test_half_precision_weights_keep_a_delta_smaller_than_their_rounding_step():
    """bf16 W = 1 with a 1e-3 delta: W + sBA would round back to 1 and lose it; the written path keeps it
    (inference and training, 40 tokens: folding would pay in fp32)."""
    layer = nn.Linear(16, 12, bias=False).to(torch.bfloat16)
    delta = dt.attach(nn.Sequential(layer), dt.LoRA(r=1, alpha=1, targets=["0"]))
    model = delta.model
    sign = torch.tensor([1.0, -1.0] * 8, dtype=torch.bfloat16)
    w = delta.wrappers()[0]
    with torch.no_grad():
        layer.weight.fill_(1.0)
        w.lora_A.copy_(sign.unsqueeze(0))
        w.lora_B.fill_(1e-3)
    x = sign.expand(1, 40, 16).clone()  # W x = 0 exactly; the delta adds 16e-3 to every output
    for grad in (False, True):
        with torch.set_grad_enabled(grad):
            out = model(x).float()
        assert torch.allclose(out, torch.full_like(out, 0.016), atol=5e-4)
    assert not dt.core.merge_on_the_fly.folding_pays(x, layer)
    assert dt.core.merge_on_the_fly.folding_pays(x.float(), nn.Linear(16, 12))  # the same call in fp32 folds


@pytest.mark.parametrize("tokens", [100, 1024, 1030])
def test_weight_gradients_summed_over_tokens_in_parts(tokens):
    """over_tokens splits long token runs into batched parts (plus a remainder): same sum as a^T b."""
    torch.manual_seed(0)
    a, b = torch.randn(tokens, 8), torch.randn(tokens, 24)
    got = dt.methods.lora.layers.over_tokens(a, b)
    assert got.shape == (8, 24)
    assert torch.allclose(got, a.T @ b, atol=1e-4, rtol=1e-5)


def test_bf16_autocast_uses_the_out_of_place_path():
    model = nn.Sequential(nn.Linear(16, 12))
    delta = dt.attach(model, dt.LoRA(r=4, targets=["0"]))
    perturb(delta)
    x = torch.randn(2, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    assert out.dtype == torch.bfloat16
    assert torch.allclose(out.float(), model(x), atol=0.1)


@pytest.mark.parametrize("layer_type", [nn.Linear, Conv1D])
def test_inference_over_many_tokens_merges_on_the_fly(monkeypatch, layer_type):
    """No autograd and N (in + out) > in x out: one matmul with W + sBA instead of the low-rank path.
    Same numbers as the formula, exactly the base while B is zero, and the low-rank path for short inputs."""
    torch.manual_seed(0)
    layer = nn.Linear(16, 12) if layer_type is nn.Linear else Conv1D(12, 16)
    model = nn.Sequential(layer)
    delta = dt.attach(model, dt.LoRA(r=4, alpha=8, targets=["0"]))
    calls = []
    fused = dt.methods.lora.layers.FusedLoRALinear.apply
    monkeypatch.setattr(dt.methods.lora.layers.FusedLoRALinear, "apply", lambda *a: calls.append(1) or fused(*a))
    long_x, short_x = torch.randn(2, 20, 16), torch.randn(1, 2, 16)  # 40 x 28 > 192 > 2 x 28 token-features
    with torch.no_grad():
        assert torch.equal(model(long_x), layer(long_x)) and not calls  # B = 0: bitwise the base layer
        perturb(delta)
        w = delta.wrappers()[0]
        for x in (long_x, short_x):
            assert torch.allclose(model(x), layer(x) + 2.0 * (x @ w.lora_A.T @ w.lora_B.T), atol=1e-6)
    assert len(calls) == 1  # only the short input took the low-rank path
    model(long_x)  # with autograd on: the low-rank path, whose gradients reach A and B only
    assert len(calls) == 2
