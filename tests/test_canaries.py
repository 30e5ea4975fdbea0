"""Canaries of the empirical audit: what a site receives, and how the operator's view
of the updates scores them."""

from __future__ import annotations

import json

import numpy as np
import pytest

from common.data import DataError, SiteData, TextDataset
from common.privacy import canaries
from common.privacy.one_run import auc
from common.privacy.canary_scores import UpdateLog

LABELS = ("a", "b", "c")


def _site_data() -> SiteData:
    train = TextDataset(("x one", "x two"), (0, 1), ("g1", "g2"), LABELS)
    val = TextDataset(("v one",), (2,), ("g3",), LABELS)
    return SiteData(train, val, "sha256:0")


def test_sites_receive_only_their_included_canaries_in_training(tmp_path):
    rng = np.random.default_rng(0)
    made = canaries.make(6, ["alpha", "beta", "gamma"], LABELS, 12, ["site0", "site1"], rng)
    assert [c.kind for c in made] == ["input"] * 6 + ["gradient"] * 6
    assert len({c.coordinate for c in made if c.kind == "gradient"}) == 6
    assert {c.site for c in made} == {"site0", "site1"}
    included = np.array([True, False] * 6)
    canaries.write_site_files(tmp_path, made, included)
    sent = json.loads((tmp_path / "site0.json").read_text())
    assert [r["text"] for r in sent] == [c.text for c, i in zip(made, included)
                                         if i and c.site == "site0"]

    data = canaries.add_to_site(_site_data(), tmp_path, "site0")
    assert data.train.texts[:2] == ("x one", "x two") and data.val == _site_data().val
    assert data.train.texts[2:] == tuple(r["text"] for r in sent)
    assert data.fingerprint != "sha256:0"
    rows = dict(data.gradient_canaries)
    for row, canary in zip(range(2, len(data.train)), sent):
        assert (row in rows) == (canary["kind"] == "gradient")
        if row in rows:
            assert rows[row] == canary["coordinate"]
    assert canaries.add_to_site(_site_data(), tmp_path, "site9") == _site_data()


def test_bad_canary_requests_are_refused(tmp_path):
    with pytest.raises(DataError, match="at most 4"):
        canaries.make(5, ["alpha"] * 3, LABELS, 4, ["site0"], np.random.default_rng(0))
    (tmp_path / "site0.json").write_text(json.dumps(
        [{"kind": "input", "text": "t", "label": "zzz", "coordinate": -1, "site": "site0"}]))
    with pytest.raises(DataError, match="not one of the run's labels"):
        canaries.add_to_site(_site_data(), tmp_path, "site0")


def test_the_score_removes_the_pull_of_real_gradients_the_operator_can_predict():
    """Moves = pull in the public features' span + a pull the other sites share +
    noise + the canary's push on included coordinates. Read raw, the pulls hide the
    canaries; the log's score sees them."""
    rng = np.random.default_rng(1)
    labels, features, m = 6, 64, 120
    basis, _ = np.linalg.qr(rng.normal(size=(features, 8)))
    coordinates = rng.choice(labels * features, size=m, replace=False)
    inside = rng.random(m) < 0.5
    log = UpdateLog(0, (labels, features), {"site0": coordinates}, basis)
    raw = np.zeros(m)
    for round_no in (1, 2):
        shared = rng.normal(size=(labels, features)) * 3.0
        for site in ("site0", "site1", "site2"):
            pull = rng.normal(size=(labels, 8)) @ basis.T * 20.0 + shared
            move = pull + rng.normal(size=(labels, features)) * 0.3
            if site == "site0":
                flat = move.reshape(-1)
                flat[coordinates[inside]] -= 1.0  # a step against the canary's gradient
                raw -= flat[coordinates]
            log(round_no, site, [np.zeros((labels, features))], [move])
    assert auc(log.scores("site0"), inside) > 0.95
    assert auc(log.scores("site0"), inside) > auc(raw, inside) + 0.2


def test_the_audit_refuses_what_it_cannot_score_and_always_starts_fresh_sites():
    from common.config import ConfigError, from_mapping
    from simulations.audit import _audited

    cfg = from_mapping({"site": {"state_dir": "/somewhere/lasting"},
                        "simulation": {"num_sites": 4}})
    audited = _audited(cfg, 1000, 2, "noise")
    assert audited.site.state_dir == ""  # one audit's spent ε never carries into the next
    assert audited.federation.secure_aggregation == "off"
    assert not audited.site.release_evaluation
    assert audited.privacy.target_epsilon == 1.0  # a control's claim
    for m, sites, broken, why in [(3, 2, "", "at least 2 per canary site"),
                                  (100, 5, "", "--sites must be"),
                                  (100, 1, "gravity", "--break must be")]:
        with pytest.raises(ConfigError, match=why):
            _audited(cfg, m, sites, broken)
    with pytest.raises(ConfigError, match="privacy.enabled is false"):
        _audited(from_mapping({"privacy": {"enabled": False}}), 100, 1, "")
