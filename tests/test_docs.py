"""The documentation is part of the product: generated pages are fresh, the command outputs shown in the docs are what
the commands print today, and `mkdocs build --strict` passes."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tools import docgen

ROOT = Path(__file__).resolve().parents[1]
PAGES = sorted((ROOT / "docs").glob("*.md")) + [ROOT / "README.md"]


def _snippets() -> list[tuple[str, str, str]]:
    found = []
    for page in PAGES:
        for command, output in docgen.SNIPPET.findall(page.read_text()):
            found.append((page.name, command, output))
    return found


def test_generated_reference_pages_are_fresh() -> None:
    for name, render in docgen.PAGES.items():
        assert (ROOT / "docs" / name).read_text() == render(), f"docs/{name} is stale: python -m tools.docgen docs/"


def test_every_recipe_key_is_documented() -> None:
    text = (ROOT / "docs" / "recipes.md").read_text()
    for model in docgen._models(docgen.Recipe):
        for name, field in model.model_fields.items():
            assert f"| `{field.alias or name}` |" in text
            assert field.description, f"{model.__name__}.{name} needs a description"


@pytest.mark.parametrize(("page", "command", "output"), _snippets(), ids=lambda v: v if "\n" not in v else None)
def test_command_output_in_docs_is_current(page: str, command: str, output: str, monkeypatch) -> None:
    monkeypatch.chdir(ROOT)
    assert docgen.command_output(command) == output, f"{page}: `{command}` prints something else now; run docgen"


def test_snippets_exist() -> None:
    assert len(_snippets()) >= 5


def test_mkdocs_build_strict(tmp_path: Path) -> None:
    mkdocs = Path(sys.executable).parent / "mkdocs"
    proc = subprocess.run(
        [str(mkdocs), "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "site" / "recipes" / "index.html").exists()


PYTHON_BLOCK = re.compile(r"```python\n(.*?)```", re.S)
RUNNABLE = ["README.md", "docs/getting-started.md", "docs/api.md", "docs/lora.md", "docs/imbalanced.md"]


@pytest.mark.parametrize("page", RUNNABLE)
def test_python_examples_in_docs_run(page: str, monkeypatch, tmp_path: Path) -> None:
    """The Python snippets of these pages run as they are, in order, sharing one namespace per page."""
    monkeypatch.chdir(ROOT)
    blocks = PYTHON_BLOCK.findall((ROOT / page).read_text())
    assert blocks
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, f"{page} (python block)", "exec"), namespace)  # noqa: S102 - our own documentation
