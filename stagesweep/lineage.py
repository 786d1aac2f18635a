"""Checkpoint lineage: the `stagesweep.json` manifest every training output carries.

Each stage's output dir (and each intermediate `checkpoint-N` in it) records what it was
trained from, how and on what, so the evaluator can name checkpoints by stage and step and
`stagesweep lineage DIR` can draw the tree base -> sft -> dpo without a database: parents are
resolved by path.
"""

from __future__ import annotations

import argparse
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stagesweep.safeio import write_json

MANIFEST_NAME = "stagesweep.json"
_CHECKPOINT_DIR = re.compile(r"^checkpoint-(\d+)$")


@dataclass
class LineageNode:
    """One checkpoint found on disk: a stage's final output or one of its intermediate steps."""

    path: Path
    name: str
    """`stage` for a final output dir, `f"{stage}-step{N}"` for its `checkpoint-N`."""
    stage: str
    step: int | None
    method: str
    parent: str | None
    """The parent's path (resolved) or hub id; None when the manifest names none."""

    @property
    def is_intermediate(self) -> bool:
        return _CHECKPOINT_DIR.match(self.path.name) is not None


def write_manifest(directory: Path | str, data: dict[str, Any]) -> Path:
    """Write `data` as the dir's manifest atomically, so a kill never leaves half a file, with
    secrets (a `hub_token=...` override, a key in the resolved recipe) redacted."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    return write_json(directory / MANIFEST_NAME, data, sort_keys=True)


def read_manifest(directory: Path | str) -> dict[str, Any] | None:
    """The dir's manifest, or None when it has none (a base model, a foreign checkpoint)."""
    try:
        return json.loads((Path(directory) / MANIFEST_NAME).read_text())
    except (OSError, ValueError):
        return None


def parent_ref(manifest: dict[str, Any]) -> str | None:
    """The parent as one string: its path, or `hub_id@revision`."""
    parent = manifest.get("parent") or {}
    if parent.get("path"):
        return str(Path(parent["path"]).resolve())
    if parent.get("hub_id"):
        revision = parent.get("revision")
        return f"{parent['hub_id']}@{revision}" if revision else parent["hub_id"]
    return None


def node_from_dir(directory: Path | str) -> LineageNode | None:
    """The lineage node of one checkpoint dir, or None without a manifest."""
    directory = Path(directory).resolve()
    manifest = read_manifest(directory)
    if manifest is None:
        return None
    stage = str(manifest.get("stage", directory.name))
    step = manifest.get("global_step")
    match = _CHECKPOINT_DIR.match(directory.name)
    if match:
        step = int(match.group(1))
        name = f"{stage}-step{step}"
    else:
        name = stage
    return LineageNode(
        path=directory,
        name=name,
        stage=stage,
        step=step if isinstance(step, int) else None,
        method=str(manifest.get("method", "")),
        parent=parent_ref(manifest),
    )


def discover(root: Path | str) -> list[LineageNode]:
    """Every checkpoint with a manifest under `root` (root included), in path order."""
    root = Path(root)
    nodes = []
    for dirpath, dirnames, filenames in os.walk(root):
        # wandb run dirs and dataset caches can be large; they never hold checkpoints.
        dirnames[:] = sorted(d for d in dirnames if not d.startswith((".", "wandb")))
        if MANIFEST_NAME in filenames:
            node = node_from_dir(dirpath)
            if node is not None:
                nodes.append(node)
    return nodes


def format_tree(nodes: list[LineageNode]) -> str:
    """The stage tree as text: roots are parents not found under the searched dir.

    Under a stage come its intermediate checkpoints, then the stages trained from it; a stage
    trained from an intermediate checkpoint appears under that checkpoint.
    """
    by_path = {str(n.path): n for n in nodes}
    steps: dict[str, list[LineageNode]] = {}
    children: dict[str | None, list[LineageNode]] = {}
    for n in nodes:
        if n.is_intermediate:
            steps.setdefault(str(n.path.parent), []).append(n)
        else:
            children.setdefault(n.parent, []).append(n)
    lines: list[str] = []

    def emit(node: LineageNode, prefix: str, last: bool) -> None:
        if node.is_intermediate:
            label = f"{node.name} [step {node.step}]"
        else:
            step = f" step {node.step}" if node.step is not None else ""
            label = f"{node.name} [{node.method}{step}]"
        lines.append(f"{prefix}{'└── ' if last else '├── '}{label} {node.path}")
        kids = [] if node.is_intermediate else steps.get(str(node.path), [])
        kids = sorted(kids, key=lambda n: n.step or 0)
        kids += sorted(children.get(str(node.path), []), key=lambda n: n.name)
        inner = prefix + ("    " if last else "│   ")
        for i, kid in enumerate(kids):
            emit(kid, inner, i == len(kids) - 1)

    roots = sorted((p for p in children if p not in by_path), key=lambda p: p or "")
    for root in roots:
        lines.append(root if root is not None else "(no parent recorded)")
        kids = sorted(children[root], key=lambda n: n.name)
        for i, kid in enumerate(kids):
            emit(kid, "", i == len(kids) - 1)
    orphans = [n for p, ns in steps.items() if p not in by_path for n in ns]
    for n in sorted(orphans, key=lambda n: str(n.path)):
        lines.append(f"{n.name} [step {n.step}] {n.path} (its stage's output has no manifest)")
    return "\n".join(lines)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "lineage",
        help="print the stage tree (base -> sft -> dpo, with intermediate steps) under a dir",
        description="Find every training output with a stagesweep.json manifest under DIR and "
        "print the tree of stages, resolving each stage's parent by path.",
    )
    parser.add_argument("dir", type=Path, metavar="DIR", help="directory to search")
    parser.add_argument("--json", action="store_true", help="print the nodes as JSON lines")
    parser.set_defaults(func=_handle)


def _handle(args: argparse.Namespace) -> int:
    from stagesweep.cli import UserError

    if not args.dir.is_dir():
        raise UserError(f"{args.dir} is not a directory")
    nodes = discover(args.dir)
    if not nodes:
        raise UserError(f"no {MANIFEST_NAME} found under {args.dir}; train a recipe into it first")
    if args.json:
        for n in nodes:
            print(json.dumps({**n.__dict__, "path": str(n.path)}))
    else:
        print(format_tree(nodes))
    return 0
