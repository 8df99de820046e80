"""Several methods as one delta: composition of the parts, two methods on one module, presets, save/load."""

from __future__ import annotations

import pytest
import torch

import deltatune as dt
from deltatune.core.inject import DeltaWrapper
from tests.conftest import BUILDERS, logits, perturb

NAMES = {"bert": {"q": "query", "attn": "attention", "ffn_out": "output.dense"},
         "llama": {"q": "q_proj", "attn": "self_attn", "ffn_out": "mlp.down_proj"}}

COMPOSITES = {
    "lora+adapter+prefix": lambda n: [dt.LoRA(r=4, targets="all-linear"), dt.Adapter(kind="houlsby", bottleneck=8),
                                      dt.PrefixTuning(num_tokens=3, reparam_hidden=16)],
    "lora+prompt": lambda n: [dt.LoRA(r=2, targets=[n["q"]]), dt.PromptTuning(num_tokens=3)],
    "lora+ia3": lambda n: [dt.LoRA(r=2, targets="all-linear"), dt.IA3()],
    "same-module": lambda n: [dt.LoRA(r=2, targets=[n["q"]]),
                              dt.Adapter(kind="parallel", bottleneck=8, targets=[n["attn"]])],
    "mam": lambda n: dt.MAM(num_tokens=3, bottleneck=8, reparam_hidden=16),
    "unipelt": lambda n: dt.UniPELT(num_tokens=3, bottleneck=8),
}


@pytest.mark.parametrize("arch", ["bert", "llama"])
@pytest.mark.parametrize("composite", sorted(COMPOSITES))
def test_composite_saves_loads_and_detaches(composite, arch, tmp_path):
    model = BUILDERS[arch]()
    modules, base = dict(model.named_modules()), logits(model)
    delta = dt.attach(model, COMPOSITES[composite](NAMES[arch]), train_modules=None)
    perturb(delta, std=0.05)
    tuned = logits(model)
    # the composite really changes the outputs (a soft prompt after [CLS] moves a tiny BERT's pooled
    # logits by ~1e-4 only, so the bar is "changed", not "changed a lot")
    assert not torch.allclose(tuned, base, atol=1e-6)
    delta.save(tmp_path / composite)
    fresh = BUILDERS[arch]()
    dt.load(fresh, tmp_path / composite)
    assert torch.allclose(logits(fresh), tuned, atol=1e-5)
    delta.detach()
    assert dict(model.named_modules()) == modules
    assert torch.equal(logits(model), base)


def _copy_slot(source, target, slot: str) -> None:
    target.load_state_dict({k: v for k, v in source.state_dict().items() if k.startswith(f"{slot}:")})


def test_union_equals_its_parts_when_the_others_are_identity(arch):
    model, alone_model = BUILDERS[arch](), BUILDERS[arch]()
    union = dt.attach(model, dt.LoRA(r=4, targets="all-linear"), dt.Adapter(kind="houlsby", bottleneck=8),
                      dt.IA3(), train_modules=None)
    with torch.no_grad():
        for key, p in union.parameters().items():
            if key.startswith("lora:"):
                p.normal_(0, 0.1)  # adapter (up = 0) and IA3 (l = 1) stay identity
    alone = dt.attach(alone_model, dt.LoRA(r=4, targets="all-linear"), train_modules=None)
    _copy_slot(union, alone, "lora")
    assert torch.allclose(logits(model), logits(alone_model), atol=1e-6)


@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_union_equals_its_parts_attached_as_separate_deltas(arch):
    n = NAMES[arch]
    configs = [dt.LoRA(r=2, targets=[n["q"]]), dt.Adapter(kind="parallel", bottleneck=8, targets=[n["attn"]]),
               dt.PrefixTuning(num_tokens=3, reparam_hidden=0)]
    model, parts_model = BUILDERS[arch](), BUILDERS[arch]()
    union = dt.attach(model, *configs, train_modules=None)
    perturb(union)
    parts = [dt.attach(parts_model, cfg, name=cfg.method, train_modules=None) for cfg in configs]
    for part in parts:
        _copy_slot(union, part, part.name)
        part.set_active(True)  # all three in effect at once: their composition
    assert torch.allclose(logits(model), logits(parts_model), atol=1e-6)


def test_two_methods_wrapping_one_module_add_both_paths():
    model = BUILDERS["bert"]()
    original = model.bert.encoder.layer[0].attention.self.query
    delta = dt.attach(model, dt.LoRA(r=2, targets=["query"]),
                      dt.Adapter(kind="parallel", bottleneck=4, targets=["query"], scale=2.0), train_modules=None)
    perturb(delta)
    outer = model.bert.encoder.layer[0].attention.self.query
    inner = outer.base
    assert isinstance(outer, DeltaWrapper) and isinstance(inner, DeltaWrapper) and inner.base is original
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        lora = inner.scale * (x @ inner.lora_A.T @ inner.lora_B.T)
        adapter = 2.0 * outer.up(torch.relu(outer.down(x)))
        assert torch.allclose(outer(x), original(x) + lora + adapter, atol=1e-6)
    delta.detach()
    assert model.bert.encoder.layer[0].attention.self.query is original


def test_mam_preset_places_prefix_on_attention_and_scaled_parallel_adapter_on_ffn():
    model = BUILDERS["llama"]()
    delta = dt.attach(model, dt.MAM(bottleneck=8), train_modules=None)
    assert [c.method for c in delta.configs] == ["prefix", "adapter"]
    prefix, adapter = delta.attachments
    assert {p.rsplit(".", 1)[0] for p in prefix.modules if "layers" in p} == {
        f"model.layers.{i}.self_attn" for i in range(2)}
    assert prefix.config.num_tokens == 30
    wrappers = adapter.wrappers()
    assert sorted(wrappers) == [f"model.layers.{i}.mlp.down_proj" for i in range(2)]
    assert all(w.parallel and w.scale == 4.0 for w in wrappers.values())


def test_unipelt_preset_gates_lora_and_adapter():
    model = BUILDERS["bert"]()
    delta = dt.attach(model, dt.UniPELT(bottleneck=8), train_modules=None)
    assert [c.method for c in delta.configs] == ["lora", "prefix", "adapter", "gates"]
    gate_slots = sorted(m.slot for m in delta.attachments[-1].modules.values())
    assert gate_slots == ["adapter", "adapter", "lora", "lora"]
    lora_paths = sorted(delta.attachments[0].modules)
    assert [p.rsplit(".", 1)[1] for p in lora_paths] == ["query", "value"] * 2


def test_presets_compose_with_more_configs_and_names():
    model = BUILDERS["bert"]()
    delta = dt.attach(model, dt.MAM(bottleneck=8), dt.LoRA(r=2, targets=["value"]), name="mam+lora", train_modules=None)
    assert [a.slot for a in delta.attachments] == ["prefix", "adapter", "lora"]
    assert dt.deltas(model) == {"mam+lora": delta}
