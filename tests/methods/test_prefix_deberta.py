"""Prefix tuning on DeBERTa-v2's disentangled attention (methods/prefix_deberta.py): prefix slots get content
scores only, the real tokens keep DeBERTa's c2p / p2c terms exactly."""

from __future__ import annotations

import torch

import deltatune as dt
from deltatune.methods.prefix import DisentangledPrefix
from tests.arch.models import ARCHS, inputs


def logits(model, **kwargs):
    with torch.no_grad():
        return model(input_ids=inputs("deberta-v2")["input_ids"], **kwargs).logits


def _attached():
    model = ARCHS["deberta-v2"].build()
    base = logits(model)
    delta = dt.attach(model, dt.PrefixTuning(num_tokens=3), train_modules=None, name="p")
    with torch.no_grad():
        for p in delta.parameters().values():
            p.mul_(20)  # prefixes strong enough to move a random model's logits
    return model, delta, base


def test_every_self_attention_is_wrapped_and_changes_outputs():
    model, delta, base = _attached()
    wrapped = [p for p, m in delta.attachments[0].modules.items() if isinstance(m, DisentangledPrefix)]
    assert wrapped == [f"deberta.encoder.layer.{i}.attention.self" for i in range(2)]
    assert not torch.allclose(logits(model), base, atol=1e-4)


def test_hidden_prefix_slots_give_deberta_exactly():
    """With every slot masked out (a sample routed elsewhere) the re-stated attention is DeBERTa's own."""
    model, delta, base = _attached()
    tuned = logits(model)
    with dt.route(model, ["p", None, "p"]):
        mixed = logits(model)
    assert torch.allclose(mixed[1], base[1], atol=1e-6)
    assert torch.allclose(mixed[0], tuned[0], atol=1e-6) and torch.allclose(mixed[2], tuned[2], atol=1e-6)
    delta.set_active(False)
    assert torch.equal(logits(model), base)


def test_padding_stays_masked_and_prefix_slots_are_seen_by_every_token():
    model, _, _ = _attached()
    ids = inputs("deberta-v2")["input_ids"]
    mask = torch.ones_like(ids)
    mask[:, -3:] = 0
    with torch.no_grad():
        padded = model(input_ids=ids, attention_mask=mask, output_attentions=True)
        other = ids.clone()
        other[:, -3:] = 7  # what padding holds must not matter
        repadded = model(input_ids=other, attention_mask=mask).logits
    assert torch.allclose(padded.logits, repadded, atol=1e-6)
    probs = padded.attentions[0]  # (batch, heads, queries, 3 prefix slots + keys)
    assert probs.shape[-1] == 3 + ids.shape[1]
    assert (probs[..., :3].sum(-1) > 0).all() and torch.allclose(probs.sum(-1), torch.ones(()))


def test_detach_restores_the_attention_modules():
    model = ARCHS["deberta-v2"].build()
    before = {n: m for n, m in model.named_modules()}
    dt.attach(model, dt.PrefixTuning(num_tokens=2), train_modules=None)
    dt.detach(model)
    assert {n: m for n, m in model.named_modules()} == before
