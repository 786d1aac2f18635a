"""`stagesweep view` in a real headless browser, on a real sweep of an sft -> dpo lineage of
tiny checkpoints: a unit's prompt, answers and verdicts, the stage columns, the filters
(including "label changed between sft and dpo"), model text that stays inert, and the view
served on 127.0.0.1."""

from __future__ import annotations

import json
import shutil
import sqlite3
import threading
from pathlib import Path

import pandas as pd
import pytest
import yaml
from browser import browser_session, open_page

from stagesweep.cli import main
from stagesweep.evaluate.spec import parse_spec
from stagesweep.evaluate.sweep import run_sweep
from stagesweep.evaluate.view import build_view, view_server
from stagesweep.lineage import write_manifest
from stagesweep.tiny_model import ensure_tiny_model

TINY = Path(__file__).resolve().parent.parent / "recipes" / "sweeps" / "tiny.yaml"
TARGETS = TINY.parent.parent.parent / "stagesweep" / "data" / "pools" / "tiny_targets.jsonl"
# An answer a model could give that would run code if the page ever treated it as markup.
XSS = {"response": '<script>window.__xss = 1</script><img src=x onerror="window.__xss = 2">',
       "reasoning": '<img src=y onerror="window.__xss = 3">think',
       "judge_raw": '<svg onload="window.__xss = 4"></svg>raw'}


@pytest.fixture(scope="module")
def lineage_sweep(tmp_path_factory, one_thread):
    """tiny.yaml cut to 2 targets x 1 draw (52 units), swept on sft and dpo checkpoints; one
    stored dpo answer is replaced by markup (a model's answer is arbitrary text)."""
    root = tmp_path_factory.mktemp("view")
    data = yaml.safe_load(TINY.read_text())
    data["pools"]["targets"]["max_rows"] = 2
    data["draws"] = 1
    for stage, arch in (("sft", "olmo3"), ("dpo", "llama")):
        shutil.copytree(ensure_tiny_model(arch), root / "lineage" / stage)
        write_manifest(root / "lineage" / stage, {"stage": stage, "method": stage,
                                                  "global_step": 3})
    out = root / "sweep"
    run_sweep(parse_spec(data, source=TINY), [], out, lineage=root / "lineage",
              prefix_sharing=False, progress=False)
    results = pd.read_parquet(out / "results.parquet")
    xss_unit = results.loc[results["design"] == "joint", "unit_id"].iloc[-1]
    at = (results["checkpoint"] == "dpo") & (results["unit_id"] == xss_unit)
    results.loc[at, ["response", "complied", "status"]] = [XSS["response"], 1, "ok"]
    results.to_parquet(out / "results.parquet", index=False)
    fingerprint = next(c["fingerprint"] for c in json.loads(
        (out / "provenance.json").read_text())["checkpoints"] if c["name"] == "dpo")
    plan = pd.read_parquet(out / "plan.parquet")
    stored = plan.loc[plan["prompt_sha"] == results.loc[at, "prompt_sha"].iloc[0], "unit_id"]
    with sqlite3.connect(out / "sweep.sqlite") as conn:
        conn.execute("UPDATE results SET reasoning = ?, judge_raw = ? WHERE fingerprint = ? "
                     "AND unit_id = ?", (XSS["reasoning"], XSS["judge_raw"], fingerprint,
                                         stored.iloc[0]))
    assert main(["view", str(root)]) == 0  # a dir of sweeps, as the demo's --out
    return root / "view" / "index.html", pd.read_parquet(out / "results.parquet"), xss_unit


def _wide(results: pd.DataFrame) -> pd.DataFrame:
    """One row per unit: label per checkpoint ('c', 'r' or the status)."""
    label = results["status"].where(results["status"] != "ok",
                                    results["complied"].map({1: "c", 0: "r"}))
    return results.assign(label=label).pivot(index="unit_id", columns="checkpoint",
                                             values="label").join(
        results.drop_duplicates("unit_id").set_index("unit_id")[["design", "n_harmful",
                                                                 "n_benign"]])


def _count(page) -> int:
    return int(page.inner_text("#count").split(" of ")[0].replace(",", ""))


def test_unit_prompt_answers_stage_columns_and_filters(lineage_sweep):
    index, results, _ = lineage_sweep
    wide = _wide(results)
    targets = {r["id"]: r["request"] for r in map(json.loads, TARGETS.read_text().splitlines())}
    with browser_session() as browser:
        view = open_page(browser, index.as_uri())
        page = view.page
        page.wait_for_selector("body[data-ready='1']")
        assert _count(page) == len(wide) == 52
        header = page.eval_on_selector_all("#units thead th", "ths => ths.map(t => t.textContent)")
        assert header[-2:] == ["sft", "dpo"]  # stage columns in lineage order

        # "changed between sft and dpo": complied at sft, refused at dpo
        page.select_option("#f-from", "sft")
        page.select_option("#f-to", "dpo")
        page.select_option("#f-change", "cr")
        changed = wide[(wide["sft"] == "c") & (wide["dpo"] == "r")]
        assert 0 < _count(page) == len(changed) < 52
        labels = page.eval_on_selector_all(
            "#units tbody tr", "rows => rows.map(r => [...r.querySelectorAll('td[data-label]')]"
            ".map(td => td.dataset.label).join(''))")
        assert labels and set(labels) == {"cr"}
        page.select_option("#f-design", "joint")
        joint = changed[changed["design"] == "joint"]
        assert _count(page) == len(joint)
        assert "from=sft" in page.url and "design=joint" in page.url
        view.screenshot("view-changed-sft-to-dpo")

        # one unit: prompt rebuilt from the pools, target highlighted, answers side by side
        shown = page.eval_on_selector_all("#units tbody tr", "r => r.map(x => x.dataset.unit)")
        demos = (joint["n_harmful"] + joint["n_benign"]).loc[shown]
        first = demos.index[demos.argmax()]  # the unit with the most demos on the page
        page.click(f"#units tbody tr[data-unit='{first}']")
        page.wait_for_selector("#detail .stage")
        unit = results[results["unit_id"] == first]
        n_h, n_b = int(unit["n_harmful"].iloc[0]), int(unit["n_benign"].iloc[0])
        assert page.inner_text("#detail .target").endswith(targets[unit["query_id"].iloc[0]])
        assert page.inner_text("#detail details.demos summary").startswith(
            f"{n_h + n_b} demonstrations: {n_h} harmful, {n_b} benign")
        page.click("#detail details.demos summary")
        page.wait_for_selector("#detail .demo")
        assert page.locator("#detail .demo.harmful").count() == n_h
        assert page.locator("#detail .demo.benign").count() == n_b
        assert page.locator("#detail .strip span").count() == n_h + n_b
        columns = page.eval_on_selector_all("#detail .stage", "s => s.map(x => x.dataset.ckpt)")
        assert columns == ["sft", "dpo"]
        for name in columns:
            row = unit[unit["checkpoint"] == name].iloc[0]
            column = f"#detail .stage[data-ckpt='{name}']"
            assert page.text_content(f"{column} .answer") == row["response"]
            verdict = {1: "complied", 0: "refused"}[row["complied"]]
            assert page.inner_text(f"{column} .verdict") == verdict
        view.screenshot("view-unit")

        # the labels filter at one checkpoint, and a link that sets filters (as the report's)
        page.goto(index.as_uri() + "#checkpoint=dpo&label=c")
        page.reload()
        page.wait_for_selector("body[data-ready='1']")
        assert _count(page) == int((wide["dpo"] == "c").sum())
        page.click("#reset")
        assert _count(page) == 52
        count, broken = view.images_loaded()
        assert broken == []
        assert view.errors == []


def test_model_text_is_shown_as_text_never_run(lineage_sweep):
    index, _, xss_unit = lineage_sweep
    with browser_session() as browser:
        view = open_page(browser, index.as_uri() + f"#unit={xss_unit}")
        page = view.page
        page.wait_for_selector("#detail .stage[data-ckpt='dpo'] .answer")
        for details in page.query_selector_all("#detail details"):
            details.evaluate("d => d.open = true")
        column = "#detail .stage[data-ckpt='dpo']"
        assert page.text_content(f"{column} .answer") == XSS["response"]
        assert page.text_content(f"{column} .reasoning .answer") == XSS["reasoning"]
        assert page.text_content(f"{column} .judge-raw .answer") == XSS["judge_raw"]
        page.wait_for_timeout(300)  # time for any onerror/onload to fire, were it markup
        assert page.evaluate("window.__xss") is None
        assert page.locator("#detail img, #detail script, #detail svg").count() == 0
        view.screenshot("view-xss-inert")
        assert view.errors == []


def test_view_served_on_loopback(lineage_sweep):
    index, _, _ = lineage_sweep
    server = view_server(index.parent, port=0)
    host, port = server.server_address[:2]
    assert host == "127.0.0.1"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        with browser_session() as browser:
            view = open_page(browser, f"http://127.0.0.1:{port}/index.html")
            view.page.wait_for_selector("body[data-ready='1']")
            view.page.click("#units tbody tr")
            view.page.wait_for_selector("#detail .stage .answer")
            assert _count(view.page) == 52 and view.errors == []
    finally:
        server.shutdown()
        server.server_close()


def test_view_of_a_dir_without_sweeps_is_a_one_line_error(tmp_path, capsys):
    assert main(["view", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "no results.parquet" in err and err.count("\n") == 1
    (tmp_path / "view").mkdir()
    (tmp_path / "view" / "notes.txt").write_text("mine")
    sweep = tmp_path / "s"
    sweep.mkdir()
    pd.DataFrame({"unit_id": ["u"], "checkpoint": ["c"], "stage": [None], "step": [None]}
                 ).to_parquet(sweep / "results.parquet")
    with pytest.raises(Exception, match="not a stagesweep view"):
        build_view([sweep], tmp_path / "view")
    assert (tmp_path / "view" / "notes.txt").read_text() == "mine"


@pytest.mark.slow
def test_demo_output_in_the_viewer(tmp_path, monkeypatch):
    """The quick demo's own output (base -> sft -> dpo with intermediate steps), viewed."""
    from stagesweep.demo import run_demo

    monkeypatch.setenv("WANDB_MODE", "offline")
    run_demo(tmp_path, quick=True, progress=False)
    assert main(["view", str(tmp_path)]) == 0
    results = pd.read_parquet(tmp_path / "sweep" / "results.parquet")
    wide = _wide(results)
    order = [c for c in ("base", "sft", "dpo") if c in wide.columns]
    with browser_session() as browser:
        view = open_page(browser, (tmp_path / "view" / "index.html").as_uri())
        page = view.page
        page.wait_for_selector("body[data-ready='1']")
        header = page.eval_on_selector_all("#units thead th", "t => t.map(x => x.textContent)")
        stages = [h.split(" ")[0] for h in header[9:]]
        assert set(stages) == set(results["checkpoint"]) and stages[-1] == "dpo"
        assert [s for s in stages if s in order] == order
        page.select_option("#f-from", "sft")
        page.select_option("#f-to", "dpo")
        ok = wide["sft"].isin(["c", "r"]) & wide["dpo"].isin(["c", "r"])
        assert _count(page) == (ok & (wide["sft"] != wide["dpo"])).sum()
        page.select_option("#f-change", "cr")
        assert _count(page) == ((wide["sft"] == "c") & (wide["dpo"] == "r")).sum()
        page.click("#reset")
        page.click("#units tbody tr >> nth=-1")
        page.wait_for_selector("#detail .stage .answer")
        assert page.locator("#detail .target").count() == 1
        assert page.locator("#detail .stage").count() == len(stages)
        view.screenshot("view-demo")
        assert view.errors == []
