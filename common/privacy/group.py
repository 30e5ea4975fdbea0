"""Group privacy: what a record-level guarantee says of a patient with several notes.

A mechanism that is (ε, δ)-DP for one record is, for a group of g records (a patient's
g notes), (g·ε, δ·Σ_{i<g} e^{iε})-DP: change the records one at a time, each change
costing e^ε in the odds and adding δ scaled by what came before (Vadhan 2017, "The
complexity of differential privacy", Lemma 2.2; docs/accounting.md). It is an upper
bound, tight in the worst case, and grows fast: ε = 8 per record reads as ε = 160 for a
patient with 20 notes, with a δ above 1. Pure arithmetic: the auditor's tools use it
without the training stack.
"""

from __future__ import annotations

import math

GROUP_SIZES = (2, 5, 10, 20, 50)  # shown when a site's largest number of notes is not given


def group_privacy(epsilon: float, delta: float, group: int) -> tuple[float, float]:
    """(ε_g, δ_g) for `group` records under an (epsilon, delta)-DP mechanism:
    ε_g = g·ε, δ_g = δ·(e^{gε} − 1)/(e^ε − 1), capped at 1 (no promise left)."""
    if group < 1:
        raise ValueError(f"a group has at least one member (got {group})")
    if epsilon == 0:
        return 0.0, min(1.0, delta * group)
    return group * epsilon, min(1.0, delta * math.expm1(group * epsilon) / math.expm1(epsilon))


def per_record_for_group(epsilon: float, delta: float, group: int) -> tuple[float, float]:
    """The record-level (ε, δ) whose reading for `group` records is (epsilon, delta):
    ε/g and δ·(e^{ε/g} − 1)/(e^ε − 1). The baseline that protects a patient of at
    most `group` notes with record-level DP-SGD."""
    if group < 1:
        raise ValueError(f"a group has at least one member (got {group})")
    eps = epsilon / group
    return eps, delta * math.expm1(eps) / math.expm1(epsilon) if epsilon else delta / group


def patient_reading(epsilon: float, delta: float, notes: int | None) -> list[dict]:
    """A record-level (ε, δ) read for a patient with `notes` notes (the site's largest),
    or, when that is not known, for patients of GROUP_SIZES notes."""
    sizes = (notes,) if notes else GROUP_SIZES
    return [dict(zip(("notes", "epsilon", "delta"), (g, *group_privacy(epsilon, delta, g))))
            for g in sizes]


def reading_text(rows: list[dict], largest: bool) -> str:
    """One line: 'a patient with 20 notes: ε ≤ 160, δ ≤ 1 (no guarantee)'."""
    def one(r: dict) -> str:
        gone = " (no guarantee)" if r["delta"] >= 1 else ""
        return f"{r['notes']} notes: ε ≤ {r['epsilon']:.4g}, δ ≤ {r['delta']:.3g}{gone}"
    head = "the site's largest patient, " if largest else "a patient with "
    return head + "; ".join(one(r) for r in rows)


def notes_count(text: str) -> int:
    """A command-line number of notes: a whole number >= 1 (argparse type)."""
    import argparse

    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1 (got {text!r})")
    return value
