"""`surgery plan` on a 1B-parameter model against a bare `import timm` and an eager `timm.create_model`.

Each command runs in a fresh process; wall time and peak RSS come from the OS (wait4). The three are interleaved
round by round so machine noise hits them alike, and the medians are compared.

    python benchmarks/plan.py [--model vit_giant_patch14_224] [--rounds 5]

Targets: plan <= 1.5x the bare import's wall time and <= 1.2x its peak memory.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time


def measure(argv: list[str]) -> tuple[float, float]:
    """(wall seconds, peak RSS MiB) of one fresh process."""
    start = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"benchmark command failed: {' '.join(argv)}: {proc.stderr.read().decode()[-500:]}")
    return wall, usage.ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vit_giant_patch14_224")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    py = sys.executable
    commands = {
        "import timm": [py, "-c", "import timm"],
        "surgery plan": [py, "-m", "surgery", "plan", "llrd", "--model", args.model],
        "timm.create_model": [py, "-c", f"import timm; timm.create_model({args.model!r}, pretrained=False)"],
    }
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in commands}
    for argv in commands.values():  # warm the file cache once
        measure(argv)
    for _ in range(args.rounds):
        for name, argv in commands.items():
            results[name].append(measure(argv))
    wall = {k: statistics.median(w for w, _ in v) for k, v in results.items()}
    rss = {k: statistics.median(m for _, m in v) for k, v in results.items()}
    print(f"model: {args.model}, {args.rounds} rounds, medians")
    print(f"{'command':20} {'wall s':>8} {'peak MiB':>10} {'wall/import':>12} {'mem/import':>11}")
    for name in commands:
        print(
            f"{name:20} {wall[name]:8.2f} {rss[name]:10.0f} {wall[name] / wall['import timm']:12.2f}"
            f" {rss[name] / rss['import timm']:11.2f}"
        )
    ok_wall = wall["surgery plan"] <= 1.5 * wall["import timm"]
    ok_mem = rss["surgery plan"] <= 1.2 * rss["import timm"]
    print(
        f"target plan <= 1.5x import wall: {'met' if ok_wall else 'MISSED'}; <= 1.2x import memory: "
        f"{'met' if ok_mem else 'MISSED'}"
    )


if __name__ == "__main__":
    main()
