"""Accounting reference values, the PRV bound, and the noise calibration's promise."""

from __future__ import annotations

import warnings

import pytest
from hypothesis import given, settings, strategies as st
from opacus.accountants import PRVAccountant, RDPAccountant

from common.privacy import accounting
from common.privacy.verify import pld_epsilon

DEMO = (0.61, 0.058, 16)  # the demo's mechanism: few steps, little noise


def test_opacus_reference_value_through_our_accounting():
    # Opacus's own test: σ=1.5, q=0.04, 2250 steps, δ=1e-5 -> RDP ε ≈ 7.32911117143
    rdp = accounting.epsilon([(1.5, 0.04, 2250)], 1e-5, "rdp")
    assert rdp == pytest.approx(7.32911117143, abs=1e-7)
    assert accounting.epsilon([(1.5, 0.04, 2250)], 1e-5) == pytest.approx(6.7791, abs=2e-3)


def test_prv_is_tighter_than_rdp_on_the_demo_mechanism():
    assert accounting.epsilon([DEMO], 1e-5, "rdp") == pytest.approx(8.0212, abs=1e-3)
    assert accounting.epsilon([DEMO], 1e-5, "prv") == pytest.approx(6.6551, abs=2e-3)


def test_our_values_are_the_opacus_accountants_values():
    history = [(1.0, 0.05, 20), (1.1, 0.05, 30)]
    rdp, prv = RDPAccountant(), PRVAccountant()
    rdp.history, prv.history = list(history), list(history)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert accounting.epsilon(history, 1e-5, "rdp") == pytest.approx(
            rdp.get_epsilon(1e-5), rel=1e-12)
        assert accounting.epsilon(history, 1e-5, "prv") == pytest.approx(
            prv.get_epsilon(1e-5), abs=1e-9)


@settings(max_examples=40, deadline=None)
@given(q=st.one_of(st.just(1.0), st.floats(1e-4, 1.0)), sigma=st.floats(0.3, 20.0),
       steps=st.integers(1, 5000), numpy_floats=st.booleans(),
       orders=st.sampled_from([RDPAccountant.DEFAULT_ALPHAS, [1.5, 2, 32.0, 256]]))
def test_kept_rdp_is_opacus_own_float_for_float(q, sigma, steps, numpy_floats, orders):
    import numpy as np
    from opacus.accountants.analysis import rdp as rdp_analysis

    opacus_own = rdp_analysis.compute_rdp.fedcare_kept  # what Opacus ships
    if numpy_floats:
        q, sigma = np.float64(q), np.float64(sigma)
    for _ in range(2):  # computed, then kept
        kept = rdp_analysis.compute_rdp(q=q, noise_multiplier=sigma, steps=steps, orders=orders)
        own = opacus_own(q=q, noise_multiplier=sigma, steps=steps, orders=orders)
        assert kept.dtype == own.dtype and np.array_equal(kept, own, equal_nan=True)
    kept[0] = -1.0  # a caller's array is its own: the kept vector does not change
    assert np.array_equal(rdp_analysis.compute_rdp(
        q=q, noise_multiplier=sigma, steps=steps, orders=orders), own, equal_nan=True)


def test_prv_epsilon_with_kept_rdp_is_opacus_own(monkeypatch):
    from opacus.accountants.analysis import rdp as rdp_analysis

    history = [(5.0, 1.0, 1), (5 / 3 ** 0.5, 1.0, 3), (1.6367, 0.1152, 300)]  # the demo's
    kept = accounting._prv_epsilon(history, 1e-5)
    monkeypatch.setattr(rdp_analysis, "compute_rdp", rdp_analysis.compute_rdp.fedcare_kept)
    assert accounting._prv_epsilon(history, 1e-5) == kept  # the same float


@pytest.mark.parametrize("mechanism", [DEMO, (1.0, 0.05, 100), (0.8, 0.01, 1000)])
def test_prv_claim_lies_within_its_stated_bound_of_the_true_epsilon(mechanism):
    """ε ≤ eps_upper ≤ ε(δ - 2·delta_error) + 2·eps_error; the true ε is taken from
    dp_accounting's PLD, which overstates it by under 5e-4 here (pessimistic)."""
    claim = accounting.epsilon([mechanism], 1e-5)
    pld = pld_epsilon((mechanism,), 1e-5)
    assert pld - 5e-4 <= claim <= pld + 2 * accounting.PRV_EPS_ERROR + 5e-3


@pytest.mark.parametrize("kind", ["prv", "rdp"])
def test_a_history_is_a_multiset(kind):
    whole = accounting.epsilon([(1.1, 0.05, 30), (1.2, 0.05, 5)], 1e-5, kind)
    pieces = accounting.epsilon([(1.1, 0.05, 10), (1.2, 0.05, 5), (1.1, 0.05, 20)], 1e-5, kind)
    assert pieces == whole
    assert accounting.epsilon([], 1e-5, kind) == 0.0
    assert accounting.epsilon([(1.0, 0.05, 0)], 1e-5, kind) == 0.0


def test_names_and_accountants_by_kind():
    assert accounting.ACCOUNTANT_NAMES == {"prv": "opacus-prv", "rdp": "opacus-rdp"}
    assert accounting.accountant_name("prv") == "opacus-prv"
    assert isinstance(accounting.make_accountant([]), PRVAccountant)
    rdp = accounting.make_accountant([(1.0, 0.1, 3), (2.0, 0.1, 0)], "rdp")
    assert isinstance(rdp, RDPAccountant) and rdp.history == [(1.0, 0.1, 3)]
    for call in (lambda: accounting.accountant_name("gdp"),
                 lambda: accounting.epsilon([DEMO], 1e-5, "gdp"),
                 lambda: accounting.calibrate_noise([], [(0.1, 5)], 1.0, 1e-5, "gdp")):
        with pytest.raises(ValueError, match=r"privacy.accountant must be one of \['prv', 'rdp'\]"):
            call()


def test_accountants_print_nothing_a_user_cannot_act_on():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any warning fails the test
        # both warn, bare, that the best RDP order is the grid's edge (PRV sizes its
        # domain by RDP): the value is still a valid bound, and nothing is to be done
        accounting.epsilon([(50.0, 1.0, 1)], 1e-5, "rdp")
        accounting.epsilon([(5.0, 0.005, 1)], 1e-5, "prv")


def test_prv_falls_back_to_the_rdp_bound_where_its_numerics_give_up():
    history = [(1.0, 0.05, 100)]
    assert accounting.epsilon(history, 1e-15) == accounting.epsilon(history, 1e-15, "rdp")


@settings(max_examples=12, deadline=None)
@given(target=st.floats(0.5, 20.0), q=st.floats(0.005, 0.5), steps=st.integers(1, 300),
       prior_steps=st.integers(0, 100))
def test_calibrated_noise_never_exceeds_the_target(target, q, steps, prior_steps):
    prior = [(2.0, q, prior_steps)] if prior_steps else []
    if accounting.epsilon(prior, 1e-5, "rdp") >= target:
        with pytest.raises(accounting.BudgetError):
            accounting.calibrate_noise(prior, [(q, steps)], target, 1e-5, "rdp")
        return
    try:
        sigma = accounting.calibrate_noise(prior, [(q, steps)], target, 1e-5, "rdp")
    except accounting.BudgetError:
        return  # legitimately impossible: refusing is the safe answer
    assert accounting.epsilon([*prior, (sigma, q, steps)], 1e-5, "rdp") <= target
    # and it is not wastefully noisy: 2% less noise would overshoot (or hit the floor)
    assert accounting.epsilon([*prior, (sigma * 0.98, q, steps)], 1e-5, "rdp") > target \
        or sigma < 0.05


@pytest.mark.parametrize("prior, schedule, target", [
    ([], [(0.058, 16)], 8.0),
    ([(1.0, 0.05, 100)], [(0.05, 50)], 8.0),
    ([], [(0.1, 200), (0.05, 16)], 3.0),
])
def test_prv_calibration_fits_exactly_what_will_be_claimed(prior, schedule, target, monkeypatch):
    sigma_rdp = accounting.calibrate_noise(prior, schedule, target, 1e-5, "rdp")
    calls = []
    prv = accounting._prv_epsilon
    monkeypatch.setattr(accounting, "_prv_epsilon", lambda *a: calls.append(a) or prv(*a))
    sigma = accounting.calibrate_noise(prior, schedule, target, 1e-5)
    assert len(calls) <= 6  # bracketed by RDP: a handful of PRV evaluations, not ~15
    # the claim after the run: the same steps, cut into rounds as the ledger records them
    claimed = [*prior, *((sigma, q, n // 2) for q, n in schedule),
               *((sigma, q, n - n // 2) for q, n in schedule)]
    assert accounting.epsilon(claimed, 1e-5) <= target
    assert sigma < sigma_rdp  # PRV's tighter ε buys less noise
    assert accounting.epsilon([*prior, *((sigma * (1 - 2e-3), q, n) for q, n in schedule)],
                              1e-5) > target  # and no more noise than needed


def test_prv_fits_a_round_that_rdp_must_refuse():
    """RDP already puts the demo mechanism above ε=8; PRV puts it at 6.66."""
    with pytest.raises(accounting.BudgetError, match="already spent"):
        accounting.calibrate_noise([DEMO], [(0.058, 2)], 8.0, 1e-5, "rdp")
    sigma = accounting.calibrate_noise([DEMO], [(0.058, 2)], 8.0, 1e-5, "prv")
    assert accounting.epsilon([DEMO, (sigma, 0.058, 2)], 1e-5) <= 8.0


def test_a_schedule_of_segments_is_calibrated_as_a_whole():
    schedule = [(0.1, 200), (0.05, 16)]
    sigma = accounting.calibrate_noise([], schedule, 8.0, 1e-5, "rdp")
    history = [(sigma, q, n) for q, n in schedule]
    assert accounting.epsilon(history, 1e-5, "rdp") <= 8.0
    assert sigma > accounting.calibrate_noise([], schedule[1:], 8.0, 1e-5, "rdp")


@pytest.mark.parametrize("kind", ["prv", "rdp"])
def test_spent_budget_refuses_with_a_reason(kind):
    with pytest.raises(accounting.BudgetError, match="already spent"):
        accounting.calibrate_noise([(0.5, 0.5, 1000)], [(0.05, 10)], 1.0, 1e-5, kind)
