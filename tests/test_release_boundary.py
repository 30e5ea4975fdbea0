"""A hostile server against the real site code: everything that leaves a site is a
declared release, and nothing the server sends resets or bypasses the site's budget.
Each test is one attack, driven through the node config, the run config or a crafted
message, exactly as an operator could."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Context, RecordDict
from flwr.common import (Code, EvaluateIns, FitIns, Message, Status, ndarrays_to_parameters)
from flwr.compat.common.recorddict_compat import (evaluateins_to_recorddict,
                                                  fitins_to_recorddict,
                                                  recorddict_to_evaluateres,
                                                  recorddict_to_fitres)

from client.app import SiteClient, build_app
from client.releases import RELEASES, SiteFailure, undeclared
from client.site import SiteTrainer, site_from_context
from common.data import DataError
from common.message_keys import Keys
from common.model import get_adapter_arrays
from common.privacy.approvals import APPROVED_APP_ENV
from common.privacy.ledger import read_entries
from tests.conftest import LABELS, tiny_config


@pytest.fixture(autouse=True)
def _task_identity(monkeypatch):
    """What a SuperNode sets before it hands a message to the ClientApp."""
    from flwr.supercore.task_identity import TaskIdentity

    for name, value in (("_task_id", 1), ("_run_id", 1), ("_node_id", 7)):
        monkeypatch.setattr(TaskIdentity, name, value)


def _context(cfg, node: dict) -> Context:
    return Context(run_id=1, node_id=7, node_config=node, state=RecordDict(),
                   run_config=cfg.to_run_config())


APP = "ab" * 32  # the approved app `fedcare site clientapp` names to the site


@pytest.fixture(autouse=True)
def _approved_app(monkeypatch):
    """As the hospital's task process states it (client/approved_task.py)."""
    monkeypatch.setenv(APPROVED_APP_ENV, APP)


def _node(files, state: Path, **extra) -> dict:
    return {"site": "site-a", "data-file": str(files["sites"][0]), "text-column": "note",
            "label-column": "diagnosis", "state-dir": str(state), "epsilon-budget": 20.0,
            "delta": 1e-5, "require-approved-app": False, **extra}


def _ledger(state: Path) -> list[dict]:
    return read_entries(state / "ledger.jsonl")


def _fit(cfg, node: dict, round_no: int = 1, rounds: int = 2, run_id: str = "run-1",
         secure: bool = False) -> dict:
    site = site_from_context(cfg, _context(cfg, node))
    return SiteTrainer(cfg, site).fit(round_no, rounds, run_id, secure=secure)


def _message(cfg, kind: str, config: dict) -> Message:
    model_arrays = get_adapter_arrays(_trainer_model(cfg))
    params = ndarrays_to_parameters(model_arrays)
    if kind == "train":
        content = fitins_to_recorddict(FitIns(params, config), keep_input=True)
    else:
        content = evaluateins_to_recorddict(EvaluateIns(params, config), keep_input=True)
    return Message(content=content, dst_node_id=7, message_type=kind)


def _trainer_model(cfg):
    from common.model import build_model
    return build_model(cfg.model.base_model, len(LABELS), cfg.lora, cfg.model.pooling)


def _round(run_id: str = "run-1", round_no: int = 1, rounds: int = 2, **extra) -> dict:
    return {Keys.ROUND: round_no, Keys.NUM_ROUNDS: rounds, Keys.RUN_ID: run_id, **extra}


# -- the budget's identity ---------------------------------------------------------------
def test_reordering_the_run_labels_or_the_file_does_not_reset_the_budget(
        tiny_model, site_files, tmp_path):
    state = tmp_path / "a"
    cfg = tiny_config(tiny_model, site_files)
    _fit(cfg, _node(site_files, state), 1, 1)
    spent = _ledger(state)[-1]["epsilon"]
    # the same records, labels listed in reverse by the run, rows re-sorted in the file
    rows = list(csv.reader(site_files["sites"][0].open()))
    shuffled = tmp_path / "resorted.csv"
    with shuffled.open("w", newline="") as handle:
        csv.writer(handle).writerows([rows[0], *sorted(rows[1:], reverse=True)])
    reversed_cfg = tiny_config(tiny_model, site_files,
                               data={"labels": list(reversed(LABELS))})
    out = _fit(reversed_cfg, _node(site_files, state, **{"data-file": str(shuffled)}),
               1, 1, run_id="run-2")
    entries = _ledger(state)
    assert len({e["data_fingerprint"] for e in entries}) == 1  # the same data version
    assert [e["kind"] for e in entries].count("size") == 1     # its size released once
    assert out["metrics"]["epsilon"] > spent                  # spent on top, not afresh


def test_a_changed_file_spends_from_the_same_budget(tiny_model, site_files, tmp_path):
    state = tmp_path / "a"
    cfg = tiny_config(tiny_model, site_files)
    _fit(cfg, _node(site_files, state), 1, 1)
    spent = _ledger(state)[-1]["epsilon"]
    grown = tmp_path / "grown.csv"
    grown.write_text(site_files["sites"][0].read_text() + "fever cough rash skin,respiratory\n")
    _fit(cfg, _node(site_files, state, **{"data-file": str(grown)}), 1, 1, run_id="run-2")
    entries = _ledger(state)
    assert len({e["data_fingerprint"] for e in entries}) == 2  # a new data version ...
    assert {e["dataset"] for e in entries} == {"main"}          # ... of the same dataset
    assert {e["app_sha256"] for e in entries} == {APP}  # each names the app it ran under
    assert entries[-1]["epsilon"] > spent


def test_a_new_dataset_name_without_a_signed_start_is_refused(tiny_model, site_files,
                                                              tmp_path):
    state = tmp_path / "a"
    cfg = tiny_config(tiny_model, site_files)
    _fit(cfg, _node(site_files, state), 1, 1)
    with pytest.raises(Exception, match="new-dataset"):
        _fit(cfg, _node(site_files, state, dataset="fresh"), 1, 1, run_id="run-2")


def test_the_ledger_data_version_cannot_be_recomputed_from_the_records(
        tiny_model, site_files, tmp_path):
    from common.data import fingerprint, read_records

    cfg = tiny_config(tiny_model, site_files)
    _fit(cfg, _node(site_files, tmp_path / "a"), 1, 1)
    _fit(cfg, _node(site_files, tmp_path / "b"), 1, 1)  # same records, another site key
    plain = fingerprint(read_records(site_files["sites"][0], "note", "diagnosis", LABELS))
    versions = {_ledger(tmp_path / s)[0]["data_fingerprint"] for s in ("a", "b")}
    assert len(versions) == 2 and plain not in versions
    assert all(plain.split(":")[1] not in (tmp_path / s / "ledger.jsonl").read_text()
               for s in ("a", "b"))


# -- what the site owns ------------------------------------------------------------------
def test_a_tiny_validation_split_is_refused(tiny_model, site_files, tmp_path):
    cfg = tiny_config(tiny_model, site_files, data={"val_fraction": 1e-9})
    with pytest.raises(DataError, match="validation split has 1 record"):
        site_from_context(cfg, _context(cfg, {"partition-id": 0, "num-partitions": 2}))
    # a hospital's split is its own: the run config's fraction does not reach it
    site = site_from_context(cfg, _context(cfg, _node(site_files, tmp_path / "a")))
    assert len(site.data.val) >= 10
    with pytest.raises(DataError, match="fewer than the site's minimum"):
        site_from_context(cfg, _context(cfg, _node(site_files, tmp_path / "a",
                                                   **{"val-fraction": 0.001})))


def test_the_node_config_is_typed_and_unknown_keys_are_refused(tiny_model, site_files,
                                                               tmp_path):
    cfg = tiny_config(tiny_model, site_files)
    with pytest.raises(ValueError, match="'epsilon-budjet' is not known"):
        site_from_context(cfg, _context(cfg, {**_node(site_files, tmp_path),
                                              "epsilon-budjet": 1.0}))
    with pytest.raises(ValueError, match="'private' must be true or false"):
        site_from_context(cfg, _context(cfg, _node(site_files, tmp_path, private="no")))
    with pytest.raises(ValueError, match="label set"):
        site_from_context(cfg, _context(cfg, _node(site_files, tmp_path,
                                                   labels="respiratory,injury")))


def test_the_run_config_cannot_raise_the_site_run_cap_or_pick_its_columns(
        tiny_model, site_files, tmp_path):
    state = tmp_path / "a"
    cfg = tiny_config(tiny_model, site_files, privacy={"target_epsilon": 6.0},
                      data={"text_column": "diagnosis", "label_column": "note"})
    out = _fit(cfg, _node(site_files, state, **{"run-epsilon-cap": 1.0}), 1, 1)
    assert out["metrics"][Keys.REFUSED] == ""
    assert out["metrics"][Keys.EPSILON] <= 1.0 + 1e-9  # the site's cap, not the run's 6


def test_a_site_that_requires_secure_aggregation_refuses_a_plain_round(
        tiny_model, site_files, tmp_path):
    state = tmp_path / "a"
    cfg = tiny_config(tiny_model, site_files)
    out = _fit(cfg, _node(site_files, state, **{"require-secure-aggregation": True}))
    assert out["arrays"] == [] and out["metrics"][Keys.REFUSED] == "plain-round"
    assert [e["kind"] for e in _ledger(state)] == ["refusal"]
    assert _ledger(state)[0]["epsilon"] == 0.0


def test_delta_above_one_over_ten_n_is_refused(tiny_model, site_files, tmp_path):
    state = tmp_path / "a"
    cfg = tiny_config(tiny_model, site_files)
    out = _fit(cfg, _node(site_files, state, delta=0.01))  # 108 records: δ ≤ 9.3e-4
    assert out["metrics"][Keys.REFUSED] == "delta"  # the code says what to change
    assert "δ=0.01 is too large" in _ledger(state)[-1]["reason"]


# -- what leaves -------------------------------------------------------------------------
def test_a_forged_secure_flag_is_recorded_as_plain(tiny_model, site_files, tmp_path):
    state = tmp_path / "a"
    cfg = tiny_config(tiny_model, site_files)
    app = build_app(cfg)
    reply = app(_message(cfg, "train", _round(**{Keys.SECURE_AGGREGATION: True})),
                _context(cfg, _node(site_files, state)))
    res = recorddict_to_fitres(reply.content, keep_input=True)
    assert res.metrics[Keys.SECURE_AGGREGATION] is False
    train = [e for e in _ledger(state) if e["kind"] == "train"]
    assert train and all(e["secure_aggregation"] is False for e in train)


def test_an_update_outside_the_secure_range_is_clipped_and_charged(tiny_model, site_files,
                                                                   tmp_path):
    from client.budget import update_digest

    state = tmp_path / "a"
    cfg = tiny_config(tiny_model, site_files, federation={"secagg_clipping_range": 1e-3})
    out = _fit(cfg, _node(site_files, state), secure=True)
    assert out["metrics"][Keys.REFUSED] == ""
    assert max(float(np.abs(a).max()) for a in out["arrays"]) <= np.float32(1e-3)
    entry = _ledger(state)[-1]
    assert entry["kind"] == "train" and entry["epsilon"] > 0
    assert entry["update_sha256"] == update_digest(out["arrays"])  # what left, clipped
    assert all(not isinstance(v, float) or v <= entry["epsilon_budget"]
               for k, v in out["metrics"].items() if k != Keys.LEDGER)


def test_a_non_finite_update_is_withheld_but_charged(tiny_model, site_files, tmp_path):
    state = tmp_path / "a"
    cfg = tiny_config(tiny_model, site_files)
    site = site_from_context(cfg, _context(cfg, _node(site_files, state)))
    trainer = SiteTrainer(cfg, site)
    for param in trainer.model.parameters():  # a global adapter that diverged
        if param.requires_grad:
            param.data.fill_(float("nan"))
    out = trainer.fit(1, 2, "run-1")
    assert out["arrays"] == [] and out["metrics"][Keys.REFUSED] == "non-finite"
    entry = _ledger(state)[-1]
    assert entry["kind"] == "train" and entry["update_sha256"] is None
    assert "NaN" in entry["withheld"] and entry["epsilon"] > _ledger(state)[0]["epsilon"]
    assert out["metrics"][Keys.EPSILON] == entry["epsilon"]


@pytest.mark.parametrize("run_id", ["../x", "/abs/path", "a/b", ""])
def test_a_run_id_that_is_not_a_plain_name_is_rejected(tiny_model, site_files, tmp_path,
                                                       run_id):
    cfg = tiny_config(tiny_model, site_files)
    site = site_from_context(cfg, _context(cfg, _node(site_files, tmp_path / "a")))
    client = SiteClient(SiteTrainer(cfg, site))
    with pytest.raises(ValueError, match="cannot name a folder"):
        client.fit(get_adapter_arrays(client.trainer.model), _round(run_id))
    assert not (tmp_path / "a" / "ledger.jsonl").exists()


def test_error_replies_carry_a_code_and_no_record_values(tiny_model, site_files, tmp_path):
    secret = tmp_path / "notes.csv"
    secret.write_text("note,diagnosis\npatient Jane Roe fever,respiratory\n"
                      "patient John Doe anxiety,oncology-secret\n")
    cfg = tiny_config(tiny_model, site_files)
    app = build_app(cfg)
    with pytest.raises(SiteFailure) as failure:
        app(_message(cfg, "train", _round()),
            _context(cfg, _node(site_files, tmp_path / "a", **{"data-file": str(secret)})))
    text = str(failure.value)
    assert "'data'" in text and "reference" in text
    for leak in ("oncology", "John", "notes.csv", ":3", str(tmp_path)):
        assert leak not in text
    # the hospital finds the details in its own log, under the reference it was given
    ref = text.rsplit(" ", 1)[1]
    local = (tmp_path / "a" / "site.log").read_text()
    assert f"error {ref} (data)" in local and "notes.csv:3" in local and "oncology" in local


def test_a_site_does_not_send_its_adapter_on_request(tiny_model, site_files, tmp_path):
    cfg = tiny_config(tiny_model, site_files)
    site = site_from_context(cfg, _context(cfg, _node(site_files, tmp_path / "a")))
    with pytest.raises(PermissionError):
        SiteClient(SiteTrainer(cfg, site)).get_parameters({})


def test_evaluation_is_off_by_default_at_a_hospital_and_noisy_and_charged_when_on(
        tiny_model, site_files, tmp_path):
    cfg = tiny_config(tiny_model, site_files)
    app = build_app(cfg)
    silent = app(_message(cfg, "evaluate", _round()),
                 _context(cfg, _node(site_files, tmp_path / "a")))
    res = recorddict_to_evaluateres(silent.content)
    assert res.num_examples == 0 and res.metrics == {Keys.SITE: "site-a",
                                                     Keys.EVALUATED: False}
    assert math.isnan(res.loss) and not (tmp_path / "a" / "ledger.jsonl").exists()

    state = tmp_path / "b"
    node = _node(site_files, state, **{"release-evaluation": True})
    replies = [recorddict_to_evaluateres(app(_message(cfg, "evaluate", _round(round_no=r)),
                                             _context(cfg, node)).content)
               for r in (1, 2)]
    evaluations = [e for e in _ledger(state) if e["kind"] == "evaluate"]
    assert len(evaluations) == 2 and evaluations[1]["epsilon"] > evaluations[0]["epsilon"]
    # the same round asked again (a resumed server) gets the same reply, charged once
    again = recorddict_to_evaluateres(app(_message(cfg, "evaluate", _round(round_no=2)),
                                          _context(cfg, node)).content)
    assert (again.num_examples, again.metrics) == (replies[1].num_examples, replies[1].metrics)
    assert len([e for e in _ledger(state) if e["kind"] == "evaluate"]) == 2
    assert evaluations[0]["noise_multiplier"] == cfg.privacy.count_noise
    seen = [(r.num_examples, r.metrics["macro_recall"], r.metrics["macro_f1"])
            for r in replies]
    assert seen[0] != seen[1]  # fresh noise each time, on the same model
    for r in replies:
        assert math.isnan(r.loss) and set(r.metrics) <= set(RELEASES["evaluateres.metrics"])
        assert "macro_auroc" not in r.metrics and "ece" not in r.metrics


def test_undeclared_keys_do_not_leave(tiny_model, site_files, tmp_path):
    cfg = tiny_config(tiny_model, site_files)

    def leaky(msg, context, call_next):  # a site-side bug: one extra metric
        reply = call_next(msg, context)
        reply.content.config_records["fitres.metrics"]["train_loss"] = 0.5
        return reply

    app = build_app(cfg, mods=[leaky])
    with pytest.raises(SiteFailure, match="undeclared-release"):
        app(_message(cfg, "train", _round()), _context(cfg, _node(site_files, tmp_path)))
    clean = build_app(cfg)(_message(cfg, "train", _round(run_id="run-2")),
                           _context(cfg, _node(site_files, tmp_path)))
    assert undeclared(clean.content) == []
    assert recorddict_to_fitres(clean.content, keep_input=True).status == Status(
        Code.OK, "Success")


def test_a_hospital_never_reads_canaries_or_evaluation_settings_meant_for_simulated_sites(
        tiny_model, site_files, tmp_path):
    """A run config naming a folder of audit canaries (and asking simulated sites to
    evaluate) leaves a hospital's records and policy as its node config says."""
    import json

    folder = tmp_path / "canaries"
    folder.mkdir()
    (folder / "site-a.json").write_text(json.dumps(
        [{"kind": "gradient", "texts": ["fever cough"], "label": LABELS[0], "coordinate": 3,
          "site": "site-a"}]))
    cfg = tiny_config(tiny_model, site_files, simulation={"canaries": str(folder)},
                      site={"release_evaluation": True})
    site = site_from_context(cfg, _context(cfg, _node(site_files, tmp_path / "a")))
    assert site.data.gradient_canaries == ()
    assert "fever cough" not in site.data.train.texts  # real notes here have four words
    assert not site.policy.release_evaluation  # node config's default: off
    simulated = site_from_context(cfg, _context(cfg, {"partition-id": 0, "num-partitions": 2}))
    assert simulated.data.gradient_canaries == ()  # its name is site0: no file for it
    (folder / "site0.json").write_text((folder / "site-a.json").read_text())
    simulated = site_from_context(cfg, _context(cfg, {"partition-id": 0, "num-partitions": 2}))
    assert simulated.data.gradient_canaries == ((len(simulated.data.train) - 1, 3),)
