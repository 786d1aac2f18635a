"""`stagesweep sweep`: run the demonstration sweep on one or more checkpoints."""

from __future__ import annotations

import argparse

from stagesweep.cli import UserError


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "sweep",
        help="run the in-context demonstration sweep on checkpoints",
        description="Render, generate, judge and store every unit of a sweep spec for each "
        "checkpoint; re-running the same command resumes. Writes OUT/results.parquet.",
    )
    p.add_argument("spec", help="sweep spec YAML (e.g. recipes/sweeps/tiny.yaml)")
    p.add_argument("--checkpoint", action="append", default=[], metavar="PATH_OR_ID",
                   help="checkpoint dir or hub id (repeatable)")
    p.add_argument("--lineage", metavar="DIR",
                   help="sweep every stage and intermediate checkpoint with a manifest under DIR")
    p.add_argument("--out", required=True, metavar="DIR", help="output dir (store + results)")
    p.add_argument("--backend", choices=["hf", "openai", "vllm"],
                   help="override the spec's backend (vllm: pip install 'stagesweep[vllm]')")
    p.add_argument("--tensor-parallel-size", type=int, metavar="N", help="--backend vllm: "
                   "GPUs per model (with --num-processes M, M engines on N GPUs each)")
    p.add_argument("--base-url", metavar="URL", help="OpenAI-compatible server for --backend "
                   "openai (API key from $OPENAI_API_KEY)")
    p.add_argument("--dry-run", action="store_true", help="print the plan (units per design, "
                   "prompt lengths, overflow count) loading only tokenizers")
    p.add_argument("--show-prompts", type=int, default=0, metavar="K",
                   help="print K rendered prompts and stop (no generation)")
    p.add_argument("--retry-failed", action="store_true",
                   help="re-generate failed units and re-judge unparsed verdicts")
    p.add_argument("--no-prefix-sharing", action="store_true",
                   help="prefill every prompt from scratch (the reference path)")
    p.add_argument("--max-kv-gb", type=float, help="memory budget for shared prefix caches")
    p.add_argument("--num-processes", type=int, default=1, metavar="N",
                   help="split the units into N worker processes (whole demo contexts each)")
    p.add_argument("--shard", metavar="I/N", help="run only shard I of N into its own store "
                   "(what each worker of --num-processes or of a multi-node launch runs)")
    p.add_argument("--allow-pickle", action="store_true",
                   help="allow pickled .bin weights (they can run code when loaded)")
    p.add_argument("--chat-template", metavar="NAME",
                   help="chat template for checkpoints without one (family name or .jinja file)")
    p.add_argument("--override-chat-template", action="store_true",
                   help="let --chat-template (or the spec's chat_template) replace a template "
                   "the checkpoint ships (the summary then names the template used)")
    p.add_argument("--quiet", action="store_true", help="no progress bars or summary")
    p.set_defaults(func=handle)


def _parse_shard(value: str | None) -> tuple[int, int] | None:
    if value is None:
        return None
    try:
        index, count = (int(x) for x in value.split("/"))
    except ValueError:
        raise UserError(f"--shard {value!r}: expected I/N, e.g. 0/2") from None
    if not 0 <= index < count:
        raise UserError(f"--shard {value!r}: I must lie in 0..N-1")
    return index, count


def handle(args: argparse.Namespace) -> int:
    from pathlib import Path

    from stagesweep.evaluate.sweep import preview, run_sweep

    if args.num_processes < 1:
        raise UserError("--num-processes must be at least 1")
    spec = args.spec
    if args.tensor_parallel_size is not None:
        import dataclasses

        from stagesweep.evaluate.spec import load_spec

        if args.tensor_parallel_size < 1:
            raise UserError("--tensor-parallel-size must be at least 1")
        # into the spec's backend options, which the spec copy hands to every worker
        spec = load_spec(spec)
        spec = dataclasses.replace(spec, backend_options={
            **spec.backend_options, "tensor_parallel_size": args.tensor_parallel_size})
    if args.dry_run or args.show_prompts:
        preview(args.spec, args.checkpoint, lineage=args.lineage,
                chat_template=args.chat_template, dry_run=args.dry_run,
                show_prompts=args.show_prompts, out=Path(args.out),
                override_chat_template=args.override_chat_template)
        return 0
    run_sweep(
        spec, args.checkpoint, Path(args.out), backend=args.backend,
        base_url=args.base_url, lineage=args.lineage, retry_failed=args.retry_failed,
        prefix_sharing=not args.no_prefix_sharing, max_kv_gb=args.max_kv_gb,
        num_processes=args.num_processes, progress=not args.quiet,
        allow_pickle=args.allow_pickle, chat_template=args.chat_template,
        shard=_parse_shard(args.shard), override_chat_template=args.override_chat_template,
    )
    return 0
