"""Building models from untrusted recipes and adapters: kwargs are architecture arguments only, every failure is a
ModelError, ``pretrained: true`` without network fails in seconds, checkpoints are safetensors with a sane header.

Nothing is mocked: tiny timm models with ``pretrained=False``, a real HTTP listener on 127.0.0.1 that must receive
nothing, and fresh interpreters for the offline cases (huggingface_hub reads HF_ENDPOINT/HF_HUB_OFFLINE at import).
"""

from __future__ import annotations

import http.server
import json
import os
import struct
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

import surgery
from surgery.cli import main
from surgery.errors import ModelError
from surgery.models import build_model, check_kwargs, load_checkpoint
from surgery.recipe import ModelSpec

REPO_ROOT = Path(__file__).resolve().parents[1]


class _Listener(http.server.BaseHTTPRequestHandler):
    hits: list[str] = []

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        type(self).hits.append(self.path)
        self.send_response(404)
        self.end_headers()

    do_HEAD = do_GET

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def listener() -> Iterator[tuple[str, list[str]]]:
    """An HTTP server on 127.0.0.1 recording every request it gets (there must be none)."""
    hits: list[str] = []
    handler = type("Handler", (_Listener,), {"hits": hits})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", hits
    finally:
        server.shutdown()
        server.server_close()


# (kwargs, the key the error must name). Each would reach timm.create_model unchecked before.
HOSTILE = [
    ({"pretrained_cfg_overlay": {"url": "URL/evil.pth"}}, "pretrained_cfg_overlay"),
    ({"pretrained_cfg": {"url": "URL/evil.pth", "hf_hub_id": None}}, "pretrained_cfg"),
    ({"cache_dir": "CACHE"}, "cache_dir"),
    ({"checkpoint_path": "URL/evil.pth"}, "checkpoint_path"),
    ({"pretrained_strict": False}, "pretrained_strict"),
    ({"features_only": True}, "features_only"),
    ({"out_indices": [0, 1]}, "out_indices"),
    ({"feature_cls": "hook"}, "feature_cls"),
    ({"feature_cfg": {"out_indices": [1]}}, "feature_cfg"),
    ({"pretrained_filter_fn": "os.system"}, "pretrained_filter_fn"),
    ({"model_cfg": {"layers": [1]}}, "model_cfg"),
    ({"pruned": True}, "pruned"),
    ({"device": "cuda"}, "device"),
    ({"not_an_argument": 1}, "not_an_argument"),  # not in the constructor at all
    ({"drop_rate": 0.1, "weights_file": "x"}, "weights_file"),
    ({"drop_rate": "URL/x"}, "drop_rate"),  # a URL as a value
    ({"drop_rate": {"a": 1}}, "drop_rate"),  # a mapping where the argument is a number
    ({"global_pool": "a" * 1000}, "global_pool"),  # an absurd string
    ({"scriptable": "yes"}, "scriptable"),
    ({"drop_rate": float("nan")}, "drop_rate"),
]


@pytest.mark.parametrize(("kwargs", "key"), HOSTILE, ids=[k for _, k in HOSTILE])
def test_hostile_kwargs_are_refused_before_anything_is_fetched_or_built(
    kwargs: dict, key: str, listener: tuple[str, list[str]], tmp_path: Path
) -> None:
    url, hits = listener
    cache = tmp_path / "cache"
    raw = json.dumps(kwargs).replace("URL", url).replace("CACHE", str(cache))
    kwargs = json.loads(raw)
    for pretrained in (False, True):
        with pytest.raises(ModelError) as err:
            build_model(ModelSpec(name="test_resnet", pretrained=pretrained, kwargs=kwargs))
        message = str(err.value)
        assert (
            f"kwargs.{key}" in message
            or f"model.kwargs: 'test_resnet' does not accept these arguments: '{key}'" in message
        )
        assert "\n" not in message
    assert hits == []
    assert not cache.exists()


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [({"weights": "IMAGENET1K_V1"}, "weights"), ({"progress": True}, "progress"), ({"bogus": 1}, "bogus")],
)
def test_torchvision_kwargs_follow_the_same_rule(kwargs: dict, key: str) -> None:
    with pytest.raises(ModelError) as err:
        build_model(ModelSpec(name="torchvision:resnet18", kwargs=kwargs))
    assert key in str(err.value) and "model.kwargs" in str(err.value)


def test_the_overlay_url_gets_no_request_even_for_a_pretrained_build(
    listener: tuple[str, list[str]], tmp_path: Path
) -> None:
    """The issue's exploit, verbatim: a download URL and a cache directory of the attacker's choosing."""
    url, hits = listener
    kwargs = {"pretrained_cfg_overlay": {"url": f"{url}/evil.pth", "hf_hub_id": None}, "cache_dir": str(tmp_path / "c")}
    with pytest.raises(ModelError, match="pretrained_cfg_overlay"):
        build_model(ModelSpec(name="test_resnet", pretrained=True, kwargs=kwargs))
    assert hits == [] and not (tmp_path / "c").exists()


@pytest.mark.parametrize(
    ("name", "kwargs", "check"),
    [
        ("test_resnet", {"drop_rate": 0.25}, lambda m: m.drop_rate == 0.25),
        ("test_resnet", {"num_classes": 3, "in_chans": 1}, lambda m: m(torch.zeros(1, 1, 32, 32)).shape == (1, 3)),
        ("test_resnet", {"global_pool": "max", "act_layer": "gelu"}, lambda m: m.global_pool.pool_type == "max"),
        ("test_resnet", {"drop_path_rate": 0.1}, lambda m: True),
        ("test_vit", {"img_size": 32}, lambda m: m(torch.zeros(1, 3, 32, 32)).shape[0] == 1),
        ("test_vit", {"img_size": [32, 48], "dynamic_img_size": True}, lambda m: m.patch_embed.img_size == (32, 48)),
        ("test_efficientnet", {"drop_rate": 0.2, "scriptable": True}, lambda m: m.drop_rate == 0.2),
        ("torchvision:resnet18", {"num_classes": 4}, lambda m: m.fc.out_features == 4),
    ],
)
def test_architecture_kwargs_still_work(name: str, kwargs: dict, check) -> None:
    model = build_model(ModelSpec(name=name, kwargs=kwargs))
    assert check(model.eval())


def test_a_local_dir_config_cannot_smuggle_kwargs_either(tmp_path: Path) -> None:
    """timm passes a folder's saved ``model_args`` to the constructor too: same rule."""
    folder = tmp_path / "base"
    timm.models.save_for_hf(timm.create_model("test_resnet"), folder, safe_serialization=True)
    config = json.loads((folder / "config.json").read_text())
    config["model_args"] = {"checkpoint_path": str(tmp_path / "evil.pth")}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelError, match="checkpoint_path"):
        build_model(ModelSpec(name=f"local-dir:{folder}", pretrained=True))


def test_recipe_kwargs_go_through_the_same_check(tmp_path: Path) -> None:
    recipe = surgery.load_recipe({"model": {"name": "test_resnet", "kwargs": {"cache_dir": str(tmp_path / "x")}}})
    with pytest.raises(ModelError, match=r"model\.kwargs\.cache_dir"):
        build_model(recipe.model, where=recipe.where("model"))
    good = surgery.load_recipe({"model": {"name": "test_vit", "kwargs": {"img_size": 32, "num_classes": 2}}})
    assert build_model(good.model)(torch.zeros(1, 3, 32, 32)).shape == (1, 2)
    assert check_kwargs("test_resnet", {}) == {}


def test_cli_plan_refuses_cache_dir_in_one_line(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    target = tmp_path / "x"
    status = main(["plan", "linear-probe", "--model", "test_resnet", f"model.kwargs.cache_dir={target}"])
    err = capsys.readouterr().err
    assert status == 2
    assert err.count("\n") == 1 and "model.kwargs.cache_dir" in err and "Traceback" not in err
    assert not target.exists()


@pytest.mark.parametrize(
    ("name", "kwargs", "needle"),
    [
        ("test_resnet", {"norm_layer": "no_such_norm"}, "kwargs"),  # KeyError inside timm
        ("test_resnet", {"block_args": {"bogus": 1}}, "kwargs"),  # TypeError deep inside
        ("test_vit", {"embed_dim": 7, "num_heads": 2}, "kwargs"),  # AssertionError (dim % heads)
        ("no_such_model_xyz", {}, "name"),
        ("hf-hub:", {}, "name"),
        ("a/b", {}, "name"),
        ("local-dir:/nonexistent/folder", {}, "name"),
    ],
)
def test_every_build_failure_is_a_model_error(name: str, kwargs: dict, needle: str) -> None:
    with pytest.raises(ModelError) as err:
        build_model(ModelSpec(name=name, kwargs=kwargs))
    assert needle in str(err.value) and "\n" not in str(err.value)


def _fresh(script: str, tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING", "TORCH_HOME"))}
    base.update(HF_HOME=str(tmp_path / "hf"), TORCH_HOME=str(tmp_path / "torch"), PYTHONPATH=str(REPO_ROOT), **env)
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)], env=base, capture_output=True, text=True, timeout=120
    )


_PRETRAINED = """
import time
from surgery.errors import ModelError
from surgery.models import build_model
from surgery.recipe import ModelSpec
start = time.monotonic()
try:
    build_model(ModelSpec(name={name!r}, pretrained=True), where="r.yaml:2: model")
except ModelError as err:
    print(round(time.monotonic() - start, 2), err)
"""


@pytest.mark.parametrize(
    ("env", "name"),
    [
        ({"HF_HUB_OFFLINE": "1"}, "resnet18"),
        ({"HF_ENDPOINT": "http://127.0.0.1:9"}, "resnet18"),  # nothing listens on the discard port
        ({"HF_ENDPOINT": "http://nonsense.invalid"}, "resnet18.a1_in1k"),
        ({"HF_ENDPOINT": "http://127.0.0.1:9"}, "hf-hub:alice/nothing"),
    ],
)
def test_pretrained_without_network_fails_in_seconds(env: dict, name: str, tmp_path: Path) -> None:
    proc = _fresh(_PRETRAINED.format(name=name), tmp_path, **env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    seconds, message = proc.stdout.strip().split(" ", 1)
    assert float(seconds) < 5, proc.stdout
    assert message.startswith("r.yaml:2: model.pretrained:") and "pretrained: false" in message


def test_pretrained_from_the_cache_does_not_need_the_network(tmp_path: Path) -> None:
    """A model whose weights are in the HF cache builds offline (the check looks at the cache first)."""
    script = """
    import torch, timm
    from huggingface_hub import constants
    from safetensors.torch import save_file
    from pathlib import Path
    cfg = timm.models.get_pretrained_cfg("test_resnet")
    if cfg is None or not cfg.hf_hub_id:
        print("skip"); raise SystemExit
    repo = cfg.hf_hub_id
    snap = Path(constants.HF_HUB_CACHE) / ("models--" + repo.replace("/", "--")) / "snapshots" / ("0" * 40)
    snap.mkdir(parents=True)
    ref = snap.parents[1] / "refs"; ref.mkdir(); (ref / "main").write_text("0" * 40)
    torch.manual_seed(5)
    save_file(timm.create_model("test_resnet").state_dict(), str(snap / "model.safetensors"))
    from surgery.models import build_model
    from surgery.recipe import ModelSpec
    model = build_model(ModelSpec(name="test_resnet", pretrained=True))
    torch.manual_seed(5)
    print(torch.equal(model.fc.weight, timm.create_model("test_resnet").fc.weight))
    """
    proc = _fresh(script, tmp_path, HF_HUB_OFFLINE="1")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() in ("True", "skip")


def _header_file(path: Path, header: bytes, length: int | None = None) -> Path:
    path.write_bytes(struct.pack("<Q", len(header) if length is None else length) + header + b"\0" * 16)
    return path


@pytest.mark.parametrize(
    ("header", "length", "needle"),
    [
        (b"{}", 1 << 62, "header claims"),  # a huge header length
        (b"{}", 200 * 1024 * 1024, "header claims"),
        (b"not json at all", None, "not JSON"),
        (b"[1, 2]", None, "not a JSON object"),
        (b'{"w": {"dtype": "F32", "shape": [1000000], "data_offsets": [0, 4000000]}}', None, "not a readable"),
    ],
)
def test_a_malformed_checkpoint_is_a_model_error(
    header: bytes, length: int | None, needle: str, tmp_path: Path
) -> None:
    path = _header_file(tmp_path / "bad.safetensors", header, length)
    with pytest.raises(ModelError, match=needle) as err:
        load_checkpoint(timm.create_model("test_resnet"), path, where="model.checkpoint")
    assert str(err.value).startswith("model.checkpoint:") and "\n" not in str(err.value)


def test_a_short_or_pickle_checkpoint_is_refused(tmp_path: Path) -> None:
    short = tmp_path / "short.safetensors"
    short.write_bytes(b"abc")
    with pytest.raises(ModelError, match="8-byte"):
        load_checkpoint(timm.create_model("test_resnet"), short)
    pickle_file = tmp_path / "w.pth"
    torch.save(timm.create_model("test_resnet").state_dict(), pickle_file)
    with pytest.raises(ModelError, match="surgery convert"):
        build_model(ModelSpec(name="test_resnet", checkpoint=str(pickle_file)))


def test_a_good_checkpoint_loads(tmp_path: Path) -> None:
    torch.manual_seed(1)
    source = timm.create_model("test_resnet")
    save_file(source.state_dict(), str(tmp_path / "w.safetensors"))
    model = build_model(ModelSpec(name="test_resnet", checkpoint=str(tmp_path / "w.safetensors")))
    assert torch.equal(model.fc.weight, source.fc.weight)


def test_hf_hub_refs_on_a_reachable_hub_still_build_and_their_config_is_checked(tmp_path: Path) -> None:
    """On the project's own hub: a good repo builds with pretrained weights; a repo whose config.json smuggles a
    non-architecture ``model_args`` key is refused before timm builds anything."""
    from huggingface_hub import HfApi

    from surgery.hub.server import HubServer, add_token

    root = tmp_path / "hub"
    root.mkdir()
    token = add_token(root, "alice", "write")
    torch.manual_seed(4)
    base = timm.create_model("test_resnet", num_classes=3)
    for repo, extra in (("alice/good", {}), ("alice/evil", {"checkpoint_path": str(tmp_path / "evil.pth")})):
        folder = tmp_path / repo.replace("/", "-")
        timm.models.save_for_hf(base, folder, safe_serialization=True)
        config = json.loads((folder / "config.json").read_text())
        config["model_args"] = {**config.get("model_args", {}), **extra}
        (folder / "config.json").write_text(json.dumps(config))
    probe = tmp_path / "probe.safetensors"
    x = torch.randn(1, 3, 32, 32)
    save_file({"x": x}, str(probe))
    script = f"""
    import torch
    from safetensors.torch import load_file
    from surgery.errors import ModelError
    from surgery.models import build_model
    from surgery.recipe import ModelSpec
    good = build_model(ModelSpec(name="hf-hub:alice/good", pretrained=True, kwargs={{"drop_rate": 0.1}})).eval()
    with torch.no_grad():
        print(good(load_file({str(probe)!r})["x"]).tolist())
    for pretrained in (False, True):
        try:
            build_model(ModelSpec(name="hf-hub:alice/evil", pretrained=pretrained))
        except ModelError as err:
            print(err)
    """
    with HubServer(root) as server:
        api = HfApi(endpoint=server.url, token=token)
        for repo in ("alice/good", "alice/evil"):
            api.create_repo(repo, exist_ok=True)
            api.upload_folder(repo_id=repo, folder_path=tmp_path / repo.replace("/", "-"))
        proc = _fresh(script, tmp_path, HF_ENDPOINT=server.url, HF_TOKEN=token, HF_HUB_DISABLE_XET="1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    with torch.no_grad():
        assert torch.allclose(torch.tensor(json.loads(lines[0])), base.eval()(x))
    assert len(lines) == 3 and all("config.json model_args.checkpoint_path: refused" in line for line in lines[1:])
    assert not (tmp_path / "evil.pth").exists()
