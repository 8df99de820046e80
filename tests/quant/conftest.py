"""Tiny random Llama saved once per session and loaded quantized (bitsandbytes nf4, fp4 + double quant, int8;
torchao weight-only int8).

bitsandbytes and torchao are optional dependencies: without them these tests skip, except under CI (``CI=true``), where
a missing backend is a failed install and fails loudly.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

VOCAB = 100


def require(module: str) -> None:
    """Skip when ``module`` is not installed, but fail under CI (where it must be)."""
    if importlib.util.find_spec(module) is None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{module} is not installed under CI: install it with the test extra (see .ci/run)")
        pytest.skip(f"{module} not installed")


@pytest.fixture(scope="session")
def base_dir(tmp_path_factory) -> Path:
    """A tiny Llama (hidden 64 so that 4-bit blocks of 64 fit, grouped KV heads, untied) on disk."""
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=128, max_position_embeddings=128,
                      pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        model.lm_head.weight.mul_(10)  # an untrained head caps the loss: let training show
    path = tmp_path_factory.mktemp("quant") / "base"
    model.save_pretrained(path)
    return path


SCHEMES = {
    "nf4": {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_compute_dtype": torch.float32},
    "fp4-dq": {"load_in_4bit": True, "bnb_4bit_quant_type": "fp4", "bnb_4bit_use_double_quant": True,
               "bnb_4bit_compute_dtype": torch.float32},
    "int8": {"load_in_8bit": True},
    "torchao-int8": "Int8WeightOnlyConfig",  # torchao weight-only int8 (transformers' TorchAoConfig)
}


def load(path: Path, scheme: str | None) -> torch.nn.Module:
    """The saved tiny Llama, quantized with ``scheme`` (None: full precision), in eval mode."""
    if scheme is None:
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    if scheme.startswith("torchao"):
        require("torchao")
        import torchao.quantization
        from transformers import TorchAoConfig

        config = TorchAoConfig(getattr(torchao.quantization, SCHEMES[scheme])())
    else:
        require("bitsandbytes")
        from transformers import BitsAndBytesConfig

        config = BitsAndBytesConfig(**SCHEMES[scheme])
    return AutoModelForCausalLM.from_pretrained(path, quantization_config=config, device_map="cpu").eval()


@pytest.fixture(params=sorted(SCHEMES))
def scheme(request) -> str:
    return request.param


@pytest.fixture
def loader(base_dir) -> Callable[[str | None], torch.nn.Module]:
    return lambda scheme: load(base_dir, scheme)


def ids(seed: int = 1, size: int = 2, length: int = 10) -> torch.Tensor:
    return torch.randint(3, VOCAB, (size, length), generator=torch.Generator().manual_seed(seed))


def logits(model: torch.nn.Module, x: torch.Tensor | None = None) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids() if x is None else x).logits
