"""The report as a person sees it, in a real headless browser: it opens with the study-shaped
answer table, every image loads, nothing errors, and a plot's point links to the answers behind
it in the viewer."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
from browser import browser_session, open_page

from stagesweep.evaluate.analysis import analyze
from stagesweep.evaluate.analysis.simulate import SimCheckpoint, SimSpec, simulate
from stagesweep.evaluate.audit import PUBLISHED
from stagesweep.evaluate.report import write_report
from stagesweep.evaluate.view import build_view


def _analysed(dir: Path) -> pd.DataFrame:
    """A simulated lineage with every design, analysed into `dir`, its table as a sweep dir."""
    results = simulate(SimSpec(
        design="total_count", queries=10, seed=3, intercept_sd=0.3,
        ordering={"prefix": -0.8, "random": 0.0, "suffix": 0.8}, format_adoption=(0.2, 0.8),
        checkpoints=[SimCheckpoint("sft", 0.6, "sft"), SimCheckpoint("dpo-step4", 0.2, "dpo", 4),
                     SimCheckpoint("dpo", -0.3, "dpo")]))
    (dir / "sweep").mkdir(parents=True)
    results.to_parquet(dir / "sweep" / "results.parquet", index=False)
    analyze(dir / "sweep", dir)
    return results


def test_report_in_a_browser_links_plot_points_to_their_answers(tmp_path):
    results = _analysed(tmp_path)
    build_view([tmp_path])  # tmp_path/view, which the report's links point at
    index = write_report(tmp_path)
    summary = json.loads((tmp_path / "summary.json").read_text())
    pngs = sorted(p.name for p in (tmp_path / "report").glob("*.png"))
    with browser_session() as browser:
        report = open_page(browser, index.as_uri())
        page = report.page
        count, broken = report.images_loaded()
        assert count == len(pngs) >= 5 and broken == []
        # the page opens with the answer: the study-shaped table, checkpoints then differences
        assert page.inner_text("h2 >> nth=0") == "The answer"
        first = page.eval_on_selector_all(
            "table >> nth=0 >> tbody tr", "rows => rows.map(r => r.cells[0].textContent)")
        assert first == [*summary["checkpoints"], *(f"{d['from']} → {d['to']} (Δb2)"
                                                    for d in summary["stage_differences"])]
        verdict = page.inner_text("table >> nth=0 >> tbody tr >> nth=0 >> td >> nth=4")
        assert verdict == summary["checkpoints"]["sft"]["benign_effect"]["verdict"]
        # every plot's points lead to their answers
        assert page.locator("figure").count() == len(pngs)
        assert page.locator("figure details.answers").count() == len(pngs)
        report.screenshot("report")
        assert report.errors == []

        # a point of the compliance-vs-N_b plot opens its answers in the viewer
        figure = page.locator("figure", has_text="Compliance vs N_b")
        figure.locator("details.answers summary").click()
        link = figure.locator("details.answers a").nth(5)
        label = link.inner_text()  # "<checkpoint> N_h=<h> N_b=<b>: <rate>"
        name, cell = label.split(" N_h=")
        n_h, n_b = (int(x) for x in cell.split(":")[0].split(" N_b="))
        link.click()
        page.wait_for_selector("body[data-ready='1']")
        assert page.url.split("#")[0].endswith("/view/index.html")
        expected = ((results["checkpoint"] == name) & (results["n_harmful"] == n_h)
                    & (results["n_benign"] == n_b)).sum()
        assert page.inner_text("#count").startswith(f"{expected} of")
        assert page.input_value("#f-at") == name
        page.click("#units tbody tr")
        page.wait_for_selector("#detail .stage")
        # a bare results table holds no prompt: the viewer says so instead of failing
        assert "cannot be rebuilt" in page.inner_text("#detail .prompt")
        assert report.errors == []


def test_audit_report_puts_the_published_rows_beside_the_checkpoint(tmp_path):
    _analysed(tmp_path)
    (tmp_path / "audit.json").write_text(json.dumps({"failed": False}))
    md = (write_report(tmp_path).parent / "summary.md").read_text()
    answer = md.split("## The answer")[1].split("##")[0]
    assert "| sft |" in answer
    for model, b2, *_ in PUBLISHED:
        assert f"| {model} (published) | {b2:+.4f} |" in answer
