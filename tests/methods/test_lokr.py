"""LoKr: PEFT's factorization and shapes, the Kronecker formula by hand, PEFT round trips both ways."""

from __future__ import annotations

import pytest
import torch

import deltatune as dt
from deltatune.methods.lokr import factorization
from tests.conftest import BUILDERS, perturb
from tests.methods.peft_check import export_matches_peft, import_matches_peft

peft = pytest.importorskip("peft")


def test_factorization_matches_peft_everywhere():
    from peft.tuners.lokr.layer import factorization as peft_factorization

    for dimension in [*range(1, 300), 384, 768, 1024, 1536, 3072, 4096, 11008]:
        for factor in (-1, 2, 4, 8, 16, 7):
            assert factorization(dimension, factor) == peft_factorization(dimension, factor), (dimension, factor)


def test_update_is_the_scaled_kronecker_product_by_hand():
    model = BUILDERS["llama"]()
    delta = dt.attach(model, dt.LoKr(r=2, alpha=3, targets=["down_proj"]))  # (32, 64): W1 (4, 8), W2 (8, 8)
    perturb(delta)
    module = model.model.layers[0].mlp.down_proj
    w1 = module.lokr_w1.detach()
    w2 = module.lokr_w2_a.detach() @ module.lokr_w2_b.detach()  # r = 2 < 8 / 2: W2 is factored
    assert w1.shape == (4, 8) and w2.shape == (8, 8)
    by_hand = torch.zeros(32, 64)
    for i in range(4):
        for j in range(8):
            by_hand[8 * i:8 * (i + 1), 8 * j:8 * (j + 1)] = w1[i, j] * w2
    x = torch.randn(2, 3, 64)
    with torch.no_grad():
        assert torch.allclose(module.delta_weight(), by_hand * 1.5, atol=1e-7)
        assert torch.allclose(module(x), module.base(x) + x @ (by_hand * 1.5).T, atol=1e-6)


@pytest.mark.parametrize("r,both,names", [(4, False, {"lokr_w1", "lokr_w2"}),
                                          (2, False, {"lokr_w1", "lokr_w2_a", "lokr_w2_b"}),
                                          (1, True, {"lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b"})])
def test_parameters_are_the_ones_peft_creates(r, both, names):
    cfg = dict(r=r, target_modules=["query"], decompose_both=both)
    ref = peft.get_peft_model(BUILDERS["bert"](), peft.LoKrConfig(**cfg)).base_model.model
    ours = BUILDERS["bert"]()
    dt.attach(ours, dt.LoKr(r=r, targets=["query"], decompose_both=both), train_modules=None)
    peft_module = ref.bert.encoder.layer[0].attention.self.query
    module = ours.bert.encoder.layer[0].attention.self.query
    shapes = {n: tuple(p.shape) for n, p in module.own_parameters()}
    assert set(shapes) == names
    assert shapes == {n: tuple(getattr(peft_module, n)["default"].shape) for n in names}
    assert not module.delta_weight().any()  # W1 (or W1a) starts at zero


@pytest.mark.parametrize("arch,kwargs", [("bert", dict(r=4, targets=["query", "value"])),
                                         ("llama", dict(r=2, targets="all-linear", decompose_both=True)),
                                         ("llama", dict(r=2, targets=["o_proj"], decompose_factor=4))])
def test_export_loads_in_peft_with_same_outputs(tmp_path, arch, kwargs):
    config = export_matches_peft(tmp_path, arch, dt.LoKr(alpha=6, **kwargs), std=0.3)
    assert config["peft_type"] == "LOKR" and config["decompose_both"] == kwargs.get("decompose_both", False)
    assert config["decompose_factor"] == kwargs.get("decompose_factor", -1)  # PEFT's "nearest sqrt" is -1


@pytest.mark.parametrize("arch,kwargs", [("bert", dict(r=4, target_modules=["query", "value"])),
                                         ("llama", dict(r=2, target_modules="all-linear", decompose_both=True)),
                                         ("llama", dict(r=2, target_modules=["o_proj"], decompose_factor=4))])
def test_import_gives_peft_outputs(tmp_path, arch, kwargs):
    delta = import_matches_peft(tmp_path, arch, peft.LoKrConfig(init_weights=False, **kwargs))
    assert delta.configs[0].decompose_factor == kwargs.get("decompose_factor")


def test_export_of_conv1d_layers_is_refused_clearly(tmp_path):
    delta = dt.attach(BUILDERS["gpt2"](), dt.LoKr(r=2, targets=["c_fc"]))
    with pytest.raises(dt.StateError, match="PEFT has no LoKr for transformers' Conv1D"):
        dt.export_peft(delta, tmp_path / "p")
