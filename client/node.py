"""Which site this node is: its data, its policy and where its state lives.

A hospital's node config (typed as common.config.NodeConfig) names its data file and
holds everything that defines its data and its exposure: columns (its patient column
too), privacy unit and contribution bound, dataset identity,
validation split, budget, δ, per-run cap, count noise, secure-aggregation requirement,
whether it releases evaluation metrics. The run config, which the server sends, only
chooses what the run asks for; the site enforces its own limits. A simulated node has
only a `partition-id`: its share of the federated data, its policy from the run config
(in a simulation the researcher is every site).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from flwr.app import Context

from client.budget import Policy
from common.config import Config, NodeConfig, from_node_config, from_run_config
from common.data import (
    DataError, SiteData, federated_data, held_out, process_cached, read_records,
    read_site_file, site_split, with_patients,
)
from common.names import check_name
from common.privacy.approvals import APPROVALS_LEDGER_ENV, APPROVED_APP_ENV, AppNotApproved
from common.privacy.ledger import LEDGER_FILE, parse_ledger_bytes


@dataclass(frozen=True)
class Site:
    name: str
    data: SiteData
    label_names: tuple[str, ...]
    policy: Policy      # the site's own limits: nothing the server sends can raise them
    state_dir: Path | None  # the site's keys and ledger; None: under the run's directory
    private: bool = True  # a deployed site trains without DP only if its node config says so
    feature_dir: Path | None = None  # its pooled-feature cache; None: <state_dir>/features


def site_from_context(cfg: Config, context: Context) -> Site:
    node = from_node_config(context.node_config)
    if node.data_file:
        return _deployed_site(cfg, node)
    data, label_names = _simulated_data(cfg, node)
    name = check_name("site name", node.site or f"site{node.partition_id}")
    if cfg.simulation.canaries:  # an empirical audit's records (simulations only)
        from common.privacy.canaries import add_to_site
        data = add_to_site(data, cfg.simulation.canaries, name)
    s = cfg.site
    policy = Policy(node.epsilon_budget or s.budget_of(node.partition_id),
                    node.delta or cfg.privacy.delta, s.min_noise_multiplier,
                    s.max_noise_multiplier, count_noise=cfg.privacy.count_noise,
                    release_evaluation=s.release_evaluation, unit=s.privacy_unit,
                    max_records_per_patient=s.max_records_per_patient)
    state = (Path(node.state_dir) if node.state_dir
             else Path(s.state_dir) / name if s.state_dir else None)
    features = (Path(cfg.simulation.feature_cache_dir) / name
                if cfg.simulation.feature_cache_dir else None)  # this site's own, never shared
    return Site(name, data, label_names, policy, state, cfg.privacy.enabled, features)


def _simulated_data(cfg: Config, node: NodeConfig) -> tuple[SiteData, tuple[str, ...]]:
    """A simulated site's (train, val) and the label names. With one file per site it
    reads its own file only (another site's bad file is that site's failure); the
    embedded data set is one pool, shared out the same way at every site."""
    d, site = cfg.data, node.partition_id
    if d.source != "files":
        sites, test = federated_data(d, node.num_partitions, cfg.site.min_val_records)
        return sites[site], test.label_names
    if len(d.site_files) != node.num_partitions:
        raise DataError(f"data.site_files must list one file per simulated site "
                        f"({node.num_partitions}); it lists {len(d.site_files)}")
    records = process_cached(("records", d.site_files[site], d),
                             lambda: read_site_file(d, d.site_files[site], held_out(d)[1]))
    return (with_patients(site_split(records, d.val_fraction, d.seed + site,
                                     cfg.site.min_val_records), d, site), tuple(d.labels))


def _deployed_site(cfg: Config, node: NodeConfig) -> Site:
    name = check_name("site name", node.site)
    app = _approved_app(node)
    check_name("dataset", node.dataset)
    labels = cfg.data.labels
    if not labels:
        raise DataError("data.labels must list the label names in the run config when "
                        "hospitals bring their own files")
    if node.labels and set(node.labels) != set(labels):
        raise DataError("the run's labels are not the site's label set (node config "
                        "'labels'); the site maps labels by name and will not guess")
    records = process_cached(
        ("records", node.data_file, node.text_column, node.label_column, labels,
         node.patient_column),
        lambda: read_records(node.data_file, node.text_column, node.label_column, labels,
                             patient_column=node.patient_column))
    policy = Policy(node.epsilon_budget, node.delta, node.min_noise_multiplier,
                    node.max_noise_multiplier, node.dataset, node.run_epsilon_cap,
                    node.count_noise, node.require_secure_aggregation,
                    node.release_evaluation, app, node.unit, node.max_records_per_patient)
    data = site_split(records, node.val_fraction, node.split_seed, node.min_val_records)
    return Site(name, data, labels, policy, Path(node.state_dir), node.private)


def _approved_app(node: NodeConfig) -> str:
    """The approved app this process runs, as the hospital's task process states it; a
    guard against starting a hospital's site the wrong way (this check is in the app,
    so it is the app's own word: what enforces approval is `fedcare site clientapp`)."""
    app = os.environ.get(APPROVED_APP_ENV, "")
    if not node.require_approved_app:
        return app
    if not app:
        raise AppNotApproved(
            "this hospital runs only apps it approved, and this process was not started by "
            "its approval check: start the ClientApp with `fedcare site clientapp` beside a "
            "SuperNode in `--isolation process` (docs/run_across_hospitals.md), or set "
            "require-approved-app = false in the node config to run the operator's code "
            "unchecked")
    approvals = Path(os.environ.get(APPROVALS_LEDGER_ENV, "")).resolve()
    ledger = (Path(node.state_dir) / LEDGER_FILE).resolve()
    if approvals != ledger:
        raise AppNotApproved(
            f"`fedcare site clientapp` read its approvals from {approvals}, but this site "
            f"keeps its ledger at {ledger}: give it the node config's state-dir")
    names = sorted({str(e.get("site")) for _, e in parse_ledger_bytes(ledger.read_bytes())[0]}
                   - {node.site}) if ledger.is_file() else []
    if names:
        raise AppNotApproved(
            f"the approvals in {ledger} belong to site {names[0]!r}, but this node config names "
            f"site {node.site!r}: approve again in a fresh state-dir with "
            f"`fedcare site approve ... --node-config FILE`, or correct the node config's site")
    return app


def simulated_state_dir(cfg: Config, run_id: str, site: str) -> Path:
    """Where a simulated site without `site.state_dir` keeps its keys, ledger and
    cached features: in the run's directory, as `fedcare simulate` does, so every run
    (through either door) starts with fresh simulated sites."""
    return (Path(cfg.simulation.output_dir).resolve() / check_name("run id", run_id)
            / "site_state" / check_name("site name", site))


LOG_FILE = "site.log"


def log_file(cfg: Config | None, context: Context) -> Path | None:
    """The site's own log file (in its state folder, never sent), where it can be told
    before the site itself is built: a hospital's `state-dir`, or a simulated site's
    folder under `site.state_dir`. None when neither is known."""
    node = dict(context.node_config)
    if "state-dir" in node:
        return Path(str(node["state-dir"])) / LOG_FILE
    try:
        cfg = cfg or from_run_config(context.run_config)
    except ValueError:
        return None
    if cfg.site.state_dir and "partition-id" in node:
        name = str(node.get("site", f"site{node['partition-id']}"))
        return Path(cfg.site.state_dir) / name / LOG_FILE
    return None
