"""CorDA, a data-driven LoRA start (Yang et al., 2024, arXiv:2406.05223): ``dt.LoRA(init="corda")``.

``dt.attach`` sees no data, so the start is set by the same call as EVA's, after attaching and before training:

    delta = dt.attach(model, dt.LoRA(r=8, init="corda"))    # a plain LoRA (B = 0), W untouched, until:
    dt.eva_init(delta, batches)                               # batches: model inputs (dicts of tensors)

For every LoRA Linear / Conv1D layer with weight W (out, in) it accumulates C, the mean over the batches'
samples of X^T X (X: one sample's non-padding input rows, divided by |max(X)|, as PEFT does), damps it to
C' = C + d mean(diag C) I (d from 0.01, doubled until C' inverts cleanly) and decomposes W C' = U S V^T. With the
context-oriented factors V' = C'^-1 V (so that U S V'^T = W exactly) and s the LoRA scale:
- ``corda_mode="ipm"`` (instruction-previewed, the default): the r largest components, the directions the
  data's inputs make W use most, are trained;
- ``corda_mode="kpm"`` (knowledge-preserved): the r smallest, so the base keeps what the data's context uses;
A0 = sqrt(S_r / s) V'_r^T, B0 = U_r sqrt(S_r / s). The formulas, damping and normalisation are PEFT's
(``peft.tuners.lora.corda``), in float32.

What happens to W, and why (as PiSSA, inits.py, except where said):
- attach: nothing yet; the original W is recorded (on the CPU) so detach writes it back bit for bit.
- ``dt.eva_init``: A, B <- A0, B0 and W <- W_res = W - s B0 A0: the model is unchanged (within float rounding)
  and training starts on the chosen components.
- training, merge / unmerge, switched off or routed away: as PiSSA (the layer adds s B0 A0 x back when off).
- save / load: unlike PiSSA, A0 and B0 are saved next to A and B (twice a plain LoRA's checkpoint), since a
  load has no data to recompute them; loading moves the base weight to the saved residual.
- PEFT export: a plain LoRA of rank 2r against the *original* W (A' = [A; A0], B' = [B, -B0], alpha doubled),
  as PEFT's own conversion does; PEFT users load it onto the unmodified base model.

Difference from PEFT: padding tokens (``attention_mask`` 0) are left out of C, and a batch may hold several
samples (PEFT's hook takes one sample per call); on unpadded one-sample batches the two compute the same C.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch

from ...core.delta import Delta
from ...core.errors import ConfigError, StateError
from .activations import feed
from .layers import LoRAConv1D, LoRALinear

_DAMPING_TRIES = 40  # 0.01 * 2^40: any covariance is invertible long before


def corda_layers(delta: Delta) -> dict[str, LoRALinear]:
    """The delta's LoRA Linear / Conv1D wrappers with ``init="corda"``, after checking they are untrained."""
    found = {p: w for a in delta.attachments if getattr(a.config, "init", None) == "corda"
             for p, w in a.wrappers().items() if isinstance(w, LoRALinear)}
    trained = sorted(p for p, w in found.items() if not _at_start(w))
    if trained or delta.is_merged:
        raise StateError(f"dt.eva_init must run before training: the CorDA LoRA of delta {delta.name!r} moved from "
                         f"its start in {trained[:3]} (or the delta is merged). Attach a fresh LoRA first.")
    return found


def _at_start(layer: LoRALinear) -> bool:
    """Untrained: A, B still equal the CorDA start, or B still zero before any start was set."""
    if layer.init_B.any():
        return torch.equal(layer.lora_B, layer.init_B) and torch.equal(layer.lora_A, layer.init_A)
    return not layer.lora_B.any()


def corda_init(delta: Delta, batches: Iterable[Mapping[str, Any]]) -> dict[str, float]:
    """Start every ``init="corda"`` LoRA layer of ``delta`` from W and its inputs' covariance over ``batches``.

    Returns:
        Per module path, the share of the singular values of W C' that the trained components hold.
    Raises:
        ConfigError: no batch reached the layers, or r larger than a layer allows. StateError: already trained.
    """
    layers = corda_layers(delta)
    modes = {p: a.config.corda_mode for a in delta.attachments for p in a.wrappers() if p in layers}
    wide = sorted(p for p, w in layers.items() if w.r > min(w.lora_A.shape[1], w.lora_B.shape[0]))
    if wide:
        raise ConfigError(f"lora.r must be <= min(out, in) of every module for init='corda'; {wide[:3]} are "
                          f"narrower: lower r (rank_pattern) or leave them out of targets")
    covariances = input_covariances(delta, layers, batches)
    shares = {}
    for path, layer in layers.items():
        weight = layer.base_layer().weight.detach().float()
        a0, b0, shares[path] = corda_factors(weight.T if isinstance(layer, LoRAConv1D) else weight,
                                             covariances[path], layer.r, layer.scale, modes[path])
        layer.move_start(a0.to(layer.lora_A.dtype), b0.to(layer.lora_B.dtype))
    return shares


def input_covariances(delta: Delta, layers: dict[str, LoRALinear],
                      batches: Iterable[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
    """Per layer, the mean over samples of X^T X / max(X)^2 (X: a sample's unpadded input rows), float32."""
    sums: dict[str, torch.Tensor] = {}
    counts = dict.fromkeys(layers, 0)
    mask: list[torch.Tensor | None] = [None]

    def hook_for(path: str):
        def hook(module: LoRALinear, args: tuple[torch.Tensor, ...]) -> None:
            x = args[0].detach().float()
            m = mask[0]
            samples = x.reshape(-1, *x.shape[-2:]) if x.dim() > 2 else x[None]
            keep = m.reshape(-1, m.shape[-1]).bool() if m is not None and m.shape == x.shape[:-1] else None
            for i, rows in enumerate(samples):
                rows = rows[keep[i]] if keep is not None else rows
                if len(rows) == 0:
                    continue
                rows = rows / rows.max().abs()
                sums[path] = sums[path] + rows.T @ rows if path in sums else rows.T @ rows
                counts[path] += 1
        return hook

    feed(delta, layers, hook_for, batches, mask, eval_mode=True)  # no dropout in the statistics
    if set(sums) != set(layers):
        raise ConfigError("dt.eva_init got no batch (or the batches never reached the CorDA LoRA layers); pass an "
                          "iterable of model inputs, e.g. [tokenizer(texts, return_tensors='pt', padding=True)]")
    return {p: sums[p] / counts[p] for p in layers}


@torch.no_grad()
def corda_factors(weight: torch.Tensor, covariance: torch.Tensor, r: int, scale: float,
                  mode: str) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(A0 (r, in), B0 (out, r), share of singular values) from W (out, in) and the input covariance (in, in)."""
    eye = torch.eye(covariance.shape[0], dtype=covariance.dtype, device=covariance.device)
    damp, mean_diag = 0.01, covariance.diagonal().mean()
    for _ in range(_DAMPING_TRIES):
        damped = covariance + eye * mean_diag * damp
        inverse = torch.linalg.inv(damped)
        if torch.dist(damped @ inverse, eye).item() < 0.05:
            break
        damp *= 2
    else:
        raise ConfigError("CorDA: the inputs' covariance did not invert even damped; pass more, more varied batches")
    u, s, vh = torch.linalg.svd(weight @ damped, full_matrices=False)
    v = (vh @ inverse).T
    chosen = slice(0, r) if mode == "ipm" else slice(len(s) - r, len(s))
    root = torch.sqrt(s[chosen] / scale)
    share = float(s[chosen].sum() / s.sum()) if s.sum() > 0 else 0.0
    return v[:, chosen].T * root[:, None], u[:, chosen] * root[None, :], share
