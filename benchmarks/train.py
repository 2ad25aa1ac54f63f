"""`surgery train` against a hand-written PyTorch loop; the linear-probe feature cache; memory of a frozen prefix.

Four measurements, each side by side in one run. The machine is shared and noisy, so variants are interleaved round
by round and each is scored by its best round (as ``timeit`` does: the least disturbed run), medians shown too:

1. images/s of surgery train's step against a plain PyTorch loop on the same model, image folder, transforms,
   batch size and optimizer (full fine-tuning, epochs after the first). Target: ratio >= 0.97.
2. a linear probe's epoch time with the feature cache and without it (epochs after the first). Target: >= 20x.
3. peak memory of training with the first three quarters of a resnet frozen against full fine-tuning, each in a fresh
   process (growth of the resident set over one epoch, sampled every 0.5 ms from /proc), plus the bytes autograd
   saves for backward, with and without running the frozen prefix under an explicit ``torch.no_grad()``.
   Target: <= 0.5x.
4. the real case (``--real``, or ``--only-real`` for it alone): ``tf_efficientnet_lite0`` at 192 px from a folder of
   300 px PNG files, surgery train against the fastest hand-written loop (channels_last model and batches, the same
   datasets and DataLoader, batch 32, fp32, AdamW), interleaved round by round. Target: ratio >= 0.95. Then the
   feature cache of a linear probe on this backbone over the demo's data (all ten digits, 20 per class, 64 px, with
   30 per class held out): its build time and per-epoch time.

    python benchmarks/train.py [--model resnet18] [--size 64] [--images 192] [--batch 32] [--rounds 3] [--real]
    python benchmarks/train.py --only-real [--real-images 160] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import timm
import torch
import torch.nn.functional as F

from surgery.data import build_image_datasets
from surgery.train import train
from tools.toydata import write_synthetic_folders


def _recipe(args: argparse.Namespace, root: Path, **train_keys: object) -> dict:
    return {
        "model": {"name": args.model},
        "surgery": {"heads": {"classifier": {"num_classes": args.classes}}},
        "optim": {"name": "adamw", "lr": 1e-3, "weight_decay": 0.05},
        "data": {"root": str(root), "img_size": args.size, "augment": "light"},
        "train": {"epochs": args.epochs, "batch_size": args.batch, "seed": 0, "eval_every_epochs": 1000, **train_keys},
    }


def surgery_images_per_s(args: argparse.Namespace, root: Path) -> float:
    """images/s of surgery train's epochs after the first (evaluation excluded: it runs once, after the last)."""
    result = train(_recipe(args, root), progress=False)
    return statistics.mean(h["images_per_s"] for h in result.history[1:])


def plain_images_per_s(args: argparse.Namespace, root: Path) -> float:
    """The same training as a hand-written loop: timm model, timm datasets/transforms, DataLoader, AdamW."""
    torch.manual_seed(0)
    model = timm.create_model(args.model, num_classes=args.classes)
    train_ds, _, _ = build_image_datasets(root, model, img_size=args.size, augment="light")
    loader = torch.utils.data.DataLoader(train_ds, batch_size=args.batch, shuffle=True)
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.05}, {"params": no_decay, "weight_decay": 0.0}])
    model.train()
    rates = []
    for epoch in range(args.epochs):
        seen, start = 0, time.perf_counter()
        for x, y in loader:
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            seen += len(y)
        if epoch:
            rates.append(seen / (time.perf_counter() - start))
    return statistics.mean(rates)


def probe_epoch_seconds(args: argparse.Namespace, root: Path, cache: str) -> tuple[float, float, float | None]:
    """(first epoch s, mean later epoch s, cache build s) of a linear probe."""
    recipe = _recipe(args, root, feature_cache=cache)
    recipe["surgery"]["rules"] = [{"freeze": "*"}]
    recipe["data"]["augment"] = "none"
    result = train(recipe, progress=False)
    assert result.metrics["feature_cache"] == (cache == "auto"), result.metrics["feature_cache_reason"]
    epochs = [h["epoch_seconds"] for h in result.history]
    return epochs[0], statistics.mean(epochs[1:]), result.metrics["feature_cache_seconds"]


_MEMORY_CHILD = r"""
import ctypes, json, os, sys, threading, time, torch, timm
from torch.utils.data import TensorDataset
from surgery.train import train

def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

model_name, size, batch, frozen = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "1"
torch.manual_seed(0)
model = timm.create_model(model_name, num_classes=10)
data = TensorDataset(torch.randn(batch * 3, 3, size, size), torch.randint(0, 10, (batch * 3,)))
rules = [{"freeze": {"to": "75%"}}] if frozen else []
recipe = {"surgery": {"rules": rules, "heads": {"classifier": {"num_classes": 10}}},
          "train": {"epochs": 1, "batch_size": batch, "feature_cache": "off"}}
ctypes.CDLL("libc.so.6").malloc_trim(0)  # give freed memory back, so the baseline is what is really in use
base = peak = rss()
done = False

def sample():
    global peak
    while not done:
        peak = max(peak, rss())
        time.sleep(0.0005)

thread = threading.Thread(target=sample, daemon=True)
thread.start()
result = train(recipe, model=model, train_data=data, progress=False)
done = True
thread.join()
print(json.dumps({"peak_growth_mib": (peak - base) / 2**20, "trainable": result.plan.trainable_params}))
"""


def peak_growth_mib(args: argparse.Namespace, frozen: bool) -> tuple[float, int]:
    """Peak RSS growth (MiB, sampled every 0.5 ms) over one training epoch in a fresh process; trainable count."""
    argv = [sys.executable, "-c", _MEMORY_CHILD, args.model, str(args.mem_size), str(args.mem_batch), str(int(frozen))]
    out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
    data = json.loads(out)
    return data["peak_growth_mib"], data["trainable"]


def saved_activation_mib(args: argparse.Namespace, mode: str) -> float:
    """MiB of tensors autograd saves for backward in one forward (full / frozen / frozen with explicit no_grad)."""
    import surgery

    torch.manual_seed(0)
    model = timm.create_model(args.model, num_classes=10)
    rules = [] if mode == "full" else [{"freeze": {"to": "75%"}}]
    surgery.apply(model, {"surgery": {"rules": rules}})
    model.train()
    x = torch.randn(args.mem_batch, 3, args.mem_size, args.mem_size)
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        if mode == "frozen_no_grad":  # resnet: stem and layer1-3 are the frozen prefix
            with torch.no_grad():
                h = model.maxpool(model.act1(model.bn1(model.conv1(x))))
                h = model.layer3(model.layer2(model.layer1(h)))
            out = model.forward_head(model.layer4(h))
        else:
            out = model(x)
    out.sum().backward()
    param_ptrs = {p.untyped_storage().data_ptr() for p in model.parameters()}
    return sum(n for ptr, n in storages.items() if ptr not in param_ptrs) / 2**20


REAL_MODEL = "tf_efficientnet_lite0"


def _train_keys() -> set[str]:
    """The ``train:`` keys this checkout's schema knows (``channels_last`` arrives with contract C-train-keys)."""
    from surgery.schema import Recipe

    return set(Recipe.model_fields["train"].annotation.model_fields)


def _real_recipe(args: argparse.Namespace, root: Path) -> dict:
    train_keys = {"epochs": args.epochs, "batch_size": args.batch, "seed": 0, "eval_every_epochs": 1000}
    if "channels_last" in _train_keys():
        train_keys["channels_last"] = "auto"
    return {
        "model": {"name": REAL_MODEL},
        "surgery": {"heads": {"classifier": {"num_classes": args.classes}}},
        "optim": {"name": "adamw", "lr": 1e-3, "weight_decay": 0.05},
        "data": {"root": str(root), "img_size": args.real_size, "augment": "none", "num_workers": args.real_workers},
        "train": train_keys,
    }


def real_surgery_images_per_s(args: argparse.Namespace, root: Path) -> float:
    """images/s of ``surgery train`` on the real case, epochs after the first."""
    result = train(_real_recipe(args, root), progress=False)
    return statistics.mean(h["images_per_s"] for h in result.history[1:])


def real_plain_images_per_s(args: argparse.Namespace, root: Path) -> float:
    """The fastest hand-written loop we know for this case on CPU: channels_last model and batches, fp32.

    Same datasets (timm's transforms through surgery.data), same DataLoader settings, batch size, optimizer.
    """
    torch.manual_seed(0)
    model = timm.create_model(REAL_MODEL, num_classes=args.classes).to(memory_format=torch.channels_last)
    train_ds, _, _ = build_image_datasets(root, model, img_size=args.real_size, augment="none")
    loader = torch.utils.data.DataLoader(
        train_ds, batch_size=args.batch, shuffle=True, num_workers=args.real_workers, drop_last=True
    )
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.05}, {"params": no_decay, "weight_decay": 0.0}])
    model.train()
    rates = []
    for epoch in range(args.epochs):
        seen, start = 0, time.perf_counter()
        for x, y in loader:
            loss = F.cross_entropy(model(x.contiguous(memory_format=torch.channels_last)), y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            seen += len(y)
        if epoch:
            rates.append(seen / (time.perf_counter() - start))
    return statistics.mean(rates)


def real_feature_cache(tmp: Path) -> dict[str, float]:
    """A linear probe of the lite0 backbone over the demo's 20-shot data: cache build s, first and later epoch s."""
    from tools.toydata import write_digits_folders

    root = write_digits_folders(tmp / "digits", shots_per_class=20, val_per_class=30, size=64, seed=0)
    recipe = {
        "model": {"name": REAL_MODEL},
        "surgery": {"rules": [{"freeze": "*"}], "heads": {"classifier": {"num_classes": 10}}},
        "optim": {"name": "adamw", "lr": 1e-2, "weight_decay": 0.0},
        "data": {"root": str(root), "img_size": 64, "augment": "none"},
        "train": {"epochs": 20, "batch_size": 32, "seed": 0, "eval_every_epochs": 1000, "feature_cache": "auto"},
    }
    result = train(recipe, progress=False)
    assert result.metrics["feature_cache"], result.metrics["feature_cache_reason"]
    epochs = [h["epoch_seconds"] for h in result.history]
    return {"build": result.metrics["feature_cache_seconds"], "first": epochs[0], "later": statistics.mean(epochs[1:])}


def real_case(args: argparse.Namespace) -> None:
    """Measurement 4: the real backbone from PNG files, surgery train against the hand-written loop."""
    keys = _train_keys()
    layout = "train.channels_last: auto" if "channels_last" in keys else "no train.channels_last key in this checkout"
    with tempfile.TemporaryDirectory() as tmp:
        root = write_synthetic_folders(
            Path(tmp) / "png",
            classes=args.classes,
            per_class=args.real_images // args.classes,
            size=300,
            val_per_class=2,
        )
        print(
            f"\n4. real case: {REAL_MODEL} at {args.real_size}x{args.real_size} from {args.real_images} 300 px PNG "
            f"files, batch {args.batch}, fp32, {args.epochs} epochs (epochs 2+ timed), {args.rounds} rounds, "
            f"data.num_workers {args.real_workers}; surgery train with {layout}"
        )
        rates: dict[str, list[float]] = {"surgery": [], "plain": []}
        real_plain_images_per_s(args, root)  # warm up kernels and the file cache once
        for _ in range(args.rounds):
            rates["surgery"].append(real_surgery_images_per_s(args, root))
            rates["plain"].append(real_plain_images_per_s(args, root))
        best = {k: max(v) for k, v in rates.items()}
        med = {k: statistics.median(v) for k, v in rates.items()}
        ratio = best["surgery"] / best["plain"]
        for name, label in (("plain", "hand-written, channels_last"), ("surgery", "surgery train")):
            rounds = ", ".join(f"{r:.1f}" for r in rates[name])
            print(f"   {label:28} {best[name]:6.1f} images/s  median {med[name]:6.1f}  (rounds: {rounds})")
        print(
            f"   ratio {ratio:.3f} (medians {med['surgery'] / med['plain']:.3f})  "
            f"(target >= 0.95: {'met' if ratio >= 0.95 else 'NOT met'})"
        )
        cache = real_feature_cache(Path(tmp))
        print(
            f"   feature cache, linear probe over the demo's data (10 digits x 20 train + 30 val, 64 px): build "
            f"{cache['build']:.2f} s, first epoch {cache['first']:.3f} s, later epochs {cache['later']:.4f} s"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--size", type=int, default=64, help="image size for throughput and probe")
    parser.add_argument("--images", type=int, default=192, help="training images (split over the classes)")
    parser.add_argument("--classes", type=int, default=4)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--mem-size", type=int, default=160, help="image size for the memory measurement")
    parser.add_argument("--mem-batch", type=int, default=32)
    parser.add_argument("--real", action="store_true", help=f"also measure the real case ({REAL_MODEL})")
    parser.add_argument("--only-real", action="store_true", help="measure the real case only")
    parser.add_argument("--real-images", type=int, default=160, help="training PNGs of the real case")
    parser.add_argument("--real-size", type=int, default=192, help="image size of the real case")
    parser.add_argument("--real-workers", type=int, default=0, help="DataLoader workers of the real case (both loops)")
    args = parser.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    if args.only_real:
        real_case(args)
        return
    with tempfile.TemporaryDirectory() as tmp:
        root = write_synthetic_folders(
            Path(tmp) / "data",
            classes=args.classes,
            per_class=args.images // args.classes,
            size=args.size * 2,
            val_per_class=2,
        )
        print(
            f"model {args.model}, {args.images} images {args.size}x{args.size}, batch {args.batch}, "
            f"{args.epochs} epochs, {args.rounds} rounds, torch threads {torch.get_num_threads()}"
        )

        rates: dict[str, list[float]] = {"surgery": [], "plain": []}
        plain_images_per_s(args, root)  # warm up kernels and the file cache once
        for _ in range(args.rounds):
            rates["surgery"].append(surgery_images_per_s(args, root))
            rates["plain"].append(plain_images_per_s(args, root))
        best = {k: max(v) for k, v in rates.items()}
        med = {k: statistics.median(v) for k, v in rates.items()}
        ratio = best["surgery"] / best["plain"]
        print("\n1. training step throughput (full fine-tuning, epochs 2+; best round, median, all rounds)")
        for name, label in (("plain", "hand-written PyTorch loop"), ("surgery", "surgery train")):
            rounds = ", ".join(f"{r:.1f}" for r in rates[name])
            print(f"   {label:26} {best[name]:7.1f} images/s  median {med[name]:7.1f}  (rounds: {rounds})")
        print(
            f"   ratio {ratio:.3f} (medians {med['surgery'] / med['plain']:.3f})  "
            f"(target >= 0.97: {'met' if ratio >= 0.97 else 'NOT met'})"
        )

        probe = {"auto": [], "off": []}
        for _ in range(args.rounds):
            for cache in probe:
                probe[cache].append(probe_epoch_seconds(args, root, cache))
        later = {k: min(v[1] for v in runs) for k, runs in probe.items()}
        first = {k: min(v[0] for v in runs) for k, runs in probe.items()}
        build = min(v[2] for v in probe["auto"])
        speedup = later["off"] / later["auto"]
        print("\n2. linear probe epoch time (frozen backbone, new head, augment none; best round)")
        print(f"   without cache  first epoch {first['off']:.3f} s, later epochs {later['off']:.4f} s")
        print(
            f"   with cache     first epoch {first['auto']:.3f} s + cache build {build:.3f} s, "
            f"later epochs {later['auto']:.4f} s"
        )
        verdict = "met" if speedup >= 20 else "NOT met"
        print(f"   speedup from the second epoch {speedup:.0f}x  (target >= 20x: {verdict})")

    mem = {"full": [], "frozen": []}
    trainable = {}
    for _ in range(args.rounds):
        for kind in mem:
            growth, trainable[kind] = peak_growth_mib(args, kind == "frozen")
            mem[kind].append(growth)
    peak = {k: statistics.median(v) for k, v in mem.items()}  # memory is not disturbed by load: medians
    saved = {mode: saved_activation_mib(args, mode) for mode in ("full", "frozen", "frozen_no_grad")}
    mratio = peak["frozen"] / peak["full"]
    print(f"\n3. memory, {args.model} at {args.mem_size}x{args.mem_size}, batch {args.mem_batch}, one epoch of 3 steps")
    print(
        f"   full fine-tuning        peak RSS growth {peak['full']:7.1f} MiB, saved for backward "
        f"{saved['full']:7.1f} MiB, {trainable['full']:,} trainable"
    )
    print(
        f"   first 75% frozen        peak RSS growth {peak['frozen']:7.1f} MiB, saved for backward "
        f"{saved['frozen']:7.1f} MiB, {trainable['frozen']:,} trainable"
    )
    print(
        f"   ... prefix in no_grad                                   saved for backward "
        f"{saved['frozen_no_grad']:7.1f} MiB (autograd already stores nothing for the frozen prefix)"
    )
    print(f"   ratio {mratio:.2f}  (target <= 0.5: {'met' if mratio <= 0.5 else 'NOT met'})")
    if args.real:
        real_case(args)


if __name__ == "__main__":
    main()
