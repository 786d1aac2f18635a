"""The `stagesweep` command line.

Each verb lives in the module that owns its work and exposes ``register(subparsers)``; the
verb's heavy imports (torch, transformers, trl) happen inside its handler so that `--help`,
`analyze` and `lineage` start in well under a second.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

# verb -> module that defines `register(subparsers)`; the registered parser sets `func`.
# Keys give the order of `stagesweep --help`.
COMMAND_MODULES: dict[str, str] = {
    "demo": "stagesweep.demo",
    "train": "stagesweep.train.cli",
    "sweep": "stagesweep.evaluate.sweep_cli",
    "plan": "stagesweep.evaluate.cost",
    "analyze": "stagesweep.evaluate.analysis_cli",
    "report": "stagesweep.evaluate.report",
    "view": "stagesweep.evaluate.view",
    "export": "stagesweep.evaluate.export",
    "audit": "stagesweep.evaluate.audit",
    "judge-check": "stagesweep.evaluate.judge_check",
    "lineage": "stagesweep.lineage",
    "tiny-model": "stagesweep.tiny_model",
    "power": "stagesweep.evaluate.power",
    "bench": "stagesweep.evaluate.bench",
    "fingerprint": "stagesweep.evaluate.store",
}


class UserError(Exception):
    """A problem with the user's input; printed as one line, never as a traceback."""


def read_yaml_mapping(path: Path, what: str, hint: str) -> dict:
    """A user's YAML file (recipe, sweep spec, accelerate config) as a dict; a missing file,
    bad YAML or a non-mapping is one UserError naming the file, `hint` saying what it should be."""
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text())
    except OSError as err:
        raise UserError(f"cannot read {what} {path}: {err.strerror}") from None
    except UnicodeDecodeError as err:
        raise UserError(f"{path}: not UTF-8 text (byte {err.start}); re-save the {what} as "
                        "UTF-8") from None
    except yaml.YAMLError as err:
        raise UserError(f"{path}: not valid YAML: {str(err).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: {hint}")
    return data


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="stagesweep",
        description="Train checkpoint lineages with TRL and trace the benign-demonstration "
        "effect across training stages.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in COMMAND_MODULES.values():
        importlib.import_module(module).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except UserError as err:
        from stagesweep.safeio import redact_text

        # Messages quote user values (URLs, overrides) that can carry credentials.
        print(f"stagesweep {args.command}: error: {redact_text(str(err))}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
