"""Nothing mixed, nothing lost, no secret written (issue 8): atomic writes, secret redaction,
full-byte fingerprints, the out-dir lock, and one-line errors for bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from stagesweep.cli import UserError
from stagesweep.safeio import REDACTED, atomic_path, redact, redact_text, write_json, write_text


def test_atomic_write_keeps_the_old_file_and_no_temporary_when_the_writer_fails(tmp_path):
    target = write_text(tmp_path / "summary.json", "old\n")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed mid-write")
    assert target.read_text() == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]


def test_a_full_disk_is_one_line_naming_the_path_and_leaves_no_temporary(tmp_path):
    if not Path("/dev/full").exists():
        pytest.skip("needs /dev/full")
    target = tmp_path / "spec.yaml"
    target.write_text("old\n")
    with pytest.raises(UserError, match=r"cannot write .*spec\.yaml: No space left") as err:
        with atomic_path(target) as tmp:
            with open("/dev/full", "w") as full:
                full.write("x" * 100_000)
                full.flush()
            tmp.write_text("never reached")
    assert "\n" not in str(err.value)
    assert target.read_text() == "old\n" and len(list(tmp_path.iterdir())) == 1


def test_secret_keys_and_values_are_redacted_but_settings_are_not():
    data = {"hub_token": "hf_" + "a" * 30, "max_new_tokens": 16, "pad_token": "<pad>",
            "stop_token_ids": [1, 2], "targets_key": "targets", "api_key_env": "OPENAI_API_KEY",
            "backend_options": {"api_key": "plain", "base_url": "https://me:pw@host/v1"},
            "argv": ["recipe.yaml", "hub_token=xyz", "learning_rate=1e-5"],
            "wandb": {"WANDB_API_KEY": "k"}, "password": None}
    out = redact(data)
    assert out["hub_token"] == out["backend_options"]["api_key"] == REDACTED
    assert out["wandb"]["WANDB_API_KEY"] == REDACTED
    assert out["backend_options"]["base_url"] == f"https://{REDACTED}:{REDACTED}@host/v1"
    assert out["argv"] == ["recipe.yaml", f"hub_token={REDACTED}", "learning_rate=1e-5"]
    for key in ("max_new_tokens", "pad_token", "stop_token_ids", "targets_key", "api_key_env",
                "password"):
        assert out[key] == data[key]
    line = redact_text("push with hub_token=abc and Authorization: Bearer sk-" + "b" * 24)
    assert "abc" not in line and "sk-" not in line


def test_write_json_redacts(tmp_path):
    path = write_json(tmp_path / "p.json", {"token": "s3cret", "n": 1})
    assert json.loads(path.read_text()) == {"token": REDACTED, "n": 1}
