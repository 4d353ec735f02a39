"""The results table for docs/PERFORMANCE.md, rebuilt from ``bench/results/*.json``."""

from __future__ import annotations


def summary() -> str:
    return ""
