"""(epsilon, delta) accounting for DP-SGD on top of ``dp_accounting``.

The event must match the sampler (``gujax.sampling``):

* ``sampling="poisson"``: ``PoissonSampledDpEvent(q, GaussianDpEvent(sigma))``
  composed ``steps`` times, under add-or-remove-one adjacency (the clipped
  sum's L2 sensitivity is C, so the Gaussian event's multiplier is sigma).
  Both the RDP and the PLD accountant support it.
* ``sampling="fixed"``: ``SampledWithoutReplacementDpEvent`` with batch
  size q N, under replace-one adjacency (the only one dp_accounting supports
  for it; the dataset size N is public). Replacing one example moves the
  clipped sum by up to 2C, so the Gaussian event's multiplier is sigma / 2.
  Only the RDP accountant supports it (dp_accounting 0.6 has no PLD for
  sampling without replacement); asking for PLD raises ValueError.

The two samplings' epsilons refer to different adjacency relations and are
not directly comparable.

**The sampling has no default.** ``dp_epsilon``, ``calibrate_noise_multiplier``
and ``dpsgd_event`` must be told which sampler drew the batches: an epsilon
computed for Poisson sampling is wrong for a loop that draws fixed-size or
shuffled batches (shuffling has no accounting here at all). Leaving it out
raises ``TypeError``. ``gujax.dpsgd.make_private`` builds the sampler, the
DP-SGD transformation and this accounting together, so that they agree by
construction.

``releases``: noise multipliers of Gaussian mechanisms run once on the whole
training set before training (e.g. private feature statistics,
``gujax.features.private_standardizer``, whose L2 sensitivity is its clip
norm), composed with the training steps into one epsilon.
"""
from __future__ import annotations

import logging
import math
import numbers

import dp_accounting
from dp_accounting import pld, rdp

_REPLACE_ONE = dp_accounting.NeighboringRelation.REPLACE_ONE
_ADD_OR_REMOVE = dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE


class _Required:
    """The default of ``sampling``: it must be named."""

    def __repr__(self):
        return "<required>"


REQUIRED = _Required()

SAMPLING_HELP = ("name the sampler that drew the batches: sampling='poisson' "
                 "(gujax.sampling.poisson_batch, its mask passed on) or sampling='fixed' "
                 "(gujax.sampling.fixed_batch); shuffled epochs have no DP accounting. "
                 "gujax.dpsgd.make_private builds sampler, DP-SGD and accountant together")


def _check_sampling(sampling, function: str) -> None:
    if sampling is REQUIRED:
        raise TypeError(f"{function}() has no default sampling: {SAMPLING_HELP}")
    if sampling not in ("poisson", "fixed"):
        raise ValueError(f"sampling must be 'poisson' or 'fixed', got {sampling!r}")


def _check(noise_multiplier, sample_rate, steps, delta, sampling, accountant,
           function="dp_epsilon"):
    _check_sampling(sampling, function)
    if accountant not in ("rdp", "pld"):
        raise ValueError(f"accountant must be 'rdp' or 'pld', got {accountant!r}")
    if sampling == "fixed" and accountant == "pld":
        raise ValueError("dp_accounting's PLD accountant does not support sampling "
                         "without replacement; use accountant='rdp'")
    if noise_multiplier is not None and (
            not isinstance(noise_multiplier, numbers.Real)
            or not math.isfinite(noise_multiplier) or noise_multiplier <= 0):
        raise ValueError(f"noise_multiplier must be a finite number > 0, got "
                         f"{noise_multiplier!r}")
    if not isinstance(sample_rate, numbers.Real) or not 0 < sample_rate <= 1:
        raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate!r}")
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    if not isinstance(delta, numbers.Real) or not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta!r}")


def _check_releases(releases) -> tuple[float, ...]:
    releases = tuple(releases)
    for sigma in releases:
        if not isinstance(sigma, numbers.Real) or not math.isfinite(sigma) or sigma <= 0:
            raise ValueError(f"releases must be finite noise multipliers > 0, got {releases!r}")
    return releases


def dpsgd_event(noise_multiplier: float, sample_rate: float, steps: int, *,
                sampling: str = REQUIRED, releases=()) -> dp_accounting.DpEvent:
    """The DpEvent of ``steps`` DP-SGD steps after the one-off Gaussian
    ``releases`` (see the module docstring). ``sampling`` ("poisson" or
    "fixed") must be given."""
    _check_sampling(sampling, "dpsgd_event")
    gaussian = dp_accounting.GaussianDpEvent
    if sampling == "poisson":
        step = dp_accounting.PoissonSampledDpEvent(sample_rate, gaussian(noise_multiplier))
    else:
        # The RDP bound for sampling without replacement depends on the ratio
        # sample_size / source_dataset_size only, so a unit dataset carries q.
        step = dp_accounting.SampledWithoutReplacementDpEvent(
            1, sample_rate, gaussian(noise_multiplier / 2))
    training = dp_accounting.SelfComposedDpEvent(step, steps)
    releases = _check_releases(releases)
    if not releases:
        return training
    if sampling != "poisson":
        # Under replace-one adjacency a release's sensitivity doubles.
        releases = tuple(r / 2 for r in releases)
    return dp_accounting.ComposedDpEvent([gaussian(r) for r in releases] + [training])


class _QuietNonConvergence(logging.Filter):
    """dp_accounting warns, once per RDP order, when its series for a
    fractional order does not converge at a small sigma. The order is then
    left out, which can only raise epsilon (still an upper bound), and the
    calibration's bisection visits such sigmas by design: hundreds of lines
    that say nothing about the final result."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "_compute_log_a_frac failed to converge" not in record.getMessage()


logging.getLogger("absl").addFilter(_QuietNonConvergence())


def _accountant(sampling: str, accountant: str) -> dp_accounting.PrivacyAccountant:
    relation = _ADD_OR_REMOVE if sampling == "poisson" else _REPLACE_ONE
    if accountant == "rdp":
        return rdp.RdpAccountant(neighboring_relation=relation)
    return pld.PLDAccountant(neighboring_relation=relation)


def dp_epsilon(noise_multiplier: float, sample_rate: float, steps: int, delta: float,
               *, sampling: str = REQUIRED, accountant: str = "rdp", releases=()) -> float:
    """epsilon of DP-SGD after ``steps`` steps at sample rate q and noise
    multiplier sigma (noise std / clip norm), for the given delta, with the
    one-off Gaussian ``releases`` composed in. ``sampling`` ("poisson" or
    "fixed", the sampler that drew the batches) must be given: TypeError
    otherwise."""
    _check(noise_multiplier, sample_rate, steps, delta, sampling, accountant)
    acc = _accountant(sampling, accountant)
    acc.compose(dpsgd_event(noise_multiplier, sample_rate, steps, sampling=sampling,
                            releases=releases))
    return float(acc.get_epsilon(delta))


def calibrate_noise_multiplier(target_epsilon: float, sample_rate: float, steps: int,
                               delta: float, *, sampling: str = REQUIRED,
                               accountant: str = "rdp", tol: float = 1e-4,
                               releases=()) -> float:
    """Smallest sigma (within ``tol``) whose epsilon, with the one-off
    Gaussian ``releases`` composed in, is at most ``target_epsilon``, by
    ``dp_accounting.calibrate_dp_mechanism``. ``sampling`` ("poisson" or
    "fixed", the sampler that will draw the batches) must be given: TypeError
    otherwise. A ValueError when the releases alone spend the budget."""
    _check(None, sample_rate, steps, delta, sampling, accountant,
           "calibrate_noise_multiplier")
    releases = _check_releases(releases)
    if releases:
        acc = _accountant(sampling, accountant)
        acc.compose(dpsgd_event(1e6, sample_rate, steps, sampling=sampling, releases=releases))
        if acc.get_epsilon(delta) >= target_epsilon:
            raise ValueError(f"the releases {releases} alone spend epsilon >= "
                             f"{target_epsilon} at delta={delta}; no noise multiplier can "
                             "meet the target")
    if not isinstance(target_epsilon, numbers.Real) or not math.isfinite(target_epsilon) \
            or target_epsilon <= 0:
        raise ValueError(f"target_epsilon must be a finite number > 0, got "
                         f"{target_epsilon!r}")
    def calibrate(accountant, bracket):
        return float(dp_accounting.calibrate_dp_mechanism(
            lambda: _accountant(sampling, accountant),
            lambda sigma: dpsgd_event(sigma, sample_rate, steps, sampling=sampling,
                                      releases=releases),
            target_epsilon, delta, bracket_interval=bracket, tol=tol))

    rdp_sigma = calibrate("rdp", dp_accounting.LowerEndpointAndGuess(1e-3, 1.0))
    if accountant == "rdp":
        return rdp_sigma
    # PLD is tighter than RDP, so the RDP sigma meets the target and bounds the
    # search from above; a PLD at a tiny sigma would need a huge grid.
    return calibrate("pld", dp_accounting.ExplicitBracketInterval(
        rdp_sigma / 4, rdp_sigma))
