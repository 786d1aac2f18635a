"""Run a sweep: plan once, then for each checkpoint render, generate, judge and store.

One model is in memory at a time (the backend is closed before the judge loads, and both before
the next checkpoint). Every step writes to the store as batches finish, so re-running the same
command resumes; `results.parquet` is exported from the store at the end.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stagesweep.cli import UserError
from stagesweep.evaluate.plan import (
    WorkUnit,
    build_plan,
    export_labels,
    plan_summary,
    shard_units,
)
from stagesweep.evaluate.pools import DemoPool, load_pools
from stagesweep.evaluate.spec import OPENINGS, SweepSpec, load_spec, spec_to_dict
from stagesweep.evaluate.store import (
    DIGEST_CACHE_NAME,
    GENERATED,
    DigestCache,
    ResultStore,
    check_checkpoint_dir,
    check_stores,
    checkpoint_fingerprint,
    export_results,
    request_sha,
)
from stagesweep.safeio import (
    atomic_path,
    dir_lock,
    is_secret_key,
    redact,
    remove_stale_temporaries,
    worker_lock,
    write_json,
    write_text,
)

# Units rendered and handed to the backend at a time: whole demo contexts, so prefix sharing
# sees every prompt that shares a prefix, while memory stays bounded on paper-sized sweeps.
CHUNK_UNITS = 4096
JUDGE_BATCH = 64
_HUB_PATTERNS = ["*.json", "*.jinja", "*.txt", "*.model", "*.tiktoken"]


@dataclass(frozen=True)
class CheckpointRef:
    """A checkpoint to sweep: where it is and what the results table calls it."""

    source: str
    name: str
    stage: str | None = None
    step: int | None = None


@dataclass
class CheckpointSetup:
    """What rendering and judging need to know about one checkpoint."""

    ref: CheckpointRef
    local: Path
    tokenizer: Any
    fingerprint: str
    family: str
    limit: int | None
    config: Any  # GenerationConfig with this checkpoint's stop ids
    settings: str
    # Where its chat template came from: "own", a --chat-template name, or "render_with:NAME".
    template_source: str = "own"


def resolve_checkpoints(checkpoints: list[str], lineage: Path | None) -> list[CheckpointRef]:
    """`--checkpoint` values (dirs or hub ids) and every manifest under `--lineage`, named by
    their lineage node when they carry a manifest."""
    from stagesweep.lineage import discover, node_from_dir

    refs = []
    for value in checkpoints:
        path = Path(value)
        node = node_from_dir(path) if path.is_dir() else None
        if node:
            refs.append(CheckpointRef(str(path.resolve()), node.name, node.stage, node.step))
        elif path.is_dir():
            refs.append(CheckpointRef(str(path.resolve()), path.resolve().name))
        elif path.exists() or value.startswith((".", "/")) or value.count("/") > 1:
            raise UserError(f"checkpoint {value!r} is neither a directory nor a hub id")
        elif path.parent != Path(".") and path.parent.is_dir():
            # `runs/sft` where runs/ exists is a mistyped local path, not the hub id runs/sft
            raise UserError(f"checkpoint {value!r}: no such directory in {path.parent}/ (a hub "
                            "id would be ORG/NAME); check the path")
        else:
            refs.append(CheckpointRef(value, value))
    if lineage is not None:
        if not Path(lineage).is_dir():
            raise UserError(f"--lineage {lineage}: not a directory")
        nodes = discover(lineage)
        if not nodes:
            raise UserError(f"--lineage {lineage}: no checkpoint with a stagesweep.json manifest")
        refs += [CheckpointRef(str(n.path), n.name, n.stage, n.step) for n in nodes]
    names = [r.name for r in refs]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise UserError(f"several checkpoints are named {dupes}; sweep them into separate --out "
                        "dirs, or give them distinct stage names")
    if not refs:
        raise UserError("no checkpoint given: pass --checkpoint PATH_OR_ID or --lineage DIR")
    return refs


def _local_dir(ref: CheckpointRef, weights: bool, allow_pickle: bool) -> tuple[Path, str | None]:
    """A local directory for the checkpoint (a hub id is fetched into the HF cache) and, for
    hub ids, the resolved commit (which pins the content)."""
    if Path(ref.source).is_dir():
        return Path(ref.source), None
    from huggingface_hub import snapshot_download

    patterns = _HUB_PATTERNS + (["*.safetensors"] if weights else [])
    if weights and allow_pickle:
        patterns.append("*.bin")
    try:
        local = Path(snapshot_download(ref.source, allow_patterns=patterns))
    except Exception as err:  # hub errors come in many classes; all mean "cannot get it"
        reason = (str(err).splitlines() or [type(err).__name__])[0]
        raise UserError(f"checkpoint {ref.source!r} is no local directory and cannot be fetched "
                        f"from the hub: {reason}") from None
    return local, local.name


def setup_checkpoint(ref: CheckpointRef, spec: SweepSpec, *, weights: bool, allow_pickle: bool,
                     chat_template: str | None, override_chat_template: bool = False,
                     render_with: tuple[str, Any] | None = None,
                     digests: DigestCache | None = None) -> CheckpointSetup:
    """Tokenizer, fingerprint and generation settings of one checkpoint; `digests=None` (a
    preview, which stores nothing) skips hashing the weights."""
    from stagesweep.evaluate.render import (
        context_limit,
        load_tokenizer,
        reasoning_family,
        stop_token_ids,
    )

    local, revision = _local_dir(ref, weights, allow_pickle)
    named = chat_template or spec.chat_template
    tok = load_tokenizer(str(local), chat_template=named,
                         trust_remote_code=spec.trust_remote_code, override=override_chat_template)
    source = named or "own"
    if render_with is not None:
        from stagesweep.evaluate.templates import adopt_template

        source = adopt_template(tok, ref.name, *render_with)
    template = tok.chat_template if isinstance(tok.chat_template, str) else json.dumps(
        tok.chat_template, sort_keys=True)
    fingerprint = "" if digests is None else checkpoint_fingerprint(
        local, template, hub_revision=revision, digests=digests)
    family = reasoning_family(str(local), tok)
    gen = spec.generation
    config = dataclasses.replace(
        gen, stop_token_ids=gen.stop_token_ids or stop_token_ids(str(local), tok))
    if not spec.generates:
        # Judge-free: a prompt needs room for its longest opening only (the overflow check
        # and the fit to context windows read max_new_tokens).
        room = max(len(tok(o, add_special_tokens=False)["input_ids"]) for o in openings(spec))
        config = dataclasses.replace(config, max_new_tokens=room + 1, num_samples=1)
    limit = context_limit(str(local), tok, spec)
    record: dict[str, Any] = {"family": family, "context_limit": limit}
    if spec.generates:
        record |= {"generation": dataclasses.asdict(config), "judge": spec.judge,
                   "judge_options": spec.judge_options}
    if spec.scores_logprob:
        # Part of every unit's request_sha: a changed outcome or opening is a changed spec.
        record |= {"outcome": [o.value for o in spec.outcomes],
                   "logprob": dataclasses.asdict(spec.logprob)}
    settings = json.dumps(record, sort_keys=True, default=str)
    return CheckpointSetup(ref, local, tok, fingerprint, family, limit, config, settings, source)


def openings(spec: SweepSpec) -> list[str]:
    """The scored openings in the order a ScoreRequest carries them: comply, then refuse."""
    return [*spec.logprob.comply, *spec.logprob.refuse]


def combine_openings(spec: SweepSpec, logprobs: tuple[float, ...]) -> tuple[float, float]:
    """(comply, refuse): each side's log of the summed probability of its openings."""
    import numpy as np

    n = len(spec.logprob.comply)
    return (float(np.logaddexp.reduce(logprobs[:n])), float(np.logaddexp.reduce(logprobs[n:])))


def _chunks(units: list[WorkUnit]) -> Iterator[list[WorkUnit]]:
    """Consecutive runs of units, cut only between demo contexts."""
    chunk: list[WorkUnit] = []
    for unit in units:
        if len(chunk) >= CHUNK_UNITS and unit.context != chunk[-1].context:
            yield chunk
            chunk = []
        chunk.append(unit)
    if chunk:
        yield chunk


def _base_row(unit: WorkUnit, cs: CheckpointSetup, n_tokens: int, sha: str) -> dict:
    return {
        "fingerprint": cs.fingerprint, "unit_id": unit.unit_id, "sample": 0,
        "checkpoint": cs.ref.name, "stage": cs.ref.stage, "step": cs.ref.step,
        "design": unit.design, "query_id": unit.query_id, "draw": unit.draw,
        "n_harmful": unit.n_harmful, "n_benign": unit.n_benign, "schedule": unit.schedule,
        "opening": unit.opening, "prompt_tokens": n_tokens, "request_sha": sha,
    }


def _read_existing(stores: list[Path], fingerprint: str) -> tuple[dict, set[str]]:
    """Stored rows of a checkpoint across every store in the out dir (a re-run with another
    --num-processes still finds the rows earlier workers wrote), and the units whose logprob
    outcome is stored."""
    existing: dict = {}
    scored: set[str] = set()
    for path in stores:
        store = ResultStore(path, readonly=True)
        try:
            existing.update(store.existing(fingerprint))
            scored |= store.scored(fingerprint)
        except sqlite3.OperationalError:  # a worker's store that has no table yet
            pass
        finally:
            store.close()
    return existing, scored


def _generate_checkpoint(cs: CheckpointSetup, spec: SweepSpec, units: list[WorkUnit],
                         pools: dict[str, DemoPool], store: ResultStore, stores: list[Path],
                         opts: dict) -> dict[str, int]:
    """Render every unit, record overflows, generate what is missing and score the openings
    of `outcome: logprob`; returns counts."""
    from tqdm.auto import tqdm

    from stagesweep.evaluate.backends.base import get_backend_class

    existing, scored = _read_existing(stores, cs.fingerprint)
    redo = {"failed"} if opts["retry_failed"] else set()
    samples = cs.config.num_samples

    def generated(unit_id: str) -> bool:
        rows = [existing.get((unit_id, s)) for s in range(samples)]
        return all(r and r[0] not in redo for r in rows)

    def unscored(unit_id: str) -> bool:
        row = existing.get((unit_id, 0))
        return spec.scores_logprob and unit_id not in scored and not (row and row[0] == "overflow")

    def finished(unit_id: str) -> bool:
        return generated(unit_id) and not unscored(unit_id)

    todo = sum(not finished(u.unit_id) for u in units)
    counts = {"generated": 0, "overflow": 0, "skipped": 0, "scored": 0}
    bar = tqdm(total=todo * samples, desc=f"{'generate' if spec.generates else 'score'} "
               f"{cs.ref.name}", unit="answer" if spec.generates else "unit",
               disable=not opts["progress"], dynamic_ncols=True)
    backend = None
    changed = 0
    continuation_cache: dict = {}
    try:
        for chunk in _chunks(units):
            work = _chunk_work(cs, spec, chunk, pools, existing, finished, generated, unscored,
                               continuation_cache)
            changed += work.changed
            counts["skipped"] += work.skipped
            if changed:
                break
            if work.overflow_rows:
                store.put(work.overflow_rows)
                counts["overflow"] += len(work.overflow_rows) // samples
                bar.update(len(work.overflow_rows))
            if not (work.requests or work.scoring):
                continue
            if backend is None:
                backend = _open_backend(cs, opts, get_backend_class)
            if work.requests:
                _score_while_generating(backend, cs.config, work)
                counts["scored"] += sum(bool(r.continuations) for r in work.requests)
                counts["generated"] += _generate_chunk(cs, spec, backend, work, store, bar)
            if work.scoring:
                counts["scored"] += _score_chunk(cs, spec, backend, work, store,
                                                 None if spec.generates else bar)
    finally:
        bar.close()
        if backend is not None:
            backend.close()
    if changed:
        raise UserError(
            f"{store.path.parent} already holds answers of {cs.ref.name} for prompts or settings "
            "that differ from this spec's (the spec, pools, generation settings or outcome "
            "changed); use a new --out dir"
        )
    return counts


@dataclass
class _ChunkWork:
    """One chunk's units sorted into what the backend must do: generate, score, or nothing."""

    requests: list  # GenerationRequests
    scoring: list  # ScoreRequests
    rows_by_key: dict[str, dict]
    overflow_rows: list[dict]
    changed: int = 0
    skipped: int = 0


def _chunk_work(cs: CheckpointSetup, spec: SweepSpec, chunk: list[WorkUnit],
                pools: dict[str, DemoPool], existing: dict, finished: Any, generated: Any,
                unscored: Any, continuation_cache: dict) -> _ChunkWork:
    from stagesweep.evaluate.backends.base import (
        GenerationRequest,
        ScoreRequest,
        continuation_ids,
    )
    from stagesweep.evaluate.render import render_units

    samples = cs.config.num_samples
    texts, ids = render_units(cs.tokenizer, chunk, pools, spec)
    work = _ChunkWork([], [], {}, [])
    for unit, text, prompt_ids in zip(chunk, texts, ids, strict=True):
        sha = request_sha(prompt_ids, cs.settings)
        stored = existing.get((unit.unit_id, 0))
        if stored and stored[1] != sha:
            work.changed += 1
            continue
        if finished(unit.unit_id):
            work.skipped += 1
            continue
        row = _base_row(unit, cs, len(prompt_ids), sha)
        if cs.limit and len(prompt_ids) + cs.config.max_new_tokens > cs.limit:
            # Never truncated: the unit is recorded as not run and counted.
            work.overflow_rows += [{**row, "sample": s, "status": "overflow", "response": ""}
                                   for s in range(samples)]
            continue
        work.rows_by_key[unit.unit_id] = row
        generate = spec.generates and not generated(unit.unit_id)
        if generate:
            work.requests.append(GenerationRequest(unit.unit_id, tuple(prompt_ids), text))
        if spec.scores_logprob and (generate or unscored(unit.unit_id)):
            # A regenerated row replaces the stored one, its scores included: score it again.
            texts_ = openings(spec)
            work.scoring.append(ScoreRequest(
                unit.unit_id, tuple(prompt_ids),
                tuple(continuation_ids(cs.tokenizer, text, o, continuation_cache)
                      for o in texts_), text, tuple(texts_)))
    return work


def _score_while_generating(backend: Any, config: Any, work: _ChunkWork) -> None:
    """Move the scoring of units about to be generated onto their generation requests when
    the backend scores on the prefill it decodes from (hf prefix sharing): the openings then
    cost a few tokens per prompt instead of a second walk of the prompts."""
    if not (work.scoring and backend.scores_while_generating(config)):
        return
    scoring = {s.key: s for s in work.scoring}
    work.requests = [dataclasses.replace(r, continuations=scoring.pop(r.key).continuations)
                     if r.key in scoring else r for r in work.requests]
    work.scoring = list(scoring.values())


def _generate_chunk(cs: CheckpointSetup, spec: SweepSpec, backend: Any, work: _ChunkWork,
                    store: ResultStore, bar: Any) -> int:
    """Generate the chunk's answers (with their openings' scores when the backend scored
    them), stored in batches as they come; returns the count."""
    from stagesweep.evaluate.reasoning import SPECIAL_TOKEN_FAMILIES, split_reasoning

    done, batch = 0, []
    for gen in backend.generate(work.requests, cs.config, progress=bar.update):
        text = gen.text
        if gen.token_ids and cs.family not in SPECIAL_TOKEN_FAMILIES:
            # Served backends return text with special tokens skipped; match them.
            text = cs.tokenizer.decode(gen.token_ids, skip_special_tokens=True)
        reasoning, final = split_reasoning(text, cs.family)
        failed = gen.finish_reason == "error"
        status = "failed" if failed else GENERATED if final is not None else "no_final_answer"
        batch.append({**work.rows_by_key[gen.key], "sample": gen.sample,
                      "response": text if final is None else final,
                      "reasoning": reasoning, "finish_reason": gen.finish_reason,
                      "status": status})
        if gen.logprobs is not None:
            batch[-1]["logprob_comply"], batch[-1]["logprob_refuse"] = combine_openings(
                spec, gen.logprobs)
        if len(batch) >= cs.config.batch_size:
            store.put(batch)
            done += len(batch)
            batch = []
    if batch:
        store.put(batch)
        done += len(batch)
    return done


def _score_chunk(cs: CheckpointSetup, spec: SweepSpec, backend: Any, work: _ChunkWork,
                 store: ResultStore, bar: Any) -> int:
    """Score the chunk's openings. A judge-free sweep stores finished rows (status ok, no
    answer); a judged one adds the scores to its answers' rows. Returns the units scored."""
    done, batch = 0, []

    def flush() -> None:
        if spec.generates:
            store.set_logprobs(cs.fingerprint, [(r["unit_id"], r["logprob_comply"],
                                                 r["logprob_refuse"]) for r in batch])
        else:
            store.put(batch)

    for result in backend.score(work.scoring, cs.config,
                                progress=bar.update if bar is not None else None):
        comply, refuse = combine_openings(spec, result.logprobs)
        batch.append({**work.rows_by_key[result.key], "status": "ok", "response": "",
                      "logprob_comply": comply, "logprob_refuse": refuse})
        if len(batch) >= cs.config.batch_size:
            flush()
            done += len(batch)
            batch = []
    if batch:
        flush()
        done += len(batch)
    return done


def _open_backend(cs: CheckpointSetup, opts: dict, get_backend_class: Any) -> Any:
    cls = get_backend_class(opts["backend"])
    options = dict(opts["backend_options"])
    if opts["backend"] == "openai":
        if not opts["base_url"]:
            raise UserError("the openai backend needs --base-url URL (or backend_options."
                            "base_url in the spec)")
        return cls(opts["base_url"], tokenizer=cs.tokenizer, **options)
    if "LOCAL_RANK" in os.environ and "device" not in options:
        import torch

        # One GPU per worker (torchrun, accelerate, or --num-processes on a multi-GPU host).
        if torch.cuda.is_available():
            options["device"] = f"cuda:{int(os.environ['LOCAL_RANK']) % torch.cuda.device_count()}"
    return cls(str(cs.local), trust_remote_code=opts["trust_remote_code"],
               allow_pickle=opts["allow_pickle"], prefix_sharing=opts["prefix_sharing"],
               max_kv_gb=opts["max_kv_gb"], **options)


class _SharedJudge:
    """The sweep's judge, loaded on first use and kept for every checkpoint's answers: judging
    runs after all generation, so a judge model is loaded once per sweep and never shares memory
    with a checkpoint under test."""

    def __init__(self, spec: SweepSpec) -> None:
        self.spec, self.judge = spec, None

    def get(self) -> Any:
        from stagesweep.evaluate.judges.base import get_judge_class

        if self.judge is None:
            self.judge = get_judge_class(self.spec.judge)(**self.spec.judge_options)
        return self.judge

    def close(self) -> None:
        if self.judge is not None:
            self.judge.close()


def _judge_checkpoint(cs: CheckpointSetup, spec: SweepSpec, pools: dict[str, DemoPool],
                      store: ResultStore, opts: dict, shared: _SharedJudge) -> int:
    """Label every generated answer of the checkpoint awaiting its judge."""
    from tqdm.auto import tqdm

    from stagesweep.evaluate.backends.base import batched
    from stagesweep.evaluate.judges.base import COMPLIED, REFUSED, JudgeItem

    if opts["retry_failed"]:
        store.conn.execute("UPDATE results SET status = ? WHERE fingerprint = ? AND status = ?",
                           (GENERATED, cs.fingerprint, "unparsed"))
    rows = store.awaiting_judge(cs.fingerprint)
    if not rows:
        return 0
    targets = pools[spec.targets_key]
    index = targets.index()
    judge = shared.get()
    bar = tqdm(total=len(rows), desc=f"judge {cs.ref.name}", unit="answer",
               disable=not opts["progress"], dynamic_ncols=True)
    try:
        for batch in batched(rows, JUDGE_BATCH):
            items = [JudgeItem(f"{r['unit_id']}#{r['sample']}",
                               targets.requests[index[r["query_id"]]], r["response"] or "",
                               OPENINGS.get(r["opening"])) for r in batch]
            verdicts = {v.key: v for v in judge.judge(items)}
            updates = []
            for r, item in zip(batch, items, strict=True):
                v = verdicts[item.key]
                updates.append({
                    "unit_id": r["unit_id"], "sample": r["sample"], "complied": v.complied,
                    "format_adopted": v.format_adopted, "judge": spec.judge,
                    "judge_raw": v.raw,
                    "status": "ok" if v.label in (COMPLIED, REFUSED) else v.label,
                })
            store.set_verdicts(cs.fingerprint, updates)
            bar.update(len(batch))
    finally:
        bar.close()
    return len(rows)


def _store_paths(out: Path) -> list[Path]:
    return sorted(out.glob("sweep*.sqlite"))


def run_sweep(spec: str | Path | SweepSpec, checkpoints: list[str], out: Path,
              **options: Any) -> Path:
    """Sweep every checkpoint and return `out/results.parquet` (options: see `_sweep`).

    Every input is checked before anything loads, and the sweep holds `out`'s lock while it
    runs, so a second sweep into the same dir stops with one line instead of mixing tables.
    """
    spec = spec if isinstance(spec, SweepSpec) else load_spec(spec)
    out = Path(out)
    shard = options.get("shard")
    if shard is None and "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1:
        shard = options["shard"] = (int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]))
    backend = options.get("backend") or spec.backend
    check_run(spec, backend, **{k: options[k] for k in ("base_url", "max_kv_gb",
                                                        "num_processes") if k in options},
              shard=shard)
    lineage = options.get("lineage")
    refs = resolve_checkpoints(list(checkpoints), Path(lineage) if lineage else None)
    for ref in refs:
        if Path(ref.source).is_dir():
            check_checkpoint_dir(Path(ref.source), weights=backend != "openai")
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; pass a directory (new or a sweep's out dir)")
    out.mkdir(parents=True, exist_ok=True)
    check_stores(_store_paths(out))
    with dir_lock(out, shared=shard is not None):
        if shard is None:
            remove_stale_temporaries(out)
        return _sweep(spec, checkpoints, out, **options)


def check_run(spec: SweepSpec, backend: str, *, base_url: str | None = None,
              max_kv_gb: float | None = None, num_processes: int = 1,
              shard: tuple[int, int] | None = None) -> None:
    """Refuse, before anything loads, what would otherwise fail (or mislead) only after
    answers were generated: an unknown judge or backend, backend options it does not take, a
    key written into the spec, nonsensical run options."""
    from stagesweep.evaluate.backends.base import BACKENDS, get_backend_class
    from stagesweep.evaluate.judges.base import JUDGES, get_judge_class

    file = spec.source or "<spec>"
    for what, name, registry in (("judge", spec.judge, JUDGES), ("backend", backend, BACKENDS)):
        if name not in registry:
            raise UserError(f"{file}: {what} {name!r} is unknown; choose one of "
                            f"{', '.join(sorted(registry))}")
    for where, options in (("backend_options", spec.backend_options),
                           ("judge_options", spec.judge_options)):
        for key, value in options.items():
            if is_secret_key(str(key)) and value:
                raise UserError(f"{file}: {where}.{key} holds a secret, which would be copied "
                                "into the out dir; remove it and export it instead (the openai "
                                "backend reads $OPENAI_API_KEY, or the variable named by "
                                f"{where}.api_key_env)")
    for where, options, what, cls, set_by_sweep in (
            ("backend_options", spec.backend_options, f"the {backend} backend",
             get_backend_class(backend), {"model_path", "tokenizer", "trust_remote_code",
                                          "allow_pickle", "prefix_sharing", "max_kv_gb"}),
            ("judge_options", spec.judge_options, f"judge {spec.judge}",
             get_judge_class(spec.judge), set())):
        taken = _keywords(cls)
        if taken is None:
            continue
        taken -= set_by_sweep
        for key in options:
            if key not in taken | {"base_url"}:
                raise UserError(f"{file}: {where}.{key} is not an option of {what}; it takes "
                                f"{', '.join(sorted(taken)) or 'none'}")
    if backend == "openai" and not (base_url or spec.backend_options.get("base_url")):
        raise UserError("the openai backend needs --base-url URL (or backend_options.base_url "
                        "in the spec)")
    if max_kv_gb is not None and not max_kv_gb > 0:
        raise UserError(f"--max-kv-gb {max_kv_gb}: give a positive number of GB")
    if num_processes < 1:
        raise UserError("--num-processes must be at least 1")
    if shard is not None and num_processes > 1:
        raise UserError("--shard runs one worker's share and --num-processes starts the workers "
                        "itself; pass only one of them")


def _keywords(cls: type) -> set[str] | None:
    """The keyword options a class's constructor takes, following `**options` up its bases;
    None when it takes any."""
    import inspect

    names: set[str] = set()
    for klass in cls.__mro__:
        if "__init__" not in klass.__dict__:
            continue
        params = inspect.signature(klass.__dict__["__init__"]).parameters.values()
        names |= {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
        if not any(p.kind is p.VAR_KEYWORD for p in params):
            return names - {"self"}
    return None


def _sweep(spec: SweepSpec, checkpoints: list[str], out: Path, *,
           backend: str | None = None, base_url: str | None = None,
           lineage: Path | None = None, retry_failed: bool = False,
           prefix_sharing: bool = True, max_kv_gb: float | None = None,
           num_processes: int = 1, progress: bool = True, allow_pickle: bool = False,
           chat_template: str | None = None, shard: tuple[int, int] | None = None,
           override_chat_template: bool = False) -> Path:
    """The sweep itself, run under `out`'s lock.

    `shard=(i, n)` runs only shard i of n (a worker of `num_processes` or of a torchrun/multi-
    node launch, which sets RANK/WORLD_SIZE) into its own store and exports nothing; the
    process that started the workers (or a plain re-run) exports the merged table.
    """
    started = time.monotonic()
    spec = spec if isinstance(spec, SweepSpec) else load_spec(spec)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    refs = resolve_checkpoints(list(checkpoints), Path(lineage) if lineage else None)
    from stagesweep.evaluate.templates import fit_to_windows, recorded_render_date

    spec.render_date = recorded_render_date(out, spec, record=shard is None)
    pools = load_pools(spec)
    units = build_plan(spec, pools)
    templates = {"chat_template": chat_template, "override_chat_template": override_chat_template}
    reference = _render_with_reference(spec, refs, templates)
    units, pools = fit_to_windows(spec, units, pools, [
        setup_checkpoint(ref, spec, weights=False, allow_pickle=allow_pickle,
                         render_with=reference, **templates) for ref in refs],
        report=progress and shard is None)
    backend_name = backend or spec.backend
    opts = {
        "backend": backend_name, "base_url": base_url or spec.backend_options.get("base_url"),
        "backend_options": {k: v for k, v in spec.backend_options.items() if k != "base_url"},
        "trust_remote_code": spec.trust_remote_code, "allow_pickle": allow_pickle,
        "prefix_sharing": prefix_sharing, "max_kv_gb": max_kv_gb,
        "retry_failed": retry_failed, "progress": progress,
        "override_chat_template": override_chat_template,
    }
    if not progress:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    digests = DigestCache(out / DIGEST_CACHE_NAME)
    if num_processes > 1 and shard is None:
        _run_workers(spec, out, refs, num_processes, backend_name, opts, chat_template)
        store_path = None
    else:
        mine = shard_units(units, *shard) if shard else units
        store_path = out / (f"sweep.shard{shard[0]}of{shard[1]}.sqlite" if shard
                            else "sweep.sqlite")
    in_process = backend_name != "openai"  # it loads the weights itself
    setups = [setup_checkpoint(ref, spec, weights=in_process and store_path is not None,
                               allow_pickle=allow_pickle, digests=digests,
                               render_with=reference, **templates)
              for ref in refs]
    if progress and digests.bytes_hashed:
        print(f"fingerprints: hashed weights, {digests.throughput()}")
    counts = {"generated": 0, "overflow": 0, "skipped": 0, "scored": 0, "judged": 0}
    if store_path is not None:
        store, judge = ResultStore(store_path), _SharedJudge(spec)
        try:
            for cs in setups:
                store.register_checkpoint(cs.fingerprint, cs.ref.name, _provenance(cs))
                for k, v in _generate_checkpoint(cs, spec, mine, pools, store,
                                                 _store_paths(out), opts).items():
                    counts[k] += v
            for cs in setups if spec.generates else []:
                counts["judged"] += _judge_checkpoint(cs, spec, pools, store, opts, judge)
        finally:
            judge.close()
            store.close()
    results = out / "results.parquet"
    if shard is not None:
        return results
    df = export_results(_store_paths(out),
                        [(cs.fingerprint, cs.ref.name, cs.ref.stage, cs.ref.step) for cs in setups],
                        {u.unit_id for u in units}, results, export_labels(units),
                        logprob=spec.scores_logprob)
    _write_spec_copy(spec, out / "spec.yaml")
    _write_provenance(out, spec, setups, units, backend_name)
    if progress:
        status = df["status"].value_counts().to_dict()
        ok = df[df["status"] == "ok"]
        outcome = [f"compliance {ok['complied'].mean():.1%}"] if spec.generates else []
        if spec.scores_logprob:
            outcome.append(f"mean logprob_diff {ok['logprob_diff'].astype(float).mean():+.3f}")
        scored = f"scored {counts['scored']}, " if spec.scores_logprob else ""
        print(f"sweep: {len(refs)} checkpoint(s), {len(units)} units each, {len(df)} rows "
              f"({', '.join(f'{k} {v}' for k, v in sorted(status.items()))}); generated "
              f"{counts['generated']}, {scored}resumed {counts['skipped']}; "
              f"{', '.join(outcome)} in {time.monotonic() - started:.0f}s -> {results}")
    rows = sum(len(u.labels) for u in units)
    samples = spec.generation.num_samples if spec.generates else 1
    missing = rows * len(setups) * samples - len(df)
    if missing > 0:
        raise UserError(f"{missing} units have no stored answer (a worker failed?); re-run the "
                        "same command to finish them")
    return results


def _render_with_reference(spec: SweepSpec, refs: list[CheckpointRef],
                           templates: dict) -> tuple[str, Any] | None:
    """(name, tokenizer) of the spec's `render_with` checkpoint, or None."""
    from stagesweep.evaluate.templates import render_with_reference

    return render_with_reference(spec, refs, lambda ref: setup_checkpoint(
        ref, spec, weights=False, allow_pickle=False, **templates).tokenizer)


def _run_workers(spec: SweepSpec, out: Path, refs: list[CheckpointRef], n: int, backend: str,
                 opts: dict, chat_template: str | None) -> None:
    """Start n local worker processes, one shard each, and wait for all of them. They read
    the spec from a private copy (out/spec.yaml changes only once a run is accepted) and run
    under this process's lock of `out`."""
    worker_spec = out / f".spec.workers.{os.getpid()}.tmp"
    _write_spec_copy(spec, worker_spec, redacted=False)
    cmd = [sys.executable, "-m", "stagesweep", "sweep", str(worker_spec), "--out", str(out),
           "--backend", backend]
    for ref in refs:
        cmd += ["--checkpoint", ref.source]
    for flag, on in (("--retry-failed", opts["retry_failed"]),
                     ("--no-prefix-sharing", not opts["prefix_sharing"]),
                     ("--allow-pickle", opts["allow_pickle"]),
                     ("--override-chat-template", opts["override_chat_template"])):
        if on:
            cmd.append(flag)
    for flag, value in (("--base-url", opts["base_url"]), ("--max-kv-gb", opts["max_kv_gb"]),
                        ("--chat-template", chat_template)):
        if value is not None:
            cmd += [flag, str(value)]
    threads = str(max(1, (os.cpu_count() or 1) // n))
    env = {**os.environ, "OMP_NUM_THREADS": threads, "TOKENIZERS_PARALLELISM": "false"}
    env.pop("WORLD_SIZE", None)
    lock_vars, lock_fds = worker_lock(out)
    try:
        procs = [subprocess.Popen([*cmd, "--shard", f"{i}/{n}", "--quiet"], pass_fds=lock_fds,
                                  env={**env, **lock_vars, "LOCAL_RANK": str(i)})
                 for i in range(n)]
        codes = [p.wait() for p in procs]
    finally:
        worker_spec.unlink(missing_ok=True)
    if any(codes):
        raise UserError(f"sweep workers exited with codes {codes}; re-run the same command to "
                        "resume the unfinished shards")


def _write_spec_copy(spec: SweepSpec, path: Path, *, redacted: bool = True) -> None:
    """The resolved spec (pool paths made absolute) that workers and provenance read; secrets
    (credentials in URLs, secret-named keys) are redacted except in the workers' private
    copy."""
    import yaml

    data = spec_to_dict(spec)
    base = spec.source.parent if spec.source else Path.cwd()
    for pool in data["pools"].values():
        if pool.get("path") and not Path(pool["path"]).is_absolute():
            pool["path"] = str((base / pool["path"]).resolve())
        pool.pop("name", None)
    data.pop("source")
    write_text(path, yaml.safe_dump(redact(data) if redacted else data, sort_keys=False))


def _provenance(cs: CheckpointSetup) -> dict:
    from stagesweep.evaluate.render import template_sha

    return {"name": cs.ref.name, "source": cs.ref.source, "stage": cs.ref.stage,
            "step": cs.ref.step, "fingerprint": cs.fingerprint,
            "chat_template_sha": template_sha(cs.tokenizer), "chat_template": cs.template_source,
            "reasoning_family": cs.family, "context_limit": cs.limit,
            "generation": json.loads(cs.settings)}


def _write_provenance(out: Path, spec: SweepSpec, setups: list[CheckpointSetup],
                      units: list[WorkUnit], backend: str) -> None:
    import importlib.metadata as md

    import pandas as pd

    from stagesweep.evaluate.templates import describe_differences, template_record

    versions = {}
    for lib in ("stagesweep", "torch", "transformers", "datasets", "tokenizers", "trl"):
        try:
            versions[lib] = md.version(lib)
        except md.PackageNotFoundError:
            versions[lib] = None
    record = {
        "spec_source": str(spec.source) if spec.source else None,
        "backend": backend, "units_per_design": plan_summary(units), "versions": versions,
        "checkpoints": [_provenance(cs) for cs in setups],
        "templates": template_record(spec, setups),
    }
    write_json(out / "provenance.json", record)
    for line in describe_differences(record["templates"]):
        print(f"warning: {line}")
    plan = pd.DataFrame([{**{k: v for k, v in dataclasses.asdict(u).items() if k != "demos"},
                          "demos": [f"{p}:{i}" for p, i in u.demos]} for u in units])
    with atomic_path(out / "plan.parquet") as tmp:
        plan.to_parquet(tmp, index=False)


def _showcase(units: list[WorkUnit], k: int) -> list[WorkUnit]:
    """K units worth looking at: one per (design, schedule, opening), the largest mixed cell of
    the first demo context, so every order and opening the spec defines shows up first."""
    first = [u for u in units if u.context == units[0].context and u.query_id == units[0].query_id]
    best: dict[tuple, WorkUnit] = {}
    for u in first:
        key = (u.design, u.schedule, u.opening)
        score = (min(u.n_harmful, u.n_benign) > 0, u.n_harmful + u.n_benign)
        if key not in best or score > (min(best[key].n_harmful, best[key].n_benign) > 0,
                                       best[key].n_harmful + best[key].n_benign):
            best[key] = u
    picked = list(best.values())
    picked += [u for u in units if u not in set(picked)]
    return picked[:k]


def preview(spec: str | Path | SweepSpec, checkpoints: list[str], *,
            lineage: Path | None = None, chat_template: str | None = None,
            dry_run: bool = True, show_prompts: int = 0, out: Path | None = None,
            override_chat_template: bool = False) -> dict[str, dict]:
    """Print the plan (units per design; per checkpoint prompt-length statistics and the
    overflow count) and/or K rendered prompts, loading only tokenizers and configs.
    Returns the per-checkpoint statistics."""
    import numpy as np

    from stagesweep.evaluate.render import render_units
    from stagesweep.evaluate.templates import print_fit, print_templates, recorded_render_date

    spec = spec if isinstance(spec, SweepSpec) else load_spec(spec)
    refs = resolve_checkpoints(list(checkpoints), Path(lineage) if lineage else None)
    spec.render_date = recorded_render_date(out, spec, record=False)
    pools = load_pools(spec)
    units = build_plan(spec, pools)
    templates = {"chat_template": chat_template, "override_chat_template": override_chat_template}
    reference = _render_with_reference(spec, refs, templates)
    setups = [setup_checkpoint(ref, spec, weights=False, allow_pickle=False,
                               render_with=reference, **templates) for ref in refs]
    if dry_run:
        print_templates(spec, setups)
        units, pools = print_fit(spec, units, pools, setups)
    summary = plan_summary(units)
    if dry_run:
        print(f"plan: {len(units)} units per checkpoint "
              f"({', '.join(f'{d} {n}' for d, n in summary.items())}); "
              f"{len({u.query_id for u in units})} target queries x {spec.draws} draws, "
              f"contexts {spec.contexts.value}; {len(refs)} checkpoint(s)")
    stats: dict[str, dict] = {}
    for ref, cs in zip(refs, setups, strict=True):
        if dry_run:
            lengths = np.array([len(ids) for chunk in _chunks(units)
                                for ids in render_units(cs.tokenizer, chunk, pools, spec)[1]])
            limit = cs.limit
            overflow = int(((lengths + cs.config.max_new_tokens) > limit).sum()) if limit else 0
            stats[ref.name] = {"units": len(units), "overflow": overflow,
                               "prompt_tokens_min": int(lengths.min()),
                               "prompt_tokens_median": float(np.median(lengths)),
                               "prompt_tokens_max": int(lengths.max()),
                               "prompt_tokens_total": int(lengths.sum())}
            print(f"{ref.name}: prompt tokens min {lengths.min()} / median "
                  f"{np.median(lengths):.0f} / max {lengths.max()} (total {lengths.sum()}); "
                  f"context {limit} with max_new_tokens {cs.config.max_new_tokens}: "
                  f"{overflow} overflow unit(s); reasoning {cs.family}")
        shown = _showcase(units, show_prompts)
        texts, ids = render_units(cs.tokenizer, shown, pools, spec) if shown else ([], [])
        for unit, text, prompt_ids in zip(shown, texts, ids, strict=True):
            harmful = _design(spec, unit).harmful_pool
            order = " ".join("H" if pool == harmful else "B" for pool, _ in unit.demos)
            print(f"===== {ref.name} | unit {unit.unit_id} | design {unit.design} | cell "
                  f"{unit.cell} | schedule {unit.schedule} | opening {unit.opening} | query "
                  f"{unit.query_id} draw {unit.draw} | {len(prompt_ids)} tokens | demos: "
                  f"{order or '(none)'}")
            print(text)
    return stats


def _design(spec: SweepSpec, unit: WorkUnit) -> Any:
    return next(d for d in spec.designs if d.name == unit.design)
