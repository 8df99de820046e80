"""Tiny random models of many transformers architectures (2 layers, hidden 32, fixed seed), built from configs.

Each entry says what kind of model it is, because the checks differ: an encoder classifies (labels are classes),
a decoder generates (cached == uncached generate is checked), an encoder-decoder generates from its decoder, a
vision model classifies pixel values.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
import transformers as tf

VOCAB = 100
HIDDEN = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
DECODER = dict(vocab_size=VOCAB, max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=2)


@dataclasses.dataclass(frozen=True)
class Arch:
    build: Callable[[], torch.nn.Module]
    kind: str  # "encoder" | "decoder" | "seq2seq" | "vision"


def _cls(config_cls, model_cls, **kw) -> Callable[[], torch.nn.Module]:
    def build() -> torch.nn.Module:
        torch.manual_seed(0)
        return model_cls(config_cls(**kw)).eval()

    return build


_ENC = dict(vocab_size=VOCAB, max_position_embeddings=64, num_labels=2, **HIDDEN)
_DEC = dict(num_key_value_heads=2, **DECODER, **HIDDEN)

ARCHS: dict[str, Arch] = {
    "bert": Arch(_cls(tf.BertConfig, tf.BertForSequenceClassification, **_ENC), "encoder"),
    "roberta": Arch(_cls(tf.RobertaConfig, tf.RobertaForSequenceClassification, pad_token_id=1, **_ENC), "encoder"),
    "deberta-v2": Arch(_cls(tf.DebertaV2Config, tf.DebertaV2ForSequenceClassification, relative_attention=True,
                            pos_att_type=["p2c", "c2p"], max_relative_positions=16, pooler_hidden_size=32, **_ENC),
                       "encoder"),
    "distilbert": Arch(_cls(tf.DistilBertConfig, tf.DistilBertForSequenceClassification, vocab_size=VOCAB, dim=32,
                            n_layers=2, n_heads=4, hidden_dim=64, max_position_embeddings=64), "encoder"),
    "gpt2": Arch(_cls(tf.GPT2Config, tf.GPT2LMHeadModel, vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4,
                      n_positions=64, bos_token_id=1, eos_token_id=2), "decoder"),
    "llama": Arch(_cls(tf.LlamaConfig, tf.LlamaForCausalLM, **_DEC), "decoder"),
    "mistral": Arch(_cls(tf.MistralConfig, tf.MistralForCausalLM, head_dim=8, **_DEC), "decoder"),
    "qwen2": Arch(_cls(tf.Qwen2Config, tf.Qwen2ForCausalLM, **_DEC), "decoder"),
    "qwen3": Arch(_cls(tf.Qwen3Config, tf.Qwen3ForCausalLM, head_dim=8, **_DEC), "decoder"),
    "phi3": Arch(_cls(tf.Phi3Config, tf.Phi3ForCausalLM, **_DEC), "decoder"),
    "gemma": Arch(_cls(tf.GemmaConfig, tf.GemmaForCausalLM, head_dim=8, **_DEC), "decoder"),
    "mixtral": Arch(_cls(tf.MixtralConfig, tf.MixtralForCausalLM, num_local_experts=4, num_experts_per_tok=2,
                         head_dim=8, **_DEC), "decoder"),
    "qwen3-moe": Arch(_cls(tf.Qwen3MoeConfig, tf.Qwen3MoeForCausalLM, num_experts=4, num_experts_per_tok=2,
                           moe_intermediate_size=32, head_dim=8, decoder_sparse_step=1, **_DEC), "decoder"),
    "t5": Arch(_cls(tf.T5Config, tf.T5ForConditionalGeneration, vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64,
                    num_layers=2, num_heads=4, pad_token_id=0, eos_token_id=2, decoder_start_token_id=0), "seq2seq"),
    "bart": Arch(_cls(tf.BartConfig, tf.BartForConditionalGeneration, vocab_size=VOCAB, d_model=32,
                      encoder_layers=2, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
                      encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64, pad_token_id=1,
                      bos_token_id=0, eos_token_id=2, decoder_start_token_id=2, forced_eos_token_id=None),
                 "seq2seq"),
    "vit": Arch(_cls(tf.ViTConfig, tf.ViTForImageClassification, image_size=16, patch_size=4, num_channels=3,
                     num_labels=2, **HIDDEN), "vision"),
}


def inputs(arch: str, seed: int = 1) -> dict[str, torch.Tensor]:
    """One fixed training batch for the model (with labels, so ``model(**inputs).loss`` is defined)."""
    g = torch.Generator().manual_seed(seed)
    kind = ARCHS[arch].kind
    if kind == "vision":
        return {"pixel_values": torch.randn(3, 3, 16, 16, generator=g), "labels": torch.tensor([0, 1, 1])}
    ids = torch.randint(3, VOCAB, (3, 9), generator=g)
    if kind == "encoder":
        return {"input_ids": ids, "labels": torch.tensor([0, 1, 1])}
    if kind == "seq2seq":
        return {"input_ids": ids, "labels": torch.randint(3, VOCAB, (3, 5), generator=g)}
    return {"input_ids": ids, "labels": ids}
