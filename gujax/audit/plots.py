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


def plot_roc(curves: Mapping, ax: Axes | None = None, path=None, *,
             title: str | None = None) -> Axes:
    """ROC curves on log-log axes, one per attack or arm, with the chance line.

    Args:
      curves: name -> an (fpr, tpr) pair of arrays, an ``AttackEvaluation``
        (its pooled curve) or ``MembershipScores`` (NaN scores dropped). The
        legend shows each curve's AUC.
      ax: axes to draw on (default: a new figure, wide enough for the legend).
      path: file to save the figure to (PNG, PDF, ... by extension).

    Returns:
      The axes. Log axes cannot show FPR = 0 or TPR = 0: the plot starts at
      the smallest positive FPR of the curves (the low-FPR regime is what
      matters for membership inference). The legend sits outside the axes,
      to their right, so that it covers no curve.
    """
    if not curves:
        raise ValueError("curves is empty")
    ax = _axes(ax, figsize=(7.5, 4.5))
    smallest = 1.0
    for name, value in curves.items():
        fpr, tpr = _curve(value)
        if fpr.shape != tpr.shape or fpr.ndim != 1:
            raise ValueError(f"{name}: fpr and tpr must be 1-D of equal length")
        area = np.trapezoid(tpr, fpr)
        ax.plot(fpr, tpr, label=f"{name} (AUC {area:.3f})")
        if np.any(fpr > 0):
            smallest = min(smallest, float(fpr[fpr > 0].min()))
    ax.plot([smallest, 1], [smallest, 1], "k--", lw=0.8, label="chance")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(smallest, 1)
    ax.set_ylim(smallest, 1)
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
    for i, (name, points) in enumerate(families.items()):
        x = np.array([p.x for p in points], np.float64)
        x_interval = np.array([p.x_interval for p in points], np.float64)
        if floor is not None:
            x, x_interval = np.maximum(x, floor), np.maximum(x_interval, floor)
        y = np.array([p.y for p in points], np.float64)
        ax.errorbar(x, y, xerr=_errors(x, x_interval),
                    yerr=_errors(y, [p.y_interval for p in points]),
                    fmt=(markers or {}).get(name, "o") + "-", color=f"C{i % 10}", ms=6,
                    capsize=2, lw=1.2, elinewidth=0.8, label=name)
        for p, px in zip(points, x):
            ax.annotate(p.label, (px, p.y), xytext=(4, 4), textcoords="offset points",
                        fontsize=7, color=f"C{i % 10}")
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
    if path is not None:
        ax.figure.savefig(path, dpi=150)
    return ax
