"""Plots of membership-inference results (matplotlib, no pyplot state).

Figures are built with ``matplotlib.figure.Figure`` (Agg canvas), so they work
headless and touch no global figure registry. Each helper draws on ``ax`` if
given, else on a new figure, and saves it to ``path`` if given.
"""
from __future__ import annotations

from typing import Mapping

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
