"""The paper's metrics, on plain Python lists (no numpy needed), for `facellava eval`.

An answer that could not be parsed counts as wrong for the classification metrics (its prediction is None,
which matches no label) and is left out of the age MAE (whose coverage is reported beside it).
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence


def accuracy(predictions: Sequence[Hashable | None], labels: Sequence[Hashable]) -> float:
    """Fraction of predictions equal to their label."""
    _check(predictions, labels)
    return sum(p == y for p, y in zip(predictions, labels, strict=True)) / len(labels)


def unweighted_average_recall(predictions: Sequence[Hashable | None], labels: Sequence[Hashable]) -> float:
    """UAR: the mean over the classes present in the labels of each class's recall."""
    _check(predictions, labels)
    classes = sorted(set(labels), key=str)
    recalls = []
    for c in classes:
        indices = [i for i, y in enumerate(labels) if y == c]
        recalls.append(sum(predictions[i] == c for i in indices) / len(indices))
    return sum(recalls) / len(recalls)


def weighted_average_recall(predictions: Sequence[Hashable | None], labels: Sequence[Hashable]) -> float:
    """WAR: per-class recall weighted by class frequency, which is overall accuracy."""
    return accuracy(predictions, labels)


def mean_absolute_error(predictions: Sequence[float | None], labels: Sequence[float]) -> tuple[float, float]:
    """Age MAE over the parsed predictions, and the fraction parsed. NaN MAE when none was parsed."""
    _check(predictions, labels)
    pairs = [(p, y) for p, y in zip(predictions, labels, strict=True) if p is not None]
    if not pairs:
        return float("nan"), 0.0
    return sum(abs(p - y) for p, y in pairs) / len(pairs), len(pairs) / len(labels)


def f1_per_class(predicted_sets: Sequence[set], label_sets: Sequence[set],
                 classes: Sequence[Hashable]) -> dict[Hashable, float]:
    """Binary F1 of each class (e.g. each AU) over the samples: 2TP / (2TP + FP + FN); 0 when undefined."""
    _check(predicted_sets, label_sets)
    scores = {}
    for c in classes:
        tp = sum(c in p and c in y for p, y in zip(predicted_sets, label_sets, strict=True))
        fp = sum(c in p and c not in y for p, y in zip(predicted_sets, label_sets, strict=True))
        fn = sum(c not in p and c in y for p, y in zip(predicted_sets, label_sets, strict=True))
        scores[c] = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0
    return scores


def mean_attribute_accuracy(predictions: Sequence[dict[str, bool]], labels: Sequence[dict[str, bool]],
                            attributes: Sequence[str]) -> tuple[float, dict[str, float]]:
    """CelebA's metric: each attribute's accuracy over the samples, and their mean."""
    _check(predictions, labels)
    per = {a: sum(p[a] == y[a] for p, y in zip(predictions, labels, strict=True)) / len(labels)
           for a in attributes}
    return sum(per.values()) / len(per), per


def _check(predictions: Sequence, labels: Sequence) -> None:
    if len(predictions) != len(labels):
        raise ValueError(f"{len(predictions)} predictions for {len(labels)} labels")
    if not labels:
        raise ValueError("no samples")
