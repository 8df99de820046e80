"""vLLM-ready adapters: a PEFT LoRA directory, written only when vLLM's LoRA loader can take it.

vLLM reads PEFT's format but only part of it. The rules below come from its loader (file names in the
vllm-project/vllm repository; docs/serving.md quotes them):
- only LoRA tensors: ``lora_A.weight`` / ``lora_B.weight`` (and ``lora_embedding_A/B``); any other key raises
  "is unsupported LoRA weight" (``vllm/lora/utils.py``, ``parse_fine_tuned_lora_name``) -- so no VeRA, LoHa,
  LoKr, OFT, IA3, adapters, prefixes or BitFit biases;
- ``modules_to_save`` must be empty ("vLLM only supports modules_to_save being None", ``vllm/lora/peft_helper.py``);
- no DoRA ("vLLM does not yet support DoRA", ``peft_helper.py``; ``vllm/lora/lora_model.py`` refuses the
  magnitude vector);
- one scale for every module, ``lora_alpha / r`` (``/ sqrt(r)`` with rsLoRA) from the config
  (``PEFTHelper.__post_init__``): ``rank_pattern`` / ``alpha_pattern`` are not read, so modules whose scale
  differs would be served wrong;
- targets must be linear layers of vLLM's model (``get_supported_lora_modules``: ``LinearBase`` suffixes, plus
  the embeddings only for models that list them in ``embedding_modules``); an unexpected module raises
  "expected target modules in ... but received ..." (``lora_model.py``, ``check_unexpected_modules``). vLLM's LM
  head is not a ``LinearBase``, so LoRA on the embeddings or the LM head is refused here.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from torch import nn

from ..core.delta import Delta
from ..core.errors import StateError
from ..core.inject import Attachment, DeltaWrapper
from ..methods.lora import LoRALinear
from ..methods.lora.inits import RESIDUAL_INITS
from .peft import export_peft


def check_vllm(delta: Delta) -> list[str]:
    """Why vLLM could not load ``delta`` as a LoRA adapter: one sentence per problem; empty when it can."""
    if not delta.attached:
        return [f"delta {delta.name!r} was detached; attach or load it again"]
    problems = []
    if delta.train_modules:
        problems.append(f"it trains whole modules {sorted(delta.train_modules)[:3]} (PEFT's modules_to_save); "
                        f"vLLM only loads adapters whose modules_to_save is None")
    others = sorted({a.config.method for a in delta.attachments
                     if a.config.method != "lora" and not a.config.trains_whole_modules})
    if others:
        problems.append(f"it holds {others}; vLLM loads LoRA tensors only (lora_A / lora_B), so no other method "
                        f"and no trained biases")
    for att in (a for a in delta.attachments if a.config.method == "lora"):
        problems += _lora_problems(delta.model, att)
    if sum(a.config.method == "lora" for a in delta.attachments) > 1:
        problems.append("it holds several LoRAs; vLLM loads one adapter per directory")
    return problems


def _lora_problems(model: nn.Module, att: Attachment) -> list[str]:
    cfg = att.config
    if cfg.dora:
        return ["it is a DoRA (dora=True); vLLM does not support DoRA"]
    problems = []
    embeddings = {id(m) for m in (_input_embeddings(model), _output_embeddings(model)) if m is not None}
    refused = sorted(p for p, w in att.wrappers().items()
                     if not isinstance(w, LoRALinear) or id(w.base_layer()) in embeddings)
    if refused:
        problems.append(f"it adapts {refused[:3]}: vLLM serves LoRA on the linear layers of its model; the "
                        f"embeddings and the LM head are not among them for most models. Leave them out of targets")
    scales = {p: cfg.scaling(*w.plain_factors()[2:]) for p, w in att.wrappers().items()}
    # the r and lora_alpha export_peft writes: PiSSA / OLoRA become plain LoRAs of rank 2r (LoRALinear.plain_factors)
    r, alpha = (cfg.r, cfg.alpha) if cfg.init not in RESIDUAL_INITS else next(
        iter(w.plain_factors()[2:] for w in att.wrappers().values()))
    common = cfg.scaling(r, alpha)
    uneven = sorted(p for p, s in scales.items() if not math.isclose(s, common, rel_tol=1e-6))
    if uneven:
        problems.append(f"modules {uneven[:3]} are scaled differently from the rest (rank_pattern / alpha_pattern or "
                        f"an adaptive rank budget); vLLM applies one lora_alpha / r to every module. Use one r and "
                        f"alpha for all targets")
    return problems


def _input_embeddings(model: nn.Module) -> nn.Module | None:
    return _unwrapped(model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None)


def _output_embeddings(model: nn.Module) -> nn.Module | None:
    return _unwrapped(model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None)


def _unwrapped(module: nn.Module | None) -> nn.Module | None:
    return module.base_layer() if isinstance(module, DeltaWrapper) else module


def export_vllm(delta: Delta, directory: str | os.PathLike) -> Path:
    """Write ``delta`` as a PEFT LoRA directory that vLLM loads (``--enable-lora --lora-modules name=DIR``;
    its ``--max-lora-rank`` must be at least the delta's r), after checking it against vLLM's rules.

    Raises:
        StateError: naming every reason vLLM could not load it (see ``check_vllm``); nothing is written.
    """
    problems = check_vllm(delta)
    if problems:
        listed = "; ".join(f"({i}) {p}" for i, p in enumerate(problems, 1))
        raise StateError(f"vLLM cannot load delta {delta.name!r}: {listed}. vLLM serves plain LoRA on linear layers "
                         f"with one r and alpha (docs/serving.md); use dt.export_peft for other PEFT consumers.")
    return export_peft(delta, directory)
