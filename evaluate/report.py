"""`stagesweep report DIR`: plots and a self-contained HTML page from an analysis dir.

Reads `DIR/summary.json` and the tidy CSVs written by `stagesweep analyze` (running the analysis
first when DIR is a sweep dir without one) and writes `DIR/report/`: `index.html` with every
figure embedded as base64 (it opens offline, from an e-mail attachment or a CI artifact),
`summary.md`, and the PNGs. A plot whose data the run did not produce is skipped with a note.
"""

from __future__ import annotations

import base64
import html
import json
import math
import os
from collections.abc import Callable
from pathlib import Path

import pandas as pd

from stagesweep.safeio import atomic_path, write_text

DIRECTION_COLOURS = {"amplification": "#c0392b", "dilution": "#2471a3", "none": "#7f8c8d"}


def _read_csv(path: Path) -> pd.DataFrame:
    try:
        return pd.read_csv(path)
    except (FileNotFoundError, pd.errors.EmptyDataError):
        return pd.DataFrame()


def _grid(n: int):
    import matplotlib.pyplot as plt

    cols = min(n, 3)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.3 * rows), squeeze=False,
                             sharey=True)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return fig, list(axes.flat)


def _yerr(frame: pd.DataFrame, value: str, low: str, high: str, scale: float = 1.0):
    return [scale * (frame[value] - frame[low]).clip(lower=0),
            scale * (frame[high] - frame[value]).clip(lower=0)]


def plot_b2(summary: dict, tables: dict[str, pd.DataFrame]):
    """Headline: b2 per checkpoint with its interval, coloured by the tested direction."""
    import matplotlib.pyplot as plt

    rows = pd.DataFrame(summary["b2_by_checkpoint"])
    if rows.empty or rows["beta"].isna().all():
        return None, "no checkpoint had an estimable benign slope b2"
    rows = rows.dropna(subset=["beta"]).reset_index(drop=True)
    fig, ax = plt.subplots(figsize=(max(4.5, 1.1 * len(rows) + 2), 3.6))
    for i, r in rows.iterrows():
        ax.errorbar(i, r["beta"], yerr=[[r["beta"] - r["ci_low"]], [r["ci_high"] - r["beta"]]],
                    fmt="o", capsize=4, color=DIRECTION_COLOURS.get(r["direction"], "k"))
    ax.axhline(0, color="k", lw=0.8)
    ax.set_xticks(range(len(rows)), rows["checkpoint"], rotation=30, ha="right")
    ax.set_ylabel("b2 (coef. on log(N_b+1))")
    ax.set_title("Benign-demonstration effect per checkpoint (95% CI)")
    handles = [plt.Line2D([], [], marker="o", ls="", color=c, label=d)
               for d, c in DIRECTION_COLOURS.items()]
    ax.legend(handles=handles, fontsize=8, frameon=False)
    return fig, None


def plot_compliance_vs_nb(summary: dict, tables: dict[str, pd.DataFrame]):
    cells = tables["cells"]
    if cells.empty or cells["n_benign"].nunique() < 2:
        return None, "fewer than two N_b values: no compliance-vs-N_b curve"
    names = list(dict.fromkeys(cells["checkpoint"]))
    fig, axes = _grid(len(names))
    for ax, name in zip(axes, names, strict=False):
        part = cells[cells["checkpoint"] == name]
        for nh, line in part.groupby("n_harmful"):
            line = line.sort_values("n_benign")
            ax.errorbar(line["n_benign"] + 1, 100 * line["rate"],
                        yerr=_yerr(line, "rate", "ci_low", "ci_high", 100), marker="o",
                        ms=3, capsize=2, label=f"N_h={nh}")
        ax.set_xscale("log")
        ax.set_title(name)
        ax.set_xlabel("N_b + 1")
    axes[0].set_ylabel("harmful compliance (%)")
    axes[0].legend(fontsize=7, frameon=False)
    fig.suptitle("Compliance vs benign demos, per N_h (Wilson 95% CI)")
    return fig, None


def plot_h_total(summary: dict, tables: dict[str, pd.DataFrame]):
    cells = tables["cells"]
    if cells.empty:
        return None, "no count-design cells"
    cells = cells[cells["n_total"] > 0]
    multi = cells.groupby(["checkpoint", "n_total"])["phi"].transform("nunique") > 1
    cells = cells[multi]
    if cells.empty:
        return None, "no N with more than one phi: the H_total test was not possible"
    names = list(dict.fromkeys(cells["checkpoint"]))
    fig, axes = _grid(len(names))
    for ax, name in zip(axes, names, strict=False):
        part = cells[cells["checkpoint"] == name]
        for n_total, line in part.groupby("n_total"):
            line = line.sort_values("phi")
            ax.errorbar(line["phi"], 100 * line["rate"],
                        yerr=_yerr(line, "rate", "ci_low", "ci_high", 100), marker="o", ms=3,
                        capsize=2, label=f"N={n_total}")
        rejected = summary["checkpoints"][name]["h_total"]["rejected"]
        ax.set_title(f"{name} (H_total {'rejected' if rejected else 'not rejected'})",
                     fontsize=9)
        ax.set_xlabel("phi = N_h / N")
    axes[0].set_ylabel("harmful compliance (%)")
    axes[0].legend(fontsize=7, frameon=False)
    fig.suptitle("H_total: at fixed N, flat curves mean only the count matters")
    return fig, None


def plot_ordering(summary: dict, tables: dict[str, pd.DataFrame]):
    table = tables["ordering"]
    if table.empty:
        return None, "no ordering design in the results"
    groups = list(dict.fromkeys(zip(table["checkpoint"], table["phi"], strict=True)))
    fig, axes = _grid(len(groups))
    for ax, (name, phi) in zip(axes, groups, strict=False):
        part = table[(table["checkpoint"] == name) & (table["phi"] == phi)]
        ax.bar(part["schedule"], 100 * part["rate"],
               yerr=_yerr(part, "rate", "ci_low", "ci_high", 100), capsize=3, color="#5d6d7e")
        ax.set_title(f"{name}, phi={phi:g}", fontsize=9)
        ax.tick_params(axis="x", rotation=30)
    axes[0].set_ylabel("harmful compliance (%)")
    fig.suptitle("Ordering: compliance per schedule (Wilson 95% CI)")
    return fig, None


def plot_format(summary: dict, tables: dict[str, pd.DataFrame]):
    table = tables["format"]
    if table.empty:
        return None, "no format design (no demonstrated opening lines) in the results"
    names = list(dict.fromkeys(table["checkpoint"]))
    fig, axes = _grid(len(names))
    for ax, name in zip(axes, names, strict=False):
        part = table[table["checkpoint"] == name]
        openings = list(dict.fromkeys(part["opening"]))
        for j, within in enumerate(("refusals", "compliant")):
            sub = part[part["within"] == within].set_index("opening").reindex(openings)
            xs = [i + (j - 0.5) * 0.38 for i in range(len(openings))]
            ax.bar(xs, 100 * sub["rate"].fillna(0), width=0.38, label=f"within {within}",
                   yerr=_yerr(sub[["rate", "ci_low", "ci_high"]].fillna(0), "rate", "ci_low",
                              "ci_high", 100), capsize=3)
        ax.set_xticks(range(len(openings)), [o[:28] for o in openings], fontsize=8)
        ax.set_title(name)
    axes[0].set_ylabel("opening line adopted (%)")
    axes[0].legend(fontsize=7, frameon=False)
    fig.suptitle("Format adoption within refusals vs within compliant answers")
    return fig, None


def plot_trajectory(summary: dict, tables: dict[str, pd.DataFrame]):
    import matplotlib.pyplot as plt

    rows = pd.DataFrame(summary["trajectory"])
    if rows.empty or rows["beta"].notna().sum() < 2:
        return None, "no intermediate training steps with an estimable b2"
    rows = rows.dropna(subset=["beta"]).reset_index(drop=True)
    fig, ax = plt.subplots(figsize=(max(5, 0.9 * len(rows) + 2), 3.4))
    ax.plot(rows.index, rows["beta"], marker="o", color="#34495e")
    ax.fill_between(rows.index, rows["ci_low"], rows["ci_high"], alpha=0.2, color="#34495e")
    ax.axhline(0, color="k", lw=0.8)
    ax.set_xticks(rows.index, rows["checkpoint"], rotation=30, ha="right")
    ax.set_ylabel("b2")
    ax.set_title("b2 along training (stages, then steps within a stage)")
    return fig, None


def plot_observed_fitted(summary: dict, tables: dict[str, pd.DataFrame]):
    """Observed rate of every count cell against the headline model's fitted rate: cells off
    the diagonal are where log(N+1) misses the shape."""
    import matplotlib.pyplot as plt

    cells = tables["cells"]
    if cells.empty or "fitted" not in cells or cells["fitted"].isna().all():
        return None, "no fitted headline model: no observed-vs-fitted plot"
    cells = cells.dropna(subset=["fitted"])
    fig, ax = plt.subplots(figsize=(4.6, 4.2))
    for name, part in cells.groupby("checkpoint", sort=False):
        ax.errorbar(100 * part["fitted"], 100 * part["rate"],
                    yerr=_yerr(part, "rate", "ci_low", "ci_high", 100), fmt="o", ms=4,
                    capsize=2, label=str(name))
    ax.plot([0, 100], [0, 100], color="k", lw=0.8)
    ax.set_xlabel("fitted compliance (%)")
    ax.set_ylabel("observed compliance (%, query-clustered 95% CI)")
    ax.set_title("Observed vs fitted, per cell")
    ax.legend(fontsize=7, frameon=False)
    return fig, None


def plot_recency(summary: dict, tables: dict[str, pd.DataFrame]):
    """Compliance by the number of demos between the last harmful demo and the target."""
    import matplotlib.pyplot as plt

    rows = tables.get("recency", pd.DataFrame())
    if rows.empty:
        return None, "no ordering design with known demo positions: no recency plot"
    fig, ax = plt.subplots(figsize=(5, 3.6))
    for name, part in rows.groupby("checkpoint", sort=False):
        part = part.sort_values("distance")
        ax.errorbar(part["distance"], 100 * part["rate"],
                    yerr=_yerr(part, "rate", "ci_low", "ci_high", 100), marker="o", capsize=3,
                    label=str(name))
    ax.set_xlabel("benign demos between the last harmful demo and the target")
    ax.set_ylabel("compliance (%)")
    ax.set_title("Recency: compliance by position of the harmful demos")
    ax.legend(fontsize=7, frameon=False)
    return fig, None


# name -> (title, plotter); the order is the order of the report
PLOTS: dict[str, tuple[str, Callable]] = {
    "b2_per_checkpoint": ("Benign effect b2 per checkpoint", plot_b2),
    "compliance_vs_nb": ("Compliance vs N_b for each N_h", plot_compliance_vs_nb),
    "h_total_phi": ("H_total: compliance vs phi at each N", plot_h_total),
    "ordering": ("Ordering schedules", plot_ordering),
    "format_adoption": ("Format adoption", plot_format),
    "b2_trajectory": ("b2 trajectory over training steps", plot_trajectory),
    "observed_vs_fitted": ("Observed vs fitted rate per cell", plot_observed_fitted),
    "recency": ("Recency: compliance by position", plot_recency),
}


def _fmt(value, spec: str = "{:+.3f}") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return spec.format(value)


def headline_rows(summary: dict) -> list[list[str]]:
    rows = []
    for name, c in summary["checkpoints"].items():
        e = c["benign_effect"]
        pp = (e.get("effect_pp") or {}).get("change_pp")
        rows.append([
            name, str(c["stage"] or "–"), str(c["n_units"]),
            _fmt(c["compliance_rate"], "{:.1%}"),
            _fmt(e["beta"]), f"[{_fmt(e['ci_low'])}, {_fmt(e['ci_high'])}]",
            _fmt(e["p_value"], "{:.2g}"), e["direction"], _fmt(pp, "{:+.1f} pp"),
            "rejected" if c["h_total"]["rejected"] else "not rejected",
            str(c["model_comparison"].get("best_aic", "–")),
        ])
    return rows


HEADLINE = ["checkpoint", "stage", "units", "compliance", "b2", "95% CI", "p", "direction",
            "effect (N_b 0→max)", "H_total", "best model (AIC)"]
DIFFS = ["from", "to", "Δb2", "95% CI", "p", "paired units"]


def difference_rows(summary: dict) -> list[list[str]]:
    return [[d["from"], d["to"] + (" (template differs)" if d.get("template_differs") else ""),
             _fmt(d["delta_beta"]),
             f"[{_fmt(d['ci_low'])}, {_fmt(d['ci_high'])}]", _fmt(d["p_value"], "{:.2g}"),
             str(d.get("n_paired_units", "–"))] for d in summary["stage_differences"]]


BY_DESIGN = ["checkpoint", "design", "b2", "95% CI", "p", "direction"]


def by_design_rows(summary: dict) -> list[list[str]]:
    """b2 per count design (ablations with other benign pools sit here, not in the headline),
    and the b2 of the judge-free outcome (`outcome: logprob`) on the headline designs."""
    rows = []
    for name, c in summary["checkpoints"].items():
        designs = dict(c.get("benign_effect_by_design") or {})
        if "benign_effect_logprob" in c:
            designs["headline, on logprob_diff (OLS)"] = c["benign_effect_logprob"]
        for design, e in designs.items():
            rows.append([name, design, _fmt(e["beta"]),
                         f"[{_fmt(e['ci_low'])}, {_fmt(e['ci_high'])}]",
                         _fmt(e["p_value"], "{:.2g}"), e.get("skipped") or e["direction"]])
    return rows


EXCLUSIONS = ["checkpoint", "excluded", "share", "depends on counts (p)", "b2 bounds",
              "outer 95% CI", "b2, queries without exclusions"]


def exclusion_rows(summary: dict) -> list[list[str]]:
    """Per checkpoint: how many rows the fits lost, whether that depends on the demo counts,
    and how far b2 could move (excluded rows counted as refused / as complied)."""
    rows = []
    for name, c in summary["checkpoints"].items():
        x = c.get("exclusions") or {}
        if not x.get("n_excluded"):
            continue
        dep, bounds, done = x["dependence"], x["b2_bounds"], x["complete_queries"]
        rows.append([name, str(x["n_excluded"]), _fmt(x["share"], "{:.1%}"),
                     ("yes" if dep.get("depends") else "no")
                     + f" ({_fmt(dep.get('p_value'), '{:.2g}')})",
                     f"[{_fmt(bounds['low'])}, {_fmt(bounds['high'])}]",
                     f"[{_fmt(bounds['outer_ci_low'])}, {_fmt(bounds['outer_ci_high'])}]",
                     f"{_fmt(done.get('beta'))} ({done.get('n_queries')} queries)"])
    return rows


EXCLUDED_WHERE = ["checkpoint", "where", "rows", "excluded", "by status"]


def excluded_where_rows(summary: dict, top_queries: int = 10) -> list[list[str]]:
    """Every cell that lost rows, and the queries that lost the most (all are in
    exclusions_queries.csv), with the count of each excluded status."""
    rows = []
    for name, c in summary["checkpoints"].items():
        x = c.get("exclusions") or {}
        fixed = ("n_rows", "n_excluded", "n_harmful", "n_benign")
        for cell in x.get("by_cell", []):
            if cell["n_excluded"]:
                statuses = ", ".join(f"{k}: {v}" for k, v in cell.items() if k not in fixed)
                rows.append([name, f"N_h={cell['n_harmful']} N_b={cell['n_benign']}",
                             str(cell["n_rows"]), str(cell["n_excluded"]), statuses])
        worst = sorted((x.get("by_query") or {}).items(), key=lambda q: -q[1]["n_excluded"])
        for query, counts in worst[:top_queries]:
            statuses = ", ".join(f"{k}: {v}" for k, v in counts.items() if k not in fixed)
            rows.append([name, f"query {query}", str(counts["n_rows"]),
                         str(counts["n_excluded"]), statuses])
    return rows


SENSITIVITY = ["checkpoint", "b2 (headline)", "mixed model b2 [CI]", "slope SD [CI]",
               "b2 without zero-demo cells", "largest cell gap"]


def sensitivity_rows(summary: dict) -> list[list[str]]:
    """The headline b2 beside the same question asked with other model choices."""
    rows = []
    for name, c in summary["checkpoints"].items():
        s = c.get("sensitivity") or {}
        if s.get("skipped") or not s:
            continue
        m, z = s["mixed_model"], s["without_zero_demo_cells"]
        sd_ci = m.get("slope_sd_ci") or [None, None]
        rows.append([name, _fmt(c["benign_effect"]["beta"]),
                     f"{_fmt(m.get('beta'))} [{_fmt(m.get('ci_low'))}, {_fmt(m.get('ci_high'))}]",
                     f"{_fmt(m.get('slope_sd'), '{:.3f}')} [{_fmt(sd_ci[0], '{:.3f}')}, "
                     f"{_fmt(sd_ci[1], '{:.3f}')}]",
                     f"{_fmt(z.get('beta'))} [{_fmt(z.get('ci_low'))}, {_fmt(z.get('ci_high'))}]",
                     _fmt(s.get("largest_cell_gap_pp"), "{:.1f} pp")])
    return rows


def notes(summary: dict) -> list[str]:
    """Every skipped test and excluded row, so nothing is silently missing from the report."""
    out = []
    for name, c in summary["checkpoints"].items():
        if c["excluded"]:
            parts = ", ".join(f"{k}: {v}" for k, v in c["excluded"].items())
            out.append(f"{name}: rows excluded from the fits ({parts})")
        for key in ("benign_effect", "h_total", "model_comparison", "ordering", "format"):
            if (c.get(key) or {}).get("skipped"):
                out.append(f"{name}: {key} skipped: {c[key]['skipped']}")
        out += [f"{name}: {n}" for n in c["benign_effect"].get("notes", [])]
        if (c.get("exclusions") or {}).get("warning"):
            out.append(f"{name}: {c['exclusions']['warning']}")
    for d in summary["stage_differences"]:
        if d.get("skipped"):
            out.append(f"{d['from']} → {d['to']}: skipped: {d['skipped']}")
        if d.get("template_differs"):
            out.append(f"{d['from']} → {d['to']}: the chat templates differ outside their special "
                       "tokens, so Δb2 mixes in a prompt change (render_with: NAME renders "
                       "every checkpoint through one template)")
    templates = summary.get("templates") or {}
    for name, t in (templates.get("checkpoints") or {}).items():
        out.append(f"{name}: rendered with chat template {t['template']} (sha {t['sha']}), "
                   f"date {templates.get('render_date')}")
    return out


ANSWER = ["checkpoint", "b2", "95% CI", "p", "verdict", "compliance"]


def _change(d: dict) -> str:
    """A stage difference's reading: the verdict analyze gives it, else its interval's sign."""
    if d.get("verdict"):
        return d["verdict"]
    if d.get("ci_low") is None:
        return "–"
    return ("b2 rose" if d["ci_low"] > 0 else "b2 fell" if d["ci_high"] < 0
            else "no change detected")


def answer_rows(summary: dict, audit: bool) -> list[list[str]]:
    """The study's table: b2, interval, p, verdict and compliance per checkpoint; then each
    stage difference (Δb2); for an audit, the published rows of PAPER.md below."""
    rows = []
    for name, c in summary["checkpoints"].items():
        e = c["benign_effect"]
        rows.append([name, _fmt(e["beta"]), f"[{_fmt(e['ci_low'])}, {_fmt(e['ci_high'])}]",
                     _fmt(e["p_value"], "{:.2g}"), e.get("verdict") or e["direction"],
                     _fmt(c["compliance_rate"], "{:.1%}")])
    for d in summary["stage_differences"]:
        rows.append([f"{d['from']} → {d['to']} (Δb2)", _fmt(d["delta_beta"]),
                     f"[{_fmt(d['ci_low'])}, {_fmt(d['ci_high'])}]",
                     _fmt(d["p_value"], "{:.2g}"), _change(d), "–"])
    if audit:
        from stagesweep.evaluate.audit import PUBLISHED

        rows += [[f"{model} (published)", f"{b2:+.4f}", "–", f"{p:.2g}", reading, "–"]
                 for model, b2, p, reading in PUBLISHED]
    return rows


def _viewer_link(**filters: object) -> str:
    """The answer viewer (`stagesweep view DIR` writes DIR/view/) filtered to one plot cell."""
    from urllib.parse import urlencode

    return "../view/index.html#" + urlencode({k: v for k, v in filters.items()})


def _phi(value: float) -> str:
    return f"{round(float(value), 3):g}"  # as the viewer prints phi


def cell_links(name: str, summary: dict, tables: dict[str, pd.DataFrame]
               ) -> list[tuple[str, str]]:
    """(label, viewer link) for every point of plot `name`: the answers behind it."""
    cells, links = tables["cells"], []
    if name in ("b2_per_checkpoint", "b2_trajectory", "recency"):
        # the viewer has no demo-position filter: recency points open their checkpoint
        links = [(c, _viewer_link(at=c)) for c in summary["checkpoints"]]
    elif name in ("compliance_vs_nb", "h_total_phi", "observed_vs_fitted") and not cells.empty:
        for r in cells.itertuples():
            links.append((f"{r.checkpoint} N_h={r.n_harmful} N_b={r.n_benign}: {r.rate:.0%}",
                          _viewer_link(at=r.checkpoint, n_h=r.n_harmful, n_b=r.n_benign)))
    elif name == "ordering":
        for r in tables["ordering"].itertuples():
            links.append((f"{r.checkpoint} phi={_phi(r.phi)} {r.schedule}: {r.rate:.0%}",
                          _viewer_link(at=r.checkpoint, phi=_phi(r.phi), schedule=r.schedule)))
    elif name == "format_adoption":
        for r in tables["format"].drop_duplicates(["checkpoint", "opening"]).itertuples():
            links.append((f"{r.checkpoint} {r.opening}",
                          _viewer_link(at=r.checkpoint, opening=r.opening)))
    return links


def _links_html(links: list[tuple[str, str]]) -> str:
    if not links:
        return ""
    items = " · ".join(f"<a href='{html.escape(href)}'>{html.escape(label)}</a>"
                       for label, href in links)
    return (f"<details class='answers'><summary>answers behind this plot ({len(links)} "
            f"points)</summary><p>{items}</p></details>")


def _md(text: str) -> str:
    """Text for summary.md: Markdown renders raw HTML and splits table cells on `|`, so a
    checkpoint named `<img onerror=...>` or `a|b` is escaped as the HTML report escapes it."""
    return html.escape(str(text)).replace("|", "\\|").replace("\n", " ")


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_md(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def _html_table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>"
                   for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def write_report(dir: Path, *, wandb: bool = False) -> Path:
    """Write DIR/report/{index.html, summary.md, *.png}; returns the index.html path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dir = Path(dir)
    summary_path = dir / "summary.json"
    if not summary_path.exists():
        if not (dir / "results.parquet").exists():
            from stagesweep.cli import UserError

            raise UserError(f"{dir}: no summary.json (run `stagesweep analyze RESULTS --out "
                            f"{dir}` first) and no results.parquet to analyse")
        from stagesweep.evaluate.analysis import analyze

        analyze(dir, dir)
    summary = json.loads(summary_path.read_text())
    tables = {name: _read_csv(dir / f"{name}.csv")
              for name in ("cells", "ordering", "format", "per_checkpoint", "stage_differences",
                           "recency")}
    out = dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    figures, skipped = [], []
    for name, (title, plotter) in PLOTS.items():
        fig, reason = plotter(summary, tables)
        png = out / f"{name}.png"
        if fig is None:
            png.unlink(missing_ok=True)  # a stale plot from an earlier run would mislead
            skipped.append(f"{title}: {reason}")
            continue
        fig.tight_layout()
        with atomic_path(png) as tmp:
            fig.savefig(tmp, dpi=110, format="png")
        plt.close(fig)
        figures.append((title, png))

    settings = summary.get("settings", {})
    intro = (f"Model: {settings.get('model', '')}. Alpha {settings.get('alpha')}, errors "
             f"clustered by {settings.get('clustering')}. Source: {settings.get('source')}.")
    answer = answer_rows(summary, audit=(dir / "audit.json").exists())
    md = ["# stagesweep report", "", "## The answer", "", _md_table(ANSWER, answer), "",
          _md(intro), "", "## Per checkpoint", "",
          _md_table(HEADLINE, headline_rows(summary)), "", "## Stage differences", "",
          _md_table(DIFFS, difference_rows(summary)) if summary["stage_differences"]
          else "(one checkpoint: nothing to compare)", ""]
    if by_design_rows(summary):
        md += ["## Benign effect by design", "", _md_table(BY_DESIGN, by_design_rows(summary)),
               ""]
    analysis_sections = [(title, header, rows) for title, header, rows in (
        ("Exclusions", EXCLUSIONS, exclusion_rows(summary)),
        ("Where rows were excluded (cells; the 10 queries with most)", EXCLUDED_WHERE,
         excluded_where_rows(summary)),
        ("Sensitivity analyses", SENSITIVITY, sensitivity_rows(summary))) if rows]
    for title, header, rows in analysis_sections:
        md += [f"## {title}", "", _md_table(header, rows), ""]
    md += ["## Figures", ""]
    md += [f"![{t}]({p.name})" for t, p in figures]
    md += ["", "## Notes", ""] + [f"- {_md(n)}" for n in notes(summary) + skipped]
    write_text(out / "summary.md", "\n".join(md) + "\n")

    imgs = "".join(
        f"<figure><img alt='{html.escape(t)}' src='data:image/png;base64,"
        f"{base64.b64encode(p.read_bytes()).decode()}'><figcaption>{html.escape(t)}"
        f"</figcaption>{_links_html(cell_links(p.stem, summary, tables))}</figure>"
        for t, p in figures)
    viewer = ("" if (dir / "view" / "index.html").exists() else
              f"<p>Every answer behind a plot: <code>stagesweep view {html.escape(str(dir))}"
              "</code> writes the viewer the plots link to.</p>")
    by_design = (f"<h2>Benign effect by design</h2>"
                 f"{_html_table(BY_DESIGN, by_design_rows(summary))}"
                 if by_design_rows(summary) else "")
    note_items = "".join(f"<li>{html.escape(n)}</li>" for n in notes(summary) + skipped)
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>stagesweep report</title>
<style>body{{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;color:#222}}
table{{border-collapse:collapse;margin:1em 0;font-size:0.9em}}
td,th{{border:1px solid #ccc;padding:4px 8px;text-align:left}}
th{{background:#f4f6f7}} img{{max-width:100%}} figure{{margin:1.5em 0}}</style></head><body>
<h1>stagesweep report</h1><h2>The answer</h2>{_html_table(ANSWER, answer)}
<p>{html.escape(intro)}</p>{viewer}
<h2>Per checkpoint</h2>{_html_table(HEADLINE, headline_rows(summary))}
<h2>Stage differences</h2>{_html_table(DIFFS, difference_rows(summary))}{by_design}
{"".join(f"<h2>{title}</h2>{_html_table(header, rows)}"
         for title, header, rows in analysis_sections)}
<h2>Figures</h2>{imgs}<h2>Notes</h2><ul>{note_items}</ul></body></html>
"""
    index = out / "index.html"
    write_text(index, page)
    if wandb:
        log_to_wandb(dir, figures, summary)
    return index


def log_to_wandb(dir: Path, figures: list[tuple[str, Path]], summary: dict) -> None:
    """Tables and figures to wandb; offline unless WANDB_API_KEY is set, so it never needs an
    account (sync later with `wandb sync`)."""
    import wandb

    mode = "online" if os.environ.get("WANDB_API_KEY") else "offline"
    run = wandb.init(project=os.environ.get("WANDB_PROJECT", "stagesweep"), job_type="report",
                     dir=str(dir / "report"), mode=os.environ.get("WANDB_MODE", mode),
                     config=summary.get("settings", {}))
    for name in ("per_checkpoint", "cells", "h_total", "ordering", "format",
                 "stage_differences", "trajectory"):
        frame = _read_csv(dir / f"{name}.csv")
        if not frame.empty:
            run.log({name: wandb.Table(dataframe=frame)})
    run.log({p.stem: wandb.Image(str(p), caption=t) for t, p in figures})
    run.finish()


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "report",
        help="write report/index.html, summary.md and PNG plots from an analysis dir",
        description="Plots and a self-contained HTML page from the output of `stagesweep "
        "analyze` (or a sweep dir, analysed first).",
    )
    parser.add_argument("dir", type=Path, help="dir holding summary.json (or results.parquet)")
    parser.add_argument("--wandb", action="store_true",
                        help="also log tables and figures to wandb (offline unless "
                        "WANDB_API_KEY is set)")
    parser.set_defaults(func=handler)


def handler(args) -> int:
    from stagesweep.cli import UserError

    if not args.dir.is_dir():
        raise UserError(f"{args.dir}: not a directory")
    index = write_report(args.dir, wandb=args.wandb)
    print(f"wrote {index}")
    return 0
