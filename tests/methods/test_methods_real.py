"""Adapters + IA3 + BitFit + DoRA together on the real MiniLM: one delta, identity, training, save/load."""

from __future__ import annotations

import pytest
import torch

import deltatune as dt
from tests.conftest import minilm_path

pytestmark = pytest.mark.slow


def test_minilm_adapter_ia3_bitfit_dora_in_one_delta(tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = minilm_path()
    tok = AutoTokenizer.from_pretrained(path)

    def build():
        torch.manual_seed(0)
        return AutoModelForSequenceClassification.from_pretrained(path, num_labels=2).eval()

    texts = ["a gripping, beautifully shot film", "dull and far too long", "i loved every minute of it",
             "the plot makes no sense at all", "warm, funny and smart", "a tedious mess"]
    enc = tok(texts, padding=True, return_tensors="pt")
    labels = torch.tensor([1, 0, 1, 0, 1, 0])
    model = build()
    with torch.no_grad():
        base = model(**enc).logits
        base_hidden = model.bert(**enc).last_hidden_state
    configs = [dt.Adapter(kind="houlsby", bottleneck=16), dt.IA3(), dt.BitFit(which="norm"),
               dt.LoRA(r=4, alpha=8, targets=["query", "value"], dora=True)]
    delta = dt.attach(model, *configs, train_modules=["classifier"])
    # 12 adapters (384->16->384), IA3 on key/value/output.dense, 13 LayerNorm biases, DoRA on 12 projections
    adapters = 12 * (384 * 16 + 16 + 16 * 384 + 384)
    ia3 = 6 * (384 + 384 + 1536)
    dora = 12 * (4 * 384 + 384 * 4 + 384)
    assert delta.num_trainable() == adapters + ia3 + 13 * 384 + dora + 384 * 2 + 2
    value = model.bert.encoder.layer[0].attention.self.value  # DoRA over IA3 over the original Linear
    assert type(value).__name__ == "DoRALinear" and type(value.base).__name__ == "IA3Linear"
    with torch.no_grad():
        assert torch.allclose(model(**enc).logits, base, atol=1e-5)
    opt = torch.optim.AdamW(delta.parameters().values(), lr=5e-3)
    losses = []
    for _ in range(4):
        opt.zero_grad()
        loss = model(**enc, labels=labels).loss
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses
    with torch.no_grad():
        tuned = model(**enc).logits
    assert "adapter wraps Linear(384x384)" in dt.inspect(model) and "bitfit trains existing" in dt.inspect(model)
    with pytest.raises(dt.StateError, match="adapter"):
        delta.merge()
    delta.save(tmp_path / "ck")
    fresh = build()
    dt.load(fresh, tmp_path / "ck")
    with torch.no_grad():
        assert torch.equal(fresh(**enc).logits, tuned)
    delta.detach()  # the encoder is the original again (the classifier was trained in place, as asked)
    with torch.no_grad():
        assert torch.equal(model.bert(**enc).last_hidden_state, base_hidden)
