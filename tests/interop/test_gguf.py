"""dt.export_gguf: llama.cpp's LoRA adapter layout, read back with the gguf package's reader.

The numeric check rebuilds what llama.cpp computes from the file (W_gguf + alpha / rank * B A, rank from the
pair's lora_b) on the base weights in llama.cpp's row order, and compares it with the HF weight plus the delta,
put in that row order: it only holds when B's rows follow the converter's q/k permutation.
"""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

import deltatune as dt
from deltatune.core.errors import StateError
from tests.conftest import perturb, tiny_bert, tiny_gpt2, tiny_llama

HEADS, KV_HEADS = 4, 2  # tiny_llama


def field(reader: gguf.GGUFReader, key: str):
    f = reader.fields[key]
    value = f.parts[f.data[0]]
    return bytes(value).decode() if f.types[0] == gguf.GGUFValueType.STRING else value.tolist()[0]


def llama_cpp_rows(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    """The converter's row order, written as an index map (independent of the exporter's reshape): row
    h * d + 2 i + j of the GGUF tensor is row h * d + j * d / 2 + i of the HF one (d = head_dim)."""
    d = weight.shape[0] // n_head
    order = [h * d + j * (d // 2) + i for h in range(n_head) for i in range(d // 2) for j in range(2)]
    return weight[order]


def in_gguf_order(path: str, weight: torch.Tensor) -> torch.Tensor:
    """A weight of the module at ``path`` as llama.cpp's base GGUF holds it."""
    if path.endswith("q_proj"):
        return llama_cpp_rows(weight, HEADS)
    return llama_cpp_rows(weight, KV_HEADS) if path.endswith("k_proj") else weight


def applied_by_llama_cpp(reader: gguf.GGUFReader, name: str, base: torch.Tensor) -> torch.Tensor:
    tensors = {t.name: torch.from_numpy(np.array(t.data, dtype=np.float32)) for t in reader.tensors}
    a, b = tensors[f"{name}.lora_a"], tensors[f"{name}.lora_b"]
    return base + field(reader, "adapter.lora.alpha") / b.shape[1] * (b @ a)


def gguf_name(path: str) -> str:
    layer = path.split(".")[2]
    kind = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
            "down_proj": "ffn_down", "up_proj": "ffn_up", "gate_proj": "ffn_gate"}[path.rsplit(".", 1)[1]]
    return f"blk.{layer}.{kind}.weight"


def test_layout_names_shapes_metadata(tmp_path):
    model = tiny_llama()
    delta = dt.attach(model, dt.LoRA(r=4, alpha=8, targets=["q_proj", "k_proj", "v_proj", "down_proj"]))
    path = dt.export_gguf(delta, tmp_path / "adapter.gguf")
    assert path == tmp_path / "adapter.gguf"
    reader = gguf.GGUFReader(str(path))
    assert field(reader, "general.architecture") == "llama"
    assert field(reader, "general.type") == "adapter"
    assert field(reader, "adapter.type") == "lora"
    assert field(reader, "adapter.lora.alpha") == 8.0
    assert reader.fields["adapter.lora.alpha"].types == [gguf.GGUFValueType.FLOAT32]  # llama.cpp reads an f32
    shapes = {t.name: (tuple(int(n) for n in t.shape), t.tensor_type) for t in reader.tensors}
    assert len(shapes) == 2 * 4 * 2  # (a, b) x 4 targets x 2 layers
    f32 = gguf.GGMLQuantizationType.F32
    for layer in (0, 1):  # GGUF ne order: lora_a [in, r], lora_b [r, out]
        assert shapes[f"blk.{layer}.attn_q.weight.lora_a"] == ((32, 4), f32)
        assert shapes[f"blk.{layer}.attn_q.weight.lora_b"] == ((4, 32), f32)
        assert shapes[f"blk.{layer}.attn_k.weight.lora_b"] == ((4, 16), f32)  # 2 KV heads x head_dim 8
        assert shapes[f"blk.{layer}.ffn_down.weight.lora_a"] == ((64, 4), f32)
        assert shapes[f"blk.{layer}.ffn_down.weight.lora_b"] == ((4, 32), f32)


def test_f16_tensors(tmp_path):
    delta = dt.attach(tiny_llama(), dt.LoRA(r=4, targets=["q_proj"]))
    reader = gguf.GGUFReader(str(dt.export_gguf(delta, tmp_path / "a.gguf", dtype="f16")))
    assert {t.tensor_type for t in reader.tensors} == {gguf.GGMLQuantizationType.F16}
    assert field(reader, "general.file_type") == gguf.LlamaFileType.MOSTLY_F16


@pytest.mark.parametrize("config", [
    dict(r=4, alpha=8),
    dict(r=4, alpha=8, rslora=True, rank_pattern={"k_proj": 2}, alpha_pattern={"down_proj": 3.0}),
], ids=["plain", "rslora-patterns"])
def test_numeric_llama_cpp_applies_the_same_update(tmp_path, config):
    model = tiny_llama()
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"]
    delta = dt.attach(model, dt.LoRA(targets=targets, **config))
    perturb(delta, std=0.3)
    reader = gguf.GGUFReader(str(dt.export_gguf(delta, tmp_path / "a.gguf")))
    for path, wrapper in delta.attachments[0].wrappers().items():
        weight = wrapper.base_layer().weight.detach()
        got = applied_by_llama_cpp(reader, gguf_name(path), in_gguf_order(path, weight))
        expected = in_gguf_order(path, weight + wrapper.delta_weight().detach())
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)


def test_without_the_permutation_q_would_be_wrong(tmp_path):
    """The check above can fail: B's rows in HF order give another weight (the permutation is not trivial)."""
    delta = dt.attach(tiny_llama(), dt.LoRA(r=4, targets=["q_proj"]))
    perturb(delta, std=0.3)
    reader = gguf.GGUFReader(str(dt.export_gguf(delta, tmp_path / "a.gguf")))
    wrapper = delta.attachments[0].wrappers()["model.layers.0.self_attn.q_proj"]
    b_file = next(torch.from_numpy(np.array(t.data)) for t in reader.tensors if t.name == "blk.0.attn_q.weight.lora_b")
    assert torch.equal(b_file, llama_cpp_rows(wrapper.lora_B.detach(), HEADS))
    assert not torch.allclose(b_file, wrapper.lora_B.detach())


def test_pissa_is_written_against_the_original_weight(tmp_path):
    model = tiny_llama()
    original = model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    delta = dt.attach(model, dt.LoRA(r=2, alpha=4, init="pissa", targets=["q_proj"]))
    perturb(delta, std=0.2)
    reader = gguf.GGUFReader(str(dt.export_gguf(delta, tmp_path / "a.gguf")))
    wrapper = delta.attachments[0].wrappers()["model.layers.0.self_attn.q_proj"]
    effective = wrapper.base_layer().weight.detach() + wrapper.delta_weight().detach()  # residual W + s B A
    got = applied_by_llama_cpp(reader, "blk.0.attn_q.weight", llama_cpp_rows(original, HEADS))
    torch.testing.assert_close(got, llama_cpp_rows(effective, HEADS), atol=1e-5, rtol=0)


def test_conformance_layout_on_default_llama(tmp_path):
    """The shape of the check in the serving contract: 2 layers x (q, v) pairs, rank 4 visible."""
    model = LlamaForCausalLM(LlamaConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                         num_key_value_heads=2, intermediate_size=64)).eval()
    delta = dt.attach(model, dt.LoRA(r=4, alpha=8, targets=["q_proj", "v_proj"]))
    names = [t.name for t in gguf.GGUFReader(str(dt.export_gguf(delta, tmp_path / "a.gguf"))).tensors]
    assert sorted(n for n in names if n.endswith(".lora_a")) == [
        "blk.0.attn_q.weight.lora_a", "blk.0.attn_v.weight.lora_a",
        "blk.1.attn_q.weight.lora_a", "blk.1.attn_v.weight.lora_a"]


@pytest.mark.parametrize("make, message", [
    (lambda: dt.attach(tiny_llama(), dt.LoRA(r=4, targets=["q_proj"], dora=True)), "DoRA"),
    (lambda: dt.attach(tiny_llama(), dt.IA3(targets=["k_proj", "v_proj", "down_proj"])), r"one LoRA.*\['ia3'\]"),
    (lambda: dt.attach(tiny_llama(), dt.LoRA(r=4, targets=["q_proj"]), train_modules=["lm_head"]),
     "trains whole modules"),
    (lambda: dt.attach(tiny_llama(), dt.LoRA(r=4, targets=["embed_tokens"])), "nn.Linear"),
    (lambda: dt.attach(tiny_gpt2(), dt.LoRA(r=4, targets=["c_attn"])), r"\['llama', 'mistral', 'qwen2'\].*'gpt2'"),
    (lambda: dt.attach(tiny_bert(), dt.LoRA(r=4, targets=["query"])), "'bert'"),
], ids=["dora", "ia3", "train-modules", "embedding", "gpt2", "bert"])
def test_refuses_what_a_gguf_lora_cannot_hold(tmp_path, make, message):
    with pytest.raises(StateError, match=message):
        dt.export_gguf(make(), tmp_path / "a.gguf")
    assert list(tmp_path.iterdir()) == []  # nothing written, no temp file left


def test_refuses_lora_on_a_tied_lm_head(tmp_path):
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                         intermediate_size=64, tie_word_embeddings=True)).eval()
    delta = dt.attach(model, dt.LoRA(r=4, targets=["lm_head"]))
    with pytest.raises(StateError, match="tie_word_embeddings"):
        dt.export_gguf(delta, tmp_path / "a.gguf")


def test_write_is_atomic_and_refuses_a_directory(tmp_path):
    delta = dt.attach(tiny_llama(), dt.LoRA(r=4, targets=["q_proj"]))
    target = tmp_path / "a.gguf"
    target.write_bytes(b"previous")
    with pytest.raises(StateError, match="dtype"):
        dt.export_gguf(delta, target, dtype="q4")
    assert target.read_bytes() == b"previous"
    dt.export_gguf(delta, target)
    assert target.read_bytes()[:4] == b"GGUF"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.gguf"]
    with pytest.raises(StateError, match="is a directory"):
        dt.export_gguf(delta, tmp_path)


def test_qwen2_names_without_permutation(tmp_path):
    """Qwen2's converter does not reorder q/k rows: B is written as it is, under llama.cpp's qwen2 names."""
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                         num_key_value_heads=2, intermediate_size=64)).eval()
    delta = dt.attach(model, dt.LoRA(r=4, targets=["q_proj", "k_proj"]))
    perturb(delta, std=0.3)
    reader = gguf.GGUFReader(str(dt.export_gguf(delta, tmp_path / "a.gguf")))
    assert field(reader, "general.architecture") == "qwen2"
    tensors = {t.name: torch.from_numpy(np.array(t.data)) for t in reader.tensors}
    assert torch.equal(tensors["blk.0.attn_q.weight.lora_b"], model.model.layers[0].self_attn.q_proj.lora_B.detach())
    assert torch.equal(tensors["blk.0.attn_k.weight.lora_a"], model.model.layers[0].self_attn.k_proj.lora_A.detach())
