"""`make demo`'s pipeline end to end on the offline toy base (`--base toy`: a tiny model pretrained here, at 2 examples
per class, to keep the suite short and free of the 17 MB weights package; `make demo` runs the ImageNet
EfficientNet-Lite0 base at 2, 5 and 20). tests/test_backbone.py covers the real base's
conversion and publishing on a tiny model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.timeout(900)
def test_demo_end_to_end(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}  # the embedded hub, not a user's
    proc = subprocess.run(
        [sys.executable, "-m", "tools.demo", "--out", str(tmp_path), "--shots", "2", "--base", "toy"],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    for step in (
        "1/6 hub server started",
        "2/6",
        "3/6",
        "identical outputs: True",
        "4/6",
        "5/6",
        "6/6 done",
        "hub server stopped",
    ):
        assert step in out
    assert "| recipe | examples/class | trainable params | adapter size | train time | top-1 |" in out
    runs = {r["recipe"]: r for r in json.loads((tmp_path / "results.json").read_text())}
    assert set(runs) == {"linear-probe", "full-finetune", "llrd", "gradual-unfreeze", "lora", "scratch"}
    print({k: round(r["top1"], 3) for k, r in runs.items()})
    assert {r["classes"] for r in runs.values()} == {5}
    assert runs["linear-probe"]["base"] == "hf-hub:demo/digits-base" and runs["scratch"]["base"] == "test_resnet"
    assert all("in a fresh process" in out and r["ref"].startswith("hf-hub:demo/") for r in runs.values())
    assert runs["linear-probe"]["top1"] >= runs["scratch"]["top1"] + 0.15
    assert runs["full-finetune"]["top1"] >= runs["scratch"]["top1"] + 0.15
    assert runs["linear-probe"]["size_bytes"] < 10_000 and runs["linear-probe"]["trainable_params"] < 1000
    # LoRA: a fraction of full fine-tuning's trainable parameters, loaded back from the hub in a fresh process
    assert runs["lora"]["trainable_params"] < runs["full-finetune"]["trainable_params"] / 3
    assert runs["lora"]["kind"] == "adapter" and runs["lora"]["top1"] >= runs["scratch"]["top1"] + 0.15
    for name in ("results.md", "top1_vs_shots.png", "learning_curves.png"):
        assert (tmp_path / name).stat().st_size > 0
