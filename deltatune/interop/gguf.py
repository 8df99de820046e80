"""llama.cpp's LoRA adapter format: one GGUF file that llama.cpp loads beside its base model (``--lora``).

The layout is the one llama.cpp's own converter (``convert_lora_to_gguf.py``) writes and ``src/llama-adapter.cpp``
reads:
- metadata ``general.architecture`` (must equal the base GGUF's), ``general.type = "adapter"``,
  ``adapter.type = "lora"`` and ``adapter.lora.alpha`` (float32); llama.cpp scales each pair by
  alpha / rank, the rank read from that pair's ``lora_b``;
- per adapted weight, ``<gguf tensor name>.lora_a`` (numpy shape (r, in), GGUF ne [in, r]) and ``.lora_b``
  ((out, r), ne [r, out]); the GGUF names (``blk.0.attn_q.weight``) come from gguf-py's tensor-name map;
- Llama-style models: the HF -> GGUF converter reorders the rows of ``q_proj`` / ``k_proj`` per head
  (``LlamaModel.permute``: rope's split halves become interleaved pairs), so the base GGUF holds P W. The delta
  on that weight is then P (B A): only B's rows (the output side) follow the permutation; A is unchanged.

One alpha for the whole file: a module whose scale is not alpha / r (rsLoRA, ``alpha_pattern``) gets the ratio
folded into its B, so every module's update B A * scale is exactly what deltatune computes.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from pathlib import Path

import gguf
import numpy as np
import torch
from torch import nn

from ..core.checkpoint import write_error
from ..core.delta import Delta
from ..core.errors import StateError
from ..core.inject import Attachment, DeltaWrapper
from ..methods.lora import LoRALinear


@dataclasses.dataclass(frozen=True)
class Architecture:
    """How llama.cpp's converter treats one transformers ``model_type``."""

    gguf_arch: gguf.MODEL_ARCH
    permutes_query_key: bool  # the converter's LlamaModel.undo_permute


# transformers model_type -> llama.cpp architecture (convert_hf_to_gguf: MistralForCausalLM is registered on
# LlamaModel; Qwen2Model has no permutation)
ARCHITECTURES: dict[str, Architecture] = {
    "llama": Architecture(gguf.MODEL_ARCH.LLAMA, permutes_query_key=True),
    "mistral": Architecture(gguf.MODEL_ARCH.LLAMA, permutes_query_key=True),
    "qwen2": Architecture(gguf.MODEL_ARCH.QWEN2, permutes_query_key=False),
}
DTYPES = {"f32": (np.float32, gguf.LlamaFileType.ALL_F32), "f16": (np.float16, gguf.LlamaFileType.MOSTLY_F16)}


def permute_rows(rows: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's q/k row order: within each head, the two rope halves [h0 | h1] become pairs (h0_i, h1_i).

    ``rows`` is (n_head * head_dim, ...): a weight (out, in), a bias (out,) or a LoRA B (out, r)."""
    half = rows.shape[0] // n_head // 2
    return rows.reshape(n_head, 2, half, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def export_gguf(delta: Delta, path: str | os.PathLike, dtype: str = "f32") -> Path:
    """Write ``delta`` (one LoRA) as a llama.cpp LoRA adapter GGUF at ``path``, atomically; returns the path.

    Load it with llama.cpp beside the base model's GGUF (``llama-cli -m base.gguf --lora adapter.gguf``,
    ``llama_cpp.Llama(model_path=..., lora_path=...)``). ``dtype``: "f32" (as the converter's default) or "f16".

    Raises:
        StateError: the delta holds something a GGUF LoRA cannot (another method, DoRA, trained whole modules,
        embedding targets, an architecture without a mapping here), or ``dtype`` is unknown.
    """
    if dtype not in DTYPES:
        raise StateError(f"export_gguf: dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    arch = _architecture(delta.model)
    tensors, alpha = gguf_tensors(delta)
    numpy_dtype, file_type = DTYPES[dtype]
    target = Path(path)
    if target.is_dir():
        raise StateError(f"export_gguf: {target} is a directory; give a file path such as {target / 'adapter.gguf'}")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.tmp-", dir=target.parent)
        os.close(fd)
    except OSError as e:
        raise write_error(target, e) from e
    try:
        writer = gguf.GGUFWriter(tmp, gguf.MODEL_ARCH_NAMES[arch.gguf_arch])
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
        writer.add_name(delta.name)
        writer.add_file_type(file_type)
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        for name, tensor in tensors.items():
            writer.add_tensor(name, tensor.detach().to(torch.float32).cpu().numpy().astype(numpy_dtype))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, target)
    except OSError as e:
        os.unlink(tmp)
        raise write_error(target, e) from e
    except BaseException:
        os.unlink(tmp)
        raise
    return target


def gguf_tensors(delta: Delta) -> tuple[dict[str, torch.Tensor], float]:
    """The adapter's tensors by GGUF name (in the GGUF row order), and the one alpha the file states."""
    att = _lora_attachment(delta)
    model = delta.model
    arch = _architecture(model)
    names = gguf.get_tensor_name_map(arch.gguf_arch, model.config.num_hidden_layers)
    factors = {path: w.plain_factors() for path, w in att.wrappers().items()}  # PiSSA / OLoRA made plain
    alpha = float(att.config.alpha)
    tensors: dict[str, torch.Tensor] = {}
    for path, (a, b, r, module_alpha) in factors.items():
        name = _gguf_name(names, path)
        fold = att.config.scaling(r, module_alpha) / (alpha / a.shape[0])  # llama.cpp scales by alpha / rank
        b = b if fold == 1.0 else b * fold
        if arch.permutes_query_key and path.endswith(("q_proj", "k_proj")):
            b = permute_rows(b, _heads(model, query=path.endswith("q_proj")))
        tensors[f"{name}.lora_a"] = a
        tensors[f"{name}.lora_b"] = b
    return tensors, alpha


def _architecture(model: nn.Module) -> Architecture:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in ARCHITECTURES:
        raise StateError(f"export_gguf maps the tensor names of {sorted(ARCHITECTURES)} models to llama.cpp's; this "
                         f"model is {model_type!r}. Export with dt.export_peft and convert with llama.cpp's "
                         f"convert_lora_to_gguf.py, or merge the delta (dt.merge_and_save) and convert the model.")
    return ARCHITECTURES[model_type]


def _lora_attachment(delta: Delta) -> Attachment:
    """The one plain LoRA a GGUF adapter can hold; anything else refused with what is supported."""
    if not delta.attached:
        raise StateError(f"cannot export delta {delta.name!r}: it was detached; attach or load it again")
    if delta.train_modules:
        raise StateError(f"delta {delta.name!r} trains whole modules {sorted(delta.train_modules)[:3]} "
                         f"(train_modules); a GGUF LoRA adapter holds only lora_a / lora_b pairs. Export a delta "
                         f"without train_modules, or merge it (dt.merge_and_save) and convert the whole model.")
    methods = [a.config.method for a in delta.attachments]
    if methods != ["lora"]:
        raise StateError(f"export_gguf writes one LoRA (a GGUF adapter holds lora_a / lora_b pairs only); delta "
                         f"{delta.name!r} has {methods}. Merge it (dt.merge_and_save) and convert the model instead.")
    att = delta.attachments[0]
    if att.config.dora:
        raise StateError("export_gguf: DoRA's magnitude vector has no place in llama.cpp's LoRA adapter; merge the "
                         "delta (dt.merge_and_save) and convert the merged model instead")
    for path, wrapper in att.wrappers().items():
        if type(wrapper) is not LoRALinear or not isinstance(wrapper.base_layer(), nn.Linear):
            raise StateError(f"export_gguf supports LoRA on nn.Linear layers; {path} is a "
                             f"{type(wrapper.base_layer()).__name__}. Leave it out of the targets.")
    tied = getattr(delta.model.config, "tie_word_embeddings", False)
    output = _unwrapped(delta.model.get_output_embeddings() if hasattr(delta.model, "get_output_embeddings") else None)
    on_output = [p for p, w in att.wrappers().items() if output is not None and w.base_layer() is output]
    if tied and on_output:  # the base GGUF then has no output.weight: llama.cpp's converter refuses this too
        raise StateError(f"export_gguf: {on_output[0]} shares its weight with the token embeddings "
                         f"(tie_word_embeddings), so llama.cpp's base GGUF has no separate output tensor to adapt; "
                         f"leave the LM head out of the targets")
    return att


def _unwrapped(module: nn.Module | None) -> nn.Module | None:
    """The original layer behind a wrapper (``get_output_embeddings`` returns whatever sits at ``lm_head``)."""
    return module.base_layer() if isinstance(module, DeltaWrapper) else module


def _gguf_name(names: gguf.TensorNameMap, path: str) -> str:
    for candidate in (path, f"model.{path}"):
        name = names.get_name(candidate)
        if name is not None:
            return f"{name}.weight"
    raise StateError(f"export_gguf: {path} has no llama.cpp tensor name (gguf-py's map for this architecture); "
                     f"leave it out of the LoRA targets")


def _heads(model: nn.Module, query: bool) -> int:
    config = model.config
    heads = config.num_attention_heads
    return heads if query else (getattr(config, "num_key_value_heads", None) or heads)
