"""LoHa: the Hadamard formula by hand, its start, PEFT round trips both ways, Conv1D export refused."""

from __future__ import annotations

import pytest
import torch

import deltatune as dt
from tests.conftest import BUILDERS, perturb
from tests.methods.peft_check import export_matches_peft, import_matches_peft

peft = pytest.importorskip("peft")


def test_update_is_the_scaled_hadamard_product_by_hand():
    model = BUILDERS["llama"]()
    delta = dt.attach(model, dt.LoHa(r=4, alpha=6, targets=["down_proj"]))
    perturb(delta)
    module = model.model.layers[1].mlp.down_proj  # (out 32, in 64)
    w1 = module.hada_w1_a.detach() @ module.hada_w1_b.detach()
    w2 = module.hada_w2_a.detach() @ module.hada_w2_b.detach()
    by_hand = w1 * w2 * (6 / 4)
    x = torch.randn(2, 3, 64)
    with torch.no_grad():
        assert torch.allclose(module.delta_weight(), by_hand, atol=1e-7)
        assert torch.allclose(module(x), module.base(x) + x @ by_hand.T, atol=1e-6)
    assert torch.linalg.matrix_rank(by_hand) > 4  # a Hadamard product of rank-4 factors exceeds rank 4


def test_starts_at_zero_with_2r_in_plus_out_numbers_per_layer():
    model = BUILDERS["bert"]()
    delta = dt.attach(model, dt.LoHa(r=4, targets=["query"]), train_modules=None)
    assert delta.num_trainable() == 2 * 2 * 4 * (32 + 32)  # 2 layers, 2 factor pairs of r (in + out)
    module = model.bert.encoder.layer[0].attention.self.query
    assert not module.hada_w2_b.any() and module.hada_w1_a.abs().sum() > 0
    assert not module.delta_weight().any()


@pytest.mark.parametrize("arch,targets", [("bert", ["query", "value"]), ("llama", "all-linear")])
def test_export_loads_in_peft_with_same_outputs(tmp_path, arch, targets):
    config = export_matches_peft(tmp_path, arch, dt.LoHa(r=4, alpha=6, targets=targets), std=0.3)
    assert config["peft_type"] == "LOHA" and config["r"] == 4 and config["alpha"] == 6


@pytest.mark.parametrize("arch,kwargs", [("bert", dict(target_modules=["query", "value"], alpha=3)),
                                         ("llama", dict(target_modules="all-linear"))])
def test_import_gives_peft_outputs(tmp_path, arch, kwargs):
    import_matches_peft(tmp_path, arch, peft.LoHaConfig(r=4, init_weights=False, **kwargs))


def test_export_of_conv1d_layers_is_refused_clearly(tmp_path):
    delta = dt.attach(BUILDERS["gpt2"](), dt.LoHa(r=2, targets=["c_attn"]))
    with pytest.raises(dt.StateError, match="PEFT has no LoHa for transformers' Conv1D"):
        dt.export_peft(delta, tmp_path / "p")
    assert not (tmp_path / "p").exists()
