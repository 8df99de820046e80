"""The layer types deltas know how to wrap, in one place (targets, structure and the wrappers all ask here)."""

from __future__ import annotations

import functools

from torch import nn


@functools.cache
def linear_types() -> tuple[type[nn.Module], ...]:
    """nn.Linear plus transformers' Conv1D (GPT-2 stores its projections transposed). Subclasses of nn.Linear
    (bitsandbytes' quantized layers, for one) match too, through isinstance."""
    from transformers.pytorch_utils import Conv1D  # transformers is heavy: imported on first use

    return (nn.Linear, Conv1D)


def expert_weights(module: nn.Module) -> dict[str, nn.Parameter]:
    """The module's own 3-D parameters sharing one leading (expert) size: the routed experts of a mixture-of-experts
    layer stored fused, as transformers 5 does (Mixtral / Qwen3-MoE ``experts.gate_up_proj`` (E, 2I, H) and
    ``experts.down_proj`` (E, H, I), each expert's weight in nn.Linear's (out, in) layout). Empty for other modules."""
    found = {name: p for name, p in module.named_parameters(recurse=False) if p.dim() == 3}
    if len({p.shape[0] for p in found.values()}) != 1:
        return {}
    return found


class _ExpertBankType(type):
    def __instancecheck__(cls, module: object) -> bool:
        return isinstance(module, nn.Module) and not isinstance(module, nn.Linear) and bool(expert_weights(module))


class ExpertBank(metaclass=_ExpertBankType):
    """A structural type for ``isinstance`` (and so for target matching): any module holding routed experts as
    fused 3-D parameters (``expert_weights``). Not a base class: transformers' experts modules match as they are."""
