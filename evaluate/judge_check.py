"""`stagesweep judge-check`: measure a judge against human labels before trusting it.

A judge's refusal rate is only as good as its agreement with people on the kind of answers a
model family writes (a string judge misses refusals phrased without "sorry"; a classifier may
misread a demonstrated opening line). This runs any registered judge on a labelled dataset the
user names (for example WildGuardTest's `response_refusal_label`) and prints agreement, refusal
precision and recall, Cohen's kappa and the confusion table. Verdicts the judge cannot read are
shown in their own column and left out of the agreement figures, never guessed.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stagesweep.cli import UserError

# Label spellings read as a human refusal / compliance label (WildGuardTest: refusal/compliance).
REFUSAL_LABELS = ("refusal", "refused", "refuse", "yes", "1", "true")
COMPLIANCE_LABELS = ("compliance", "complied", "comply", "no", "0", "false")
SHIPPED = Path(__file__).resolve().parent.parent / "stagesweep" / "data" / "judge_check.jsonl"


@dataclass(frozen=True)
class JudgeCheck:
    """Counts of (human label, judge label) and the figures derived from them."""

    judge: str
    rows: int
    # human "refusal"/"compliance" -> judge "refused"/"complied"/other label -> count
    table: dict[str, dict[str, int]]

    def count(self, human: str, judged: str) -> int:
        return self.table[human].get(judged, 0)

    @property
    def parsed(self) -> int:
        return sum(self.count(h, j) for h in self.table for j in ("refused", "complied"))

    @property
    def agreement(self) -> float | None:
        agree = self.count("refusal", "refused") + self.count("compliance", "complied")
        return agree / self.parsed if self.parsed else None

    @property
    def precision(self) -> float | None:
        called = self.count("refusal", "refused") + self.count("compliance", "refused")
        return self.count("refusal", "refused") / called if called else None

    @property
    def recall(self) -> float | None:
        actual = self.count("refusal", "refused") + self.count("refusal", "complied")
        return self.count("refusal", "refused") / actual if actual else None

    @property
    def kappa(self) -> float | None:
        """Cohen's kappa over the parsed verdicts; None when it is undefined (one label only)."""
        import numpy as np
        from statsmodels.stats.inter_rater import cohens_kappa

        grid = np.array([[self.count(h, j) for j in ("refused", "complied")]
                         for h in ("refusal", "compliance")])
        total = grid.sum()
        if total == 0 or (grid.sum(axis=0) == total).any() and (grid.sum(axis=1) == total).any():
            return None
        return float(cohens_kappa(grid).kappa)

    def as_dict(self) -> dict:
        return {"judge": self.judge, "rows": self.rows, "parsed": self.parsed,
                "agreement": self.agreement, "refusal_precision": self.precision,
                "refusal_recall": self.recall, "kappa": self.kappa, "confusion": self.table}


def _human_label(value: Any, column: str, row: int) -> str:
    text = str(value).strip().lower()
    if text in REFUSAL_LABELS:
        return "refusal"
    if text in COMPLIANCE_LABELS:
        return "compliance"
    raise UserError(f"--label column {column!r} row {row} holds {value!r}; labels must be one of "
                    f"{', '.join(REFUSAL_LABELS)} (refusal) or {', '.join(COMPLIANCE_LABELS)} "
                    "(compliance)")


def load_labelled(data: str, *, text: str, label: str, request: str | None,
                  split: str = "test", config: str | None = None,
                  limit: int | None = None) -> list[tuple[str, str, str]]:
    """(request, response, human label) rows of a local file or hub dataset."""
    from stagesweep.evaluate.pools import _load_dataset
    from stagesweep.evaluate.spec import PoolSpec

    local = Path(data).expanduser()
    source = PoolSpec(name="--data", path=str(local)) if local.exists() or data.startswith(
        (".", "/", "~")) else PoolSpec(name="--data", hub=data, split=split, config=config)
    ds = _load_dataset(source, None)
    for flag, column in (("--text", text), ("--label", label), ("--request", request)):
        if column is not None and column not in ds.column_names:
            raise UserError(f"{flag} {column!r} is not a column of {data} (columns: "
                            f"{', '.join(ds.column_names)})")
    n = len(ds) if limit is None else min(limit, len(ds))
    rows = ds.select(range(n))
    requests = rows[request] if request else [""] * n
    return [(str(q or ""), str(r or ""), _human_label(lab, label, i))
            for i, (q, r, lab) in enumerate(zip(requests, rows[text], rows[label], strict=True))]


def check_judge(judge_name: str, rows: list[tuple[str, str, str]],
                options: dict[str, Any] | None = None) -> JudgeCheck:
    """Run the judge on every row and count its verdicts against the human labels."""
    from stagesweep.evaluate.judges.base import JudgeItem, get_judge_class

    judge = get_judge_class(judge_name)(**(options or {}))
    try:
        verdicts = judge.judge([JudgeItem(str(i), q, r) for i, (q, r, _) in enumerate(rows)])
    finally:
        judge.close()
    table: dict[str, dict[str, int]] = {"refusal": {}, "compliance": {}}
    for (_, _, human), v in zip(rows, verdicts, strict=True):
        table[human][v.label] = table[human].get(v.label, 0) + 1
    return JudgeCheck(judge_name, len(rows), table)


def _fmt(value: float | None, pattern: str = "{:.3f}") -> str:
    return "n/a" if value is None else pattern.format(value)


def format_check(check: JudgeCheck) -> str:
    others = sorted({j for h in check.table.values() for j in h} - {"refused", "complied"})
    columns = ["refused", "complied", *others]
    lines = [f"{'':18}" + "".join(f"{'judge ' + c:>18}" for c in columns)]
    for human in ("refusal", "compliance"):
        lines.append(f"{'label ' + human:18}" + "".join(
            f"{check.count(human, c):>18}" for c in columns))
    lines.append(f"agreement {_fmt(check.agreement, '{:.1%}')} on {check.parsed} parsed of "
                 f"{check.rows} rows; refusal precision {_fmt(check.precision)}, recall "
                 f"{_fmt(check.recall)}; Cohen's kappa {_fmt(check.kappa)}")
    return "\n".join(lines)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "judge-check",
        help="measure a judge against a labelled dataset (agreement, precision, recall, kappa)",
        description="Run a judge on a dataset with human refusal labels and print agreement, "
        "refusal precision and recall, Cohen's kappa and the confusion table, so a judge is "
        "trusted for a model family only after it was measured. Try it on the shipped "
        f"synthetic set: --data {SHIPPED.relative_to(SHIPPED.parents[2])} --text response "
        "--label response_refusal_label --request prompt",
    )
    p.add_argument("--judge", required=True, help="a registered judge (refusal_strings, "
                   "wildguard, harmbench, llamaguard, llm)")
    p.add_argument("--data", required=True, metavar="DATASET",
                   help="local JSONL/CSV/Parquet file or hub dataset id "
                   "(e.g. allenai/wildguardmix)")
    p.add_argument("--text", required=True, metavar="COL", help="column with the response")
    p.add_argument("--label", required=True, metavar="COL",
                   help="column with the human label (refusal/compliance, yes/no or 1/0)")
    p.add_argument("--request", metavar="COL", help="column with the request the response "
                   "answers (model judges read it; WildGuardTest: prompt)")
    p.add_argument("--config", help="hub dataset config (WildGuardTest: wildguardtest)")
    p.add_argument("--split", default="test", help="hub dataset split (default test)")
    p.add_argument("--limit", type=int, metavar="N", help="only the first N rows")
    p.add_argument("--judge-option", action="append", default=[], metavar="KEY=VALUE",
                   help="judge option as in the spec's judge_options (repeatable; VALUE is YAML)")
    p.add_argument("--json", type=Path, metavar="FILE", help="also write the figures as JSON")
    p.set_defaults(func=handle)


def _options(pairs: list[str]) -> dict[str, Any]:
    import yaml

    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise UserError(f"--judge-option {pair!r}: expected KEY=VALUE, e.g. model=PATH")
        options[key] = yaml.safe_load(value)
    return options


def handle(args: argparse.Namespace) -> int:
    if args.limit is not None and args.limit < 1:
        raise UserError("--limit must be at least 1")
    rows = load_labelled(args.data, text=args.text, label=args.label, request=args.request,
                         split=args.split, config=args.config, limit=args.limit)
    try:
        check = check_judge(args.judge, rows, _options(args.judge_option))
    except TypeError as err:  # an option the judge does not take
        raise UserError(f"--judge-option: judge {args.judge} {err}") from None
    print(f"judge-check: {args.judge} on {args.data} ({len(rows)} rows, label {args.label})")
    print(format_check(check))
    if args.json:
        from stagesweep.safeio import write_json

        write_json(args.json, check.as_dict())
    return 0
