"""A random ~0.5B Llama saved to disk, for memory benchmarks where the weights' values do not matter.

hidden 1536, 16 layers, 12 query heads sharing 4 KV heads, intermediate 4096, vocab 32000, untied output
layer: 501M parameters (1.9 GiB in float32). Built on the meta device and filled tensor by tensor, so
making it never holds more than the model once. The tokenizer is a word-level one over a few hundred
words (ids far below the vocabulary size), enough for `deltatune train` on bench text.

    python bench/make_random_llama.py /tmp/llama500m
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

WORDS = ("the a of and to in is was it for on with as by at from this that be are or an not but all can "
         "model weight layer train shard memory process node delta rank step batch token loss block").split()


def make_tokenizer(directory: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<pad>", "<unk>", "<s>", "</s>", *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", bos_token="<s>",
                            eos_token="</s>").save_pretrained(directory)


def make_model(directory: Path, seed: int = 0) -> int:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=32000, hidden_size=1536, num_hidden_layers=16, num_attention_heads=12,
                      num_key_value_heads=4, intermediate_size=4096, max_position_embeddings=2048,
                      tie_word_embeddings=False, pad_token_id=0, bos_token_id=2, eos_token_id=3)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    model.to_empty(device="cpu")
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            else:
                param.normal_(0.0, 0.02, generator=generator)
        for module in model.modules():  # rotary inv_freq: a buffer that to_empty left uninitialised
            if hasattr(module, "rope_init_fn"):
                inv_freq, _ = module.rope_init_fn(module.config, "cpu")
                module.inv_freq.copy_(inv_freq)
                module.original_inv_freq = inv_freq
    model.save_pretrained(directory)
    return sum(p.numel() for p in model.parameters())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    make_tokenizer(args.out)
    print(f"{make_model(args.out):,} parameters written to {args.out}")


if __name__ == "__main__":
    main()
