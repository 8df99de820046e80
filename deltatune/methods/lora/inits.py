"""LoRA initialisations that start A and B from the base weight itself and move that part out of it.

With W (out, in) the original weight and s the LoRA scale:
- PiSSA (Meng et al., 2024, arXiv:2404.02948): W = U S V^T; A = sqrt(S_r / s) V_r^T, B = U_r sqrt(S_r / s), so
  s B A is W's best rank-r approximation: training starts on the principal singular directions.
- OLoRA (Buyukakyuz, 2024, arXiv:2406.01775): W = Q R; B = Q_r (orthonormal columns), A = R_r (first r rows).
- CorDA (corda.py) takes A0, B0 from W and the covariance of the layer's inputs over a few batches, so it runs
  in ``dt.eva_init`` after attach, not at attach; from then on it is handled as PiSSA below, except that A0, B0
  are saved with the checkpoint (a load has no data to recompute them from).
All three then write the residual W - s B0 A0 into the base weight, so the model as a whole is unchanged at attach
(within float rounding, not bitwise: about 1e-7 relative). The same formulas as PEFT (``pissa_init``,
``olora_init``), computed in float32.

What happens to W, and why:
- attach: W <- W_res = W - s B0 A0; the original is kept on the CPU (one copy of every targeted weight) and
  written back bit for bit at detach (an ``Attachment.on_detach`` step), whatever training did.
- training: W_res stays frozen, A and B train; the layer computes W_res x + s B A x.
- merge / unmerge: W_res <-> W_res + s B A (the fine-tuned weight); detach restores the original.
- save / load: the checkpoint holds A and B only; loading re-runs the init on the (unchanged) base, which
  gives the same W_res and B0 A0 (s B0 A0 is the unique best rank-r / leading-columns projection of W, whatever
  signs the SVD or QR picks), then loads the trained A and B.
- switched off (``set_active(False)``, ``dt.route`` to None, a gate at 0): the layer adds s B0 A0 x back, so
  "off" is the original model, not the residual one.
- PEFT export: a plain LoRA of rank 2r against the *original* W, as PEFT's ``convert_pissa_to_lora``
  (``save_pretrained(path_initial_model_for_weight_conversion=...)``) does: A' = [A; A0], B' = [B, -B0] and
  alpha scaled so that s stays the same, since W + s (B A - B0 A0) = W_res + s B A.
"""

from __future__ import annotations

import torch
from torch import nn

from ...core.errors import ConfigError
from ...core.inject import Attachment

WEIGHT_INITS = ("pissa", "olora")  # A0, B0 from W alone, at attach (redone identically at load)
# A0, B0 from W and a few batches of data (corda.py), set by dt.eva_init after attach; saved with the checkpoint,
# since a load has no data to redo them from
DATA_RESIDUAL_INITS = ("corda",)
RESIDUAL_INITS = (*WEIGHT_INITS, *DATA_RESIDUAL_INITS)  # the base weight holds the residual W - s B0 A0
DATA_INITS = ("eva", *DATA_RESIDUAL_INITS)  # need dt.eva_init(delta, batches) after attach (deltatune train calls it)


def residual_factors(weight: torch.Tensor, r: int, scale: float, how: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(A0 (r, in), B0 (out, r)) in float32 from ``weight`` (out, in) for ``how`` in WEIGHT_INITS."""
    if r > min(weight.shape):
        raise ConfigError(f"lora.r must be <= min(out, in) = {min(weight.shape)} for init={how!r} (it takes r "
                          f"singular / QR directions of a {tuple(weight.shape)} weight), got {r}; lower r")
    w = weight.detach().float()
    if how == "pissa":
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        root = torch.sqrt(s[:r] / scale)
        return root[:, None] * vh[:r], u[:, :r] * root[None, :]
    q, upper = torch.linalg.qr(w)
    return upper[:r].contiguous(), q[:, :r].contiguous()


def keep_original_weight(layer: nn.Module, att: Attachment) -> None:
    """Record ``layer``'s weight so detach writes it back exactly (on the CPU: no accelerator memory)."""
    weight = layer.weight
    original = weight.detach().to("cpu", copy=True)

    @torch.no_grad()
    def restore() -> None:
        weight.copy_(original.to(weight.device))

    att.on_detach.append(restore)
