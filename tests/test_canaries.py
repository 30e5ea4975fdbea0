"""Canaries of the empirical audit: what a site receives, and how the operator's view
of the updates scores them."""

from __future__ import annotations

import dataclasses
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
    assert [tuple(r["texts"]) for r in sent] == [c.texts for c, i in zip(made, included)
                                                 if i and c.site == "site0"]

    data = canaries.add_to_site(_site_data(), tmp_path, "site0")
    assert data.train.texts[:2] == ("x one", "x two") and data.val == _site_data().val
    assert data.train.texts[2:] == tuple(r["texts"][0] for r in sent)
    assert not data.train.patients  # records that name no patients stay so
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
    with pytest.raises(DataError, match="at least one note"):
        canaries.make(2, ["alpha"] * 3, LABELS, 4, ["site0"], np.random.default_rng(0), 0)
    (tmp_path / "site0.json").write_text(json.dumps(
        [{"kind": "input", "texts": ["t"], "label": "zzz", "coordinate": -1, "site": "site0"}]))
    with pytest.raises(DataError, match="not one of the run's labels"):
        canaries.add_to_site(_site_data(), tmp_path, "site0")
    # a file of another shape (one `text`, as files before canary patients had) is named
    for rows, said in [([{"kind": "input", "text": "t", "label": LABELS[0]}],
                        r"site0.json: canary 0 has no notes"),
                       ([{"kind": "gradient", "texts": ["t"], "label": LABELS[0]}],
                        r"site0.json: gradient canary 0 needs an integer `coordinate`"),
                       ({"kind": "input"}, "holds no list of canaries")]:
        (tmp_path / "site0.json").write_text(json.dumps(rows))
        with pytest.raises(DataError, match=said):
            canaries.add_to_site(_site_data(), tmp_path, "site0")


def test_a_canary_patient_is_one_new_patient_whose_notes_share_label_and_coordinate(
        tmp_path):
    """At a site whose records name patients, each canary is a patient of its own: all
    of its notes under one new id (so patient-level sampling takes and clips them
    together), one label, and for a gradient canary one coordinate."""
    from common.patients import rows_by_patient

    made = canaries.make(4, ["alpha", "beta", "gamma", "delta"], LABELS, 12, ["site0"],
                         np.random.default_rng(3), notes=5)
    assert all(len(c.texts) == 5 and len(set(c.texts)) > 1 for c in made)
    canaries.write_site_files(tmp_path, made, np.ones(len(made), dtype=bool))
    base = _site_data()
    base = SiteData(dataclasses.replace(base.train, patients=("p1", "p1")), base.val,
                    base.fingerprint)
    data = canaries.add_to_site(base, tmp_path, "site0")
    train = data.train
    assert len(train) == 2 + 8 * 5 and train.patients[:2] == ("p1", "p1")
    groups = rows_by_patient(train.patients)
    assert groups[0] == (0, 1) and len(groups) == 1 + 8
    assert all(len(g) == 5 for g in groups[1:])
    for group, canary in zip(groups[1:], made):
        assert {train.texts[r] for r in group} == set(canary.texts)
        assert {train.labels[r] for r in group} == {LABELS.index(canary.label)}
    rows = dict(data.gradient_canaries)
    for group, canary in zip(groups[1:], made):
        if canary.kind == "gradient":
            assert {rows[r] for r in group} == {canary.coordinate}
        else:
            assert not set(group) & set(rows)
    # the features and scores of input canaries read every note, canary by canary
    inputs = [c for c in made if c.kind == "input"]
    assert canaries.as_dataset(inputs, LABELS).texts == tuple(t for c in inputs
                                                              for t in c.texts)
    assert canaries.owners(inputs).tolist() == [i for i in range(4) for _ in range(5)]


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
    from simulations.audit import NOTES_PER_PATIENT, _audited, canary_notes

    cfg = from_mapping({"site": {"state_dir": "/somewhere/lasting"},
                        "simulation": {"num_sites": 4}})
    audited = _audited(cfg, 1000, 2, "noise")
    assert audited.site.state_dir == ""  # one audit's spent ε never carries into the next
    assert audited.federation.secure_aggregation == "off"
    assert not audited.site.release_evaluation
    assert audited.privacy.target_epsilon == 1.0  # a control's claim
    unit = _audited(from_mapping({"site": {"privacy_unit": "patient"},
                                  "data": {"patients": True}}), 100, 1, "unit")
    assert unit.site.privacy_unit == "record" and unit.privacy.target_epsilon == 1.0
    # canaries are patients where the sites protect patients, records elsewhere
    assert canary_notes(cfg) == 1 and canary_notes(cfg, 4) == 4
    assert canary_notes(from_mapping({"site": {"privacy_unit": "patient"},
                                      "data": {"patients": True}})) == NOTES_PER_PATIENT > 1
    with pytest.raises(ConfigError, match="--notes must be at least 1"):
        canary_notes(cfg, 0)
    for m, sites, broken, why in [(3, 2, "", "at least 2 per canary site"),
                                  (100, 5, "", "--sites must be"),
                                  (100, 1, "gravity", "--break must be")]:
        with pytest.raises(ConfigError, match=why):
            _audited(cfg, m, sites, broken)
    with pytest.raises(ConfigError, match="privacy.enabled is false"):
        _audited(from_mapping({"privacy": {"enabled": False}}), 100, 1, "")
