"""cellfm_sc.metrics: exact metrics against scikit-learn, donor aggregation, evaluation."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import warnings

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cellfm_sc import metrics as M

skm = pytest.importorskip("sklearn.metrics")


def _close(a: float, b: float) -> bool:
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    return math.isclose(a, b, rel_tol=1e-10, abs_tol=1e-12)


def _random_case(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, int]:
    """Codes over K classes where some classes are absent from y_true and/or y_pred."""
    k = int(rng.integers(2, 7))
    n = int(rng.integers(1, 60))
    true_classes = rng.choice(k, size=int(rng.integers(1, k + 1)), replace=False)
    pred_classes = rng.choice(k, size=int(rng.integers(1, k + 1)), replace=False)
    y_true = rng.choice(true_classes, size=n)
    y_pred = rng.choice(pred_classes, size=n)
    # sometimes make predictions mostly right
    if rng.random() < 0.5:
        keep = rng.random(n) < 0.7
        y_pred = np.where(keep, y_true, y_pred)
    return y_true, y_pred, k


def _check_against_sklearn(y_true: np.ndarray, y_pred: np.ndarray, k: int) -> None:
    labels = np.arange(k)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = {
            "accuracy": skm.accuracy_score(y_true, y_pred),
            "balanced_accuracy": skm.balanced_accuracy_score(y_true, y_pred),
            "macro_f1": skm.f1_score(y_true, y_pred, average="macro", zero_division=0),
            "weighted_f1": skm.f1_score(y_true, y_pred, average="weighted", zero_division=0),
            "macro_f1_all": skm.f1_score(
                y_true, y_pred, average="macro", labels=labels, zero_division=0
            ),
            "weighted_f1_all": skm.f1_score(
                y_true, y_pred, average="weighted", labels=labels, zero_division=0
            ),
            "qwk": skm.cohen_kappa_score(y_true, y_pred, weights="quadratic", labels=labels),
            "mae": skm.mean_absolute_error(y_true, y_pred),
        }
        ref_cm = skm.confusion_matrix(y_true, y_pred, labels=labels)
    ours = {
        "accuracy": M.accuracy(y_true, y_pred),
        "balanced_accuracy": M.balanced_accuracy(y_true, y_pred),
        "macro_f1": M.macro_f1(y_true, y_pred),
        "weighted_f1": M.weighted_f1(y_true, y_pred),
        "macro_f1_all": M.macro_f1(y_true, y_pred, labels=range(k)),
        "weighted_f1_all": M.weighted_f1(y_true, y_pred, labels=range(k)),
        "qwk": M.quadratic_weighted_kappa(y_true, y_pred, n_classes=k),
        "mae": M.ordinal_mae(y_true, y_pred),
    }
    for name, value in ref.items():
        assert _close(ours[name], float(value)), (name, ours[name], value, y_true, y_pred)
    cm = M.confusion_matrix(y_true, y_pred, n_classes=k)
    assert cm.shape == (k, k)
    np.testing.assert_array_equal(cm, ref_cm)


def test_metrics_equal_sklearn_on_random_inputs_with_absent_classes() -> None:
    rng = np.random.default_rng(20240601)
    for _ in range(300):
        _check_against_sklearn(*_random_case(rng))


@settings(max_examples=150, deadline=None)
@given(
    st.integers(2, 6).flatmap(
        lambda k: st.tuples(
            st.just(k),
            st.lists(st.tuples(st.integers(0, k - 1), st.integers(0, k - 1)), min_size=1),
        )
    )
)
def test_metrics_equal_sklearn_hypothesis(case: tuple[int, list[tuple[int, int]]]) -> None:
    k, pairs = case
    y_true = np.array([a for a, _ in pairs])
    y_pred = np.array([b for _, b in pairs])
    _check_against_sklearn(y_true, y_pred, k)


def test_qwk_default_equals_sklearn_when_all_classes_seen() -> None:
    rng = np.random.default_rng(1)
    y_true = rng.integers(0, 4, 200)
    y_pred = np.clip(y_true + rng.integers(-1, 2, 200), 0, 3)
    assert _close(
        M.quadratic_weighted_kappa(y_true, y_pred),
        skm.cohen_kappa_score(y_true, y_pred, weights="quadratic"),
    )


def test_qwk_uses_code_distance_for_absent_middle_class() -> None:
    # level 1 is absent: codes 0 and 2 are two steps apart, not one
    y_true = [0, 0, 2, 2]
    y_pred = [0, 2, 2, 0]
    ours = M.quadratic_weighted_kappa(y_true, y_pred, n_classes=3)
    assert _close(
        ours, skm.cohen_kappa_score(y_true, y_pred, weights="quadratic", labels=[0, 1, 2])
    )


def test_degenerate_inputs_match_sklearn() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = skm.cohen_kappa_score([1, 1, 1], [1, 1, 1], weights="quadratic")
    assert math.isnan(ref)
    assert math.isnan(M.quadratic_weighted_kappa([1, 1, 1], [1, 1, 1]))
    assert math.isnan(M.quadratic_weighted_kappa([1, 1, 1], [1, 1, 1], n_classes=4))
    assert M.accuracy([2, 2], [2, 2]) == 1.0
    assert math.isnan(M.spearman([1, 1, 1], [0, 1, 2]))
    for fn in (M.accuracy, M.balanced_accuracy, M.macro_f1, M.ordinal_mae):
        assert math.isnan(fn([], []))


def test_spearman_matches_scipy() -> None:
    from scipy.stats import spearmanr

    rng = np.random.default_rng(3)
    for _ in range(20):
        a, b = rng.integers(0, 4, 50), rng.integers(0, 4, 50)
        assert _close(M.spearman(a, b), float(spearmanr(a, b).statistic))


def test_input_validation() -> None:
    with pytest.raises(ValueError, match="differ in length"):
        M.accuracy([0, 1], [0])
    with pytest.raises(ValueError, match="negative"):
        M.accuracy([0, -1], [0, 1])
    with pytest.raises(ValueError, match="integer class codes"):
        M.accuracy(["a", "b"], ["a", "b"])
    with pytest.raises(ValueError, match="n_classes=2"):
        M.confusion_matrix([0, 2], [0, 1], n_classes=2)


# --------------------------------------------------------------------------------------------
# donor aggregation: a hand-built case with a known answer for each method
# --------------------------------------------------------------------------------------------

# cells listed out of donor order on purpose: the output must be sorted by donor
_DONORS = ["c", "a", "b", "a", "c", "a", "d", "b"]
_PROB = np.array(
    [
        [0.1, 0.2, 0.7],  # c: votes 2
        [0.6, 0.3, 0.1],  # a: votes 0
        [0.5, 0.0, 0.5],  # b: tie -> votes 0
        [0.1, 0.5, 0.4],  # a: votes 1
        [0.6, 0.3, 0.1],  # c: votes 0
        [0.2, 0.45, 0.35],  # a: votes 1
        [0.5, 0.5, 0.0],  # d: tie -> votes 0
        [0.5, 0.0, 0.5],  # b: votes 0
    ]
)
_MEAN = {
    "a": [0.3, 1.25 / 3, 0.85 / 3],
    "b": [0.5, 0.0, 0.5],
    "c": [0.35, 0.25, 0.4],
    "d": [0.5, 0.5, 0.0],
}
_EXPECTED = {
    # mean probability argmax (ties -> lowest index)
    "mean_probability": {"a": 1, "b": 0, "c": 2, "d": 0},
    # most votes (c: one vote each for 0 and 2 -> lowest index 0)
    "majority": {"a": 1, "b": 0, "c": 0, "d": 0},
    # floor(sum k p_k + 0.5): a 0.983 -> 1, b 1.0 -> 1, c 1.05 -> 1, d 0.5 -> 1 (half up)
    "expected_rank": {"a": 1, "b": 1, "c": 1, "d": 1},
}


@pytest.mark.parametrize("method", ["mean_probability", "majority", "expected_rank"])
def test_aggregate_by_donor_hand_case(method: str) -> None:
    agg = M.aggregate_by_donor(_PROB, _DONORS, method=method)
    assert agg.index.tolist() == ["a", "b", "c", "d"]
    assert agg.index.name == "donor"
    assert list(agg.columns) == [0, 1, 2, "predicted", "n_cells"]
    assert agg["n_cells"].tolist() == [3, 2, 2, 1]
    assert agg["predicted"].tolist() == [_EXPECTED[method][d] for d in "abcd"]
    if method == "majority":
        fractions = {"a": [1 / 3, 2 / 3, 0], "b": [1, 0, 0], "c": [0.5, 0, 0.5], "d": [1, 0, 0]}
        np.testing.assert_allclose(agg[[0, 1, 2]].to_numpy(), [fractions[d] for d in "abcd"])
    else:
        np.testing.assert_allclose(agg[[0, 1, 2]].to_numpy(), [_MEAN[d] for d in "abcd"])


def test_aggregate_by_donor_with_class_names() -> None:
    agg = M.aggregate_by_donor(_PROB, _DONORS, method="majority", classes=["lo", "mid", "hi"])
    assert list(agg.columns) == ["lo", "mid", "hi", "predicted", "n_cells"]
    assert agg["predicted"].tolist() == ["mid", "lo", "lo", "lo"]
    with pytest.raises(ValueError, match="clash"):
        M.aggregate_by_donor(_PROB, _DONORS, classes=["predicted", "b", "c"])
    with pytest.raises(ValueError, match="method"):
        M.aggregate_by_donor(_PROB, _DONORS, method="median")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="one entry per cell"):
        M.aggregate_by_donor(_PROB, _DONORS[:-1])


# --------------------------------------------------------------------------------------------
# evaluate_predictions
# --------------------------------------------------------------------------------------------


def test_evaluate_predictions_hand_case() -> None:
    classes = ["Not AD", "Low", "High"]
    prob = np.array(
        [
            [0.7, 0.2, 0.1],  # d1 true 0 -> 0
            [0.6, 0.3, 0.1],  # d1 true 0 -> 0
            [0.2, 0.3, 0.5],  # d2 true 1 -> 2 (wrong)
            [0.1, 0.8, 0.1],  # d2 true 1 -> 1
            [0.2, 0.6, 0.2],  # d2 true 1 -> 1
            [0.1, 0.2, 0.7],  # d3 true 2 -> 2
            [0.5, 0.1, 0.4],  # d3 true 0 (mixed donor) -> 0
        ]
    )
    y = np.array([0, 0, 1, 1, 1, 2, 0])
    donors = ["d1", "d1", "d2", "d2", "d2", "d3", "d3"]
    names = [f"cell{i}" for i in range(7)]
    res = M.evaluate_predictions(prob, y, classes, obs_names=names, donors=donors, ordinal=True)

    # no cell dropped, exact cell-weighted accuracy
    assert res.cell_metrics["n_cells"] == 7
    assert res.cell_metrics["accuracy"] == pytest.approx(6 / 7)
    pred = prob.argmax(1)
    assert res.cell_metrics["qwk"] == pytest.approx(
        skm.cohen_kappa_score(y, pred, weights="quadratic", labels=[0, 1, 2])
    )
    assert res.cell_metrics["ordinal_mae"] == pytest.approx(1 / 7)
    np.testing.assert_array_equal(res.confusion, skm.confusion_matrix(y, pred, labels=[0, 1, 2]))

    # predictions table
    p = res.predictions
    assert p.index.name == "obs_name" and p.index.tolist() == names
    assert list(p.columns) == [
        "donor",
        "true",
        "predicted",
        "confidence",
        "p_Not AD",
        "p_Low",
        "p_High",
    ]
    assert p["predicted"].tolist()[2] == "High"
    assert p["true"].cat.categories.tolist() == classes and p["true"].cat.ordered
    np.testing.assert_allclose(p["confidence"], prob.max(1))

    # donor table: d3 has labels {2, 0} with one cell each -> majority tie -> lowest code 0
    d = res.donor_table
    assert d is not None and d.index.tolist() == ["d1", "d2", "d3"]
    assert list(d.columns[:3]) == ["true", "predicted", "n_cells"]
    assert d["true"].tolist() == ["Not AD", "Low", "Not AD"]
    # d2 mean = [0.1667, 0.5667, 0.2667] -> Low; d3 mean = [0.3, 0.15, 0.55] -> High
    assert d["predicted"].tolist() == ["Not AD", "Low", "High"]
    assert d["n_cells"].tolist() == [2, 3, 2]
    np.testing.assert_allclose(
        d.loc["d3", ["p_Not AD", "p_Low", "p_High"]].astype(float), [0.3, 0.15, 0.55]
    )
    assert res.donor_metrics is not None
    assert res.donor_metrics["n_donors"] == 3
    assert res.donor_metrics["accuracy"] == pytest.approx(2 / 3)
    assert res.donor_metrics["ordinal_mae"] == pytest.approx(2 / 3)
    assert any("different labels" in n and "d3" in n for n in res.notes)

    # to_dict is strict JSON; __str__ is a readable table
    text = json.dumps(res.to_dict(), allow_nan=False)
    assert "donor_metrics" in text
    s = str(res)
    assert "accuracy" in s and "donor" in s and "qwk" in s


def test_evaluate_predictions_without_donors_and_nan_metrics_become_null() -> None:
    prob = np.array([[0.9, 0.1], [0.8, 0.2]])
    res = M.evaluate_predictions(prob, [0, 0], ["a", "b"], ordinal=True)
    assert res.donor_table is None and res.donor_metrics is None
    assert "donor" not in res.predictions.columns
    assert math.isnan(res.cell_metrics["qwk"])  # one class only: undefined, like sklearn
    d = res.to_dict()
    assert d["cell_metrics"]["qwk"] is None
    json.dumps(d, allow_nan=False)


def test_evaluate_predictions_validation() -> None:
    with pytest.raises(ValueError, match="only 2 classes"):
        M.evaluate_predictions(np.full((2, 2), 0.5), [0, 2], ["a", "b"])
    with pytest.raises(ValueError, match=r"\(n_cells, 3\)"):
        M.evaluate_predictions(np.full((2, 2), 0.5), [0, 1], ["a", "b", "c"])


def test_import_is_light() -> None:
    code = (
        "import sys, cellfm_sc.metrics; "
        "bad = [m for m in ('sklearn', 'matplotlib', 'scanpy', 'torch') if m in sys.modules]; "
        "print(bad)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_majority_donor_table_holds_fractions() -> None:
    res = M.evaluate_predictions(
        _PROB,
        np.zeros(len(_PROB), dtype=int),
        ["x", "y", "z"],
        donors=_DONORS,
        donor_method="majority",
    )
    assert res.donor_table is not None
    assert res.donor_table["predicted"].tolist() == ["y", "x", "x", "x"]
    np.testing.assert_allclose(
        res.donor_table.loc["a", ["p_x", "p_y", "p_z"]].astype(float), [1 / 3, 2 / 3, 0]
    )
    assert isinstance(res.donor_table, pd.DataFrame)
