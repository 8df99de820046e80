"""dt.export_vllm / dt.check_vllm: vLLM's LoRA loader rules (interop/vllm.py), and the PEFT directory written."""

from __future__ import annotations

import json

import pytest
import torch

import deltatune as dt
from deltatune.core.errors import StateError
from tests.conftest import logits, perturb, tiny_bert, tiny_gpt2, tiny_llama

peft = pytest.importorskip("peft")


@pytest.mark.parametrize("config", [
    dt.LoRA(r=4, alpha=8, targets=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
    dt.LoRA(r=4, alpha=8, rslora=True, targets=["q_proj", "v_proj"]),
    dt.LoRA(r=2, alpha=4, init="pissa", targets=["q_proj", "v_proj"]),
], ids=["all-linear", "rslora", "pissa"])
def test_writes_a_peft_lora_vllm_accepts(tmp_path, config):
    model = tiny_llama()
    delta = dt.attach(model, config)
    perturb(delta, std=0.05)
    assert dt.check_vllm(delta) == []
    out = dt.export_vllm(delta, tmp_path / "v")
    cfg = json.loads((out / "adapter_config.json").read_text())
    # the fields vLLM's PEFTHelper reads: one r / lora_alpha (scale alpha / r or / sqrt r), no modules_to_save, no DoRA
    assert cfg["peft_type"] == "LORA" and not cfg["modules_to_save"] and cfg["use_dora"] is False
    assert cfg["use_rslora"] == config.rslora
    scale = cfg["lora_alpha"] / (cfg["r"] ** 0.5 if cfg["use_rslora"] else cfg["r"])
    assert all(w.scale == pytest.approx(scale) for w in delta.wrappers())
    keys = peft.utils.load_peft_weights(str(out)).keys()
    assert keys and all(k.endswith(("lora_A.weight", "lora_B.weight")) for k in keys)  # vLLM's only accepted names
    loaded = peft.PeftModel.from_pretrained(tiny_llama(), out).eval()
    assert torch.allclose(logits(loaded), logits(model), atol=1e-5)


@pytest.mark.parametrize("make, needles", [
    (lambda: dt.attach(tiny_bert(), dt.LoRA(r=4, targets=["query"]), train_modules=["classifier"]),
     ["modules_to_save", "['classifier']"]),
    (lambda: dt.attach(tiny_llama(), dt.LoRA(r=4, targets=["q_proj"], dora=True)), ["DoRA"]),
    (lambda: dt.attach(tiny_llama(), dt.VeRA(r=4, targets=["q_proj"])), ["['vera']", "lora_A / lora_B"]),
    (lambda: dt.attach(tiny_gpt2(), [dt.LoRA(r=4, targets=["c_attn"]), dt.BitFit()]), ["['bitfit']", "biases"]),
    (lambda: dt.attach(tiny_llama(), dt.LoRA(r=4, targets=["embed_tokens", "q_proj"])), ["embed_tokens", "LM head"]),
    (lambda: dt.attach(tiny_llama(), dt.LoRA(r=4, targets=["lm_head", "q_proj"])), ["lm_head"]),
    (lambda: dt.attach(tiny_llama(), dt.LoRA(r=4, targets=["q_proj", "v_proj"], rank_pattern={"v_proj": 2})),
     ["v_proj", "one lora_alpha / r"]),
], ids=["modules-to-save", "dora", "vera", "bitfit", "embedding", "lm-head", "rank-pattern"])
def test_refuses_what_vllm_cannot_load(tmp_path, make, needles):
    delta = make()
    problems = dt.check_vllm(delta)
    assert len(problems) == 1
    with pytest.raises(StateError) as error:
        dt.export_vllm(delta, tmp_path / "v")
    for needle in needles:
        assert needle in str(error.value)
    assert not (tmp_path / "v").exists()


def test_every_problem_is_listed_at_once(tmp_path):
    model = tiny_bert()
    delta = dt.attach(model, dt.LoRA(r=4, targets=["query"], dora=True), train_modules=["classifier"])
    problems = dt.check_vllm(delta)
    assert len(problems) == 2 and "modules_to_save" in problems[0] and "DoRA" in problems[1]
    with pytest.raises(StateError, match=r"\(1\) .*modules_to_save.*\(2\) .*DoRA"):
        dt.export_vllm(delta, tmp_path / "v")
