"""Kept import path (`stagesweep analyze`, the demo): see `stagesweep.evaluate.analysis.cli`."""

from stagesweep.evaluate.analysis.cli import format_summary, handler, register

__all__ = ["format_summary", "handler", "register"]
