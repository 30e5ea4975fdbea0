"""Everything a site may send, declared once, and the mods that hold it to that.

Every record of a reply is a release. Each key below names its mechanism:

- DP_SGD: the adapter update, the output of DP-SGD (clipped into the aggregation range
  afterwards, which is post-processing and free);
- DP_COUNT: a Gaussian-noised count (training-set size, per-class validation counts)
  or a value computed from one; charged to the same accountant and ledger;
- LEDGER: a function of the site's ledger, i.e. of earlier DP outputs and the site's
  own settings (σ, q, steps, ε, the signed entries themselves);
- PUBLIC: data-independent (names, flags, keys, byte counts fixed by the shapes).

Every cost is in the site's unit of privacy (`Policy.unit`, named in each ledger
entry): at a patient-level site the update is patient-level DP-SGD (patients sampled,
at most k notes each, clipped jointly), the size is a noisy patient count (sensitivity 1
per patient) and the validation counts weigh each of a patient's m notes 1/m (a patient
moves them by at most √3, as a record does); UNITS below says so for each release.

A site whose node config sets `private = false` sends the same keys with exact values.
`release_filter` refuses a reply that carries anything undeclared; `ContainErrors`
turns a failure into a code and a reference, keeping the details (file, line, values)
in the site's own log. docs/threat_model.md shows the same table for readers.
"""

from __future__ import annotations

import secrets
import traceback
from logging import ERROR

from flwr.common.logger import log

from common.message_keys import Keys

DP_SGD, DP_COUNT, LEDGER, PUBLIC = "DP-SGD", "DP count", "ledger", "public"

STATUS = {"code": PUBLIC, "message": PUBLIC}  # Flower's reply status: "Success"
LEDGER_KEYS = {Keys.EPSILON: LEDGER, Keys.LEDGER: LEDGER, Keys.LEDGER_HEAD: LEDGER,
               Keys.SITE_PUBLIC_KEY: PUBLIC, Keys.SITE: PUBLIC}

RELEASES: dict[str, dict[str, str]] = {
    "fitres.parameters": {"*": DP_SGD},
    "fitres.num_examples": {"num_examples": DP_COUNT},   # FedAvg weight: the noisy size
    "fitres.status": STATUS,
    "fitres.metrics": {
        **LEDGER_KEYS, Keys.PRIVATE: PUBLIC, Keys.SECURE_AGGREGATION: PUBLIC,
        Keys.REFUSED: LEDGER,  # a code: budget, delta, unit, plain-round, non-finite, repeat
        Keys.DELTA: PUBLIC, Keys.NOISE_MULTIPLIER: LEDGER, Keys.SAMPLE_RATE: LEDGER,
        Keys.STEPS: PUBLIC, Keys.MAX_GRAD_NORM: PUBLIC, Keys.BYTES_SENT: PUBLIC},
    "evaluateres.loss": {"loss": PUBLIC},                 # always NaN: no loss is sent
    "evaluateres.num_examples": {"num_examples": DP_COUNT},  # the noisy number of records
    "evaluateres.status": STATUS,
    "evaluateres.metrics": {
        **LEDGER_KEYS, Keys.EVALUATED: PUBLIC, Keys.REFUSED: LEDGER,
        **{name: DP_COUNT for name in ("accuracy", "macro_recall", "macro_f1")},
        **{f"personalized_{name}": DP_COUNT
           for name in ("accuracy", "macro_recall", "macro_f1")},
        Keys.PERSONALIZED_ADAPTER: PUBLIC, Keys.PERSONALIZED_REFUSED: LEDGER},
}


# what one unit (a record, or a patient with all of their records) can move, per release
UNITS = {
    "fitres.parameters": "one clipped gradient, at most C: a record's, or the joint clip "
                         "of a patient's at most k records",
    "fitres.num_examples": "1: the noisy count of training records, or of patients",
    "evaluateres.num_examples": "1: the noisy sum of validation weights (records, or "
                                "patients: a patient's m notes weigh 1/m each)",
    "evaluateres.metrics": "√3 in the per-class counts they are computed from, for a "
                           "record or for a patient (notes weighed 1/m)",
}


class UndeclaredRelease(RuntimeError):
    """A reply holds a record or key that RELEASES does not declare: it is not sent."""


def undeclared(content) -> list[str]:
    """'record' or 'record.key' for everything in a reply's RecordDict not declared."""
    out = []
    for records in (content.array_records, content.metric_records, content.config_records):
        for name, record in records.items():
            keys = RELEASES.get(name)
            if keys is None:
                out.append(name)
            elif "*" not in keys:
                out += [f"{name}.{key}" for key in record if key not in keys]
    return out


def release_filter(msg, context, call_next):
    """A Flower mod in front of the site: a reply leaves only if every record and key
    in it is declared in RELEASES (the site's code is checked, not trusted)."""
    reply = call_next(msg, context)
    if reply.has_content():
        extra = undeclared(reply.content)
        if extra:
            raise UndeclaredRelease(f"the reply holds undeclared releases: {extra}")
    return reply


CODES = {  # exception class name -> code sent to the server
    "DataError": "data", "ConfigError": "site-config", "BudgetError": "budget",
    "UndeclaredRelease": "undeclared-release", "LedgerIntegrityError": "ledger",
    "LedgerError": "ledger", "FileNotFoundError": "missing-file",
    "AppNotApproved": "app-not-approved",
}


class SiteFailure(RuntimeError):
    """What the server learns of a failure at a site: a code and a reference."""


def error_code(err: BaseException) -> str:
    for cls in type(err).__mro__:
        if cls.__name__ in CODES:
            return CODES[cls.__name__]
    return "site-error"


class ContainErrors:
    """The outermost mod: an exception's text can hold record values (a file line, a
    label), so only its code and a reference leave; the site's log (the SuperNode's
    output, and `where(context)`, a file in the site's state folder) keeps the rest."""

    def __init__(self, where=lambda context: None) -> None:
        self.where = where

    def __call__(self, msg, context, call_next):
        try:
            _note_node(self.where(context), context.node_id)
            return call_next(msg, context)
        except Exception as err:  # noqa: BLE001 - every failure is contained the same way
            ref, code = secrets.token_hex(4), error_code(err)
            detail = "".join(traceback.format_exception(err))
            log(ERROR, "fedcare site error %s (%s): %s\n%s", ref, code, err, detail)
            _append(self.where(context), f"error {ref} ({code}): {err}\n{detail}")
            raise SiteFailure(f"site failure '{code}'; the site's own log (site.log in its "
                              f"state folder) holds the details under reference "
                              f"{ref}") from None


def _note_node(path, node_id) -> None:
    """'node <id>' in the site's log, unless its last lines say it already: the server
    names a site that never answered by its Flower node id, and this line lets the
    site's owner tell which site that was."""
    if path is None:
        return
    line = f"node {node_id}\n"
    try:
        with open(path, "rb") as handle:
            handle.seek(0, 2)
            handle.seek(max(0, handle.tell() - 8192))
            if b"\n" + line.encode() in b"\n" + handle.read():
                return
    except OSError:
        pass  # no log yet
    _append(path, line)


def _append(path, text: str) -> None:
    if path is None:
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a", encoding="utf-8") as handle:
            handle.write(text.rstrip("\n") + "\n")
    except OSError:
        pass  # the SuperNode's output still has it
