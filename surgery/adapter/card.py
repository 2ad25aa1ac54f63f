"""What an adapter says about itself: the model card (README.md), the lines of ``surgery load``, and predictions
with the data config the model was trained with."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from surgery.adapter.format import HF_HUB, AdapterConfig
from surgery.errors import AdapterError
from surgery.io import write_text

REPO_PLACEHOLDER = "ORG/NAME"  # replaced by the real repo id when the folder is pushed (surgery.adapter.push)


def _metrics_table(metrics: Mapping[str, Any]) -> str:
    if not metrics:
        return "No metrics were recorded."
    rows = ["| metric | value |", "|---|---|"]
    for key, value in metrics.items():
        shown = f"{value:.4g}" if isinstance(value, float) else str(value)
        rows.append(f"| {key} | {shown} |")
    return "\n".join(rows)


def _preprocessing(config: AdapterConfig) -> str:
    data = config.data_config
    if data is None:
        return "- Preprocessing: not recorded (timm's defaults for the base model)"
    size = "x".join(str(d) for d in data.input_size[1:])
    return (
        f"- Input size: {size} ({data.input_size[0]} channels)\n"
        f"- Preprocessing: resize with {data.interpolation}, {data.crop_mode} crop {data.crop_pct:g}, "
        f"mean {list(data.mean)}, std {list(data.std)}"
    )


def card_text(
    config: AdapterConfig, *, base_model_id: str | None, merged: bool = False, repo: str | None = None
) -> str:
    """README.md through huggingface_hub's ModelCard: metadata the Hub understands, then a readable body."""
    import yaml
    from huggingface_hub import ModelCard, ModelCardData

    base = config.base
    tags = ["image-classification", "timm", "timm-surgery", "merged" if merged else "adapter"]
    # a LoRA run, or a run that continued one (model.adapter): its tensors are LoRA weights
    lora = not merged and (
        bool((config.recipe.get("surgery") or {}).get("lora")) or any(".lora_" in name for name in config.tensors)
    )
    if lora:  # PEFT files sit next to surgery.json: the Hub lists the repo as a PEFT adapter of its base
        tags.insert(2, "lora")
        base_model_id = base_model_id or str(base.model or "").removeprefix(HF_HUB) or None
    data = ModelCardData(
        library_name="peft" if lora else "timm",
        base_model=base_model_id,
        tags=tags,
        pipeline_tag="image-classification",
    )
    recipe = yaml.safe_dump(config.recipe, sort_keys=False, default_flow_style=None).strip()
    classes = config.class_names or []
    shown = ", ".join(classes[:20]) + (" ..." if len(classes) > 20 else "")
    repo = (repo or str((config.recipe.get("hub") or {}).get("repo") or "") or REPO_PLACEHOLDER).removeprefix(HF_HUB)
    if merged:
        title = "timm model merged from a timm-surgery adapter"
        how = (
            f'```python\nimport timm\n\nmodel = timm.create_model("hf-hub:{repo}", pretrained=True).eval()\n'
            "config = timm.data.resolve_data_config({}, model=model)  # the training input size and normalization\n"
            "```\n\nA plain timm model: this package is not needed to load it."
        )
        size = ""
    else:
        title = "timm-surgery adapter"
        how = (
            f'```python\nimport surgery\n\nmodel = surgery.load("hf-hub:{repo}")  # or a local folder\n```\n\n'
            "`surgery.load` builds the base model, checks its sha256 fingerprint, applies the recipe's heads and "
            "norm conversions and loads `adapter.safetensors` strictly. Pin a commit for integrity: "
            f"`hf-hub:{repo}@<commit sha>`. `surgery merge ADAPTER OUT` writes a plain timm folder."
        )
        size = f"\n- Adapter: {config.adapter_bytes:,} bytes ({len(config.tensors)} tensors)"
        if lora:
            how += (
                "\n\nA LoRA adapter in PEFT's format too (`adapter_config.json`, `adapter_model.safetensors`):\n\n"
                f"```python\nimport timm\nfrom peft import PeftModel\n\nbase = timm.create_model("
                f'"{base.model}", pretrained={base.pretrained}, num_classes={config.num_classes})\n'
                f'model = PeftModel.from_pretrained(base, "{repo}").eval()\n```'
            )
    if base.checkpoint:
        base_line = f"`{base.model}` with the checkpoint `{base.checkpoint}` (sha256 `{base.checkpoint_sha256}`)"
    else:
        base_line = f"`{base.model}`" + (f" at revision `{base.revision}`" if base.revision else "")
        base_line += " (pretrained)" if base.pretrained else ""
    if base.adapter:  # continued from an adapter (model.adapter): that adapter on its base is what this one changes
        at = f" at revision `{base.adapter_revision}`" if base.adapter_revision else ""
        base_line = f"the adapter `{base.adapter}`{at}, on {base_line}"
    trainable, total = config.trainable_params, config.total_params
    share = f" ({100 * trainable / total:.2f}% of {total:,})" if trainable and total else ""
    body = f"""# {title}

- Base model: {base_line}
- Base fingerprint: `{base.fingerprint}`
- Classes: {config.num_classes}{f" ({shown})" if shown else ""}
{_preprocessing(config)}
- Trained parameters: {f"{trainable:,}" if trainable else "-"}{share}{size}

## How to load

{how}

## Metrics

{_metrics_table(config.metrics)}

## Recipe

```yaml
{recipe}
```
"""
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}"))


def write_card(
    path: Path, config: AdapterConfig, *, base_model_id: str | None, merged: bool = False, repo: str | None = None
) -> None:
    """Write README.md atomically (see :func:`card_text`)."""
    write_text(path, card_text(config, base_model_id=base_model_id, merged=merged, repo=repo))


# ---------------------------------------------------------------------------------------------- surgery load


def describe(info: Mapping[str, Any]) -> str:
    """A few lines about a loaded adapter (``surgery load``): base, source commit, classes, input size, metrics."""
    base = info["base"]
    revision = f"@{base['revision'][:12]}" if base.get("revision") else ""
    classes = info.get("class_names") or []
    if base.get("adapter"):
        at = f"@{base['adapter_revision'][:12]}" if base.get("adapter_revision") else ""
        revision += f" + adapter {base['adapter']}{at}"
    lines = [
        f"Adapter verified: base {base.get('model')}{revision}, fingerprint {base['fingerprint'][:19]}... matches",
        f"  {len(info['tensors'])} tensors, {info.get('adapter_bytes', 0):,} bytes; "
        f"{info.get('num_classes')} classes" + (f": {', '.join(classes[:10])}" if classes else ""),
    ]
    source = info.get("source") or {}
    if source.get("revision"):
        lines.append(f"  from {source['ref']} at commit {source['revision']} (pin: @{source['revision']})")
    data = info.get("data_config")
    if data:
        lines.append(f"  input size {'x'.join(str(d) for d in data['input_size'][1:])}, {data['interpolation']}")
    for key, value in (info.get("metrics") or {}).items():
        lines.append(f"  {key}: {value:.4g}" if isinstance(value, float) else f"  {key}: {value}")
    return "\n".join(lines)


def predict(model: nn.Module, images: Sequence[str | Path], *, top: int = 3) -> list[str]:
    """``path: class (prob), ...`` for each image, with timm's eval transform for the data config the model was
    trained with (its ``pretrained_cfg``, which :func:`surgery.load` sets)."""
    if not images:
        return []
    from PIL import Image
    from timm.data import create_transform, resolve_data_config

    from surgery.metrics import class_probabilities

    transform = create_transform(**resolve_data_config({}, model=model))
    names = (getattr(model, "adapter_info", None) or {}).get("class_names") or []
    lines = []
    for image in images:
        try:
            with Image.open(image) as img:
                x = transform(img.convert("RGB")).unsqueeze(0)
        except OSError as err:
            raise AdapterError(f"{image}: cannot read the image ({err})") from None
        with torch.no_grad():
            probs = class_probabilities(model(x))[0]
        values, indices = probs.topk(min(top, probs.numel()))
        shown = [
            f"{names[i] if i < len(names) else i} ({v:.3f})"
            for v, i in zip(values.tolist(), indices.tolist(), strict=True)
        ]
        lines.append(f"{image}: {', '.join(shown)}")
    return lines
