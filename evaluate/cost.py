"""`stagesweep plan`: what a sweep will cost, and whether it can find the effect, before any
weights load.

For each checkpoint (its tokenizer and config.json only) and for each design of the spec (the
study's fresh shuffle per cell, `order: prefix_nested`, K shared contexts), it counts units,
prompt tokens, trie tokens (what prefix sharing prefills), decode tokens and overflowing
units, turns them into FLOPs from the model's shape, and into GPU-hours on a named
accelerator at a stated utilisation; `stagesweep power` supplies the simulated power and
false-positive rate of each design.

Token counts are computed per demo, not per prompt: a conversation's tokens are its
no-demo rendering plus each demo turn's own tokens (chat templates render turns one after
the other), and the trie is the tree of demo sequences. That makes a paper-sized plan
(185k prompts of up to 128 demos) seconds of work instead of tokenizing billions of tokens;
`tests/test_cost.py` pins it to the exact rendered counts.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from stagesweep.cli import UserError
from stagesweep.evaluate.plan import build_plan
from stagesweep.evaluate.pools import DemoPool
from stagesweep.evaluate.spec import Contexts, Order, SweepSpec

# Dense bf16 tensor peak, FLOP/s (vendor datasheets, without sparsity).
ACCELERATORS: dict[str, float] = {
    "a100": 312e12, "h100": 989e12, "h200": 989e12, "b200": 2250e12, "l40s": 362e12,
    "mi300x": 1307e12,
}


@dataclass(frozen=True)
class ModelShape:
    """What FLOPs depend on, read from a config.json: per token 2 x the active non-embedding
    weights, plus attention over the context (4 x layers x heads x head_dim per earlier
    token, capped at the window on sliding-window layers), plus the output head."""

    params: float
    layers: int
    attn_width: int
    head: int
    window: int | None = None
    window_layers: int = 0
    context: int | None = None

    @classmethod
    def from_config(cls, config: dict) -> ModelShape:
        c = config.get("text_config") or config
        try:
            d, n_layers, heads = c["hidden_size"], c["num_hidden_layers"], c["num_attention_heads"]
        except KeyError as err:
            raise UserError(f"config.json has no {err.args[0]!r}: not a decoder config "
                            "stagesweep plan can read") from None
        head_dim = c.get("head_dim") or d // heads
        kv = c.get("num_key_value_heads") or heads
        mlp = c.get("moe_intermediate_size") or c.get("intermediate_size") or 4 * d
        experts = c.get("num_experts_per_tok") or 1
        per_layer = d * head_dim * (2 * heads + 2 * kv) + 3 * d * mlp * experts
        types = c.get("layer_types") or []
        window_layers = sum(t == "sliding_attention" for t in types)
        return cls(params=float(n_layers * per_layer), layers=n_layers,
                   attn_width=heads * head_dim, head=d * c["vocab_size"],
                   window=c.get("sliding_window") if window_layers else None,
                   window_layers=window_layers, context=c.get("max_position_embeddings"))

    def prefill_flops(self, start: Any, end: Any) -> Any:
        """Positions [start, end) given a cached prefix of `start` tokens (numbers or arrays)."""
        start, end = np.asarray(start, dtype=float), np.asarray(end, dtype=float)
        full = self.layers - self.window_layers
        attn = 2 * self.attn_width * full * (end * end - start * start)
        if self.window_layers:
            w = self.window

            def capped(n: np.ndarray) -> np.ndarray:  # sum over t < n of min(t, w), times 2
                return np.where(n <= w, n * n, w * w + 2 * w * (n - w))

            attn = attn + 2 * self.attn_width * self.window_layers * (capped(end) - capped(start))
        return 2 * self.params * (end - start) + attn

    def decode_flops(self, prompt: Any, new: int) -> Any:
        return self.prefill_flops(prompt, np.asarray(prompt) + new) + 2 * self.head * new


@dataclass
class TokenModel:
    """Tokens of a conversation = `base[query]` (the rendering without demos) + the tokens of
    each demo turn; `start` of them (template start, system prompt) come before the demos."""

    base: dict[str, int]
    start: int
    demo: Callable[[str, str, str], int]


def measured_tokens(tokenizer: Any, spec: SweepSpec, pools: dict[str, DemoPool]) -> TokenModel:
    """Per-demo and per-target token counts from the checkpoint's own template."""
    from stagesweep.evaluate.plan import WorkUnit as Unit
    from stagesweep.evaluate.render import render_units

    targets = pools[spec.targets_key]

    def bare(query: str, demos: tuple = (), opening: str = "unchanged") -> Unit:
        return Unit("", "", "", query, 0, 0, 0, "random", opening, "", demos)

    base_ids = render_units(tokenizer, [bare(q) for q in targets.ids], pools, spec)[1]
    base = {q: len(ids) for q, ids in zip(targets.ids, base_ids, strict=True)}
    first, other = base_ids[0], base_ids[-1]
    start = next((i for i, (a, b) in enumerate(zip(first, other, strict=False)) if a != b),
                 min(len(first), len(other)))
    probe = targets.ids[0]
    cache: dict[tuple[str, str, str], int] = {}

    def demo(pool: str, row: str, opening: str) -> int:
        key = (pool, row, opening)
        if key not in cache:
            ids = render_units(tokenizer, [bare(probe, ((pool, row),), opening)], pools, spec)[1]
            cache[key] = len(ids[0]) - base[probe]
        return cache[key]

    return TokenModel(base, start, demo)


def uniform_tokens(targets: DemoPool, per_demo: int, per_target: int, start: int = 8
                   ) -> TokenModel:
    """Every demo `per_demo` tokens and every conversation without demos `per_target`: for
    planning a study whose pools or tokenizer are not at hand."""
    return TokenModel({q: per_target for q in targets.ids}, start, lambda *_: per_demo)


@dataclass
class DesignCost:
    design: str
    contexts: str
    order: str
    draws: int
    queries: int
    units: int
    rows: int
    prompt_tokens: int
    trie_tokens: int
    decode_tokens: int
    overflow: int
    pflop_plain: float
    pflop_shared: float
    gpu_hours_plain: float
    gpu_hours_shared: float
    power: float | None = None
    false_positive_rate: float | None = None
    mc_se: float | None = None
    power_note: str = ""


def design_cost(name: str, spec: SweepSpec, pools: dict[str, DemoPool], tokens: TokenModel,
                shape: ModelShape, *, flops_per_second: float, limit: int | None) -> DesignCost:
    """Tokens, FLOPs and GPU-hours of one design: plain (every prompt prefilled from scratch)
    and prefix-shared (every node of the demo trie prefilled once, each answer decoded)."""
    units = build_plan(spec, pools)
    # a judge-free sweep (outcome: logprob) decodes nothing; scoring its few opening tokens
    # on each prompt's cache is left out, like the judge's own cost
    new = spec.generation.max_new_tokens * spec.generation.num_samples if spec.generates else 0
    lengths, seg_start, seg_end = [], [], []  # prompts that fit; trie segments prefilled
    overflow, context, ids = 0, None, 0
    nodes: dict[tuple, tuple[int, int]] = {}  # (parent id, demo, opening) -> (id, end position)
    for unit in units:
        if unit.context != context:  # contexts share no demos, so each has its own trie
            context, nodes = unit.context, {}
        node, pos, added = 0, tokens.start, []
        for demo in unit.demos:
            key = (node, demo, unit.opening)
            hit = nodes.get(key)
            if hit is None:
                ids += 1
                hit = nodes[key] = (ids, pos + tokens.demo(*demo, unit.opening))
                added.append((key, pos))
            node, pos = hit
        length = tokens.base[unit.query_id] + pos - tokens.start
        if limit and length + spec.generation.max_new_tokens > limit:
            overflow += 1  # never run: its new trie nodes are not prefilled either
            for key, _ in added:
                del nodes[key]
            continue
        for key, begin in added:
            seg_start.append(begin)
            seg_end.append(nodes[key][1])
        lengths.append(length)
        seg_start.append(pos)  # the target turn and generation prompt, a leaf of its own
        seg_end.append(length)
    lengths_a = np.array(lengths, dtype=float)
    starts, ends = np.array(seg_start, dtype=float), np.array(seg_end, dtype=float)
    trie_total = int((ends - starts).sum()) + (tokens.start if units else 0)
    flops_plain = float(shape.prefill_flops(0, lengths_a).sum())
    flops_shared = float(shape.prefill_flops(starts, ends).sum())
    decode = float(shape.decode_flops(lengths_a, new).sum())
    prompt_total = int(lengths_a.sum())
    hours = 3600 * flops_per_second
    return DesignCost(
        design=name, contexts=spec.contexts.value, order=spec.order.value, draws=spec.draws,
        queries=len(pools[spec.targets_key]), units=len(units),
        rows=sum(len(u.labels) for u in units), prompt_tokens=prompt_total,
        trie_tokens=trie_total, decode_tokens=(len(units) - overflow) * new, overflow=overflow,
        pflop_plain=(flops_plain + decode) / 1e15, pflop_shared=(flops_shared + decode) / 1e15,
        gpu_hours_plain=(flops_plain + decode) / hours,
        gpu_hours_shared=(flops_shared + decode) / hours)


def design_variants(spec: SweepSpec, shared_draws: list[int]) -> list[tuple[str, SweepSpec]]:
    """The designs compared: the study's fresh shuffles, prefix-nested orders, and K shared
    contexts (prefix-nested too) for each K."""
    variants = [
        ("fresh shuffle", dataclasses.replace(spec, contexts=Contexts.PER_QUERY,
                                              order=Order.SHUFFLE)),
        ("prefix_nested", dataclasses.replace(spec, contexts=Contexts.PER_QUERY,
                                              order=Order.PREFIX_NESTED)),
    ]
    variants += [(f"shared K={k}", dataclasses.replace(spec, contexts=Contexts.SHARED,
                                                       order=Order.PREFIX_NESTED, draws=k))
                 for k in shared_draws]
    return variants


def add_power(costs: list[DesignCost], *, design: str, queries: int, effect: float,
              sims: int, seed: int) -> None:
    """Power at the planted effect and the false-positive rate at 0 for each design, from
    `stagesweep power`. Its simulator does not model demo order (tests/test_order_sim.py shows
    prefix-nested orders keep size and coverage), so both per-query designs share one row.
    Shared contexts are simulated as such only when `power_table` takes `contexts`."""
    from stagesweep.evaluate.analysis.power import power_table

    accepts = inspect.signature(power_table).parameters
    done: dict[tuple, tuple] = {}
    for cost in costs:
        shared = cost.contexts == Contexts.SHARED.value
        if shared and "contexts" not in accepts:
            cost.power_note = "not simulated: `stagesweep power` has no shared contexts"
            continue
        if shared and "draw_sd" not in accepts:
            # the draws then differ only by chance, so power of K >= 20 is an upper bound
            cost.power_note = ("shared contexts are simulated without demo-set (draw) effects: "
                               "their power is an upper bound")
        key = (cost.contexts, cost.draws)
        if key not in done:
            extra = {"contexts": cost.contexts} if "contexts" in accepts else {}
            rows = power_table(design=design, queries=[queries], draws=cost.draws,
                               b2=[effect, 0.0], sims=sims, seed=seed, **extra)
            done[key] = (rows[0].power, rows[1].power, max(rows[0].mc_se, rows[1].mc_se))
        cost.power, cost.false_positive_rate, cost.mc_se = done[key]


def _read_config(checkpoint: str) -> dict:
    """config.json with transformers' defaults filled in (e.g. OLMo 3's sliding-window layer
    pattern, which its config.json may leave implicit)."""
    raw = _raw_config(checkpoint)
    try:
        from transformers import AutoConfig

        return AutoConfig.for_model(**raw).to_dict()
    except (ValueError, KeyError, TypeError):  # an architecture transformers does not know
        return raw


def _raw_config(checkpoint: str) -> dict:
    path = Path(checkpoint)
    if path.is_dir():
        path = path / "config.json"
    if path.is_file():
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise UserError(f"{path}: not valid JSON ({err.msg})") from None
    if Path(checkpoint).exists() or checkpoint.startswith((".", "/")):
        raise UserError(f"--checkpoint {checkpoint}: no config.json there")
    from huggingface_hub import hf_hub_download

    try:
        return json.loads(Path(hf_hub_download(checkpoint, "config.json")).read_text())
    except Exception as err:  # hub errors come in many classes; all mean "cannot get it"
        raise UserError(f"cannot fetch config.json of {checkpoint!r}: {err}") from None


def plan_costs(spec: SweepSpec, checkpoint: str, *, accelerator: str, utilization: float,
               shared_draws: list[int], tokens_per_demo: int | None = None,
               tokens_per_target: int = 60, queries: int | None = None) -> list[DesignCost]:
    """Every design's cost for one checkpoint. With `tokens_per_demo` the pools and tokenizer
    are not read: demos and targets get fixed token counts and `queries` stand-in targets."""
    config = _read_config(checkpoint)
    shape = ModelShape.from_config(config)
    limit = spec.max_context_tokens or shape.context
    if tokens_per_demo is None:
        from stagesweep.evaluate.pools import load_pools
        from stagesweep.evaluate.render import load_tokenizer

        pools = load_pools(spec)
        tokenizer = load_tokenizer(checkpoint, chat_template=spec.chat_template,
                                   trust_remote_code=spec.trust_remote_code)
        tokens = measured_tokens(tokenizer, spec, pools)
    else:
        pools = stand_in_pools(spec, queries)
        tokens = uniform_tokens(pools[spec.targets_key], tokens_per_demo, tokens_per_target)
    rate = ACCELERATORS[accelerator] * utilization
    return [design_cost(name, variant, pools, tokens, shape, flops_per_second=rate, limit=limit)
            for name, variant in design_variants(spec, shared_draws)]


def stand_in_pools(spec: SweepSpec, queries: int | None) -> dict[str, DemoPool]:
    """Pools of placeholder rows, each as large as the spec's largest cell needs."""
    need: dict[str, int] = {}
    for d in spec.designs:
        for n_h, n_b in d.cells():
            need[d.harmful_pool] = max(need.get(d.harmful_pool, 0), n_h)
            need[d.benign_pool] = max(need.get(d.benign_pool, 0), n_b)
    if not queries:
        raise UserError("--tokens-per-demo needs --queries (how many target queries)")
    pools = {name: DemoPool(name, tuple(f"{name}{i}" for i in range(max(n, 1))),
                            ("",) * max(n, 1), ("",) * max(n, 1)) for name, n in need.items()}
    pools[spec.targets_key] = DemoPool(spec.targets_key, tuple(f"q{i}" for i in range(queries)),
                                       ("",) * queries, None)
    return pools


def format_costs(checkpoint: str, costs: list[DesignCost], accelerator: str,
                 utilization: float) -> str:
    lines = [f"{checkpoint}: GPU-hours on one {accelerator} at {utilization:.0%} of its dense "
             "bf16 peak; plain = every prompt prefilled, shared = each trie token once",
             f"{'design':<16} {'units':>8} {'prompt tok':>13} {'trie tok':>13} {'ratio':>6} "
             f"{'decode tok':>11} {'overflow':>8} {'PFLOP plain':>11} {'PFLOP shared':>12} "
             f"{'GPU-h plain':>11} {'GPU-h shared':>12} {'power':>6} {'FPR':>6} {'± MC':>5}"]
    for c in costs:
        ratio = c.prompt_tokens / c.trie_tokens if c.trie_tokens else float("nan")
        power = ("-", "-", "-") if c.power is None else (
            f"{c.power:.2f}", f"{c.false_positive_rate:.3f}", f"{c.mc_se:.3f}")
        lines.append(
            f"{c.design:<16} {c.units:>8} {c.prompt_tokens:>13,} {c.trie_tokens:>13,} "
            f"{ratio:>6.2f} {c.decode_tokens:>11,} {c.overflow:>8} {c.pflop_plain:>11.1f} "
            f"{c.pflop_shared:>12.1f} {c.gpu_hours_plain:>11.1f} {c.gpu_hours_shared:>12.1f} "
            f"{power[0]:>6} {power[1]:>6} {power[2]:>5}")
    notes = sorted({c.power_note for c in costs if c.power_note})
    return "\n".join(lines + [f"note: {n}" for n in notes])


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "plan",
        help="cost (tokens, FLOPs, GPU-hours) and power of a spec's designs, no weights loaded",
        description="For each checkpoint (tokenizer and config.json only), the units, prompt "
        "and trie tokens, decode tokens, overflowing units, FLOPs and GPU-hours of the spec "
        "under three designs: a fresh shuffle per cell (the study's), prefix-nested orders, "
        "and K shared demo contexts; with the power and false-positive rate that `stagesweep "
        "power` simulates for each.",
    )
    parser.add_argument("spec", type=Path, help="sweep spec YAML")
    parser.add_argument("--checkpoint", action="append", required=True,
                        help="checkpoint dir, hub id or config.json (repeatable)")
    parser.add_argument("--accelerator", default="h100", choices=sorted(ACCELERATORS))
    parser.add_argument("--utilization", type=float, default=0.4,
                        help="share of the accelerator's dense peak achieved (default 0.4)")
    parser.add_argument("--shared-draws", type=int, nargs="*", default=[2, 20, 50],
                        help="K values of the shared-contexts designs (default 2 20 50)")
    parser.add_argument("--tokens-per-demo", type=int,
                        help="plan without pools or tokenizer: every demo this many tokens")
    parser.add_argument("--tokens-per-target", type=int, default=60,
                        help="with --tokens-per-demo: tokens of a prompt without demos")
    parser.add_argument("--queries", type=int, help="with --tokens-per-demo: target queries")
    parser.add_argument("--power-design", choices=("joint", "stages", "total_count"),
                        default="joint", help="what `stagesweep power` simulates")
    parser.add_argument("--effect", type=float, default=0.1,
                        help="planted b2 (or stage change) for the power column")
    parser.add_argument("--sims", type=int, default=100,
                        help="simulations per power figure; 0 skips power")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.set_defaults(func=_handle)


def _handle(args: argparse.Namespace) -> int:
    from stagesweep.evaluate.spec import load_spec

    if not 0 < args.utilization <= 1:
        raise UserError("--utilization is a share of the peak: give a value in (0, 1]")
    if any(k < 1 for k in args.shared_draws):
        raise UserError("--shared-draws values must be at least 1")
    spec = load_spec(args.spec)
    started, report = time.perf_counter(), {}
    for checkpoint in args.checkpoint:
        costs = plan_costs(spec, checkpoint, accelerator=args.accelerator,
                           utilization=args.utilization, shared_draws=args.shared_draws,
                           tokens_per_demo=args.tokens_per_demo,
                           tokens_per_target=args.tokens_per_target, queries=args.queries)
        if args.sims:
            add_power(costs, design=args.power_design, queries=costs[0].queries,
                      effect=args.effect, sims=args.sims, seed=args.seed)
        report[checkpoint] = [dataclasses.asdict(c) for c in costs]
        if not args.json:
            print(format_costs(checkpoint, costs, args.accelerator, args.utilization))
    if args.json:
        print(json.dumps(report))
    else:
        print(f"plan: {time.perf_counter() - started:.1f}s; power = share of {args.sims} "
              f"simulations detecting a planted {args.effect:+g} ({args.power_design}); FPR at 0")
    return 0
