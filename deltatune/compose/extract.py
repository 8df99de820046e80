"""LoRA extraction: turn a full fine-tune into a LoRA delta by truncated SVD of W_ft - W_base per module.

The best rank-r approximation of each update (Eckart-Young) becomes that module's ``B A`` with scaling 1;
the share of ||W_ft - W_base||_F^2 it keeps is reported per module. An update of rank <= r is recovered
exactly (up to float rounding). Parameters that changed outside the targets (biases, LayerNorms, the task
head) cannot be expressed as LoRA: they are listed in the report and logged, never silently dropped.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..core.checkpoint import fingerprint
from ..core.delta import Delta, deltas_of
from ..core.errors import BaseModelMismatchError, ConfigError, StateError
from ..core.inject import named_base_modules, named_base_parameters
from ..core.layers import linear_types
from ..core.targets import Targets, find_targets
from .algebra import Factors, attach_factors, retained_energy

log = logging.getLogger(__name__)


def _update(base: nn.Module, tuned: nn.Module) -> torch.Tensor:
    """W_ft - W_base in the (out, in) layout that LoRA's ``B @ A`` uses (see methods/lora/layers.py)."""
    diff = tuned.weight.detach().float() - base.weight.detach().float()
    _, conv1d = linear_types()
    return diff.T if isinstance(base, (conv1d, nn.Embedding)) else diff


def _svd_factors(update: torch.Tensor, r: int) -> tuple[Factors, torch.Tensor]:
    u, s, vh = torch.linalg.svd(update, full_matrices=False)
    k = min(r, s.numel())
    root = s[:k].sqrt()
    return (u[:, :k] * root, root[:, None] * vh[:k]), s


def _check_pair(base_model: nn.Module, tuned_model: nn.Module) -> None:
    if fingerprint(base_model)["shapes_sha256"] != fingerprint(tuned_model)["shapes_sha256"]:
        raise BaseModelMismatchError(f"extract_lora: the fine-tuned model ({type(tuned_model).__name__}) does not "
                                     f"have the base model's ({type(base_model).__name__}) parameter names and "
                                     f"shapes; extract from a fine-tune of this very base")
    merged = [d.name for d in deltas_of(base_model).values() if d.is_merged]
    if merged:
        raise StateError(f"extract_lora: deltas {merged} are merged into the base model's weights; unmerge them first")


def _uncaptured(base_model: nn.Module, tuned_model: nn.Module, paths: list[str]) -> list[str]:
    """Names of changed parameters that are not the weights of the extracted modules."""
    covered = {f"{p}.weight" for p in paths}
    tuned = dict(named_base_parameters(tuned_model))
    return [n for n, p in named_base_parameters(base_model)
            if n not in covered and not torch.equal(p.detach(), tuned[n].detach())]


def extract_lora(base_model: nn.Module, finetuned_model: nn.Module, r: int = 16, targets: Targets = "all-linear",
                 name: str = "extracted") -> Delta:
    """Attach to ``base_model`` a LoRA delta (named ``name``) approximating ``finetuned_model``; return it.

    Only target modules whose weight changed get a LoRA (rank min(r, out, in)). The delta's
    ``extraction_report`` maps each target path to ``{"rank", "retained_energy", "norm"}`` (``norm`` =
    ||W_ft - W_base||_F; unchanged modules have rank 0) and ``"uncaptured"`` to the changed parameters
    LoRA cannot hold.

    Raises:
        ConfigError: bad r. TargetError: targets match nothing. BaseModelMismatchError: different models.
        StateError: nothing changed in the targets, or a delta is merged into ``base_model``.
    """
    if not isinstance(r, int) or r <= 0:
        raise ConfigError(f"extract_lora r must be a positive integer, got {r!r}")
    _check_pair(base_model, finetuned_model)
    paths = find_targets(base_model, targets, (*linear_types(), nn.Embedding), method="extract_lora")
    tuned = dict(named_base_modules(finetuned_model))
    base = dict(named_base_modules(base_model))
    factors: dict[str, Factors] = {}
    report: dict[str, Any] = {}
    for path in paths:
        update = _update(base[path], tuned[path])
        norm = float(update.norm())
        if norm == 0.0:
            report[path] = {"rank": 0, "retained_energy": 1.0, "norm": 0.0}
            continue
        factors[path], s = _svd_factors(update, r)
        report[path] = {"rank": factors[path][1].shape[0], "retained_energy": retained_energy(s, r), "norm": norm}
    if not factors:
        raise StateError(f"extract_lora: the fine-tuned model's weights equal the base's in all {len(paths)} "
                         f"target modules; nothing to extract (check targets, or that the models differ)")
    report["uncaptured"] = _uncaptured(base_model, finetuned_model, list(factors))
    delta = attach_factors(base_model, factors, name)
    delta.extraction_report = report
    _log_report(report)
    return delta


def _log_report(report: dict[str, Any]) -> None:
    for path, row in report.items():
        if path != "uncaptured" and row["rank"]:
            log.info("extract_lora %s: rank %d keeps %.4f of the update's energy", path, row["rank"],
                     row["retained_energy"])
    if report["uncaptured"]:
        log.warning("extract_lora: %d changed parameters are not targets and are NOT in the LoRA delta: %s",
                    len(report["uncaptured"]), report["uncaptured"][:8])


def _load_pretrained(path: str | os.PathLike) -> nn.Module:
    """Load a saved transformers model with the class its config names (falls back to AutoModel)."""
    import transformers

    config = transformers.AutoConfig.from_pretrained(path)
    names = getattr(config, "architectures", None) or []
    cls = getattr(transformers, names[0], None) if names else None
    return (cls or transformers.AutoModel).from_pretrained(path, use_safetensors=True).eval()  # never unpickle


def extract_to_directory(base: str | os.PathLike, finetuned: str | os.PathLike, out: str | os.PathLike,
                         r: int = 16, targets: Targets = "all-linear") -> dict[str, Any]:
    """What ``deltatune extract BASE FINETUNED --r R --out DIR`` does: load both models, extract, save.

    Returns the extraction report (the CLI prints it).
    """
    base_model = _load_pretrained(base)
    delta = extract_lora(base_model, _load_pretrained(finetuned), r=r, targets=targets)
    delta.save(Path(out))
    return delta.extraction_report


def format_report(report: dict[str, Any]) -> str:
    """The extraction report as text: one line per extracted module, then the uncaptured parameters."""
    rows = [(p, v) for p, v in report.items() if p != "uncaptured" and v["rank"]]
    lines = [f"{path}: rank {row['rank']}, retained energy {row['retained_energy']:.4f}" for path, row in rows]
    skipped = sum(1 for p, v in report.items() if p != "uncaptured" and not v["rank"])
    if skipped:
        lines.append(f"{skipped} target module(s) unchanged (no LoRA needed)")
    if report["uncaptured"]:
        lines.append(f"NOT captured (changed, but not LoRA targets): {', '.join(report['uncaptured'])}")
    return "\n".join(lines)
