"""`surgery predict` (surgery/predict.py): several adapters of one base in one command, each with its own data config,
equal to each adapter loaded alone; the base built once; PEFT's mixed batch equal to set_adapter; bad input as one
line. Tiny ``pretrained=False`` timm models on a base checkpoint file (a reproducible base); peft and timm are real."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import save_file

import surgery
from surgery.adapter import save_adapter
from surgery.cli import main
from surgery.errors import AdapterError, DataError, RecipeError
from surgery.recipe import load_recipe

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SIZE = 32
DATA = {"input_size": (3, SIZE, SIZE), "interpolation": "bicubic", "mean": (0.5,) * 3, "std": (0.5,) * 3}
OTHER_DATA = {"input_size": (3, SIZE, SIZE), "interpolation": "bilinear", "mean": (0.2,) * 3, "std": (0.3,) * 3}
# name -> (kind, classes, seed, data config)
ADAPTERS = {
    "cats": ("lora", 3, 1, DATA),
    "dogs": ("lora", 5, 2, DATA),
    "birds": ("lora", 3, 3, OTHER_DATA),  # same class count as cats, another data config
    "probe": ("probe", 4, 4, DATA),  # not LoRA: its own copy of the base
}


def _base() -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model("test_vit", pretrained=False, img_size=SIZE)


def _recipe(kind: str, classes: int, checkpoint: Path) -> dict:
    surgery_section: dict = {"heads": {"classifier": {"num_classes": classes}}}
    if kind == "lora":
        surgery_section["lora"] = {"targets": ["blocks.*.attn.qkv", "blocks.*.mlp.fc1"], "rank": 4, "alpha": 8}
    else:
        surgery_section["rules"] = [{"freeze": "*"}]
    return {
        "model": {"name": "test_vit", "kwargs": {"img_size": SIZE}, "checkpoint": str(checkpoint)},
        "surgery": surgery_section,
    }


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A base checkpoint, four adapters on it (LoRA weights and heads given values), images, and an other base's
    adapter."""
    root = tmp_path_factory.mktemp("predict")
    base = _base()
    save_file(base.state_dict(), str(root / "base.safetensors"))
    for name, (kind, classes, seed, data) in ADAPTERS.items():
        model = copy.deepcopy(base)
        recipe = load_recipe(_recipe(kind, classes, root / "base.safetensors"))
        torch.manual_seed(seed)
        p = surgery.apply(model, recipe)
        with torch.no_grad():
            for pname, param in model.named_parameters():
                if ".lora_B." in pname or param.requires_grad:
                    param.normal_(std=0.5)
        names = [f"{name}{i}" for i in range(classes)]
        save_adapter(model, p, root / name, base=base, recipe=recipe, data_config=data, class_names=names)
    other = _base()
    with torch.no_grad():
        other.blocks[0].attn.qkv.weight.add_(1)
    save_file(other.state_dict(), str(root / "other.safetensors"))
    model = copy.deepcopy(other)
    recipe = load_recipe(_recipe("lora", 3, root / "other.safetensors"))
    p = surgery.apply(model, recipe)
    save_adapter(model, p, root / "stranger", base=other, recipe=recipe, data_config=DATA)
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (40 + 8 * i, 48, 3), dtype=np.uint8)).save(root / f"img{i}.png")
    (root / "broken.png").write_bytes(b"not an image at all")
    return root


def _images(root: Path) -> list[str]:
    return [str(root / f"img{i}.png") for i in range(3)]


def _alone(root: Path, name: str, top: int, capsys: pytest.CaptureFixture) -> dict[str, list[tuple[str, float]]]:
    """What `surgery load ADAPTER --predict` prints for one adapter, parsed: image -> [(class, prob)]."""
    argv = ["load", str(root / name), "--base", str(root / "base.safetensors"), "--top", str(top), "--predict"]
    assert main([*argv, *_images(root)]) == 0
    found = {}
    for line in capsys.readouterr().out.splitlines():
        image, sep, rest = line.partition(": ")
        if sep and image in _images(root):
            pairs = [item.rsplit(" (", 1) for item in rest.split(", ")]
            found[image] = [(cls, float(p.rstrip(")"))) for cls, p in pairs]
    return found


def test_several_adapters_in_one_command_equal_each_loaded_alone(made: Path, capsys, monkeypatch) -> None:
    calls = []
    real = timm.create_model

    def counting(*args, **kwargs):  # observe, not replace: timm builds the model as always
        model = real(*args, **kwargs)
        if next(model.parameters()).device.type != "meta":  # models.py looks classes up on the meta device
            calls.append(args[0] if args else kwargs.get("model_name"))
        return model

    monkeypatch.setattr(timm, "create_model", counting)
    images = _images(made)
    argv = ["predict", *images, "--base", str(made / "base.safetensors"), "--top", "2", "--json", "--batch-size", "2"]
    for name in ADAPTERS:
        argv += ["--adapter", str(made / name)]
    assert main(argv) == 0
    assert len(calls) == 1, calls  # the base is built once for four adapters
    shown = json.loads(capsys.readouterr().out)
    assert [(r["image"], r["adapter"]) for r in shown] == [(i, a) for i in images for a in ADAPTERS]
    assert all(len(r["top"]) == 2 and set(r["top"][0]) == {"class", "index", "prob"} for r in shown)
    monkeypatch.setattr(timm, "create_model", real)
    for name in ADAPTERS:
        alone = _alone(made, name, 2, capsys)
        ours = {r["image"]: [(c["class"], c["prob"]) for c in r["top"]] for r in shown if r["adapter"] == name}
        assert ours.keys() == alone.keys()
        for image, row in ours.items():
            assert [c for c, _ in row] == [c for c, _ in alone[image]], (name, image)
            assert all(c.startswith(name) for c, _ in row)  # each adapter's own classes
            assert np.allclose([p for _, p in row], [p for _, p in alone[image]], atol=1e-3)  # printed to 3 digits


@pytest.mark.parametrize("names", [("birds",), ("cats", "birds"), ("probe", "dogs")])
def test_the_api_matches_load_exactly_and_uses_each_data_config(made: Path, names: tuple[str, ...]) -> None:
    from timm.data import create_transform, resolve_data_config

    images = _images(made)
    found = surgery.predict(images, [made / n for n in names], base=made / "base.safetensors", top=3)
    assert [(p.image, p.adapter) for p in found] == [(i, a) for i in images for a in names]
    for name in names:
        model = surgery.load(made / name, base=made / "base.safetensors")
        cfg = resolve_data_config({}, model=model)
        assert cfg["mean"] == ADAPTERS[name][3]["mean"]  # training's config, not the other adapter's
        transform = create_transform(**cfg)
        x = torch.stack([transform(Image.open(i).convert("RGB")) for i in images])
        with torch.no_grad():
            probs = model(x).softmax(-1)
        for row, p in zip(probs, [p for p in found if p.adapter == name], strict=True):
            values, indices = row.topk(3)
            assert [c.index for c in p.top] == indices.tolist()
            assert np.allclose([c.prob for c in p.top], values.tolist(), atol=1e-5)


@pytest.mark.parametrize("names", [("cats", "birds"), ("cats", "dogs")], ids=["same-heads", "different-heads"])
def test_mixed_batch_equals_switching_adapters(made: Path, names: tuple[str, str]) -> None:
    from surgery.predict import run_lora

    multi = surgery.load(_base(), adapters=[made / n for n in names])
    x = torch.randn(3, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(2))
    mixed, was_mixed = run_lora(multi, x, names)
    switched, _ = run_lora(multi, x, names, mixed=False)
    assert was_mixed == (names == ("cats", "birds"))  # PEFT stacks head rows: one class count only
    for name in names:
        assert mixed[name].shape == switched[name].shape
        assert torch.allclose(mixed[name], switched[name], atol=1e-5)


def _run(*args: str) -> tuple[int, str]:
    proc = subprocess.run([str(BIN / "surgery"), *args], capture_output=True, text=True, cwd=ROOT, timeout=300)
    return proc.returncode, proc.stderr


def test_bad_input_is_one_line_exit_2(made: Path, capsys) -> None:
    base = ["--base", str(made / "base.safetensors")]
    two = ["--adapter", str(made / "cats"), "--adapter", str(made / "dogs")]
    cases = [
        ([str(made / "missing.png"), *two, *base], "missing.png: no such image file"),
        ([str(made / "broken.png"), *two, *base], "broken.png: cannot decode the image"),
        ([str(made / "img0.png"), *two, "--adapter", str(made / "stranger"), *base], "adapters cats and stranger"),
        ([str(made / "img0.png"), *two, *base, "--top", "0"], "top must be at least 1, got 0"),
        ([str(made / "img0.png"), *two, *base, "--batch-size", "0"], "batch size must be at least 1"),
        ([str(made / "img0.png"), *base], "the following arguments are required: --adapter"),
        ([str(made / "img0.png"), *two, "--adapter", str(made / "cats"), *base], "both named 'cats'"),
        ([str(made / "img0.png"), *two, "--adapter", f"={made / 'cats'}", *base], "expected NAME=REF with both parts"),
        ([str(made / "img0.png"), *two, *base, "--fingerprint", "sha256:" + "0" * 64], "not the trusted"),
        ([str(made / "img0.png"), *two, "--base", str(made / "other.safetensors")], "other.safetensors has sha256"),
    ]
    for argv, message in cases:
        assert main(["predict", *argv]) == 2, message
        err = capsys.readouterr().err
        assert err.startswith("surgery: error: ") and message in err and err.count("\n") == 1, err
    with pytest.raises(AdapterError, match=r"fingerprints sha256:[0-9a-f]{12}\.\.\. and sha256:"):
        surgery.predict([made / "img0.png"], [made / "cats", made / "stranger"], base=made / "base.safetensors")
    other = _base()
    with torch.no_grad():
        other.blocks[0].attn.qkv.weight.add_(1)
    with pytest.raises(AdapterError, match="^adapter cats: wrong base model: the base model you passed"):
        surgery.predict([made / "img0.png"], [made / "cats", made / "dogs"], base=other)
    with pytest.raises(DataError):
        surgery.predict([made / "broken.png"], [made / "cats"], base=made / "base.safetensors")
    with pytest.raises(RecipeError):
        surgery.predict([made / "img0.png"], [made / "cats"], top=0)
    code, err = _run("predict", str(made / "img0.png"), *two, *base, "--top", "0")  # the installed command
    assert code == 2 and "Traceback" not in err


def test_named_adapters_and_the_table(made: Path, capsys) -> None:
    argv = ["predict", str(made / "img0.png"), "--base", str(made / "base.safetensors"), "--top", "1"]
    argv += ["--adapter", f"a={made / 'cats'}", "--adapter", f"pets.v2={made / 'cats'}"]  # any display name
    assert main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["image", "adapter", "top", "classes"] and len(lines) == 3
    assert lines[1].split()[1:3] == ["a", lines[2].split()[2]] and lines[2].split()[1] == "pets.v2"


def test_where_peft_refuses_a_mixed_batch_adapters_switch_with_the_same_result(tmp_path: Path) -> None:
    """Swin's window attention calls qkv with windows, not images: PEFT refuses the mixed batch (and, in 0.21, leaves
    its routing hooks behind on the way out: surgery.predict removes them)."""
    from surgery import lora
    from surgery.predict import run_lora

    torch.manual_seed(0)
    kwargs = {"img_size": 32, "embed_dim": 16, "depths": (1, 1), "num_heads": (1, 2), "window_size": 4}
    base = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, num_classes=3, **kwargs).eval()
    for name in ("one", "two"):
        model = lora.inject(
            copy.deepcopy(base), {"targets": "layers.*.blocks.*.attn.qkv", "rank": 2}, heads=["head.fc"]
        )
        with torch.no_grad():
            for pname, param in model.named_parameters():
                if ".lora_B." in pname:
                    param.normal_()
        lora.save_peft(model, tmp_path / name, base_name="swin")
    multi = lora.load_peft(copy.deepcopy(base), {"one": tmp_path / "one", "two": tmp_path / "two"})
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    out, was_mixed = run_lora(multi, x, ["one", "two"])
    assert not was_mixed
    for name in ("one", "two"):
        alone = lora.load_peft(copy.deepcopy(base), tmp_path / name).eval()
        with torch.no_grad():
            assert torch.allclose(out[name], alone(x), atol=1e-5)
            assert torch.allclose(multi.use(name)(x), alone(x), atol=1e-5)  # no routing hook left behind


def test_a_folder_peft_saved_joins_lora_runs_on_the_given_base(made: Path, tmp_path: Path) -> None:
    from timm.data import create_transform, resolve_data_config

    from surgery import lora

    base = _base()
    model = copy.deepcopy(base)
    model.reset_classifier(2)
    model = lora.inject(model, {"targets": "blocks.*.attn.qkv", "rank": 2}, heads=["head"])
    with torch.no_grad():
        for pname, param in model.named_parameters():
            if ".lora_B." in pname:
                param.normal_()
    lora.save_peft(model, tmp_path / "plain", base_name="test_vit")
    images = _images(made)
    found = surgery.predict(images, [made / "cats", tmp_path / "plain"], base=made / "base.safetensors", top=2)
    alone = surgery.load(tmp_path / "plain", base=base)  # what `surgery load plain --base ... --predict` runs
    x = torch.stack(
        [create_transform(**resolve_data_config({}, model=alone))(Image.open(i).convert("RGB")) for i in images]
    )
    with torch.no_grad():
        probs = alone(x).softmax(-1)
    rows = [p for p in found if p.adapter == "plain"]
    assert [[c.index for c in p.top] for p in rows] == probs.topk(2).indices.tolist()
    assert np.allclose([[c.prob for c in p.top] for p in rows], probs.topk(2).values.tolist(), atol=1e-5)
    assert [c.name for c in rows[0].top] == [str(c.index) for c in rows[0].top]  # PEFT records no class names
    with pytest.raises(AdapterError, match="names its base without weights or fingerprint; pass the base"):
        surgery.predict(images, [tmp_path / "plain"])
    with pytest.raises(AdapterError, match="is not the trusted"):
        surgery.predict(images, [tmp_path / "plain"], base=base, fingerprint="sha256:" + "1" * 64)


def test_a_one_logit_binary_model_predicts_both_classes_by_sigmoid(tmp_path: Path) -> None:
    """A softmax over one logit is always 1.0: prediction (both commands) reads sigmoid probabilities instead."""
    import timm
    from PIL import Image

    from surgery.adapter import predict as load_predict
    from surgery.predict import _top

    model = timm.create_model("test_resnet", num_classes=1).eval()
    with torch.no_grad():
        model.fc.weight.zero_()
        model.fc.bias.fill_(2.0)  # every image: logit 2, P(pos) = sigmoid(2) = 0.881
    model.adapter_info = {"class_names": ["neg", "pos"]}
    Image.new("RGB", (40, 40), (10, 200, 30)).save(tmp_path / "x.png")
    assert load_predict(model, [tmp_path / "x.png"], top=2) == [f"{tmp_path / 'x.png'}: pos (0.881), neg (0.119)"]
    ((best, other),) = _top(torch.tensor([[2.0]]), ["neg", "pos"], 2)
    assert (best.name, best.index, round(best.prob, 3), other.name) == ("pos", 1, 0.881, "neg")
