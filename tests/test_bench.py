"""`stagesweep bench`: the workload's shape, the JSON contract, and input errors."""

from __future__ import annotations

import json

import pytest

from stagesweep.cli import main
from stagesweep.evaluate.bench import Workload, bench_spec, build_requests
from stagesweep.evaluate.prefix_sharing import trie_tokens
from stagesweep.tiny_model import ensure_tiny_model


@pytest.fixture(scope="module")
def llama():
    return ensure_tiny_model("llama")


def test_workload_shares_contexts_across_queries(llama):
    from transformers import AutoTokenizer

    workload = Workload(contexts=2, queries=5, max_demos=32)
    requests = build_requests(AutoTokenizer.from_pretrained(llama), workload)
    cells = len(bench_spec(workload).designs[0].cells())
    assert cells == 3 * 2  # N in {8, 16, 32} x two mixes
    assert len(requests) == workload.contexts * cells * workload.queries
    assert len({r.prompt_ids for r in requests}) == len(requests)
    prompts = [r.prompt_ids for r in requests]
    # the queries of one context and cell differ only in the final user turn
    assert trie_tokens(prompts) < sum(map(len, prompts)) / 3
    assert "(target 4)" in requests[-1].prompt_text


def test_bench_json_meets_its_contract(llama, capsys):
    code = main(["bench", "--checkpoint", str(llama), "--json", "--max-demos", "16",
                 "--queries", "4", "--max-new-tokens", "4", "--dtype", "float64"])
    assert code == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1, "--json prints exactly one line"
    result = json.loads(out[0])
    for key in ("prefilled_tokens", "trie_tokens", "naive_seconds", "optimized_seconds",
                "speedup", "outputs_identical", "units", "prompt_tokens"):
        assert key in result
    assert result["outputs_identical"] is True
    assert result["units"] == 2 * 2 * 4
    assert result["trie_tokens"] < result["prompt_tokens"]
    assert result["trie_tokens"] <= result["prefilled_tokens"] <= 1.10 * result["trie_tokens"]
    assert result["naive_seconds"] > 0 and result["optimized_seconds"] > 0


def test_bench_text_report(llama, capsys):
    assert main(["bench", "--checkpoint", str(llama), "--max-demos", "8", "--queries", "2",
                 "--max-new-tokens", "2"]) == 0
    out = capsys.readouterr().out
    for label in ("units", "prompt tokens", "trie tokens", "prefilled tokens", "speed-up",
                  "peak memory", "outputs identical True"):
        assert label in out


@pytest.mark.parametrize(("args", "message"), [
    (["--max-demos", "4"], "--max-demos 4 is below the smallest cell"),
    (["--queries", "0"], "--queries must be at least 1"),
    (["--max-demos", "100000"], "exceeds the"),
])
def test_bad_workload_is_one_line_error(llama, capsys, args, message):
    assert main(["bench", "--checkpoint", str(llama), *args]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_paper_workload_is_study_shaped(llama):
    from transformers import AutoTokenizer

    from stagesweep.evaluate.bench import PAPER_WORKLOAD, Workload

    spec = bench_spec(PAPER_WORKLOAD)
    assert spec.contexts.value == "per_query" and spec.draws == 2
    assert [d.type.value for d in spec.designs] == ["total_count", "joint"]
    cells = sum(len(d.cells()) for d in spec.designs)
    assert cells == 3 * 5 + 3 * 3  # N in {4, 8, 16} x five mixes; N_h, N_b in {0, 4, 8}
    tok = AutoTokenizer.from_pretrained(llama)
    paper = [r.prompt_ids for r in build_requests(tok, PAPER_WORKLOAD)]
    # 24 cells x 2 queries x 2 draws, less what the plan asks once: the 6 joint cells that
    # are also total-count cells, and the demo-free cell's second draw
    assert len(paper) == cells * 2 * 2 - 6 * 2 * 2 - 2
    shared = [r.prompt_ids for r in build_requests(tok, Workload(max_demos=16, queries=2))]
    # per-query draws share far less than one context reused by every query
    ratio = sum(map(len, paper)) / trie_tokens(paper)
    assert 1 < ratio < sum(map(len, shared)) / trie_tokens(shared)
