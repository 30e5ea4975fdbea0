"""Append-only, hash-chained, signed privacy ledger: one JSON entry per line.

Each site records every release (and every refusal) *before* the update leaves the
site: `Ledger.append` returns only after the line is fsynced (write-ahead). The ledger
adds `seq`, `prev_hash` (the previous entry's `hash`, 64 zeros for the first),
`key_fingerprint`, `hash` (sha256 hex of the canonical JSON of the entry without
`hash` and `signature`) and `signature` (base64 Ed25519 over the 32 raw bytes of
`hash`). Editing, deleting, inserting or reordering lines breaks the chain. What each
kind of entry must hold: common/privacy/entries.py.

Budgets are per *dataset*: the identity a hospital declares (`dataset`), across every
version of its data (`data_fingerprint`). A ledger's first dataset starts with its
first entry; every later one needs an explicit "dataset" entry, so a new fingerprint
or a new name can never silently start a fresh budget. Old ledgers without the field
keep their meaning: their fingerprint was the identity. Approval entries
(common/privacy/approvals.py) are chained and signed like the others but hold no
release, so budget readers skip them.
"""

from __future__ import annotations

import copy
import json
import math
import os
import re
from pathlib import Path
from typing import Any, Sequence

from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey, Ed25519PublicKey,
)

from common.names import NAME
from common.privacy.approvals import APPROVAL, releases
from common.privacy.entries import (
    RELEASES_NOTHING, SEALED_FIELDS, LedgerConcurrentWriteError, LedgerEntryError, LedgerError,
    LedgerFormatError, LedgerIntegrityError, LedgerTruncatedError, canonical_json, dataset_of,
    entry_hash, validate_fields,
)
from common.privacy.signing import (
    fsync_directory, public_key_fingerprint, sign_digest, signature_valid,
)

try:
    import fcntl
except ImportError:  # pragma: no cover - non-POSIX
    fcntl = None

LEDGER_FILE = "ledger.jsonl"  # a site's ledger, in its state folder
GENESIS_HASH = "0" * 64
HEADS_SUFFIX = ".heads.jsonl"  # beside a ledger: the heads the server received from it


def format_head(seq: int, entry_hash_hex: str) -> str:
    """A ledger head as the site reports it to the server: "seq:hash"."""
    return f"{int(seq)}:{entry_hash_hex}"


def parse_head(text: str) -> tuple[int, str]:
    """(seq, hash) of a "seq:hash" head; ValueError names the expected form."""
    match = re.fullmatch(r"(0|[1-9][0-9]*):([0-9a-f]{64})", text) \
        if isinstance(text, str) else None
    if match is None:
        raise ValueError(f"A ledger head must read 'seq:hash' with a 64-hex-digit sha256 "
                         f"(got {text!r}).")
    return int(match[1]), match[2]


def heads_file(ledger: Path) -> Path:
    """Where the server keeps the heads it received for `ledger` (<stem>.heads.jsonl)."""
    return Path(ledger).with_name(Path(ledger).stem + HEADS_SUFFIX)


def seal_entry(fields: dict, *, seq: int, prev_hash: str, key: Ed25519PrivateKey) -> dict:
    """Add seq, prev_hash, key_fingerprint, hash and signature (no validation)."""
    entry = dict(fields)
    entry.update(seq=seq, prev_hash=prev_hash,
                 key_fingerprint=public_key_fingerprint(key.public_key()))
    entry["hash"] = entry_hash(entry)
    entry["signature"] = sign_digest(key, entry["hash"])
    return entry


def chain_problems(entries: Sequence[dict],
                   lines: Sequence[int] | None = None) -> list[tuple[int, str]]:
    """(position, sentence) for every break in seq, prev_hash or hash; `lines` gives
    each entry's line number in the file (default: position + 1)."""
    problems: list[tuple[int, str]] = []
    prev_seq, prev_hash = -1, GENESIS_HASH
    for pos, entry in enumerate(entries):
        line = lines[pos] if lines is not None else pos + 1
        absent = [name for name in SEALED_FIELDS if name not in entry]
        if absent:
            problems.append((pos, f"The entry on line {line} lacks {absent}, so it was "
                                  "not written by a fedcare ledger."))
            prev_seq, prev_hash = prev_seq + 1, entry.get("hash")
            continue
        seq = entry["seq"]
        if seq != prev_seq + 1:
            problems.append((pos, f"The entry on line {line} has seq {seq} where "
                                  f"{prev_seq + 1} was expected: an entry was deleted, "
                                  "inserted or moved here."))
        if entry["prev_hash"] != prev_hash:
            problems.append((pos, f"Entry seq {seq} (line {line}) does not link to the entry "
                                  "before it (its prev_hash is not that entry's hash): the "
                                  "ledger was cut, reordered or spliced here."))
        if entry_hash(entry) != entry["hash"]:
            problems.append((pos, f"Entry seq {seq} (line {line}) was changed after it was "
                                  "written: its content no longer matches its recorded hash."))
        prev_seq = seq if isinstance(seq, int) else prev_seq + 1
        prev_hash = entry["hash"]
    return problems


def integrity_problems(entries: Sequence[dict], public: Ed25519PublicKey) -> list[str]:
    """A sentence for every break in the chain and every entry not signed by `public`."""
    fingerprint = public_key_fingerprint(public)
    problems = [message for _, message in chain_problems(entries)]
    problems += [f"Entry seq {entry.get('seq')} is not signed by this site's key "
                 f"{fingerprint}." for entry in entries
                 if entry.get("key_fingerprint") != fingerprint or not signature_valid(
                     public, str(entry.get("hash")), str(entry.get("signature")))]
    return problems


def parse_ledger_bytes(data: bytes) -> tuple[list[tuple[int, dict]], list[tuple[int, str]]]:
    """((line, entry) for good lines, (line, sentence) for bad ones); lines count from 1."""
    good: list[tuple[int, dict]] = []
    bad: list[tuple[int, str]] = []
    if not data:
        return good, bad
    lines = data.split(b"\n")
    complete, tail = lines[:-1], lines[-1]
    for number, raw in enumerate(complete, start=1):
        try:
            value = json.loads(raw.decode("utf-8"), parse_constant=_reject_constant,
                               parse_float=_finite_float, parse_int=_int64)
        except UnicodeDecodeError:
            bad.append((number, f"Line {number} is not valid UTF-8 text."))
            continue
        except (ValueError, RecursionError) as exc:  # bad JSON, 1e999, huge ints, deep nesting
            detail = (f"{exc.msg} at column {exc.colno}"
                      if isinstance(exc, json.JSONDecodeError) else str(exc))
            bad.append((number, f"Line {number} is not valid JSON ({detail})."))
            continue
        if not isinstance(value, dict):
            bad.append((number, f"Line {number} is JSON but not an object."))
            continue
        good.append((number, value))
    if tail:
        number = len(complete) + 1
        bad.append((number, f"Line {number} is incomplete (no final newline): a write was "
                            "interrupted, e.g. by a crash; that entry's update was never "
                            "released."))
    return good, bad


def read_entries(path: Path) -> list[dict]:
    """Every entry of a ledger file; LedgerFormatError names the first bad line."""
    path = Path(path)
    return _entries_from_bytes(path.read_bytes(), path)


def _entries_from_bytes(data: bytes, path: Path) -> list[dict]:
    good, bad = parse_ledger_bytes(data)
    if bad:
        truncated = not data.endswith(b"\n") and len(bad) == 1
        cls = LedgerTruncatedError if truncated else LedgerFormatError
        hint = (" Its update was never released; remove the partial line with "
                "common.privacy.ledger.discard_incomplete_tail before appending again."
                if truncated else "")
        raise cls(f"{path}: {bad[0][1]}{hint}")
    return [entry for _, entry in good]


def discard_incomplete_tail(path: Path) -> bytes:
    """Cut an interrupted last line off `path` (an operator's explicit repair);
    returns the bytes removed, b"" when the file ends cleanly."""
    path = Path(path)
    data = path.read_bytes()
    if not data or data.endswith(b"\n"):
        return b""
    keep = data.rfind(b"\n") + 1
    with open(path, "r+b") as handle:
        handle.truncate(keep)
        handle.flush()
        os.fsync(handle.fileno())
    return data[keep:]


class Ledger:
    """One site's ledger file, opened for appending by the holder of the site key."""

    def __init__(self, path: Path, key: Ed25519PrivateKey) -> None:
        self.path = Path(path)
        self._key = key
        self._entries: list[dict] = []
        self._size = 0
        self._failed: BaseException | None = None
        if self.path.exists():
            data = self.path.read_bytes()
            self._entries = _entries_from_bytes(data, self.path)
            self._size = len(data)
            self._verify_existing()

    def _verify_existing(self) -> None:
        problems = integrity_problems(self._entries, self._key.public_key())
        if problems:
            raise LedgerIntegrityError(
                f"Ledger {self.path} failed verification, so it will not be extended: "
                f"{problems[0]} ({len(problems)} problem(s) in all). Keep the file for the "
                f"auditor (`fedcare audit verify {self.path}`) and start a new ledger path.")

    def append(self, fields: dict) -> dict:
        """Validate, seal, write and fsync one entry; release the update only after."""
        if self._failed is not None:
            raise LedgerError(f"An earlier append to {self.path} failed ({self._failed}); "
                              "reopen the ledger, which re-verifies it, before appending.")
        entry = self._check_against_history(validate_fields(fields))
        prev = self._entries[-1]["hash"] if self._entries else GENESIS_HASH
        entry = seal_entry(entry, seq=len(self._entries), prev_hash=prev, key=self._key)
        line = (canonical_json(entry) + "\n").encode("utf-8")
        created = not self.path.exists()
        try:
            with open(self.path, "ab") as handle:
                if fcntl is not None:
                    fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
                if handle.seek(0, os.SEEK_END) != self._size:
                    raise LedgerConcurrentWriteError(
                        f"Ledger {self.path} changed since it was opened; only one process "
                        "may write a site's ledger. Reopen it and retry.")
                handle.write(line)
                handle.flush()
                os.fsync(handle.fileno())
            if created:
                fsync_directory(self.path.parent)
        except BaseException as exc:
            self._failed = exc
            raise
        self._entries.append(entry)
        self._size += len(line)
        return copy.deepcopy(entry)

    def _check_against_history(self, entry: dict) -> dict:
        if entry["kind"] == APPROVAL:
            return entry  # spends nothing, on no dataset
        dataset, kind = dataset_of(entry), entry["kind"]
        known = self.datasets()
        if kind == "dataset":
            if dataset in known:
                raise LedgerEntryError(
                    f"Dataset {dataset!r} already has entries in {self.path} (spent "
                    f"ε={self.spent_epsilon(dataset)!r}); a dataset can be started once. Keep "
                    "releasing on it, or start a new dataset under a new name.")
            return entry
        if known and dataset not in known:
            name = dataset if NAME.fullmatch(dataset) and ".." not in dataset else "NAME"
            raise LedgerEntryError(
                f"Dataset {dataset!r} is new to {self.path}, which holds {known}; only a "
                "ledger's first dataset starts implicitly. A new version of existing data "
                "keeps its dataset (and its budget). If this really is a new dataset, start "
                f"it with `fedcare site new-dataset {self.path.parent} --dataset {name} "
                '--reason "..."`.')
        spent = self.spent_epsilon(dataset)
        if kind == "refusal":
            if not math.isclose(entry["epsilon"], spent, rel_tol=1e-9, abs_tol=1e-12):
                raise LedgerEntryError(
                    f"A refusal releases nothing, so its epsilon must stay at the spent "
                    f"{spent!r} for dataset {dataset!r} (got {entry['epsilon']!r}).")
            return entry
        if entry["epsilon"] < spent:
            raise LedgerEntryError(
                f"Ledger field epsilon is cumulative and cannot fall: dataset {dataset!r} "
                f"has spent {spent!r} (got {entry['epsilon']!r}).")
        if entry["epsilon"] > entry["epsilon_budget"]:
            raise LedgerEntryError(
                f"This release would bring epsilon to {entry['epsilon']!r}, above the budget "
                f"{entry['epsilon_budget']!r}; do not release the update, record a refusal.")
        return entry

    def entries(self) -> list[dict]:
        return copy.deepcopy(self._entries)

    def releases(self) -> list[dict]:
        """Every entry that accounts for ε (all but approvals)."""
        return copy.deepcopy(releases(self._entries))

    def head(self) -> tuple[int, str] | None:
        """(seq, hash) of the last entry; None while the ledger is empty."""
        return (self._entries[-1]["seq"], self._entries[-1]["hash"]) if self._entries else None

    def datasets(self) -> list[str]:
        """Every dataset identity in the ledger, in order of first appearance."""
        return list(dict.fromkeys(dataset_of(e) for e in releases(self._entries)))

    def spent_epsilon(self, dataset: str) -> float:
        """ε spent on `dataset` (across its data versions); 0 for an unknown one."""
        for entry in reversed(releases(self._entries)):
            if dataset_of(entry) == dataset:
                return float(entry["epsilon"])
        return 0.0

    def history(self, dataset: str) -> list[tuple[float, float, int]]:
        """(σ, q, steps) of every release on `dataset`, oldest first; an evaluate or
        size release is (σ, 1.0, 1)."""
        return [(float(e["noise_multiplier"]), float(e["sample_rate"]), int(e["steps"]))
                for e in releases(self._entries)
                if dataset_of(e) == dataset and e["kind"] not in RELEASES_NOTHING]


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a finite number")


def _int64(text: str) -> int:
    """No entry field holds an integer beyond 64 bits; a longer one is not a number any
    reader can compare or convert to a float."""
    if len(text.lstrip("-")) > 19 or not -2**63 <= int(text) < 2**63:
        raise ValueError(f"the integer {text[:24]}{'...' if len(text) > 24 else ''} is "
                         "beyond 64 bits")
    return int(text)


def _finite_float(text: str) -> float:
    """A JSON number such as 1e999 reads as infinity, which no entry can hold (its hash
    is computed over canonical JSON, which has no infinity)."""
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text} is not a finite number")
    return value
