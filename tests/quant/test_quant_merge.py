"""Merging on a quantized base: refused in place; dequantize + exact merge to a standalone model; requantize
with a measured error; checkpoints across quantized / full-precision bases; PEFT both ways."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from transformers import AutoModelForCausalLM

import deltatune as dt
from deltatune.core import quant
from deltatune.core.inject import named_base_modules
from tests.quant.conftest import logits, require


def exact(model: torch.nn.Module) -> torch.Tensor:
    """Logits through the quantized layers' exact path: in training mode bitsandbytes neither repacks 4-bit
    weights for its bf16 CPU kernel nor quantizes int8 activations (the tiny Llama has no dropout)."""
    model.train()
    try:
        return logits(model)
    finally:
        model.eval()


def randomize(delta, seed: int = 3, std: float = 0.05) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in delta.parameters().values():
            p.add_(torch.randn(p.shape, generator=g) * std)


def test_merge_refuses_and_names_the_way_out(loader, scheme):
    model = loader(scheme)
    delta = dt.attach(model, dt.LoRA(r=4, targets="all-linear"))
    randomize(delta)
    tuned = logits(model)
    with pytest.raises(dt.StateError, match="merge_and_save") as err:
        delta.merge()
    assert "dtype=" in str(err.value) and "requantize=True" in str(err.value)
    assert not delta.is_merged and torch.equal(logits(model), tuned)


def test_dequantized_merge_is_the_exact_formula(loader, scheme, tmp_path):
    model = loader(scheme)
    delta = dt.attach(model, dt.LoRA(r=4, alpha=8, targets="all-linear"))
    randomize(delta)
    out = dt.merge_and_save(delta, tmp_path / "merged", dtype="float32")
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config
    plain = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert all(p.is_floating_point() for p in plain.parameters())
    merged = dict(plain.named_modules())
    for path, wrapper in delta.attachments[0].wrappers().items():
        expected = quant.dequantized_weight(wrapper.base_layer(), torch.float32) + wrapper.delta_weight()
        assert torch.allclose(merged[path].weight, expected, atol=1e-6), path
    assert torch.allclose(exact(plain), exact(model), atol=1e-4, rtol=0)
    assert not delta.is_merged and torch.equal(logits(model), logits(model))


OTHER_METHODS = {
    "dora": lambda: dt.LoRA(r=4, targets="all-linear", dora=True),
    "ia3": lambda: dt.IA3(),
    "lora+ia3": lambda: [dt.LoRA(r=4, targets=["q_proj"]), dt.IA3()],
    "vera": lambda: dt.VeRA(r=16),
    "loha": lambda: dt.LoHa(r=4),
    "lokr": lambda: dt.LoKr(r=4),
    "oft": lambda: dt.OFT(block_size=16),
    "sparse": lambda: dt.SparseFT(density=0.1),
}


def attach_other(model: torch.nn.Module, method: str):
    made = OTHER_METHODS[method]()
    delta = dt.attach(model, *(made if isinstance(made, list) else [made]))
    randomize(delta, std=0.05)
    return delta


@pytest.mark.parametrize("method", sorted(OTHER_METHODS))
def test_dequantized_merge_of_other_methods_matches_the_quantized_model(loader, method, tmp_path):
    model = loader("nf4")
    delta = attach_other(model, method)
    with pytest.raises(dt.StateError, match="merge_and_save"):
        delta.merge()  # every method refuses to merge into 4-bit weights, as LoRA does
    out = dt.merge_and_save(delta, tmp_path / "merged", dtype="float32")
    plain = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert torch.allclose(exact(plain), exact(model), atol=1e-4, rtol=0)


@pytest.mark.parametrize("method", ["vera", "loha", "oft", "sparse"])
@pytest.mark.parametrize("scheme", ["int8", "torchao-int8"])
def test_dequantized_merge_on_8_bit_bases(loader, scheme, method, tmp_path):
    """The same for 8-bit bases, within the error of int8 activations in bitsandbytes' eval path."""
    model = loader(scheme)
    delta = attach_other(model, method)
    with pytest.raises(dt.StateError, match="merge_and_save"):
        delta.merge()
    out = dt.merge_and_save(delta, tmp_path / "merged", dtype="float32")
    plain = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert torch.allclose(exact(plain), exact(model), atol=1e-4, rtol=0)


def test_bfloat16_merge_writes_bfloat16(loader, tmp_path):
    model = loader("nf4")
    delta = dt.attach(model, dt.LoRA(r=4, targets="all-linear"))
    randomize(delta)
    out = dt.merge_and_save(delta, tmp_path / "merged16", dtype="bfloat16")
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    plain = AutoModelForCausalLM.from_pretrained(out)
    assert {p.dtype for p in plain.parameters()} == {torch.bfloat16}
    reference = exact(model)
    err = (exact(plain.float()) - reference).abs().max().item()
    assert err < 0.02 * reference.abs().max().item()  # bf16 weights: close, not exact


def test_full_precision_base_merges_to_another_dtype(loader, tmp_path):
    model = loader(None)
    delta = dt.attach(model, dt.LoRA(r=4, targets="all-linear"))
    randomize(delta)
    tuned = logits(model)
    out = dt.merge_and_save(delta, tmp_path / "m", dtype="float32")
    assert torch.allclose(logits(AutoModelForCausalLM.from_pretrained(out).eval()), tuned, atol=1e-5)
    with pytest.raises(dt.ConfigError, match="bfloat16"):
        dt.merge_and_save(delta, tmp_path / "bad", dtype="int8")


def test_requantized_merge_reports_how_much_of_the_delta_rounding_lost(loader, tmp_path):
    model = loader("nf4")
    delta = dt.attach(model, dt.LoRA(r=4, targets="all-linear"))
    randomize(delta, std=0.002)  # a small update, as LoRA's usually are
    out = dt.merge_and_save(delta, tmp_path / "small", requantize=True)
    small = json.loads((out / "requantize_report.json").read_text())
    again = AutoModelForCausalLM.from_pretrained(out, device_map="cpu")
    assert any(quant.kind(m) == "bnb4" for _, m in named_base_modules(again))
    randomize(delta, seed=4, std=0.2)  # a large one
    large = json.loads((dt.merge_and_save(delta, tmp_path / "large", requantize=True)
                        / "requantize_report.json").read_text())
    assert small["delta_lost_mean"] > 0.5  # rounding to 4 bits erases most of a small delta: why merge refuses
    assert large["delta_lost_mean"] < small["delta_lost_mean"]
    assert set(small["layers"]) == {p for p, m in named_base_modules(model) if quant.is_quantized(m)}


def test_checkpoint_records_quantization_and_loads_across_precisions(loader, tmp_path, caplog):
    quantized = loader("nf4")
    delta = dt.attach(quantized, dt.LoRA(r=4, targets="all-linear"))
    randomize(delta)
    delta.save(tmp_path / "q")
    meta = json.loads((tmp_path / "q" / "delta_config.json").read_text())
    assert meta["base_quantization"]["bnb_4bit_quant_type"] == "nf4"
    plain = loader(None)
    with caplog.at_level(logging.INFO, logger="deltatune.core.quant"):
        loaded = dt.load(plain, tmp_path / "q")  # same full-precision shapes: fits, with a note
    assert "trained on a nf4 base, onto a full-precision base" in caplog.text
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in delta.state_dict().items())
    loaded.save(tmp_path / "fp")
    again = dt.load(loader("int8"), tmp_path / "fp")  # trained on nf4, through full precision, onto int8
    assert all(torch.equal(again.state_dict()[k], v) for k, v in delta.state_dict().items())


def test_peft_export_and_import_on_a_quantized_base(loader, tmp_path):
    require("peft")
    from peft import LoraConfig, PeftModel, get_peft_model

    model = loader("nf4")
    delta = dt.attach(model, dt.LoRA(r=4, alpha=8, targets="all-linear"))
    randomize(delta)
    tuned = logits(model)
    dt.export_peft(delta, tmp_path / "to_peft")
    assert torch.allclose(logits(PeftModel.from_pretrained(loader("nf4"), tmp_path / "to_peft")), tuned, atol=1e-5)

    peft_model = get_peft_model(loader("nf4"), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    randomize_peft(peft_model)
    theirs = logits(peft_model.eval())
    peft_model.save_pretrained(tmp_path / "from_peft")
    fresh = loader("nf4")
    dt.import_peft(fresh, tmp_path / "from_peft")
    assert torch.allclose(logits(fresh), theirs, atol=1e-5)


def randomize_peft(model, std: float = 0.05) -> None:
    g = torch.Generator().manual_seed(9)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:  # PEFT's own naming, in a test of PEFT interop
                p.add_(torch.randn(p.shape, generator=g) * std)
