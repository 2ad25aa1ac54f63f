"""Continuing training from an adapter (recipe ``model: {adapter: ...}``): a local run folder or a hub adapter as the
starting model, the new adapter recording it as its base, loading that chain back (from the hub without help), LoRA
runs continued and still loadable by PEFT on the original base, and every refusal as one clear line."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
import yaml
from safetensors.torch import save_file

import surgery
from surgery.errors import AdapterError, RecipeError
from surgery.evaluation import evaluate
from surgery.recipe import load_recipe
from surgery.render import plan_recipe
from surgery.train import train
from tools.toydata import write_synthetic_folders

KW = {"zero_init_last": False}  # a random base zeroes every residual branch otherwise (see test_lora_recipe.py)


@pytest.fixture(scope="module")
def case(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Data, a base checkpoint (a reproducible base) and a linear-probe run on it."""
    tmp = tmp_path_factory.mktemp("continue")
    write_synthetic_folders(tmp / "data", per_class=4)
    torch.manual_seed(0)
    save_file(timm.create_model("test_resnet", **KW).state_dict(), str(tmp / "base.safetensors"))
    first = {
        "extends": "linear-probe",
        "model": {"name": "test_resnet", "checkpoint": "base.safetensors", "kwargs": KW},
        "data": {"root": "data", "img_size": 32},
        "train": {"epochs": 1, "batch_size": 4},
    }
    (tmp / "probe.yaml").write_text(yaml.safe_dump(first))
    train(load_recipe(tmp / "probe.yaml"), output_dir=tmp / "probe", progress=False)
    return tmp


def _x() -> torch.Tensor:
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def test_a_full_finetune_continues_a_linear_probe_from_its_run_folder(case: Path, tmp_path: Path) -> None:
    # a recipe file next to the runs: model.adapter is relative to it, like every recipe path
    recipe = {
        "surgery": {"rules": []},  # no heads: keep the probe's trained head (LP-FT)
        "model": {"adapter": "probe", "checkpoint": "base.safetensors"},
        "data": {"root": "data"},  # no img_size: the adapter's data config (32 px) is used
        "train": {"epochs": 1, "batch_size": 4},
        "optim": {"lr": 1e-3},
    }
    (case / "ft.yaml").write_text(yaml.safe_dump(recipe))
    planned = plan_recipe(case / "ft.yaml")
    text = planned.table()
    assert f"continues from the adapter {case / 'probe'}" in text and "trained at 32x32" in text
    # the probe froze the backbone and fixed its BatchNorms; continuing starts from a fresh model's state instead
    assert planned.plan.frozen_params == 0
    assert "Norms:" not in text

    probe = surgery.load(case / "probe", base=case / "base.safetensors")
    result = train(load_recipe(case / "ft.yaml"), output_dir=tmp_path / "ft", progress=False)
    moved = [n for n, p in result.model.state_dict().items() if not torch.equal(p, probe.state_dict()[n])]
    assert "conv1.0.weight" in moved and "fc.weight" in moved  # the backbone trained; the head continued
    assert any(n.endswith("running_mean") for n in moved)  # BatchNorm statistics are free again
    saved = json.loads((tmp_path / "ft" / "surgery.json").read_text())
    assert saved["base"]["adapter"] == "probe" and saved["base"]["model"] == "test_resnet"
    assert saved["base"]["fingerprint"] == surgery.adapter.fingerprint(probe.train())
    assert saved["data_config"]["input_size"] == [3, 32, 32]
    assert "the adapter `probe`" in (tmp_path / "ft" / "README.md").read_text()

    # loading: the base is the probe run (a local folder by name only): given as a model or as its folder
    result.model.eval()
    with torch.no_grad():
        expected = result.model(_x())
        assert torch.equal(surgery.load(tmp_path / "ft", base=probe)(_x()), expected)
    with pytest.raises(AdapterError, match=r"the base is the local adapter folder probe, which is not here"):
        surgery.load(tmp_path / "ft")
    with pytest.raises(AdapterError, match=r"the base is the local adapter folder probe"):  # not the base checkpoint
        surgery.load(tmp_path / "ft", base=case / "base.safetensors")
    with pytest.raises(AdapterError, match=r"wrong base model: the base model you passed is not the one"):
        surgery.load(tmp_path / "ft", base=timm.create_model("test_resnet", num_classes=3, **KW))
    assert evaluate(tmp_path / "ft").top1 == pytest.approx(result.metrics["val_top1"], abs=1e-6)


def test_a_new_head_on_a_continued_adapter_is_shown_as_a_warning(case: Path) -> None:
    recipe = {
        "extends": "full-finetune",
        "model": {"adapter": str(case / "probe"), "checkpoint": str(case / "base.safetensors")},
        "data": {"root": str(case / "data")},
    }
    assert "Warning: heads.classifier replaces the head 'fc' the adapter trained" in plan_recipe(recipe).table()


def _cli_train(recipe: dict, folder: Path, hub_server) -> None:
    """`surgery train` in a fresh process that knows the hub from the start (timm's hf-hub: loader reads
    HF_ENDPOINT at import), as a user runs it."""
    (folder.parent / f"{folder.name}.yaml").write_text(yaml.safe_dump(recipe))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING"))}
    env.update(
        HF_ENDPOINT=hub_server.url,
        HF_TOKEN=hub_server.tokens["alice"],
        HF_HOME=str(folder.parent / "fresh-hf"),
        HF_HUB_DISABLE_XET="1",
    )
    args = ["train", str(folder.parent / f"{folder.name}.yaml"), "--output", str(folder), "--no-progress"]
    proc = subprocess.run([sys.executable, "-m", "surgery", *args], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_a_lora_run_continued_from_the_hub_loads_from_the_hub_and_in_peft(
    case: Path, hub_server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from huggingface_hub import HfApi
    from peft import PeftModel

    from surgery.adapter import push_folder, read_info

    monkeypatch.setenv("HF_ENDPOINT", hub_server.url)
    monkeypatch.setenv("HF_TOKEN", hub_server.tokens["alice"])
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    torch.manual_seed(0)
    base = timm.create_model("test_resnet", **KW)
    timm.models.save_for_hf(base, tmp_path / "base", safe_serialization=True)
    push_folder(tmp_path / "base", "alice/base-net", progress=False)
    first = {
        "extends": "lora",
        "model": {"name": "hf-hub:alice/base-net", "pretrained": True},
        "data": {"root": str(case / "data"), "img_size": 32},
        "train": {"epochs": 1, "batch_size": 4},
        "hub": {"repo": "alice/lora-1"},
    }
    _cli_train(first, tmp_path / "one", hub_server)
    # continue: no surgery.heads (PEFT keeps the head with the LoRA layers), the LoRA layers train on
    second = {
        "model": {"adapter": "hf-hub:alice/lora-1"},
        "data": {"root": str(case / "data")},
        "train": {"epochs": 1, "batch_size": 4},
        "optim": {"lr": 1e-2},
        "hub": {"repo": "alice/lora-2"},
    }
    _cli_train(second, tmp_path / "two", hub_server)
    saved = json.loads((tmp_path / "two" / "surgery.json").read_text())
    one = read_info("hf-hub:alice/lora-1")
    assert saved["base"]["adapter"] == "hf-hub:alice/lora-1"
    head = HfApi(endpoint=hub_server.url).model_info("alice/lora-1").sha
    assert saved["base"]["adapter_revision"] == head  # pinned to the commit it continued from
    assert saved["base"]["model"] == "hf-hub:alice/base-net" and saved["base"]["revision"] == one["base"]["revision"]
    assert saved["tensors"] and all(".lora_" in n or ".modules_to_save." in n for n in saved["tensors"])
    # the commit recorded is the one the run loaded at its start (kept on the model), not resolved again at the end
    from surgery.adapter.base import base_ref

    started = {"source": {"ref": "hf-hub:alice/lora-1", "revision": "0" * 40}, "base": one["base"]}
    assert base_ref(load_recipe(second), token=None, loaded=started)["adapter_revision"] == "0" * 40
    card = (tmp_path / "two" / "README.md").read_text()
    assert "library_name: peft" in card and "base_model: alice/base-net" in card

    from safetensors.torch import load_file

    trained = timm.create_model("test_resnet", num_classes=3, **KW)
    with torch.no_grad():
        # nothing given: the chain (lora-2 -> lora-1 at its commit -> base-net) is rebuilt from the hub and checked
        loaded = surgery.load("hf-hub:alice/lora-2")
        assert loaded.adapter_info["base"]["adapter"] == "hf-hub:alice/lora-1"
        expected = loaded(_x())
        run = surgery.load(tmp_path / "two", base=surgery.load("hf-hub:alice/lora-1"))  # the same, from the folder
        assert torch.equal(run(_x()), expected)
        assert torch.equal(  # the run folder's full weights agree
            _load_into(run, load_file(str(tmp_path / "two" / "model.safetensors")))(_x()), expected
        )
        # PEFT alone on the original base: the continued LoRA layers are relative to it
        trained.load_state_dict({k: v for k, v in base.state_dict().items() if not k.startswith("fc.")}, strict=False)
        peft_model = PeftModel.from_pretrained(trained, str(tmp_path / "two")).eval()
        assert torch.allclose(peft_model(_x()), expected, atol=1e-5)

        # merged into a plain timm folder: LoRA folded in (tolerance of surgery.adapter.merge: 1e-4 x max(1, |out|))
        merged = timm.create_model(
            f"local-dir:{surgery.merge('hf-hub:alice/lora-2', tmp_path / 'merged')}", pretrained=True
        )
        assert torch.allclose(merged.eval()(_x()), expected, atol=1e-4 * max(1.0, expected.abs().max().item()))

    with pytest.raises(RecipeError, match=r"carries LoRA layers already .* continue without surgery.heads"):
        plan_recipe({**second, "extends": "lora"})


def _load_into(model: torch.nn.Module, state: dict) -> torch.nn.Module:
    model.load_state_dict(state, strict=True)
    return model.eval()


@pytest.mark.parametrize(
    ("model", "match"),
    [
        ({"name": "test_resnet", "adapter": "x"}, "set either 'name' (a model) or 'adapter'"),
        ({"adapter": "x", "pretrained": True}, "'adapter' builds the base it records: remove 'pretrained'"),
        ({"adapter": "x", "kwargs": {"drop_rate": 0.1}}, "remove 'pretrained' and 'kwargs'"),
        ({"checkpoint": "w.safetensors"}, "'name' is required: a timm model name, or set 'adapter'"),
    ],
)
def test_model_adapter_keys_are_checked_at_load(model: dict, match: str) -> None:
    with pytest.raises(RecipeError, match=rf"model: .*{re.escape(match)}"):
        load_recipe({"model": model})


def test_what_cannot_be_continued_is_refused_in_one_line(case: Path, tmp_path: Path, monkeypatch) -> None:
    import surgery.models

    with pytest.raises(AdapterError, match=r"model.adapter: .*nope: no such adapter folder"):
        plan_recipe({"model": {"adapter": str(tmp_path / "nope")}, "surgery": {"rules": []}})
    (tmp_path / "peft").mkdir()
    (tmp_path / "peft" / "adapter_config.json").write_text("{}")
    with pytest.raises(AdapterError, match=r"has no surgery.json, so the base it was made on is unknown"):
        plan_recipe({"model": {"adapter": str(tmp_path / "peft")}, "surgery": {"rules": []}})
    with pytest.raises(AdapterError, match=r"the local checkpoint base.safetensors, which is not here"):
        plan_recipe({"model": {"adapter": str(case / "probe")}, "surgery": {"rules": []}})
    monkeypatch.setattr(surgery.models, "MAX_ADAPTER_CHAIN", 0)  # a loop or a hostile chain stops at the limit
    with pytest.raises(surgery.errors.ModelError, match=r"adapters continued from adapters 0 deep; merge one"):
        plan_recipe({"model": {"adapter": str(case / "probe")}, "surgery": {"rules": []}})


@pytest.mark.parametrize("value", ["../probe", "/etc", "hf-hub:org/name@main", "https://evil.example/x", "a/b"])
def test_a_hostile_base_adapter_in_surgery_json_is_refused(case: Path, tmp_path: Path, value: str) -> None:
    import shutil

    folder = tmp_path / "ad"
    shutil.copytree(case / "probe", folder, ignore=shutil.ignore_patterns("checkpoints", "logs"))
    config = json.loads((folder / "surgery.json").read_text())
    config["base"]["adapter"] = value
    (folder / "surgery.json").write_text(json.dumps(config))
    with pytest.raises(AdapterError, match=r"surgery.json: base.adapter"):
        surgery.adapter.read_info(folder)
