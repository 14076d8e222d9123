"""The one fidelity module: its figures, and the one way figures are judged against limits (NaN never passes)."""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest

from facellava.export import fidelity


def test_compare_and_worst() -> None:
    rng = np.random.default_rng(0)
    reference = rng.standard_normal((2, 256, 64)).astype(np.float32)
    actual = reference.copy()
    actual[1, 7] = -actual[1, 7]  # one token points the other way
    figures = fidelity.compare(actual, reference)
    assert figures["min_token_cosine"] == pytest.approx(-1.0)
    flipped = float(np.sum(reference[1, 7].astype(np.float64) ** 2) / np.sum(reference.astype(np.float64) ** 2))
    assert figures["cosine"] == pytest.approx(1 - 2 * flipped) and figures["cosine"] < 0.999
    assert figures["max_abs"] == pytest.approx(2 * np.abs(reference[1, 7]).max())
    assert figures["rel_err"] == pytest.approx(2 * np.linalg.norm(reference[1, 7]) / np.linalg.norm(reference))
    cosines = fidelity.token_cosines(actual, reference)
    assert cosines.shape == (512,) and (cosines > 0.999999).sum() == 511
    same = fidelity.compare(reference, reference)
    assert same["rel_err"] == 0.0 and same["cosine"] == pytest.approx(1.0)
    assert fidelity.worst([figures, same]) == {"cosine": figures["cosine"], "min_token_cosine": -1.0,
                                               "max_abs": figures["max_abs"], "rel_err": figures["rel_err"]}
    with pytest.raises(ValueError, match="differs from the reference"):
        fidelity.compare(actual[:1], reference)


def test_kl_divergence() -> None:
    p = np.array([[2.0, 0.0, -1.0], [0.0, 0.0, 0.0]])
    q = np.array([[0.0, 2.0, -1.0], [0.0, 0.0, 0.0]])
    kl = fidelity.kl_divergence(p, q)
    sp, sq = np.exp(p[0]) / np.exp(p[0]).sum(), np.exp(q[0]) / np.exp(q[0]).sum()
    assert kl[0] == pytest.approx(float((sp * np.log(sp / sq)).sum()))
    assert kl[1] == 0.0 and kl[0] > 0.5
    # shifting every logit of a row changes nothing
    assert fidelity.kl_divergence(p + 100.0, q - 7.0) == pytest.approx(kl)


def test_judge_names_each_miss_and_records_the_verdict() -> None:
    figures = {"top1_agreement": 0.41, "mean_kl": 0.5, "greedy_identical": 3, "tokenization_mismatches": 0}
    misses = fidelity.judge(figures, {"top1_agreement_min": 0.6, "mean_kl_max": 0.3, "greedy_identical_min": 5,
                                      "tokenization_mismatches_max": 0})
    assert misses == ["top-1 agreement 0.410 < 0.6", "mean KL 0.5 > 0.3",
                      "greedy decodes identical to PyTorch's 3 < 5"]
    assert figures["passed"] is False and figures["limits"]["mean_kl_max"] == 0.3
    # a limit on its edge passes
    edge = {"rel_err": 1e-4, "cosine": 0.999}
    assert fidelity.judge(edge, {"rel_err_max": 1e-4, "cosine_min": 0.999}) == [] and edge["passed"] is True


def test_judge_fails_nan_anywhere() -> None:
    """NaN compares false both ways, so a check written as `value > limit` would let it pass."""
    limited = {"mean_kl": math.nan, "top1_agreement": 0.9}
    assert fidelity.judge(limited, {"mean_kl_max": 0.3, "top1_agreement_min": 0.5}) == [
        "mean KL is nan (limit <= 0.3)"]
    assert limited["passed"] is False
    unlimited = {"cosine": 1.0, "max_abs": math.inf}
    assert fidelity.judge(unlimited, {"cosine_min": 0.999}) == ["max-abs error is inf"]
    absent = {"cosine": 1.0}
    assert fidelity.judge(absent, {"rel_err_max": 1e-4}) == ["relative error is None (limit <= 0.0001)"]
    with pytest.raises(ValueError, match="_min or <figure>_max"):
        fidelity.judge({"cosine": 1.0}, {"cosine": 0.99})


def test_describe_limits() -> None:
    assert fidelity.describe_limits({"rel_err_max": 1e-4, "cosine_min": 0.999}) == "rel_err <= 0.0001, cosine >= 0.999"


def test_importable_without_torch() -> None:
    """The engine build on a device judges its figures where torch is not installed."""
    code = ("import sys; import facellava.export.fidelity, facellava.export.parity; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)
