"""BitFit: which biases train (from structure), what the checkpoint holds, detach and merge semantics."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

import deltatune as dt
from tests.conftest import BUILDERS, batch, logits


def names(delta) -> list[str]:
    return list(delta.attachments[0].existing)


def test_all_is_every_backbone_bias_but_not_the_head():
    model = BUILDERS["bert"]()
    delta = dt.attach(model, dt.BitFit(), train_modules=None)
    expected = [n for n, _ in model.named_parameters() if n.endswith(".bias") and n.startswith("bert.")]
    assert names(delta) == expected and "classifier.bias" not in names(delta)
    # per layer: q k v o + LN, intermediate, output + LN = 6 * 32 + 64 + 32; plus embeddings LN and pooler
    assert delta.num_trainable() == 2 * (6 * 32 + 64 + 32) + 32 + 32
    with_head = dt.attach(BUILDERS["bert"](), dt.BitFit(), train_modules=["classifier"])
    assert with_head.num_trainable() == delta.num_trainable() + 2 * 32 + 2


@pytest.mark.parametrize("which,suffixes", [
    ("attention", {"query.bias", "key.bias", "value.bias", "attention.output.dense.bias"}),
    ("ffn", {"intermediate.dense.bias", "layer.0.output.dense.bias", "layer.1.output.dense.bias"}),
    ("norm", {"LayerNorm.bias"}),
])
def test_subsets_on_bert(which, suffixes):
    found = names(dt.attach(BUILDERS["bert"](), dt.BitFit(which=which), train_modules=None))
    assert found and all(any(n.endswith(s) for s in suffixes) for n in found), found
    all_biases = names(dt.attach(BUILDERS["bert"](), dt.BitFit(), train_modules=None))
    hits = [n for n in all_biases if any(n.endswith(s) for s in suffixes) and "pooler" not in n]
    if which == "ffn":
        hits = [n for n in hits if "attention" not in n]
    assert found == hits


def test_subsets_on_gpt2_lists_and_layers():
    model = BUILDERS["gpt2"]()
    delta = dt.attach(model, dt.BitFit(which=["attention", "norm"], layers=[1]), train_modules=None)
    assert names(delta) == ["transformer.h.1.ln_1.bias", "transformer.h.1.attn.c_attn.bias",
                            "transformer.h.1.attn.c_proj.bias", "transformer.h.1.ln_2.bias"]


def test_explicit_targets_take_biases_below_them():
    delta = dt.attach(BUILDERS["bert"](), dt.BitFit(targets=["attention.self", "pooler"]), train_modules=None)
    assert names(delta) == [f"bert.encoder.layer.{i}.attention.self.{p}.bias" for i in (0, 1)
                            for p in ("query", "key", "value")] + ["bert.pooler.dense.bias"]


def test_model_without_biases_is_a_clear_error_and_untouched():
    model = BUILDERS["llama"]()
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    with pytest.raises(dt.AttachError, match="no bias parameters.*BitFit trains only bias"):
        dt.attach(model, dt.BitFit(), train_modules=None)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert "0 delta(s)" in dt.inspect(model)


def test_bad_which():
    with pytest.raises(dt.ConfigError, match=r"bitfit.which must be one of \['all', 'attention', 'ffn', 'norm'\]"):
        dt.BitFit(which="biases")
    with pytest.raises(dt.ConfigError, match="bitfit.which"):
        dt.BitFit(which=[])


def train_steps(model, delta, steps: int = 3) -> None:
    opt = torch.optim.SGD(delta.parameters().values(), lr=0.5)
    for _ in range(steps):
        opt.zero_grad()
        model(input_ids=batch(), labels=batch()).loss.backward()
        opt.step()


def test_checkpoint_holds_only_the_trained_biases(tmp_path):
    model = BUILDERS["gpt2"]()
    delta = dt.attach(model, dt.BitFit(which="ffn"), train_modules=None)
    train_steps(model, delta)
    tuned = logits(model)
    delta.save(tmp_path / "ck")
    tensors = load_file(tmp_path / "ck" / "delta.safetensors")
    assert sorted(tensors) == sorted(f"bitfit:{n}" for n in names(delta))
    assert sum(t.numel() for t in tensors.values()) == 2 * (128 + 32)
    fresh = BUILDERS["gpt2"]()
    dt.load(fresh, tmp_path / "ck")
    assert torch.equal(logits(fresh), tuned)


def test_detach_puts_the_original_bias_values_back():
    model = BUILDERS["gpt2"]()
    before = logits(model)
    delta = dt.attach(model, dt.BitFit(), train_modules=None)
    train_steps(model, delta)
    assert not torch.allclose(logits(model), before, atol=1e-4)
    delta.detach()
    assert torch.equal(logits(model), before)
    assert all(p.requires_grad for p in model.parameters())


def test_merge_is_a_no_op_and_merge_and_save_works(tmp_path):
    from transformers import GPT2LMHeadModel

    model = BUILDERS["gpt2"]()
    delta = dt.attach(model, dt.BitFit(), train_modules=None)
    train_steps(model, delta)
    tuned = logits(model)
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    delta.merge()
    assert delta.is_merged and torch.equal(logits(model), tuned)
    assert all(torch.equal(p, weights[n]) for n, p in model.named_parameters())
    with pytest.raises(dt.StateError, match="already merged"):
        delta.merge()
    delta.unmerge()
    assert not delta.is_merged and torch.equal(logits(model), tuned)
    dt.merge_and_save(delta, tmp_path / "full")
    assert torch.allclose(logits(GPT2LMHeadModel.from_pretrained(tmp_path / "full").eval()), tuned, atol=1e-6)
    assert not delta.is_merged


def test_combined_with_lora_merges_the_lora_part():
    model = BUILDERS["bert"]()
    delta = dt.attach(model, dt.LoRA(r=2, targets=["query"]), dt.BitFit(which="attention"),
                      train_modules=["classifier"])
    train_steps_cls(model, delta)
    tuned = logits(model)
    delta.merge()
    assert torch.allclose(logits(model), tuned, atol=1e-5)
    delta.unmerge()
    assert torch.allclose(logits(model), tuned, atol=1e-5)


def train_steps_cls(model, delta) -> None:
    opt = torch.optim.SGD(delta.parameters().values(), lr=0.5)
    for _ in range(2):
        opt.zero_grad()
        model(input_ids=batch(), labels=torch.tensor([0, 1, 1])).loss.backward()
        opt.step()
