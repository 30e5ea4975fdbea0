"""`fedcare audit empirical`: a lower bound on ε, measured from one private run.

One simulation of the configuration, with canaries (common/privacy/canaries.py) in
the training data of the first `sites` simulated sites, through the same code a run
takes: the site's DP-SGD loop, Opacus, the accountant, the ledger and the server. Then
each kind of canary is scored, the one-run bound computed (common/privacy/one_run.py)
and set against the ε the canary sites' ledgers claim: a bound above a claim is a
failed audit.

The audit sees each site's own update (secure aggregation off): the operator's view
without SecAgg+, the most a site's ε must hold against. Its sites release no validation
counts, so their whole ε goes to training (and the size count): the mechanism under test. Controls break the mechanism
the way a bug would, from outside the training code: `noise` makes Opacus add no
noise, `clipping` makes it sum per-example gradients unclipped, while the ledger still
claims the planned ε. A control claims ε = 1 (the bound one run can show with m = 1000
canaries tops out near 5.4, so a claim of 8 could never be caught).

Where the sites protect patients, the canaries are patients of `notes` notes each
(common/privacy/canaries.py), the bound is over canary patients and the claim is ε per
patient, as the ledgers state it. The `unit` control audits the same canary patients in
a run whose sites protect records: each note is clipped alone, so a patient moves the
update by up to `notes`·C, and the record-level claim does not hold for the patient.
"""

from __future__ import annotations

import dataclasses
import json
import math
import secrets
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np

from common.config import Config
from common.errors import ConfigError, RunError
from common.privacy import canaries as canary_set
from common.privacy.canary_scores import UpdateLog, feature_basis, input_scores
from common.privacy.one_run import CONFIDENCE, audit, guesses

RESULT_FILE, CANARIES_FILE = "empirical.json", "canaries.json"
CONTROL_EPSILON = 1.0
NOTES_PER_PATIENT = 8  # the default size of a canary patient (docs/empirical_audit.md)


# -- controls: the mechanism broken in the site's process, as a bug would break it --------
def _patched(owner, name: str, replacement, msg, context, call_next):
    """call_next with owner.name replaced for the call's duration."""
    original = getattr(owner, name)
    setattr(owner, name, replacement)
    try:
        return call_next(msg, context)
    finally:
        setattr(owner, name, original)


def _no_noise(msg, context, call_next):
    import torch
    from opacus.optimizers import optimizer

    def silent(std, reference, *args, **kwargs):
        return torch.zeros_like(reference)

    return _patched(optimizer, "_generate_noise", silent, msg, context, call_next)


def _no_clipping(msg, context, call_next):
    from opacus.optimizers import optimizer

    def unclipped(self) -> None:
        for p in self.params:
            grad = self._get_flat_grad_sample(p).to(p.dtype).sum(0)
            p.summed_grad = grad if p.summed_grad is None else p.summed_grad + grad
            optimizer._mark_as_processed(p.grad_sample)

    return _patched(optimizer.DPOptimizer, "clip_and_accumulate", unclipped, msg, context,
                    call_next)


BREAKS = {"noise": _no_noise, "clipping": _no_clipping}
# unit: the sites protect records while the canaries are patients (no mod: the config)
CONTROLS = (*BREAKS, "unit")
SAYS = {"noise": "noise off", "clipping": "clipping off",
        "unit": "the sites protect records, the canaries are patients"}


def canary_notes(cfg: Config, notes: int | None = None) -> int:
    """How many notes a canary has: `notes`, else NOTES_PER_PATIENT where the sites
    protect patients and 1 (a record) where they protect records."""
    if notes is None:
        return NOTES_PER_PATIENT if cfg.site.privacy_unit == "patient" else 1
    if notes < 1:
        raise ConfigError(f"--notes must be at least 1 (got {notes})")
    return notes


def run(cfg: Config, m: int = 1000, sites: int = 1, broken: str = "",
        run_dir: Path | None = None, verbose: bool = False,
        say: Callable[[str], None] = print, notes: int | None = None) -> dict:
    """Audit `cfg` with m canaries of each kind, each of `notes` notes (canary_notes);
    returns the result written to <run_dir>/audit/empirical.json."""
    from common.data import held_out
    from common.model import build_model, load_tokenizer, trainable_head, trainable_names
    from server.app import run_dir_for
    from simulations.run import simulate

    notes = canary_notes(cfg, notes)
    if broken == "unit" and notes < 2:
        raise ConfigError("--break unit audits canary patients at sites that protect "
                          "records: give --notes 2 or more (or a config whose "
                          "site.privacy_unit is patient)")
    cfg = _audited(cfg, m, sites, broken)
    started = time.perf_counter()
    run_dir = Path(run_dir).resolve() if run_dir else run_dir_for(cfg, "audit")
    _, test = held_out(cfg.data)
    labels = test.label_names
    model = build_model(cfg.model.base_model, len(labels), cfg.lora, cfg.model.pooling)
    head = trainable_head(model)
    names = trainable_names(model)
    head_index = next(i for i, n in enumerate(names) if n.endswith("weight")
                      and ("classifier" in n) and "lora_" not in n)
    site_names = [f"site{i}" for i in range(sites)]
    words = canary_set.vocabulary_words(load_tokenizer(cfg.model.base_model))
    rng = np.random.default_rng(secrets.randbits(128))
    made = canary_set.make(m, words, labels, head.weight.numel(), site_names, rng, notes)
    included = canary_set.draw_membership(len(made))  # secret until scoring
    folder = Path(tempfile.mkdtemp(prefix="fedcare-canaries-"))
    try:
        canary_set.write_site_files(folder, made, included)
        cfg = dataclasses.replace(cfg, simulation=dataclasses.replace(
            cfg.simulation, canaries=str(folder)))
        say("audit: the public records' feature span (to tell real gradients from canaries)")
        log = UpdateLog(head_index, tuple(head.weight.shape),
                        {s: np.array([c.coordinate for c in made
                                      if c.kind == "gradient" and c.site == s], dtype=int)
                         for s in site_names},
                        feature_basis(cfg, model, [test, canary_set.as_dataset(
                            [c for c in made if c.kind == "input"], labels)]))
        unit = f"patients of {notes} notes" if notes > 1 else "records"
        say(f"audit: {m} input and {m} gradient canaries ({unit}) at "
            f"{', '.join(site_names)}, each included with probability 1/2 "
            f"({int(included.sum())} in); training"
            + (f" with a control ({SAYS[broken]})" if broken else ""))
        simulate(cfg, run_dir, verbose, observe=log,
                 client_mods=[BREAKS[broken]] if broken in BREAKS else ())
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    say("audit: scoring the canaries")
    kinds = np.array([c.kind for c in made])
    scores = {"input": input_scores(run_dir, [c for c in made if c.kind == "input"]),
              "gradient": _gradient_scores(log, made)}
    member = {kind: included[kinds == kind] for kind in ("input", "gradient")}
    summary = json.loads((run_dir / "summary.json").read_text())
    claimed = max(float(summary["epsilon_per_site"].get(s) or 0.0) for s in site_names)
    result, picked = _result(cfg, scores, member, claimed, site_names, broken, m)
    result["claim_unit"] = claim_unit(run_dir, site_names)
    result["canary_unit"] = "patient" if notes > 1 else "record"
    result["notes_per_canary"] = notes
    result["seconds"] = round(time.perf_counter() - started, 1)
    result["run_dir"] = str(run_dir)
    out = run_dir / "audit"
    out.mkdir(exist_ok=True)
    canary_set.save(out / CANARIES_FILE, made, included, scores, picked)
    (out / RESULT_FILE).write_text(json.dumps(result, indent=2) + "\n")
    from common.privacy.report import write_report  # the run's report, with the bounds
    write_report(run_dir, run_dir / "audit_report.html", run_dir / "audit_report.json")
    return result


def sweep(cfg: Config, m: int = 1000, sites: int = 1, base: Path | None = None,
          repeats: int = 3, verbose: bool = False,
          say: Callable[[str], None] = print,
          notes: int | None = None) -> tuple[list[dict], bool]:
    """The full audit: `repeats` audits with fresh canaries and membership, then the
    noise-off and clipping-off controls and, where the canaries are patients, the unit
    control, in subfolders of `base`. True when every audit passed and every control
    was caught."""
    from server.app import run_dir_for

    base = Path(base).resolve() if base else run_dir_for(cfg, "audit")
    notes = canary_notes(cfg, notes)
    plan = [(f"run-{i + 1}", "") for i in range(repeats)] + [
        (f"{broken}-off", broken) for broken in BREAKS] + (
        [("record-unit", "unit")] if notes > 1 else [])
    results = []
    for name, broken in plan:
        say(f"audit {len(results) + 1}/{len(plan)}: {name}")
        results.append(run(cfg, m, sites, broken, base / name, verbose, say, notes))
        say(describe(results[-1]))
    ok = all((r["verdict"] == "failed") == bool(r["control"]) for r in results)
    (base / "empirical_summary.json").write_text(json.dumps(
        {"ok": ok, "runs": [{k: r[k] for k in ("run_dir", "control", "verdict",
                                               "claimed_epsilon", "claim_unit",
                                               "notes_per_canary", "seconds")}
                            | {kind: r["kinds"][kind]["epsilon"] for kind in r["kinds"]}
                            | {f"{kind}_auc": r["kinds"][kind]["auc"] for kind in r["kinds"]}
                            for r in results]}, indent=2) + "\n")
    return results, ok


def _audited(cfg: Config, m: int, sites: int, broken: str) -> Config:
    if not cfg.privacy.enabled:
        raise ConfigError("an empirical audit tests the DP mechanism: privacy.enabled is false")
    if broken and broken not in CONTROLS:
        raise ConfigError(f"--break must be one of {', '.join(CONTROLS)} (got {broken!r})")
    if not 1 <= sites <= cfg.simulation.num_sites:
        raise ConfigError(f"--sites must be in [1, simulation.num_sites = "
                          f"{cfg.simulation.num_sites}] (got {sites})")
    if m < 2 * sites:
        raise ConfigError(f"--canaries must be at least 2 per canary site ({2 * sites}; "
                          f"got {m}): a site's scores need a spread")
    privacy, fed, site = cfg.privacy, cfg.federation, cfg.site
    if broken:
        privacy = dataclasses.replace(privacy, target_epsilon=min(privacy.target_epsilon,
                                                                  CONTROL_EPSILON))
    if broken == "unit":
        site = dataclasses.replace(site, privacy_unit="record")
    # fresh simulated sites: a lasting state folder would carry one audit's ledger (and
    # its spent ε) into the next
    return dataclasses.replace(cfg, privacy=privacy,
                               federation=dataclasses.replace(fed, secure_aggregation="off"),
                               site=dataclasses.replace(site, release_evaluation=False,
                                                        state_dir=""))


def claim_unit(run_dir: Path, site_names) -> str:
    """Whom the canary sites' claimed ε protects, "record" or "patient", as every entry
    of their ledgers states it; a missing ledger or a mix of units is refused."""
    from common.privacy.entries import unit_of

    units = set()
    for site in site_names:
        path = run_dir / "ledgers" / f"{site}.jsonl"
        if not path.is_file():
            raise RunError(f"the audit found no ledger for {site} at {path}")
        units |= {unit_of(json.loads(line)) for line in path.read_text().splitlines()
                  if line.strip()}
    if len(units) != 1:
        raise RunError(f"the canary sites' ledgers name {sorted(units) or 'no'} units of "
                       "privacy: one claim per unit is needed to audit it")
    return units.pop()


def _gradient_scores(log: UpdateLog, made) -> np.ndarray:
    """The gradient canaries' scores in canary order (UpdateLog scores each site's own
    canaries, in the order their coordinates were given to it)."""
    grad = [c for c in made if c.kind == "gradient"]
    out = np.zeros(len(grad))
    for site in log.coordinates:
        out[[k for k, c in enumerate(grad) if c.site == site]] = log.scores(site)
    return out


def _result(cfg: Config, scores: dict, member: dict, claimed: float, site_names,
            broken: str, m: int) -> tuple[dict, dict]:
    delta = cfg.privacy.delta
    kinds, picked = {}, {}
    for kind in ("input", "gradient"):
        found = audit(scores[kind], member[kind], delta)
        # the verdict tests both kinds, so each at half the error: it holds at 95%
        strict = audit(scores[kind], member[kind], delta, 1 - (1 - CONFIDENCE) / 2)
        picked[kind] = guesses(scores[kind], found.k_in, found.k_out)
        kinds[kind] = {**dataclasses.asdict(found), "canaries": int(len(member[kind])),
                       "auc": None if math.isnan(found.auc) else found.auc,
                       "included": int(np.sum(member[kind])),
                       "epsilon_for_verdict": strict.epsilon,
                       "exceeds_claim": strict.epsilon > claimed}
    failed = any(k["exceeds_claim"] for k in kinds.values())
    return {
        "verdict": "failed" if failed else "passed",
        "claimed_epsilon": claimed, "delta": delta, "confidence": CONFIDENCE,
        "canary_sites": list(site_names), "canaries_per_kind": m,
        "control": broken or None,
        "view": "each site's own update (secure aggregation off)",
        "kinds": kinds,
    }, picked


def describe(result: dict) -> str:
    """The audit's outcome in a few lines for the terminal."""
    lines = []
    for kind, k in result["kinds"].items():
        auc = "" if k["auc"] is None else f", membership AUC {k['auc']:.3f}"
        lines.append(f"  {kind:8s} canaries: ε per {result.get('canary_unit', 'record')} ≥ "
                     f"{k['epsilon']:.3f} at "
                     f"{result['confidence']:.0%} ({k['correct']}/{k['guesses']} guesses "
                     f"right{auc})" + ("  EXCEEDS THE CLAIM" if k["exceeds_claim"] else ""))
    control = f" [control: {SAYS[result['control']]}]" if result["control"] else ""
    notes = result.get("notes_per_canary", 1)
    canaries = (f"canary patients of {notes} notes" if result.get("canary_unit") == "patient"
                else "canary records")
    head = (f"empirical audit {result['verdict'].upper()}{control}: claimed ε per "
            f"{result.get('claim_unit', 'record')} = {result['claimed_epsilon']:.3f} "
            f"(δ = {result['delta']:g}) at {', '.join(result['canary_sites'])}; bounds "
            f"over {canaries}")
    return "\n".join([head, *lines])
