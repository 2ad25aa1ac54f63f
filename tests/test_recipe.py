"""Recipe files: schema, YAML safety, extends, overrides, and a table of malformed recipes that each get their own
clear one-line error with exit status 2 and no traceback."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import surgery
from surgery.cli import main
from surgery.errors import RecipeError

MODEL = "model: {name: test_resnet}\n"
HEAD = "  heads: {classifier: {num_classes: 3}}\n"

# (id, recipe text, extra CLI args, expected fragment of the one-line error). {path} is the recipe file.
MALFORMED: list[tuple[str, str, list[str], str]] = [
    (
        "unknown-top-key",
        MODEL + "surgeryy: {}\n",
        [],
        "{path}:2: surgeryy: unknown key 'surgeryy'; did you mean 'surgery'?",
    ),
    (
        "unknown-optim-key",
        MODEL + "optim: {lr_decay: 0.7}\n",
        [],
        "optim.lr_decay: unknown key 'lr_decay'; did you mean 'layer_decay'?",
    ),
    (
        "unknown-rule-key",
        MODEL + "surgery:\n  rules:\n    - freeze: '*'\n      lr_mul: 2\n",
        [],
        "{path}:5: surgery.rules[0].lr_mul: unknown key 'lr_mul'; did you mean 'lr_mult'?",
    ),
    (
        "unknown-head-key",
        MODEL + "surgery:\n  heads: {fc: {num_classes: 3, hiden: [4]}}\n",
        [],
        "surgery.heads.fc.hiden: unknown key 'hiden'; did you mean 'hidden'?",
    ),
    (
        "unknown-model-key",
        "model: {name: test_resnet, pretrain: true}\n",
        [],
        "model.pretrain: unknown key 'pretrain'; did you mean 'pretrained'?",
    ),
    ("lr-not-number", MODEL + "optim: {lr: fast}\n", [], "optim.lr: input should be a valid number"),
    ("lr-negative", MODEL + "optim: {lr: -1}\n", [], "optim.lr: input should be greater than 0 (got -1)"),
    (
        "layer-decay-above-one",
        MODEL + "optim: {layer_decay: 1.5}\n",
        [],
        "optim.layer_decay: input should be less than or equal to 1",
    ),
    (
        "weight-decay-negative",
        MODEL + "optim: {weight_decay: -0.1}\n",
        [],
        "optim.weight_decay: input should be greater than or equal to 0",
    ),
    (
        "norm-typo",
        MODEL + "surgery: {norm: froze}\n",
        [],
        "surgery.norm: input should be 'auto', 'frozen', 'eval' or 'train' (got 'froze'); did you mean 'frozen'?",
    ),
    (
        "head-type",
        MODEL + "surgery:\n  heads: {fc: {num_classes: 3, type: conv}}\n",
        [],
        "surgery.heads.fc.type: input should be 'linear' or 'mlp' (got 'conv')",
    ),
    (
        "head-zero-classes",
        MODEL + "surgery:\n  heads: {fc: {num_classes: 0}}\n",
        [],
        "surgery.heads.fc.num_classes: input should be greater than or equal to 1",
    ),
    (
        "head-missing-classes",
        MODEL + "surgery:\n  heads: {fc: {type: linear}}\n",
        [],
        "surgery.heads.fc.num_classes: the new head's class count is not set",
    ),
    (
        "mlp-no-hidden",
        MODEL + "surgery:\n  heads: {fc: {num_classes: 3, type: mlp}}\n",
        [],
        "an 'mlp' head needs 'hidden' sizes",
    ),
    (
        "linear-with-hidden",
        MODEL + "surgery:\n  heads: {fc: {num_classes: 3, hidden: [8]}}\n",
        [],
        "'hidden' only applies to type: mlp",
    ),
    (
        "linear-with-dropout",
        MODEL + "surgery:\n  heads: {fc: {num_classes: 3, dropout: 0.2}}\n",
        [],
        "for a linear head use model.kwargs.drop_rate",
    ),
    (
        "dropout-one",
        MODEL + "surgery:\n  heads: {fc: {num_classes: 3, type: mlp, hidden: [4], dropout: 1}}\n",
        [],
        "surgery.heads.fc.dropout: input should be less than 1",
    ),
    (
        "two-actions",
        MODEL + "surgery:\n  rules:\n    - {freeze: '*', unfreeze: fc}\n",
        [],
        "a rule needs exactly one of 'freeze', 'unfreeze' or 'select' (got freeze, unfreeze)",
    ),
    (
        "no-action",
        MODEL + "surgery:\n  rules:\n    - {lr: 0.1}\n",
        [],
        "{path}:4: surgery.rules[0]: a rule needs exactly one of",
    ),
    (
        "select-does-nothing",
        MODEL + "surgery:\n  rules:\n    - {select: fc}\n",
        [],
        "a 'select' rule does nothing without 'lr', 'lr_mult' or 'weight_decay'",
    ),
    (
        "lr-mult-zero",
        MODEL + "surgery:\n  rules:\n    - {freeze: '*', lr_mult: 0}\n",
        [],
        "surgery.rules[0].lr_mult: input should be greater than 0",
    ),
    (
        "empty-range",
        MODEL + "surgery:\n  rules:\n    - {freeze: {}}\n",
        [],
        "a layer range needs at least one of 'from', 'to' or 'which'",
    ),
    (
        "range-typo",
        MODEL + "surgery:\n  rules:\n    - freeze: {form: 2}\n",
        [],
        "{path}:4: surgery.rules[0].freeze.form: unknown key 'form'; did you mean 'from'?",
    ),
    ("rules-not-list", MODEL + "surgery:\n  rules: {freeze: '*'}\n", [], "surgery.rules: input should be a valid list"),
    (
        "pretrained-not-bool",
        "model: {name: test_resnet, pretrained: maybe}\n",
        [],
        "model.pretrained: input should be a valid boolean",
    ),
    (
        "python-tag",
        MODEL + "description: !!python/object/apply:os.system ['echo pwned']\n",
        [],
        "{path}:2: description: YAML tag 'tag:yaml.org,2002:python/object/apply:os.system' is not allowed",
    ),
    (
        "custom-tag",
        MODEL + "surgery: !include other.yaml\n",
        [],
        "YAML tag '!include' is not allowed; a recipe is plain data",
    ),
    ("bad-yaml", MODEL + "surgery:\n  rules:\n    - freeze: '*'\n   - oops\n", [], "{path}:5: not valid YAML"),
    ("duplicate-key", MODEL + "optim: {lr: 0.1}\noptim: {lr: 0.2}\n", [], "{path}:3: optim: duplicate key"),
    ("top-level-list", "- freeze: '*'\n", [], "{path}:1: a recipe is a mapping of sections"),
    (
        "extends-missing",
        "extends: ./nope.yaml\n" + MODEL,
        [],
        "no recipe file './nope.yaml' and no built-in recipe of that name",
    ),
    ("extends-typo", "extends: linear-prob\n" + MODEL, [], "did you mean 'linear-probe'?"),
    ("extends-cycle", "extends: bad.yaml\n" + MODEL, [], "extends: cycle bad.yaml -> bad.yaml"),
    ("extends-mapping", "extends: {a: 1}\n" + MODEL, [], "extends: must be a recipe name or a list of them"),
    (
        "override-no-equals",
        MODEL + "surgery:\n" + HEAD,
        ["optim.lr"],
        "argument 'optim.lr': expected key=value after the recipe",
    ),
    (
        "override-bad-index",
        MODEL + "surgery:\n  rules: [{freeze: '*'}]\n" + HEAD,
        ["surgery.rules.5.lr=1"],
        "surgery.rules: list has 1 items; use 0..0",
    ),
    ("override-into-scalar", MODEL + "optim: {lr: 0.1}\n", ["optim.lr.x=1"], "optim.lr is a number, not a section"),
    (
        "override-unknown-key",
        MODEL,
        ["optim.learning_rate=1"],
        "override 'optim.learning_rate=1': optim.learning_rate: unknown key 'learning_rate'",
    ),
    (
        "pattern-matches-nothing",
        MODEL + "surgery:\n  rules: [{freeze: 'layer9.*'}]\n",
        [],
        "{path}:3: surgery.rules[0].freeze: pattern 'layer9.*' matches no parameter; closest names: layer4.0",
    ),
    (
        "regex-matches-nothing",
        MODEL + "surgery:\n  rules: [{freeze: 're:^block\\.'}]\n",
        [],
        "pattern 're:^block\\\\.' matches no parameter",
    ),
    (
        "regex-invalid",
        MODEL + "surgery:\n  rules: [{freeze: 're:layer[1'}]\n",
        [],
        "invalid regular expression 'layer[1'",
    ),
    (
        "negation-removes-nothing",
        MODEL + "surgery:\n  rules: [{freeze: ['*', '!layer7']}]\n" + HEAD,
        [],
        "exclusion '!layer7' removes nothing from the selection",
    ),
    (
        "empty-pattern-list",
        MODEL + "surgery:\n  rules: [{freeze: []}]\n",
        [],
        "empty list of patterns; use '*' for every parameter",
    ),
    (
        "layer-index-range",
        MODEL + "surgery:\n  rules: [{freeze: {from: 99}}]\n",
        [],
        "surgery.rules[0].freeze.from: layer index 99 is out of range; the model has 6 layers",
    ),
    (
        "layer-name-unknown",
        MODEL + "surgery:\n  rules: [{freeze: {to: layer9}}]\n",
        [],
        "freeze.to: no layer or module named 'layer9'; closest layers",
    ),
    (
        "layer-share-invalid",
        MODEL + "surgery:\n  rules: [{freeze: {to: '150%'}}]\n",
        [],
        "'150%' is not a share of the layers",
    ),
    (
        "from-after-to",
        MODEL + "surgery:\n  rules: [{freeze: {from: 4, to: 1}}]\n",
        [],
        "'from' (layer 4, layer4.0) comes after 'to' (layer 1, layer1.0); swap them",
    ),
    (
        "nothing-trainable",
        MODEL + "surgery:\n  rules: [{freeze: '*'}]\n",
        [],
        "no parameter is trainable after surgery.rules and surgery.heads",
    ),
    (
        "head-module-unknown",
        MODEL + "surgery:\n  heads: {fcc: {num_classes: 3}}\n",
        [],
        "surgery.heads.fcc: the model has no module 'fcc' to replace; closest modules: fc",
    ),
    (
        "head-twice",
        MODEL + "surgery:\n  heads: {classifier: {num_classes: 3}, fc: {num_classes: 4}}\n",
        [],
        "'fc' is already replaced by heads.classifier; keep one",
    ),
    ("timm-unknown", "model: {name: resnet181}\n", [], "model.name: timm has no model 'resnet181'; did you mean"),
    ("torchvision-unknown", "model: {name: 'torchvision:resnet181'}\n", [], "torchvision has no model 'resnet181'"),
    (
        "torchvision-pretrained",
        "model: {name: 'torchvision:resnet18', pretrained: true}\n",
        ["--num-classes", "3"],
        "torchvision weights cannot be downloaded here",
    ),
    (
        "model-kwargs",
        "model: {name: test_resnet, kwargs: {bogus: 1}}\n",
        [],
        "model.kwargs: 'test_resnet' does not accept these arguments",
    ),
    ("no-model", "surgery:\n" + HEAD, [], "the recipe has no model: add model.name to it or pass --model NAME"),
    ("num-classes-zero", MODEL, ["--num-classes", "0"], "--num-classes: the class count must be at least 1, got 0"),
    ("unknown-flag", MODEL, ["--frobnicate"], "unrecognized arguments: --frobnicate"),
    ("model-shorthand-wrong-type", "model: [resnet18]\n", [], "model: input should be a valid dictionary"),
]


@pytest.fixture
def recipe_dir(tmp_path: Path) -> Path:
    (tmp_path / "bad.yaml").write_text("extends: bad.yaml\n")
    return tmp_path


@pytest.mark.parametrize(("case", "text", "args", "expected"), MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_recipe_gets_one_clear_line(recipe_dir, capsys, case, text, args, expected) -> None:
    path = recipe_dir / ("bad.yaml" if case == "extends-cycle" else "recipe.yaml")
    if case != "extends-cycle":
        path.write_text(text)
    status = main(["plan", str(path), *args])
    out, err = capsys.readouterr()
    assert status == 2
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("surgery: error: ")
    assert expected.format(path=path) in lines[0], lines[0]
    assert "Traceback" not in err


def test_malformed_messages_are_distinct() -> None:
    fragments = [m[3] for m in MALFORMED]
    assert len(MALFORMED) >= 40
    assert len(set(fragments)) == len(fragments)


def test_checkpoint_errors(tmp_path: Path, capsys) -> None:
    pth = tmp_path / "w.pth"
    pth.write_bytes(b"not really")
    for checkpoint, expected in [(pth, "is not a .safetensors file"), (tmp_path / "x.safetensors", "no file")]:
        recipe = tmp_path / "r.yaml"
        recipe.write_text(f"model: {{name: test_resnet, checkpoint: '{checkpoint}'}}\n")
        with pytest.raises(surgery.ModelError, match=expected):
            surgery.build_model(surgery.load_recipe(recipe).model)


def test_error_in_a_real_process_has_no_traceback(tmp_path: Path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text(MODEL + "surgery:\n  rules: [{freeze: 'layer9'}]\n")
    proc = subprocess.run([sys.executable, "-m", "surgery", "plan", str(recipe)], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert f"{recipe}:3: surgery.rules[0].freeze: pattern 'layer9' matches no parameter" in proc.stderr
    debug = subprocess.run(
        [sys.executable, "-m", "surgery", "--debug", "plan", str(recipe)], capture_output=True, text=True
    )
    assert "Traceback" in debug.stderr and debug.returncode != 0


# ------------------------------------------------------------------------------------------------ what does load


def test_extends_merges_and_child_rules_come_last(tmp_path: Path) -> None:
    (tmp_path / "base.yaml").write_text(
        "model: {name: test_resnet, kwargs: {drop_rate: 0.1}}\n"
        "surgery:\n  rules: [{freeze: '*'}]\n  heads: {classifier: {num_classes: 3, type: mlp, hidden: [64, 32]}}\n"
        "optim: {lr: 0.1, weight_decay: 0.01}\n"
    )
    (tmp_path / "child.yaml").write_text(
        "extends: base.yaml\nmodel: {kwargs: {drop_path_rate: 0.05}}\n"
        "surgery:\n  rules: [{unfreeze: layer4}]\n  heads: {classifier: {hidden: [16]}}\noptim: {lr: 0.01}\n"
    )
    recipe = surgery.load_recipe(tmp_path / "child.yaml")
    assert recipe.model.kwargs == {"drop_rate": 0.1, "drop_path_rate": 0.05}
    assert [r.action for r in recipe.surgery.rules] == ["freeze", "unfreeze"]
    assert recipe.surgery.heads["classifier"].hidden == [16], "lists of plain values are replaced"
    assert recipe.surgery.heads["classifier"].num_classes == 3
    assert (recipe.optim.lr, recipe.optim.weight_decay) == (0.01, 0.01)
    # located errors point into the file that said it, with indices shifted by the parent's rules
    assert recipe.where("surgery", "rules", 1, "unfreeze") == f"{tmp_path / 'child.yaml'}:4: surgery.rules[1].unfreeze"
    assert recipe.where("surgery", "rules", 0) == f"{tmp_path / 'base.yaml'}:3: surgery.rules[0]"


def test_replace_marker_and_builtin_parent(tmp_path: Path) -> None:
    (tmp_path / "r.yaml").write_text(
        "extends: [linear-probe]\nmodel: test_resnet\n"
        "surgery:\n  rules: {_replace_: [{freeze: {to: 2}}]}\n  heads: {_replace_: {fc: {num_classes: 5}}}\n"
    )
    recipe = surgery.load_recipe(tmp_path / "r.yaml")
    assert len(recipe.surgery.rules) == 1 and recipe.surgery.rules[0].freeze.to == 2
    assert list(recipe.surgery.heads) == ["fc"]
    assert recipe.model.name == "test_resnet"


def test_overrides_parse_yaml_values_and_indices() -> None:
    recipe = surgery.load_recipe(
        "linear-probe",
        [
            "optim.lr=1e-4",
            "surgery.rules.0.freeze=[layer1, layer2]",
            "surgery.heads.classifier.num_classes=7",
            "model.name=test_vit",
            "surgery.norm=frozen",
        ],
    )
    assert recipe.optim.lr == pytest.approx(1e-4)
    assert recipe.surgery.rules[0].freeze == ["layer1", "layer2"]
    assert recipe.surgery.heads["classifier"].num_classes == 7
    assert recipe.surgery.norm == "frozen" and recipe.model.name == "test_vit"


def test_load_from_mapping_and_recipe_object() -> None:
    spec = {
        "model": {"name": "test_resnet"},
        "surgery": {"rules": [{"freeze": "*"}], "heads": {"fc": {"num_classes": 2}}},
    }
    recipe = surgery.load_recipe(spec)
    assert surgery.load_recipe(recipe).model_dump() == recipe.model_dump()
    with pytest.raises(RecipeError, match=r"<mapping>: surgery.rules\[0\].freeze: input should be"):
        surgery.load_recipe({"surgery": {"rules": [{"freeze": 3}]}})


def test_every_builtin_recipe_loads_and_says_when_to_use_it() -> None:
    builtins = surgery.builtin_recipes()
    assert {"linear-probe", "full-finetune", "llrd", "partial", "bn-frozen"} <= set(builtins)
    for name, path in builtins.items():
        text = path.read_text()
        assert text.startswith("#") and "Use " in text, f"{name} must say in a comment when to use it"
        assert surgery.load_recipe(name).description


def test_schema_command_prints_json_schema(capsys) -> None:
    assert main(["schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    assert schema["title"] == "timm-surgery recipe"
    assert {"model", "surgery", "optim", "extends"} <= set(schema["properties"])
    rule = schema["$defs"]["Rule"]["properties"]
    assert {"freeze", "unfreeze", "select", "lr", "lr_mult", "weight_decay"} <= set(rule)
    assert schema["$defs"]["Rule"]["additionalProperties"] is False
    assert all(prop.get("description") for prop in rule.values())


def test_resolved_data_is_the_one_copy_runs_and_adapters_keep(tmp_path: Path) -> None:
    from surgery.recipe import resolved_data

    (tmp_path / "r.yaml").write_text(
        "extends: gradual-unfreeze\nmodel: {name: test_resnet, checkpoint: w.safetensors}\ndata: {root: imgs}\n"
    )
    data = resolved_data(surgery.load_recipe(tmp_path / "r.yaml"))
    assert data["model"]["checkpoint"] == str(tmp_path / "w.safetensors")
    assert Path(data["data"]["root"]).is_absolute()
    assert "epochs" not in data["train"] and len(data["train"]["stages"]) == 2
    assert surgery.load_recipe(data).train.stages[1].lr == pytest.approx(1e-4), "the copy loads back"
    with_predicate = surgery.load_recipe(
        {"surgery": {"rules": [{"freeze": surgery.LayerRange(which=lambda i, name: i < 2)}]}}
    )
    with pytest.raises(RecipeError, match=r"which=callable\) cannot be saved as data; use layer indices or names"):
        resolved_data(with_predicate)
    assert "lambda" in resolved_data(with_predicate, predicates="repr")["surgery"]["rules"][0]["freeze"]["which"]


def test_recipe_package_and_the_old_module_names_export_the_same_objects() -> None:
    """``surgery.recipe`` (schema + loader) is the home; ``surgery.schema`` stays importable (public API: add, don't
    break), and the lazy top-level names are the same objects."""
    import surgery.recipe as recipe_pkg
    import surgery.schema as old_schema
    from surgery.recipe import load as load_mod
    from surgery.recipe import schema as schema_mod

    for name in ("Recipe", "ModelSpec", "HeadSpec", "Rule", "LayerRange", "OptimSpec", "SurgerySpec", "json_schema"):
        assert getattr(old_schema, name) is getattr(schema_mod, name) is getattr(recipe_pkg, name)
        assert getattr(surgery, name) is getattr(schema_mod, name)
    for name in ("load_recipe", "builtin_recipes", "LoadedRecipe", "with_num_classes"):
        assert getattr(surgery, name) is getattr(load_mod, name) is getattr(recipe_pkg, name)
    assert "linear-probe" in surgery.builtin_recipes()
