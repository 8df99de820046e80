"""VeRA: the formula by hand, the shared projections as PEFT draws them, PEFT round trips both ways."""

from __future__ import annotations

import pytest
import torch

import deltatune as dt
from deltatune.methods.vera import VeRALinear, projections
from tests.conftest import BUILDERS, logits, perturb
from tests.methods.peft_check import export_matches_peft, import_matches_peft

peft = pytest.importorskip("peft")


def test_output_is_base_plus_b_B_d_A_x_by_hand():
    model = BUILDERS["llama"]()
    delta = dt.attach(model, dt.VeRA(r=16, targets=["q_proj", "down_proj"]))
    perturb(delta)
    module = model.model.layers[0].mlp.down_proj  # in 64, out 32: a slice of the shared (16, 64) / (64, 16)
    a, b = projections(16, 64, 32, seed=0)
    x = torch.randn(3, 5, 64)
    d, lam_b = module.vera_lambda_d.detach(), module.vera_lambda_b.detach()
    by_hand = module.base(x) + ((x @ a[:, :64].T) * d) @ b[:32].T * lam_b
    with torch.no_grad():
        assert torch.allclose(module(x), by_hand, atol=1e-6)
        assert torch.allclose(module.delta_weight(), torch.diag(lam_b) @ b[:32] @ torch.diag(d) @ a[:, :64], atol=1e-6)


def test_trains_only_d_and_b_and_shares_the_frozen_projections():
    model = BUILDERS["bert"]()
    delta = dt.attach(model, dt.VeRA(r=16, targets=["query", "value"]), train_modules=None)
    wrappers = [m for m in model.modules() if isinstance(m, VeRALinear)]
    assert len(wrappers) == 4 and delta.num_trainable() == 4 * (16 + 32)  # r + out per layer
    assert all(torch.equal(w.vera_A, wrappers[0].vera_A) for w in wrappers)
    assert not any(w.vera_A.requires_grad or w.vera_B.requires_grad for w in wrappers)
    assert all(torch.equal(w.vera_lambda_d, torch.full((16,), 0.1)) and not w.vera_lambda_b.any() for w in wrappers)
    assert not any("vera_A" in k or "vera_B" in k for k in delta.state_dict())  # regenerated from the seed


def test_projections_are_the_ones_peft_draws():
    pm = peft.get_peft_model(BUILDERS["llama"](), peft.VeraConfig(r=16, target_modules=["q_proj", "down_proj"],
                                                                  projection_prng_key=7))
    a, b = projections(16, 64, 32, seed=7)  # the largest input (down_proj: 64) and output (32) targeted
    assert torch.equal(pm.base_model.vera_A["default"], a) and torch.equal(pm.base_model.vera_B["default"], b)


@pytest.mark.parametrize("arch,targets", [("bert", ["query", "value"]), ("llama", "all-linear"),
                                          ("gpt2", ["c_attn", "c_fc"])])
def test_export_loads_in_peft_with_same_outputs(tmp_path, arch, targets):
    config = export_matches_peft(tmp_path, arch, dt.VeRA(r=16, targets=targets, projection_seed=3),
                                 std=1.0)  # d and b of order 1: the VeRA path is a product of four small factors
    assert config["peft_type"] == "VERA" and config["projection_prng_key"] == 3 and config["save_projection"]


@pytest.mark.parametrize("arch,kwargs", [("bert", dict(target_modules=["query", "value"])),
                                         ("llama", dict(target_modules=["q_proj", "v_proj", "down_proj"],
                                                        projection_prng_key=5)),
                                         ("llama", dict(target_modules="all-linear", save_projection=False))])
def test_import_gives_peft_outputs(tmp_path, arch, kwargs):
    delta = import_matches_peft(tmp_path, arch, peft.VeraConfig(r=8, init_weights=False, **kwargs))
    assert delta.configs[0].projection_seed == kwargs.get("projection_prng_key", 0)


def test_import_refuses_projections_other_than_the_seeds(tmp_path):
    from safetensors.torch import load_file, save_file

    pm = peft.get_peft_model(BUILDERS["bert"](), peft.VeraConfig(r=8, target_modules=["query"]))
    pm.save_pretrained(tmp_path / "p")
    path = tmp_path / "p" / "adapter_model.safetensors"
    tensors = load_file(path)
    tensors["base_model.vera_A"] = tensors["base_model.vera_A"] * 2
    save_file(tensors, path)
    model = BUILDERS["bert"]()
    with pytest.raises(dt.CheckpointError, match="vera_A differs"):
        dt.import_peft(model, tmp_path / "p")
    assert torch.equal(logits(model), logits(BUILDERS["bert"]()))  # nothing left attached
