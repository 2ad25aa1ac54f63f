"""Hub client against the project's own server on 127.0.0.1, with the real ``huggingface_hub`` client and timm.

Nothing is mocked. Fresh processes (``HF_ENDPOINT`` set before ``huggingface_hub`` is imported, as users do) check
what another machine would see: ``surgery.load`` of a pushed adapter, and plain timm loading a merged export.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import timm
import torch
from huggingface_hub import HfApi, constants
from safetensors.torch import load_file, save_file

import surgery
from surgery.adapter import fingerprint, push_folder, push_from_recipe, read_info, save_adapter
from surgery.cli import main
from surgery.errors import AdapterError, HubError
from surgery.hub.server import HubServer, add_token
from surgery.models import build_model
from surgery.recipe import load_recipe

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("hub")
    alice = add_token(root, "alice", "write")
    bob = add_token(root, "bob", "write")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(constants, "HF_HUB_DISABLE_TELEMETRY", True)
        mp.setattr(constants, "HF_HUB_DISABLE_XET", True)
        with HubServer(root) as server:
            yield SimpleNamespace(url=server.url, alice=alice, bob=bob, root=root)


@pytest.fixture(autouse=True)
def _client_env(hub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """HF_ENDPOINT/HF_TOKEN as a user sets them; a private download cache per test."""
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.setenv("HF_TOKEN", hub.alice)
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("base") / "test_resnet.safetensors"
    save_file(timm.create_model("test_resnet").state_dict(), str(path))
    return path


def _fresh(script: str, tmp_path: Path, *, token: str | None = None, endpoint: str | None = None) -> str:
    """Run ``script`` in a new interpreter with HF_ENDPOINT set from the start; returns its stdout."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING"))}
    env.update(
        HF_ENDPOINT=endpoint or os.environ["HF_ENDPOINT"],
        HF_HOME=str(tmp_path / "fresh-hf"),
        HF_HUB_DISABLE_XET="1",
        HF_HUB_DISABLE_TELEMETRY="1",
        PYTHONPATH=str(REPO_ROOT),
    )
    if token:
        env["HF_TOKEN"] = token
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)], env=env, capture_output=True, text=True, timeout=240
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def _train(recipe: dict, folder: Path, **save) -> torch.nn.Module:
    loaded = load_recipe(recipe)
    model = build_model(loaded.model)
    the_plan = surgery.apply(model, loaded)
    optimizer = torch.optim.SGD(the_plan.param_groups(), lr=0.1)
    model.train()
    for _ in range(2):
        loss = model(torch.randn(4, 3, 64, 64)).logsumexp(-1).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    save_adapter(model.eval(), the_plan, folder, **save)
    return model


def _probe(tmp_path: Path) -> tuple[torch.Tensor, Path]:
    x = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    path = tmp_path / "probe.safetensors"
    save_file({"x": x}, str(path))
    return x, path


def _recipe(checkpoint: Path, norm: str = "auto", **extra) -> dict:
    return {
        "model": {"name": "test_resnet", "checkpoint": str(checkpoint)},
        "surgery": {"rules": [{"freeze": "*"}], "heads": {"classifier": {"num_classes": 3}}, "norm": norm},
        **extra,
    }


def test_push_then_load_in_a_fresh_process_gives_identical_predictions(hub, checkpoint: Path, tmp_path: Path) -> None:
    # norm: train, so the BatchNorm statistics travel in the adapter too
    model = _train(_recipe(checkpoint, norm="train"), tmp_path / "ad", class_names=["a", "b", "c"])
    x, probe = _probe(tmp_path)
    with torch.no_grad():
        expected = model(x)
    result = push_folder(tmp_path / "ad", "alice/probe", message="first adapter")
    assert result.revision == "main" and len(result.sha) == 40 and result.files == 3
    assert result.ref == f"hf-hub:alice/probe@{result.sha}"
    api = HfApi(endpoint=hub.url, token=hub.alice)
    assert sorted(api.list_repo_files("alice/probe")) == [".gitattributes", "README.md", "adapter.safetensors",
                                                         "surgery.json"]  # fmt: skip
    assert api.list_repo_commits("alice/probe")[0].title == "first adapter"

    out = tmp_path / "out.safetensors"
    stdout = _fresh(
        f"""
        import surgery, torch
        from safetensors.torch import load_file, save_file
        model = surgery.load("hf-hub:alice/probe", base={str(checkpoint)!r})
        with torch.no_grad():
            save_file({{"y": model(load_file({str(probe)!r})["x"])}}, {str(out)!r})
        print(model.pretrained_cfg["label_names"], model.training)
        """,
        tmp_path,
        token=hub.alice,
    )
    assert torch.equal(load_file(str(out))["y"], expected)
    assert stdout.strip() == "['a', 'b', 'c'] False"
    with torch.no_grad():  # and in this process, pinned to the pushed commit, through the same client
        loaded = surgery.load(result.ref, base=checkpoint)
        assert torch.equal(loaded(x), expected)
    assert loaded.adapter_info["source"] == {"ref": result.ref, "revision": result.sha}
    card = (tmp_path / "ad" / "README.md").read_text()  # rewritten at push: how to load from this very repo
    assert 'surgery.load("hf-hub:alice/probe")' in card and "ORG/NAME" not in card


def test_merged_export_loads_with_plain_timm_from_the_hub(hub, checkpoint: Path, tmp_path: Path) -> None:
    model = _train(_recipe(checkpoint, norm="frozen"), tmp_path / "ad", class_names=["x", "y", "z"])
    surgery.merge(tmp_path / "ad", tmp_path / "merged", base=checkpoint)
    pushed = push_folder(tmp_path / "merged", "alice/merged")
    assert sorted(pushed.paths) == ["README.md", "config.json", "model.safetensors"]
    assert 'timm.create_model("hf-hub:alice/merged"' in (tmp_path / "merged" / "README.md").read_text()
    x, probe = _probe(tmp_path)
    out = tmp_path / "out.safetensors"
    stdout = _fresh(
        f"""
        import sys, timm, torch
        from safetensors.torch import load_file, save_file
        model = timm.create_model("hf-hub:alice/merged", pretrained=True).eval()
        with torch.no_grad():
            save_file({{"y": model(load_file({str(probe)!r})["x"])}}, {str(out)!r})
        print(model.pretrained_cfg["label_names"], model.num_classes, "surgery" in sys.modules)
        """,
        tmp_path,
    )  # anonymous: the repo is public
    assert stdout.strip() == "['x', 'y', 'z'] 3 False"
    with torch.no_grad():
        expected = model(x)
    # FrozenBatchNorm2d and plain BatchNorm2d compute the same affine map with different float rounding
    assert torch.allclose(load_file(str(out))["y"], expected, rtol=1e-5, atol=1e-6)


def test_a_hub_base_is_pinned_to_the_commit_it_was_trained_on(hub, tmp_path: Path) -> None:
    torch.manual_seed(3)
    base = timm.create_model("test_resnet")
    timm.models.save_for_hf(base, tmp_path / "base", safe_serialization=True)
    first = push_folder(tmp_path / "base", "alice/base-net", progress=False)
    x, probe = _probe(tmp_path)
    out = tmp_path / "trained.safetensors"
    recipe = {
        "model": {"name": "hf-hub:alice/base-net", "pretrained": True},
        "surgery": {"rules": [{"freeze": "*"}], "heads": {"classifier": {"num_classes": 2}}},
        "hub": {"repo": "alice/on-hub-base", "message": "trained on the hub base"},
    }
    # "Training" in a fresh process that knows HF_ENDPOINT from the start, as `surgery train` would run.
    _fresh(
        f"""
        import json, surgery, torch
        from safetensors.torch import load_file, save_file
        from surgery.adapter import fingerprint, push_from_recipe, save_adapter
        recipe = surgery.load_recipe(json.loads({json.dumps(recipe)!r}))
        model = surgery.build_model(recipe.model)
        base = fingerprint(model)
        plan = surgery.apply(model, recipe)
        with torch.no_grad():
            model.fc.weight.normal_()
        save_adapter(model.eval(), plan, {str(tmp_path / "ad")!r}, base=base)
        push_from_recipe({str(tmp_path / "ad")!r}, recipe.hub)
        with torch.no_grad():
            save_file({{"y": model(load_file({str(probe)!r})["x"])}}, {str(out)!r})
        """,
        tmp_path,
        token=hub.alice,
    )
    info = read_info("hf-hub:alice/on-hub-base")
    assert info["base"]["model"] == "hf-hub:alice/base-net" and info["base"]["revision"] == first.sha
    assert info["base"]["fingerprint"] == fingerprint(base)
    assert "base_model: alice/base-net" in (tmp_path / "ad" / "README.md").read_text()
    commits = HfApi(endpoint=hub.url).list_repo_commits("alice/on-hub-base")
    assert commits[0].title == "trained on the hub base"

    # The base moves on; the adapter still loads the weights it was trained on, in this process (whose
    # huggingface_hub was imported before HF_ENDPOINT was set: the client reads HF_ENDPOINT at each call).
    torch.manual_seed(4)
    timm.models.save_for_hf(timm.create_model("test_resnet"), tmp_path / "base", safe_serialization=True)
    assert push_folder(tmp_path / "base", "alice/base-net", progress=False).sha != first.sha
    with torch.no_grad():
        assert torch.equal(surgery.load("hf-hub:alice/on-hub-base")(x), load_file(str(out))["y"])


def test_one_commit_per_push_on_a_branch_of_a_private_repo(hub, checkpoint: Path, tmp_path: Path, capfd) -> None:
    _train(_recipe(checkpoint), tmp_path / "ad")
    api = HfApi(endpoint=hub.url, token=hub.alice)
    result = push_folder(tmp_path / "ad", "alice/private", private=True, revision="dev", message="on dev")
    assert result.revision == "dev"
    assert sorted(result.paths) == ["README.md", "adapter.safetensors", "surgery.json"]
    assert api.model_info("alice/private").private
    dev = api.list_repo_commits("alice/private", revision="dev")
    assert dev[0].title == "on dev" and dev[0].commit_id == result.sha
    assert "adapter.safetensors" not in api.list_repo_files("alice/private")  # main is untouched
    again = push_folder(tmp_path / "ad", "alice/private", revision="dev", progress=False)
    assert again.sha == result.sha  # nothing changed: no second commit
    assert len(api.list_repo_commits("alice/private", revision="dev")) == len(dev)
    assert isinstance(surgery.load("hf-hub:alice/private@dev", base=checkpoint), torch.nn.Module)

    # huggingface_hub serves a cached snapshot when the hub refuses; a machine without the cache gets the refusal
    constants.HF_HUB_CACHE = str(tmp_path / "other-cache")
    os.environ.pop("HF_TOKEN")
    with pytest.raises(HubError, match=r"alice/private does not exist or is private; .*set HF_TOKEN"):
        surgery.load("hf-hub:alice/private@dev", base=checkpoint)
    os.environ["HF_TOKEN"] = hub.bob
    with pytest.raises(HubError, match="does not exist or is private"):
        surgery.load("hf-hub:alice/private@dev", base=checkpoint)
    os.environ["HF_TOKEN"] = hub.alice
    with pytest.raises(HubError, match=r"has no such revision; check the @revision"):
        surgery.load("hf-hub:alice/private@nope", base=checkpoint)


def test_the_cli_pushes_and_never_shows_the_token(hub, checkpoint: Path, tmp_path: Path, capfd) -> None:
    _train(_recipe(checkpoint), tmp_path / "ad")
    assert main(["push", str(tmp_path / "ad"), "alice/cli", "--message", "from the cli", "--no-progress"]) == 0
    out, err = capfd.readouterr()
    lines = out.strip().splitlines()  # the file list and the URL, also without progress
    assert lines[0].startswith("Pushed 3 file(s)") and "  adapter.safetensors" in lines
    assert lines[-1].startswith(f"{hub.url}/alice/cli/commit/") and "hf-hub:alice/cli@" in out
    assert hub.alice not in out + err

    os.environ["HF_TOKEN"] = hub.bob
    assert main(["push", str(tmp_path / "ad"), "alice/cli"]) == 2
    out, err = capfd.readouterr()
    assert "refused to write (403)" in err and "write access to the 'alice' namespace" in err
    assert hub.bob not in out + err

    bad = "hf_" + "x" * 34
    os.environ["HF_TOKEN"] = bad
    assert main(["push", str(tmp_path / "ad"), "alice/cli"]) == 2
    out, err = capfd.readouterr()
    assert "refused the token (401); set HF_TOKEN" in err and bad not in out + err


def test_a_tampered_adapter_is_never_pushed(hub, checkpoint: Path, tmp_path: Path) -> None:
    _train(_recipe(checkpoint), tmp_path / "ad")
    path = tmp_path / "ad" / "adapter.safetensors"
    data = bytearray(path.read_bytes())
    data[-2] ^= 0x10
    path.write_bytes(bytes(data))
    with pytest.raises(AdapterError, match="tampered"):
        push_folder(tmp_path / "ad", "alice/tampered")
    assert not HfApi(endpoint=hub.url).repo_exists("alice/tampered")


def test_transient_errors_are_retried_then_reported(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ["HF_ENDPOINT"] = f"http://127.0.0.1:{port}"
    (tmp_path / "f").mkdir()
    (tmp_path / "f" / "a.json").write_text("{}")
    start = time.monotonic()
    with pytest.raises(HubError, match=rf"cannot reach http://127.0.0.1:{port} .*check HF_ENDPOINT"):
        push_folder(tmp_path / "f", "alice/nowhere", retries=1, progress=False)
    assert time.monotonic() - start >= 1.0  # one backoff
    assert "retrying in 1s" in caplog.text  # logged (a warning), not printed by the library


def test_the_recipe_hub_section(hub, tmp_path: Path) -> None:
    recipe = load_recipe({"hub": {"repo": "alice/from-recipe", "private": True, "revision": "exp", "message": "m"}})
    assert push_from_recipe(tmp_path, load_recipe({}).hub) is None  # no repo: no push
    (tmp_path / "a.json").write_text(json.dumps({"k": 1}))
    result = push_from_recipe(tmp_path, recipe.hub, progress=False)
    api = HfApi(endpoint=hub.url, token=hub.alice)
    assert result.revision == "exp" and api.model_info("alice/from-recipe").private
    assert api.list_repo_commits("alice/from-recipe", revision="exp")[0].title == "m"
    with pytest.raises(Exception, match="repo"):
        load_recipe({"hub": {"repo": "no-namespace"}})


def test_a_run_folder_pushes_the_adapter_set_only(hub, checkpoint: Path, tmp_path: Path, capfd) -> None:
    out = tmp_path / "out"
    _train(_recipe(checkpoint), out)
    for name in ("model.safetensors", "checkpoints/epoch1/model.safetensors", "logs/events.out", "optimizer.pt"):
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_bytes(b"x" * 1000)
    (out / "metrics.json").write_text("{}")
    (out / "plan.json").write_text("{}")
    spec = load_recipe({"hub": {"repo": "alice/run"}}).hub
    with pytest.warns(UserWarning, match=r"push: the base is test_resnet \+ the local checkpoint .*--base"):
        result = push_from_recipe(out, spec, progress=False)
    api = HfApi(endpoint=hub.url, token=hub.alice)
    files = api.list_repo_files("alice/run")
    assert sorted(files) == [".gitattributes", "README.md", "adapter.safetensors", "plan.json", "surgery.json"]
    assert result.files == 4
    left = dict(result.left_out)
    assert "pickle" in left["optimizer.pt"] and "--include-checkpoints" in left["checkpoints/epoch1/model.safetensors"]
    assert "--all" in left["model.safetensors"] and "metrics.json" in left

    # `surgery push` of the same folder: the same set; --include-checkpoints and --all opt in, pickle never
    assert main(["push", str(out), "alice/run-cli", "--no-progress", "--include-checkpoints"]) == 0
    printed = capfd.readouterr().out
    assert "not pushed: optimizer.pt (pickle" in printed and "not pushed: model.safetensors" in printed
    files = api.list_repo_files("alice/run-cli")
    assert "checkpoints/epoch1/model.safetensors" in files and "model.safetensors" not in files
    push_folder(out, "alice/run-all", everything=True, progress=False)
    files = api.list_repo_files("alice/run-all")
    assert "model.safetensors" in files and "logs/events.out" in files and "optimizer.pt" not in files


def test_a_folder_with_only_pickle_weights_is_not_pushed(hub, tmp_path: Path, capfd) -> None:
    folder = tmp_path / "pickled"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"architecture": "test_resnet", "num_classes": 3}))
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04" + b"x" * 100)
    assert main(["push", str(folder), "alice/pickled"]) == 2
    err = capfd.readouterr().err
    assert "config.json but no model.safetensors" in err and "pytorch_model.bin left out: pickle" in err
    assert not HfApi(endpoint=hub.url).repo_exists("alice/pickled")


def test_a_pinned_commit_is_the_integrity_anchor(hub, checkpoint: Path, tmp_path: Path) -> None:
    # The uploader (or whoever holds the repo's token) replaces a tensor and updates surgery.json to match: the files
    # agree with each other, so only a pin to the commit you reviewed keeps the original.
    model = _train(_recipe(checkpoint), tmp_path / "ad")
    first = push_folder(tmp_path / "ad", "alice/pinned", progress=False)
    tensors = load_file(str(tmp_path / "ad" / "adapter.safetensors"))
    tensors["fc.weight"] = tensors["fc.weight"] + 1
    save_file(tensors, str(tmp_path / "ad" / "adapter.safetensors"), metadata={"format": "pt"})
    info = json.loads((tmp_path / "ad" / "surgery.json").read_text())
    info["adapter_sha256"] = hashlib.sha256((tmp_path / "ad" / "adapter.safetensors").read_bytes()).hexdigest()
    (tmp_path / "ad" / "surgery.json").write_text(json.dumps(info))
    second = push_folder(tmp_path / "ad", "alice/pinned", progress=False)
    assert second.sha != first.sha
    x, _ = _probe(tmp_path)
    with torch.no_grad():
        expected = model(x)
        pinned = surgery.load(first.ref, base=checkpoint)
        assert torch.equal(pinned(x), expected)
        latest = surgery.load("hf-hub:alice/pinned", base=checkpoint)
        assert not torch.equal(latest(x), expected)  # the tampered upload loads: its files are self-consistent
    assert pinned.adapter_info["source"]["revision"] == first.sha
    assert latest.adapter_info["source"]["revision"] == second.sha  # recorded, so the user sees what was loaded


def test_a_hub_base_whose_config_names_a_url_is_refused(hub, tmp_path: Path) -> None:
    # timm passes a hub config.json's model_args to the model: a stranger's base repo must not smuggle kwargs there.
    base = timm.create_model("test_resnet")
    timm.models.save_for_hf(base, tmp_path / "evil", safe_serialization=True)
    config = json.loads((tmp_path / "evil" / "config.json").read_text())
    config["model_args"] = {"pretrained_cfg_overlay": {"url": "http://127.0.0.1:9/evil.pth"}}
    (tmp_path / "evil" / "config.json").write_text(json.dumps(config))
    push_folder(tmp_path / "evil", "alice/evil-base", progress=False)
    recipe = load_recipe({"model": {"name": "test_resnet"}, "surgery": {"heads": {"fc": {"num_classes": 2}}}})
    model = build_model(recipe.model)
    fp = fingerprint(model)
    save_adapter(model.eval(), surgery.apply(model, recipe), tmp_path / "ad", base=fp)
    info = json.loads((tmp_path / "ad" / "surgery.json").read_text())
    info["base"].update(model="hf-hub:alice/evil-base", pretrained=True)
    (tmp_path / "ad" / "surgery.json").write_text(json.dumps(info))
    with pytest.raises(AdapterError, match=r"config\.json: model_args\.pretrained_cfg_overlay is not an architecture"):
        surgery.load(tmp_path / "ad")
