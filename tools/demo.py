"""The main job end to end (``make demo``): pretrain, publish, few-shot surgery with every built-in recipe, push,
reload from the hub in a fresh process, and a results table with plots.

1. Start the project's own hub server (unless ``HF_ENDPOINT`` is set) and stop it at the end.
2. Pretrain ``test_resnet`` (32x32) on scikit-learn's digits 0-4, written as image folders.
3. Publish it on the hub as a timm-format base model (``timm.create_model("hf-hub:...")`` loads it).
4. On digits 5-9 with 2, 5 and 20 examples per class, run linear probe, full fine-tuning, layer-wise decay and
   gradual unfreezing against that base, and the same architecture from scratch.
5. Push each result, then load each back from the hub in a fresh process and evaluate it on held-out digits.
6. Print the results table and write it, a plot of top-1 against examples per class and the learning curves.

The job runs as three processes: this supervisor (hub server and table), the job (steps 2-5's training and pushes),
and the evaluation (step 5's fresh process). Children get ``HF_ENDPOINT`` before they import anything, because
``huggingface_hub`` and timm read it once, at import.

    python -m tools.demo [--out demo-output] [--shots 2,5,20]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

NAMESPACE = "demo"
BASE_REPO = f"{NAMESPACE}/digits-base"
RECIPES = ("linear-probe", "full-finetune", "llrd", "gradual-unfreeze", "scratch")
VAL_PER_CLASS = 60
SEED = 0


def _say(message: str) -> None:
    print(f"[demo {time.strftime('%H:%M:%S')}] {message}", flush=True)


# ---------------------------------------------------------------------------------------------------- supervisor


def _start_hub(root: Path) -> tuple[subprocess.Popen, dict[str, str]]:
    """The embedded default: the project's hub server on 127.0.0.1 with a write token for the demo user."""
    from surgery.hub.server.server import spawn
    from surgery.hub.server.tokens import add_token

    token = add_token(root, NAMESPACE, "write")
    proc, url = spawn(root)
    return proc, {"HF_ENDPOINT": url, "HF_TOKEN": token}


def supervise(out: Path, shots: list[int]) -> int:
    """Steps 1 and 6 around the job and the fresh-process evaluation."""
    start = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, HF_HUB_DISABLE_XET="1", HF_HOME=str(out / "hf-home"), HF_HUB_DISABLE_TELEMETRY="1")
    hub = None
    if "HF_ENDPOINT" not in os.environ:
        shutil.rmtree(out / "hub", ignore_errors=True)
        shutil.rmtree(out / "hf-home", ignore_errors=True)
        hub, hub_env = _start_hub(out / "hub")
        env.update(hub_env)
        _say(f"1/6 hub server started at {hub_env['HF_ENDPOINT']} (data in {out / 'hub'})")
    else:
        _say(f"1/6 using the hub at {os.environ['HF_ENDPOINT']}")
    try:
        shot_arg = ",".join(map(str, shots))
        for step in ("job", "evaluate"):
            code = subprocess.call(
                [sys.executable, "-m", "tools.demo", step, "--out", str(out), "--shots", shot_arg], env=env
            )
            if code:
                _say(f"the {step} step failed (exit status {code})")
                return code
    finally:
        if hub is not None:
            hub.terminate()
            hub.wait(timeout=30)
            _say("hub server stopped")
    report(out, time.perf_counter() - start)
    return 0


# ----------------------------------------------------------------------------------------------------------- job


def _recipe(kind: str, data: Path, shots: int, base_ref: str) -> dict[str, Any]:
    """The few-shot recipe of one run: a built-in recipe, extended with this task's model, data and budget."""
    model = {"name": base_ref, "pretrained": True}
    recipe: dict[str, Any] = {
        "extends": "full-finetune" if kind == "scratch" else kind,
        "model": model,
        "surgery": {},  # the head's class count comes from the data (5 class folders)
        "data": {"root": str(data), "img_size": 32, "augment": "none"},
        "train": {"batch_size": 10, "seed": SEED, "eval_every_epochs": 5},
    }
    if kind == "linear-probe":  # the head trains on cached backbone features
        recipe["optim"] = {"lr": 3e-2, "weight_decay": 0.0}
        recipe["train"]["epochs"] = 60
    elif kind == "gradual-unfreeze":
        recipe["surgery"]["norm"] = "eval"
        recipe["optim"] = {"lr": 3e-2, "weight_decay": 0.0}
        recipe["train"]["stages"] = {
            "_replace_": [
                {"name": "head", "epochs": 15},
                {"name": "all", "epochs": 15, "lr": 5e-4, "rules": [{"unfreeze": "*"}]},
            ]
        }
    elif kind in ("full-finetune", "llrd"):  # few images: keep BatchNorm statistics from pretraining
        recipe["surgery"]["norm"] = "eval"
        recipe["optim"] = {"lr": 1e-3 if kind == "full-finetune" else 2e-3, "weight_decay": 0.01}
        recipe["train"]["epochs"] = 25
    else:  # scratch: the same architecture, randomly initialized
        recipe["model"] = {"name": "test_resnet", "kwargs": {"num_classes": 5}}
        recipe["surgery"] = {"heads": {"_replace_": {}}}
        recipe["optim"] = {"lr": 3e-3, "weight_decay": 0.01}
        recipe["train"]["epochs"] = 25
    return recipe


def _publish_timm(model: Any, folder: Path, repo: str, labels: list[str]) -> str:
    """Write a timm-format folder (config.json + model.safetensors) and push it; returns the pinned reference."""
    import timm.models

    from surgery.adapter import push_folder

    shutil.rmtree(folder, ignore_errors=True)
    timm.models.save_for_hf(
        model.eval(),
        str(folder),
        model_config={"num_classes": len(labels), "label_names": labels},
        safe_serialization=True,
    )
    return push_folder(folder, repo, message=f"Publish {repo}", progress=False).ref


def job(out: Path, shots: list[int]) -> None:
    """Steps 2-5 (training and pushing); writes ``runs.json`` for the evaluation."""
    import timm
    import torch

    import surgery
    from tools.toydata import write_digits_folders

    data = out / "data"
    _say("2/6 pretraining test_resnet on digits 0-4 (scikit-learn's digits as image folders)")
    source = write_digits_folders(
        data / "source", classes=range(5), val_per_class=20, size=32, seed=SEED, overwrite=True
    )
    pretrain = {
        "description": "Source task: digits 0-4 from scratch.",
        "model": {"name": "test_resnet", "kwargs": {"num_classes": 5}},
        "optim": {"lr": 3e-3},
        "data": {"root": str(source), "img_size": 32, "augment": "none"},
        "train": {"epochs": 6, "batch_size": 50, "seed": SEED},
    }
    base = surgery.train(pretrain, output_dir=out / "runs" / "pretrain", overwrite=True)
    _say(f"   source task top-1 {base.metrics['val_top1']:.3f}")

    _say(f"3/6 publishing the base model as {BASE_REPO} (timm format)")
    base_ref = _publish_timm(base.model, out / "export" / "digits-base", BASE_REPO, [str(d) for d in range(5)])
    check = timm.create_model(f"hf-hub:{BASE_REPO}", pretrained=True).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        same = torch.equal(check(x), base.model.eval()(x))
    _say(f"   timm.create_model('hf-hub:{BASE_REPO}', pretrained=True) loads it; identical outputs: {same}")
    if not same:
        raise SystemExit("demo: the published base does not reproduce the trained model")

    runs = []
    for k in shots:
        target = write_digits_folders(
            data / f"target-{k}shot",
            classes=range(5, 10),
            shots_per_class=k,
            val_per_class=VAL_PER_CLASS,
            size=32,
            seed=SEED,
            overwrite=True,
        )
        for kind in RECIPES:
            name = f"{kind}-{k}shot"
            _say(f"4/6 {name}: training ({k} examples per class of digits 5-9)")
            started = time.perf_counter()
            result = surgery.train(
                _recipe(kind, target, k, base_ref), output_dir=out / "runs" / name, overwrite=True, progress=False
            )
            seconds = time.perf_counter() - started
            repo = f"{NAMESPACE}/digits-{name}"
            if kind == "scratch":  # no base to adapt: the whole model is the result
                labels = result.class_names or []
                ref = _publish_timm(result.model, out / "export" / name, repo, labels)
                kind_of_ref, size = "timm", (out / "export" / name / "model.safetensors").stat().st_size
            else:
                ref = surgery.push_folder(result.output_dir, repo, message=f"{name} adapter", progress=False).ref
                kind_of_ref, size = "adapter", (result.output_dir / "adapter.safetensors").stat().st_size
            _say(
                f"5/6 {name}: pushed to {repo} ({size / 1024:.1f} KB), val top-1 while training "
                f"{result.metrics.get('val_top1', float('nan')):.3f}"
            )
            runs.append(
                {
                    "recipe": kind,
                    "shots": k,
                    "name": name,
                    "ref": ref,
                    "kind": kind_of_ref,
                    "data": str(target),
                    "trainable_params": result.plan.trainable_params,
                    "size_bytes": size,
                    "train_seconds": seconds,
                    "history": result.history,
                }
            )
    (out / "runs.json").write_text(json.dumps(runs, indent=2))


# ------------------------------------------------------------------------------------------------------ evaluate


def evaluate(out: Path) -> None:
    """Step 5 in a fresh process: load every result back from the hub and score it on the held-out digits."""
    import timm
    import torch
    from torch.utils.data import DataLoader

    import surgery
    from surgery.data import build_image_datasets

    runs = json.loads((out / "runs.json").read_text())
    for run in runs:
        ref = run["ref"]
        if run["kind"] == "adapter":
            model = surgery.load(ref)
        else:
            model = timm.create_model(ref, pretrained=True).eval()
        _, val, _ = build_image_datasets(run["data"], model, img_size=32, augment="none")
        correct = total = 0
        with torch.no_grad():
            for images, labels in DataLoader(val, batch_size=100):
                correct += (model(images).argmax(1) == labels).sum().item()
                total += len(labels)
        run["top1"] = correct / total
        run["val_images"] = total
        _say(f"5/6 {run['name']}: loaded {ref} in a fresh process, held-out top-1 {run['top1']:.3f} on {total} images")
    (out / "results.json").write_text(json.dumps(runs, indent=2))


# -------------------------------------------------------------------------------------------------------- report


def report(out: Path, seconds: float) -> None:
    """Step 6: the table (printed and written as Markdown) and the plots."""
    runs = json.loads((out / "results.json").read_text())
    header = "| recipe | examples/class | trainable params | adapter size | train time | top-1 |"
    lines = [header, "|---|---|---|---|---|---|"]
    for r in runs:
        size = f"{r['size_bytes'] / 1024:.1f} KB" + (" (full model)" if r["kind"] == "timm" else "")
        lines.append(
            f"| {r['recipe']} | {r['shots']} | {r['trainable_params']:,} | {size} | "
            f"{r['train_seconds']:.1f} s | {r['top1']:.3f} |"
        )
    table = "\n".join(lines)
    (out / "results.md").write_text(
        f"# Demo results\n\nDigits 5-9, held-out top-1 ({runs[0]['val_images']} images)."
        f"\n\n{table}\n\nWhole job: {seconds / 60:.1f} minutes.\n"
    )
    print("\n" + table + "\n", flush=True)
    _plots(runs, out)
    _say(
        f"6/6 done in {seconds / 60:.1f} minutes: {out / 'results.md'}, {out / 'top1_vs_shots.png'}, "
        f"{out / 'learning_curves.png'}"
    )


def _plots(runs: list[dict[str, Any]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for kind in RECIPES:
        points = sorted((r["shots"], r["top1"]) for r in runs if r["recipe"] == kind)
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=kind)
    ax.set_xscale("log")
    ax.minorticks_off()
    ax.set_xticks(sorted({r["shots"] for r in runs}), labels=[str(s) for s in sorted({r["shots"] for r in runs})])
    ax.set_xlabel("examples per class (digits 5-9)")
    ax.set_ylabel("held-out top-1")
    ax.set_title("Where pretraining helps, and where the gap closes")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "top1_vs_shots.png", dpi=90)
    plt.close(fig)

    shots = sorted({r["shots"] for r in runs})
    fig, axes = plt.subplots(1, len(shots), figsize=(5 * len(shots), 4), squeeze=False)
    for ax, k in zip(axes[0], shots, strict=True):
        for r in runs:
            if r["shots"] != k:
                continue
            points = [(h["epoch"], h["val_top1"]) for h in r["history"] if "val_top1" in h]
            ax.plot([p[0] for p in points], [p[1] for p in points], marker=".", label=r["recipe"])
        ax.set_title(f"{k} examples per class")
        ax.set_xlabel("epoch")
        ax.set_ylabel("val top-1")
    axes[0][0].legend()
    fig.tight_layout()
    fig.savefig(out / "learning_curves.png", dpi=90)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    """``python -m tools.demo [job|evaluate] [--out DIR] [--shots 2,5,20]``."""
    parser = argparse.ArgumentParser(prog="python -m tools.demo", description=__doc__.splitlines()[0])
    parser.add_argument("step", nargs="?", choices=("all", "job", "evaluate"), default="all")
    parser.add_argument("--out", type=Path, default=Path("demo-output"))
    parser.add_argument("--shots", default="2,5,20", help="examples per class, comma-separated")
    args = parser.parse_args(argv)
    shots = [int(s) for s in args.shots.split(",") if s]
    if args.step == "job":
        job(args.out, shots)
    elif args.step == "evaluate":
        evaluate(args.out)
    else:
        return supervise(args.out, shots)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
