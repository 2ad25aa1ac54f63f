"""Adapter size and hub transfer speed.

1. A linear-probe adapter of resnet50 with 10 classes against the full model's safetensors file
   (target: adapter under 100 KB, model about 98 MB).
2. Pushing and pulling a 200 MB file through the project's own hub server (a separate process on 127.0.0.1, driven by
   the real huggingface_hub client) against a plain disk copy of the same file, in MB/s (1 MB = 10^6 bytes).

    HF_HUB_DISABLE_XET=1 python benchmarks/adapter.py [--mb 200] [--rounds 3]

Weights are random (pretrained=False, seeded) and saved as the "pretrained" checkpoint: sizes do not depend on values.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
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
    parser.add_argument("--skip-transfer", action="store_true", help="only measure the adapter size")
    args = parser.parse_args()
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
