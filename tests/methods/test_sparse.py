"""Sparse fine-tuning: the masks (magnitude, random), the formula, a sparse checkpoint, an exact merge."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import deltatune as dt
from deltatune.core.checkpoint import file_sha256
from tests.conftest import BUILDERS, logits, perturb


def _down(model):
    return model.model.layers[0].mlp.down_proj  # (out 32, in 64)


def test_magnitude_mask_takes_the_largest_entries_of_each_row():
    model = BUILDERS["llama"]()
    weight = _down(model).weight.detach().clone()
    delta = dt.attach(model, dt.SparseFT(density=0.1, targets=["down_proj"]))
    module = _down(model)
    k = round(0.1 * 64)
    assert module.indices.shape == (32, k) and delta.num_trainable() == 2 * 32 * k
    for row in range(32):
        assert set(module.indices[row].tolist()) == set(weight[row].abs().topk(k).indices.tolist())


def test_random_mask_follows_the_seed_and_gpt2_conv1d_rows_are_output_rows():
    def indices(seed):
        model = BUILDERS["gpt2"]()
        dt.attach(model, dt.SparseFT(density=0.25, select="random", seed=seed, targets=["c_fc"]))
        return model.transformer.h[0].mlp.c_fc.indices.clone()

    first = indices(1)
    assert first.shape == (128, 8)  # Conv1D (in 32, out 128): 128 output rows of 8 of the 32 inputs
    assert torch.equal(first, indices(1)) and not torch.equal(first, indices(2))


def test_output_and_merge_change_exactly_the_chosen_entries():
    model = BUILDERS["llama"]()
    delta = dt.attach(model, dt.SparseFT(density=0.1, targets=["down_proj"]))
    perturb(delta)
    module = _down(model)
    weight = module.base.weight.detach().clone()
    by_hand = torch.zeros(32, 64)
    for row in range(32):
        by_hand[row, module.indices[row].long()] = module.values[row].detach()
    x = torch.randn(2, 3, 64)
    with torch.no_grad():
        assert torch.allclose(module(x), module.base(x) + x @ by_hand.T, atol=1e-6)
    tuned = logits(model)
    delta.merge()
    outside = by_hand == 0
    assert torch.equal(module.base.weight[outside], weight[outside])  # untouched entries stay bit for bit
    assert torch.allclose(module.base.weight, weight + by_hand, atol=1e-7)
    assert torch.allclose(logits(model), tuned, atol=1e-5)


def test_checkpoint_is_sparse_and_load_uses_the_saved_mask(tmp_path):
    model = BUILDERS["llama"]()
    delta = dt.attach(model, dt.SparseFT(density=0.05))
    perturb(delta)
    delta.save(tmp_path / "ck")
    tensors = load_file(tmp_path / "ck" / "delta.safetensors")
    dense = sum(m.base_layer().weight.numel() for m in delta.wrappers())
    assert sum(t.numel() for t in tensors.values()) == 2 * delta.num_trainable() < dense / 5
    assert {t.dtype for k, t in tensors.items() if k.endswith(".indices")} == {torch.int32}
    fresh = BUILDERS["llama"]()
    with torch.no_grad():  # a different W: recomputing the magnitude mask would now pick other entries
        for p in fresh.parameters():
            p.mul_(-1.5).add_(0.01)
    loaded = dt.load(fresh, tmp_path / "ck")
    assert all(torch.equal(a.indices, b.indices) for a, b in zip(loaded.wrappers(), delta.wrappers(), strict=True))


def test_corrupt_indices_are_refused_and_nothing_stays_attached(tmp_path):
    model = BUILDERS["bert"]()
    delta = dt.attach(model, dt.SparseFT(targets=["query"]), train_modules=None)
    delta.save(tmp_path / "ck")
    path = tmp_path / "ck" / "delta.safetensors"
    tensors = load_file(path)
    key = next(k for k in tensors if k.endswith(".indices"))
    tensors[key] = tensors[key] + 1000
    save_file(tensors, path)
    meta_path = tmp_path / "ck" / "delta_config.json"  # its checksum, recomputed as a tamperer would
    meta = json.loads(meta_path.read_text())
    meta["tensors"]["sha256"] = file_sha256(path)
    meta_path.write_text(json.dumps(meta))
    fresh = BUILDERS["bert"]()
    with pytest.raises(dt.CheckpointError, match="saved indices must be integers in"):
        dt.load(fresh, tmp_path / "ck")
    assert not dt.deltas(fresh)


def test_peft_has_no_such_method_so_export_is_refused(tmp_path):
    delta = dt.attach(BUILDERS["bert"](), dt.SparseFT(targets=["query"]))
    with pytest.raises(dt.StateError, match="export_peft writes exactly one method of"):
        dt.export_peft(delta, tmp_path / "p")
