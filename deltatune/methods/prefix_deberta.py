"""Prefix tuning's attention for DeBERTa(-v2)'s disentangled self-attention (used by prefix.py; registers nothing).

DeBERTa does not call transformers' attention interface, so the prefixing implementation of prefix.py never runs
there. Its score for query i and key j is content-to-content q_i.k_j plus the relative-position terms c2p (q_i
against the embedding of position delta(i, j)) and p2c (k_j against the embedding of delta(j, i)), all divided by
sqrt(d * (1 + number of position terms)). A prefix slot has no position in the sequence, so delta(i, slot) is
undefined and there is no exact DeBERTa prefix with c2p / p2c terms. The choice here: a prefix slot gets the
content score q_i.pk / the same scale and no position terms, as T5's relative bias gives prefix slots none and
RoPE models don't rotate prefix keys; the real tokens' scores, c2p and p2c included, are exactly DeBERTa's.

``disentangled_attention`` re-states the module's forward (transformers 5.25, ``DisentangledSelfAttention``) with
the prefix columns added, from the module's own projections and ``disentangled_attention_bias``.
"""

from __future__ import annotations

import torch
from torch import nn


def is_disentangled_attention(module: nn.Module) -> bool:
    """DeBERTa / DeBERTa-v2 self-attention: its own q/k/v projections and relative-position bias."""
    return callable(getattr(module, "disentangled_attention_bias", None)) and all(
        isinstance(getattr(module, name, None), nn.Module) for name in ("query_proj", "key_proj", "value_proj"))


def disentangled_attention(module: nn.Module, prefix_key: torch.Tensor, prefix_value: torch.Tensor,
                           visible: torch.Tensor, hidden_states: torch.Tensor, attention_mask: torch.Tensor,
                           output_attentions: bool = False, query_states: torch.Tensor | None = None,
                           relative_pos: torch.Tensor | None = None, rel_embeddings: torch.Tensor | None = None):
    """DeBERTa's self-attention with (heads, P, head_dim) prefix keys / values in front of the keys.
    ``visible``: (P,) or (batch, P) booleans, which prefix slots each sample sees (per-sample routing)."""
    heads = module.num_attention_heads
    query_states = hidden_states if query_states is None else query_states
    query = module.transpose_for_scores(module.query_proj(query_states), heads)
    key = module.transpose_for_scores(module.key_proj(hidden_states), heads)
    value = module.transpose_for_scores(module.value_proj(hidden_states), heads)
    scale_factor = 1 + ("c2p" in module.pos_att_type) + ("p2c" in module.pos_att_type)
    scale = torch.sqrt(torch.tensor(query.size(-1), dtype=torch.float) * scale_factor).to(query.dtype)  # as DeBERTa
    scores = torch.bmm(query, key.transpose(-1, -2) / scale)
    if module.relative_attention:
        scores = scores + module.disentangled_attention_bias(query, key, relative_pos,
                                                             module.pos_dropout(rel_embeddings), scale_factor)
    batch = hidden_states.shape[0]
    pk = prefix_key.to(query.dtype).unsqueeze(0).expand(batch, -1, -1, -1).reshape(batch * heads, -1, query.size(-1))
    pv = prefix_value.to(value.dtype).unsqueeze(0).expand(batch, -1, -1, -1).reshape(batch * heads, -1, value.size(-1))
    scores = torch.cat([torch.bmm(query, pk.transpose(-1, -2) / scale), scores], dim=-1)
    scores = scores.view(batch, heads, scores.size(-2), scores.size(-1))
    mask = attention_mask.bool()
    front = visible.view(-1, 1, 1, visible.shape[-1]).expand(mask.shape[0] if visible.dim() == 1 else batch,
                                                              mask.shape[1], mask.shape[2], -1)
    mask = torch.cat([front, mask.expand(front.shape[0], *mask.shape[1:])], dim=-1)
    probs = module.dropout(nn.functional.softmax(scores.masked_fill(~mask, torch.finfo(query.dtype).min), dim=-1))
    context = torch.bmm(probs.view(-1, probs.size(-2), probs.size(-1)), torch.cat([pv, value], dim=1))
    context = context.view(batch, heads, context.size(-2), context.size(-1)).permute(0, 2, 1, 3).contiguous()
    context = context.view(*context.shape[:-2], -1)
    return context, (probs if output_attentions else None)
