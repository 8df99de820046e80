"""Trainable tokens: only the chosen rows train and are saved; a tied output layer follows them (GPT-2)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

import deltatune as dt
from deltatune.core.inject import named_base_parameters
from tests.conftest import BUILDERS, VOCAB, batch, logits, perturb

NEW = [VOCAB, VOCAB + 1, VOCAB + 2]  # three tokens added to the vocabulary


def resized(arch: str):
    model = BUILDERS[arch]()
    model.resize_token_embeddings(VOCAB + 3)
    return model


def with_new_tokens() -> torch.Tensor:
    ids = batch().clone()
    ids[:, 2], ids[:, 5], ids[1, 7] = NEW[0], NEW[1], NEW[2]
    return ids


def test_only_the_new_rows_train_and_the_checkpoint_holds_only_them(tmp_path):
    model = resized("llama")
    embedding = model.get_input_embeddings()
    before = embedding.weight.detach().clone()
    delta = dt.attach(model, dt.TrainableTokens(token_ids=NEW))
    assert delta.num_trainable() == 3 * 32
    ids = with_new_tokens()
    opt = torch.optim.Adam(delta.parameters().values(), lr=1e-2)
    for _ in range(3):
        opt.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
    old = torch.arange(VOCAB)
    assert torch.equal(model.get_input_embeddings()(old), before[:VOCAB])  # every other row as it was
    assert not torch.allclose(model.get_input_embeddings()(torch.tensor(NEW)), before[NEW])
    delta.save(tmp_path / "ck")
    saved = load_file(tmp_path / "ck" / "delta.safetensors")
    assert [tuple(t.shape) for t in saved.values()] == [(3, 32)]  # n x dim, not vocab x dim
    fresh = resized("llama")
    dt.load(fresh, tmp_path / "ck")
    assert torch.equal(logits(fresh, ids), logits(model, ids))


def test_merge_writes_the_rows_and_unmerge_puts_the_old_ones_back():
    model = resized("bert")
    weight = model.get_input_embeddings().weight
    original = weight.detach().clone()
    delta = dt.attach(model, dt.TrainableTokens(token_ids=NEW), train_modules=None)
    perturb(delta)
    tuned = logits(model, with_new_tokens())
    delta.merge()
    rows = next(iter(delta.parameters().values()))
    assert torch.equal(weight[NEW], rows) and torch.equal(weight[:VOCAB], original[:VOCAB])
    assert torch.allclose(logits(model, with_new_tokens()), tuned, atol=1e-6)
    delta.unmerge()
    assert torch.equal(weight, original)


def test_tied_output_layer_uses_the_same_rows():
    model = resized("gpt2")
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    ids = with_new_tokens()
    before = logits(model, ids)
    weights = {n: p.detach().clone() for n, p in named_base_parameters(model)}
    delta = dt.attach(model, dt.TrainableTokens(token_ids=NEW))
    assert torch.equal(logits(model, ids), before)  # bitwise at attach, input and output side
    assert delta.num_trainable() == 3 * 32  # the rows once, though two layers read them
    perturb(delta)
    rows = next(iter(delta.parameters().values())).detach()
    hidden = model(input_ids=ids, output_hidden_states=True).hidden_states[-1].detach()
    out = logits(model, ids)
    assert torch.allclose(out[..., NEW], hidden @ rows.T, atol=1e-5)  # the new tokens' logits use the rows
    with pytest.raises(dt.StateError, match="tied"):
        delta.merge()
    delta.detach()
    assert all(torch.equal(p, weights[n]) for n, p in named_base_parameters(model))
    assert torch.equal(logits(model, ids), before)


def test_refusals_are_clear():
    model = BUILDERS["llama"]()
    with pytest.raises(dt.TargetError, match="resize_token_embeddings"):
        dt.attach(model, dt.TrainableTokens(token_ids=[VOCAB + 5]))
    with pytest.raises(dt.ConfigError, match="token_ids is not set"):
        dt.attach(model, dt.TrainableTokens())
    with pytest.raises(dt.ConfigError, match="distinct"):
        dt.TrainableTokens(token_ids=[3, 3])
    assert not dt.deltas(model)
