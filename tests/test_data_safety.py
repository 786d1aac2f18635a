"""Nothing mixed, nothing lost, no secret written (issue 8): atomic writes, secret redaction,
full-byte fingerprints, the out-dir lock, and one-line errors for bad input."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from stagesweep.cli import UserError, main
from stagesweep.lineage import MANIFEST_NAME, write_manifest
from stagesweep.safeio import (
    LOCK_NAME,
    REDACTED,
    atomic_path,
    dir_lock,
    redact,
    redact_text,
    remove_stale_temporaries,
    worker_lock,
    write_json,
    write_text,
)
from stagesweep.tiny_model import ensure_tiny_model


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


# ---------------------------------------------------------------------------------------------
# Sweeps on a tiny checkpoint: a 4-unit spec (2 targets x 1 draw x 2 cells) keeps these fast.

REPO = Path(__file__).resolve().parent.parent
POOLS = REPO / "stagesweep" / "data" / "pools"


def _spec_data(**changes) -> dict:
    data = {
        "pools": {
            "harmful": {"path": str(POOLS / "tiny_harmful.jsonl"),
                        "columns": {"id": "id", "request": "request", "response": "response"}},
            "benign": {"path": str(POOLS / "tiny_benign.jsonl"),
                       "columns": {"id": "id", "request": "request", "response": "response"}},
            "targets": {"path": str(POOLS / "tiny_targets.jsonl"),
                        "columns": {"id": "id", "request": "request"}, "max_rows": 2},
        },
        "targets": "targets", "seed": 0, "draws": 1,
        "designs": [{"type": "joint", "n_harmful": [0, 2], "n_benign": [2]}],
        "generation": {"max_new_tokens": 4}, "judge": "refusal_strings", "backend": "hf",
    }
    data.update(changes)
    return data


def _write_spec(path: Path, **changes) -> Path:
    path.write_text(yaml.safe_dump(_spec_data(**changes), sort_keys=False))
    return path


def _sweep_cmd(spec: Path, ckpt: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "stagesweep", "sweep", str(spec), "--checkpoint", str(ckpt),
            "--out", str(out), "--no-prefix-sharing", *extra]


def _snapshot(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes()
            for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def finished(tmp_path_factory, one_thread):
    """A finished sweep of the 4-unit spec (the uninterrupted reference)."""
    root = tmp_path_factory.mktemp("finished")
    spec = _write_spec(root / "spec.yaml")
    out = root / "out"
    assert main(["sweep", str(spec), "--checkpoint", str(ensure_tiny_model("olmo3")), "--out",
                 str(out), "--no-prefix-sharing", "--quiet"]) == 0
    return spec, out, pd.read_parquet(out / "results.parquet")


def _big_checkpoint(directory: Path) -> Path:
    """The tiny olmo3 with an MLP wide enough that its weights file exceeds the 64 MiB above
    which the old fingerprint only sampled blocks (attention tensors are 16 KiB of ~70 MB)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    tiny = ensure_tiny_model("olmo3")
    config = AutoConfig.from_pretrained(tiny)
    config.intermediate_size = 45_056
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(directory)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
                 "generation_config.json"):
        shutil.copy(tiny / name, directory / name)
    return directory


def _overwrite_tensor(file: Path, name: str) -> None:
    """Replace one tensor's bytes in place (same size, same inode), then set the file's mtime
    back: only the content (and the ctime, which cannot be set) says it changed."""
    header_len = int.from_bytes(file.read_bytes()[:8], "little")
    header = json.loads(file.read_bytes()[8:8 + header_len])
    start, end = header[name]["data_offsets"]
    before = file.stat()
    rng = np.random.default_rng(1)
    with file.open("r+b") as f:
        f.seek(8 + header_len + start)
        f.write(rng.normal(0, 0.5, (end - start) // 4).astype(np.float32).tobytes())
    os.utime(file, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = file.stat()
    assert (after.st_size, after.st_mtime_ns, after.st_ino) == (
        before.st_size, before.st_mtime_ns, before.st_ino)


def test_an_in_place_change_of_one_attention_tensor_regenerates_every_unit(
        tmp_path, capsys, one_thread):
    ckpt = _big_checkpoint(tmp_path / "big")
    weights = ckpt / "model.safetensors"
    assert weights.stat().st_size > 64 * 1024 * 1024
    spec, out = _write_spec(tmp_path / "spec.yaml"), tmp_path / "out"
    args = ["sweep", str(spec), "--checkpoint", str(ckpt), "--out", str(out),
            "--no-prefix-sharing"]

    assert main(args) == 0
    first = capsys.readouterr().out
    assert "fingerprints: hashed weights" in first and "MB/s" in first
    assert "generated 4, resumed 0" in first
    assert main(args) == 0  # unchanged: the digest is reused, nothing is re-hashed or re-run
    second = capsys.readouterr().out
    assert "fingerprints: hashed" not in second and "generated 0, resumed 4" in second

    _overwrite_tensor(weights, "model.layers.1.self_attn.q_proj.weight")
    assert main(args) == 0
    third = capsys.readouterr().out
    assert "fingerprints: hashed weights" in third and "generated 4, resumed 0" in third
    with sqlite3.connect(out / "sweep.sqlite") as conn:
        per_fingerprint = conn.execute(
            "SELECT COUNT(*) FROM results GROUP BY fingerprint").fetchall()
    assert per_fingerprint == [(4,), (4,)]


def test_fingerprint_command_prints_digests_and_throughput(tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    payload = os.urandom(3_000_000)
    (ckpt / "model.safetensors").write_bytes(payload)
    (ckpt / "optimizer.pt").write_bytes(b"not weights")
    assert main(["fingerprint", str(ckpt)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"{hashlib.sha256(payload).hexdigest()}  {ckpt / 'model.safetensors'}"
    assert re.fullmatch(r"hashed 3 MB in [\d.]+ s \(\d+ MB/s\)", lines[1]) and len(lines) == 2


def test_a_second_sweep_into_a_busy_out_dir_stops_and_the_first_equals_an_uninterrupted_run(
        finished, tmp_path):
    spec, _, expected = finished
    other = _write_spec(tmp_path / "other.yaml", seed=7)
    out = tmp_path / "out"
    ckpt = ensure_tiny_model("olmo3")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen(_sweep_cmd(spec, ckpt, out, "--quiet"), env=env)
    lock, deadline = out / LOCK_NAME, time.monotonic() + 120
    while not (lock.exists() and lock.read_text().strip()) and time.monotonic() < deadline:
        assert first.poll() is None, "the first sweep ended before it was seen holding the lock"
        time.sleep(0.05)
    second = subprocess.run(_sweep_cmd(other, ckpt, out, "--quiet"), env=env,
                            capture_output=True, text=True)
    assert first.wait(timeout=300) == 0
    assert second.returncode == 2
    assert second.stderr.strip() == (
        f"stagesweep sweep: error: {out.resolve()} is in use by another sweep (pid "
        f"{first.pid}); wait for it to finish or choose another --out")
    pd.testing.assert_frame_equal(pd.read_parquet(out / "results.parquet"), expected)
    assert yaml.safe_load((out / "spec.yaml").read_text())["seed"] == 0


def test_workers_share_their_parents_lock_and_others_are_refused(tmp_path):
    """What `--num-processes` relies on (tests/test_sweep_shards.py runs it end to end)."""
    take = ("import sys; from stagesweep.safeio import dir_lock\n"
            "from stagesweep.cli import UserError\n"
            "try:\n    with dir_lock(sys.argv[1], shared=True): print('held')\n"
            "except UserError as err: print(err)")
    with dir_lock(tmp_path):
        env, fds = worker_lock(tmp_path)
        worker = subprocess.run([sys.executable, "-c", take, str(tmp_path)], pass_fds=fds,
                                env={**os.environ, **env}, capture_output=True, text=True)
        stranger = subprocess.run([sys.executable, "-c", take, str(tmp_path)],
                                  capture_output=True, text=True)
    assert worker.stdout == "held\n"
    assert stranger.stdout == (f"{tmp_path.resolve()} is in use by another sweep (pid "
                               f"{os.getpid()}); wait for it to finish or choose another --out\n")
    assert (tmp_path / LOCK_NAME).read_text() == ""  # released
    with dir_lock(tmp_path):  # and free again
        pass


def test_a_rejected_spec_change_leaves_the_spec_copy_alone(finished, tmp_path, capsys):
    spec, done, _ = finished
    out = tmp_path / "out"
    shutil.copytree(done, out)
    before = _snapshot(out)
    changed = _write_spec(tmp_path / "changed.yaml", system_prompt="Be brief.")
    assert main(["sweep", str(changed), "--checkpoint", str(ensure_tiny_model("olmo3")),
                 "--out", str(out), "--no-prefix-sharing", "--quiet"]) == 2
    assert "differ from this spec's" in capsys.readouterr().err
    assert _snapshot(out) == before


def test_a_kill_during_export_leaves_the_previous_results_whole(finished, tmp_path):
    _, done, expected = finished
    out = tmp_path / "out"
    shutil.copytree(done, out)
    # The export of a real sweep, its parquet writer slowed down so the kill lands mid-write.
    script = f"""
import time, pandas as pd
from pathlib import Path
from stagesweep.evaluate.store import export_results
real = pd.DataFrame.to_parquet
def slow(self, path, **kw):
    real(self, path, **kw)
    data = Path(path).read_bytes()
    Path(path).write_bytes(data[:4])
    time.sleep(60)
pd.DataFrame.to_parquet = slow
import sqlite3
with sqlite3.connect({str(out / "sweep.sqlite")!r}) as conn:
    fp = conn.execute("SELECT DISTINCT fingerprint FROM results").fetchone()[0]
export_results([Path({str(out / "sweep.sqlite")!r})], [(fp, "olmo3", None, None)],
               set(pd.read_parquet({str(out / "results.parquet")!r})["unit_id"]),
               Path({str(out / "results.parquet")!r}))
"""
    proc = subprocess.Popen([sys.executable, "-c", script])
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not any(
            p.stat().st_size == 4 for p in out.glob(".results.parquet.*.tmp")):
        assert proc.poll() is None
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    pd.testing.assert_frame_equal(pd.read_parquet(out / "results.parquet"), expected)
    [stale] = out.glob(".results.parquet.*.tmp")  # a SIGKILL cannot be cleaned up after ...
    assert remove_stale_temporaries(out) == [stale]  # ... so the next sweep removes it


def _bad_inputs(tmp: Path, ckpt: Path) -> dict[str, tuple[list[str], str]]:
    """name -> (the sweep's arguments after the spec and --out, text its one error line names).
    Each case writes what it needs under `tmp`."""
    def spec(name: str, **changes) -> str:
        return str(_write_spec(tmp / f"{name}.yaml", **changes))

    def gen(**values) -> dict:
        return {"generation": {"max_new_tokens": 4, **values}}

    latin1 = tmp / "latin1.yaml"
    latin1.write_bytes(_write_spec(tmp / "ok.yaml").read_bytes() + b"# caf\xe9\n")
    pool = tmp / "latin1.jsonl"
    pool.write_bytes(b'{"id": "q1", "request": "caf\xe9"}\n')
    data = _spec_data()
    data["pools"]["targets"]["path"] = str(pool)
    (tmp / "pool.yaml").write_text(yaml.safe_dump(data))
    empty = tmp / "empty-ckpt"
    empty.mkdir()
    corrupt = tmp / "corrupt-ckpt"
    shutil.copytree(ckpt, corrupt)
    weights = (corrupt / "model.safetensors").read_bytes()
    (corrupt / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    (tmp / "a-file").write_text("not a dir")
    (tmp / "runs").mkdir()
    ok, c = spec("ok"), ["--checkpoint", str(ckpt)]
    phi = [{"type": "total_count", "n": [4], "phi": ["half"]}]
    return {
        "misspelt judge": ([spec("judge", judge="refusal_string"), *c], "judge 'refusal_string'"),
        "max_new_tokens 0": ([spec("zero", **gen(max_new_tokens=0)), *c], "max_new_tokens"),
        "max_new_tokens -5": ([spec("neg", **gen(max_new_tokens=-5)), *c], "max_new_tokens"),
        "seed abc": ([spec("seed", seed="abc"), *c], "spec.seed is 'abc'"),
        "draws two": ([spec("draws", draws="two"), *c], "spec.draws is 'two'"),
        "phi half": ([spec("phi", designs=phi), *c], "designs[0].phi"),
        "secret in spec": ([spec("key", backend_options={"api_key": "sk-planted"}), *c],
                           "backend_options.api_key holds a secret"),
        "unknown backend option": ([spec("bopt", backend_options={"dtyp": "float16"}), *c],
                                   "backend_options.dtyp is not an option of the hf backend"),
        "unknown judge option": ([spec("jopt", judge_options={"windw": 3}), *c],
                                 "judge_options.windw is not an option of judge refusal_strings"),
        "max-kv-gb -1": ([ok, *c, "--max-kv-gb", "-1"], "--max-kv-gb"),
        "shard with num-processes": ([ok, *c, "--shard", "0/2", "--num-processes", "2"],
                                     "--shard"),
        "non-UTF-8 spec": ([str(latin1), *c], "not UTF-8"),
        "non-UTF-8 pool": ([str(tmp / "pool.yaml"), *c], "line 1 is not UTF-8"),
        "dir without a model": ([ok, "--checkpoint", str(empty)], "holds no model"),
        "corrupt safetensors": ([ok, "--checkpoint", str(corrupt)], "not a whole safetensors"),
        "relative checkpoint": ([ok, "--checkpoint", "runs/sft"], "no such directory"),
        "spec is a directory": ([str(tmp), *c], "is a directory"),
    }


def test_bad_inputs_are_one_line_exit_2_and_leave_the_out_dir_unchanged(
        finished, tmp_path, capsys, monkeypatch):
    _, done, _ = finished
    out = tmp_path / "out"
    shutil.copytree(done, out)
    before = _snapshot(out)
    monkeypatch.chdir(tmp_path)
    cases = _bad_inputs(tmp_path, ensure_tiny_model("olmo3"))
    for name, (args, expected) in cases.items():
        code = main(["sweep", args[0], "--out", str(out), "--quiet", *args[1:]])
        err = capsys.readouterr().err
        assert code == 2, name
        assert len(err.splitlines()) == 1 and expected in err, (name, err)
        assert _snapshot(out) == before, name

    # a recipe that is not UTF-8, an --out that is a file, and a damaged store (named with how
    # to recover)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_bytes(b"stagesweep: {stage: sft, method: sft}\n# caf\xe9\n")
    code = main(["train", str(recipe), "--dry-run"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.splitlines()) == 1 and "not UTF-8" in err, err
    code = main(["sweep", str(_write_spec(tmp_path / "ok.yaml")), "--out",
                 str(tmp_path / "a-file"), "--checkpoint", str(ensure_tiny_model("olmo3"))])
    err = capsys.readouterr().err
    assert code == 2 and len(err.splitlines()) == 1 and "is a file" in err
    store = out / "sweep.sqlite"
    store.write_bytes(store.read_bytes()[:3000])
    before = _snapshot(out)
    code = main(["sweep", str(tmp_path / "ok.yaml"), "--out", str(out), "--quiet",
                 "--checkpoint", str(ensure_tiny_model("olmo3"))])
    err = capsys.readouterr().err
    assert code == 2 and len(err.splitlines()) == 1, err
    assert f"result store {store} is damaged" in err and "move it aside" in err
    assert _snapshot(out) == before


def test_no_planted_token_or_key_reaches_manifests_spec_copies_provenance_or_logs(
        tmp_path, capfd, monkeypatch, one_thread):
    token, key, password = "hf_PLANTED" + "t" * 24, "sk-PLANTED" + "k" * 24, "PLANTEDpass"
    monkeypatch.setenv("OPENAI_API_KEY", key)
    monkeypatch.delenv("HF_TOKEN", raising=False)  # training moves the token there
    ckpt, out = tmp_path / "sft", tmp_path / "out"
    assert main(["train", str(REPO / "recipes" / "tiny" / "sft.yaml"), f"output_dir={ckpt}",
                 "max_steps=2", "save_steps=1", f"hub_token={token}"]) == 0
    spec = _write_spec(tmp_path / "spec.yaml", backend_options={
        "base_url": f"https://user:{password}@example.invalid/v1"})
    assert main(["sweep", str(spec), "--checkpoint", str(ckpt), "--out", str(out),
                 "--no-prefix-sharing"]) == 0
    write_manifest(tmp_path / "direct", {"recipe": {"hub_token": token, "api_key": key}})
    logs = "".join(capfd.readouterr())

    manifests = sorted(tmp_path.rglob(MANIFEST_NAME))
    assert len(manifests) == 4  # final, checkpoint-1, checkpoint-2, direct
    assert REDACTED in (out / "spec.yaml").read_text()  # the URL's credentials
    written = [p for p in tmp_path.rglob("*") if p.is_file() and p != spec]
    assert {out / "spec.yaml", out / "provenance.json"} <= set(written)
    for secret in (token, key, password):
        for path in written:
            assert secret.encode() not in path.read_bytes(), (secret, path)
        assert secret not in logs


def test_summary_md_escapes_checkpoint_names_as_the_html_report_does(tmp_path):
    from stagesweep.evaluate.analysis import analyze
    from stagesweep.evaluate.report import write_report
    from stagesweep.evaluate.simulate import SimCheckpoint, SimSpec, simulate

    evil = "<img src=x onerror=alert(1)>|dpo"
    analyze(simulate(SimSpec(design="total_count", queries=8, seed=1, checkpoints=[
        SimCheckpoint("sft", 0.5, "sft"), SimCheckpoint(evil, -0.3, "dpo")])), tmp_path)
    index = write_report(tmp_path)
    md = (tmp_path / "report" / "summary.md").read_text()
    escaped = "&lt;img src=x onerror=alert(1)&gt;\\|dpo"
    assert "<img" not in md and escaped in md
    assert "<img src=x" not in index.read_text()
    rows = [line for line in md.splitlines() if escaped in line and line.startswith("|")]
    header = next(line for line in md.splitlines() if line.startswith("|"))
    assert rows and all(row.replace("\\|", "").count("|") == header.count("|") for row in rows[:1])


def test_analyze_refuses_empty_malformed_or_garbage_tables_in_one_line(
        finished, tmp_path, capsys):
    _, done, _ = finished
    header = "checkpoint,query_id,n_harmful,n_benign,complied\n"
    tables = {
        "empty.csv": b"", "header-only.csv": header.encode(),
        "malformed.csv": b'a,b\n1,2,3\n"x\n', "latin1.csv": header.encode() + b"caf\xe9,q,1,1,1\n",
        "garbage.parquet": os.urandom(2000),
        "cut.parquet": (done / "results.parquet").read_bytes()[:4],
    }
    out = tmp_path / "analysis"
    shutil.copytree(done, out)
    before = _snapshot(out)
    for name, content in tables.items():
        (tmp_path / name).write_bytes(content)
        code = main(["analyze", str(tmp_path / name), "--out", str(out)])
        err = capsys.readouterr().err
        assert code == 2 and len(err.splitlines()) == 1 and name in err, (name, err)
        assert _snapshot(out) == before, name


def test_a_full_disk_is_one_line_naming_the_store_and_keeps_what_was_stored(finished, tmp_path):
    import resource

    _, done, expected = finished
    out = tmp_path / "out"
    shutil.copytree(done, out)
    store = out / "sweep.sqlite"

    def no_room_to_grow() -> None:
        # A file-size limit stands in for a full disk: writes past the store's first page fail.
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))

    # A second checkpoint's answers need room the "disk" no longer has.
    proc = subprocess.run(
        _sweep_cmd(_write_spec(tmp_path / "spec.yaml"), ensure_tiny_model("llama"), out,
                   "--quiet"), preexec_fn=no_room_to_grow, capture_output=True, text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 2
    assert proc.stderr.startswith(f"stagesweep sweep: error: cannot write {store}: ")
    assert len(proc.stderr.splitlines()) == 1
    pd.testing.assert_frame_equal(pd.read_parquet(out / "results.parquet"), expected)
    with sqlite3.connect(store) as conn:
        assert conn.execute("PRAGMA quick_check").fetchone()[0] == "ok"
        assert conn.execute("SELECT COUNT(*) FROM results").fetchone()[0] == len(expected)
