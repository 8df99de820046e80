"""LoRA's PiSSA and OLoRA initialisations: what they do to W at attach, detach, merge and PEFT export."""

from __future__ import annotations

import json

import pytest
import torch

import deltatune as dt
from deltatune.core.inject import named_base_parameters
from tests.conftest import BUILDERS, logits, perturb
from tests.methods.peft_check import export_matches_peft, outputs

peft = pytest.importorskip("peft")


def _query(model):
    return model.bert.encoder.layer[0].attention.self.query


def test_pissa_takes_the_principal_singular_directions_out_of_w():
    model = BUILDERS["bert"]()
    weight = _query(model).weight.detach().clone()
    dt.attach(model, dt.LoRA(r=4, alpha=8, targets=["query"], init="pissa"))
    module = _query(model)
    u, s, vh = torch.linalg.svd(weight)
    best = u[:, :4] @ torch.diag(s[:4]) @ vh[:4]  # W's best rank-4 approximation
    assert torch.allclose(module.delta_weight(), best, atol=1e-5)  # s B0 A0 at the start
    assert torch.allclose(module.base.weight, weight - best, atol=1e-5)  # the residual is the base weight now
    assert torch.allclose(torch.linalg.svdvals(module.base.weight), torch.cat([s[4:], torch.zeros(4)]), atol=1e-5)
    assert torch.allclose(module.lora_A.detach() @ module.lora_A.detach().T, torch.diag(s[:4] / 2), atol=1e-5)


def test_olora_takes_the_leading_qr_factors_out_of_w():
    model = BUILDERS["llama"]()
    weight = model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    dt.attach(model, dt.LoRA(r=4, alpha=8, targets=["q_proj"], init="olora"))
    module = model.model.layers[0].self_attn.q_proj
    q, upper = torch.linalg.qr(weight)
    b, a = module.lora_B.detach(), module.lora_A.detach()
    assert torch.allclose(b.T @ b, torch.eye(4), atol=1e-6)  # orthonormal columns
    assert torch.allclose(b @ a, q[:, :4] @ upper[:4], atol=1e-6)
    assert torch.allclose(module.base.weight, weight - 2.0 * q[:, :4] @ upper[:4], atol=1e-6)  # s = 8 / 4


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_unchanged_at_attach_and_the_original_w_back_at_detach_bit_for_bit(arch, init):
    model = BUILDERS[arch]()
    before = logits(model)
    weights = {n: p.detach().clone() for n, p in named_base_parameters(model)}
    delta = dt.attach(model, dt.LoRA(r=4, alpha=8, init=init))
    assert torch.allclose(logits(model), before, atol=1e-5)
    changed = [n for n, p in named_base_parameters(model) if not torch.equal(p, weights[n])]
    assert changed and all(n.endswith("weight") for n in changed)  # residuals in the targeted weights
    perturb(delta, std=0.05)
    delta.merge()
    delta.detach()  # unmerges, then writes the recorded originals back
    assert all(torch.equal(p, weights[n]) for n, p in named_base_parameters(model))
    assert torch.equal(logits(model), before)


def test_merge_writes_w_res_plus_sba_and_unmerge_takes_it_back():
    model = BUILDERS["bert"]()
    delta = dt.attach(model, dt.LoRA(r=4, alpha=8, targets=["query"], init="pissa"))
    perturb(delta, std=0.05)
    module = _query(model)
    residual = module.base.weight.detach().clone()
    tuned = logits(model)
    delta.merge()
    assert torch.allclose(module.base.weight, residual + 2.0 * module.lora_B @ module.lora_A, atol=1e-6)
    assert torch.allclose(logits(model), tuned, atol=1e-5)
    delta.unmerge()
    assert torch.allclose(module.base.weight, residual, atol=1e-6)


def test_switched_off_or_routed_away_is_the_original_model():
    model = BUILDERS["llama"]()
    base = logits(model)
    delta = dt.attach(model, dt.LoRA(r=4, alpha=8, init="pissa"), name="p")
    perturb(delta, std=0.05)
    tuned = logits(model)
    assert not torch.allclose(tuned, base, atol=1e-3)
    with dt.route(model, [None, "p", None]):
        mixed = logits(model)
    assert torch.allclose(mixed[0], base[0], atol=1e-5) and torch.allclose(mixed[1], tuned[1], atol=1e-5)
    delta.set_active(False)
    assert torch.allclose(logits(model), base, atol=1e-5)


@pytest.mark.parametrize("init", ["pissa", "olora"])
@pytest.mark.parametrize("arch,targets,rslora", [("bert", ["query", "value"], False), ("llama", "all-linear", True),
                                                 ("gpt2", ["c_attn", "c_fc"], False)])
def test_export_is_a_plain_rank_2r_lora_on_the_original_model(tmp_path, init, arch, targets, rslora):
    cfg = dt.LoRA(r=4, alpha=8, targets=targets, init=init, rslora=rslora)
    config = export_matches_peft(tmp_path, arch, cfg, std=0.05)  # PEFT loads it onto the *unmodified* base
    assert config["r"] == 8 and config["init_lora_weights"] is True
    assert config["lora_alpha"] == pytest.approx(8 * (2 ** 0.5 if rslora else 2))
    assert config["rank_pattern"] == {} and config["alpha_pattern"] == {}


def test_save_load_onto_a_fresh_base_redoes_the_residual(tmp_path):
    model = BUILDERS["gpt2"]()
    delta = dt.attach(model, dt.LoRA(r=4, alpha=8, init="olora"))
    perturb(delta, std=0.05)
    delta.save(tmp_path / "ck")
    assert not any("init" in k for k in delta.state_dict())  # A and B only
    fresh = BUILDERS["gpt2"]()
    dt.load(fresh, tmp_path / "ck")
    assert torch.equal(logits(fresh), logits(model))


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_same_start_as_peft(init):
    ref = peft.get_peft_model(BUILDERS["bert"](), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["query"],
                                                                   init_lora_weights=init)).base_model.model
    ours = BUILDERS["bert"]()
    dt.attach(ours, dt.LoRA(r=4, alpha=8, targets=["query"], init=init))
    peft_module, module = _query(ref), _query(ours)
    delta_peft = peft_module.lora_B["default"].weight @ peft_module.lora_A["default"].weight
    assert torch.allclose(module.lora_B @ module.lora_A, delta_peft, atol=1e-6)
    assert torch.allclose(module.base.weight, peft_module.base_layer.weight, atol=1e-6)


def test_import_of_a_peft_pissa_adapter_both_as_saved_and_as_converted(tmp_path):
    torch.manual_seed(0)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights="pissa")
    pm = peft.get_peft_model(BUILDERS["llama"](), cfg)
    pm.save_pretrained(tmp_path / "initial")  # the untrained adapter: PEFT's conversion subtracts it
    perturb_peft(pm)
    reference = outputs(pm)
    pm.save_pretrained(tmp_path / "raw")  # not converted: the loader must make W residual again, as PEFT does
    pm.save_pretrained(tmp_path / "converted", path_initial_model_for_weight_conversion=str(tmp_path / "initial"))
    raw = json.loads((tmp_path / "raw" / "adapter_config.json").read_text())
    assert raw["init_lora_weights"] == "pissa"
    for kind, expect_init in (("raw", "pissa"), ("converted", "kaiming")):
        model = BUILDERS["llama"]()
        delta = dt.import_peft(model, tmp_path / kind)
        assert delta.configs[0].init == expect_init
        assert torch.allclose(outputs(model), reference, atol=1e-5), kind


def perturb_peft(pm) -> None:
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)


def test_clear_refusals():
    with pytest.raises(dt.ConfigError, match="dora must be False with init='pissa'"):
        dt.LoRA(init="pissa", dora=True)
    with pytest.raises(dt.ConfigError, match="lora.init must be"):
        dt.LoRA(init="svd")
    model = BUILDERS["llama"]()
    with pytest.raises(dt.TargetError, match="not embeddings"):
        dt.attach(model, dt.LoRA(init="olora", targets=["embed_tokens", "q_proj"]))
    with pytest.raises(dt.ConfigError, match="r must be <= min"):
        dt.attach(model, dt.LoRA(r=40, init="pissa", targets=["q_proj"]))
    assert torch.equal(logits(model), logits(BUILDERS["llama"]()))  # every refusal left the model as it was


def test_combine_refuses_a_residual_init_and_points_to_the_plain_form(tmp_path):
    model = BUILDERS["bert"]()
    first = dt.attach(model, dt.LoRA(r=4, targets=["query"], init="pissa"), name="a")
    with pytest.raises(dt.ConfigError, match="init='pissa', which rewrote the base weights"):
        dt.combine([first], [1.0], name="sum")
