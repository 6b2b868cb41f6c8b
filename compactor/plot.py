"""Per-layer widths before and after compaction, as a PNG bar chart (needs matplotlib: ``compactor[plot]``)."""

from __future__ import annotations

import os
from typing import Mapping, Union

from .files import atomic_write
from .report import Report

__all__ = ["widths_chart"]

_LAYERS = ("Conv1d", "Conv2d", "Conv3d", "Linear", "Embedding")


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError("plotting needs matplotlib: pip install 'compactor[plot]' (or pip install matplotlib)") from None
    return plt


def widths_chart(reports: Union[Report, Mapping[str, Report]], path: Union[str, os.PathLike], *,
                 title: str = "Output channels per layer", force: bool = True) -> str:
    """Draw each conv / linear layer's output width before compaction and after, for one report or several
    (e.g. ``{"per-layer masks": r1, "prune_channels": r2}``); returns the path written (atomically).

    Raises:
        ImportError: matplotlib is not installed (the message says how to install it).
        FileExistsError: ``path`` exists and ``force`` is false.
    """
    plt = _pyplot()
    named = {"compact": reports} if isinstance(reports, Report) else dict(reports)
    first = next(iter(named.values()))
    rows = [r for r in first.layers if r.op in _LAYERS]
    names = [r.name for r in rows]
    series = {"before": [r.shape_before[1] if r.op == "Embedding" else r.shape_before[0] for r in rows]}
    for label, rep in named.items():
        after = {r.name: (r.shape_after[1] if r.op == "Embedding" else r.shape_after[0]) for r in rep.layers}
        series[label] = [after.get(n, 0) for n in names]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.45 * len(names) + 2), 3.6))
    width = 0.8 / len(series)
    for k, (label, values) in enumerate(series.items()):
        ax.bar([i + (k - (len(series) - 1) / 2) * width for i in range(len(names))], values, width, label=label,
               color="0.8" if label == "before" else None)
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=60, ha="right", fontsize=8)
    ax.set_ylabel("output channels")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    try:
        with atomic_write(path, force=force) as tmp:
            fig.savefig(tmp, dpi=110, format="png")
    finally:
        plt.close(fig)
    return os.fspath(path)
