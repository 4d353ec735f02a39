"""matplotlib helpers: one look for every chart, PNGs small enough to commit."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402 - the backend must be chosen first
from matplotlib.figure import Figure  # noqa: E402

from bench.common import RESULTS, ROOT, log  # noqa: E402

MOTIONHOOK = "#2b6cb0"
CEILING = "#a0aec0"
SQL_CEILING = "#68d391"
ACCENT = "#dd6b20"
TARGET = "#c53030"


def figure(columns: int = 1, *, width: float = 6.4, height: float = 3.6) -> tuple[Figure, Any]:
    """A figure with ``columns`` side-by-side axes and the house style."""
    fig, axes = plt.subplots(1, columns, figsize=(width * columns / 1.4, height), dpi=100)
    for ax in axes if columns > 1 else [axes]:
        ax.grid(axis="y", alpha=0.3)
        ax.spines["top"].set_visible(False)
        ax.spines["right"].set_visible(False)
    return fig, axes


def target_line(ax: Any, value: float, label: str) -> None:
    ax.axhline(value, color=TARGET, linestyle="--", linewidth=1)
    ax.annotate(
        label,
        xy=(1, value),
        xycoords=("axes fraction", "data"),
        xytext=(-4, 3),
        textcoords="offset points",
        ha="right",
        fontsize=8,
        color=TARGET,
    )


def save(fig: Figure, name: str) -> Path:
    """Write ``bench/results/<name>.png``."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.png"
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    log.info("wrote %s", path.relative_to(ROOT))
    return path
