"""What a ledger entry must hold, by kind, and how it is hashed: the rules that
`Ledger.append` (common/privacy/ledger.py) enforces before an entry is written and that
`fedcare audit verify` reads entries by. Also the ledger's error family.

Kinds: "train" and "personalize" (DP-SGD steps; a train entry whose update was not
sent says why in `withheld`), "evaluate" and "size" (one Gaussian-mechanism release of
a sensitivity-1 statistic: a confusion matrix, a record count with its `released_value`),
"refusal" and "dataset" (release nothing); "approval" (common/privacy/approvals.py) has
rules of its own.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
from datetime import datetime, timezone
from importlib import metadata
from numbers import Integral, Real
from typing import Any

from common.errors import FedcareError
from common.privacy.approvals import APPROVAL, validate as approval_problems

UNITS = ("record", "patient")  # whom an entry's ε protects
KINDS = ("train", "refusal", "personalize", "evaluate", "size", "dataset")
RELEASES_NOTHING = ("refusal", "dataset")
GAUSSIAN_RELEASES = ("evaluate", "size")  # (σ, q=1, 1 step): composes like a DP-SGD step
GAUSSIAN_MECHANISM = {"name": "Gaussian", "noise": "gaussian", "sampling": "none",
                      "sensitivity": 1}

# Fields the caller provides (`time` is filled in when absent, `reason` is required
# for refusals and dataset starts). Extra JSON fields are kept and covered by the hash.
REQUIRED_FIELDS = (
    "kind", "site", "run_id", "round", "data_fingerprint", "mechanism",
    "noise_multiplier", "sample_rate", "steps", "max_grad_norm", "delta",
    "accountant", "epsilon", "epsilon_budget", "update_sha256",
    "secure_aggregation", "software",
)
SEALED_FIELDS = ("seq", "prev_hash", "key_fingerprint", "hash", "signature")
_STR = ("site", "run_id", "data_fingerprint", "accountant")
_INT = ("round", "steps")
_FLOAT = ("noise_multiplier", "sample_rate", "max_grad_norm", "delta", "epsilon",
          "epsilon_budget")


def _is_num(v: Any) -> bool:
    return isinstance(v, Real) and not isinstance(v, bool) and math.isfinite(v)


_RULES = {  # field -> (check, what it must be)
    "kind": (lambda v: v in KINDS, f"one of {KINDS}"),
    **{name: (lambda v: isinstance(v, str) and v != "", "a non-empty string")
       for name in _STR},
    **{name: (lambda v: isinstance(v, Integral) and not isinstance(v, bool) and v >= 0,
              "an integer >= 0") for name in _INT},
    **{name: (_is_num, "a finite number") for name in _FLOAT},
    "delta": (lambda v: _is_num(v) and 0 < v < 1, "a number in (0, 1)"),
    "epsilon": (lambda v: _is_num(v) and v >= 0, "a finite number >= 0"),
    "epsilon_budget": (lambda v: _is_num(v) and v > 0, "a finite number > 0"),
    "mechanism": (lambda v: isinstance(v, dict), "a dict such as {'name': 'DP-SGD'}"),
    "software": (lambda v: isinstance(v, dict), "a dict of package versions"),
    "secure_aggregation": (lambda v: isinstance(v, bool), "true or false"),
    "update_sha256": (lambda v: v is None or isinstance(v, str), "a hex string or None"),
}
_OPTIONAL_RULES = {  # checked when present
    "dataset": (lambda v: isinstance(v, str) and v != "", "a non-empty string"),
    "withheld": (lambda v: isinstance(v, str) and v != "", "a non-empty string"),
    "released_value": (_is_num, "a finite number"),
    "privacy_unit": (lambda v: v in UNITS, f"one of {UNITS}"),
    "max_records_per_patient": (lambda v: isinstance(v, Integral) and not isinstance(v, bool)
                                and v >= 1, "an integer >= 1"),
}


class LedgerError(FedcareError):
    """Base class of every ledger problem; the message names the ledger file (and the
    line, for a line that cannot be read)."""


class LedgerEntryError(LedgerError, ValueError):
    """An entry handed to `append` is incomplete or inconsistent; nothing was written."""


class LedgerFormatError(LedgerError):
    """A ledger line is not a JSON object (the message names the line)."""


class LedgerTruncatedError(LedgerFormatError):
    """The last line is incomplete: a write was interrupted (crash, full disk)."""


class LedgerIntegrityError(LedgerError):
    """The existing ledger fails its hash chain or signatures; it must not be extended."""


class LedgerConcurrentWriteError(LedgerError):
    """The ledger file changed under this writer; another process appends to it."""


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False)


def entry_hash(entry: dict) -> str:
    body = {k: v for k, v in entry.items() if k not in ("hash", "signature")}
    return hashlib.sha256(canonical_json(body).encode("utf-8")).hexdigest()


def validate_fields(fields: dict) -> dict:
    """A normalised copy of caller-provided entry fields, or LedgerEntryError."""
    if not isinstance(fields, dict):
        raise LedgerEntryError(f"A ledger entry must be a dict (got {type(fields).__name__}).")
    if fields.get("kind") == APPROVAL:
        return _validate_approval(fields)
    missing = [name for name in REQUIRED_FIELDS if name not in fields]
    if missing:
        raise LedgerEntryError(f"Ledger entry is missing required fields {missing}; "
                               f"every entry needs {list(REQUIRED_FIELDS)}.")
    sealed = [name for name in SEALED_FIELDS if name in fields]
    if sealed:
        raise LedgerEntryError(f"Ledger entry sets {sealed}, which only the ledger "
                               "writes; remove them from the fields.")
    out = copy.deepcopy(fields)
    for name, (ok, want) in _RULES.items():
        if not ok(out[name]):
            raise LedgerEntryError(f"Ledger field {name} must be {want} (got {out[name]!r}).")
    out.update({name: int(out[name]) for name in _INT})
    out.update({name: float(out[name]) for name in _FLOAT})
    for name, (ok, want) in _OPTIONAL_RULES.items():
        if name in out and not ok(out[name]):
            raise LedgerEntryError(f"Ledger field {name} must be {want} (got {out[name]!r}).")
    if "released_value" in out:
        out["released_value"] = float(out["released_value"])
    out["time"] = _check_time(out.get("time"))
    _check_kind(out)
    try:
        canonical_json(out)
    except (TypeError, ValueError) as exc:
        raise LedgerEntryError(f"Ledger entry is not plain JSON ({exc}); pass only "
                               "str/int/float/bool/None/list/dict values.") from exc
    return out


def _validate_approval(fields: dict) -> dict:
    wrong = approval_problems(fields)
    sealed = [name for name in SEALED_FIELDS if name in fields]
    if wrong or sealed:
        raise LedgerEntryError(f"An approval entry must hold a site, a 64-hex-digit app_sha256, "
                               f"approved true/false, by, reason and software, and no "
                               f"{list(SEALED_FIELDS)}: {'; '.join(wrong) or sealed}.")
    out = copy.deepcopy(fields)
    out["time"] = _check_time(out.get("time"))
    try:
        canonical_json(out)
    except (TypeError, ValueError) as exc:
        raise LedgerEntryError(f"Ledger entry is not plain JSON ({exc}).") from exc
    return out


def _check_kind(out: dict) -> None:
    """What each kind must record; the numbers decide how it composes into ε."""
    kind, release = out["kind"], (out["noise_multiplier"], out["sample_rate"], out["steps"])
    if kind in RELEASES_NOTHING:
        why = "why a new dataset starts" if kind == "dataset" else "why nothing was released"
        if not isinstance(out.get("reason"), str) or not out["reason"]:
            raise LedgerEntryError(f"A {kind} entry needs a non-empty reason explaining {why}.")
        if release != (0.0, 0.0, 0):
            raise LedgerEntryError(f"A {kind} entry releases nothing: set noise_multiplier=0, "
                                   "sample_rate=0.0 and steps=0.")
        if kind == "dataset" and "dataset" not in out:
            raise LedgerEntryError("A dataset entry must name the dataset it starts in its "
                                   "dataset field.")
        if kind == "dataset" and out["epsilon"] != 0:
            raise LedgerEntryError(f"A dataset entry starts a fresh budget, so its epsilon "
                                   f"must be 0 (got {out['epsilon']!r}).")
    elif kind in GAUSSIAN_RELEASES:
        mech = out["mechanism"]
        if out["noise_multiplier"] <= 0 or release[1:] != (1.0, 1) or out["max_grad_norm"] != 1.0:
            raise LedgerEntryError(
                f"A {kind} entry records one Gaussian-mechanism release of sensitivity 1: "
                f"noise_multiplier > 0, sample_rate=1.0, steps=1 and max_grad_norm=1.0 (got "
                f"{release + (out['max_grad_norm'],)}).")
        if {k: mech.get(k) for k in ("noise", "sampling", "sensitivity")} != \
                {k: GAUSSIAN_MECHANISM[k] for k in ("noise", "sampling", "sensitivity")}:
            raise LedgerEntryError(f"A {kind} entry's mechanism must be {GAUSSIAN_MECHANISM} "
                                   f"(got {mech}).")
        if out["update_sha256"] is not None:
            raise LedgerEntryError(f"A {kind} entry sends no model update: set "
                                   "update_sha256=None.")
        if kind == "size" and "released_value" not in out:
            raise LedgerEntryError("A size entry must record the noisy size it released in "
                                   "released_value, so that it is reused, not released again.")
    elif (out["noise_multiplier"] <= 0 or not 0 < out["sample_rate"] <= 1
          or out["steps"] <= 0 or out["max_grad_norm"] <= 0):
        raise LedgerEntryError(
            f"A {kind} entry must record a private release: noise_multiplier > 0, "
            f"0 < sample_rate <= 1, steps > 0 and max_grad_norm > 0 (got "
            f"{out['noise_multiplier']}, {out['sample_rate']}, {out['steps']}, "
            f"{out['max_grad_norm']}); non-private runs keep no ledger.")
    if out.get("privacy_unit") == "patient" and "max_records_per_patient" not in out:
        raise LedgerEntryError("A patient-level entry must state its contribution bound in "
                               "max_records_per_patient.")
    if "withheld" in out and (kind != "train" or out["update_sha256"] is not None):
        raise LedgerEntryError("Only a train entry whose update was not sent may say why in "
                               "withheld; its update_sha256 must then be None.")
    if kind == "train" and out["update_sha256"] is None and "withheld" not in out:
        raise LedgerEntryError("A train entry without update_sha256 sent no update: say why "
                               "in withheld (e.g. 'the update held NaN').")


def unit_of(entry: dict) -> str:
    """Whom an entry's ε protects: its `privacy_unit`, or (older ledgers) the record."""
    return entry.get("privacy_unit", "record")


def dataset_of(entry: dict) -> str:
    """The budget identity of an entry: its `dataset`, or (older ledgers) its fingerprint."""
    return entry.get("dataset", entry.get("data_fingerprint"))


def software_versions() -> dict[str, str]:
    """The versions an entry records of the packages that made it."""
    out = {}
    for name in ("fedcare", "opacus", "torch", "flwr", "peft", "transformers"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def _check_time(value: Any) -> str:
    if value is None:
        return datetime.now(timezone.utc).isoformat(timespec="milliseconds")
    try:
        parsed = datetime.fromisoformat(value) if isinstance(value, str) else None
    except ValueError:
        parsed = None
    if parsed is None or parsed.utcoffset() is None or parsed.utcoffset().total_seconds():
        raise LedgerEntryError(f"Ledger field time must be an ISO-8601 UTC time such as "
                               f"2025-01-31T12:00:00+00:00 (got {value!r}); or omit it.")
    return value
