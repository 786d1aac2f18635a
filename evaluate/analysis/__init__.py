"""Turn a results table into the study's answers: `analyze(results, out) -> summary dict`.

Reads a sweep output dir (`results.parquet`), a lineage sweep (several `results.parquet` below a
dir), or any CSV/Parquet with the minimal columns, so results produced elsewhere can be analysed.
Writes `out/summary.json` (the DESIGN.md contract plus extras) and tidy CSV tables. Pure
pandas/statsmodels/scipy: no torch on this path.

One idea per module: `data` (reading, validation, roles), `fits` (the clustered logistic fits),
`rates` (rates and differences), `hypotheses` (H_total, model comparison), `designs` (ordering,
format), `stages` (lineage order, stage differences), `run` (the whole analysis and its files),
`simulate` / `power` (data from known models and detection rates), `cli` (`stagesweep analyze`).
"""

from stagesweep.evaluate.analysis.data import choose_cluster, load_results, validate
from stagesweep.evaluate.analysis.run import analyze
from stagesweep.evaluate.analysis.stages import stage_difference

__all__ = ["analyze", "choose_cluster", "load_results", "stage_difference", "validate"]
