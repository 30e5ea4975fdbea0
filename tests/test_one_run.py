"""The one-run ε lower bound (Steinke, Nasr, Jagielski 2023) against values computed
another way: exact sums of binomial terms in rational arithmetic, and closed forms."""

from __future__ import annotations

import math
import random
from fractions import Fraction

import numpy as np
import pytest

from common.privacy.one_run import (CONFIDENCE, audit, auc, counts, grid, guesses,
                                    lower_bound, p_value)


def exact_p_value(m: int, r: int, v: int, eps: float, delta: float) -> float:
    """The theorem's p-value by direct sums over binomial terms, in fractions."""
    p = Fraction(math.exp(eps)) / (1 + Fraction(math.exp(eps)))
    pmf = [math.comb(r, k) * p ** k * (1 - p) ** (r - k) for k in range(r + 1)]
    tail = sum(pmf[v:], Fraction(0))
    alpha = max((sum(pmf[v - i:v], Fraction(0)) / i for i in range(1, v + 1)),
                default=Fraction(0))
    return float(min(Fraction(1), tail + 2 * m * Fraction(delta) * alpha))


@pytest.mark.parametrize("m,r,v,eps,delta", [
    (10, 10, 10, 1.0, 0.0), (10, 6, 5, 0.5, 1e-3), (40, 30, 24, 2.0, 1e-5),
    (40, 40, 20, 0.0, 1e-2), (60, 20, 19, 3.0, 1e-4), (25, 5, 1, 0.2, 0.05)])
def test_p_value_matches_exact_sums(m, r, v, eps, delta):
    assert p_value(m, r, v, eps, delta) == pytest.approx(exact_p_value(m, r, v, eps, delta),
                                                         rel=1e-9, abs=1e-15)


@pytest.mark.parametrize("r", [5, 20, 100, 1000])
def test_all_guesses_right_without_delta_gives_the_closed_form(r):
    # δ = 0, v = r: the p-value is p^r, so the bound is logit(β^(1/r))
    beta = 1 - CONFIDENCE
    b = beta ** (1 / r)
    assert lower_bound(r, r, r, 0.0) == pytest.approx(math.log(b / (1 - b)), abs=1e-6)


def test_the_bound_is_the_largest_refuted_epsilon():
    m, r, v, delta = 1000, 200, 170, 1e-5
    bound = lower_bound(m, r, v, delta)
    assert 0 < bound < 5
    assert p_value(m, r, v, bound - 1e-3, delta) < 1 - CONFIDENCE
    assert p_value(m, r, v, bound + 1e-3, delta) >= 1 - CONFIDENCE


def test_delta_and_chance_level_guessing_weaken_the_bound():
    assert lower_bound(1000, 200, 170, 1e-3) < lower_bound(1000, 200, 170, 1e-6)
    assert lower_bound(1000, 200, 100, 1e-5) == 0.0  # a coin does this well
    assert lower_bound(1000, 0, 0, 1e-5) == 0.0
    with pytest.raises(ValueError):
        p_value(10, 5, 6, 1.0, 0.0)


def test_auc_is_the_share_of_ordered_pairs():
    rng = random.Random(3)
    scores = [rng.choice([0.0, 0.5, 1.0, rng.random()]) for _ in range(60)]
    inside = [rng.random() < 0.5 for _ in range(60)]
    pairs = [(a, b) for a, i in zip(scores, inside) if i for b, j in zip(scores, inside) if not j]
    brute = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in pairs) / len(pairs)
    assert auc(scores, inside) == pytest.approx(brute)
    assert math.isnan(auc([1.0, 2.0], [True, True]))


def test_guesses_take_the_extremes_and_count_right_ones():
    scores = np.array([0.9, 0.1, 0.5, 0.8, 0.2, 0.3])
    g = guesses(scores, 2, 2)
    assert g.tolist() == [1, -1, 0, 1, -1, 0]
    assert counts(g, np.array([True, False, True, False, True, False])) == (4, 2)
    assert grid(1000) == [(50, 50), (100, 100), (200, 200), (500, 500)]


def test_perfectly_separated_scores_reach_the_ceiling_and_random_ones_do_not():
    rng = np.random.default_rng(0)
    inside = rng.random(1000) < 0.5
    perfect = audit(inside.astype(float) + rng.random(1000) * 0.1, inside, 1e-5)
    # every guess right, each candidate tested at β / 4 for the choice among them
    assert perfect.correct == perfect.guesses == 2 * perfect.k_in
    assert perfect.epsilon == pytest.approx(lower_bound(1000, perfect.guesses,
                                                        perfect.guesses, 1e-5,
                                                        (1 - CONFIDENCE) / 4))
    assert perfect.epsilon > 4 and perfect.auc == 1.0
    blind = audit(rng.random(1000), inside, 1e-5)
    assert blind.epsilon < 0.3 and abs(blind.auc - 0.5) < 0.06
