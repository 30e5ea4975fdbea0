"""Suggest diagnosis categories for new notes with a trained adapter (the command:
common/assist/cli.py, `fedcare predict`).

Each record gets its top-k labels with probabilities; a record whose top probability is
under --threshold is marked UNSURE (the model does not know; a clinician must decide).
A bad record in an input file (missing column, empty text, broken line) becomes a row
with its line number and an error; the other records are still predicted. This is
decision support, not a diagnosis.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from common.assist import control_table, model_max_length
from common.data import file_rows
from common.evaluation import Encoded, predict_probs

OUTPUT_SUFFIXES = (".jsonl", ".csv")
DEFAULT_HTML = "predictions_explained.html"
REMINDER = ("Decision support, not a diagnosis: these are a statistical model's suggestions; "
            "a clinician makes the diagnosis.")

Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class Prediction:
    """The model's suggestion for one record (or why there is none)."""

    text: str  # the record's text as read ("" when it could not be read)
    line: int | None  # line in the input file; None for texts given directly
    top: tuple[tuple[str, float], ...]  # (label name, probability), most likely first
    unsure: bool  # top probability < threshold: the model does not know
    error: str = ""  # why the record was not predicted; "" when it was
    truncated: bool = False  # the text was longer than the model reads; the rest was cut

    @property
    def label(self) -> str:
        return self.top[0][0] if self.top else ""

    @property
    def probability(self) -> float:
        return self.top[0][1] if self.top else float("nan")


# --------------------------------------------------------------------------- prediction

def predict_texts(model, tokenizer, label_names: Sequence[str], texts: Sequence[str],
                  top_k: int = 3, threshold: float = 0.5, batch_size: int = 64,
                  device: torch.device | str | None = None,
                  progress: Progress | None = None, *,
                  lines: Sequence[int | None] | None = None) -> list[Prediction]:
    """One Prediction per text, in input order; a blank or non-text entry gets an error.

    `device` defaults to where the model is. `progress(done, total)` is called after each
    batch, counting the texts that are predicted. `lines` gives each text's line number.
    """
    texts = list(texts)
    lines = [None] * len(texts) if lines is None else list(lines)
    if len(lines) != len(texts):
        raise ValueError(f"lines must have one entry per text (got {len(lines)} lines "
                         f"for {len(texts)} texts)")
    errors = ["" if isinstance(t, str) and t.strip() else "empty or non-text record"
              for t in texts]
    texts = [t if isinstance(t, str) else "" for t in texts]
    return _predict(model, tokenizer, label_names, texts, lines, errors, top_k, threshold,
                    batch_size, device, progress)


def predict_records(model, tokenizer, label_names: Sequence[str],
                    records: Sequence[tuple[int, str | None, str]], **options) -> list[Prediction]:
    """Predictions for `read_texts` output: records with an error keep it and their line."""
    texts = [text if text is not None else "" for _, text, _ in records]
    lines = [line for line, _, _ in records]
    errors = [error if error else ("" if text and text.strip() else "empty text")
              for _, text, error in records]
    return _predict(model, tokenizer, label_names, texts, lines, errors, **options)


def _predict(model, tokenizer, label_names, texts, lines, errors, top_k=3, threshold=0.5,
             batch_size=64, device=None, progress=None) -> list[Prediction]:
    _check_int("top_k", top_k)
    _check_int("batch_size", batch_size)
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be a probability in [0, 1] (got {threshold!r})")
    num_labels = getattr(getattr(model, "config", None), "num_labels", len(label_names))
    if len(label_names) != num_labels:
        raise ValueError(f"the model has {num_labels} labels but {len(label_names)} label "
                         "names were given; load both from the same adapter folder")
    device = torch.device(device) if device is not None else next(model.parameters()).device

    good = [i for i, e in enumerate(errors) if not e]
    probs, truncated = _probabilities(model, tokenizer, [texts[i] for i in good], batch_size,
                                      device, progress)
    k = min(top_k, len(label_names))
    out: list[Prediction] = []
    row = {i: j for j, i in enumerate(good)}
    for i, (text, line, error) in enumerate(zip(texts, lines, errors)):
        if error:
            out.append(Prediction(text, line, (), False, error))
            continue
        p = probs[row[i]]
        order = np.argsort(-p, kind="stable")[:k]  # ties: label order
        top = tuple((label_names[c], float(p[c])) for c in order)
        out.append(Prediction(text, line, top, top[0][1] < threshold, "", truncated[row[i]]))
    return out


def _probabilities(model, tokenizer, texts: list[str], batch_size: int, device,
                   progress: Progress | None) -> tuple[np.ndarray, list[bool]]:
    """(N, C) probabilities and whether each text was cut to the model's length limit."""
    if not texts:
        return np.zeros((0, 0), dtype=np.float32), []
    max_length = model_max_length(model, tokenizer)
    enc = tokenizer(texts, truncation=max_length is not None, max_length=max_length)
    truncated = [bool(e.overflowing) for e in enc.encodings] if enc.encodings else \
        [False] * len(texts)
    ids = tuple(tuple(x) for x in enc["input_ids"])
    pad_id = tokenizer.pad_token_id or 0
    order = sorted(range(len(texts)), key=lambda i: len(ids[i]))  # less padding per batch
    probs = np.zeros((len(texts), int(model.config.num_labels)), dtype=np.float32)
    for lo in range(0, len(order), batch_size):
        rows = order[lo: lo + batch_size]
        batch = Encoded(tuple(ids[i] for i in rows), torch.zeros(len(rows), dtype=torch.long),
                        pad_id)
        probs[rows] = predict_probs(model, batch, device, batch_size)
        if progress is not None:
            progress(min(lo + batch_size, len(order)), len(order))
    return probs, truncated


def _check_int(name: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1 (got {value!r})")


# ------------------------------------------------------------------------------ reading

def read_texts(path: str | Path, text_column: str = "text") -> list[tuple[int, str | None, str]]:
    """(line number, text or None, error) per record of a CSV or JSONL file.

    A bad record (missing column, empty text, wrong number of CSV fields, broken JSON
    line) is returned with its error and the rest are still read. A missing file, an
    unsupported file type or a file that is not UTF-8 raises DataError.
    """
    out = []
    for line_no, row, error in file_rows(path, collect_errors=True):
        if error:
            out.append((line_no, None, error))
        elif text_column not in row:
            out.append((line_no, None, f"missing column {text_column!r} "
                                       f"(columns: {sorted(map(str, row))})"))
        elif not isinstance(row[text_column], str):
            out.append((line_no, None, f"{text_column!r} is not text "
                                       f"(got {type(row[text_column]).__name__})"))
        elif not row[text_column].strip():
            out.append((line_no, None, f"empty text in column {text_column!r}"))
        else:
            out.append((line_no, row[text_column].strip(), ""))
    return out


# ------------------------------------------------------------------------------ writing

def write_predictions(predictions: Sequence[Prediction], path: str | Path, top_k: int) -> Path:
    """One row per record, JSONL or CSV by the file's suffix."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        with path.open("w", encoding="utf-8") as handle:
            for n, p in enumerate(predictions, start=1):
                handle.write(json.dumps({
                    "record": n, "line": p.line, "text": p.text,
                    "label": p.label or None, "probability": p.top[0][1] if p.top else None,
                    "top": [{"label": lab, "probability": prob} for lab, prob in p.top],
                    "unsure": p.unsure, "truncated": p.truncated, "error": p.error,
                }, ensure_ascii=False) + "\n")
    elif suffix == ".csv":
        ranks = range(1, top_k + 1)
        with path.open("w", encoding="utf-8", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["record", "line", "text",
                             *[f"{c}_{r}" for r in ranks for c in ("label", "probability")],
                             "unsure", "truncated", "error"])
            for n, p in enumerate(predictions, start=1):
                cells = []
                for r in ranks:
                    lab, prob = p.top[r - 1] if r <= len(p.top) else ("", "")
                    cells += [lab, f"{prob:.6f}" if prob != "" else ""]
                writer.writerow([n, "" if p.line is None else p.line, p.text, *cells,
                                 p.unsure, p.truncated, p.error])
    else:
        raise ValueError(f"--output {path}: unsupported file type {suffix!r}; "
                         "use .jsonl or .csv")
    return path


_CONTROL = control_table(" ")  # one line per record: a table row stays whole


def format_table(predictions: Sequence[Prediction], threshold: float, width: int = 40) -> str:
    """A terminal table: record, line, top label and probability, the others, the text."""
    rows = [("#", "line", "suggestion", "p", "also possible", "text")]
    for n, p in enumerate(predictions, start=1):
        line = "" if p.line is None else str(p.line)
        text = p.text.translate(_CONTROL)
        text = text if len(text) <= width else text[: width - 1] + "…"
        if p.error:
            rows.append((str(n), line, "ERROR", "", p.error.translate(_CONTROL), text))
            continue
        label = f"UNSURE ({p.label}?)" if p.unsure else p.label
        others = ", ".join(f"{lab} {prob:.2f}" for lab, prob in p.top[1:])
        if p.truncated:
            text = "[cut] " + text
        rows.append((str(n), line, label, f"{p.probability:.2f}", others, text))
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]) - 1)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r[:-1], widths)) + "  " + r[-1]
             for r in rows]
    lines = [lines[0].rstrip(), "-" * min(len(lines[0]), 120), *(s.rstrip() for s in lines[1:])]
    unsure = sum(p.unsure for p in predictions)
    failed = sum(bool(p.error) for p in predictions)
    lines.append(f"{len(predictions)} record(s): {len(predictions) - failed - unsure} "
                 f"suggested, {unsure} unsure, {failed} with errors")
    if unsure:
        lines.append(f"UNSURE: for {unsure} record(s) the top probability is under "
                     f"{threshold:.2f}; the model is unsure and a clinician must decide.")
    if any(p.truncated for p in predictions):
        lines.append("[cut]: the note is longer than the model reads; later words were "
                     "not used.")
    return "\n".join(lines)
