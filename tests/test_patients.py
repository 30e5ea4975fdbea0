"""Patient-level privacy: patients are sampled, bounded to k records a step and clipped
jointly; every release, count and ledger entry is in the site's unit."""

from __future__ import annotations

import csv
import json
import math
import random
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from opacus import GradSampleModule
from opacus.optimizers import DPOptimizer

from client.budget import Policy, SiteGuard, UnitError
from client.site import Site, SiteTrainer
from client.training import Patients, PrivateStep, private_batch, train_private
from common.config import ConfigError, from_mapping, from_node_config
from common.data import DataError, federated_data, read_records, site_split
from common.evaluation import Features
from common.metrics import class_counts
from common.patients import rows_by_patient, synthetic_patients
from common.privacy import accounting
from common.privacy.ledger import LEDGER_FILE
from common.privacy.verify import verify_path
from tests.conftest import LABELS, tiny_config, write_patient_records

DEVICE = torch.device("cpu")


def _head_and_features(rows: int, seed: int = 0):
    torch.manual_seed(seed)
    head = torch.nn.Linear(6, 3)
    x = torch.randn(rows, 6) * 3
    return head, Features(x, torch.randint(0, 3, (rows,)))


def _record_grads(head, feats, row):
    head.zero_grad()
    F.cross_entropy(head(feats.x[[row]]), feats.labels[[row]]).backward()
    return [p.grad.clone() for p in head.parameters()]


def _dp_step(head, feats, groups, clip, expected, reduction, chunk_size=4):
    """One σ=0 DP-SGD step with SGD(lr=1): returns how far each parameter moved."""
    before = [p.detach().clone() for p in head.parameters()]
    gsm = GradSampleModule(head, loss_reduction="mean")
    optimizer = DPOptimizer(torch.optim.SGD(list(head.parameters()), lr=1.0),
                            noise_multiplier=0.0, max_grad_norm=clip,
                            expected_batch_size=expected, loss_reduction="mean")
    private_batch(gsm, optimizer, feats, groups, chunk_size, DEVICE, reduction=reduction)
    gsm._close()
    return [b - p.detach() for p, b in zip(head.parameters(), before)]


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_per_patient_clipping_equals_a_hand_computation(reduction):
    """Each patient's records' gradients, summed (or averaged), clipped jointly to C;
    the step moves the head by -Σ_patients clip(g_patient) / E[patients]."""
    head, feats = _head_and_features(9)
    groups = [(0, 1, 2), (3,), (4, 5, 6, 7), (8,)]
    clip, expected = 0.3, 5
    manual = [torch.zeros_like(p) for p in head.parameters()]
    for group in groups:
        per_record = [_record_grads(head, feats, r) for r in group]
        g = [sum(parts) for parts in zip(*per_record)]
        if reduction == "mean":
            g = [x / len(group) for x in g]
        norm = torch.sqrt(sum((x ** 2).sum() for x in g)).item()
        for m, x in zip(manual, g):
            m += x * min(1.0, clip / (norm + 1e-6))
    head.zero_grad()
    moved = _dp_step(head, feats, groups, clip, expected, reduction, chunk_size=4)
    for m, d in zip(manual, moved):
        torch.testing.assert_close(d, m / expected, atol=1e-6, rtol=1e-4)


def test_one_patient_with_500_notes_moves_the_update_by_at_most_c():
    """Before noise, a patient with 500 notes (all in the step, k=500) moves the noisy
    sum by at most C; the same 500 notes as 500 records move it by far more."""
    head, feats = _head_and_features(500, seed=3)
    clip = 0.5
    moved = _dp_step(head, feats, [tuple(range(500))], clip, 1, "sum", chunk_size=64)
    norm = math.sqrt(sum(float((d ** 2).sum()) for d in moved))
    assert norm <= clip * (1 + 1e-5)
    assert norm > 0.5 * clip  # it did move, clipped: its gradients mostly agree
    head, feats = _head_and_features(500, seed=3)
    as_records = _dp_step(head, feats, list(range(500)), clip, 1, None, chunk_size=64)
    assert math.sqrt(sum(float((d ** 2).sum()) for d in as_records)) > 20 * clip


def test_a_sampled_patient_brings_at_most_k_records_a_step():
    head, feats = _head_and_features(60)
    patients = Patients(tuple(tuple(range(i, i + 10)) for i in range(0, 60, 10)), 3)
    accountant = accounting.make_accountant([])
    stats = train_private(head, feats, PrivateStep(1.0, 1.0, 4, 1.0), 0.01, 8, DEVICE,
                          accountant, torch.Generator().manual_seed(0), public_size=6,
                          patients=patients)
    assert stats.examples == 4 * 6 * 3  # q = 1: every patient, 3 of their 10 notes
    picks = {patients.pick(0, torch.Generator().manual_seed(s)) for s in range(20)}
    assert len(picks) > 10 and all(len(p) == 3 and set(p) <= set(range(10)) for p in picks)


def test_the_sampling_rate_is_over_patients_and_an_empty_batch_is_a_noise_only_step():
    """q is the chance of a patient to be in a step: with q tiny, no patient is sampled,
    each step is a noise-only step, still accounted at q."""
    head, feats = _head_and_features(40)
    patients = Patients(rows_by_patient([f"p{i // 8}" for i in range(40)]), 4)
    before = [p.detach().clone() for p in head.parameters()]
    accountant = accounting.make_accountant([])
    stats = train_private(head, feats, PrivateStep(1.0, 1e-9, 3, 1.0), 0.01, 8, DEVICE,
                          accountant, torch.Generator().manual_seed(0), public_size=5,
                          patients=patients)
    assert stats.empty_batches == 3 and stats.examples == 0
    assert accountant.history == [(1.0, 1e-9, 3)]
    assert any(not torch.equal(b, p) for b, p in zip(before, head.parameters()))


@pytest.fixture()
def patient_files(tmp_path):
    return {"sites": [write_patient_records(tmp_path / f"site{i}.csv", 40, seed=i,
                                            prefix=f"s{i}-") for i in range(2)],
            "test": write_patient_records(tmp_path / "test.csv", 12, seed=9, prefix="t-")}


def _patient_config(tiny_model, files, **sections):
    return tiny_config(tiny_model, files, data={"patient_column": "patient"},
                       site={"privacy_unit": "patient", "max_records_per_patient": 2,
                             "min_val_records": 3}, **sections)


def test_a_patient_level_round_samples_and_counts_patients(tiny_model, patient_files,
                                                           tmp_path):
    cfg = _patient_config(tiny_model, patient_files)
    ds = read_records(patient_files["sites"][0], "note", "diagnosis", LABELS,
                      patient_column="patient")
    data = site_split(ds, 0.2, 0, 3)
    assert not set(data.train.patients) & set(data.val.patients)  # split by patient
    n_patients = len(set(data.train.patients))
    site = Site("site0", data, LABELS,
                Policy(8.0, 1e-4, unit="patient", max_records_per_patient=2), tmp_path / "site0")
    trainer = SiteTrainer(cfg, site)
    assert trainer.units == n_patients < len(data.train)
    out = trainer.fit(1, 2, "run-a")
    assert out["metrics"]["refused"] == ""
    entries = [json.loads(line) for line in
               (tmp_path / "site0" / LEDGER_FILE).read_text().splitlines()]
    size, train = entries
    assert size["mechanism"]["statistic"] == "a count of patients"
    assert abs(size["released_value"] - n_patients) < 6 * cfg.privacy.count_noise
    stated = max(1, round(size["released_value"]))
    assert train["sample_rate"] == pytest.approx(min(1.0, cfg.train.batch_size / stated))
    assert out["num_examples"] == min(stated, cfg.federation.max_site_examples)
    for entry in entries:
        assert entry["privacy_unit"] == "patient" and entry["max_records_per_patient"] == 2
    assert train["mechanism"]["clipping"].startswith("per-patient")
    # the evaluation counts patients: each patient's validation notes weigh 1 in all
    loss, total, metrics = trainer.evaluate(1, 2, "run-a")
    evaluate = json.loads((tmp_path / "site0" / LEDGER_FILE).read_text().splitlines()[-1])
    assert evaluate["kind"] == "evaluate" and evaluate["privacy_unit"] == "patient"
    assert "patient-weighted" in evaluate["mechanism"]["statistic"]
    val_patients = len(set(data.val.patients))
    assert abs(total - val_patients) < 6 * cfg.privacy.count_noise * math.sqrt(18)
    report = verify_path(tmp_path / "site0" / LEDGER_FILE)
    assert report.ok, report.problems
    assert {e.privacy_unit for e in report.sites[0].entries} == {"patient"}


def test_patient_weighted_counts_move_by_at_most_root_3_per_patient():
    rng = np.random.default_rng(0)
    labels, pred = rng.integers(0, 4, 30), rng.integers(0, 4, 30)
    patients = [f"p{i % 7}" for i in range(30)]
    sizes = Counter(patients)
    weights = np.array([1 / sizes[p] for p in patients])
    full = class_counts(pred, labels, 4, weights)
    for gone in set(patients):
        keep = [i for i, p in enumerate(patients) if p != gone]
        rest = [p for p in patients if p != gone]
        w = np.array([1 / sizes[p] for p in rest])
        without = class_counts(pred[keep], labels[keep], 4, w)
        assert np.linalg.norm(full - without) <= math.sqrt(3) + 1e-9
    assert full[1].sum() == pytest.approx(7)  # the support counts patients


def test_a_ledger_spent_in_records_refuses_a_patient_level_release(tmp_path):
    record = SiteGuard("h", tmp_path, "sha256:x", Policy(8.0, 1e-5))
    record.public_size(100, 5.0, "run-a", 1)
    patient = SiteGuard("h", tmp_path, "sha256:x",
                        Policy(8.0, 1e-5, unit="patient", max_records_per_patient=4))
    with pytest.raises(UnitError, match="new-dataset"):
        patient.check_unit()
    record.check_unit()  # the unit it was spent in is still fine


def test_verify_flags_a_dataset_released_in_two_units(tmp_path):
    SiteGuard("h", tmp_path, "sha256:x", Policy(8.0, 1e-5)).public_size(100, 5.0, "r", 1)
    SiteGuard("h", tmp_path, "sha256:x", Policy(8.0, 1e-5, unit="patient")).release_count(
        "evaluate", "r", 1, np.ones(3), 5.0)
    problems = verify_path(tmp_path / LEDGER_FILE).problems
    assert any("unit of privacy" in p.message and "record" in p.message for p in problems)


def test_a_hospital_with_a_patient_column_protects_patients_unless_it_says_otherwise():
    base = {"data-file": "x.csv", "site": "h", "state-dir": "s", "epsilon-budget": 8.0,
            "delta": 1e-6}
    assert from_node_config(base).unit == "record"
    assert from_node_config({**base, "patient-column": "mrn"}).unit == "patient"
    assert from_node_config({**base, "patient-column": "mrn",
                             "privacy-unit": "record"}).unit == "record"
    with pytest.raises(ConfigError, match="patient-column"):
        from_node_config({**base, "privacy-unit": "patient"})


def test_a_simulated_patient_unit_needs_data_that_names_patients():
    with pytest.raises(ConfigError, match="data.patients"):
        from_mapping({"site": {"privacy_unit": "patient"}})
    assert from_mapping({"site": {"privacy_unit": "patient"},
                         "data": {"patients": True}}).site.privacy_unit == "patient"


def test_a_record_without_a_patient_or_a_patient_in_the_test_file_is_refused(tmp_path):
    blank = write_patient_records(tmp_path / "blank.csv", 10, seed=1, blank_at=5)
    with pytest.raises(DataError, match=r"blank.csv:5: missing or empty patient id"):
        read_records(blank, "note", "diagnosis", LABELS, patient_column="patient")
    test = read_records(write_patient_records(tmp_path / "test.csv", 5, seed=2),
                        "note", "diagnosis", LABELS, patient_column="patient")
    site = write_patient_records(tmp_path / "site.csv", 5, seed=3)  # the same ids p0..p4
    with pytest.raises(DataError, match=r"site.csv:2: patient 'p0' also has records in the test file"):
        read_records(site, "note", "diagnosis", LABELS, patient_column="patient",
                     held_out=test, held_out_path=tmp_path / "test.csv")
    with pytest.raises(DataError, match="test.csv:2: missing column 'patient_id'"):
        read_records(tmp_path / "test.csv", "note", "diagnosis", LABELS,
                     patient_column="patient_id")


def test_synthetic_patients_are_heavy_tailed_and_share_their_chapter():
    rng = random.Random(0)
    labels = [rng.choice(range(18)) for _ in range(6000)]  # 18 chapters, like ICD-10
    ids = synthetic_patients(labels, 3.0, 1.2, 0.7, seed=0, prefix="p")
    assert ids == synthetic_patients(labels, 3.0, 1.2, 0.7, seed=0, prefix="p")
    sizes = Counter(ids)
    counts = sorted(sizes.values())
    assert counts[len(counts) // 2] <= 4  # most patients have a few notes
    assert max(counts) > 50 and sum(c > 50 for c in counts) >= 2  # some have many
    # comorbidity: two notes of one patient share their chapter far more than chance
    chance = sum((labels.count(c) / len(labels)) ** 2 for c in range(18))
    by_patient: dict[str, list[int]] = {}
    for label, patient in zip(labels, ids):
        by_patient.setdefault(patient, []).append(label)
    pairs = same = 0
    for chapters in by_patient.values():
        for a in range(len(chapters)):
            for b in range(a + 1, len(chapters)):
                pairs, same = pairs + 1, same + (chapters[a] == chapters[b])
    assert same / pairs > 4 * chance


def test_the_embedded_tasks_patients_stay_on_one_side_of_every_split():
    cfg = from_mapping({"data": {"patients": True}}).data
    sites, test = federated_data(cfg, 3, 10)
    assert not test.patients  # the test set's notes belong to no training patient
    seen: set[str] = set()
    for data in sites:
        train, val = set(data.train.patients), set(data.val.patients)
        assert "" not in train | val and not train & val
        assert not (train | val) & seen  # and no patient is at two sites
        seen |= train | val
        assert len(train) < len(data.train) / 2


def test_group_privacy_reads_a_record_level_guarantee_for_a_patient():
    eps, delta = accounting.group_privacy(1.0, 1e-6, 3)
    assert eps == 3.0 and delta == pytest.approx(1e-6 * (1 + math.e + math.e ** 2))
    per_record = accounting.per_record_for_group(8.0, 1e-5, 4)
    assert accounting.group_privacy(*per_record, 4) == pytest.approx((8.0, 1e-5))
    assert accounting.group_privacy(2.0, 1e-5, 1) == (2.0, 1e-5)


def test_the_group_baseline_keeps_at_most_k_notes_of_each_patient():
    cfg = from_mapping({"data": {"patients": True, "max_notes_per_patient": 2}}).data
    full = from_mapping({"data": {"patients": True}}).data
    capped, _ = federated_data(cfg, 2, 10)
    whole, _ = federated_data(full, 2, 10)
    for few, many in zip(capped, whole):
        assert max(Counter(few.train.patients).values()) == 2
        assert set(few.train.patients) == set(many.train.patients)
        assert len(few.train) < len(many.train) and few.val == many.val


def _status(state: Path, *extra: str) -> str:
    import io
    from client.site_cli import cmd_status
    import argparse
    out = io.StringIO()
    args = argparse.Namespace(state_dir=state, notes_per_patient=None, data=None,
                              patient_column="")
    for key, value in zip(extra[::2], extra[1::2]):
        setattr(args, key, value)
    assert cmd_status(args, out) == 0
    return out.getvalue()


def test_site_status_and_the_report_say_whom_epsilon_protects(tmp_path):
    from common.privacy.report import report_data

    record, patient = tmp_path / "record", tmp_path / "patient"
    SiteGuard("h", record, "sha256:x", Policy(8.0, 1e-5)).public_size(100, 5.0, "r", 1)
    SiteGuard("h", patient, "sha256:x", Policy(8.0, 1e-5, unit="patient",
                                                 max_records_per_patient=3)
              ).public_size(40, 5.0, "r", 1)
    text = _status(patient)
    assert "ε per patient, with all of their notes" in text and "k=3" in text
    assert "read for a patient" not in text
    text = _status(record)
    spent = accounting.epsilon([(5.0, 1.0, 1)], 1e-5)
    assert "ε per record" in text and "a patient with 2 notes" in text
    assert f"ε ≤ {20 * spent:.4g}" in text  # 20 notes: 20 ε, group privacy
    data = write_patient_records(tmp_path / "data.csv", 6, seed=4)
    largest = max(Counter(r["patient"] for r in csv.DictReader(data.open())).values())
    text = _status(record, "data", data, "patient_column", "patient")
    assert f"the site's largest patient, {largest} notes: ε ≤ {largest * spent:.4g}" in text
    facts = report_data(verify_path(record / LEDGER_FILE), notes_per_patient=7)
    dataset = facts["sites"][0]["datasets"][0]
    assert dataset["unit"] == "record"
    assert dataset["patient_reading"] == [{"notes": 7, **dict(zip(
        ("epsilon", "delta"), accounting.group_privacy(dataset["spent"], 1e-5, 7)))}]
    facts = report_data(verify_path(patient / LEDGER_FILE))
    assert facts["sites"][0]["datasets"][0]["unit"] == "patient"
    assert facts["sites"][0]["datasets"][0]["patient_reading"] == []


def test_the_release_registry_states_the_unit_cost_of_every_private_release():
    from client.releases import DP_COUNT, DP_SGD, RELEASES, UNITS

    private = {name for name, keys in RELEASES.items()
               if set(keys.values()) & {DP_SGD, DP_COUNT}}
    assert private == set(UNITS)


def test_the_run_config_cannot_change_a_hospitals_unit(tiny_model, patient_files, tmp_path):
    from flwr.app import Context, RecordDict

    from client.site import site_from_context

    def hospital(cfg, **node):
        node = {"site": "site-a", "data-file": str(patient_files["sites"][0]),
                "text-column": "note", "label-column": "diagnosis",
                "state-dir": str(tmp_path / "a"), "epsilon-budget": 3.0, "delta": 1e-6,
                "require-approved-app": False, **node}
        return site_from_context(cfg, Context(run_id=1, node_id=7, node_config=node,
                                              state=RecordDict(),
                                              run_config=cfg.to_run_config()))

    asks_patients = _patient_config(tiny_model, patient_files)
    assert hospital(asks_patients).policy.unit == "record"  # no column: the site's call
    asks_records = tiny_config(tiny_model, patient_files, site={"privacy_unit": "record"})
    site = hospital(asks_records, **{"patient-column": "patient",
                                     "max-records-per-patient": 3})
    assert (site.policy.unit, site.policy.max_records_per_patient) == ("patient", 3)
    assert len(set(site.data.train.patients)) < len(site.data.train)
