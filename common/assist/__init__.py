"""Diagnosis assist: what a clinician runs on a trained adapter. `predict` gives each
note's likely diagnosis categories with calibrated probabilities; `explain` says which
words moved the prediction (`fedcare predict --explain`). What both need is here."""

from __future__ import annotations

CONTROL_CODES = (*range(0x00, 0x20), *range(0x7F, 0xA0))  # C0 and C1 control characters


def control_table(replacement: str, keep: str = "") -> dict[int, str]:
    """A `str.translate` table that shows each control character of a note (ESC, CR,
    ...), except those in `keep`, as `replacement`: printed as they are, they could
    rewrite a reviewer's terminal or break a table row."""
    return {c: replacement for c in CONTROL_CODES if chr(c) not in keep}


def model_max_length(model, tokenizer) -> int | None:
    """The longest input (special tokens included) that both tokenizer and model accept:
    the one limit predictions and explanations share, so their probabilities agree."""
    limits = [tokenizer.model_max_length,
              getattr(getattr(model, "config", None), "max_position_embeddings", None)]
    limits = [n for n in limits if isinstance(n, int) and 0 < n < 1_000_000]
    return min(limits) if limits else None
