"""``model.quantization`` in a run config: load the frozen base quantized (QLoRA and beyond).

    model:
      quantization: {backend: bitsandbytes, bits: 4, quant_type: nf4, double_quant: true, compute_dtype: float32}
      # or {backend: bitsandbytes, bits: 8}, or {backend: torchao, scheme: int8}

Validated with the rest of the config, before anything loads: a backend that is not installed is a
ConfigError naming the package to install. A GGUF model (``model.gguf_file``, e.g. the offline SmolLM2)
cannot be quantized on load (transformers refuses a quantization config together with ``gguf_file``), so it
is dequantized once to float32 safetensors in the cache (``$DELTATUNE_CACHE/dequantized/<key>``) and
quantized from there; later runs reuse that copy.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, model_validator

from ..core.checkpoint import atomic_directory

log = logging.getLogger(__name__)

# backend -> (the module that must import, what to install); pins as in constraints.txt / .ci/run
INSTALL = {"bitsandbytes": ("bitsandbytes", "pip install -c constraints.txt bitsandbytes==0.50.2"),
           "torchao": ("torchao", "pip install -c constraints.txt torchao")}
TORCHAO_CONFIGS = {"int8": "Int8WeightOnlyConfig", "int4": "Int4WeightOnlyConfig"}


def require_backend(backend: str, why: str = "") -> None:
    """ValueError (reported by the config check as a ConfigError on the key) when ``backend`` is missing."""
    module, install = INSTALL[backend]
    if importlib.util.find_spec(module) is None:
        raise ValueError(f"{backend} is not installed{why}: {install}")


def adamw_8bit(groups: list[dict[str, Any]], lr: float, weight_decay: float) -> Any:
    """bitsandbytes' AdamW8bit: both moments stored in 8 bits (blockwise), for a tensor of >= 4096 elements
    (smaller ones keep 32-bit state); runs on CPU with bitsandbytes >= 0.48."""
    import bitsandbytes as bnb

    return bnb.optim.AdamW8bit(groups, lr=lr, weight_decay=weight_decay)


class QuantizationConfig(BaseModel):
    """How the frozen base is quantized on load (the delta always trains in ``compute_dtype``)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    backend: Literal["bitsandbytes", "torchao"]
    bits: Literal[4, 8] = 4            # bitsandbytes: 4 (QLoRA) or 8 (LLM.int8)
    quant_type: Literal["nf4", "fp4"] = "nf4"   # bitsandbytes 4-bit data type; nf4 is QLoRA's
    double_quant: bool = False         # bitsandbytes 4-bit: quantize the scales too (~0.4 bit/weight less)
    compute_dtype: Literal["float32", "bfloat16", "float16"] = "float32"  # 4-bit products and the delta
    scheme: Literal["int8", "int4"] | None = None  # torchao weight-only scheme (int4 needs mslk: not on CPU)

    @model_validator(mode="after")
    def _check(self) -> QuantizationConfig:
        if self.backend == "torchao" and self.scheme is None:
            raise ValueError("torchao needs a scheme: int8 (weight-only int8) or int4")
        if self.backend == "bitsandbytes" and self.scheme is not None:
            raise ValueError("scheme is a torchao setting; bitsandbytes uses bits (4 or 8) and quant_type")
        require_backend(self.backend)
        return self

    def transformers_config(self) -> Any:
        """The transformers quantization config object for ``from_pretrained``."""
        import torch

        if self.backend == "torchao":
            import torchao.quantization
            from transformers import TorchAoConfig

            return TorchAoConfig(getattr(torchao.quantization, TORCHAO_CONFIGS[self.scheme])())
        from transformers import BitsAndBytesConfig

        if self.bits == 8:
            return BitsAndBytesConfig(load_in_8bit=True)
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=self.quant_type,
                                  bnb_4bit_use_double_quant=self.double_quant,
                                  bnb_4bit_compute_dtype=getattr(torch, self.compute_dtype))


def load_kwargs(quantization: QuantizationConfig, path: str, gguf_file: str | None, device: str) -> dict[str, Any]:
    """``from_pretrained`` keyword arguments for a quantized base. For a GGUF model, also ``path`` (pass it as
    the model path): the dequantized copy in the cache."""
    kwargs: dict[str, Any] = {"quantization_config": quantization.transformers_config(), "device_map": device}
    if gguf_file:
        kwargs["path"] = str(dequantized_gguf(path, gguf_file))
    return kwargs


def _cache_root() -> Path:
    return Path(os.environ.get("DELTATUNE_CACHE") or Path.home() / ".cache" / "deltatune")


def dequantized_gguf(path: str, gguf_file: str) -> Path:
    """A float32 safetensors copy of a GGUF model (made once, then reused): what a quantized load starts from.

    The key hashes the GGUF file's path, size and modification time, so a changed file makes a new copy."""
    source = Path(path) / gguf_file
    stat = source.stat()
    key = hashlib.sha256(f"{source.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    target = _cache_root() / "dequantized" / f"{source.stem}-{key}"
    if (target / "config.json").is_file():
        return target
    import torch
    from transformers import AutoModelForCausalLM

    log.info("dequantizing %s to float32 once (transformers cannot quantize a GGUF on load): %s", source, target)
    model = AutoModelForCausalLM.from_pretrained(path, gguf_file=gguf_file, dtype=torch.float32)
    with atomic_directory(target) as tmp:
        _write_plain(model, tmp)
    return target


def _write_plain(model: Any, directory: Path) -> None:
    """``save_pretrained`` without it: transformers 5.25 refuses to save a GGUF-loaded model ("quantized with
    gguf and is not serializable"), though its weights are plain float32 by now. Tied weights are written once
    (safetensors refuses shared storage); the config's tie_word_embeddings ties them again on load."""
    import torch
    from safetensors.torch import save_file

    config = model.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    config.save_pretrained(directory)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(directory)
    seen: set[int] = set()
    tensors: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict().items():
        if tensor.data_ptr() not in seen:
            seen.add(tensor.data_ptr())
            tensors[name] = tensor.detach().contiguous()
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
