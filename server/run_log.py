"""The run directory: resolved config, per-round per-site metrics, progress, summary.

    RUN/config.yaml      the resolved configuration (every default written out)
    RUN/metrics.jsonl    one line per (round, phase, site): train, evaluate, test
    RUN/adapter/         the final global adapter in PEFT format
    RUN/ledgers/         each site's signed ledger and public key, and <site>.heads.jsonl:
                         every ledger head ("seq:hash") the site reported, with its round
                         and phase: evidence the auditor checks the ledger still extends
    RUN/summary.json     final test metrics, ε and δ per site, wall time, bytes per round

A site keeps its training loss and timings; its evaluation metrics come from a noisy
confusion matrix (no loss), or not at all (`evaluated` False).

Size: the one writer of the run directory, so that what the folder holds is read in
one place.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import yaml

from common.config import Config, dump_yaml
from common.message_keys import Keys
from common.metrics import weighted_mean
from common.privacy.approvals import releases
from common.privacy.entries import dataset_of, unit_of
from common.privacy.ledger import heads_file


ALL_SITES = "all"  # the example-weighted mean over sites, written after each evaluation
METRICS = ("loss", "accuracy", "macro_recall", "macro_f1", "macro_auroc", "ece")


def privacy_label(cfg: Config) -> str:
    p = cfg.privacy
    if not p.enabled:
        return "NON-PRIVATE (no differential privacy)"
    return f"private: DP-SGD, target ε={p.target_epsilon:g}, δ={p.delta:g} per site"


def _clean(value):
    """JSON has no NaN/inf: write them as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class RunRecorder:
    """`resume_after`: the run directory holds this run up to that round (its
    checkpoint's); rows of later rounds, written before the server stopped, are
    dropped and written again as the rounds are. `deployed`: the sites are real, so
    the config's simulation and site sections, which describe simulated sites, are
    left out of config.yaml (each site's own δ and budget go to summary.json)."""

    def __init__(self, run_dir: Path, cfg: Config, out=None,
                 resume_after: int | None = None, deployed: bool = False) -> None:
        self.dir = Path(run_dir)
        metrics = self.dir / "metrics.jsonl"
        if (self.dir / "summary.json").exists() or (metrics.exists() and resume_after is None):
            raise RuntimeError(f"{self.dir} already holds a run, and a run directory holds "
                               "one run: choose another simulation.run_name"
                               + ("" if resume_after is None else " (this one has finished)"))
        self.dir.mkdir(parents=True, exist_ok=True)
        self.cfg, self.out = cfg, out
        self.start = time.perf_counter()
        self.rows: list[dict] = []
        self.warned: set[str] = set()
        self.bad_names: set[str] = set()
        if resume_after is None:
            _write_whole(self.dir / "config.yaml", _config_text(cfg, deployed))
        else:
            self._keep_rows(metrics, resume_after)
        self._metrics = metrics.open("a", encoding="utf-8")
        self.say(f"fedcare run {self.dir} — {privacy_label(cfg)}")

    def _keep_rows(self, metrics: Path, last_round: int) -> None:
        lines = metrics.read_text(encoding="utf-8").splitlines() if metrics.exists() else []
        for line in lines:
            try:
                row = json.loads(line)
            except ValueError:
                continue  # the line a kill cut short
            if isinstance(row, dict) and row.get("round", last_round + 1) <= last_round:
                self.rows.append(row)
        partial = metrics.with_suffix(".partial")
        partial.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in self.rows),
                           encoding="utf-8")
        partial.replace(metrics)

    def site_problems(self, limit: int = 0) -> list[str]:
        """'site: why' for every reply not accepted (refused, rejected, failed)."""
        out = sorted({f"{site}: {p['status']}" for site, found in self._problems().items()
                      for p in found})
        return out[:limit] if limit else out

    def say(self, line: str) -> None:
        print(line, file=self.out or sys.stdout, flush=True)  # sys.stdout as it is now

    def _ledger_path(self, site: str) -> Path | None:
        """ledgers/<site>.jsonl, or None (and a warning) for a name that would leave
        the folder; sites' names are checked upstream, this is the last line."""
        folder = self.dir / "ledgers"
        if not site or site.endswith(".heads") or any(
                bad in site for bad in ("/", "\\", "..", "\0")):
            if site not in self.bad_names:  # once per name, not per row
                self.bad_names.add(site)
                self.say(f"WARNING: site name {site!r} cannot name a file in {folder}; its "
                         "ledger and heads are not kept.")
            return None
        folder.mkdir(exist_ok=True)
        return folder / f"{site}.jsonl"

    def store_ledger(self, site: str, ledger: str, public_key: str) -> None:
        """Keep the site's signed ledger beside its public key, for `fedcare audit`.
        A ledger that does not extend the copy already held is kept too, and flagged."""
        path = self._ledger_path(site)
        if path is None:
            return
        if path.exists() and not ledger.startswith(path.read_text(encoding="utf-8")):
            self.say(f"WARNING: {site} sent a ledger that rewrites its earlier entries; "
                     f"the earlier copy is kept as {path.name}.previous")
            path.replace(path.with_name(f"{site}.jsonl.previous"))
        path.write_text(ledger, encoding="utf-8")
        if public_key:
            path.with_name(f"{site}.pub.pem").write_text(public_key, encoding="utf-8")

    def store_head(self, site: str, phase: str, round_no: int, head: str) -> None:
        """Append a head the site reported; the site cannot take it back later."""
        path = self._ledger_path(site)
        if path is None:
            return
        with heads_file(path).open("a", encoding="utf-8") as handle:
            handle.write(json.dumps({"round": round_no, "phase": phase, "head": str(head)})
                         + "\n")

    def record(self, phase: str, round_no: int, rows: list[dict]) -> None:
        stamp = round(time.perf_counter() - self.start, 2)
        for row in rows:
            ledger, key = row.pop(Keys.LEDGER, None), row.pop(Keys.SITE_PUBLIC_KEY, "")
            head = row.pop(Keys.LEDGER_HEAD, None)
            if head and Keys.SITE in row:
                self.store_head(str(row[Keys.SITE]), phase, round_no, head)
            if ledger is not None and Keys.SITE in row:
                self.store_ledger(str(row[Keys.SITE]), str(ledger), str(key))
                if phase == "train":
                    row.update(_budget_facts(str(ledger), self.dir.name))
                    self._say_prior_spending(row)
            row = {"round": round_no, "phase": phase, "wall_seconds": stamp,
                   "private": self.cfg.privacy.enabled,
                   **{k: _clean(v) for k, v in row.items() if not isinstance(v, bytes)}}
            self._write(row)
        evaluated = [r for r in rows if _evaluated(r)]
        if phase == "evaluate" and rows:
            self._write({"round": round_no, "phase": phase, "wall_seconds": stamp,
                         "private": self.cfg.privacy.enabled, Keys.SITE: ALL_SITES,
                         "num_examples": sum(r.get("num_examples", 0) for r in evaluated),
                         **_weighted(evaluated, METRICS)})
        self._metrics.flush()
        if phase == "evaluate":
            self.say(self.progress_line(round_no))

    def _write(self, row: dict) -> None:
        self.rows.append(row)
        self._metrics.write(json.dumps(row, sort_keys=True) + "\n")

    def _phase(self, phase: str, round_no: int) -> list[dict]:
        return [r for r in self.rows if r["phase"] == phase and r["round"] == round_no
                and r[Keys.SITE] != ALL_SITES]

    def progress_line(self, round_no: int) -> str:
        val = [r for r in self._phase("evaluate", round_no) if _evaluated(r)]
        f1 = _weighted(val, ("macro_f1",))["macro_f1"]
        parts = [f"round {round_no}/{self.cfg.federation.num_rounds}",
                 f"{time.perf_counter() - self.start:6.1f}s",
                 f"val macro-F1 {format_metric(f1)}"
                 + (" (DP-noised counts)" if self.cfg.privacy.enabled else "")]
        if self.cfg.privacy.enabled:
            rows = sorted(self._phase("train", round_no), key=lambda r: r[Keys.SITE])
            sigmas = sorted({round(r[Keys.NOISE_MULTIPLIER], 2) for r in rows
                             if r.get(Keys.NOISE_MULTIPLIER)})
            if sigmas:
                parts.append("σ " + "/".join(f"{v:.2f}" for v in sigmas))
            # a site's evaluation is a release too: its reply carries the ε after it
            later = {r[Keys.SITE]: r[Keys.EPSILON] for r in self._phase("evaluate", round_no)
                     if r.get(Keys.EPSILON) is not None}
            spent = {r[Keys.SITE]: max(r[Keys.EPSILON], later.get(r[Keys.SITE], 0.0))
                     for r in rows if r.get(Keys.EPSILON) is not None}
            units = {r.get(UNIT, "record") for r in rows if r[Keys.SITE] in spent}
            mixed = len(units) > 1
            eps = " ".join(f"{r[Keys.SITE]}={spent[r[Keys.SITE]]:.2f}"
                           + (f"({max(0.0, r[BUDGET] - spent[r[Keys.SITE]]):.2f})"
                              if r.get(BUDGET) is not None else "")
                           + (f"/{r.get(UNIT, 'record')}" if mixed else "")
                           for r in rows if r[Keys.SITE] in spent)
            per = "" if mixed or not units else f" per {units.pop()}"
            parts.append(f"ε{per} spent (left) {eps}")
        else:
            parts.append("NON-PRIVATE")
        if any(r.get(Keys.SECURE_AGGREGATION) for r in self._phase("train", round_no)):
            parts.append("SecAgg+")
        refused = [f"{r[Keys.SITE]} ({_short(r)})" for r in self._phase("train", round_no)
                   if r.get("status") != "accepted"]
        if refused:
            parts.append(f"no update from {', '.join(refused)}")
        failed = [f"{r[Keys.SITE]} ({r[Keys.ERROR]})" for r in self._phase("evaluate", round_no)
                  if r.get(Keys.ERROR)]
        if failed:
            parts.append(f"evaluation failed at {', '.join(failed)}: see each site's own log")
        return " | ".join(parts)

    def _say_prior_spending(self, row: dict) -> None:
        """Once per site and run: a site that had spent budget on this dataset in earlier
        runs trains with more noise than a fresh one; the operator should know why."""
        prior, site = row.get(PRIOR_EPSILON), row[Keys.SITE]
        if not prior or site in self.warned:
            return
        self.warned.add(site)
        self.say(f"NOTE: {site} had already spent ε={prior:.3g} of its budget "
                 f"{row.get(BUDGET):g} on this dataset in earlier runs, so this run gets only "
                 f"what is left: σ={row.get(Keys.NOISE_MULTIPLIER) or 0:.3g} "
                 "(more noise than a fresh site), or a refusal")

    def _personalization(self) -> dict | None:
        """Per site: the global and the personalised model on the site's own
        validation records (last round), when sites personalised."""
        last = self._phase("evaluate", self.cfg.federation.num_rounds)
        rows = [r for r in last if Keys.PERSONALIZED_ADAPTER in r
                or Keys.PERSONALIZED_REFUSED in r]
        return {r[Keys.SITE]: _split_personalized(r) for r in rows} or None

    def _site_delta(self, site: str) -> float | None:
        """The δ the site itself used (sites choose theirs): its last train row's, else
        its stored ledger's last entry's."""
        for r in reversed(self.rows):
            if r["phase"] == "train" and r[Keys.SITE] == site and r.get(Keys.DELTA):
                return float(r[Keys.DELTA])
        path = self.dir / "ledgers" / f"{site}.jsonl"
        try:
            lines = path.read_text(encoding="utf-8").splitlines() if path.is_file() else []
            entries = releases([json.loads(line) for line in lines if line.strip()])
            return float(entries[-1]["delta"]) if entries else None
        except (OSError, ValueError, KeyError, TypeError):
            return None  # an unreadable ledger is the auditor's finding

    def _site_budget(self, site: str) -> float | None:
        """The lifetime ε budget the site's own ledger states (its last train row's)."""
        for r in reversed(self.rows):
            if r["phase"] == "train" and r[Keys.SITE] == site and r.get(BUDGET) is not None:
                return r[BUDGET]
        return None

    def _site_unit(self, site: str) -> dict | None:
        """Whom the site's ε protects, as its ledger states: {"unit": "patient",
        "max_records_per_patient": 4} or {"unit": "record"}."""
        for r in reversed(self.rows):
            if r["phase"] == "train" and r[Keys.SITE] == site and r.get(UNIT):
                return {"unit": r[UNIT], **({BOUND: r[BOUND]} if r.get(BOUND) else {})}
        return None

    def _problems(self, aliases: dict[str, str] | None = None) -> dict:
        """Per site: each reply that was not accepted (refused, rejected, failed), with
        its round, phase and reason. `aliases`: node-<id> -> the site name that node
        used later (a site that failed before its first answer could not be named)."""
        aliases = aliases or {}
        out: dict[str, list] = {}
        for r in self.rows:
            status = r.get("status", "accepted")
            if r["phase"] in ("train", "evaluate") and r[Keys.SITE] != ALL_SITES and (
                    status != "accepted" or r.get(Keys.REFUSED) or r.get(Keys.ERROR)):
                why = (f"refused: {r.get(Keys.REFUSED)}" if r.get(Keys.REFUSED) else
                       f"error: {r.get(Keys.ERROR)}" if r.get(Keys.ERROR) else status)
                site = str(r[Keys.SITE])
                out.setdefault(aliases.get(site, site), []).append(
                    {"round": r["round"], "phase": r["phase"], "status": why})
        return out

    def summary(self, test_metrics: dict | None, extra: dict | None = None,
                aliases: dict[str, str] | None = None) -> dict:
        sites = sorted({r[Keys.SITE] for r in self.rows if r["phase"] == "train"
                        and r[Keys.SITE] != "?"})
        epsilon = {s: max((r[Keys.EPSILON] for r in self.rows if r[Keys.SITE] == s
                           and r.get(Keys.EPSILON) is not None), default=None) for s in sites}
        delta = {s: self._site_delta(s) for s in sites}
        bytes_sent = {s: {str(r["round"]): r.get(Keys.BYTES_SENT, 0) for r in self.rows
                          if r["phase"] == "train" and r[Keys.SITE] == s} for s in sites}
        out = {
            "run_id": self.dir.name,
            "privacy": privacy_label(self.cfg),
            "private": self.cfg.privacy.enabled,
            "rounds": self.cfg.federation.num_rounds,
            "sites": sites,
            "test": {k: _clean(v) for k, v in (test_metrics or {}).items()},
            "epsilon_per_site": epsilon if self.cfg.privacy.enabled else None,
            "delta": self.cfg.privacy.delta if self.cfg.privacy.enabled else None,  # target
            "delta_per_site": delta if self.cfg.privacy.enabled else None,
            "epsilon_budget_per_site": {s: self._site_budget(s) for s in sites}
            if self.cfg.privacy.enabled else None,
            "privacy_unit_per_site": {s: self._site_unit(s) for s in sites}
            if self.cfg.privacy.enabled else None,
            "problems_per_site": self._problems(aliases),
            "bytes_sent_per_site_per_round": bytes_sent,
            "wall_seconds": round(time.perf_counter() - self.start, 2),
            "personalization": self._personalization(),
            **(extra or {}),
        }
        _write_whole(self.dir / "summary.json", json.dumps(out, indent=2, sort_keys=True))
        self._metrics.close()
        return out


def _write_whole(path: Path, text: str) -> None:
    """Whole or absent: a server killed mid-write leaves no half file to be misread."""
    partial = path.with_suffix(".partial")
    partial.write_text(text, encoding="utf-8")
    partial.replace(path)


def _config_text(cfg: Config, deployed: bool) -> str:
    if not deployed:
        return dump_yaml(cfg)
    run = {k: v for k, v in cfg.to_dict().items() if k not in ("simulation", "site")}
    return ("# a deployed run: the sites are the hospitals in summary.json, each with its own\n"
            "# δ and ε budget (delta_per_site, epsilon_budget_per_site); the simulation and\n"
            "# site sections of the run config describe simulated sites and are left out\n"
            + yaml.safe_dump(run, sort_keys=False))


BUDGET, BUDGET_LEFT, PRIOR_EPSILON = "epsilon_budget", "epsilon_left", "epsilon_before_run"
UNIT, BOUND = "privacy_unit", "max_records_per_patient"  # as the site's ledger states them


def _budget_facts(ledger: str, run_id: str) -> dict:
    """The site's budget, what is left of it, and what it had spent on the same dataset
    before this run, read from the signed ledger the site sent (its last entry)."""
    try:
        entries = releases([json.loads(line) for line in ledger.splitlines() if line.strip()])
        last = entries[-1]
        same = [e for e in entries if dataset_of(e) == dataset_of(last)]
        budget = float(last["epsilon_budget"])
        before = [float(e["epsilon"]) for e in same if e.get("run_id") != run_id]
        facts = {BUDGET: budget, BUDGET_LEFT: max(0.0, budget - float(last["epsilon"])),
                 PRIOR_EPSILON: max(before, default=0.0)}
        unit = {UNIT: unit_of(last), BOUND: last.get(BOUND)}
    except (ValueError, KeyError, IndexError, TypeError):
        return {}  # an unreadable ledger is the auditor's finding, not the progress line's
    return {**facts, **unit} if all(math.isfinite(v) for v in facts.values()) else {}


def _split_personalized(row: dict) -> dict:
    names = ("accuracy", "macro_recall", "macro_f1", "macro_auroc", "ece")
    return {
        "global": {k: row.get(k) for k in names},
        "personalized": {k: row.get(f"personalized_{k}") for k in names},
        "saved_at_site": bool(row.get(Keys.PERSONALIZED_ADAPTER)),
        "refused": row.get(Keys.PERSONALIZED_REFUSED),
    }


def _evaluated(row: dict) -> bool:
    """A site row that carries evaluation metrics: not withheld, not failed."""
    return row.get(Keys.EVALUATED, True) is not False and not row.get(Keys.ERROR)


def _short(row: dict) -> str:
    """Why a site sent no usable update, in a few words."""
    if row.get("status") == "refused":
        return f"refused: {row.get(Keys.REFUSED)}"
    return str(row.get("status"))[:70]


def format_metric(value: float | None) -> str:
    return "—" if value is None else f"{value:.3f}"


def _weighted(rows: list[dict], keys) -> dict:
    """Example-weighted means of `keys` over site rows (None where no site has one)."""
    means = weighted_mean([(r.get("num_examples", 1), r) for r in rows])
    return {k: means.get(k) for k in keys}
