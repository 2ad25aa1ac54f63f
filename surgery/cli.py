"""The ``surgery`` command: argument parsing and printing only; the work is in the Python API.

Every error of ours (:class:`~surgery.errors.SurgeryError`) becomes one line on stderr and exit status 2.
``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from surgery.errors import RecipeError, SurgeryError

EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    """argparse that raises instead of exiting, so usage errors print one line like every other error."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise RecipeError(f"{self.prog}: {message} (see --help)")


def _add_recipe_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", help="recipe file, or the name of a built-in recipe (surgery recipes lists them)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="override recipe keys, e.g. optim.lr=1e-4")


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface."""
    parser = _Parser(prog="surgery", description="Recipe-driven model surgery for timm backbones.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("plan", help="show what a recipe freezes, trains and at which lr, without any compute")
    _add_recipe_args(p)
    p.add_argument("--model", help="model reference, overriding model.name")
    p.add_argument("--num-classes", type=int, help="number of classes of every new head (adds heads.classifier)")
    p.add_argument("--json", action="store_true", help="print the plan as one JSON object")
    p.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)

    sub.add_parser("hub", help="the self-hosted hub: `surgery hub serve|token|gc --root DIR` (`surgery hub --help`)")

    p = sub.add_parser("schema", help="print the JSON Schema of recipe files")
    p.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)

    p = sub.add_parser("recipes", help="list the built-in recipes, or print one (`surgery recipes NAME`)")
    p.add_argument("name", nargs="?", help="a built-in recipe to print as YAML (copy it to start your own)")
    p.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)

    p = sub.add_parser("train", help="train a recipe (also under `accelerate launch -m surgery train ...`)")
    _add_recipe_args(p)
    p.add_argument("--model", help="model reference, overriding model.name")
    p.add_argument("--num-classes", type=int, help="number of classes of every new head (adds heads.classifier)")
    p.add_argument(
        "--output",
        metavar="DIR",
        help="output folder (default: train.output_dir, else a new output/train/<date>-<time>-<model>-<recipe>)",
    )
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in the output folder")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier run in the output folder")
    p.add_argument("--no-progress", action="store_true", help="no progress bar or per-epoch lines")
    p.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)

    p = sub.add_parser("lr-find", help="sweep the learning rate for a few steps and suggest optim.lr (writes a plot)")
    _add_recipe_args(p)
    p.add_argument("--model", help="model reference, overriding model.name")
    p.add_argument("--num-classes", type=int, help="number of classes of every new head (adds heads.classifier)")
    p.add_argument("--start-lr", type=float, default=1e-7, help="first lr of the sweep (default 1e-7)")
    p.add_argument("--end-lr", type=float, default=10.0, help="last lr of the sweep (default 10)")
    p.add_argument("--steps", type=int, default=100, help="training steps of the sweep (default 100)")
    p.add_argument(
        "--out", metavar="PNG", help="the loss-vs-lr plot (default: a new output/lr-find/<date>-.../lr_find.png)"
    )
    p.add_argument("--json", action="store_true", help="print the sweep and the suggestion as one JSON object")
    p.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)

    p = sub.add_parser("push", help="upload an adapter (or merged model) folder to a hub repo as one commit")
    p.add_argument("folder", help="output folder of `surgery train` or `surgery merge`")
    p.add_argument("repo", metavar="ORG/NAME", help="hub repo, created if missing (hub: HF_ENDPOINT, token: HF_TOKEN)")
    p.add_argument("--private", action="store_true", help="create the repo as private")
    p.add_argument("--revision", metavar="BRANCH", help="branch to push to, created from main if missing")
    p.add_argument("--message", help="commit message")
    p.add_argument("--include-checkpoints", action="store_true", help="also push checkpoints/ (safetensors only)")
    p.add_argument("--all", action="store_true", help="push every file of the folder (never pickle or hidden files)")
    p.add_argument("--no-progress", action="store_true", help="no upload progress bars")
    p.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)

    p = sub.add_parser("merge", help="merge an adapter into its base as a plain timm folder (config.json + weights)")
    p.add_argument("adapter", help="adapter folder or hf-hub:ORG/NAME[@REVISION]")
    p.add_argument("out", help="output folder, loadable with timm.create_model('local-dir:OUT', pretrained=True)")
    p.add_argument("--base", metavar="REF", help="the base, as for `surgery load --base`")
    p.add_argument("--fingerprint", metavar="SHA256", help="the base fingerprint you trust, as for `surgery load`")
    p.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)

    p = sub.add_parser("load", help="load and verify an adapter; optionally classify images with it")
    p.add_argument("adapter", help="adapter folder or hf-hub:ORG/NAME[@REVISION] (pin a commit sha for integrity)")
    p.add_argument(
        "--base",
        metavar="REF",
        help="the base to load onto: a timm name, hf-hub:ORG/NAME[@REV] or a .safetensors checkpoint of the recorded "
        "architecture; its fingerprint must match the adapter's",
    )
    p.add_argument("--fingerprint", metavar="SHA256", help="the base fingerprint you trust (sha256:...), checked too")
    p.add_argument("--predict", nargs="+", metavar="IMAGE", help="print the top classes of these images")
    p.add_argument("--top", type=int, default=3, help="classes shown per image with --predict (default 3)")
    p.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)

    p = sub.add_parser("predict", help="classify images with one or several adapters; LoRA adapters share one base")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files to classify")
    p.add_argument(
        "--adapter",
        action="append",
        required=True,
        metavar="[NAME=]REF",
        help="adapter folder or hf-hub:ORG/NAME[@REV], repeatable; all on one base (named by the last path part)",
    )
    p.add_argument("--base", metavar="REF", help="the base, as for `surgery load --base`")
    p.add_argument("--fingerprint", metavar="SHA256", help="the base fingerprint you trust, as for `surgery load`")
    p.add_argument("--top", type=int, default=3, help="classes shown per image and adapter (default 3)")
    p.add_argument(
        "--json", action="store_true", help="print a JSON list of {image, adapter, top: [{class, index, prob}]}"
    )
    p.add_argument("--batch-size", type=int, default=32, help="images per forward pass (default 32)")
    p.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)

    p = sub.add_parser("eval", help="score a trained model on labelled images: top-1/5, per class, confusion matrix")
    p.add_argument(
        "source",
        metavar="RUN_OR_ADAPTER_OR_REF",
        help="run folder of `surgery train`, adapter folder or hf-hub:ORG/NAME[@REV]",
    )
    p.add_argument(
        "--data",
        metavar="DIR_OR_CSV",
        help="a data root holding val/ or test/ class folders, class folders themselves, or a labels CSV "
        "(default: the split the run's recipe names)",
    )
    p.add_argument("--split", choices=("val", "test"), default="val", help="which split of a data root (default val)")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    p.add_argument(
        "--out",
        metavar="DIR",
        help="folder for confusion_matrix.png, predictions.csv and eval.json (default: a new output/eval/<date>-...)",
    )
    p.add_argument("--batch-size", type=int, default=32, help="images per forward pass (default 32)")
    p.add_argument("--base", metavar="REF", help="adapters: the base, as for `surgery load --base`")
    p.add_argument("--fingerprint", metavar="SHA256", help="adapters: the base fingerprint you trust")
    p.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)

    p = sub.add_parser("convert", help="import foreign weights (pickle or safetensors) into a timm model's layout")
    p.add_argument("src", help="state dict to convert: .safetensors, or a pickle read with torch.load(weights_only)")
    p.add_argument("--model", required=True, metavar="TIMM_NAME", help="timm model whose layout the weights take")
    p.add_argument("--out", required=True, metavar="FILE", help="output .safetensors file")
    p.add_argument(
        "--map",
        default="order",
        metavar="order|names|FILE",
        help="pair tensors by order (every shape must agree), by names, or by names after a rename table file",
    )
    p.add_argument("--kwarg", action="append", default=[], metavar="KEY=VALUE", help="architecture argument")
    p.add_argument(
        "--expect",
        action="append",
        default=[],
        metavar="IMAGE=CLASS",
        help="known answer: the converted model's top-1 class of IMAGE must be CLASS (repeatable)",
    )
    p.add_argument("--push", metavar="ORG/NAME", help="publish in timm's format to this hub repo (HF_ENDPOINT)")
    p.add_argument("--private", action="store_true", help="create the --push repo as private")
    p.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)
    return parser


def _split_overrides(items: Sequence[str]) -> list[str]:
    for item in items:
        if "=" not in item:
            raise RecipeError(f"argument {item!r}: expected key=value after the recipe (e.g. optim.lr=1e-4)")
    return list(items)


def load_cli_recipe(recipe: str, overrides: Sequence[str], *, model: str | None = None, num_classes: int | None = None):
    """Load a recipe with the command line's overrides, ``--model`` and ``--num-classes`` folded in (loaded once)."""
    from surgery.recipe import load_recipe, with_head_classes

    extra = _split_overrides(overrides)
    if model:
        extra.append(f"model.name={model}")
    loaded = load_recipe(recipe, extra)
    if num_classes is not None:
        loaded = with_head_classes(loaded, num_classes, source="--num-classes")
    return loaded


def cmd_plan(args: argparse.Namespace) -> int:
    from surgery.render import plan_recipe

    recipe = load_cli_recipe(args.recipe, args.overrides, model=args.model, num_classes=args.num_classes)
    described = plan_recipe(recipe)
    print(json.dumps(described.to_dict(), indent=2) if args.json else described.table())
    return 0


def cmd_schema(args: argparse.Namespace) -> int:
    from surgery.recipe import json_schema

    print(json.dumps(json_schema(), indent=2))
    return 0


def cmd_recipes(args: argparse.Namespace) -> int:
    from surgery.recipe import builtin_recipes, recipe_description

    recipes = builtin_recipes()
    if args.name:
        name = args.name.removesuffix(".yaml")
        if name not in recipes:
            raise RecipeError(
                f"surgery recipes: no built-in recipe {name!r}; built-in recipes are {', '.join(sorted(recipes))}"
            )
        print(recipes[name].read_text(encoding="utf-8"), end="")
        return 0
    for name, path in sorted(recipes.items()):
        print(f"{name:16} {recipe_description(path)}")
    return 0


def cmd_push(args: argparse.Namespace) -> int:
    from surgery.adapter import push

    result = push(
        args.folder,
        args.repo,
        private=args.private,
        revision=args.revision,
        message=args.message,
        include_checkpoints=args.include_checkpoints,
        everything=args.all,
        progress=not args.no_progress,
    )
    print(f"Pushed {result.files} file(s), {result.bytes:,} bytes, to {result.repo_id} ({result.revision}):")
    for path in result.paths:
        print(f"  {path}")
    for path, why in result.left_out:
        print(f"  not pushed: {path} ({why})")
    print(f"Load it pinned: {result.ref}")
    print(result.url)
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    from surgery.adapter import merge

    out = merge(args.adapter, args.out, base=args.base, fingerprint=args.fingerprint)
    print(f"Merged {args.adapter} into {out} (timm: create_model('local-dir:{out}', pretrained=True))")
    return 0


def cmd_load(args: argparse.Namespace) -> int:
    from surgery.adapter import describe, load, predict

    model = load(args.adapter, base=args.base, fingerprint=args.fingerprint)
    print(describe(model.adapter_info))
    for line in predict(model, args.predict or [], top=args.top):
        print(line)
    return 0


def _adapter_refs(items: Sequence[str]) -> dict[str, str] | list[str]:
    """``--adapter [NAME=]REF`` values: a mapping when any is named, else the references."""
    if not any("=" in item and not Path(item).exists() for item in items):
        return list(items)
    named: dict[str, str] = {}
    for item in items:
        name, sep, ref = item.partition("=")
        if not sep or Path(item).exists():
            name, ref = item.rstrip("/").split("/")[-1].split("@")[0], item
        if not name or not ref:
            raise RecipeError(f"--adapter {item}: expected NAME=REF with both parts, e.g. pets=runs/pets")
        if name in named:
            raise RecipeError(f"--adapter {item}: the name {name!r} is taken; name each adapter once (NAME=REF)")
        named[name] = ref
    return named


def cmd_predict(args: argparse.Namespace) -> int:
    from surgery.predict import predict, table

    found = predict(
        args.images,
        _adapter_refs(args.adapter),
        base=args.base,
        fingerprint=args.fingerprint,
        top=args.top,
        batch_size=args.batch_size,
    )
    print(json.dumps([p.to_dict() for p in found], indent=2) if args.json else table(found))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from surgery.train import Interrupted, default_output_dir, train

    recipe = load_cli_recipe(args.recipe, args.overrides, model=args.model, num_classes=args.num_classes)
    output = args.output or recipe.train.output_dir
    if output is None:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # each process would pick its own timestamp
            raise RecipeError("surgery train: several processes need one output folder: pass --output DIR")
        if args.resume:
            raise RecipeError("surgery train --resume: name the folder of the run to continue with --output DIR")
        output = default_output_dir(recipe)
    try:
        result = train(
            recipe, output_dir=output, resume=args.resume, overwrite=args.overwrite, progress=not args.no_progress
        )
    except Interrupted as stop:
        if stop.is_main_process:
            print(f"surgery: {stop.hint}", file=sys.stderr)
        raise
    finally:
        _end_process_group()
    if result.is_main_process:
        m = result.metrics
        keys = ("val_loss", "val_top1", "val_top5", "val_macro_f1", "train_loss", "test_top1", "test_macro_f1")
        line = " ".join(f"{k}={m[k]:.4f}" for k in keys if k in m)
        if line and m.get("selected_epoch"):  # which epoch the numbers (and the adapter) come from
            stopped = ", stopped early" if m.get("stopped_early") else ""
            line += f" ({m['selected']} epoch {m['selected_epoch']}{stopped})"
        print(line or "no epochs trained")
        if result.skipped_images:
            from surgery.train.run_folder import SKIPPED

            print(
                f"skipped {len(result.skipped_images)} undecodable image(s) (data.skip_bad_images), e.g. "
                f"{result.skipped_images[0]}; all listed in {Path(result.output_dir or '.') / SKIPPED}"
            )
        if result.pushed_url:
            print(f"pushed: {result.pushed_url}")
        print(f"outputs: {result.output_dir}")
    return 0


def _end_process_group() -> None:
    """The command is over: leave the process group of `accelerate launch` (train() keeps it for scripts)."""
    import torch.distributed

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def cmd_eval(args: argparse.Namespace) -> int:
    from surgery.evaluation import CONFUSION_PNG, METRICS_JSON, PREDICTIONS_CSV, evaluate
    from surgery.train.run_folder import default_output_dir

    if args.batch_size < 1:
        raise RecipeError(f"surgery eval: --batch-size must be at least 1, got {args.batch_size}")
    out = (
        Path(args.out)
        if args.out
        else default_output_dir(Path(args.source).name, args.split, root=Path("output") / "eval")
    )
    result = evaluate(
        args.source,
        args.data,
        split=args.split,
        out=out,
        batch_size=args.batch_size,
        base=args.base,
        fingerprint=args.fingerprint,
    )
    if args.json:
        print(json.dumps({**result.to_dict(), "out": str(out)}, indent=2))
        return 0
    print(f"{result.num_samples} images, {result.num_classes} classes")
    top5 = f"  top-5 {result.top5:.4f}" if result.top5 is not None else ""
    print(
        f"top-1 {result.top1:.4f}{top5}  macro-F1 {result.macro_f1:.4f}  balanced accuracy "
        f"{result.balanced_accuracy:.4f}  loss {result.loss:.4f}"
    )
    width = max(5, *(len(n) for n in result.class_names))
    print(f"{'class':{width}}  precision  recall      f1  support")
    for row in result.per_class():
        print(
            f"{row['class']:{width}}  {row['precision']:9.4f}  {row['recall']:6.4f}  {row['f1']:.4f}  "
            f"{row['support']:7d}"
        )
    print(f"outputs: {out} ({CONFUSION_PNG}, {PREDICTIONS_CSV}, {METRICS_JSON})")
    return 0


def cmd_lr_find(args: argparse.Namespace) -> int:
    from surgery.train.lr_find import lr_find
    from surgery.train.run_folder import default_output_dir

    recipe = load_cli_recipe(args.recipe, args.overrides, model=args.model, num_classes=args.num_classes)
    if args.out:
        plot = Path(args.out)
    else:
        stem = Path(recipe.source).stem if not recipe.source.startswith("<") else None
        model = recipe.model.label if recipe.model else None
        plot = default_output_dir(model, stem, root=Path("output") / "lr-find") / "lr_find.png"
    result = lr_find(recipe, start_lr=args.start_lr, end_lr=args.end_lr, steps=args.steps, plot=plot)
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
        return 0
    end = " (stopped: the loss diverged)" if result.diverged else ""
    print(f"swept {result.key} from {result.lrs[0]:.2e} to {result.lrs[-1]:.2e} in {len(result.lrs)} steps{end}")
    if len(set(result.ratios)) > 1:
        print("param groups keep their lr ratios: " + ", ".join(f"{r:g}" for r in result.ratios))
    if result.suggestion is None:
        print("no suggestion: too few steps before the loss diverged; lower --end-lr or raise --steps")
    else:
        print(
            f"suggested lr: {result.suggestion:.2e} (steepest descent of the smoothed loss); "
            f"train with {result.key}={result.suggestion:.2e}"
        )
    print(f"plot: {result.plot}")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    import yaml

    from surgery.convert import convert

    expect = []
    for item in args.expect:
        image, sep, cls = item.rpartition("=")
        if not sep or not image or not cls.strip().isdigit():
            raise RecipeError(f"--expect {item}: expected IMAGE=CLASS with CLASS a class index, e.g. flower.jpg=985")
        expect.append((image, int(cls)))
    kwargs = {}
    for item in args.kwarg:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise RecipeError(f"--kwarg {item}: expected KEY=VALUE, e.g. drop_rate=0.1")
        kwargs[key] = yaml.safe_load(value)
    result = convert(
        args.src,
        args.model,
        args.out,
        mapping=args.map,
        kwargs=kwargs,
        expect=expect,
        push=args.push,
        private=args.private,
    )
    print(f"Converted {len(result.pairs)} tensors of {args.src} into {args.model}: {result.out}")
    for image, cls, p in result.checks:
        print(f"  {image}: top-1 class {cls} (p={p:.2f}) as expected")
    if result.pushed:
        print(f"Published: {result.pushed} (timm.create_model('hf-hub:{args.push}', pretrained=True))")
    return 0


COMMANDS = {"plan": cmd_plan, "schema": cmd_schema, "recipes": cmd_recipes}
COMMANDS["train"] = cmd_train
COMMANDS.update({"push": cmd_push, "merge": cmd_merge, "load": cmd_load})
COMMANDS["convert"] = cmd_convert
COMMANDS["eval"] = cmd_eval
COMMANDS["predict"] = cmd_predict
COMMANDS["lr-find"] = cmd_lr_find


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    if argv[:1] == ["hub"]:  # `surgery hub serve|token ...` is the hub server's own small CLI
        from surgery.hub.server.cli import main as hub_main

        return hub_main(argv[1:], prog="surgery hub")
    try:
        args, extra = build_parser().parse_known_args(argv)
        # key=value overrides may follow options (`plan r.yaml --json optim.lr=1e-4`); argparse leaves them over.
        unknown = [a for a in extra if a.startswith("-") or "=" not in a or not hasattr(args, "overrides")]
        if unknown:
            raise RecipeError(f"surgery {args.command}: unrecognized arguments: {' '.join(unknown)} (see --help)")
        if extra:
            args.overrides = [*args.overrides, *extra]
        return COMMANDS[args.command](args)
    except SurgeryError as err:
        if debug:
            raise
        print(f"surgery: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except BrokenPipeError:  # `surgery plan ... | head`: the reader left; not an error of ours
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - silence the interpreter's flush at exit
        return 0
    except KeyboardInterrupt:
        print("surgery: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - never a traceback for the user; --debug shows it
        if debug:
            raise
        print(f"surgery: internal error: {type(err).__name__}: {err} (rerun with --debug for details)", file=sys.stderr)
        return 1
