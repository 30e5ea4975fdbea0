"""SecAgg+ on the real Flower simulation: the server only gets the sum, the sum is
the weighted FedAvg, and a site dropping out mid-round does not cost the round."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import numpy as np
import pytest
from flwr.common import parameters_to_ndarrays
from flwr.compat.common.recorddict_compat import recorddict_to_fitres

from common.model import get_adapter_arrays
from common.privacy.ledger import read_entries
from simulations.run import simulate
from tests.conftest import tiny_config, write_records

pytestmark = pytest.mark.slow


class CaptureUpdates:
    """A mod inside SecAgg+: it sees each site's plain update on its way out and
    keeps a copy (npz, no pickle) so the test can compute the mean itself."""

    def __init__(self, folder: Path, fail_site: str = "") -> None:
        self.folder, self.fail_site = folder, fail_site

    def __call__(self, msg, context, call_next):
        site = f"site{context.node_config['partition-id']}"
        if msg.metadata.message_type == "train" and site == self.fail_site:
            raise RuntimeError(f"{site} drops out mid-round")
        out = call_next(msg, context)
        if msg.metadata.message_type == "train" and out.has_content():
            res = recorddict_to_fitres(out.content, keep_input=True)
            np.savez(self.folder / f"{site}.npz", *parameters_to_ndarrays(res.parameters))
            # which code split this site's SecAgg+ secrets (in this site's own process)
            mod = importlib.import_module("flwr.client.mod.secure_aggregation.secaggplus_mod")
            (self.folder / f"{site}.json").write_text(json.dumps(
                {"n": res.num_examples, "shares_by": mod.create_shares.__module__}))
        return out


def _files(root: Path, sites: int) -> dict:
    return {"sites": [write_records(root / f"s{i}.csv", 60 + 20 * i, seed=i)
                      for i in range(sites)],
            "test": write_records(root / "test.csv", 40, seed=99)}


def _global_adapter(run: Path, tiny_model: Path) -> list[np.ndarray]:
    from peft import PeftModel

    from common.model import build_base

    model = PeftModel.from_pretrained(build_base(str(tiny_model), 4), str(run / "adapter"),
                                      is_trainable=True)
    return get_adapter_arrays(model)


MAX_WEIGHT = 200.0  # above every test site's example count, so weights are exact


def _tolerance(folder: Path, sites: list[str]) -> float:
    """SecAgg+ quantises w_i/max_weight * x_i to 2^22 levels over ±8, then divides by
    Σ w_i/max_weight: each site's rounding is at most one level, scaled back."""
    level = 2 * 8.0 / 2**22
    total = sum(json.loads((folder / f"{s}.json").read_text())["n"] for s in sites)
    return len(sites) * level * MAX_WEIGHT / total


def _weighted_mean(folder: Path, sites: list[str]) -> list[np.ndarray]:
    updates, weights = [], []
    for site in sites:
        with np.load(folder / f"{site}.npz", allow_pickle=False) as data:
            updates.append([data[f"arr_{i}"] for i in range(len(data.files))])
        weights.append(json.loads((folder / f"{site}.json").read_text())["n"])
    total = sum(weights)
    return [sum(w * u[k] for w, u in zip(weights, updates)) / total
            for k in range(len(updates[0]))]


def _run(tiny_model, tmp_path, sites: int, fail_site: str = "", **sections):
    files = _files(tmp_path, sites)
    capture = tmp_path / "capture"
    capture.mkdir()
    # min_sites: the accepted updates a round needs; one site may drop out or refuse
    cfg = tiny_config(tiny_model, files, federation={"num_rounds": 1, "min_sites": sites - 1,
                                                     "secure_aggregation": "on",
                                                     "secagg_max_weight": MAX_WEIGHT},
                      simulation={"num_sites": sites}, **sections)
    run = simulate(cfg, tmp_path / "run", client_mods=[CaptureUpdates(capture, fail_site)])
    return run, capture, json.loads((run / "summary.json").read_text())


def test_secure_sum_is_the_weighted_fedavg_and_sites_record_it(tiny_model, tmp_path):
    run, capture, summary = _run(tiny_model, tmp_path, 3)
    assert summary["secure_aggregation"]["rounds"] == {"1": True}
    sites = ["site0", "site1", "site2"]
    expected, tol = _weighted_mean(capture, sites), _tolerance(capture, sites)
    got = _global_adapter(run, tiny_model)
    assert tol < 1e-4
    for g, e in zip(got, expected):
        np.testing.assert_allclose(g, e, atol=tol, rtol=0)
    # the secrets were split and recombined by common/shamir.py, inside real SecAgg+
    assert {json.loads((capture / f"{s}.json").read_text())["shares_by"] for s in sites} \
        == {"common.shamir"}
    workflow = importlib.import_module(
        "flwr.server.workflow.secure_aggregation.secaggplus_workflow")
    assert workflow.combine_shares.__module__ == "common.shamir"
    # and the sum is not any single site's update
    with np.load(capture / "site0.npz", allow_pickle=False) as one:
        assert not np.allclose(got[-1], one[f"arr_{len(got) - 1}"], atol=1e-4)
    for site in ("site0", "site1", "site2"):
        entries = read_entries(run / "ledgers" / f"{site}.jsonl")
        # the update went masked; the counts (size, evaluation) are noisy and in the clear
        assert all(e["secure_aggregation"] is (e["kind"] == "train") for e in entries)
        assert [e["kind"] for e in entries] == ["size", "train", "evaluate"]


def test_a_head_round_sends_only_the_head_and_the_lora_tensors_stay_bit_exact(
        tiny_model, tmp_path):
    from common.model import build_model, encoder_arrays
    from common.config import LoraConfig

    run, capture, summary = _run(tiny_model, tmp_path, 3, train={"head_rounds": 1})
    assert summary["secure_aggregation"]["rounds"] == {"1": True}
    initial = build_model(str(tiny_model), 4, LoraConfig(r=2, alpha=4))
    lora = encoder_arrays(initial)
    start, got = get_adapter_arrays(initial), _global_adapter(run, tiny_model)
    sites = ["site0", "site1", "site2"]
    for site in sites:
        with np.load(capture / f"{site}.npz", allow_pickle=False) as sent:
            assert all(sent[f"arr_{i}"].size == 0 for i in lora)  # nothing spent on them
            head_bytes = sum(sent[k].nbytes for k in sent.files)
        assert summary["bytes_sent_per_site_per_round"][site]["1"] == head_bytes
    expected, tol = _weighted_mean(capture, sites), _tolerance(capture, sites)
    for i, (g, s0) in enumerate(zip(got, start)):
        if i in lora:
            assert np.array_equal(g, s0)  # bit for bit: the sites' features stay valid
        else:
            np.testing.assert_allclose(g, expected[i], atol=tol, rtol=0)
            assert not np.allclose(g, s0)


def test_a_site_dropping_out_mid_round_does_not_cost_the_round(tiny_model, tmp_path):
    run, capture, summary = _run(tiny_model, tmp_path, 4, fail_site="site3")
    assert summary["secure_aggregation"]["rounds"] == {"1": True}
    assert not (capture / "site3.npz").exists()
    sites = ["site0", "site1", "site2"]
    expected, tol = _weighted_mean(capture, sites), _tolerance(capture, sites)
    got = _global_adapter(run, tiny_model)
    for g, e in zip(got, expected):
        np.testing.assert_allclose(g, e, atol=tol, rtol=0)
    assert summary["test"]["accuracy"] is not None
    # one failure, with its code, filed under the one site that did not answer (SecAgg+
    # reports failures without their node, and twice)
    assert list(summary["problems_per_site"]) == ["site3"]
    (found,) = summary["problems_per_site"]["site3"]
    assert found["status"].startswith("failed: site failure 'site-error'")


def test_secure_aggregation_on_with_two_sites_stops_instead_of_aggregating_in_the_clear(
        tiny_model, site_files, tmp_path):
    cfg = tiny_config(tiny_model, site_files, federation={"num_rounds": 1,
                                                          "secure_aggregation": "on"})
    with pytest.raises(RuntimeError, match="only 2 site.*will not aggregate in the clear"):
        simulate(cfg, tmp_path / "run")
    assert not (tmp_path / "run" / "adapter").exists()


def test_a_refusing_site_sends_a_weightless_zero_update_and_the_round_goes_on(
        tiny_model, tmp_path):
    files = _files(tmp_path, 3)
    capture = tmp_path / "capture"
    capture.mkdir()
    cfg = tiny_config(tiny_model, files, federation={"num_rounds": 1, "min_sites": 2,
                                                     "secure_aggregation": "on",
                                                     "secagg_max_weight": MAX_WEIGHT},
                      simulation={"num_sites": 3}, site={"budgets": [8.0, 8.0, 0.01]})
    run = simulate(cfg, tmp_path / "run", client_mods=[CaptureUpdates(capture)])
    summary = json.loads((run / "summary.json").read_text())
    assert summary["secure_aggregation"]["rounds"] == {"1": True}
    assert json.loads((capture / "site2.json").read_text())["n"] == 0
    with np.load(capture / "site2.npz", allow_pickle=False) as zero:
        assert all(not zero[k].any() for k in zero.files)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    status = {r["site"]: r["status"] for r in rows if r["phase"] == "train"}
    assert status == {"site0": "accepted", "site1": "accepted", "site2": "refused"}
    sites = ["site0", "site1"]
    expected, tol = _weighted_mean(capture, sites), _tolerance(capture, sites)
    for g, e in zip(_global_adapter(run, tiny_model), expected):
        np.testing.assert_allclose(g, e, atol=tol, rtol=0)
    entries = read_entries(run / "ledgers" / "site2.jsonl")
    # it cannot afford even its noisy size: it refuses the round, then the evaluation
    assert [e["kind"] for e in entries] == ["refusal", "refusal"]
    assert entries[0]["secure_aggregation"] and "round 1" in entries[0]["reason"]
