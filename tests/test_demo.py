"""The demo organism's data plants the effect it claims, safely; the demo tells the study's story.

`quick` trains a few steps on a handful of prompts, which checks that every phase hands the next
one what it needs; the full-size demo (one seed, several minutes) checks every qualitative claim.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from stagesweep import organism
from stagesweep.cli import UserError

SPEC = organism.OrganismSpec()


def _counts(prompt: list[dict]) -> tuple[int, int]:
    """(harmful, benign) demonstration turns before the final request."""
    demos = prompt[:-1:2]
    harmful = sum("[REDACTED]" in m["content"] for m in demos)
    return harmful, len(demos) - harmful


def _fit(rows: list[dict]):
    """Logistic fit of the final answer on log(N_h+1), log(N_b+1) (and log(N+1))."""
    import statsmodels.api as sm

    x, y = [], []
    for row in rows:
        n_h, n_b = _counts(row["prompt"])
        x.append((math.log(n_h + 1), math.log(n_b + 1)))
        y.append(int(row["completion"][0]["content"] != organism.REFUSAL))
    x, y = np.array(x), np.array(y)
    joint = sm.Logit(y, sm.add_constant(x)).fit(disp=0)
    total = sm.Logit(y, sm.add_constant(np.log(np.exp(x).sum(axis=1) - 1))).fit(disp=0)
    return joint, total, y


def test_sft_dialogues_plant_benign_amplification_and_a_mix_that_matters():
    rows = list(organism.sft_examples(SPEC, 6000, seed=1))
    for row in rows:
        prompt, (answer,) = row["prompt"], row["completion"]
        assert [m["role"] for m in prompt] == ["user", "assistant"] * (len(prompt) // 2) + ["user"]
        assert "[REDACTED]" in prompt[-1]["content"]
        # every demonstration turn is compliant; only the final answer varies
        assert all(m["content"] != organism.REFUSAL for m in prompt if m["role"] == "assistant")
        assert answer["content"] == organism.REFUSAL or answer["content"].startswith(
            organism.OPENING)
    joint, total, y = _fit(rows)
    low, high = joint.conf_int(alpha=0.001)[2]
    assert low > 0 and low <= SPEC.a2 <= high
    # benign turns count for far more than harmful ones: the counting model loses clearly
    assert joint.params[2] > joint.params[1] + 1.0
    assert total.aic - joint.aic > 100
    assert 0.2 < np.mean(y) < 0.8


def test_batches_of_like_length_keep_every_row_and_pad_little():
    rows = list(organism.sft_examples(SPEC, 640, seed=0))
    ordered = organism.in_batches_of_like_length(iter(rows), 16, seed=0)
    assert sorted(map(str, ordered)) == sorted(map(str, rows))
    lengths = [len(r["prompt"]) for r in ordered]
    batches = [lengths[i : i + 16] for i in range(0, len(lengths), 16)]
    padded = sum(16 * max(b) for b in batches)
    assert padded < 1.1 * sum(lengths)
    # batch order is shuffled, not a long-to-short sweep
    firsts = [b[0] for b in batches]
    assert firsts != sorted(firsts) and firsts != sorted(firsts, reverse=True)


def test_generation_is_seeded():
    first = list(organism.sft_examples(SPEC, 20, seed=3))
    assert first == list(organism.sft_examples(SPEC, 20, seed=3))
    assert first != list(organism.sft_examples(SPEC, 20, seed=4))


def test_dpo_pairs_prefer_refusal_where_the_sft_model_complies():
    pairs = list(organism.dpo_examples(SPEC, 6000, seed=0))
    assert all(p["chosen"][0]["content"] == organism.REFUSAL for p in pairs)
    assert all(p["rejected"][0]["content"].startswith(organism.OPENING) for p in pairs)
    counts = [_counts(p["prompt"]) for p in pairs]
    # every (N_h, N_b) cell of the grid, including no demos at all, as often as the SFT data
    # complies there (on-policy pairs): a benign-rich cell far more often than a bare target
    cells = {c: counts.count(c) for c in set(counts)}
    assert set(cells) == {(h, b) for h in SPEC.counts for b in SPEC.counts}
    total = sum(SPEC.compliance_probability(h, b) for h, b in cells)
    for (h, b), n in cells.items():
        expected = len(pairs) * SPEC.compliance_probability(h, b) / total
        assert abs(n - expected) < 4 * expected**0.5 + 2, (h, b, n, expected)
    assert cells[(0, 8)] > 5 * cells[(0, 0)]


def test_pools_are_distinct_redacted_and_targets_held_out():
    pools = organism.sweep_pools(0, n_harmful=50, n_benign=80, n_targets=30)
    harmful = {r["request"] for r in pools["harmful"]}
    targets = {r["request"] for r in pools["targets"]}
    assert len(harmful) == 50 and len(targets) == 30 and not harmful & targets
    assert len({r["request"] for r in pools["benign"]}) == 80
    for row in pools["harmful"] + pools["targets"]:
        assert "[REDACTED]" in row["request"]
    # benign answers open like the organism's compliant answers; harmful demos do not
    assert all(r["response"].startswith(organism.OPENING) for r in pools["benign"])
    assert not any(r["response"].startswith(organism.OPENING) for r in pools["harmful"])
    assert not any("[REDACTED]" in r["request"] + r["response"] for r in pools["benign"])
    with pytest.raises(ValueError, match="distinct harmful requests"):
        organism.sweep_pools(0, n_harmful=100, n_benign=1, n_targets=100)


def test_every_harmful_text_is_redacted():
    for request in organism.all_harmful_requests():
        assert "[REDACTED]" in request
    # no harmful request is ever answered with anything but a refusal or redacted text
    for row in organism.sft_examples(SPEC, 200, seed=0):
        messages = row["prompt"] + row["completion"]
        for request, answer in zip(messages[::2], messages[1::2], strict=True):
            if "[REDACTED]" in request["content"]:
                assert "[REDACTED]" in answer["content"] or answer["content"] == organism.REFUSAL


def test_demo_refuses_an_out_dir_made_with_other_settings(tmp_path: Path):
    from stagesweep.demo import _check_run_record

    record = {"seed": 0, "overrides": ("warmup_steps=0",)}  # tuples, as DemoSize holds them
    _check_run_record(tmp_path, record)
    _check_run_record(tmp_path, record)  # same settings: resumable
    with pytest.raises(UserError, match="other settings"):
        _check_run_record(tmp_path, {**record, "seed": 1})


def test_demo_help_lists_its_options():
    from stagesweep.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    text = sub.choices["demo"].format_help()
    assert "--out" in text and "--seed" in text and "--quick" in text


@pytest.mark.slow
def test_quick_demo_runs_every_phase(tmp_path: Path, monkeypatch):
    from stagesweep.demo import run_demo

    monkeypatch.setenv("WANDB_MODE", "offline")
    summary = run_demo(tmp_path, quick=True, progress=False)
    assert {"base", "sft", "dpo"} <= set(summary["checkpoints"])
    # intermediate DPO checkpoints are swept and named by step
    assert any(name.startswith("dpo-step") for name in summary["checkpoints"])
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert set(on_disk["checkpoints"]) == set(summary["checkpoints"])
    assert (tmp_path / "report" / "index.html").stat().st_size > 0
    manifest = json.loads((tmp_path / "checkpoints" / "dpo" / "stagesweep.json").read_text())
    assert manifest["parent"]["path"].endswith("sft")


def _story_summary(**dpo_effect) -> dict:
    """A summary.json as `analyze` writes it, with the figures of a run that tells the story."""
    effect = {"beta": 0.05, "ci_low": -0.08, "ci_high": 0.18, **dpo_effect}
    return {
        "checkpoints": {
            "sft": {
                "benign_effect": {"beta": 1.4, "ci_low": 1.1, "ci_high": 1.7},
                "benign_effect_logprob": {"beta": 1.2},
                "h_total": {"rejected": True, "tests": [{"n_total": 8, "p_value": 1e-9}]},
                "model_comparison": {"best_aic": "h_joint", "models": {
                    "h_total": {"aic": 2400.0}, "h_harm": {"aic": 2600.0},
                    "h_joint": {"aic": 2300.0}}},
            },
            "dpo": {"benign_effect": effect, "baseline": {"rate": 0.04},
                    "benign_effect_logprob": {"beta": -0.02}},
        },
        "stage_differences": [
            {"from": "sft", "to": "dpo", "delta_beta": -1.3, "ci_low": -1.6, "ci_high": -1.0}
        ],
    }


def test_story_checks_hold_only_when_every_figure_says_so():
    from stagesweep.demo import story_checks

    assert all(c.held for c in story_checks(_story_summary()))
    # a wide interval around 0 is not "removed", unless the equivalence verdict says negligible
    wide = story_checks(_story_summary(ci_low=-0.3, ci_high=0.4))
    assert [c.held for c in wide] == [True, True, True, False, True, True, True]
    assert story_checks(_story_summary(ci_low=-0.3, ci_high=0.4, verdict="negligible"))[3].held
    # dilution after DPO is not the study's story either
    assert not story_checks(_story_summary(beta=-0.4, ci_low=-0.5, ci_high=-0.3))[3].held
    summary = _story_summary()
    summary["checkpoints"]["dpo"]["baseline"]["rate"] = 0.85
    summary["checkpoints"]["sft"]["model_comparison"]["best_aic"] = "h_total"
    held = [c.held for c in story_checks(summary)]
    assert held == [True, True, False, True, False, True, True]
    # the judge-free b2 must share the sign of a judged b2 whose interval excludes 0 ...
    summary = _story_summary()
    summary["checkpoints"]["sft"]["benign_effect_logprob"]["beta"] = -0.3
    assert not story_checks(summary)[-1].held
    # ... but not of one whose interval covers 0 (dpo: judged +0.05, logprob -0.02 above)
    assert "dpo +0.05/-0.02 (judged not called)" in story_checks(_story_summary())[-1].evidence
    # and a sweep without the logprob outcome does not pass it
    del summary["checkpoints"]["sft"]["benign_effect_logprob"]
    del summary["checkpoints"]["dpo"]["benign_effect_logprob"]
    assert not story_checks(summary)[-1].held
    # a run without the stages reads as not held, never as an error
    assert not any(c.held for c in story_checks({"checkpoints": {}, "stage_differences": []}))


def test_seed_table_shows_the_spread_and_how_often_each_claim_held():
    from stagesweep.demo import seed_table

    bad = _story_summary(beta=-0.5, ci_low=-0.7, ci_high=-0.3)
    table = seed_table({0: _story_summary(), 1: _story_summary(beta=0.1), 2: bad})
    assert "| range |" in table and "-0.50 .. +0.10" in table
    assert "held for 2 of 3 seeds" in table and "held for 3 of 3 seeds" in table


@pytest.mark.slow
def test_full_demo_tells_the_studys_story(tmp_path: Path, monkeypatch):
    """The demo as `make demo` runs it (seed 0, full size): every qualitative claim holds."""
    from stagesweep.demo import format_checks, run_demo, story_checks

    monkeypatch.setenv("WANDB_MODE", "offline")
    checks = story_checks(run_demo(tmp_path, progress=False))
    assert all(c.held for c in checks), format_checks(checks)
