"""The store: checkpoint fingerprints that tell same-shaped checkpoints apart, and export."""

from __future__ import annotations

import shutil

import numpy as np
import pandas as pd

from stagesweep.evaluate.store import (
    RESULT_COLUMNS,
    ResultStore,
    checkpoint_fingerprint,
    export_results,
)


def _safetensors(path, seed):
    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    save_file({"w": torch.randn(256, 256, generator=g)}, str(path))


def test_fingerprint_separates_same_shaped_checkpoints(tmp_path):
    for name, seed in (("sft", 0), ("dpo", 1)):
        (tmp_path / name).mkdir()
        _safetensors(tmp_path / name / "model.safetensors", seed)
        (tmp_path / name / "tokenizer.json").write_text("{}")
    sft, dpo = tmp_path / "sft", tmp_path / "dpo"
    # same header and size (same shapes), different weights
    assert (sft / "model.safetensors").stat().st_size == (dpo / "model.safetensors").stat().st_size
    assert checkpoint_fingerprint(sft, "T") != checkpoint_fingerprint(dpo, "T")
    copy = tmp_path / "copy"
    shutil.copytree(sft, copy)
    assert checkpoint_fingerprint(copy, "T") == checkpoint_fingerprint(sft, "T")
    # the chat template and tokenizer files are part of it; training leftovers are not
    assert checkpoint_fingerprint(copy, "T2") != checkpoint_fingerprint(sft, "T")
    (copy / "optimizer.pt").write_bytes(b"state")
    assert checkpoint_fingerprint(copy, "T") == checkpoint_fingerprint(sft, "T")
    (copy / "tokenizer.json").write_text('{"changed": 1}')
    assert checkpoint_fingerprint(copy, "T") != checkpoint_fingerprint(sft, "T")
    assert checkpoint_fingerprint(sft, "T", hub_revision="abc") != checkpoint_fingerprint(
        sft, "T", hub_revision="abd")


def _row(unit, fp="f1", sample=0, **kw):
    base = {"fingerprint": fp, "unit_id": unit, "sample": sample, "checkpoint": fp,
            "stage": None, "step": None, "design": "joint", "query_id": "q", "draw": 0,
            "n_harmful": 1, "n_benign": 0, "schedule": "random", "opening": "unchanged",
            "prompt_tokens": 10, "request_sha": "s", "response": "r", "status": "ok",
            "complied": 1, "format_adopted": None, "judge": "refusal_strings"}
    return {**base, **kw}


def test_store_resume_keys_and_export(tmp_path):
    db = ResultStore(tmp_path / "sweep.sqlite")
    db.put([_row("b"), _row("a", complied=0), _row("a", fp="f2")])
    db.put([_row("a", complied=None, status="failed")])  # a retry replaces, never duplicates
    assert db.existing("f1") == {("a", 0): ("failed", "s"), ("b", 0): ("ok", "s")}
    db.close()
    shard = ResultStore(tmp_path / "sweep.shard1of2.sqlite")
    shard.put([_row("c", sample=1), _row("c")])
    shard.close()
    df = export_results([tmp_path / "sweep.sqlite", tmp_path / "sweep.shard1of2.sqlite"],
                        [("f1", "sft", "sft", 40)], {"a", "c"}, tmp_path / "results.parquet")
    assert list(df.columns) == RESULT_COLUMNS
    assert list(df["unit_id"]) == ["a", "c", "c/s1"]  # f2 and unplanned "b" left out
    assert set(df["checkpoint"]) == {"sft"} and set(df["step"]) == {40}
    assert df["complied"].dtype == pd.Int64Dtype() and pd.isna(df["complied"][0])
    assert pd.read_parquet(tmp_path / "results.parquet").equals(df)
    assert np.array_equal(df["prompt_tokens"].to_numpy(), [10, 10, 10])
