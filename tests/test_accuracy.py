"""Transfer learning on real images: scikit-learn's digits as image folders (no download).

``test_resnet`` (32x32) is first trained on digits 0-4; then, with 2 examples per class of digits 5-9, a linear probe
and a fine-tune of that model each beat the same architecture trained from scratch on the same 10 images by at least
15 points of top-1 on held-out digits 5-9, averaged over 3 seeds. The table is printed (``pytest -s`` shows it).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from surgery.train import train
from tools.toydata import write_digits_folders

SEEDS = (0, 1, 2)
SHOTS = 2
MARGIN = 0.15


def _few_shot(kind: str, data: Path, pretrained: Path, seed: int) -> dict:
    model = {"name": "test_resnet", "kwargs": {"num_classes": 5}}
    if kind != "scratch":
        model["checkpoint"] = str(pretrained)
    recipe: dict = {
        "model": model,
        "surgery": {"heads": {"classifier": {"num_classes": 5}}},
        "data": {"root": str(data), "img_size": 32, "augment": "none"},
        "train": {"batch_size": 10, "seed": seed, "eval_every_epochs": 1000},
    }
    if kind == "probe":  # backbone frozen, the head trains on cached features
        recipe["surgery"]["rules"] = [{"freeze": "*"}]
        recipe["optim"] = {"lr": 3e-2, "weight_decay": 0.0}
        recipe["train"]["epochs"] = 60
    elif kind == "finetune":  # everything trains, BatchNorm statistics kept (10 images are too few to estimate them)
        recipe["surgery"]["norm"] = "eval"
        recipe["surgery"]["heads"]["classifier"]["lr_mult"] = 10
        recipe["optim"] = {"lr": 1e-3, "weight_decay": 0.01}
        recipe["train"]["epochs"] = 25
    else:
        recipe["optim"] = {"lr": 3e-3, "weight_decay": 0.01}
        recipe["train"]["epochs"] = 25
    return train(recipe, progress=False).metrics


@pytest.mark.timeout(900)
def test_pretrained_digits_beat_scratch_at_two_shots(tmp_path: Path) -> None:
    pre = write_digits_folders(tmp_path / "pre", classes=range(5), shots_per_class=100, val_per_class=10, size=32)
    base = {
        "model": {"name": "test_resnet", "kwargs": {"num_classes": 5}},
        "optim": {"lr": 3e-3},
        "data": {"root": str(pre), "img_size": 32, "augment": "none"},
        "train": {"epochs": 5, "batch_size": 50, "seed": 0},
    }
    pretrain = train(base, output_dir=tmp_path / "pretrained", progress=False)
    assert pretrain.metrics["val_top1"] > 0.9, pretrain.metrics  # the source task is learned
    weights = tmp_path / "pretrained" / "model.safetensors"

    scores: dict[str, list[float]] = {"probe": [], "finetune": [], "scratch": []}
    for seed in SEEDS:
        few = write_digits_folders(
            tmp_path / f"few{seed}", classes=range(5, 10), shots_per_class=SHOTS, val_per_class=40, seed=seed, size=32
        )
        for kind in scores:
            scores[kind].append(_few_shot(kind, few, weights, seed)["val_top1"])
    mean = {k: sum(v) / len(v) for k, v in scores.items()}
    print(f"\ndigits 5-9, {SHOTS} shots per class, top-1 on 200 held-out images (test_resnet 32x32)")
    print(f"{'':10}" + "".join(f"seed {s:<4}" for s in SEEDS) + "mean")
    for kind, values in scores.items():
        print(f"{kind:10}" + "".join(f"{v:<9.3f}" for v in values) + f"{mean[kind]:.3f}")
    assert mean["probe"] >= mean["scratch"] + MARGIN, mean
    assert mean["finetune"] >= mean["scratch"] + MARGIN, mean
