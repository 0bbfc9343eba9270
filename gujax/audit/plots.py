"""Plots of membership-inference results (matplotlib, no pyplot state).

Figures are built with ``matplotlib.figure.Figure`` (Agg canvas), so they work
headless and touch no global figure registry. Each helper draws on ``ax`` if
given, else on a new figure, and saves it to ``path`` if given.
"""
from __future__ import annotations

from typing import Mapping, NamedTuple, Sequence

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from scipy import stats

from gujax.audit import metrics
from gujax.audit.attacks import MembershipScores
from gujax.audit.metrics import AttackEvaluation
from gujax.audit.vulnerability import per_example_pair


def _axes(ax: Axes | None, figsize=(4.5, 4.5)) -> Axes:
    if ax is not None:
        return ax
    return Figure(figsize=figsize, layout="constrained").add_subplot()


def _curve(value) -> tuple[np.ndarray, np.ndarray]:
    if isinstance(value, AttackEvaluation):
        return value.fpr, value.tpr
    if isinstance(value, MembershipScores):
        valid = ~np.isnan(value.scores)
        curve = metrics.roc(value.scores[valid], value.is_member[valid])
        return curve.fpr, curve.tpr
    fpr, tpr = value
    return np.asarray(fpr, dtype=np.float64), np.asarray(tpr, dtype=np.float64)


def tpr_at_level(fpr: np.ndarray, tpr: np.ndarray, level: float) -> float:
    """The largest TPR of an ROC curve at an FPR <= ``level`` (0 if none)."""
    below = fpr <= level
    return float(tpr[below].max()) if np.any(below) else 0.0


def plot_roc(curves: Mapping, ax: Axes | None = None, path=None, *,
             title: str | None = None, fpr_levels: Sequence[float] = (0.001, 0.01),
             intervals: Mapping[str, Mapping[float, Sequence[float]]] | None = None) -> Axes:
    """ROC curves on log-log axes, one per attack or arm, with the chance line.

    Args:
      curves: name -> an (fpr, tpr) pair of arrays, an ``AttackEvaluation``
        (its pooled curve) or ``MembershipScores`` (NaN scores dropped). The
        legend shows each curve's AUC.
      ax: axes to draw on (default: a new figure, wide enough for the legend).
      path: file to save the figure to (PNG, PDF, ... by extension).
      fpr_levels: the FPRs marked (a dotted vertical line each, and on each
        curve a dot at its TPR there: ``tpr_at_level``).
      intervals: name -> {fpr level: (lo, hi)}: a TPR interval drawn as a
        vertical bar through that curve's dot (e.g. the 95% bootstrap
        intervals of ``mia_tpr_at_1pct_fpr_ci``), the curves' dots and bars
        side by side.

    Returns:
      The axes: ``ax.lines`` holds the curves, then the chance line (the
      marks are collections). Log axes cannot show FPR = 0 or TPR = 0: the x axis starts
      at the smallest positive FPR of the curves (the low-FPR regime is what
      matters for membership inference), the y axis below the smallest
      positive TPR shown, so that no curve, marker or interval is cut off.
      The legend sits outside the axes, to their right, so that it covers no
      curve.
    """
    if not curves:
        raise ValueError("curves is empty")
    ax = _axes(ax, figsize=(7.5, 4.5))
    smallest = 1.0
    drawn = []
    for i, (name, value) in enumerate(curves.items()):
        fpr, tpr = _curve(value)
        if fpr.shape != tpr.shape or fpr.ndim != 1:
            raise ValueError(f"{name}: fpr and tpr must be 1-D of equal length")
        area = np.trapezoid(tpr, fpr)
        ax.plot(fpr, tpr, color=f"C{i % 10}", label=f"{name} (AUC {area:.3f})")
        if np.any(fpr > 0):
            smallest = min(smallest, float(fpr[fpr > 0].min()))
        drawn.append((name, fpr, tpr, f"C{i % 10}"))
    lowest = smallest
    for i, (name, fpr, tpr, color) in enumerate(drawn):
        shown = tpr[(fpr >= smallest) & (tpr > 0)]
        if shown.size:
            lowest = min(lowest, float(shown.min()))
        # The curves' markers at one level side by side (log axis: a factor).
        dodge = np.exp(0.04 * (i - (len(drawn) - 1) / 2)) if intervals else 1.0
        for level in fpr_levels:
            y = tpr_at_level(fpr, tpr, level)
            interval = (intervals or {}).get(name, {}).get(level)
            if interval is not None:
                lo, hi = (float(v) for v in interval)
                positive = [v for v in (lo, y, hi) if v > 0]
                if positive:
                    lowest = min(lowest, min(positive))
                    floor = min(positive)
                    ax.vlines(level * dodge, max(lo, floor), max(hi, floor), colors=color,
                              lw=1.2, label=f"_{name} interval at {level:g}")
            if y > 0:
                lowest = min(lowest, y)
                ax.scatter([level * dodge], [y], s=16, color=color, edgecolors="white",
                           linewidths=0.5, zorder=3, label=f"_{name} at {level:g}")
    bottom = 0.5 * lowest
    ax.plot([bottom, 1], [bottom, 1], "k--", lw=0.8, label="chance")
    for level in fpr_levels:
        if smallest <= level <= 1:
            ax.vlines(level, 0, 1, transform=ax.get_xaxis_transform(), colors="gray",
                      linestyles=":", lw=0.8, label=f"_FPR {level:g}")
            ax.annotate(f"FPR {level:.1%}".replace(".0%", "%"), (level, 1),
                        xycoords=("data", "axes fraction"), xytext=(2, -10),
                        textcoords="offset points", fontsize=7, color="gray")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(smallest, 1)
    ax.set_ylim(bottom, 1)
    ax.set_xlabel("false-positive rate")
    ax.set_ylabel("true-positive rate")
    if title:
        ax.set_title(title)
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1), borderaxespad=0, fontsize="small")
    if path is not None:
        ax.figure.savefig(path, dpi=150)
    return ax


def plot_disclosure_vs_attack(disclosure, vulnerability, ax: Axes | None = None,
                              path=None, *, xlabel: str = "disclosure D_j (nats)",
                              ylabel: str = "vulnerability (mean IN score)") -> Axes:
    """Scatter of per-example vulnerability against disclosure.

    Args:
      disclosure, vulnerability: (N,) per-example values; NaN pairs dropped.
      ax, path: as in ``plot_roc``.

    Returns:
      The axes; the title gives Spearman's rho over the plotted examples.
    """
    x, y = per_example_pair(disclosure, vulnerability)
    keep = np.isfinite(x) & np.isfinite(y)
    if keep.sum() < 3:
        raise ValueError("need at least 3 examples with finite values to plot")
    ax = _axes(ax)
    ax.scatter(x[keep], y[keep], s=6, alpha=0.5)
    rho = stats.spearmanr(x[keep], y[keep]).statistic
    ax.set_title(f"Spearman rho = {rho:.3f} (n = {int(keep.sum())})")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if path is not None:
        ax.figure.savefig(path, dpi=150)
    return ax


def plot_disclosure_grid(panels: Mapping[str, tuple], path=None, *, columns: int = 4,
                         ylabel: str = "mean LiRA score as member") -> Figure:
    """``plot_disclosure_vs_attack`` per arm, in a grid whose panels share
    one disclosure axis (the arms compare by eye: an arm that discloses
    little sits at the left); a panel without enough finite values (no
    ledger, e.g. DP-SGD without one) says so.

    Args:
      panels: arm name -> (disclosure, vulnerability), each (N,).
      path: file to save the figure to.
      columns: panels per row (at most).

    Returns:
      The figure.
    """
    if not panels:
        raise ValueError("panels is empty")
    cols = min(columns, len(panels))
    rows = -(-len(panels) // cols)
    fig = Figure(figsize=(3.6 * cols, 3.2 * rows), layout="constrained")
    axes = fig.subplots(rows, cols, sharex=True, squeeze=False).ravel()
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    for ax, (name, (disclosure, vulnerability)) in zip(axes, panels.items()):
        try:
            plot_disclosure_vs_attack(disclosure, vulnerability, ax=ax, ylabel=ylabel)
            ax.set_title(f"{name}\n{ax.get_title()}", fontsize=8)
        except ValueError as err:             # too few examples with finite values
            ax.set_title(f"{name}\n{err}", fontsize=7)
            ax.set_xlabel("disclosure D_j (nats)")
        ax.tick_params(labelbottom=True)      # every panel keeps its x tick labels
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig


class TradeoffPoint(NamedTuple):
    """One arm on a privacy/utility plane.

    label: the point's annotation (e.g. "eps=3").
    x, x_interval: the attack's success (e.g. TPR at 1% FPR, or AUC) and its
      [lo, hi] confidence interval.
    y, y_interval: the utility (test accuracy) and its interval.
    """
    label: str
    x: float
    x_interval: tuple[float, float]
    y: float
    y_interval: tuple[float, float]


def _errors(values, intervals) -> np.ndarray:
    """(2, K) distances to the interval ends (never negative: a percentile
    interval need not contain its estimate)."""
    values = np.asarray(values, dtype=np.float64)
    intervals = np.asarray(intervals, dtype=np.float64).reshape(-1, 2)
    return np.maximum(0.0, np.stack([values - intervals[:, 0], intervals[:, 1] - values]))


def _renderer(fig):
    """A renderer of ``fig`` with its layout applied (an Agg canvas if it
    has none that can render)."""
    if not hasattr(fig.canvas, "get_renderer"):
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        FigureCanvasAgg(fig)
    fig.draw_without_rendering()
    return fig.canvas.get_renderer()


def _overlap(a, b) -> float:
    """Area of the intersection of two (x0, y0, x1, y1) boxes."""
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    return w * h if w > 0 and h > 0 else 0.0


def _segment_boxes(p, q, width: float, pieces: int = 8) -> list[tuple]:
    """Thin boxes along the display segment p-q (an obstacle for labels)."""
    boxes = []
    for t0, t1 in zip(np.linspace(0, 1, pieces, endpoint=False), np.linspace(0, 1, pieces + 1)[1:]):
        a, b = p + t0 * (q - p), p + t1 * (q - p)
        boxes.append((min(a[0], b[0]) - width, min(a[1], b[1]) - width,
                      max(a[0], b[0]) + width, max(a[1], b[1]) + width))
    return boxes


# Where a label may go around its point: (dx, dy) directions, in order of
# preference, at each distance of _LABEL_DISTANCES (points).
_LABEL_DIRECTIONS = ((1, 1), (1, -1), (-1, 1), (-1, -1), (1, 0), (-1, 0), (0, 1), (0, -1))
_LABEL_DISTANCES = (4, 9, 15, 22, 30)


def place_labels(ax: Axes, labels: Sequence[tuple], obstacles: Sequence[tuple] = (),
                 *, fontsize: float = 7) -> list:
    """Annotate points so that no label overlaps another, a marker, an error
    bar or a curve where a free place is near.

    Args:
      labels: (x, y, text, color) in data coordinates, one per point.
      obstacles: extra (x0, y0, x1, y1) boxes in display coordinates.

    Each label tries the eight directions around its point at growing
    distances (``_LABEL_DIRECTIONS``, ``_LABEL_DISTANCES``) and takes the
    place that overlaps least with what is drawn and the labels placed
    before it (outside the axes counts as overlap); a label set off more
    than a few points gets a thin leader line to its point. Returns the
    annotations.
    """
    fig = ax.figure
    renderer = _renderer(fig)
    scale = fig.dpi / 72.0
    frame = ax.get_window_extent(renderer)
    frame = (frame.x0, frame.y0, frame.x1, frame.y1)
    blocked = list(obstacles)
    to_display = ax.transData.transform
    for x, y, _, _ in labels:
        px, py = to_display((x, y))
        blocked.append((px - 4 * scale, py - 4 * scale, px + 4 * scale, py + 4 * scale))
    legend = ax.get_legend()
    if legend is not None:
        box = legend.get_window_extent(renderer)
        blocked.append((box.x0, box.y0, box.x1, box.y1))
    placed = []
    for x, y, text, color in labels:
        px, py = to_display((x, y))
        best = None
        for rank, distance in enumerate(_LABEL_DISTANCES):
            for turn, (dx, dy) in enumerate(_LABEL_DIRECTIONS):
                norm = np.hypot(dx, dy)
                ox, oy = distance * dx / norm, distance * dy / norm
                ha = "left" if dx > 0 else "right" if dx < 0 else "center"
                va = "bottom" if dy > 0 else "top" if dy < 0 else "center"
                ann = ax.annotate(text, (x, y), xytext=(ox, oy), textcoords="offset points",
                                  ha=ha, va=va, fontsize=fontsize, color=color)
                box = ann.get_window_extent(renderer)
                ann.remove()
                box = (box.x0, box.y0, box.x1, box.y1)
                area = (box[2] - box[0]) * (box[3] - box[1])
                cost = sum(_overlap(box, b) for b in blocked)
                cost += area - _overlap(box, frame)          # outside the axes
                cost += 0.02 * area * (rank + 0.1 * turn)    # prefer near, then the order
                if best is None or cost < best[0]:
                    best = (cost, ox, oy, ha, va, box, distance)
            if best[0] <= 0.02 * area * (rank + 1):          # free here: stop looking
                break
        _, ox, oy, ha, va, box, distance = best
        arrow = (dict(arrowstyle="-", color=color, lw=0.5, shrinkA=0, shrinkB=2)
                 if distance > _LABEL_DISTANCES[1] else None)
        ann = ax.annotate(text, (x, y), xytext=(ox, oy), textcoords="offset points",
                          ha=ha, va=va, fontsize=fontsize, color=color, arrowprops=arrow)
        ann.set_in_layout(False)
        blocked.append(box)
        placed.append(ann)
    return placed


def plot_tradeoff(families: Mapping[str, Sequence[TradeoffPoint]], ax: Axes | None = None,
                  path=None, *, chance: float | None = None, log_x: bool = False,
                  xlabel: str = "attack success", ylabel: str = "test accuracy",
                  markers: Mapping[str, str] | None = None, title: str | None = None) -> Axes:
    """Utility against attack success, one line per family of arms (e.g.
    DP-SGD over epsilon), in the order given, each point with error bars
    both ways and its label.

    Args:
      families: family name -> its points (``TradeoffPoint``), in curve order.
      ax, path: as in ``plot_roc``.
      chance: the attack's chance level, drawn as a vertical line (TPR at
        an FPR f: f; AUC: 0.5).
      log_x: log-scaled x axis (for TPR at low FPR). A value or interval end
        at 0 cannot be shown there: it is drawn at half the smallest positive
        x value, the axis's left end.
      markers: family name -> matplotlib marker (default "o").

    Returns:
      The axes; the legend names the families.
    """
    if not families or not all(len(points) for points in families.values()):
        raise ValueError("families must be non-empty, each with at least one point")
    ax = _axes(ax, figsize=(5.5, 4.5))
    everything = [v for points in families.values() for p in points
                  for v in (p.x, *p.x_interval)]
    if not all(np.isfinite(everything)):
        raise ValueError("every x value and interval end must be finite")
    floor = None
    if log_x:
        positive = [v for v in everything if v > 0] + ([chance] if chance else [])
        if not positive:
            raise ValueError("log_x needs a positive x value")
        floor = 0.5 * min(positive)
    labels, bars = [], []
    for i, (name, points) in enumerate(families.items()):
        x = np.array([p.x for p in points], np.float64)
        x_interval = np.array([p.x_interval for p in points], np.float64)
        if floor is not None:
            x, x_interval = np.maximum(x, floor), np.maximum(x_interval, floor)
        y = np.array([p.y for p in points], np.float64)
        y_interval = np.array([p.y_interval for p in points], np.float64)
        ax.errorbar(x, y, xerr=_errors(x, x_interval), yerr=_errors(y, y_interval),
                    fmt=(markers or {}).get(name, "o") + "-", color=f"C{i % 10}", ms=6,
                    capsize=2, lw=1.2, elinewidth=0.8, label=name)
        labels += [(px, p.y, p.label, f"C{i % 10}") for p, px in zip(points, x)]
        # What the labels must not cover: error bars and the curve.
        bars += [((lo, py), (hi, py)) for (lo, hi), py in zip(x_interval, y)]
        bars += [((px, lo), (px, hi)) for px, (lo, hi) in zip(x, y_interval)]
        bars += list(zip(zip(x[:-1], y[:-1]), zip(x[1:], y[1:])))
    if chance is not None:
        ax.axvline(chance, ls="--", c="gray", lw=0.8)
        ax.annotate("chance", (chance, 0), xycoords=("data", "axes fraction"),
                    xytext=(3, 4), textcoords="offset points", fontsize=7, color="gray")
    if log_x:
        ax.set_xscale("log")
        ax.set_xlim(left=floor * 0.8)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3, which="both" if log_x else "major")
    if title:
        ax.set_title(title)
    ax.legend(fontsize="small")
    _renderer(ax.figure)                   # the layout, then the display positions
    to_display = ax.transData.transform
    scale = ax.figure.dpi / 72.0
    obstacles = [box for p, q in bars
                 for box in _segment_boxes(to_display(p), to_display(q), 1.5 * scale)]
    place_labels(ax, labels, obstacles)
    if path is not None:
        ax.figure.savefig(path, dpi=150)
    return ax
