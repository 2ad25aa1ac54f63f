"""Hostile adapter folders: whatever a stranger puts in ``surgery.json`` or ``adapter.safetensors``, ``surgery.load``
refuses it with one of our errors naming the key, before any effect: no request to a URL it names, no file written
or read outside the folder and the cache, no code run (pickle is never loaded).

Real files, a real HTTP listener on 127.0.0.1 standing in for the attacker's server, nothing mocked.
"""

from __future__ import annotations

import copy
import hashlib
import http.server
import json
import pickle
import struct
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from huggingface_hub import constants
from safetensors.torch import save_file

import surgery
from surgery.adapter import fingerprint, save_adapter, verify_files
from surgery.cli import main
from surgery.errors import AdapterError, ModelError, SurgeryError
from surgery.models import build_model
from surgery.recipe import load_recipe

RECIPE = {
    "model": {"name": "test_resnet"},
    "surgery": {"rules": [{"freeze": "*"}], "heads": {"fc": {"num_classes": 2}}},
}


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.nn.Module]:
    """A genuine adapter on a random base (kept in hand), to be copied and made hostile."""
    folder = tmp_path_factory.mktemp("genuine") / "ad"
    recipe = load_recipe(RECIPE)
    torch.manual_seed(0)
    model = build_model(recipe.model)
    base = copy.deepcopy(model)
    plan = surgery.apply(model, recipe)
    save_adapter(model.eval(), plan, folder, base=fingerprint(base))
    return folder, base


@pytest.fixture
def adapter(made: tuple[Path, torch.nn.Module], tmp_path: Path) -> Path:
    folder = tmp_path / "adapter"
    folder.mkdir()
    for f in made[0].iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    return folder


@pytest.fixture
def listener() -> Iterator[list[str]]:
    """An HTTP server on 127.0.0.1 recording every request: the 'attacker's URL'."""
    seen: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            seen.append(self.path)
            self.send_response(404)
            self.end_headers()

        do_HEAD = do_GET  # noqa: N815

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    seen.append(f"http://127.0.0.1:{server.server_address[1]}")  # seen[0] is the URL, requests follow
    try:
        yield seen
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(autouse=True)
def _offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Caches inside tmp_path/cache; the real hub unreachable (a request there would be a failure too)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache" / "hf"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "cache" / "torch"))


def _edit(folder: Path, change: Callable[[dict[str, Any]], None]) -> None:
    info = json.loads((folder / "surgery.json").read_text())
    change(info)
    (folder / "surgery.json").write_text(json.dumps(info))


def _files(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file()}


# ------------------------------------------------------------------------------------------ adapter.safetensors


def _raw_safetensors(path: Path, header: dict[str, Any], data: bytes = b"", length: int | None = None) -> None:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw) if length is None else length) + raw + data)


def test_a_header_length_claiming_gigabytes_is_refused_before_reading(adapter: Path) -> None:
    _raw_safetensors(adapter / "adapter.safetensors", {}, length=10 << 30)  # "the header is 10 GB"
    with pytest.raises(AdapterError, match=r"header length 10,737,418,240 bytes, over the cap"):
        surgery.load(adapter)


def test_a_header_over_the_cap_is_refused(adapter: Path) -> None:
    from surgery.adapter.format import MAX_HEADER_BYTES

    path = adapter / "adapter.safetensors"
    with path.open("wb") as f:  # a genuinely huge header: the file is that long, the cap still refuses it
        f.write(struct.pack("<Q", MAX_HEADER_BYTES + 1))
        f.write(b"{" + b" " * MAX_HEADER_BYTES + b"}")
    with pytest.raises(AdapterError, match="over the cap"):
        verify_files(adapter)


@pytest.mark.parametrize(
    ("entry", "why"),
    [
        ({"dtype": "X99", "shape": [2], "data_offsets": [0, 8]}, "unknown dtype"),
        ({"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}, "bad shape"),
        ({"dtype": "F32", "shape": [1 << 40, 1 << 40], "data_offsets": [0, 8]}, "byte range .*does not fit"),
        ({"dtype": "F32", "shape": [2], "data_offsets": [0, 1 << 50]}, "byte range .*does not fit"),
        ({"dtype": "F32", "shape": [2], "data_offsets": "everything"}, "bad data_offsets"),
    ],
)
def test_a_header_entry_that_lies_is_refused(adapter: Path, entry: dict[str, Any], why: str) -> None:
    _raw_safetensors(adapter / "adapter.safetensors", {"fc.weight": entry}, data=b"\0" * 8)
    with pytest.raises(AdapterError, match=rf"not a readable safetensors file \(tensor 'fc\.weight': {why}"):
        surgery.load(adapter)


def test_tensors_that_do_not_match_are_refused(adapter: Path, made: tuple[Path, torch.nn.Module]) -> None:
    # consistent with surgery.json (sha256 updated) but of another dtype than the model's: the load check refuses it
    path = adapter / "adapter.safetensors"
    tensors = {"fc.weight": torch.zeros(2, 96, dtype=torch.float16), "fc.bias": torch.zeros(2, dtype=torch.float16)}
    save_file(tensors, str(path))

    def relist(info: dict[str, Any]) -> None:
        info["tensors"] = {n: {"shape": list(t.shape), "dtype": "float16", "kind": "head"} for n, t in tensors.items()}
        info["adapter_sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()

    _edit(adapter, relist)
    verify_files(adapter)  # the pair agrees with itself
    with pytest.raises(
        AdapterError, match=r"shape mismatch for 'fc\.(weight|bias)': float16\[2.*\] in the file, float32"
    ):
        surgery.load(adapter, base=made[1])


def test_a_tampered_file_is_refused(adapter: Path, made: tuple[Path, torch.nn.Module]) -> None:
    path = adapter / "adapter.safetensors"
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x40
    path.write_bytes(bytes(data))
    with pytest.raises(AdapterError, match="sha256 differs"):
        surgery.load(adapter, base=made[1])


# ------------------------------------------------------------------------------------------------- surgery.json


@pytest.mark.parametrize(
    ("change", "key"),
    [
        (lambda i: i["base"].update(checkpoint="../../outside.safetensors"), "base.checkpoint"),
        (lambda i: i["base"].update(checkpoint="/etc/x.safetensors", checkpoint_sha256="0" * 64), "base.checkpoint"),
        (lambda i: i["base"].update(model="local-dir:/etc"), "base.model"),
        (lambda i: i["base"].update(model="file:///etc/passwd"), "base.model"),
        (lambda i: i["recipe"].update(extends="/etc/passwd"), "recipe"),
        (lambda i: i["tensors"].update({"../x": {"shape": [1], "dtype": "float32"}}), "tensors.../x"),
        (lambda i: i["tensors"]["fc.weight"].update(dtype="object"), "tensors.fc.weight.dtype"),
        (lambda i: i["tensors"]["fc.weight"].update(shape="big"), "tensors.fc.weight.shape"),
        (lambda i: i.update(adapter_sha256="no"), "adapter_sha256"),
        (lambda i: i.update(base="test_resnet"), "base"),
        (lambda i: i.pop("base"), "base"),
        (lambda i: i.update(tensors=[]), "tensors"),
        (lambda i: i["base"].update(fingerprint="md5:1"), "base.fingerprint"),
        (lambda i: i["base"].update(kwargs={"pretrained_cfg_overlay": {"url": "http://x"}}), "base.kwargs"),
        (lambda i: i.update(class_names=["a", "b", "c"]), "class_names"),
        (lambda i: i.update(data_config={"input_size": [3, 0, 32]}), "data_config.input_size"),
        (lambda i: i.update(unexpected=1), "unexpected"),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_malformed_or_hostile_values_are_refused_naming_the_key(
    adapter: Path, change: Callable[[dict[str, Any]], None], key: str, tmp_path: Path
) -> None:
    _edit(adapter, change)
    before = _files(tmp_path)
    with pytest.raises(AdapterError) as err:
        surgery.load(adapter)
    message = str(err.value)
    assert f"surgery.json: {key}" in message and len(message.splitlines()) == 1
    assert _files(tmp_path) == before
    assert main(["load", str(adapter)]) == 2  # the CLI: one line, exit 2


def test_not_json_and_huge_json_are_refused(adapter: Path) -> None:
    (adapter / "surgery.json").write_bytes(b"\xff\xfe not json")
    with pytest.raises(AdapterError, match="not readable JSON"):
        surgery.load(adapter)
    (adapter / "surgery.json").write_bytes(b" " * (9 << 20))
    with pytest.raises(AdapterError, match="more than any adapter description"):
        surgery.load(adapter)


# -------------------------------------------------------------------------------------------- building the base


class _Payload:
    """A pickle that, when loaded, creates a file: proof that code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (str(self.marker), "w"))


@pytest.mark.parametrize("key", ["pretrained_cfg_overlay", "cache_dir", "checkpoint_path", "pretrained_cfg"])
def test_base_kwargs_that_name_files_or_urls_are_refused(
    adapter: Path, key: str, listener: list[str], tmp_path: Path
) -> None:
    url = f"{listener[0]}/evil.pth"
    outside = tmp_path / "outside"
    outside.mkdir()
    marker = tmp_path / "code-ran"
    evil = outside / "evil.pth"
    evil.write_bytes(pickle.dumps(_Payload(marker)))
    values = {
        "pretrained_cfg_overlay": {"url": url, "hf_hub_id": None, "file": None},
        "cache_dir": str(outside / "cache"),
        "checkpoint_path": str(evil),
        "pretrained_cfg": {"url": url, "hf_hub_id": None},
    }
    _edit(adapter, lambda i: i["base"].update(pretrained=True, kwargs={key: values[key]}))
    before = _files(tmp_path)
    with pytest.raises(SurgeryError, match=key):
        surgery.load(adapter)
    assert listener[1:] == []  # no request left for the URL the adapter names
    assert not marker.exists()  # no pickle was loaded
    assert _files(tmp_path) - before <= {p for p in _files(tmp_path) if "cache" in p.relative_to(tmp_path).parts}
    assert not (outside / "cache").exists()


def test_a_pickle_given_as_the_base_checkpoint_is_never_loaded(adapter: Path, tmp_path: Path) -> None:
    marker = tmp_path / "code-ran"
    evil = tmp_path / "base.pth"
    evil.write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(ModelError, match=r"not a \.safetensors file"):
        surgery.load(adapter, base=evil)
    disguised = tmp_path / "base.safetensors"  # a pickle under a safetensors name
    disguised.write_bytes(evil.read_bytes())
    with pytest.raises(ModelError, match="not a readable safetensors file"):
        surgery.load(adapter, base=disguised)
    assert not marker.exists()


def test_a_recorded_checkpoint_that_is_not_safetensors_is_a_clean_error(adapter: Path, tmp_path: Path) -> None:
    junk = tmp_path / "test_resnet.safetensors"
    junk.write_bytes(b"\x80\x04 not really")
    sha = hashlib.sha256(junk.read_bytes()).hexdigest()
    _edit(adapter, lambda i: i["base"].update(checkpoint=junk.name, checkpoint_sha256=sha))
    with pytest.raises(ModelError, match="not a readable safetensors file"):
        surgery.load(adapter, base=junk)
    with pytest.raises(AdapterError, match=r"local checkpoint test_resnet\.safetensors, which is not here"):
        surgery.load(adapter)


def test_a_random_base_is_refused_by_its_fingerprint(adapter: Path, made: tuple[Path, torch.nn.Module]) -> None:
    with pytest.raises(AdapterError, match="wrong base model: the base test_resnet has random weights"):
        surgery.load(adapter)
    assert isinstance(surgery.load(adapter, base=made[1]), torch.nn.Module)


def test_a_hostile_head_size_is_refused_before_it_is_allocated(
    adapter: Path, made: tuple[Path, torch.nn.Module]
) -> None:
    # fc of 96 x 10^10 floats would be 3.8 TB: the meta-device dry run compares it with the file first
    _edit(adapter, lambda i: i["recipe"]["surgery"]["heads"]["fc"].update(num_classes=10**10))
    with pytest.raises(AdapterError, match=r"shape mismatch for 'fc\.(weight|bias)': float32\[2.*10000000000"):
        surgery.load(adapter, base=made[1])
