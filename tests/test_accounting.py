"""Accounting reference values and the noise calibration's promise."""

from __future__ import annotations

import pytest
from hypothesis import given, settings, strategies as st

from common.privacy import accounting


def test_opacus_reference_value_through_our_accounting():
    # Opacus's own test: σ=1.5, q=0.04, 2250 steps, δ=1e-5 -> RDP ε ≈ 7.32911117143
    assert accounting.epsilon([(1.5, 0.04, 2250)], 1e-5) == pytest.approx(7.32911117143, abs=1e-7)


def test_history_in_pieces_equals_history_at_once():
    whole = accounting.epsilon([(1.1, 0.05, 30)], 1e-5)
    pieces = accounting.epsilon([(1.1, 0.05, 10), (1.1, 0.05, 20)], 1e-5)
    assert pieces == pytest.approx(whole, rel=1e-12)
    assert accounting.epsilon([], 1e-5) == 0.0


@settings(max_examples=12, deadline=None)
@given(target=st.floats(0.5, 20.0), q=st.floats(0.005, 0.5), steps=st.integers(1, 300),
       prior_steps=st.integers(0, 100))
def test_calibrated_noise_never_exceeds_the_target(target, q, steps, prior_steps):
    prior = [(2.0, q, prior_steps)] if prior_steps else []
    if accounting.epsilon(prior, 1e-5) >= target:
        with pytest.raises(accounting.BudgetError):
            accounting.calibrate_noise(prior, [(q, steps)], target, 1e-5)
        return
    try:
        sigma = accounting.calibrate_noise(prior, [(q, steps)], target, 1e-5)
    except accounting.BudgetError:
        return  # legitimately impossible: refusing is the safe answer
    assert accounting.epsilon([*prior, (sigma, q, steps)], 1e-5) <= target
    # and it is not wastefully noisy: 2% less noise would overshoot (or hit the floor)
    assert accounting.epsilon([*prior, (sigma * 0.98, q, steps)], 1e-5) > target or sigma < 0.05


def test_a_schedule_of_segments_is_calibrated_as_a_whole():
    schedule = [(0.1, 200), (0.05, 16)]
    sigma = accounting.calibrate_noise([], schedule, 8.0, 1e-5)
    history = [(sigma, q, n) for q, n in schedule]
    assert accounting.epsilon(history, 1e-5) <= 8.0
    assert sigma > accounting.calibrate_noise([], schedule[1:], 8.0, 1e-5)


def test_spent_budget_refuses_with_a_reason():
    with pytest.raises(accounting.BudgetError, match="already spent"):
        accounting.calibrate_noise([(0.5, 0.5, 1000)], [(0.05, 10)], 1.0, 1e-5)
