"""Adapter room: save exactly what changed, reload to identical outputs, refuse what does not fit, merge for timm.

Real timm models (``test_resnet`` with BatchNorms, ``test_vit``) with weights from checkpoints the tests write, real
training steps, real safetensors files. Nothing is mocked.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import timm
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import surgery
from surgery.adapter import fingerprint, merge, plain_norms, read_info, save_adapter, verify_files
from surgery.cli import main
from surgery.errors import AdapterError
from surgery.models import build_model
from surgery.norms import FrozenBatchNorm1d, StatsFixed
from surgery.recipe import load_recipe

SIZE = {"test_resnet": 64, "test_vit": 32}
BASE_DIR: list[Path] = []  # where the `bases` fixture wrote the checkpoints
KWARGS: dict[str, dict[str, Any]] = {"test_resnet": {}, "test_vit": {"img_size": 32}}


@pytest.fixture(scope="module")
def bases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A checkpoint per architecture: the 'pretrained' base the adapters are trained on."""
    root = tmp_path_factory.mktemp("bases")
    BASE_DIR[:] = [root]
    out = {}
    for i, arch in enumerate(SIZE):
        torch.manual_seed(i)
        model = timm.create_model(arch, **KWARGS[arch])
        with torch.no_grad():  # non-trivial running statistics, so a lost buffer would show
            for module in model.modules():
                if isinstance(module, nn.BatchNorm2d):
                    module.running_mean.uniform_(-0.5, 0.5)
                    module.running_var.uniform_(0.5, 1.5)
        out[arch] = root / f"{arch}.safetensors"
        save_file(model.state_dict(), str(out[arch]))
    return out


def _recipe(base: Path, arch: str = "test_resnet", *, surgery_: dict | None = None, **extra: Any) -> dict:
    spec = surgery_ or {"rules": [{"freeze": "*"}], "heads": {"classifier": {"num_classes": 3}}}
    return {"model": {"name": arch, "checkpoint": str(base), "kwargs": KWARGS[arch]}, "surgery": spec, **extra}


def _train(recipe: dict, folder: Path | None = None, *, steps: int = 2, seed: int = 0, **save: Any):
    """Build, apply, take real SGD steps in train mode, save the adapter. Returns (model, plan, folder)."""
    loaded = load_recipe(recipe)
    torch.manual_seed(seed)
    model = build_model(loaded.model)
    base_fp = fingerprint(model)
    the_plan = surgery.apply(model, loaded)
    optimizer = torch.optim.SGD(the_plan.param_groups(), lr=0.05)
    size = SIZE[loaded.model.name]
    model.train()
    for _ in range(steps):
        x = torch.randn(4, 3, size, size)
        loss = model(x).logsumexp(-1).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    if folder is not None:
        save_adapter(model, the_plan, folder, **save)
        assert read_info(folder)["base"]["fingerprint"] == base_fp
    return model, the_plan, folder


def _base(folder: Path) -> Path:
    """The local checkpoint an adapter names (by file name only): what `surgery load --base` is given."""
    return BASE_DIR[0] / read_info(folder)["base"]["checkpoint"]


def _load(folder: Path) -> nn.Module:
    return surgery.load(folder, base=_base(folder))


def _probe(arch: str = "test_resnet") -> torch.Tensor:
    return torch.randn(3, 3, SIZE[arch], SIZE[arch], generator=torch.Generator().manual_seed(7))


def _outputs(model: nn.Module, arch: str = "test_resnet") -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(_probe(arch))


# ------------------------------------------------------------------------------------------------- round trips

CASES = {
    "linear-probe": ("test_resnet", {"rules": [{"freeze": "*"}], "heads": {"classifier": {"num_classes": 3}}}),
    "partial-bn-train": (
        "test_resnet",
        {"rules": [{"freeze": "*"}, {"unfreeze": "layer4"}], "heads": {"fc": {"num_classes": 4}}, "norm": "train"},
    ),
    "bn-frozen": ("test_resnet", {"rules": [{"freeze": {"to": 2}}], "norm": "frozen"}),
    "bn-eval-full": ("test_resnet", {"norm": "eval", "heads": {"classifier": {"num_classes": 5}}}),
    "vit-mlp-head": (
        "test_vit",
        {
            "rules": [{"freeze": "*"}, {"unfreeze": "blocks.1*"}],
            "heads": {"classifier": {"num_classes": 3, "type": "mlp", "hidden": [16], "norm": "batchnorm"}},
        },
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_load_gives_identical_outputs(case: str, bases: dict[str, Path], tmp_path: Path) -> None:
    arch, spec = CASES[case]
    model, the_plan, folder = _train(_recipe(bases[arch], arch, surgery_=spec), tmp_path / "ad")
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "adapter.safetensors", "surgery.json"]
    loaded = _load(folder)
    assert not loaded.training
    assert torch.equal(_outputs(loaded, arch), _outputs(model, arch))
    assert [type(m).__name__ for m in loaded.modules()] == [type(m).__name__ for m in model.modules()]
    assert {n for n, p in loaded.named_parameters() if p.requires_grad} == set(the_plan.trainable_names)


def test_adapter_holds_exactly_what_changed(bases: dict[str, Path], tmp_path: Path) -> None:
    # Linear probe: the new head only; frozen BatchNorms keep their statistics (norm: auto), so none are saved.
    _, _, folder = _train(_recipe(bases["test_resnet"]), tmp_path / "probe")
    assert sorted(load_file(str(folder / "adapter.safetensors"))) == ["fc.bias", "fc.weight"]

    # norm: train: the running statistics of every BatchNorm moved (even frozen ones) and are saved; frozen
    # convolution weights are not.
    spec = {"rules": [{"freeze": "*"}, {"unfreeze": "layer4"}], "heads": {"fc": {"num_classes": 4}}, "norm": "train"}
    model, the_plan, folder = _train(_recipe(bases["test_resnet"], surgery_=spec), tmp_path / "train")
    saved = load_file(str(folder / "adapter.safetensors"))
    bns = [n for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]
    expected = set(the_plan.trainable_names) | {f"{b}.{s}" for b in bns for s in ("running_mean", "running_var")}
    expected |= {f"{b}.num_batches_tracked" for b in bns}
    assert set(saved) == expected
    assert not any(n.startswith("conv1.") and n.endswith("weight") for n in saved)
    info = read_info(folder)
    assert info["tensors"]["layer1.0.bn1.running_mean"]["kind"] == "buffer"
    assert info["tensors"]["fc.weight"] == {"shape": [4, 96], "dtype": "float32", "kind": "trainable"}

    # Statistics that did not move (no step in train mode) are not saved.
    _, _, folder = _train(_recipe(bases["test_resnet"], surgery_=spec), tmp_path / "still", steps=0)
    assert not any("running" in n for n in load_file(str(folder / "adapter.safetensors")))


def test_batchnorm_statistics_survive_the_round_trip(bases: dict[str, Path], tmp_path: Path) -> None:
    spec = {"rules": [{"freeze": "*"}], "heads": {"classifier": {"num_classes": 3}}, "norm": "train"}
    model, _, folder = _train(_recipe(bases["test_resnet"], surgery_=spec), tmp_path / "ad", steps=3)
    base = build_model(load_recipe(_recipe(bases["test_resnet"])).model)
    moved = model.layer2[0].bn1.running_mean
    assert not torch.equal(moved, base.layer2[0].bn1.running_mean)  # training really moved them
    loaded = _load(folder)
    assert torch.equal(loaded.layer2[0].bn1.running_mean, moved)
    assert torch.equal(_outputs(loaded), _outputs(model))


def test_surgery_json_and_model_card(bases: dict[str, Path], tmp_path: Path) -> None:
    model, the_plan, folder = _train(
        _recipe(bases["test_resnet"]), tmp_path / "ad", class_names=["cat", "dog", "eel"], metrics={"val_acc": 0.75}
    )
    info = json.loads((folder / "surgery.json").read_text())
    assert info["format"] == "timm-surgery-adapter" and info["format_version"] == 2
    assert info["base"]["model"] == "test_resnet"
    # the checkpoint by name and sha256, never by a path of this machine (not in the recipe copy either)
    assert info["base"]["checkpoint"] == "test_resnet.safetensors"
    assert info["base"]["checkpoint_sha256"] == hashlib.sha256(bases["test_resnet"].read_bytes()).hexdigest()
    assert str(bases["test_resnet"].parent) not in (folder / "surgery.json").read_text()
    assert info["base"]["fingerprint"] == fingerprint(build_model(load_recipe(_recipe(bases["test_resnet"])).model))
    assert info["recipe"]["surgery"]["heads"]["classifier"]["num_classes"] == 3
    assert info["recipe"]["surgery"]["rules"] == [{"freeze": "*"}]
    assert info["num_classes"] == 3 and info["class_names"] == ["cat", "dog", "eel"]
    assert info["metrics"] == {"val_acc": 0.75}
    assert {"timm", "torch", "surgery"} <= set(info["versions"])
    assert info["trainable_params"] == the_plan.trainable_params
    card = (folder / "README.md").read_text()
    assert card.startswith("---\n") and "library_name: timm" in card and "timm-surgery" in card
    assert "| val_acc | 0.75 |" in card and "surgery.load(" in card and "num_classes: 3" in card
    loaded = _load(folder)
    assert loaded.pretrained_cfg["label_names"] == ["cat", "dog", "eel"]
    assert loaded.adapter_info["class_names"] == ["cat", "dog", "eel"]


def test_load_leaves_the_callers_base_and_rng_alone(bases: dict[str, Path], tmp_path: Path) -> None:
    recipe = _recipe(bases["test_resnet"])
    model, _, folder = _train(recipe, tmp_path / "ad")
    base = build_model(load_recipe(recipe).model)
    before = fingerprint(base)
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    loaded = surgery.load(folder, base=base)
    assert torch.equal(torch.rand(3), expected_next)
    assert fingerprint(base) == before and isinstance(base.fc, nn.Linear) and base.fc.out_features == 1000
    assert torch.equal(_outputs(loaded), _outputs(model))


def test_save_refuses_a_frozen_tensor_that_changed(bases: dict[str, Path], tmp_path: Path) -> None:
    model, the_plan, _ = _train(_recipe(bases["test_resnet"]))
    with torch.no_grad():
        model.conv1[0].weight.add_(0.01)  # e.g. an optimizer that was given every parameter
    with pytest.raises(AdapterError, match=r"'conv1\.0\.weight' is frozen in the plan but differs"):
        save_adapter(model, the_plan, tmp_path / "ad")


def test_random_base_needs_the_base_in_hand(tmp_path: Path) -> None:
    recipe = {"model": {"name": "test_resnet"}, "surgery": {"heads": {"classifier": {"num_classes": 2}}}}
    model, the_plan, _ = _train(recipe)
    with pytest.raises(AdapterError, match="random weights"):
        save_adapter(model, the_plan, tmp_path / "ad")
    torch.manual_seed(0)
    base = build_model(load_recipe(recipe).model)
    model, the_plan, _ = _train(recipe, seed=0)
    save_adapter(model, the_plan, tmp_path / "ad", base=base)
    with pytest.raises(AdapterError, match=r"wrong base model: the base test_resnet has random weights"):
        surgery.load(tmp_path / "ad")
    assert torch.equal(_outputs(surgery.load(tmp_path / "ad", base=base)), _outputs(model))


# --------------------------------------------------------------------------------------------------- refusals


@pytest.fixture
def adapter(bases: dict[str, Path], tmp_path: Path) -> Path:
    _, _, folder = _train(_recipe(bases["test_resnet"]), tmp_path / "ad")
    return folder


def _rewrite(folder: Path, tensors: dict[str, torch.Tensor], *, relist: bool = False) -> None:
    """Replace adapter.safetensors; with ``relist``, also make surgery.json agree (a consistent hand edit)."""
    import hashlib

    path = folder / "adapter.safetensors"
    save_file(tensors, str(path), metadata={"format": "pt"})
    if relist:
        info = json.loads((folder / "surgery.json").read_text())
        info["tensors"] = {
            n: {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch."), "kind": "trainable"}
            for n, t in tensors.items()
        }
        info["adapter_sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
        (folder / "surgery.json").write_text(json.dumps(info))


def test_refuses_a_different_base(adapter: Path, bases: dict[str, Path], tmp_path: Path) -> None:
    state = load_file(str(bases["test_resnet"]))
    state["layer1.0.conv1.weight"] = state["layer1.0.conv1.weight"] * 1.001
    other_file = tmp_path / "test_resnet.safetensors"
    save_file(state, str(other_file))
    with pytest.raises(AdapterError, match=r"wrong base model: .*test_resnet\.safetensors has sha256 .*original file"):
        surgery.load(adapter, base=other_file)
    other = timm.create_model("test_resnet")
    with pytest.raises(AdapterError, match="wrong base model: the base model you passed is not the one"):
        surgery.load(adapter, base=other)
    with pytest.raises(AdapterError, match=r"local checkpoint test_resnet\.safetensors, which is not here.*--base"):
        surgery.load(adapter)
    assert isinstance(_load(adapter), nn.Module)  # the original base loads again


def test_refuses_a_missing_tensor(adapter: Path) -> None:
    tensors = load_file(str(adapter / "adapter.safetensors"))
    del tensors["fc.bias"]
    _rewrite(adapter, tensors)
    with pytest.raises(AdapterError, match=r"missing tensor 'fc\.bias' \(listed in surgery\.json"):
        _load(adapter)
    _rewrite(adapter, tensors, relist=True)
    with pytest.raises(AdapterError, match=r"missing tensor 'fc\.bias' \(trainable; .*the recipe trains it"):
        _load(adapter)


def test_refuses_an_extra_tensor(adapter: Path) -> None:
    tensors = load_file(str(adapter / "adapter.safetensors"))
    tensors["layer1.0.conv1.weight"] = torch.zeros(24, 24, 3, 3)
    _rewrite(adapter, tensors)
    with pytest.raises(AdapterError, match=r"extra tensor 'layer1\.0\.conv1\.weight' not listed in surgery\.json"):
        _load(adapter)
    _rewrite(adapter, tensors, relist=True)
    with pytest.raises(AdapterError, match=r"extra tensor 'layer1\.0\.conv1\.weight': the recipe keeps it frozen"):
        _load(adapter)
    tensors = load_file(str(adapter / "adapter.safetensors"))
    tensors["not.a.tensor"] = torch.zeros(1)
    del tensors["layer1.0.conv1.weight"]
    _rewrite(adapter, tensors, relist=True)
    with pytest.raises(AdapterError, match=r"extra tensor 'not\.a\.tensor': the model built .* has no such tensor"):
        _load(adapter)


def test_refuses_a_shape_mismatch(adapter: Path, bases: dict[str, Path], tmp_path: Path) -> None:
    spec = {"rules": [{"freeze": "*"}], "heads": {"classifier": {"num_classes": 5}}}
    _, _, other = _train(_recipe(bases["test_resnet"], surgery_=spec), tmp_path / "five")
    shutil.copy(other / "adapter.safetensors", adapter / "adapter.safetensors")  # the wrong file of a pair
    with pytest.raises(AdapterError, match=r"shape mismatch for 'fc\.(weight|bias)': float32\[5.*in the file"):
        _load(adapter)
    _rewrite(adapter, load_file(str(other / "adapter.safetensors")), relist=True)
    with pytest.raises(AdapterError, match=r"shape mismatch for 'fc\.(weight|bias)'.*another head size"):
        _load(adapter)


def test_refuses_a_tampered_file(adapter: Path) -> None:
    path = adapter / "adapter.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01  # one bit of the last weight: header and shapes still fine
    path.write_bytes(bytes(data))
    with pytest.raises(AdapterError, match=r"sha256 differs .* tampered with or damaged"):
        _load(adapter)
    with pytest.raises(AdapterError, match="tampered"):
        verify_files(adapter)
    path.write_bytes(b"not safetensors at all")
    with pytest.raises(AdapterError, match="not a readable safetensors file"):
        _load(adapter)


def test_refuses_what_is_not_an_adapter(tmp_path: Path) -> None:
    with pytest.raises(AdapterError, match="no such adapter folder"):
        surgery.load(tmp_path / "nope")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(AdapterError, match="surgery.json: missing.*merged timm folder"):
        surgery.load(tmp_path)
    (tmp_path / "surgery.json").write_text(json.dumps({"format": "timm-surgery-adapter", "format_version": 99}))
    with pytest.raises(AdapterError, match="newer than this timm-surgery understands"):
        surgery.load(tmp_path)


# ------------------------------------------------------------------------------------------------------ merge


MERGE_CASES = {
    **{k: v for k, v in CASES.items() if k != "vit-mlp-head"},
    "vit-linear": ("test_vit", {"rules": [{"freeze": {"to": -3}}], "heads": {"classifier": {"num_classes": 2}}}),
}


@pytest.mark.parametrize("case", list(MERGE_CASES))
def test_merge_loads_in_plain_timm_with_identical_outputs(case: str, bases: dict[str, Path], tmp_path: Path) -> None:
    arch, spec = MERGE_CASES[case]
    heads = spec.get("heads") or {}
    num = next(iter(heads.values()))["num_classes"] if heads else None
    names = [f"class{i}" for i in range(num)] if num else None
    model, _, folder = _train(_recipe(bases[arch], arch, surgery_=spec), tmp_path / "ad", class_names=names)
    out = merge(folder, tmp_path / "merged", base=_base(folder))
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    config = json.loads((out / "config.json").read_text())
    assert config["architecture"] == arch
    assert config["num_classes"] == (num or 1000) == config["pretrained_cfg"]["num_classes"]
    assert config["model_args"]["num_classes"] == config["num_classes"]
    if names:
        assert config["label_names"] == names
    if arch == "test_vit":
        assert config["model_args"]["img_size"] == [32, 32]
    merged = timm.create_model(f"local-dir:{out}", pretrained=True)
    assert all(type(m) in (nn.BatchNorm2d, nn.BatchNorm1d) for m in merged.modules() if "BatchNorm" in type(m).__name__)
    assert torch.equal(_outputs(merged, arch), _outputs(model, arch))
    assert "library_name: timm" in (out / "README.md").read_text()


def test_merge_refuses_an_mlp_head(bases: dict[str, Path], tmp_path: Path) -> None:
    _, _, folder = _train(_recipe(bases["test_vit"], "test_vit", surgery_=CASES["vit-mlp-head"][1]), tmp_path / "ad")
    with pytest.raises(AdapterError, match=r"heads\.classifier is an mlp head .*timm .*cannot express it"):
        merge(folder, tmp_path / "merged", base=_base(folder))
    assert not (tmp_path / "merged").exists() or not any((tmp_path / "merged").iterdir())


def test_merge_refuses_a_head_that_is_not_the_classifier(bases: dict[str, Path], tmp_path: Path) -> None:
    width = timm.create_model("test_vit", img_size=32).blocks[1].mlp.fc2.out_features
    spec = {"rules": [{"freeze": "*"}], "heads": {"blocks.1.mlp.fc2": {"num_classes": width}}}
    _, _, folder = _train(_recipe(bases["test_vit"], "test_vit", surgery_=spec), tmp_path / "ad")
    with pytest.raises(AdapterError, match=r"replaces 'blocks\.1\.mlp\.fc2', which is not timm's classifier \(head\)"):
        merge(folder, tmp_path / "merged", base=_base(folder))


def test_plain_norms_restores_batchnorm_with_identical_eval_outputs(bases: dict[str, Path]) -> None:
    model = build_model(load_recipe(_recipe(bases["test_resnet"])).model)
    reference = _outputs(model)
    num_batches = {n: t.clone() for n, t in model.state_dict().items() if n.endswith("num_batches_tracked")}
    head = nn.Sequential(nn.Linear(96, 8), nn.BatchNorm1d(8))
    with torch.no_grad():
        head[1].running_mean.uniform_(-1, 1)
    head.eval()
    feats = torch.randn(4, 96)
    head_ref = head(feats)
    surgery.apply(model, {"surgery": {"rules": [{"freeze": {"to": 2}}], "norm": "frozen"}})
    surgery.apply(model, {"surgery": {"norm": "eval"}})
    kinds = {type(m).__name__ for m in model.modules()}
    assert "FrozenBatchNorm2d" in kinds and any(isinstance(m, StatsFixed) for m in model.modules())
    frozen = {n for n, m in model.named_modules() if type(m).__name__ == "FrozenBatchNorm2d"}
    base_state = {n: torch.full_like(t, 5) for n, t in num_batches.items()}
    plain = plain_norms(model, base_state)
    assert not any(isinstance(m, StatsFixed) for m in plain.modules())
    assert "FrozenBatchNorm2d" not in {type(m).__name__ for m in plain.modules()}
    assert torch.equal(_outputs(plain), reference)
    counters = {n.rsplit(".", 1)[0]: int(t) for n, t in plain.state_dict().items() if n.endswith("num_batches_tracked")}
    assert frozen and all(counters[n] == 5 for n in frozen)  # a frozen BatchNorm's counter comes from the base
    assert all(counters[n] == int(num_batches[f"{n}.num_batches_tracked"]) for n in counters if n not in frozen)
    plain.train()
    assert plain.layer1[0].bn1.training  # a plain BatchNorm again: statistics would move in training

    from surgery.norms import freeze

    frozen_head = nn.Sequential(head[0], freeze(head[1]))
    assert isinstance(frozen_head[1], FrozenBatchNorm1d)
    restored = plain_norms(frozen_head).eval()
    assert isinstance(restored[1], nn.BatchNorm1d)
    assert torch.allclose(restored(feats), head_ref, atol=1e-6)


# ----------------------------------------------------------------------------------------------------- basics


def test_fingerprint_is_over_names_dtypes_shapes_and_bytes() -> None:
    a = {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.zeros(3)}
    same = {"b": torch.zeros(3), "w": torch.arange(6, dtype=torch.float32).reshape(2, 3)}
    assert fingerprint(a) == fingerprint(same)
    assert fingerprint(a).startswith("sha256:") and len(fingerprint(a)) == 7 + 64
    for changed in (
        {**a, "w": a["w"].reshape(3, 2)},
        {**a, "w": a["w"].double()},
        {**a, "b": torch.tensor([0.0, 0.0, 1e-30])},
        {"w2": a["w"], "b": a["b"]},
    ):
        assert fingerprint(changed) != fingerprint(a)


def test_cli_merge_and_load(adapter: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from PIL import Image

    image = tmp_path / "x.png"
    Image.new("RGB", (40, 40), (200, 30, 30)).save(image)
    assert main(["load", str(adapter), "--base", str(_base(adapter)), "--predict", str(image), "--top", "2"]) == 0
    out = capsys.readouterr().out
    assert "Adapter verified: base test_resnet" in out and f"{image}: " in out and out.count("(0.") >= 2
    assert main(["merge", str(adapter), str(tmp_path / "m"), "--base", str(_base(adapter))]) == 0
    assert "local-dir:" in capsys.readouterr().out
    assert main(["load", str(adapter)]) == 2  # the base checkpoint is not given
    assert "--base" in capsys.readouterr().err
    (adapter / "adapter.safetensors").write_bytes(b"junk")
    assert main(["load", str(adapter), "--base", str(_base(adapter))]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("surgery: error:") and "adapter.safetensors" in err and len(err.splitlines()) == 1


# ----------------------------------------------------------------------------------------------- with training


@pytest.mark.parametrize("staged", [False, True], ids=["one-stage", "two-stages"])
def test_surgery_train_writes_an_adapter_that_reloads_identically(
    staged: bool, bases: dict[str, Path], tmp_path: Path
) -> None:
    from surgery.train import train
    from tools.toydata import write_synthetic_folders

    data = write_synthetic_folders(tmp_path / "data", classes=3, per_class=4, val_per_class=2)
    spec = {"rules": [{"freeze": "*"}], "heads": {"classifier": {"num_classes": 3}}, "norm": "train"}
    recipe = _recipe(bases["test_resnet"], surgery_=spec, data={"root": str(data), "img_size": 32})
    recipe["train"] = {"batch_size": 4, "seed": 1}
    if staged:  # stage 1 unfreezes layer4: the adapter must hold what either stage trained
        recipe["train"]["stages"] = [{"epochs": 1}, {"epochs": 1, "rules": [{"unfreeze": "layer4"}]}]
    else:
        recipe["train"]["epochs"] = 1
    result = train(recipe, output_dir=tmp_path / "out", progress=False)
    saved = load_file(str(tmp_path / "out" / "adapter.safetensors"))
    assert ("layer4.0.conv1.weight" in saved) is staged and "fc.weight" in saved and "conv1.0.weight" not in saved
    info = read_info(tmp_path / "out")
    assert info["class_names"] == ["class_0", "class_1", "class_2"] and "val_top1" in info["metrics"]
    assert str(data) not in (tmp_path / "out" / "surgery.json").read_text()  # no path of this machine
    assert info["data_config"]["input_size"] == [3, 32, 32]  # C-adapter-save: the trainer passes its data config
    assert "history" not in info["metrics"] and "steps" not in info["metrics"]
    loaded = _load(tmp_path / "out")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), result.model.eval()(x))


# ------------------------------------------------------------------------------------------------ data config


def test_the_training_input_size_travels_to_load_merge_card_and_predict(bases: dict[str, Path], tmp_path: Path) -> None:
    from timm.data import resolve_data_config

    from surgery.adapter import predict

    assert resolve_data_config({}, model=timm.create_model("test_resnet"))["input_size"] == (3, 160, 160)
    data_config = {
        "input_size": (3, 32, 32),
        "interpolation": "bilinear",
        "mean": (0.5, 0.5, 0.5),
        "std": (0.25, 0.25, 0.25),
        "crop_pct": 1.0,
        "crop_mode": "center",
    }
    model, _, folder = _train(_recipe(bases["test_resnet"]), tmp_path / "ad", data_config=data_config)
    assert read_info(folder)["data_config"]["input_size"] == [3, 32, 32]
    loaded = _load(folder)
    resolved = resolve_data_config({}, model=loaded)
    assert resolved["input_size"] == (3, 32, 32) and resolved["interpolation"] == "bilinear"
    assert tuple(resolved["mean"]) == (0.5, 0.5, 0.5) and resolved["crop_pct"] == 1.0
    card = (folder / "README.md").read_text()
    assert "Input size: 32x32" in card and "bilinear" in card

    out = merge(folder, tmp_path / "merged", base=_base(folder))
    assert json.loads((out / "config.json").read_text())["pretrained_cfg"]["input_size"] == [3, 32, 32]
    merged = timm.create_model(f"local-dir:{out}", pretrained=True)
    assert resolve_data_config({}, model=merged)["input_size"] == (3, 32, 32)
    assert "Input size: 32x32" in (out / "README.md").read_text()

    # predict uses the training transform: a 32x32 input gives the same answer as the model on that tensor
    from PIL import Image
    from timm.data import create_transform

    image = tmp_path / "x.png"
    Image.new("RGB", (50, 40), (20, 200, 30)).save(image)
    x = create_transform(**data_config)(Image.open(image).convert("RGB")).unsqueeze(0)
    assert x.shape[-1] == 32
    with torch.no_grad():
        best = int(loaded(x).argmax())
    assert predict(loaded, [image], top=1)[0].startswith(f"{image}: {best} (")


def test_bad_data_config_is_refused_at_save(bases: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(AdapterError, match=r"data_config\.input_size\.1: Input should be greater"):
        _train(_recipe(bases["test_resnet"]), tmp_path / "ad", data_config={"input_size": (3, -1, 32)})


def test_only_meaningful_metrics_are_kept(bases: dict[str, Path], tmp_path: Path) -> None:
    metrics = {
        "val_top1": 0.5,
        "val_loss": 1.25,
        "history": [{"epoch": 1}],
        "ema_val_top1": None,
        "steps": 12,
        "epochs": 2,
        "images_per_s": 99.0,
        "feature_cache": True,
        "class_names": ["a"],
        "nan": float("nan"),
    }
    _, _, folder = _train(_recipe(bases["test_resnet"]), tmp_path / "ad", metrics=metrics)
    assert read_info(folder)["metrics"] == {"val_top1": 0.5, "val_loss": 1.25}
    section = (folder / "README.md").read_text().split("## Metrics")[1].split("## Recipe")[0]
    assert section.strip().splitlines() == [
        "| metric | value |",
        "|---|---|",
        "| val_top1 | 0.5 |",
        "| val_loss | 1.25 |",
    ]


# ------------------------------------------------------------------------------------------- base provenance


def test_a_local_checkpoint_base_warns_and_is_not_recorded_as_a_path(bases: dict[str, Path], tmp_path: Path) -> None:
    with pytest.warns(UserWarning, match=r"local checkpoint test_resnet\.safetensors .*--base"):
        _, _, folder = _train(_recipe(bases["test_resnet"]), tmp_path / "ad")
    text = (folder / "surgery.json").read_text() + (folder / "README.md").read_text()
    assert str(BASE_DIR[0]) not in text
    assert "sha256" in (folder / "README.md").read_text()


def test_a_trusted_fingerprint_refuses_a_swapped_base(bases: dict[str, Path], tmp_path: Path) -> None:
    # Someone swaps the base (another checkpoint) and rewrites the recorded fingerprint and sha256 to match: the
    # adapter's own files agree, so only a fingerprint the user trusts (or the base in hand) catches it.
    _, _, folder = _train(_recipe(bases["test_resnet"]), tmp_path / "ad")
    trusted = fingerprint(build_model(load_recipe(_recipe(bases["test_resnet"])).model))
    torch.manual_seed(99)
    swapped = timm.create_model("test_resnet")
    swapped_file = tmp_path / "swapped" / "test_resnet.safetensors"
    swapped_file.parent.mkdir()
    save_file(swapped.state_dict(), str(swapped_file))
    info = json.loads((folder / "surgery.json").read_text())
    info["base"]["fingerprint"] = fingerprint(swapped)
    info["base"]["checkpoint_sha256"] = hashlib.sha256(swapped_file.read_bytes()).hexdigest()
    (folder / "surgery.json").write_text(json.dumps(info))
    assert isinstance(surgery.load(folder, base=swapped_file), nn.Module)  # self-consistent: loads
    with pytest.raises(AdapterError, match=r"wrong base model: .*not the one whose fingerprint you trust"):
        surgery.load(folder, base=swapped_file, fingerprint=trusted)
    assert main(["load", str(folder), "--base", str(swapped_file), "--fingerprint", trusted]) == 2
    with pytest.raises(AdapterError, match="wrong base model: the base model you passed is not the one"):
        surgery.load(folder, base=build_model(load_recipe(_recipe(bases["test_resnet"])).model))


def test_load_and_save_replay_stages_through_plan_stages(
    bases: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import surgery.stages

    _, _, folder = _train(_recipe(bases["test_resnet"]), tmp_path / "ad")
    calls = []
    real = surgery.stages.plan_stages

    def spy(model: nn.Module, recipe: Any) -> Any:
        calls.append(recipe)
        return real(model, recipe)

    monkeypatch.setattr(surgery.stages, "plan_stages", spy)
    _load(folder)
    assert len(calls) == 2  # the one replay: a dry run on the meta device, then on the base
    merge(folder, tmp_path / "m", base=_base(folder))
    assert len(calls) == 4


def test_a_staged_adapter_saved_from_a_fingerprint_reloads_identically(bases: dict[str, Path], tmp_path: Path) -> None:
    # What the trainer does (C-adapter-save): fingerprint at step 0, stages through plan_stage, save_adapter at the end.
    from surgery.stages import plan_stages

    recipe = _recipe(bases["test_resnet"], surgery_={"rules": [{"freeze": "*"}], "heads": {"fc": {"num_classes": 3}}})
    recipe["train"] = {"stages": [{"epochs": 1}, {"epochs": 1, "rules": [{"unfreeze": "layer4"}]}]}
    loaded_recipe = load_recipe(recipe)
    model = build_model(loaded_recipe.model)
    base = fingerprint(model)
    plans = [p for _, p in plan_stages(model, loaded_recipe)]
    with torch.no_grad():  # "training": what either stage trains changes
        model.fc.weight.add_(1.0)
        model.layer4[0].conv1.weight.mul_(1.5)
    save_adapter(model.eval(), plans[-1], tmp_path / "ad", base=base, recipe=loaded_recipe)
    saved = load_file(str(tmp_path / "ad" / "adapter.safetensors"))
    assert "layer4.0.conv1.weight" in saved and "fc.weight" in saved and "conv1.0.weight" not in saved
    assert torch.equal(_outputs(_load(tmp_path / "ad")), _outputs(model))
