"""The seed experiments, reproduced by the shipped examples (they run in CI, as the docs promise)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_xor_finetune_reproduces_the_seed(tmp_path: Path, capsys) -> None:
    """Fine-tuned on 100 points, the large-data model stays near its accuracy and above the from-scratch model."""
    means = _load("xor_finetune").main(["--seeds", "5", "--out", str(tmp_path)])
    print(capsys.readouterr().out)  # the table, for the CI log
    # The seed's plain SGD (lr 0.05, no momentum, 5 epochs) leaves seed 0's large-data model on a plateau (0.681; the
    # other seeds 0.854..0.862), so the mean is 0.823: the bound was 0.84 with timm's Nesterov-momentum SGD.
    assert means["large data"] > 0.80, "the large-data model should approach the best possible ~0.86"
    assert means["large data"] - means["fine-tuned"] < 0.025, means
    assert means["fine-tuned"] - means["from scratch"] > 0.03, means
    assert (tmp_path / "decision_boundaries.png").stat().st_size > 10_000
    assert (tmp_path / "results.json").exists()
