"""Real-model fidelity of rendering (issue 9): one render date per sweep, template options, no
silent template override, templates that change between stages, and context windows."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
import yaml

from stagesweep.cli import UserError, main
from stagesweep.evaluate import render
from stagesweep.evaluate.analysis.run import analyze
from stagesweep.evaluate.plan import build_plan
from stagesweep.evaluate.pools import load_pools
from stagesweep.evaluate.render import load_tokenizer, render_prompt, render_text
from stagesweep.evaluate.spec import parse_spec
from stagesweep.evaluate.store import ResultStore
from stagesweep.evaluate.sweep import preview, run_sweep
from stagesweep.lineage import write_manifest
from stagesweep.tiny_model import ensure_tiny_model

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "recipes" / "sweeps" / "tiny.yaml"
PAPER = ROOT / "recipes" / "sweeps" / "paper.yaml"
JOINT = [{"type": "joint", "n_harmful": [0, 2], "n_benign": [0, 2]}]
QUIET = {"prefix_sharing": False, "progress": False}

pytestmark = pytest.mark.usefixtures("one_thread")


def _spec(designs=None, **changes):
    """tiny.yaml with 2 targets, 1 draw and (by default) a 2 x 2 joint grid: 8 units."""
    data = yaml.safe_load(TINY.read_text())
    data["pools"]["targets"]["max_rows"] = 2
    data["draws"] = 1
    data["designs"] = designs or JOINT
    data.update(changes)
    return parse_spec(data, source=TINY)


def _one_unit(spec):
    pools = load_pools(spec)
    return pools, max(build_plan(spec, pools), key=lambda u: len(u.demos))


# ------------------------------------------------------------------ one render date per sweep


def test_every_template_gets_the_render_date_and_options():
    spec = _spec(render_date="2025-01-05", chat_template_kwargs={"reasoning_effort": "low"})
    pools, unit = _one_unit(spec)
    harmony = load_tokenizer(str(ensure_tiny_model("gpt-oss")))
    text = render_prompt(harmony, unit, pools, spec)[0]
    assert "Current date: 2025-01-05\n" in text and "Reasoning: low\n" in text
    llama = load_tokenizer(str(ensure_tiny_model("llama")))
    assert "Cutting Knowledge Date: December 2023\nToday Date: 05 Jan 2025\n\n<|eot_id|>" in \
        render_prompt(llama, unit, pools, spec)[0]
    # YAML's unquoted dates are read too; anything else is one line naming the key
    import datetime

    assert _spec(render_date=datetime.date(2025, 1, 5)).render_date == "2025-01-05"
    with pytest.raises(UserError, match="render_date is 'Jan 5'; write a date as YYYY-MM-DD"):
        _spec(render_date="Jan 5")
    # a template without dates renders exactly as transformers renders it
    olmo = load_tokenizer(str(ensure_tiny_model("olmo3")))
    messages = [{"role": "user", "content": "hi"}]
    assert render_text(olmo, messages, spec) == olmo.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=False)


# How the released templates ask for a date (written out from openai/gpt-oss-20b,
# meta-llama/Llama-3.1-8B-Instruct and meta-llama/Llama-3.2-1B-Instruct chat templates).
UPSTREAM_DATE_TEMPLATES = {
    "gpt-oss": (
        "{%- macro build_system_message() -%}"
        "{{- 'Knowledge cutoff: 2024-06\\n' }}"
        "{{- 'Current date: ' + strftime_now('%Y-%m-%d') + '\\n\\n' }}"
        "{%- if reasoning_effort is not defined %}{%- set reasoning_effort = 'medium' %}"
        "{%- endif %}{{- 'Reasoning: ' + reasoning_effort + '\\n\\n' }}"
        "{%- endmacro -%}"
        "{{- '<|start|>system<|message|>' }}{{- build_system_message() }}{{- '<|end|>' }}"
    ),
    "llama-3.1": (
        "{%- if not date_string is defined %}{%- set date_string = '26 Jul 2024' %}{%- endif %}"
        "{{- 'Cutting Knowledge Date: December 2023\\n' }}"
        "{{- 'Today Date: ' + date_string + '\\n\\n' }}"
    ),
    "llama-3.2": (
        "{%- if not date_string is defined %}{%- if strftime_now is defined %}"
        "{%- set date_string = strftime_now('%d %b %Y') %}{%- else %}"
        "{%- set date_string = '26 Jul 2024' %}{%- endif %}{%- endif %}"
        "{{- 'Today Date: ' + date_string + '\\n\\n' }}"
    ),
}


@pytest.mark.parametrize("name, expected", [
    ("gpt-oss", "Current date: 2025-01-05\n\nReasoning: low\n"),
    ("llama-3.1", "Today Date: 05 Jan 2025\n"),
    ("llama-3.2", "Today Date: 05 Jan 2025\n"),
])
def test_released_templates_render_the_sweep_date_not_today(name, expected):
    tok = load_tokenizer(str(ensure_tiny_model("olmo3")))
    tok.chat_template = UPSTREAM_DATE_TEMPLATES[name]
    spec = _spec(render_date="2025-01-05", chat_template_kwargs={"reasoning_effort": "low"})
    assert expected in render_text(tok, [{"role": "user", "content": "hi"}], spec)


def test_gpt_oss_sweep_killed_and_resumed_a_day_later_equals_uninterrupted(tmp_path, monkeypatch):
    ckpt = str(ensure_tiny_model("gpt-oss"))
    monkeypatch.setattr(render, "today", lambda: "2026-03-01")
    expected = pd.read_parquet(run_sweep(_spec(), [ckpt], tmp_path / "ref", **QUIET))

    out, real_put, puts = tmp_path / "killed", ResultStore.put, []

    def dies_after_first_batch(self, rows):
        puts.append(len(rows))
        if len(puts) > 1:
            raise KeyboardInterrupt  # the process dies here; earlier batches are committed
        real_put(self, rows)

    monkeypatch.setattr(ResultStore, "put", dies_after_first_batch)
    with pytest.raises(KeyboardInterrupt):
        run_sweep(_spec(generation={"max_new_tokens": 16, "batch_size": 3}), [ckpt], out,
                  **QUIET)
    monkeypatch.setattr(ResultStore, "put", real_put)
    monkeypatch.setattr(render, "today", lambda: "2026-03-02")  # resumed the next day
    resumed = pd.read_parquet(run_sweep(_spec(generation={"max_new_tokens": 16,
                                                          "batch_size": 3}),
                                        [ckpt], out, **QUIET))
    pd.testing.assert_frame_equal(resumed.drop(columns="prompt_sha", errors="ignore"),
                                  expected.drop(columns="prompt_sha", errors="ignore"))
    assert json.loads((out / "render.json").read_text()) == {"render_date": "2026-03-01"}
    provenance = json.loads((out / "provenance.json").read_text())
    assert provenance["templates"]["render_date"] == "2026-03-01"
    spec = _spec(render_date="2026-03-01")
    pools, unit = _one_unit(spec)
    text = render_prompt(load_tokenizer(ckpt), unit, pools, spec)[0]
    assert "Current date: 2026-03-01\n" in text


# ------------------------------------------------------------------ the tiny families


def test_llama_system_prompt_after_both_date_lines_and_olmo_default_replaced():
    spec = _spec(system_prompt="Be brief.", render_date="2024-07-26")
    pools, unit = _one_unit(spec)
    llama = render_prompt(load_tokenizer(str(ensure_tiny_model("llama"))), unit, pools, spec)[0]
    assert llama.startswith(
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: "
        "December 2023\nToday Date: 26 Jul 2024\n\nBe brief.<|eot_id|>")
    olmo = render_prompt(load_tokenizer(str(ensure_tiny_model("olmo3"))), unit, pools, spec)[0]
    assert olmo.startswith("<|im_start|>system\nBe brief.<|im_end|>\n")
    assert "function-calling" not in olmo
    gemma4 = render_prompt(load_tokenizer(str(ensure_tiny_model("gemma4"))), unit, pools, spec)[0]
    assert gemma4.startswith("<bos><|turn>system\nBe brief.<turn|>\n<|turn>user\n")
    assert gemma4.endswith("<turn|>\n<|turn>model\n")
    spec.chat_template_kwargs = {"enable_thinking": True}
    assert render_prompt(load_tokenizer(str(ensure_tiny_model("gemma4"))), unit, pools,
                         spec)[0].startswith("<bos><|turn>system\n<|think|>Be brief.<turn|>")


# ------------------------------------------------------------------ no silent override


def test_chat_template_on_a_checkpoint_with_one_is_refused(tmp_path, capsys):
    ckpt = str(ensure_tiny_model("llama"))
    args = ["sweep", str(TINY), "--checkpoint", ckpt, "--out", str(tmp_path), "--dry-run",
            "--chat-template", "olmo3"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--override-chat-template" in err
    assert main([*args, "--override-chat-template"]) == 0
    assert "llama: chat template olmo3 (sha " in capsys.readouterr().out


# ------------------------------------------------------------------ templates between stages


def _lineage(tmp_path: Path) -> Path:
    """sft and dpo of one tiny OLMo; the dpo template adds an identity system prompt (as OLMo
    3.1's final checkpoint does)."""
    lineage = tmp_path / "lineage"
    for stage in ("sft", "dpo"):
        shutil.copytree(ensure_tiny_model("olmo3"), lineage / stage)
        write_manifest(lineage / stage, {"stage": stage, "method": stage, "global_step": 1})
    template = lineage / "dpo" / "chat_template.jinja"
    template.write_text(template.read_text().replace(
        "You are a helpful function-calling AI assistant.",
        "You are Olmo, a helpful AI assistant built by Ai2."))
    return lineage


def test_template_change_between_stages_is_flagged_and_render_with_controls_it(tmp_path,
                                                                               capsys):
    lineage = _lineage(tmp_path)
    out = tmp_path / "sweep"
    run_sweep(_spec(), [], out, lineage=lineage, **QUIET)
    assert "warning: template differs sft -> dpo" in capsys.readouterr().out
    summary = analyze(out, tmp_path / "analysis")
    templates = json.loads((tmp_path / "analysis" / "summary.json").read_text())["templates"]
    assert templates == summary["templates"]
    assert [(d["from"], d["to"]) for d in templates["differences"]] == [("sft", "dpo")]
    assert any("built by Ai2" in line for line in templates["differences"][0]["lines"])
    assert {c["template"] for c in templates["checkpoints"].values()} == {"own"}
    (difference,) = summary["stage_differences"]
    assert difference["template_differs"] is True
    assert main(["report", str(tmp_path / "analysis")]) == 0
    report = (tmp_path / "analysis" / "report" / "summary.md").read_text()
    assert "dpo (template differs)" in report and "rendered with chat template own" in report

    controlled = tmp_path / "controlled"
    run_sweep(_spec(render_with="sft"), [], controlled, lineage=lineage, **QUIET)
    summary = analyze(controlled, tmp_path / "analysis2")
    assert summary["templates"]["differences"] == []
    assert summary["stage_differences"][0]["template_differs"] is False
    assert summary["templates"]["checkpoints"]["dpo"]["template"] == "render_with:sft"
    # both stages answered identical prompts
    df = pd.read_parquet(controlled / "results.parquet")
    assert df.groupby("unit_id")["prompt_tokens"].nunique().max() == 1


def test_render_with_refused_when_special_tokens_differ(tmp_path):
    ckpts = [str(ensure_tiny_model("olmo3")), str(ensure_tiny_model("llama"))]
    with pytest.raises(UserError, match="render_with: olmo3: checkpoint llama has other special"):
        preview(_spec(render_with="olmo3"), ckpts)
    with pytest.raises(UserError, match="render_with: 'nope' names none of the swept"):
        preview(_spec(render_with="nope"), ckpts)


# ------------------------------------------------------------------ context windows


def _paper_like(tmp_path: Path, **changes):
    """paper.yaml's designs on synthetic, redacted local pools big enough for 128 demos."""
    words = " ".join(["step"] * 60)
    for name, n in (("harmful", 160), ("benign", 160), ("targets", 1)):
        rows = [{"id": f"{name}{i}", "request": f"[REDACTED] {name} request {i}",
                 "response": f"Sure. [REDACTED] {words} {i}."} for i in range(n)]
        (tmp_path / f"{name}.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    data = yaml.safe_load(PAPER.read_text())
    local = {"columns": {"id": "id", "request": "request", "response": "response"}}
    data["pools"] = {name: {"path": str(tmp_path / f"{name}.jsonl"), **local}
                     for name in ("harmful", "benign", "targets")}
    for alias in ("orbench", "safe_rewrites"):
        data["pools"][alias] = data["pools"]["benign"]
    data.update({"targets": "targets", "draws": 1, "max_context_tokens": 4096,
                 "judge": "refusal_strings", "judge_options": {}, **changes})
    return parse_spec(data, source=tmp_path / "paper.yaml")


def test_dry_run_of_paper_spec_reports_overflowing_cells(tmp_path, capsys):
    ckpt = str(ensure_tiny_model("llama"))
    stats = preview(_paper_like(tmp_path), [ckpt])
    printed = capsys.readouterr().out
    assert stats["llama"]["overflow"] > 0
    line = next(li for li in printed.splitlines() if li.startswith("overflow: llama"))
    assert "window 4096 tokens" in line and "total_count N_h=0 N_b=128" in line
    assert "total_count N_h=0 N_b=4 " not in line
    assert "fit: error: the sweep would stop before any compute" in printed


def test_fit_error_stops_before_compute_and_the_other_policies_leave_no_overflow(tmp_path):
    ckpt = str(ensure_tiny_model("llama"))
    grid = [{"type": "total_count", "n": [4, 64, 128], "phi": [0, 0.5]}]
    small = {"generation": {"max_new_tokens": 2, "batch_size": 8}}
    with pytest.raises(UserError, match=r"overflow the context window before any compute: "
                       r"llama \(window 4096 tokens.*N_h=64 N_b=64"):
        run_sweep(_paper_like(tmp_path, designs=grid, **small), [ckpt], tmp_path / "e", **QUIET)
    assert not list((tmp_path / "e").glob("*.sqlite"))

    dropped = pd.read_parquet(run_sweep(_paper_like(tmp_path, designs=grid, fit="drop_cells",
                                                    **small), [ckpt], tmp_path / "d", **QUIET))
    assert (dropped["status"] != "overflow").all()
    totals = set(dropped["n_harmful"] + dropped["n_benign"])
    assert 4 in totals and 128 not in totals  # whole cells go, for every query

    cut = pd.read_parquet(run_sweep(_paper_like(tmp_path, designs=grid, fit="truncate_demos",
                                                **small), [ckpt], tmp_path / "t", **QUIET))
    assert (cut["status"] != "overflow").all()
    assert set(cut["n_harmful"] + cut["n_benign"]) == {4, 64, 128}
    assert cut["prompt_tokens"].max() + 2 <= 4096


def test_gemma4_sweeps_with_its_thought_channel_split_before_judging(tmp_path):
    ckpt = str(ensure_tiny_model("gemma4"))
    df = pd.read_parquet(run_sweep(_spec(), [ckpt], tmp_path, **QUIET))
    provenance = json.loads((tmp_path / "provenance.json").read_text())
    assert provenance["checkpoints"][0]["reasoning_family"] == "gemma4"
    # answers are decoded with special tokens kept, so a thought could be cut off here; none
    # of the turn markers reach the judge
    answered = df[df["status"] == "ok"]
    assert len(answered) > 0 and not answered["response"].str.contains("<turn|>").any()
