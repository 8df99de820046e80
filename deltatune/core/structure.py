"""Where things are in a transformer, found from the module tree instead of per-architecture tables.

Adapters, IA3 and BitFit place themselves relative to the attention and feed-forward sublayers of each
transformer block. This module finds those from structure alone, so one rule serves BERT, Llama, GPT-2
and most other transformers models:

- the *blocks* are the children of the outermost ``nn.ModuleList`` whose children all share one class
  and contain Linear/Conv1D layers (``encoder.layer``, ``model.layers``, ``transformer.h``);
- in a block, an *attention* module is an outermost non-Linear submodule with "attn"/"attention" in
  its name or class name that contains linear layers (``attention``, ``self_attn``, ``attn``);
  its *output projection* is its last linear layer named like one (``attention.output.dense``, ``o_proj``,
  ``c_proj``), else its last linear layer (Phi-3 registers ``o_proj`` before its fused ``qkv_proj``);
- the block's other linear layers form the *feed-forward* path, in registration order: the first one
  reads the FFN input (``intermediate.dense``, ``gate_proj``, ``c_fc``), the last one is the FFN output
  (down) projection (``output.dense``, ``down_proj``, ``mlp.c_proj``);
- key / value projections are attention linears named like keys/values (``key``, ``k_proj``, ``k``, ...);
  an attention module without them has a *fused* input projection (GPT-2 ``c_attn``).

- in a mixture-of-experts block the routed experts are fused 3-D weights, not Linear layers
  (``core.layers.ExpertBank``): the block's *MoE module* (``mlp``, the parent of ``mlp.experts``) stands for the
  feed-forward sublayer, and its experts module is recorded too.

When a model does not fit (no repeated blocks, an FFN that does not map back to the hidden size), a TargetError
says so and asks for explicit ``targets``.
"""

from __future__ import annotations

import dataclasses
import re

from torch import nn

from .errors import TargetError
from .inject import named_base_modules
from .layers import ExpertBank, linear_types
from .targets import layer_index

_ATTENTION = re.compile(r"attn|attention", re.IGNORECASE)
# Leaf names used for key / value projections across transformers (BERT, Llama/OPT/BART, T5, DistilBERT, ...)
KEY_NAMES = frozenset({"key", "k_proj", "k", "k_lin", "wk", "key_proj"})
VALUE_NAMES = frozenset({"value", "v_proj", "v", "v_lin", "wv", "value_proj"})
# Leaf names of attention output projections (BERT ``output.dense``, Llama ``o_proj``, BART ``out_proj``, GPT-2
# ``c_proj``, T5 ``o``, DistilBERT ``out_lin``, DeBERTa ``output.dense``)
OUTPUT_NAMES = frozenset({"dense", "o_proj", "out_proj", "c_proj", "o", "out_lin", "wo", "out"})


@dataclasses.dataclass(frozen=True)
class Block:
    """One transformer block, as full dotted module paths (original names, wrappers transparent)."""

    path: str
    attention: tuple[str, ...]        # outermost attention modules (two in a cross-attention decoder block)
    attention_linears: tuple[str, ...]
    attention_outputs: tuple[str, ...]  # the output projection of each attention module
    keys: tuple[str, ...]
    values: tuple[str, ...]
    fused_qkv: tuple[str, ...]        # input projections of attention modules without separate k/v
    ffn: tuple[str, ...]              # feed-forward linears in registration order (empty in a MoE block)
    moe: str | None = None            # the mixture-of-experts module standing for the FFN (``mlp``), if any
    experts: str | None = None        # its routed experts (fused 3-D weights, ``mlp.experts``)

    @property
    def ffn_input(self) -> str:
        return self.ffn[0]

    @property
    def ffn_output(self) -> str:
        return self.ffn[-1]


def features(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a Linear, or of a Conv1D (whose weight is stored (in, out))."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    rows, cols = module.weight.shape
    return rows, cols


def _under(path: str, parents: list[str]) -> bool:
    return any(path.startswith(p + ".") for p in parents)


def _block_paths(modules: dict[str, nn.Module]) -> list[str]:
    linears = [p for p, m in modules.items() if isinstance(m, linear_types())]
    blocks: list[str] = []
    for path, module in modules.items():
        if not isinstance(module, nn.ModuleList) or len(module) == 0 or _under(path, blocks):
            continue
        children = [f"{path}.{i}" if path else str(i) for i in range(len(module))]
        if len({type(modules[c]) for c in children}) == 1 and any(_under(p, children) for p in linears):
            blocks.extend(children)
    return blocks


def _attention_modules(inner: dict[str, nn.Module], linears: list[str]) -> list[str]:
    found: list[str] = []
    for name, module in inner.items():
        if isinstance(module, linear_types()) or _under(name, found):
            continue
        leaf = name.rsplit(".", 1)[-1]
        if (_ATTENTION.search(leaf) or _ATTENTION.search(type(module).__name__)) and _under_any(linears, name):
            found.append(name)
    return found


def _under_any(linears: list[str], parent: str) -> bool:
    return any(p.startswith(parent + ".") for p in linears)


def _describe_block(path: str, modules: dict[str, nn.Module]) -> Block:
    inner = {p: m for p, m in modules.items() if p.startswith(path + ".")}
    linears = [p for p, m in inner.items() if isinstance(m, linear_types())]
    attention = _attention_modules(inner, linears)
    att_linears = [p for p in linears if _under(p, attention)]
    outputs = [_output_projection([p for p in att_linears if p.startswith(a + ".")]) for a in attention]
    leaf = {p: p.rsplit(".", 1)[-1] for p in att_linears}
    keys = [p for p in att_linears if leaf[p] in KEY_NAMES]
    values = [p for p in att_linears if leaf[p] in VALUE_NAMES]
    fused = [p for a in attention if not any(k.startswith(a + ".") for k in keys + values)
             for p in att_linears if p.startswith(a + ".") and p not in outputs]
    ffn = [p for p in linears if p not in att_linears]
    banks = [p for p, m in inner.items() if isinstance(m, ExpertBank)]
    experts = banks[0] if banks and not ffn else None
    return Block(path, tuple(attention), tuple(att_linears), tuple(outputs), tuple(keys), tuple(values),
                 tuple(fused), tuple(ffn), experts.rpartition(".")[0] if experts else None, experts)


def _output_projection(linears: list[str]) -> str:
    named = [p for p in linears if p.rsplit(".", 1)[-1] in OUTPUT_NAMES]
    return (named or linears)[-1]


def block_paths(model: nn.Module) -> list[str]:
    """Dotted paths of the transformer blocks (the repeated layers) of ``model``; empty when it has none.
    Used to shard by block (train/sharding.py), where attention and FFN details do not matter."""
    return _block_paths(dict(named_base_modules(model)))


def transformer_blocks(model: nn.Module, method: str = "delta", layers: list[int] | None = None) -> list[Block]:
    """Every transformer block of ``model`` with its attention and feed-forward parts.

    Raises TargetError when the model has no repeated blocks, or a block has no attention module or
    no feed-forward path mapping back to the attention output size: pass explicit targets then.
    """
    modules = dict(named_base_modules(model))
    paths = _block_paths(modules)
    if not paths:
        raise TargetError(f"{method}: found no transformer blocks in {type(model).__name__} (no ModuleList of "
                          f"repeated layers containing Linear/Conv1D); pass targets=[...] to place it explicitly")
    blocks = [_describe_block(p, modules) for p in paths]
    for block in blocks:
        _check_block(block, modules, method)
    if layers is not None:
        blocks = [b for b in blocks if layer_index(b.path) in set(layers)]
        if not blocks:
            raise TargetError(f"{method}: layers={list(layers)} selects no block; this model has blocks "
                              f"{[layer_index(p) for p in paths]}")
    return blocks


def _check_block(block: Block, modules: dict[str, nn.Module], method: str) -> None:
    if not block.attention:
        raise TargetError(f"{method}: block {block.path} has no recognisable attention module (a submodule named "
                          f"like 'attn'/'attention' holding Linear layers); pass targets=[...] explicitly")
    if block.moe is not None:
        return
    if not block.ffn:
        raise TargetError(f"{method}: block {block.path} has no feed-forward Linear layers outside attention; "
                          f"pass targets=[...] explicitly")
    hidden = features(modules[block.attention_outputs[0]])[1]
    ffn_in, ffn_out = features(modules[block.ffn_input])[0], features(modules[block.ffn_output])[1]
    if ffn_in != hidden or ffn_out != hidden:
        raise TargetError(f"{method}: the feed-forward path of {block.path} ({block.ffn_input} .. {block.ffn_output}"
                          f") does not map the hidden size {hidden} back to itself (got {ffn_in} -> {ffn_out}); "
                          f"this architecture needs explicit targets=[...]")
