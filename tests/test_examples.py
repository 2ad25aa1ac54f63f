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
    assert means["large data"] > 0.84, "the large-data model should approach the best possible ~0.86"
    assert means["large data"] - means["fine-tuned"] < 0.025, means
    assert means["fine-tuned"] - means["from scratch"] > 0.03, means
    assert (tmp_path / "decision_boundaries.png").stat().st_size > 10_000
    assert (tmp_path / "results.json").exists()
