"""The sweep end to end on tiny checkpoints: results table, resume after SIGKILL, overflow,
paired checkpoints kept apart (acceptance 1, 2 and 5 of the sweep issue)."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml
from sweep_util import wait_for_rows

from stagesweep.cli import UserError, main
from stagesweep.evaluate.plan import build_plan
from stagesweep.evaluate.pools import load_pools
from stagesweep.evaluate.spec import load_spec, parse_spec
from stagesweep.evaluate.store import RESULT_COLUMNS
from stagesweep.evaluate.sweep import preview, run_sweep
from stagesweep.lineage import write_manifest
from stagesweep.tiny_model import ensure_tiny_model

TINY = Path(__file__).resolve().parent.parent / "recipes" / "sweeps" / "tiny.yaml"
FAST = ["--no-prefix-sharing", "--quiet"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted run of the shipped tiny spec through the CLI."""
    out = tmp_path_factory.mktemp("ref")
    ckpt = ensure_tiny_model("olmo3")
    assert main(["sweep", str(TINY), "--checkpoint", str(ckpt), "--out", str(out), *FAST]) == 0
    return out, pd.read_parquet(out / "results.parquet")


def _small_spec(tmp_path: Path, **changes):
    """tiny.yaml cut to 2 targets and 1 draw (52 units), written next to its pools."""
    data = yaml.safe_load(TINY.read_text())
    data["pools"]["targets"]["max_rows"] = 2
    data["draws"] = 1
    data.update(changes)
    return parse_spec(data, source=TINY)


def test_results_table_matches_the_plan(reference):
    out, df = reference
    assert list(df.columns) == RESULT_COLUMNS
    spec = load_spec(TINY)
    units = build_plan(spec, load_pools(spec))
    # 416 rows, one per design label; 328 distinct prompts asked (cells two designs share and
    # each query's zero-demo baseline are asked once and exported under every label)
    assert len(df) == sum(len(u.labels) for u in units) == 416 and len(units) == 328
    assert sorted(df["unit_id"]) == sorted(lab.unit_id for u in units for lab in u.labels)
    assert df.groupby("prompt_sha")["response"].nunique().max() == 1
    assert df["prompt_sha"].nunique() == 328
    assert df.groupby("design").size().to_dict() == {
        "format": 32, "joint": 144, "ordering": 80, "total_count": 160}
    assert set(df["status"]) <= {"ok", "overflow", "unparsed", "no_final_answer", "failed"}
    ok = df[df["status"] == "ok"]
    assert len(ok) > 0 and set(ok["complied"].dropna()) <= {0, 1}
    assert (df["checkpoint"] == "olmo3").all() and (df["judge"] == "refusal_strings").all()
    fmt = df[df["design"] == "format"]
    assert fmt["format_adopted"].notna().all() and df.loc[
        df["design"] != "format", "format_adopted"].isna().all()
    for name in ("provenance.json", "plan.parquet", "spec.yaml"):
        assert (out / name).is_file()


def test_sigkill_then_rerun_equals_uninterrupted_run(reference, tmp_path):
    _, expected = reference
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "stagesweep", "sweep", str(TINY), "--checkpoint",
           str(ensure_tiny_model("olmo3")), "--out", str(out), *FAST]
    proc = subprocess.Popen(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"})
    rows = wait_for_rows(proc, out / "sweep.sqlite", 48, timeout=120)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert 0 < rows < 328, "the sweep must be killed mid-way"
    assert not (out / "results.parquet").exists()
    assert main(["sweep", str(TINY), "--checkpoint", str(ensure_tiny_model("olmo3")),
                 "--out", str(out), *FAST]) == 0
    resumed = pd.read_parquet(out / "results.parquet")
    pd.testing.assert_frame_equal(resumed, expected)
    with sqlite3.connect(out / "sweep.sqlite") as conn:
        assert conn.execute("SELECT COUNT(*) FROM results").fetchone()[0] == 328


def test_overflow_is_counted_never_truncated(tmp_path):
    # fit: error (the default) stops before any compute instead of storing overflow rows that
    # would fall on the large cells only (tests/test_fidelity.py covers the other policies)
    spec = _small_spec(tmp_path, max_context_tokens=300)
    ckpt = str(ensure_tiny_model("llama"))
    stats = preview(spec, [ckpt], dry_run=True)
    assert stats["llama"]["overflow"] > 0
    with pytest.raises(UserError, match=r"overflow the context window before any compute: "
                       r"llama \(window 300 tokens, max_new_tokens 16\)"):
        run_sweep(spec, [ckpt], tmp_path, prefix_sharing=False, progress=False)
    assert not (tmp_path / "results.parquet").exists()


def test_checkpoints_never_mix_and_lineage_names_them(tmp_path):
    spec = _small_spec(tmp_path)
    lineage = tmp_path / "lineage"
    for stage, arch in (("sft", "olmo3"), ("dpo", "llama")):
        import shutil

        shutil.copytree(ensure_tiny_model(arch), lineage / stage)
        write_manifest(lineage / stage, {"stage": stage, "method": stage, "global_step": 3})
    out = tmp_path / "out"
    df = pd.read_parquet(run_sweep(spec, [], out, lineage=lineage, prefix_sharing=False,
                                   progress=False))
    assert sorted(df["checkpoint"].unique()) == ["dpo", "sft"]
    assert (df.groupby("checkpoint").size() == 52).all()
    assert set(df["stage"]) == {"sft", "dpo"} and (df["step"] == 3).all()
    # Same unit ids for both stages (paired), answers from each stage's own model.
    sft, dpo = (df[df["checkpoint"] == n].set_index("unit_id") for n in ("sft", "dpo"))
    assert set(sft.index) == set(dpo.index)
    assert (sft["prompt_tokens"] != dpo.loc[sft.index, "prompt_tokens"]).any()
    # Swapping the weights behind a name gives a new fingerprint: nothing is reused.
    (lineage / "sft" / "model.safetensors").write_bytes(
        (lineage / "dpo" / "model.safetensors").read_bytes())
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json",
                 "chat_template.jinja", "generation_config.json"):
        (lineage / "sft" / name).write_bytes((lineage / "dpo" / name).read_bytes())
    swapped = pd.read_parquet(run_sweep(spec, [str(lineage / "sft")], out,
                                        prefix_sharing=False, progress=False))
    assert list(swapped["response"]) == list(
        df[df["checkpoint"] == "dpo"].sort_values(["design", "query_id", "draw", "n_harmful",
                                                   "n_benign", "schedule", "opening",
                                                   "unit_id"])["response"])
    # A changed spec never reuses stored answers of different prompts.
    with pytest.raises(UserError, match="use a new --out dir"):
        run_sweep(_small_spec(tmp_path, system_prompt="Be brief."), [str(lineage / "dpo")],
                  out, prefix_sharing=False, progress=False)


def test_identical_weights_under_two_names_are_answered_once(tmp_path):
    # A `checkpoint-N` saved at a stage's last step has the stage output's weights.
    import shutil

    spec = _small_spec(tmp_path)
    shutil.copytree(ensure_tiny_model("olmo3"), tmp_path / "dpo")
    shutil.copytree(ensure_tiny_model("olmo3"), tmp_path / "dpo" / "checkpoint-9")
    write_manifest(tmp_path / "dpo", {"stage": "dpo", "method": "dpo", "global_step": 9})
    write_manifest(tmp_path / "dpo" / "checkpoint-9",
                   {"stage": "dpo", "method": "dpo", "global_step": 9})
    out = tmp_path / "out"
    df = pd.read_parquet(run_sweep(spec, [], out, lineage=tmp_path / "dpo",
                                   prefix_sharing=False, progress=False))
    assert sorted(df["checkpoint"].unique()) == ["dpo", "dpo-step9"]
    both = [df[df["checkpoint"] == n].set_index("unit_id")["response"]
            for n in ("dpo", "dpo-step9")]
    assert len(both[0]) == 52 and both[0].equals(both[1].loc[both[0].index])
    with sqlite3.connect(out / "sweep.sqlite") as conn:  # generated once, stored once
        # 42 distinct prompts behind the 52 rows (cells two designs share are asked once)
        assert conn.execute("SELECT COUNT(*) FROM results").fetchone()[0] == 42


def test_bad_inputs_fail_before_generation(tmp_path, capsys):
    spec = _small_spec(tmp_path)
    spec.designs[0].n = [64]
    with pytest.raises(UserError, match="which has only 24"):
        run_sweep(spec, [str(ensure_tiny_model("olmo3"))], tmp_path)
    assert not (tmp_path / "sweep.sqlite").exists()
    assert main(["sweep", str(TINY), "--checkpoint", str(tmp_path / "nope"), "--out",
                 str(tmp_path)]) == 2
    assert "neither a directory nor a hub id" in capsys.readouterr().err
