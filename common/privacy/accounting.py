"""Privacy accounting: pure maths over a mechanism history.

A history is the list of ``(noise_multiplier, sample_rate, steps)`` of every
Poisson-subsampled Gaussian step ever released on one site's data, exactly the
state of an Opacus accountant (PRV and RDP keep the same history). The ε of a site
is the ε of its whole history, never of one round.

Two accountants, chosen by ``privacy.accountant``:

* ``"prv"``: Opacus's PRVAccountant (Gopi et al. 2021, numerical composition of
  privacy random variables). The value used is its ``eps_upper`` with
  eps_error = PRV_EPS_ERROR and delta_error = PRV_DELTA_ERROR·δ. Their Theorem 5.5
  (as Opacus implements it) bounds the true privacy curve δ(ε) by the discretised one
  δ̃: δ̃(ε + eps_error) − delta_error ≤ δ(ε) ≤ δ̃(ε − eps_error) + delta_error. Hence
  ``eps_upper = ε̃(δ − delta_error) + eps_error`` satisfies δ(eps_upper) ≤ δ: the
  mechanism is (eps_upper, δ)-DP, and
  ε(δ) ≤ eps_upper ≤ ε(δ − 2·delta_error) + 2·eps_error,
  i.e. it overstates the exact ε by at most 0.02 plus the tiny change of ε when δ
  shrinks by 0.2% (measured: about 0.010 above a fine PLD; docs/accounting.md).
* ``"rdp"``: Opacus's RDPAccountant on its default orders: an upper bound too, looser
  (8.02 instead of 6.66 for σ=0.61, q=0.058, 16 steps, δ=1e-5).

Both are pure functions of the multiset of steps: a history is merged by (σ, q)
before it is evaluated, so the order and the cutting of a history into rounds never
change its ε.
"""

from __future__ import annotations

import math
import warnings
from collections import Counter
from contextlib import contextmanager
from functools import lru_cache
from typing import Callable, Iterable, Literal, Sequence

import numpy as np
from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.analysis import rdp as rdp_analysis

from common.privacy.group import group_privacy, per_record_for_group  # noqa: F401 - re-exported

History = list[tuple[float, float, int]]
Schedule = Sequence[tuple[float, int]]  # (sample_rate, steps) segments, all at one σ
Kind = Literal["prv", "rdp"]

ACCOUNTANT_NAMES: dict[str, str] = {"prv": "opacus-prv", "rdp": "opacus-rdp"}
PRV_EPS_ERROR = 0.01  # Opacus's default eps_error, passed explicitly: the bound we state
PRV_DELTA_ERROR = 1e-3  # delta_error as a fraction of δ (Opacus's default δ/1000)
RDP_ORDERS = tuple(RDPAccountant.DEFAULT_ALPHAS)
SIGMA_MAX = 1e3


def _keeping(compute_rdp: Callable) -> Callable:
    """Opacus's `compute_rdp`, keeping each (q, σ, orders)'s per-step RDP: it returns
    `per-step RDP × steps`, so the kept vector gives the very floats it would. Opacus's
    PRV computes its domain from RDP on every call (ε at each release: twice a
    mechanism, ~40% of a PRV evaluation at fractional orders), of mechanisms a site
    repeats every round."""
    @lru_cache(maxsize=4096, typed=True)  # typed: a numpy float is computed as one
    def per_step(q: float, sigma: float, orders: tuple, _types: tuple) -> np.ndarray:
        rdp = compute_rdp(q=q, noise_multiplier=sigma, steps=1, orders=list(orders))
        rdp.flags.writeable = False
        return rdp

    def kept(*, q, noise_multiplier, steps, orders):
        if isinstance(orders, float):
            return compute_rdp(q=q, noise_multiplier=noise_multiplier, steps=steps,
                               orders=orders)
        orders = tuple(orders)
        return per_step(q, noise_multiplier, orders, tuple(map(type, orders))) * steps

    kept.fedcare_kept = compute_rdp
    return kept


if not hasattr(rdp_analysis.compute_rdp, "fedcare_kept"):  # Opacus's own RDP accountant
    rdp_analysis.compute_rdp = _keeping(rdp_analysis.compute_rdp)  # and PRV's domain use it


class BudgetError(RuntimeError):
    """Training would exceed, or cannot establish, the privacy budget: refuse."""


def accountant_name(kind: str) -> str:
    """The name a ledger entry records for claims computed with `kind`."""
    return ACCOUNTANT_NAMES[_kind(kind)]


def make_accountant(history: Iterable[tuple[float, float, int]], accountant: Kind = "prv"):
    """An Opacus accountant (PRVAccountant or RDPAccountant) that continues `history`."""
    acc = PRVAccountant() if _kind(accountant) == "prv" else RDPAccountant()
    acc.history = [(float(s), float(q), int(n)) for s, q, n in history if n > 0]
    return acc


def epsilon(history: Sequence[tuple[float, float, int]], delta: float,
            accountant: Kind = "prv") -> float:
    """ε(δ) of the composition of every mechanism in `history` (0 if empty): an upper
    bound on the true ε. Under "prv", where PRV's numerics give up (δ so small that
    float error dominates its mesh, ~1e-13, or ε unbounded on its domain) the RDP bound,
    larger but still valid, is returned instead."""
    return _epsilon_of(tuple(_merged(history)), float(delta), _kind(accountant))


@lru_cache(maxsize=1024)
def _epsilon_of(steps: tuple[tuple[float, float, int], ...], delta: float, kind: str) -> float:
    """`epsilon` of merged, sorted steps: a pure function of them, kept, so that a site
    computes each once (the ε it projects before a round is the one it claims after)."""
    if not steps:
        return 0.0
    if kind == "prv":
        prv = _prv_epsilon(list(steps), delta)
        if prv is not None:
            return prv
    return _rdp_epsilon(_rdp(steps), delta)


def sample_rate(batch_size: int, num_examples: int) -> float:
    if num_examples <= 0:
        raise BudgetError("the site has no training records, so no sampling rate exists")
    return min(1.0, batch_size / num_examples)


def calibrate_noise(prior: History, schedule: Schedule, target_epsilon: float,
                    delta: float, accountant: Kind = "prv", tol: float = 1e-3) -> float:
    """Smallest noise multiplier (within `tol`, relative above 1) so that prior + every
    segment of `schedule` at that σ stays within `target_epsilon` by `accountant`; the
    returned σ's ε is at most the target. Raises BudgetError if no σ does.

    PRV costs ~0.4 s an evaluation, RDP ~0.01-0.2 s. RDP's ε is above PRV's (by more
    than PRV's +0.01 in every regime fedcare runs), so σ_prv ≤ σ_rdp: RDP is solved
    first and PRV starts from its answer, needing about five PRV evaluations."""
    kind = _kind(accountant)
    for q, _ in schedule:
        if not 0 < q <= 1:
            raise BudgetError(f"sample rate must be in (0, 1] (got {q})")
    prior = _merged(prior)
    prior_rdp = _rdp(prior)

    def rdp_at(sigma: float) -> float:
        return _rdp_epsilon(prior_rdp + _rdp([(sigma, q, n) for q, n in schedule]), delta)

    def prv_at(sigma: float) -> float:
        return epsilon([*prior, *((sigma, q, n) for q, n in schedule)], delta, "prv")

    spent = _rdp_epsilon(prior_rdp, delta) if prior else 0.0
    found = _smallest_sigma(rdp_at, target_epsilon, tol, 1.0, spent) \
        if spent < target_epsilon else None
    # PRV from σ_rdp and RDP's slope there. Where RDP cannot fit, PRV still may, unless
    # RDP's prior is far beyond the target (PRV was never below half of RDP; and where
    # ε is in the hundreds one PRV evaluation takes tens of seconds).
    if kind == "prv" and (found or spent <= 2 * target_epsilon):
        spent = epsilon(prior, delta, "prv")
        start, slope = found or (1.0, 2.0)
        found = _smallest_sigma(prv_at, target_epsilon, tol, start, spent, slope) \
            if spent < target_epsilon else None
    else:
        kind = "rdp"  # the ε the refusal below reports
    if found is None:
        steps = sum(n for _, n in schedule)
        raise BudgetError(
            f"{steps} more steps cannot fit in ε={target_epsilon:.4g} at any noise level "
            f"(already spent ε={spent:.4g} by {kind.upper()} at δ={delta:g})")
    return found[0]


def _smallest_sigma(eps_at: Callable[[float], float], target: float, tol: float,
                    start: float, floor: float, slope: float = 2.0
                    ) -> tuple[float, float] | None:
    """(σ, slope): the smallest σ in (0, SIGMA_MAX] with eps_at(σ) ≤ target, to within
    tol·max(1, σ), and -df/d ln σ there; None if even SIGMA_MAX does not fit. `floor` <
    target is ε as σ → ∞ (the prior's); `slope` is a first guess of -df/d ln σ.

    f(σ) = ln(ε(σ) - floor) - ln(target - floor) is close to linear in ln σ (the new
    steps' share of ε falls like a power of σ). Each probe is where the line through
    the bracket crosses 0 (Illinois: an end kept twice counts half; before both ends
    exist, the line through the last two probes, or `slope` and σ ×2 at most), moved
    0.4 of the tolerance towards the side the last probe did not land on: when the
    estimate is good, two probes close the bracket."""
    def f(eps: float) -> float:
        return math.log(max(eps - floor, 1e-300)) - math.log(target - floor)

    lo = hi = last = None  # (ln σ, f): lo does not fit, hi fits; last: the probe before
    weight, probe = 1.0, min(start, SIGMA_MAX)
    for count in range(60):
        point = (math.log(probe), f(eps_at(probe)))
        fits = point[1] <= 0
        if not fits and probe >= SIGMA_MAX:
            return None
        same_side = last is not None and (last[1] <= 0) == fits
        weight = weight / 2 if same_side else 1.0  # on the end that was not replaced
        lo, hi = (lo, point) if fits else (point, hi)
        if hi and lo and math.exp(hi[0]) - math.exp(lo[0]) <= tol * max(1.0, math.exp(lo[0])):
            return math.exp(hi[0]), (lo[1] - hi[1]) / (hi[0] - lo[0])
        if hi and lo:
            f_lo, f_hi = (lo[1] * weight, hi[1]) if fits else (lo[1], hi[1] * weight)
            x = lo[0] + (hi[0] - lo[0]) * f_lo / (f_lo - f_hi)
            low, high = math.exp(lo[0]), math.exp(hi[0])
            low, high = low + (high - low) / 64, high - (high - low) / 64
            if count >= 20:  # a safeguard the smooth ε curves never need: bisect
                x, fits = math.log((low + high) / 2), None
        else:  # all probes on one side so far: extrapolate, and step past the target
            guessed = last is None or last[0] == point[0]  # else: -df/d ln σ measured
            slope = slope if guessed else (last[1] - point[1]) / (point[0] - last[0])
            reach = math.log(2.0 if guessed else 8.0)  # a guessed slope moves σ ×2 at most
            x = point[0] + max(-reach, min(reach, point[1] / min(max(slope, 0.25), 8.0)))
            low, high = (math.exp(hi[0]) / 64, math.exp(hi[0])) if hi else (
                math.exp(lo[0]), SIGMA_MAX)
        last = point
        step = 0.0 if fits is None else 0.4 * tol * max(1.0, math.exp(x)) * (-1 if fits else 1)
        probe = min(max(math.exp(x) + step, low), high)
    return (math.exp(hi[0]), slope) if hi else None


def _kind(kind: str) -> str:
    if kind not in ACCOUNTANT_NAMES:
        raise ValueError(f"privacy.accountant must be one of {sorted(ACCOUNTANT_NAMES)} "
                         f"(got {kind!r})")
    return kind


def _merged(history: Iterable[tuple[float, float, int]]) -> History:
    counts: Counter = Counter()
    for s, q, n in history:
        if n > 0:
            counts[float(s), float(q)] += int(n)
    return [(s, q, n) for (s, q), n in sorted(counts.items())]


def _rdp(steps: Iterable[tuple[float, float, int]]) -> np.ndarray:
    total = np.zeros(len(RDP_ORDERS))
    with _quiet():
        for s, q, n in steps:
            total = total + rdp_analysis.compute_rdp(
                q=q, noise_multiplier=s, steps=n, orders=RDP_ORDERS)
    return total


def _rdp_epsilon(rdp: np.ndarray, delta: float) -> float:
    """What RDPAccountant.get_epsilon returns for a history whose RDP is `rdp`."""
    with _quiet():  # "optimal order is the largest alpha": ε is then still a bound
        eps, _ = rdp_analysis.get_privacy_spent(orders=RDP_ORDERS, rdp=rdp, delta=delta)
    return float(eps)


def _prv_epsilon(steps: History, delta: float) -> float | None:
    acc = make_accountant(steps, "prv")
    try:
        with _quiet():  # overflow in the PRV density's tails, quadrature accuracy notes
            eps = float(acc.get_epsilon(delta, eps_error=PRV_EPS_ERROR,
                                        delta_error=PRV_DELTA_ERROR * delta))
    except (ValueError, RuntimeError):  # δ too small for the mesh, or a mean mismatch
        return None
    return eps if math.isfinite(eps) else None


@contextmanager
def _quiet():
    """Silence the accountants' warnings and numpy's floating-point notes: none of them
    is something a user can act on, and none makes a returned ε invalid."""
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        yield
