"""Tabular data: bundled sets offline, CSV files, train-only standardisation, clear errors."""

import numpy as np
import pytest

from duboko.data.tabular import Standardizer, load_table, make_splits, split_indices
from duboko.errors import DubokoError


def test_bundled_sets_load_offline():
    digits = load_table("digits")
    assert digits.features.shape == (1797, 64) and digits.problem == "classification"
    assert len(digits.class_names) == 10
    cancer = load_table("breast-cancer")
    assert cancer.features.shape == (569, 30) and cancer.problem == "binary"
    assert cancer.class_names == ["malignant", "benign"]
    diabetes = load_table("diabetes")
    assert diabetes.features.shape == (442, 10) and diabetes.problem == "regression"
    assert diabetes.target.dtype == np.float64


def test_positive_labels_make_a_binary_target():
    t = load_table("digits", positive_labels=["1", "3", "5", "7", "9"])
    raw = load_table("digits")
    assert t.problem == "binary"
    np.testing.assert_array_equal(t.target, (raw.target % 2 == 1).astype(np.int64))
    with pytest.raises(DubokoError, match="not labels"):
        load_table("digits", positive_labels=["11"])


def test_split_is_a_seeded_partition():
    a = split_indices(100, 0.15, 0.2, seed=3)
    b = split_indices(100, 0.15, 0.2, seed=3)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    allidx = np.concatenate([a["train"], a["val"], a["test"]])
    assert sorted(allidx.tolist()) == list(range(100))
    assert (len(a["test"]), len(a["val"])) == (20, 15)
    with pytest.raises(DubokoError, match="val_fraction"):
        split_indices(100, 0.5, 0.6, seed=0)


def test_standardisation_uses_train_statistics_only():
    table = load_table("diabetes")
    splits = make_splits(table, 0.15, 0.2, seed=0)
    idx = split_indices(len(table.target), 0.15, 0.2, 0)
    train = table.features[idx["train"]]
    np.testing.assert_allclose(splits.x_scaler.mean, train.mean(axis=0))
    np.testing.assert_allclose(splits.x_scaler.std, train.std(axis=0))
    x = splits.x["train"].double().numpy()
    np.testing.assert_allclose(x.mean(axis=0), 0, atol=1e-6)
    np.testing.assert_allclose(x.std(axis=0), 1, atol=1e-5)
    # the test split is scaled with the train statistics, so it is not exactly centred
    assert abs(splits.x["test"].double().numpy().mean()) > 1e-4
    # the regression target is standardised too and can be mapped back
    y = splits.y_scaler.inverse(splits.y["test"].double().numpy()[:, None])[:, 0]
    np.testing.assert_allclose(y, table.target[idx["test"]], rtol=1e-5)


def test_constant_column_does_not_divide_by_zero():
    s = Standardizer.fit(np.array([[1.0, 5.0], [3.0, 5.0]]))
    np.testing.assert_allclose(s.transform(np.array([[2.0, 5.0]])), [[0.0, 0.0]])


def _write(path, text):
    path.write_text(text, encoding="utf-8")
    return str(path)


def test_csv_regression_and_text_labels(tmp_path):
    p = _write(tmp_path / "h.csv", "size,rooms,price\n50,2,100.5\n70,3,150.25\n90,4,180.0\n40,1,90.0\n")
    t = load_table("csv", p, "price")
    assert t.problem == "regression" and t.feature_names == ["size", "rooms"]
    np.testing.assert_allclose(t.target, [100.5, 150.25, 180.0, 90.0])
    p2 = _write(tmp_path / "c.csv", "a,b,label\n1,2,cat\n2,3,dog\n3,1,cat\n")
    t2 = load_table("csv", p2, "label")
    assert t2.problem == "binary" and t2.class_names == ["cat", "dog"]
    assert t2.target.tolist() == [0, 1, 0]


def test_csv_errors_are_clear(tmp_path):
    with pytest.raises(DubokoError, match="does not exist"):
        load_table("csv", str(tmp_path / "missing.csv"), "y")
    p = _write(tmp_path / "d.csv", "a,b,y\n1,2,3\n4,5,6\n")
    with pytest.raises(DubokoError, match="no column 'price'.*a, b, y"):
        load_table("csv", p, "price")
    bad = _write(tmp_path / "bad.csv", "a,b,y\n1,two,3\n4,5,6\n")
    with pytest.raises(DubokoError, match="line 2, column 'b' is not a number: 'two'"):
        load_table("csv", bad, "y")
    with pytest.raises(DubokoError, match="data.target"):
        load_table("csv", p, "")
    with pytest.raises(DubokoError, match="expected one of"):
        load_table("iris")
