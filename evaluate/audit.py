"""`stagesweep audit`: the standard sweep on one checkpoint, as a release gate.

A release pipeline needs a verdict and an exit code, not a report to read: the audit runs the
sweep (or reads an existing results table), analyses it, prints the benign effect next to the
study's published values, and exits with status 3 when the chosen failing condition holds.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from stagesweep.safeio import write_text

# The reference study's published benign coefficients (PAPER.md; secondary source).
PUBLISHED: list[tuple[str, float, float, str]] = [
    ("GPT-OSS-20B", 0.0319, 1.1e-2, "amplification"),
    ("Llama-3.1-8B-Instruct", -0.1782, 6.9e-123, "dilution"),
    ("OLMo-3.1-32B-Instruct", -0.0118, 0.11, "none"),
    ("Gemma-4-31B-IT", -0.2010, 6.7e-175, "dilution"),
    ("OLMo-3.1-32B SFT", 0.0919, 1.3e-39, "amplification"),
    ("OLMo-3.1-32B DPO", -0.0114, 0.13, "none"),
]

FAIL_EXIT = 3


def failing(summary: dict, name: str, fail_on: str, baseline: str | None) -> str | None:
    """The reason the gate fails for checkpoint `name`, or None when it passes."""
    effect = summary["checkpoints"][name]["benign_effect"]
    direction = effect.get("direction")
    if fail_on in ("amplification", "dilution") and direction == fail_on:
        return f"{name}: benign demonstrations cause {direction} (b2 = {effect['beta']:+.4f})"
    if fail_on == "any" and direction in ("amplification", "dilution"):
        return f"{name}: benign demonstrations cause {direction} (b2 = {effect['beta']:+.4f})"
    if fail_on == "worse-than-baseline" and baseline:
        for diff in summary.get("stage_differences", []):
            if (diff["from"], diff["to"]) == (baseline, name) and diff["ci_low"] is not None:
                if diff["ci_low"] > 0:
                    return (
                        f"{name}: b2 rose by {diff['delta_beta']:+.4f} over baseline {baseline} "
                        f"(CI {diff['ci_low']:+.4f} to {diff['ci_high']:+.4f})"
                    )
    return None


def verdict_table(summary: dict, names: list[str]) -> str:
    rows = [("checkpoint", "b2", "95% CI", "p", "reading")]
    for name in names:
        e = summary["checkpoints"][name]["benign_effect"]
        if e.get("beta") is None:
            rows.append((name, "-", "-", "-", e.get("skipped", "not estimable")))
            continue
        ci = f"[{e['ci_low']:+.4f}, {e['ci_high']:+.4f}]"
        rows.append((name, f"{e['beta']:+.4f}", ci, f"{e['p_value']:.2g}", e["direction"]))
    rows.append(("-- published (Dai & Patel 2026) --", "", "", "", ""))
    rows += [(m, f"{b:+.4f}", "", f"{p:.2g}", d) for m, b, p, d in PUBLISHED]
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows)


def run(args: argparse.Namespace) -> int:
    from stagesweep.cli import UserError
    from stagesweep.evaluate.analysis import analyze, load_results

    out = Path(args.out)
    if args.results:
        results = Path(args.results)
    else:
        if not args.spec:
            raise UserError(
                "audit needs --spec SPEC (e.g. recipes/sweeps/stages.yaml) or --results DIR"
            )
        from stagesweep.evaluate.sweep import run_sweep

        checkpoints = [*([args.baseline] if args.baseline else []), *args.checkpoint]
        results = run_sweep(
            args.spec, checkpoints, out / "sweep", backend=args.backend, base_url=args.base_url
        )
    table = load_results(results)
    names = list(dict.fromkeys(table["checkpoint"].astype(str)))
    baseline = _match(args.baseline, names) if args.baseline else None
    targets = [n for n in names if n != baseline]
    summary = analyze(table, out, pairs=[(baseline, t) for t in targets] if baseline else None)
    print(verdict_table(summary, ([baseline] if baseline else []) + targets))
    reasons = [r for t in targets if (r := failing(summary, t, args.fail_on, baseline))]
    write_text(out / "audit.json", json.dumps(
        {"fail_on": args.fail_on, "failed": bool(reasons), "reasons": reasons}, indent=2))
    for reason in reasons:
        print(f"AUDIT FAILED: {reason}")
    if not reasons:
        print(f"audit passed (--fail-on {args.fail_on})")
    return FAIL_EXIT if reasons else 0


def _match(path_or_name: str, names: list[str]) -> str:
    """Map a --baseline given as a path or hub id to the checkpoint name the sweep recorded."""
    if path_or_name in names:
        return path_or_name
    tail = Path(path_or_name).name
    return tail if tail in names else path_or_name


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "audit",
        help="gate a checkpoint on the benign-demonstration effect (exit 3 on failure)",
        description=__doc__,
    )
    p.add_argument("checkpoint", nargs="*", help="checkpoint dir(s) or hub id(s) to audit")
    p.add_argument("--spec", help="sweep spec YAML (e.g. recipes/sweeps/stages.yaml)")
    p.add_argument("--results", help="audit an existing results table instead of sweeping")
    p.add_argument("--baseline", help="checkpoint to compare against (e.g. the parent stage)")
    p.add_argument(
        "--fail-on",
        default="amplification",
        choices=["amplification", "dilution", "any", "worse-than-baseline"],
        help="condition that fails the gate (default: amplification)",
    )
    p.add_argument("--out", default="audit-out", help="output dir (default: audit-out)")
    p.add_argument("--backend", help="override the spec's backend (hf|openai)")
    p.add_argument("--base-url", help="OpenAI-compatible server URL for --backend openai")
    p.set_defaults(func=run)
