"""``surgery convert``: foreign state dicts into timm's layout by order or by names, the refusals, the known-answer
check, and publishing in timm's format to the project's own hub server (then plain timm loads it).

The "foreign" weights are made here from a tiny timm model whose keys are renamed and reordered into another
project's layout; nothing is downloaded.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections import OrderedDict
from pathlib import Path
from types import SimpleNamespace

import pytest
import timm
import torch
from huggingface_hub import constants
from PIL import Image
from safetensors.torch import load_file, save_file

from surgery.cli import main
from surgery.convert import convert, read_state_dict
from surgery.errors import ModelError

REPO_ROOT = Path(__file__).resolve().parents[1]


class NotATensor:
    """A custom class: a pickle holding it needs more than ``torch.load(weights_only=True)``."""

    def __init__(self) -> None:
        self.payload = "would run arbitrary __reduce__ code in a hostile file"


@pytest.fixture(scope="module")
def reference() -> torch.nn.Module:
    """The timm model whose weights the "foreign" files carry (eval mode; classifier rigged: class 3 wins)."""
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", num_classes=5).eval()
    with torch.no_grad():
        model.fc.weight.mul_(0.01)
        model.fc.bias.copy_(torch.tensor([0.0, 0.0, 0.0, 8.0, 0.0]))
        for module in model.modules():  # non-trivial running statistics, so a wrong pairing shows
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 1.5)
    return model


def _foreign(model: torch.nn.Module) -> OrderedDict[str, torch.Tensor]:
    """Another project's layout: its own names (``net.N.suffix``), no BatchNorm counters, same order."""
    out: OrderedDict[str, torch.Tensor] = OrderedDict()
    for i, (key, value) in enumerate(model.state_dict().items()):
        if key.endswith("num_batches_tracked"):
            continue
        out[f"net.{i}.{key.rsplit('.', 1)[1]}"] = value.clone()
    return out


def _same(model: torch.nn.Module, reference: torch.nn.Module) -> bool:
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return torch.equal(model.eval()(x), reference(x))


def _image(path: Path) -> Path:
    Image.new("RGB", (40, 40), (120, 30, 200)).save(path)
    return path


def test_convert_by_order(reference: torch.nn.Module, tmp_path: Path) -> None:
    src = tmp_path / "foreign.pth"
    state = _foreign(reference)
    torch.save({"state_dict": state, "epoch": 7}, src)  # wrapped as training scripts do
    result = convert(src, "test_resnet", tmp_path / "out.safetensors", kwargs={"num_classes": 5})
    assert len(result.pairs) == len(state)
    assert _same(result.model, reference)
    written = load_file(str(tmp_path / "out.safetensors"))
    assert set(written) == set(reference.state_dict())  # the full timm layout, counters included
    for key, value in reference.state_dict().items():
        if not key.endswith("num_batches_tracked"):
            assert torch.equal(written[key], value), key


def test_safetensors_input_maps_by_names_not_order(reference: torch.nn.Module, tmp_path: Path) -> None:
    """safetensors files do not keep tensor order (writers sort them), so order mode refuses them."""
    src = tmp_path / "foreign.safetensors"
    save_file({f"model.{k}": v for k, v in reference.state_dict().items()}, str(src))
    with pytest.raises(ModelError, match="does not keep the source's tensor order"):
        convert(src, "test_resnet", tmp_path / "out.safetensors", kwargs={"num_classes": 5})
    result = convert(
        src, "test_resnet", tmp_path / "out.safetensors", mapping={"prefix": {"model.": ""}}, kwargs={"num_classes": 5}
    )
    assert _same(result.model, reference)


def test_convert_by_names_with_a_rename_table(reference: torch.nn.Module, tmp_path: Path) -> None:
    state = {f"module.backbone.{k}": v for k, v in reference.state_dict().items() if not k.startswith("fc.")}
    state = dict(reversed(list(state.items())))  # order does not matter by names
    state["module.classifier.weight"] = reference.fc.weight.detach().clone()
    state["module.classifier.bias"] = reference.fc.bias.detach().clone()
    state["module.aux_head.weight"] = torch.zeros(3, 3)  # something timm's model does not have
    src = tmp_path / "foreign.pth"
    torch.save(state, src)
    table = tmp_path / "map.yaml"
    table.write_text(
        "prefix:\n  'module.backbone.': ''\n  'module.': ''\n"
        "regex:\n  '^classifier\\.': 'fc.'\n"
        "drop:\n  - '^module\\.aux_head\\.'\n"
    )
    result = convert(src, "test_resnet", tmp_path / "out.safetensors", mapping=table, kwargs={"num_classes": 5})
    assert _same(result.model, reference)
    assert ("module.classifier.bias", "fc.bias") in result.pairs
    # by plain names, the same file is refused at its first key that timm does not have
    with pytest.raises(ModelError, match=r"--map names: source 'module\.backbone\.[\w.]+' is not a key"):
        convert(src, "test_resnet", tmp_path / "o2.safetensors", mapping="names", kwargs={"num_classes": 5})
    # a JSON table in the Python API as a mapping works the same
    mapping = {"prefix": {"module.backbone.": "", "module.": ""}, "regex": {"^classifier\\.": "fc."}, "drop": ["aux"]}
    again = convert(src, "test_resnet", tmp_path / "o3.safetensors", mapping=mapping, kwargs={"num_classes": 5})
    assert _same(again.model, reference)


def test_order_refuses_the_first_shape_mismatch(reference: torch.nn.Module, tmp_path: Path) -> None:
    state = list(_foreign(reference).items())
    state[4], state[5] = state[5], state[4]  # two neighbours of different shapes swap places
    src = tmp_path / "swapped.pth"
    torch.save(dict(state), src)
    target = [k for k in reference.state_dict() if not k.endswith("num_batches_tracked")]
    shape = tuple(state[4][1].shape)
    with pytest.raises(ModelError) as err:
        convert(src, "test_resnet", tmp_path / "out.safetensors", kwargs={"num_classes": 5})
    message = str(err.value)
    assert message.startswith("--map order: tensor 4 does not fit: source")
    assert repr(state[4][0]) in message and repr(target[4]) in message and str(shape).replace(",)", ")") in message
    assert not (tmp_path / "out.safetensors").exists()


def test_order_refuses_a_count_mismatch(reference: torch.nn.Module, tmp_path: Path) -> None:
    state = _foreign(reference)
    state.popitem()  # the last tensor is missing
    src = tmp_path / "short.pth"
    torch.save(state, src)
    with pytest.raises(ModelError, match=r"the source has \d+ tensors, the timm model \d+; .*timm 'fc\.bias' has no"):
        convert(src, "test_resnet", tmp_path / "out.safetensors", kwargs={"num_classes": 5})


def test_names_refuses_a_shape_mismatch_and_a_missing_key(reference: torch.nn.Module, tmp_path: Path) -> None:
    state = dict(reference.state_dict())
    state["fc.weight"] = torch.zeros(7, 3)
    src = tmp_path / "bad.safetensors"
    save_file(state, str(src))
    with pytest.raises(ModelError, match=r"source 'fc\.weight' \(7, 3\) vs timm 'fc\.weight' \(5, \d+\)"):
        convert(src, "test_resnet", tmp_path / "o.safetensors", mapping="names", kwargs={"num_classes": 5})
    del state["fc.weight"]
    save_file(state, str(src))
    with pytest.raises(ModelError, match=r"1 timm keys get no tensor, first 'fc\.weight'"):
        convert(src, "test_resnet", tmp_path / "o.safetensors", mapping="names", kwargs={"num_classes": 5})


def test_a_pickle_that_needs_more_than_weights_only_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = tmp_path / "evil.pth"
    torch.save({"conv.weight": torch.zeros(1), "extra": NotATensor()}, src)
    with pytest.raises(ModelError, match="needs more than torch.load\\(weights_only=True\\)") as err:
        read_state_dict(src)
    assert "NotATensor" in str(err.value) and "\n" not in str(err.value)
    status = main(["convert", str(src), "--model", "test_resnet", "--out", str(tmp_path / "o.safetensors")])
    stderr = capsys.readouterr().err
    assert status == 2 and stderr.count("\n") == 1 and "weights_only" in stderr and "Traceback" not in stderr
    assert not (tmp_path / "o.safetensors").exists()


def test_damaged_inputs_and_bad_options_are_one_line_errors(reference: torch.nn.Module, tmp_path: Path) -> None:
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"definitely not a zip or a pickle")
    with pytest.raises(ModelError, match="not a readable PyTorch weights file"):
        read_state_dict(junk)
    good = tmp_path / "good.pth"
    torch.save(_foreign(reference), good)
    with pytest.raises(ModelError, match="name it \\*.safetensors"):
        convert(good, "test_resnet", tmp_path / "out.pth")
    with pytest.raises(ModelError, match="expected order, names or a rename table"):
        convert(good, "test_resnet", tmp_path / "o.safetensors", mapping="bogus")
    with pytest.raises(ModelError, match=r"kwargs\.cache_dir"):  # the model is built through the kwargs check
        convert(good, "test_resnet", tmp_path / "o.safetensors", kwargs={"cache_dir": str(tmp_path / "c")})
    table = tmp_path / "t.yaml"
    table.write_text("rename: {}\n")
    with pytest.raises(ModelError, match="unknown key 'rename'"):
        convert(good, "test_resnet", tmp_path / "o.safetensors", mapping=table)


def test_known_answer_check(reference: torch.nn.Module, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "foreign.pth"
    torch.save(_foreign(reference), src)
    image = _image(tmp_path / "probe.png")
    result = convert(src, "test_resnet", tmp_path / "ok.safetensors", kwargs={"num_classes": 5}, expect=[(image, 3)])
    assert result.checks[0][:2] == (str(image), 3)
    with pytest.raises(ModelError, match=r"--expect .*probe\.png=2: the converted model says class 3 \(p="):
        convert(src, "test_resnet", tmp_path / "bad.safetensors", kwargs={"num_classes": 5}, expect=[(image, 2)])
    assert not (tmp_path / "bad.safetensors").exists()  # nothing is written when the answer is wrong
    # the same through the command line, one line and exit 2 on a wrong answer
    args = ["convert", str(src), "--model", "test_resnet", "--kwarg", "num_classes=5", "--out"]
    assert main([*args, str(tmp_path / "cli.safetensors"), "--expect", f"{image}=3"]) == 0
    assert "top-1 class 3" in capsys.readouterr().out
    assert main([*args, str(tmp_path / "cli2.safetensors"), "--expect", f"{image}=1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "says class 3" in err
    assert main([*args, str(tmp_path / "cli3.safetensors"), "--expect", f"{image}=daisy"]) == 2
    assert "CLASS a class index" in capsys.readouterr().err


@pytest.fixture
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    from surgery.hub.server import HubServer, add_token

    root = tmp_path / "hub"
    root.mkdir()
    token = add_token(root, "alice", "write")
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_TELEMETRY", True)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    with HubServer(root) as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        monkeypatch.setenv("HF_TOKEN", token)
        monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
        yield SimpleNamespace(url=server.url, token=token)


def test_publish_in_timm_format_then_plain_timm_loads_it(
    reference: torch.nn.Module, hub, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = tmp_path / "foreign.pth"
    torch.save(_foreign(reference), src)
    out = tmp_path / "converted.safetensors"
    argv = ["convert", str(src), "--model", "test_resnet", "--kwarg", "num_classes=5", "--out", str(out)]
    assert main([*argv, "--push", "alice/converted"]) == 0
    assert "hf-hub:alice/converted" in capsys.readouterr().out
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    probe = tmp_path / "probe.safetensors"
    save_file({"x": x}, str(probe))
    y = tmp_path / "y.safetensors"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING"))}
    env.update(
        HF_ENDPOINT=hub.url, HF_HOME=str(tmp_path / "fresh-hf"), HF_HUB_DISABLE_XET="1", HF_HUB_DISABLE_TELEMETRY="1"
    )
    script = f"""
        import json, timm, torch
        from safetensors.torch import load_file, save_file
        model = timm.create_model("hf-hub:alice/converted", pretrained=True).eval()
        with torch.no_grad():
            save_file({{"y": model(load_file({str(probe)!r})["x"])}}, {str(y)!r})
        print(json.dumps({{"classes": model.num_classes, "arch": model.pretrained_cfg["architecture"]}}))
        """
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)], env=env, capture_output=True, text=True, timeout=240
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == {"classes": 5, "arch": "test_resnet"}
    with torch.no_grad():
        assert torch.equal(load_file(str(y))["y"], reference(x))
