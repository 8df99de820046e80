"""Metrics against scikit-learn's reference implementations, plus the edge cases that make them undefined."""

from __future__ import annotations

import math

import pytest
import torch

from deltatune.train.metrics import accuracy, classification_metrics, confusion, f1, is_better, mcc, perplexity

sklearn_metrics = pytest.importorskip("sklearn.metrics")


@pytest.mark.parametrize("classes, seed", [(2, 0), (2, 1), (3, 2), (5, 3)])
def test_metrics_match_scikit_learn(classes, seed):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, classes, (200,), generator=g)
    preds = torch.where(torch.rand(200, generator=g) < 0.6, labels, torch.randint(0, classes, (200,), generator=g))
    y, p = labels.numpy(), preds.numpy()
    assert accuracy(preds, labels) == pytest.approx(sklearn_metrics.accuracy_score(y, p))
    average = "binary" if classes == 2 else "macro"
    assert f1(preds, labels, classes) == pytest.approx(sklearn_metrics.f1_score(y, p, average=average))
    assert mcc(preds, labels, classes) == pytest.approx(sklearn_metrics.matthews_corrcoef(y, p))


def test_confusion_counts_true_rows_predicted_columns():
    c = confusion(torch.tensor([0, 1, 1, 2]), torch.tensor([0, 0, 1, 2]), 3)
    assert c.tolist() == [[1, 1, 0], [0, 1, 0], [0, 0, 1]]


def test_undefined_cases_are_zero_not_nan():
    labels = torch.tensor([0, 1, 0, 1])
    constant = torch.zeros(4, dtype=torch.long)
    assert mcc(constant, labels, 2) == 0.0  # sklearn also returns 0 here
    assert f1(constant, labels, 2) == 0.0
    assert classification_metrics(labels, labels, 2) == {"accuracy": 1.0, "f1": 1.0, "mcc": 1.0}
    assert mcc(1 - labels, labels, 2) == pytest.approx(-1.0)


def test_perplexity_and_direction():
    assert perplexity(math.log(7.0)) == pytest.approx(7.0)
    assert math.isfinite(perplexity(1e6))
    assert is_better("accuracy", 0.9, 0.8) and not is_better("accuracy", 0.7, 0.8)
    assert is_better("perplexity", 3.0, 4.0) and is_better("loss", 0.1, None)


def test_a_constant_answer_is_warned_about(caplog):
    from deltatune.train.loop import warn_if_collapsed

    labels = torch.tensor([0, 1, 1, 1])
    with caplog.at_level("WARNING", logger="deltatune.train.loop"):
        warn_if_collapsed(torch.tensor([1, 1, 1, 1]), labels, ["unacceptable", "acceptable"])
    assert "all 4 evaluation predictions are class 'acceptable' (75% of the labels)" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="deltatune.train.loop"):
        warn_if_collapsed(torch.tensor([1, 0, 1, 1]), labels, ["unacceptable", "acceptable"])  # two classes
        warn_if_collapsed(torch.tensor([1, 1]), torch.tensor([1, 1]), ["no", "yes"])  # one class in the labels
    assert caplog.text == ""
