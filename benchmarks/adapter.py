"""Adapter size and hub transfer speed.

1. A linear-probe adapter of resnet50 with 10 classes against the full model's safetensors file
   (target: adapter under 100 KB, model about 98 MB).
2. LoRA (recipe ``surgery.lora``: r=8 on every ``blocks.*.attn.qkv``) on vit_base_patch16_224 with 10 classes: the
   run's PEFT adapter size against the full model's safetensors file (target: under 2%), and the peak memory and step
   time of training it against full fine-tuning (recipe ``full-finetune``) of the same model, each in a fresh process,
   side by side (target: less memory).
3. Pushing and pulling a 200 MB file through the project's own hub server (a separate process on 127.0.0.1, driven by
   the real huggingface_hub client) against a plain disk copy of the same file, in MB/s (1 MB = 10^6 bytes).

    HF_HUB_DISABLE_XET=1 python benchmarks/adapter.py [--mb 200] [--rounds 3] [--lora-batch 4] [--lora-steps 3]

Weights are random (pretrained=False, seeded) and saved as the "pretrained" checkpoint: sizes do not depend on values.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_DISABLE_XET", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


def adapter_size(work: Path) -> dict[str, float]:
    import timm
    import torch
    from safetensors.torch import save_file

    import surgery
    from surgery.adapter import fingerprint

    torch.manual_seed(0)
    checkpoint = work / "resnet50.safetensors"
    save_file(timm.create_model("resnet50").state_dict(), str(checkpoint))
    overrides = ["model.name=resnet50", f"model.checkpoint={checkpoint}", "surgery.heads.classifier.num_classes=10"]
    recipe = surgery.load_recipe("linear-probe", overrides)
    model = surgery.build_model(recipe.model)
    base = fingerprint(model)
    the_plan = surgery.apply(model, recipe)
    start = time.perf_counter()
    surgery.save_adapter(model.eval(), the_plan, work / "adapter", base=base)
    save_s = time.perf_counter() - start
    start = time.perf_counter()
    surgery.load(work / "adapter", base=checkpoint)  # a local checkpoint base is given, as `--base` does
    load_s = time.perf_counter() - start
    return {
        "model_bytes": checkpoint.stat().st_size,
        "adapter_bytes": (work / "adapter" / "adapter.safetensors").stat().st_size,
        "json_bytes": (work / "adapter" / "surgery.json").stat().st_size,
        "save_s": save_s,
        "load_s": load_s,
    }


LORA_MODEL = "vit_base_patch16_224"
LORA_SPEC = {"targets": "blocks.*.attn.qkv", "rank": 8, "alpha": 16}
# Both variants go through recipes, as `surgery train` runs them: the plan injects LoRA, its groups feed the optimizer.
LORA_RECIPE = {"surgery": {"lora": LORA_SPEC, "heads": {"classifier": {"num_classes": 10}}}}
FULL_RECIPE = {"extends": "full-finetune", "surgery": {"heads": {"classifier": {"num_classes": 10}}}}


def _vit(num_classes: int = 10):  # noqa: ANN202 - torch is imported lazily
    import timm
    import torch

    torch.manual_seed(0)
    return timm.create_model(LORA_MODEL, pretrained=False, num_classes=num_classes)


def lora_size(work: Path) -> dict[str, float]:
    """Bytes of the LoRA run's adapter (r=8 on qkv + the new head), PEFT's file and ours, against the full model's
    safetensors file."""
    from safetensors.torch import save_file

    import surgery
    from surgery.adapter import fingerprint, save_adapter

    model = _vit()
    full = work / "vit.safetensors"
    save_file(model.state_dict(), str(full))
    base = fingerprint(model)
    recipe = {**LORA_RECIPE, "model": {"name": LORA_MODEL}}
    plan = surgery.apply(model, recipe)
    folder = save_adapter(model, plan, work / "lora", base=base, recipe=recipe)
    return {
        "model_bytes": full.stat().st_size,
        "adapter_bytes": (folder / "adapter_model.safetensors").stat().st_size,
        "surgery_bytes": (folder / "adapter.safetensors").stat().st_size,
        "lora_params": plan.lora_params,
        "head_params": sum(p.numel for p in plan.parameters if p.trainable and not p.lora),
        "model_params": sum(p.numel for p in plan.parameters if not p.lora and ".original_module." not in p.name),
    }


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def lora_train_child(variant: str, batch: int, steps: int) -> dict[str, float]:
    """One variant in this (fresh) process: AdamW steps on random images; peak RSS and seconds per step."""
    import torch

    import surgery

    torch.set_num_threads(min(2, os.cpu_count() or 1))
    model = _vit()
    plan = surgery.apply(model, LORA_RECIPE if variant == "lora" else FULL_RECIPE)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW([{**g, "lr": 1e-4} for g in plan.param_groups(model)])
    x = torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    y = torch.arange(batch) % 10
    model.train()
    before = _rss_mib()
    times = []
    for _ in range(steps + 1):  # the first step allocates gradients and optimizer state; not timed
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=False)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        times.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "trainable": sum(p.numel() for p in params),
        "rss_before_mib": before,
        "peak_mib": peak,
        "growth_mib": peak - before,
        "step_s": statistics.median(times[1:]),
    }


def lora_train(batch: int, steps: int) -> dict[str, dict[str, float]]:
    """Full fine-tuning and LoRA, each in a fresh process, interleaved (full, lora) on the same machine."""
    out = {}
    for variant in ("full", "lora"):
        cmd = [
            sys.executable,
            __file__,
            "--lora-child",
            variant,
            "--lora-batch",
            str(batch),
            "--lora-steps",
            str(steps),
        ]
        done = subprocess.run(cmd, check=True, capture_output=True, text=True)
        out[variant] = json.loads(done.stdout.strip().splitlines()[-1])
    return out


def report_lora(work: Path, batch: int, steps: int) -> None:
    size = lora_size(work)
    share = size["adapter_bytes"] / size["model_bytes"]
    print(f"\n{LORA_MODEL}, LoRA r=8 alpha=16 on blocks.*.attn.qkv + new 10-class head (PEFT format)")
    print(f"  full model.safetensors     {size['model_bytes'] / 1e6:10.2f} MB  ({size['model_params']:,} parameters)")
    print(
        f"  adapter_model.safetensors  {size['adapter_bytes'] / 1e6:10.2f} MB  ({share:.2%} of the model; "
        f"LoRA {size['lora_params']:,} + head {size['head_params']:,} parameters)"
    )
    mb = size["surgery_bytes"] / 1e6
    print(f"  adapter.safetensors        {mb:10.2f} MB  (surgery.load's file: the same, plus PEFT's original head)")
    print(f"  target adapter < 2% of the model: {'met' if share < 0.02 else 'NOT met'}")
    train = lora_train(batch, steps)
    print(f"\n  training, batch {batch} at 224x224, AdamW, median of {steps} steps after the first, fresh process each")
    print(f"  {'variant':16} {'trainable':>12} {'peak RSS MiB':>13} {'growth MiB':>11} {'s/step':>8}")
    for name, row in (("full fine-tune", train["full"]), ("LoRA", train["lora"])):
        print(
            f"  {name:16} {row['trainable']:12,} {row['peak_mib']:13.0f} {row['growth_mib']:11.0f} {row['step_s']:8.2f}"
        )
    ratio = train["lora"]["peak_mib"] / train["full"]["peak_mib"]
    speed = train["full"]["step_s"] / train["lora"]["step_s"]
    print(f"  LoRA peak memory {ratio:.2f}x full fine-tuning, step {speed:.2f}x as fast")
    print(f"  target less memory than full fine-tuning: {'met' if ratio < 1 else 'NOT met'}")


def transfer(work: Path, mb: int, rounds: int) -> dict[str, list[float]]:
    from surgery.hub import client as hub
    from surgery.hub.server import add_token
    from surgery.hub.server.server import spawn

    payload = work / "payload" / "payload.dat"
    payload.parent.mkdir()
    with payload.open("wb") as f:
        for _ in range(mb):
            f.write(os.urandom(1_000_000))
    size = payload.stat().st_size
    root = work / "hub"
    token = add_token(root, "bench", "write")
    proc, url = spawn(root)
    os.environ["HF_ENDPOINT"], os.environ["HF_TOKEN"] = url, token
    results: dict[str, list[float]] = {"push": [], "pull": [], "disk copy": []}
    try:
        for i in range(rounds):
            start = time.perf_counter()
            hub.push_files(payload.parent, f"bench/big-{i}", ["payload.dat"], progress=False)
            results["push"].append(size / 1e6 / (time.perf_counter() - start))

            import huggingface_hub.constants as constants

            constants.HF_HUB_CACHE = str(work / f"cache-{i}")
            start = time.perf_counter()
            folder = hub.download(f"hf-hub:bench/big-{i}", allow_patterns=["payload.dat"])
            results["pull"].append(size / 1e6 / (time.perf_counter() - start))
            assert (folder / "payload.dat").stat().st_size == size

            start = time.perf_counter()
            target = work / f"copy-{i}.dat"
            shutil.copyfile(payload, target)
            with target.open("rb+") as f:
                os.fsync(f.fileno())  # the server fsyncs what it stores; so does the copy
            results["disk copy"].append(size / 1e6 / (time.perf_counter() - start))
            shutil.rmtree(work / f"cache-{i}")
            target.unlink()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=200, help="size of the transferred file in MB (default 200)")
    parser.add_argument("--rounds", type=int, default=3, help="transfer rounds; medians are shown (default 3)")
    parser.add_argument("--skip-transfer", action="store_true", help="only measure the adapter sizes")
    parser.add_argument("--skip-lora", action="store_true", help="leave out the LoRA measurements")
    parser.add_argument("--lora-batch", type=int, default=4, help="batch of the LoRA/full training steps (default 4)")
    parser.add_argument("--lora-steps", type=int, default=3, help="timed training steps per variant (default 3)")
    parser.add_argument("--lora-child", choices=["full", "lora"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.lora_child:
        print(json.dumps(lora_train_child(args.lora_child, args.lora_batch, args.lora_steps)))
        return
    with tempfile.TemporaryDirectory(prefix="surgery-bench-") as tmp:
        work = Path(tmp)
        size = adapter_size(work)
        ratio = size["model_bytes"] / size["adapter_bytes"]
        print("resnet50 linear probe, 10 classes")
        print(
            f"  full model.safetensors   {size['model_bytes'] / 1e6:10.2f} MB ({size['model_bytes'] / 2**20:.1f} MiB)"
        )
        print(f"  adapter.safetensors      {size['adapter_bytes'] / 1e3:10.2f} KB  ({ratio:,.0f}x smaller)")
        print(f"  surgery.json             {size['json_bytes'] / 1e3:10.2f} KB")
        print(f"  save {size['save_s']:.2f} s, load (rebuild base + fingerprint + apply + load) {size['load_s']:.2f} s")
        met = "met" if size["adapter_bytes"] < 100_000 else "NOT met"
        print(f"  target adapter < 100 KB: {met}")
        if not args.skip_lora:
            report_lora(work, args.lora_batch, args.lora_steps)
        if args.skip_transfer:
            return
        results = transfer(work, args.mb, args.rounds)
        print(f"\n{args.mb} MB file through the local hub server, {args.rounds} rounds, medians")
        copy = statistics.median(results["disk copy"])
        for name, speeds in results.items():
            median = statistics.median(speeds)
            print(f"  {name:10} {median:8.1f} MB/s  ({median / copy:.2f}x disk copy)")


if __name__ == "__main__":
    main()
