"""The site's privacy guard: its budget, its signed ledger, its decision to refuse.

The ledger is the site's memory of what it has released on each dataset (keyed by
the data fingerprint), across rounds and across runs. Before a round the guard
plans the mechanism and projects ε; if the projection exceeds the site's budget it
refuses. After training, the entry is written (fsync) before the update may leave.

ε is computed by the site's accountant kind (`privacy.accountant`: "prv", tight, or
"rdp"), and every entry names it. A claim never falls: a history claimed under RDP and
re-computed under the tighter PRV keeps the larger, already claimed ε until PRV's own
value passes it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Sequence

import numpy as np

from client.training import PrivateStep
from common.privacy import accounting
from common.privacy.keys import load_or_create_site_key, public_key_pem
from common.privacy.ledger import Ledger, LedgerTruncatedError, discard_incomplete_tail

LEDGER_FILE = "ledger.jsonl"
MECHANISM = {"name": "DP-SGD", "noise": "gaussian", "sampling": "poisson",
             "clipping": "per-example L2"}


@dataclass(frozen=True)
class Policy:
    """What the site allows; the server cannot change it."""
    epsilon_budget: float
    delta: float
    min_noise_multiplier: float = 0.0
    max_noise_multiplier: float = 20.0


def software_versions() -> dict[str, str]:
    out = {}
    for name in ("fedcare", "opacus", "torch", "flwr", "peft", "transformers"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def update_digest(arrays: Sequence[np.ndarray]) -> str:
    """sha256 over the tensors exactly as sent (dtype, shape and bytes of each)."""
    digest = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(a)
        digest.update(f"{a.dtype.str}{a.shape}".encode())
        digest.update(a.tobytes())
    return digest.hexdigest()


class SiteGuard:
    def __init__(self, site: str, state_dir: Path, fingerprint: str, policy: Policy,
                 accountant: str = "prv") -> None:
        accounting.accountant_name(accountant)  # "prv" or "rdp", else a ValueError
        self.site, self.fingerprint, self.policy = site, fingerprint, policy
        self.accountant = accountant  # the kind; entries record accountant_name(kind)
        self.dir = Path(state_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.key = load_or_create_site_key(self.dir)
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
        return list(self.ledger.history(self.fingerprint))

    def spent(self) -> float:
        return self.ledger.spent_epsilon(self.fingerprint)

    def public_key(self) -> str:
        return public_key_pem(self.key.public_key())

    def ledger_text(self) -> str:
        return (self.dir / LEDGER_FILE).read_text(encoding="utf-8") if (
            self.dir / LEDGER_FILE).exists() else ""

    def plan(self, run_id: str, run_target: float, schedule: accounting.Schedule) -> float:
        """σ for this run: fixed at the run's first round so that (a) this run's whole
        `schedule` of (sample rate, steps) alone stays within `run_target` and (b)
        everything ever released on this dataset stays within the budget. Later rounds
        of the run reuse it from the ledger. ε is the site's accountant's. Raises
        BudgetError when no noise level up to the site's maximum fits."""
        for entry in reversed(self.ledger.entries()):
            if (entry["run_id"] == run_id and entry["data_fingerprint"] == self.fingerprint
                    and entry["kind"] == "train"):
                return float(entry["noise_multiplier"])
        p, history = self.policy, self.history()
        # with nothing spent yet the two limits are one: the smaller target
        limits = [([], run_target), (history, p.epsilon_budget)] if history else [
            ([], min(run_target, p.epsilon_budget))]
        sigma = max([accounting.calibrate_noise(prior, schedule, target, p.delta,
                                                self.accountant)
                     for prior, target in limits] + [p.min_noise_multiplier])
        if sigma > p.max_noise_multiplier:
            total = sum(n for _, n in schedule)
            raise accounting.BudgetError(
                f"fitting {total} more steps in what is left of the budget "
                f"(spent ε={self.spent():.4g} of {p.epsilon_budget:g}) needs noise σ={sigma:.3g}, "
                f"above the site's max_noise_multiplier {p.max_noise_multiplier:g}")
        return sigma

    def projected(self, step: PrivateStep) -> float:
        """The ε the ledger would claim after `step`: never below what is claimed now."""
        return max(self.spent(), accounting.epsilon(
            [*self.history(), (step.noise_multiplier, step.sample_rate, step.steps)],
            self.policy.delta, self.accountant))

    def _entry(self, kind: str, run_id: str, round_no: int, secure: bool, **fields) -> dict:
        return {
            "kind": kind, "site": self.site, "run_id": run_id, "round": round_no,
            "data_fingerprint": self.fingerprint, "mechanism": MECHANISM,
            "delta": self.policy.delta, "accountant": accounting.accountant_name(self.accountant),
            "epsilon_budget": self.policy.epsilon_budget, "secure_aggregation": secure,
            "software": software_versions(), **fields,
        }

    def record_release(self, run_id: str, round_no: int, step: PrivateStep,
                       epsilon: float, arrays: Sequence[np.ndarray], secure: bool,
                       kind: str = "train") -> dict:
        """Write-ahead: returns only once the entry is on disk; then the update may go.
        kind "personalize": a site's own fine-tune, which stays at the site. The entry
        claims max(spent, `epsilon`): ε is cumulative, and a history first claimed under
        RDP may re-compute lower under PRV."""
        epsilon = max(float(epsilon), self.spent())
        return self.ledger.append(self._entry(
            kind, run_id, round_no, secure,
            noise_multiplier=step.noise_multiplier, sample_rate=step.sample_rate,
            steps=step.steps, max_grad_norm=step.max_grad_norm, epsilon=epsilon,
            update_sha256=update_digest(arrays)))

    def record_refusal(self, run_id: str, round_no: int, reason: str, secure: bool) -> dict:
        return self.ledger.append(self._entry(
            "refusal", run_id, round_no, secure, noise_multiplier=0.0, sample_rate=0.0,
            steps=0, max_grad_norm=0.0, epsilon=self.spent(), update_sha256=None,
            reason=reason))
