"""A lower bound on ε from one training run (Steinke, Nasr, Jagielski 2023).

m canaries are each included in training independently with probability ½. After
training an attacker scores every canary and guesses "in" for the k₊ highest scores,
"out" for the k₋ lowest, and abstains on the rest: r = k₊ + k₋ guesses, v of them
correct. If the mechanism is (ε, δ)-DP, then (their Theorem 3.3)

    P[V ≥ v] ≤ P[Binomial(r, p) ≥ v] + 2mδ · max_{i=1..v} P[v > Binomial(r, p) ≥ v - i] / i,
    p = e^ε / (1 + e^ε),

so every ε whose p-value is below β is refuted at confidence 1 - β; the bound is the
largest such ε. The attack here tries a few symmetric guess counts (k₊ = k₋) fixed in
advance and pays for the choice with a union bound: each is tested at β / (their
number), so the bound it reports holds at 1 - β overall. (Searching a finer grid and
reporting the best without paying for it, as is common, overstates the confidence.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from scipy.stats import binom

CONFIDENCE = 0.95
# k₊ = k₋ as shares of m: few confident guesses at the extremes, ..., a guess for each
GUESS_SHARES = (0.05, 0.1, 0.2, 0.5)
EPS_MAX = 50.0


def p_value(m: int, r: int, v: int, epsilon: float, delta: float) -> float:
    """P[at least v of r guesses correct] if the mechanism were (ε, δ)-DP."""
    if not 0 <= v <= r <= m:
        raise ValueError(f"need 0 <= v <= r <= m (got v={v}, r={r}, m={m})")
    if v == 0:
        return 1.0
    p = 1.0 / (1.0 + math.exp(-epsilon))
    tail = float(binom.sf(v - 1, r, p))
    below = np.cumsum(binom.pmf(np.arange(v - 1, -1, -1), r, p))  # P[v > B ≥ v - i]
    alpha = float(np.max(below / np.arange(1, v + 1)))
    return min(1.0, tail + 2 * m * delta * alpha)


def lower_bound(m: int, r: int, v: int, delta: float, beta: float = 1 - CONFIDENCE) -> float:
    """The largest ε refuted at confidence 1 - β by v correct of r guesses (0 if none)."""
    if p_value(m, r, v, 0.0, delta) >= beta:
        return 0.0
    low, high = 0.0, 1.0
    while high < EPS_MAX and p_value(m, r, v, high, delta) < beta:  # p grows with ε
        low, high = high, min(2 * high, EPS_MAX)
    if p_value(m, r, v, high, delta) < beta:  # refuted even at the cap
        return high
    for _ in range(50):
        mid = (low + high) / 2
        low, high = (mid, high) if p_value(m, r, v, mid, delta) < beta else (low, mid)
    return low


@dataclass(frozen=True)
class Audit:
    """The outcome of one guessing attack on one set of canaries."""
    epsilon: float      # the lower bound at CONFIDENCE, the grid's choice paid for
    guesses: int        # r
    correct: int        # v
    k_in: int           # k₊: highest scores guessed "in"
    k_out: int          # k₋: lowest scores guessed "out"
    candidates: int     # the size of the grid the union bound pays for
    auc: float          # score-threshold membership inference, area under ROC


def guesses(scores: Sequence[float], k_in: int, k_out: int) -> np.ndarray:
    """+1 ("in") for the k_in highest scores, -1 ("out") for the k_out lowest, else 0.
    Ties are broken by canary order, so the rule sees only the scores."""
    order = np.argsort(-np.asarray(scores, dtype=float), kind="stable")
    out = np.zeros(len(order), dtype=int)
    out[order[:k_in]] = 1
    if k_out:
        out[order[len(order) - k_out:]] = -1
    return out


def grid(m: int) -> list[tuple[int, int]]:
    """The (k₊, k₋) candidates for m canaries."""
    counts = sorted({max(1, math.floor(s * m)) for s in GUESS_SHARES})
    return [(k, k) for k in counts if 2 * k <= m]


def audit(scores: Sequence[float], included: Sequence[bool], delta: float,
          confidence: float = CONFIDENCE) -> Audit:
    """The best bound over the candidate guess counts, each tested at β / their number."""
    included = np.asarray(included, dtype=bool)
    m = len(included)
    if m == 0 or len(scores) != m:
        raise ValueError("need one score per canary, and at least one canary")
    candidates = grid(m)
    beta = (1 - confidence) / len(candidates)
    best = Audit(0.0, 0, 0, 0, 0, len(candidates), auc(scores, included))
    for k_in, k_out in candidates:
        r, v = counts(guesses(scores, k_in, k_out), included)
        bound = lower_bound(m, r, v, delta, beta)
        if bound > best.epsilon:
            best = Audit(bound, r, v, k_in, k_out, len(candidates), best.auc)
    return best


def counts(guess: np.ndarray, included: np.ndarray) -> tuple[int, int]:
    """(r, v): guesses made, and how many were right."""
    made = guess != 0
    right = (guess == 1) & included | (guess == -1) & ~included
    return int(made.sum()), int(right.sum())


def auc(scores: Sequence[float], included: Sequence[bool]) -> float:
    """P[score of an included canary > score of an excluded one], ties counting ½
    (the Mann-Whitney statistic); NaN when either side is empty."""
    from scipy.stats import rankdata

    scores, included = np.asarray(scores, dtype=float), np.asarray(included, dtype=bool)
    n_in, n_out = int(included.sum()), int((~included).sum())
    if n_in == 0 or n_out == 0:
        return math.nan
    ranks = rankdata(scores)
    return float((ranks[included].sum() - n_in * (n_in + 1) / 2) / (n_in * n_out))
