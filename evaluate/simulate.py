"""Kept import path: the simulator lives in `stagesweep.evaluate.analysis.simulate`."""

from stagesweep.evaluate.analysis.simulate import SimCheckpoint, SimSpec, grid, simulate

__all__ = ["SimCheckpoint", "SimSpec", "grid", "simulate"]
