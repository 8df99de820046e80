"""Adapters: where each kind goes (from structure), the exact formulas, explicit targets, errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

import deltatune as dt
from deltatune.methods.adapter import BottleneckAdapter
from tests.conftest import BUILDERS, batch, logits, perturb

PLACES = {  # block 0: (attention output, FFN output, FFN input)
    "bert": ("bert.encoder.layer.0.attention.output.dense", "bert.encoder.layer.0.output.dense",
             "bert.encoder.layer.0.intermediate.dense"),
    "llama": ("model.layers.0.self_attn.o_proj", "model.layers.0.mlp.down_proj", "model.layers.0.mlp.gate_proj"),
    "gpt2": ("transformer.h.0.attn.c_proj", "transformer.h.0.mlp.c_proj", "transformer.h.0.mlp.c_fc"),
}


def spots(delta) -> list[str]:
    return list(delta.attachments[0].modules)


def test_placement_of_each_kind_from_structure(arch):
    attn_out, ffn_out, ffn_in = PLACES[arch]
    houlsby = dt.attach(BUILDERS[arch](), dt.Adapter(kind="houlsby", bottleneck=4), train_modules=None)
    assert spots(houlsby)[:2] == [attn_out, ffn_out] and len(spots(houlsby)) == 4
    pfeiffer = dt.attach(BUILDERS[arch](), dt.Adapter(kind="pfeiffer", bottleneck=4), train_modules=None)
    assert spots(pfeiffer)[0] == ffn_out and len(spots(pfeiffer)) == 2
    model = BUILDERS[arch]()
    parallel = dt.attach(model, dt.Adapter(kind="parallel", bottleneck=4), train_modules=None)
    assert spots(parallel)[0] == ffn_out and parallel.wrappers()[0].source == ffn_in
    assert len(parallel.attachments[0].hooks) == 2
    assert len(model.get_submodule(ffn_in)._forward_pre_hooks) == 1


def test_sizes_per_kind():
    hidden, b = 32, 8
    per_adapter = hidden * b + b + b * hidden + hidden
    for kind, count in (("houlsby", 4), ("pfeiffer", 2), ("parallel", 2)):
        delta = dt.attach(BUILDERS["llama"](), dt.Adapter(kind=kind, bottleneck=b), train_modules=None)
        assert delta.num_trainable() == count * per_adapter, kind


def manual_adapter(wrapper: BottleneckAdapter, h: torch.Tensor) -> torch.Tensor:
    return wrapper.scale * F.linear(wrapper.act(F.linear(h, wrapper.down.weight, wrapper.down.bias)),
                                    wrapper.up.weight, wrapper.up.bias)


@pytest.mark.parametrize("layer", [nn.Linear(6, 5), Conv1D(5, 6)])
@pytest.mark.parametrize("activation", ["relu", "gelu", "silu", "tanh"])
def test_sequential_formula(layer, activation):
    model = nn.Sequential(layer)
    delta = dt.attach(model, dt.Adapter(bottleneck=3, activation=activation, scale=0.5, targets=["0"]),
            train_modules=None)
    perturb(delta, std=0.5)
    wrapper = model[0]
    x = torch.randn(4, 6)
    h = layer(x)
    act = {"relu": torch.relu, "gelu": F.gelu, "silu": F.silu, "tanh": torch.tanh}[activation]
    expected = h + 0.5 * (act(h @ wrapper.down.weight.T + wrapper.down.bias) @ wrapper.up.weight.T + wrapper.up.bias)
    assert torch.allclose(model(x), expected, atol=1e-6)


def test_parallel_formula_on_a_module_and_scale_is_linear():
    layer = nn.Linear(6, 5)
    model = nn.Sequential(layer)
    delta = dt.attach(model, dt.Adapter(kind="parallel", bottleneck=3, scale=4.0, targets=["0"]), train_modules=None)
    perturb(delta, std=0.5)
    wrapper = model[0]
    x = torch.randn(4, 6)
    assert torch.allclose(model(x), layer(x) + manual_adapter(wrapper, x), atol=1e-6)
    wrapper.scale = 2.0
    assert torch.allclose(model(x) - layer(x), manual_adapter(wrapper, x), atol=1e-6)


def test_houlsby_on_bert_sits_before_residual_and_layernorm():
    """Houlsby et al.: the adapter acts on the sublayer's projection output, before the skip connection and
    LayerNorm. BERT's SelfOutput computes LayerNorm(dropout(dense(h)) + input): the adapter is on dense."""
    model = BUILDERS["bert"]()
    delta = dt.attach(model, dt.Adapter(bottleneck=4), train_modules=None)
    perturb(delta)
    self_output = model.bert.encoder.layer[0].attention.output
    wrapper = self_output.dense
    h, residual = torch.randn(2, 5, 32), torch.randn(2, 5, 32)
    dense = wrapper.base(h)
    expected = self_output.LayerNorm(dense + manual_adapter(wrapper, dense) + residual)
    assert torch.allclose(self_output(h, residual), expected, atol=1e-5)


@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_parallel_reads_the_ffn_input_and_adds_at_ffn_output(arch):
    _, ffn_out, ffn_in = PLACES[arch]
    model = BUILDERS[arch]()
    delta = dt.attach(model, dt.Adapter(kind="parallel", bottleneck=4, layers=[0]), train_modules=None)
    perturb(delta)
    wrapper = model.get_submodule(ffn_out)
    seen = {}
    model.get_submodule(ffn_in).register_forward_hook(lambda m, a, o: seen.update(ffn_input=a[0]))
    wrapper.base.register_forward_hook(lambda m, a, o: seen.update(base_out=o))
    wrapper.register_forward_hook(lambda m, a, o: seen.update(out=o))
    logits(model)
    assert torch.allclose(seen["out"], seen["base_out"] + manual_adapter(wrapper, seen["ffn_input"]), atol=1e-6)
    assert wrapper.captured is None  # consumed: no activation is kept alive between calls


def test_explicit_targets_containers_and_tuple_outputs():
    model = BUILDERS["llama"]()
    before = logits(model)
    delta = dt.attach(model, dt.Adapter(kind="parallel", bottleneck=4, targets=["mlp"]),
                      dt.Adapter(kind="houlsby", bottleneck=4, targets=["self_attn"]), train_modules=None)
    assert [spots(delta), list(delta.attachments[1].modules)] == [
        ["model.layers.0.mlp", "model.layers.1.mlp"], ["model.layers.0.self_attn", "model.layers.1.self_attn"]]
    assert torch.equal(logits(model), before)
    perturb(delta)
    assert not torch.allclose(logits(model), before)  # attention returns a tuple: the adapter acts on [0]
    ids = batch(size=1, length=4)
    cached = model.generate(ids, max_new_tokens=4, do_sample=False, use_cache=True)
    assert torch.equal(cached, model.generate(ids, max_new_tokens=4, do_sample=False, use_cache=False))


def test_layers_and_wraps_on_top_of_lora():
    model = BUILDERS["gpt2"]()
    delta = dt.attach(model, dt.LoRA(r=2, targets=["c_proj"]), dt.Adapter(bottleneck=4, layers=[1]), train_modules=None)
    assert list(delta.attachments[1].modules) == ["transformer.h.1.attn.c_proj", "transformer.h.1.mlp.c_proj"]
    adapter = model.transformer.h[1].mlp.c_proj
    assert isinstance(adapter, BottleneckAdapter) and adapter.base_layer() is adapter.base.base


@pytest.mark.parametrize("field,value,words", [
    ("bottleneck", 0, ["adapter.bottleneck", "positive integer"]),
    ("bottleneck", -3, ["adapter.bottleneck"]),
    ("bottleneck", 2.5, ["adapter.bottleneck"]),
    ("kind", "sideways", ["adapter.kind", "houlsby", "pfeiffer", "parallel"]),
    ("activation", "softmax", ["adapter.activation", "gelu", "relu"]),
    ("scale", 0.0, ["adapter.scale"]),
    ("scale", float("nan"), ["adapter.scale"]),
])
def test_bad_hyperparameters(field, value, words):
    with pytest.raises(dt.ConfigError) as err:
        dt.Adapter(**{field: value})
    assert all(w in str(err.value) for w in words), str(err.value)


@pytest.mark.parametrize("kind", ["houlsby", "parallel"])
def test_bottleneck_larger_than_hidden_leaves_model_untouched(arch, kind):
    model = BUILDERS[arch]()
    modules = dict(model.named_modules())
    with pytest.raises(dt.ConfigError, match=r"adapter\.bottleneck must be <= the hidden size \(32\)"):
        dt.attach(model, dt.Adapter(kind=kind, bottleneck=33), train_modules=None)
    assert dict(model.named_modules()) == modules
    assert all(p.requires_grad for p in model.parameters())
    assert not any(m._forward_pre_hooks for m in model.modules())
    dt.attach(model, dt.Adapter(kind=kind, bottleneck=32), train_modules=None)  # equal to the hidden size is allowed


def test_unknown_targets_and_models_without_blocks():
    with pytest.raises(dt.TargetError, match="querry.*query"):
        dt.attach(BUILDERS["bert"](), dt.Adapter(targets=["querry"]), train_modules=None)
    with pytest.raises(dt.TargetError, match="no transformer blocks.*targets"):
        dt.attach(nn.Sequential(nn.Linear(4, 4)), dt.Adapter(bottleneck=2), train_modules=None)
    with pytest.raises(dt.TargetError, match="no Linear"):
        dt.attach(BUILDERS["bert"](), dt.Adapter(bottleneck=2, targets=["attention.output.LayerNorm"]),
                train_modules=None)


def test_parallel_output_projection_alone_is_a_clear_error():
    model = BUILDERS["llama"]()
    dt.attach(model, dt.Adapter(kind="parallel", bottleneck=4), train_modules=None)
    with pytest.raises(RuntimeError, match="gate_proj did not run"):
        model.model.layers[0].mlp.down_proj(torch.randn(1, 2, 64))


def test_inspect_and_config_round_trip(tmp_path):
    model = BUILDERS["bert"]()
    delta = dt.attach(model, dt.Adapter(kind="parallel", bottleneck=4, scale=4.0, activation="gelu"),
            train_modules=None)
    text = dt.inspect(model)
    assert "adapter wraps Linear(32x64) parallel to the FFN from bert.encoder.layer.0.intermediate.dense" in text
    assert "bottleneck 4, gelu, scale 4" in text and "[292 params]" in text  # 32*4+4 + 4*32+32
    delta.save(tmp_path / "ck")
    loaded = dt.load(BUILDERS["bert"](), tmp_path / "ck")
    assert loaded.configs == delta.configs
