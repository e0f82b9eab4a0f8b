import numpy as np
import torch
from sklearn import metrics as skm

from duboko.evaluate import metrics as M


def test_confusion_and_report_match_sklearn():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 5, 400)
    p = np.where(rng.random(400) < 0.7, y, rng.integers(0, 5, 400))
    p[p == 4] = 3  # class 4 never predicted: precision undefined -> 0, as sklearn with zero_division=0
    cm = M.confusion_matrix(torch.tensor(y), torch.tensor(p), 5)
    np.testing.assert_array_equal(cm.numpy(), skm.confusion_matrix(y, p, labels=range(5)))
    ours = M.classification_report(cm)
    ref = skm.classification_report(y, p, labels=range(5), output_dict=True, zero_division=0)
    for c in range(5):
        for k_ours, k_ref in (("precision", "precision"), ("recall", "recall"), ("f1", "f1-score")):
            assert abs(ours[str(c)][k_ours] - ref[str(c)][k_ref]) < 1e-12
    for avg in ("macro avg", "weighted avg"):
        for k_ours, k_ref in (("precision", "precision"), ("recall", "recall"), ("f1", "f1-score")):
            assert abs(ours[avg][k_ours] - ref[avg][k_ref]) < 1e-12
    assert abs(ours["accuracy"] - skm.accuracy_score(y, p)) < 1e-12
    text = M.format_report(ours)
    assert "macro avg" in text and "weighted avg" in text
    assert M.format_confusion(cm).splitlines()[0].startswith("true \\ pred")


def test_regression_metrics_match_sklearn():
    rng = np.random.default_rng(1)
    t = rng.normal(size=200)
    p = t + rng.normal(scale=0.5, size=200)
    got = M.regression_metrics(torch.tensor(p), torch.tensor(t))
    assert abs(got["mse"] - skm.mean_squared_error(t, p)) < 1e-12
    assert abs(got["mae"] - skm.mean_absolute_error(t, p)) < 1e-12
    assert abs(got["r2"] - skm.r2_score(t, p)) < 1e-12
