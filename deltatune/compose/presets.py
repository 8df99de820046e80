"""Presets: named combinations of method configs (STYLE.md: small functions returning configs, no subclasses).

``dt.attach`` accepts a preset's list wherever it accepts a config, so ``dt.attach(model, dt.MAM())`` and
``dt.attach(model, *dt.MAM(), name="x")`` both work; the checkpoint stores the expanded configs.
"""

from __future__ import annotations

from ..core.config import DeltaConfig
from ..methods.adapter import Adapter
from ..methods.gates import Gates
from ..methods.lora import LoRA
from ..methods.prefix import PrefixTuning

# Query and value projections under the names common architectures use (BERT, Llama/Mistral/Qwen, T5);
# GPT-2 fuses q, k and v into c_attn. A regex, so one preset works across architectures.
QUERY_VALUE = r"re:.*\.(query|value|q_proj|v_proj|q|v|c_attn)"


def UniPELT(r: int = 8, alpha: float = 8.0, num_tokens: int = 10, bottleneck: int = 48,  # noqa: N802
            targets: str | list[str] = QUERY_VALUE) -> list[DeltaConfig]:
    """UniPELT (Mao et al., 2022, arXiv:2110.07577): LoRA on query/value, prefix tuning and a bottleneck
    adapter after the feed-forward block, LoRA and adapter scaled per layer by a learned gate computed from
    the layer's input. Defaults follow the paper (r=8, alpha=8, prefix length 10, adapter 48 = 768 / 16).

    Unlike the paper, the prefix is not gated: its keys/values enter attention's softmax, which a
    multiplier on a delta path cannot scale (see methods/gates.py); it is trained ungated.
    """
    return [LoRA(r=r, alpha=alpha, targets=targets), PrefixTuning(num_tokens=num_tokens),
            Adapter(kind="pfeiffer", bottleneck=bottleneck), Gates(methods=["lora", "adapter"])]


def MAM(num_tokens: int = 30, bottleneck: int = 32, scale: float = 4.0,  # noqa: N802
        reparam_hidden: int | None = 512) -> list[DeltaConfig]:
    """Mix-and-Match adapter (He et al., 2022, arXiv:2110.04366): prefix tuning on attention (30 tokens,
    reparameterised) plus a parallel adapter alongside the feed-forward block, its output scaled by 4.

    The paper's adapter is 512 wide on BART-large (hidden 1024); the default 32 fits any model at least
    32 wide (the adapter refuses a bottleneck wider than the layer): pass ``bottleneck=`` for your model.
    """
    return [PrefixTuning(num_tokens=num_tokens, reparam_hidden=reparam_hidden),
            Adapter(kind="parallel", bottleneck=bottleneck, scale=scale)]
