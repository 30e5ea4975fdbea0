"""End to end: a real Flower simulation (Ray backend) of two sites writes a complete,
auditable run directory."""

from __future__ import annotations

import json

import pytest

from common.config import load_yaml
from common.privacy.verify import verify_path
from simulations.run import simulate
from tests.conftest import LABELS, tiny_config, write_records

pytestmark = pytest.mark.slow


def test_two_sites_two_rounds_write_a_complete_run_directory(tiny_model, site_files, tmp_path):
    from peft import PeftModel
    from common.model import build_base

    from client.releases import RELEASES, undeclared

    folder = tmp_path / "replies"
    folder.mkdir()

    def keep(msg, context, call_next):  # sees each reply as it leaves the site (in a Ray
        reply = call_next(msg, context)  # actor: written to a file, not kept in memory)
        seen = {name: sorted(record) for records in (
            reply.content.metric_records, reply.content.config_records)
            for name, record in records.items()} | {"undeclared": undeclared(reply.content)}
        (folder / f"{msg.object_id}.json").write_text(json.dumps(seen))
        return reply

    # round 1 trains the head on cached features, round 2 LoRA + head
    cfg = tiny_config(tiny_model, site_files, site={"budgets": [8.0, 6.0]},
                      train={"head_rounds": 1})
    run = simulate(cfg, tmp_path / "run", client_mods=[keep])
    # every record every site sent is declared, and the exact loss, time and size are not
    replies = [json.loads(p.read_text()) for p in folder.glob("*.json")]
    assert len(replies) == 8 and all(r.pop("undeclared") == [] for r in replies)
    assert {name for r in replies for name in r} == {
        f"{kind}.{part}" for kind in ("fitres", "evaluateres")
        for part in ("metrics", "num_examples", "status")} | {"evaluateres.loss"}
    sent = {key for r in replies for key in r.get("fitres.metrics", [])}
    assert sent <= set(RELEASES["fitres.metrics"])
    assert not sent & {"train_loss", "train_seconds", "num_train", "examples"}

    summary = json.loads((run / "summary.json").read_text())
    assert summary["private"] is True and summary["sites"] == ["site0", "site1"]
    assert 0.0 <= summary["test"]["accuracy"] <= 1.0
    assert set(summary["test"]) >= {"accuracy", "macro_recall", "macro_f1", "macro_auroc", "ece"}
    eps = summary["epsilon_per_site"]
    assert 0 < eps["site1"] <= 6.0 + 1e-9 and 0 < eps["site0"] <= 8.0 + 1e-9
    assert set(summary["bytes_sent_per_site_per_round"]["site0"]) == {"1", "2"}
    assert summary["audit"]["verified"] is True
    split = summary["time_split_seconds"]  # 2 rounds: a first fit, a later fit, evaluations
    assert set(split) == {"start_up", "first_fit", "fit", "server_evaluate", "site_evaluate"}
    assert all(v >= 0 for v in split.values())
    assert sum(split.values()) <= summary["wall_seconds"]

    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["phase"] == "train"]
    # what the server recorded is what the sites declared, plus its own bookkeeping
    server_side = {"round", "phase", "wall_seconds", "private", "status", "num_examples",
                   "epsilon_budget", "epsilon_left", "epsilon_before_run",
                   "privacy_unit", "max_records_per_patient"}  # from the ledger
    assert {k for r in train for k in r} - server_side <= set(RELEASES["fitres.metrics"])
    assert {(r["round"], r["site"]) for r in train} == {(1, "site0"), (1, "site1"),
                                                        (2, "site0"), (2, "site1")}
    for site in ("site0", "site1"):
        per_round = [r["epsilon"] for r in train if r["site"] == site]
        assert per_round[1] > per_round[0]  # cumulative, not per round
    assert {r["site"] for r in rows if r["phase"] == "evaluate"} == {"site0", "site1", "all"}
    for round_no in (1, 2):  # the aggregate is the example-weighted mean of the sites
        val = {r["site"]: r for r in rows if r["phase"] == "evaluate" and r["round"] == round_no}
        n0, n1 = val["site0"]["num_examples"], val["site1"]["num_examples"]
        assert val["all"]["accuracy"] == pytest.approx(
            (n0 * val["site0"]["accuracy"] + n1 * val["site1"]["accuracy"]) / (n0 + n1))
    assert [r["round"] for r in rows if r["phase"] == "test"] == [2]
    # each site's fit time stays in its own log, where the bench reads it
    from simulations.bench.orchestration import site_fit_seconds
    fits = site_fit_seconds(run)
    assert set(fits) == {1, 2} and all(set(f) == {"site0", "site1"} for f in fits.values())
    assert all(0 < s < summary["wall_seconds"] for f in fits.values() for s in f.values())

    config_text = (run / "config.yaml").read_text()
    assert "target_epsilon: 8.0" in config_text and "site_state" in config_text

    base = build_base(str(tiny_model), len(LABELS))
    PeftModel.from_pretrained(base, str(run / "adapter"))
    assert (run / "audit_report.html").is_file()
    assert verify_path(run).ok
    for site in ("site0", "site1"):
        assert (run / "ledgers" / f"{site}.jsonl").is_file()
        assert (run / "ledgers" / f"{site}.pub.pem").is_file()


def test_non_private_run_is_labelled_and_keeps_no_ledger(tiny_model, site_files, tmp_path):
    cfg = tiny_config(tiny_model, site_files, privacy={"enabled": False},
                      federation={"num_rounds": 1})
    # what a start killed while writing its config leaves: the folder holds no run yet
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.partial").write_text("privacy: {enabled: tr")
    run = simulate(cfg, tmp_path / "run")
    assert not any(run.glob("*.partial"))
    assert load_yaml(run / "config.yaml").privacy.enabled is False
    summary = json.loads((run / "summary.json").read_text())
    assert summary["private"] is False and summary["epsilon_per_site"] is None
    assert summary["privacy"].startswith("NON-PRIVATE")
    assert not (run / "ledgers").exists()
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows and all(r["private"] is False for r in rows)


def test_personalised_sites_report_both_models_and_pay_from_the_same_budget(
        tiny_model, site_files, tmp_path):
    from common.privacy.ledger import read_entries

    cfg = tiny_config(tiny_model, site_files, train={"personalize_steps": 3})
    run = simulate(cfg, tmp_path / "run")
    summary = json.loads((run / "summary.json").read_text())
    per_site = summary["personalization"]
    assert set(per_site) == {"site0", "site1"}
    for site, facts in per_site.items():
        assert 0 <= facts["global"]["accuracy"] <= 1
        assert 0 <= facts["personalized"]["accuracy"] <= 1
        adapter = tmp_path / "run" / "site_state" / site / "personalized"
        assert (next(adapter.iterdir()) / "adapter_model.safetensors").is_file()
        entries = read_entries(run / "ledgers" / f"{site}.jsonl")
        assert [e["kind"] for e in entries] == ["size", "train", "evaluate", "train",
                                                "evaluate", "personalize", "evaluate"]
        assert entries[-2]["steps"] == 3
        # σ was planned for 2 rounds + personalisation and the three evaluations, so
        # all of it fits the target
        assert entries[-1]["epsilon"] <= cfg.privacy.target_epsilon + 1e-9
        assert summary["epsilon_per_site"][site] == entries[-1]["epsilon"]
    assert verify_path(run).ok


def test_a_run_no_site_could_join_names_each_site_and_its_cause_and_its_name_is_not_reused(
        tiny_model, tmp_path):
    # three sites, each with one record whose label is not in data.labels
    files = {"sites": [write_records(tmp_path / f"site{i}.csv", 40, seed=i) for i in range(3)],
             "test": write_records(tmp_path / "test.csv", 40, seed=99)}
    for i, path in enumerate(files["sites"]):
        lines = path.read_text().splitlines()
        lines[3 + i] = lines[3 + i].rsplit(",", 1)[0] + f",xray{i}"  # file line 4 + i
        path.write_text("\n".join(lines) + "\n")
    cfg = tiny_config(tiny_model, files, federation={"num_rounds": 1},
                      simulation={"num_sites": 3, "cpus_per_site": 1})
    with pytest.raises(RuntimeError, match="no round aggregated any update") as failure:
        simulate(cfg, tmp_path / "run")
    lines = str(failure.value).splitlines()
    assert lines[0].endswith("what each site's own log says:")
    # one line per site, by name, with the file, the line and what was wrong, and no
    # Flower node ids (the server's view of sites that never answered)
    assert [line.split(":")[0].strip() for line in lines[1:]] == ["site0", "site1", "site2"]
    for i, line in enumerate(lines[1:]):
        assert f"data: {files['sites'][i]}:{4 + i}: unknown label 'xray{i}'" in line
    assert "node-" not in str(failure.value)
    assert not (tmp_path / "run" / "adapter").exists()
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["rounds_aggregated"] == 0
    assert "xray" not in json.dumps(summary)  # the server kept only codes and references
    with pytest.raises(RuntimeError, match=r"already holds a run \(.*config.yaml, .*summary.json"):
        simulate(cfg, tmp_path / "run")


def test_flowers_run_simulation_notice_is_kept_out_of_the_output_and_nothing_else_is():
    import logging

    from simulations.run import quiet_libraries

    quiet_libraries()
    quiet_libraries()  # once is enough: the filter is not stacked
    flower = logging.getLogger("flwr")
    assert sum(type(f).__name__ == "_RunSimulationNotice" for f in flower.filters) == 1

    def passes(msg: str, *args) -> bool:
        record = logging.LogRecord("flwr", logging.WARNING, __file__, 1, msg, args, None)
        return all(f.filter(record) for f in flower.filters)

    assert not passes("DEPRECATED FEATURE: %s\n...",
                      "The `run_simulation` function is deprecated and will be removed")
    assert passes("DEPRECATED FEATURE: %s", "Passing `enable_tf_gpu_growth=True`")
    assert passes("round %s skipped", 3)


def test_the_engine_scans_for_site_messages_on_its_own_tick_through_flowers_scan():
    import threading
    from queue import Queue

    from flwr.server.superlink.fleet.vce import vce_api
    from flwr.server.superlink.linkstate import LinkStateFactory
    from flwr.supercore.constant import FLWR_IN_MEMORY_DB_NAME
    from flwr.supercore.object_store import ObjectStoreFactory
    from flwr.superlink.federation import NoOpFederationManager

    from simulations.run import engine_tick, quicker_engine

    quicker_engine()
    scan = vce_api.add_messages_to_queue
    quicker_engine()  # once is enough: the tick is not wrapped twice
    assert vce_api.add_messages_to_queue is scan and scan.__wrapped__.__module__ == vce_api.__name__

    class Stop(threading.Event):  # Flower's stop event, with the waits it was asked for
        def __init__(self, scans: int) -> None:
            super().__init__()
            self.scans, self.waits = scans, []

        def wait(self, timeout=None) -> bool:
            self.waits.append(timeout)
            if len(self.waits) == self.scans:
                self.set()
            return super().wait(0)

    state = LinkStateFactory(FLWR_IN_MEMORY_DB_NAME, NoOpFederationManager(),
                             ObjectStoreFactory()).state()
    for sites, tick in ((4, 0.01), (8, 0.01), (16, 0.02), (64, 0.08), (200, 0.1)):
        stop = Stop(scans=3)
        scan(state, Queue(), {node: node for node in range(1, sites + 1)}, stop)
        assert stop.waits == [tick] * 3 and engine_tick(sites) == tick  # Flower's is 0.1
