"""`stagesweep train RECIPE [--accelerate-config NAME|PATH] [--dry-run] [KEY=VALUE ...]`.

Also runnable as `python -m stagesweep.train.cli ...`, which is what the accelerate relaunch
executes in each worker process.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from pathlib import Path


def _add_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--accelerate-config", metavar="NAME|PATH",
        help="run under `accelerate launch` with accelerate_configs/NAME.yaml (ddp, fsdp2, "
        "deepspeed_zero2, deepspeed_zero3, deepspeed_zero3_offload, cpu) or a config file; "
        "the process count comes from the config",
    )
    parser.add_argument(
        "--dry-run", action="store_true",
        help="validate offline without loading weights (keys, types, values TRL documents, "
        "parent, combinations, hub revisions) and print the hub revisions a run would use",
    )


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", type=Path, metavar="RECIPE", help="recipe YAML, e.g. "
                        "recipes/tiny/sft.yaml")
    # REMAINDER, because argparse refuses positionals after an option once the first run of
    # positionals has been matched (`RECIPE --dry-run lr=1`); options found in it are parsed
    # by `_late_options`.
    parser.add_argument(
        "overrides", nargs=argparse.REMAINDER, metavar="KEY=VALUE",
        help="override recipe keys (output_dir=..., model_name_or_path=..., learning_rate=...; "
        "stagesweep.KEY=... for the stagesweep block)",
    )
    _add_options(parser)


def _late_options(args: argparse.Namespace) -> argparse.Namespace:
    """Fold options given among the overrides into `args`; anything else dash-led is refused."""
    from stagesweep.cli import UserError

    late = argparse.ArgumentParser(add_help=False)
    _add_options(late)
    found, overrides = late.parse_known_args(args.overrides)
    for item in overrides:
        if item.startswith("-"):
            raise UserError(f"unknown option {item!r}; overrides are KEY=VALUE")
    args.overrides = overrides
    args.dry_run = args.dry_run or found.dry_run
    args.accelerate_config = found.accelerate_config or args.accelerate_config
    return args


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train",
        help="train one stage of a checkpoint lineage from a TRL recipe",
        description="Train one stage (sft, dpo, ipo, kto, orpo, cpo, simpo or a custom "
        "trainer) from a recipe of plain TRL config keys. Re-running with the same output_dir "
        "resumes from its last checkpoint; the output dir and every checkpoint get a "
        "stagesweep.json lineage manifest.",
    )
    _add_arguments(parser)
    parser.set_defaults(func=handle)


def handle(args: argparse.Namespace) -> int:
    from stagesweep.cli import UserError
    from stagesweep.train.recipe import hub_pins, load_recipe
    from stagesweep.train.run import train, validate

    args = _late_options(args)
    if args.dry_run:
        try:
            spec = validate(args.recipe, args.overrides, accelerate_config=args.accelerate_config)
        except UserError:
            # What would be downloaded, shown before the refusal (an unpinned id, say), so the
            # line to fix is on screen with the error.
            with contextlib.suppress(UserError):
                _print_pins(hub_pins(load_recipe(args.recipe, args.overrides)))
            raise
        _print_pins(hub_pins(spec))
        print(f"recipe ok; would write {spec.output_dir}")
        return 0
    out = train(args.recipe, args.overrides, accelerate_config=args.accelerate_config)
    if os.environ.get("RANK", "0") == "0":  # launched workers: only rank 0 reports
        print(f"trained {out}")
    return 0


def _print_pins(pins: list) -> None:
    print("hub revisions:" if pins else "hub revisions: none (local model and data)")
    for pin in pins:
        print(f"  {pin.describe()}")


def main(argv: list[str] | None = None) -> int:
    from stagesweep.cli import UserError

    parser = argparse.ArgumentParser(prog="python -m stagesweep.train.cli")
    _add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return handle(args)
    except UserError as err:
        print(f"stagesweep train: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
