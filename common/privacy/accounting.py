"""Privacy accounting: pure math over a mechanism history.

A history is the list of ``(noise_multiplier, sample_rate, steps)`` of every
Poisson-subsampled Gaussian step ever released on one site's data, exactly the
state of an Opacus RDP accountant. The ε of a site is the ε of its whole history,
never of one round.
"""

from __future__ import annotations

import warnings
from typing import Iterable, Sequence

from opacus.accountants import RDPAccountant

History = list[tuple[float, float, int]]

ACCOUNTANT = "opacus-rdp"
SIGMA_MAX = 1e3


class BudgetError(RuntimeError):
    """Training would exceed, or cannot establish, the privacy budget: refuse."""


def make_accountant(history: Iterable[tuple[float, float, int]]) -> RDPAccountant:
    accountant = RDPAccountant()
    accountant.history = [(float(s), float(q), int(n)) for s, q, n in history if n > 0]
    return accountant


def epsilon(history: Sequence[tuple[float, float, int]], delta: float) -> float:
    """ε(δ) of the composition of every mechanism in `history` (0 if empty)."""
    if not any(n > 0 for _, _, n in history):
        return 0.0
    with warnings.catch_warnings():  # calibration probes σ where the best order is the
        warnings.simplefilter("ignore", UserWarning)  # grid's edge; ε is then an upper bound
        return float(make_accountant(history).get_epsilon(delta=delta))


def sample_rate(batch_size: int, num_examples: int) -> float:
    if num_examples <= 0:
        raise BudgetError("the site has no training records, so no sampling rate exists")
    return min(1.0, batch_size / num_examples)


Schedule = Sequence[tuple[float, int]]  # (sample_rate, steps) segments, all at one σ


def calibrate_noise(prior: History, schedule: Schedule, target_epsilon: float,
                    delta: float, tol: float = 1e-3) -> float:
    """Smallest noise multiplier (within `tol`) so that prior + every segment of
    `schedule` at that σ stays within `target_epsilon`. Raises BudgetError if none does."""
    for q, _ in schedule:
        if not 0 < q <= 1:
            raise BudgetError(f"sample rate must be in (0, 1] (got {q})")
    steps = sum(n for _, n in schedule)

    def eps_at(sigma: float) -> float:
        return epsilon([*prior, *((sigma, q, n) for q, n in schedule)], delta)

    if eps_at(SIGMA_MAX) > target_epsilon:
        spent = epsilon(prior, delta)
        raise BudgetError(
            f"{steps} more steps cannot fit in ε={target_epsilon:.4g} at any noise level "
            f"(already spent ε={spent:.4g} at δ={delta:g})")
    high = 1.0
    while eps_at(high) > target_epsilon:  # bracket first: a few doublings, not 20 halvings
        high *= 2
    low = high / 2 if high > 1.0 else 0.0
    while high - low > tol * max(1.0, low):
        mid = (low + high) / 2
        if eps_at(mid) <= target_epsilon:
            high = mid
        else:
            low = mid
    return high
