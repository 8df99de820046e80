"""dt.combine: exact rank concatenation, SVD truncation with its exact error, mixed ranks/scalings, errors."""

from __future__ import annotations

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification

import deltatune as dt
from deltatune.compose.algebra import truncate
from tests.conftest import BUILDERS, logits, perturb


def updates(delta) -> dict[str, torch.Tensor]:
    """Per module path, the update this delta adds to the base weight (in the base weight's layout)."""
    out: dict[str, torch.Tensor] = {}
    for att in delta.attachments:
        for path, w in att.wrappers().items():
            out[path] = out.get(path, 0) + w.delta_weight().detach()
    return out


def weighted_sum(deltas, weights) -> dict[str, torch.Tensor]:
    total: dict[str, torch.Tensor] = {}
    for delta, weight in zip(deltas, weights):
        for path, update in updates(delta).items():
            total[path] = total.get(path, 0) + weight * update
    return total


def pair(arch="bert", cfg1=None, cfg2=None):
    model = BUILDERS[arch]()
    d1 = dt.attach(model, cfg1 or dt.LoRA(r=2, targets="all-linear"), name="x", train_modules=None)
    perturb(d1, seed=1)
    d2 = dt.attach(model, cfg2 or dt.LoRA(r=3, alpha=4, targets="all-linear"), name="y", train_modules=None)
    perturb(d2, seed=2)
    return model, d1, d2


@pytest.mark.parametrize("weights", [[1.0, 1.0], [0.5, -1.5]])
def test_exact_concat_equals_the_weighted_sum(arch, weights):
    model, d1, d2 = pair(arch)
    combined = dt.combine([d1, d2], weights=weights)
    assert combined.name == "x+y" and dt.deltas(model)["x+y"] is combined and combined.is_active
    expected = weighted_sum([d1, d2], weights)
    got = updates(combined)
    assert got.keys() == expected.keys()
    for path in expected:
        assert torch.allclose(got[path], expected[path], atol=1e-6), path
        assert combined.combine_report[path] == {"rank": 5, "retained_energy": 1.0}
    # forward: the combined delta equals both deltas in effect at once (their paths add)
    if weights == [1.0, 1.0]:
        out = logits(model)
        dt.deactivate(model)
        d1.set_active(True)
        d2.set_active(True)
        assert torch.allclose(logits(model), out, atol=1e-5)


def test_mixed_ranks_scalings_and_targets_per_module():
    cfg1 = dt.LoRA(r=4, alpha=8, targets=["query", "value"], rank_pattern={"value": 2}, alpha_pattern={"value": 3})
    cfg2 = dt.LoRA(r=3, alpha=5, targets=["query", "key"], rslora=True)
    model, d1, d2 = pair("bert", cfg1, cfg2)
    combined = dt.combine([d1, d2], weights=[2.0, 0.5], name="mix")
    expected = weighted_sum([d1, d2], [2.0, 0.5])
    got = updates(combined)
    assert sorted(got) == sorted(expected)
    for path in expected:
        assert torch.allclose(got[path], expected[path], atol=1e-6), path
    ranks = {p.rsplit(".", 1)[1]: v["rank"] for p, v in combined.combine_report.items()}
    assert ranks == {"query": 7, "key": 3, "value": 2}


def test_svd_truncation_error_equals_discarded_energy():
    model, d1, d2 = pair("bert")
    exact = weighted_sum([d1, d2], [1.0, 1.0])
    combined = dt.combine([d1, d2], r=3)
    for path, update in updates(combined).items():
        s = torch.linalg.svd(exact[path].double())[1]
        assert torch.linalg.matrix_rank(update.double(), atol=1e-6) <= 3
        err = ((exact[path].double() - update.double()) ** 2).sum()
        assert torch.allclose(err, (s[3:] ** 2).sum(), rtol=1e-3, atol=1e-9), path
        kept = float((s[:3] ** 2).sum() / (s ** 2).sum())
        assert combined.combine_report[path]["retained_energy"] == pytest.approx(kept, rel=1e-4)
        assert combined.combine_report[path]["rank"] == 3


def test_truncate_is_exact_when_rank_suffices():
    g = torch.Generator().manual_seed(0)
    B, A = torch.randn(20, 4, generator=g), torch.randn(4, 30, generator=g)
    B_r, A_r, s = truncate(B, A, 4)
    assert torch.allclose(B_r @ A_r, B @ A, atol=1e-4) and s.shape == (4,)
    B_r, A_r, _ = truncate(B, A, 2)
    assert B_r.shape == (20, 2) and A_r.shape == (2, 30)


def test_combined_delta_saves_and_loads(tmp_path):
    model, d1, d2 = pair("gpt2", dt.LoRA(r=2, targets=["c_attn", "wte"]), dt.LoRA(r=2, targets=["c_attn", "c_fc"]))
    combined = dt.combine([d1, d2], weights=[1.0, 0.3], r=3)
    out = logits(model)
    combined.save(tmp_path / "c")
    fresh = BUILDERS["gpt2"]()
    dt.load(fresh, tmp_path / "c")
    # the combined delta sits on the (inactive) originals there, alone here: other kernels, same numbers
    assert torch.allclose(logits(fresh), out, atol=1e-5, rtol=0)


def test_combine_onto_another_copy_of_the_base():
    model, d1, d2 = pair("bert")
    other = BUILDERS["bert"]()
    combined = dt.combine([d1, d2], model=other, name="sum")
    assert combined.model is other and "sum" not in dt.deltas(model)
    for path, update in weighted_sum([d1, d2], [1, 1]).items():
        assert torch.allclose(updates(combined)[path], update, atol=1e-6)
    out = logits(other)
    combined.merge()
    assert torch.allclose(logits(other), out, atol=1e-4)


def wider_bert():
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=100, hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, num_labels=2, max_position_embeddings=64)
    return BertForSequenceClassification(cfg).eval()


def test_errors_are_clear():
    model, d1, d2 = pair("bert")
    with pytest.raises(dt.ConfigError, match="2 deltas but 1 weights"):
        dt.combine([d1, d2], weights=[1.0])
    with pytest.raises(dt.ConfigError, match="positive integer"):
        dt.combine([d1, d2], r=0)
    with pytest.raises(dt.ConfigError, match="non-empty list"):
        dt.combine([])
    with pytest.raises(dt.StateError, match="already attached"):
        dt.combine([d1, d2], name="x")
    dora = dt.attach(model, dt.LoRA(r=2, targets=["query"], dora=True), name="d", train_modules=None)
    with pytest.raises(dt.ConfigError, match=r"plain LoRA.*dora"):
        dt.combine([d1, dora])
    wide = dt.attach(wider_bert(), dt.LoRA(r=2, targets=["query"]), name="w", train_modules=None)
    with pytest.raises(dt.ConfigError, match=r"different shapes.*x: 32x32, w: 48x48"):
        dt.combine([d1, wide])
    dt.activate(model, "y")
    d2.merge()
    with pytest.raises(dt.StateError, match="'y' is merged"):
        dt.combine([d1, d2])
    d2.unmerge()
    d2.detach()
    with pytest.raises(dt.StateError, match="detached"):
        dt.combine([d1, d2])
    assert sorted(dt.deltas(model)) == ["d", "x"]  # nothing was attached by the failed calls


def test_combined_delta_round_trips_through_peft(tmp_path):
    model, d1, d2 = pair("bert", dt.LoRA(r=2, targets=["query", "value"]), dt.LoRA(r=3, targets=["query"]))
    combined = dt.combine([d1, d2], weights=[1.0, 0.5])
    out = logits(model)
    dt.export_peft(combined, tmp_path / "peft")
    fresh = BUILDERS["bert"]()
    dt.import_peft(fresh, tmp_path / "peft")
    assert torch.allclose(logits(fresh), out, atol=1e-6)
