"""LoftQ-style initialisation, ``dt.LoRA(init="loftq")`` (after Li et al., 2023, arXiv:2310.08659).

On a quantized base the model starts away from the full-precision one by the quantization error
E = W - deq(Q(W)). Here the LoRA factors start at the best rank-r approximation of E (truncated SVD), so
base + delta starts as close to W as rank r allows: s * B A = U_r S_r V_r^T. This is one LoftQ step with the
base kept as loaded (LoftQ proper alternates SVD and requantizing W - B A, which would rewrite the base).

The full-precision W is no longer in a model loaded in 4 bits: it is read, layer by layer, from the
checkpoint the model was loaded from (``model.config._name_or_path``: its ``*.safetensors``). A model loaded
from an already-quantized checkpoint has no full-precision weights to read, and is refused.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from ...core import quant
from ...core.errors import AttachError


def checkpoint_files(model: nn.Module) -> dict[str, Path]:
    """Tensor name -> safetensors file of the checkpoint ``model`` was loaded from."""
    source = Path(getattr(getattr(model, "config", None), "_name_or_path", "") or "")
    index = source / "model.safetensors.index.json"
    if index.is_file():
        return {k: source / f for k, f in json.loads(index.read_text())["weight_map"].items()}
    single = source / "model.safetensors"
    if single.is_file():
        with safe_open(single, "pt") as f:
            return dict.fromkeys(f.keys(), single)
    raise AttachError(f"lora init='loftq' reads the full-precision weights from the checkpoint the model was loaded "
                      f"from, but {str(source)!r} holds no model.safetensors; load the model from a local "
                      f"directory of safetensors, or use init='kaiming'")


def full_precision_weight(files: dict[str, Path], path: str) -> torch.Tensor:
    key = f"{path}.weight"
    if key not in files:
        raise AttachError(f"lora init='loftq': the checkpoint has no tensor {key!r}; use init='kaiming'")
    with safe_open(files[key], "pt") as f:
        weight = f.get_tensor(key)
    if not weight.is_floating_point() or weight.dim() != 2:
        raise AttachError(f"lora init='loftq': {key} in the checkpoint is stored quantized ({weight.dtype}, "
                          f"{tuple(weight.shape)}); load the base from its full-precision checkpoint")
    return weight.float()


@torch.no_grad()
def init_from_quantization_error(wrapper: nn.Module, weight: torch.Tensor) -> float:
    """Set A and B so that s * B A is the rank-r truncated SVD of W - deq(Q(W)). Returns the share of the
    error's (Frobenius) norm that remains, 0 = all of it removed."""
    layer = wrapper.base_layer()
    error = weight - quant.dequantized_weight(layer, torch.float32)
    u, s, vh = torch.linalg.svd(error, full_matrices=False)
    r, scale = wrapper.r, wrapper.scale
    root = (s[:r] / scale).sqrt()
    wrapper.lora_B.copy_(u[:, :r] * root)
    wrapper.lora_A.copy_(root[:, None] * vh[:r])
    kept = (s[r:] ** 2).sum().sqrt()
    return (kept / error.norm()).item() if error.norm() > 0 else 0.0


def init_loftq(model: nn.Module, wrappers: dict[str, nn.Module]) -> dict[str, float]:
    """LoftQ-initialise every wrapper (path -> wrapper); returns the remaining error share per path."""
    unquantized = sorted(p for p, w in wrappers.items() if not quant.is_quantized(w.base_layer()))
    if unquantized:
        raise AttachError(f"lora init='loftq' starts the factors at the quantization error, but {unquantized[:3]} "
                          f"are not quantized (their error is 0, and factors of 0 get no gradient); target "
                          f"quantized layers only, or use init='kaiming'")
    files = checkpoint_files(model)
    return {path: init_from_quantization_error(w, full_precision_weight(files, path)) for path, w in wrappers.items()}
