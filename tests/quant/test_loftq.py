"""``dt.LoRA(init="loftq")``: on a 4-bit base the factors start at the quantization error's top-r SVD, so the
quantized model + delta starts closer to the full-precision model than the plain init; refused where it cannot
work (a full-precision layer, DoRA, a checkpoint without full-precision weights)."""

from __future__ import annotations

import pytest
import torch

import deltatune as dt
from deltatune.core import quant
from deltatune.core.inject import DeltaModule
from tests.quant.conftest import logits


def test_loftq_starts_closer_to_full_precision(loader):
    reference = logits(loader(None))
    plain = loader("nf4")
    dt.attach(plain, dt.LoRA(r=8, targets="all-linear"))
    loftq = loader("nf4")
    delta = dt.attach(loftq, dt.LoRA(r=8, targets="all-linear", init="loftq"))
    gap_plain = (logits(plain) - reference).norm()
    gap_loftq = (logits(loftq) - reference).norm()
    assert gap_loftq < 0.8 * gap_plain, (gap_loftq, gap_plain)
    for wrapper in delta.wrappers():  # per layer: W_dq + s B A is the W_dq + top-r part of W - W_dq
        w_dq = quant.dequantized_weight(wrapper.base_layer(), torch.float32)
        error = torch.linalg.svd(w_dq + wrapper.delta_weight() - w_dq, full_matrices=False).S
        assert int((error > 1e-5 * error[0]).sum()) <= wrapper.r
    assert all(p.requires_grad for p in delta.parameters().values())


def test_loftq_refusals(loader, tmp_path):
    with pytest.raises(dt.AttachError, match="not quantized"):
        dt.attach(loader(None), dt.LoRA(r=4, targets="all-linear", init="loftq"))
    with pytest.raises(dt.ConfigError, match="dora"):
        dt.LoRA(init="loftq", dora=True)
    model = loader("nf4")
    model.save_pretrained(tmp_path / "prequantized")  # a checkpoint that holds only packed 4-bit weights
    from transformers import AutoModelForCausalLM

    again = AutoModelForCausalLM.from_pretrained(tmp_path / "prequantized", device_map="cpu")
    with pytest.raises(dt.AttachError, match="stored quantized"):
        dt.attach(again, dt.LoRA(r=4, targets="all-linear", init="loftq"))
    assert not any(isinstance(m, DeltaModule) for m in again.modules())  # the failed attach left nothing behind
