"""`stagesweep analyze RESULTS --out DIR`: results table -> summary.json + tidy CSVs."""

from __future__ import annotations

import argparse
from pathlib import Path


def _pair(text: str) -> tuple[str, str]:
    a, sep, b = text.partition(":")
    if not sep or not a or not b:
        raise argparse.ArgumentTypeError(f"expected FROM:TO checkpoint names, got {text!r}")
    return a, b


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "analyze",
        help="analyse sweep results: H_total tests, benign effect b2, stage differences",
        description="Analyse a results table (a sweep output dir, a dir of sweeps, or a "
        "CSV/Parquet with at least checkpoint, query_id, n_harmful, n_benign, complied) and "
        "write DIR/summary.json plus tidy CSV tables.",
    )
    parser.add_argument("results", type=Path, help="sweep output dir or CSV/Parquet table")
    parser.add_argument("--out", type=Path, required=True, metavar="DIR", help="output dir")
    parser.add_argument("--alpha", type=float, default=0.05, help="test level (default 0.05)")
    parser.add_argument(
        "--pair", type=_pair, action="append", default=[], metavar="FROM:TO",
        help="also test the b2 difference between these two checkpoints (repeatable)",
    )
    parser.add_argument(
        "--cluster", choices=("auto", "query", "query+draw"), default="auto",
        help="cluster-robust errors by query, or two-way by query and draw; auto adds draw "
        "when the table marks demo contexts as shared across queries",
    )
    parser.add_argument(
        "--design", action="append", dest="designs", metavar="NAME",
        help="count design(s) behind the headline b2 and H_total (repeatable; default: every "
        "count design except those named ablation*, which are fitted separately, with H_total "
        "on the total_count design alone, at alpha / its number of N values)",
    )
    parser.add_argument(
        "--primary", type=_pair, metavar="FROM:TO",
        help="the pre-specified stage contrast: tested even if not consecutive and marked "
        "`primary` (the others are exploratory; all carry Holm-adjusted p-values)",
    )
    parser.add_argument(
        "--sesoi-pp", type=float, default=2.0, metavar="PP",
        help="smallest effect of interest in percentage points: the verdict is `negligible` "
        "when the effect's interval lies inside +-PP (TOST; default 2)",
    )
    parser.set_defaults(func=handler)


def handler(args) -> int:
    from stagesweep.cli import UserError
    from stagesweep.evaluate.analysis import analyze

    if not 0 < args.alpha < 1:
        raise UserError(f"--alpha must be between 0 and 1 (got {args.alpha})")
    if not args.sesoi_pp > 0:
        raise UserError(f"--sesoi-pp must be a positive number of points (got {args.sesoi_pp})")
    summary = analyze(args.results, args.out, alpha=args.alpha, pairs=args.pair,
                      cluster=args.cluster, designs=args.designs, sesoi_pp=args.sesoi_pp,
                      primary=args.primary)
    print(format_summary(summary))
    if summary.get("templates"):
        from stagesweep.evaluate.templates import describe_differences

        for line in describe_differences(summary["templates"]):
            print(f"warning: {line}")
    print(f"wrote {args.out / 'summary.json'} and tables")
    return 0


def _num(value, fmt: str = "{:+.3f}") -> str:
    return "-" if value is None else fmt.format(value)


def format_summary(summary: dict) -> str:
    """A terminal table: one line per checkpoint, then the stage differences."""
    lines = [f"{'checkpoint':<24} {'units':>6} {'rate':>6} {'b2':>8} {'95% CI':>19} "
             f"{'p':>9} {'direction':<13} {'verdict':<13} H_total"]
    for name, c in summary["checkpoints"].items():
        e = c["benign_effect"]
        ci = f"[{_num(e['ci_low'])}, {_num(e['ci_high'])}]"
        h = c["h_total"]
        lines.append(
            f"{name:<24} {c['n_units']:>6} {_num(c['compliance_rate'], '{:.1%}'):>6} "
            f"{_num(e['beta']):>8} {ci:>19} {_num(e['p_value'], '{:.2g}'):>9} "
            f"{e['direction']:<13} {e.get('verdict', '-'):<13} "
            f"{'rejected' if h['rejected'] else 'not rejected'}"
        )
        if e.get("skipped"):
            lines.append(f"  b2 skipped: {e['skipped']}")
        if "benign_effect_logprob" in c:
            lp = c["benign_effect_logprob"]
            lines.append(
                f"  logprob b2 {_num(lp['beta'])} [{_num(lp['ci_low'])}, {_num(lp['ci_high'])}] "
                f"p={_num(lp['p_value'], '{:.2g}')} n={lp.get('n', '-')} ({lp['direction']}; "
                "OLS of logprob_diff, same clustering)"
                + (f"; skipped: {lp['skipped']}" if lp.get("skipped") else ""))
        if (c.get("exclusions") or {}).get("warning"):
            lines.append(f"  {c['exclusions']['warning']}")
    for d, what in [*((d, "b2") for d in summary["stage_differences"]),
                    *((d, "logprob b2") for d in summary.get("stage_differences_logprob", []))]:
        if d.get("skipped"):
            lines.append(f"{d['from']} -> {d['to']}: "
                         f"{'' if what == 'b2' else what + ' '}skipped: {d['skipped']}")
        else:
            lines.append(
                f"{d['from']} -> {d['to']}: delta {what} {_num(d['delta_beta'])} "
                f"[{_num(d['ci_low'])}, {_num(d['ci_high'])}] p={_num(d['p_value'], '{:.2g}')}"
            )
    return "\n".join(lines)
