"""PEFT interop, checked against the real peft package in both directions."""

from __future__ import annotations

import json

import pytest
import torch

import deltatune as dt
from tests.conftest import BUILDERS, logits, perturb

peft = pytest.importorskip("peft")


def peft_logits(model) -> torch.Tensor:
    with torch.no_grad():
        return logits(model.eval())


@pytest.mark.parametrize("arch,targets,train", [
    ("bert", ["query", "value"], ["classifier"]),
    ("llama", "all-linear", None),
    ("gpt2", ["c_attn", "c_fc"], None),
    ("llama", ["embed_tokens", "q_proj"], None),
])
def test_export_loads_in_peft_with_same_outputs(tmp_path, arch, targets, train):
    model = BUILDERS[arch]()
    delta = dt.attach(model, dt.LoRA(r=4, alpha=8, targets=targets), train_modules=train)
    perturb(delta, std=0.05)
    ours = logits(model)
    dt.export_peft(delta, tmp_path / "p")
    config = json.loads((tmp_path / "p" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8
    loaded = peft.PeftModel.from_pretrained(BUILDERS[arch](), tmp_path / "p")
    assert torch.allclose(peft_logits(loaded), ours, atol=1e-5)


def test_export_rank_pattern_and_rslora(tmp_path):
    model = BUILDERS["llama"]()
    cfg = dt.LoRA(r=4, alpha=8, rslora=True, targets=["q_proj", "v_proj"], rank_pattern={"v_proj": 2},
                  alpha_pattern={"q_proj": 3.0})
    delta = dt.attach(model, cfg)
    perturb(delta, std=0.05)
    dt.export_peft(delta, tmp_path / "p")
    config = json.loads((tmp_path / "p" / "adapter_config.json").read_text())
    assert set(config["rank_pattern"].values()) == {2} and config["use_rslora"] is True
    loaded = peft.PeftModel.from_pretrained(BUILDERS["llama"](), tmp_path / "p")
    assert torch.allclose(peft_logits(loaded), logits(model), atol=1e-5)


@pytest.mark.parametrize("arch,kwargs", [
    ("bert", dict(target_modules=["query", "value"], modules_to_save=["classifier"])),
    ("bert", dict(target_modules=["query", "key"], use_rslora=True)),
    ("llama", dict(target_modules="all-linear")),
    ("llama", dict(target_modules=r".*\.(q_proj|down_proj)")),  # a string is a regex in PEFT
    ("llama", dict(target_modules=["q_proj", "v_proj", "down_proj"], rank_pattern={"v_proj": 2},
                   alpha_pattern={"down_proj": 16}, layers_to_transform=[1])),
    ("gpt2", dict(target_modules=["c_attn", "c_proj"], fan_in_fan_out=True)),
    ("llama", dict(target_modules=["embed_tokens", "o_proj"])),
])
def test_import_gives_peft_outputs(tmp_path, arch, kwargs):
    cfg = peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, **kwargs)
    torch.manual_seed(3)
    pm = peft.get_peft_model(BUILDERS[arch](), cfg)
    reference = peft_logits(pm)
    assert not torch.allclose(reference, logits(BUILDERS[arch]()))  # the adapter really changes outputs
    pm.save_pretrained(tmp_path / "p")
    model = BUILDERS[arch]()
    delta = dt.import_peft(model, tmp_path / "p")
    assert torch.allclose(logits(model), reference, atol=1e-5)
    # and back out again: PEFT reads our re-export identically
    dt.export_peft(delta, tmp_path / "again")
    again = peft.PeftModel.from_pretrained(BUILDERS[arch](), tmp_path / "again")
    assert torch.allclose(peft_logits(again), reference, atol=1e-5)


def test_import_merge_matches_peft_merge(tmp_path):
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    pm = peft.get_peft_model(BUILDERS["llama"](), cfg)
    pm.save_pretrained(tmp_path / "p")
    merged_ref = peft_logits(pm.merge_and_unload())
    model = BUILDERS["llama"]()
    dt.import_peft(model, tmp_path / "p").merge()
    assert torch.allclose(logits(model), merged_ref, atol=1e-5)


def test_import_errors(tmp_path):
    with pytest.raises(dt.CheckpointNotFoundError, match="adapter_config.json"):
        dt.import_peft(BUILDERS["bert"](), tmp_path)
    pm = peft.get_peft_model(BUILDERS["bert"](), peft.IA3Config(target_modules=["key", "value", "output.dense"],
                                                                feedforward_modules=["output.dense"]))
    pm.save_pretrained(tmp_path / "ia3")
    with pytest.raises(dt.CheckpointError, match="import_peft reads"):
        dt.import_peft(BUILDERS["bert"](), tmp_path / "ia3")


def test_import_onto_wrong_model_is_clear_and_clean(tmp_path):
    pm = peft.get_peft_model(BUILDERS["bert"](), peft.LoraConfig(r=4, target_modules=["query"]))
    pm.save_pretrained(tmp_path / "p")
    model = BUILDERS["llama"]()
    with pytest.raises(dt.TargetError, match="query"):
        dt.import_peft(model, tmp_path / "p")
    assert "0 delta(s)" in dt.inspect(model)


def test_export_refuses_two_methods_and_methods_peft_lacks(tmp_path):
    model = BUILDERS["bert"]()
    delta = dt.attach(model, dt.LoRA(targets=["query"]), dt.LoRA(targets=["value"]))
    with pytest.raises(dt.StateError, match="exactly one method"):
        dt.export_peft(delta, tmp_path / "p")
    delta.detach()
    delta = dt.attach(model, dt.Adapter(bottleneck=8), name="adapter")
    with pytest.raises(dt.StateError, match="exactly one method of"):
        dt.export_peft(delta, tmp_path / "p")
    assert not (tmp_path / "p").exists()
