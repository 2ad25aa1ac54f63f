"""The adapter format: file names, the typed ``surgery.json`` (:class:`AdapterConfig`), the base fingerprint and the one
check of ``adapter.safetensors`` against what a reader expects.

Everything in an adapter folder may come from a stranger, so :func:`read_config` validates every value before anything
acts on it (a malformed or hostile value is refused naming its key), and :func:`read_header` reads the safetensors
header with a size cap before any tensor is read.
"""

from __future__ import annotations

import json
import re
import struct
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from surgery.errors import AdapterError

if TYPE_CHECKING:
    import torch
    from torch import nn

FORMAT = "timm-surgery-adapter"
FORMAT_VERSION = 2  # 2: base.checkpoint is a file name + sha256, data_config, source; 1 is still read
ADAPTER_FILE = "adapter.safetensors"
CONFIG_FILE = "surgery.json"
CARD_FILE = "README.md"
MERGED_WEIGHTS = "model.safetensors"
MERGED_CONFIG = "config.json"
HF_HUB = "hf-hub:"

MAX_CONFIG_BYTES = 8 << 20  # a surgery.json is a few KB; more is not an adapter description
MAX_HEADER_BYTES = 8 << 20  # the header of adapter.safetensors: ~100 bytes per tensor
MAX_TENSORS = 100_000

SHA256 = r"^[0-9a-f]{64}$"
FINGERPRINT = r"^sha256:[0-9a-f]{64}$"
COMMIT = r"^[0-9a-f]{40}$"
# A timm name, a torchvision name or an hf-hub reference: nothing that names a local path (local-dir:, file:).
BASE_NAME = r"^(hf-hub:[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*(@[\w./-]+)?|torchvision:\w+|[A-Za-z0-9][\w.-]*)$"
FILE_NAME = r"^[\w][\w.+-]*\.safetensors$"  # a file name, no directory: it can only ever be looked up where we say
# The adapter a continued adapter was made on: a hub repo (no revision: adapter_revision pins it) or a folder's name
ADAPTER_REF = r"^(hf-hub:[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*|[\w][\w.+-]*)$"
TENSOR_NAME = r"^[\w.]+$"

DTYPES = ("float64", "float32", "float16", "bfloat16", "int64", "int32", "int16", "int8", "uint8", "bool")
_ST_DTYPES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64", "I32": "int32",
    "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
}  # fmt: skip
_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}

Shape = list[Annotated[int, Field(ge=0, le=1 << 40)]]
JsonScalar = bool | int | float | str | None


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class BaseRef(_Strict):
    """``surgery.json: base``: what the adapter was made on."""

    model: Annotated[str, Field(pattern=BASE_NAME, max_length=300)] | None = None
    revision: Annotated[str, Field(pattern=COMMIT)] | None = None
    pretrained: bool = False
    checkpoint: Annotated[str, Field(pattern=FILE_NAME, max_length=255)] | None = Field(
        None, description="File name (never a path) of the safetensors checkpoint loaded onto the base."
    )
    checkpoint_sha256: Annotated[str, Field(pattern=SHA256)] | None = None
    kwargs: dict[Annotated[str, Field(pattern=r"^\w+$", max_length=100)], JsonScalar | list[JsonScalar]] = Field(
        default_factory=dict, description="Architecture arguments; build_model refuses any that is not one."
    )
    fingerprint: Annotated[str, Field(pattern=FINGERPRINT)]
    reproducible: bool = False
    adapter: Annotated[str, Field(pattern=ADAPTER_REF, max_length=300)] | None = Field(
        None,
        description="The adapter this one continued from (recipe `model.adapter`): `hf-hub:org/name` (at "
        "`adapter_revision`), or a local folder's name (never a path). The base is that adapter loaded onto the base "
        "the other keys describe; `fingerprint` is of that loaded model.",
    )
    adapter_revision: Annotated[str, Field(pattern=COMMIT)] | None = None


class TensorEntry(_Strict):
    """``surgery.json: tensors.NAME``."""

    shape: Shape
    dtype: Literal[DTYPES]  # type: ignore[valid-type]
    kind: Literal["trainable", "head", "buffer"] = "buffer"


class HeadEntry(_Strict):
    """``surgery.json: heads[i]``: a head the recipe replaced."""

    key: str
    path: str
    type: str
    num_classes: Annotated[int, Field(ge=1)] | None = None
    module: str = ""


class DataConfig(_Strict):
    """timm's data config of training (``timm.data.resolve_data_config``): what every prediction path must use."""

    input_size: tuple[
        Annotated[int, Field(ge=1, le=64)], Annotated[int, Field(ge=1, le=16384)], Annotated[int, Field(ge=1, le=16384)]
    ]
    interpolation: Literal["nearest", "bilinear", "bicubic", "box", "hamming", "lanczos", "random"] = "bicubic"
    mean: tuple[float, ...] = (0.485, 0.456, 0.406)
    std: tuple[Annotated[float, Field(gt=0)], ...] = (0.229, 0.224, 0.225)
    crop_pct: Annotated[float, Field(gt=0, le=4)] = 0.875
    crop_mode: Literal["center", "squash", "border"] = "center"

    @model_validator(mode="after")
    def _channels(self) -> DataConfig:
        channels = self.input_size[0]
        for key in ("mean", "std"):
            if len(getattr(self, key)) not in (1, channels):
                raise ValueError(f"{key} has {len(getattr(self, key))} values for {channels} channels")
        return self

    def to_timm(self) -> dict[str, Any]:
        """The dict timm's ``create_transform`` and ``pretrained_cfg`` take (tuples, as timm's own configs)."""
        return self.model_dump()


class AdapterConfig(_Strict):
    """``surgery.json``, typed. Keys of format 1 keep their names; format 2 adds ``data_config`` and
    ``base.checkpoint_sha256``, and stores ``base.checkpoint`` as a file name."""

    format: Literal["timm-surgery-adapter"]
    format_version: Annotated[int, Field(ge=1, le=FORMAT_VERSION)]
    created: str = ""
    base: BaseRef
    recipe: dict[str, Any]
    num_classes: Annotated[int, Field(ge=1)] | None = None
    class_names: list[Annotated[str, Field(max_length=1000)]] | None = None
    heads: list[HeadEntry] = Field(default_factory=list)
    tensors: dict[Annotated[str, Field(pattern=TENSOR_NAME, max_length=500)], TensorEntry] = Field(
        max_length=MAX_TENSORS
    )
    adapter_sha256: Annotated[str, Field(pattern=SHA256)]
    adapter_bytes: Annotated[int, Field(ge=0)] = 0
    trainable_params: Annotated[int, Field(ge=0)] = 0
    total_params: Annotated[int, Field(ge=0)] = 0
    versions: dict[str, str] = Field(default_factory=dict)
    metrics: dict[str, float | int] = Field(default_factory=dict)
    data_config: DataConfig | None = None

    @field_validator("recipe")
    @classmethod
    def _resolved(cls, recipe: dict[str, Any]) -> dict[str, Any]:
        # The recipe copy is already resolved: `extends` would make the loader read files the adapter names.
        if "extends" in recipe:
            raise ValueError("a resolved recipe has no 'extends' (it would read files named by the adapter)")
        return recipe

    @model_validator(mode="after")
    def _consistent(self) -> AdapterConfig:
        names, n = self.class_names, self.num_classes
        if names is not None and n is not None and len(names) != n and (n, len(names)) != (1, 2):  # 1 logit: 2 names
            raise ValueError(f"class_names: {len(names)} names for num_classes {n}")
        if (self.base.checkpoint is None) != (self.base.checkpoint_sha256 is None) and self.format_version >= 2:
            raise ValueError("base: checkpoint and checkpoint_sha256 go together")
        return self

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready data, as written to ``surgery.json``."""
        return self.model_dump(mode="json")


def first_error(err: ValidationError) -> str:
    """``key.path: message`` of a pydantic error's first entry, on one line."""
    first = err.errors()[0]
    message = str(first["msg"]).removeprefix("Value error, ")
    where = ".".join(str(p) for p in first["loc"])
    return f"{where}: {message}" if where else message  # a cross-key check names its key itself


def parse_config(data: Any, *, where: str) -> AdapterConfig:
    """Validate ``surgery.json`` data; an :class:`AdapterError` names the first bad key."""
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise AdapterError(f"{where}: not a timm-surgery adapter description (format != {FORMAT!r})")
    version = data.get("format_version")
    if isinstance(version, int) and version > FORMAT_VERSION:
        raise AdapterError(
            f"{where}: adapter format version {version} is newer than this timm-surgery understands "
            f"({FORMAT_VERSION}); upgrade timm-surgery"
        )
    if version == 1:  # format 1 recorded base.checkpoint as an absolute path of the uploader's machine
        base = data.get("base")
        if isinstance(base, dict) and isinstance(base.get("checkpoint"), str) and "/" in base["checkpoint"]:
            raise AdapterError(
                f"{where}: base.checkpoint: {base['checkpoint']!r} is a path on the machine that saved the adapter "
                "(format 1); pass the base checkpoint yourself: surgery load --base FILE (surgery.load(ref, base=...))"
            )
    try:
        return AdapterConfig.model_validate(data)
    except ValidationError as err:
        raise AdapterError(
            f"{where}: {first_error(err)}; the adapter is damaged or hostile: save or download it again"
        ) from None


def read_config(folder: Path) -> AdapterConfig:
    """The validated ``surgery.json`` of an adapter folder."""
    path = folder / CONFIG_FILE
    if not path.is_file():
        hint = " (it looks like a merged timm folder: load it with timm)" if (folder / MERGED_CONFIG).is_file() else ""
        raise AdapterError(f"{path}: missing; an adapter folder holds {CONFIG_FILE} and {ADAPTER_FILE}{hint}")
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise AdapterError(f"{path}: {path.stat().st_size:,} bytes, more than any adapter description; refused")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise AdapterError(
            f"{path}: not readable JSON ({err}); the adapter is damaged, save or download it again"
        ) from None
    return parse_config(data, where=str(path))


# --------------------------------------------------------------------------------------------------- fingerprint


def fingerprint(weights: nn.Module | Mapping[str, torch.Tensor]) -> str:
    """``sha256:<hex>`` over a state dict: every tensor's name, dtype, shape and bytes, in sorted name order.

    Two models have the same fingerprint exactly when their state dicts are bit-identical: it proves that the base
    you have is the base the adapter was made on (see docs/security.md for what it does not prove).
    """
    import hashlib

    import torch
    from torch import nn

    state = weights.state_dict() if isinstance(weights, nn.Module) else weights
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach()
        if tensor.is_meta:
            raise AdapterError(f"fingerprint: {name!r} is on the meta device; build the base model with its weights")
        tensor = tensor.to("cpu").contiguous()
        data = tensor.reshape(-1).view(torch.uint8).numpy()
        digest.update(f"{name}\0{dtype_name(tensor)}\0{list(tensor.shape)}\0{data.nbytes}\0".encode())
        digest.update(data)
    return "sha256:" + digest.hexdigest()


def dtype_name(tensor: torch.Tensor) -> str:
    """``float32`` for ``torch.float32``."""
    return str(tensor.dtype).removeprefix("torch.")


# ------------------------------------------------------------------------------------------------------ tensors

Header = dict[str, tuple[list[int], str]]


def read_header(path: Path) -> Header:
    """Names, shapes and dtypes in a safetensors file, from its header, without loading any tensor.

    The header length is checked against a cap and the file size before it is read, and every entry (dtype, shape,
    byte range) is checked, so a hostile file can neither make us allocate gigabytes nor point outside itself.
    """
    if not path.is_file():
        raise AdapterError(f"{path}: missing; download or copy the whole adapter folder")
    size = path.stat().st_size

    def bad(why: str) -> AdapterError:
        return AdapterError(
            f"{path}: not a readable safetensors file ({why}); the file is damaged or tampered with, save or "
            "download the adapter again"
        )

    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise bad("shorter than a header")
        (length,) = struct.unpack("<Q", head)
        if length > MAX_HEADER_BYTES or length > size - 8:
            raise bad(f"header length {length:,} bytes, over the cap of {MAX_HEADER_BYTES:,} or the file size")
        raw = f.read(length)
    try:
        entries = json.loads(raw)
    except ValueError:
        raise bad("header is not JSON") from None
    if not isinstance(entries, dict):
        raise bad("header is not a JSON object")
    entries.pop("__metadata__", None)
    out: Header = {}
    data_size = size - 8 - length
    for name, entry in entries.items():
        if not isinstance(entry, dict) or entry.get("dtype") not in _ST_DTYPES:
            raise bad(f"tensor {name[:80]!r}: unknown dtype")
        shape, offsets = entry.get("shape"), entry.get("data_offsets")
        if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
            raise bad(f"tensor {name[:80]!r}: bad shape")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
            raise bad(f"tensor {name[:80]!r}: bad data_offsets")
        numel = 1
        for d in shape:
            numel *= d
        begin, end = offsets
        if not 0 <= begin <= end <= data_size or end - begin != numel * _ITEMSIZE[entry["dtype"]]:
            raise bad(f"tensor {name[:80]!r}: byte range {offsets} does not fit its shape or the file")
        out[name] = (list(shape), _ST_DTYPES[entry["dtype"]])
    return out


def check_tensors(
    path: Path,
    header: Header,
    allowed: Mapping[str, tuple[list[int], str]],
    required: Mapping[str, str],
    *,
    extra: Callable[[str], str],
    mismatch: str,
) -> None:
    """The one tensor check, for ``verify_files`` (against ``surgery.json``) and ``load`` (against the model).

    ``allowed`` maps every name the file may hold to its (shape, dtype); ``required`` maps the names it must hold to
    why; ``extra(name)`` says why a name is not allowed; ``mismatch`` ends a shape/dtype mismatch message.
    """
    missing = [n for n in required if n not in header]
    if missing:
        raise AdapterError(
            f"{path}: missing tensor {missing[0]!r} ({required[missing[0]]}; {len(missing)} missing in all)"
        )
    for name, (shape, dtype) in header.items():
        if name not in allowed:
            raise AdapterError(f"{path}: extra tensor {name!r}{extra(name)}")
        want_shape, want_dtype = allowed[name]
        if list(want_shape) != shape or want_dtype != dtype:
            raise AdapterError(
                f"{path}: shape mismatch for {name!r}: {dtype}{shape} in the file, {want_dtype}{list(want_shape)} "
                f"{mismatch}"
            )


def is_commit(revision: str | None) -> bool:
    """A full 40-hex commit sha (a pin), not a branch or tag."""
    return bool(revision) and re.fullmatch(COMMIT, revision or "") is not None
