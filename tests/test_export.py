"""`stagesweep export`: a sweep's answers round-trip through `datasets.load_from_disk` with every
column of results.parquet, the store-only columns and each prompt's demos."""

from __future__ import annotations

import json

import datasets
import pandas as pd
import pytest
from synthetic_sweep import synthetic_sweep

from stagesweep.cli import main
from stagesweep.evaluate.export import find_sweeps
from stagesweep.evaluate.store import RESULT_COLUMNS


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    # phi 0 and N_b 0 cells make prompts that the plan asks once for two labels
    return synthetic_sweep(tmp_path_factory.mktemp("export") / "sweep", queries=5, draws=2,
                           grid={"n": [2, 4], "phi": [0, 0.5, 1]}, harmful=10, benign=10,
                           checkpoints=[("sft", "sft"), ("dpo", "dpo")])


def test_export_round_trips_every_column(sweep, tmp_path, capsys):
    dest = tmp_path / "dataset"
    assert main(["export", str(sweep), "--to", str(dest)]) == 0
    assert "exported" in capsys.readouterr().out
    loaded = datasets.load_from_disk(str(dest)).to_pandas()
    results = pd.read_parquet(sweep / "results.parquet")
    assert len(loaded) == len(results) == 2 * 5 * 2 * 6
    extra = {"sample", "fingerprint", "reasoning", "judge_raw", "finish_reason", "demos", "query",
             "sweep"}
    assert set(loaded.columns) == set(RESULT_COLUMNS) | extra
    key = ["checkpoint", "unit_id"]
    got = loaded.sort_values(key).reset_index(drop=True)
    want = results.sort_values(key).reset_index(drop=True)
    for column in RESULT_COLUMNS:
        assert got[column].astype(object).where(got[column].notna(), None).tolist() == \
            want[column].astype(object).where(want[column].notna(), None).tolist(), column
    # store-only columns, found through the prompt each row's answer was stored under
    assert (got["reasoning"] == "thinking about " + got["query_id"]).all()
    assert (got["judge_raw"] == got["complied"].map({1: "complied", 0: "refused"})).all()
    assert set(got["fingerprint"]) == {"fp-sft", "fp-dpo"} and (got["sample"] == 0).all()
    assert (got["finish_reason"] == "stop").all()
    plan = pd.read_parquet(sweep / "plan.parquet").set_index("prompt_sha")
    for row in got.itertuples():
        assert list(row.demos) == list(plan.loc[row.prompt_sha, "demos"])
        assert len(row.demos) == row.n_harmful + row.n_benign
    targets = {r["id"]: r["request"] for r in
               map(json.loads, (sweep / "pools" / "targets.jsonl").read_text().splitlines())}
    assert (got["query"] == got["query_id"].map(targets)).all()


def test_push_to_hub_without_a_token_is_a_one_line_error(sweep, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # no stored login either
    dest = tmp_path / "dataset"
    assert main(["export", str(sweep), "--to", str(dest), "--push-to-hub", "me/x"]) == 2
    err = capsys.readouterr().err
    assert "needs a Hugging Face token" in err and err.count("\n") == 1
    assert datasets.load_from_disk(str(dest)).num_rows == 120  # saved before the push


def test_export_never_overwrites_a_dir_that_is_not_a_dataset(sweep, tmp_path, capsys):
    (tmp_path / "mine.txt").write_text("keep")
    assert main(["export", str(sweep), "--to", str(tmp_path)]) == 2
    assert "not an exported dataset" in capsys.readouterr().err
    assert (tmp_path / "mine.txt").read_text() == "keep"


def test_an_analysis_dir_leads_to_the_sweep_it_was_computed_from(sweep, tmp_path):
    from stagesweep.evaluate.analysis import analyze

    analyze(sweep, tmp_path / "analysis")
    assert find_sweeps(tmp_path / "analysis") == [sweep]
    assert find_sweeps(sweep.parent) == [sweep]
