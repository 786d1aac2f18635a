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
from stagesweep.evaluate.export import Sweep, find_sweeps, load_sweep

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
    if status == "ok":
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


class _PoolRows:
    """The pool rows the units use, numbered in first use (units of one demo context share
    rows, so they land in the same text shard)."""

    def __init__(self, sweeps: list[Sweep]):
        self.pools: list[dict] = []
        self.key: dict[tuple[int, str], int] = {}
        self.rows: list[dict[str, int]] = []
        for i, sweep in enumerate(sweeps):
            if sweep.pools is None:
                continue
            harmful = {d.harmful_pool for d in sweep.spec.designs}
            for name in sweep.pools:
                targets = {sweep.spec.targets_key, *sweep.spec.target_pools}
                kind = ("target" if name in targets
                        else "harmful" if name in harmful else "benign")
                self.key[(i, name)] = len(self.pools)
                self.pools.append({"name": name, "kind": kind, "sweep": i})
                self.rows.append({})

    def ref(self, sweep: int, pool: str, row_id: str) -> list[int] | None:
        p = self.key.get((sweep, pool))
        if p is None:
            return None
        rows = self.rows[p]
        return [p, rows.setdefault(row_id, len(rows))]

    def write(self, dir: Path, sweeps: list[Sweep]) -> None:
        from stagesweep.evaluate.render import _answer

        for p, pool in enumerate(self.pools):
            source = sweeps[pool["sweep"]].pools[pool["name"]]
            index = source.index()
            rows = [(source.requests[index[r]],
                     None if source.responses is None
                     else _answer(source.responses[index[r]], "unchanged"))
                    for r in self.rows[p]]
            for k in range(0, max(len(rows), 1), SHARD_ROWS):
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
    """Write the viewer for every sweep under `sources` into `out` (default: the first
    source's `view/`); returns its index.html. The dir is replaced whole."""
    from stagesweep.evaluate.analysis.stages import checkpoint_order

    dirs = list(dict.fromkeys(d for src in sources for d in find_sweeps(src)))
    sweeps = [load_sweep(d) for d in dirs]
    frame = pd.concat([s.frame.assign(sweep=i) for i, s in enumerate(sweeps)],
                      ignore_index=True)
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

    target = Path(out) if out else dirs[0] / "view"
    if target.exists() and not (target / "data" / "meta.js").exists():
        raise UserError(f"--to {target}: exists and is not a stagesweep view; pick another dir")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".view-", dir=target.parent))
    try:
        pools = _PoolRows(sweeps)
        _write_unit_shards(tmp, frame, units, sweeps, pools)
        pools.write(tmp, sweeps)
        _write_data(tmp, "meta", {
            "version": 1, "n": len(units), "shard_units": SHARD_UNITS, "shard_rows": SHARD_ROWS,
            "checkpoints": [{"name": n, "stage": _plain(meta_rows.loc[n, "stage"]),
                             "step": _plain(meta_rows.loc[n, "step"])} for n in order],
            "ids": units["unit_id"].tolist(), "columns": columns, "labels": labels,
            "formats": formats, "sweeps": [_sweep_info(s) for s in sweeps],
            "pools": pools.pools,
        })
        for asset in ASSETS.iterdir():
            shutil.copy(asset, tmp / asset.name)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target / "index.html"


def _write_unit_shards(dir: Path, frame: pd.DataFrame, units: pd.DataFrame,
                       sweeps: list[Sweep], pools: _PoolRows) -> None:
    """Per unit: its demos and target as pool row references, and every checkpoint's answer."""
    frame = frame.sort_values(["u", "c"], kind="stable")
    answers: list[dict] = [{} for _ in range(len(units))]
    for row in frame[["u", "c", *ANSWER_FIELDS]].itertuples(index=False):
        answers[row.u][row.c] = {f: _plain(getattr(row, f)) for f in ANSWER_FIELDS}
    shard: list[dict] = []
    for u, (sweep, unit_id, query) in enumerate(zip(units["sweep"], units["unit_id"],
                                                    units["query_id"], strict=True)):
        s = sweeps[sweep]
        demos = (s.plan or {}).get(unit_id.split("/s")[0])
        target = pools.ref(sweep, s.spec.targets_key, str(query)) if s.spec else None
        shard.append({
            "demos": None if demos is None or s.pools is None
            else [pools.ref(sweep, p, r) for p, r in demos],
            "target": target, "answers": answers[u],
        })
        if len(shard) == SHARD_UNITS or u == len(units) - 1:
            _write_data(dir, f"units/{u // SHARD_UNITS}", shard)
            shard = []


def serve(dir: Path, host: str = "127.0.0.1", port: int = 8765) -> None:
    """Serve the view dir until Ctrl-C (loopback only unless `host` says otherwise)."""
    handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(dir))
    with http.server.ThreadingHTTPServer((host, port), handler) as server:
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
