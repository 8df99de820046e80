"""EVA-style data-driven LoRA initialisation (Paischer et al., 2024, arXiv:2410.07170): ``dt.eva_init``.

``dt.attach`` sees no data, so this is a separate call, made after attaching a LoRA and before training:

    delta = dt.attach(model, dt.LoRA(r=8, init="eva"))   # init="eva" only tells ``deltatune train`` to call it
    dt.eva_init(delta, batches)          # batches: an iterable of model inputs (dicts of tensors), a few suffice

The same call starts a ``dt.LoRA(init="corda")`` delta (corda.py): the one documented way in for data.

For every LoRA Linear / Conv1D module it accumulates the Gram matrix X^T X of the module's inputs over the
batches (tokens with ``attention_mask`` 0 left out when the batch has one) and sets A's r rows to its top-r
eigenvectors: the right singular vectors of the activations, i.e. the directions the layer's inputs actually
vary in. B stays zero, so the model is unchanged and W is never touched (unlike PiSSA / OLoRA): save, load,
merge and PEFT export are those of a plain LoRA, since A is a saved parameter like any other.

Differences from the paper / PEFT's ``initialize_lora_eva_weights``: the decomposition is exact (a Gram
matrix in float64, not incremental PCA), uncentred, and every module keeps its configured rank (no
redistribution of ranks by explained variance); the explained-variance share of each module's r directions is
returned, so a caller can see where rank would matter most.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch

from ...core.delta import Delta
from ...core.errors import ConfigError, StateError
from .activations import feed
from .corda import corda_init
from .inits import RESIDUAL_INITS
from .layers import LoRALinear


def _targets(delta: Delta) -> dict[str, LoRALinear]:
    """The delta's LoRA Linear / Conv1D wrappers, after checking EVA may set their A."""
    found = {p: w for a in delta.attachments for p, w in a.wrappers().items() if isinstance(w, LoRALinear)}
    if not found:
        raise ConfigError(f"dt.eva_init sets LoRA's A from data; delta {delta.name!r} has no LoRA on Linear / Conv1D "
                          f"layers ({[c.method for c in delta.configs]})")
    residual = sorted({a.config.init for a in delta.attachments if getattr(a.config, "init", None) in RESIDUAL_INITS})
    if residual or any(getattr(a.config, "dora", False) for a in delta.attachments):
        raise ConfigError(f"dt.eva_init works on plain LoRA (init 'kaiming' / 'gaussian', no DoRA); delta "
                          f"{delta.name!r} uses {residual or 'dora'}, whose A, B start from W")
    wide = sorted(p for p, w in found.items() if w.r > w.lora_A.shape[1])
    if wide:
        raise ConfigError(f"dt.eva_init needs r <= the input width of every module; {wide[:3]} have fewer inputs "
                          f"than r: lower r (rank_pattern) or leave them out of targets")
    trained = sorted(p for p, w in found.items() if w.lora_B.detach().any())
    if trained or delta.is_merged:
        raise StateError(f"dt.eva_init must run before training: B is no longer zero in {trained[:3]} (or the delta "
                         f"is merged), so replacing A would change the model. Attach a fresh LoRA first.")
    return found


def eva_init(delta: Delta, batches: Iterable[Mapping[str, Any]]) -> dict[str, float]:
    """Set A of every LoRA module of ``delta`` to the top-r right singular vectors of its inputs over ``batches``
    (a ``dt.LoRA(init="corda")`` delta: start it by CorDA instead, corda.py).

    Args:
        delta: an attached, untrained plain LoRA delta (B still zero), or an untrained CorDA one.
        batches: model inputs, each a mapping of keyword arguments (``input_ids``, ``attention_mask`` ...).
    Returns:
        Per module path, the share of the inputs' energy (sum of squared singular values) its r directions hold
        (CorDA: the share of W C's singular values its trained components hold).
    Raises:
        ConfigError: no plain LoRA in the delta, or no batch given. StateError: B already trained, or merged.
    """
    inits = {a.config.init for a in delta.attachments if a.config.method == "lora"}
    if "corda" in inits:
        if len(inits) > 1:
            others = sorted(inits - {"corda"})
            raise ConfigError(f"dt.eva_init starts one kind of LoRA per call; delta {delta.name!r} mixes "
                              f"init='corda' with {others}: attach them as separate deltas")
        return corda_init(delta, batches)
    wrappers = _targets(delta)
    grams = {p: None for p in wrappers}
    mask: list[torch.Tensor | None] = [None]
    feed(delta, wrappers, lambda p: _accumulate(grams, p, mask), batches, mask)
    if any(g is None for g in grams.values()):
        raise ConfigError("dt.eva_init got no batch (or the batches never reached the LoRA layers); pass an "
                          "iterable of model inputs, e.g. [tokenizer(texts, return_tensors='pt', padding=True)]")
    return {p: _set_a(wrappers[p], grams[p]) for p in wrappers}


def _accumulate(grams: dict[str, torch.Tensor | None], path: str, mask: list[torch.Tensor | None]):
    def hook(module: LoRALinear, args: tuple[torch.Tensor, ...]) -> None:
        x = args[0].detach()
        m = mask[0]
        rows = x[m.to(torch.bool)] if m is not None and m.shape == x.shape[:-1] else x.reshape(-1, x.shape[-1])
        gram = rows.double().T @ rows.double()
        grams[path] = gram if grams[path] is None else grams[path] + gram
    return hook


@torch.no_grad()
def _set_a(wrapper: LoRALinear, gram: torch.Tensor) -> float:
    """A <- the top-r eigenvectors of X^T X as rows; returns their share of the trace."""
    values, vectors = torch.linalg.eigh(gram)  # ascending
    top = vectors[:, -wrapper.r:].flip(1).T    # (r, in), largest first
    wrapper.lora_A.copy_(top.to(wrapper.lora_A.dtype))
    total = float(values.clamp(min=0).sum())
    return float(values[-wrapper.r:].clamp(min=0).sum()) / total if total > 0 else 0.0
