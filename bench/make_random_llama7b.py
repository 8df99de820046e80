"""A random Llama of the Llama-2-7B shape written shard by shard, for the 7B-class headline in bench/quant.py.

hidden 4096, 32 layers, 32 heads (no grouped KV), intermediate 11008, vocab 32000, untied output layer:
6.74B parameters, 13.5 GB in bfloat16. The full model never exists in memory: each decoder layer (and the
embedding, the final norm and the output layer) is drawn, written as its own safetensors shard and dropped,
so making it peaks at about one layer (~0.4 GB) plus the runtime. ``model.safetensors.index.json`` maps every
tensor to its shard, as transformers' sharded checkpoints do, so ``from_pretrained`` loads it as usual.
The tokenizer is bench/make_random_llama.py's word-level one (ids far below the vocabulary size).

    python bench/make_random_llama7b.py /work/models/llama7b-random
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
from make_random_llama import make_tokenizer  # bench/ is on sys.path when run as a script
from safetensors.torch import save_file
from transformers import LlamaConfig

CONFIG = {"vocab_size": 32000, "hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32,
          "num_key_value_heads": 32, "intermediate_size": 11008, "max_position_embeddings": 4096,
          "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "pad_token_id": 0, "bos_token_id": 2,
          "eos_token_id": 3}


def layer_shapes(cfg: LlamaConfig, index: int) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes of decoder layer ``index`` (Llama: no biases)."""
    h, i = cfg.hidden_size, cfg.intermediate_size
    kv = cfg.num_key_value_heads * (h // cfg.num_attention_heads)
    prefix = f"model.layers.{index}."
    return {prefix + "self_attn.q_proj.weight": (h, h), prefix + "self_attn.k_proj.weight": (kv, h),
            prefix + "self_attn.v_proj.weight": (kv, h), prefix + "self_attn.o_proj.weight": (h, h),
            prefix + "mlp.gate_proj.weight": (i, h), prefix + "mlp.up_proj.weight": (i, h),
            prefix + "mlp.down_proj.weight": (h, i),
            prefix + "input_layernorm.weight": (h,), prefix + "post_attention_layernorm.weight": (h,)}


def shards(cfg: LlamaConfig) -> list[tuple[str, dict[str, tuple[int, ...]]]]:
    """(file name, {tensor: shape}) per shard: the embedding, one per decoder layer, then norm + output layer."""
    n = cfg.num_hidden_layers + 2
    name = "model-{:05d}-of-{:05d}.safetensors".format
    plan = [(name(1, n), {"model.embed_tokens.weight": (cfg.vocab_size, cfg.hidden_size)})]
    plan += [(name(k + 2, n), layer_shapes(cfg, k)) for k in range(cfg.num_hidden_layers)]
    plan.append((name(n, n), {"model.norm.weight": (cfg.hidden_size,),
                              "lm_head.weight": (cfg.vocab_size, cfg.hidden_size)}))
    return plan


def draw(name: str, shape: tuple[int, ...], generator: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
    """Norm weights 1, everything else N(0, 0.02) (Llama's initializer_range), drawn in float32, stored in ``dtype``."""
    if name.endswith("norm.weight"):
        return torch.ones(shape, dtype=dtype)
    return torch.empty(shape).normal_(0.0, 0.02, generator=generator).to(dtype)


def write(directory: Path, dtype: torch.dtype = torch.bfloat16, seed: int = 0) -> int:
    cfg = LlamaConfig(**CONFIG, dtype=dtype)
    generator = torch.Generator().manual_seed(seed)
    weight_map: dict[str, str] = {}
    total = 0
    for file, shapes in shards(cfg):
        tensors = {name: draw(name, shape, generator, dtype) for name, shape in shapes.items()}
        tmp = directory / (file + ".tmp")
        save_file(tensors, str(tmp), metadata={"format": "pt"})
        os.replace(tmp, directory / file)  # a half-written shard never carries the final name
        weight_map.update(dict.fromkeys(tensors, file))
        total += sum(t.numel() for t in tensors.values())
        print(f"{file}: {len(tensors)} tensors", flush=True)
        del tensors
    index = {"metadata": {"total_size": total * torch.finfo(dtype).bits // 8}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    cfg.save_pretrained(directory)
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--dtype", choices=["bfloat16", "float16"], default="bfloat16")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    make_tokenizer(args.out)
    total = write(args.out, getattr(torch, args.dtype))
    print(f"{total:,} parameters written to {args.out} in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
