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
    kind: Kind
    text: str
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
         sites: Sequence[str], rng: np.random.Generator) -> list[Canary]:
    """m input and m gradient canaries, dealt round-robin to `sites`; gradient
    canaries on m distinct coordinates of a head weight with `head_size` entries."""
    if m > head_size:
        raise DataError(f"{m} gradient canaries need {m} distinct coordinates, and the "
                        f"head's weight has {head_size}: use at most {head_size} canaries")
    def text() -> str:
        return " ".join(words[i] for i in rng.integers(0, len(words), WORDS_PER_TEXT))

    coordinates = rng.choice(head_size, size=m, replace=False)
    out = [Canary("input", text(), labels[int(rng.integers(len(labels)))], -1,
                  sites[i % len(sites)]) for i in range(m)]
    out += [Canary("gradient", text(), labels[0], int(c), sites[i % len(sites)])
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


def add_to_site(data: SiteData, folder: str | Path, site: str) -> SiteData:
    """A simulated site's data with its canaries appended to the training records (the
    validation records stay as they were). No file for the site: no canaries."""
    path = Path(folder) / f"{check_name('site name', site)}.json"
    if not path.is_file():
        return data
    rows = json.loads(path.read_text())
    train = data.train
    names = train.label_names
    try:
        labels = tuple(names.index(row["label"]) for row in rows)
    except ValueError:
        raise DataError(f"{path} holds a canary label that is not one of the run's labels") \
            from None
    added = TextDataset(train.texts + tuple(row["text"] for row in rows),
                        train.labels + labels,
                        train.groups + (GROUP,) * len(rows), names)
    gradient = tuple((len(train) + i, int(row["coordinate"]))
                     for i, row in enumerate(rows) if row["kind"] == "gradient")
    return SiteData(added, data.val, data.fingerprint + "+canaries", gradient)


def as_dataset(made: Sequence[Canary], labels: Sequence[str]) -> TextDataset:
    """Canaries as records (text, label), e.g. to compute their features."""
    return TextDataset(tuple(c.text for c in made), tuple(labels.index(c.label) for c in made),
                       tuple(GROUP for _ in made), tuple(labels))


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
