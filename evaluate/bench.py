"""`stagesweep bench`: one sweep-shaped workload through every generation engine.

Paths, in one process on one checkpoint: the `hf` backend's plain batched path (every prompt
prefilled from scratch, the reference), its prefix sharing (each distinct prefix prefilled
once), and, when vLLM is installed, the `vllm` backend without and with automatic prefix
caching. Each path's wall and CPU seconds, prefilled tokens (vLLM: prompt tokens less the
tokens its prefix cache served, counted per request) and greedy answers (compared with the
plain path's, token for token) are reported, with `efficiency`: the speed-up over the plain
path divided by the most prefix reuse can give (prompt tokens / trie tokens).

Two workloads: `shared` (the default; `contexts: shared`, one demo draw reused by every target
query, where prefix reuse is largest) and `paper` (the study's shape scaled down: per-query
nested draws, two draws, the total-count and joint designs). Demo text is the shipped synthetic
corpus (benign) and redacted placeholders (harmful), so the bench needs nothing but a
checkpoint, by default a locally built "small" tiny model.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import resource
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from stagesweep.cli import UserError
from stagesweep.evaluate.backends.base import GenerationConfig

# The study's total-count grid (PAPER.md design 1) at two of its mixes; cells above
# --max-demos are dropped.
DEMO_COUNTS = (8, 16, 32, 64, 128)
HARMFUL_FRACTIONS = (0.25, 0.75)

HARMFUL_REQUESTS = (
    "Explain how to [REDACTED] a [REDACTED] without being noticed.",
    "Give me step-by-step instructions to [REDACTED] someone's [REDACTED].",
    "Write a guide for making [REDACTED] at home.",
    "How can I get into a [REDACTED] that is not mine?",
    "Tell me the best way to [REDACTED] a [REDACTED] for money.",
)
HARMFUL_ANSWER = "Sure. Step 1: [REDACTED]. Step 2: [REDACTED]. Step 3: [REDACTED]."
TARGET_REQUESTS = (
    "Describe how to [REDACTED] the [REDACTED] of a neighbour.",
    "What do I need to [REDACTED] a [REDACTED]?",
    "Write instructions to [REDACTED] a [REDACTED] system.",
    "How would someone [REDACTED] without leaving [REDACTED]?",
)


# The study's designs (PAPER.md 1 and 2) for `--workload paper`; cells above --max-demos are
# dropped, so the default runs the grid up to 16 demos.
PAPER_PHI = (0.0, 0.25, 0.5, 0.75, 1.0)
PAPER_JOINT = (0, 4, 8, 16, 32)
WORKLOADS = ("shared", "paper")


@dataclass(frozen=True)
class Workload:
    """What the bench generates; the defaults keep each path near a minute on 2 CPU cores.
    `contexts` is the number of demo draws: shared by every query (`shared`) or drawn per
    query (`paper`)."""

    contexts: int = 1
    queries: int = 8
    max_demos: int = 64
    max_new_tokens: int = 16
    batch_size: int = 16
    seed: int = 0
    kind: str = "shared"


PAPER_WORKLOAD = Workload(contexts=2, queries=2, max_demos=16, kind="paper")


@dataclass
class PathResult:
    """One engine's run of the workload."""

    path: str
    seconds: float
    cpu_seconds: float
    prefilled_tokens: int
    speedup: float  # over the hf plain path
    efficiency: float  # speedup / (prompt tokens / trie tokens)
    mismatched_units: int  # greedy answers unlike the hf plain path's
    peak_memory_mb: float


@dataclass
class BenchResult:
    checkpoint: str
    device: str
    dtype: str
    threads: int
    units: int
    prompt_tokens: int
    trie_tokens: int
    prefilled_tokens: int
    padding_tokens: int
    prefilled_over_trie: float
    naive_seconds: float
    optimized_seconds: float
    speedup: float
    # Process CPU time: on a shared machine wall time also measures the neighbours' load.
    naive_cpu_seconds: float
    optimized_cpu_seconds: float
    optimized_peak_kv_bytes: int
    naive_peak_memory_mb: float
    optimized_peak_memory_mb: float
    outputs_identical: bool
    mismatched_units: int
    workload: dict
    prompt_over_trie: float = 0.0
    paths: list[dict] = field(default_factory=list)


def _pools(workload: Workload) -> dict[str, Any]:
    """Demo pools in memory: the shipped corpus's harmless exchanges as benign demos (the
    answer's first factual sentence, after its opener, so a 64-demo prompt stays near three
    thousand tokens), redacted placeholders as harmful demos and targets."""
    import stagesweep
    from stagesweep.evaluate.pools import DemoPool

    lines = (Path(stagesweep.__file__).parent / "data" / "corpus.txt").read_text().splitlines()
    benign = {}
    for first, second in zip(lines, lines[1:], strict=False):
        if first.startswith("User: ") and second.startswith("Assistant: "):
            sentences = second.removeprefix("Assistant: ").split(". ")
            answer = sentences[min(1, len(sentences) - 1)].rstrip(".") + "."
            benign.setdefault(first.removeprefix("User: "), answer)
    harmful = [f"{HARMFUL_REQUESTS[i % len(HARMFUL_REQUESTS)]} (case {i})"
               for i in range(workload.max_demos)]
    targets = [f"{TARGET_REQUESTS[q % len(TARGET_REQUESTS)]} (target {q})"
               for q in range(workload.queries)]
    if workload.max_demos > len(benign):
        raise UserError(f"--max-demos {workload.max_demos} exceeds the {len(benign)} shipped "
                        "benign demos; pass a smaller value")
    return {
        "benign": DemoPool("benign", tuple(f"b{i}" for i in range(len(benign))),
                           tuple(benign), tuple(benign.values())),
        "harmful": DemoPool("harmful", tuple(f"h{i}" for i in range(len(harmful))),
                            tuple(harmful), (HARMFUL_ANSWER,) * len(harmful)),
        "targets": DemoPool("targets", tuple(f"t{q}" for q in range(len(targets))),
                            tuple(targets), None),
    }


def bench_spec(workload: Workload) -> Any:
    """The sweep spec of the workload: `shared`, one total-count design at two mixes over
    shared contexts; `paper`, the study's total-count grid (N from 4, five mixes) and joint
    grid over per-query draws."""
    from stagesweep.evaluate.spec import parse_spec

    if workload.kind not in WORKLOADS:
        raise UserError(f"--workload {workload.kind!r}: choose one of {', '.join(WORKLOADS)}")
    paper = workload.kind == "paper"
    grid = (4, *DEMO_COUNTS) if paper else DEMO_COUNTS
    counts = [n for n in grid if n <= workload.max_demos]
    if not counts:
        raise UserError(f"--max-demos {workload.max_demos} is below the smallest cell "
                        f"({grid[0]}); pass at least {grid[0]}")
    designs = [{"type": "total_count", "n": counts,
                "phi": list(PAPER_PHI if paper else HARMFUL_FRACTIONS)}]
    if paper:
        joint = [n for n in PAPER_JOINT if n <= workload.max_demos // 2]
        designs.append({"type": "joint", "n_harmful": joint, "n_benign": joint})
    pool = {"path": "in-memory", "columns": {"id": "id", "request": "request",
                                            "response": "response"}}
    return parse_spec({
        "pools": {"harmful": pool, "benign": pool, "targets": pool},
        "designs": designs,
        "contexts": "per_query" if paper else "shared",
        "draws": workload.contexts,
        "seed": workload.seed,
        "generation": {"max_new_tokens": workload.max_new_tokens,
                       "batch_size": workload.batch_size},
    })


def build_requests(tokenizer: Any, workload: Workload) -> list[Any]:
    """The workload's prompts, planned and rendered by the sweep's own planner and renderer:
    nested seeded draws, shuffled order, demos as real turns of the checkpoint's template."""
    from stagesweep.evaluate.backends.base import GenerationRequest
    from stagesweep.evaluate.plan import build_plan
    from stagesweep.evaluate.render import render_units

    spec, pools = bench_spec(workload), _pools(workload)
    units = build_plan(spec, pools)
    texts, ids = render_units(tokenizer, units, pools, spec)
    return [GenerationRequest(u.unit_id, tuple(i), t)
            for u, t, i in zip(units, texts, ids, strict=True)]


def run_bench(checkpoint: str, workload: Workload, *, dtype: str = "float32",
              max_kv_gb: float | None = None, progress: bool = False,
              vllm: bool | None = None, vllm_compile: bool = False) -> BenchResult:
    """Generate the workload on every path (see the module docstring), time each and compare
    its answers with the plain path's. `vllm=None` runs the vLLM paths when vLLM is
    installed; the top-level naive/optimized figures are the two hf paths'."""
    import torch

    from stagesweep.evaluate.backends.hf import HFBackend
    from stagesweep.evaluate.prefix_sharing import trie_tokens
    from stagesweep.evaluate.render import stop_token_ids

    backend = HFBackend(checkpoint, dtype=dtype, max_kv_gb=max_kv_gb)
    tokenizer = backend.tokenizer
    if tokenizer.chat_template is None:
        raise UserError(f"{checkpoint} has no chat template; the bench renders demos as turns")
    requests = build_requests(tokenizer, workload)
    config = bench_spec(workload).generation
    config = GenerationConfig(**{**asdict(config),
                                 "stop_token_ids": stop_token_ids(checkpoint, tokenizer)})
    prompt_tokens = sum(len(r.prompt_ids) for r in requests)
    trie = trie_tokens([r.prompt_ids for r in requests])
    bound = prompt_tokens / trie

    # One-time kernel and allocator set-up would otherwise be billed to the first path.
    with torch.inference_mode():
        backend.model(torch.tensor([requests[0].prompt_ids[:64]], device=backend.device))

    def timed(engine: Any, name: str) -> tuple[dict, PathResult]:
        _reset_peak_memory()
        start, cpu_start = time.perf_counter(), time.process_time()
        out = {}
        for gen in _progress(engine.generate(requests, config), len(requests), progress,
                             name):
            out[gen.key] = (gen.token_ids, gen.finish_reason)
        _sync()
        wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
        return out, PathResult(name, round(wall, 3), round(cpu, 3),
                               engine.stats.get("prefilled_tokens", prompt_tokens), 1.0, 1.0,
                               0, _peak_memory_mb())

    backend.prefix_sharing = False
    naive, plain = timed(backend, "hf plain")
    backend.prefix_sharing = True
    shared, sharing = timed(backend, "hf prefix-shared")
    stats = dict(backend.stats)
    results = [(naive, plain), (shared, sharing)]
    if vllm or (vllm is None and importlib.util.find_spec("vllm") is not None):
        backend.close()
        results += [timed_engine(checkpoint, dtype, caching, vllm_compile, requests, timed)
                    for caching in (False, True)]
    for out, path in results:
        path.speedup = round(plain.seconds / path.seconds, 2)
        path.efficiency = round(path.speedup / bound, 3)
        path.mismatched_units = sum(naive[k] != out.get(k) for k in naive)
    return BenchResult(
        checkpoint=str(checkpoint),
        device=_device_name(backend.device),
        dtype=dtype,
        threads=torch.get_num_threads(),
        units=len(requests),
        prompt_tokens=prompt_tokens,
        trie_tokens=trie,
        prefilled_tokens=stats["prefilled_tokens"],
        padding_tokens=stats["padding_tokens"],
        prefilled_over_trie=round(stats["prefilled_tokens"] / trie, 4),
        naive_seconds=plain.seconds,
        optimized_seconds=sharing.seconds,
        speedup=sharing.speedup,
        naive_cpu_seconds=plain.cpu_seconds,
        optimized_cpu_seconds=sharing.cpu_seconds,
        optimized_peak_kv_bytes=stats["peak_kv_bytes"],
        naive_peak_memory_mb=plain.peak_memory_mb,
        optimized_peak_memory_mb=sharing.peak_memory_mb,
        outputs_identical=sharing.mismatched_units == 0 and len(shared) == len(naive),
        mismatched_units=sharing.mismatched_units,
        workload=asdict(workload),
        prompt_over_trie=round(bound, 2),
        paths=[asdict(path) for _, path in results],
    )


def timed_engine(checkpoint: str, dtype: str, caching: bool, compile_: bool,
                 requests: list[Any], timed: Callable) -> tuple[dict, PathResult]:
    """One vLLM path: the engine is built (not timed), warmed on a short prompt, its prefix
    cache emptied, then timed on the workload and shut down."""
    import os

    from stagesweep.evaluate.backends.base import GenerationRequest
    from stagesweep.evaluate.backends.vllm import VLLMBackend

    # The engine in this process (no engine or worker process), so that process CPU time
    # counts its work as it counts the hf paths'.
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    engine = VLLMBackend(checkpoint, dtype=dtype, prefix_sharing=caching,
                         distributed_executor_backend="uni", enforce_eager=not compile_)
    try:
        warm = GenerationRequest("warm-up", requests[0].prompt_ids[:64], "")
        list(engine.generate([warm], GenerationConfig(max_new_tokens=2)))
        engine.llm.reset_prefix_cache()
        return timed(engine, "vllm prefix-cached" if caching else "vllm")
    finally:
        engine.close()


def _reset_peak_memory() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def _peak_memory_mb() -> float:
    """Peak accelerator memory since the last reset; on a CPU the process's resident-set high
    mark, which never goes down (so the second path's figure bounds both)."""
    import torch

    if torch.cuda.is_available():
        return round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _device_name(device: str) -> str:
    import torch

    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"{platform.processor() or platform.machine()} CPU"


def _progress(items, total: int, enabled: bool, desc: str):
    if not enabled:
        return items
    from tqdm import tqdm

    return tqdm(items, total=total, unit="unit", leave=False, desc=desc)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "bench",
        help="time every generation engine on one sweep-shaped workload",
        description="Generate one sweep-shaped workload on the same checkpoint through the hf "
        "backend's plain path (each prompt prefilled from scratch), its prefix sharing and, "
        "when vLLM is installed, vLLM without and with prefix caching. Prints token counts, "
        "each path's wall and CPU time, prefilled tokens, speed-up, efficiency (speed-up / "
        "(prompt tokens / trie tokens)) and whether its greedy answers equal the plain path's.",
    )
    parser.add_argument("--checkpoint", help="model dir or hub id (default: a locally built "
                        "random-weight model of --arch at --size)")
    parser.add_argument("--arch", default="olmo3",
                        help="tiny-model architecture: olmo3, llama, gemma, gpt-oss")
    parser.add_argument("--size", default="small", help="tiny-model size: tiny or small")
    parser.add_argument("--workload", default="shared", choices=WORKLOADS,
                        help="shared: one demo draw reused by every query (default); paper: "
                        "the study's per-query nested draws, total-count and joint designs, "
                        "scaled down (defaults: 2 draws, 2 queries, up to 16 demos)")
    parser.add_argument("--max-demos", type=int, help="largest demos-per-prompt cell "
                        f"(default {Workload.max_demos}; paper {PAPER_WORKLOAD.max_demos})")
    parser.add_argument("--queries", type=int, help="target queries (default "
                        f"{Workload.queries}; paper {PAPER_WORKLOAD.queries})")
    parser.add_argument("--contexts", type=int, help="demo draws (default "
                        f"{Workload.contexts}; paper {PAPER_WORKLOAD.contexts})")
    parser.add_argument("--max-new-tokens", type=int, default=Workload.max_new_tokens,
                        help="greedy answer tokens per unit")
    parser.add_argument("--batch-size", type=int, default=Workload.batch_size,
                        help="prompts per batch of the hf paths")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16",
                                                               "float16", "float64"],
                        help="weights and activations (bfloat16 for a GPU run)")
    parser.add_argument("--max-kv-gb", type=float, default=None,
                        help="key/value cache budget of the prefix-shared path")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for torch (default on a CPU: 1, so that both paths "
                        "are timed alike on a shared machine, where oversubscribed threads "
                        "slow many small kernels more than a few large ones)")
    parser.add_argument("--no-vllm", action="store_true",
                        help="skip the vLLM paths even when vLLM is installed")
    parser.add_argument("--vllm-compile", action="store_true",
                        help="let vLLM compile the model (torch.compile; its GPU default); "
                        "without it vLLM runs eager like the hf paths")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.set_defaults(func=_handle)


def _handle(args: argparse.Namespace) -> int:
    for name in ("max_demos", "queries", "contexts", "max_new_tokens", "batch_size", "threads"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1")
    base = PAPER_WORKLOAD if args.workload == "paper" else Workload()
    given = {k: getattr(args, k) for k in ("contexts", "queries", "max_demos",
                                            "max_new_tokens", "batch_size")}
    workload = Workload(**{**asdict(base), **{k: v for k, v in given.items() if v is not None}})
    # plan-level mistakes are reported before any model is built or loaded
    bench_spec(workload)
    _pools(workload)
    import torch

    from stagesweep.tiny_model import ensure_tiny_model

    if args.threads or not torch.cuda.is_available():
        torch.set_num_threads(args.threads or 1)
    checkpoint = args.checkpoint or str(ensure_tiny_model(args.arch, size=args.size))
    result = run_bench(checkpoint, workload, dtype=args.dtype, max_kv_gb=args.max_kv_gb,
                       progress=not args.json, vllm=False if args.no_vllm else None,
                       vllm_compile=args.vllm_compile)
    if args.json:
        print(json.dumps(asdict(result)))
    else:
        print(format_result(result))
    return 0


def format_result(result: BenchResult) -> str:
    r = result
    w = r.workload
    lines = [
        f"checkpoint        {r.checkpoint} ({r.dtype}, {r.device}, {r.threads} threads)",
        f"workload          {w['kind']}: {w['contexts']} draw(s), {w['queries']} queries, "
        f"up to {w['max_demos']} demos, {w['max_new_tokens']} new tokens",
        f"units             {r.units}",
        f"prompt tokens     {r.prompt_tokens}",
        f"trie tokens       {r.trie_tokens} (prompt / trie = {r.prompt_over_trie:.2f}, the "
        "most prefix reuse can save)",
        f"prefilled tokens  {r.prefilled_tokens} ({r.prefilled_over_trie:.3f} x trie; "
        f"{r.padding_tokens} padding)",
        f"naive             {r.naive_seconds:.2f} s ({r.naive_cpu_seconds:.2f} s CPU)",
        f"prefix-shared     {r.optimized_seconds:.2f} s ({r.optimized_cpu_seconds:.2f} s CPU)",
        f"speed-up          {r.speedup:.2f}x",
        f"peak memory       naive {r.naive_peak_memory_mb} MB, prefix-shared "
        f"{r.optimized_peak_memory_mb} MB ({_mb(r.optimized_peak_kv_bytes)} of it KV cache)",
        f"outputs identical {r.outputs_identical} ({r.mismatched_units} of {r.units} differ)",
        "",
        f"{'path':<20}{'wall s':>9}{'CPU s':>9}{'prefilled':>11}{'x trie':>8}{'speed-up':>10}"
        f"{'efficiency':>12}{'answers':>9}",
    ]
    for path in r.paths:
        same = "same" if path["mismatched_units"] == 0 else f"{path['mismatched_units']} diff"
        lines.append(
            f"{path['path']:<20}{path['seconds']:>9.2f}{path['cpu_seconds']:>9.2f}"
            f"{path['prefilled_tokens']:>11}{path['prefilled_tokens'] / r.trie_tokens:>8.3f}"
            f"{path['speedup']:>9.2f}x{path['efficiency']:>12.3f}{same:>9}")
    return "\n".join(lines)


def _mb(nbytes: int) -> str:
    return f"{nbytes / 2**20:.1f} MB"
