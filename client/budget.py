"""The site's privacy guard: its budget, its signed ledger, its decision to refuse.

The ledger is the site's memory of what it has released on each dataset, across
rounds and across runs. The budget belongs to the dataset the hospital declares
(`dataset`, default "main"), not to one version of its records: a changed file spends
from the same budget until the hospital starts a new dataset with a signed entry
(`fedcare site new-dataset`). Each entry records the data version as a digest keyed by
the site's own signing key, so the ledger a server holds cannot be used to test
guesses of the records. Before a release the guard plans the mechanism and projects
ε; if the projection exceeds the site's budget it refuses. The entry is written
(fsync) before the release may leave, and the site's own log gets one line for it.

ε is computed by the site's accountant kind (`privacy.accountant`: "prv", tight, or
"rdp"), and every entry names it. A claim never falls: a history claimed under RDP and
re-computed under the tighter PRV keeps the larger, already claimed ε until PRV's own
value passes it.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from client.training import PrivateStep
from common.privacy import accounting
from common.privacy.approvals import APP_FIELD
from common.privacy.entries import (
    GAUSSIAN_MECHANISM, LedgerTruncatedError, dataset_of, software_versions, unit_of,
)
from common.privacy.ledger import LEDGER_FILE, Ledger, discard_incomplete_tail, format_head
from common.privacy.signing import load_or_create_site_key, public_key_pem, sign_digest

MECHANISM = {"name": "DP-SGD", "noise": "gaussian", "sampling": "poisson",
             "clipping": "per-example L2"}
# patient-level DP-SGD (user-level sampling): patients Poisson-sampled, each bringing at
# most k of their records, whose gradients are summed (or averaged) and clipped jointly
PATIENT_MECHANISM = {**MECHANISM, "sampled": "patients",
                     "clipping": "per-patient L2 (at most k records each)"}


class UnitError(accounting.BudgetError):
    """The dataset's budget was spent in another privacy unit: ε in one unit cannot be
    added to ε in another, so the site refuses (code "unit")."""


@dataclass(frozen=True)
class Policy:
    """What the site allows; the server can lower its exposure, never raise it."""
    epsilon_budget: float
    delta: float
    min_noise_multiplier: float = 0.0
    max_noise_multiplier: float = 20.0
    dataset: str = "main"            # the budget's identity
    run_epsilon_cap: float = 0.0     # most one run may spend; 0 = the run's target
    count_noise: float = 5.0         # least noise multiplier on any released count
    require_secure_aggregation: bool = False
    release_evaluation: bool = True  # a deployed site's node config turns it on
    app_sha256: str = ""  # the approved app this site runs under ("" when none is known)
    unit: str = "record"  # whom ε protects: "record", or "patient" with all their records
    max_records_per_patient: int = 4  # k: the most records a patient brings to a step

    @property
    def unit_fields(self) -> dict:
        """What every ledger entry states of the unit (and, per patient, the bound k)."""
        return {"privacy_unit": self.unit, **({"max_records_per_patient":
                self.max_records_per_patient} if self.unit == "patient" else {})}

    def run_target(self, run_target: float) -> float:
        return min(run_target, self.run_epsilon_cap) if self.run_epsilon_cap else run_target

    def check_delta(self, units: int) -> None:
        """δ must be small against 1/n: a mechanism that may fail with probability δ on
        one of n units (records or patients) must not be likely to fail on someone.
        `units` is the count the site states (noisy, inside ε), never the exact one."""
        if self.delta * 10 * units > 1:
            raise accounting.BudgetError(
                f"δ={self.delta:g} is too large for this dataset: it must be at most "
                f"1/(10 × the number of training {self.unit}s); lower the site's delta")


def update_digest(arrays: Sequence[np.ndarray]) -> str:
    """sha256 over the tensors exactly as sent (dtype, shape and bytes of each)."""
    digest = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(a)
        digest.update(f"{a.dtype.str}{a.shape}".encode())
        digest.update(a.tobytes())
    return digest.hexdigest()


def data_version(key, records_digest: str) -> str:
    """The data version a ledger records: a digest of the records keyed by the site's
    signing key (Ed25519 signatures are deterministic), which nobody without the key
    can recompute from a guess of the records."""
    signature = sign_digest(key, hashlib.sha256(
        f"fedcare data version {records_digest}".encode()).hexdigest())
    return "v1:" + hashlib.sha256(signature.encode()).hexdigest()[:40]


def describe(entry: dict) -> str:
    """One line of the site's own log for a ledger entry (simulations/site_logs.py
    reads it back)."""
    left = entry["epsilon_budget"] - entry["epsilon"]
    what = (f"refused: {entry.get('reason')}" if entry["kind"] == "refusal" else
            f"σ={entry['noise_multiplier']:.4g} q={entry['sample_rate']:.4g} "
            f"steps={entry['steps']}")
    note = (" (q=1: the data is not larger than the batch, so there is no "
            "amplification by sampling)" if entry["kind"] in ("train", "personalize")
            and entry["sample_rate"] >= 1.0 else "")
    withheld = f"; withheld: {entry['withheld']}" if entry.get("withheld") else ""
    unit = unit_of(entry)
    bound = f" k={entry['max_records_per_patient']}" if unit == "patient" else ""
    return (f"release {entry['kind']} run={entry['run_id']} round={entry['round']} "
            f"dataset={entry.get('dataset')} unit={unit}{bound} {what}; ε per {unit} "
            f"spent {entry['epsilon']:.4g}, "
            f"left {left:.4g} of {entry['epsilon_budget']:g} (δ={entry['delta']:g}, "
            f"ledger seq {entry['seq']}){note}{withheld}")


class SiteGuard:
    def __init__(self, site: str, state_dir: Path, fingerprint: str, policy: Policy,
                 accountant: str = "prv", log=None) -> None:
        accounting.accountant_name(accountant)  # "prv" or "rdp", else a ValueError
        self.site, self.policy, self.dataset = site, policy, policy.dataset
        self.accountant = accountant  # the kind; entries record accountant_name(kind)
        self.log = log or (lambda line: None)
        self.dir = Path(state_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.key = load_or_create_site_key(self.dir)
        self.fingerprint = data_version(self.key, fingerprint)
        path = self.dir / LEDGER_FILE
        try:
            self.ledger = Ledger(path, self.key)
        except LedgerTruncatedError:
            # A crash cut the last entry short: its append never returned, so that
            # update never left the site. Cut it off, keep the bytes for the auditor.
            tail = discard_incomplete_tail(path)
            with (self.dir / "ledger.discarded").open("ab") as handle:
                handle.write(tail + b"\n")
            self.ledger = Ledger(path, self.key)

    def history(self) -> accounting.History:
        return list(self.ledger.history(self.dataset))

    def check_unit(self) -> None:
        """Refuse (UnitError) if this dataset has released anything in another unit."""
        unit = self.policy.unit
        for entry in self.ledger.releases():
            if dataset_of(entry) == self.dataset and unit_of(entry) != unit:
                raise UnitError(
                    f"dataset {self.dataset!r} has spent budget with the {unit_of(entry)} as "
                    f"the unit of privacy (ledger seq {entry['seq']}), and this site now "
                    f"protects the {unit}: ε in one unit cannot be added to ε in the other. "
                    f"Start a new dataset for {unit}-level training (`fedcare site "
                    f"new-dataset STATE_DIR --dataset NAME --reason ...`, then dataset = "
                    f"NAME in the node config), or set privacy-unit = {unit_of(entry)}")

    def spent(self) -> float:
        return self.ledger.spent_epsilon(self.dataset)

    def head(self) -> str:
        """"seq:hash" of the ledger's last entry: the server keeps every head it is
        sent, so a ledger later cut back or rewritten shows."""
        head = self.ledger.head()
        return format_head(*head) if head else ""

    def public_key(self) -> str:
        return public_key_pem(self.key.public_key())

    def ledger_text(self) -> str:
        return (self.dir / LEDGER_FILE).read_text(encoding="utf-8") if (
            self.dir / LEDGER_FILE).exists() else ""

    def plan(self, run_id: str, run_target: float, schedule: accounting.Schedule,
             counts: accounting.History = ()) -> float:
        """σ for this run: fixed at the run's first round so that (a) this run's whole
        `schedule` of (sample rate, steps), with the count releases it plans (`counts`,
        e.g. its evaluations), alone stays within `run_target` (capped by the site's
        per-run cap) and (b) everything ever released on this dataset stays within the
        budget. Later rounds of the run reuse it from the ledger. ε is the site's
        accountant's. Raises BudgetError when no noise level up to the site's maximum
        fits."""
        for entry in reversed(self.ledger.releases()):
            if (entry["run_id"] == run_id and dataset_of(entry) == self.dataset
                    and entry["kind"] == "train"):
                return float(entry["noise_multiplier"])
        p, history, counts = self.policy, self.history(), list(counts)
        run_target = p.run_target(run_target)
        this_run = [(float(e["noise_multiplier"]), float(e["sample_rate"]), int(e["steps"]))
                    for e in self.ledger.releases() if e["run_id"] == run_id
                    and dataset_of(e) == self.dataset and e["steps"] > 0]
        # with nothing spent before this run the two limits are one: the smaller target
        limits = [(this_run, run_target, "this run's target"),
                  (history, p.epsilon_budget, "the site's budget")] \
            if len(history) > len(this_run) else [
                (this_run, min(run_target, p.epsilon_budget),
                 "the run's target, within the site's budget")]
        try:
            sigma = max([accounting.calibrate_noise(spent + counts, schedule, target, p.delta,
                                                    self.accountant)
                         for spent, target, _ in limits] + [p.min_noise_multiplier])
        except accounting.BudgetError as err:
            raise self._no_fit(err, schedule, limits, counts) from None
        if sigma > p.max_noise_multiplier:
            total = sum(n for _, n in schedule)
            raise accounting.BudgetError(
                f"fitting {total} more steps in what is left of the budget "
                f"(spent ε={self.spent():.4g} of {p.epsilon_budget:g}) needs noise σ={sigma:.3g}, "
                f"above the site's max_noise_multiplier {p.max_noise_multiplier:g}")
        return sigma

    def _no_fit(self, err: accounting.BudgetError, schedule: accounting.Schedule,
                limits: list, counts: accounting.History) -> accounting.BudgetError:
        """The refusal of a schedule no σ fits, saying which part is spent and which is
        only planned, where the planned part is what does not fit: the run's
        evaluations (noisy per-class counts) are charged as they are released, and alone
        they can pass a small target. `limits`: (spent history, ε limit, its name), as
        `plan` checks them. When what is spent passes the limit already, or the counts
        are not what breaks it, `err` stands."""
        if not counts:
            return err
        for history, target, name in limits:
            spent = accounting.epsilon(history, self.policy.delta, self.accountant)
            planned = accounting.epsilon(history + counts, self.policy.delta, self.accountant)
            if not spent < target <= planned:
                continue
            return accounting.BudgetError(
                f"{sum(n for _, n in schedule)} more steps cannot fit in {name} "
                f"(ε={target:.4g}) at any noise level: ε={spent:.4g} is spent and the "
                f"run's {len(counts)} planned evaluations (noisy per-class counts at count "
                f"noise σ={counts[0][0]:.3g}) would bring it to ε={planned:.4g} before any "
                "training; ask for more count noise (privacy.count_noise, above the "
                "site's own count-noise), release no evaluation (the site's "
                "release-evaluation, site.release_evaluation in a simulation), or raise "
                "the limit")
        return err

    def released(self, run_id: str, round_no: int, kind: str) -> bool:
        """Whether this dataset's ledger already holds a `kind` release for (run,
        round): a reply made and then lost (the site stopped before keeping it)."""
        return any(e.get("run_id") == run_id and e.get("round") == round_no
                   and e.get("kind") == kind and dataset_of(e) == self.dataset
                   for e in self.ledger.releases())

    def projected(self, step: PrivateStep) -> float:
        """The ε the ledger would claim after `step`: never below what is claimed now."""
        return self._after((step.noise_multiplier, step.sample_rate, step.steps))

    def _after(self, release: tuple[float, float, int]) -> float:
        return max(self.spent(), accounting.epsilon(
            [*self.history(), release], self.policy.delta, self.accountant))

    def count_sigma(self, requested: float) -> float:
        """σ of a count release: the run may ask for more noise, never less."""
        return max(float(requested), self.policy.count_noise)

    def release_count(self, kind: str, run_id: str, round_no: int, values: np.ndarray,
                      sigma: float, keep: bool = False, sensitivity: float = 1.0,
                      statistic: str = "a count of records") -> np.ndarray:
        """`values` (counts whose L2 sensitivity to adding or removing one unit, a record
        or a patient with all their records, is `sensitivity`) plus Gaussian noise of std `sigma`·`sensitivity`: the
        Gaussian mechanism with noise multiplier `sigma` on the statistic scaled to
        sensitivity 1. Charged to the budget and written to the ledger before it is
        returned (`keep`: the noisy value too, to be reused instead of released again);
        BudgetError (nothing written) if it does not fit."""
        after = self._after((sigma, 1.0, 1))
        if after > self.policy.epsilon_budget:
            raise accounting.BudgetError(
                f"a {kind} release would bring ε to {after:.4g}, above the site's budget "
                f"of {self.policy.epsilon_budget:g}")
        rng = random.SystemRandom()  # the operating system's CSPRNG
        values = np.asarray(values, dtype=np.float64)
        noisy = values + np.reshape([rng.gauss(0.0, sigma * sensitivity)
                                     for _ in range(values.size)], values.shape)
        extra = {"released_value": float(noisy.flat[0])} if keep else {}
        mechanism = {**GAUSSIAN_MECHANISM, "statistic": statistic,
                     "scaled_by": 1 / sensitivity}  # the statistic at sensitivity 1
        self._append(self._entry(
            kind, run_id, round_no, False, mechanism=mechanism, noise_multiplier=sigma,
            sample_rate=1.0, steps=1, max_grad_norm=1.0, epsilon=after, update_sha256=None,
            **extra))
        return noisy

    def public_size(self, units: int, sigma: float, run_id: str, round_no: int) -> int:
        """The training-set size in the site's unit (records, or patients) as the site may
        state it: a noisy count, released (and charged) once per data version and unit
        and read back from the ledger after that. It sets the sampling rate, the δ check
        and the FedAvg weight, so none of them reveals the exact n."""
        for entry in self.ledger.releases():
            if entry["kind"] == "size" and entry["data_fingerprint"] == self.fingerprint \
                    and unit_of(entry) == self.policy.unit:
                return max(1, round(float(entry["released_value"])))
        noisy = self.release_count("size", run_id, round_no, np.asarray([units]), sigma,
                                   keep=True, statistic=f"a count of {self.policy.unit}s")
        return max(1, round(float(noisy[0])))

    def _append(self, fields: dict) -> dict:
        entry = self.ledger.append(fields)
        self.log(describe(entry))
        return entry

    def _entry(self, kind: str, run_id: str, round_no: int, secure: bool, **fields) -> dict:
        return {
            "kind": kind, "site": self.site, "run_id": run_id, "round": round_no,
            "dataset": self.dataset, "data_fingerprint": self.fingerprint,
            "mechanism": PATIENT_MECHANISM if self.policy.unit == "patient" else MECHANISM,
            **self.policy.unit_fields,
            "delta": self.policy.delta, "accountant": accounting.accountant_name(self.accountant),
            "epsilon_budget": self.policy.epsilon_budget, "secure_aggregation": secure,
            "software": software_versions(),
            **({APP_FIELD: self.policy.app_sha256} if self.policy.app_sha256 else {}), **fields,
        }

    def record_release(self, run_id: str, round_no: int, step: PrivateStep,
                       epsilon: float, arrays: Sequence[np.ndarray] | None, secure: bool,
                       kind: str = "train", withheld: str = "") -> dict:
        """Write-ahead: returns only once the entry is on disk; then the update may go.
        kind "personalize": a site's own fine-tune, which stays at the site. `withheld`:
        the site trained (so it is charged) but sends nothing, and says why. The entry
        claims max(spent, `epsilon`): ε is cumulative, and a history first claimed under
        RDP may re-compute lower under PRV."""
        epsilon = max(float(epsilon), self.spent())
        extra = {"withheld": withheld} if withheld else {}
        return self._append(self._entry(
            kind, run_id, round_no, secure,
            noise_multiplier=step.noise_multiplier, sample_rate=step.sample_rate,
            steps=step.steps, max_grad_norm=step.max_grad_norm, epsilon=epsilon,
            update_sha256=None if withheld else update_digest(arrays),
            **extra))

    def record_refusal(self, run_id: str, round_no: int, reason: str, secure: bool) -> dict:
        return self._append(self._entry(
            "refusal", run_id, round_no, secure, noise_multiplier=0.0, sample_rate=0.0,
            steps=0, max_grad_norm=0.0, epsilon=self.spent(), update_sha256=None,
            reason=reason))
