"""What each checkpoint's chat template does to the sweep's prompts, and making prompts fit.

A stage comparison is valid only if the stages saw the same prompts. Three things break that
without any error: a template that renders today's date (a GPT-OSS sweep resumed tomorrow, or
stages swept on different days), a template that changes between stages (OLMo 3.1's final
checkpoint adds an identity system prompt its SFT and DPO parents lack), and context windows
that cut off the large-N cells of one checkpoint only. This module fixes one render date per
sweep, compares every checkpoint's template on one probe conversation, and applies the spec's
`fit:` policy before any weights load.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from stagesweep.cli import UserError
from stagesweep.evaluate.plan import WorkUnit
from stagesweep.evaluate.pools import DemoPool
from stagesweep.evaluate.spec import Fit, SweepSpec

RENDER_RECORD = "render.json"
CHUNK = 4096  # units rendered at a time while measuring prompts
# The probe every template renders: two turns of plain text, so that whatever differs between
# two renders outside the special tokens is the template's own text (system prompt, dates).
PROBE = [
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And of Italy?"},
]


def recorded_render_date(out: Path | None, spec: SweepSpec, *, record: bool) -> str:
    """The sweep's render date: the spec's `render_date`, else the one recorded in `out` at the
    first run, else today (recorded in `out` when `record`)."""
    from stagesweep.evaluate.render import today
    from stagesweep.safeio import write_json

    path = Path(out) / RENDER_RECORD if out is not None else None
    recorded = None
    if path is not None and path.is_file():
        try:
            recorded = json.loads(path.read_text())["render_date"]
        except (ValueError, KeyError, TypeError):
            raise UserError(f"{path} is damaged; restore it, or set render_date: YYYY-MM-DD "
                            "in the spec to the date the sweep began") from None
    date = spec.render_date or recorded or today()
    if record and path is not None and recorded is None:
        write_json(path, {"render_date": date})
    return date


def special_tokens(tokenizer: Any) -> dict[str, int]:
    """Special and added tokens with their ids: what a template's markers are made of."""
    tokens = {t.content: i for i, t in (tokenizer.added_tokens_decoder or {}).items()}
    for token in tokenizer.all_special_tokens:
        tokens.setdefault(token, tokenizer.convert_tokens_to_ids(token))
    return tokens


def render_with_reference(spec: SweepSpec, refs: list, load: Callable[[Any], Any]
                          ) -> tuple[str, Any] | None:
    """(name, tokenizer) of the checkpoint named by the spec's `render_with`, or None."""
    if not spec.render_with:
        return None
    for ref in refs:
        if spec.render_with in (ref.name, ref.source):
            return ref.name, load(ref)
    raise UserError(f"render_with: {spec.render_with!r} names none of the swept checkpoints "
                    f"({', '.join(r.name for r in refs)}); use one of those names")


def adopt_template(tokenizer: Any, name: str, reference: str, reference_tok: Any) -> str:
    """Give `tokenizer` the reference checkpoint's template; refused when the two tokenizers'
    special tokens differ (the template would spell tokens this checkpoint does not have)."""
    if name != reference:
        mine, theirs = special_tokens(tokenizer), special_tokens(reference_tok)
        if mine != theirs:
            differ = sorted(set(mine.items()) ^ set(theirs.items()))[:3]
            raise UserError(
                f"render_with: {reference}: checkpoint {name} has other special tokens "
                f"(e.g. {differ}), so it cannot be rendered through {reference}'s template; "
                "remove render_with or sweep these checkpoints separately")
        tokenizer.chat_template = reference_tok.chat_template
    return f"render_with:{reference}"


def probe_text(tokenizer: Any, spec: SweepSpec) -> str:
    """The probe rendered as the sweep renders, with every special token removed."""
    from stagesweep.evaluate.render import render_text

    system = [{"role": "system", "content": spec.system_prompt}] if spec.system_prompt else []
    text = render_text(tokenizer, [*system, *PROBE], spec)
    for token in sorted(special_tokens(tokenizer), key=len, reverse=True):
        text = text.replace(token, "")
    return text


def template_record(spec: SweepSpec, setups: list) -> dict:
    """Provenance of the templates: render date and options, each checkpoint's template
    (source, hash, hash of its probe text) and the template differences between consecutive
    checkpoints in lineage order (as analysis pairs stages), with the lines that differ."""
    from stagesweep.evaluate.render import template_sha

    probes = {cs.ref.name: probe_text(cs.tokenizer, spec) for cs in setups}
    checkpoints = {
        cs.ref.name: {"template": cs.template_source, "sha": template_sha(cs.tokenizer),
                      "probe_sha": hashlib.sha256(probes[cs.ref.name].encode()).hexdigest()[:16]}
        for cs in setups}
    import pandas as pd

    from stagesweep.evaluate.analysis.stages import checkpoint_order

    order = checkpoint_order(pd.DataFrame([{"checkpoint": cs.ref.name, "stage": cs.ref.stage,
                                            "step": cs.ref.step} for cs in setups]))
    ordered = sorted(setups, key=lambda cs: order.index(cs.ref.name))
    differences = []
    for a, b in zip(ordered, ordered[1:], strict=False):
        before, after = probes[a.ref.name], probes[b.ref.name]
        if before != after:
            lines = [line for line in difflib.ndiff(before.splitlines(), after.splitlines())
                     if line[:1] in "+-" and line[2:].strip()]
            differences.append({"from": a.ref.name, "to": b.ref.name, "lines": lines[:6]})
    return {"render_date": spec.render_date, "chat_template_kwargs": spec.chat_template_kwargs,
            "render_with": spec.render_with, "checkpoints": checkpoints,
            "differences": differences}


def describe_differences(record: dict) -> list[str]:
    """One line per template difference, for the sweep's and analysis's output."""
    return [f"template differs {d['from']} -> {d['to']} (outside special tokens: "
            f"{'; '.join(d['lines'])}); stage differences between them mix in a prompt change"
            " (render_with: NAME renders every checkpoint through one template)"
            for d in record["differences"]]


def print_templates(spec: SweepSpec, setups: list) -> dict:
    record = template_record(spec, setups)
    print(f"render date {record['render_date']}"
          + (f", template options {spec.chat_template_kwargs}" if spec.chat_template_kwargs
             else ""))
    for name, info in record["checkpoints"].items():
        print(f"{name}: chat template {info['template']} (sha {info['sha']})")
    for line in describe_differences(record):
        print(line)
    return record


def templates_summary(results: Path, differences: list[dict]) -> dict | None:
    """The `templates` section of summary.json, from the provenance of the sweep behind
    `results` (a sweep dir or its results file); marks each stage difference whose two
    checkpoints rendered the probe differently with `template_differs`."""
    path = Path(results)
    path = (path if path.is_dir() else path.parent) / "provenance.json"
    try:
        record = json.loads(path.read_text()).get("templates")
    except (OSError, ValueError):
        return None
    if not record:
        return None
    probes = {name: c["probe_sha"] for name, c in record["checkpoints"].items()}
    for d in differences:
        if d["from"] in probes and d["to"] in probes:
            d["template_differs"] = probes[d["from"]] != probes[d["to"]]
    return record


# ------------------------------------------------------------------ context windows


def _overflowing(spec: SweepSpec, units: list[WorkUnit], pools: dict[str, DemoPool],
                 cs: Any) -> list[tuple[WorkUnit, int]]:
    """(unit, prompt tokens) of every unit whose prompt plus answer exceeds the window."""
    from stagesweep.evaluate.render import render_units

    if not cs.limit or not units:
        return []
    room = cs.limit - cs.config.max_new_tokens
    lengths = [len(ids) for start in range(0, len(units), CHUNK)
               for ids in render_units(cs.tokenizer, units[start:start + CHUNK], pools, spec)[1]]
    return [(u, n) for u, n in zip(units, lengths, strict=True) if n > room]


def _cell(unit: WorkUnit) -> tuple[str, int, int]:
    return unit.design, unit.n_harmful, unit.n_benign


def overflow_by_cell(spec: SweepSpec, units: list[WorkUnit], pools: dict[str, DemoPool],
                     setups: list) -> dict[str, dict[tuple[str, int, int], int]]:
    """checkpoint -> {(design, N_h, N_b): overflowing units}."""
    table = {}
    for cs in setups:
        counts: dict[tuple[str, int, int], int] = {}
        for unit, _ in _overflowing(spec, units, pools, cs):
            counts[_cell(unit)] = counts.get(_cell(unit), 0) + 1
        table[cs.ref.name] = counts
    return table


def _cells_text(counts: dict[tuple[str, int, int], int]) -> str:
    return ", ".join(f"{d} N_h={h} N_b={b} ({n})" for (d, h, b), n in sorted(counts.items()))


def _truncated(pools: dict[str, DemoPool], spec: SweepSpec, tokenizer: Any,
               budget: int) -> dict[str, DemoPool]:
    """Pools whose demo answers are cut to `budget` tokens of `tokenizer` (text cut once, so
    every checkpoint sees the same demos)."""
    demo_pools = {name for d in spec.designs for name in (d.harmful_pool, d.benign_pool)}
    out = dict(pools)
    for name in demo_pools:
        pool = pools[name]
        ids = tokenizer(list(pool.responses), add_special_tokens=False)["input_ids"]
        cut = tuple(text if len(i) <= budget else tokenizer.decode(i[:budget])
                    for text, i in zip(pool.responses, ids, strict=True))
        out[name] = dataclasses.replace(pool, responses=cut)
    return out


def _demo_budget(spec: SweepSpec, units: list[WorkUnit], pools: dict[str, DemoPool],
                 setups: list, over: dict[str, list]) -> tuple[int, dict[str, DemoPool]]:
    """The largest per-demo answer budget (tokens of the smallest window's tokenizer) under
    which no unit overflows any checkpoint. Only units that overflow untruncated can overflow
    truncated, so only they are re-rendered."""
    tight = min((cs for cs in setups if cs.limit), key=lambda cs: cs.limit)
    suspects = {cs.ref.name: [u for u, _ in over[cs.ref.name]] for cs in setups}

    def fits(budget: int) -> dict[str, DemoPool] | None:
        cut = _truncated(pools, spec, tight.tokenizer, budget)
        ok = all(not _overflowing(spec, suspects[cs.ref.name], cut, cs) for cs in setups)
        return cut if ok else None

    longest = max(len(ids) for name in {n for d in spec.designs
                                        for n in (d.harmful_pool, d.benign_pool)}
                  for ids in tight.tokenizer(list(pools[name].responses),
                                             add_special_tokens=False)["input_ids"])
    low, high, best = 0, longest, None
    while low <= high:
        mid = (low + high) // 2
        cut = fits(mid)
        if cut is not None:
            best, low = (mid, cut), mid + 1
        else:
            high = mid - 1
    if best is None:
        raise UserError("fit: truncate_demos: even empty demo answers overflow the smallest "
                        f"window ({tight.ref.name}, {tight.limit} tokens); use fit: drop_cells "
                        "or smaller cells")
    return best


def apply_fit(spec: SweepSpec, units: list[WorkUnit], pools: dict[str, DemoPool],
              setups: list) -> tuple[list[WorkUnit], dict[str, DemoPool], list[str]]:
    """Units and pools after the spec's `fit:` policy, and lines saying what overflowed and
    what was done; `fit: error` leaves them as they are (the caller decides to stop)."""
    over = {cs.ref.name: _overflowing(spec, units, pools, cs) for cs in setups}
    lines = []
    for cs in setups:
        if over[cs.ref.name]:
            counts: dict[tuple[str, int, int], int] = {}
            for unit, _ in over[cs.ref.name]:
                counts[_cell(unit)] = counts.get(_cell(unit), 0) + 1
            lines.append(f"{cs.ref.name} (window {cs.limit} tokens, max_new_tokens "
                         f"{cs.config.max_new_tokens}): {len(over[cs.ref.name])} overflowing "
                         f"unit(s) in {_cells_text(counts)}")
    if not lines or spec.fit is Fit.ERROR:
        return units, pools, lines
    if spec.fit is Fit.DROP_CELLS:
        dropped = {_cell(u) for found in over.values() for u, _ in found}
        kept = [u for u in units if _cell(u) not in dropped]
        lines.append(f"fit: drop_cells drops {len(dropped)} cell(s) ({len(units) - len(kept)} "
                     f"units) for every checkpoint: "
                     + ", ".join(f"{d} N_h={h} N_b={b}" for d, h, b in sorted(dropped)))
        return kept, pools, lines
    budget, cut = _demo_budget(spec, units, pools, setups, over)
    lines.append(f"fit: truncate_demos cuts every demo answer to {budget} tokens, the same "
                 "demos for every checkpoint and cell")
    return units, cut, lines


def fit_to_windows(spec: SweepSpec, units: list[WorkUnit], pools: dict[str, DemoPool],
                   setups: list, *, report: bool = False
                   ) -> tuple[list[WorkUnit], dict[str, DemoPool]]:
    """Apply `fit:` before any weights load; `fit: error` stops with one line naming the
    checkpoint, its window and the overflowing cells. `report` prints what was fitted."""
    units, pools, lines = apply_fit(spec, units, pools, setups)
    if lines and spec.fit is Fit.ERROR:
        raise UserError("prompts overflow the context window before any compute: "
                        + "; ".join(lines) + ". Set fit: truncate_demos or fit: drop_cells in "
                        "the spec, or use smaller cells")
    for line in lines if report else []:
        print(f"overflow: {line}")
    return units, pools


def print_fit(spec: SweepSpec, units: list[WorkUnit], pools: dict[str, DemoPool],
              setups: list) -> tuple[list[WorkUnit], dict[str, DemoPool]]:
    """The dry run's overflow report by cell and checkpoint and what `fit:` would do."""
    fitted, fitted_pools, lines = apply_fit(spec, units, pools, setups)
    for line in lines:
        print(f"overflow: {line}")
    if lines and spec.fit is Fit.ERROR:
        print("fit: error: the sweep would stop before any compute; set fit: truncate_demos or "
              "fit: drop_cells in the spec")
    return fitted, fitted_pools
