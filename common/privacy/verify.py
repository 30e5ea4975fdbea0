"""`fedcare audit verify`: check privacy ledgers without trusting the sites' software.

Signatures, the hash chain, ε monotone and within budget, and every claimed ε
re-derived from the recorded mechanism history with Google's dp_accounting (RDP and
PLD) - deliberately independent of fedcare's own (Opacus) accounting code.

Each claim is held to the accountant its entry names (docs/accounting.md):

* RDP claims ("opacus-rdp", or no name) to the re-derived RDP ε, less the relative
  `tolerance` (1%). The two libraries' RDP values differ by well under that: on the
  mechanisms measured ours was up to 0.04% above Opacus's (its subsampled-Gaussian
  bound differs at fractional orders) and elsewhere below it (more orders).
* PRV and PLD claims ("opacus-prv", "...pld") to the re-derived PLD ε. Both a PRV
  claim (Opacus's eps_upper) and our PLD (pessimistic connect-the-dots) are upper
  bounds on the true ε, so an honest claim can sit below our PLD only by PLD's own
  pessimism. That pessimism is quadratic in the discretisation interval h, so
  PLD(2h) - PLD(h), about three times it, bounds it (pld_error). A claim is flagged when
  it is below PLD(h) - pld_error - PRV_EPS_ERROR: below a lower bound on the true ε by
  more than the precision the PRV accountant states for its value.

Accounting is per dataset (an entry's `dataset`, or its fingerprint in older ledgers),
across the dataset's data versions. An evaluate or size entry is one unsampled Gaussian
mechanism: it composes as a Poisson-sampled Gaussian at q = 1. A run directory also
holds the ledger heads ("seq:hash") the server received from each site; a ledger that
no longer contains one of them was cut off or rewritten after the server saw it.

Approval entries (common/privacy/approvals.py) account for nothing; once a site
approves apps, every release it makes must name an app approved at that point.

Size: one module on purpose. It is what an auditor reads end to end, trusting nothing
else of fedcare: it imports the ledger's format and the signing keys, never the sites'
accounting code.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from dp_accounting.pld import privacy_loss_distribution as pld_lib
from dp_accounting.rdp import rdp_privacy_accountant as rdp_module

from common.errors import FedcareError
from common.privacy.approvals import APPROVAL, APP_FIELD, app_problems, releases
from common.privacy.entries import RELEASES_NOTHING, UNITS, unit_of
from common.privacy.ledger import (
    HEADS_SUFFIX, chain_problems, heads_file, parse_head, parse_ledger_bytes,
)
from common.privacy.signing import (
    KeyFileError, load_public_key, public_key_fingerprint, signature_valid,
)

# dp_accounting logs (through absl) every RDP order it cannot evaluate and then
# leaves out; leaving orders out only makes ε larger, so the message is noise here.
logging.getLogger("absl").setLevel(logging.ERROR)

# dp_accounting's default orders plus every 0.05 below 11: a superset of Opacus's
# default alphas, so our RDP is at or within 0.04% of an honest Opacus RDP claim.
AUDIT_ORDERS = tuple(sorted(set(rdp_module.DEFAULT_RDP_ORDERS)
                            | {1 + k / 20 for k in range(1, 200)}))
# PLD is the tight reference; 1e-3 keeps a 50-round audit to seconds and, being a
# pessimistic discretisation, still upper-bounds the true ε: by 4e-6 at 16 steps,
# 7e-4 at 2,250 and 3e-3 at 10,000 (measured against an interval of 5e-5).
PLD_DISCRETIZATION = 1e-3
# The ε error Opacus's PRVAccountant states for its value (its eps_error, which fedcare
# passes explicitly): a PRV claim may sit this far below a lower bound on the true ε.
PRV_EPS_ERROR = 0.01
History = tuple[tuple[float, float, int], ...]


class VerifyInputError(FedcareError, ValueError):
    """The path given to the verifier holds no ledger, or a key directory is missing."""


@dataclass(frozen=True)
class Problem:
    site: str
    seq: int | None  # None when the problem is not one entry's (a bad line, the keys)
    message: str


@dataclass(frozen=True)
class EntryResult:
    seq: int | None
    round: int | None
    kind: str
    data_fingerprint: str
    noise_multiplier: float | None
    sample_rate: float | None
    steps: int | None
    max_grad_norm: float | None
    delta: float | None
    epsilon_claimed: float | None
    epsilon_budget: float | None
    epsilon_rdp: float | None  # re-derived; None when the entry could not be read
    epsilon_pld: float | None
    reason: str | None
    time: str | None
    accountant: str | None = None  # the accountant the entry names, e.g. "opacus-prv"
    reference: str | None = None   # what its claim is held to: "rdp" or "pld"
    dataset: str | None = None     # the budget identity; data_fingerprint is its version
    run_id: str | None = None
    withheld: str | None = None    # a train entry's reason for not sending its update
    released_value: float | None = None  # a size entry's noisy count
    app_sha256: str | None = None  # the approved app it was made under, when the site says
    privacy_unit: str = "record"   # whom its ε protects: a record, or a patient
    max_records_per_patient: int | None = None  # k, the patient unit's contribution bound


@dataclass(frozen=True)
class ApprovalResult:
    seq: int | None
    app_sha256: str | None
    approved: bool  # False: a revocation
    by: str | None
    reason: str | None
    time: str | None


@dataclass(frozen=True)
class SiteResult:
    site: str
    ledger: str
    keys_pinned: bool
    key_fingerprints: tuple[str, ...]
    entries: tuple[EntryResult, ...]
    problems: tuple[Problem, ...]
    approvals: tuple[ApprovalResult, ...] = ()  # in ledger order

    @property
    def status(self) -> str:
        if self.problems:
            return "problems"
        return "verified" if self.keys_pinned else "verified (keys unpinned)"

    @property
    def app_approval(self) -> str:
        """Whether the site says which code ran on its records, in words: once it
        approves apps every release must name one it approved (app_problems); a site
        that never approved one ran whatever app the operator sent."""
        if self.approvals:
            return (f"approved apps only: {len(self.approvals)} approval entr"
                    f"{'y' if len(self.approvals) == 1 else 'ies'} in its ledger, every "
                    "release checked against them")
        if not any(e.kind not in ("refusal", "dataset") for e in self.entries):
            return "no app approved, and nothing released"
        return ("UNAPPROVED: its ledger holds no app approval, so its releases were made by "
                "whatever app the operator sent, unchecked (a node config with "
                "require-approved-app = false)")


@dataclass(frozen=True)
class VerifyReport:
    path: str
    tolerance: float
    trusted_keys: str | None
    sites: tuple[SiteResult, ...]

    @property
    def problems(self) -> tuple[Problem, ...]:
        return tuple(p for site in self.sites for p in site.problems)

    @property
    def ok(self) -> bool:
        return not self.problems


@lru_cache(maxsize=256)
def _rdp_per_step(sigma: float, q: float) -> np.ndarray:
    # The function RdpAccountant itself applies to PoissonSampled(Gaussian) events;
    # cached per (σ, q) because RDP composes by addition (pinned dp-accounting 0.6.0).
    return rdp_module._compute_rdp_poisson_subsampled_gaussian(q, sigma, AUDIT_ORDERS)


def rdp_epsilon(history: History, delta: float) -> float:
    """ε(δ) of the Poisson-subsampled Gaussian steps in `history`, by RDP."""
    if not history:
        return 0.0
    total = sum(steps * _rdp_per_step(sigma, q) for sigma, q, steps in history)
    return float(rdp_module.compute_epsilon(AUDIT_ORDERS, total, delta)[0])


# Bounds on what a ledger may ask the verifier to compute: below σ=0.1 ε is in the
# hundreds at any useful step count (and the PLD grows without bound in memory); a
# million steps in one entry is far beyond any round. Past either, the release is
# reported and counted as unbounded instead of being re-derived.
MIN_SIGMA, MAX_STEPS = 0.1, 1_000_000


@lru_cache(maxsize=256)
def _pld_step(sigma: float, q: float, interval: float) -> pld_lib.PrivacyLossDistribution:
    # Exactly what PLDAccountant builds for PoissonSampled(q, Gaussian(σ)); PLD objects
    # are immutable (compose returns a new one), so cached ones are safe to share.
    return pld_lib.from_gaussian_mechanism(
        standard_deviation=sigma, sampling_prob=q, value_discretization_interval=interval)


@lru_cache(maxsize=1024)
def _pld_after(history: History, interval: float) -> pld_lib.PrivacyLossDistribution:
    if not history:
        return pld_lib.identity(value_discretization_interval=interval)
    sigma, q, steps = history[-1]
    return _pld_after(history[:-1], interval).compose(
        _pld_step(sigma, q, interval).self_compose(steps))


def pld_epsilon(history: History, delta: float,
                interval: float = PLD_DISCRETIZATION) -> float:
    """ε(δ) of the same history by privacy loss distributions (tighter than RDP); a
    pessimistic estimate: at or above the true ε."""
    return float(_pld_after(history, interval).get_epsilon_for_delta(delta)) if history else 0.0


def pld_error(history: History, delta: float) -> float:
    """An upper estimate of how far pld_epsilon lies above the true ε: PLD(2h) - PLD(h).
    The pessimism of PLD(h) grows as h², so this difference is about three times it."""
    if not history:
        return 0.0
    return max(0.0, pld_epsilon(history, delta, 2 * PLD_DISCRETIZATION)
               - pld_epsilon(history, delta))


def compare_accountants(sigma: float, q: float, steps: int, delta: float) -> dict:
    """One mechanism by every accountant fedcare knows: "prv" (fedcare's claim, Opacus
    PRV), "rdp" (Opacus RDP, the claim under privacy.accountant=rdp), "pld" (this
    verifier's dp_accounting PLD) and their ratios to PLD, for benchmarks and docs."""
    from common.privacy import accounting  # Opacus: only here, never in verification

    history = ((float(sigma), float(q), int(steps)),)
    prv = accounting.epsilon(history, delta, "prv")
    rdp = accounting.epsilon(history, delta, "rdp")
    pld = pld_epsilon(history, delta)
    return {"sigma": sigma, "q": q, "steps": steps, "delta": delta, "prv": prv, "rdp": rdp,
            "pld": pld, "prv_over_pld": prv / pld, "rdp_over_pld": rdp / pld}


def verify_path(path: Path, trusted_keys: Path | None = None,
                tolerance: float = 1e-2) -> VerifyReport:
    """Verify one ledger file, or every `ledgers/<site>.jsonl` of a run directory."""
    path = Path(path)
    if trusted_keys is not None and not Path(trusted_keys).is_dir():
        raise VerifyInputError(f"Trusted key directory {trusted_keys} does not exist; pass "
                               "the folder holding <site>.pub.pem for every site.")
    orphans: list[Path] = []
    if path.is_file():
        ledgers, run_dir = [path], False
    elif path.is_dir():
        folder = path / "ledgers" if (path / "ledgers").is_dir() else path
        ledgers = sorted(p for p in folder.glob("*.jsonl") if not p.name.endswith(HEADS_SUFFIX))
        orphans = sorted(p for p in folder.glob("*" + HEADS_SUFFIX)
                         if not p.with_name(p.name[:-len(HEADS_SUFFIX)] + ".jsonl").exists())
        run_dir = True
    else:
        raise VerifyInputError(f"{path} does not exist; pass a ledger file or a run directory.")
    if not ledgers and not orphans:
        raise VerifyInputError(f"No ledgers found in {path}: expected "
                               f"{path}/ledgers/<site>.jsonl beside <site>.pub.pem.")
    sites = tuple(_verify_ledger(ledger, trusted_keys, tolerance, run_dir)
                  for ledger in ledgers)
    # The server holds heads from a site whose ledger is gone: nothing left to verify.
    sites += tuple(SiteResult(
        p.name[:-len(HEADS_SUFFIX)], str(p.with_name(p.name[:-len(HEADS_SUFFIX)] + ".jsonl")),
        False, (), (), (Problem(p.name[:-len(HEADS_SUFFIX)], None,
                                f"The server received ledger heads from this site ({p.name}) "
                                "but its ledger is missing: restore the site's ledger."),))
        for p in orphans)
    return VerifyReport(str(path), tolerance, None if trusted_keys is None
                        else str(trusted_keys), sites)


def _verify_ledger(ledger: Path, trusted_keys: Path | None, tolerance: float,
                   run_dir: bool) -> SiteResult:
    good, bad = parse_ledger_bytes(ledger.read_bytes())
    entries = [entry for _, entry in good]
    names = {e.get("site") for e in entries if isinstance(e.get("site"), str)}
    site = sorted(names)[0] if len(names) == 1 else ledger.stem
    problems = [Problem(site, None, f"{ledger.name}: {message}") for _, message in bad]
    if len(names) > 1:
        problems.append(Problem(site, None, f"The ledger names several sites {sorted(names)}; "
                                            "one ledger must hold one site's entries."))
    elif run_dir and names and site != ledger.stem:
        problems.append(Problem(site, None, f"Ledger file {ledger.name} holds entries of "
                                            f"site {site!r}; the file name must match."))
    problems += [Problem(site, _seq(entries[pos], pos), message)
                 for pos, message in chain_problems(entries, [n for n, _ in good])]
    problems += _check_heads(site, heads_file(ledger), entries)
    pinned, key_problems = _check_signatures(site, ledger, entries, trusted_keys)
    rows, account_problems = _check_accounting(site, releases(entries), tolerance)
    account_problems += [Problem(site, _seq(entries[pos], pos), message)
                         for pos, message in app_problems(entries)]
    approvals = tuple(ApprovalResult(_seq(e, pos), _text(e, APP_FIELD), e.get("approved") is True,
                                     _text(e, "by"), _text(e, "reason"), _text(e, "time"))
                      for pos, e in enumerate(entries) if e.get("kind") == APPROVAL)
    fingerprints = tuple(sorted({str(e.get("key_fingerprint")) for e in entries}))
    return SiteResult(site, str(ledger), pinned, fingerprints, tuple(rows),
                      tuple(problems + key_problems + account_problems), approvals)


def _check_heads(site: str, heads: Path, entries: list[dict]) -> list[Problem]:
    """Every head the server received must still be in the ledger: a site that cuts
    entries off (to get its budget back) or rewrites them cannot also change what the
    server already holds."""
    if not heads.exists():
        return []
    try:
        lines = heads.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeError) as exc:
        return [Problem(site, None, f"{heads.name} cannot be read ({exc}), so the heads the "
                                    "server received cannot be checked.")]
    hashes: dict[int, set[str]] = {}
    for pos, entry in enumerate(entries):  # a forged seq or hash may be any JSON value
        hashes.setdefault(_seq(entry, pos), set()).add(str(entry.get("hash")))
    problems, seen = [], set()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            round_no, (seq, digest) = record["round"], parse_head(record["head"])
        except (ValueError, KeyError, TypeError) as exc:
            problems.append(Problem(site, None, f"{heads.name} line {number} is not a head "
                                                f"record {{round, phase, head: 'seq:hash'}} "
                                                f"({exc}); that head cannot be checked."))
            continue
        if (seq, digest) in seen:
            continue
        seen.add((seq, digest))
        if digest not in hashes.get(seq, ()):
            problems.append(Problem(site, seq, f"{heads.name}: the ledger does not extend a head "
                                               f"the server received in round {round_no} (seq "
                                               f"{seq}): entries were cut off or rewritten."))
    return problems


def _check_signatures(site: str, ledger: Path, entries: list[dict],
                      trusted_keys: Path | None) -> tuple[bool, list[Problem]]:
    problems: list[Problem] = []
    beside = ledger.with_suffix(".pub.pem")
    if not beside.exists() and (ledger.parent / "site_key.pub.pem").exists():
        beside = ledger.parent / "site_key.pub.pem"  # a site's own state folder
    key, pinned = None, False
    try:
        if trusted_keys is not None:
            trusted = Path(trusted_keys) / f"{site}.pub.pem"
            if not trusted.exists():
                raise KeyFileError(f"No trusted key for site {site!r}: expected {trusted}, "
                                   "so its signatures cannot be checked against a pinned key.")
            key, pinned = load_public_key(trusted), True
            if beside.exists() and public_key_fingerprint(load_public_key(beside)) != \
                    public_key_fingerprint(key):
                problems.append(Problem(site, None, f"The public key sent beside the ledger "
                                                    f"({beside.name}) is not the site's "
                                                    "trusted key."))
        elif beside.exists():
            key = load_public_key(beside)
        else:
            raise KeyFileError(f"No public key beside the ledger (expected {beside}), so no "
                               "signature can be checked; pass --trusted-keys.")
    except KeyFileError as exc:
        problems.append(Problem(site, None, str(exc)))
    used = sorted({str(e.get("key_fingerprint")) for e in entries})
    if not pinned and len(used) > 1:
        problems.append(Problem(site, None, f"The ledger is signed with {len(used)} different "
                                            f"keys ({', '.join(used)}): the site key changed "
                                            "mid-ledger or entries were re-signed by another key."))
    if key is None:
        return pinned, problems
    expected = public_key_fingerprint(key)
    for pos, entry in enumerate(entries):
        seq = _seq(entry, pos)
        if entry.get("key_fingerprint") != expected:
            problems.append(Problem(site, seq, f"Entry seq {seq} is signed by key "
                                               f"{entry.get('key_fingerprint')}, not the site's "
                                               f"{'trusted' if pinned else ''} key {expected}."))
        elif not signature_valid(key, str(entry.get("hash")), str(entry.get("signature"))):
            problems.append(Problem(site, seq, f"The signature of entry seq {seq} does not "
                                               f"verify with key {expected}: the entry was "
                                               "altered or signed by another key."))
    return pinned, problems


def _check_accounting(site: str, entries: list[dict],
                      tolerance: float) -> tuple[list[EntryResult], list[Problem]]:
    rows: list[EntryResult] = []
    problems: list[Problem] = []
    histories: dict[str, list[tuple[float, float, int]]] = {}
    last: dict[str, tuple[float, float]] = {}  # dataset -> (claimed ε, δ)
    units: dict[str, tuple[str, int]] = {}  # dataset -> (its unit, the seq that set it)
    for pos, entry in enumerate(entries):
        seq, kind = _seq(entry, pos), str(entry.get("kind"))
        data = str(entry.get("data_fingerprint"))
        dataset = str(entry.get("dataset", data))
        sigma, q = _num(entry, "noise_multiplier"), _num(entry, "sample_rate")
        steps, claim = _num(entry, "steps", int), _num(entry, "epsilon")
        delta, budget = _num(entry, "delta"), _num(entry, "epsilon_budget")
        say = lambda message: problems.append(Problem(site, seq, message))  # noqa: E731
        rdp = pld = reference = None
        fresh = dataset not in histories
        if kind == "dataset" and not fresh:
            say(f"Entry seq {seq} starts dataset {dataset!r} again after it has entries: a "
                "dataset can be started once, and a restart would reset its budget.")
        elif fresh and histories and kind != "dataset" and "dataset" in entry:
            say(f"Entry seq {seq} is the first on dataset {dataset!r}, but no dataset entry "
                f"started it and the ledger already holds {sorted(histories)}: only a ledger's "
                "first dataset may start implicitly, so this fresh budget was never declared.")
        history = histories.setdefault(dataset, [])
        unit = unit_of(entry)
        if unit not in UNITS:
            say(f"Entry seq {seq} names privacy unit {unit!r}; the units are {list(UNITS)}.")
        elif kind not in RELEASES_NOTHING:
            first, since = units.setdefault(dataset, (unit, seq))
            if unit != first:
                say(f"Entry seq {seq} releases with the {unit} as the unit of privacy on "
                    f"dataset {dataset!r}, whose releases since seq {since} protect the "
                    f"{first}: ε in one unit does not add to ε in the other, so neither "
                    "claim holds for the dataset.")
        if None in (sigma, q, steps, claim, delta, budget) or not 0 < delta < 1:
            say(f"Entry seq {seq} lacks a valid noise_multiplier, sample_rate, steps, "
                "epsilon, delta or epsilon_budget, so its ε cannot be re-derived.")
        else:
            mechanism = entry.get("mechanism") if isinstance(entry.get("mechanism"), dict) else {}
            noise = mechanism.get("noise", "gaussian")
            sampling = mechanism.get("sampling", "poisson")
            if kind in RELEASES_NOTHING:
                pass  # nothing released, so no mechanism to re-derive
            elif noise != "gaussian" or sampling not in ("poisson", "none"):
                say(f"Entry seq {seq} records mechanism {mechanism}; the verifier re-derives "
                    "only Gaussian noise, Poisson-sampled or unsampled, so this ε is unchecked.")
            elif sampling == "none" and q != 1:
                say(f"Entry seq {seq} records an unsampled Gaussian mechanism with sample_rate "
                    f"{q:g}; without sampling there is no amplification, so it is counted at "
                    "1.0 and the rate must say so.")
            rate = 1.0 if sampling == "none" else q
            if kind in RELEASES_NOTHING:
                if (sigma, q, steps) != (0, 0, 0):
                    label = "refusal" if kind == "refusal" else "dataset start"
                    say(f"{label.capitalize()} seq {seq} records a release (σ={sigma}, q={q}, "
                        f"steps={steps}); a {label} must release nothing.")
                if kind == "dataset" and claim != 0:
                    say(f"Dataset entry seq {seq} claims ε={claim:.4f}; a new dataset starts "
                        "with nothing spent, so ε must be 0.")
                if kind == "refusal" and dataset in last and not math.isclose(
                        claim, last[dataset][0], rel_tol=1e-9):
                    say(f"Refusal seq {seq} changes ε from {last[dataset][0]:.4f} to "
                        f"{claim:.4f}; a refusal releases nothing, so ε must stay unchanged.")
            elif not (sigma >= MIN_SIGMA and steps <= MAX_STEPS) and sigma > 0 and steps > 0:
                history.append((0.0, 1.0, 1))  # not re-derived: counted as no privacy
                say(f"Entry seq {seq} records σ={sigma:g} over {steps} steps; the verifier "
                    f"re-derives σ ≥ {MIN_SIGMA:g} and at most {MAX_STEPS:,} steps in an "
                    "entry, so this release counts as unbounded.")
            elif sigma > 0 and 0 < rate <= 1 and steps > 0:
                history.append((sigma, rate, steps))
            else:
                history.append((0.0, 1.0, max(steps, 1)))  # unbounded: no privacy
                say(f"Entry seq {seq} records a non-private release (σ={sigma}, q={q}, "
                    f"steps={steps}); its ε is unbounded.")
            if dataset in last and delta != last[dataset][1]:
                say(f"Entry seq {seq} switches δ from {last[dataset][1]:g} to {delta:g} on "
                    f"dataset {dataset!r}, so its ε values cannot be compared; keep one δ per "
                    "dataset.")
            if dataset in last and claim < last[dataset][0]:
                say(f"Entry seq {seq} claims ε={claim:.4f}, below the {last[dataset][0]:.4f} "
                    f"claimed before on dataset {dataset!r}; ε is cumulative and cannot fall.")
            if claim > budget:
                say(f"Entry seq {seq} claims ε={claim:.4f}, above its budget {budget:.4f}: "
                    "the site released beyond its privacy budget.")
            if all(s > 0 for s, _, _ in history):
                rdp, pld = rdp_epsilon(tuple(history), delta), pld_epsilon(tuple(history), delta)
            else:
                rdp = pld = math.inf
            named = entry.get("accountant") if isinstance(entry.get("accountant"), str) else ""
            reference = "pld" if ("prv" in named.lower() or "pld" in named.lower()) else "rdp"
            if reference == "rdp":
                floor, allowed = rdp * (1 - tolerance), f" less {tolerance:.1%}"
            elif claim >= pld - PRV_EPS_ERROR:  # PLD's own error only lowers the floor
                floor, allowed = claim, ""
            else:
                slack = PRV_EPS_ERROR + (pld_error(tuple(history), delta)
                                         if math.isfinite(pld) else 0.0)
                floor, allowed = pld - slack, (f" less {slack:.4f} (PRV's stated error "
                                               f"{PRV_EPS_ERROR:g} + PLD's own)")
            if claim < floor:
                over = " and above the budget" if rdp > budget else ""
                say(f"Entry seq {seq} claims ε={claim:.4f} by {named or 'an unnamed accountant'}"
                    f", but its {len(history)} recorded release(s) on dataset {dataset!r} "
                    f"re-derive to ε={rdp:.4f} (RDP) and ε={pld:.4f} (PLD) at δ={delta:g}; held "
                    f"to {reference.upper()}{allowed}, the claim is too low{over}.")
            last[dataset] = (claim, delta)
        text = lambda name: _text(entry, name)  # noqa: E731
        rows.append(EntryResult(
            seq, _num(entry, "round", int), kind, data, sigma, q, steps,
            _num(entry, "max_grad_norm"), delta, claim, budget, rdp, pld,
            text("reason"), text("time"), text("accountant"), reference, dataset,
            text("run_id"), text("withheld"), _num(entry, "released_value"),
            text(APP_FIELD), unit if isinstance(unit, str) else repr(unit),
            _num(entry, "max_records_per_patient", int)))
    return rows, problems


def _text(entry: dict, name: str) -> str | None:
    return entry.get(name) if isinstance(entry.get(name), str) else None


def _seq(entry: dict, pos: int) -> int:
    seq = entry.get("seq")
    return seq if isinstance(seq, int) and not isinstance(seq, bool) else pos


def _num(entry: dict, name: str, cast: type = float):
    value = entry.get(name)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    if cast is int and value != int(value):
        return None
    return cast(value)
