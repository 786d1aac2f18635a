"""The plan: nested, seeded draws; schedules; paired across checkpoints; shards."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from stagesweep.cli import UserError
from stagesweep.evaluate.plan import build_plan, order_demos, plan_summary, shard_units
from stagesweep.evaluate.pools import load_pools
from stagesweep.evaluate.spec import parse_spec

TINY = Path(__file__).resolve().parent.parent / "recipes" / "sweeps" / "tiny.yaml"


def _spec(tmp_path: Path, designs: list[dict], n_harmful: int = 12, n_benign: int = 12,
          **extra) -> object:
    rows = {
        "harmful": [{"id": f"h{i}", "request": f"harmful [REDACTED] {i}",
                     "response": f"Sure. Step 1: [REDACTED] {i}."} for i in range(n_harmful)],
        "benign": [{"id": f"b{i}", "request": f"benign question {i}",
                    "response": f"benign answer {i}"} for i in range(n_benign)],
        "targets": [{"id": f"t{i}", "request": f"target [REDACTED] {i}"} for i in range(3)],
    }
    pools = {}
    for name, data in rows.items():
        path = tmp_path / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in data))
        cols = {"id": "id", "request": "request"}
        if name != "targets":
            cols["response"] = "response"
        pools[name] = {"path": str(path), "columns": cols}
    return parse_spec({"pools": pools, "designs": designs, "draws": 2, **extra})


def test_draws_are_nested_and_paired(tmp_path):
    spec = _spec(tmp_path, [{"type": "joint", "n_harmful": [2, 4, 8], "n_benign": [0, 3, 6],
                             "schedules": ["prefix"]}])
    pools = load_pools(spec)
    units = build_plan(spec, pools)
    assert len(units) == 3 * 2 * 9
    by_cell = {(u.context, u.n_harmful, u.n_benign): u.demos for u in units}
    for (context, n_h, n_b), demos in by_cell.items():
        big = by_cell[(context, 8, 6)]
        # prefix order = harmful sequence then benign sequence: a smaller cell takes the first
        # N_h of the same harmful draw and the first N_b of the same benign draw.
        assert demos[:n_h] == big[:n_h]
        assert demos[n_h:] == big[8 : 8 + n_b]
    # Different queries and draws get different demos; the same spec gives the same plan
    # (every checkpoint sees identical prompts).
    assert by_cell[("t0/0", 8, 6)] != by_cell[("t0/1", 8, 6)]
    assert by_cell[("t0/0", 8, 6)] != by_cell[("t1/0", 8, 6)]
    again = build_plan(spec, load_pools(spec))
    assert [(u.unit_id, u.demos) for u in again] == [(u.unit_id, u.demos) for u in units]
    assert len({u.unit_id for u in units}) == len(units)


def test_shared_contexts_reuse_draws_across_queries(tmp_path):
    spec = _spec(tmp_path, [{"type": "total_count", "n": [4], "phi": [0.5]}], contexts="shared")
    units = build_plan(spec, load_pools(spec))
    assert len(units) == 3 * 2
    for draw in (0, 1):
        demos = {u.demos for u in units if u.draw == draw}
        assert len(demos) == 1
    assert {u.context for u in units} == {"shared/0", "shared/1"}


@pytest.mark.parametrize(
    ("schedule", "expected"),
    [
        ("prefix", "HHBBBB"),
        ("suffix", "BBBBHH"),
        ("middle", "BBHHBB"),
        ("interleave", "BBHBBH"),
    ],
)
def test_schedules(schedule, expected):
    harmful, benign = [("h", 0), ("h", 1)], [("b", i) for i in range(4)]
    order = order_demos(harmful, benign, schedule, [], [])
    assert "".join(p.upper() for p, _ in order) == expected
    # within a type the draw order is kept
    assert [d for d in order if d[0] == "h"] == harmful


def test_random_order_is_a_nested_uniform_shuffle(tmp_path):
    spec = _spec(tmp_path, [{"type": "joint", "n_harmful": [2, 6], "n_benign": [2, 6]}])
    units = build_plan(spec, load_pools(spec))
    firsts = set()
    for context in {u.context for u in units}:
        cells = {(u.n_harmful, u.n_benign): u.demos for u in units if u.context == context}
        big = cells[(6, 6)]
        for demos in cells.values():
            # a smaller cell's order is the larger cell's order restricted to its demos
            assert [d for d in big if d in demos] == list(demos)
        firsts.add(big[0][0])
    assert firsts == {"harmful", "benign"}  # not a fixed type order


def test_n_larger_than_pool_is_refused_before_generation(tmp_path):
    spec = _spec(tmp_path, [{"type": "total_count", "n": [16], "phi": [0.5]}], n_benign=5)
    with pytest.raises(UserError, match=r"needs 8 demos from pool 'benign', which has only 5"):
        build_plan(spec, load_pools(spec))


def test_non_integer_cells_and_unknown_keys_are_refused(tmp_path):
    with pytest.raises(UserError, match="N=6 x phi=0.25"):
        _spec(tmp_path, [{"type": "total_count", "n": [6], "phi": [0.25]}]).designs[0].cells()
    with pytest.raises(UserError, match=r"unknown key designs\[0\].schedule.*'schedules'"):
        _spec(tmp_path, [{"type": "ordering", "n": [4], "phi": [0.5], "schedule": ["suffix"]}])
    with pytest.raises(UserError, match=r"unknown key spec.draw;.*'draws'"):
        _spec(tmp_path, [{"type": "joint", "n_harmful": [1], "n_benign": [1]}], draw=3)
    with pytest.raises(UserError, match="designs\\[0\\].schedules is 'sufix'"):
        _spec(tmp_path, [{"type": "ordering", "n": [4], "phi": [0.5], "schedules": ["sufix"]}])


def test_shards_are_disjoint_whole_contexts():
    from stagesweep.evaluate.spec import load_spec

    spec = load_spec(TINY)
    units = build_plan(spec, load_pools(spec))
    shards = [shard_units(units, i, 3) for i in range(3)]
    ids = [u.unit_id for s in shards for u in s]
    assert sorted(ids) == sorted(u.unit_id for u in units)
    contexts = [{u.context for u in s} for s in shards]
    assert not (contexts[0] & contexts[1] or contexts[1] & contexts[2] or contexts[0] & contexts[2])
    sizes = [len(s) for s in shards]
    assert max(sizes) - min(sizes) <= max(len([u for u in units if u.context == c])
                                          for c in contexts[0])
    assert shard_units(units, 1, 3) == shards[1]  # deterministic


def test_tiny_spec_unit_counts():
    from stagesweep.evaluate.spec import load_spec

    spec = load_spec(TINY)
    units = build_plan(spec, load_pools(spec))
    per_context = {"total_count": 10, "joint": 9, "ordering": 5, "format": 2}
    queries = len(load_pools(spec)["targets"])
    contexts = queries * spec.draws
    assert plan_summary(units) == {d: n * contexts for d, n in per_context.items()}
    # Asked once: joint's (0,4) (2,2) (4,0) (4,4) and ordering's random (4,4) are total_count
    # cells (4 + 1 a context), and the zero-demo baseline is one prompt per query, not per draw.
    assert len(units) == sum(per_context.values()) * contexts - 5 * contexts - queries
    baseline = [u for u in units if u.n_harmful == u.n_benign == 0]
    assert len(baseline) == queries
    assert {(lab.design, lab.draw) for lab in baseline[0].labels} == {("joint", 0), ("joint", 1)}


def test_shared_prompts_are_identical_prompts(tmp_path):
    """A unit stands for several labels only when the labels' own plans give the same prompt."""
    designs = [{"type": "total_count", "n": [4, 8], "phi": [0, 0.5, 1]},
               {"type": "joint", "n_harmful": [0, 2, 4], "n_benign": [0, 2, 4]},
               {"type": "ordering", "n": [8], "phi": [0.5],
                "schedules": ["prefix", "suffix", "random"]}]
    spec = _spec(tmp_path, designs)
    units = build_plan(spec, load_pools(spec))
    assert len({u.prompt_sha for u in units}) == len(units)
    ids = [lab.unit_id for u in units for lab in u.labels]
    assert len(ids) == len(set(ids))
    shared = [u for u in units if len({lab.design for lab in u.labels}) > 1]
    assert {(u.n_harmful, u.n_benign) for u in shared} >= {(2, 2), (4, 0), (0, 4), (4, 4)}
    # each design alone plans the very same demos for the cell
    for design in designs:
        alone = {(u.query_id, lab.draw, u.cell, lab.schedule): u.demos
                 for u in build_plan(_spec(tmp_path, [design]), load_pools(spec))
                 for lab in u.labels}
        for u in units:
            for lab in u.labels:
                if lab.design == design["type"]:
                    assert alone[u.query_id, lab.draw, u.cell, lab.schedule] == u.demos


@pytest.mark.parametrize("contexts", ["per_query", "shared"])
def test_prefix_nested_orders(tmp_path, contexts):
    designs = [{"type": "total_count", "n": [4, 8, 16], "phi": [0, 0.25, 0.5, 0.75, 1]},
               {"type": "joint", "n_harmful": [0, 4, 8], "n_benign": [0, 4, 8]},
               {"type": "ordering", "n": [16], "phi": [0.5], "schedules": ["suffix", "random"]}]
    nested = _spec(tmp_path, designs, 24, 24, order="prefix_nested", contexts=contexts)
    fresh = _spec(tmp_path, designs, 24, 24, contexts=contexts)
    pools = load_pools(nested)
    units, before = build_plan(nested, pools), build_plan(fresh, pools)
    assert build_plan(nested, pools) == units  # deterministic: every checkpoint sees the same
    sets = {(u.query_id, u.draw, u.cell, u.schedule): set(u.demos) for u in before}
    cells = {}
    for u in units:
        # the same demos as the study's order, only arranged differently
        assert set(u.demos) == sets[u.query_id, u.draw, u.cell, u.schedule]
        if u.schedule == "random":
            cells.setdefault(u.context, {})[(u.n_harmful, u.n_benign)] = u.demos
        else:  # fixed schedules are unchanged
            assert u.demos == next(v.demos for v in before if v.unit_id == u.unit_id)
    for by_cell in cells.values():
        for phi in (0, 0.25, 0.5, 0.75, 1):
            chain = [by_cell[round(n * phi), n - round(n * phi)] for n in (4, 8, 16)]
            for small, big in zip(chain, chain[1:], strict=False):
                assert big[: len(small)] == small
    # joint (8, 4) has mix 2:1, which no smaller cell has: it starts its own chain, which is
    # its plain shuffle order
    for u in units:
        if (u.n_harmful, u.n_benign) == (8, 4):
            assert u.demos == next(v.demos for v in before if v.unit_id == u.unit_id)
    firsts = {d[0][0] for c in cells.values() for d in [c[(8, 8)]]}
    assert firsts == {"harmful", "benign"}


@pytest.mark.parametrize("order", ["shuffle", "prefix_nested"])
def test_an_ablation_s_all_harmful_cell_is_the_main_design_s_prompt(tmp_path, order):
    designs = [{"type": "joint", "n_harmful": [0, 2, 4], "n_benign": [0, 4]},
               {"type": "joint", "name": "ablation", "n_harmful": [0, 4], "n_benign": [0, 4],
                "benign_pool": "harmful"}]
    spec = _spec(tmp_path, designs, order=order)
    units = build_plan(spec, load_pools(spec))
    for cell in ((4, 0), (0, 0)):
        merged = [u for u in units if (u.n_harmful, u.n_benign) == cell]
        assert all({lab.design for lab in u.labels} == {"joint", "ablation"} for u in merged)


def test_prefix_nested_positions_stay_uniform(tmp_path):
    """Each position holds a harmful demo with probability phi, as under a fresh shuffle;
    the harmful count in the last half is fixed instead of hypergeometric."""
    import numpy as np

    design = [{"type": "total_count", "n": [4, 8, 16], "phi": [0.25]}]
    many = parse_spec({**_raw(tmp_path, 400), "designs": design, "order": "prefix_nested"})
    units = [u for u in build_plan(many, load_pools(many)) if u.n_harmful == 4]
    hits = np.array([[p == "harmful" for p, _ in u.demos] for u in units], dtype=float)
    se = np.sqrt(0.25 * 0.75 / len(units))
    assert np.all(np.abs(hits.mean(axis=0) - 0.25) < 4.5 * se)
    assert set(hits[:, 8:].sum(axis=1)) == {2.0}


def _raw(tmp_path: Path, n_targets: int) -> dict:
    rows = {
        "harmful": [{"id": f"h{i}", "request": f"h {i}", "response": "r"} for i in range(12)],
        "benign": [{"id": f"b{i}", "request": f"b {i}", "response": "r"} for i in range(12)],
        "targets": [{"id": f"t{i}", "request": f"t {i}"} for i in range(n_targets)],
    }
    pools = {}
    for name, data in rows.items():
        path = tmp_path / f"many_{name}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in data))
        cols = {"id": "id", "request": "request"} | ({"response": "response"}
                                                     if name != "targets" else {})
        pools[name] = {"path": str(path), "columns": cols}
    return {"pools": pools, "draws": 1}


@pytest.mark.parametrize("name", ["paper", "stages"])
def test_shipped_study_specs_parse(name):
    from stagesweep.evaluate.spec import load_spec

    spec = load_spec(TINY.parent / f"{name}.yaml")
    assert spec.target_pools == ["harmbench", "sorrybench", "wildguardtest"]
    cells = {d.name: d.cells() for d in spec.designs}
    if name == "paper":
        assert len(cells["total_count"]) == 30 and (64, 64) in cells["total_count"]
        ordering = next(d for d in spec.designs if d.name == "ordering")
        assert len(ordering.schedules) == 5
    else:
        assert {h for h, _ in cells["stages"]} == {8, 16, 32}
    with pytest.raises(UserError, match="pool 'harmful' is a placeholder"):
        from stagesweep.evaluate.pools import load_pool

        load_pool(spec.pools["harmful"], needs_response=True)
