"""Canaries for the empirical audit: records an attacker can score after training.

Two kinds, each audited on its own (common/privacy/one_run.py):
- input canaries: a text of random vocabulary words with a random label, nothing like a
  clinical note, so the model can only fit its label by memorising that record. Scored
  by the final global model's loss on it: the view of anyone holding the model.
- gradient canaries: a record whose per-example gradient is set, before clipping, to a
  long vector along one coordinate of the head's weight (client/training.py), distinct
  per canary. Clipping makes it exactly C, the most one record may move a step, in a
  direction no other canary shares. Scored by how far the site's released updates moved
  that coordinate: the view of the operator, who sees every update.

Where the audited sites protect patients, each canary is a *patient*: `notes` records
(m) included or left out as a whole, with a patient id of its own at the site, so the
site's patient-level sampling samples, bounds and clips them together. A gradient canary
patient's notes all point along that patient's one coordinate, so the joint clip leaves
the patient exactly C; under record-level DP each note is clipped alone and the patient
moves the update by up to m·C, which is what the audit's unit control shows. An input
canary patient's notes are different random-word texts sharing one random label (a
patient's notes share a diagnosis, and one label makes their pulls add up on one row of
the head: the strongest patient of this kind); it is scored by the mean loss over its
notes. A record canary is a patient of one note.

The audit draws which canaries are included from a secret seed; the sites receive only
the included ones (`write_site_files`), so nothing a site holds tells the excluded ones.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal, Sequence

import numpy as np

from common.data import SiteData, TextDataset
from common.errors import DataError
from common.names import check_name

Kind = Literal["input", "gradient"]
WORDS_PER_TEXT = 8
GROUP = "audit-canary"


@dataclass(frozen=True)
class Canary:
    """One canary unit: a record, or a patient of several notes (`texts`)."""
    kind: Kind
    texts: tuple[str, ...]
    label: str
    coordinate: int = -1   # gradient canaries: flat index into the head's weight
    site: str = ""


def vocabulary_words(tokenizer) -> list[str]:
    """Whole alphabetic words of the tokenizer's vocabulary (no subword pieces)."""
    words = sorted(w for w in tokenizer.get_vocab()
                   if w.isascii() and w.isalpha() and len(w) >= 3)
    if len(words) < 2:
        raise DataError("the tokenizer's vocabulary has too few whole words for input canaries")
    return words


def make(m: int, words: Sequence[str], labels: Sequence[str], head_size: int,
         sites: Sequence[str], rng: np.random.Generator, notes: int = 1) -> list[Canary]:
    """m input and m gradient canaries of `notes` notes each, dealt round-robin to
    `sites`; gradient canaries on m distinct coordinates of a head weight with
    `head_size` entries (all of a canary's notes on its one coordinate)."""
    if notes < 1:
        raise DataError(f"a canary needs at least one note (got {notes})")
    if m > head_size:
        raise DataError(f"{m} gradient canaries need {m} distinct coordinates, and the "
                        f"head's weight has {head_size}: use at most {head_size} canaries")
    def text() -> str:
        return " ".join(words[i] for i in rng.integers(0, len(words), WORDS_PER_TEXT))

    coordinates = rng.choice(head_size, size=m, replace=False)
    def texts() -> tuple[str, ...]:
        return tuple(text() for _ in range(notes))

    out = [Canary("input", texts(), labels[int(rng.integers(len(labels)))], -1,
                  sites[i % len(sites)]) for i in range(m)]
    out += [Canary("gradient", texts(), labels[0], int(c), sites[i % len(sites)])
            for i, c in enumerate(coordinates)]
    return out


def draw_membership(n: int, seed: int | None = None) -> np.ndarray:
    """Each canary in with probability ½, from a secret seed unless one is given."""
    rng = np.random.default_rng(secrets.randbits(128) if seed is None else seed)
    return rng.integers(0, 2, size=n).astype(bool)


def write_site_files(folder: Path, canaries: Sequence[Canary], included: np.ndarray) -> None:
    """<folder>/<site>.json: the included canaries of each site, and nothing else."""
    folder.mkdir(parents=True, exist_ok=True)
    per_site: dict[str, list[dict]] = {}
    for canary, inside in zip(canaries, included):
        per_site.setdefault(canary.site, [])
        if inside:
            per_site[canary.site].append(asdict(canary))
    for site, rows in per_site.items():
        (folder / f"{check_name('site name', site)}.json").write_text(json.dumps(rows))


def _read_rows(path: Path) -> list[dict]:
    """A site's canary file, each row checked against the fields `write_site_files`
    writes; a row of another shape (say, an older file with one `text`) is an error
    naming the file and the row."""
    try:
        rows = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as err:
        raise DataError(f"{path} is not a canary file (JSON): {err}") from None
    if not isinstance(rows, list):
        raise DataError(f"{path} is not a canary file: it holds no list of canaries")
    for i, row in enumerate(rows):
        texts = row.get("texts") if isinstance(row, dict) else None
        if (not isinstance(texts, list) or not texts
                or not all(isinstance(t, str) and t for t in texts)):
            raise DataError(f"{path}: canary {i} has no notes: it needs `texts`, a list of "
                            f"one or more non-empty notes")
        if row.get("kind") not in ("input", "gradient") or not isinstance(row.get("label"), str):
            raise DataError(f"{path}: canary {i} needs a `kind` (input or gradient) and a "
                            f"`label`")
        if row["kind"] == "gradient" and not isinstance(row.get("coordinate"), int):
            raise DataError(f"{path}: gradient canary {i} needs an integer `coordinate`")
    return rows


def add_to_site(data: SiteData, folder: str | Path, site: str) -> SiteData:
    """A simulated site's data with its canaries' notes appended to the training records
    (the validation records stay as they were). Where the records name patients, each
    canary is a patient of its own, all of its notes under one new id. No file for the
    site: no canaries."""
    path = Path(folder) / f"{check_name('site name', site)}.json"
    if not path.is_file():
        return data
    rows = _read_rows(path)
    train = data.train
    names = train.label_names
    try:
        labels = tuple(names.index(row["label"]) for row in rows)
    except ValueError:
        raise DataError(f"{path} holds a canary label that is not one of the run's labels") \
            from None
    owner = [j for j, row in enumerate(rows) for _ in row["texts"]]  # each note's canary
    taken = set(train.patients)
    ids = [f"{GROUP}-{site}-{j}" for j in range(len(rows))]
    if taken & set(ids):
        raise DataError(f"site {site} already has a patient named like a canary ({GROUP}-...)")
    added = TextDataset(train.texts + tuple(t for row in rows for t in row["texts"]),
                        train.labels + tuple(labels[j] for j in owner),
                        train.groups + (GROUP,) * len(owner), names,
                        train.patients + tuple(ids[j] for j in owner) if train.patients
                        else ())
    gradient = tuple((len(train) + i, int(rows[j]["coordinate"]))
                     for i, j in enumerate(owner) if rows[j]["kind"] == "gradient")
    return SiteData(added, data.val, data.fingerprint + "+canaries", gradient)


def as_dataset(made: Sequence[Canary], labels: Sequence[str]) -> TextDataset:
    """The canaries' notes as records (text, its canary's label), canary by canary, e.g.
    to compute their features; `owners(made)` says whose each record is."""
    return TextDataset(tuple(t for c in made for t in c.texts),
                       tuple(labels.index(c.label) for c in made for _ in c.texts),
                       tuple(GROUP for c in made for _ in c.texts), tuple(labels))


def owners(made: Sequence[Canary]) -> np.ndarray:
    """For each record of `as_dataset(made)`, the index of its canary."""
    return np.repeat(np.arange(len(made)), [len(c.texts) for c in made])


def save(path: Path, canaries: Sequence[Canary], included: np.ndarray,
         scores: dict[Kind, np.ndarray], guesses: dict[Kind, np.ndarray]) -> None:
    """Every canary with its membership, score and the guess the reported bound used:
    what an auditor needs to recompute the bound."""
    index = {"input": 0, "gradient": 0}
    rows = []
    for canary, inside in zip(canaries, included):
        k = index[canary.kind]
        index[canary.kind] += 1
        rows.append({**asdict(canary), "included": bool(inside),
                     "score": float(scores[canary.kind][k]),
                     "guess": int(guesses[canary.kind][k])})
    path.write_text(json.dumps(rows, indent=0))
