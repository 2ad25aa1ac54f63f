"""surgery.metrics: every number checked against scikit-learn, class weights, the confusion PNG and predictions CSV."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from sklearn.metrics import (
    balanced_accuracy_score,
    confusion_matrix,
    f1_score,
    log_loss,
    precision_recall_fscore_support,
    top_k_accuracy_score,
)
from sklearn.utils.class_weight import compute_class_weight

from surgery.errors import DataError, RecipeError
from surgery.metrics import (
    MetricsAccumulator,
    class_weights,
    read_predictions_csv,
    write_confusion_png,
    write_predictions_csv,
)


def _softmax64(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64) - logits.max(1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(1, keepdims=True)


def _check_against_sklearn(logits: torch.Tensor, y: torch.Tensor, binary: bool = False) -> None:
    """Feed everything at once and compare each metric with scikit-learn's."""
    acc = MetricsAccumulator()
    acc.update(logits, y)
    r = acc.compute()
    yt = y.numpy()
    scores = logits.numpy()
    if binary:
        c = 2
        yp = (scores.reshape(-1) > 0).astype(int)
        p1 = 1 / (1 + np.exp(-scores.reshape(-1).astype(np.float64)))
        proba = np.stack([1 - p1, p1], 1)
    else:
        c = scores.shape[1]
        yp = scores.argmax(1)
        proba = _softmax64(scores)
    labels = np.arange(c)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sklearn warns about absent classes; we check its numbers, not its warnings
        p, rc, f, s = precision_recall_fscore_support(yt, yp, labels=labels, zero_division=0)
        bal = balanced_accuracy_score(yt, yp)
        macro = f1_score(yt, yp, average="macro", zero_division=0)
        loss = log_loss(yt, proba, labels=labels)
    assert r.num_classes == c and r.num_samples == len(yt) and r.binary is binary
    assert r.confusion == confusion_matrix(yt, yp, labels=labels).tolist()
    assert r.top1 == pytest.approx(float((yt == yp).mean()), abs=1e-12)
    np.testing.assert_allclose(r.precision, p, atol=1e-12)
    np.testing.assert_allclose(r.recall, rc, atol=1e-12)
    np.testing.assert_allclose(r.f1, f, atol=1e-12)
    assert r.support == s.tolist()
    assert r.macro_f1 == pytest.approx(macro, abs=1e-12)
    assert r.balanced_accuracy == pytest.approx(bal, abs=1e-12)
    assert r.loss == pytest.approx(loss, rel=1e-9)
    if c > 5:
        assert r.top5 == pytest.approx(top_k_accuracy_score(yt, proba, k=5, labels=labels), abs=1e-12)
    else:
        assert r.top5 is None and "val_top5" not in r.scalars()
    values = [r.loss, r.top1, r.macro_f1, r.balanced_accuracy, *r.precision, *r.recall, *r.f1]
    assert all(math.isfinite(v) for v in values)


def _random(n: int, c: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, c, (n,), generator=g)
    logits = torch.randn(n, c, generator=g)
    logits[torch.arange(n), y] += 1.0  # better than chance, so every metric is away from 0
    return logits, y


def test_random_ten_classes_match_sklearn() -> None:
    _check_against_sklearn(*_random(300, 10))


def test_one_class_missing_from_targets_and_predictions() -> None:
    logits, y = _random(200, 8, seed=1)
    y[y == 3] = 4
    logits[:, 3] = -100.0  # class 3 neither occurs nor is predicted
    _check_against_sklearn(logits, y)
    r = MetricsAccumulator()
    r.update(logits, y)
    res = r.compute()
    assert (res.precision[3], res.recall[3], res.f1[3], res.support[3]) == (0.0, 0.0, 0.0, 0)
    # macro-F1 leaves the absent class out, as sklearn's f1_score(average="macro") without labels= does
    assert res.macro_f1 == pytest.approx(np.mean([f for i, f in enumerate(res.f1) if i != 3]))


def test_all_predictions_one_class() -> None:
    logits, y = _random(120, 6, seed=2)
    logits[:, 2] += 15.0  # every argmax; still above the probability floor sklearn's log_loss clips to
    _check_against_sklearn(logits, y)


def test_two_classes_have_no_top5() -> None:
    _check_against_sklearn(*_random(64, 2, seed=3))


def test_thousand_classes() -> None:
    _check_against_sklearn(*_random(1500, 1000, seed=4))


@pytest.mark.parametrize("shape", [(50,), (50, 1)])
def test_binary_one_logit_matches_sklearn(shape: tuple[int, ...]) -> None:
    g = torch.Generator().manual_seed(5)
    y = torch.randint(0, 2, (50,), generator=g)
    logits = (torch.randn(50, generator=g) + (y.float() - 0.5) * 2).reshape(shape)
    _check_against_sklearn(logits, y, binary=True)


def test_batches_equal_one_shot() -> None:
    logits, y = _random(257, 12, seed=6)
    whole = MetricsAccumulator()
    whole.update(logits, y)
    parts = MetricsAccumulator()
    for start, size in [(0, 1), (1, 31), (32, 100), (132, 0), (132, 125)]:
        parts.update(logits[start : start + size], y[start : start + size])
    a, b = whole.compute(), parts.compute()
    assert a.loss == pytest.approx(b.loss, rel=1e-12)
    assert {k: v for k, v in a.to_dict().items() if k != "loss"} == {
        k: v for k, v in b.to_dict().items() if k != "loss"
    }


def test_equal_logits_predict_the_first_class_everywhere() -> None:
    """A zero-initialised head gives equal logits: argmax, confusion matrix and the CSV's top-k must agree."""
    acc = MetricsAccumulator(class_names=list("abcdefg"), keep_predictions=True)
    acc.update(torch.zeros(4, 7), torch.tensor([0, 3, 5, 6]))
    r = acc.compute()
    assert [row[0] for row in r.confusion] == [1, 0, 0, 1, 0, 1, 1]
    assert r.top1 == 0.25 and r.top5 == 0.5  # classes a..e are the top 5
    preds = acc.predictions(["w", "x", "y", "z"])
    assert [p.predicted for p in preds] == ["a"] * 4
    assert [label for label, _ in preds[0].topk] == list("abcde")


def test_float_targets_from_bce_are_accepted() -> None:
    acc = MetricsAccumulator(loss="bce")
    acc.update(torch.tensor([2.0, -1.0, 0.5]), torch.tensor([1.0, 0.0, 0.0]))
    assert acc.compute().confusion == [[1, 1], [0, 1]]


def test_errors() -> None:
    acc = MetricsAccumulator()
    with pytest.raises(DataError, match="no samples were evaluated"):
        acc.compute()
    with pytest.raises(DataError, match=r"target class 4 is outside the model's 3 classes \(0..2\)"):
        acc.update(torch.zeros(2, 3), torch.tensor([0, 4]))
    with pytest.raises(DataError, match="the model has 3 outputs for 4 classes"):
        MetricsAccumulator(num_classes=4).update(torch.zeros(2, 3), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="loss bce needs one logit"):
        MetricsAccumulator(loss="bce").update(torch.zeros(2, 3), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="fractional"):
        MetricsAccumulator().update(torch.zeros(2, 3), torch.tensor([0.5, 1.0]))
    ok = MetricsAccumulator()
    ok.update(torch.zeros(2, 3), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="do not match earlier batches"):
        ok.update(torch.zeros(2, 4), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="keep_predictions=True"):
        ok.predictions(["a", "b"])


def test_scalars_and_per_class() -> None:
    acc = MetricsAccumulator(class_names=["cat", "dog"])
    acc.update(torch.tensor([[2.0, 0.0], [0.0, 1.0], [3.0, 0.0]]), torch.tensor([0, 1, 1]))
    r = acc.compute()
    assert set(r.scalars()) == {"val_loss", "val_top1", "val_macro_f1", "val_balanced_acc"}
    assert r.scalars("test_")["test_top1"] == pytest.approx(2 / 3)
    assert r.per_class()[1] == {
        "class": "dog",
        "precision": 1.0,
        "recall": 0.5,
        "f1": pytest.approx(2 / 3),
        "support": 2,
    }


# ------------------------------------------------------------------------------------------------ class weights


def test_class_weights_auto_is_sklearn_balanced() -> None:
    counts = [50, 5, 20, 1]
    y = np.repeat(np.arange(4), counts)
    expected = compute_class_weight("balanced", classes=np.arange(4), y=y)
    np.testing.assert_allclose(class_weights(counts).numpy(), expected, rtol=1e-6)
    np.testing.assert_allclose(class_weights({"a": 50, "b": 5, "c": 20, "d": 1}, "auto").numpy(), expected, rtol=1e-6)
    assert class_weights(counts, "none") is None
    assert class_weights(counts, [1, 2.5, 0, 1]).tolist() == [1.0, 2.5, 0.0, 1.0]


@pytest.mark.parametrize(
    ("counts", "mode", "message"),
    [
        ([3, 4], [1.0], r"^train.class_weights has 1 values but the data has 2 classes; give one weight per class"),
        ([3, 4], [1.0, -2.0], r"^train.class_weights\[1\] \(class '1'\) is -2.0; weights must be finite numbers >= 0$"),
        ([3, 4], [1.0, float("nan")], r"^train.class_weights\[1\] \(class '1'\) is nan;"),
        ([3, 4], [True, 1.0], r"^train.class_weights\[0\] \(class '0'\) is True;"),
        ([3, 4], [0, 0], r"^train.class_weights are all 0"),
        (
            {"cat": 3, "dog": 0},
            "auto",
            r"^train.class_weights: auto cannot weight class 'dog' with no training samples;",
        ),
        ([3, 4], "balanced", r"^train.class_weights must be auto, none or a list of numbers, got 'balanced'$"),
    ],
)
def test_class_weights_errors(counts, mode, message: str) -> None:
    with pytest.raises(RecipeError, match=message) as info:
        class_weights(counts, mode)
    assert "\n" not in str(info.value)


# ------------------------------------------------------------------------------------------------------ writers


@pytest.mark.parametrize("classes", [2, 12, 50, 120])
def test_confusion_png(tmp_path, classes: int) -> None:
    from PIL import Image

    rng = np.random.default_rng(classes)
    cm = rng.integers(0, 30, (classes, classes))
    cm[0] = 0  # a class without samples must not break the row normalisation
    out = write_confusion_png(cm, [f"class_{i}" for i in range(classes)], tmp_path / "cm.png", title="run 1")
    data = out.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 5_000
    with Image.open(out) as img:
        img.verify()
    with Image.open(out) as img:
        width, height = img.size
    assert 400 <= height <= 3100 and width > height  # grows with the class count, capped
    assert [p.name for p in tmp_path.iterdir()] == ["cm.png"]  # no temporary file left behind


def test_confusion_png_shape_mismatch(tmp_path) -> None:
    with pytest.raises(ValueError, match=r"shape \(2, 2\) for 3 class names"):
        write_confusion_png([[1, 0], [0, 1]], ["a", "b", "c"], tmp_path / "cm.png")


def test_predictions_csv_round_trips(tmp_path) -> None:
    names = ["plain", 'with,comma "quoted"', "colon:pipe|", "ünïcode", "x", "y"]
    acc = MetricsAccumulator(class_names=names, keep_predictions=True)
    logits, y = _random(9, 6, seed=7)
    acc.update(logits[:4], y[:4])
    acc.update(logits[4:], y[4:])
    paths = [f"imgs/{i}, odd name.png" for i in range(9)]
    rows = acc.predictions(paths)
    assert [r.path for r in rows] == paths
    assert [r.target for r in rows] == [names[i] for i in y.tolist()]
    assert [r.predicted for r in rows] == [names[i] for i in logits.argmax(1).tolist()]
    probs = logits.softmax(1)
    assert rows[0].probability == pytest.approx(float(probs[0].max()))
    assert len(rows[0].topk) == 5 and rows[0].topk[0] == (rows[0].predicted, rows[0].probability)
    out = write_predictions_csv(rows, tmp_path / "predictions.csv")
    back = read_predictions_csv(out)
    assert len(back) == 9
    for a, b in zip(rows, back, strict=True):
        assert (a.path, a.target, a.predicted, a.correct) == (b.path, b.target, b.predicted, b.correct)
        assert b.probability == pytest.approx(a.probability, rel=1e-5)
        assert [label for label, _ in a.topk] == [label for label, _ in b.topk]
        assert [p for _, p in b.topk] == pytest.approx([p for _, p in a.topk], rel=1e-5)
    header = out.read_text(encoding="utf-8").splitlines()[0]
    assert header == "path,true_label,predicted_label,probability,correct,top_k"


def test_predictions_csv_binary(tmp_path) -> None:
    acc = MetricsAccumulator(class_names=["ok", "defect"], keep_predictions=True)
    acc.update(torch.tensor([[1.5], [-0.5]]), torch.tensor([1, 1]))
    rows = acc.predictions(["a.png", "b.png"])
    assert [(r.predicted, r.correct) for r in rows] == [("defect", True), ("ok", False)]
    assert rows[1].probability == pytest.approx(1 - 1 / (1 + math.exp(0.5)))
    write_predictions_csv(rows, tmp_path / "p.csv")
    back = read_predictions_csv(tmp_path / "p.csv")
    assert [(b.path, b.target, b.predicted) for b in back] == [("a.png", "defect", "defect"), ("b.png", "defect", "ok")]
    assert [label for label, _ in back[1].topk] == ["ok", "defect"]


def test_read_predictions_rejects_other_csv(tmp_path) -> None:
    (tmp_path / "x.csv").write_text("path,label\na.png,cat\n", encoding="utf-8")
    with pytest.raises(DataError, match="not a predictions file"):
        read_predictions_csv(tmp_path / "x.csv")


def test_after_gather_for_metrics_and_as_json() -> None:
    """The trainer's path: Accelerate's gather_for_metrics output (uneven last batch) fed as it comes."""
    import json

    from accelerate import Accelerator

    logits, y = _random(23, 7, seed=8)
    dataset = torch.utils.data.TensorDataset(logits, y)
    accelerator = Accelerator()  # same settings as the trainer on one process, so the shared state agrees
    loader = accelerator.prepare(torch.utils.data.DataLoader(dataset, batch_size=5))
    acc = MetricsAccumulator(class_names=[f"c{i}" for i in range(7)])
    for batch_logits, batch_y in loader:
        acc.update(*accelerator.gather_for_metrics((batch_logits, batch_y)))
    ref = MetricsAccumulator(num_classes=7)
    ref.update(logits, y)
    assert acc.compute().confusion == ref.compute().confusion and acc.compute().num_samples == 23
    data = json.loads(json.dumps(acc.compute().to_dict()))
    assert data["class_names"][6] == "c6" and data["top5"] == pytest.approx(ref.compute().top5)
