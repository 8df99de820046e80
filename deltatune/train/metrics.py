"""Evaluation metrics in a few lines each (checked against scikit-learn in the tests).

Accuracy; F1 of class 1 for binary tasks and macro-F1 otherwise (as GLUE reports them); Matthews
correlation in its multi-class form (Gorodkin, 2004), which is CoLA's metric; perplexity = exp(mean
token loss).
"""

from __future__ import annotations

import math

import torch

LOWER_IS_BETTER = {"loss", "perplexity"}


def confusion(preds: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``C[i, j]`` = number of examples of true class i predicted as j."""
    index = labels.long() * num_classes + preds.long()
    return torch.bincount(index, minlength=num_classes * num_classes).view(num_classes, num_classes).double()


def accuracy(preds: torch.Tensor, labels: torch.Tensor) -> float:
    return (preds == labels).double().mean().item() if len(labels) else 0.0


def f1(preds: torch.Tensor, labels: torch.Tensor, num_classes: int) -> float:
    """Binary: F1 of class 1. More classes: the unweighted mean of per-class F1 (macro)."""
    c = confusion(preds, labels, num_classes)
    tp = c.diag()
    denom = c.sum(0) + c.sum(1)  # (tp + fp) + (tp + fn)
    per_class = torch.where(denom > 0, 2 * tp / denom.clamp(min=1), torch.zeros_like(tp))
    return per_class[1].item() if num_classes == 2 else per_class.mean().item()


def mcc(preds: torch.Tensor, labels: torch.Tensor, num_classes: int) -> float:
    """Matthews correlation coefficient (multi-class R_K statistic); 0 when undefined."""
    c = confusion(preds, labels, num_classes)
    n, correct = c.sum(), c.diag().sum()
    pred_totals, true_totals = c.sum(0), c.sum(1)
    cov = correct * n - (pred_totals * true_totals).sum()
    scale = math.sqrt((n * n - (pred_totals ** 2).sum()).item() * (n * n - (true_totals ** 2).sum()).item())
    return cov.item() / scale if scale > 0 else 0.0


def classification_metrics(preds: torch.Tensor, labels: torch.Tensor, num_classes: int) -> dict[str, float]:
    return {"accuracy": accuracy(preds, labels), "f1": f1(preds, labels, num_classes),
            "mcc": mcc(preds, labels, num_classes)}


def perplexity(mean_loss: float) -> float:
    return math.exp(min(mean_loss, 700.0))  # exp overflows a float past ~709


def is_better(metric: str, value: float, best: float | None) -> bool:
    if best is None:
        return True
    return value < best if metric in LOWER_IS_BETTER else value > best
