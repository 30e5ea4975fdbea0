"""Patients: whose records are whose, and synthetic patients for the embedded task.

A dataset's `patients` tuple names each record's patient ("" for none); patient-level
DP (client/training.py) samples patients and bounds what each brings to a step, so it
needs every record to name one. Files name them in a column (`read_records`); the
embedded ICD-10 task has none, so `synthetic_patients` makes them:

- **How many notes a patient has** is log-normal, rounded, at least 1: median
  `data.notes_per_patient` (3), log-sd `data.notes_spread` (1.2). Counts of notes,
  visits and admissions per patient in health records are right-skewed with a long
  tail (a few chronically ill patients hold a large share of the notes), which a
  log-normal matches with two readable numbers; a power law would also fit the tail,
  but its mean is unstable in the tail exponent. At the defaults the mean is about 6
  notes, 1% of patients have more than 50, and the largest of a site's ~700 patients
  has one to three hundred (measured in tests/test_patients.py).
- **Comorbidity:** each note of a patient comes, with probability `data.comorbidity`
  (0.7), from the chapter of the patient's first note while that chapter has notes
  left at the site; otherwise from any chapter, in proportion to the notes left. A
  patient's notes therefore share their chapter far more often than chance.

Patients are made inside one site and inside one side of its split (train or
validation), so no patient has notes on both sides of any split, nor at two sites,
and the test set's notes belong to nobody's training patients.
"""

from __future__ import annotations

import math
import random
from typing import Sequence

from common.errors import DataError


def synthetic_patients(labels: Sequence[int], median: float, spread: float,
                       comorbidity: float, seed: int, prefix: str) -> tuple[str, ...]:
    """A patient id for each record (`labels`: each record's class), deterministic under
    `seed`; ids are `prefix` + a number."""
    rng = random.Random(seed)
    left: dict[int, list[int]] = {}
    for i, label in enumerate(labels):
        left.setdefault(int(label), []).append(i)
    for rows in left.values():
        rng.shuffle(rows)
    out = [""] * len(labels)
    remaining, patient = len(labels), 0
    while remaining:
        notes = max(1, round(math.exp(rng.gauss(math.log(median), spread))))
        first = None
        for _ in range(min(notes, remaining)):
            chapter = first if first is not None and left.get(first) and \
                rng.random() < comorbidity else _any_chapter(left, remaining, rng)
            first = chapter if first is None else first
            out[left[chapter].pop()] = f"{prefix}{patient}"
            remaining -= 1
        patient += 1
    return tuple(out)


def _any_chapter(left: dict[int, list[int]], remaining: int, rng: random.Random) -> int:
    """A chapter drawn in proportion to the notes it has left."""
    pick = rng.randrange(remaining)
    for chapter, rows in left.items():
        if pick < len(rows):
            return chapter
        pick -= len(rows)
    raise AssertionError("no notes left")  # remaining counts exactly the notes in `left`


def rows_by_patient(patients: Sequence[str]) -> tuple[tuple[int, ...], ...]:
    """Each patient's record indices, patients in order of first appearance."""
    rows: dict[str, list[int]] = {}
    for i, patient in enumerate(patients):
        rows.setdefault(patient, []).append(i)
    return tuple(tuple(r) for r in rows.values())


def check_patient_ids(patients: Sequence[str], lines: Sequence[int], path,
                      column: str) -> None:
    """Every record names a patient; else a DataError naming the file and line."""
    for patient, line in zip(patients, lines):
        if not patient:
            raise DataError(f"missing or empty patient id in column {column!r}: every "
                            "record must name its patient", path=path, line=line)


def shared_patients(site: Sequence[str], site_lines: Sequence[int], test: Sequence[str],
                    path, test_path) -> None:
    """A site file's patient who also has notes in the test file is refused: their
    test notes would be scored by a model trained on their other notes."""
    held = set(test)
    for patient, line in zip(site, site_lines):
        if patient in held:
            raise DataError(f"patient {patient!r} also has records in the test file "
                            f"{test_path}; a patient's records must all be on one side of "
                            "the split", path=path, line=line)
