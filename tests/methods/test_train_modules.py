"""train_modules: whole modules trained as per-delta copies, and the "auto" choice of a task head."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    BertConfig,
    BertForQuestionAnswering,
    BertForTokenClassification,
    LlamaConfig,
    LlamaForSequenceClassification,
)

import deltatune as dt
from deltatune.core.targets import find_task_heads
from deltatune.methods.train_modules import ModuleCopy
from tests.conftest import BUILDERS, batch, logits, tiny_bert

SMALL_BERT = dict(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64)


@pytest.mark.parametrize("build,expected", [
    (lambda: tiny_bert(), ["classifier"]),
    (lambda: BertForTokenClassification(BertConfig(**SMALL_BERT, num_labels=5)), ["classifier"]),
    (lambda: BertForQuestionAnswering(BertConfig(**SMALL_BERT)), ["qa_outputs"]),
    (lambda: LlamaForSequenceClassification(LlamaConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1,
                                                         num_attention_heads=4, num_key_value_heads=2,
                                                         intermediate_size=64, num_labels=3)), ["score"]),
    (lambda: BUILDERS["llama"](), []),   # causal LM: lm_head is the pretrained output embedding
    (lambda: BUILDERS["gpt2"](), []),
    (lambda: torch.nn.Sequential(torch.nn.Linear(4, 2)), []),  # no transformers backbone
])
def test_auto_finds_the_new_task_head_only(build, expected):
    assert find_task_heads(build()) == expected


def test_auto_is_the_default_and_none_opts_out():
    assert list(dt.attach(tiny_bert(), dt.LoRA(targets=["query"])).train_modules) == ["classifier"]
    assert dt.attach(tiny_bert(), dt.LoRA(targets=["query"]), train_modules=None).train_modules == {}
    assert dt.attach(BUILDERS["llama"](), dt.LoRA(targets=["q_proj"])).train_modules == {}


def test_copy_trains_while_the_original_stays_bitwise():
    model = tiny_bert()
    original = model.classifier
    snapshot = {n: p.detach().clone() for n, p in original.named_parameters()}
    before = logits(model)
    delta = dt.attach(model, dt.LoRA(r=2, targets=["query"]), train_modules=["classifier"])
    assert isinstance(model.classifier, ModuleCopy) and model.classifier.base is original
    assert torch.equal(logits(model), before)  # the copy starts equal to the original
    assert not any(p.requires_grad for p in original.parameters())
    opt = torch.optim.SGD(delta.parameters().values(), lr=1.0)
    model.train()
    model(input_ids=batch(), labels=torch.tensor([0, 1, 1])).loss.backward()
    opt.step()
    model.eval()
    assert not torch.equal(model.classifier.copy.weight, snapshot["weight"])
    assert all(torch.equal(p, snapshot[n]) for n, p in original.named_parameters())
    delta.detach()
    assert model.classifier is original and torch.equal(logits(model), before)


def test_merge_writes_the_copy_and_unmerge_restores():
    model = tiny_bert()
    delta = dt.attach(model, dt.LoRA(r=2, targets=["query"]))
    with torch.no_grad():
        model.classifier.copy.weight.add_(0.5)
    tuned = logits(model)
    original = model.classifier.base.weight.detach().clone()
    delta.merge()
    assert torch.allclose(logits(model), tuned, atol=1e-6)
    assert torch.equal(model.classifier.base.weight, model.classifier.copy.weight)
    delta.unmerge()
    assert torch.equal(model.classifier.base.weight, original)


def test_checkpoint_keys_and_roundtrip(tmp_path):
    model = tiny_bert()
    delta = dt.attach(model, dt.LoRA(r=2, targets=["query"]))
    with torch.no_grad():
        model.classifier.copy.bias.fill_(0.3)
    delta.save(tmp_path / "ck")
    assert {"train:classifier.weight", "train:classifier.bias"} <= set(delta.state_dict())
    fresh = tiny_bert()
    loaded = dt.load(fresh, tmp_path / "ck")
    assert list(loaded.train_modules) == ["classifier"] and torch.equal(logits(fresh), logits(model))


def test_combine_applies_task_arithmetic_to_heads():
    model = tiny_bert()
    d1 = dt.attach(model, dt.LoRA(r=2, targets=["query"]), name="x")
    d2 = dt.attach(model, dt.LoRA(r=2, targets=["query"]), name="y")
    with torch.no_grad():
        d1.train_modules["classifier"].copy.weight.add_(1.0)
        d2.train_modules["classifier"].copy.weight.add_(-3.0)
    combined = dt.combine([d1, d2], weights=[0.5, 1.0])
    got = combined.train_modules["classifier"].copy.weight - model.classifier.base_layer().weight
    assert torch.allclose(got, torch.full_like(got, 0.5 * 1.0 + 1.0 * -3.0), atol=1e-6)


@pytest.mark.parametrize("modules", [["bert"], ["bert.embeddings", "classifier"]])
def test_model_code_can_reach_into_a_trained_block(modules):
    """get_input_embeddings reads bert.embeddings.word_embeddings: a ModuleCopy there must answer with
    the trained copy's submodule (found broken by the full-fine-tuning benchmark rows)."""
    model = tiny_bert()
    before, original = logits(model), model.get_input_embeddings()
    delta = dt.attach(model, dt.LoRA(r=2, targets=["query"]), train_modules=modules)
    embeddings = model.get_input_embeddings()
    assert embeddings is not original and embeddings.weight.requires_grad
    assert any(p is embeddings.weight for p in delta.parameters().values())
    assert torch.equal(logits(model), before)
    delta.detach()
    assert model.get_input_embeddings() is original


def test_wrappers_forward_attributes_to_the_module_they_wrap():
    model = tiny_bert()
    query = model.bert.encoder.layer[0].attention.self.query
    dt.attach(model, dt.LoRA(r=2, targets=["query"]))
    wrapped = model.bert.encoder.layer[0].attention.self.query
    assert wrapped is not query and wrapped.in_features == query.in_features and wrapped.weight is query.weight
    with pytest.raises(AttributeError, match="no_such_attribute"):
        wrapped.no_such_attribute
