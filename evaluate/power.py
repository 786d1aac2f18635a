"""Kept import path (`stagesweep power` and plan): see `stagesweep.evaluate.analysis.power`."""

from stagesweep.evaluate.analysis.power import handler, power_table, register

__all__ = ["handler", "power_table", "register"]
