"""Visual prompt tuning: trainable prompt vectors inserted after the [CLS] token of a vision transformer
(Jia et al., 2022, "Visual Prompt Tuning", arXiv:2203.12119; the "shallow" variant, prompts at the input only).

Two hooks, their handles in the attachment record (no wrapper, no patched class):
- a forward hook on the patch-embedding module (``vit.embeddings``: [CLS] + patches, position embeddings already
  added) inserts the P prompt vectors right after [CLS]. Prompts get no position embedding, as in the paper;
- a forward hook on the backbone that owns it (``vit``) cuts the P positions out of ``last_hidden_state`` again,
  so every head (classification reads [CLS], masked image modelling reshapes the patches) sees the sequence it
  was built for, and outputs line up with the base model's.
Every transformer layer attends over [CLS, prompts, patches], so the prompts steer [CLS] from the first layer on.
Not routable per sample: a vision transformer takes no attention mask to hide the prompts from some images.
Text models have input embeddings instead: dt.PromptTuning.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn

from ..core.config import DeltaConfig
from ..core.errors import AttachError
from ..core.inject import Attachment, DeltaModule, add_free_module, named_base_modules
from ..core.recipe import Recipe
from ..core.registry import register


@dataclasses.dataclass
class VisualPromptTuning(DeltaConfig):
    method = "visual_prompt"
    recipe = Recipe(learning_rate=1e-2, head_learning_rate=1e-2)  # not measured yet: prompt tuning's scale

    num_tokens: int = 10   # prompt length: capacity grows with it, and so does every image's sequence (VPT: 1-200)

    def validate(self) -> None:
        self._require(isinstance(self.num_tokens, int) and self.num_tokens > 0, "num_tokens", "a positive integer")


class VisualPrompt(DeltaModule):
    """``num_tokens`` trainable vectors of the hidden size, inserted after [CLS]."""

    def __init__(self, num_tokens: int, hidden: int, patch_inputs: int, like: torch.Tensor) -> None:
        super().__init__()
        # the paper's init: uniform Xavier over (patch pixels, hidden), as if the prompts were patches
        bound = math.sqrt(6.0 / (patch_inputs + hidden))
        init = torch.empty(num_tokens, hidden, dtype=like.dtype, device=like.device).uniform_(-bound, bound)
        self.embedding = nn.Parameter(init)

    @property
    def num_tokens(self) -> int:
        return self.embedding.shape[0]

    def insert(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
        """Forward hook on the patch embeddings: (batch, 1 + patches, hidden) -> (batch, 1 + P + patches, hidden)."""
        if not self.active or not isinstance(output, torch.Tensor) or output.dim() != 3:
            return None
        prompt = self.embedding.to(output.dtype).unsqueeze(0).expand(output.shape[0], -1, -1)
        return torch.cat([output[:, :1], prompt, output[:, 1:]], dim=1)

    def cut(self, module: nn.Module, args: tuple, output):
        """Forward hook on the backbone: take the prompt positions out of its sequence outputs."""
        if not self.active or not hasattr(output, "keys"):
            return None
        n = self.num_tokens
        state = output.get("last_hidden_state")
        if isinstance(state, torch.Tensor) and state.dim() == 3:
            output["last_hidden_state"] = torch.cat([state[:, :1], state[:, 1 + n:]], dim=1)
        states = output.get("hidden_states")
        if isinstance(states, tuple):
            output["hidden_states"] = tuple(torch.cat([h[:, :1], h[:, 1 + n:]], dim=1) for h in states)
        return output

    def extra_summary(self) -> str:
        return f"{self.num_tokens} prompt vectors x {self.embedding.shape[1]} after [CLS]"


def _patch_embeddings(model: nn.Module) -> tuple[str, nn.Module, nn.Module]:
    """(path, module) of the embeddings that produce [CLS] + patches (the module with a ``cls_token`` and a
    ``patch_embeddings`` child: ViT, DeiT, ...), and the backbone that owns it."""
    modules = dict(named_base_modules(model))
    for path, module in modules.items():
        if hasattr(module, "patch_embeddings") and isinstance(getattr(module, "cls_token", None), nn.Parameter):
            return path, module, modules[path.rpartition(".")[0]]
    raise AttachError(f"visual prompt tuning needs a vision transformer with a [CLS] token and patch embeddings "
                      f"(an embeddings module with cls_token and patch_embeddings, as ViT / DeiT); "
                      f"{type(model).__name__} has none. For text models use dt.PromptTuning")


def _patch_inputs(embeddings: nn.Module) -> int:
    """Pixels per patch times channels (the fan-in of the patch projection), for the paper's init."""
    projection = getattr(embeddings.patch_embeddings, "projection", None)
    weight = getattr(projection, "weight", None)
    return int(weight[0].numel()) if weight is not None else 0


@register(VisualPromptTuning)
def attach(model: nn.Module, cfg: VisualPromptTuning, att: Attachment) -> None:
    path, embeddings, backbone = _patch_embeddings(model)
    cls_token = embeddings.cls_token
    prompt = VisualPrompt(cfg.num_tokens, cls_token.shape[-1], _patch_inputs(embeddings), cls_token)
    add_free_module(model, att, f"{path}.visual_prompt", prompt)
    att.hooks.append(embeddings.register_forward_hook(prompt.insert))
    att.hooks.append(backbone.register_forward_hook(prompt.cut))
