"""OFT: the Cayley rotation by hand, orthogonality, exact merge, PEFT round trips both ways, clear refusals."""

from __future__ import annotations

import json

import pytest
import torch

import deltatune as dt
from deltatune.methods.oft import cayley
from tests.conftest import BUILDERS, batch, perturb
from tests.methods.peft_check import export_matches_peft, import_matches_peft

peft = pytest.importorskip("peft")


def test_rotation_is_the_cayley_transform_by_hand_and_orthogonal():
    upper = torch.randn(3, 6, dtype=torch.float64)  # 3 blocks of 4: 4 * 3 / 2 = 6 entries each
    rotations = cayley(upper, 4)
    rows, cols = torch.triu_indices(4, 4, 1)
    for i in range(3):
        q = torch.zeros(4, 4, dtype=torch.float64)
        q[rows, cols] = upper[i]
        q = q - q.T
        eye = torch.eye(4, dtype=torch.float64)
        assert torch.allclose(rotations[i], (eye - q) @ torch.linalg.inv(eye + q), atol=1e-12)
        assert torch.allclose(rotations[i] @ rotations[i].T, eye, atol=1e-12)
    assert torch.equal(cayley(torch.zeros(2, 6), 4), torch.eye(4).expand(2, 4, 4))  # exactly I at the start


def test_output_is_the_layer_on_block_rotated_input():
    model = BUILDERS["llama"]()
    delta = dt.attach(model, dt.OFT(block_size=16, targets=["down_proj"]), train_modules=None)
    assert delta.num_trainable() == 2 * 4 * (16 * 15 // 2)  # 2 layers, 64 / 16 blocks
    perturb(delta)
    module = model.model.layers[0].mlp.down_proj
    x = torch.randn(2, 3, 64)
    rotation = torch.block_diag(*cayley(module.oft_R.detach(), 16))
    with torch.no_grad():
        assert torch.allclose(module(x), module.base(x @ rotation), atol=1e-6)
        weight = module.base.weight.clone()
        delta.merge()
        assert torch.allclose(module.base.weight, weight @ rotation.T, atol=1e-6)
        # a rotation keeps the norm of every row of W: what OFT preserves by construction
        assert torch.allclose(module.base.weight.norm(dim=1), weight.norm(dim=1), atol=1e-5)


def test_block_size_must_divide_every_input_width():
    model = BUILDERS["llama"]()
    with pytest.raises(dt.TargetError, match="block_size 24 does not divide the input width 32"):
        dt.attach(model, dt.OFT(block_size=24))
    assert not any("oft" in n for n, _ in model.named_parameters())


@pytest.mark.parametrize("arch,kwargs", [("bert", dict(targets=["query", "value"])),
                                         ("llama", dict(targets="all-linear", block_size=16))])
def test_export_loads_in_peft_with_same_outputs(tmp_path, arch, kwargs):
    config = export_matches_peft(tmp_path, arch, dt.OFT(**kwargs))
    assert config["peft_type"] == "OFT" and config["use_cayley_neumann"] is False
    assert config["oft_block_size"] == kwargs.get("block_size", 32) and config["r"] == 0


@pytest.mark.parametrize("arch,kwargs", [("bert", dict(target_modules=["query", "value"])),
                                         ("llama", dict(target_modules="all-linear", oft_block_size=8))])
def test_import_gives_peft_outputs(tmp_path, arch, kwargs):
    cfg = peft.OFTConfig(init_weights=False, use_cayley_neumann=False, **{"oft_block_size": 32, **kwargs})
    import_matches_peft(tmp_path, arch, cfg)


def test_export_of_conv1d_layers_is_refused_clearly(tmp_path):
    delta = dt.attach(BUILDERS["gpt2"](), dt.OFT(block_size=8, targets=["c_attn"]))
    with pytest.raises(dt.StateError, match="PEFT has no OFT for transformers' Conv1D"):
        dt.export_peft(delta, tmp_path / "p")


def test_import_refuses_the_neumann_approximation(tmp_path):
    pm = peft.get_peft_model(BUILDERS["bert"](), peft.OFTConfig(target_modules=["query"], oft_block_size=8))
    pm.save_pretrained(tmp_path / "p")
    assert json.loads((tmp_path / "p" / "adapter_config.json").read_text())["use_cayley_neumann"] is True
    with pytest.raises(dt.CheckpointError, match="use_cayley_neumann"):
        dt.import_peft(BUILDERS["bert"](), tmp_path / "p")


def test_bf16_model_rotates_trains_and_merges():
    model = BUILDERS["llama"]().to(torch.bfloat16)
    delta = dt.attach(model, dt.OFT(block_size=8, targets=["q_proj"]))
    model(input_ids=batch(), labels=batch()).loss.backward()  # the solve runs in float32 (no bf16 LU on CPU)
    assert all(p.grad is not None and p.grad.dtype == torch.bfloat16 for p in delta.parameters().values())
    delta.merge()
    delta.unmerge()
