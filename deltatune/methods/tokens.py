"""Trainable tokens: train only the embedding rows of chosen token ids (typically tokens just added to the
vocabulary), and save only those rows.

After ``tokenizer.add_tokens([...])`` and ``model.resize_token_embeddings(len(tokenizer))``, attach
``dt.TrainableTokens(token_ids=[...the new ids...])``. The rows start as copies of the current ones, so the
model is unchanged at attach (bitwise); looking up one of the ids returns its trained row. The checkpoint holds
the n x dim rows alone, not the vocabulary x dim matrix (PEFT's known complaint: 30 new tokens made a 676 MB
adapter). When the output layer shares the input embedding's weight (tied, e.g. GPT-2), it is wrapped too and
reads the same trained rows for those ids' logits, so input and output stay consistent; an untied output
layer is left alone (add LoRA or ``train_modules`` on it if the new tokens must be generated).

Mergeable on untied models (the rows are written into the weight, and the old ones kept for unmerge); on tied
ones ``delta.merge()`` refuses, as for every method, because the weight is shared.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from ..core.config import DeltaConfig
from ..core.errors import ConfigError, TargetError
from ..core.inject import Attachment, DeltaWrapper, wrap_module
from ..core.recipe import Recipe
from ..core.registry import register


@dataclasses.dataclass
class TrainableTokens(DeltaConfig):
    method = "tokens"
    mergeable = True
    recipe = Recipe(learning_rate=1e-3, head_learning_rate=1e-3)  # NOT measured yet: LoRA's measured rates

    token_ids: list[int] | None = None  # the embedding rows that train (None: not given yet; attach refuses it)

    def validate(self) -> None:
        ids = self.token_ids or []
        self._require(all(i >= 0 for i in ids) and len(set(ids)) == len(ids), "token_ids",
                      "a list of distinct non-negative token ids")


class TokensEmbedding(DeltaWrapper):
    """An nn.Embedding whose rows for ``token_ids`` come from the trained ``rows``."""

    mergeable = True
    routable = True  # the change goes through ``scaled`` when routing or gates are set

    def __init__(self, base: nn.Module, token_ids: list[int]) -> None:
        super().__init__(base)
        weight = self.base_layer().weight
        self.register_buffer("token_ids", torch.tensor(token_ids, device=weight.device), persistent=False)
        self.rows = nn.Parameter(weight.detach()[self.token_ids].clone())
        self._replaced: torch.Tensor | None = None  # the original rows while merged

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out = self.base(ids)
        if not self.uses_delta:
            return out
        hit = ids.unsqueeze(-1) == self.token_ids  # (..., n)
        found = hit.any(-1, keepdim=True)
        new = self.rows[hit.to(torch.uint8).argmax(-1)].to(out.dtype)
        scale = getattr(self.base_layer(), "embed_scale", None)  # Gemma's embedding multiplies its rows by sqrt(d)
        if isinstance(scale, torch.Tensor):
            new = new * scale.to(out.dtype)
        if self.sample_scale is None and self.gate_scale is None:
            return torch.where(found, new, out)  # exact: the trained row itself
        return out + self.scaled(torch.where(found, new - out, torch.zeros_like(out)))

    @torch.no_grad()
    def merge(self) -> None:
        weight = self.base_layer().weight
        self._replaced = weight[self.token_ids].clone()
        weight[self.token_ids] = self.rows.to(weight.dtype)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        self.base_layer().weight[self.token_ids] = self._replaced
        self._replaced = None
        self.merged = False

    def extra_summary(self) -> str:
        return f"{len(self.token_ids)} token rows"


class TokensHead(DeltaWrapper):
    """A tied output layer whose logits for ``token_ids`` use the embedding wrapper's trained rows."""

    mergeable = True   # never merged itself (the tied weight is refused by the core), but must not block it
    routable = True

    def __init__(self, base: nn.Module, embedding: TokensEmbedding) -> None:
        super().__init__(base)
        object.__setattr__(self, "_embedding", embedding)  # not a submodule: its rows are trained (and saved) once

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        out = self.base(hidden)
        source = self._embedding
        if not (self.uses_delta and source.uses_delta):
            return out
        layer = self.base_layer()
        # one product with the rows put into a copy of the weight (a weight-sized temporary per call): the logits
        # of every other token are computed exactly as the base layer does, bitwise, which a separate product
        # for the n rows would not guarantee
        weight = layer.weight.index_put((source.token_ids,), source.rows.to(layer.weight.dtype))
        new = F.linear(hidden, weight, layer.bias)
        if self.sample_scale is None and self.gate_scale is None:
            return new
        return out + self.scaled(new - out)

    @torch.no_grad()
    def merge(self) -> None:  # the shared weight is written by the embedding's merge
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        self.merged = False


def _paths(model: nn.Module) -> tuple[str, str | None]:
    """Dotted paths of the input embedding and, when it shares that weight, the output layer."""
    get_in = getattr(model, "get_input_embeddings", None)
    embedding = get_in() if get_in is not None else None
    if not isinstance(embedding, nn.Embedding):
        raise TargetError("tokens: this model has no nn.Embedding input embeddings (get_input_embeddings()); "
                          "trainable tokens need one")
    get_out = getattr(model, "get_output_embeddings", None)
    head = get_out() if get_out is not None else None
    names = {id(m): n for n, m in model.named_modules()}
    tied = isinstance(head, nn.Linear) and head.weight is embedding.weight
    return names[id(embedding)], names[id(head)] if tied else None


@register(TrainableTokens)
def attach(model: nn.Module, cfg: TrainableTokens, att: Attachment) -> None:
    if not cfg.token_ids:
        raise ConfigError("tokens.token_ids is not set; give the ids whose rows train, e.g. "
                          "tokenizer.convert_tokens_to_ids(new_tokens)")
    embedding_path, head_path = _paths(model)
    vocab = model.get_input_embeddings().num_embeddings
    outside = [i for i in cfg.token_ids if i >= vocab]
    if outside:
        raise TargetError(f"tokens: token ids {outside[:5]} are outside the vocabulary of {vocab}; after adding "
                          f"tokens, call model.resize_token_embeddings(len(tokenizer)) before attaching")
    embedding = wrap_module(model, embedding_path, lambda m: TokensEmbedding(m, cfg.token_ids))
    att.modules[embedding_path] = embedding
    if head_path is not None:
        att.modules[head_path] = wrap_module(model, head_path, lambda m: TokensHead(m, embedding))
