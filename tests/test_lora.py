"""LoRA through PEFT on timm models: targets, injection, one training step, PEFT round trip, merge, untrusted folders.

Every model is a tiny ``pretrained=False`` timm model; PEFT, timm and safetensors are the real libraries.
"""

from __future__ import annotations

import json
import pickle
import sys
from pathlib import Path

import peft
import pytest
import timm
import torch
from torch import nn

from surgery import lora, norms
from surgery.errors import AdapterError, NoMatchingParameterError, RecipeError
from surgery.heads import replace_module

# family -> (timm name, create kwargs, input size, LoRA targets). ResNet: zero_init_last=False, else the random
# base zeroes every residual branch (last BN gamma 0, frozen) and LoRA inside it gets no gradient.
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
        ["blocks.*.attn.proj", "blocks.*.mlp.fc*"],
    ),
}
NUM_CLASSES = 3
MERGE_TOL = 1e-4  # merged outputs equal the adapter's within 1e-4 * max(1, max |output|) in float32


def _build(family: str, num_classes: int = NUM_CLASSES, seed: int = 0) -> nn.Module:
    name, kwargs, _, _ = FAMILIES[family]
    torch.manual_seed(seed)
    return timm.create_model(name, pretrained=False, num_classes=num_classes, **kwargs)


def _fix_batchnorm_stats(model: nn.Module) -> nn.Module:
    """What the plan's `norm: auto` does under LoRA: the BatchNorm parameters are frozen, so their statistics stay."""
    for path, module in norms.batchnorms(model).items():
        replace_module(model, path, norms.fix_stats(module))
    return model


def _input(family: str, n: int = 2) -> torch.Tensor:
    size = FAMILIES[family][2]
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(1))


def _head(model: nn.Module) -> str:
    return model.pretrained_cfg["classifier"]


def _adapted(family: str, rank: int = 4, num_classes: int = NUM_CLASSES, steps: int = 1, seed: int = 0):
    """A tiny model of the family with LoRA injected and ``steps`` SGD steps taken; (peft_model, base state)."""
    model = _fix_batchnorm_stats(_build(family))  # the same base for every head size
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(seed)
    replace_module(model, _head(model), nn.Linear(model.get_submodule(_head(model)).in_features, num_classes))
    pm = lora.inject(model, {"targets": FAMILIES[family][3], "rank": rank, "alpha": 2 * rank}, heads=[_head(model)])
    opt = torch.optim.SGD([p for p in pm.parameters() if p.requires_grad], lr=0.5)
    x = _input(family, 4)
    y = torch.arange(4) % num_classes
    pm.train()
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(pm(x), y).backward()
        opt.step()
    pm.eval()
    return pm, base_state


def _fresh(family: str, base_state: dict[str, torch.Tensor], num_classes: int = NUM_CLASSES) -> nn.Module:
    model = _fix_batchnorm_stats(_build(family, num_classes=num_classes, seed=123))
    head = _head(model)
    state = {k: v for k, v in base_state.items() if not k.startswith(head + ".")}
    missing = model.load_state_dict(state, strict=False).missing_keys
    assert all(k.startswith(head + ".") for k in missing)
    return model.eval()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_lora_trains_saves_loads_in_peft_and_merges(family: str, tmp_path: Path) -> None:
    name = FAMILIES[family][0]
    pm, base_state = _adapted(family)
    assert isinstance(pm, peft.PeftModel)

    # one step moved LoRA and head parameters only; every base weight is frozen
    rows = {row.name: row for row in lora.lora_parameters(pm)}
    assert {row.kind for row in rows.values()} == {"lora", "saved"}
    for param_name, param in pm.named_parameters():
        assert param.requires_grad == (param_name in rows), param_name
    before = _fix_batchnorm_stats(_build(family))
    before.load_state_dict(base_state)
    base_now = {
        lora.timm_name(n)[0]: p for n, p in pm.named_parameters() if n not in rows and "original_module" not in n
    }
    for key, value in before.state_dict().items():
        if key in base_now:
            assert torch.equal(base_now[key], value), f"base weight {key} moved"
    moved_b = [n for n, p in pm.named_parameters() if ".lora_B." in n and p.abs().sum() > 0]
    assert moved_b, "no LoRA B weight moved in the training step"

    x = _input(family)
    with torch.no_grad():
        expected = pm(x)

    folder = lora.save_peft(pm, tmp_path / "adapter", base_name=f"timm/{name}")
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == f"timm/{name}"
    assert config["peft_type"] == "LORA" and config["modules_to_save"] == [_head(pm)]
    from safetensors import safe_open

    with safe_open(folder / "adapter_model.safetensors", "pt") as fh:
        keys = set(fh.keys())
    assert all(k.startswith("base_model.model.") for k in keys)
    assert any(".lora_A.weight" in k for k in keys) and f"base_model.model.{_head(pm)}.weight" in keys
    assert not any(".default." in k for k in keys)

    # PEFT itself loads it onto a plain timm model of the same base
    peft_loaded = peft.PeftModel.from_pretrained(_fresh(family, base_state), str(folder)).eval()
    with torch.no_grad():
        torch.testing.assert_close(peft_loaded(x), expected, rtol=0, atol=0)

    ours = lora.load_peft(_fresh(family, base_state), folder)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), expected, rtol=0, atol=0)
    assert not any(p.requires_grad for p in ours.parameters())

    merged = lora.merge(ours)
    assert type(merged) is type(_build(family))
    assert not any("lora" in n or "modules_to_save" in n or "base_layer" in n for n, _ in merged.named_parameters())
    plain = _fix_batchnorm_stats(_build(family, seed=7))
    plain.load_state_dict(merged.state_dict())  # strict: exactly a timm model's keys
    with torch.no_grad():
        got = plain.eval()(x)
    assert (got - expected).abs().max() <= MERGE_TOL * max(1.0, expected.abs().max().item())


def test_a_target_matching_nothing_is_a_located_one_line_error() -> None:
    model = _build("vit")
    with pytest.raises(NoMatchingParameterError) as err:
        lora.inject(model, {"targets": ["blocks.*.attn.qvk"]}, where=lambda *p: "r.yaml:7: surgery.lora." + ".".join(p))
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("r.yaml:7: surgery.lora.targets: pattern 'blocks.*.attn.qvk' matches no module")
    assert ".attn.qkv" in message  # the closest real names
    assert not lora.is_peft(model)


def test_an_unsupported_module_type_is_an_error_naming_module_and_type() -> None:
    with pytest.raises(RecipeError, match=r"lora.targets: module 'blocks.0.norm1' is a LayerNorm"):
        lora.lora_config(_build("vit"), {"targets": "blocks.*.norm1"})
    with pytest.raises(RecipeError, match=r"'stages.0.blocks.0.conv_dw' is a grouped Conv2d \(groups=\d+"):
        lora.lora_config(_build("convnext"), {"targets": "stages.*.blocks.*.conv_*"})


def test_a_target_the_model_never_calls_is_refused() -> None:
    # BEiT's attention reads qkv.weight with F.linear when it has q_bias: LoRA there would silently do nothing.
    with pytest.raises(RecipeError, match=r"never calls module 'blocks.0.attn.qkv'"):
        lora.inject(_build("beit"), {"targets": "blocks.*.attn.qkv"}, heads=["head"])


def test_layer_ranges_rank_pattern_and_config_are_exact() -> None:
    model = _build("vit")
    assert lora.resolve_targets(model, {"targets": {"from": "blocks.1", "to": "blocks.1"}}) == [
        "blocks.1.attn.qkv",
        "blocks.1.attn.proj",
        "blocks.1.mlp.fc1",
        "blocks.1.mlp.fc2",
    ]
    spec = {"targets": ["blocks.*.attn.qkv", "!blocks.0.*"], "rank": 8, "rank_pattern": {"blocks.1.*": 2}}
    config = lora.lora_config(model, spec, modules_to_save=["head"])
    qkv = [n for n, _ in model.named_modules() if n.endswith("attn.qkv") and not n.startswith("blocks.0.")]
    assert sorted(config.target_modules) == sorted(qkv)
    assert config.lora_alpha == 8 and config.rank_pattern == {"blocks\\.1\\.attn\\.qkv": 2}
    planned = lora.planned_parameters(model, spec, heads=["head"])  # PEFT on a weightless copy
    assert not lora.is_peft(model) and all(p.device.type == "cpu" for p in model.parameters())
    pm = lora.inject(model, spec, heads=["head"])
    assert [(r.name, r.numel, r.layer) for r in planned] == [
        (r.name, r.numel, r.layer) for r in lora.lora_parameters(pm)
    ]
    shapes = {r.key: r for r in lora.lora_parameters(pm)}
    assert pm.get_submodule("base_model.model.blocks.1.attn.qkv").lora_A["default"].weight.shape[0] == 2
    assert shapes["blocks.1.attn.qkv.lora_A.weight"].layer_name == "blocks.1"
    assert shapes["head.weight"].kind == "saved" and shapes["head.weight"].layer == max(
        r.layer for r in shapes.values()
    )
    with pytest.raises(RecipeError, match=r"lora.rank: Input should be greater than or equal to 1"):
        lora.as_spec({"targets": "x", "rank": 0})
    with pytest.raises(NoMatchingParameterError, match=r"rank_pattern\['nope'\]: pattern 'nope' matches no module"):
        lora.lora_config(_build("vit"), {"targets": "blocks.*.attn.qkv", "rank_pattern": {"nope": 2}})


def test_dora_rslora_and_bias_round_trip_through_peft(tmp_path: Path) -> None:
    model = _build("vit")
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    spec = {"targets": ["blocks.*.attn.qkv", "blocks.*.mlp.fc2"], "use_dora": True, "use_rslora": True, "bias": "all"}
    pm = lora.inject(model, spec, heads=["head"])
    kinds = {r.kind for r in lora.lora_parameters(pm)}
    assert kinds == {"lora", "saved", "bias"}
    opt = torch.optim.SGD([p for p in pm.parameters() if p.requires_grad], lr=0.1)
    nn.functional.cross_entropy(pm(_input("vit", 4)), torch.tensor([0, 1, 2, 0])).backward()
    opt.step()
    pm.eval()
    x = _input("vit")
    with torch.no_grad():
        expected = pm(x)
    folder = lora.save_peft(pm, tmp_path / "dora", base_name="timm/test_vit")
    in_peft = peft.PeftModel.from_pretrained(_fresh("vit", base_state), str(folder)).eval()
    ours = lora.load_peft(_fresh("vit", base_state), folder)
    with torch.no_grad():
        torch.testing.assert_close(in_peft(x), expected, rtol=0, atol=0)
        torch.testing.assert_close(ours(x), expected, rtol=0, atol=0)
        merged = lora.merge(ours)(x)
    assert (merged - expected).abs().max() <= MERGE_TOL * max(1.0, expected.abs().max().item())


def test_targets_a_suffix_would_confuse_become_an_exact_regex() -> None:
    model = nn.Sequential()
    model.add_module("fc", nn.Linear(4, 4))
    model.add_module("block", nn.Sequential())
    model.block.add_module("fc", nn.Linear(4, 4))
    config = lora.lora_config(model, {"targets": "fc"})
    assert config.target_modules == "(fc)"  # PEFT's list form would also adapt block.fc
    assert lora.lora_config(model, {"targets": "block.fc"}).target_modules == {"block.fc"}


def test_save_refuses_a_trainable_parameter_peft_would_drop(tmp_path: Path) -> None:
    pm, _ = _adapted("vit")
    pm.get_submodule("base_model.model.blocks.0.norm1").weight.requires_grad_(True)
    with pytest.raises(AdapterError, match=r"'blocks.0.norm1.weight' trains but a PEFT adapter cannot carry it"):
        lora.save_peft(pm, tmp_path / "a", base_name="timm/test_vit")
    assert not (tmp_path / "a" / "adapter_model.safetensors").exists()


def test_load_peft_reads_an_adapter_peft_itself_saved(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = _build("vit")
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    config = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["qkv", "fc1"], modules_to_save=["head"], init_lora_weights=False
    )
    pm = peft.get_peft_model(model, config).eval()
    pm.save_pretrained(tmp_path / "peft", save_embedding_layers=False)
    x = _input("vit")
    with torch.no_grad():
        expected = pm(x)
        torch.testing.assert_close(
            lora.load_peft(_fresh("vit", base_state), tmp_path / "peft")(x), expected, rtol=0, atol=0
        )


def _write_sentinel_module(folder: Path, name: str, marker: Path) -> None:
    (folder / f"{name}.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")


HOSTILE = {
    "url": {"base_model_name_or_path": "https://evil.example/model"},
    "megatron": {"megatron_config": {"tensor_model_parallel_size": 1}, "megatron_core": "lora_evil_mod"},
    "auto_mapping": {"auto_mapping": {"base_model_class": "X", "parent_library": "lora_evil_mod"}},
    "corda_file": {"corda_config": {"cache_file": "/etc/passwd", "covariance_file": "/etc/shadow"}},
    "pissa": {"init_lora_weights": "pissa"},
    "task_type": {"task_type": "SEQ_CLS"},
    "regex_bomb": {"target_modules": "(a+)+$"},
    "regex_bomb_alternation": {"target_modules": "(.|..)*z"},  # slips past a nested-quantifier check: 10 s per name
    "regex_bomb_in_rank_pattern": {"rank_pattern": {"(.|..)*z": 4}},
    "not_lora": {"peft_type": "PREFIX_TUNING"},
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_a_hostile_adapter_config_is_refused_without_running_anything(
    case: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pm, base_state = _adapted("vit")
    folder = lora.save_peft(pm, tmp_path / "adapter", base_name="timm/test_vit")
    marker = tmp_path / "ran.txt"
    _write_sentinel_module(tmp_path, "lora_evil_mod", marker)
    monkeypatch.syspath_prepend(str(tmp_path))
    data = json.loads((folder / "adapter_config.json").read_text())
    data.update(HOSTILE[case])
    (folder / "adapter_config.json").write_text(json.dumps(data))
    with pytest.raises(AdapterError) as err:
        lora.load_peft(_fresh("vit", base_state), folder)
    assert "\n" not in str(err.value) and "adapter_config.json" in str(err.value)
    assert not marker.exists() and "lora_evil_mod" not in sys.modules


class _Boom:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):  # noqa: ANN204 - what a malicious pickle does
        return (open, (self.marker, "w"))


def test_a_pickle_adapter_bin_is_refused_unopened(tmp_path: Path) -> None:
    pm, base_state = _adapted("vit")
    folder = lora.save_peft(pm, tmp_path / "adapter", base_name="timm/test_vit")
    (folder / "adapter_model.safetensors").unlink()
    marker = tmp_path / "ran.txt"
    (folder / "adapter_model.bin").write_bytes(pickle.dumps(_Boom(str(marker))))
    with pytest.raises(AdapterError, match=r"holds only adapter_model.bin, a pickle .* refused"):
        lora.load_peft(_fresh("vit", base_state), folder)
    assert not marker.exists()


def test_a_tampered_adapter_tensor_is_a_clear_error(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    pm, base_state = _adapted("vit")
    folder = lora.save_peft(pm, tmp_path / "adapter", base_name="timm/test_vit")
    tensors = load_file(folder / "adapter_model.safetensors")
    tensors["base_model.model.head.weight"] = torch.zeros(7, tensors["base_model.model.head.weight"].shape[1])
    save_file(tensors, folder / "adapter_model.safetensors")
    with pytest.raises(AdapterError, match=r"'base_model.model.head.weight' is \[7, \d+\] but the base needs \[3, "):
        lora.load_peft(_fresh("vit", base_state), folder)


def test_several_adapters_switch_on_one_base_without_reloading_it(tmp_path: Path) -> None:
    a, base_state = _adapted("vit", num_classes=3, seed=1)
    b, _ = _adapted("vit", num_classes=5, seed=2, steps=2)
    x = _input("vit")
    with torch.no_grad():
        want = {"cats": a(x), "dogs": b(x)}
    lora.save_peft(a, tmp_path / "cats", base_name="timm/test_vit")
    lora.save_peft(b, tmp_path / "dogs", base_name="timm/test_vit")

    multi = lora.load_peft(_fresh("vit", base_state), [tmp_path / "cats", tmp_path / "dogs"])
    assert isinstance(multi, lora.MultiAdapterModel) and multi.names == ["cats", "dogs"] and multi.active == "cats"
    qkv = multi.peft_model.get_submodule("base_model.model.blocks.0.attn.qkv").base_layer.weight
    pointer = qkv.data_ptr()
    with torch.no_grad():
        torch.testing.assert_close(multi(x), want["cats"], rtol=0, atol=0)
        torch.testing.assert_close(multi.use("dogs")(x), want["dogs"], rtol=0, atol=0)
        torch.testing.assert_close(multi.use("cats")(x), want["cats"], rtol=0, atol=0)
        both = multi.predict_all(x)
    assert both["dogs"].shape == (2, 5) and torch.equal(both["cats"], want["cats"]) and multi.active == "cats"
    assert multi.peft_model.get_submodule("base_model.model.blocks.0.attn.qkv").base_layer.weight.data_ptr() == pointer
    with pytest.raises(AdapterError, match=r"no adapter 'birds'; loaded: cats, dogs"):
        multi.use("birds")
    merged_b = lora.merge(multi.use("dogs"))
    with torch.no_grad():
        assert (merged_b.eval()(x) - want["dogs"]).abs().max() <= MERGE_TOL * max(1.0, want["dogs"].abs().max().item())
    with pytest.raises(AdapterError, match=r"adapter name 'a': use letters"):
        lora.MultiAdapterModel(_fresh("vit", base_state), {"a": tmp_path / "cats"})
