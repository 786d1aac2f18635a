"""Expand a sweep spec into work units: one distinct prompt each.

Draws are seeded and nested. For every demo context (a target query and draw, or in
`contexts: shared` a draw used by all queries) each pool is permuted once; a cell with N_h
harmful and N_b benign demos takes the first N_h of the harmful permutation and the first N_b of
the benign one. A smaller cell's demos are therefore a subset of a larger cell's, so prompts
share long prefixes (what prefix sharing exploits), and cells differ only in the mix, not in
which demos happened to be drawn. Nothing depends on the checkpoint, so every checkpoint of a
lineage sees exactly the same prompts (the paired design across stages).

A prompt is asked once: when several (design, cell, draw, schedule) labels give the same
conversation (a cell that two designs share, the zero-demo baseline of every draw), one unit
carries them all (`labels`) and the results table has one row per label, all with the unit's
`prompt_sha`.

`order: prefix_nested` changes only the `random` schedule: within a demo context the cells of
one mix (N_h : N_b) form a chain by size, and each cell's demos are the previous cell's, in
their order, followed by its new demos shuffled. Every position is still harmful with
probability phi, but the shuffle is stratified by block (README, "Prefix-nested demo orders").
"""

from __future__ import annotations

import hashlib
import json
import math
from collections import Counter, defaultdict
from dataclasses import dataclass, replace

import numpy as np

from stagesweep.cli import UserError
from stagesweep.evaluate.pools import DemoPool
from stagesweep.evaluate.spec import Contexts, Order, Schedule, SweepSpec


@dataclass(frozen=True)
class Label:
    """One row the unit's answer is exported as: a design's own id for the prompt."""

    unit_id: str
    design: str
    draw: int
    schedule: str


@dataclass(frozen=True)
class WorkUnit:
    """One prompt to generate and judge; `demos` are (pool, row id) in prompt order. The
    identifying fields are those of the first label; `labels` lists every label (first included)
    whose prompt this is, and `prompt_sha` names the prompt across them."""

    unit_id: str
    design: str
    cell: str
    query_id: str
    draw: int
    n_harmful: int
    n_benign: int
    schedule: str
    opening: str
    # Units with the same context share their demo draw; shards keep a context whole.
    context: str
    demos: tuple[tuple[str, str], ...]
    prompt_sha: str = ""
    labels: tuple[Label, ...] = ()


def unit_id(design: str, cell: str, query_id: str, draw: int, schedule: str,
            opening: str) -> str:
    """Stable across runs, machines and checkpoints: a hash of what identifies the unit."""
    key = json.dumps([design, cell, query_id, draw, schedule, opening])
    return hashlib.sha256(key.encode()).hexdigest()[:20]


def _rng(*parts: object) -> np.random.Generator:
    digest = hashlib.sha256("\0".join(map(str, parts)).encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def order_demos(harmful: list, benign: list, schedule: str, keys_h: np.ndarray,
                keys_b: np.ndarray) -> list:
    """Arrange one cell's demos. `keys_*` are the draw's random sort keys per position, so a
    `random` cell is a uniform shuffle whose restriction to a smaller cell is that cell's
    shuffle (nested, like the draws)."""
    n_h, n_b = len(harmful), len(benign)
    match Schedule(schedule):
        case Schedule.PREFIX:
            return harmful + benign
        case Schedule.SUFFIX:
            return benign + harmful
        case Schedule.MIDDLE:
            return benign[: n_b // 2] + harmful + benign[n_b // 2 :]
        case Schedule.INTERLEAVE:
            # Bresenham spread: slot i is harmful when the running share of harmful ticks up,
            # so at phi = .5 the order is B H B H ... ending with a harmful demo.
            total, out, h, b = n_h + n_b, [], iter(harmful), iter(benign)
            for i in range(total):
                is_h = (i + 1) * n_h // total > i * n_h // total
                out.append(next(h) if is_h else next(b))
            return out
        case Schedule.RANDOM:
            tagged = [(keys_h[i], 0, i, d) for i, d in enumerate(harmful)]
            tagged += [(keys_b[j], 1, j, d) for j, d in enumerate(benign)]
            return [d for *_, d in sorted(tagged, key=lambda t: t[:3])]


def build_plan(spec: SweepSpec, pools: dict[str, DemoPool]) -> list[WorkUnit]:
    """All distinct prompts of the spec, grouped by demo context, in a deterministic order."""
    _check_sizes(spec, pools)
    targets = pools[spec.targets_key]
    max_h = max((h for d in spec.designs for h, _ in d.cells()), default=0)
    max_b = max((b for d in spec.designs for _, b in d.cells()), default=0)
    units: dict[tuple, WorkUnit] = {}
    contexts = (
        [(q, d) for q in targets.ids for d in range(spec.draws)]
        if spec.contexts is Contexts.PER_QUERY
        else [("shared", d) for d in range(spec.draws)]
    )
    for ctx, draw in contexts:
        context = f"{ctx}/{draw}"
        perms: dict[str, np.ndarray] = {}

        def drawn(pool: str, n: int, ctx=ctx, draw=draw, perms=perms) -> list:
            if pool not in perms:
                perms[pool] = _rng(spec.seed, "demos", ctx, draw, pool).permutation(
                    len(pools[pool])
                )
            return [(pool, pools[pool].ids[i]) for i in perms[pool][:n]]

        keys_h = _rng(spec.seed, "order-h", ctx, draw).random(max_h)
        keys_b = _rng(spec.seed, "order-b", ctx, draw).random(max_b)
        nested = (_nested_orders(spec, drawn, keys_h, keys_b)
                  if spec.order is Order.PREFIX_NESTED else {})
        queries = [ctx] if spec.contexts is Contexts.PER_QUERY else list(targets.ids)
        for query_id in queries:
            for design in spec.designs:
                for n_h, n_b in design.cells():
                    harmful = drawn(design.harmful_pool, n_h)
                    benign = drawn(design.benign_pool, n_b)
                    cell = f"h{n_h}b{n_b}"
                    for schedule in design.schedules:
                        demos = tuple(
                            nested[_pools_used(design, n_h, n_b) + (n_h, n_b)]
                            if nested and schedule == Schedule.RANDOM
                            else order_demos(harmful, benign, schedule, keys_h, keys_b))
                        for opening in design.openings:
                            label = Label(
                                unit_id(design.name, cell, query_id, draw, schedule, opening),
                                design.name, draw, schedule)
                            # Rendering reads only the target, the demos and the opening
                            # (which the judge also reads for format adoption).
                            key = (query_id, opening, n_h, n_b, demos)
                            if key in units:
                                first = units[key]
                                units[key] = replace(first, labels=(*first.labels, label))
                                continue
                            units[key] = WorkUnit(
                                label.unit_id, design.name, cell, query_id, draw, n_h, n_b,
                                schedule, opening, context, demos, _prompt_sha(key), (label,))
    ids = [label.unit_id for u in units.values() for label in u.labels]
    if len(set(ids)) != len(ids):
        raise UserError("the spec plans the same unit twice; remove repeated values from the "
                        "design lists")
    return list(units.values())


def _prompt_sha(key: tuple) -> str:
    """Names one conversation (target, opening, demos in order): the same in every sweep of a
    spec and for every checkpoint, so tables of one spec can be de-duplicated and joined."""
    return hashlib.sha256(json.dumps(key).encode()).hexdigest()[:20]


def _pools_used(design, n_h: int, n_b: int) -> tuple[str | None, str | None]:
    """The pools a cell draws from: an all-harmful cell of an ablation design (another benign
    pool) is the same prompt as the main design's, so it must join the same chain."""
    return (design.harmful_pool if n_h else None, design.benign_pool if n_b else None)


def _nested_orders(spec: SweepSpec, drawn, keys_h: np.ndarray, keys_b: np.ndarray
                   ) -> dict[tuple[str | None, str | None, int, int], list]:
    """`prefix_nested` demo orders of one context for every cell any design shows in `random`
    order, keyed by (harmful pool, benign pool, N_h, N_b), a pool None when the cell takes no
    demo from it.

    The cells of one mix, across designs, form a chain by size; each cell is the previous one
    followed by its new demos in the draw's sort-key order (so the smallest cell of a chain is
    exactly its `shuffle` order). Cells of different mixes never extend each other: a prefix of
    another mix would put a block of one demo type at a fixed distance from the target."""
    chains: dict[tuple, set] = defaultdict(set)
    for design in spec.designs:
        if Schedule.RANDOM in design.schedules:
            for n_h, n_b in design.cells():
                g = math.gcd(n_h, n_b) or 1
                chains[_pools_used(design, n_h, n_b) + (n_h // g, n_b // g)].add((n_h, n_b))
    orders: dict[tuple[str | None, str | None, int, int], list] = {}
    for (h_pool, b_pool, *_), cells in chains.items():
        sequence: list = []
        last_h = last_b = 0
        for n_h, n_b in sorted(cells):
            harmful = drawn(h_pool, n_h) if h_pool else []
            benign = drawn(b_pool, n_b) if b_pool else []
            sequence = sequence + order_demos(harmful[last_h:], benign[last_b:],
                                              Schedule.RANDOM, keys_h[last_h:], keys_b[last_b:])
            orders[h_pool, b_pool, n_h, n_b] = sequence
            last_h, last_b = n_h, n_b
    return orders


def _check_sizes(spec: SweepSpec, pools: dict[str, DemoPool]) -> None:
    """Refuse a cell that needs more demos than its pool holds, before any generation."""
    for design in spec.designs:
        for n_h, n_b in design.cells():
            for pool, n in ((design.harmful_pool, n_h), (design.benign_pool, n_b)):
                if n > len(pools[pool]):
                    raise UserError(
                        f"design {design.name!r} cell N_h={n_h}, N_b={n_b} needs {n} demos "
                        f"from pool {pool!r}, which has only {len(pools[pool])}; shrink the "
                        "design or enlarge the pool"
                    )


def plan_summary(units: list[WorkUnit]) -> dict[str, int]:
    """Rows per design (a prompt two designs share counts in both), in first-seen order."""
    return dict(Counter(label.design for u in units for label in u.labels))


def export_labels(units: list[WorkUnit]) -> dict[str, list[dict]]:
    """unit id -> the rows its answer is exported as (the columns that differ between them)."""
    return {u.unit_id: [{"unit_id": label.unit_id, "design": label.design, "draw": label.draw,
                         "schedule": label.schedule, "prompt_sha": u.prompt_sha}
                        for label in u.labels] for u in units}


def shard_units(units: list[WorkUnit], index: int, count: int) -> list[WorkUnit]:
    """Shard `index` of `count`: whole demo contexts (so the prompts that share prefixes stay
    in one process), assigned greedily to the lightest shard so shards are balanced, and
    deterministic so a re-run's workers own the same units. With fewer contexts than shards
    (`contexts: shared`) a context is split by query: each shard then computes the shared
    demo prefix once, which costs little next to the queries' own work."""
    few = len({u.context for u in units}) < 4 * count

    def key(u: WorkUnit) -> str:
        return f"{u.context}|{u.query_id}" if few else u.context

    sizes = Counter(key(u) for u in units)
    loads, owner = [0] * count, {}
    for group, size in sorted(sizes.items(), key=lambda kv: (-kv[1], kv[0])):
        k = min(range(count), key=lambda i: (loads[i], i))
        owner[group] = k
        loads[k] += size
    return [u for u in units if owner[key(u)] == index]
