"""LoRA through recipes (`surgery.lora`): schema, plan, one training step, the run folder's adapter (ours and PEFT's),
loading back, PEFT loading, merging, stages, exact resume and the CLI. Tiny ``pretrained=False`` timm models; peft,
timm and accelerate are the real libraries (tests/test_lora.py covers surgery.lora's API itself)."""

from __future__ import annotations

import copy
import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
import yaml
from peft import PeftModel
from torch import nn

import surgery
from surgery import lora
from surgery.adapter import save_adapter
from surgery.errors import NoMatchingParameterError, RecipeError
from surgery.recipe import LoraSpec, json_schema, load_recipe
from surgery.render import plan_recipe
from surgery.train import train
from surgery.train.checkpoints import latest_checkpoint
from tools.toydata import write_synthetic_folders

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
NUM_CLASSES = 3
MERGE_TOL = 1e-4  # surgery.adapter.merge.LORA_TOLERANCE: relative to max(1, max |output|), float32

# family -> (timm name, create kwargs, input size, LoRA targets). ResNet: zero_init_last=False, else the random base
# zeroes every residual branch (last BN gamma 0, frozen) and LoRA inside it gets no gradient.
FAMILIES = {
    "vit": ("test_vit", {"img_size": 32}, 32, ["blocks.*.attn.qkv"]),
    "deit": ("deit_tiny_patch16_224", {"img_size": 32, "depth": 2}, 32, ["blocks.*.attn.qkv", "blocks.*.mlp.fc*"]),
    "swin": (
        "swin_tiny_patch4_window7_224",
        {"img_size": 32, "embed_dim": 16, "depths": (1, 1), "num_heads": (1, 2), "window_size": 4},
        32,
        ["layers.*.blocks.*.attn.qkv"],
    ),
    "convnext": ("test_convnext", {}, 64, ["stages.*.blocks.*.mlp.fc*"]),
    "resnet": ("test_resnet", {"zero_init_last": False}, 64, ["layer*.*.conv*"]),
    "efficientnet": ("test_efficientnet", {}, 64, ["re:\\.conv_pwl?$", "conv_head"]),
    "mobilenetv3": ("mobilenetv3_small_050", {}, 64, ["blocks.*.*.conv_pw*", "conv_head"]),
    "eva": ("eva02_tiny_patch14_224", {"img_size": 28, "depth": 2}, 28, ["blocks.*.attn.proj", "blocks.*.mlp.fc*"]),
    "beit": (
        "beit_base_patch16_224",
        {"img_size": 32, "depth": 1, "embed_dim": 32, "num_heads": 2},
        32,
        {"from": 0},  # a layer range: every Linear/Conv LoRA can adapt, BEiT's weight-read qkv left out
    ),
}


def _recipe(family: str, **lora_keys: object) -> dict:
    name, kwargs, _, targets = FAMILIES[family]
    return {
        "model": {"name": name, "kwargs": kwargs},
        "surgery": {
            "lora": {"targets": targets, "rank": 4, "alpha": 8, **lora_keys},
            "heads": {"classifier": {"num_classes": NUM_CLASSES}},
        },
        "optim": {"lr": 0.05, "weight_decay": 0.0},
    }


def _build(family: str) -> nn.Module:
    name, kwargs, _, _ = FAMILIES[family]
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, **kwargs)


def _input(family: str, n: int = 2) -> torch.Tensor:
    size = FAMILIES[family][2]
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(1))


def _out(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(x)


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and (a - b).abs().max().item() <= MERGE_TOL * max(1.0, b.abs().max().item())


# ---------------------------------------------------------------------------------------------------- schema


def test_lora_spec_has_one_home_and_is_in_the_json_schema() -> None:
    assert lora.LoraSpec is LoraSpec
    surgery_props = json_schema()["$defs"]["SurgerySpec"]["properties"]
    assert "lora" in surgery_props
    assert "rank" in json_schema()["$defs"]["LoraSpec"]["properties"]
    recipe = load_recipe(_recipe("vit", dropout=0.1))
    assert isinstance(recipe.surgery.lora, LoraSpec) and recipe.surgery.lora.dropout == 0.1


@pytest.mark.parametrize(
    ("lora_section", "match"),
    [
        ("{targets: 'blocks.*.attn.qkv', rnak: 8}", r"r\.yaml:5.*surgery\.lora\.rnak"),
        ("{targets: 'blocks.*.attn.qkv', rank: 0}", r"r\.yaml:5.*surgery\.lora\.rank"),
        ("{rank: 8}", r"r\.yaml:5.*surgery\.lora\.targets"),
        ("{targets: 'blocks.*.attn.qkv', init: pissa}", r"r\.yaml:5.*surgery\.lora\.init"),
    ],
)
def test_bad_lora_keys_are_located_errors(tmp_path: Path, lora_section: str, match: str) -> None:
    path = tmp_path / "r.yaml"
    path.write_text(
        f"model: test_vit\nsurgery:\n  heads:\n    classifier: {{num_classes: 3}}\n  lora: {lora_section}\n"
    )
    with pytest.raises(RecipeError, match=match):
        load_recipe(path)


def test_a_target_pattern_that_matches_nothing_is_located_with_suggestions(tmp_path: Path) -> None:
    path = tmp_path / "r.yaml"
    path.write_text(
        "model: {name: test_vit, kwargs: {img_size: 32}}\nsurgery:\n  heads:\n    classifier: {num_classes: 3}\n"
        "  lora:\n    targets: ['blocks.*.attn.qvk']\n"
    )
    with pytest.raises(NoMatchingParameterError) as err:
        plan_recipe(path)
    message = str(err.value)
    assert "r.yaml:6" in message and "surgery.lora.targets" in message and "blocks.*.attn.qvk" in message
    assert "closest names: blocks.5.attn.qkv" in message  # the closest module names are suggested


# ------------------------------------------------------------------------------------------------------ plan


def test_plan_shows_lora_per_layer_in_the_table_and_json() -> None:
    rp = plan_recipe(_recipe("vit"))
    p = rp.plan
    targets = [f"blocks.{i}.attn.qkv" for i in range(6)]
    assert p.lora is not None and list(p.lora.targets) == targets and p.lora.modules_to_save == ("head",)
    per_target = 4 * 64 + 192 * 4  # lora_A (r x in) + lora_B (out x r)
    assert p.lora_params == 6 * per_target
    lora_rows = [q for q in p.parameters if q.lora]
    assert all(q.trainable and ".lora_" in q.name for q in lora_rows) and len(lora_rows) == 12
    trainable = {q.name for q in p.parameters if q.trainable}
    assert trainable == {q.name for q in lora_rows} | {"head.modules_to_save.default.weight",
                                                       "head.modules_to_save.default.bias"}  # fmt: skip
    table = rp.table()
    header = next(line for line in table.splitlines() if line.startswith("#"))
    assert header.split()[:6] == ["#", "layer", "params", "trainable", "frozen", "lora"]
    block0 = next(line for line in table.splitlines() if line.split()[1:2] == ["blocks.0"])
    assert f"{per_target:,}" in block0.split() and "surgery.lora (rank 4, alpha 8)" in block0
    assert f"LoRA: rank 4, alpha 8 on blocks.0.attn.qkv, blocks.1.attn.qkv, blocks.2.attn.qkv, ... (6 modules): " \
           f"{6 * per_target:,} parameters" in table  # fmt: skip
    assert "Feature cache: off: surgery.lora" in table
    data = json.loads(json.dumps(rp.to_dict()))
    assert data["lora"]["targets"] == targets and data["lora"]["params"] == 6 * per_target
    assert data["lora"]["rank"] == 4 and data["lora"]["alpha"] == 8 and data["lora"]["modules_to_save"] == ["head"]
    assert sum(la.get("lora_params", 0) for la in data["layers"]) == 6 * per_target
    assert data["feature_cache"] == {"applies": False, "reason": rp.feature_cache}
    assert sum(1 for q in data["parameters"] if q["lora"]) == 12


def test_lora_lr_follows_rules_lr_mult_and_layer_decay() -> None:
    recipe = _recipe("vit")
    recipe["optim"] = {"lr": 1e-3, "layer_decay": 0.5, "weight_decay": 0.05}
    recipe["surgery"]["rules"] = [{"select": "blocks.5.*", "lr_mult": 4}, {"select": "*.lora_B.*", "weight_decay": 0}]
    p = plan_recipe(recipe).plan
    n = len(p.layers)
    for q in p.parameters:
        if not q.lora:
            continue
        want = 1e-3 * 0.5 ** (n - 1 - q.layer) * (4 if q.name.startswith("blocks.5.") else 1)
        assert q.lr == pytest.approx(want), q.name
        assert q.weight_decay == (0.0 if ".lora_B." in q.name else 0.05)
    assert len({q.lr for q in p.parameters if q.lora}) == 6  # one lr per block


def test_bitfit_with_lora_trains_biases_and_peft_carries_them() -> None:
    recipe = _recipe("vit")
    recipe["surgery"]["rules"] = [{"unfreeze": "*.bias"}]
    p = plan_recipe(recipe).plan
    assert p.lora is not None and p.lora.spec.bias == "all"  # PEFT saves the biases the rules train
    biases = [q for q in p.parameters if q.name.endswith(".bias") and not q.new and ".modules_to_save." not in q.name]
    assert biases and all(q.trainable for q in biases if ".original_module." not in q.name)
    assert all(not q.trainable for q in p.parameters if ".original_module." in q.name)  # PEFT's copy stays frozen


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"rules": [{"unfreeze": "norm"}]}, r"surgery\.lora.*'norm\.weight'.*carries only LoRA weights"),
        ({"norm": "train"}, r"surgery\.norm.*norm: train.*LoRA"),
        ({"lora": {"targets": ["blocks.*.attn.qkv"], "bias": "lora_only"}, "rules": [{"unfreeze": "norm.bias"}]},
         r"lora_only.*'norm\.bias'.*bias: all"),
        ({"lora": {"targets": ["blocks.*.norm1"]}}, r"surgery\.lora\.targets.*LayerNorm"),
    ],
)  # fmt: skip
def test_what_a_peft_adapter_cannot_carry_is_refused_in_planning(change: dict, match: str) -> None:
    recipe = _recipe("vit")
    recipe["surgery"].update(change)
    with pytest.raises(RecipeError, match=match):
        plan_recipe(recipe)


def test_batchnorm_statistics_stay_fixed_with_lora_even_when_biases_train() -> None:
    recipe = _recipe("resnet")
    recipe["surgery"]["rules"] = [{"unfreeze": "*.bias"}]
    p = plan_recipe(recipe).plan
    bn = [n for n in p.norms if n.path == "bn1"]
    assert bn and bn[0].action == "eval" and "LoRA" in bn[0].reason  # bn1.bias trains, its statistics do not move
    assert p["bn1.bias"].trainable


# ------------------------------------------------- eight families: plan, step, save, load, PEFT load, merge


@pytest.mark.parametrize("family", list(FAMILIES))
def test_lora_recipe_plans_trains_saves_loads_and_merges(family: str, tmp_path: Path) -> None:
    base = _build(family)
    model = copy.deepcopy(base)
    recipe = load_recipe(_recipe(family))
    p = surgery.apply(model, recipe)
    assert lora.peft_of(model) is not None and p.lora is not None and p.lora_params > 0
    assert sum(t.numel() for t in model.parameters() if t.requires_grad) == p.trainable_params
    # one step: only LoRA weights and the head move
    before = {n: t.detach().clone() for n, t in model.named_parameters()}
    optimizer = torch.optim.SGD(p.param_groups(model), lr=0.05)
    model.train()
    x = _input(family, 4)
    nn.functional.cross_entropy(model(x), torch.arange(4) % NUM_CLASSES).backward()
    optimizer.step()
    moved = {n for n, t in model.named_parameters() if not torch.equal(before[n], t.detach())}
    assert moved and all(".lora_" in n or n.startswith("head") or ".modules_to_save." in n for n in moved), moved
    assert any(".lora_B." in n for n in moved)  # B starts at zero: it moves first
    expected = _out(model, _input(family))

    folder = save_adapter(model, p, tmp_path / "adapter", base=base, recipe=recipe)
    assert {"adapter_config.json", "adapter_model.safetensors", "surgery.json", "README.md"} <= {
        f.name for f in folder.iterdir()
    }
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == FAMILIES[family][0] and config["peft_type"] == "LORA"
    card = (folder / "README.md").read_text()
    assert "library_name: peft" in card and f"base_model: {FAMILIES[family][0]}" in card

    loaded = surgery.load(folder, base=base)  # surgery.load: rebuilds, checks the fingerprint, loads strictly
    assert torch.equal(_out(loaded, _input(family)), expected)

    name, kwargs, _, _ = FAMILIES[family]
    plain = timm.create_model(name, pretrained=False, num_classes=NUM_CLASSES, **kwargs)
    head = plain.pretrained_cfg["classifier"]
    plain.load_state_dict({k: v for k, v in base.state_dict().items() if not k.startswith(head + ".")}, strict=False)
    peft_model = PeftModel.from_pretrained(plain, str(folder))  # PEFT itself, no surgery code
    assert torch.equal(_out(peft_model, _input(family)), expected)

    merged_dir = surgery.merge(folder, tmp_path / "merged", base=base)
    merged = timm.create_model(f"local-dir:{merged_dir}", pretrained=True)
    assert not any(".lora_" in n or "base_layer" in n for n, _ in merged.named_parameters())
    assert _close(_out(merged, _input(family)), expected)


# ---------------------------------------------------------------------------------- trainer: stages, resume


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_synthetic_folders(tmp_path_factory.mktemp("shapes") / "data", classes=3, per_class=8, val_per_class=4)


def _staged(data: Path, **train_keys: object) -> dict:
    """Head first (LoRA weights frozen by a rule), then LoRA: the two stages of a careful LoRA fine-tune."""
    return {
        "model": {"name": "test_vit"},
        "surgery": {
            "lora": {"targets": ["blocks.*.attn.qkv"], "rank": 4},
            "heads": {"classifier": {"num_classes": 3}},
            "rules": [{"freeze": "*.lora_*"}],
        },
        "optim": {"lr": 3e-3},
        "data": {"root": str(data), "img_size": 32},
        "train": {
            "batch_size": 4,
            "seed": 1,
            "stages": [{"epochs": 1}, {"epochs": 2, "rules": [{"unfreeze": "*.lora_*"}], "lr": 1e-3}],
            **train_keys,
        },
    }


def test_stages_train_the_head_first_then_lora(data: Path, tmp_path: Path) -> None:
    rp = plan_recipe(_staged(data))
    first, second = rp.stages[0][1], rp.stages[1][1]
    assert first.lora_params > 0 and not any(q.trainable for q in first.parameters if q.lora)
    assert all(q.trainable for q in second.parameters if q.lora)
    result = train(_staged(data), output_dir=tmp_path / "out", progress=False)
    log = (tmp_path / "out" / "train.log").read_text()
    assert "12 tensors join the optimizer" in log  # 6 qkv x (lora_A, lora_B)
    torch.manual_seed(1)
    base = surgery.build_model(surgery.ModelSpec(name="test_vit", kwargs={"img_size": 32}))
    loaded = surgery.load(tmp_path / "out", base=base)
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(_out(loaded, x), _out(result.model, x))
    trained = dict(result.model.named_parameters())
    assert not torch.equal(trained["blocks.0.attn.qkv.lora_B.default.weight"], torch.zeros_like(
        trained["blocks.0.attn.qkv.lora_B.default.weight"]))  # fmt: skip
    assert torch.equal(trained["blocks.0.attn.qkv.base_layer.weight"], base.blocks[0].attn.qkv.weight)


def test_resume_after_sigkill_equals_uninterrupted_run_with_lora(data: Path, tmp_path: Path) -> None:
    recipe = tmp_path / "r.json"
    recipe.write_text(json.dumps(_staged(data, deterministic=True, checkpoint_every_steps=2, keep_checkpoints=50)))
    ref = tmp_path / "ref"
    train(load_recipe(recipe), output_dir=ref, progress=False)
    total = json.loads((ref / "metrics.json").read_text())["steps"]
    out = tmp_path / "killed"
    cmd = [str(BIN / "python"), "-m", "surgery", "train", str(recipe), "--output", str(out), "--no-progress"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    import time

    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        ckpt = latest_checkpoint(out)
        if ckpt is not None and json.loads((ckpt / "trainer_state.json").read_text())["global_step"] >= 8:
            break  # stage 1 (LoRA training) has begun: 24 images at batch 4 are 6 updates per epoch
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    step = json.loads((latest_checkpoint(out) / "trainer_state.json").read_text())["global_step"]
    assert 4 <= step < total
    train(load_recipe(recipe), output_dir=out, resume=True, progress=False)
    for name in ("model.safetensors", "adapter_model.safetensors"):
        from safetensors.torch import load_file

        a, b = load_file(str(out / name)), load_file(str(ref / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


# ------------------------------------------------------------------------------------------------------- CLI


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "surgery"), *args], capture_output=True, text=True, cwd=ROOT, timeout=600)


def test_builtin_lora_recipe_through_the_cli(data: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from surgery.cli import main  # in process, except `surgery train` below (the installed command, a real process)

    assert main(["plan", "lora", "--model", "test_vit", "--num-classes", "3", "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["lora"]["rank"] == 8 and shown["lora"]["alpha"] == 16 and shown["lora"]["params"] > 0
    assert not shown["feature_cache"]["applies"]
    assert main(["plan", "lora", "--model", "test_vit", "--num-classes", "3", "surgery.lora.targets=[nope*]"]) == 2
    assert "surgery.lora.targets" in capsys.readouterr().err

    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "extends": "lora",
                "model": {"name": "test_vit", "checkpoint": str(tmp_path / "base.safetensors")},
                "data": {"root": str(data), "img_size": 32},
                "train": {"epochs": 1, "batch_size": 8},
            }
        )
    )
    from safetensors.torch import save_file

    torch.manual_seed(0)
    base = timm.create_model("test_vit", pretrained=False, img_size=32)
    save_file(base.state_dict(), str(tmp_path / "base.safetensors"))  # a reproducible base
    run = _cli("train", str(recipe), "--output", str(tmp_path / "run"), "--no-progress")
    assert run.returncode == 0, run.stderr
    assert (tmp_path / "run" / "adapter_model.safetensors").is_file()
    checkpoint = str(tmp_path / "base.safetensors")
    assert main(["load", str(tmp_path / "run"), "--base", checkpoint]) == 0
    assert main(["merge", str(tmp_path / "run"), str(tmp_path / "merged"), "--base", checkpoint]) == 0
    x = torch.randn(2, 3, 32, 32)
    ours = _out(surgery.load(tmp_path / "run", base=checkpoint), x)
    assert _close(_out(timm.create_model(f"local-dir:{tmp_path / 'merged'}", pretrained=True), x), ours)


# ----------------------------------------------------------------------------------- PEFT-saved folders, hub


def test_surgery_load_reads_a_folder_peft_itself_saved_given_the_base(tmp_path: Path) -> None:
    from peft import LoraConfig, get_peft_model

    base = _build("vit")
    model = copy.deepcopy(base)
    model.reset_classifier(NUM_CLASSES)
    torch.manual_seed(3)
    model.head.reset_parameters()
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["qkv"], modules_to_save=["head"]))
    with torch.no_grad():  # B = 0 at init: give the update a value so that loading it is visible
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_()
    peft_model.save_pretrained(str(tmp_path / "peft"))
    expected = _out(peft_model, _input("vit"))
    with_head = copy.deepcopy(base)
    with_head.reset_classifier(NUM_CLASSES)  # a base of the adapter's class count
    loaded = surgery.load(tmp_path / "peft", base=with_head)
    assert isinstance(loaded, PeftModel) and torch.equal(_out(loaded, _input("vit")), expected)
    with pytest.raises(surgery.AdapterError, match="names its base without weights or fingerprint; pass the base"):
        surgery.load(tmp_path / "peft")


def test_a_lora_run_pushed_to_the_hub_loads_in_surgery_and_in_peft(
    hub_server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import os
    import textwrap

    from safetensors.torch import load_file, save_file

    from surgery.adapter import push

    base = _build("vit")
    model = copy.deepcopy(base)
    recipe = load_recipe(_recipe("vit"))
    p = surgery.apply(model, recipe)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".lora_B." in name:
                param.normal_()
    folder = save_adapter(model, p, tmp_path / "adapter", base=base, recipe=recipe)
    monkeypatch.setenv("HF_ENDPOINT", hub_server.url)
    monkeypatch.setenv("HF_TOKEN", hub_server.tokens["alice"])
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    pushed = push(folder, "alice/vit-lora")
    assert pushed.ref.startswith("hf-hub:alice/vit-lora")
    expected = _out(model, _input("vit"))
    assert torch.equal(_out(surgery.load("hf-hub:alice/vit-lora", base=base), _input("vit")), expected)

    # PEFT alone, in a fresh process that knows the hub from HF_ENDPOINT: from_pretrained(base, "alice/vit-lora")
    save_file({"x": _input("vit"), **{f"w.{k}": v for k, v in base.state_dict().items()}}, str(tmp_path / "in.st"))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING"))}
    env.update(HF_ENDPOINT=hub_server.url, HF_HOME=str(tmp_path / "fresh"), HF_HUB_DISABLE_XET="1")
    script = f"""
        import timm, torch
        from peft import PeftModel
        from safetensors.torch import load_file, save_file
        d = load_file({str(tmp_path / "in.st")!r})
        base = timm.create_model("test_vit", img_size=32, num_classes={NUM_CLASSES})
        base.load_state_dict({{k[2:]: v for k, v in d.items() if k.startswith("w.") and not k.startswith("w.head.")}},
                             strict=False)
        model = PeftModel.from_pretrained(base, "alice/vit-lora").eval()
        with torch.no_grad():
            save_file({{"y": model(d["x"])}}, {str(tmp_path / "out.st")!r})
        """
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert torch.equal(load_file(str(tmp_path / "out.st"))["y"], expected)


def test_several_lora_runs_on_one_base_switch_without_reloading(tmp_path: Path) -> None:
    base = _build("vit")
    outputs = {}
    for task, classes, seed in (("cats", 3, 1), ("dogs", 5, 2)):
        model = copy.deepcopy(base)
        recipe = _recipe("vit")
        recipe["surgery"]["heads"]["classifier"]["num_classes"] = classes
        recipe = load_recipe(recipe)
        torch.manual_seed(seed)
        p = surgery.apply(model, recipe)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if ".lora_B." in name:
                    param.normal_()
        save_adapter(model, p, tmp_path / task, base=base, recipe=recipe)
        outputs[task] = _out(model, _input("vit"))
    multi = surgery.load(base, adapters=[tmp_path / "cats", tmp_path / "dogs"])
    assert isinstance(multi, lora.MultiAdapterModel) and multi.names == ["cats", "dogs"]
    weight = multi.peft_model.get_base_model().blocks[0].attn.qkv.base_layer.weight
    both = multi.predict_all(_input("vit"))
    assert {k: v.shape[1] for k, v in both.items()} == {"cats": 3, "dogs": 5}
    assert all(torch.equal(both[k], outputs[k]) for k in outputs)
    assert torch.equal(_out(multi.use("dogs"), _input("vit")), outputs["dogs"])
    assert multi.peft_model.get_base_model().blocks[0].attn.qkv.base_layer.weight is weight  # one base, not reloaded
    other = _build("vit")
    with torch.no_grad():
        other.blocks[0].attn.qkv.weight.add_(1)
    with pytest.raises(surgery.AdapterError, match="wrong base model"):
        surgery.load(other, adapters={"cats": tmp_path / "cats"})


def test_planning_again_on_a_model_that_carries_lora_keeps_it() -> None:
    model = _build("vit")
    surgery.apply(model, _recipe("vit"))
    again = surgery.plan(model, {"surgery": {"rules": [{"freeze": "*.lora_A.*"}]}})  # no surgery.lora: PEFT's config
    assert again.lora is not None and not again.lora.inject and again.lora.spec.rank == 4
    assert list(again.lora.targets) == [f"blocks.{i}.attn.qkv" for i in range(6)]
    assert not any(q.trainable for q in again.parameters if ".lora_A." in q.name)
    assert all(q.trainable for q in again.parameters if ".lora_B." in q.name)
    with pytest.raises(RecipeError, match=r"created with bias: none.*set surgery\.lora\.bias: all"):
        surgery.plan(model, {"surgery": {"rules": [{"unfreeze": "norm.bias"}]}})
