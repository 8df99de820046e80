"""Finding transformer blocks, attention and feed-forward parts from the module tree alone."""

from __future__ import annotations

import pytest
from torch import nn

import deltatune as dt
from deltatune.core.structure import transformer_blocks
from tests.conftest import BUILDERS

EXPECTED = {  # block 0 of each tiny model, as a user would read it in print(model)
    "bert": dict(path="bert.encoder.layer.0", attention=("attention",),
                 attention_outputs=("attention.output.dense",), keys=("attention.self.key",),
                 values=("attention.self.value",), fused_qkv=(), ffn=("intermediate.dense", "output.dense")),
    "llama": dict(path="model.layers.0", attention=("self_attn",), attention_outputs=("self_attn.o_proj",),
                  keys=("self_attn.k_proj",), values=("self_attn.v_proj",), fused_qkv=(),
                  ffn=("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")),
    "gpt2": dict(path="transformer.h.0", attention=("attn",), attention_outputs=("attn.c_proj",), keys=(),
                 values=(), fused_qkv=("attn.c_attn",), ffn=("mlp.c_fc", "mlp.c_proj")),
}


def test_blocks_of_every_arch(arch):
    blocks = transformer_blocks(BUILDERS[arch]())
    assert len(blocks) == 2 and blocks[1].path.endswith(".1")
    block, want = blocks[0], EXPECTED[arch]
    prefix = want["path"] + "."
    assert block.path == want["path"]
    for field in ("attention", "attention_outputs", "keys", "values", "fused_qkv", "ffn"):
        assert tuple(p.removeprefix(prefix) for p in getattr(block, field)) == want[field], field
    assert block.ffn_input == prefix + want["ffn"][0] and block.ffn_output == prefix + want["ffn"][-1]


def test_wrapped_modules_are_seen_through():
    model = BUILDERS["llama"]()
    dt.attach(model, dt.LoRA(r=2, targets="all-linear"))
    block = transformer_blocks(model)[0]
    assert block.attention_outputs == ("model.layers.0.self_attn.o_proj",)
    assert block.ffn_output == "model.layers.0.mlp.down_proj"


def test_layers_filter_and_errors():
    assert [b.path for b in transformer_blocks(BUILDERS["bert"](), layers=[1])] == ["bert.encoder.layer.1"]
    with pytest.raises(dt.TargetError, match="layers"):
        transformer_blocks(BUILDERS["bert"](), layers=[7])
    with pytest.raises(dt.TargetError, match="no transformer blocks.*targets"):
        transformer_blocks(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4)), "adapter")


class _Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(8, 8) for _ in range(4))


class _Block(nn.Module):
    def __init__(self, ffn_out: int) -> None:
        super().__init__()
        self.attn = _Attention()
        self.up, self.down = nn.Linear(8, 16), nn.Linear(16, ffn_out)


def test_custom_model_and_ffn_that_does_not_return_to_hidden():
    model = nn.Sequential(nn.ModuleList([_Block(8), _Block(8)]))
    block = transformer_blocks(model)[0]
    assert block.keys == ("0.0.attn.k",) and block.values == ("0.0.attn.v",) and block.ffn_output == "0.0.down"
    odd = nn.Sequential(nn.ModuleList([_Block(4)]))
    with pytest.raises(dt.TargetError, match="hidden size 8.*explicit targets"):
        transformer_blocks(odd, "ia3")
