"""Train room, evaluation side (issue 12): metrics in every evaluation, train.monitor / keep_best / early stopping
with exact resume, class weights and the balanced sampler, timm's Mixup/CutMix, data.test_dir, per-step logs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from sklearn.metrics import balanced_accuracy_score, f1_score
from sklearn.utils.class_weight import compute_class_weight
from torch import nn
from torch.utils.data import TensorDataset

from surgery.errors import DataError, RecipeError
from surgery.recipe import load_recipe
from surgery.train import train
from surgery.train.evaluate import Loss
from surgery.train.run_folder import plot, trim_metrics_log
from surgery.train.seeding import EpochSampler, balanced_weights
from surgery.train.state import TrainState
from surgery.train.trainer import Trainer
from tools.toydata import write_synthetic_folders


@pytest.fixture(scope="module")
def skewed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two classes, 12 and 4 training images; balanced val and test splits."""
    root = tmp_path_factory.mktemp("skewed") / "data"
    return write_synthetic_folders(root, classes=2, val_per_class=4, train_counts=[12, 4], test_per_class=3)


def _recipe(data: Path, **train_keys: object) -> dict:
    return {
        "model": {"name": "test_resnet"},
        "surgery": {"heads": {"classifier": {}}},
        "optim": {"lr": 3e-3},
        "data": {"root": str(data), "img_size": 32},
        "train": {"epochs": 3, "batch_size": 4, "seed": 1, **train_keys},
    }


def _equal(a: Path, b: Path) -> bool:
    x, y = load_file(str(a)), load_file(str(b))
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def _blobs(n: int, seed: int, minority: float = 0.5) -> TensorDataset:
    """2-D points: class 1 around (1, 1), class 0 around (-1, -1); a ``minority`` share of class 1."""
    gen = torch.Generator().manual_seed(seed)
    y = (torch.rand(n, generator=gen) < minority).long()
    x = (y.float() * 2 - 1).unsqueeze(1).repeat(1, 2) + 1.2 * torch.randn(n, 2, generator=gen)
    return TensorDataset(x, y)


def _mlp(outputs: int = 2) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, outputs))


# ------------------------------------------------------------------------------------------ every evaluation


@pytest.mark.parametrize("outputs", [2, 1])
def test_every_evaluation_reports_macro_f1_and_balanced_accuracy_as_sklearn(outputs: int) -> None:
    tr, va = _blobs(256, 0, minority=0.2), _blobs(128, 1, minority=0.3)
    model = _mlp(outputs)
    recipe = {"optim": {"lr": 0.05, "weight_decay": 0.0}, "train": {"epochs": 2, "batch_size": 32}}
    result = train(recipe, model=model, train_data=tr, val_data=va, progress=False)
    assert all({"val_macro_f1", "val_balanced_acc", "val_top1", "val_loss"} <= set(h) for h in result.history)
    with torch.no_grad():
        logits = model(va.tensors[0])
    pred = (logits.reshape(-1) > 0).long() if outputs == 1 else logits.argmax(1)
    y = va.tensors[1]
    assert result.metrics["val_macro_f1"] == pytest.approx(f1_score(y, pred, average="macro"))
    assert result.metrics["val_balanced_acc"] == pytest.approx(balanced_accuracy_score(y, pred))
    assert "val_top5" not in result.metrics  # top-5 only with more than 5 classes


# ------------------------------------------------------------------------- monitor, keep_best, early stopping


@pytest.mark.parametrize("monitor", ["val_top1", "val_loss", "val_macro_f1"])
def test_keep_best_takes_the_adapter_and_metrics_from_the_best_epoch(skewed: Path, tmp_path: Path, monitor) -> None:
    out = tmp_path / "run"
    result = train(_recipe(skewed, epochs=4, keep_best=True, monitor=monitor), output_dir=out, progress=False)
    m = json.loads((out / "metrics.json").read_text())
    values = [h[monitor] for h in m["history"]]
    pick = min if monitor.endswith("loss") else max
    best_epoch = m["history"][values.index(pick(values))]["epoch"]  # the first of equal values wins
    assert m["best"] == {"epoch": best_epoch, "stage": "stage0", "monitor": monitor, "value": pick(values)}
    assert m["selected"] == "best" and m["selected_epoch"] == best_epoch
    assert m[monitor] == pick(values) and m["val_top1"] == m["history"][best_epoch - 1]["val_top1"]
    assert json.loads((out / "best" / "best.json").read_text())["epoch"] == best_epoch
    best = load_file(str(out / "best" / "model.safetensors"))
    assert all(torch.equal(best[k], v.cpu()) for k, v in result.model.state_dict().items())  # the returned model
    adapter = load_file(str(out / "adapter.safetensors"))
    assert adapter and all(torch.equal(adapter[k], best[k]) for k in adapter if k in best)
    if best_epoch != 4:  # model.safetensors stays the last state
        assert not _equal(out / "model.safetensors", out / "best" / "model.safetensors")
    assert f"at epoch {best_epoch}; the adapter and metrics.json hold the best epoch" in (out / "train.log").read_text()


def test_without_keep_best_metrics_name_the_best_epoch_and_come_from_the_last(skewed: Path, tmp_path: Path) -> None:
    result = train(_recipe(skewed, epochs=2), output_dir=tmp_path / "run", progress=False)
    m = result.metrics
    assert m["selected"] == "last" and m["selected_epoch"] == 2 and m["best"]["monitor"] == "val_top1"
    assert m["val_top1"] == m["history"][-1]["val_top1"] and not (tmp_path / "run" / "best").exists()


@pytest.mark.parametrize(("patience", "every", "epochs"), [(1, 1, 2), (2, 1, 3), (1, 2, 4)])
def test_early_stopping_after_patience_evaluations_without_improvement(patience, every, epochs, skewed) -> None:
    """min_delta larger than any change: the first evaluation is the best, training stops `patience` later."""
    spec = {"early_stopping": {"patience": patience, "min_delta": 5.0}, "eval_every_epochs": every}
    result = train(_recipe(skewed, epochs=8, **spec), progress=False)
    assert result.metrics["stopped_early"] is True and result.metrics["epochs"] == epochs
    assert result.metrics["best"]["epoch"] == every and len(result.history) == epochs


def test_the_state_compares_by_direction_and_min_delta() -> None:
    s = TrainState()
    seq = [(1, 0.50), (2, 0.52), (3, 0.521), (4, 0.60)]
    flags = [s.observe({"epoch": e, "val_top1": v}, "val_top1", 0.005) for e, v in seq]
    assert flags == [True, True, False, True] and s.best["epoch"] == 4 and s.bad_evals == 0
    loss = TrainState()
    flags = [loss.observe({"epoch": e, "val_loss": v}, "val_loss", 0.0) for e, v in [(1, 1.0), (2, 1.0), (3, 0.9)]]
    assert flags == [True, False, True] and loss.best["value"] == 0.9


def _resume_cases(ref: Path) -> dict[str, Path]:
    picks: dict[str, Path] = {}
    for ckpt in sorted((ref / "checkpoints").iterdir()):
        s = json.loads((ckpt / "trainer_state.json").read_text())
        kind = "stopped" if s["stopped"] else "mid_epoch" if s["batch"] else "epoch_end"
        if s["best"] is not None:
            picks.setdefault(kind, ckpt)
    return picks


@pytest.mark.parametrize(
    "extra",
    [
        {"keep_best": True, "monitor": "val_loss", "early_stopping": {"patience": 2, "min_delta": 5.0}, "ema": True},
        {"keep_best": True, "mixup": 0.4, "cutmix": 1.0, "label_smoothing": 0.1, "early_stopping": {"patience": 9}},
    ],
    ids=["keep_best_early_stopping_ema", "mixup_cutmix_balanced"],
)
def test_resume_with_keep_best_and_early_stopping_equals_an_uninterrupted_run(skewed, tmp_path, extra) -> None:
    """A checkpoint copied into a fresh folder (= a kill, and no best/ beside it) resumes to the same last weights,
    the same best/ weights, adapter and metrics: mid-epoch, at an epoch end, and after early stopping."""
    recipe = _recipe(skewed, epochs=4, deterministic=True, checkpoint_every_steps=3, keep_checkpoints=50, **extra)
    if "mixup" in extra:
        recipe["data"]["sampler"] = "balanced"
    path = tmp_path / "r.json"
    path.write_text(json.dumps(recipe))
    ref = tmp_path / "ref"
    reference = train(load_recipe(path), output_dir=ref, progress=False).metrics
    picks = _resume_cases(ref)
    assert {"mid_epoch", "epoch_end"} <= set(picks)
    if "ema" in extra:
        assert reference["stopped_early"] and reference["epochs"] == 3 and "stopped" in picks
    for kind, ckpt in picks.items():
        out = tmp_path / kind
        shutil.copytree(ckpt, out / "checkpoints" / ckpt.name)
        resumed = train(load_recipe(path), output_dir=out, resume=True, progress=False).metrics
        for name in ("model.safetensors", "best/model.safetensors", "adapter.safetensors"):
            assert _equal(out / name, ref / name), (kind, name)
        timed = ("images_per_s", "epoch_seconds")
        untimed = [[{k: v for k, v in h.items() if k not in timed} for h in r["history"]] for r in (resumed, reference)]
        assert resumed["best"] == reference["best"] and untimed[0] == untimed[1], kind
        if kind != "stopped":  # (resuming after early stopping only writes the outputs)
            steps = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
            epochs = [x["epoch"] for x in steps if "epoch" in x]
            assert epochs == sorted(set(epochs)) and epochs[-1] == reference["epochs"]


def test_monitoring_needs_validation_data_and_a_metric_the_evaluation_has(skewed: Path) -> None:
    tr = _blobs(32, 0)
    with pytest.raises(RecipeError, match="train.keep_best: compares evaluations"):
        train({"train": {"keep_best": True}}, model=_mlp(), train_data=tr, progress=False)
    with pytest.raises(RecipeError, match="train.early_stopping"):
        train({"train": {"early_stopping": {"patience": 1}}}, model=_mlp(), train_data=tr, progress=False)
    with pytest.raises(RecipeError, match="train.ema: true"):
        train(_recipe(skewed, monitor="ema_val_top1"), progress=False)
    with pytest.raises(RecipeError, match="no val_top5"):  # 2 classes: top-5 is not reported
        train(_recipe(skewed, monitor="val_top5", epochs=1), progress=False)


# ---------------------------------------------------------------------------------- imbalance: weights, sampler


def _setup(recipe: dict) -> Trainer:
    trainer = Trainer(load_recipe(recipe), None, None, None, None, progress=False)
    trainer.setup_checks()
    trainer.setup()
    return trainer


def test_class_weights_auto_are_sklearns_balanced_weights_of_the_training_folders(skewed: Path) -> None:
    trainer = _setup(_recipe(skewed, class_weights="auto"))
    try:
        labels = [label for _, label in trainer.report.train]
        expected = compute_class_weight("balanced", classes=np.array([0, 1]), y=np.array(labels))
        assert torch.allclose(trainer.loss.weights, torch.tensor(expected, dtype=torch.float32))
    finally:
        trainer.cleanup()


@pytest.mark.parametrize("outputs", [2, 1])
@pytest.mark.parametrize(("weights", "predicted"), [([1.0, 0.0], 0), ([0.0, 1.0], 1)], ids=["only_0", "only_1"])
def test_class_weights_steer_training(outputs: int, weights: list[float], predicted: int) -> None:
    """A zero weight removes a class from the loss: the model ends predicting the other one everywhere."""
    if outputs == 1 and weights[0] == 0:
        weights = [1e-6, 1.0]  # one logit: pos_weight = w1 / w0
    tr, va = _blobs(256, 0), _blobs(64, 1)
    recipe = {"optim": {"lr": 0.05, "weight_decay": 0.0}, "train": {"epochs": 10, "batch_size": 32}}
    recipe["train"]["class_weights"] = weights
    model = _mlp(outputs)
    result = train(recipe, model=model, train_data=tr, val_data=va, progress=False)
    with torch.no_grad():
        logits = model(va.tensors[0])
    pred = (logits.reshape(-1) > 0).long() if outputs == 1 else logits.argmax(1)
    assert float((pred == predicted).float().mean()) > 0.95  # unweighted: about half
    assert result.metrics["class_weights"] == pytest.approx(weights)


@pytest.mark.parametrize(
    ("keys", "match"),
    [
        ({"class_weights": [1.0, 2.0, 3.0]}, "3 values but the data has 2 classes"),
        ({"class_weights": "sometimes"}, "class_weights"),
        ({"mixup": 0.2, "batch_size": 3}, "make batch_size even"),
        ({"mixup": 0.2, "class_weights": "auto"}, "data.sampler: balanced"),
    ],
)
def test_bad_imbalance_and_mixing_settings_are_one_line_errors(skewed: Path, keys: dict, match: str) -> None:
    with pytest.raises(RecipeError, match=match):
        train(_recipe(skewed, **keys), progress=False)


def _draws(sampler: EpochSampler, labels: torch.Tensor, epochs: int) -> torch.Tensor:
    out = []
    for epoch in range(epochs):
        sampler.epoch = epoch
        out += [int(labels[i]) for i in sampler]
    return torch.tensor(out, dtype=torch.float32)


def test_balanced_sampler_draws_every_class_equally_and_reproducibly(skewed: Path) -> None:
    targets = torch.tensor([0] * 90 + [1] * 10)
    sampler = EpochSampler(100, seed=3, weights=balanced_weights(targets))
    assert abs(float(_draws(sampler, targets, 20).mean()) - 0.5) < 0.05  # without weights: 0.1
    sampler.epoch = 7
    assert list(sampler) == list(sampler)  # a function of (seed, epoch): exact resume
    recipe = _recipe(skewed)
    recipe["data"]["sampler"] = "balanced"
    trainer = _setup(recipe)
    try:
        labels = torch.tensor([label for _, label in trainer.report.train])
        assert abs(float(_draws(trainer.sampler, labels, 30).mean()) - 0.5) < 0.1  # 4 of 16 images are class 1
    finally:
        trainer.cleanup()


# ------------------------------------------------------------------------------------------- mixup, smoothing


def test_mixup_and_cutmix_train_with_timms_soft_target_loss(skewed: Path, tmp_path: Path) -> None:
    from timm.loss import SoftTargetCrossEntropy

    logits, soft = torch.randn(4, 3), torch.softmax(torch.randn(4, 3), 1)
    assert torch.equal(Loss("auto", 0.1)(logits, soft), SoftTargetCrossEntropy()(logits, soft))
    smooth = Loss("auto", 0.1)(logits, torch.tensor([0, 1, 2, 0]))
    from timm.loss import LabelSmoothingCrossEntropy

    assert smooth == pytest.approx(float(LabelSmoothingCrossEntropy(0.1)(logits, torch.tensor([0, 1, 2, 0]))))
    keys = {"mixup": 0.4, "cutmix": 1.0, "label_smoothing": 0.1, "epochs": 2}
    result = train(_recipe(skewed, **keys), output_dir=tmp_path / "run", progress=False)
    assert result.metrics["steps"] == 2 * (16 // 4) and 0 <= result.metrics["val_top1"] <= 1
    probe = _recipe(skewed, mixup=0.2)
    probe["surgery"]["rules"] = [{"freeze": "*"}]
    probe["data"]["augment"] = "none"
    assert (
        "mixup"
        in train(probe | {"train": probe["train"] | {"epochs": 1}}, progress=False).metrics["feature_cache_reason"]
    )


def test_mixup_refuses_a_one_logit_model() -> None:
    recipe = {"train": {"epochs": 1, "batch_size": 8, "mixup": 0.2}}
    ds = _blobs(32, 0)
    with pytest.raises(RecipeError, match="mixup/cutmix need"):
        train(recipe, model=_mlp(1), train_data=ds, val_data=ds, progress=False)


# ---------------------------------------------------------------------------------------------- data.test_dir


def test_test_dir_is_evaluated_at_the_end_with_the_kept_weights(skewed: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    keys = {"keep_best": True, "epochs": 2}
    recipe = _recipe(skewed, **keys)
    recipe["data"]["test_dir"] = "test"
    result = train(recipe, output_dir=out, progress=False)
    m = json.loads((out / "metrics.json").read_text())
    for key in ("test_loss", "test_top1", "test_macro_f1", "test_balanced_acc"):
        assert key in m and key in result.metrics
    assert [c["support"] for c in m["test_per_class"]] == [3, 3]
    assert (out / "test_confusion.png").stat().st_size > 1000
    assert "test: test_loss" in (out / "train.log").read_text()
    assert not any(k.startswith("test_") for h in m["history"] for k in h)  # never used to pick anything


def test_test_dir_problems_are_found_before_training(skewed: Path, tmp_path: Path) -> None:
    recipe = _recipe(skewed)
    recipe["data"]["test_dir"] = "nope"
    with pytest.raises(DataError, match="data.test_dir: test folder .*nope' does not exist"):
        train(recipe, progress=False)
    odd = tmp_path / "odd"
    shutil.copytree(skewed, odd)
    shutil.rmtree(odd / "test" / "class_1")
    recipe["data"] |= {"root": str(odd), "test_dir": "test"}
    with pytest.raises(DataError, match="class folders differ"):
        train(recipe, progress=False)
    with pytest.raises(RecipeError, match="data.test_dir: a test folder needs image folders"):
        train({"data": {"test_dir": "test"}}, model=_mlp(), train_data=_blobs(8, 0), progress=False)


# ----------------------------------------------------------------------------------------------------- logs


def test_per_step_loss_and_lr_of_every_group_named_by_layer(skewed: Path, tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    recipe = _recipe(skewed, epochs=2)
    recipe["surgery"]["rules"] = [{"freeze": "*"}, {"unfreeze": "layer4", "lr_mult": 0.1}]
    result = train(recipe, output_dir=out, progress=False)
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [x for x in lines if "train/loss" in x]
    assert [x["step"] for x in steps] == list(range(1, result.metrics["steps"] + 1))
    lrs = {k: v for k, v in steps[0].items() if k.startswith("lr/")}  # timm's layers (test_resnet: layer4.0, fc)
    assert set(lrs) == {"lr/layer4.0", "lr/layer4.0_wd0", "lr/fc", "lr/fc_wd0"}, lrs  # _wd0: biases, norms
    assert lrs["lr/layer4.0"] == pytest.approx(3e-4) and lrs["lr/fc"] == pytest.approx(3e-3)
    assert [x["epoch"] for x in lines if "epoch" in x] == [1, 2]
    events = EventAccumulator(str(next((out / "logs").rglob("events.out.tfevents.*")).parent))
    events.Reload()
    assert {"train/loss", "lr/fc", "val_macro_f1"} <= set(events.Tags()["scalars"])
    assert len(events.Scalars("train/loss")) == result.metrics["steps"]


def test_resume_trims_the_log_to_the_checkpoint(tmp_path: Path) -> None:
    lines = [{"step": 1, "train/loss": 1}, {"step": 2, "train/loss": 1}, {"step": 2, "epoch": 1}]
    lines += [{"step": 3, "train/loss": 1}, {"step": 4, "train/loss": 1}, {"step": 4, "epoch": 2}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    trim_metrics_log(tmp_path, global_step=2, epoch=0)  # a checkpoint at the last update of epoch 1, not evaluated
    assert [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()] == lines[:2]


def test_learning_curve_marks_stages_and_the_best_epoch_with_integer_ticks(tmp_path: Path) -> None:
    history = [
        {"epoch": e, "stage": "head" if e <= 2 else "all", "train_loss": 1 / e, "val_loss": 1.1 / e, "val_top1": e / 5}
        for e in range(1, 6)
    ]
    fig = plot(history, tmp_path / "c.png", title="run-1: resnet18", best=4)
    ax = fig.axes[0]
    assert ax.get_title() == "run-1: resnet18" and (tmp_path / "c.png").stat().st_size > 1000
    assert all(float(t).is_integer() for t in ax.get_xticks())
    assert [line.get_xdata()[0] for line in ax.lines if line.get_linestyle() == ":"] == [2.5]
    assert any(line.get_xdata()[0] == 4 for line in fig.axes[1].lines if len(line.get_xdata()) == 2)


# ------------------------------------------------------------------------------------------------ processes

_RANK_SCRIPT = """
import hashlib, json, sys
from accelerate import PartialState
from surgery.train import train
result = train(json.load(open(sys.argv[1])), output_dir=sys.argv[2], progress=False)
state = PartialState()
sd = result.model.state_dict()
digest = hashlib.sha256(b"".join(sd[k].detach().cpu().contiguous().numpy().tobytes() for k in sorted(sd)))
open(f"{sys.argv[2]}.rank{state.process_index}", "w").write(digest.hexdigest())
"""


def test_two_processes_agree_on_the_best_epoch_and_keep_it(skewed: Path, tmp_path: Path) -> None:
    """The issue's case: two processes, metrics gathered over both, the best epoch kept and reported by every rank."""
    import hashlib
    import os
    import socket
    import subprocess
    import sys

    recipe = _recipe(skewed, epochs=4, keep_best=True, monitor="val_macro_f1", class_weights="auto")
    recipe["data"] |= {"sampler": "balanced", "test_dir": "test"}
    (tmp_path / "r.json").write_text(json.dumps(recipe))
    (tmp_path / "rank.py").write_text(_RANK_SCRIPT)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "out"
    bin_dir = Path(sys.executable).parent
    cmd = [str(bin_dir / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1"]
    cmd += ["--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port)]
    cmd += [str(tmp_path / "rank.py"), str(tmp_path / "r.json"), str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    digests = {Path(f"{out}.rank{i}").read_text() for i in range(2)}
    assert len(digests) == 1  # both ranks end on the best epoch's weights
    best = load_file(str(out / "best" / "model.safetensors"))
    assert hashlib.sha256(b"".join(best[k].numpy().tobytes() for k in sorted(best))).hexdigest() in digests
    m = json.loads((out / "metrics.json").read_text())
    values = [h["val_macro_f1"] for h in m["history"]]
    assert m["processes"] == 2 and m["selected"] == "best" and m["val_macro_f1"] == max(values)
    assert m["best"]["epoch"] == values.index(max(values)) + 1 and "test_macro_f1" in m
    assert sum(c["support"] for c in m["test_per_class"]) == 6  # gathered without the padding duplicates
