"""Adapters and IA3 find their places in blocks with fused projections (Phi-3 ``qkv_proj`` / ``gate_up_proj``) and
in mixture-of-experts blocks (the MoE module stands for the FFN; IA3 scales each expert's down projection)."""

from __future__ import annotations

import pytest
import torch

import deltatune as dt
from deltatune.core.structure import transformer_blocks
from deltatune.methods.ia3 import IA3Experts
from tests.arch.models import ARCHS, inputs


def logits(model, arch):
    with torch.no_grad():
        return model(input_ids=inputs(arch)["input_ids"]).logits


def test_phi3_blocks_name_the_output_projection_and_the_fused_qkv():
    block = transformer_blocks(ARCHS["phi3"].build())[0]
    assert block.attention_outputs == ("model.layers.0.self_attn.o_proj",)  # registered before qkv_proj
    assert block.fused_qkv == ("model.layers.0.self_attn.qkv_proj",)
    assert (block.ffn_input, block.ffn_output) == ("model.layers.0.mlp.gate_up_proj", "model.layers.0.mlp.down_proj")


@pytest.mark.parametrize("arch", ["mixtral", "qwen3-moe"])
def test_moe_blocks_record_the_moe_module_and_its_experts(arch):
    block = transformer_blocks(ARCHS[arch].build())[1]
    assert (block.moe, block.experts) == ("model.layers.1.mlp", "model.layers.1.mlp.experts") and not block.ffn


@pytest.mark.parametrize(("arch", "config", "where"), [
    ("phi3", dt.IA3(), {"self_attn.qkv_proj", "mlp.down_proj"}),
    ("phi3", dt.Adapter(bottleneck=8), {"self_attn.o_proj", "mlp.down_proj"}),
    ("phi3", dt.Adapter(kind="parallel", bottleneck=8), {"mlp.down_proj"}),
    ("mixtral", dt.IA3(), {"self_attn.k_proj", "self_attn.v_proj", "mlp.experts"}),
    ("mixtral", dt.Adapter(bottleneck=8), {"self_attn.o_proj", "mlp"}),
    ("qwen3-moe", dt.Adapter(kind="parallel", bottleneck=8), {"mlp"}),
])
def test_placement(arch, config, where):
    model = ARCHS[arch].build()
    before = logits(model, arch)
    delta = dt.attach(model, config, train_modules=None)
    assert {p.split(".", 3)[3] for a in delta.attachments for p in a.modules} == where
    assert torch.equal(logits(model, arch), before)
    loss = model(**inputs(arch)).loss
    loss.backward()
    assert all(p.grad is not None for p in delta.parameters().values())


@pytest.mark.parametrize("arch", ["mixtral", "qwen3-moe"])
def test_ia3_on_experts_scales_each_experts_down_projection_and_merges(arch, tmp_path):
    model = ARCHS[arch].build()
    delta = dt.attach(model, dt.IA3(), train_modules=None)
    scaler = next(w for w in delta.wrappers() if isinstance(w, IA3Experts))
    bank = scaler.base_layer()
    assert scaler.l.shape == (bank.down_proj.shape[0], bank.down_proj.shape[2])
    original = bank.down_proj.detach().clone()
    with torch.no_grad():
        for p in delta.parameters().values():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(3)) * 0.2)
    tuned = logits(model, arch)
    delta.merge()
    assert torch.allclose(bank.down_proj, original * scaler.l.detach().unsqueeze(1))
    assert torch.allclose(logits(model, arch), tuned, atol=1e-5)
    delta.unmerge()
    assert torch.allclose(bank.down_proj, original, atol=1e-6)
    delta.save(tmp_path / "ck")
    fresh = ARCHS[arch].build()
    dt.load(fresh, tmp_path / "ck")
    assert torch.equal(logits(fresh, arch), tuned)
