"""`order: prefix_nested` through the real sweep: paired checkpoints, shards and resume work
unchanged, and the stored prompts really nest."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import yaml

from stagesweep.evaluate.plan import build_plan
from stagesweep.evaluate.pools import load_pools
from stagesweep.evaluate.spec import parse_spec
from stagesweep.evaluate.sweep import run_sweep
from stagesweep.tiny_model import ensure_tiny_model

TINY = Path(__file__).resolve().parent.parent / "recipes" / "sweeps" / "tiny.yaml"


def _nested_spec():
    data = yaml.safe_load(TINY.read_text())
    data["pools"]["targets"]["max_rows"] = 2
    data["draws"] = 1
    data["order"] = "prefix_nested"
    data["designs"] = data["designs"][:2]  # total_count and joint
    return parse_spec(data, source=TINY)


def test_prefix_nested_sweep_is_paired_sharded_and_resumable(tmp_path):
    spec = _nested_spec()
    llama, olmo = str(ensure_tiny_model("llama")), str(ensure_tiny_model("olmo3"))
    whole = pd.read_parquet(run_sweep(spec, [llama, olmo], tmp_path / "whole",
                                      prefix_sharing=False, progress=False))
    units = build_plan(spec, load_pools(spec))
    rows = sum(len(u.labels) for u in units)
    assert len(whole) == 2 * rows and len(units) < rows
    # paired: both checkpoints answer the same prompts under the same ids
    a, b = (whole[whole["checkpoint"] == n].set_index("unit_id") for n in ("llama", "olmo3"))
    assert a.index.equals(b.index) and (a["prompt_sha"] == b.loc[a.index, "prompt_sha"]).all()
    # a random cell's prompt is the prefix of the next cell of its mix (tokens, as stored)
    plan = {(u.query_id, u.n_harmful, u.n_benign): u for u in units}
    for (query, n_h, n_b), unit in plan.items():
        bigger = plan.get((query, 2 * n_h, 2 * n_b))
        if bigger is not None and n_h + n_b and bigger is not unit:
            assert bigger.demos[: len(unit.demos)] == unit.demos

    # shard 0 of 2 alone (as if the other worker died), then a plain run: it resumes shard
    # 0's answers, generates only the rest, and the table equals the uninterrupted run's
    out = tmp_path / "resumed"
    run_sweep(spec, [llama], out, prefix_sharing=False, progress=False, shard=(0, 2))
    merged = pd.read_parquet(run_sweep(spec, [llama], out, prefix_sharing=False,
                                       progress=False))
    expected = whole[whole["checkpoint"] == "llama"].reset_index(drop=True)
    pd.testing.assert_frame_equal(merged, expected)
