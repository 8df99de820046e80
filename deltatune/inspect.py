"""``dt.inspect(model)``: a readable view of which modules carry which delta, and what trains."""

from __future__ import annotations

from torch import nn

from .core import quant
from .core.delta import Delta, deltas_of
from .core.inject import DeltaModule, DeltaWrapper, named_base_parameters
from .core.targets import unreached_expert_banks


def _fmt(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1_000_000 else f"{n:,}"


def _layer_desc(module: nn.Module) -> str:
    layer = module.base_layer() if isinstance(module, DeltaWrapper) else module
    weight = getattr(layer, "weight", None)
    shape = "x".join(map(str, quant.logical_shape(weight))) if weight is not None else ""
    name, _, quantized = quant.describe(layer).partition(" ")  # 'Linear4bit nf4' on a quantized base
    text = f"{name}({shape})" if shape else name
    return f"{text} {quantized}" if quantized else text


def _module_rows(delta: Delta) -> list[tuple[str, str, str, int]]:
    rows = []
    for att in delta.attachments:
        for path, module in att.modules.items():
            n = sum(p.numel() for _, p in module.own_parameters())
            kind = "wraps" if isinstance(module, DeltaWrapper) else "adds"
            extra = getattr(module, "extra_summary", lambda: "")()
            rows.append((path, f"{att.slot} {kind} {_layer_desc(module)}{' ' + extra if extra else ''}", "", n))
        for name, p in att.existing.items():
            rows.append((name, f"{att.slot} trains existing {tuple(p.shape)}", "", p.numel()))
    return rows


def _tree(rows: list[tuple[str, str, str, int]]) -> list[str]:
    """Indent rows as a module tree: shared path prefixes are printed once."""
    lines, printed = [], set()
    # natural order (layer.2 before layer.10) keeps each subtree contiguous across the delta's methods
    for path, what, _, n in sorted(rows, key=lambda row: [(0, int(p), "") if p.isdigit() else (1, 0, p)
                                                          for p in row[0].split(".")]):
        parts = path.split(".")
        for depth in range(len(parts) - 1):
            prefix = ".".join(parts[: depth + 1])
            if prefix not in printed:
                printed.add(prefix)
                lines.append("  " * (depth + 2) + parts[depth])
        lines.append(f"{'  ' * (len(parts) + 1)}{parts[-1]}: {what}  [{_fmt(n)} params]")
    return lines


def inspect(model: nn.Module) -> str:
    """Describe the model's deltas: per delta its methods, state and trainable share, then a module tree
    of every attach point with the method and parameter count there."""
    base = sum(quant.numel(p) for _, p in named_base_parameters(model))  # a packed 4-bit weight: its logical size
    own = sum(p.numel() for m in model.modules() if isinstance(m, DeltaModule) for _, p in m.own_parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    table = deltas_of(model)
    lines = [f"{type(model).__name__}: {_fmt(base)} base parameters, {len(table)} delta(s) attached "
             f"({_fmt(own)} delta parameters)"]
    for name, delta in table.items():
        state = "merged" if delta.is_merged else ("active" if delta.is_active else "inactive")
        methods = " + ".join(c.describe() for c in delta.configs)
        lines.append(f"delta {name!r} [{state}]: {methods}; {delta.summary()}")
        lines.extend(_tree(_module_rows(delta)))
    unreached = unreached_expert_banks(model) if table else []
    if unreached:
        lines.append(f"not reached: the routed experts of {len(unreached)} mixture-of-experts layers ({unreached[0]}"
                     f"{', ...' if len(unreached) > 1 else ''}; fused 3-D weights): dt.LoRA(targets=[..., 'experts']) "
                     f"trains them")
    lines.append(f"requires_grad now: {trainable:,} of {base + own:,} parameters "
                 f"({100 * trainable / max(base + own, 1):.3f}%)")
    return "\n".join(lines)
