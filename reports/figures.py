"""Figures of a check's cases, drawn with matplotlib as inline SVG: how close to the limit they came.

Text stays text (``svg.fonttype = none``) and the scatter of thousands of cases is one embedded
bitmap, so a figure is a few tens of kilobytes whatever the number of cases.
"""

from __future__ import annotations

import io
import math
import re

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)
from matplotlib.ticker import FuncFormatter  # noqa: E402

from foundation.schema import Row  # noqa: E402
from reports.results import inner_dimension, ordered_dtypes  # noqa: E402

COLOURS = {"float32": "#1f77b4", "float16": "#d62728", "bfloat16": "#2ca02c"}
SMALLEST_MARGIN = 1e-4
"""Margins below this (exact results among them) are counted in the histogram's first bin."""

PLAIN = FuncFormatter(lambda value, _: f"{value:g}")
plt.rcParams.update({"svg.fonttype": "none", "svg.hashsalt": "conformance", "font.size": 9})


KNOWN = "known divergence"
"""The histogram's series of cases whose every failure a known divergence explains (any dtype)."""


def explained(row: Row) -> bool:
    """A failing case whose every failing comparison a known divergence explains."""
    return row.failed and bool(row.explained_by) and all(row.explained_by)


def _margins_by_dtype(rows: list[Row]) -> dict[str, list[float]]:
    """Each dtype's margins, and the known divergences' under `KNOWN`."""
    by_dtype: dict[str, list[float]] = {}
    for row in rows:
        if row.margin is not None:
            by_dtype.setdefault(KNOWN if explained(row) else row.dtype, []).append(max(row.margin, SMALLEST_MARGIN))
    return by_dtype


NO_ERROR = " no finite error (raised, or inf/NaN)"


def _without_margin(rows: list[Row]) -> str:
    """Why cases have no margin to plot (it is not finite), or empty if every case has one."""
    missing = [row for row in rows if row.margin is None]
    if not missing:
        return ""
    counts = {
        "agreed exactly where no error is allowed": sum(not row.failed for row in missing),
        "failed as known divergences, with" + NO_ERROR: sum(explained(row) for row in missing),
        "failed with" + NO_ERROR: sum(row.failed and not explained(row) for row in missing),
    }
    parts = [f"{n} {what}" for what, n in counts.items() if n]
    return f"not plotted: {len(missing)} of {len(rows)} cases: " + "; ".join(parts)


def check_figure(rows: list[Row], title: str) -> str:
    """Two panels as one SVG: the margins' histogram per dtype, and each case's error against its inner dimension."""
    figure, (histogram, scatter) = plt.subplots(1, 2, figsize=(9, 2.8))
    figure.subplots_adjust(left=0.07, right=0.99, bottom=0.17, top=0.88, wspace=0.22)
    figure.suptitle(title)
    margins = _margins_by_dtype(rows)
    largest = max((m for values in margins.values() for m in values), default=1.0)
    top = max(1.0, largest) * 2
    bins = [SMALLEST_MARGIN * (top / SMALLEST_MARGIN) ** (i / 40) for i in range(41)]
    for dtype in ordered_dtypes(set(margins) - {KNOWN}):
        histogram.hist(margins[dtype], bins=bins, histtype="step", color=COLOURS.get(dtype), label=dtype)
    if KNOWN in margins:
        histogram.hist(margins[KNOWN], bins=bins, histtype="stepfilled", color="#ef6c00", alpha=0.35, label=KNOWN)
    missing = _without_margin(rows)
    if missing:
        where = (0.02, 0.5) if not margins else (0.02, 0.97)
        histogram.text(*where, missing, transform=histogram.transAxes, fontsize=7, va="top", wrap=True)
    histogram.axvline(1.0, color="black", linestyle="--", linewidth=1)
    histogram.set(xscale="log", xlabel="margin = observed / allowed error", ylabel="cases")
    histogram.text(1.0, 1.0, " limit", transform=histogram.get_xaxis_transform(), va="top", fontsize=8)
    if margins:
        histogram.legend(fontsize=8, frameon=False)
    for dtype in ordered_dtypes({r.dtype for r in rows}):
        points = [
            (inner_dimension(r.case), r.max_error)
            for r in rows
            if r.dtype == dtype and r.max_error and inner_dimension(r.case) and math.isfinite(r.max_error)
        ]
        if points:
            x, y = zip(*points)
            scatter.scatter(x, y, s=5, color=COLOURS.get(dtype), label=dtype, rasterized=True, linewidths=0)
    scatter.set(
        xscale="log",
        yscale="log",
        xlabel="inner dimension (in_features; embedding: dims)",
        ylabel="largest error of the case",
    )
    for axes in (histogram, scatter):
        axes.minorticks_off()
        for axis in (axes.xaxis, axes.yaxis):
            if axis.get_scale() == "log":  # plain labels: matplotlib's 10^k ones are typeset (most of a figure's time)
                axis.set_major_formatter(PLAIN)
    svg = io.StringIO()
    figure.savefig(svg, format="svg", dpi=72, metadata={"Date": None})
    plt.close(figure)
    return _compact(svg.getvalue())


def _compact(svg: str) -> str:
    """The SVG element alone, without matplotlib's comments and indentation."""
    svg = re.sub(r"<!--.*?-->", "", svg[svg.index("<svg") :], flags=re.DOTALL)
    return "\n".join(line.strip() for line in svg.splitlines() if line.strip())
