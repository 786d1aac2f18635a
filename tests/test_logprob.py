"""The judge-free outcome (`outcome: logprob`): teacher-forced log-probabilities of fixed
openings equal a direct forward pass, the trie path equals the plain one, a judge-free sweep
stores whole rows that resume like any other, and `analyze` recovers a known slope of
logprob_diff. The openai path is checked against a real `transformers serve` (which cannot
echo log-probs: a one-line error) and a loopback server that echoes a tiny model's own
log-probs in the legacy completions format."""

from __future__ import annotations

import importlib.util
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from serve_util import (
    JSONHandler,
    LoopbackServer,
    serving_extras_missing,
    transformers_serve,
    vllm_serve,
)
from sweep_util import wait_for_rows

from stagesweep.cli import UserError
from stagesweep.evaluate.analysis import analyze
from stagesweep.evaluate.analysis.cli import format_summary
from stagesweep.evaluate.backends.base import (
    GenerationConfig,
    ScoreRequest,
    continuation_ids,
)
from stagesweep.evaluate.spec import parse_spec
from stagesweep.evaluate.store import LOGPROB_COLUMNS, RESULT_COLUMNS
from stagesweep.evaluate.sweep import run_sweep
from stagesweep.tiny_model import ensure_tiny_model

torch = pytest.importorskip("torch")
TINY = Path(__file__).resolve().parent.parent / "recipes" / "sweeps" / "tiny.yaml"
OPENINGS = ("Sure", "I'm sorry", "I can't")


def _direct(model, prompt_ids, continuation) -> float:
    """Summed log-probability of `continuation` after `prompt_ids`: one forward pass."""
    ids = torch.tensor([[*prompt_ids, *continuation]])
    with torch.inference_mode():
        logp = torch.log_softmax(model(ids).logits[0].double(), -1)
    start = len(prompt_ids) - 1
    return sum(float(logp[start + t, token]) for t, token in enumerate(continuation))


def _chat_requests(tokenizer, n: int = 7) -> list[ScoreRequest]:
    """Sweep-shaped prompts: a shared demo context growing turn by turn (prompts share long
    prefixes and split inside the target turn), a duplicate prompt under a second key."""
    rng = random.Random(0)
    words = ["river", "spring", "cities", "weather", "bread", "[REDACTED]", "music", "stars"]
    turns, requests, cache = [], [], {}
    for i in range(n):
        turns += [{"role": "user", "content": f"Tell me about {rng.choice(words)}."},
                  {"role": "assistant", "content": f"Answer: {rng.choice(words)} is fine."}]
        messages = [*turns, {"role": "user", "content": f"How do I {rng.choice(words)}?"}]
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                             tokenize=False)
        ids = tuple(tokenizer(text, add_special_tokens=False).input_ids)
        conts = tuple(continuation_ids(tokenizer, text, o, cache) for o in OPENINGS)
        requests.append(ScoreRequest(f"q{i}", ids, conts, text, OPENINGS))
    first = requests[0]
    requests.append(ScoreRequest("dup", first.prompt_ids, first.continuations,
                                 first.prompt_text, OPENINGS))
    return requests


@pytest.mark.parametrize("arch", ["olmo3", "gemma"])
def test_hf_scores_equal_a_direct_forward_pass_on_both_paths(arch, one_thread):
    from transformers import AutoModelForCausalLM

    from stagesweep.evaluate.backends.hf import HFBackend

    path = ensure_tiny_model(arch)
    backend = HFBackend(str(path), dtype="float64", device="cpu")
    requests = _chat_requests(backend.tokenizer)
    if arch == "gemma":  # a window shorter than the prompts: sliding layers really cut
        full = _direct(backend.model, requests[-2].prompt_ids, requests[-2].continuations[0])
        backend.model = AutoModelForCausalLM.from_pretrained(
            path, dtype=torch.float64, sliding_window=24).eval()
        cut = _direct(backend.model, requests[-2].prompt_ids, requests[-2].continuations[0])
        assert abs(full - cut) > 1e-6
    config = GenerationConfig(batch_size=3)
    shared = {s.key: s.logprobs for s in backend.score(requests, config)}
    assert backend.stats["trie_tokens"] < backend.stats["prompt_tokens"] / 2  # really shared
    backend.prefix_sharing = False
    plain = {s.key: s.logprobs for s in backend.score(requests, config)}
    assert set(shared) == set(plain) == {r.key for r in requests}
    for r in requests:
        direct = [_direct(backend.model, r.prompt_ids, c) for c in r.continuations]
        np.testing.assert_allclose(shared[r.key], direct, rtol=0, atol=1e-9)
        np.testing.assert_allclose(plain[r.key], direct, rtol=0, atol=1e-9)
    assert shared["dup"] == shared["q0"]
    # the openings differ, so their log-probs do: a path that scored one token would not
    assert len({round(v, 6) for v in shared["q3"]}) == len(OPENINGS)


def test_float32_trie_and_plain_paths_agree_within_rounding(one_thread):
    from stagesweep.evaluate.backends.hf import HFBackend

    backend = HFBackend(str(ensure_tiny_model("llama")), device="cpu")
    requests = _chat_requests(backend.tokenizer)
    config = GenerationConfig(batch_size=4)
    shared = {s.key: s.logprobs for s in backend.score(requests, config)}
    backend.prefix_sharing = False
    plain = {s.key: s.logprobs for s in backend.score(requests, config)}
    for key, values in shared.items():
        np.testing.assert_allclose(values, plain[key], rtol=0, atol=1e-4)


def test_openings_continue_the_prompt_ids_or_fall_back_to_their_own_tokens():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(ensure_tiny_model("olmo3"))
    text = tok.apply_chat_template([{"role": "user", "content": "Hi there."}],
                                   add_generation_prompt=True, tokenize=False)
    ids = tok(text, add_special_tokens=False).input_ids
    for opening in OPENINGS:
        cont = continuation_ids(tok, text, opening)
        # the opening's ids are exactly what tokenizing prompt + opening appends
        assert tok(text + opening, add_special_tokens=False).input_ids == ids + list(cont)
    # a prompt ending mid-word merges with the opening: no continuation of its ids spells
    # the opening, so the opening's own tokens are scored
    merged = continuation_ids(tok, "The answer is: Su", "re")
    assert merged == tuple(tok("re", add_special_tokens=False).input_ids)


# ---------------------------------------------------------------- the sweep


def test_scoring_while_generating_equals_both_passes_for_one_walk(one_thread):
    """`outcome: [judge, logprob]` on the trie path: the openings are scored on the cache each
    prompt is decoded from, so the prompts are walked once; answers equal generation alone and
    scores equal the scoring pass."""
    from stagesweep.evaluate.backends.base import GenerationRequest
    from stagesweep.evaluate.backends.hf import HFBackend

    backend = HFBackend(str(ensure_tiny_model("olmo3")), dtype="float64", device="cpu")
    scoring = _chat_requests(backend.tokenizer)
    config = GenerationConfig(batch_size=3, max_new_tokens=6)
    assert backend.scores_while_generating(config)
    plain = [GenerationRequest(r.key, r.prompt_ids, r.prompt_text) for r in scoring]
    alone = {g.key: g for g in backend.generate(plain, config)}
    walk = backend.stats["prefilled_tokens"]
    scores = {s.key: s.logprobs for s in backend.score(scoring, config)}
    scoring_pass = backend.stats["prefilled_tokens"]
    joint = {g.key: g for g in backend.generate(
        [GenerationRequest(r.key, r.prompt_ids, r.prompt_text, r.continuations)
         for r in scoring], config)}
    assert {k: g.token_ids for k, g in joint.items()} == {k: g.token_ids for k, g in alone.items()}
    assert all(g.logprobs is None for g in alone.values())
    for key, values in scores.items():
        np.testing.assert_allclose(joint[key].logprobs, values, rtol=0, atol=1e-9)
    # one walk plus the openings' few tokens: what the scoring pass alone prefills
    assert backend.stats["prefilled_tokens"] == scoring_pass
    assert walk < scoring_pass < 1.2 * walk
    # the plain path cannot score while generating and says so instead of dropping the scores
    backend.prefix_sharing = False
    assert not backend.scores_while_generating(config)
    with pytest.raises(ValueError, match="only with prefix sharing"):
        next(backend.generate([GenerationRequest("a", (1, 2), "", ((3,),))], config))


def _spec(tmp_path: Path, name: str, **changes) -> Path:
    """tiny.yaml cut to 2 targets and 1 draw (42 prompts), pools absolute."""
    data = yaml.safe_load(TINY.read_text())
    for pool in data["pools"].values():
        pool["path"] = str((TINY.parent / pool["path"]).resolve())
    data["pools"]["targets"]["max_rows"] = 2
    data["draws"] = 1
    data.update(changes)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _stored(out: Path) -> pd.DataFrame:
    with sqlite3.connect(out / "sweep.sqlite") as conn:
        return pd.read_sql_query("SELECT * FROM results", conn).sort_values(
            ["unit_id", "sample"]).reset_index(drop=True)


@pytest.fixture(scope="module")
def judge_free(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("logprob")
    spec = _spec(tmp, "lp", outcome="logprob")
    out = tmp / "out"
    run_sweep(spec, [str(ensure_tiny_model("olmo3"))], out, progress=False)
    return spec, out, pd.read_parquet(out / "results.parquet")


def test_judge_free_sweep_stores_whole_rows_equal_to_a_direct_forward(judge_free, one_thread):
    from transformers import AutoModelForCausalLM

    from stagesweep.evaluate.plan import build_plan
    from stagesweep.evaluate.pools import load_pools
    from stagesweep.evaluate.render import load_tokenizer, render_units
    from stagesweep.evaluate.spec import load_spec
    from stagesweep.evaluate.templates import recorded_render_date

    spec_path, out, df = judge_free
    assert list(df.columns) == RESULT_COLUMNS + LOGPROB_COLUMNS
    assert (df["status"] == "ok").all() and df["complied"].isna().all()
    assert df["judge"].isna().all() and (df["response"] == "").all()
    assert df["logprob_comply"].notna().all() and df["logprob_refuse"].notna().all()
    np.testing.assert_allclose(df["logprob_diff"].astype(float),
                               (df["logprob_comply"] - df["logprob_refuse"]).astype(float))
    assert df["logprob_diff"].astype(float).std() > 0  # the prompt moves the outcome

    # three units recomputed by hand: render, tokenize the openings, one forward pass each
    spec = load_spec(spec_path)
    spec.render_date = recorded_render_date(out, spec, record=False)
    pools = load_pools(spec)
    units = build_plan(spec, pools)[::15]
    ckpt = ensure_tiny_model("olmo3")
    tok = load_tokenizer(str(ckpt))
    model = AutoModelForCausalLM.from_pretrained(ckpt).eval()
    texts, ids = render_units(tok, units, pools, spec)
    stored = _stored(out).set_index("unit_id")
    for unit, text, prompt_ids in zip(units, texts, ids, strict=True):
        side = {}
        for name in ("comply", "refuse"):
            values = [_direct(model, prompt_ids, continuation_ids(tok, text, o))
                      for o in getattr(spec.logprob, name)]
            side[name] = float(np.logaddexp.reduce(values))
        row = stored.loc[unit.unit_id]
        assert row["logprob_comply"] == pytest.approx(side["comply"], abs=1e-4)
        assert row["logprob_refuse"] == pytest.approx(side["refuse"], abs=1e-4)


def test_judge_free_rerun_and_sigkill_resume_give_the_same_rows(judge_free, tmp_path):
    spec, out, expected = judge_free
    ckpt = str(ensure_tiny_model("olmo3"))
    before = _stored(out)
    run_sweep(spec, [ckpt], out, progress=False)  # nothing left to do: rows untouched
    pd.testing.assert_frame_equal(_stored(out), before)

    # the full tiny spec (328 prompts), killed once some rows are stored, then resumed
    full = yaml.safe_load(spec.read_text())
    full["pools"]["targets"].pop("max_rows")
    full["draws"] = 2
    full_spec = tmp_path / "full.yaml"
    full_spec.write_text(yaml.safe_dump(full))
    reference = tmp_path / "reference"
    run_sweep(full_spec, [ckpt], reference, progress=False, prefix_sharing=False)
    killed = tmp_path / "killed"
    cmd = [sys.executable, "-m", "stagesweep", "sweep", str(full_spec), "--checkpoint", ckpt,
           "--out", str(killed), "--no-prefix-sharing", "--quiet"]
    proc = subprocess.Popen(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"})
    rows = wait_for_rows(proc, killed / "sweep.sqlite", 32, timeout=120)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    total = len(_stored(reference))
    assert 0 < rows < total, f"the kill landed after {rows} of {total} rows"
    run_sweep(full_spec, [ckpt], killed, progress=False, prefix_sharing=False)
    pd.testing.assert_frame_equal(pd.read_parquet(killed / "results.parquet"),
                                  pd.read_parquet(reference / "results.parquet"))


def test_logprob_beside_the_judge_and_a_changed_outcome_is_refused(judge_free, tmp_path):
    spec, out, judge_free_rows = judge_free
    ckpt = str(ensure_tiny_model("olmo3"))
    both = _spec(tmp_path, "both", outcome=["judge", "logprob"])
    with pytest.raises(UserError, match="outcome changed"):
        run_sweep(both, [ckpt], out, progress=False)
    run_sweep(both, [ckpt], tmp_path / "both", progress=False)
    df = pd.read_parquet(tmp_path / "both" / "results.parquet")
    assert df["complied"].notna().all() and (df["judge"] == "refusal_strings").all()
    pd.testing.assert_series_equal(df["logprob_diff"], judge_free_rows["logprob_diff"])
    # a judged-only sweep exports exactly the columns it always did
    judged = _spec(tmp_path, "judged")
    run_sweep(judged, [ckpt], tmp_path / "judged", progress=False)
    assert list(pd.read_parquet(tmp_path / "judged" / "results.parquet").columns) == \
        RESULT_COLUMNS


@pytest.mark.parametrize(("changes", "message"), [
    ({"outcome": "logprobs"}, "outcome is 'logprobs'; choose one of judge, logprob"),
    ({"logprob": {"refuse": "No"}}, "logprob openings are set but outcome is 'judge'"),
    ({"outcome": "logprob", "logprob": {"comply": []}}, "logprob.comply is []"),
    ({"outcome": "logprob", "logprob": {"refusal": "No"}}, "did you mean 'refuse'"),
    ({"outcome": ["judge", "judge"]}, "each once"),
])
def test_outcome_spec_errors_are_one_line(changes, message):
    data = {**yaml.safe_load(TINY.read_text()), **changes}
    with pytest.raises(UserError, match=message.replace("[", r"\[").replace("]", r"\]")):
        parse_spec(data, source=TINY)


# ---------------------------------------------------------------- analysis


def _synthetic(slope: float, seed: int, queries: int = 60) -> pd.DataFrame:
    """logprob_diff = query intercept + 0.3 log(N_h+1) + slope log(N_b+1) + noise, with the
    noise correlated within a query (the reason to cluster)."""
    rng = np.random.default_rng(seed)
    rows = []
    for q in range(queries):
        intercept = rng.normal(0, 2)
        shift = rng.normal(0, 0.5)  # a query-level slope deviation
        for nh in (0, 2, 4, 8):
            for nb in (0, 2, 4, 8):
                y = (intercept + 0.3 * np.log1p(nh) + (slope + shift) * np.log1p(nb)
                     + rng.normal(0, 1))
                rows.append({"checkpoint": "sft", "query_id": f"q{q}", "draw": 0,
                             "n_harmful": nh, "n_benign": nb, "design": "joint",
                             "logprob_diff": y})
    return pd.DataFrame(rows)


def test_analyze_recovers_a_known_logprob_slope_with_covering_intervals(tmp_path):
    slope = 0.7
    summary = analyze(_synthetic(slope, 0), tmp_path / "a")
    effect = summary["checkpoints"]["sft"]["benign_effect_logprob"]
    assert effect["n"] == 60 * 16 and effect["clustering"] == "query"
    assert effect["ci_low"] < slope < effect["ci_high"]
    assert abs(effect["beta"] - slope) < 0.25 and effect["direction"] == "amplification"
    # the judged b2 has no outcome here and says why, instead of failing
    assert "judge-free" in summary["checkpoints"]["sft"]["benign_effect"]["skipped"]
    assert "logprob b2 +0.7" in format_summary(summary) or "logprob b2 +0.6" in \
        format_summary(summary)
    written = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert written["checkpoints"]["sft"]["benign_effect_logprob"]["beta"] == effect["beta"]
    # two stages, judge-free: each gets its slope; the judged stage difference says why not
    two = pd.concat([_synthetic(slope, 0), _synthetic(-slope, 1).assign(checkpoint="dpo")])
    both = analyze(two, tmp_path / "two", pairs=[("sft", "dpo")])
    assert both["checkpoints"]["dpo"]["benign_effect_logprob"]["direction"] == "dilution"
    assert "judge-free" in both["stage_differences"][0]["skipped"]
    (delta,) = both["stage_differences_logprob"]
    sft, dpo = (both["checkpoints"][n]["benign_effect_logprob"]["beta"] for n in ("sft", "dpo"))
    assert delta["delta_beta"] == pytest.approx(dpo - sft)  # the pooled fit's interaction
    assert delta["ci_low"] < -2 * slope < delta["ci_high"]
    assert "sft -> dpo: delta logprob b2 -1." in format_summary(both)
    # contexts shared by every query with one draw: no direction call, as for the judged b2
    shared = analyze(_synthetic(slope, 0).assign(contexts="shared"), tmp_path / "shared")
    effect = shared["checkpoints"]["sft"]["benign_effect_logprob"]
    assert "only 1 draw" in effect["skipped"] and effect["direction"] == "none"
    assert effect["conditional_on_draws"]["ci_low"] < slope
    # coverage over repeated simulations is near nominal (clustering by query matters: the
    # query-level slope deviations make iid errors far too narrow)
    covered = [analyze(_synthetic(slope, s, 30), tmp_path / f"s{s}")["checkpoints"]["sft"]
               ["benign_effect_logprob"] for s in range(1, 41)]
    rate = np.mean([e["ci_low"] < slope < e["ci_high"] for e in covered])
    assert rate >= 0.85, rate


def test_analyze_reports_the_logprob_slope_of_a_judge_free_sweep(judge_free, tmp_path):
    _, out, _ = judge_free
    summary = analyze(out, tmp_path / "analysis")
    effect = summary["checkpoints"]["olmo3"]["benign_effect_logprob"]
    assert effect["beta"] is not None and effect["n"] > 0
    assert summary["b2_by_checkpoint"][0]["beta_logprob"] == effect["beta"]
    assert "benign_effect_logprob" not in analyze(
        _synthetic(0.5, 0).assign(complied=1).drop(columns="logprob_diff"),
        tmp_path / "judged")["checkpoints"]["sft"]


# ---------------------------------------------------------------- vllm

HAVE_VLLM = importlib.util.find_spec("vllm") is not None


@pytest.mark.skipif(not HAVE_VLLM, reason="vLLM is not installed (make .venv-vllm)")
def test_vllm_judge_free_sweep_equals_the_hf_one(tmp_path):
    """The same judge-free sweep through vLLM's prompt log-probs and through the hf trie (the
    small llama: vLLM's CPU attention needs a head size of at least 32)."""
    ckpt = str(ensure_tiny_model("llama", size="small"))
    hf = _spec(tmp_path, "hf", outcome="logprob")
    run_sweep(hf, [ckpt], tmp_path / "hf", progress=False)
    engine = {"chunk_units": 8, "enforce_eager": True, "distributed_executor_backend": "uni",
              "gpu_memory_utilization": 0.1}
    vllm = _spec(tmp_path, "vllm", outcome="logprob", backend="vllm", backend_options=engine)
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "stagesweep", "sweep", str(vllm), "--checkpoint", ckpt,
                    "--out", str(tmp_path / "vllm"), "--quiet"], env=env, check=True)
    a = pd.read_parquet(tmp_path / "hf" / "results.parquet")
    b = pd.read_parquet(tmp_path / "vllm" / "results.parquet")
    assert (b["status"] == "ok").all() and len(a) == len(b)
    for column in LOGPROB_COLUMNS:
        # vLLM's CPU kernels move log-probabilities by ~1e-4
        np.testing.assert_allclose(b[column].astype(float), a[column].astype(float), atol=2e-3)


# ---------------------------------------------------------------- openai


@pytest.fixture(scope="module")
def olmo_path():
    return ensure_tiny_model("olmo3")


def test_transformers_serve_cannot_echo_logprobs_one_line_error(olmo_path):
    from transformers import AutoTokenizer

    from stagesweep.evaluate.backends.openai import OpenAIBackend

    reason = serving_extras_missing()
    if reason:
        pytest.skip(reason)
    tok = AutoTokenizer.from_pretrained(olmo_path)
    with transformers_serve(olmo_path) as url:
        backend = OpenAIBackend(url, tokenizer=tok)
        with pytest.raises(UserError, match="echo logprobs are unsupported by this server") as err:
            list(backend.score(_chat_requests(tok, 1), GenerationConfig()))
        backend.close()
    assert url in str(err.value) and "\n" not in str(err.value)


class EchoServer(LoopbackServer):
    """A loopback server answering /v1/completions the way vLLM does with `echo: true` and
    `logprobs`: the prompt's tokens (with the BOS it adds), their log-probs (None for the
    first) and character offsets counted over the echoed tokens' own text (a BOS's text
    included, as `vllm serve` counts them), then one greedy token, all computed by a real
    tiny model. `test_real_vllm_serve_...` pins this format to the real server."""

    def __init__(self, path: Path):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tok = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64).eval()

        class Handler(JSONHandler):
            def do_GET(self):
                self.send_json(200, {"data": [{"id": "tiny", "owned_by": "vllm"}]})

            def do_POST(self):
                body = self.read_json()
                ids = tok(body["prompt"]).input_ids
                with torch.inference_mode():
                    logp = torch.log_softmax(model(torch.tensor([ids])).logits[0], -1)
                values = [None] + [float(logp[t - 1, ids[t]]) for t in range(1, len(ids))]
                nxt = int(logp[-1].argmax())
                self.send_json(200, {"choices": [{
                    "text": body["prompt"] + tok.decode([nxt]), "finish_reason": "length",
                    "logprobs": {
                        "tokens": tok.convert_ids_to_tokens([*ids, nxt]),
                        "token_logprobs": [*values, float(logp[-1, nxt])],
                        "text_offset": np.cumsum(
                            [0] + [len(tok.decode([t])) for t in ids]).tolist()}}],
                    "usage": {"prompt_tokens": len(ids)}})

        self.serve(Handler)


def test_openai_echo_logprobs_equal_the_in_process_scores(olmo_path, one_thread):
    from stagesweep.evaluate.backends.hf import HFBackend
    from stagesweep.evaluate.backends.openai import OpenAIBackend

    hf = HFBackend(str(olmo_path), dtype="float64", device="cpu")
    requests = _chat_requests(hf.tokenizer, 4)
    expected = {s.key: s.logprobs for s in hf.score(requests, GenerationConfig())}
    server = EchoServer(olmo_path)
    try:
        backend = OpenAIBackend(server.url, tokenizer=hf.tokenizer, concurrency=2)
        got = {s.key: s.logprobs for s in backend.score(requests, GenerationConfig())}
        backend.close()
    finally:
        server.close()
    assert set(got) == set(expected)
    for key, values in expected.items():
        np.testing.assert_allclose(got[key], values, rtol=0, atol=1e-9)


@pytest.mark.skipif(not HAVE_VLLM, reason="vLLM is not installed (make .venv-vllm)")
def test_real_vllm_serve_echo_logprobs_equal_the_in_process_scores(one_thread):
    """The openai backend's echo-logprob reading against a real `vllm serve` (the EchoServer
    above imitates its format; this pins the format to the server itself)."""
    from stagesweep.evaluate.backends.hf import HFBackend
    from stagesweep.evaluate.backends.openai import OpenAIBackend

    path = ensure_tiny_model("llama", size="small")
    hf = HFBackend(str(path), dtype="float32", device="cpu")
    requests = _chat_requests(hf.tokenizer, 4)
    expected = {s.key: s.logprobs for s in hf.score(requests, GenerationConfig())}
    with vllm_serve(path) as url:
        backend = OpenAIBackend(url, tokenizer=hf.tokenizer, concurrency=2)
        assert backend.server == "vllm"
        got = {s.key: s.logprobs for s in backend.score(requests, GenerationConfig())}
        backend.close()
    assert set(got) == set(expected)
    for key, values in expected.items():
        # vLLM's CPU kernels move float32 log-probabilities by ~1e-4
        np.testing.assert_allclose(got[key], values, rtol=0, atol=2e-3)
