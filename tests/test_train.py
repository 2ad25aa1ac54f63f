"""Train room: the Accelerate loop on tiny timm models and generated image folders, one process and two, stages,
checkpoints and exact resume after a real SIGKILL, SIGINT, the linear-probe feature cache, bad data before training."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import load_file
from torch import nn
from torch.utils.data import TensorDataset

import surgery
from surgery.errors import DataError, RecipeError, SurgeryError
from surgery.optim import build_optimizer, build_scheduler, current_lrs, set_param_groups
from surgery.recipe import load_recipe
from surgery.train import feature_cache_reason, latest_checkpoint, train
from tools.toydata import make_xor, write_synthetic_folders

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _free_port() -> int:
    """A port no one listens on: each `accelerate launch` needs its own rendezvous port (the default, 29500, is
    shared by every launch on the machine, so two concurrent launches, or one just after another, collide)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict[str, str]:
    """Subprocesses use this process's thread count: float sums depend on it, and exact-resume tests compare runs
    made here with runs made there (another test may have called torch.set_num_threads)."""
    return {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": str(torch.get_num_threads())}


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_synthetic_folders(tmp_path_factory.mktemp("shapes") / "data", classes=3, per_class=8, val_per_class=4)


def _recipe(data: Path, model: str = "test_resnet", **train: object) -> dict:
    return {
        "model": {"name": model},
        "surgery": {"heads": {"classifier": {"num_classes": 3}}},
        "optim": {"lr": 3e-3},
        "data": {"root": str(data), "img_size": 32},
        "train": {"epochs": 2, "batch_size": 8, "seed": 1, **train},
    }


def _weights_equal(a: Path, b: Path) -> bool:
    x, y = load_file(str(a)), load_file(str(b))
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


# ------------------------------------------------------------------------------------------------ optimizer


def test_optimizer_uses_plan_groups_and_schedule_keeps_absolute_lrs() -> None:
    model = timm.create_model("test_resnet", num_classes=3)
    recipe = load_recipe(
        {
            "surgery": {
                "rules": [{"freeze": "*"}, {"unfreeze": "layer4", "lr": 1e-4}],
                "heads": {"classifier": {"num_classes": 3, "lr": 1e-2}},
            },
            "train": {"warmup_steps": 2, "warmup_lr": 0.0},
        }
    )
    p = surgery.apply(model, recipe)
    for name in ("adamw", "sgd", "lamb"):
        opt = build_optimizer(p.param_groups(model), recipe.optim.model_copy(update={"name": name}))
        assert sorted({g["lr"] for g in opt.param_groups}) == [1e-4, 1e-2]
        assert all("lr_scale" not in g for g in opt.param_groups)
    sched = build_scheduler(opt, recipe.train, epochs=2, updates_per_epoch=5)
    sched.step_update(0)
    assert current_lrs(opt) == [0.0] * len(opt.param_groups)  # warmup starts at warmup_lr
    for t in (2, 5, 9):  # after warmup, each group follows the cosine from its own absolute lr
        sched.step_update(t)
        low, high = sorted(set(current_lrs(opt)))
        assert high / low == pytest.approx(100) and high < 1e-2
    sched.step_update(10)
    assert max(current_lrs(opt)) == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(RecipeError, match="timm has no optimizer 'adamq'"):
        build_optimizer(p.param_groups(model), recipe.optim.model_copy(update={"name": "adamq"}))


def test_set_param_groups_adds_new_parameters_and_keeps_state() -> None:
    a, b = nn.Parameter(torch.ones(2)), nn.Parameter(torch.ones(3))
    opt = torch.optim.AdamW([{"params": [a], "lr": 0.1, "weight_decay": 0.0}])
    a.grad = torch.ones(2)
    opt.step()
    moment = opt.state[a]["exp_avg"].clone()
    added, kept = set_param_groups(
        opt, [{"params": [a], "lr": 0.01, "weight_decay": 0.0}, {"params": [b], "lr": 0.001, "weight_decay": 0.0}]
    )
    assert (added, kept) == (1, 1)
    assert torch.equal(opt.state[a]["exp_avg"], moment) and float(opt.state[a]["step"]) == 1
    assert [g["lr"] for g in opt.param_groups] == [0.01, 0.001] and opt.param_groups[1]["betas"] == (0.9, 0.999)


# ---------------------------------------------------------------------------------------------- one process


def test_train_end_to_end_writes_the_output_folder(data: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = train(_recipe(data, epochs=3), output_dir=out, progress=False)
    assert result.output_dir == out and result.class_names == ["class_0", "class_1", "class_2"]
    hist = result.history
    assert [h["epoch"] for h in hist] == [1, 2, 3]
    assert hist[-1]["train_loss"] < hist[0]["train_loss"]
    for key in ("val_loss", "val_top1", "val_macro_f1", "val_balanced_acc", "train_loss", "images_per_s"):
        assert key in result.metrics
    assert "val_top5" not in result.metrics  # 3 classes: top-5 is only reported with more than 5
    # outputs: safetensors weights that load into the recipe's model, the resolved recipe, classes, metrics, plots
    names = {p.name for p in out.iterdir()}
    assert {"model.safetensors", "recipe.yaml", "classes.json", "metrics.json", "metrics.jsonl"} <= names
    assert {"learning_curve.png", "train.log", "plan.json", "logs", "checkpoints"} <= names
    pickles = [p for p in out.rglob("*") if p.suffix in (".pt", ".pth", ".bin", ".pkl")]
    assert all("checkpoints" in p.parts for p in pickles)  # outputs are safetensors; only Accelerate's state pickles
    fresh = surgery.build_model(surgery.ModelSpec(name="test_resnet"))
    surgery.apply(fresh, load_recipe(out / "recipe.yaml"))  # the saved recipe is complete and loadable
    fresh.load_state_dict(load_file(str(out / "model.safetensors")))
    assert torch.equal(fresh.fc.weight, result.model.fc.weight)
    assert json.loads((out / "classes.json").read_text()) == result.class_names
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"epoch"' in line]
    assert [line["epoch"] for line in lines] == [1, 2, 3] and "val_top1" in lines[0]
    assert [line["step"] for line in lines] == [h["global_step"] for h in hist]  # x-axis: optimizer updates
    assert list((out / "logs").rglob("events.out.tfevents.*"))
    assert json.loads((out / "metrics.json").read_text())["val_top1"] == result.metrics["val_top1"]
    assert Image.open(out / "learning_curve.png").size[0] > 100
    # a second run into the same folder must be an explicit resume
    with pytest.raises(SurgeryError, match="--resume"):
        train(_recipe(data, epochs=3), output_dir=out, progress=False)


@pytest.mark.parametrize("name", ["test_vit", "test_efficientnet"])
def test_train_other_architectures_in_memory(data: Path, name: str) -> None:
    result = train(_recipe(data, model=name, epochs=1, grad_accum_steps=2, clip_grad_norm=1.0), progress=False)
    assert result.output_dir is None and result.metrics["steps"] == 2  # 3 batches, an update every 2 and at the end
    assert 0 <= result.metrics["val_top1"] <= 1


def test_xor_mlp_trains_with_binary_cross_entropy() -> None:
    """Not an image classifier: a 2-D MLP with one logit trains through the same loop (loss: auto picks BCE)."""
    x, y = make_xor(512, seed=0)
    vx, vy = make_xor(256, seed=1)
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(2, 16), nn.Tanh(), nn.Linear(16, 1))
    recipe = {"optim": {"lr": 0.05, "weight_decay": 0.0}, "train": {"epochs": 15, "batch_size": 64}}
    result = train(recipe, model=mlp, train_data=TensorDataset(x, y), val_data=TensorDataset(vx, vy), progress=False)
    assert result.model is mlp
    assert result.metrics["val_top1"] > 0.78  # the Bayes ceiling is ~0.857
    assert "val_top5" not in result.metrics


def test_feature_cache_trains_the_same_head_much_faster(data: Path) -> None:
    probe = _recipe(data, epochs=2)
    probe["surgery"]["rules"] = [{"freeze": "*"}]
    probe["data"]["augment"] = "none"
    cached = train(probe, progress=False)
    assert cached.metrics["feature_cache"] is True and cached.metrics["feature_cache_reason"] is None
    probe["train"]["feature_cache"] = "off"
    plain = train(probe, progress=False)
    assert plain.metrics["feature_cache"] is False
    a, b = cached.model.state_dict(), plain.model.state_dict()
    assert all(torch.allclose(a[k].float(), b[k].float(), atol=1e-5) for k in a)  # same training, other route
    # why not, in one line each
    model = timm.create_model("test_resnet")
    probe["train"]["feature_cache"] = "auto"
    p = surgery.plan(model, load_recipe(probe))
    assert feature_cache_reason(p, load_recipe(probe)) is None
    light = {**probe, "data": {**probe["data"], "augment": "light"}}
    assert "data.augment is 'light'" in feature_cache_reason(p, load_recipe(light))
    full = {**probe, "surgery": {"heads": probe["surgery"]["heads"]}}
    assert "outside the head" in feature_cache_reason(surgery.plan(model, load_recipe(full)), load_recipe(full))


def test_stages_unfreeze_join_the_optimizer_and_keep_state(data: Path, tmp_path: Path) -> None:
    recipe = _recipe(data)
    recipe["surgery"]["rules"] = [{"freeze": "*"}]
    recipe["train"].pop("epochs")
    recipe["train"]["stages"] = [{"epochs": 1}, {"epochs": 1, "rules": [{"unfreeze": "layer4"}], "lr": 1e-3}]
    out = tmp_path / "staged"
    result = train(recipe, output_dir=out, progress=False)
    m = result.model
    torch.manual_seed(1)  # same seed as the recipe: same pretrained-free initialization
    init = surgery.build_model(surgery.ModelSpec(name="test_resnet"))
    before = {k: v for k, v in init.state_dict().items() if not k.startswith("fc.")}
    after = m.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items() if k.startswith("layer1"))  # frozen throughout
    assert any(not torch.equal(after[k], v) for k, v in before.items() if k.startswith("layer4") and "conv" in k)
    assert [h["stage"] for h in result.history] == ["stage0", "stage1"]
    assert "join the optimizer" in (out / "train.log").read_text()
    # optimizer state in the last checkpoint: the head kept its AdamW step count, layer4's started in stage 1
    opt = torch.load(latest_checkpoint(out) / "optimizer.bin", weights_only=False)
    names = [n for g in opt["param_groups"] for n in g["param_names"]]
    steps = {names[i]: float(s["step"]) for i, s in opt["state"].items()}
    assert steps["fc.weight"] == 2 * steps["layer4.0.conv1.weight"] == 6
    assert not any(n.startswith("layer1") for n in names)


# ----------------------------------------------------------------------------------------------- bad data


def _bad(root: Path, case: str) -> Path:
    write_synthetic_folders(root, classes=2, per_class=2)
    if case == "missing_val":
        for f in (root / "val").rglob("*.png"):
            f.unlink()
        for d in sorted((root / "val").iterdir()):
            d.rmdir()
        (root / "val").rmdir()
    elif case == "empty_class":
        for f in (root / "train" / "class_1").iterdir():
            f.unlink()
    elif case == "corrupt":
        (root / "train" / "class_0" / "000.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    elif case == "class_mismatch":
        (root / "val" / "class_1").rename(root / "val" / "class_9")
    elif case == "stray":
        Image.new("RGB", (8, 8)).save(root / "train" / "loose.png")
    return root


@pytest.mark.parametrize(
    "case,match",
    [
        ("missing_val", "val folder"),
        ("empty_class", "has no images"),
        ("corrupt", "cannot decode image"),
        ("class_mismatch", "class folders differ"),
        ("stray", "outside any class folder"),
    ],
)
def test_bad_data_is_reported_before_training(tmp_path: Path, case: str, match: str) -> None:
    root = _bad(tmp_path / "data", case)
    out = tmp_path / "out"
    recipe = {**_recipe(root), "surgery": {"heads": {"classifier": {"num_classes": 2}}}}
    with pytest.raises(DataError, match=match) as info:
        train(recipe, output_dir=out, progress=False)
    assert "\n" not in str(info.value)
    assert not out.exists()  # nothing was built, trained or written


def test_cli_reports_bad_data_and_class_count_in_one_line(data: Path, tmp_path: Path) -> None:
    from surgery.cli import main

    recipe = tmp_path / "r.yaml"
    recipe.write_text(json.dumps({**_recipe(tmp_path / "nowhere")}))
    assert main(["train", str(recipe), "--output", str(tmp_path / "o")]) == 2
    recipe.write_text(json.dumps({**_recipe(data), "surgery": {"heads": {"classifier": {"num_classes": 5}}}}))
    with pytest.raises(RecipeError, match=r"5 classes but data.root \(3 class folders\) has 3"):
        train(load_recipe(recipe), progress=False)


# ------------------------------------------------------------------------------- checkpoints, kill, resume


def _killable_recipe(data: Path, path: Path) -> Path:
    recipe = _recipe(data, epochs=4, batch_size=4, deterministic=True, checkpoint_every_steps=2, ema=True)
    recipe["train"]["keep_checkpoints"] = 50
    recipe["train"]["stages"] = [{"epochs": 2}, {"epochs": 2, "rules": [{"freeze": "layer1"}], "lr": 1e-3}]
    recipe["train"].pop("epochs")
    path.write_text(json.dumps(recipe))
    return path


@pytest.fixture(scope="module")
def reference(data: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """An uninterrupted run of the killable recipe (data order and augmentation are random, deterministic mode)."""
    tmp = tmp_path_factory.mktemp("ref")
    recipe = _killable_recipe(data, tmp / "r.json")
    train(load_recipe(recipe), output_dir=tmp / "out", progress=False)
    return recipe, tmp / "out"


def _start(recipe: Path, out: Path) -> subprocess.Popen:
    cmd = [str(BIN / "python"), "-m", "surgery", "train", str(recipe), "--output", str(out), "--no-progress"]
    return subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_checkpoint(proc: subprocess.Popen, out: Path, min_step: int, timeout: float = 120) -> Path:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ckpt = latest_checkpoint(out)
        if ckpt is not None and json.loads((ckpt / "trainer_state.json").read_text())["global_step"] >= min_step:
            return ckpt
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.005)
    raise AssertionError("no checkpoint appeared")


def test_resume_after_sigkill_equals_uninterrupted_run(reference: tuple[Path, Path], tmp_path: Path) -> None:
    recipe, ref = reference
    total = json.loads((ref / "metrics.json").read_text())["steps"]
    out = tmp_path / "killed"
    proc = _start(recipe, out)
    _wait_for_checkpoint(proc, out, min_step=3)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "metrics.json").exists()
    state = json.loads((latest_checkpoint(out) / "trainer_state.json").read_text())
    assert 3 <= state["global_step"] < total
    result = train(load_recipe(recipe), output_dir=out, resume=True, progress=False)
    assert result.metrics["steps"] == total
    assert _weights_equal(out / "model.safetensors", ref / "model.safetensors")
    assert _weights_equal(out / "model_ema.safetensors", ref / "model_ema.safetensors")
    assert [h["epoch"] for h in result.history] == [1, 2, 3, 4]
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["epoch"] for x in lines if "epoch" in x] == [1, 2, 3, 4]
    assert [x["step"] for x in lines if "train/loss" in x] == list(range(1, total + 1))  # one line per update


def test_resume_from_every_kind_of_checkpoint(reference: tuple[Path, Path], tmp_path: Path) -> None:
    """Mid-epoch, epoch end, the stage boundary: each resumes to the same weights (a checkpoint copied = a kill)."""
    import shutil

    recipe, ref = reference
    picks = {}
    for ckpt in sorted((ref / "checkpoints").iterdir()):
        s = json.loads((ckpt / "trainer_state.json").read_text())
        kind = "stage_end" if s["stage_epoch"] == 2 else "mid_epoch" if s["batch"] else "epoch_end"
        if s["stage"] == 1 and kind == "mid_epoch":
            kind = "mid_epoch_stage1"
        picks.setdefault(kind, ckpt)
    assert {"mid_epoch", "epoch_end", "stage_end", "mid_epoch_stage1"} <= set(picks)
    assert json.loads((ref / "metrics.json").read_text())["channels_last"] is True  # auto: a convnet, trained so
    for kind in ("stage_end", "mid_epoch_stage1"):
        out = tmp_path / kind
        shutil.copytree(picks[kind], out / "checkpoints" / picks[kind].name)
        train(load_recipe(recipe), output_dir=out, resume=True, progress=False)
        assert _weights_equal(out / "model.safetensors", ref / "model.safetensors"), kind


def test_sigint_saves_a_checkpoint_then_resume_finishes(reference: tuple[Path, Path], tmp_path: Path) -> None:
    recipe, ref = reference
    out = tmp_path / "interrupted"
    proc = _start(recipe, out)
    first = _wait_for_checkpoint(proc, out, min_step=3)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err
    assert "continue with --resume" in err  # printed by the CLI, also with --no-progress
    last = latest_checkpoint(out)
    assert last != first  # saved at the step the signal arrived, not only the periodic one
    assert "continue with --resume" in (out / "train.log").read_text()
    train(load_recipe(recipe), output_dir=out, resume=True, progress=False)
    assert _weights_equal(out / "model.safetensors", ref / "model.safetensors")


# ---------------------------------------------------------------------------------------------- processes

_RANK_SCRIPT = """
import faulthandler, hashlib, json, sys, torch
faulthandler.dump_traceback_later(150, exit=True)  # a hang shows every rank's stack in the test's failure
from accelerate import PartialState
from surgery.train import train
def digest(model):
    return hashlib.sha256(b"".join(v.detach().cpu().numpy().tobytes() for v in model.state_dict().values())).hexdigest()
result = train(json.load(open(sys.argv[1])), output_dir=sys.argv[2], progress=False)
# train() leaves the process group to the script: it can train again, and collectives still work
again = train(json.load(open(sys.argv[1])), output_dir=sys.argv[2] + "-again", progress=False)
state = PartialState()
ranks = [None] * state.num_processes
torch.distributed.all_gather_object(ranks, state.process_index)
assert ranks == list(range(state.num_processes)) and digest(again.model) == digest(result.model), "not the same run"
open(f"{sys.argv[2]}.rank{state.process_index}", "w").write(digest(result.model))
"""


def test_two_gloo_processes_end_with_the_same_weights(data: Path, tmp_path: Path) -> None:
    launch, processes = ["--multi_gpu", "--num_processes", "2"], 2
    recipe = _recipe(data)
    recipe["surgery"]["rules"] = [{"freeze": "*"}]
    recipe["train"].pop("epochs")
    recipe["train"]["stages"] = [{"epochs": 1}, {"epochs": 1, "rules": [{"unfreeze": "layer4"}]}]
    (tmp_path / "r.json").write_text(json.dumps(recipe))
    (tmp_path / "rank.py").write_text(_RANK_SCRIPT)
    out = tmp_path / "out"
    cmd = [str(BIN / "accelerate"), "launch", *launch, "--num_machines", "1", "--mixed_precision", "no"]
    cmd += ["--main_process_port", str(_free_port())]
    cmd += ["--dynamo_backend", "no", str(tmp_path / "rank.py"), str(tmp_path / "r.json"), str(out)]
    run = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    digests = [Path(f"{out}.rank{i}").read_text() for i in range(processes)]
    assert len(set(digests)) == 1  # every rank ends with the same weights
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["processes"] == processes
    assert [h["stage"] for h in metrics["history"]] == ["stage0", "stage1"]
    log = (out / "train.log").read_text()
    assert log.count("epoch 1 ") == 1  # only the main process logs
    assert len(list((out / "logs").rglob("events.out.tfevents.*"))) >= 1


def test_cli_train_under_accelerate_launch_one_cpu_process(data: Path, tmp_path: Path) -> None:
    recipe = tmp_path / "r.json"
    recipe.write_text(json.dumps(_recipe(data, epochs=1)))
    cmd = [str(BIN / "accelerate"), "launch", "--cpu", "--num_processes", "1", "--num_machines", "1"]
    cmd += ["--mixed_precision", "bf16", "--dynamo_backend", "no", "-m", "surgery", "train", str(recipe)]
    cmd += ["train.batch_size=4", "--output", str(tmp_path / "out"), "--no-progress"]
    run = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("outputs:") == 1
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["processes"] == 1 and metrics["mixed_precision"] == "bf16"  # Accelerate's launch flags decide


def test_two_processes_interrupted_then_resumed_equal_an_uninterrupted_run(data: Path, tmp_path: Path) -> None:
    """Ctrl-C reaches every process of `accelerate launch` (and torchrun's agent, which then SIGTERMs its workers):
    the ranks agree on the step, save one checkpoint, and `--resume` on two processes ends on the same weights."""
    recipe = tmp_path / "r.json"
    recipe.write_text(json.dumps(_recipe(data, epochs=3, batch_size=2, checkpoint_every_steps=2, deterministic=True)))
    launch = [str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1"]
    launch += ["--mixed_precision", "no", "--dynamo_backend", "no"]
    train_cmd = ["-m", "surgery", "train", str(recipe)]

    def run(out: Path, *extra: str) -> subprocess.Popen:  # the reference runs beside the stopped run: own ports
        cmd = [*launch, "--main_process_port", str(_free_port()), *train_cmd, "--output", str(out), "--no-progress"]
        cmd += extra
        pipe = subprocess.PIPE
        return subprocess.Popen(cmd, env=_env(), stdout=pipe, stderr=pipe, text=True, start_new_session=True)

    ref = run(tmp_path / "ref")
    stopped = run(tmp_path / "stopped")
    _wait_for_checkpoint(stopped, tmp_path / "stopped", min_step=2)
    os.killpg(stopped.pid, signal.SIGINT)
    stopped.communicate(timeout=120)
    state = json.loads((latest_checkpoint(tmp_path / "stopped") / "trainer_state.json").read_text())
    assert not (tmp_path / "stopped" / "metrics.json").exists() and state["processes"] == 2
    assert "interrupted at step" in (tmp_path / "stopped" / "train.log").read_text()
    assert ref.wait(timeout=300) == 0, ref.communicate()[1][-2000:]
    resumed = run(tmp_path / "stopped", "--resume")
    assert resumed.wait(timeout=300) == 0, resumed.communicate()[1][-2000:]
    assert _weights_equal(tmp_path / "stopped" / "model.safetensors", tmp_path / "ref" / "model.safetensors")


def test_a_bad_stage_rule_is_reported_at_its_line_before_training(data: Path, tmp_path: Path) -> None:
    from surgery.errors import NoMatchingParameterError

    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"model: {{name: test_resnet}}\n"
        f"surgery: {{heads: {{classifier: {{num_classes: 3}}}}}}\n"
        f"data: {{root: '{data}', img_size: 32}}\n"
        "train:\n"
        "  stages:\n"
        "    - {epochs: 1}\n"
        "    - epochs: 1\n"
        "      rules: [{unfreeze: layr4}]\n"
    )
    with pytest.raises(NoMatchingParameterError, match=r"r\.yaml:8: train\.stages\[1\]\.rules\[0\]\.unfreeze") as info:
        train(load_recipe(recipe), output_dir=tmp_path / "out", progress=False)
    assert "layer4" in str(info.value)  # the closest names are suggested
    assert not (tmp_path / "out" / "checkpoints").exists()


def test_a_callers_dataloader_is_used_as_it_is() -> None:
    x, y = make_xor(256, seed=0)
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 1))
    loader = torch.utils.data.DataLoader(TensorDataset(x, y), batch_size=32, shuffle=True)
    recipe = {"optim": {"lr": 0.05, "weight_decay": 0.0}, "train": {"epochs": 2, "loss": "bce"}}
    result = train(recipe, model=mlp, train_data=loader, val_data=loader, progress=False)
    assert result.metrics["steps"] == 2 * len(loader)  # its own batch size (32), not train.batch_size
    assert "exactly one new head" in result.metrics["feature_cache_reason"]


def test_resume_with_gradient_accumulation_and_clipping(data: Path, tmp_path: Path) -> None:
    """Checkpoints fall on optimizer updates; Accelerate's accumulation counter is restored with them."""
    import shutil

    recipe = _recipe(data, batch_size=2, deterministic=True, checkpoint_every_steps=1, grad_accum_steps=3)
    recipe["train"].update(clip_grad_norm=1.0, keep_checkpoints=100)
    ref = tmp_path / "ref"
    result = train(recipe, output_dir=ref, progress=False)
    assert result.metrics["steps"] == 8  # 12 batches per epoch, an update every 3
    middle = sorted((ref / "checkpoints").iterdir())[4]  # epoch 2, after its first update
    assert json.loads((middle / "trainer_state.json").read_text())["batch"] == 3
    out = tmp_path / "resumed"
    shutil.copytree(middle, out / "checkpoints" / middle.name)
    train(recipe, output_dir=out, resume=True, progress=False)
    assert _weights_equal(out / "model.safetensors", ref / "model.safetensors")


def test_a_frozen_prefix_stores_no_activations() -> None:
    """Measured, not assumed: with stem..layer3 frozen, autograd saves the same bytes for backward as with the prefix
    run under torch.no_grad(), so the trainer needs no no_grad wrapper; full fine-tuning saves far more."""

    def saved_bytes(rules: list, explicit_no_grad: bool) -> int:
        torch.manual_seed(0)
        model = timm.create_model("test_resnet", num_classes=3)
        surgery.apply(model, {"surgery": {"rules": rules}})
        model.train()
        x = torch.randn(8, 3, 32, 32)
        sizes: dict[int, int] = {}
        params = {p.untyped_storage().data_ptr() for p in model.parameters()}

        def pack(t: torch.Tensor) -> torch.Tensor:
            if t.untyped_storage().data_ptr() not in params:
                sizes[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            if explicit_no_grad:
                with torch.no_grad():
                    h = model.layer3(model.layer2(model.layer1(model.maxpool(model.act1(model.bn1(model.conv1(x)))))))
                out = model.forward_head(model.layer4(h))
            else:
                out = model(x)
        out.sum().backward()
        return sum(sizes.values())

    frozen = [{"freeze": {"to": "layer3"}}]
    assert saved_bytes(frozen, explicit_no_grad=False) == saved_bytes(frozen, explicit_no_grad=True)
    assert saved_bytes(frozen, explicit_no_grad=False) < 0.5 * saved_bytes([], explicit_no_grad=False)


def test_a_lone_trailing_sample_does_not_break_batchnorm() -> None:
    """9 samples in batches of 4 leave one alone at the end; BatchNorm cannot train on it, so it is skipped."""
    model = timm.create_model("test_resnet", pretrained=False, num_classes=3)
    data = TensorDataset(torch.randn(9, 3, 32, 32), torch.arange(9) % 3)
    result = train({"train": {"epochs": 2, "batch_size": 4}}, model=model, train_data=data, progress=False)
    assert result.metrics["steps"] == 4  # two full batches per epoch; the ninth sample waits for the next shuffle


# ------------------------------------------------------------------------------------ run folder, class count


def test_resume_into_a_folder_without_a_checkpoint_is_an_error(data: Path, tmp_path: Path) -> None:
    with pytest.raises(SurgeryError, match="holds no checkpoint"):
        train(_recipe(data), output_dir=tmp_path / "empty", resume=True, progress=False)
    assert not (tmp_path / "empty").exists()


def test_resume_with_another_recipe_names_the_keys_that_differ(reference: tuple[Path, Path], tmp_path: Path) -> None:
    import shutil

    recipe, ref = reference
    ckpt = latest_checkpoint(ref)
    out = tmp_path / "other"
    shutil.copytree(ckpt, out / "checkpoints" / ckpt.name)
    other = load_recipe(recipe, ["optim.lr=0.01", "train.stages.1.lr=0.002"])
    with pytest.raises(RecipeError, match="another recipe") as info:
        train(other, output_dir=out, resume=True, progress=False)
    assert "optim.lr: 0.003 in the checkpoint, 0.01 now" in str(info.value)
    assert "train.stages[1].lr: 0.001 in the checkpoint, 0.002 now" in str(info.value)


def test_a_rerun_needs_overwrite_and_the_default_folder_is_fresh(data: Path, tmp_path: Path, monkeypatch) -> None:
    from surgery.train import default_output_dir

    out = tmp_path / "run"
    train(_recipe(data, epochs=1), output_dir=out, progress=False)
    (out / "notes.txt").write_text("mine")
    with pytest.raises(SurgeryError, match="--overwrite"):
        train(_recipe(data, epochs=1), output_dir=out, progress=False)
    first = latest_checkpoint(out)
    result = train(_recipe(data, epochs=1, seed=2), output_dir=out, overwrite=True, progress=False)
    assert result.metrics["epochs"] == 1 and (out / "notes.txt").read_text() == "mine"  # not the run's: kept
    assert json.loads((latest_checkpoint(out) / "trainer_state.json").read_text())["recipe"]["train"]["seed"] == 2
    assert first.name in {p.name for p in (out / "checkpoints").iterdir()}  # same step name, new run
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "r.yaml"
    path.write_text(json.dumps(_recipe(data)))
    a = default_output_dir(load_recipe(path))
    assert a.parent == Path("output/train") and a.name.endswith("-test_resnet-r")
    a.mkdir(parents=True)
    assert default_output_dir(load_recipe(path)) != a  # never an existing folder


def test_skipped_images_are_counted_listed_and_printed(tmp_path: Path, capsys) -> None:
    from surgery.cli import main

    root = _bad(tmp_path / "data", "corrupt")
    recipe = {**_recipe(root, epochs=1), "surgery": {"heads": {"classifier": {}}}}
    recipe["data"]["skip_bad_images"] = True
    path = tmp_path / "r.json"
    path.write_text(json.dumps(recipe))
    out = tmp_path / "out"
    assert main(["train", str(path), "--output", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "skipped 1 undecodable image(s)" in printed and "000.png" in printed
    assert (out / "skipped_images.txt").read_text().strip().endswith("class_0/000.png")
    assert json.loads((out / "metrics.json").read_text())["skipped_images"] == 1


def test_a_classifier_that_does_not_match_the_data_is_an_error_without_a_head(data: Path, tmp_path: Path) -> None:
    from surgery.errors import HeadError

    recipe = {"model": "test_resnet", "data": {"root": str(data), "img_size": 32}, "train": {"epochs": 1}}
    with pytest.raises(HeadError, match=r"1000 outputs but data.root \(3 class folders\) has 3 classes") as info:
        train(recipe, progress=False)
    assert "surgery.heads.classifier" in str(info.value) and "--num-classes 3" in str(info.value)
    fits = {**recipe, "model": {"name": "test_resnet", "kwargs": {"num_classes": 3}}, "train": {"epochs": 0}}
    assert train(fits, progress=False).metrics["epochs"] == 0  # a classifier of the data's size trains


def test_a_builtin_recipe_takes_its_class_count_from_the_data(data: Path, tmp_path: Path, capsys) -> None:
    import yaml

    from surgery.cli import main

    out = tmp_path / "probe"
    args = ["train", "linear-probe", "--model", "test_resnet", f"data.root={data}", "data.img_size=32"]
    args += ["train.epochs=1", "train.batch_size=8", "--output", str(out), "--no-progress"]
    assert main(args) == 0, capsys.readouterr().err
    saved = yaml.safe_load((out / "recipe.yaml").read_text())
    assert saved["surgery"]["heads"]["classifier"]["num_classes"] == 3
    assert json.loads((out / "surgery.json").read_text())["num_classes"] == 3
    assert main([*args[:-3], "--output", str(tmp_path / "five"), "--num-classes", "5", "--no-progress"]) == 2
    assert "3 class folders" in capsys.readouterr().err


def test_training_replays_stages_through_stages_plan_stage(data: Path, monkeypatch) -> None:
    """The trainer looks stages.plan_stage up at call time: patch it and training changes."""
    from surgery import stages

    calls: list[int] = []
    original = stages.plan_stage

    def frozen_stage1(model, recipe, index, first):  # noqa: ANN001, ANN202
        calls.append(index)
        if index == 1:  # instead of unfreezing layer4, keep the first plan's trainable set
            return original(
                model,
                recipe.model_copy(
                    update={
                        "train": recipe.train.model_copy(
                            update={
                                "stages": [
                                    recipe.train.stages[0],
                                    recipe.train.stages[1].model_copy(update={"rules": []}),
                                ]
                            }
                        )
                    }
                ),
                index,
                first,
            )
        return original(model, recipe, index, first)

    monkeypatch.setattr(stages, "plan_stage", frozen_stage1)
    recipe = _recipe(data)
    recipe["surgery"]["rules"] = [{"freeze": "*"}]
    recipe["train"].pop("epochs")
    recipe["train"]["stages"] = [{"epochs": 1}, {"epochs": 1, "rules": [{"unfreeze": "layer4"}]}]
    result = train(recipe, progress=False)
    assert calls == [0, 1]
    assert not any(n.startswith("layer4") for n in result.plan.trainable_names)  # the patched replay decided


def test_no_progress_still_prints_the_push_url(data: Path, tmp_path: Path, hub_server, monkeypatch, capsys) -> None:
    from huggingface_hub import constants

    from surgery.cli import main

    monkeypatch.setenv("HF_ENDPOINT", hub_server.url)
    monkeypatch.setenv("HF_TOKEN", hub_server.tokens["alice"])
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    recipe = {**_recipe(data, epochs=1), "hub": {"repo": "alice/pushed-run"}}
    path = tmp_path / "r.json"
    path.write_text(json.dumps(recipe))
    assert main(["train", str(path), "--output", str(tmp_path / "out"), "--no-progress"]) == 0, capsys.readouterr()
    printed = capsys.readouterr().out
    assert f"pushed: {hub_server.url}" in printed and "alice/pushed-run" in printed


def test_channels_last_auto_is_on_for_convnets_and_off_for_vits_and_workers_auto() -> None:
    from surgery.train.trainer import resolve_num_workers, uses_channels_last

    assert uses_channels_last(timm.create_model("test_resnet")) is True
    assert uses_channels_last(timm.create_model("test_efficientnet")) is True
    assert uses_channels_last(timm.create_model("test_vit")) is False  # its one conv is the patch embedding
    assert uses_channels_last(nn.Sequential(nn.Linear(2, 3))) is False
    from safetensors.torch import save_file

    x, y = torch.randn(4, 3, 32, 32), torch.arange(4) % 2
    model = timm.create_model("test_resnet", num_classes=2)
    recipe = {"train": {"epochs": 1, "batch_size": 4}}
    result = train(recipe, model=model, train_data=TensorDataset(x, y), progress=False)
    assert result.metrics["channels_last"] is True and result.model.conv1[0].weight.is_contiguous()  # handed back plain
    save_file(result.model.state_dict(), "/dev/null")  # what timm's save_for_hf does
    cpus = os.cpu_count() or 1
    assert resolve_num_workers("auto") == (0 if cpus == 1 else min(cpus - 1, 4)) and resolve_num_workers(3) == 3
    # processes share the cores: two training processes on two cores load in the main process (no forked workers)
    assert resolve_num_workers("auto", processes=cpus) == 0 and resolve_num_workers(3, processes=cpus) == 3
    assert resolve_num_workers("auto", processes=max(1, cpus // 2)) == min(cpus // max(1, cpus // 2) - 1, 4)
    recipe = load_recipe({"train": {"channels_last": True, "compile": False}, "data": {"num_workers": "auto"}})
    assert recipe.train.channels_last is True and recipe.data.num_workers == "auto"
    with pytest.raises(RecipeError):
        load_recipe({"train": {"channels_last": "sometimes"}})
