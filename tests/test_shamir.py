"""SecAgg+'s secret sharing (common/shamir.py): the field is pycryptodome's GF(2^128),
shares made on either side recombine on the other, and too few shares do not."""

from __future__ import annotations

import importlib
import os
import random

import pytest
from Crypto.Protocol.SecretSharing import _Element
from flwr.common.secure_aggregation.crypto import shamir as flower
from hypothesis import given, settings
from hypothesis import strategies as st

from common import shamir

element = st.integers(min_value=0, max_value=2 ** 128 - 1)


@settings(max_examples=300, deadline=None)
@given(element, element)
def test_the_product_is_pycryptodomes_gf_2_128(a, b):
    assert shamir.mul(a, b) == int(_Element(a) * _Element(b)) == shamir.mul(b, a)


@settings(max_examples=200, deadline=None)
@given(element.filter(bool))
def test_the_inverse_inverts(a):
    assert shamir.mul(a, shamir.inverse(a)) == 1
    assert shamir.inverse(a) == int(_Element(a).inverse())


def test_zero_has_no_inverse():
    with pytest.raises(ValueError):
        shamir.inverse(0)


# a SecAgg+ mask seed (32 bytes) and a site's private key (about 300 bytes), at the
# (shares, threshold) that fedcare's defaults give at 4, 16 and 64 sites
@pytest.mark.parametrize("size", [32, 306])
@pytest.mark.parametrize("num,threshold", [(4, 3), (16, 11), (64, 43)])
def test_shares_recombine_across_flower_and_fedcare(size, num, threshold):
    secret, rng = os.urandom(size), random.Random(size * num)
    ours, theirs = shamir.create_shares(secret, threshold, num), \
        flower.create_shares(secret, threshold, num)
    assert [len(s) for s in ours] == [len(s) for s in theirs]  # the same layout
    assert [s[:4] for s in ours] == [s[:4] for s in theirs]    # the same indices
    for made, combine in ((ours, flower.combine_shares), (theirs, shamir.combine_shares),
                          (ours, shamir.combine_shares)):
        assert combine(made) == secret  # all of them, as Flower's unmask passes them
        assert combine(rng.sample(made, threshold)) == secret  # any threshold of them
    assert ours != theirs  # fresh random coefficients each time


def _recovers(shares: list[bytes], secret: bytes) -> bool:
    try:
        return shamir.combine_shares(shares) == secret
    except ValueError:  # not a padded secret: the usual outcome of wrong shares
        return False


def test_fewer_shares_than_the_threshold_give_nothing_back():
    secret = os.urandom(32)
    shares = shamir.create_shares(secret, 5, 9)
    assert _recovers(shares[:5], secret)
    assert not any(_recovers(shares[:k], secret) for k in (1, 3, 4))


def test_shares_of_two_sharings_do_not_mix():
    secret = os.urandom(32)
    a, b = shamir.create_shares(secret, 3, 5), shamir.create_shares(secret, 3, 5)
    assert a[0] != b[0]  # fresh coefficients: one sharing says nothing of the other
    assert _recovers(a[:3], secret) and _recovers(b[:3], secret)
    assert not _recovers([a[0], a[1], b[2]], secret)


@pytest.mark.parametrize("shares,why", [
    ([], "no shares"),
    ([b"\x01\x00\x00\x00" + bytes(16), b"\x01\x00\x00\x00" + bytes(16)], "distinct"),
    ([b"\x00\x00\x00\x00" + bytes(16), b"\x01\x00\x00\x00" + bytes(16)], "non-zero"),
    ([b"\x01\x00\x00\x00" + bytes(16), b"\x02\x00\x00\x00" + bytes(32)], "16-byte"),
    ([b"\x01\x00\x00\x00" + bytes(15)], "16-byte"),
])
def test_malformed_shares_are_refused(shares, why):
    with pytest.raises(ValueError, match=why):
        shamir.combine_shares(shares)


def test_thresholds_outside_the_shares_are_refused():
    for threshold, num in ((0, 3), (4, 3)):
        with pytest.raises(ValueError):
            shamir.create_shares(b"x", threshold, num)


MOD = "flwr.client.mod.secure_aggregation.secaggplus_mod"
WORKFLOW = "flwr.server.workflow.secure_aggregation.secaggplus_workflow"


def test_the_apps_put_fedcares_sharing_into_flowers_secagg_plus():
    import client.app  # noqa: F401  (importing an app installs it)
    import server.app  # noqa: F401

    assert importlib.import_module(MOD).create_shares is shamir.create_shares
    assert importlib.import_module(WORKFLOW).combine_shares is shamir.combine_shares


def test_install_refuses_a_flower_whose_secagg_plus_looks_elsewhere(monkeypatch):
    monkeypatch.setattr(importlib.import_module(WORKFLOW), "combine_shares", lambda s: b"")
    with pytest.raises(RuntimeError, match="not Flower's"):
        shamir.install("server")
