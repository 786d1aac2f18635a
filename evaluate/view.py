"""`stagesweep view OUT`: every answer of one or more sweeps, browsable offline.

A researcher trusts a compliance rate only after reading answers, and the design is paired: the
same prompt was answered by every checkpoint of the lineage. The view writes a static page
(`OUT/view/index.html`, no CDN, no server needed) that lists every unit with one column per
checkpoint, filters by checkpoint, design, cell, judge label, format adoption, status and "label
changed between two stages", and shows one unit's prompt, answers, stripped reasoning and the
judge's raw output side by side.

It scales to paper-sized sweeps (4 checkpoints x 84,240 units, prompts of up to 128 demos)
because the page's first load is only the unit table (dictionary-coded columns and one label
character per unit and checkpoint). Answers and prompts are fetched lazily in shards when a
unit is opened, and prompts are never stored: they are rebuilt from the sweep's pools and each
unit's demo ids. Data shards are JavaScript files (`stagesweepData(key, json)`) because browsers
refuse `fetch` on file:// pages but load scripts; the page treats every model text as text
(`textContent`), so an answer holding `<script>` stays inert.
"""

from __future__ import annotations

import argparse
import http.server
import json
import os
import shutil
import tempfile
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd

from stagesweep.cli import UserError
from stagesweep.evaluate.export import Sweep, find_sweeps, load_sweep, prompt_demos

ASSETS = Path(__file__).resolve().parent / "view_assets"
# Units per answer shard and pool rows per text shard: one shard is tens of kB, fetched when
# a unit is opened.
SHARD_UNITS = 200
SHARD_ROWS = 500
# One character per unit and checkpoint: the judge label, or why there is none.
LABEL_CODES = {"overflow": "o", "unparsed": "u", "no_final_answer": "n", "failed": "f",
               "generated": "g"}
# Unit table columns sent to the page, dictionary-coded: name in the page -> results column.
UNIT_COLUMNS = {"sweep": "sweep", "design": "design", "query": "query_id", "draw": "draw",
                "n_h": "n_harmful", "n_b": "n_benign", "schedule": "schedule",
                "opening": "opening"}
ANSWER_FIELDS = ["response", "reasoning", "judge_raw", "judge", "status", "finish_reason",
                 "prompt_tokens", "complied", "format_adopted"]


def _label(status: object, complied: object) -> str:
    if status == "ok" and not pd.isna(complied):  # a judge-free (logprob) row has no label
        return "c" if complied == 1 else "r"
    return LABEL_CODES.get(str(status), "?")


def _plain(value: object) -> object:
    """JSON-safe cell: pandas/numpy scalars to Python, missing to None."""
    if value is None or value is pd.NA or (isinstance(value, float) and np.isnan(value)):
        return None
    return value.item() if isinstance(value, np.generic) else value


def _write_data(dir: Path, key: str, payload: object) -> None:
    path = dir / "data" / f"{key}.js"
    path.parent.mkdir(parents=True, exist_ok=True)
    # ensure_ascii: the file is a script, and U+2028 and friends stay escaped in it.
    body = json.dumps(payload, ensure_ascii=True, separators=(",", ":"))
    path.write_text(f"stagesweepData({json.dumps(key)},{body});\n")


def _pool_list(sweeps: list[Sweep]) -> list[dict]:
    """Every pool the sweeps loaded, with its kind (harmful demos are marked in the page)."""
    pools = []
    for i, sweep in enumerate(sweeps):
        if sweep.pools is None:
            continue
        harmful = {d.harmful_pool for d in sweep.spec.designs}
        targets = {sweep.spec.targets_key, *sweep.spec.target_pools}
        for name in sweep.pools:
            kind = "target" if name in targets else "harmful" if name in harmful else "benign"
            pools.append({"name": name, "kind": kind, "sweep": i})
    return pools


def _write_pools(dir: Path, sweeps: list[Sweep], pools: list[dict]) -> None:
    """Pool rows in shards, in the pool's own order; demo answers as the prompt shows them
    (reasoning blocks removed; the unit's opening line is added by the page)."""
    from stagesweep.evaluate.render import _answer

    for p, pool in enumerate(pools):
        source = sweeps[pool["sweep"]].pools[pool["name"]]
        responses = source.responses or [None] * len(source)
        rows = [(q, None if a is None else _answer(a, "unchanged"))
                for q, a in zip(source.requests, responses, strict=True)]
        for k in range(0, len(rows), SHARD_ROWS):
            _write_data(dir, f"pools/{p}/{k // SHARD_ROWS}", rows[k:k + SHARD_ROWS])


def _sweep_info(sweep: Sweep) -> dict:
    from stagesweep.evaluate.spec import OPENINGS

    spec = sweep.spec
    return {
        "dir": str(sweep.dir), "problem": sweep.problem,
        "packing": spec.packing.value if spec else None,
        "system_prompt": spec.system_prompt if spec else None,
        "openings": OPENINGS,
    }


def build_view(sources: list[Path], out: Path | None = None) -> Path:
    """Write the viewer for every sweep under `sources` into `out` (default: `view/` in the
    first source, beside a report's `report/`); returns its index.html. The dir is replaced
    whole."""
    from stagesweep.evaluate.analysis.stages import checkpoint_order

    target = Path(out) if out else Path(sources[0]) / "view"
    if target.exists() and not (target / "data" / "meta.js").exists():
        raise UserError(f"--to {target}: exists and is not a stagesweep view; pick another dir")
    dirs = list(dict.fromkeys(d for src in sources for d in find_sweeps(src)))
    sweeps = [load_sweep(d) for d in dirs]
    frame = pd.concat([s.frame.assign(sweep=i) for i, s in enumerate(sweeps)],
                      ignore_index=True)
    # A hand-made results table may hold only what `analyze` needs.
    needed = ["stage", "step", *UNIT_COLUMNS.values(), *ANSWER_FIELDS]
    frame = frame.reindex(columns=list(dict.fromkeys([*frame.columns, *needed])))
    order = checkpoint_order(frame)
    ckpt_index = {name: i for i, name in enumerate(order)}
    meta_rows = frame.drop_duplicates("checkpoint").set_index("checkpoint")

    units = frame.drop_duplicates(["sweep", "unit_id"]).sort_values(
        ["sweep", "design", "n_harmful", "n_benign", "schedule", "opening", "query_id", "draw",
         "unit_id"], kind="stable").reset_index(drop=True)
    position = pd.Series(np.arange(len(units)),
                         index=pd.MultiIndex.from_frame(units[["sweep", "unit_id"]]))
    frame["u"] = position.loc[pd.MultiIndex.from_frame(frame[["sweep", "unit_id"]])].to_numpy()
    frame["c"] = frame["checkpoint"].map(ckpt_index)

    columns = {}
    for name, column in UNIT_COLUMNS.items():
        codes, values = pd.factorize(units[column].astype(object).where(units[column].notna(),
                                                                        None), sort=True)
        columns[name] = {"values": [_plain(v) for v in values], "codes": codes.tolist()}
    labels, formats = {}, {}
    for c, part in frame.groupby("c"):
        lab = np.full(len(units), "-", dtype="<U1")
        lab[part["u"].to_numpy()] = [_label(s, v) for s, v in zip(part["status"],
                                                                  part["complied"], strict=True)]
        fmt = np.full(len(units), "-", dtype="<U1")
        fmt[part["u"].to_numpy()] = ["-" if pd.isna(v) else str(int(v))
                                     for v in part["format_adopted"]]
        labels[int(c)], formats[int(c)] = "".join(lab), "".join(fmt)

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".view-", dir=target.parent))
    os.chmod(tmp, 0o755)  # readable like any written dir, not mkdtemp's owner-only
    try:
        pools = _pool_list(sweeps)
        _write_unit_shards(tmp, frame, units, sweeps, pools)
        _write_pools(tmp, sweeps, pools)
        _write_data(tmp, "meta", {
            "version": 1, "n": len(units), "shard_units": SHARD_UNITS, "shard_rows": SHARD_ROWS,
            "checkpoints": [{"name": n, "stage": _plain(meta_rows.loc[n, "stage"]),
                             "step": _plain(meta_rows.loc[n, "step"])} for n in order],
            "ids": units["unit_id"].tolist(), "columns": columns, "labels": labels,
            "formats": formats, "sweeps": [_sweep_info(s) for s in sweeps],
            "pools": pools, "answer_fields": ANSWER_FIELDS,
        })
        for asset in ASSETS.iterdir():
            shutil.copy(asset, tmp / asset.name)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target / "index.html"


def _demo_refs(units: pd.DataFrame, sweeps: list[Sweep], pools: list[dict]
               ) -> tuple[list, list]:
    """Per unit: its demos as a flat [pool, row, pool, row, ...] list of pool positions in
    prompt order, and its target as [pool, row]; None where the prompt cannot be rebuilt.
    Vectorised: a paper-sized sweep has millions of demos."""
    key = {(pool["sweep"], pool["name"]): p for p, pool in enumerate(pools)}
    demos: list = [None] * len(units)
    targets: list = [None] * len(units)
    for i, sweep in enumerate(sweeps):
        if sweep.pools is None or sweep.plan is None:
            continue
        mine = np.flatnonzero(units["sweep"].to_numpy() == i)
        lists = prompt_demos(sweep, units["prompt_sha"].iloc[mine])
        known = lists.map(lambda d: isinstance(d, np.ndarray | list)).to_numpy()
        lists = lists[known]
        offsets = np.concatenate([[0], np.cumsum(lists.map(len).to_numpy())])
        pairs = lists.explode().dropna().astype(str).to_numpy()
        names = np.array([d.partition(":")[0] for d in pairs], dtype=object)
        ids = np.array([d.partition(":")[2] for d in pairs], dtype=object)
        flat = np.zeros(2 * len(pairs), dtype=np.int64)
        for name in np.unique(names):
            at = np.flatnonzero(names == name)
            flat[2 * at] = key[(i, name)]
            # -1: a demo the pool no longer holds (the page says so)
            flat[2 * at + 1] = pd.Series(ids[at]).map(sweep.pools[name].index()).fillna(-1)
        for j, u in enumerate(mine[known]):
            demos[u] = flat[2 * offsets[j]:2 * offsets[j + 1]].tolist()
        index = sweep.pools[sweep.spec.targets_key].index()
        p = key[(i, sweep.spec.targets_key)]
        for u, query in zip(mine, units["query_id"].iloc[mine].astype(str), strict=True):
            targets[u] = [p, index[query]] if query in index else None
    return demos, targets


def _write_unit_shards(dir: Path, frame: pd.DataFrame, units: pd.DataFrame,
                       sweeps: list[Sweep], pools: list[dict]) -> None:
    """Per unit: its demos and target as pool positions, and every checkpoint's answer as a
    list of ANSWER_FIELDS."""
    frame = frame.sort_values(["u", "c"], kind="stable")
    fields = [frame[f].astype(object).where(frame[f].notna(), None).tolist()
              for f in ANSWER_FIELDS]
    answers: list[dict] = [{} for _ in range(len(units))]
    for u, c, *values in zip(frame["u"].tolist(), frame["c"].tolist(), *fields, strict=True):
        answers[u][c] = values
    demos, targets = _demo_refs(units, sweeps, pools)
    for k in range(0, len(units), SHARD_UNITS):
        _write_data(dir, f"units/{k // SHARD_UNITS}", [
            {"demos": demos[u], "target": targets[u], "answers": answers[u]}
            for u in range(k, min(k + SHARD_UNITS, len(units)))])


def view_server(dir: Path, host: str = "127.0.0.1", port: int = 8765
                ) -> http.server.ThreadingHTTPServer:
    """An http server of the view dir (loopback only unless `host` says otherwise); port 0
    takes any free port."""
    handler = partial(_QuietHandler, directory=str(dir))
    return http.server.ThreadingHTTPServer((host, port), handler)


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass  # one line per shard request would bury the URL


def serve(dir: Path, host: str = "127.0.0.1", port: int = 8765) -> None:
    """Serve the view dir until Ctrl-C."""
    with view_server(dir, host, port) as server:
        print(f"serving http://{host}:{server.server_address[1]}/index.html (Ctrl-C stops)",
              flush=True)
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            print("stopped")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "view",
        help="browse every answer: stages side by side, filters, prompts (static, offline)",
        description="Write OUT/view/index.html: every unit of the sweep(s), one column per "
        "checkpoint, filters (checkpoint, design, cell, judge label, format adoption, status, "
        "label changed between two stages) and each unit's prompt, answers, reasoning and "
        "judge output. Open the file in a browser; --serve serves it on 127.0.0.1 instead.",
    )
    parser.add_argument("out", type=Path, nargs="+",
                        help="sweep output dir(s), a dir of sweeps (e.g. the demo's --out), or "
                        "an analysis dir")
    parser.add_argument("--to", type=Path, help="where to write the viewer (default: the first "
                        "OUT's view/)")
    parser.add_argument("--serve", action="store_true",
                        help="serve it over http on --host:--port until Ctrl-C")
    parser.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8765, help="port (default 8765; 0: any)")
    parser.set_defaults(func=_handle)


def _handle(args: argparse.Namespace) -> int:
    index = build_view(args.out, args.to)
    print(f"wrote {index}\nopen {index.resolve().as_uri()}")
    if args.serve:
        serve(index.parent, args.host, args.port)
    return 0
